"""Images as the evaluator models want them: read from a folder, then short side resized, centre crop,
the model's mean / std.

Done here in torch (bicubic, antialiased) so that torchvision is not needed; the sizes and the mean / std
come from each model's preprocessor_config.json (evaluators.py reads it) through `image_spec`.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import UserError
from ..formats.images import find_images, to_rgb


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its pixels: short side resized to `resize`, centre `crop`, then (x - mean) / std."""
    resize: int
    crop: int
    mean: tuple
    std: tuple


def config_size(value):
    """A size in a preprocessor config: an int, or {"shortest_edge": s} / {"height": h, "width": w}."""
    if isinstance(value, dict):
        value = value.get("shortest_edge") or min(value.get("height", 0), value.get("width", 0)) or None
    return int(value) if isinstance(value, (int, float)) else None


def image_spec(preprocessor, image_size, default_mean, default_std):
    """The ImageSpec from a preprocessor_config.json dict (or None) and the model's input size, which
    is always the crop (the position embeddings fix it)."""
    pre = preprocessor or {}
    resize = config_size(pre.get("size")) or image_size
    return ImageSpec(max(resize, image_size), image_size, tuple(pre.get("image_mean", default_mean)),
                     tuple(pre.get("image_std", default_std)))


def pil_to_tensor(image):
    """PIL image (any mode) -> [3, H, W] float32 in [0, 1]."""
    image = to_rgb(image)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return x.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


def preprocess(images, spec):
    """PIL images -> [B, 3, crop, crop] fp32: bicubic antialiased resize of the short side, centre crop,
    normalisation (as CLIP's and ViT's own processors do, up to resampling details)."""
    out = []
    for image in images:
        x = pil_to_tensor(image)[None]
        h, w = x.shape[-2:]
        scale = spec.resize / min(h, w)
        size = (max(spec.crop, round(h * scale)), max(spec.crop, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - spec.crop) // 2, (size[1] - spec.crop) // 2
        out.append(x[..., top:top + spec.crop, left:left + spec.crop])
    x = torch.cat(out)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def read_images(folder, what="images"):
    """The images directly in `folder` (sorted by name, EXIF rotation applied) as RGB PIL images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist")
    paths = find_images(folder)
    if not paths:
        raise UserError(f"{what} folder {folder} holds no images (jpg, png, webp, bmp, tiff)")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(to_rgb(ImageOps.exif_transpose(im)))
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e}") from None
    return images
