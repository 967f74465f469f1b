"""Image files out: PNGs that say how they were made (AUTOMATIC1111's "parameters" text), written atomically.
"""
import math
from pathlib import Path

from PIL import Image, PngImagePlugin

from .safetensors_io import atomic_path


def parameters_text(prompt, negative_prompt, steps, guidance, seed, width, height, model, eta, lora=None):
    """The settings in A1111's "parameters" format, so an image says how to make it again."""
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    settings = f"Steps: {steps}, Sampler: DDIM, CFG scale: {guidance}, Seed: {seed}, Size: {width}x{height}, " \
               f"Model: {model}, Eta: {eta}"
    if lora:
        settings += f", LoRA: {lora}"
    return "\n".join(lines + [settings])


def save_png(image, path, parameters=None):
    """Write `image` as a PNG with a "parameters" text chunk, atomically (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)  # becomes an iTXt chunk when the text is not Latin-1
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def image_grid(images):
    """The images tiled row by row in a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
