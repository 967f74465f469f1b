"""A loaded model written as one LDM `.safetensors` file (what AUTOMATIC1111 and ComfyUI load): the reverse of
checkpoint.py's single-file path, through the same rename tables (checkpoint_names.unrename).

    SD 1.x   model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.text_model.* (CLIP-L)
    SD 2.x   ... cond_stage_model.model.* (OpenCLIP ViT-H: q, k, v stacked in attn.in_proj_*)
    SDXL     ... conditioner.embedders.0.transformer.text_model.* (CLIP-L), conditioner.embedders.1.model.* (bigG)

SD 2.x conditions on the penultimate OpenCLIP layer, so loading drops the last one; A1111 still builds and loads
it. As kohya's model_util does, the file gets the tensors that loading dropped from the base single file when it
is one, else dummies: a copy of the last layer kept, an identity text_projection and logit_scale 1 (never run).
The VAE's mid-block attention is 1x1 convolutions in LDM ([C, C, 1, 1]) and Linear layers in ours.
"""
import torch

from .checkpoint_names import (HF_CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, unet_rename_table,
                               unrename, vae_rename_table)
from .checkpoint_sdxl import BIGG_PREFIX, CLIP_L_PREFIX
from .lora_names import text_path
from .safetensors_io import SafetensorsFile, save_atomic

OPEN_CLIP_RENAMES = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _renamed(module, prefix, table):
    """{prefix + LDM name: tensor} of a UNet or VAE state dict."""
    out = {}
    for k, v in module.state_dict().items():
        ldm = unrename(k, table)
        if ldm is None:
            raise ValueError(f"no LDM name for {k}")  # the rename table and the module disagree: a bug
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]
        out[prefix + ldm] = v
    return out


def to_open_clip(text_encoder):
    """A transformers CLIP text model's tensors in OpenCLIP's names (text_weights.convert_open_clip reversed)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    if "text_projection.weight" in sd:  # stored as P with x @ P; nn.Linear holds P^T
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[theirs + f"attn.in_proj_{kind}"] = torch.cat([sd[ours + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in OPEN_CLIP_RENAMES:
                out[theirs + f"{b}.{kind}"] = sd[ours + f"{a}.{kind}"]
    return out


def _sd2_unused(tensors, base_file):
    """OpenCLIP-H tensors SD 2.x never runs (the last resblock, the contrastive head): the base file's, else dummies."""
    if base_file is not None:
        f = SafetensorsFile(base_file)
        return {k[len(OPEN_CLIP_PREFIX):]: f.read(k) for k in f.entries
                if k.startswith(OPEN_CLIP_PREFIX) and k[len(OPEN_CLIP_PREFIX):] not in tensors}
    last = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("transformer.resblocks."))
    width = tensors["ln_final.weight"].shape[0]
    extra = {k.replace(f".{last - 1}.", f".{last}.", 1): v.clone() for k, v in tensors.items()
             if k.startswith(f"transformer.resblocks.{last - 1}.")}
    return extra | {"text_projection": torch.eye(width), "logit_scale": torch.tensor(1.0)}


def single_file_tensors(sd, base_file=None):
    """{LDM key: tensor} of a loaded model (`base_file`: the single file it came from, if any, for SD 2.x)."""
    out = _renamed(sd.unet, UNET_PREFIX, unet_rename_table(sd.unet.config))
    out |= _renamed(sd.vae, VAE_PREFIX, vae_rename_table(sd.vae.config))
    clip = {text_path(k): v for k, v in sd.text_encoder.state_dict().items()}
    # transformers 5 no longer saves CLIP's constant position ids; the released files (and A1111) have them
    clip["text_model.embeddings.position_ids"] = torch.arange(clip["text_model.embeddings.position_embedding.weight"]
                                                              .shape[0])[None]
    if sd.version == "sdxl":
        out |= {CLIP_L_PREFIX + k: v for k, v in clip.items()}
        out |= {BIGG_PREFIX + k: v for k, v in to_open_clip(sd.text_encoder_2).items()}
        out[BIGG_PREFIX + "logit_scale"] = torch.tensor(1.0)
    elif sd.version == "sd2":
        text = to_open_clip(sd.text_encoder)
        out |= {OPEN_CLIP_PREFIX + k: v for k, v in (text | _sd2_unused(text, base_file)).items()}
    else:
        out |= {HF_CLIP_PREFIX + k: v for k, v in clip.items()}
    return out


def save_single_file(path, sd, dtype=torch.float16, base_file=None):
    """Write `sd` as one LDM .safetensors file at `path` (atomically), floating tensors cast to `dtype`."""
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
               for k, v in single_file_tensors(sd, base_file).items()}
    save_atomic(tensors, path)
    return path
