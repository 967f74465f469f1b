"""Text encoders from checkpoint tensors: transformers' CLIPTextModel configs, OpenCLIP -> CLIP names, and the
model built on the meta device and filled (load_text), for both layouts and both of SDXL's encoders.

SD 1.x and SDXL's first encoder are OpenAI CLIP ViT-L, stored in transformers' names already. SD 2.x's
OpenCLIP ViT-H and SDXL's OpenCLIP bigG are stored in OpenCLIP's names (`transformer.resblocks.N`,
q/k/v stacked in `in_proj`), converted here to transformers' (`encoder.layers.N.self_attn.q_proj`).
"""
import re

import torch

from ..errors import UserError
from .fill import fill


HIDDEN_ACT = {"sd1": "quick_gelu", "sd2": "gelu"}  # OpenAI CLIP: x*sigmoid(1.702x); OpenCLIP ViT-H: exact GELU


def text_config_from_state_dict(tensors, version, heads=None):
    """CLIPTextConfig from tensor shapes (keys with or without `text_model.`).

    The head count is not stored in any tensor. Rule: heads of 64 channels when the width allows it
    (CLIP-L 768 -> 12, OpenCLIP-H 1024 -> 16), otherwise 8 channels per head (tiny test models: 32 -> 4).
    Pass `heads` to override.
    """
    from transformers import CLIPTextConfig

    tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    try:
        vocab, hidden = tensors["embeddings.token_embedding.weight"].shape
        positions = tensors["embeddings.position_embedding.weight"].shape[0]
        intermediate = tensors["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"unknown text encoder architecture: tensor {e.args[0]} not found") from None
    layers = len({k.split(".")[2] for k in tensors if k.startswith("encoder.layers.")})
    if heads is None:
        heads = hidden // 64 if hidden % 64 == 0 else hidden // 8
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=positions, hidden_act=HIDDEN_ACT[version],
                          layer_norm_eps=1e-5,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1)  # CLIP's special tokens are the last two


def text_config_from_json(config):
    """CLIPTextConfig from a diffusers folder's text_encoder/config.json dict (bookkeeping keys dropped)."""
    from transformers import CLIPTextConfig

    skip = ("architectures", "transformers_version", "model_type", "torch_dtype", "dtype")
    return CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_") and k not in skip})


def match_text_prefix(tensors, model):
    """`tensors` with their keys renamed to `model`'s convention: transformers 4 and SD files say
    `text_model.encoder...`, transformers 5's CLIPTextModel says `encoder...`. Drops `position_ids`,
    a constant arange that transformers 5 no longer saves (non-persistent buffer)."""
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    ours = lambda k: k if k.startswith("text_projection.") else prefix + k.removeprefix("text_model.")
    return {ours(k): v for k, v in tensors.items() if not k.endswith("position_ids")}


def convert_open_clip(tensors, drop_last=True):
    """OpenCLIP text-tower tensors (keys without `cond_stage_model.model.`) -> CLIPTextModel tensors.

    SD 2.x uses the output of resblock L-2 followed by ln_final, so the last resblock is dropped and the
    result is an (L-1)-layer CLIPTextModel whose final_layer_norm is ln_final (`drop_last=False` keeps it:
    SDXL's pooled output runs every layer). nn.MultiheadAttention stores q, k, v stacked in `in_proj_*`
    [3D, D]; CLIP keeps them as separate Linear layers. text_projection and logit_scale (contrastive head)
    are dropped here (SDXL's projection: convert_open_clip_with_projection).
    """
    blocks = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    if not blocks or "token_embedding.weight" not in tensors:
        raise UserError("unknown text encoder architecture: no OpenCLIP token_embedding / resblocks")
    last = blocks[-1] if drop_last else None
    p = "text_model."
    out = {p + "embeddings.token_embedding.weight": tensors["token_embedding.weight"],
           p + "embeddings.position_embedding.weight": tensors["positional_embedding"]}
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in tensors.items():
        # `attn.in_proj_weight` -> `attn.in_proj.weight`, so every block tensor reads as <module>.<weight|bias>
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key.replace("in_proj_", "in_proj."))
        if key in ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale", "attn_mask"):
            continue
        elif key.startswith("ln_final."):
            out[p + "final_layer_norm." + key.split(".")[-1]] = value
        elif m is None:
            raise UserError(f"unknown text encoder architecture: unexpected OpenCLIP tensor {key}")
        elif int(m.group(1)) == last:
            continue  # the last layer: SD 2.x never uses its output
        elif m.group(2) == "attn.in_proj":
            q, k, v = value.chunk(3, dim=0)
            for name, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[f"{p}encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(3)}"] = t
        elif m.group(2) in renames:
            out[f"{p}encoder.layers.{m.group(1)}.{renames[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise UserError(f"unknown text encoder architecture: unexpected OpenCLIP tensor {key}")
    return out


def load_text(text_tensors, version, dtype, device, config=None, cls=None):
    """transformers' CLIPTextModel (or `cls`) from (HF-named) tensors; `config` from a folder, else inferred."""
    from transformers import CLIPTextModel

    if config is None:
        config = text_config_from_state_dict(text_tensors, version)
    with torch.device("meta"):
        model = (cls or CLIPTextModel)(config)
    model = model.to(dtype).to_empty(device=device)
    tensors = match_text_prefix(text_tensors, model)  # `text_model.` or not, position_ids dropped
    fill(model, ((k, lambda out, v=v: v) for k, v in tensors.items()), "text encoder")
    for m in model.modules():  # to_empty left the non-persistent position ids uninitialised
        if isinstance(getattr(m, "position_ids", None), torch.Tensor):
            m.position_ids.copy_(torch.arange(m.position_ids.shape[-1], device=device))
    return model.eval().requires_grad_(False)


def convert_open_clip_with_projection(tensors):
    """OpenCLIP text-tower tensors -> transformers CLIPTextModelWithProjection tensors, every layer kept.

    text_projection is stored as P [width, proj] and applied as x @ P; nn.Linear computes x W^T, so W = P^T.
    """
    if "text_projection" not in tensors:
        raise UserError("unknown text encoder architecture: the OpenCLIP text tower has no text_projection")
    out = convert_open_clip(tensors, drop_last=False)
    out["text_projection.weight"] = tensors["text_projection"].T
    return out


def text_encoder_2_config(tensors, config=None):
    """CLIPTextConfig for bigG from its (transformers-named) tensors: exact GELU, projection width from the tensor."""
    config = config or text_config_from_state_dict(tensors, "sd2")
    config.projection_dim = tensors["text_projection.weight"].shape[0]
    return config
