"""SDXL at the released shapes: our UNet, text encoding and VAE against diffusers' on the same random weights.

    python -m benchmarks.sdxl_parity --device cuda     # full size (2.6B UNet, 0.8B text, 84M VAE), fp32: 10 GB of UNet
    python -m benchmarks.sdxl_parity --device cpu      # the same on the CPU (one module at a time; minutes)
    python -m benchmarks.sdxl_parity --small           # tiny shapes: checks the script itself in seconds

Nothing is downloaded: diffusers builds each module from the released configs with its own random init, and
ours receives the very same tensors. The UNet is filled with load_state_dict(strict=True, assign=True), so
both share one copy of the weights; the OpenCLIP bigG text tower goes through the single-file path (OpenCLIP
names -> checkpoint_sdxl.convert_open_clip_with_projection), and the prompt encoding is compared with
StableDiffusionXLPipeline.encode_prompt. One fp32 forward each (TF32 off); prints max |diff| per module and
exits 1 if one exceeds --tol.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

SDXL_UNET = dict(  # diffusers' unet/config.json of stabilityai/stable-diffusion-xl-base-1.0
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    layers_per_block=2, in_channels=4, out_channels=4, sample_size=128)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, scaling_factor=0.13025)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
            projection_dim=1280)
# --small: the same topology at toy width
SMALL_UNET = dict(SDXL_UNET, block_out_channels=(32, 64, 128), attention_head_dim=(1, 1, 2),
                  transformer_layers_per_block=(1, 2, 3), cross_attention_dim=160, addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=128 + 48, sample_size=8)
SMALL_VAE = dict(SDXL_VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1)
SMALL_CLIP_L = dict(CLIP_L, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                    projection_dim=32)
SMALL_BIGG = dict(BIGG, hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                  projection_dim=128)
PROMPTS = ["a photo of sks dog in a bucket", ""]


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def report(name, ours, ref, results):
    d = maxdiff(ours, ref)
    results[name] = d
    print(f"{name:<24} max |diff| {d:.2e}   (reference max |value| {ref.abs().max().item():.3g})", flush=True)


@torch.no_grad()
def unet_parity(args, results):
    import diffusers

    from dreambooth_min.conditioning import Cond, size_time_ids
    from dreambooth_min.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**(SMALL_UNET if args.small else SDXL_UNET)).to(args.device).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the same tensors, no second copy
    ours.eval()
    side = args.resolution // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, side, side, generator=g).to(args.device)
    ctx = torch.randn(1, 77, ref.config.cross_attention_dim, generator=g).to(args.device)
    pooled_dim = ref.config.projection_class_embeddings_input_dim - 6 * ref.config.addition_time_embed_dim
    pooled = torch.randn(1, pooled_dim, generator=g).to(args.device)
    ids = size_time_ids((args.resolution,) * 2, (0, 0), (args.resolution,) * 2)[None].to(args.device)
    want = ref(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=dict(text_embeds=pooled, time_ids=ids)).sample
    got = ours(x, 500, Cond(ctx, pooled, ids))
    print(f"UNet: {sum(p.numel() for p in ours.parameters()) / 1e9:.3f}B parameters, latent {side}x{side}")
    report("UNet", got, want, results)


@torch.no_grad()
def text_parity(args, results):
    """Both encoders built by transformers; ours loads bigG from the OpenCLIP layout of the single file."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_min.formats.text_weights import load_text
    from dreambooth_min.formats.text_weights import convert_open_clip_with_projection, text_encoder_2_config
    from dreambooth_min.text import encode_prompt_sdxl, load_tokenizer
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_sdxl import to_open_clip  # the tests' writer of the single-file (OpenCLIP) layout

    torch.manual_seed(2)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    te1 = CLIPTextModel(CLIPTextConfig(**common, **(SMALL_CLIP_L if args.small else CLIP_L))).to(args.device).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **(SMALL_BIGG if args.small else BIGG)))
    te2 = te2.to(args.device).eval()
    tokenizers = load_tokenizer("sd1"), load_tokenizer("sd2")
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=None, scheduler=DDIMScheduler())
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=args.device, do_classifier_free_guidance=False)
    bigg = convert_open_clip_with_projection(to_open_clip(te2.state_dict()))
    ours_te2 = load_text(bigg, "sd2", torch.float32, args.device, text_encoder_2_config(bigg),
                          cls=CLIPTextModelWithProjection)
    got_context, got_pooled = encode_prompt_sdxl(tokenizers, (te1, ours_te2), PROMPTS)
    report("text context", got_context, context, results)
    report("text pooled", got_pooled, pooled, results)


@torch.no_grad()
def vae_parity(args, results):
    import diffusers

    from dreambooth_min.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(3)
    ref = diffusers.AutoencoderKL(**(SMALL_VAE if args.small else SDXL_VAE)).to(args.device).eval()
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    z = torch.randn(1, 4, args.resolution // 8, args.resolution // 8, generator=torch.Generator().manual_seed(4))
    z = z.to(args.device)
    report("VAE decode", ours.decode(z), ref.decode(z).sample, results)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cuda or cpu (default: cpu)")
    p.add_argument("--small", action="store_true", help="tiny shapes (a check of this script, not of SDXL)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: 1024, --small: 64)")
    p.add_argument("--tol", type=float, default=1e-4, help="largest acceptable max |diff| (default: 1e-4)")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (64 if args.small else 1024)
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 matmuls would differ by ~1e-3 on their own
    torch.backends.cudnn.allow_tf32 = False
    results, start = {}, time.time()
    for check in (unet_parity, text_parity, vae_parity):
        check(args, results)
        if args.device.startswith("cuda"):
            print(f"  peak CUDA memory so far {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            torch.cuda.empty_cache()
    bad = {k: v for k, v in results.items() if not v <= args.tol}
    print(f"{'FAIL' if bad else 'OK'}: {len(results) - len(bad)}/{len(results)} within {args.tol:g} "
          f"({time.time() - start:.0f} s on {args.device})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
