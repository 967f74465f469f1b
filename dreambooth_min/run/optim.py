"""The optimizer for `--optimizer adamw|adamw8bit|prodigy`.

adamw:     torch.optim.AdamW (Loshchilov & Hutter 2019, decoupled weight decay); its fused kernel on CUDA.
adamw8bit: bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):
           the same update, with Adam's two moment buffers stored block-wise quantized in 8 bits, so the
           optimizer state takes ~1/4 of fp32's. For a rank-4 LoRA the state is a few MB either way, so
           expect no gain in speed and little in peak memory; it matters for large ranks or full fine-tuning.
prodigy:   prodigyopt's Prodigy (Mishchenko & Defazio 2024, "Prodigy: An Expeditiously Adaptive Parameter-Free
           Learner", its Adam version): Adam whose step size d is estimated while training, from d0 = 1e-6
           up towards the distance to the solution (D-Adaptation). Each coordinate moves by about d * lr:
               m = b1 m + (1 - b1) d g,   v = b2 v + (1 - b2) d^2 g^2,   p -= d * lr * bc * m / (sqrt(v) + d eps)
           (bc: Adam's bias correction). So `lr` is not a step size but a multiplier of the estimated one:
           1.0 = as estimated; the warmup / cosine schedule multiplies it as it multiplies AdamW's lr.
           `d_coef` scales the estimate itself (0.5-2 is the usual range; prodigyopt calls it the preferred knob).
           Weight decay is AdamW's decoupled kind, p -= wd * d * lr * p. The other settings are those of
           diffusers' advanced DreamBooth script (PRODIGY_SETTINGS). One estimate d serves all parameter groups,
           which must share one lr: so --text-encoder-lr and --embedding-lr must equal --lr (config.check).
bitsandbytes and prodigyopt are optional and imported only when asked for. bitsandbytes' 8-bit kernels are CUDA
kernels on most versions (tensors smaller than 4096 elements, most LoRA factors among them, are kept in 32 bits anyway).
"""
import contextlib
import io

import torch

from ..errors import UserError
from ..memory import cpu_path

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
DEFAULT_LR = {"adamw": 1e-4, "adamw8bit": 1e-4, "prodigy": 1.0}  # --lr 0 means these
# As diffusers' advanced DreamBooth script passes them (its defaults for --optimizer prodigy): Adam's betas and eps,
# beta3 = sqrt(beta2), AdamW-style decay, Adam's bias correction, and safeguard_warmup, which leaves lr out of the
# denominator of the d estimate ("to avoid issues during warm-up stage", prodigyopt's docstring).
PRODIGY_SETTINGS = dict(betas=(0.9, 0.999), beta3=None, eps=1e-8, decouple=True, use_bias_correction=True,
                        safeguard_warmup=True)


def _bitsandbytes(device):
    try:
        import bitsandbytes as bnb
    except ImportError:
        hint = " (and a CUDA GPU: its 8-bit states need CUDA on most versions)" if device.type != "cuda" else ""
        raise UserError(f"--optimizer adamw8bit needs the bitsandbytes package{hint}: pip install bitsandbytes") from None
    except Exception as e:  # a build without kernels for this machine fails at import with its own error
        raise UserError(f"--optimizer adamw8bit: bitsandbytes does not load here ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from None
    return bnb


def _device(param_groups):
    for g in param_groups:
        for p in (g["params"] if isinstance(g, dict) else [g]):
            return p.device
    raise UserError("the optimizer got no parameters to train")


def make_optimizer(param_groups, name="adamw", weight_decay=1e-2, d_coef=1.0, fused=None):
    """AdamW (or Prodigy) over `param_groups` (a list of tensors or of {"params": [...], "lr": ...} dicts).

    Raises UserError for an unknown name, a missing bitsandbytes or prodigyopt, or adamw8bit on a device other
    than CUDA (bitsandbytes' 8-bit optimizer steps are CUDA kernels on most versions).
    """
    name = (name or "adamw").strip().lower()
    param_groups = list(param_groups)
    device = _device(param_groups)
    if name == "adamw":
        # fused on CUDA: one kernel for all factors, and GradScaler's inf check stays on the GPU (no host sync)
        fused = not cpu_path(device) if fused is None else fused
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        bnb = _bitsandbytes(device)
        if device.type != "cuda":
            raise UserError(f"--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit states), "
                            f"the LoRA is on {device.type}: use --optimizer adamw")
        return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay)
    if name == "prodigy":
        return _prodigy(param_groups, weight_decay, d_coef)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def _prodigy(param_groups, weight_decay, d_coef):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
    lrs = {g["lr"] for g in param_groups if isinstance(g, dict) and "lr" in g}
    if len(lrs) > 1:
        raise UserError(f"Prodigy takes one learning rate for all parameters (it estimates the step size itself), "
                        f"got {sorted(lrs)}")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on every start
        return Prodigy(param_groups, lr=lrs.pop() if lrs else 1.0, weight_decay=weight_decay, d_coef=d_coef,
                       **PRODIGY_SETTINGS)


def describe(name, lr, weight_decay, d_coef):
    """The plan's line about the optimizer: what it is and what its lr means."""
    if name == "prodigy":
        return (f"prodigy (step size estimated while training; lr {lr:g} multiplies it), d_coef {d_coef:g}, "
                f"weight decay {weight_decay:g}")
    return f"{name}, lr {lr:g}, weight decay {weight_decay:g}"
