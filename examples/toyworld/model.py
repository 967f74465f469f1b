"""The toy Stable Diffusion: this project's UNet, VAE and schedule, a random frozen CLIP text encoder,
and the loops that pretrain them on the toy world (LDM, Rombach et al. 2022, at 1/1000 of the size).

1. Autoencoder: reconstruction (L1 + L2) plus a small KL term towards N(0, I) (LDM sec. 3), on world
   pictures and on textured shapes of any colour; then the decoder alone is fine-tuned on the frozen
   encoder's latents (sharper pictures for a latent space that no longer moves).
2. Latent scale: 1 / std of the latents, as LDM chose 0.18215 for SD ("scale_factor", LDM app. G).
3. Denoiser: eps-prediction loss || eps - eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t, c) ||^2
   (DDPM eq. 14) with t uniform, c the frozen text encoder's states of the caption; 10% empty captions
   give the unconditional model for classifier-free guidance.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dreambooth_min.scheduler import NUM_TRAIN_TIMESTEPS, add_noise
from dreambooth_min.text import encode_prompt, load_tokenizer
from dreambooth_min.unet import UNet2DConditionModel, UNetConfig
from dreambooth_min.vae import AutoencoderKL, VAEConfig


@dataclass
class ModelSizes:
    vae_channels: tuple = (16, 32, 64)  # 3 levels: 32x32 -> 8x8 latents, like SD's 512 -> 64
    unet_channels: tuple = (32, 64)
    unet_heads: tuple = (4, 4)
    text_width: int = 64
    text_layers: int = 2
    groups: int = 8  # GroupNorm groups: must divide every channel count


def build_unet(s):
    heads = tuple(s.unet_heads)
    cfg = UNetConfig(block_out_channels=tuple(s.unet_channels), layers_per_block=1,
                     attention_levels=(True,) + (False,) * (len(s.unet_channels) - 1), num_attention_heads=heads,
                     num_head_channels=tuple(c // h for c, h in zip(s.unet_channels, heads)),
                     cross_attention_dim=s.text_width, norm_num_groups=s.groups)
    return UNet2DConditionModel(cfg)


def build_vae(s):
    return AutoencoderKL(VAEConfig(block_out_channels=tuple(s.vae_channels), layers_per_block=1,
                                   norm_num_groups=s.groups))


def build_text_encoder(s, seed):
    """A random CLIP text encoder (SD 1.x layout), frozen: its states only need to tell prompts apart."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=s.text_width, intermediate_size=4 * s.text_width,
                         num_hidden_layers=s.text_layers, num_attention_heads=max(1, s.text_width // 16),
                         max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def cosine_lr(step, total, warmup=50):
    """Linear warmup, then half a cosine down to 5% of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _vae_loss(vae, x, generator, kl_weight):
    mean, logvar = vae.encode(x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    r = vae.decode(z)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean() / x[0].numel()
    return F.l1_loss(r, x) + F.mse_loss(r, x) + kl_weight * kl


def train_vae(vae, images, steps, decoder_steps, batch, seed, lr=2e-3, kl_weight=1e-3):
    """Autoencoder on `images` [N, 3, 32, 32] in [-1, 1]; then the decoder alone on the encoder's means."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    vae.train()
    for _ in tqdm(range(steps), desc="autoencoder", unit="step"):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        loss = _vae_loss(vae, x, g, kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr / 4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, decoder_steps, warmup=10))
    for _ in tqdm(range(decoder_steps), desc="decoder fine-tune", unit="step"):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        with torch.no_grad():
            mean, _ = vae.encode(x)
        r = vae.decode(mean)
        loss = F.l1_loss(r, x) + F.mse_loss(r, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def posterior(vae, images, batch=256):
    """(mean, std) of q(z | x) for every image, unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        m, lv = vae.encode(images[i:i + batch])
        means.append(m)
        stds.append(torch.exp(0.5 * lv))
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def caption_contexts(tokenizer, text_encoder, captions):
    """(contexts [P, 77, C] of the distinct captions, index [N] of each caption into them)."""
    prompts = sorted(set(captions))
    contexts = encode_prompt(tokenizer, text_encoder, prompts)
    where = {p: i for i, p in enumerate(prompts)}
    return contexts, torch.tensor([where[c] for c in captions])


def train_unet(unet, mean, std, contexts, index, steps, batch, seed, lr=1e-3):
    """Pretrain the denoiser on scaled latents z = (mean + std * n) with the eps loss (DDPM eq. 14)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    unet.train()
    bar = tqdm(range(steps), desc="denoiser", unit="step")
    for _ in bar:
        i = torch.randint(len(mean), (batch,), generator=g)
        z0 = mean[i] + std[i] * torch.randn(mean[i].shape, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        loss = F.mse_loss(unet(add_noise(z0, noise, t), t, contexts[index[i]]), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return unet.eval().requires_grad_(False)


def pretrain(world, textures, captions, sizes, steps, seed):
    """The whole toy model: (unet, vae, text_encoder, tokenizer). `steps` = (vae, decoder, unet, batch)."""
    from .world import to_tensor

    vae_steps, decoder_steps, unet_steps, batch = steps
    torch.manual_seed(seed)
    vae, unet = build_vae(sizes), build_unet(sizes)
    text_encoder, tokenizer = build_text_encoder(sizes, seed), load_tokenizer("sd1")
    x_world = to_tensor(world)
    train_vae(vae, torch.cat([x_world, to_tensor(textures)]), vae_steps, decoder_steps, batch, seed)
    mean, std = posterior(vae, x_world)
    scale = 1.0 / mean.std().item()
    vae.scaling_factor = vae.config.scaling_factor = scale  # saved in vae/config.json, read by load()
    contexts, index = caption_contexts(tokenizer, text_encoder, captions)
    train_unet(unet, mean * scale, std * scale, contexts, index, unet_steps, batch, seed + 1)
    return unet, vae, text_encoder, tokenizer
