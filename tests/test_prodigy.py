"""--optimizer prodigy: prodigyopt's Prodigy with diffusers' advanced-script settings; its first step against
the closed form; lr's meaning; one line when missing; state resumed byte-identically."""
import json
import sys
from pathlib import Path

import pytest
import torch

from dreambooth_min.errors import UserError
from dreambooth_min.run.config import TrainConfig
from dreambooth_min.run.optim import make_optimizer
from dreambooth_min.run.training import train
from test_optim import _params, _train
from test_training import config

prodigyopt = pytest.importorskip("prodigyopt")


def test_prodigy_is_prodigyopt_with_the_advanced_scripts_settings():
    ours_p, ref_p = _params(), _params()
    ours = make_optimizer([{"params": ours_p, "lr": 1.0}], "prodigy", weight_decay=1e-2, d_coef=0.7)
    # What diffusers' train_dreambooth_lora_sd15_advanced.py passes for --optimizer prodigy (its defaults).
    ref = prodigyopt.Prodigy([{"params": ref_p, "lr": 1.0}], lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8,
                             weight_decay=1e-2, decouple=True, use_bias_correction=True, safeguard_warmup=True,
                             d_coef=0.7)
    assert type(ours) is prodigyopt.Prodigy
    losses, final = _train(ours, ours_p, steps=100)
    ref_losses, ref_final = _train(ref, ref_p, steps=100)
    assert losses == ref_losses and losses[-1] < 0.5 * losses[0]  # measured 4.08 -> 0.98 (4.06 after 60 steps)
    for a, b in zip(final, ref_final):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    # The step size it estimated grew from d0 = 1e-6 (measured 0.066): the reason lr can be left at 1.
    assert ours.param_groups[0]["d"] > 100 * 1e-6


@pytest.mark.parametrize("lr", [1.0, 0.25])
def test_the_first_step_moves_every_coordinate_by_d0_times_lr(lr):
    """Step 1, closed form: m = d0 (1 - b1) g, v = d0^2 (1 - b2) g^2, bias correction sqrt(1 - b2) / (1 - b1), so
    p1 = p0 - d0 lr sign(g) / (1 + eps / (sqrt(1 - b2) |g|)): lr multiplies the estimated step size d (d0 = 1e-6)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(64, generator=g).requires_grad_()
    grad = torch.randn(64, generator=g)
    p0 = p.detach().clone()
    opt = make_optimizer([{"params": [p], "lr": lr}], "prodigy", weight_decay=0.0)
    p.grad = grad.clone()
    opt.step()
    expected = p0 - 1e-6 * lr * grad.sign() / (1 + 1e-8 / ((1 - 0.999) ** 0.5 * grad.abs()))
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_without_prodigyopt_it_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # `import prodigyopt` now raises ImportError
    with pytest.raises(UserError) as e:
        make_optimizer(_params(), "prodigy", 1e-2)
    assert str(e.value) == "--optimizer prodigy needs the prodigyopt package: pip install prodigyopt"


def test_lr_means_a_multiplier_for_prodigy_and_separate_rates_are_refused(tmp_path):
    cfg = TrainConfig(images="x", optimizer="prodigy")
    cfg.check()
    assert cfg.lr == 1.0  # --lr left out: 1.0, as diffusers' advanced README recommends
    cfg = TrainConfig(images="x")
    cfg.check()
    assert cfg.lr == 1e-4  # AdamW's default is unchanged
    for name in ("text_encoder_lr", "embedding_lr"):
        with pytest.raises(UserError, match=f"{name} cannot differ from --lr with --optimizer prodigy"):
            TrainConfig(images="x", optimizer="prodigy", **{name: 0.5}).check()
    TrainConfig(images="x", optimizer="prodigy", lr=0.5, text_encoder_lr=0.5).check()  # equal: fine
    with pytest.raises(UserError, match="prodigy_d_coef must be positive"):
        TrainConfig(images="x", optimizer="prodigy", prodigy_d_coef=0.0).check()


def test_resume_is_byte_identical_and_the_plan_says_what_lr_means(tiny_sd1, tmp_path):
    # d_coef 1000: d then grows within these few steps, so its restored history (d, d_max, d_numerator) matters.
    settings = dict(optimizer="prodigy", lr=0.0, steps=6, grad_accum=2, lr_schedule="cosine", warmup_steps=2,
                    train_text_encoder=True, prodigy_d_coef=1000.0)
    lines = []
    a = train(config(tmp_path / "a", tiny_sd1["single"], **settings), log=lines.append)
    assert "optimizer   prodigy (step size estimated while training; lr 1 multiplies it), d_coef 1000" in lines[0]
    cfg = config(tmp_path / "b", tiny_sd1["single"], class_dir=str(tmp_path / "a" / "class"), **settings)
    assert train(cfg, stop_after=3, log=lambda *_: None)["interrupted"]
    b = train(cfg, resume=True, log=lambda *_: None)
    assert Path(a["lora"]).read_bytes() == Path(b["lora"]).read_bytes()
    log = [json.loads(line) for line in (Path(a["output"]) / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (Path(b["output"]) / "log.jsonl").read_text().splitlines()]
    assert [r["prodigy_d"] for r in log] == [r["prodigy_d"] for r in resumed]  # d, d_max, k... restored exactly
    print("prodigy d per step:", [r["prodigy_d"] for r in log])
    assert log[-1]["prodigy_d"] > log[0]["prodigy_d"] == 1e-6  # the estimate grew
    assert log[0]["lr"] == pytest.approx(0.5)  # warmup step 1 of 2 multiplies lr 1.0
    saved = json.loads((Path(a["output"]) / "config.json").read_text())["config"]
    assert saved["lr"] == 1.0 and saved["optimizer"] == "prodigy"
