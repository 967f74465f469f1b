"""A tiny seeded SDXL with the real key layouts, built with diffusers as the reference (as tiny.py for SD 1.x / 2.x).

The SDXL topology at toy size: three levels, no attention at the first, transformer depth 1/2/3 (the
release has 1/2/10, the mid block taking the last level's), 64-wide heads (a 128-channel level has two),
linear projections, the text_time add_embedding, two text encoders (CLIP-L-like with quick GELU, and a
bigG-like CLIPTextModelWithProjection with exact GELU) and the SD VAE with SDXL's scale 0.13025.
`save_single_file` writes the sgm layout of `sd_xl_base_1.0.safetensors`.
"""
from pathlib import Path

import torch

from dreambooth_min.formats.safetensors_io import save_atomic
from tiny import TOKENIZER_DIR, VAE, _randomize, ldm_unet_vae_tensors

TEXT_1 = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, hidden_act="quick_gelu",
              vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TEXT_2 = dict(TEXT_1, hidden_size=128, num_attention_heads=2, intermediate_size=96, hidden_act="gelu", pad_token_id=0,
              projection_dim=128)
TIME_DIM = 8  # addition_time_embed_dim (256 in the release)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 1, 2),
            transformer_layers_per_block=(1, 2, 3), use_linear_projection=True, norm_num_groups=32,
            cross_attention_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"], addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=TEXT_2["projection_dim"] + 6 * TIME_DIM)


def make_pipeline(seed=0):
    """A tiny diffusers StableDiffusionXLPipeline (DDIM) with seeded random weights, fp32, on the CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE, scaling_factor=0.13025)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_1))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))
    for m in (unet, vae, text, text_2):
        _randomize(m, g)
        m.eval()
    tokenizers = [CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), pad_token=pad,
                                model_max_length=77) for pad in ("<|endoftext|>", "!")]
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)


def save_folder(pipe, path):
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def to_open_clip(text_sd):
    """transformers CLIPTextModelWithProjection tensors -> the OpenCLIP text tower (every layer: SDXL runs them all)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous(), "logit_scale": torch.tensor(4.6052)}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat([sd[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[oc + f"{a}.{kind}"] = sd[hf + f"{b}.{kind}"].clone()
    return out


def save_single_file(pipe, path, dtype=torch.float32):
    """The pipeline's weights in the sgm single-file layout (as `sd_xl_base_1.0.safetensors`)."""
    tensors = ldm_unet_vae_tensors(pipe)
    clip_l = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    tensors.update({"conditioner.embedders.0.transformer.text_model." + k: v for k, v in clip_l.items()})
    tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors.update({"conditioner.embedders.1.model." + k: v for k, v in to_open_clip(pipe.text_encoder_2.state_dict()).items()})
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(tensors, path)
    return Path(path)
