"""Experiment trackers for `--report-to`: TensorBoard or Weights & Biases, or nothing.

The training loop calls one interface unconditionally; the "" tracker does nothing, so a run without
`--report-to` behaves (and depends on) exactly what it did before. Both backends are optional packages,
imported only when asked for; a missing one is a one-line UserError naming what to pip install.

    tracker = make_tracker("tensorboard", run_dir, config, run_name)
    tracker.log(step, {"loss": 0.12, "lr": 1e-4})
    tracker.log_images(epoch_step, pil_images, "a photo of sks dog in the snow")
    tracker.close()
"""
import json
import secrets
import string
from pathlib import Path

from ..errors import UserError
from .report import write_text_atomic

KINDS = ("", "tensorboard", "wandb")


def _plain(value):
    """A JSON value for any config entry (Paths, tuples, dataclasses' odd types become strings / lists)."""
    return json.loads(json.dumps(value, default=str))


def _scalars(scalars):
    """Drop entries that are not numbers (None: e.g. loss_prior without prior preservation)."""
    out = {}
    for k, v in scalars.items():
        if v is None or isinstance(v, (str, bytes)):
            continue
        out[k] = float(v.item() if hasattr(v, "item") else v)
    return out


class Tracker:
    """No tracker: every call is a no-op."""

    kind = ""

    def log(self, step, scalars):
        pass

    def log_images(self, step, images, caption, key="validation"):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorBoardTracker(Tracker):
    """Event files in run_dir/tensorboard/ (view: `tensorboard --logdir runs`).

    The config goes in as text (a JSON block) and as hparams (scalar-valued entries); images as one
    image per index under `key/i` plus the prompt as text, since TensorBoard images have no caption.
    """

    kind = "tensorboard"

    def __init__(self, run_dir, config, run_name, resume_step=None):
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; ask before torch says less)
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.log_dir = Path(run_dir) / "tensorboard"
        # purge_step: after a resume, events the interrupted run wrote past the checkpoint are hidden
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resume_step)
        config = _plain(config)
        text = "```\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```"
        self.writer.add_text("config", text, 0)
        self.writer.add_text("run_name", str(run_name), 0)
        flat = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        flat.update({k: json.dumps(v) for k, v in config.items() if isinstance(v, (list, dict))})
        for summary in hparams(flat, {"loss": 0.0}):  # links the HPARAMS tab to the `loss` curve
            self.writer.file_writer.add_summary(summary)

    def log(self, step, scalars):
        for k, v in _scalars(scalars).items():
            self.writer.add_scalar(k, v, step)

    def log_images(self, step, images, caption, key="validation"):
        import numpy as np

        for i, im in enumerate(images):
            self.writer.add_image(f"{key}/{i}", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.writer.add_text(f"{key}/prompt", caption, step)

    def close(self):
        self.writer.flush()
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in project "dreambooth_min", its files in run_dir/wandb/.

    Online by default (`wandb login` first); `WANDB_MODE=offline` writes the run locally, `wandb sync`
    uploads it later. Validation images are logged as images with the prompt as caption, and as a table
    (step, index, prompt, image) per validation.
    """

    kind = "wandb"

    def __init__(self, run_dir, config, run_name, resume_step=None):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb needs the wandb package: pip install wandb") from None
        self.wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = _wandb_run_id(run_dir)
        try:  # same id on --resume: the resumed run continues the same wandb run
            self.run = wandb.init(project="dreambooth_min", name=str(run_name), dir=str(run_dir), id=run_id,
                                  resume="allow", config=_plain(config))
        except Exception as e:  # auth, network, bad settings: one line, not wandb's traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"wandb could not start a run: {first}") from None

    def log(self, step, scalars):
        self.run.log(_scalars(scalars), step=step)

    def log_images(self, step, images, caption, key="validation"):
        wandb = self.wandb
        pictures = [wandb.Image(im, caption=caption) for im in images]
        table = wandb.Table(columns=["step", "index", "prompt", "image"],
                            data=[[step, i, caption, p] for i, p in enumerate(pictures)])
        self.run.log({key: pictures, f"{key}_table": table}, step=step)

    def close(self):
        self.run.finish()
        if self.wandb.run is None:  # no other run in this process: wait until wandb's service has written
            self.wandb.teardown()   # the run file (finish() returns before that), so a finished run is on disk


def _wandb_run_id(run_dir):
    """The wandb run id of this run folder: made once, kept in run_dir/wandb_run_id.txt."""
    path = run_dir / "wandb_run_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's form
    write_text_atomic(path, run_id + "\n")
    return run_id


def make_tracker(kind, run_dir, config, run_name, resume_step=None):
    """The tracker for `--report-to kind` ("" = none). `resume_step`: the step a resumed run continues from."""
    kind = (kind or "").strip().lower()
    if kind == "":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, config, run_name, resume_step)
    if kind == "wandb":
        return WandbTracker(run_dir, config, run_name, resume_step)
    raise UserError(f"--report-to must be tensorboard or wandb, got {kind!r}")
