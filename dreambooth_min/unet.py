"""The Stable Diffusion denoiser (1.x / 2.x / XL): a text-conditioned UNet over VAE latents (LDM, Rombach et al. 2022).

eps_theta(z_t, t, c): z_t [B, 4, h, w] noisy latent, t the timestep, c [B, 77, C] text states. SDXL (Podell et
al. 2023) is the same network with other sizes (no attention at the first level, 1/2/10 transformer blocks per
level) and one addition: its pooled text embedding and six size numbers are added to the timestep embedding
(`addition_embed_type="text_time"`); the conditioning arrives as one `conditioning.Cond`.
Down levels halve the resolution, the middle block runs at the lowest one, and up levels mirror the down
levels, each of their res blocks eating one skip connection. Levels marked in `attention_levels` put a
spatial transformer (self-attention, cross-attention to c, GEGLU MLP) after every res block.

Module names equal diffusers' `UNet2DConditionModel` (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`)
so a diffusers state dict loads with `load_state_dict(strict=True)`; `formats/checkpoint_names.py` maps the LDM names.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conditioning import as_cond
from .errors import UserError
from .layers import ResnetBlock2D, Upsample2D, attention
from .lora import fused_linear
from .memory import Conv2d, cpu_path, low_memory, norm_silu, recompute_cheap, recompute_in_backward


@dataclass
class UNetConfig:
    in_channels: int = 4                                  # latent channels (9 for inpainting models)
    out_channels: int = 4                                 # predicted eps (or v) has the latent's shape
    block_out_channels: tuple = (320, 640, 1280, 1280)    # channels per resolution level
    layers_per_block: int = 2                             # res blocks per down level; up levels have one more
    attention_levels: tuple = (True, True, True, False)   # down level i has transformers; up levels mirror
    num_attention_heads: tuple = (8, 8, 8, 8)             # per level; the mid block uses the last level's
    num_head_channels: tuple = (40, 80, 160, 160)         # per level: the width of one head (LDM's name)
    cross_attention_dim: int = 768                        # text width: 768 CLIP-L (SD1), 1024 OpenCLIP-H (SD2)
    use_linear_projection: bool = False                   # SD2: transformer proj_in/out are Linear, not 1x1 conv
    upcast_attention: bool = False                        # SD2 768-v: softmax(QK^T) overflows in fp16
    norm_num_groups: int = 32
    transformer_layers_per_block: int = 1                 # transformer depth (an int, or a tuple per level)
    addition_embed_type: str = None                       # "text_time" (SDXL): pooled text + size ids join t's embedding
    addition_time_embed_dim: int = 256                    # SDXL: sinusoid width of each of the six size numbers
    projection_class_embeddings_input_dim: int = 0        # SDXL: add_embedding's input, pooled 1280 + 6 * 256 = 2816

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("block_out_channels", "attention_levels", "num_attention_heads", "num_head_channels"):
            value = tuple(getattr(self, name))
            if len(value) != n:
                raise UserError(f"UNet config: {name} has {len(value)} entries, block_out_channels has {n}")
            setattr(self, name, value)
        if not isinstance(self.transformer_layers_per_block, int):
            self.transformer_layers_per_block = tuple(self.transformer_layers_per_block)
        if self.addition_embed_type not in (None, "text_time"):
            raise UserError(f"UNet config: addition_embed_type {self.addition_embed_type!r} is not supported")

    def depth(self, level):
        """Transformer blocks per attention module at `level` (-1: the deepest level, used by the mid block)."""
        d = self.transformer_layers_per_block
        return d if isinstance(d, int) else d[level]

    @classmethod
    def sd1(cls):
        """SD 1.x: 8 heads at every level (head width = channels / 8), 1x1-conv projections, CLIP-L text."""
        return cls()

    @classmethod
    def sd2(cls):
        """SD 2.x 768-v: 64-wide heads (heads = channels / 64), Linear projections, OpenCLIP-H text.

        The 512-base model is identical except `upcast_attention=False` (same weights layout).
        """
        return cls(num_attention_heads=(5, 10, 20, 20), num_head_channels=(64, 64, 64, 64),
                   cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True)

    @classmethod
    def sdxl(cls):
        """SDXL base 1.0: three levels, none at the first, 64-wide heads, 1/2/10 transformer blocks per level
        (10 in the mid block), 2048-wide text (CLIP-L 768 + OpenCLIP-bigG 1280), pooled 1280 + 6 size ids."""
        return cls(block_out_channels=(320, 640, 1280), attention_levels=(False, True, True),
                   num_attention_heads=(5, 10, 20), num_head_channels=(64, 64, 64), cross_attention_dim=2048,
                   use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                   addition_embed_type="text_time", projection_class_embeddings_input_dim=2816)

    @classmethod
    def from_diffusers(cls, cfg):
        """Read a diffusers `unet/config.json` dict. Raises UserError on a UNet this file cannot build."""
        for key, default in _DIFFUSERS_DEFAULTS.items():
            value = cfg.get(key, default)
            if not _all_equal(value, default):
                raise UserError(f"UNet config: {key}={value!r} is not supported (only SD 1.x / 2.x UNets are)")
        channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        n = len(channels)
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
        if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or len(down) != n:
            raise UserError(f"UNet config: unsupported down_block_types {down}")
        levels = tuple(t == "CrossAttnDownBlock2D" for t in down)
        up = cfg.get("up_block_types")
        mirror = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
        if up is not None and list(up) != mirror:
            raise UserError(f"UNet config: up_block_types {up} do not mirror down_block_types {down}")
        # diffusers' config calls the number of heads `attention_head_dim` (a historical misnomer); the
        # real head width is channels / heads, so the inner attention width always equals the channels.
        heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n)
        if cfg.get("addition_embed_type") not in (None, "text_time"):
            raise UserError(f"UNet config: addition_embed_type={cfg['addition_embed_type']!r} is not supported")
        if any(c % h for c, h in zip(channels, heads)):
            raise UserError(f"UNet config: channels {channels} are not divisible by heads {heads}")
        context = cfg.get("cross_attention_dim", 1280)
        if not _all_equal(context, _per_level(context, 1)[0]):
            raise UserError(f"UNet config: per-level cross_attention_dim {context} is not supported")
        depth, n_layers = cfg.get("transformer_layers_per_block", 1), cfg.get("layers_per_block", 2)
        if not isinstance(n_layers, int) or not all(isinstance(d, int) for d in _per_level(depth, 1)):
            raise UserError(f"UNet config: per-level layers_per_block {n_layers} / nested "
                            f"transformer_layers_per_block {depth} are not supported")
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=channels,
            layers_per_block=n_layers,
            attention_levels=levels,
            num_attention_heads=heads,
            num_head_channels=tuple(c // h for c, h in zip(channels, heads)),
            cross_attention_dim=_per_level(context, 1)[0],
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            transformer_layers_per_block=depth if isinstance(depth, int) else tuple(depth),
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") or 256,
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim") or 0,
        )


# diffusers config keys whose non-default values mean a UNet we do not build (upscalers, Kandinsky, ...).
_DIFFUSERS_DEFAULTS = {
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False,
    "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
    "class_embed_type": None, "encoder_hid_dim": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_cond_proj_dim": None,
    "timestep_post_act": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


def _all_equal(value, default):
    if isinstance(value, (list, tuple)):
        return all(v == default for v in value)
    return value == default


def _per_level(value, n):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


# ----------------------------------------------------------------------------------------------------------
# Spatial transformer


class Attention(nn.Module):
    """Multi-head attention from x to `context` (itself when None). Each projection is a separate module so
    LoRA can wrap `to_q`, `to_k`, `to_v`, `to_out.0` by name."""

    def __init__(self, query_dim, context_dim, heads, head_dim, upcast=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Identity()])  # [1]: diffusers' dropout slot

    def forward(self, x, context=None):  # x [B, N, C], context [B, M, Cc]
        if cpu_path(x.device):  # the CPU keeps three products, as measured there
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        elif context is None:  # one product for q, k and v (and one per LoRA factor): fewer kernel launches
            q, k, v = fused_linear((self.to_q, self.to_k, self.to_v), x)
        else:
            q, (k, v) = self.to_q(x), fused_linear((self.to_k, self.to_v), context)
        out = attention(q, k, v, self.heads, self.upcast)
        return self.to_out[0](out)  # [B, N, C]


class GEGLU(nn.Module):
    """x W -> (a, g); a * GELU(g)  (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h = self.proj(x)
        # In training keep only h: a, GELU(gate) and gate would be 1.5x its size (recomputed in backward).
        return recompute_cheap(_geglu, h)


def _geglu(h):
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # [1] is diffusers' dropout slot, kept so that `ff.net.2` lines up
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim, heads, head_dim, context_dim, upcast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, head_dim, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):  # x [B, h*w, C]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, project in, treat the h*w pixels as tokens for the transformer blocks, project out, add.

    SD1 projects with 1x1 convs (before flattening), SD2 with Linear layers (after flattening).
    """

    def __init__(self, channels, heads, head_dim, depth, context_dim, linear, upcast, groups):
        super().__init__()
        inner = heads * head_dim
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if linear else lambda i, o: Conv2d(i, o, 1)
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, upcast) for _ in range(depth)])
        self.proj_out = proj(inner, channels)

    def forward(self, x, context):  # x [B, C, h, w], context [B, M, Cc]
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # [B, h*w, C]: the one copy into token layout
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # [B, C, h, w] view, channels-last in memory
        if not self.linear:
            h = self.proj_out(h)  # a 1x1 conv reads channels-last memory directly: no copy back needed
        return x + h  # x first: the sum takes x's standard memory layout, so nothing downstream sees channels-last


# ----------------------------------------------------------------------------------------------------------
# UNet


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2)) (Vaswani et al. sec. 3.5,
    cos first as in LDM). t [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Downsample2D(nn.Module):
    """3x3 conv with stride 2: halves h and w, rounding up (an odd 9 becomes 5)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


