"""The charts a run leaves, drawn with pillow alone (no matplotlib): loss.png (the training loss per
step) and metrics.png (the fidelity metrics over epochs above the training loss, on one epoch axis).
"""
import math

from PIL import Image, ImageDraw

from ..formats.png import save_png
from .evaluation import CLIP_T_MARGIN, METRICS, finite

COLOURS = {"dino": (30, 90, 200), "clip_i": (40, 160, 70), "clip_t": (210, 50, 40), "pres": (230, 140, 0),
           "div": (140, 60, 170), "dino_nn": (120, 120, 120)}


def _panel(draw, box, x_range, series, y_label, fmt="{:.3f}"):
    """Line plots of {name: ([x], [y], colour)} in box = (left, top, right, bottom); returns the x mapping."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    x0, x1 = x_range
    values = [v for xs, ys, _ in series.values() for v in ys]
    y0, y1 = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(y1 - y0, 1e-3) * 0.08
    y0, y1 = y0 - pad, y1 + pad
    fx = lambda x: left + (x - x0) / max(x1 - x0, 1e-9) * (right - left)
    fy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
    for name, (xs, ys, colour) in series.items():
        pts = [(fx(x), fy(y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts if len(pts) < 60 and not name.startswith("_") else ():  # "_name": a guide line
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    if values:
        draw.text((5, top), fmt.format(y1), fill="black")
        draw.text((5, bottom - 10), fmt.format(y0), fill="black")
    draw.text((5, (top + bottom) // 2 - 5), y_label, fill="black")
    return fx


def _dashed(draw, x, top, bottom):
    for y in range(int(top), int(bottom), 8):
        draw.line([(x, y), (x, min(y + 4, bottom))], fill="black")


def plot_metrics(records, log_records, path, best=None, margin=CLIP_T_MARGIN, size=(900, 820)):
    """Three panels on one epoch axis: the image metrics (DINO, CLIP-I, and PRES, DIV, DINO-NN when
    present), CLIP-T alone (its scale is ten times finer) with the best-epoch margin below its maximum,
    and the training loss per step (grey) with its moving average. The best epoch is marked."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    losses = [(r["epoch"], r["loss"]) for r in log_records if finite(r.get("epoch")) and finite(r.get("loss"))]
    xs = [r["epoch"] for r in records] + [e for e, _ in losses]
    x_range = (min(xs, default=0), max(xs, default=1))
    series = {k: ([r["epoch"] for r in records if finite(r.get(k))], [r[k] for r in records if finite(r.get(k))],
                  COLOURS[k]) for k in METRICS if any(finite(r.get(k)) for r in records)}
    left, right = 70, w - 20
    boxes = [(left, 40, right, 360), (left, 400, right, 560), (left, 600, right, h - 40)]
    image_series = {k: v for k, v in series.items() if k != "clip_t"}
    fx = _panel(draw, boxes[0], x_range, image_series, "cosine")
    x = left
    for k in image_series:
        name = k.replace("_", "-").upper()
        draw.text((x, 12), name, fill=COLOURS[k])
        x += 8 * len(name) + 24
    clip_t = {}
    if "clip_t" in series:  # the band the best-epoch rule allows, as two flat lines under the curve
        top_t = max(series["clip_t"][1])
        for name, y in (("_max", top_t), ("_margin", top_t - margin)):
            clip_t[name] = ([x_range[0], x_range[1]], [y, y], (240, 180, 180))
        clip_t["clip_t"] = series["clip_t"]
    _panel(draw, boxes[1], x_range, clip_t, "CLIP-T")
    draw.text((left, 380), f"CLIP-T (red) and the band within {margin} of its maximum", fill=COLOURS["clip_t"])
    if best is not None:
        bx = fx(best["epoch"])
        for box in boxes[:2]:
            _dashed(draw, bx, box[1], box[3])
        draw.text((min(bx + 4, right - 150), 44), f"best: epoch {best['epoch']}", fill="black")
    ema, smooth = None, []
    for _, v in losses:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        smooth.append(ema)
    loss_series = {"raw": ([e for e, _ in losses], [v for _, v in losses], (190, 190, 190)),
                   "ema": ([e for e, _ in losses], smooth, (30, 30, 30))}
    _panel(draw, boxes[2], x_range, loss_series if losses else {}, "loss", "{:.4f}")
    draw.text((left, h - 30), f"epoch {x_range[0]:g}", fill="black")
    draw.text((right - 90, h - 30), f"epoch {x_range[1]:g}", fill="black")
    draw.text((left, 580), "training loss (grey) and its moving average (black)"
              if losses else "no training loss logged", fill="black")
    save_png(img, path)


def plot_loss(records, path, size=(800, 400), smoothing=0.9):
    """Loss per step (grey) and its exponential moving average (blue), on a log-free linear axis."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    pts = [(r["step"], r["loss"]) for r in records if math.isfinite(r.get("loss", float("nan")))]
    left, right, top, bottom = 60, w - 20, 20, h - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if pts:
        steps, losses = zip(*pts)
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        l0, l1 = min(losses), max(losses)
        l1 = l1 if l1 > l0 else l0 + 1e-8
        xy = lambda s, v: (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - l0) / (l1 - l0) * (bottom - top))
        ema, smooth = losses[0], []
        for v in losses:
            ema = smoothing * ema + (1 - smoothing) * v
            smooth.append(ema)
        if len(pts) > 1:
            draw.line([xy(s, v) for s, v in pts], fill=(190, 190, 190), width=1)
            draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
        draw.text((5, top), f"{l1:.4f}", fill="black")
        draw.text((5, bottom - 10), f"{l0:.4f}", fill="black")
        draw.text((left, bottom + 8), f"step {s0}", fill="black")
        draw.text((right - 80, bottom + 8), f"step {s1}", fill="black")
    draw.text((left + 10, top + 5), "training loss (grey) and its moving average (blue)", fill="black")
    save_png(img, path)
