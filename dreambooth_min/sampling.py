"""Text-to-image sampling: classifier-free guidance around a UNet, the DDIM loop, VAE decoding.

Seeds are portable: image i of a call with seed s starts from
    x_T = torch.randn((1, C, H/8, W/8), generator=torch.Generator("cpu").manual_seed(s + i))  (float32)
which is what diffusers' StableDiffusionPipeline draws for generator=[torch.Generator().manual_seed(s + i), ...]
(DDIM's initial noise sigma is 1), so on the CPU in fp32 both tools make the same image.
"""
import warnings

import torch
from PIL import Image
from tqdm.auto import tqdm

from .conditioning import Cond
from .errors import NonFinite, UserError
from .scheduler import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, TIMESTEP_SPACINGS, ddim_step, ddim_timesteps

# The sampling defaults of every command and of the validation and class images: the CFG scale (7.5, as
# diffusers' and A1111's), the DDIM steps, DDIM's eta (0: the deterministic sampler) and the images per UNet
# batch (the images do not depend on it).
GUIDANCE = 7.5
STEPS = 50
ETA = 0.0
BATCH_SIZE = 4

# What a diffusers folder's scheduler/scheduler_config.json may say about DDIM, and the released SD
# configs' values used for single files and for keys a folder leaves out.
DDIM_DEFAULTS = dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
# Settings a config may hold that our fixed schedule does not follow: warn rather than silently differ.
SD_SCHEDULE = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                   beta_schedule="scaled_linear", trained_betas=None, thresholding=False, rescale_betas_zero_snr=False)


def ddim_options(scheduler_config):
    """The DDIM settings of a model: its folder's scheduler config over the released SD defaults."""
    opts = {k: scheduler_config.get(k, v) for k, v in DDIM_DEFAULTS.items()}
    if opts["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise UserError(f"scheduler config: timestep_spacing {opts['timestep_spacing']!r} is not one of "
                        + ", ".join(TIMESTEP_SPACINGS))
    odd = {k: scheduler_config[k] for k, v in SD_SCHEDULE.items() if scheduler_config.get(k, v) != v}
    if odd:
        warnings.warn(f"scheduler config {odd} ignored: sampling with SD's scaled_linear schedule {SD_SCHEDULE}")
    return opts


