"""Building blocks shared by the UNet and the VAE: attention and the ResNet block.

Names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, `conv_shortcut`, ...) so that a diffusers
state dict loads without renaming; the LDM single-file names are mapped in `formats/checkpoint_names.py`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .memory import Conv2d, norm_silu

try:  # optional: xformers' memory-efficient kernel, used only for CUDA tensors
    import xformers.ops as _xops
except Exception:  # ImportError, or a broken binary build
    _xops = None

USE_XFORMERS = _xops is not None


def attention(q, k, v, heads, upcast=False):
    """Multi-head softmax(Q K^T / sqrt(d)) V  (Vaswani et al. eq. 1).

    q: [B, N, heads*d], k and v: [B, M, heads*d] -> [B, N, heads*d].
    `upcast` computes the product in fp32 for half inputs: SD 2.x 768-v overflows fp16 in Q K^T.
    The fused CUDA kernels (SDPA flash / memory-efficient, xformers) already accumulate in fp32,
    so the upcast only matters on the plain math path (CPU half precision).
    """
    dtype = q.dtype
    if upcast and dtype != torch.float32 and not q.is_cuda:
        q, k, v = q.float(), k.float(), v.float()
    if USE_XFORMERS and q.is_cuda:
        q, k, v = (rearrange(x, "b n (h d) -> b n h d", h=heads).contiguous() for x in (q, k, v))
        out = _xops.memory_efficient_attention(q, k, v)
        return rearrange(out, "b n h d -> b n (h d)").to(dtype)
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)").to(dtype)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the (optionally 1x1-projected) input (LDM `ResBlock`).

    With `temb_channels` the timestep embedding is added between the two convs (UNet); without it the
    block is the VAE's. Dropout is 0 in every SD config and is left out.
    """

    def __init__(self, in_channels, out_channels, temb_channels=None, eps=1e-5, groups=32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        h = self.conv1(norm_silu(self.norm1, x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(norm_silu(self.norm2, h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv. `size` lets the UNet match an odd skip shape."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
