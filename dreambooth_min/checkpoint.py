"""Load Stable Diffusion 1.x / 2.x / XL checkpoints into our modules (what SDXL adds: checkpoint_sdxl.py).

Two layouts are read:
- a single `.safetensors` file in the original LDM layout (what A1111 and ComfyUI load), whose keys are
  renamed to ours by the one table in `unet_rename_table` / `vae_rename_table`;
- a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`),
  whose keys already are ours.

Sizes are read from the tensors' shapes, so the same code loads the real 860M-parameter UNet and the
tiny test models. The tensors do not say how many attention heads there are; the rule is the one of the
released configs: SD 1.x (1x1-conv proj_in) has 8 heads, SD 2.x (linear proj_in) heads of 64 channels.

SD 1.x or 2.x: a linear proj_in (LDM `use_linear_in_transformer`) means SD 2.x.
Prediction type: SD 1.x is epsilon. A diffusers folder says it in scheduler/scheduler_config.json. For an
SD 2.x single file the weights cannot tell (the 768-v and 512-base UNets have the same shapes), so we
follow the file's neighbours and name: a `<name>.yaml` beside it with `parameterization: "v"` means v,
one without it means epsilon (A1111's convention); otherwise a name containing "512" or "base" means
epsilon, anything else v_prediction (the 768 models). `prediction_type=` overrides all of this.
"""
import json
import re
from pathlib import Path

import torch

from . import checkpoint_sdxl as sdxl
from .errors import UserError
from .model import RANDOM_NOTE, StableDiffusion
from .safetensors_io import PICKLE_HINT, SafetensorsFile
from .text import load_tokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H text tower
HF_CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: already transformers' CLIPTextModel names
PREDICTION_TYPES = ("epsilon", "v_prediction")

# ---------------------------------------------------------------------------------------------------
# The LDM -> diffusers rename table. Block prefixes depend on the configuration (how many levels and
# res blocks); the names inside a res block or the VAE attention are fixed.

UNET_RESNET_RENAMES = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                       ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
VAE_RESNET_RENAMES = [("nin_shortcut.", "conv_shortcut.")]
VAE_ATTENTION_RENAMES = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                         ("proj_out.", "to_out.0.")]


def unet_rename_table(cfg):
    """[(LDM prefix, our prefix, inner renames)] for a UNet of configuration `cfg`.

    LDM numbers its blocks in one flat list per direction: `input_blocks.k` for k = 1 + (n+1)*level + j
    holds res block j (and its attention as `.1`), `input_blocks.(n+1)*(level+1)` that level's
    downsampler; `output_blocks` run from the deepest level up, n+1 per level, the upsampler last.
    """
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    table = [("time_embed.0.", "time_embedding.linear_1.", []), ("time_embed.2.", "time_embedding.linear_2.", []),
             ("input_blocks.0.0.", "conv_in.", []), ("out.0.", "conv_norm_out.", []), ("out.2.", "conv_out.", []),
             ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET_RENAMES),
             ("middle_block.1.", "mid_block.attentions.0.", []),
             ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET_RENAMES)]
    if cfg.addition_embed_type == "text_time":
        table += sdxl.UNET_ADD_EMBEDDING_ROWS
    for level in range(levels):
        for j in range(n):
            k = 1 + (n + 1) * level + j
            table.append((f"input_blocks.{k}.0.", f"down_blocks.{level}.resnets.{j}.", UNET_RESNET_RENAMES))
            if cfg.attention_levels[level]:
                table.append((f"input_blocks.{k}.1.", f"down_blocks.{level}.attentions.{j}.", []))
        if level < levels - 1:
            table.append((f"input_blocks.{(n + 1) * (level + 1)}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", []))
    for i in range(levels):  # up block i mirrors down level levels-1-i
        attn = cfg.attention_levels[levels - 1 - i]
        for j in range(n + 1):
            k = (n + 1) * i + j
            table.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", UNET_RESNET_RENAMES))
            if attn:
                table.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.", []))
        if i < levels - 1:
            k = (n + 1) * i + n
            table.append((f"output_blocks.{k}.{2 if attn else 1}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", []))
    return table


