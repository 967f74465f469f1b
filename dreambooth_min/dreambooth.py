"""DreamBooth (Ruiz et al. 2023): the batch, the loss and one training step.

DreamBooth fine-tunes the denoiser on a few photos of one subject, captioned "a photo of sks dog", while a
prior-preservation term keeps it able to draw other dogs. With x the subject's latents, c their caption,
x_pr the frozen model's own class images ("a photo of dog", caption c_pr), and x_t = sqrt(a_t) x + sqrt(1 - a_t) eps:

    L = E_{x,c,eps,t}[ w_t ||x̂(x_t, c) - y||_m^2 ]  +  lambda * E_{x_pr,c_pr,eps',t'}[ w_t' ||x̂(x'_t', c_pr) - y'||^2 ]
        (eq. 1: the subject)                             (eq. 2 adds this: the class prior)

where the target y is the noise eps or the velocity v, whichever the model predicts (scheduler.Epsilon /
Velocity), and w_t = 1, or min-SNR-gamma (Hang et al. 2023). ||e||^2 is the mean of e^2 over the latent's
values; ||e||_m^2 = sum_p m_p e_p^2 / sum_p m_p (e_p^2: the mean over channels at latent pixel p) weights it by
the photo's mask m on the latent grid (m = 1 is the plain mean; class rows are never masked). LoRA only (lora.py).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .scheduler import NUM_TRAIN_TIMESTEPS, add_noise, min_snr_weight, prediction


@dataclass
class Batch:
    """x_0, eps and t of one step: the subject's rows first, then as many class rows."""
    latents: torch.Tensor  # x_0 [B, 4, h, w]
    noise: torch.Tensor  # eps [B, 4, h, w]
    timesteps: torch.Tensor  # t [B]
    prompts: list  # one caption per row
    n_instance: int  # how many leading rows are the subject's
    time_ids: torch.Tensor = None  # SDXL: [B, 6] per row, original size, crop top-left, target size; else None
    mask: torch.Tensor = None  # m [B, 1, h, w]: each row's loss weight per latent pixel (class rows 1); None: 1


def assemble_batch(instance_latents, captions, index, class_latents, class_prompt, generator, offset_noise=0.0):
    """The subject's images `index`, as many of the model's own class images drawn at random, and their
    noise eps ~ N(0, I) and timesteps t ~ U{0, ..., 999}.

    `instance_latents` / `class_latents` are data.LatentCache objects (a fresh latent sample per call);
    `class_latents` is None without prior preservation. Every draw comes from the CPU `generator`, so a
    run is the same on every device. Photos with masks give the batch its mask m.
    """
    (x, m), prompts = instance_latents.draw(index, generator), [captions[i] for i in index]
    sizes = [instance_latents.time_ids(index)]
    if class_latents is not None:
        class_index = torch.randint(len(class_latents), (len(index),), generator=generator)
        x = torch.cat([x, class_latents.sample(class_index, generator)])
        prompts = prompts + [class_prompt] * len(index)
        sizes.append(class_latents.time_ids(class_index))
        m = None if m is None else torch.cat([m, torch.ones_like(m)])  # the class rows are never masked
    eps = torch.randn(x.shape, generator=generator)
    if offset_noise:  # a per-channel constant too, so the model can learn overall brightness (Guttenberg 2023)
        eps = eps + offset_noise * torch.randn(x.shape[:2] + (1, 1), generator=generator)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x),), generator=generator)
    return Batch(x, eps, t, prompts, len(index), None if sizes[0] is None else torch.cat(sizes), m)


def dreambooth_loss(pred, target, n_instance, prior_weight, weights=None, mask=None):
    """DreamBooth eq. 2 on a batch [instance rows; class rows]: (loss, instance part, prior part).

    Each row's squared error is averaged over its pixels -- with a `mask` m [B, 1, h, w] the weighted mean
    sum_p m_p e_p^2 / sum_p m_p, which is the plain mean bit for bit where m = 1 -- and optionally weighted
    (min-SNR); the two parts are means over their rows, the prior part multiplied by lambda = `prior_weight`.
    """
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is None:
        per_row = error.mean(dim=(1, 2, 3))
    else:  # mean(m e^2) over channels and pixels / mean(m) over pixels; a row black in its crop counts 0, not NaN
        per_row = (error * mask).mean(dim=(1, 2, 3)) / mask.mean(dim=(1, 2, 3)).clamp_min(1e-12)
    if weights is not None:
        per_row = per_row * weights
    instance = per_row[:n_instance].mean()
    prior = per_row[n_instance:].mean() if len(per_row) > n_instance else torch.zeros_like(instance)
    return instance + prior_weight * prior, instance, prior


def dreambooth_step(unet, batch, cond, prediction_type, prior_weight=1.0, snr_gamma=0.0):
    """One evaluation of the DreamBooth loss (eq. 1 + lambda * eq. 2's prior term): (loss, instance, prior).

    `cond` is c per row, a conditioning.Cond: the text encoding [B, 77, D] of batch.prompts (SDXL: also the
    pooled text and batch.time_ids). The UNet runs in its own dtype and device.
    """
    weight = unet.conv_in.weight
    x0, eps = (v.to(weight.device) for v in (batch.latents, batch.noise))  # [B, 4, h, w]
    t = batch.timesteps  # [B] on the CPU: a_t is looked up there, with no device-to-host copy (a sync on a GPU)
    x_t = add_noise(x0, eps, t)                                  # q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I), DDPM eq. 4
    target = prediction(prediction_type).target(x0, eps, t)      # y = eps, or v
    pred = unet(x_t.to(weight.dtype), t.to(weight.device), cond)  # x̂(x_t, c)
    w = min_snr_weight(t, snr_gamma, prediction_type).to(weight.device) if snr_gamma > 0 else None
    m = None if batch.mask is None else batch.mask.to(weight.device)  # the photos' masks, on the latent grid
    return dreambooth_loss(pred, target, batch.n_instance, prior_weight, w, m)
