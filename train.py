"""Teach Stable Diffusion one subject from a few photos: DreamBooth + LoRA.

    python train.py --images data/dog --class-noun dog
    python train.py --images data/dog --class-noun dog --model sdxl   # SDXL, 1024 px (docs/sdxl-training.md)
    python train.py --resume runs/20261125-101500        # continue an interrupted run

Writes <output>/lora.safetensors (kohya format: loads in sample.py, AUTOMATIC1111, ComfyUI, diffusers),
samples/ (validation images per epoch and grid.png), log.jsonl, loss.png, report.html, config.json, and
checkpoints/ while it runs.
"""
import argparse
import signal
import sys

from dreambooth_min.run.cli import CommandParser, add_options, run_command, settings_from_args
from dreambooth_min.run.config import TrainConfig, config_from_json
from dreambooth_min.run.run_folder import RunFolder
from dreambooth_min.run.training import train


def parse_args(argv=None):
    p = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --images FOLDER [options]  |  %(prog)s --resume RUN [--device D] [--gradient-checkpointing]")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest checkpoint, with "
                   "its config.json (model, images, every setting); only --device and --gradient-checkpointing (same result, less memory) may be given with it")
    add_options(p, TrainConfig)
    args = p.parse_args(argv)
    if args.resume:
        given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")]
        extra = sorted(set(given) - {"--resume", "--device", "--gradient-checkpointing"})
        if extra:
            p.error(f"--resume continues a run with its own config.json: {', '.join(extra)} cannot be changed")
    elif not getattr(args, "images", ""):
        p.error("--images is required (or --resume RUN)")
    return args


def run(args):
    """Train, or continue the run --resume names; 130 when interrupted (its checkpoint saved), else 0."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop saves like Ctrl-C
    if args.resume:
        cfg = config_from_json(RunFolder.config_file(args.resume))
        cfg.output, cfg.device = args.resume, getattr(args, "device", "") or cfg.device
        cfg.gradient_checkpointing = cfg.gradient_checkpointing or args.gradient_checkpointing
    else:
        cfg = settings_from_args(TrainConfig, args)
    result = train(cfg, resume=bool(args.resume))
    return 130 if result["interrupted"] else 0


def main(argv=None):
    """Exit status (run/cli.py EXIT_CODES): 0; 2 bad input, 3 out of memory, 4 disk full, each after one `error:`
    line (no traceback); 130 Ctrl-C or SIGTERM, after saving a checkpoint."""
    return run_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
