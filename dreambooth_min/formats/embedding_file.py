"""Textual-inversion embedding files: the learnt vectors of new tokens, kept apart from the LoRA.

The layouts, as the UIs read a .safetensors embedding (a LoRA file with token keys in it breaks some loaders,
so the vectors never go there):
- SD 1.x / 2.x: one tensor, `emb_params` [vectors, width]. AUTOMATIC1111 loads a .safetensors embedding that
  holds exactly one tensor, whatever its name, and calls it by the file's name; ComfyUI takes the tensor named
  after the model's encoder (clip_l, clip_h) when there is one, else the first.
- SDXL: `clip_l` [vectors, 768] and `clip_g` [vectors, 1280], one per text encoder; both UIs look for the two keys.
The tokens the vectors were trained under ("<s0><s1>") are in the metadata: the UIs ignore it, sample.py
--embedding reads it.
"""
from pathlib import Path

import torch

from ..errors import UserError
from .safetensors_io import SafetensorsFile, save_atomic

SINGLE_KEY = "emb_params"  # A1111's name for the one tensor of an SD 1.x / 2.x embedding
SDXL_KEYS = ("clip_l", "clip_g")


def save_embedding(path, vectors, tokens, metadata=None):
    """Write `vectors` {encoder key: [n, width]} under `tokens` (their text, e.g. "<s0><s1>") atomically.

    One encoder (SD 1.x "clip_l", SD 2.x "clip_h") gives the single `emb_params` tensor; SDXL's two keep their keys.
    """
    widths = {k: v.shape for k, v in vectors.items()}
    if len({shape[0] for shape in widths.values()}) != 1:
        raise ValueError(f"every encoder needs the same number of vectors, got {widths}")
    if len(vectors) > 1 and set(vectors) != set(SDXL_KEYS):
        raise ValueError(f"two encoders are SDXL's {SDXL_KEYS}, got {sorted(vectors)}")
    tensors = {SINGLE_KEY: next(iter(vectors.values()))} if len(vectors) == 1 else dict(vectors)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    meta = {"tokens": tokens, "encoders": ",".join(vectors), "vectors": str(next(iter(widths.values()))[0])}
    save_atomic(tensors, path, metadata=meta | {k: str(v) for k, v in (metadata or {}).items()})


def load_embedding(path):
    """({key: [n, width] fp32}, tokens text or None, metadata) of a .safetensors embedding file.

    The key is `emb_params` (or whatever the one tensor is called) for SD 1.x / 2.x files, clip_l and clip_g
    for SDXL ones.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embedding file {path} does not exist")
    f = SafetensorsFile(path)  # refuses pickles (.pt / .bin embeddings) with one line
    shapes = f.shapes  # judged before any tensor is read: a model given here is refused at once
    if not shapes or any(len(s) not in (1, 2) for s in shapes.values()):
        raise UserError(f"{path} is not a textual-inversion embedding (one [vectors, width] tensor, or clip_l + clip_g)")
    if len(shapes) > 1 and not set(SDXL_KEYS) <= set(shapes):
        raise UserError(f"{path} holds {len(shapes)} tensors ({', '.join(sorted(shapes)[:4])}): an embedding has one, "
                        f"or SDXL's clip_l and clip_g (is it a LoRA? use --lora)")
    tensors = {k: f.read(k).float() for k in f.entries}  # every value checked finite (NonFinite names the tensor)
    tensors = {k: v[None] if v.dim() == 1 else v for k, v in tensors.items() if len(tensors) == 1 or k in SDXL_KEYS}
    return tensors, f.metadata.get("tokens") or None, f.metadata
