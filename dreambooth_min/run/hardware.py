"""Where and in what precision a run computes, and sample.py and evaluate.py too (`resolve_hardware`).

CUDA default: the frozen base in fp16, LoRA factors in fp32, autocast, and a GradScaler that scales the
loss so fp16 gradients do not underflow (Micikevicius et al. 2018). The CPU runs fp32 by default; fp16 and
bf16 run there too, through the same code path as on CUDA (slow: for testing the GPU path without a GPU).
"""
import contextlib
from dataclasses import dataclass

import torch

from ..errors import SettingError
from ..formats.checkpoint_sdxl import vae_dtype

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Hardware:
    device: str  # "cuda", "cuda:1", "cpu"
    precision: str  # "fp16" | "bf16" | "fp32"

    @property
    def device_type(self):
        return torch.device(self.device).type

    @property
    def dtype(self):
        """The frozen base weights' dtype."""
        return DTYPES[self.precision]

    def autocast(self):
        """Mixed precision for the forward pass; nothing in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def vae_dtype(self, version, vae_precision=""):
        """The VAE's dtype: `vae_precision` when given, else the base's, except fp32 for SDXL over an fp16 base:
        SDXL's VAE overflows fp16 (NaN latents, black images) where SD 1.x / 2.x's does not."""
        if vae_precision:
            return DTYPES[vae_precision]
        return vae_dtype(self.dtype) if version == "sdxl" else self.dtype

    def grad_scaler(self):
        """Loss scaling, needed for fp16 only (bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.precision == "fp16")


def compile_unet(unet, backend="inductor"):
    """torch.compile the UNet in place (its forward, and its backward through AOTAutograd); parameter names and
    file keys stay. On CUDA with CUDA graphs ("reduce-overhead": a training step's shapes are static, one
    resolution and batch), which removes the per-kernel launch cost that bounds the eager step; elsewhere
    inductor's default mode (C++ kernels on the CPU: needs a C compiler). The first call compiles (minutes at
    full size), and a new shape (validation's batch) compiles once more."""
    cuda = next(unet.parameters()).device.type == "cuda"
    unet.compile(backend=backend, mode="reduce-overhead" if cuda and backend == "inductor" else None, dynamic=False)
    return unet


def precision_name(dtype):
    """torch.float16 -> 'fp16' (the names of DTYPES)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def resolve_hardware(device="", precision=""):
    """The device (cuda when available) and precision (fp16 on CUDA, fp32 on the CPU) a run, or a command's
    sampling, uses. A bad or unavailable --device is a SettingError: bad input, exit status 2."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("device", f"{device} asked for, but this machine has no CUDA GPU (use --device cpu)")
    try:
        torch.device(device)
    except RuntimeError:
        raise SettingError("device", f"must be cuda, cuda:N or cpu, not {device!r}") from None
    precision = precision or ("fp16" if device.startswith("cuda") else "fp32")
    return Hardware(device, precision)
