r"""After training: bake LoRAs into a model, shrink a LoRA, or extract one from a fine-tuned model (SD 1.x, 2.x, XL).

    python lora_tools.py merge --model sd15 --lora style.safetensors:0.8 --lora dog.safetensors --out merged.safetensors
    python lora_tools.py merge --model sd15 --lora a.safetensors --lora b.safetensors:0.5 --into-lora --rank 16 \
        --out ab.safetensors
    python lora_tools.py resize --lora big.safetensors --rank 8 --out small.safetensors
    python lora_tools.py resize --lora big.safetensors --rank 64 --dynamic sv_fro --ratio 0.9 --out small.safetensors
    python lora_tools.py extract --model sd15 --tuned my-finetune.safetensors --rank 32 --out extracted.safetensors

merge writes W + sum_i s_i (alpha_i / r_i) B_i A_i (LoCon and DoRA included) as an A1111 / ComfyUI single file
(OUT ends in .safetensors, LDM keys) or a diffusers folder (any other OUT); --into-lora instead writes one LoRA:
the best rank-R approximation (SVD) of each layer's summed update. resize and extract factorize by SVD as kohya
sd-scripts does (networks/resize_lora.py, extract_lora_from_models.py): same dynamic ranks, same alphas. They
print each module's rank and the fraction of its update's Frobenius norm kept. Details: docs/lora-tools.md.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

import dreambooth_min
from dreambooth_min.errors import UserError
from dreambooth_min.formats.checkpoint import _single_file_prediction_type as single_file_prediction_type
from dreambooth_min.formats.export import save_diffusers_folder
from dreambooth_min.formats.lora_apply import parse_lora_arg
from dreambooth_min.formats.lora_file import family_metadata, load_lora, save_lora
from dreambooth_min.formats.lora_merge import kohya_keys, merge_loras, model_differences
from dreambooth_min.formats.lora_svd import DYNAMIC_METHODS, lora_from_updates, resize_lora
from dreambooth_min.formats.safetensors_io import check_writable
from dreambooth_min.formats.single_file import save_single_file
from dreambooth_min.run.cli import CommandParser, run_command
from dreambooth_min.run.hardware import DTYPES, resolve_hardware
from dreambooth_min.scheduler import PREDICTION_TYPES

MODEL_HELP = ("a .safetensors checkpoint, a diffusers folder, a Hub repo id or a short name (sd15, sd21, sdxl); "
              "default: the one model in weights/, else sd15")


def _common(p, model=True, out_help="the .safetensors file to write"):
    if model:
        p.add_argument("--model", help=MODEL_HELP)
        p.add_argument("--device", help="where the model is loaded and merged (default: cuda if available, else cpu)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _ranks(p, help, required=True):
    p.add_argument("--rank", type=int, required=required, metavar="R", help=help)
    p.add_argument("--conv-rank", type=int, metavar="R",
                   help="rank of k x k convolution modules (LoCon; default --rank)")


def parse_args(argv=None):
    p = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="tool", required=True, metavar="{merge,resize,extract}")
    m = sub.add_parser("merge", help="bake LoRAs into a model, or merge several into one LoRA (--into-lora)",
                       description="Bake LoRAs into a model (a .safetensors OUT: one LDM file for A1111 / ComfyUI; "
                                   "any other OUT: a diffusers folder), or with --into-lora merge them into one LoRA.")
    _common(m, out_help="a .safetensors file (an A1111 single file; with --into-lora a LoRA) or a diffusers folder")
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="a LoRA file (kohya LoRA / LoCon / DoRA, diffusers / peft) and its strength (default 1); "
                        "repeat for several")
    m.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                   help="precision of the written model (merging is in fp32; default: %(default)s, as released models)")
    m.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help="override what an SD 2.x single-file --model predicts (sample.py --help explains the default)")
    m.add_argument("--into-lora", action="store_true", help="write one LoRA (SVD of the summed updates), not a model")
    _ranks(m, "--into-lora: the rank of each module of the LoRA written", required=False)
    m.add_argument("--clamp-quantile", type=float, default=1.0, metavar="Q",
                   help="--into-lora: clip the factors at this quantile of their entries "
                        "(kohya: 0.99; default 1: none)")
    r = sub.add_parser("resize", help="a LoRA at a lower rank (a fixed rank or kohya's dynamic ranks)",
                       description="Resize a LoRA by SVD of each module's update, as kohya's resize_lora.py.")
    r.add_argument("--lora", required=True, metavar="FILE", help="the LoRA to resize")
    _ranks(r, "the rank of each module (with --dynamic: the largest; a module never grows)")
    r.add_argument("--dynamic", choices=DYNAMIC_METHODS,
                   help="pick each module's rank: sv_fro keeps --ratio of its Frobenius norm, sv_cumulative --ratio of "
                        "the sum of its singular values, sv_ratio those within a factor --ratio of the largest")
    r.add_argument("--ratio", type=float, metavar="X",
                   help="the --dynamic method's target (e.g. sv_fro 0.9, sv_ratio 10)")
    _common(r, model=False)
    e = sub.add_parser("extract", help="a LoRA from a fine-tuned model and its base (SVD of the weight differences)",
                       description="Extract a LoRA (kohya names) from --tuned minus --model, layer by layer.")
    _common(e)
    e.add_argument("--tuned", required=True, help="the fine-tuned model (same kinds of path as --model)")
    _ranks(e, "the rank of each module of the LoRA written (exact when the differences have at most this rank)")
    e.add_argument("--min-diff", type=float, default=0.0, metavar="X",
                   help="skip layers whose weights differ by at most X everywhere (default: 0, only identical ones)")
    e.add_argument("--clamp-quantile", type=float, default=1.0, metavar="Q",
                   help="clip the factors at this quantile of their entries (kohya: 0.99; default 1: none)")
    return p.parse_args(argv)


def _check(args):
    """Every argument checked before a model is loaded."""
    out = Path(args.out)
    lora_out = args.tool != "merge" or args.into_lora
    if lora_out and out.suffix.lower() != ".safetensors":
        raise UserError(f"--out must be a .safetensors file, not {out}")
    check_writable(out, "--out", folder=not lora_out and out.suffix.lower() != ".safetensors")
    if getattr(args, "rank", None) is None and lora_out:
        raise UserError("--rank R is needed: the rank of the LoRA written")
    if not lora_out and (args.rank, args.conv_rank, args.clamp_quantile) != (None, None, 1.0):
        raise UserError("--rank, --conv-rank and --clamp-quantile go with --into-lora (merge writes a model without)")
    for name in ("rank", "conv_rank"):
        if (getattr(args, name, None) or 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < getattr(args, "clamp_quantile", 1.0) <= 1:
        raise UserError("--clamp-quantile must be in (0, 1]")
    if args.tool == "resize" and (args.dynamic is None) != (args.ratio is None):
        raise UserError("--dynamic and --ratio go together")
    if args.tool == "resize" and args.ratio is not None and not args.ratio > 0:
        raise UserError("--ratio must be above 0")


def _load(args, path, what="--model"):
    hardware = resolve_hardware(args.device or "", "fp32")  # merged and compared in fp32, cast once when written
    path = path or dreambooth_min.find_default_model()
    sd = dreambooth_min.load(path, dtype=torch.float32, device=hardware.device,
                             prediction_type=getattr(args, "prediction_type", None))
    if sd.random_note:
        print(f"warning: {what} {path} is {sd.random_note}", file=sys.stderr)
    return sd


def report(rows, what):
    """One line per module (rank, Frobenius norm kept), then the spread of the kept fractions."""
    for name, old, new, kept in rows:
        print(f"{name:90} rank {old:>4} -> {new:<4} kept {kept:7.2%}")
    kept = [r[3] for r in rows]
    spread = f" (sd {statistics.pstdev(kept):.2%}, min {min(kept):.2%})" if kept else ""
    print(f"{what}: {len(rows)} modules, Frobenius norm kept {statistics.fmean(kept) if kept else 1:.2%} on average"
          + spread)


def merge(args):
    loras = [parse_lora_arg(text) for text in args.lora]
    sd = _load(args, args.model)
    updates = merge_loras(sd, loras, keep_updates=args.into_lora, progress=not args.no_progress)
    out = Path(args.out)
    if args.into_lora:
        tensors, rows = lora_from_updates(kohya_keys(sd, updates), args.rank, args.conv_rank, args.clamp_quantile,
                                          progress=not args.no_progress, device=sd.unet.conv_in.weight.device)
        meta = family_metadata(sd.version, sd.prediction_type) | {
            "ss_training_comment": "merged by lora_tools.py: " + ", ".join(f"{p.name}:{s:g}" for p, s in loras)}
        save_lora(out, tensors, meta)
        report(rows, "merged LoRA")
    elif out.suffix.lower() == ".safetensors":
        base = Path(args.model) if args.model and Path(args.model).is_file() else None
        save_single_file(out, sd, DTYPES[args.dtype], base_file=base)
        if sd.version == "sd2" and single_file_prediction_type(out, "sd2") != sd.prediction_type:
            print(f"warning: {out.name} is an {sd.prediction_type} model, but loaders that go by the name (ours, "
                  "docs/hub.md) will read it as the other kind: put '512' or 'base' in an epsilon model's name, "
                  "none in a v model's", file=sys.stderr)
    else:
        cast = lambda m: None if m is None else m.to(DTYPES[args.dtype])
        save_diffusers_folder(out, cast(sd.unet), cast(sd.vae), cast(sd.text_encoder), sd.version, sd.prediction_type,
                              note=sd.random_note or None, text_encoder_2=cast(sd.text_encoder_2))
    print(f"wrote {out}")


def resize(args):
    tensors, metadata = load_lora(args.lora)
    new, rows = resize_lora(tensors, metadata, args.rank, args.conv_rank, args.dynamic, args.ratio,
                            progress=not args.no_progress)
    meta = {k: v for k, v in metadata.items()
            if k not in ("ss_network_dim", "ss_network_alpha", "ss_network_args", "lora_adapter_metadata")}
    how = f"dynamic {args.dynamic} {args.ratio:g}, at most {args.rank}" if args.dynamic else f"rank {args.rank}"
    meta["ss_training_comment"] = f"resized by lora_tools.py ({how}); " + metadata.get("ss_training_comment", "")
    if args.dynamic:  # kohya's words for ranks that vary by module
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    save_lora(args.out, new, meta)
    report(rows, "resized")
    print(f"wrote {args.out}")


def extract(args):
    base, tuned = _load(args, args.model), _load(args, args.tuned, "--tuned")
    updates, others = model_differences(base, tuned, args.min_diff, progress=not args.no_progress)
    if not updates:
        raise UserError(f"--tuned has no layer that differs from --model by more than {args.min_diff:g}")
    if others:
        print(f"warning: {len(others)} tensors that a LoRA cannot hold differ too (biases, norms, embeddings, the "
              f"VAE), e.g. {others[0]}: the LoRA leaves them out", file=sys.stderr)
    tensors, rows = lora_from_updates(kohya_keys(base, updates), args.rank, args.conv_rank, args.clamp_quantile,
                                      progress=not args.no_progress, device=base.unet.conv_in.weight.device)
    meta = family_metadata(base.version, base.prediction_type) | {
        "ss_training_comment": f"extracted by lora_tools.py from {tuned.name} minus {base.name}"}
    save_lora(args.out, tensors, meta)
    report(rows, "extracted")
    print(f"wrote {args.out}")


def main(argv=None):
    """Exit status (run/cli.py EXIT_CODES): 0; 2 bad input, 3 out of memory, 4 disk full, each after one `error:`
    line (no traceback); 130 Ctrl-C (files are written atomically: an interrupted write leaves nothing)."""
    def command():
        args = parse_args(argv)
        _check(args)
        {"merge": merge, "resize": resize, "extract": extract}[args.tool](args)
        return 0
    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
