"""Teach Stable Diffusion one subject from a few photos: DreamBooth + LoRA.

    python train.py --images data/dog --class-noun dog
    python train.py --resume runs/20261125-101500        # continue an interrupted run

Writes <output>/lora.safetensors (kohya format: loads in sample.py, AUTOMATIC1111, ComfyUI, diffusers),
samples/ (validation images per epoch and grid.png), log.jsonl, loss.png, config.json, checkpoints/.
"""
import argparse
import signal
import sys

from dreambooth_min.errors import UserError
from dreambooth_min.training import TrainConfig, config_from_json, train

D = TrainConfig()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("what to learn")
    a.add_argument("--images", help="folder of 3-10 photos of the subject (jpg/png/webp; name.txt beside name.jpg = its caption)")
    a.add_argument("--class-noun", default=D.class_noun, help="what the subject is, e.g. dog, girl, backpack (default: %(default)s)")
    a.add_argument("--prompt", default=D.prompt, help="instance prompt; 'sks' is the rare token that comes to mean your subject (default: %(default)r)")
    a.add_argument("--model", default=D.model, help="checkpoint: .safetensors file or diffusers folder (default: the one model in weights/)")
    a.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the detected prediction type")
    a.add_argument("--resolution", type=int, default=D.resolution, help="training size in pixels (default: 512 for SD 1.x and 2.x-base, 768 for SD 2.x v-models)")
    a.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips (for asymmetric subjects: text, logos)")
    a = p.add_argument_group("prior preservation (DreamBooth eq. 2)")
    a.add_argument("--prior-weight", type=float, default=D.prior_weight, help="lambda, weight of the class-image loss (default: %(default)s)")
    a.add_argument("--no-prior", action="store_true", help="train on the instance images alone")
    a.add_argument("--class-prompt", default=D.class_prompt, help="prompt of the class images (default: %(default)r)")
    a.add_argument("--num-class-images", type=int, default=D.num_class_images, help="class images drawn by the base model (default: %(default)s)")
    a.add_argument("--class-dir", default=D.class_dir, help="where class images are kept and reused (default: class_images/<model>/<prompt>-<resolution>)")
    a.add_argument("--class-steps", type=int, default=D.class_steps, help="DDIM steps per class image (default: %(default)s)")
    a = p.add_argument_group("LoRA")
    a.add_argument("--rank", type=int, default=D.rank, help="LoRA rank r (default: %(default)s)")
    a.add_argument("--alpha", type=float, default=D.alpha, help="LoRA alpha; scale = alpha / rank (default: = rank)")
    a.add_argument("--lora-targets", default=",".join(D.lora_targets),
                   help="UNet layers to adapt, by module-name suffix, comma-separated; also e.g. proj_in, proj_out, ff.net.0.proj, ff.net.2 (default: %(default)s)")
    a.add_argument("--train-text-encoder", action="store_true", help="also adapt the text encoder's attention (q/k/v/out_proj)")
    a = p.add_argument_group("optimisation")
    a.add_argument("--epochs", type=int, default=D.epochs, help="passes over the instance images (default: %(default)s)")
    a.add_argument("--steps", type=int, default=D.steps, help="optimizer steps; overrides --epochs when > 0")
    a.add_argument("--lr", type=float, default=D.lr, help="AdamW learning rate of the LoRA factors (default: %(default)s)")
    a.add_argument("--text-encoder-lr", type=float, default=D.text_encoder_lr, help="learning rate of the text-encoder LoRA (default: = --lr)")
    a.add_argument("--lr-scheduler", default=D.lr_scheduler, choices=["constant", "cosine"], help="after warmup (default: %(default)s)")
    a.add_argument("--warmup-steps", type=int, default=D.warmup_steps, help="linear warmup steps (default: %(default)s)")
    a.add_argument("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay (default: %(default)s)")
    a.add_argument("--batch-size", type=int, default=D.batch_size, help="instance images per step; as many class images are added (default: %(default)s)")
    a.add_argument("--grad-accum", type=int, default=D.grad_accum, help="micro-batches per optimizer step (default: %(default)s)")
    a.add_argument("--max-grad-norm", type=float, default=D.max_grad_norm, help="gradient clipping (default: %(default)s)")
    a.add_argument("--snr-gamma", type=float, default=D.snr_gamma, help="min-SNR-gamma loss weighting, e.g. 5; 0 disables (default)")
    a.add_argument("--offset-noise", type=float, default=D.offset_noise, help="offset-noise strength, e.g. 0.05; 0 disables (default)")
    a.add_argument("--seed", type=int, default=D.seed, help="seed of every random draw (default: %(default)s)")
    a = p.add_argument_group("hardware")
    a.add_argument("--device", default=D.device, help="cuda or cpu (default: cuda if available)")
    a.add_argument("--precision", choices=["fp16", "bf16", "fp32"],
                   help="fp16 = frozen fp16 base + autocast + GradScaler (default on CUDA); fp32 (default on CPU); bf16")
    a.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward: less memory, ~30%% slower")
    a = p.add_argument_group("outputs")
    a.add_argument("--output", default=D.output, help="run folder (default: runs/<timestamp>)")
    a.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest checkpoint, with its "
                   "config.json (model, images, every setting); only --device may be given with it")
    a.add_argument("--save-every", type=int, default=D.save_every, help="checkpoint every N steps (default: %(default)s; Ctrl-C always saves one)")
    a.add_argument("--keep-checkpoints", type=int, default=D.keep_checkpoints, help="how many checkpoints to keep (default: %(default)s)")
    a.add_argument("--validate-every", type=int, default=D.validate_every, help="sample the validation prompt every N epochs; 0 disables (default: %(default)s)")
    a.add_argument("--validation-prompt", default=D.validation_prompt, help="(default: %(default)r)")
    a.add_argument("--validation-images", type=int, default=D.validation_images, help="images per validation, fixed seeds (default: %(default)s)")
    a.add_argument("--validation-steps", type=int, default=D.validation_steps, help="DDIM steps per validation image (default: %(default)s)")
    args = p.parse_args(argv)
    if args.resume:
        given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")]
        extra = sorted(set(given) - {"--resume", "--device"})
        if extra:
            p.error(f"--resume continues a run with its own config.json: {', '.join(extra)} cannot be changed")
    elif not args.images:
        p.error("--images is required (or --resume RUN)")
    return args


def config_from_args(args):
    fields = {k: v for k, v in vars(args).items() if hasattr(D, k) and v is not None}
    fields["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.no_prior:
        fields["prior_weight"] = 0.0
    return TrainConfig(**fields)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop saves like Ctrl-C
    try:
        if args.resume:
            cfg = config_from_json(f"{args.resume}/config.json")
            cfg.output = args.resume
            cfg.device = args.device or cfg.device
            result = train(cfg, resume=True)
        else:
            result = train(config_from_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started (model loading, class images): files are whole
        print("interrupted before training started: run the same command again; the class images drawn "
              "so far are kept and reused", file=sys.stderr)
        return 130
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
