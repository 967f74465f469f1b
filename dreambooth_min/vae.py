"""The Stable Diffusion VAE (LDM `AutoencoderKL`, Rombach et al. 2022 sec. 3): image <-> latent.

The encoder maps an image [B, 3, H, W] in [-1, 1] to a diagonal Gaussian over latents [B, 4, H/8, W/8];
the decoder maps a latent back. Latents are multiplied by `scaling_factor` (0.18215) before they reach
the UNet; that happens outside this module, as in LDM and diffusers.

Module names equal diffusers' `AutoencoderKL`, so its state dict loads with strict=True.
"""
from dataclasses import dataclass, fields

import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .errors import UserError
from .layers import ResnetBlock2D, Upsample2D, attention

EPS = 1e-6  # every GroupNorm of the LDM VAE uses 1e-6 (the UNet's res blocks use 1e-5)


@dataclass
class VAEConfig:
    in_channels: int = 3  # RGB
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)  # one per resolution; downscale 2**(levels-1) = 8
    layers_per_block: int = 2  # res blocks per encoder level; each decoder level has one more
    latent_channels: int = 4  # the encoder outputs twice this: mean and log-variance
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # LDM's `scale_factor`: makes latents roughly unit variance

    @classmethod
    def sd(cls):
        """The full-size VAE of SD 1.x and 2.x (83.65M parameters)."""
        return cls()

    @classmethod
    def from_diffusers(cls, config):
        """From a diffusers `vae/config.json` dict; options that change the architecture must be SD's."""
        expected = dict(act_fn="silu", use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)
        for key, value in expected.items():
            if config.get(key, value) != value:
                raise UserError(f"unsupported VAE: config.json has {key}={config[key]!r} (SD uses {value!r})")
        blocks = set(config.get("down_block_types", [])) | set(config.get("up_block_types", []))
        if not blocks <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise UserError(f"unsupported VAE block types {sorted(blocks)}: only DownEncoderBlock2D/UpDecoderBlock2D")
        kwargs = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])  # JSON gives a list
        return cls(**kwargs)


class Downsample2D(nn.Module):
    """3x3 stride-2 conv. LDM pads only the right and bottom edge by one (not 1 on each side), so the
    sampling grid differs from padding=1; we keep that quirk because the weights were trained with it."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Attention(nn.Module):
    """Single-head self-attention over all H*W pixels, with a residual (LDM `AttnBlock`).
    LDM stores q/k/v/proj_out as 1x1 convs; diffusers (and we) as the equivalent Linear layers."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # `to_out.0`, as diffusers names it

    def forward(self, x):
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        h = attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1, upcast=True)  # diffusers upcasts the softmax
        return x + rearrange(self.to_out[0](h), "b (h w) c -> b c h w", h=x.shape[2])


class MidBlock(nn.Module):
    """res block -> attention -> res block, at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, eps=EPS, groups=groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


def resnets(in_channels, out_channels, n, groups):
    """`n` VAE res blocks; the first changes the channel count."""
    return nn.ModuleList([ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, eps=EPS, groups=groups)
                          for j in range(n)])


class EncoderBlock(nn.Module):
    """`n` res blocks, then (except at the last level) halve the resolution."""

    def __init__(self, in_channels, out_channels, n, groups, downsample):
        super().__init__()
        self.resnets = resnets(in_channels, out_channels, n, groups)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    """`n` res blocks, then (except at the last level) double the resolution."""

    def __init__(self, in_channels, out_channels, n, groups, upsample):
        super().__init__()
        self.resnets = resnets(in_channels, out_channels, n, groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """image [B, in, H, W] -> [B, 2*latent, H/f, W/f] (mean and log-variance), f = 2**(levels-1)."""

    def __init__(self, cfg):
        super().__init__()
        chs, g, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([EncoderBlock(chs[max(i - 1, 0)], c, n, g, downsample=i < len(chs) - 1)
                                          for i, c in enumerate(chs)])
        self.mid_block = MidBlock(chs[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """latent [B, latent, h, w] -> image [B, out, h*f, w*f]. up_blocks.0 is the lowest resolution."""

    def __init__(self, cfg):
        super().__init__()
        chs, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g)
        self.up_blocks = nn.ModuleList([DecoderBlock(chs[max(i - 1, 0)], c, n + 1, g, upsample=i < len(chs) - 1)
                                        for i, c in enumerate(chs)])
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config or VAEConfig()
        self.scaling_factor = self.config.scaling_factor  # applied by the caller: z_unet = scaling_factor * z
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * self.config.latent_channels, 2 * self.config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(self.config.latent_channels, self.config.latent_channels, 1)

    def encode(self, x):
        """image [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, 4, H/8, W/8].

        A sample is mean + exp(logvar / 2) * noise. logvar is clamped to [-30, 20] as LDM's
        DiagonalGaussianDistribution does, so exp() can neither underflow to a zero std nor overflow.
        """
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """latent [B, 4, h, w] (unscaled: divide the UNet's latent by scaling_factor first) -> image."""
        return self.decoder(self.post_quant_conv(z))
