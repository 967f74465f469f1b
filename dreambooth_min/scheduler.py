"""Stable Diffusion's noise schedule, the two ways a UNet can parameterise its output, and DDIM.

Notation: a_t is DDPM's alpha-bar, the cumulative product of (1 - beta_s) for s <= t, so that
q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I). The UNet predicts either the noise eps ("epsilon", SD 1.x,
SD 2.x 512-base) or the velocity v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 ("v_prediction", SD 2.x 768-v).

References: DDPM, Ho et al. 2020 (arXiv 2006.11239); DDIM, Song et al. 2021 (arXiv 2010.02502);
v-prediction, Salimans & Ho 2022 (arXiv 2202.00512); timestep spacings, Lin et al. 2023 (arXiv 2305.08891).
"""
import functools

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # the LDM configs' linear_start / linear_end
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@functools.lru_cache(maxsize=None)
def alphas_cumprod():
    """a_t for t = 0..999, float64 on the CPU.

    LDM's "scaled_linear" betas are evenly spaced in sqrt(beta). The product runs over 1000 factors, so it
    is computed in float64 here rather than read from a checkpoint's buffers, which may be fp16.
    """
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _alpha(t, like):
    """a_t for a batch of timesteps t [B], shaped [B, 1, 1, 1] to broadcast against `like` [B, C, H, W]."""
    t = torch.as_tensor(t).cpu()  # index on the CPU: some devices (mps) have no float64
    a = alphas_cumprod()[t].to(device=like.device, dtype=like.dtype)
    return a.reshape(a.shape + (1,) * (like.dim() - a.dim()))


def add_noise(x0, noise, t):
    """Sample q(x_t | x_0): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps  (DDPM eq. 4)."""
    a = _alpha(t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0, noise, t):
    """The velocity v = sqrt(a_t) eps - sqrt(1 - a_t) x_0  (Salimans & Ho 2022, sec. 4)."""
    a = _alpha(t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr(t):
    """Signal-to-noise ratio of x_t: SNR(t) = a_t / (1 - a_t)  (Kingma et al. 2021, eq. 3), float32 like t's device."""
    a = alphas_cumprod()[torch.as_tensor(t).cpu()]
    return (a / (1 - a)).float().to(torch.as_tensor(t).device)


# What the UNet predicts. Each parameterisation says, in one place, what the training target is, how to
# read (x_0, eps) back from an output (for DDIM), and how its squared error relates to the error on x_0
# (for min-SNR weighting). All follow from x_t = sqrt(a) x_0 + sqrt(1 - a) eps and v's definition;
# `a` is a_t: a float, or a tensor that broadcasts.

def x0_from_eps(x_t, eps, a):
    """x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)  (DDIM eq. 12, "predicted x_0")."""
    return (x_t - (1 - a) ** 0.5 * eps) / a ** 0.5


def x0_from_v(x_t, v, a):
    """x_0 = sqrt(a) x_t - sqrt(1 - a) v  (Salimans & Ho 2022, sec. 4)."""
    return a ** 0.5 * x_t - (1 - a) ** 0.5 * v


def eps_from_v(x_t, v, a):
    """eps = sqrt(1 - a) x_t + sqrt(a) v."""
    return (1 - a) ** 0.5 * x_t + a ** 0.5 * v


class Epsilon:
    """The UNet predicts the noise eps (SD 1.x, SD 2.x 512-base)."""

    @staticmethod
    def target(x0, eps, t):
        return eps

    @staticmethod
    def x0_and_eps(x_t, out, a):
        return x0_from_eps(x_t, out, a), out

    @staticmethod
    def error_per_x0_error(snr):
        """||eps - eps_hat||^2 = SNR * ||x_0 - x0_hat||^2."""
        return snr


class Velocity:
    """The UNet predicts the velocity v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (SD 2.x 768-v)."""

    @staticmethod
    def target(x0, eps, t):
        return v_target(x0, eps, t)

    @staticmethod
    def x0_and_eps(x_t, out, a):
        return x0_from_v(x_t, out, a), eps_from_v(x_t, out, a)

    @staticmethod
    def error_per_x0_error(snr):
        """||v - v_hat||^2 = (SNR + 1) * ||x_0 - x0_hat||^2."""
        return snr + 1


PREDICTIONS = {"epsilon": Epsilon, "v_prediction": Velocity}
PREDICTION_TYPES = tuple(PREDICTIONS)  # the names a config, a file or a flag may give


def prediction(prediction_type):
    """The parameterisation named `prediction_type` ("epsilon" or "v_prediction")."""
    try:
        return PREDICTIONS[prediction_type]
    except KeyError:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}") from None


