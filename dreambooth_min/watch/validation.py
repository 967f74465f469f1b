"""Watching a run: validation images per epoch, the paper's fidelity metrics on them, trackers.

Beside the method, not in it: the loop calls `validate` at epoch ends and `report_step` after each
optimizer step; with no tracker and no --eval-every they only write the sample rows.
"""
import torch

from ..errors import DiskFull, is_out_of_memory
from ..formats.lora_file import save_lora
from ..formats.png import parameters_text
from ..sampling import ETA, GUIDANCE, generate
from .evaluation import best_epoch
from .evaluators import embed_real, evaluate_epoch, load_evaluators
from .plots import plot_metrics
from .preprocess import read_images
from .report import read_jsonl, write_jsonl_atomic
from .trackers import make_tracker

class Monitor:
    """The run's tracker (trackers.py) and, with --eval-every, the evaluator models and real-photo embeddings."""

    def __init__(self, cfg, setup, resume_step=None):
        self.tracker = make_tracker(cfg.report_to, setup.run.path, _plain(cfg), setup.run.path.name, resume_step)
        self.evaluators = self.real = None
        if cfg.eval_every:
            self.evaluators = load_evaluators(cfg.clip_model, cfg.dino_model, setup.hardware.device)
            self.real = embed_real(self.evaluators, read_images(cfg.images, "instance images"))

    def close(self):
        self.tracker.close()


def _plain(cfg):
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def report_step(setup, record):
    """A finished optimizer step's numbers to the tracker (log.jsonl is written by the loop)."""
    if setup.monitor is not None:
        scalars = {k: v for k, v in record.items() if k not in ("step", "epoch", "seconds")}
        setup.monitor.tracker.log(record["step"], scalars | {"epoch": record["epoch"]})


def draw(cfg, setup, prompt):
    """(images, their A1111 parameters text): `validation_images` images of `prompt` with the same seeds at
    every epoch, so rows are comparable."""
    res = setup.resolution
    with torch.no_grad():
        images = generate(setup.sd, prompt, num_images=cfg.validation_images, steps=cfg.validation_steps,
                          guidance=GUIDANCE, seed=cfg.seed, height=res, width=res, progress=f"drawing {prompt!r}")
    return images, parameters_text(prompt, "", cfg.validation_steps, GUIDANCE, cfg.seed, res, res, setup.sd.name, ETA)


def validate(cfg, setup, epoch, step=0):
    """One row of the epoch table (samples/epoch_NNNN.png + its images), then metrics when due.

    A failure while sampling (out of memory, anything else) is a warning: the training goes on. A full
    disk is not: the next checkpoint would fail too, so it stops the run with its one line."""
    from tqdm.auto import tqdm

    try:
        _validate(cfg, setup, epoch, step)
    except DiskFull:
        raise
    except Exception as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        what = "out of memory" if is_out_of_memory(e) else type(e).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        tqdm.write(f"warning: validation at epoch {epoch} failed ({what}: {first}); training goes on")


def _validate(cfg, setup, epoch, step):
    setup.sd.unet.eval()
    images, parameters = draw(cfg, setup, setup.validation_prompt)
    setup.run.save_samples(epoch, images, parameters)
    setup.run.save_validation_row(epoch, images, parameters)
    monitor = setup.monitor
    if monitor is None:
        return
    monitor.tracker.log_images(step, images, f"epoch {epoch}: {setup.validation_prompt}")
    if monitor.evaluators is not None and epoch % cfg.eval_every == 0:
        evaluate(cfg, setup, epoch, step, images)


def evaluate(cfg, setup, epoch, step, images):
    """DINO, CLIP-I, CLIP-T (and PRES on the class prompt's images) of this epoch's validation images;
    metrics.jsonl gets a line, and with --keep-best the LoRA of the best epoch so far is kept."""
    class_images = None
    if cfg.use_prior:
        class_images, parameters = draw(cfg, setup, setup.class_prompt)
        setup.run.save_samples(epoch, class_images, parameters, prefix="class_")
    record = {"epoch": epoch, "step": step} | evaluate_epoch(setup.monitor.evaluators, setup.monitor.real, images,
                                                           setup.validation_prompt, class_images)
    path = setup.run.path / "metrics.jsonl"
    records = [r for r in read_jsonl(path) if r["epoch"] < epoch] + [record]
    write_jsonl_atomic(path, records)
    best = best_epoch(records)
    plot_metrics(records, setup.run.records(), setup.run.path / "metrics.png", best)
    setup.monitor.tracker.log(step, {f"metrics/{k}": v for k, v in record.items() if k not in ("epoch", "step")})
    if cfg.keep_best and best is record and setup.lora_tensors is not None:
        save_lora(setup.run.path / "lora_best.safetensors", setup.lora_tensors(),
                  setup.lora_metadata(cfg, step) | {"ss_best_epoch": str(epoch)})
    return record
