"""RUN/report.html: one page that shows a run at a glance, made from the run folder's files alone.

The plan (plan.txt), the loss and learning rate per step (log.jsonl), the fidelity metrics per epoch with
the best epoch (metrics.jsonl), the validation images per epoch, newest first (samples/epoch_NNNN/, each
image's prompt read from its PNG "parameters" text), the final LoRA and the sample.py command that uses it,
and where the run stopped and resumed (events.jsonl). Training rewrites it at every validation and at the
end, evaluate.py after scoring. One self-contained file: styles inline, charts as inline SVG (plots.py),
images by relative path, no script, nothing from the network; every text from the user is escaped.
"""
import html
import json
import shlex
import time
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from ..formats.safetensors_io import atomic_path
from .evaluation import CLIP_T_MARGIN, METRICS, best_epoch, finite
from .finished_run import epoch_step
from .plots import NAMES, loss_chart, metric_chart
from .report import read_jsonl

STYLE = """body{font-family:sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
pre{background:#f6f6f6;padding:.8em;white-space:pre-wrap;overflow-wrap:anywhere}.status{font-size:1.1em}
table{border-collapse:collapse}td,th{padding:.25em .6em;text-align:left;vertical-align:middle}
table.metrics td,table.metrics th{border-bottom:1px solid #ddd;text-align:right}
tr.best{background:#fff4c2;font-weight:bold}.prompt{max-width:260px}
.epoch img{image-rendering:pixelated;border:1px solid #ccc;margin:1px}.plots svg{margin:0 .5em .5em 0}
.muted{color:#777}"""
EPOCH_DIR = "epoch_"


def write_report(run, margin=CLIP_T_MARGIN):
    """Write RUN/report.html (atomically) from what the run folder holds now; returns its path. `margin`:
    the best-epoch rule's (evaluate.py --margin)."""
    run = Path(run)
    path = run / "report.html"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(render(run, margin), encoding="utf-8")
    return path


def render(run, margin=CLIP_T_MARGIN):
    run = Path(run)
    config = _read_config(run)
    records, events = read_jsonl(run / "log.jsonl"), read_jsonl(run / "events.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    best = best_epoch(metrics, margin)
    body = [f"<h1>Run {html.escape(run.name)}</h1>", _status(run, records, events),
            _section("Plan", _plan(run)), _section("Loss", _loss(records, events)),
            _section("Metrics", _metrics(metrics, best, margin)) if metrics else "",
            _section("Validation images", _epochs(run, config, records, metrics, best)),
            _section("LoRA", _lora(run, config)), _section("Stops and resumptions", _history(events)) if events else "",
            _section("Files", _files(run))]
    written = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run.name)}: '
            f"dreambooth_min run</title>\n<style>{STYLE}</style></head>\n<body>\n" + "\n".join(b for b in body if b)
            + f'\n<p class="muted">written {written} by dreambooth_min</p>\n</body></html>\n')


def _section(title, content):
    return f"<h2>{html.escape(title)}</h2>\n{content}"


def _read_config(run):
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        return {"config": config.get("config") or {}, "resolved": config.get("resolved") or {}}
    except (OSError, ValueError, AttributeError):
        return {"config": {}, "resolved": {}}


def _status(run, records, events):
    """One line: finished, interrupted (and how to continue), or how far the run has come."""
    last = next((r for r in reversed(records) if isinstance(r.get("step"), int)), None)
    where = f"step {last['step']}, epoch {last.get('epoch', '?')}" if last else "no step yet"
    resume = ""
    if (run / "lora.safetensors").is_file():
        text = f"finished at {where}"
    elif events and events[-1].get("event") == "interrupted":
        text = f"interrupted at step {events[-1].get('step')}; continue with "
        resume = f"<code>{html.escape(str(events[-1].get('resume', '')))}</code>"
    else:
        text = f"in progress, or stopped without a word (a crash): {where}"
    return f'<p class="status">{html.escape(text)}{resume}</p>'


