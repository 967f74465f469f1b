"""Is a comparison well-conditioned? A test that compares our output with a reference (diffusers, peft,
transformers, the original code) on a tiny random model proves something only if the reference's output is a
smooth function of the weights: a random model with large LoRA factors can be chaotic, and then float rounding
alone (another library version, another summation order) moves its output past any tolerance.

`assert_well_conditioned` shows it once per fixture: every float weight w of the given modules becomes
w * (1 + 1e-6 n), n ~ N(0, 1) seeded, and the compared output must move by less than a tenth of the
comparison's tolerance. Results are cached for the session, so a fixture built twice checks once."""
import contextlib

import numpy as np
import torch

REL = 1e-6  # about 10 float32 ulps: what a different kernel or summation order changes in a weight
MOVES = {}  # name -> (max move, mean move): measured once per session


@contextlib.contextmanager
def perturbed(modules, rel=REL, seed=0):
    """Every float parameter and buffer w -> w * (1 + rel * n), restored afterwards."""
    g = torch.Generator().manual_seed(seed)
    saved = []
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_floating_point():
                    saved.append((t, t.detach().clone()))
                    t.mul_(1 + rel * torch.randn(t.shape, generator=g).to(t.device, t.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)


def _arrays(x):
    """A tensor, an array, or a list / tuple of them (several compared outputs) -> a list of float64 arrays."""
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in _arrays(v)]
    if isinstance(x, torch.Tensor):
        return [x.detach().double().cpu().numpy()]
    return [np.asarray(x, dtype=np.float64)]


def assert_well_conditioned(name, f, modules, atol, mean_atol=None, rel=REL, seed=0):
    """f() -> the compared output: a tensor or array, or a list of them, computed from `modules`.
    atol: the comparison's max |diff| tolerance (one per output if f gives a list); mean_atol: its mean |diff|
    tolerance, if it has one (images compared in whole 1/255 steps allow a share of values to differ: a move of
    d/255 flips about d of them). Asserts the perturbation moves every output by less than a tenth of each of its
    tolerances; returns the largest move as a share of the tolerance."""
    if name not in MOVES:
        with torch.no_grad():
            base = _arrays(f())
            with perturbed(modules, rel, seed):
                moved = _arrays(f())
        atols = list(atol) if isinstance(atol, (list, tuple)) else [atol] * len(base)
        assert len(atols) == len(base), "one tolerance per compared output"
        diffs = [np.abs(m - b) for m, b in zip(moved, base)]
        share = max(d.max() / a for d, a in zip(diffs, atols))
        text = ", ".join(f"{d.max():.2e} of {a:g}" for d, a in zip(diffs, atols))
        if mean_atol is not None:
            mean = max(d.mean() for d in diffs)
            share = max(share, mean / mean_atol)
            text += f"; mean {mean:.2e} of {mean_atol:g}"
        MOVES[name] = share
        print(f"conditioning {name}: 1e-6 relative weight noise moves the output by {text} (max share {share:.3f})")
    assert MOVES[name] < 0.1, (f"{name} is ill-conditioned: 1e-6 relative weight noise moves the compared output "
                               f"by {MOVES[name]:.2f} of its tolerance (must stay under 0.1)")
    return MOVES[name]
