"""Measure subject fidelity as the DreamBooth paper does: DINO, CLIP-I, CLIP-T, PRES, DIV.

    python evaluate.py runs/20261125-101500                       # every validation epoch of a run
    python evaluate.py --real data/dog --generated out/ --prompt "a photo of sks dog in the snow"
    python evaluate.py --generate 4 --real data/dog --class-noun dog --lora runs/<run>/lora.safetensors

A run folder gets RUN/metrics.jsonl (one line per validation epoch), RUN/metrics.png (the metrics
over epochs above the loss) and a fresh RUN/report.html (with its metrics table), and the best epoch is
named: the highest DINO among the epochs whose CLIP-T is within --margin of the best CLIP-T, with the
saved LoRA nearest to it. --generate N draws N images for each prompt of the paper's prompt set (object
or live-subject prompts, chosen by the class noun) and scores them all. The evaluator models (--clip-model,
--dino-model) are Hugging Face Hub ids or local folders; they are downloaded once into the Hugging Face
cache (HF_HUB_OFFLINE=1 uses it alone).
"""
import argparse
import json
import sys
from pathlib import Path

import dreambooth_min
from dreambooth_min.errors import UserError
from dreambooth_min.formats.lora_apply import apply_lora
from dreambooth_min.formats.lora_file import load_lora
from dreambooth_min.formats.png import parameters_text, save_png
from dreambooth_min.formats.safetensors_io import atomic_path
from dreambooth_min.run.cli import CommandParser, run_command
from dreambooth_min.run.hardware import resolve_hardware
from dreambooth_min.sampling import ETA, GUIDANCE, STEPS, check_size, generate
from dreambooth_min.watch.eval_prompts import prompts_for
from dreambooth_min.watch.evaluation import CLIP_T_MARGIN, METRICS
from dreambooth_min.watch.evaluators import CLIP_MODEL, DINO_MODEL, evaluate_epoch, load_evaluators
from dreambooth_min.watch.finished_run import check_run, evaluate_run
from dreambooth_min.watch.page import write_report
from dreambooth_min.watch.preprocess import read_images