def _run(module, ckpt, *args):
    """Call module(*args); with `ckpt`, recompute its activations in backward instead of storing them.

    What is worth recomputing depends on what a block would store. A res block whose weights are frozen
    (LoRA training) stores only its two norm inputs, since a frozen convolution keeps nothing: recomputing
    its two convolutions would buy little memory for much time, so it runs normally. In a transformer the
    attention kernel's result is kept (memory.recompute_in_backward): it is one activation, and recomputing it is the
    most expensive part of the block (quadratic in the pixels); everything around it is recomputed."""
    if not ckpt or (isinstance(module, ResnetBlock2D) and not any(p.requires_grad for p in module.parameters())):
        return module(*args)
    return recompute_in_backward(module, *args, keep_attention=isinstance(module, Transformer2DModel))


def _transformer(cfg, level, channels):
    return Transformer2DModel(channels, cfg.num_attention_heads[level], cfg.num_head_channels[level],
                              cfg.depth(level), cfg.cross_attention_dim, cfg.use_linear_projection,
                              cfg.upcast_attention, cfg.norm_num_groups)


class DownBlock(nn.Module):
    """One resolution level going down: (res block [+ transformer]) x layers_per_block [+ stride-2 conv].
    Every output (including the downsampled one) is pushed on the skip stack."""

    def __init__(self, cfg, level, in_ch, out_ch, temb_ch, downsample):
        super().__init__()
        n, groups = cfg.layers_per_block, cfg.norm_num_groups
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups=groups) for i in range(n)])
        if cfg.attention_levels[level]:
            self.attentions = nn.ModuleList([_transformer(cfg, level, out_ch) for _ in range(n)])
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, x, temb, context, skips, ckpt):
        for i, resnet in enumerate(self.resnets):
            x = _run(resnet, ckpt, x, temb)
            if self.attentions is not None:
                x = _run(self.attentions[i], ckpt, x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """Res block, transformer, res block at the lowest resolution."""

    def __init__(self, cfg, temb_ch):
        super().__init__()
        ch, groups = cfg.block_out_channels[-1], cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, groups=groups) for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(cfg, -1, ch)])

    def forward(self, x, temb, context, ckpt):
        x = _run(self.resnets[0], ckpt, x, temb)
        x = _run(self.attentions[0], ckpt, x, context)
        return _run(self.resnets[1], ckpt, x, temb)


