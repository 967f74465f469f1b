"""--optimizer: adamw is torch's AdamW step for step; adamw8bit needs bitsandbytes (+ CUDA), else one line."""
import sys

import pytest
import torch

from dreambooth_min.errors import UserError
from dreambooth_min.run.optim import make_optimizer


def _params(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 32, generator=g).to(device).requires_grad_(), torch.randn(32, 4, generator=g).to(device).requires_grad_()]


def _train(optimizer, params, steps=5, seed=1):
    """A few steps on a fixed quadratic; the losses and final parameters."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(32, 32, generator=g).to(params[0].device)
    losses = []
    for _ in range(steps):
        loss = ((params[1] @ params[0] - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in params]


def test_adamw_equals_torch_adamw_step_for_step():
    ours_p, ref_p = _params(), _params()
    groups = lambda ps: [{"params": ps[:1], "lr": 1e-2}, {"params": ps[1:], "lr": 3e-3}]
    ours = make_optimizer(groups(ours_p), "adamw", weight_decay=0.05)
    ref = torch.optim.AdamW(groups(ref_p), weight_decay=0.05)
    assert type(ours) is torch.optim.AdamW
    losses, final = _train(ours, ours_p)
    ref_losses, ref_final = _train(ref, ref_p)
    assert losses == ref_losses and losses[-1] < losses[0]
    for a, b in zip(final, ref_final):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [g["weight_decay"] for g in ours.param_groups] == [0.05, 0.05]
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]  # checkpoints interchangeable


def test_unknown_optimizer_is_one_line():
    with pytest.raises(UserError, match="adamw, adamw8bit") as e:
        make_optimizer(_params(), "sgd", 0.0)
    assert "\n" not in str(e.value)


def test_adamw8bit_without_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(UserError) as e:
        make_optimizer(_params(), "adamw8bit", 1e-2)
    message = str(e.value)
    assert message.endswith("pip install bitsandbytes") and "\n" not in message
    assert "CUDA" in message  # the parameters are on the CPU: say that 8-bit needs a GPU too


def test_adamw8bit_on_the_cpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", type(sys)("bitsandbytes"))  # installed, but CPU tensors
    with pytest.raises(UserError, match="needs a CUDA GPU") as e:
        make_optimizer(_params(), "adamw8bit", 1e-2)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' 8-bit AdamW needs CUDA")
def test_adamw8bit_tracks_adamw_on_cuda():
    bnb = pytest.importorskip("bitsandbytes")
    ours_p, ref_p = _params(device="cuda"), _params(device="cuda")
    ours = make_optimizer([{"params": ours_p, "lr": 1e-2}], "adamw8bit", 1e-2)
    assert isinstance(ours, bnb.optim.AdamW8bit)
    losses, final = _train(ours, ours_p, steps=20)
    ref_losses, ref_final = _train(torch.optim.AdamW([{"params": ref_p, "lr": 1e-2}], weight_decay=1e-2), ref_p, 20)
    assert losses[-1] < 0.9 * losses[0]
    for a, b in zip(final, ref_final):  # quantised moments: close to fp32 AdamW, not equal
        assert (a - b).abs().max() < 0.05
