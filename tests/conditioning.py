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


def _array(x):
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_well_conditioned(name, f, modules, atol, mean_atol=None, rel=REL, seed=0):
    """f() -> the compared output (a tensor or array, in the units of the tolerance), computed from `modules`.
    atol: the comparison's max |diff| tolerance; mean_atol: its mean |diff| tolerance, if it has one (for images
    compared in whole 1/255 steps, the share of values allowed to differ: a move of d/255 flips about d of them).
    Asserts the 1e-6 perturbation moves f by less than a tenth of each; returns (max move, mean move)."""
    if name not in MOVES:
        with torch.no_grad():
            base = _array(f())
            with perturbed(modules, rel, seed):
                moved = _array(f())
        diff = np.abs(moved - base)
        MOVES[name] = (float(diff.max()), float(diff.mean()))
        print(f"conditioning {name}: 1e-6 relative weight noise moves the output by max {MOVES[name][0]:.2e} "
              f"(tolerance {atol:g}), mean {MOVES[name][1]:.2e}" + (f" (tolerance {mean_atol:g})" if mean_atol else ""))
    max_move, mean_move = MOVES[name]
    assert max_move < atol / 10, f"{name}: ill-conditioned, 1e-6 weight noise moves the output by {max_move:.3g}"
    if mean_atol is not None:
        assert mean_move < mean_atol / 10, f"{name}: ill-conditioned, mean move {mean_move:.3g}"
    return MOVES[name]
