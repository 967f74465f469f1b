"""The charts a run leaves: the training loss and learning rate per step (loss.png, and report.html), and the
fidelity metrics per epoch (metrics.png, and report.html's small plots).

A chart is laid out once, as a list of shapes in pixels (lines, rectangles, text), and then written either
as inline SVG (report.html) or as a PNG drawn with pillow: one layout, so the page and the PNGs say the same
thing, and no matplotlib. Every panel has its axes' ticks and names and a legend.
"""
import html
import math

from PIL import Image, ImageDraw, ImageFont

from ..formats.png import save_png
from .evaluation import CLIP_T_MARGIN, METRICS, finite

COLOURS = {"dino": "#1e5ac8", "clip_i": "#28a046", "clip_t": "#d23228", "pres": "#e68c00", "div": "#8c3caa",
           "dino_nn": "#787878"}
NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV", "dino_nn": "DINO-NN"}
GRID, FRAME, RAW, SMOOTH, LR = "#e4e4e4", "#404040", "#b4b4b4", "#1e5ac8", "#b45a00"
SVG_ANCHOR = {"l": "start", "m": "middle", "r": "end"}
SVG_BASELINE = {"t": "hanging", "m": "central", "s": "alphabetic"}


class Chart:
    """Shapes in pixel coordinates: ("line", points, colour, width, dashed), ("rect", box, outline, fill) and
    ("text", (x, y), text, colour, anchor); anchor is pillow's two letters: l/m/r, then t/m/s (top, middle,
    baseline)."""

    def __init__(self, size, title=""):
        self.size, self.title, self.shapes = size, title, []

    def line(self, points, colour, width=1, dashed=False):
        if len(points) > 1:
            self.shapes.append(("line", [(round(x, 1), round(y, 1)) for x, y in points], colour, width, dashed))

    def rect(self, box, outline=None, fill=None):
        self.shapes.append(("rect", tuple(round(v, 1) for v in box), outline, fill))

    def text(self, xy, text, colour="#000000", anchor="ls"):
        self.shapes.append(("text", (round(xy[0], 1), round(xy[1], 1)), str(text), colour, anchor))

    def svg(self):
        """The chart as an <svg> element to put inline in a page (text escaped)."""
        w, h = self.size
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
               f'role="img" aria-label="{html.escape(self.title)}" font-family="sans-serif" font-size="12">',
               f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>']
        for kind, *rest in self.shapes:
            if kind == "line":
                points, colour, width, dashed = rest
                dash = ' stroke-dasharray="4 4"' if dashed else ""
                out.append(f'<polyline points="{" ".join(f"{x},{y}" for x, y in points)}" fill="none" '
                           f'stroke="{colour}" stroke-width="{width}"{dash}/>')
            elif kind == "rect":
                (l, t, r, b), outline, fill = rest
                out.append(f'<rect x="{l}" y="{t}" width="{r - l}" height="{b - t}" fill="{fill or "none"}" '
                           f'stroke="{outline or "none"}"/>')
            else:
                (x, y), text, colour, anchor = rest
                out.append(f'<text x="{x}" y="{y}" fill="{colour}" text-anchor="{SVG_ANCHOR[anchor[0]]}" '
                           f'dominant-baseline="{SVG_BASELINE[anchor[1]]}">{html.escape(text)}</text>')
        return "\n".join(out + ["</svg>"])

    def save_png(self, path):
        img = Image.new("RGB", self.size, "white")
        draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=12)
        for kind, *rest in self.shapes:
            if kind == "line":
                points, colour, width, dashed = rest
                for segment in _dashes(points) if dashed else [points]:
                    draw.line(segment, fill=colour, width=width)
            elif kind == "rect":
                box, outline, fill = rest
                draw.rectangle(box, outline=outline, fill=fill)
            else:
                xy, text, colour, anchor = rest
                draw.text(xy, text, fill=colour, font=font, anchor=anchor)
        save_png(img, path)


def _dashes(points, on=4.0, off=4.0):
    """A polyline cut into dash segments (pillow draws no dashed lines)."""
    segments, pen, left = [], True, on
    current = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length, done = math.hypot(x1 - x0, y1 - y0), 0.0
        while length - done > left:
            done += left
            p = (x0 + (x1 - x0) * done / length, y0 + (y1 - y0) * done / length)
            if pen:
                segments.append(current + [p])
            current, pen = [p], not pen
            left = on if pen else off
        left -= length - done
        current.append((x1, y1))
    if pen and len(current) > 1:
        segments.append(current)
    return segments


