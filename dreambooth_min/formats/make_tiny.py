"""Write a tiny random Stable Diffusion model, for trying the commands without gigabytes of weights.

    python -m dreambooth_min.formats.make_tiny weights/tiny-sd1 [--version sd1|sd2] [--seed 0]

The model has SD's layout (a diffusers folder that `load()`, train.py and sample.py read) at toy size,
with seeded random weights: it runs in seconds on a CPU, and its pictures are noise.
"""
import argparse
import sys

import torch

from ..errors import UserError
from ..unet import UNet2DConditionModel, UNetConfig
from ..vae import AutoencoderKL, VAEConfig
from .export import save_diffusers_folder

# SD topology at toy size: attention at every level but the last, 2 res blocks per level, a VAE with four
# levels (8x downscale like the real one). SD 1.x: 8 heads, conv projections, 32-wide text; SD 2.x: one
# head per level, linear projections, 64-wide text (the same sizes as the tests' reference models).
UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_levels=(True, True, False))
UNETS = {"sd1": dict(UNET, num_attention_heads=(8, 8, 8), num_head_channels=(4, 8, 8), cross_attention_dim=32),
         "sd2": dict(UNET, num_attention_heads=(1, 1, 1), num_head_channels=(32, 64, 64), cross_attention_dim=64,
                     use_linear_projection=True, upcast_attention=True)}
VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
TEXT = {"sd1": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                    eos_token_id=49407, pad_token_id=49407)}
TEXT["sd2"] = dict(TEXT["sd1"], hidden_size=64, num_attention_heads=1, intermediate_size=96, hidden_act="gelu",
                   pad_token_id=0)
PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction"}
NOTE = "a tiny random model (python -m dreambooth_min.formats.make_tiny): its pictures are noise"


@torch.no_grad()
def randomize(module, generator, std=0.05):
    """Every weight random, so no zero-initialised layer hides anything; norm scales stay near 1."""
    for name, p in module.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1 + std * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(std * torch.randn(p.shape, generator=generator) * (3 if p.dim() == 1 else 1))


def build_tiny(version="sd1", seed=0):
    """(unet, vae, text_encoder) with seeded random weights, fp32, on the CPU, in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if version not in UNETS:
        raise UserError(f"version must be one of {', '.join(UNETS)}, not {version!r}")
    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(UNetConfig(**UNETS[version]))
    vae = AutoencoderKL(VAEConfig(**VAE))
    torch.manual_seed(seed)  # CLIPTextModel's own init draws from the global generator
    text = CLIPTextModel(CLIPTextConfig(**TEXT[version]))
    for m in (unet, vae, text):
        randomize(m, g)
        m.eval()
    return unet, vae, text


def make_tiny(path, version="sd1", seed=0):
    """Write the tiny model as a diffusers folder at `path`; returns the path."""
    unet, vae, text = build_tiny(version, seed)
    return save_diffusers_folder(path, unet, vae, text, version, PREDICTION[version], sample_size=8, note=NOTE)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dreambooth_min.formats.make_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="folder to write, e.g. weights/tiny-sd1")
    p.add_argument("--version", choices=sorted(UNETS), default="sd1", help="SD 1.x or 2.x layout (default sd1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = p.parse_args(argv)
    try:
        path = make_tiny(args.path, args.version, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a tiny random {args.version} model to {path}/ ({PREDICTION[args.version]}). Its pictures are "
          "noise: it is for trying the commands quickly (use --resolution 64 / --height 64 --width 64), not for "
          "real images.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
