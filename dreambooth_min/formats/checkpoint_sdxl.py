"""Which family a checkpoint is (SDXL base or not; families we cannot run refused), and what loading SDXL adds
to checkpoint.py: its second text encoder, its VAE's scale and dtype (kept apart so the SD 1.x / 2.x path stays
short; SD 1.x vs 2.x is told later, by the UNet's proj_in, in checkpoint.py).

The released single file `sd_xl_base_1.0.safetensors` (Stability-AI generative-models, "sgm") holds
    model.diffusion_model.*                           the UNet in LDM names, as SD 1.x / 2.x, plus `label_emb.0.{0,2}`:
                                                      the MLP that embeds [pooled text; 6 size sinusoids] (diffusers'
                                                      `add_embedding.linear_{1,2}`)
    first_stage_model.*                               the VAE, as SD (its latents scale by 0.13025, not 0.18215)
    conditioner.embedders.0.transformer.text_model.*  OpenAI CLIP ViT-L/14 in transformers' names (12 layers, the
                                                      penultimate is used: layer 12 and final_layer_norm are stored
                                                      but never run)
    conditioner.embedders.1.model.*                   OpenCLIP ViT-bigG/14 text tower in OpenCLIP names: 32 resblocks,
                                                      ln_final, text_projection [1280, 1280] (applied as x @ P)
A diffusers folder has unet/, vae/, text_encoder/ (CLIPTextModel), text_encoder_2/ (CLIPTextModelWithProjection),
tokenizer/ and tokenizer_2/. Unlike SD 2.x, no OpenCLIP layer can be dropped: the context is the penultimate
layer, but the pooled vector runs all 32 and the final LayerNorm.

Other files that look alike are refused with one line: the SDXL refiner (only the OpenCLIP embedder, as
`conditioner.embedders.0.model.*`, and 5 size/aesthetic numbers instead of 6), and the transformer families
(SD3 `joint_blocks`, Flux `double_blocks`).
"""
import torch

from ..errors import UserError
from .text_weights import convert_open_clip_with_projection, load_text, text_encoder_2_config

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.*: transformers' CLIPTextModel names
BIGG_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG text tower
REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only embedder is OpenCLIP bigG
VAE_SCALING_FACTOR = 0.13025  # sgm `scale_factor` for SDXL's VAE (retrained decoder, same architecture)
OTHER_FAMILIES = {"joint_blocks.": "Stable Diffusion 3", "double_blocks.": "Flux",
                  "transformer_blocks.0.ff_context": "a diffusion-transformer model"}


def single_file_family(name, keys):
    """"sdxl" for an SDXL base file, None for SD 1.x / 2.x; UserError (one line) for a family we cannot run."""
    keys = list(keys)
    if any(k.startswith(REFINER_PREFIX) for k in keys):
        raise UserError(f"{name} is an SDXL refiner (it conditions on an aesthetic score and has no CLIP-L text "
                        "encoder); only the SDXL base model is supported")
    for marker, family in OTHER_FAMILIES.items():
        if any(k.startswith(marker) or k.startswith("model.diffusion_model." + marker) for k in keys):
            raise UserError(f"{name} is a {family} checkpoint; only Stable Diffusion 1.x, 2.x and XL are supported")
    return "sdxl" if any(k.startswith(BIGG_PREFIX) for k in keys) else None


def folder_family(name, model_index):
    """The same decision for a diffusers folder, from its model_index.json."""
    cls = model_index.get("_class_name", "")
    if "transformer" in model_index or "text_encoder_3" in model_index:
        raise UserError(f"{name} is a {cls or 'diffusion-transformer'} model (no UNet); only Stable Diffusion "
                        "1.x, 2.x and XL are supported")
    has = lambda part: isinstance(model_index.get(part), list) and model_index[part][0] is not None
    if has("text_encoder_2"):
        if not has("text_encoder") or model_index.get("requires_aesthetics_score"):
            raise UserError(f"{name} is an SDXL refiner (it conditions on an aesthetic score and has no CLIP-L "
                            "text encoder); only the SDXL base model is supported")
        return "sdxl"
    return None


def load_text_single_file(f, dtype, device):
    """(text_encoder, text_encoder_2) from an SDXL single file's two embedders."""
    from transformers import CLIPTextModelWithProjection

    clip_l = {k[len(CLIP_L_PREFIX):]: f.read(k) for k in f.shapes if k.startswith(CLIP_L_PREFIX)}
    if not clip_l:
        raise UserError(f"{f.path} has no CLIP-L text encoder ({CLIP_L_PREFIX}*)")
    bigg = convert_open_clip_with_projection({k[len(BIGG_PREFIX):]: f.read(k) for k in f.shapes  # the causal
                                              if k.startswith(BIGG_PREFIX) and k != BIGG_PREFIX + "attn_mask"})  # mask: -inf
    return (load_text(clip_l, "sd1", dtype, device),
            load_text(bigg, "sd2", dtype, device, text_encoder_2_config(bigg), cls=CLIPTextModelWithProjection))


def vae_dtype(dtype):
    """SDXL's VAE overflows in fp16 (NaN / black images): it runs in fp32 when the rest is fp16."""
    return torch.float32 if dtype == torch.float16 else dtype