def guided_prediction(unet, x, t, cond, guidance):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = u + s (c - u).

    u and c are the unconditional and conditional outputs; s is diffusers' and A1111's "CFG scale", which
    is the paper's 1 + w. `cond` (a conditioning.Cond, or a bare text context) holds [uncond; cond] rows
    (2B), so both halves run in one UNet batch. With s <= 1 there is no unconditional half (as diffusers:
    s = 1 is the plain conditional model).
    """
    if guidance <= 1:
        return unet(x, t, cond)
    u, c = unet(torch.cat([x, x]), t, cond).chunk(2)
    return u + guidance * (c - u)


def _gaussian(generators, shape, like):
    """One float32 draw of `shape` [1, ...] per CPU generator, stacked and moved next to `like`."""
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(like.device)


def ddim_sampler(prediction_type="epsilon", eta=ETA, generators=None, set_alpha_to_one=False, clip_sample=False):
    """DDIM (eq. 12) as a sampler step (x_t, model output, t, t_prev) -> x_{t_prev}.

    With eta > 0 the step's noise z comes from `generators` (one per image, continuing after x_T, as diffusers).
    """
    def step(x, out, t, t_prev):
        z = _gaussian(generators, (1,) + x.shape[1:], x) if eta > 0 else None
        return ddim_step(x, out, t, t_prev, prediction_type, eta, z, set_alpha_to_one, clip_sample)
    return step


@torch.no_grad()
def sample(unet, x_T, cond, timesteps, sampler_step, guidance=GUIDANCE, progress=True):
    """Run any sampler from x_T [B, C, h, w] through `timesteps` (largest first) down to x_0, guiding the
    UNet with `cond` (2B or B rows: a Cond, or a text context [2B or B, 77, D]). The UNet runs in its own
    dtype (fp16 on CUDA); the sampler's arithmetic stays in float32. `progress`: a progress bar, or the
    name of a bar that disappears when done."""
    x = x_T.float()
    unet_dtype = next(unet.parameters()).dtype
    bar = tqdm(timesteps, desc=progress if isinstance(progress, str) else "sampling", disable=not progress,
               leave=not isinstance(progress, str))  # a named bar is a passing one (validation inside training)
    for t, t_prev in zip(bar, timesteps[1:] + [-1]):
        out = guided_prediction(unet, x.to(unet_dtype), t, cond, guidance).float()
        x = sampler_step(x, out, t, t_prev)
    return x


def ddim_sample(unet, x_T, cond, steps=STEPS, guidance=GUIDANCE, eta=ETA, prediction_type="epsilon",
                generators=None, progress=True, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                clip_sample=False):
    """DDIM with classifier-free guidance from x_T to x_0 (float32): `sample` with the DDIM step."""
    step = ddim_sampler(prediction_type, eta, generators, set_alpha_to_one, clip_sample)
    return sample(unet, x_T, cond, ddim_timesteps(steps, timestep_spacing, steps_offset), step, guidance, progress)


def vae_scale_factor(sd):
    """Pixels per latent: the VAE halves the resolution at every level but the last."""
    return 2 ** (len(sd.vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(sd, latents):
    """Latents -> uint8 images [B, H, W, 3]: undo the latent scaling, decode, then map [-1, 1] -> [0, 255].

    NaN would become black pixels without a word, so non-finite latents or VAE outputs raise NonFinite instead."""
    if not torch.isfinite(latents).all():
        raise NonFinite("the latents went NaN or infinite while sampling, so no image was made: a poisoned LoRA or "
                        "embedding, a LoRA trained with too high a learning rate, or fp16 overflow (try fp32 or bf16)")
    vae_dtype = next(sd.vae.parameters()).dtype
    x = sd.vae.decode((latents / sd.vae.scaling_factor).to(vae_dtype)).float()
    if not torch.isfinite(x).all():
        raise NonFinite(f"the VAE's output went NaN or infinite, so no image was made: the VAE overflowed in "
                        f"{str(vae_dtype).removeprefix('torch.')} (decode in fp32 or bf16)")
    x = (x / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def check_size(height, width, factor=8):
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % factor:
            raise UserError(f"{name} must be a positive multiple of {factor}, not {v}")


@torch.no_grad()
def generate(sd, prompt, negative_prompt="", num_images=1, steps=STEPS, guidance=GUIDANCE, seed=0, height=None,
             width=None, eta=ETA, progress=True, batch_size=BATCH_SIZE):
    """Images (PIL) for `prompt`, image i from seed `seed + i`. Sizes default to the model's training size.

    Images are made `batch_size` at a time; each has its own generator, so batching does not change them.
    """
    height = sd.default_resolution if height is None else height
    width = sd.default_resolution if width is None else width
    factor = vae_scale_factor(sd)
    check_size(height, width, factor)
    if num_images < 1 or eta < 0:
        raise UserError(f"need num_images >= 1 and eta >= 0, not {num_images} and {eta}")
    opts = ddim_options(sd.scheduler_config)
    try:
        ddim_timesteps(steps, opts["timestep_spacing"], opts["steps_offset"])
    except ValueError as e:
        raise UserError(str(e)) from None
    uncond, cond = sd.sampling_conds(prompt, negative_prompt, height, width)
    shape = (1, sd.unet.config.in_channels, height // factor, width // factor)
    images = []
    for first in range(0, num_images, batch_size):
        n = min(batch_size, num_images - first)
        generators = [torch.Generator("cpu").manual_seed(seed + first + i) for i in range(n)]
        x_T = _gaussian(generators, shape, cond.context)
        rows = Cond.cat([uncond.repeat(n), cond.repeat(n)]) if guidance > 1 else cond.repeat(n)
        x_0 = ddim_sample(sd.unet, x_T, rows, steps, guidance, eta, sd.prediction_type, generators, progress, **opts)
        images += [Image.fromarray(a.numpy()) for a in decode(sd, x_0)]
    return images