def nice_ticks(lo, hi, n=5):
    """About `n` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        lo, hi = lo - (abs(lo) or 1) * 0.05, hi + (abs(hi) or 1) * 0.05
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    return [round(first + i * step, 12) for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def tick_label(v, ticks):
    """A tick's text with as many digits as the tick spacing needs (scientific notation below 0.01)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(v) or 1
    digits = -math.floor(math.log10(step) + 1e-9)  # decimals the spacing needs
    top = max(abs(t) for t in ticks) or 1
    if top < 1e-2 or top >= 1e6:  # learning rates
        return f"{v:.{max(0, digits + math.floor(math.log10(top) + 1e-9))}e}" if v else "0"
    return f"{v:.{max(0, digits)}f}"


def panel(chart, box, series, x_label, y_label, x_range=None, legend=True, marks=()):
    """Axes in `box` = (left, top, right, bottom) with ticks, grid lines, the axis names, the `series`
    [(label, xs, ys, colour, width, dashed)] and a legend; `marks` [(x, text)] are dashed vertical lines.
    Returns (fx, fy), the mappings from data to pixels."""
    left, top, right, bottom = box
    values = [y for s in series for y in s[2] if finite(y)]
    xs = [x for s in series for x in s[1]] + [x for x, _ in marks]
    x_ticks = nice_ticks(*(x_range or (min(xs, default=0), max(xs, default=1))), n=6)
    y_ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0), n=5)
    (x0, x1), (y0, y1) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])
    fx = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (right - left)
    fy = lambda y: bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top)
    for t in y_ticks:
        chart.line([(left, fy(t)), (right, fy(t))], GRID)
        chart.text((left - 6, fy(t)), tick_label(t, y_ticks), anchor="rm")
    for t in x_ticks:
        chart.line([(fx(t), top), (fx(t), bottom + 4)], GRID)
        chart.text((fx(t), bottom + 7), tick_label(t, x_ticks), anchor="mt")
    chart.rect(box, outline=FRAME)
    chart.text(((left + right) / 2, bottom + 24), x_label, anchor="mt")
    chart.text((left, top - 6), y_label, anchor="ls")
    for x, text in marks:
        chart.line([(fx(x), top), (fx(x), bottom)], "#000000", dashed=True)
        chart.text((fx(x) + 3, top + 3), text, anchor="lt")
    for label, sx, sy, colour, width, dashed in series:
        points = [(fx(x), fy(y)) for x, y in zip(sx, sy) if finite(y)]
        chart.line(points, colour, width, dashed)
        if len(points) == 1 or 1 < len(points) <= 30 and width > 1:  # few points: each one shows
            for px, py in points:
                chart.rect((px - 2, py - 2, px + 2, py + 2), fill=colour)
    x = right
    for label, _, _, colour, width, dashed in reversed([s for s in series if s[0]] if legend else []):
        x -= 34 + 6.5 * len(label)  # above the frame, right-aligned: it never hides a curve
        chart.line([(x, top - 10), (x + 22, top - 10)], colour, max(width, 2), dashed)
        chart.text((x + 26, top - 6), label, anchor="ls")
    return fx, fy


def moving_average(values, smoothing=0.9):
    out, ema = [], None
    for v in values:
        ema = v if ema is None else smoothing * ema + (1 - smoothing) * v
        out.append(ema)
    return out


