"""The optimizer for `--optimizer adamw|adamw8bit`.

adamw:     torch.optim.AdamW (Loshchilov & Hutter 2019, decoupled weight decay).
adamw8bit: bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):
           the same update, with Adam's two moment buffers stored block-wise quantized in 8 bits, so the
           optimizer state takes ~1/4 of fp32's. For a rank-4 LoRA the state is a few MB either way, so
           expect no gain in speed and little in peak memory; it matters for large ranks or full fine-tuning.
bitsandbytes is optional and imported only when asked for. Its 8-bit kernels are CUDA kernels on most
versions (tensors smaller than 4096 elements, most LoRA factors among them, are kept in 32 bits anyway).
"""
import torch

from .errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit")


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


def make_optimizer(param_groups, name="adamw", weight_decay=1e-2):
    """AdamW over `param_groups` (a list of tensors or of {"params": [...], "lr": ...} dicts).

    Raises UserError for an unknown name, a missing bitsandbytes, or adamw8bit on a device other than
    CUDA (bitsandbytes' 8-bit optimizer steps are CUDA kernels on most versions).
    """
    name = (name or "adamw").strip().lower()
    param_groups = list(param_groups)
    device = _device(param_groups)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        bnb = _bitsandbytes(device)
        if device.type != "cuda":
            raise UserError(f"--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit states), "
                            f"the LoRA is on {device.type}: use --optimizer adamw")
        return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