def vae_rename_table(cfg):
    """[(LDM prefix, our prefix, inner renames)] for the VAE. LDM's `decoder.up` list is stored in
    reverse: `decoder.up.{L-1}` runs first (lowest resolution), which diffusers calls `up_blocks.0`."""
    levels, n = len(cfg.block_out_channels), cfg.layers_per_block
    table = [("quant_conv.", "quant_conv.", []), ("post_quant_conv.", "post_quant_conv.", [])]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in.", f"{part}.conv_in.", []), (f"{part}.conv_out.", f"{part}.conv_out.", []),
                  (f"{part}.norm_out.", f"{part}.conv_norm_out.", []),
                  (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET_RENAMES),
                  (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION_RENAMES),
                  (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET_RENAMES)]
    for i in range(levels):
        for j in range(n):
            table.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET_RENAMES))
        if i < levels - 1:
            table.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", []))
        ldm = levels - 1 - i
        for j in range(n + 1):
            table.append((f"decoder.up.{ldm}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", VAE_RESNET_RENAMES))
        if i < levels - 1:
            table.append((f"decoder.up.{ldm}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.", []))
    return table


def _translate(key, rows):
    """Rename `key` by the first row (from prefix, to prefix, inner renames) whose prefix it has."""
    for src, dst, inner in rows:
        if key.startswith(src):
            rest = key[len(src):]
            for a, b in inner:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            return dst + rest
    return None


def rename(key, table):
    """Our name for the LDM `key`, or None when no row of `table` covers it."""
    return _translate(key, table)


def unrename(key, table):
    """The LDM name of our `key` (the table read backwards), or None."""
    return _translate(key, [(ours, ldm, [(b, a) for a, b in inner]) for ldm, ours, inner in table])


# ---------------------------------------------------------------------------------------------------
# Configurations from tensor shapes (LDM layout)