def loss_chart(records, size=(800, 400), marks=()):
    """The training loss per optimizer step (each step, and its moving average), and beneath it on the same
    step axis the learning rate each step used; `marks` [(step, text)]: resumptions."""
    w, h = size
    chart = Chart(size, "training loss and learning rate per step")
    rows = [r for r in records if isinstance(r.get("step"), int) and finite(r.get("loss"))]
    every = max(1, len(rows) // 2000)  # a long run: every k-th step drawn (the average still sees them all)
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    x_range = (min(steps, default=0), max(max(steps, default=1), min(steps, default=0) + 1))
    split = int(h * 0.66)
    loss_series = [("loss per step", steps[::every], losses[::every], RAW, 1, False),
                   ("moving average (0.9)", steps[::every], moving_average(losses)[::every], SMOOTH, 2, False)]
    panel(chart, (70, 24, w - 20, split - 44), loss_series if rows else [], "optimizer step",
          "loss (MSE of the prediction)", x_range, marks=marks)
    lr_rows = [r for r in rows[::every] if finite(r.get("lr"))]
    prodigy = any(finite(r.get("prodigy_d")) for r in lr_rows)  # Prodigy's step is about d * lr
    name = "learning rate x Prodigy's d" if prodigy else "learning rate"
    panel(chart, (70, split + 6, w - 20, h - 44), [(name, [r["step"] for r in lr_rows],
                                                      [r["lr"] * r.get("prodigy_d", 1.0) for r in lr_rows], LR, 2,
                                                      False)], "optimizer step", name, x_range, legend=False)
    if not rows:
        chart.text((w / 2, split / 2), "no steps logged yet", anchor="mm")
    return chart


def plot_loss(records, path, size=(800, 400), marks=()):
    loss_chart(records, size, marks).save_png(path)


def metric_panel(chart, box, records, key, best=None, margin=CLIP_T_MARGIN, x_range=None, legend=False):
    """One metric over the epochs with the best epoch marked; CLIP-T also shows the band the best-epoch rule
    allows (within `margin` of its maximum)."""
    rows = [r for r in records if finite(r.get(key)) and finite(r.get("epoch"))]
    epochs, values = [r["epoch"] for r in rows], [r[key] for r in rows]
    series = [(NAMES[key], epochs, values, COLOURS[key], 2, False)]
    if key == "clip_t" and values:
        band = [x_range[0], x_range[1]] if x_range else [min(epochs), max(epochs)]
        series.append((f"max - {margin:g}", band, [max(values) - margin] * 2, COLOURS[key], 1, True))
    marks = [(best["epoch"], "best")] if best is not None else ()
    return panel(chart, box, series, "epoch", f"{NAMES[key]} (cosine)" if key != "div" else "DIV (1 - cosine)",
                 x_range, legend=legend, marks=marks)


def metric_chart(records, key, best=None, margin=CLIP_T_MARGIN, size=(300, 190)):
    chart = Chart(size, f"{NAMES[key]} per epoch")
    metric_panel(chart, (62, 22, size[0] - 12, size[1] - 42), records, key, best, margin)
    return chart


def plot_metrics(records, log_records, path, best=None, margin=CLIP_T_MARGIN, size=(900, 820)):
    """metrics.png: a panel per metric (two columns) on one epoch axis with the best epoch marked, and the
    training loss per epoch beneath them."""
    w, h = size
    chart = Chart(size, "fidelity metrics per epoch")
    losses = [r for r in log_records if finite(r.get("epoch")) and finite(r.get("loss"))]
    epochs = [r["epoch"] for r in records if finite(r.get("epoch"))] + [r["epoch"] for r in losses]
    x_range = (min(epochs, default=0), max(epochs, default=1))
    keys = [k for k in METRICS if any(finite(r.get(k)) for r in records)]
    rows = max(1, math.ceil(len(keys) / 2))
    cell_h = (h - 276) / rows
    for i, key in enumerate(keys):
        x, y = 70 + (i % 2) * (w - 70) / 2, 48 + (i // 2) * cell_h
        metric_panel(chart, (x, y, x + (w - 70) / 2 - 60, y + cell_h - 50), records, key, best, margin, x_range,
                     legend=key == "clip_t")
    title = f"best epoch: {best['epoch']} (highest DINO with CLIP-T within {margin:g} of its maximum)" \
        if best is not None else "no best epoch: no epoch has both DINO and CLIP-T"
    chart.text((70, 12), title, anchor="lm")
    loss = [r["loss"] for r in losses]
    panel(chart, (70, h - 210, w - 20, h - 44), [
        ("loss per step", [r["epoch"] for r in losses], loss, RAW, 1, False),
        ("moving average (0.9)", [r["epoch"] for r in losses], moving_average(loss), SMOOTH, 2, False)],
        "epoch", "training loss", x_range, marks=[(best["epoch"], "best")] if best is not None else ())
    chart.save_png(path)
