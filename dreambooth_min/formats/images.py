"""Image files in: which files in a folder are photos, and any photo's pixels as 8-bit RGB.

Photos come in every mode a camera or an editor writes (16-bit and float grayscale, palettes, alpha,
CMYK); the training photos, the class images and the evaluation's real photos are all read through here.
"""
from pathlib import Path

import torch
from PIL import Image


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"  # name.mask.png beside name.jpg: the photo's loss mask, not a photo


def find_images(folder):
    """Image files directly in `folder`, sorted by name (hidden files such as macOS '._x.jpg' and masks
    'x.mask.png' skipped)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith(".") and not p.name.lower().endswith(MASK_SUFFIX))


def _gray_to_8bit(img):
    """16-bit / 32-bit / float grayscale -> 'L'. Pillow's own convert('L') clips these instead of scaling."""
    if img.mode.startswith("I;16"):
        img, top = img.convert("I"), 65535.0  # the mode says 16-bit, whatever the values
    else:
        top = None
    raw = img.tobytes()  # 'I': native int32, 'F': native float32
    x = torch.frombuffer(bytearray(raw), dtype=torch.int32 if img.mode == "I" else torch.float32).double()
    if top is None:  # 'I' or 'F' does not say its range: infer it from the data
        peak = x.max().item() if x.numel() else 0.0
        top = 1.0 if img.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
    x = (x / top).clamp(0, 1).mul(255).round().to(torch.uint8)  # a fresh tensor: its storage is x
    return Image.frombytes("L", img.size, bytes(x.untyped_storage()))


def to_rgb(img):
    """Any PIL image -> 8-bit RGB. Transparent pixels become white (not black, Pillow's default)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _gray_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, 1, CMYK, YCbCr, RGB