def _indices(shapes, pattern):
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def infer_unet_config(shapes, num_heads=None, num_head_channels=None, pooled_dim=None):
    """UNetConfig from the shapes of the `model.diffusion_model.*` tensors (prefix removed).

    No tensor holds the head count: LDM's `num_head_channels` (width of a head) or else `num_heads`
    decide it when given, otherwise the released configs' rule (see the module docstring). SDXL's
    `label_emb` input is [pooled; 6 sinusoids]: `pooled_dim` (text encoder 2's projection) gives their width.
    """
    try:
        conv_in, conv_out = shapes["input_blocks.0.0.weight"], shapes["out.2.weight"]
        downsamplers = _indices(shapes, r"input_blocks\.(\d+)\.0\.op\.weight")
        inputs = _indices(shapes, r"input_blocks\.(\d+)\.")
        levels = len(downsamplers) + 1
        n = (len(inputs) - 1 - len(downsamplers)) // levels
        first = [1 + (n + 1) * level for level in range(levels)]
        channels = tuple(shapes[f"input_blocks.{k}.0.out_layers.3.weight"][0] for k in first)
        attention = tuple(f"input_blocks.{k}.1.proj_in.weight" in shapes for k in first)
        proj_in = shapes["middle_block.1.proj_in.weight"]
        context = shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
        mid_depth = len(_indices(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
        depth = tuple(len(_indices(shapes, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")) if a else 1
                      for k, a in zip(first, attention))
        # Inner attention width per level: from to_q where the level has attention, else its channels.
        inner = [shapes[f"input_blocks.{k}.1.transformer_blocks.0.attn1.to_q.weight"][0] if a else c
                 for k, a, c in zip(first, attention, channels)]
        inner[-1] = shapes["middle_block.1.transformer_blocks.0.attn1.to_q.weight"][0]  # the mid block's
    except KeyError as e:
        raise UserError(f"unknown UNet architecture: tensor {UNET_PREFIX}{e.args[0]} not found "
                        "(only Stable Diffusion 1.x, 2.x and XL UNets are supported)") from None
    if attention[-1] and depth[-1] != mid_depth:  # diffusers' mid block takes the last level's depth
        raise UserError(f"unknown UNet architecture: mid block depth {mid_depth}, last level's {depth[-1]}")
    depth = depth[:-1] + (mid_depth,)  # a last level without attention: its slot is the mid block's depth
    depth = depth[0] if len(set(depth)) == 1 else depth
    add = _add_embedding(shapes, pooled_dim)
    linear = len(proj_in) == 2
    if num_head_channels is None and num_heads is None:
        num_head_channels, num_heads = (64, None) if linear else (None, 8)  # SD 2.x / SD 1.x
    if num_head_channels is not None and num_head_channels > 0:
        head_dim = [num_head_channels if d % num_head_channels == 0 else d for d in inner]
    else:
        head_dim = [d // num_heads for d in inner]
    return UNetConfig(
        in_channels=conv_in[1], out_channels=conv_out[0], block_out_channels=channels, layers_per_block=n,
        attention_levels=attention, num_attention_heads=tuple(d // h for d, h in zip(inner, head_dim)),
        num_head_channels=tuple(head_dim), cross_attention_dim=context, use_linear_projection=linear,
        upcast_attention=linear and not add,  # SD 2.x overflows fp16 in Q K^T (SDXL's config does not upcast)
        transformer_layers_per_block=depth, **add)


def _add_embedding(shapes, pooled_dim):
    """SDXL's text_time settings from `label_emb` ({} without one): its input is pooled + 6 * sinusoid width."""
    if "label_emb.0.0.weight" not in shapes:
        return {}
    width = shapes["label_emb.0.0.weight"][1]
    if pooled_dim is None or (width - pooled_dim) % 6 or width <= pooled_dim:
        raise UserError(f"unknown UNet architecture: label_emb input {width} is not pooled text {pooled_dim} + 6 "
                        "size embeddings (an SDXL refiner, or a class-conditional UNet?)")
    return dict(addition_embed_type="text_time", addition_time_embed_dim=(width - pooled_dim) // 6,
                projection_class_embeddings_input_dim=width)


def infer_vae_config(shapes):
    """VAEConfig from the shapes of the `first_stage_model.*` tensors (prefix removed)."""
    if any(re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in shapes):
        raise UserError("unknown VAE architecture: attention outside the mid block is not supported")
    try:
        levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
        return VAEConfig(
            in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
            block_out_channels=tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels),
            layers_per_block=len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
            latent_channels=shapes["post_quant_conv.weight"][0])
    except KeyError as e:
        raise UserError(f"unknown VAE architecture: tensor {VAE_PREFIX}{e.args[0]} not found") from None


# ---------------------------------------------------------------------------------------------------
# Filling modules built on the meta device

def _build(cls, cfg, dtype, device):
    """The module with uninitialised storage: no random init to throw away, no second copy."""
    with torch.device("meta"):
        module = cls(cfg)
    return module.to(dtype).to_empty(device=device)


@torch.no_grad()
def fill(module, sources, what):
    """Copy tensors into every parameter and persistent buffer of `module`, exactly once.

    `sources` yields (our name, reader): reader(out) returns the tensor, read straight into `out` (the
    parameter) when the stored dtype and shape allow. Tensors are cast to the module's dtype; a 1x1-conv
    weight fills a linear one (LDM's VAE attention is 1x1 convs, diffusers' linear layers).
    """
    targets = module.state_dict(keep_vars=True)
    missing = set(targets)
    for name, read in sources:
        if name not in targets:
            raise UserError(f"unknown {what} architecture: unexpected tensor {name}")
        dst = targets[name]
        src = read(dst)
        if src is dst:
            missing.discard(name)
            continue
        if tuple(src.shape) != tuple(dst.shape):
            if src.dim() == 4 and src.shape[2:] == (1, 1) and tuple(src.shape[:2]) == tuple(dst.shape):
                src = src[:, :, 0, 0]
            else:
                raise UserError(f"{what} tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)
        missing.discard(name)
    if missing:
        raise UserError(f"{what} weights are incomplete: {len(missing)} tensors missing, e.g. "
                        + ", ".join(sorted(missing)[:3]))
    return module


HIDDEN_ACT = {"sd1": "quick_gelu", "sd2": "gelu"}  # OpenAI CLIP: x*sigmoid(1.702x); OpenCLIP ViT-H: exact GELU


# ---------------------------------------------------------------------------------------------------
# The text encoder: configs from tensors or JSON, OpenCLIP (SD 2.x) -> CLIPTextModel

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
    are dropped here (SDXL's projection: checkpoint_sdxl.convert_open_clip_with_projection).
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


def _load_text(text_tensors, version, dtype, device, config=None, cls=None):
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


# ---------------------------------------------------------------------------------------------------
# The two layouts

def _load_single_file(path, dtype, device):
    f = SafetensorsFile(path)
    shapes = f.shapes
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in shapes):
        raise UserError(f"{path} is a LoRA file, not a model: pass it with --lora")
    is_xl = sdxl.single_file_family(path, shapes) == "sdxl"  # refuses the refiner, SD3, Flux
    part = lambda prefix: {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    unet_shapes, vae_shapes = part(UNET_PREFIX), part(VAE_PREFIX)
    if not unet_shapes or not vae_shapes:
        raise UserError(f"{path} is not a Stable Diffusion checkpoint: no {UNET_PREFIX if not unet_shapes else VAE_PREFIX}* "
                        "tensors (a UNet- or VAE-only file cannot be loaded alone)")

    def load_part(cls, cfg, prefix, part_shapes, table, what, dtype=dtype):
        module = _build(cls, cfg, dtype, device)
        sources = []
        for key in part_shapes:
            ours = rename(key, table)
            if ours is None:
                raise UserError(f"unknown {what} architecture: no rename for {prefix}{key}")
            sources.append((ours, lambda out, k=prefix + key: f.read(k, out)))
        return fill(module, sources, what).eval().requires_grad_(False)

    pooled = shapes.get(sdxl.BIGG_PREFIX + "text_projection", (None, None))[1]
    unet_cfg, vae_cfg = infer_unet_config(unet_shapes, pooled_dim=pooled, **_yaml_heads(path)), infer_vae_config(vae_shapes)
    version = "sdxl" if is_xl else "sd2" if unet_cfg.use_linear_projection else "sd1"
    if is_xl:
        vae_cfg.scaling_factor = sdxl.VAE_SCALING_FACTOR
    unet = load_part(UNet2DConditionModel, unet_cfg, UNET_PREFIX, unet_shapes, unet_rename_table(unet_cfg), "UNet")
    vae = load_part(AutoencoderKL, vae_cfg, VAE_PREFIX, vae_shapes, vae_rename_table(vae_cfg), "VAE",
                    sdxl.vae_dtype(dtype) if is_xl else dtype)
    return dict(unet=unet, vae=vae, version=version, **_single_file_text(f, version, dtype, device),
                prediction_type=_single_file_prediction_type(path, version), scheduler_config={})


def _single_file_text(f, version, dtype, device):
    """The text encoder(s) and tokenizer(s) of a single file, as StableDiffusion fields."""
    if version == "sdxl":
        text_encoder, text_encoder_2 = sdxl.load_text_single_file(f, dtype, device)
        return dict(text_encoder=text_encoder, tokenizer=load_tokenizer("sd1"),  # CLIP-L pads with EOS
                    text_encoder_2=text_encoder_2, tokenizer_2=load_tokenizer("sd2"))  # OpenCLIP with "!"
    shapes = f.shapes
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in shapes):
        text_tensors = convert_open_clip({k[len(OPEN_CLIP_PREFIX):]: f.read(k) for k in shapes if k.startswith(OPEN_CLIP_PREFIX)})
    elif any(k.startswith(HF_CLIP_PREFIX) for k in shapes):
        text_tensors = {k[len(HF_CLIP_PREFIX):]: f.read(k) for k in shapes if k.startswith(HF_CLIP_PREFIX)}
    else:
        raise UserError(f"{f.path} has no text encoder ({HF_CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*)")
    return dict(text_encoder=_load_text(text_tensors, version, dtype, device), tokenizer=load_tokenizer(version))


def _yaml_heads(path):
    """num_heads / num_head_channels from the LDM config `<name>.yaml` beside a single file, if any
    (read with a regular expression: the keys are unique in those configs, and we need no YAML parser)."""
    yaml = path.with_suffix(".yaml")
    text = yaml.read_text() if yaml.exists() else ""
    found = {k: int(m.group(1)) for k in ("num_heads", "num_head_channels")
             if (m := re.search(rf"^\s*{k}:\s*(-?\d+)", text, re.M))}
    if found.get("num_head_channels", -1) <= 0:
        found.pop("num_head_channels", None)
    return found


def _single_file_prediction_type(path, version):
    if version != "sd2":  # SD 1.x and SDXL base are epsilon models
        return "epsilon"
    yaml = path.with_suffix(".yaml")
    if yaml.exists():
        return "v_prediction" if re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(), re.M) else "epsilon"
    return "epsilon" if re.search(r"512|base", path.name, re.I) else "v_prediction"


def _weights_file(folder):
    """The one safetensors weight file of a diffusers component folder."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"):
        if (folder / name).exists():
            return SafetensorsFile(folder / name)
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        raise UserError(f"{folder}: {PICKLE_HINT}")
    raise UserError(f"{folder} has no .safetensors weights")


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the diffusers folder is incomplete") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _load_folder(path, dtype, device):
    is_xl = sdxl.folder_family(path, _read_json(path / "model_index.json")) == "sdxl"  # refuses refiner, SD3, ...

    def load_part(cls, cfg_cls, sub, what, dtype=dtype):
        f = _weights_file(path / sub)
        module = _build(cls, cfg_cls.from_diffusers(_read_json(path / sub / "config.json")), dtype, device)
        return fill(module, ((k, lambda out, k=k: f.read(k, out)) for k in f.entries), what).eval().requires_grad_(False)

    unet = load_part(UNet2DConditionModel, UNetConfig, "unet", "UNet")
    vae = load_part(AutoencoderKL, VAEConfig, "vae", "VAE", sdxl.vae_dtype(dtype) if is_xl else dtype)
    version = "sdxl" if is_xl else "sd2" if unet.config.use_linear_projection else "sd1"
    text = dict(text_encoder=_folder_text(path, "text_encoder", "sd2" if version == "sd2" else "sd1", dtype, device))
    if is_xl:
        text["text_encoder_2"] = _folder_text(path, "text_encoder_2", "sd2", dtype, device, with_projection=True)
    for sub, field, pad in (("tokenizer", "tokenizer", "sd2" if version == "sd2" else "sd1"),
                            ("tokenizer_2", "tokenizer_2", "sd2")):
        if field == "tokenizer" or is_xl:  # SDXL: tokenizer/ pads with EOS, tokenizer_2/ with "!"
            text[field] = load_tokenizer(pad, path / sub if (path / sub).is_dir() else None)
    scheduler_config = {}
    if (path / "scheduler" / "scheduler_config.json").exists():
        scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    return dict(unet=unet, vae=vae, **text, version=version, scheduler_config=scheduler_config,
                prediction_type=scheduler_config.get("prediction_type", "epsilon"))


def _folder_text(path, sub, version, dtype, device, with_projection=False):
    """A text encoder from a diffusers component folder (text_encoder/ or SDXL's text_encoder_2/)."""
    from transformers import CLIPTextModelWithProjection

    f = _weights_file(path / sub)
    tensors, config = {k: f.read(k) for k in f.entries}, text_config_from_json(_read_json(path / sub / "config.json"))
    if with_projection:
        return _load_text(tensors, version, dtype, device, config, cls=CLIPTextModelWithProjection)
    return _load_text(tensors, version, dtype, device, config)


def load(path, dtype=torch.float32, device="cpu", prediction_type=None, revision=None, log=print):
    """Load a Stable Diffusion 1.x / 2.x / XL checkpoint: a single LDM `.safetensors` file or a diffusers folder,
    or a model by name (a Hub repo id, `owner/repo/file.safetensors`, a short name such as "sd15"), which
    hub.resolve_model fetches into the Hugging Face cache at `revision` (see hub.py).

    Weights stored in fp16/bf16 are cast to `dtype` (but SDXL's VAE stays fp32 when `dtype` is fp16). Extra tensors (DDPM buffers, `model_ema.*`) are
    ignored; missing or mis-shaped ones raise UserError naming them. `sd.source` records where the model
    came from: {"path"} or {"repo_id", "revision" (commit sha), "file"}.
    """
    from .hub import resolve_model

    path, source = resolve_model(path, revision, prefer_fp16=dtype == torch.float16, log=log)
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise UserError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, not {prediction_type!r}")
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(f"{path} is a folder but not a diffusers model folder (no model_index.json); "
                            "pass a .safetensors file or a diffusers folder")
        parts = _load_folder(path, dtype, device)
        parts["random_note"] = str(_read_json(path / "model_index.json").get(RANDOM_NOTE, ""))
    elif path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{path}: {PICKLE_HINT}")
    else:
        parts = _load_single_file(path, dtype, device)
    if prediction_type is not None:
        parts["prediction_type"] = prediction_type
    if parts["prediction_type"] not in PREDICTION_TYPES:
        raise UserError(f"{path}: unsupported prediction type {parts['prediction_type']!r}")
    if "repo_id" in source:  # named by its repo (or file), not by the cache folder's commit sha
        name = Path(source["file"]).stem if source["file"] else source["repo_id"]
    else:
        name = path.stem if path.is_file() else path.name
    sd = StableDiffusion(**parts, name=name)
    sd.source = source
    return sd


def find_default_model(folder=None):
    """The one model in weights/ (a .safetensors file or a diffusers folder), for commands run without --model;
    with none there, the short name of the Hub's SD 1.5 (hub.DEFAULT_MODEL, "sd15"), which load() resolves.

    weights/ is looked for in the current folder, then beside the package (the project's own weights/).
    """
    if folder is None:
        here, project = Path("weights"), Path(__file__).resolve().parents[1] / "weights"
        folder = here if here.is_dir() or not project.is_dir() else project
    folder = Path(folder)
    found = sorted(folder.glob("*.safetensors")) + sorted(p.parent for p in folder.glob("*/model_index.json"))
    pickles = sorted(p for ext in ("*.ckpt", "*.pt", "*.pth", "*.bin") for p in folder.glob(ext))
    if not found and pickles:
        raise UserError(f"{pickles[0]}: {PICKLE_HINT}")
    if not found:  # a fresh clone: the Hub's SD 1.5, downloaded once into the Hugging Face cache by load()
        from .hub import DEFAULT_MODEL
        return DEFAULT_MODEL
    if len(found) > 1:
        raise UserError(f"several models in {folder.absolute()}/ ({', '.join(p.name for p in found)}): "
                        "choose one with --model")
    return found[0]
