"""The run folder: config.json, plan.txt, log.jsonl, loss.png, samples/, checkpoints/, the final lora.safetensors,
events.jsonl (where the run stopped and resumed) and report.html (all of it on one page, watch/page.py).

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written file that a reader or `--resume` would take for whole; log.jsonl is appended one whole line
at a time, and a torn last line (a machine crash) is skipped by its readers and dropped on --resume.
"""
import json
import os
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import DiskFull, UserError
from ..formats.png import save_png
from ..watch.page import write_report
from ..watch.plots import plot_loss
from ..watch.report import append_jsonl, labelled_row, read_jsonl, stack_rows, write_text_atomic
from . import distributed as dist
from .state import checkpoint_problem


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.log_path, self.samples = self.path / "log.jsonl", self.path / "samples"
        self.lora_path, self.checkpoints = self.path / "lora.safetensors", self.path / "checkpoints"
        self.events_path = self.path / "events.jsonl"

    @classmethod
    def choose(cls, output, resume):
        """The run folder, checked before any slow work: free (or resumable) and writable."""
        run = cls(output or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if resume and run.lora_path.exists():
            raise UserError(f"the run in {run.path} is finished: its LoRA is {run.lora_path}")
        if resume and run.latest_checkpoint() is None and not run.log_path.exists():
            raise UserError(f"nothing to resume in {run.path}: it has no checkpoints/ (a run interrupted before "
                            "training started has nothing to resume: run the same command again)")
        if not resume and (run.latest_checkpoint() is not None or run.lora_path.exists()):
            raise UserError(f"{run.path} already holds a run: continue it with --resume {run.path}, "
                            "or choose another --output")
        existing = next(p for p in (run.path, *run.path.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to the output folder {run.path}: {existing} is not a writable folder")
        if not resume and run.log_path.exists():  # a run that died before its first checkpoint: it starts over
            run.drop_after(0, -1)
            for stale in (run.log_path, run.path / "loss.png", run.events_path, run.path / "report.html"):
                stale.unlink(missing_ok=True)
        return run

    @staticmethod
    def config_file(folder):
        """RUN/config.json of a run to resume, or one line saying why `folder` is not a run folder."""
        config = Path(folder) / "config.json"
        if not Path(folder).is_dir():
            raise UserError(f"--resume {folder}: no such run folder (runs are in runs/<timestamp>/ or --output)")
        if not config.is_file():
            raise UserError(f"--resume {folder}: not a run folder (it has no config.json); give the folder that "
                            "train.py made, e.g. runs/20261125-101500")
        return config

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

    def write_plan(self, plan):
        write_text_atomic(self.path / "plan.txt", plan + "\n")

    def append_log(self, record):
        append_jsonl(self.log_path, record)

    def records(self):
        return read_jsonl(self.log_path)

    def drop_after(self, step, epoch):
        """What a crashed run wrote after its checkpoint is redone: drop it from the log and the samples."""
        self.remove_temporary_files()
        kept = [r for r in self.records() if r.get("step", step + 1) <= step]
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
        plot_loss(self.records(), self.path / "loss.png", marks=self.resumptions())

    def resumptions(self):
        """[(step, "resumed")] of each --resume, to mark on the loss curve."""
        return [(e["step"], "resumed") for e in read_jsonl(self.events_path) if e.get("event") == "resumed"
                and isinstance(e.get("step"), int)]

    def note(self, event, **facts):
        """A line in events.jsonl: the run was interrupted, resumed or finished (report.html shows them)."""
        now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        append_jsonl(self.events_path, {"event": event, "time": now} | facts)

    def write_report(self, result=None, command="python train.py"):
        """report.html. At the end of a session `result` (training.train's) goes to events.jsonl first:
        finished, or interrupted with its checkpoint and the command that continues it. A page that cannot
        be written, even for a full disk, is a warning: the LoRA and checkpoints matter, and a full disk
        stops the run at its next write of those."""
        try:
            if result is not None and result["interrupted"]:
                checkpoint = f"checkpoints/{Path(result['lora']).parent.name}" if result["lora"] else "none"
                self.note("interrupted", step=result["step"], checkpoint=checkpoint,
                          resume=f"{command} --resume {self.path}")
            elif result is not None:
                self.note("finished", step=result["step"])
            write_report(self.path)
        except Exception as e:
            tqdm.write(f"warning: {self.path / 'report.html'} not written ({type(e).__name__}: {e})")

    def latest_checkpoint(self):
        found = sorted(self.checkpoints.glob("step_*"))
        return found[-1] if found else None

    def whole_checkpoint(self):
        """(the newest checkpoint whose files match its manifest or None, [(older-than-it damaged, why)])."""
        skipped = []
        for folder in sorted(self.checkpoints.glob("step_*"), reverse=True):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder, skipped
            skipped.append((folder, problem))
        return None, skipped

    def resume(self, state, log):
        """Load the newest whole checkpoint into `state` and return it; one warning line names the damaged
        ones passed over. With none whole (or none yet: killed before the first), the run starts again from
        step 0, which gives the same result (same seed)."""
        found, skipped = self.whole_checkpoint()
        if skipped:
            names = "; ".join(f"{p.name}: {why}" for p, why in skipped)
            log(f"warning: skipped damaged checkpoint{'s' * (len(skipped) > 1)} ({names}; removed: the run "
                "redoes those steps); " + (f"using {found.name}" if found else
                                          "no whole checkpoint left: starting again from step 0"))
            for folder, _ in skipped:  # newer than the one used: they would count as kept, and mislead
                shutil.rmtree(folder, ignore_errors=True)
        if found is not None:
            state.load(found)
        if dist.is_main():
            stopped = max((r["step"] for r in self.records() if isinstance(r.get("step"), int)), default=None)
            self.note("resumed", step=state.step, checkpoint=found and f"checkpoints/{found.name}",
                      stopped_at=stopped)
        return found

    def remove_temporary_files(self):
        """What a killed process left of its atomic writes (.<name>.*.tmp files, .step_N.tmp folders)."""
        for folder in (self.path, self.samples, self.checkpoints, *self.samples.glob("epoch_*")):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)

    def disk_full(self, error, checkpoint_bytes, keep):
        """The DiskFull `error` with how much space the run needs and how to go on (one line)."""
        if getattr(error, "explained", False):
            return error
        found, _ = self.whole_checkpoint()
        if found is not None:  # the real size beats the estimate
            checkpoint_bytes = sum(f.stat().st_size for f in found.iterdir())
        mib, keep = checkpoint_bytes / 2**20, max(keep, 1)
        then = (f"python train.py --resume {self.path} continues from {found.name}" if found is not None else
                f"python train.py --resume {self.path} starts it again" if self.log_path.exists() else
                "run the same command again")
        full = DiskFull(f"{error}; this run needs about {(keep + 1) * mib:.1f} MiB for checkpoints (one is "
                        f"{mib:.1f} MiB; {keep} kept, +1 while the next is written) plus its samples; free some "
                        f"space, then: {then}", error.path)
        full.explained = True
        return full

    def prune_checkpoints(self, keep):
        for old in sorted(self.checkpoints.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
