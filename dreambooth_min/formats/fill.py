"""Modules built on the meta device, then filled from a checkpoint's tensors, each exactly once.

Building on the meta device allocates nothing and draws no random init; `fill` then checks that the file
holds every tensor the module has, no other, each of the right shape: a wrong or partial file is one line.
"""
import torch

from ..errors import UserError


def build(cls, cfg, dtype, device):
    """The module with uninitialised storage: no random init to throw away, no second copy."""
    with torch.device("meta"):
        module = cls(cfg)
    return module.to(dtype).to_empty(device=device)


@torch.no_grad()
def fill(module, sources, what):
    """Copy tensors into every parameter and persistent buffer of `module`, exactly once.

    `sources` yields (our name, reader): reader(out) returns the tensor, read straight into `out` (the
    parameter) when the stored dtype and shape allow. Tensors are cast to the module's dtype; a 1x1-conv
    weight fills a linear one (LDM's VAE attention is 1x1 convs, diffusers' linear layers).
    """
    targets = module.state_dict(keep_vars=True)
    missing = set(targets)
    for name, read in sources:
        if name not in targets:
            raise UserError(f"unknown {what} architecture: unexpected tensor {name}")
        dst = targets[name]
        src = read(dst)
        if src is dst:
            missing.discard(name)
            continue
        if tuple(src.shape) != tuple(dst.shape):
            if src.dim() == 4 and src.shape[2:] == (1, 1) and tuple(src.shape[:2]) == tuple(dst.shape):
                src = src[:, :, 0, 0]
            else:
                raise UserError(f"{what} tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)
        missing.discard(name)
    if missing:
        raise UserError(f"{what} weights are incomplete: {len(missing)} tensors missing, e.g. "
                        + ", ".join(sorted(missing)[:3]))
    return module
