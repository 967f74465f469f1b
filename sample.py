"""Make images with a Stable Diffusion 1.x / 2.x / XL checkpoint (optionally with a LoRA) and the DDIM sampler.

    python sample.py --model weights/v1-5-pruned-emaonly.safetensors --prompt "a photo of sks dog" --out out.png

Each PNG carries its prompt, seed and settings in an A1111-style "parameters" text chunk. With
--num-images N the images use seeds seed, seed+1, ... and are saved as out-0.png, out-1.png, ... beside a
grid out.png. On the CPU in fp32 a seed gives the same image as diffusers' StableDiffusionPipeline with
DDIMScheduler and generator=torch.Generator().manual_seed(seed).
"""
import argparse
import sys
from pathlib import Path

import dreambooth_min
from dreambooth_min.errors import UserError
from dreambooth_min.formats.lora_apply import apply_lora, lora_label, parse_lora_arg
from dreambooth_min.formats.lora_file import load_lora
from dreambooth_min.formats.png import image_grid, parameters_text, save_png
from dreambooth_min.formats.safetensors_io import check_writable
from dreambooth_min.run.cli import CommandParser, run_command
from dreambooth_min.run.hardware import DTYPES, resolve_hardware
from dreambooth_min.run.pivotal import use_embedding
from dreambooth_min.sampling import BATCH_SIZE, ETA, GUIDANCE, STEPS, check_size, generate
from dreambooth_min.scheduler import PREDICTION_TYPES


def parse_args(argv=None):
    p = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .safetensors checkpoint, a diffusers folder, a Hugging Face Hub repo id "
                                   "(owner/name or owner/name/file.safetensors; downloaded once into the Hugging Face "
                                   "cache) or a short name: sd15, sd21, sd21-base, sdxl (default: the one model in weights/, "
                                   "else sd15)")
    p.add_argument("--revision", help="branch, tag or commit of a Hub --model (default: main)")
    p.add_argument("--prompt", required=True, help="what to draw; may be empty")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty; for SDXL an "
                                                          "empty one is zero embeddings, as diffusers)")
    p.add_argument("--out", default="out.png", help="output PNG (default: out.png)")
    p.add_argument("--num-images", type=int, default=1, help="images to make, seeds seed, seed+1, ... (default: 1)")
    p.add_argument("--steps", type=int, default=STEPS, help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=GUIDANCE,
                   help="classifier-free guidance scale; <= 1 turns it off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: 1024 for SDXL, 768 for SD 2.x "
                                               "v-models, else 512)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: as --height's default)")
    p.add_argument("--eta", type=float, default=ETA,
                   help="DDIM eta: 0 deterministic, 1 DDPM-like noise (default: %(default)s)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA .safetensors file (kohya LoRA / LoCon, or diffusers / peft; SD 1.x / 2.x or SDXL, "
                        "matching --model) and its strength, e.g. "
                        "style.safetensors:0.8; repeat to combine several (default strength: --lora-scale)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of a --lora without :SCALE (default: 1.0)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding from train.py --pivotal (embedding.safetensors): its new tokens, "
                        "e.g. <s0><s1>, can then be written in --prompt; repeatable")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help="override what the UNet predicts (SD 2.x single files: a <name>.yaml beside the file, "
                        "else the name decides: '512' or 'base' = epsilon, otherwise v)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="weights' precision (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per UNet batch (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def numbered(out, i):
    """out.png -> out-0.png, out-1.png, ..."""
    return out.with_name(f"{out.stem}-{i}{out.suffix}")


def run(args):
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, not {out}")
    for path in [out] + [numbered(out, i) for i in range(args.num_images)] * (args.num_images > 1):
        check_writable(path, "--out")  # before the model is loaded and the images drawn
    if args.height is not None or args.width is not None:  # fail before spending time loading the model
        check_size(8 if args.height is None else args.height, 8 if args.width is None else args.width)
    if args.num_images < 1 or args.batch_size < 1 or args.steps < 1:
        raise UserError("--num-images, --batch-size and --steps must be at least 1")
    if args.eta < 0:
        raise UserError(f"--eta must be >= 0, not {args.eta}")
    hardware = resolve_hardware(args.device or "", args.dtype or "")

    loras = [parse_lora_arg(text, args.lora_scale) for text in args.lora]  # missing files: fail before loading
    for path in args.embedding:
        if not Path(path).is_file():
            raise UserError(f"embedding file {path} does not exist")
    model_path = args.model or dreambooth_min.find_default_model()
    sd = dreambooth_min.load(model_path, dtype=hardware.dtype, device=hardware.device,
                             prediction_type=args.prediction_type, revision=args.revision)
    if sd.random_note:
        print(f"warning: {model_path} is {sd.random_note}", file=sys.stderr)
    for path, scale in loras:  # merged one after another: W + sum_i scale_i (alpha_i / r_i) B_i A_i
        tensors, metadata = load_lora(path)
        apply_lora(sd.unet, sd.text_encoder, tensors, scale=scale, metadata=metadata, text_encoder_2=sd.text_encoder_2)
    for path in args.embedding:
        tokens = use_embedding(sd, path)
        if tokens not in args.prompt + args.negative_prompt:
            print(f"warning: the prompt does not use the embedding {path}: write {tokens} in it", file=sys.stderr)
    lora = lora_label(loras)
    height = sd.default_resolution if args.height is None else args.height
    width = sd.default_resolution if args.width is None else args.width

    images = generate(sd, args.prompt, args.negative_prompt, args.num_images, args.steps, args.guidance, args.seed,
                      height, width, args.eta, progress=not args.no_progress, batch_size=args.batch_size)
    params = lambda seed: parameters_text(args.prompt, args.negative_prompt, args.steps, args.guidance, seed,
                                          width, height, sd.name, args.eta, lora)
    if len(images) == 1:
        save_png(images[0], out, params(args.seed))
        print(f"saved {out}")
        return
    for i, im in enumerate(images):
        save_png(im, numbered(out, i), params(args.seed + i))
    save_png(image_grid(images), out, params(args.seed))
    print(f"saved {numbered(out, 0)} ... {numbered(out, len(images) - 1)} and the grid {out}")


def main(argv=None):
    """Exit status (run/cli.py EXIT_CODES): 0; 2 bad input, 3 out of memory, 4 disk full, each after one `error:`
    line (no traceback); 130 Ctrl-C (images already saved stay whole: they are written atomically)."""
    def command():
        run(parse_args(argv))
        return 0
    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
