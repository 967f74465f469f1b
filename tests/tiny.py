"""Tiny seeded Stable Diffusion models with the real key layouts, built with diffusers as the reference.

`make_pipeline("sd1" | "sd2")` gives a diffusers StableDiffusionPipeline whose every weight is random
(no zero-initialised layer hides a bug); `save_folder` writes it as a diffusers folder and
`save_single_file` as an LDM/A1111 single file (SD 2.x text in the OpenCLIP layout, DDPM buffers and
`model_ema.*` extras included), so both loaders can be compared on the same weights.
"""
from pathlib import Path

import torch

from dreambooth_min.formats.checkpoint_names import unet_rename_table, unrename, vae_rename_table
from dreambooth_min.formats.safetensors_io import save_atomic
from dreambooth_min.unet import UNetConfig
from dreambooth_min.vae import VAEConfig

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "dreambooth_min" / "tokenizer"

# SD topology at toy size: attention at every level but the last, 2 res blocks per level, a VAE with
# four levels (8x downscale like the real one). Heads follow the rule our single-file loader assumes:
# SD 1.x 8 heads; SD 2.x heads of 64 channels (a 32-channel level gets one head of 32).
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
SD1_UNET = dict(UNET, cross_attention_dim=32, attention_head_dim=8)
SD2_UNET = dict(UNET, cross_attention_dim=64, attention_head_dim=(1, 1, 1), use_linear_projection=True,
                upcast_attention=True)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
           norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD1_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, hidden_act="quick_gelu",
                vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD2_TEXT = dict(SD1_TEXT, hidden_size=64, num_attention_heads=1, intermediate_size=96, hidden_act="gelu", pad_token_id=0)


@torch.no_grad()
def _randomize(module, generator, std=0.05):
    """Every weight random: diffusers zero-inits nothing important, but some outputs would be near zero."""
    for name, p in module.named_parameters():
        if "norm" in name and name.endswith("weight"):  # GroupNorm / LayerNorm scales stay near 1
            p.copy_(1 + std * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(std * torch.randn(p.shape, generator=generator) * (3 if p.dim() == 1 else 1))


def make_pipeline(version="sd1", seed=0, prediction_type=None):
    """A tiny diffusers StableDiffusionPipeline with seeded random weights, fp32, on the CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**(SD1_UNET if version == "sd1" else SD2_UNET))
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**(SD1_TEXT if version == "sd1" else SD2_TEXT)))
    for m in (unet, vae, text):
        _randomize(m, g)
        m.eval()
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                              pad_token="<|endoftext|>" if version == "sd1" else "!", model_max_length=77)
    prediction_type = prediction_type or ("epsilon" if version == "sd1" else "v_prediction")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_folder(pipe, path):
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _to_open_clip(text_sd, hidden, generator):
    """HF CLIPTextModel tensors -> OpenCLIP text tower keys, plus one unused last resblock (SD 2.x
    conditions on the penultimate layer, so the files carry one layer more than is run)."""
    out = {"token_embedding.weight": text_sd["embeddings.token_embedding.weight"],
           "positional_embedding": text_sd["embeddings.position_embedding.weight"],
           "ln_final.weight": text_sd["final_layer_norm.weight"], "ln_final.bias": text_sd["final_layer_norm.bias"],
           "text_projection": torch.randn(hidden, hidden, generator=generator), "logit_scale": torch.tensor(4.6052)}
    layers = 1 + max(int(k.split(".")[2]) for k in text_sd if k.startswith("encoder.layers."))
    for i in range(layers + 1):
        hf, oc = f"encoder.layers.{min(i, layers - 1)}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat([text_sd[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            if i == layers:  # the unused last block: made different, so that running it would show
                out[oc + f"attn.in_proj_{kind}"] = out[oc + f"attn.in_proj_{kind}"].flip(0)
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[oc + f"{a}.{kind}"] = text_sd[hf + f"{b}.{kind}"].clone()
    return out


def ldm_unet_vae_tensors(pipe):
    """The pipeline's UNet and VAE tensors under their LDM single-file names (SD 1.x, 2.x and SDXL alike)."""
    unet_cfg, vae_cfg = UNetConfig.from_diffusers(dict(pipe.unet.config)), VAEConfig.from_diffusers(dict(pipe.vae.config))
    tensors = {}
    for prefix, module, table in (("model.diffusion_model.", pipe.unet, unet_rename_table(unet_cfg)),
                                  ("first_stage_model.", pipe.vae, vae_rename_table(vae_cfg))):
        for k, v in module.state_dict().items():
            ldm = unrename(k, table)
            assert ldm is not None, k
            if ".mid.attn_1." in ldm and ldm.endswith("weight") and v.dim() == 2:
                v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
            tensors[prefix + ldm] = v
    return tensors


def save_single_file(pipe, path, dtype=torch.float32, version=None):
    """The pipeline's weights in the LDM single-file layout (as A1111 loads them)."""
    version = version or ("sd2" if pipe.unet.config.use_linear_projection else "sd1")
    g = torch.Generator().manual_seed(1234)
    tensors = ldm_unet_vae_tensors(pipe)
    text_sd = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    if version == "sd1":
        tensors.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text_sd.items()})
        tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        hidden = text_sd["final_layer_norm.weight"].shape[0]
        tensors.update({"cond_stage_model.model." + k: v for k, v in _to_open_clip(text_sd, hidden, g).items()})
    # Extras every real file carries and a loader must skip.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    tensors["betas"], tensors["alphas_cumprod"] = betas, torch.cumprod(1 - betas, 0)
    tensors["model_ema.decay"], tensors["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0, dtype=torch.int32)
    tensors = {k: (v.to(dtype) if v.is_floating_point() and k not in ("betas", "alphas_cumprod") else v)
               for k, v in tensors.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(tensors, path)
    return Path(path)