def _plan(run):
    plan = run / "plan.txt"
    if plan.is_file():
        return f"<pre>{html.escape(plan.read_text(encoding='utf-8', errors='replace'))}</pre>"
    return '<p class="muted">no plan.txt in this run folder; its settings are in config.json</p>'


def _loss(records, events):
    marks = [(e["step"], "resumed") for e in events if e.get("event") == "resumed" and isinstance(e.get("step"), int)]
    skipped = sum(1 for r in records if r.get("skipped"))
    note = f'<p class="muted">{skipped} step{"s" * (skipped != 1)} skipped (non-finite loss)</p>' if skipped else ""
    return (f'<div class="loss">{loss_chart(records, marks=marks).svg()}</div>\n{note}'
            '<p class="muted">the loss is the mean squared error of the UNet\'s prediction (noise or v) per optimizer '
            "step; the learning rate is the one each step used</p>")


def _metrics(metrics, best, margin):
    keys = [k for k in METRICS if any(finite(r.get(k)) for r in metrics)]
    head = "".join(f"<th>{NAMES[k]}</th>" for k in keys)
    rows = []
    for r in sorted(metrics, key=lambda r: r.get("epoch", 0)):
        mark = ' class="best"' if r is best else ""
        cells = "".join(f"<td>{r[k]:.4f}</td>" if finite(r.get(k)) else "<td>-</td>" for k in keys)
        epoch, step = html.escape(str(r.get("epoch"))), html.escape(str(r.get("step", "")))
        rows.append(f"<tr{mark}><td>{epoch}{' (best)' if r is best else ''}</td><td>{step}</td>{cells}</tr>")
    rule = (f"best epoch: {best['epoch']}, the highest DINO among the epochs whose CLIP-T is within {margin:g} of "
            "its maximum (evaluation.best_epoch; the dashed line in CLIP-T's plot is the lowest CLIP-T it allows)"
            if best else "no best epoch: no epoch has both DINO and CLIP-T")
    plots = "".join(metric_chart(metrics, k, best, margin).svg() for k in keys)
    return (f'<p>{html.escape(rule)}</p>\n<table class="metrics"><tr><th>epoch</th><th>step</th>{head}</tr>\n'
            + "\n".join(rows) + f'</table>\n<div class="plots">{plots}</div>')


def image_rows(folder, config):
    """{prompt: [(relative path, width, height)]} of one epoch's images, the prompt read from each PNG's
    "parameters" text (else the run's validation or class prompt, by the file name), in file order."""
    resolved = config["resolved"]
    rows = {}
    numbered = [(p.stem.rstrip("0123456789"), int(p.stem[len(p.stem.rstrip("0123456789")):]), p)
                for p in folder.glob("*.png") if p.stem[-1:].isdigit()]
    for prefix, _, p in sorted(numbered, key=lambda f: (f[0] != "", f[0], f[1])):
        try:
            with Image.open(p) as im:
                size, text = im.size, im.info.get("parameters") or ""
        except (OSError, SyntaxError):  # a damaged file is left out, not fatal
            continue
        prompt = text.split("\n")[0] if text else resolved.get("class_prompt" if prefix == "class_" else
                                                              "validation_prompt", prefix or "validation")
        rows.setdefault(prompt, []).append((f"samples/{folder.name}/{p.name}", *size))
    return rows


