"""The CUDA mixed-precision path, run on the CPU: frozen fp16 base, fp32 LoRA, autocast, GradScaler.

torch runs autocast in float16 and GradScaler("cpu") on the CPU, so everything but the kernels is the
code every GPU user runs.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dreambooth_min.formats.lora_file import load_lora
from dreambooth_min.layers import attention
from dreambooth_min.lora import inject_lora
from dreambooth_min.run.hardware import resolve_hardware
from dreambooth_min.run.state import TrainingState
from dreambooth_min.run.training import train
from test_training import config


def _losses(run):
    return [json.loads(line)["loss"] for line in (Path(run) / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_training_on_the_cpu(precision, tiny_sd1, tmp_path):
    cfg = config(tmp_path, tiny_sd1["single"], device="cpu", precision=precision, steps=6, save_every=2,
                 validate_every=1, validation_images=1, validation_steps=2, train_text_encoder=True)
    result = train(cfg, log=lambda *_: None)
    assert all(torch.isfinite(torch.tensor(_losses(result["output"]))))
    tensors, _ = load_lora(result["lora"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    # B starts at 0: every factor moved, but for the mid block's self-attention q and k: at 32 px it sees one
    # token, so softmax is exactly 1 and q, k get no gradient at all
    single_token = ("mid_block_attentions_0_transformer_blocks_0_attn1_to_q", "mid_block_attentions_0_transformer_blocks_0_attn1_to_k")
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight") and not k.startswith(tuple(f"lora_unet_{n}" for n in single_token))]
    assert all(v.abs().max() > 0 for v in ups)
    assert (Path(result["output"]) / "samples" / "epoch_0002.png").exists()  # validation ran in fp16 too
    checkpoint, _ = load_lora(Path(result["output"]) / "checkpoints" / "step_000004" / "lora.safetensors")
    assert all(v.dtype == torch.float32 for v in checkpoint.values())


def test_fp16_resume_equals_uninterrupted(tiny_sd1, tmp_path):
    kw = dict(device="cpu", precision="fp16", steps=5, grad_accum=2)
    whole = train(config(tmp_path / "a", tiny_sd1["single"], **kw), log=lambda *_: None)
    cfg = config(tmp_path / "b", tiny_sd1["single"], class_dir=str(tmp_path / "a" / "class"), **kw)
    assert train(cfg, stop_after=2, log=lambda *_: None)["interrupted"]
    resumed = train(cfg, resume=True, log=lambda *_: None)
    assert Path(whole["lora"]).read_bytes() == Path(resumed["lora"]).read_bytes()
    assert _losses(whole["output"]) == _losses(resumed["output"])


def test_grad_scaler_skips_a_step_with_an_infinite_gradient_and_lowers_its_scale():
    model = nn.Sequential(nn.Linear(8, 8)).half()
    loras = inject_lora(model, ["0"], rank=2)
    hw = resolve_hardware("cpu", "fp16")
    cfg = SimpleNamespace(lr=1e-2, text_encoder_lr=0.0, weight_decay=0.0, warmup_steps=0, lr_schedule="constant",
                          seed=0, optimizer="adamw", prodigy_d_coef=1.0)
    state = TrainingState(cfg, loras, {}, hw.grad_scaler(), total_steps=10)
    x = torch.randn(4, 8).half()
    with hw.autocast():
        loss = model(x).float().pow(2).mean()
    state.scaler.scale(loss).backward()
    lora = loras["0"]
    assert lora.lora_down.weight.grad.dtype == torch.float32  # fp32 factors get fp32 gradients under an fp16 base
    before = [p.detach().clone() for p in state.params]
    scale = state.scaler.get_scale()
    lora.lora_up.weight.grad[0, 0] = float("inf")
    state.optimizer_step(max_grad_norm=1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, state.params))  # the step was skipped
    assert state.scaler.get_scale() == scale * 0.5


def test_attention_stays_finite_where_qk_overflows_fp16():
    """SD 2.x 768-v: Q K^T exceeds fp16's 65504 for large activations; `upcast` computes it in fp32."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 128, generator=g) for _ in range(3))
    q, k = q * 200, k * 200  # q . k has a spread of 200 * 200 * 8 per head: past fp16's 65504 before the 1/sqrt(d)
    assert not torch.isfinite((q.half()[0, :, :64] @ k.half()[0, :, :64].T)).all()  # the overflow is real
    reference = attention(q, k, v, heads=2)
    for upcast in (True, False):
        out = attention(q.half(), k.half(), v.half(), heads=2, upcast=upcast)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert (out.float() - reference).abs().max() < 2e-2
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(attention(q, k, v, heads=2, upcast=True)).all()
    assert F.scaled_dot_product_attention is not None


def test_non_finite_losses_are_skipped_then_the_run_stops_with_a_finite_checkpoint(tiny_sd1, tmp_path, monkeypatch):
    from dreambooth_min.run import training
    from dreambooth_min.errors import UserError

    real_step, calls = training.dreambooth_step, []

    def poisoned(*args, **kwargs):  # finite for two steps, then NaN for good (as an overflowing model would)
        calls.append(1)
        loss, inst, prior = real_step(*args, **kwargs)
        return (loss * float("nan"), inst, prior) if len(calls) > 2 else (loss, inst, prior)

    monkeypatch.setattr(training, "dreambooth_step", poisoned)
    cfg = config(tmp_path, tiny_sd1["single"], steps=20, prior_weight=0.0)
    with pytest.raises(UserError, match="not finite for 5 steps in a row"):
        train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (Path(cfg.output) / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in records] == [None, None] + ["non-finite loss"] * 5
    checkpoint = Path(cfg.output) / "checkpoints" / "step_000007" / "lora.safetensors"
    tensors, _ = load_lora(checkpoint)
    assert all(torch.isfinite(v).all() for v in tensors.values())
