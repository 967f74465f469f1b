"""What the UNet is conditioned on besides x_t and t: one small object for every model family.

SD 1.x / 2.x condition only on the text states c (cross-attention). SDXL (Podell et al. 2023, sec. 2.2)
adds two vectors to the timestep embedding: the pooled text embedding of its second text encoder, and six
"micro-conditioning" numbers, the image's original size, the top-left corner of the crop taken from it,
and the target size, each (h, w). Carrying them together in a `Cond` lets classifier-free guidance, the
sampler and the DreamBooth loss handle both families with the same lines: they only ever stack, split and
repeat rows.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class Cond:
    context: torch.Tensor                     # [B, M, D] text states for cross-attention
    pooled: Optional[torch.Tensor] = None     # [B, P] SDXL: pooled, projected text embedding (encoder 2)
    time_ids: Optional[torch.Tensor] = None   # [B, 6] SDXL: original (h, w), crop top-left (top, left), target (h, w)

    def __len__(self):
        return len(self.context)

    def _map(self, fn):
        return Cond(*(None if v is None else fn(v) for v in (self.context, self.pooled, self.time_ids)))

    def to(self, device=None, dtype=None):
        """On `device`; the text tensors in `dtype`. time_ids stay float32: pixel counts above 2048 are not
        all representable in fp16, and they only feed a float32 sinusoidal embedding."""
        out = self._map(lambda v: v.to(device))
        if dtype is not None:
            out.context = out.context.to(dtype)
            out.pooled = None if out.pooled is None else out.pooled.to(dtype)
        return out

    def __getitem__(self, index):
        """The rows `index` (an int keeps the batch dimension)."""
        index = [index] if isinstance(index, int) else index
        return self._map(lambda v: v[index])

    def repeat(self, n):
        """Every row n times over, as whole blocks: [a; b] -> [a; b; a; b; ...]."""
        return self._map(lambda v: v.repeat(n, *[1] * (v.dim() - 1)))

    def chunk(self, n):
        """Split the rows into n equal parts (CFG: [uncond; cond] -> uncond, cond)."""
        return [self[list(range(i * len(self) // n, (i + 1) * len(self) // n))] for i in range(n)]

    @staticmethod
    def cat(conds):
        """The rows of several Conds stacked in order; all must carry the same parts."""
        conds = list(conds)
        parts = []
        for f in fields(Cond):
            values = [getattr(c, f.name) for c in conds]
            if any(v is None for v in values) and not all(v is None for v in values):
                raise ValueError(f"Cond.cat: {f.name} is set in some conds and not in others")
            parts.append(None if values[0] is None else torch.cat(values))
        return Cond(*parts)

    def with_time_ids(self, time_ids):
        """The same text with SDXL's size conditioning `time_ids` [6] (one for all rows) or [B, 6]."""
        ids = torch.as_tensor(time_ids, dtype=torch.float32, device=self.context.device)
        return Cond(self.context, self.pooled, ids.expand(len(self), 6) if ids.dim() == 1 else ids)


def as_cond(cond):
    """A Cond from a Cond or a bare context tensor (SD 1.x / 2.x callers may pass just c)."""
    return cond if isinstance(cond, Cond) else Cond(cond)


def size_time_ids(original_size, crop_top_left, target_size):
    """SDXL's six micro-conditioning numbers [6] (float32): original (h, w), crop (top, left), target (h, w).

    At sampling time diffusers (and sgm's defaults) use original = target = the image size and crop (0, 0):
    "an uncropped image of this size"."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