def parse_args(argv=None):
    p = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="a train.py run folder (config.json, log.jsonl, samples/epoch_NNNN/)")
    p.add_argument("--real", help="folder of the real subject photos (run mode: overrides config.json's)")
    p.add_argument("--generated", help="folder of generated images to score against --real")
    p.add_argument("--class-generated", help="folder of the fine-tuned model's plain-class images (for PRES)")
    p.add_argument("--prompt", help="the prompt of the --generated images (for CLIP-T)")
    p.add_argument("--margin", type=float, default=CLIP_T_MARGIN,
                   help="best epoch: CLIP-T may be this much below its maximum (default: %(default)s)")
    g = p.add_argument_group("--generate N: draw N images per prompt of the paper's prompt set, then score them")
    g.add_argument("--generate", type=int, metavar="N", help="images per prompt (the paper: 4)")
    g.add_argument("--model", help="base checkpoint (default: the one model in weights/)")
    g.add_argument("--lora", help="LoRA .safetensors to apply (none: the base model is scored)")
    g.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (default: %(default)s)")
    g.add_argument("--class-noun", help="what the subject is (dog, backpack...): picks the prompt set")
    g.add_argument("--token", default="sks", help="the rare token (default: %(default)s)")
    g.add_argument("--class-prompt", default="a photo of {class_noun}",
                   help="prompt of the images for PRES; empty: no PRES (default: %(default)r)")
    g.add_argument("--num-prompts", type=int, default=25, help="use the first K prompts (default: all 25)")
    g.add_argument("--steps", type=int, default=STEPS, help="DDIM steps (default: %(default)s)")
    g.add_argument("--guidance", type=float, default=GUIDANCE,
                   help="classifier-free guidance scale (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i (default: %(default)s)")
    g.add_argument("--resolution", type=int, help="pixels (default: the model's)")
    g.add_argument("--out", help="where the images and metrics.json go (default: eval/ beside the LoRA, or ./eval)")
    e = p.add_argument_group("evaluator models")
    e.add_argument("--clip-model", default=CLIP_MODEL, help="Hub id or local folder (default: %(default)s)")
    e.add_argument("--dino-model", default=DINO_MODEL, help="Hub id or local folder (default: %(default)s)")
    e.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    e.add_argument("--batch-size", type=int, default=32, help="images per evaluator batch (default: %(default)s)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args):
    """Which mode, with its inputs checked before any model is loaded."""
    modes = [m for m, on in (("run", args.run), ("folders", args.generated), ("generate", args.generate is not None)) if on]
    if len(modes) != 1:
        raise UserError("give one of: a run folder, --generated DIR (with --real and --prompt), or --generate N "
                        f"(got {' and '.join(modes) or 'none'})")
    if args.batch_size < 1 or args.margin < 0:
        raise UserError("--batch-size must be at least 1 and --margin at least 0")
    mode = modes[0]
    if mode == "folders" and (not args.real or args.prompt is None):
        raise UserError("--generated needs --real DIR and --prompt P")
    if mode == "generate":
        if not args.real or not args.class_noun:
            raise UserError("--generate needs --real DIR and --class-noun X")
        if args.generate < 1 or args.steps < 1 or not 1 <= args.num_prompts <= 25:
            raise UserError("--generate and --steps must be at least 1, --num-prompts between 1 and 25")
        if args.lora and not Path(args.lora).is_file():
            raise UserError(f"LoRA file {args.lora} does not exist")
    args.hardware = resolve_hardware(args.device or "")  # fp16 for --generate on CUDA; the evaluators run in fp32
    return mode


def _evaluators(args):
    return load_evaluators(args.clip_model, args.dino_model, args.hardware.device, args.batch_size,
                           not args.no_progress)


def run_mode(args):
    check_run(args.run, args.real)  # before the evaluators load: bad input fails fast
    records, best, ckpt = evaluate_run(args.run, _evaluators(args), args.real, args.margin)
    run = Path(args.run)
    for r in records:
        print(f"epoch {r['epoch']:>5} step {r['step']:>6}  " + "  ".join(
            f"{k.replace('_', '-')} {r[k]:.4f}" for k in METRICS if k in r))
    print(f"wrote {run / 'metrics.jsonl'}, {run / 'metrics.png'} and {write_report(run, args.margin)}")
    if best is None:
        print("no best epoch: no epoch has both DINO and CLIP-T")
        return
    where = f"; nearest saved LoRA: {ckpt[0]} (step {ckpt[1]})" if ckpt else "; no saved LoRA in the run"
    print(f"best epoch: {best['epoch']} (step {best['step']}): DINO {best['dino']:.4f}, CLIP-T {best['clip_t']:.4f} "
          f"(highest DINO with CLIP-T within {args.margin} of its maximum){where}")


def folder_mode(args):
    real = read_images(args.real, "--real")
    generated = read_images(args.generated, "--generated")
    class_images = read_images(args.class_generated, "--class-generated") if args.class_generated else None
    scores = evaluate_epoch(_evaluators(args), real, generated, args.prompt, class_images)
    print(json.dumps({"real": len(real), "generated": len(generated)} | {k: scores[k] for k in METRICS if k in scores},
                     indent=2))


def generate_mode(args):
    prompts = prompts_for(args.class_noun, args.token)[:args.num_prompts]
    class_prompt = args.class_prompt.format(class_noun=args.class_noun) if args.class_prompt else ""
    real = read_images(args.real, "--real")
    if args.resolution is not None:
        check_size(args.resolution, args.resolution)
    out = Path(args.out) if args.out else (Path(args.lora).parent / "eval" if args.lora else Path("eval"))
    evaluators = _evaluators(args)  # before the slow part: a missing evaluator fails now
    sd = dreambooth_min.load(args.model or dreambooth_min.find_default_model(), dtype=args.hardware.dtype,
                             device=args.hardware.device)
    if args.lora:
        apply_lora(sd.unet, sd.text_encoder, load_lora(args.lora)[0], scale=args.lora_scale)
    res = args.resolution or sd.default_resolution
    lora = f"{Path(args.lora).stem}:{args.lora_scale}" if args.lora else None
    drawn = {}
    for i, prompt in enumerate(prompts + ([class_prompt] if class_prompt else [])):
        images = generate(sd, prompt, num_images=args.generate, steps=args.steps, guidance=args.guidance,
                          seed=args.seed, height=res, width=res, progress=not args.no_progress)
        folder = out / ("class" if i == len(prompts) else f"prompt_{i:02d}")
        for j, im in enumerate(images):
            save_png(im, folder / f"{j}.png", parameters_text(prompt, "", args.steps, args.guidance, args.seed + j,
                                                              res, res, sd.name, ETA, lora))
        drawn[prompt] = images
    del sd
    generated = [im for p in prompts for im in drawn[p]]
    per_image = [p for p in prompts for _ in drawn[p]]
    scores = evaluate_epoch(evaluators, real, generated, per_image, drawn.get(class_prompt) or None)
    result = {"images_per_prompt": args.generate, "prompts": prompts, "class_prompt": class_prompt or None,
              "lora": args.lora, "model": args.model} | {k: scores[k] for k in METRICS if k in scores}
    with atomic_path(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in METRICS if k in result}, indent=2))
    print(f"images and metrics.json in {out}")


def main(argv=None):
    """Exit status (run/cli.py EXIT_CODES): 0; 2 bad input, 3 out of memory, 4 disk full, each after one `error:`
    line (no traceback); 130 Ctrl-C."""
    def command():
        args = parse_args(argv)
        {"run": run_mode, "folders": folder_mode, "generate": generate_mode}[check_args(args)](args)
        return 0
    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
