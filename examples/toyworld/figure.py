"""The pictures the experiment writes: figure.png (prompts x models, one seed) and grids/ (every sample)."""
from .cases import PROMPTS


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _text_width(draw, text, font):
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def figure(all_samples, models, path, per_cell=16, zoom=2):
    """Rows: the three prompts; columns: `models` (cases.Case) that were sampled; each cell the first
    `per_cell` samples. A column is as wide as its cell or its header, whichever is wider (at --tiny sizes
    the cells are narrower than the headers), and the cell is centred under the header."""
    from PIL import Image, ImageDraw

    from dreambooth_min.formats.png import image_grid

    models = [m for m in models if m.name in all_samples]
    cells = {(m.name, p): image_grid(all_samples[m.name][p][:per_cell]) for m in models for p in PROMPTS}
    w, h = next(iter(cells.values())).size
    w, h, gap, top = w * zoom, h * zoom, 12, 28
    draw, font, prompt_font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(14), _font(12)
    widths = [max(w, _text_width(draw, m.short, font)) for m in models]
    left = max(_text_width(draw, f'"{p}"', prompt_font) for p in PROMPTS) + 12
    xs = [left + sum(widths[:j]) + j * gap for j in range(len(models))]
    canvas = Image.new("RGB", (xs[-1] + widths[-1] + gap, top + len(PROMPTS) * (h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for m, x, cw in zip(models, xs, widths):
        draw.text((x + (cw - _text_width(draw, m.short, font)) // 2, 6), m.short, fill=(0, 0, 0), font=font)
    for i, p in enumerate(PROMPTS):
        y = top + i * (h + gap)
        draw.text((6, y + h // 2 - 8), f'"{p}"', fill=(0, 0, 0), font=prompt_font)
        for m, x, cw in zip(models, xs, widths):
            canvas.paste(cells[(m.name, p)].resize((w, h), Image.Resampling.NEAREST), (x + (cw - w) // 2, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(256).save(path, optimize=True)  # a palette keeps the README figure small (< 300 KB)
    return path


def save_grids(all_samples, folder):
    """Every sample, one grid per model and prompt: grids/<model>/<prompt>.png."""
    from dreambooth_min.formats.png import image_grid

    for m, by_prompt in all_samples.items():
        (folder / m).mkdir(parents=True, exist_ok=True)
        for p, images in by_prompt.items():
            image_grid(images).save(folder / m / (p.replace(" ", "_") + ".png"))
