"""The run folder: config.json, log.jsonl, loss.png, samples/, checkpoints/, and the final lora.safetensors.

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written file that a reader or `--resume` would take for whole.
"""
import json
import os
import shutil
import time
from pathlib import Path

from .errors import UserError
from .report import append_jsonl, labelled_row, plot_loss, read_jsonl, stack_rows, write_text_atomic
from .sampling import save_png


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.log_path, self.samples = self.path / "log.jsonl", self.path / "samples"
        self.lora_path, self.checkpoints = self.path / "lora.safetensors", self.path / "checkpoints"

    @classmethod
    def choose(cls, output, resume):
        """The run folder, checked before any slow work: free (or resumable) and writable."""
        run = cls(output or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if resume and run.lora_path.exists():
            raise UserError(f"the run in {run.path} is finished: its LoRA is {run.lora_path}")
        if resume and run.latest_checkpoint() is None:
            raise UserError(f"nothing to resume in {run.path}: it has no checkpoints/ (a run interrupted before "
                            "training started has nothing to resume: run the same command again)")
        if not resume and (run.latest_checkpoint() is not None or run.lora_path.exists()):
            raise UserError(f"{run.path} already holds a run: continue it with --resume {run.path}, "
                            "or choose another --output")
        existing = next(p for p in (run.path, *run.path.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to the output folder {run.path}: {existing} is not a writable folder")
        return run

    def create(self):
        try:
            self.samples.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to the output folder {self.path}: {e.strerror or e}") from None

    def remove_if_empty_start(self):
        """Remove a folder that holds nothing but config.json (a run stopped before its first step)."""
        if self.path.is_dir() and self.latest_checkpoint() is None and not self.log_path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def write_config(self, config, resolved):
        write_text_atomic(self.path / "config.json", json.dumps({"config": config, "resolved": resolved}, indent=2))

    def append_log(self, record):
        append_jsonl(self.log_path, record)

    def records(self):
        return read_jsonl(self.log_path)

    def drop_after(self, step, epoch):
        """What a crashed run wrote after its checkpoint is redone: drop it from the log and the samples."""
        kept = [r for r in self.records() if r["step"] <= step]
        write_text_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))
        for row in self.samples.glob("epoch_*.png"):
            if int(row.stem.split("_")[1]) > epoch:
                row.unlink()
                shutil.rmtree(self.samples / row.stem, ignore_errors=True)

    def save_samples(self, epoch, images, parameters, prefix=""):
        """samples/epoch_NNNN/<prefix>i.png: one file per image (evaluate.py reads these)."""
        for i, im in enumerate(images):
            save_png(im, self.samples / f"epoch_{epoch:04d}" / f"{prefix}{i}.png", parameters)

    def save_validation_row(self, epoch, images, parameters):
        """samples/epoch_NNNN.png (one labelled row) and samples/grid.png (every row so far, by epoch)."""
        save_png(labelled_row(images, f"epoch {epoch}"), self.samples / f"epoch_{epoch:04d}.png", parameters)
        stack_rows(sorted(self.samples.glob("epoch_*.png")), self.samples / "grid.png")

    def plot_loss(self):
        plot_loss(self.records(), self.path / "loss.png")

    def latest_checkpoint(self):
        found = sorted(self.checkpoints.glob("step_*"))
        return found[-1] if found else None

    def prune_checkpoints(self, keep):
        for old in sorted(self.checkpoints.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
