"""The one rename table between LDM single-file keys and ours (diffusers' names), and configs from shapes.

LDM (CompVis/Stability-AI) names blocks by position: `input_blocks.4.1.proj_in` is the 4th input block's
transformer; diffusers (and our modules) by role: `down_blocks.1.attentions.0.proj_in`. Block prefixes depend
on the configuration (how many levels and res blocks); the names inside a res block or the VAE attention are
fixed. The same table renames a LoRA's UNet layers to kohya's names (lora_names.py).

Sizes are read from the tensors' shapes, so the same code loads the real 860M-parameter UNet and the
tiny test models. The tensors do not say how many attention heads there are; the rule is the one of the
released configs: SD 1.x (1x1-conv proj_in) has 8 heads, SD 2.x (linear proj_in) heads of 64 channels.
"""
import re

from ..errors import UserError
from ..unet import UNetConfig
from ..vae import VAEConfig

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H text tower
HF_CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: already transformers' CLIPTextModel names

UNET_RESNET_RENAMES = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                       ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
VAE_RESNET_RENAMES = [("nin_shortcut.", "conv_shortcut.")]
VAE_ATTENTION_RENAMES = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                         ("proj_out.", "to_out.0.")]
# SDXL: LDM's `label_emb` (a Sequential: Linear, SiLU, Linear) is diffusers' add_embedding.
UNET_ADD_EMBEDDING_ROWS = [("label_emb.0.0.", "add_embedding.linear_1.", []),
                           ("label_emb.0.2.", "add_embedding.linear_2.", [])]


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
        table += UNET_ADD_EMBEDDING_ROWS
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
