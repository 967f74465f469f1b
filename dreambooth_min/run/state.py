"""The training state: everything a resumed run needs to continue exactly as an uninterrupted one.

LoRA factors, optimizer moments, GradScaler, learning-rate schedule, the random generators (and the
--ema-decay average) are saved and restored as one thing, in
checkpoints/step_NNNNNN/{lora.safetensors, state.pt, manifest.json}.
The manifest (step, size and SHA-256 of each file) is written last, inside a temporary folder that is
renamed only when whole: a checkpoint whose files do not match their manifest was damaged afterwards
(a truncated file after a machine crash, a disk error), and --resume passes over it (`checkpoint_problem`).
"""
import hashlib
import io
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from ..formats.lora_file import load_lora, lora_state_dict, save_lora, wrapper_fields
from ..formats.lora_names import kohya_modules
from ..formats.safetensors_io import fsync_path, write_bytes_atomic, writing
from ..lora import lora_parameters
from . import distributed as dist
from .ema import EMA, averaged
from .optim import make_optimizer


def lr_multiplier(step, warmup, total, kind):
    """Multiplier of the base learning rate at `step`: linear warmup, then constant or half-cosine to zero."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class TrainingState:
    """LoRA wrappers, AdamW, GradScaler, the LR schedule and the generator of the run's random draws.

    SDXL: `text_loras_2` wraps the second text encoder (None for SD 1.x / 2.x), and `unet_paths` names the
    UNet's layers in the file (lora_names.kohya_unet_paths). `embeddings`: --pivotal's new token rows
    (pivotal.PivotalTokens), or None."""

    def __init__(self, cfg, unet_loras, text_loras, scaler, total_steps, text_loras_2=None, unet_paths=None,
                 embeddings=None):
        self.unet_loras, self.text_loras, self.scaler = unet_loras, text_loras, scaler
        self.text_loras_2, self.unet_paths = text_loras_2, unet_paths
        self.embeddings = embeddings
        groups = [{"params": lora_parameters(unet_loras), "lr": cfg.lr}]
        if text_loras or text_loras_2:
            groups.append({"params": lora_parameters(text_loras, text_loras_2 or {}),
                           "lr": cfg.text_encoder_lr or cfg.lr})
        if embeddings:
            groups.append({"params": embeddings.parameters(), "lr": cfg.embedding_lr or cfg.lr})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, cfg.optimizer, cfg.weight_decay, cfg.prodigy_d_coef)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, total_steps, cfg.lr_schedule))
        # Noise, timesteps, class-image choice, latent samples and flips; the epoch order has its own
        # generator per epoch (data.epoch_order) and the LoRA init uses torch's global one.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.nonfinite_in_a_row = 0  # steps skipped for a non-finite loss since the last good one
        # The generator at the end of the last finished step, and whether the factors are whole (not in
        # the middle of an update): what `rewind` needs to checkpoint after a failure inside a step.
        self.boundary, self.whole = self.generator.get_state(), True
        decay = getattr(cfg, "ema_decay", 0)  # a settings object from before --ema-decay has none
        self.ema = EMA(lora_parameters(unet_loras, text_loras or {}, text_loras_2 or {}), decay) if decay else None

    def averaged(self):
        """A context in which the LoRA holds its --ema-decay average (no change without one)."""
        return averaged(self.ema)

    def optimizer_step(self, max_grad_norm, running=None):
        """Unscale, clip, step AdamW, advance the LR. Non-finite numbers never reach the LoRA: the step is
        skipped for a non-finite loss, and for inf/NaN gradients (by the GradScaler in fp16, here otherwise).
        Returns (the loss parts `running` [loss, instance, prior] as floats, the gradient norm as a float): read
        together, the step's one host sync, which the log line needs anyway (fused AdamW's GradScaler needs none)."""
        self.whole = False  # until the update is done: a failure in between leaves nothing worth saving
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm).reshape(1).float()
        *losses, norm = (grad_norm if running is None else torch.cat([running.float(), grad_norm.to(running.device)])
                         ).tolist()
        if (not losses or math.isfinite(losses[0])) and (self.scaler.is_enabled() or math.isfinite(norm)):
            self.scaler.step(self.optimizer)
        with warnings.catch_warnings():  # a skipped step still advances the LR schedule, on purpose
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_schedule.step()
        if self.ema:
            self.ema.update()
        self.step += 1
        self.boundary, self.whole = self.generator.get_state(), True
        return losses, norm

    def rewind(self):
        """Back to the end of the last finished step after a failure inside one (out of memory): the
        partial step's random draws and gradients are undone. False when the failure came during the
        optimizer's update, which may have left the factors half-updated: that state is not saved."""
        if not self.whole:
            return False
        self.generator.set_state(self.boundary)
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def checkpoint_bytes(self):
        """About the size of one checkpoint: the LoRA factors, AdamW's two moments (and the average), in fp32."""
        return (4 if self.ema else 3) * sum(p.numel() * 4 for p in self.params) + (64 << 10)

    def lora_tensors(self):
        return lora_state_dict(self.unet_loras, self.text_loras, text_loras_2=self.text_loras_2,
                               unet_paths=self.unet_paths)

    def save(self, folder, metadata):
        """Write checkpoints/step_NNNNNN into the run folder `folder`: a temp folder, renamed when whole."""
        final = Path(folder) / "checkpoints" / f"step_{self.step:06d}"
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing(tmp):
                tmp.mkdir(parents=True)
            save_lora(tmp / "lora.safetensors", self.lora_tensors(), metadata)
            buffer = io.BytesIO()  # torch.save to a file hides a full disk in a RuntimeError; this write does not
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict(), "lr_scheduler": self.lr_schedule.state_dict(),
                        "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
                       | ({"embeddings": self.embeddings.vectors()} if self.embeddings else {})
                       | ({"ema": self.ema.state_dict()} if self.ema else {}), buffer)
            write_bytes_atomic(tmp / "state.pt", buffer.getvalue())
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
                     for name in CHECKPOINT_FILES}
            write_bytes_atomic(tmp / MANIFEST, json.dumps({"step": self.step, "files": files}, indent=1).encode())
            with writing(final):
                fsync_path(tmp)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
                fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def load(self, path):
        """Restore everything from a checkpoint folder written by save()."""
        tensors, _ = load_lora(path / "lora.safetensors")
        state = torch.load(path / "state.pt", weights_only=True)  # our own file; still never a full unpickle
        with torch.no_grad():
            for key, m in kohya_modules(self.unet_loras, self.text_loras, self.text_loras_2, self.unet_paths):
                _copy_factors(tensors, key, m, path)
        if self.embeddings:
            self.embeddings.load(state.get("embeddings", {}), path)
        if self.ema:
            self.ema.load_state_dict(state.get("ema") or EMA(self.ema.params, self.ema.decay).state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.lr_schedule.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.boundary, self.whole = self.generator.get_state(), True


CHECKPOINT_FILES, MANIFEST = ("lora.safetensors", "state.pt"), "manifest.json"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(folder):
    """Why the checkpoint folder cannot be used (a few words), or None when its files match its manifest."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        step, files = int(manifest["step"]), manifest["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is damaged"
    if folder.name != f"step_{step:06d}":
        return f"its {MANIFEST} is for step {step}"
    for name in CHECKPOINT_FILES:
        path, entry = folder / name, files.get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, its manifest says {entry.get('bytes')} (truncated?)"
        if sha256(path) != entry.get("sha256"):
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    try:  # a manifest can vouch for a bad file too (copied in by hand): its header and values are checked
        load_lora(folder / "lora.safetensors")
    except UserError as e:
        return str(e)
    return None


def _copy_factors(tensors, key, lora, path):
    for field, w in wrapper_fields(lora):
        saved = tensors.get(f"{key}.{field}")
        if saved is None or saved.shape != w.shape:
            raise UserError(f"checkpoint {path} does not fit this model and configuration ({key}.{field}): "
                            "was the base model replaced?")
        w.copy_(saved)


@dist.main_only
def save_checkpoint(cfg, setup, state):
    """checkpoints/step_NNNNNN (state.save), then older ones beyond --keep-checkpoints are removed."""
    folder = state.save(setup.run.path, setup.lora_metadata(cfg, state.step))
    setup.run.prune_checkpoints(cfg.keep_checkpoints)
    return folder