class UpBlock(nn.Module):
    """One resolution level going up: (concat a skip, res block [+ transformer]) x (layers_per_block + 1)
    [+ nearest 2x upsample and conv]. The skips come off the stack in reverse order of the down path, so
    the last one of a level has the channels of the level below (the one its down block started from)."""

    def __init__(self, cfg, level, prev_ch, upsample, temb_ch):
        super().__init__()
        ch = cfg.block_out_channels
        out_ch, n, groups = ch[level], cfg.layers_per_block + 1, cfg.norm_num_groups
        skip_ch = [out_ch] * (n - 1) + [ch[max(level - 1, 0)]]
        self.resnets = nn.ModuleList([ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip_ch[i], out_ch,
                                                    temb_ch, groups=groups) for i in range(n)])
        if cfg.attention_levels[level]:
            self.attentions = nn.ModuleList([_transformer(cfg, level, out_ch) for _ in range(n)])
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, temb, context, skips, ckpt):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # [B, C + C_skip, h, w]
            x = _run(resnet, ckpt, x, temb)
            if self.attentions is not None:
                x = _run(self.attentions[i], ckpt, x, context)
        if self.upsamplers is not None:
            # upsample to the next skip's size, not blindly 2x: an odd 9 was downsampled to 5, and 2 * 5 != 9
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])
        return x


