"""dreambooth_min: DreamBooth + LoRA fine-tuning for Stable Diffusion 1.x, 2.x and XL, from scratch.

`load` is imported lazily so that `import dreambooth_min.scheduler` stays light (no transformers).
"""
from .errors import UserError

__all__ = ["load", "find_default_model", "StableDiffusion", "UserError"]


def __getattr__(name):
    if name in ("load", "find_default_model"):
        from .formats import checkpoint
        return getattr(checkpoint, name)
    if name == "StableDiffusion":
        from .model import StableDiffusion
        return StableDiffusion
    raise AttributeError(f"module 'dreambooth_min' has no attribute {name!r}")
