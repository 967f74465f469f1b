"""The training state: everything a resumed run needs to continue exactly as an uninterrupted one.

LoRA factors, optimizer moments, GradScaler, learning-rate schedule and the random generators are saved
and restored as one thing, in checkpoints/step_NNNNNN/{lora.safetensors, state.pt}.
"""
import math
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .lora import lora_parameters
from .lora_file import kohya_name, load_lora, lora_state_dict, save_lora


def lr_multiplier(step, warmup, total, kind):
    """Multiplier of the base learning rate at `step`: linear warmup, then constant or half-cosine to zero."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class TrainingState:
    """LoRA wrappers, AdamW, GradScaler, the LR schedule and the generator of the run's random draws."""

    def __init__(self, cfg, unet_loras, text_loras, scaler, total_steps):
        self.unet_loras, self.text_loras, self.scaler = unet_loras, text_loras, scaler
        groups = [{"params": lora_parameters(unet_loras), "lr": cfg.lr}]
        if text_loras:
            groups.append({"params": lora_parameters(text_loras), "lr": cfg.text_encoder_lr or cfg.lr})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, total_steps, cfg.lr_schedule))
        # Noise, timesteps, class-image choice, latent samples and flips; the epoch order has its own
        # generator per epoch (data.epoch_order) and the LoRA init uses torch's global one.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0

    def optimizer_step(self, max_grad_norm):
        """Unscale, clip, step AdamW (skipped by the GradScaler on inf/NaN gradients), advance the LR."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.step += 1
        return grad_norm

    def lora_tensors(self):
        return lora_state_dict(self.unet_loras, self.text_loras)

    def save(self, folder, metadata):
        """Write checkpoints/step_NNNNNN into the run folder `folder`: a temp folder, renamed when whole."""
        final = Path(folder) / "checkpoints" / f"step_{self.step:06d}"
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_lora(tmp / "lora.safetensors", self.lora_tensors(), metadata)
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                    "lr_scheduler": self.lr_schedule.state_dict(), "generator": self.generator.get_state(),
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def load(self, path):
        """Restore everything from a checkpoint folder written by save()."""
        tensors, _ = load_lora(path / "lora.safetensors")
        state = torch.load(path / "state.pt", weights_only=True)  # our own file; still never a full unpickle
        with torch.no_grad():
            for part, loras in (("unet", self.unet_loras), ("te", self.text_loras)):
                for name, m in loras.items():
                    _copy_factors(tensors, kohya_name(name, part), m, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.lr_schedule.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]


def _copy_factors(tensors, key, lora, path):
    for field, w in (("lora_down", lora.lora_down.weight), ("lora_up", lora.lora_up.weight)):
        saved = tensors.get(f"{key}.{field}.weight")
        if saved is None or saved.shape != w.shape:
            raise UserError(f"checkpoint {path} does not fit this model and configuration ({key}.{field}): "
                            "was the base model replaced?")
        w.copy_(saved)