def predicted_x0_and_eps(x_t, model_output, a, prediction_type):
    """(x_0, eps) implied by the UNet's output at a_t, whatever it predicts."""
    return prediction(prediction_type).x0_and_eps(x_t, model_output, a)


def min_snr_weight(t, gamma, prediction_type):
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 8), for a loss on whatever the UNet predicts.

    On x_0 the weight is min(SNR, gamma); dividing by the factor between the prediction's squared error
    and x_0's (SNR for eps, SNR + 1 for v) gives the same weighting for the eps or v loss.
    """
    s = snr(t)
    return torch.minimum(s, torch.full_like(s, gamma)) / prediction(prediction_type).error_per_x0_error(s)


# ---------------------------------------------------------------------------------------------------
# DDIM

def ddim_timesteps(steps, spacing="leading", steps_offset=1):
    """The `steps` training timesteps DDIM visits, largest first (Lin et al. 2023, table 2).

    leading:  t_i = i * (1000 // steps) + steps_offset  -> 20 steps: 951, 901, ..., 1 (the released SD configs)
    trailing: t_i = round(1000 - i * 1000 / steps) - 1  -> 20 steps: 999, 949, ..., 49 (reaches t = 999)
    linspace: steps values evenly spaced over [0, 999], rounded.
    """
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in [1, {NUM_TRAIN_TIMESTEPS}], not {steps}")
    T = NUM_TRAIN_TIMESTEPS
    if spacing == "leading":
        ts = [i * (T // steps) + steps_offset for i in reversed(range(steps))]
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)]
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0).tolist()
    else:
        raise ValueError(f"timestep spacing must be one of {TIMESTEP_SPACINGS}, not {spacing!r}")
    if ts[0] >= T:  # leading spacing with 1000 steps and steps_offset 1
        raise ValueError(f"{steps} {spacing} steps with steps_offset {steps_offset} reach t = {ts[0]} > {T - 1}")
    return ts


def ddim_sigma(a_t, a_prev, eta):
    """sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)  (DDIM eq. 16).

    eta = 0 is the deterministic DDIM sampler; eta = 1 has DDPM's posterior variance."""
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5


def ddim_step(x_t, model_output, t, t_prev, prediction_type="epsilon", eta=0.0, noise=None,
              set_alpha_to_one=False, clip_sample=False):
    """One DDIM update x_t -> x_{t_prev}  (DDIM eq. 12):

        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z,   z ~ N(0, I)

    t_prev < 0 is the step past t = 0: a_prev is then 1 with `set_alpha_to_one`, else a_0 (the
    released SD configs say False, so the last step lands on a_0 = 0.99915, not on 1). `noise` is z,
    needed only when eta > 0. `clip_sample` clamps x0_hat to [-1, 1] as a diffusers scheduler config can ask.
    The arithmetic runs in x_t's dtype; coefficients are Python floats taken from the float64 schedule.
    """
    a_t = alphas_cumprod()[t].item()
    a_prev = alphas_cumprod()[t_prev].item() if t_prev >= 0 else (1.0 if set_alpha_to_one else alphas_cumprod()[0].item())
    x0, eps = predicted_x0_and_eps(x_t, model_output.to(x_t.dtype), a_t, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-1, 1)
    sigma = ddim_sigma(a_t, a_prev, eta)
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise.to(x_t.dtype)
    return x_prev