def _epochs(run, config, records, metrics, best):
    folders = sorted(((int(d.name[len(EPOCH_DIR):]), d) for d in (run / "samples").glob(f"{EPOCH_DIR}*")
                      if d.is_dir() and d.name[len(EPOCH_DIR):].isdigit()), reverse=True)  # newest first
    by_epoch = {r.get("epoch"): r for r in metrics}
    out = []
    for epoch, folder in folders:
        rows = image_rows(folder, config)
        if not rows:
            continue
        scores = by_epoch.get(epoch, {})
        said = ", ".join(f"{NAMES[k]} {scores[k]:.3f}" for k in ("dino", "clip_t") if finite(scores.get(k)))
        title = f"epoch {epoch}, step {epoch_step(records, epoch)}" + (": the base model" if epoch == 0 else "") + \
            (f": {said}" if said else "") + (" (best)" if best is not None and best.get("epoch") == epoch else "")
        cells = "\n".join(f'<tr><td class="prompt">{html.escape(prompt)}</td><td>' + "".join(
            f'<img src="{quote(src)}" width="{_shown(w)}" height="{_shown(h, w)}" alt="{html.escape(prompt)}">'
            for src, w, h in images) + "</td></tr>" for prompt, images in rows.items())
        out.append(f'<div class="epoch" id="epoch-{epoch}"><h3>{html.escape(title)}</h3>\n<table>{cells}</table></div>')
    if not out:
        return '<p class="muted">no validation images (--validate-every 0, or no validation epoch yet)</p>'
    return "\n".join(out)


def _shown(size, width=None):
    """Displayed pixels: at least 128 wide (tiny models draw 32 px images), at most 256, aspect kept."""
    scale = min(max(128 / (width or size), 1.0), 256 / (width or size))
    return round(size * scale)


def sample_command(run, config):
    """The sample.py command line that draws with the run's final LoRA (and its --pivotal embedding)."""
    resolved = config["resolved"]
    model, prompt, res = resolved.get("model") or config["config"].get("model"), resolved.get("prompt"), \
        resolved.get("resolution")
    parts = ["python", "sample.py", "--model", str(model), "--lora", str(run / "lora.safetensors")]
    if (run / "embedding.safetensors").is_file():
        parts += ["--embedding", str(run / "embedding.safetensors")]
    parts += ["--prompt", f"{prompt} on the beach"] + (["--height", str(res), "--width", str(res)] if res else [])
    return " ".join(shlex.quote(p) for p in parts)


def _lora(run, config):
    lora = run / "lora.safetensors"
    if not lora.is_file():
        return '<p class="muted">not written yet: lora.safetensors is written when the training ends</p>'
    extra = [f for f in ("lora_best.safetensors", "embedding.safetensors") if (run / f).is_file()]
    more = "".join(f'<li><a href="{f}">{f}</a>, {_mib(run / f)}</li>' for f in extra)
    return (f'<ul><li><a href="lora.safetensors">lora.safetensors</a>, {_mib(lora)}</li>{more}</ul>\n'
            f"<p>draw with it:</p><pre>{html.escape(sample_command(run, config))}</pre>")


def _mib(path):
    size = path.stat().st_size
    return f"{size / 2**20:.2f} MiB ({size:,} bytes)"


def _history(events):
    items = []
    for e in events:
        when = html.escape(str(e.get("time", "")))
        if e.get("event") == "interrupted":
            items.append(f"<li>{when}: interrupted at step {e.get('step')}; checkpoint "
                         f"{html.escape(str(e.get('checkpoint')))}</li>")
        elif e.get("event") == "resumed":
            stopped = f" (it had stopped after step {e['stopped_at']})" if e.get("stopped_at") is not None else ""
            items.append(f"<li>{when}: resumed at step {e.get('step')} from "
                         f"{html.escape(str(e.get('checkpoint') or 'the start'))}{stopped}</li>")
        elif e.get("event") == "finished":
            items.append(f"<li>{when}: finished at step {e.get('step')}</li>")
    return f"<ul>{''.join(items)}</ul>"


def _files(run):
    names = ["config.json", "plan.txt", "log.jsonl", "loss.png", "metrics.jsonl", "metrics.png", "samples/grid.png",
             "events.jsonl"]
    links = [f'<a href="{quote(n)}">{n}</a>' for n in names if (run / n).is_file()]
    checkpoints = sorted(d.name for d in (run / "checkpoints").glob("step_*") if d.is_dir())
    kept = f"; checkpoints: {', '.join(checkpoints)}" if checkpoints else ""
    return f"<p>{' · '.join(links)}{html.escape(kept)}</p>"