class UNet2DConditionModel(nn.Module):
    """eps_theta(z_t, t, c) of LDM (Rombach et al. 2022, eq. 2); predicts eps or v depending on the weights."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False  # set True to trade compute for activation memory in training
        self.low_memory = False  # True: the cheap-op recomputation on CUDA too (memory.low_memory; --low-memory)
        ch = cfg.block_out_channels
        temb_ch = 4 * ch[0]
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_ch)
                              if cfg.addition_embed_type == "text_time" else None)
        last = len(ch) - 1
        self.down_blocks = nn.ModuleList([DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i], temb_ch, i < last)
                                          for i in range(len(ch))])
        self.mid_block = MidBlock(cfg, temb_ch)
        levels = list(reversed(range(len(ch))))  # up_blocks.0 is the deepest level
        self.up_blocks = nn.ModuleList([UpBlock(cfg, lv, ch[min(lv + 1, last)], lv > 0, temb_ch) for lv in levels])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=1e-5)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample, timestep, cond):
        """sample [B, in, h, w]; timestep int, 0-d or [B] tensor; cond a conditioning.Cond (or SD 1/2's bare
        context tensor [B, M, Cc]) -> [B, out, h, w]."""
        with low_memory(self.low_memory):
            return self._denoise(sample, timestep, cond)

    def _denoise(self, sample, timestep, cond):
        B = sample.shape[0]
        cond = as_cond(cond)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)  # [B]
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        if self.add_embedding is not None:
            temb = temb + self.add_embedding(self.text_time(cond).to(sample.dtype))
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        context = cond.context

        x = self.conv_in(sample)  # [B, C0, h, w]
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, context, skips, ckpt)
        x = self.mid_block(x, temb, context, ckpt)  # [B, C_last, h / 2^(L-1), w / 2^(L-1)]
        for block in self.up_blocks:
            x = block(x, temb, context, skips, ckpt)
        return self.conv_out(norm_silu(self.conv_norm_out, x))  # [B, out, h, w]

    def text_time(self, cond):
        """SDXL's extra embedding input [B, P + 6 * 256]: the pooled text, then each size number through the
        same sinusoids as t (sgm `ConcatTimestepEmbedderND`; diffusers `add_time_proj`)."""
        if cond.pooled is None or cond.time_ids is None:
            raise ValueError("this UNet (SDXL) needs a Cond with pooled and time_ids, not only a text context")
        ids = cond.time_ids.to(cond.pooled.device).float()
        sizes = timestep_embedding(ids.reshape(-1), self.config.addition_time_embed_dim).reshape(len(ids), -1)
        return torch.cat([cond.pooled.float(), sizes], dim=-1)
