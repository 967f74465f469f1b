"""A finished training run's folder, scored for evaluate.py: config.json, samples/epoch_NNNN/, log.jsonl
and checkpoints/ read; metrics.jsonl and metrics.png written.

A run folder is train.py's (run/run_folder.py makes it); it is only read here, so this module needs
nothing of run/: the names of its files are the contract.
"""
import json
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
from ..formats.images import to_rgb
from .evaluation import CLIP_T_MARGIN, METRICS, best_epoch, finite
from .evaluators import embed_real, evaluate_epoch
from .plots import plot_metrics
from .preprocess import read_images
from .report import read_jsonl, write_jsonl_atomic


def _numbered_pngs(folder, prefix=""):
    """folder/{prefix}0.png, {prefix}1.png, ... in numeric order."""
    found = [(int(p.stem[len(prefix):]), p) for p in folder.glob(f"{prefix}*.png")
             if p.stem[len(prefix):].isdigit()]
    return [p for _, p in sorted(found)]


def sample_epochs(run):
    """[(epoch, folder)] of RUN/samples/epoch_NNNN/ folders holding validation images, by epoch."""
    found = []
    for d in (Path(run) / "samples").glob("epoch_*"):
        if d.is_dir() and d.name[6:].isdigit() and _numbered_pngs(d):
            found.append((int(d.name[6:]), d))
    return sorted(found)


def epoch_step(log_records, epoch):
    """The optimizer step at which epoch `epoch` ended: the last logged step whose epoch is <= it (0 before any)."""
    steps = [r["step"] for r in log_records
             if finite(r.get("epoch")) and isinstance(r.get("step"), int) and r["epoch"] <= epoch + 1e-6]
    return max(steps, default=0)


def read_run(run, real=None):
    """(config.json dict, real images folder, validation prompt, class prompt) of a run folder."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist")
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        resolved, given = config["resolved"], config["config"]
        prompt = resolved.get("validation_prompt") or given["validation_prompt"].format(
            prompt=resolved["prompt"], class_noun=given.get("class_noun", ""))
    except FileNotFoundError:
        raise UserError(f"{run} has no config.json: is it a train.py run folder?") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise UserError(f"{run / 'config.json'} is not a train.py run config ({type(e).__name__}: {e})") from None
    real = Path(real) if real else Path(given.get("images") or "")
    if not str(real) or not real.is_dir():
        raise UserError(f"the run's photos {str(real)!r} (config.json 'images') are not there: pass --real DIR")
    return config, real, prompt, resolved.get("class_prompt")


def check_run(run, real=None):
    """(real photos as PIL images, validation prompt, class prompt, [(epoch, folder)]) of a run folder,
    or a UserError: called before the evaluators are loaded, so that bad input fails fast."""
    _, real_dir, prompt, class_prompt = read_run(run, real)
    epochs = sample_epochs(run)
    if not epochs:
        raise UserError(f"{Path(run) / 'samples'} has no epoch_NNNN/ folders of validation images "
                        f"(0.png, 1.png, ...): train with --validate-every N")
    return read_images(real_dir, "real images"), prompt, class_prompt, epochs


def evaluate_run(run, evaluators, real=None, margin=CLIP_T_MARGIN):
    """Score every validation epoch of a run; write RUN/metrics.jsonl and RUN/metrics.png.

    Returns (records, best record or None, (checkpoint path, step) or None).
    """
    run = Path(run)
    real_images, prompt, class_prompt, epochs = check_run(run, real)
    log_records = read_jsonl(run / "log.jsonl")
    real_emb = embed_real(evaluators, real_images)
    records = []
    for epoch, folder in tqdm(epochs, desc="epochs", unit="epoch", disable=not evaluators.progress):
        class_paths = _numbered_pngs(folder, "class_") if class_prompt else []
        scores = evaluate_epoch(evaluators, real_emb, _open_all(_numbered_pngs(folder)), prompt,
                                _open_all(class_paths) or None)
        records.append({"epoch": epoch, "step": epoch_step(log_records, epoch),
                        **{k: round(scores[k], 6) for k in METRICS if k in scores}})
    write_jsonl_atomic(run / "metrics.jsonl", records)
    best = best_epoch(records, margin)
    plot_metrics(records, log_records, run / "metrics.png", best, margin)
    return records, best, nearest_checkpoint(run, best["step"]) if best else None


def _open_all(paths):
    """The images at `paths` as RGB PIL images; one that cannot be read is a UserError naming it."""
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(to_rgb(im))
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e}") from None
    return images


def nearest_checkpoint(run, step):
    """(path, its step) of the saved LoRA nearest to `step`: checkpoints/step_N/ or the final lora.safetensors
    (at the last logged step); the earlier one wins a tie. None when the run has none."""
    run = Path(run)
    found = []
    for d in (run / "checkpoints").glob("step_*"):
        if d.is_dir() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    if (run / "lora.safetensors").is_file():
        steps = [r["step"] for r in read_jsonl(run / "log.jsonl") if isinstance(r.get("step"), int)]
        if steps:
            found.append((max(steps), run / "lora.safetensors"))
    if not found:
        return None
    s, path = min(found, key=lambda f: (abs(f[0] - step), f[0]))
    return path, s
