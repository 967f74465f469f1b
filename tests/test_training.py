"""DreamBooth-LoRA training: loss math, learning, resume == uninterrupted, outputs, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_min import UserError, load
from dreambooth_min.dreambooth import dreambooth_loss
from dreambooth_min.formats.lora_apply import apply_lora
from dreambooth_min.formats.lora_file import load_lora
from dreambooth_min.run.config import TrainConfig
from dreambooth_min.run.state import lr_multiplier as lr_lambda
from dreambooth_min.run.training import train
from dreambooth_min.scheduler import add_noise, alphas_cumprod, min_snr_weight, snr

ROOT = Path(__file__).resolve().parents[1]


def synthetic_images(folder, n=3, size=48):
    """Smooth, distinct colour gradients (a learnable 'subject')."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        rgb = np.stack([x * (i + 1) / n, y, (1 - x) * (n - i) / n], -1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def config(tmp_path, model, **kw):
    base = dict(images=str(synthetic_images(tmp_path / "images")), model=str(model), output=str(tmp_path / "run"),
                class_noun="dog", resolution=32, num_class_images=2, class_dir=str(tmp_path / "class"), class_steps=2,
                steps=6, validate_every=0, save_every=0, lr=1e-3, seed=3)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------------
# The loss


def test_dreambooth_loss_is_eq2():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    loss, inst, prior = dreambooth_loss(pred, target, n_instance=2, prior_weight=0.7)
    mse = lambda a, b: ((a - b) ** 2).mean().item()
    assert inst.item() == pytest.approx(mse(pred[:2], target[:2]), rel=1e-6)
    assert prior.item() == pytest.approx(mse(pred[2:], target[2:]), rel=1e-6)
    assert loss.item() == pytest.approx(inst.item() + 0.7 * prior.item(), rel=1e-6)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    loss, inst, prior = dreambooth_loss(pred, target, 2, 1.0, w)
    rows = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * w
    assert inst.item() == pytest.approx(rows[:2].mean().item(), rel=1e-6)
    assert prior.item() == pytest.approx(rows[2:].mean().item(), rel=1e-6)
    _, _, prior = dreambooth_loss(pred[:2], target[:2], 2, 1.0)  # no class rows
    assert prior.item() == 0


def test_min_snr_weights_closed_form():
    t = torch.tensor([0, 10, 250, 500, 999])
    a = alphas_cumprod()[t]
    s = a / (1 - a)
    assert torch.allclose(snr(t).double(), s, rtol=1e-6)
    gamma = 5.0
    assert torch.allclose(min_snr_weight(t, gamma, "epsilon").double(), s.clamp(max=gamma) / s, rtol=1e-5)
    assert torch.allclose(min_snr_weight(t, gamma, "v_prediction").double(), s.clamp(max=gamma) / (s + 1), rtol=1e-5)
    # Low noise (large SNR) is down-weighted; at high noise the eps weight is 1.
    assert min_snr_weight(torch.tensor([999]), gamma, "epsilon").item() == pytest.approx(1.0)


def test_lr_schedule():
    assert [lr_lambda(s, 4, 100, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_lambda(4, 4, 104, "cosine") == pytest.approx(1.0)
    assert lr_lambda(54, 4, 104, "cosine") == pytest.approx(0.5)
    assert lr_lambda(104, 4, 104, "cosine") == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Training runs on the tiny models


def denoising_loss(model, lora, images_dir, resolution=32, seed=123):
    """Mean eps/v-MSE of the model (+ LoRA) on the instance images at fixed noise and timesteps."""
    from dreambooth_min.run.data import encode_latents, load_instance_images
    from dreambooth_min.scheduler import v_target

    sd = load(model)
    if lora is not None:
        apply_lora(sd.unet, sd.text_encoder, load_lora(lora)[0])
    images, _, _ = load_instance_images(images_dir, resolution, "x")
    mean, _ = encode_latents(sd.vae, images)
    z0 = mean * sd.vae.scaling_factor
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        ctx = sd.encode_prompt(["a photo of sks dog"] * len(z0))
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(z0.shape, generator=g)
            tt = torch.full((len(z0),), t)
            target = noise if sd.prediction_type == "epsilon" else v_target(z0, noise, tt)
            total += ((sd.unet(add_noise(z0, noise, tt), tt, ctx) - target) ** 2).mean().item()
    return total / 5


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_training_lowers_the_denoising_loss(version, tmp_path, request):
    tiny = request.getfixturevalue(f"tiny_{version}")
    cfg = config(tmp_path, tiny["single"], steps=100, lr=1e-2, prior_weight=0.0, rank=8, flip=False,
                 lora_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"))
    before = denoising_loss(tiny["single"], None, cfg.images)
    result = train(cfg)
    after = denoising_loss(tiny["single"], result["lora"], cfg.images)
    assert after < 0.85 * before, (before, after)  # measured: sd1 1.16 -> 0.87, sd2 0.60 -> 0.42


def test_resume_equals_uninterrupted_and_outputs(tiny_sd1, tmp_path):
    a = train(config(tmp_path / "a", tiny_sd1["single"], steps=6, grad_accum=2, lr_schedule="cosine", warmup_steps=2,
                     validate_every=1, validation_images=1, validation_steps=2))
    cfg = config(tmp_path / "b", tiny_sd1["single"], steps=6, grad_accum=2, lr_schedule="cosine", warmup_steps=2,
                 validate_every=1, validation_images=1, validation_steps=2, class_dir=str(tmp_path / "a" / "class"))
    b1 = train(cfg, stop_after=3)  # the path Ctrl-C takes
    assert b1["interrupted"] and b1["step"] == 3
    assert (Path(cfg.output) / "checkpoints" / "step_000003" / "state.pt").exists()
    b2 = train(cfg, resume=True)
    assert not b2["interrupted"] and b2["step"] == 6
    ta, tb = load_lora(a["lora"])[0], load_lora(b2["lora"])[0]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k
    assert any(v.abs().max() > 0 for k, v in ta.items() if "lora_up" in k)  # it did learn something
    # Outputs a person looks at.
    out = Path(a["output"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {"loss", "loss_instance", "loss_prior", "lr", "seconds"} <= log[0].keys()
    assert log[0]["lr"] == pytest.approx(1e-3 * 0.5)  # warmup step 1 of 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["steps"] == 6 and saved["resolved"]["version"] == "sd1"
    assert Image.open(out / "loss.png").size == (800, 400)
    rows = sorted((out / "samples").glob("epoch_*.png"))
    assert len(rows) == 5  # epoch 0 (the base model) and epochs 1..4 (6 steps x 2 micro-batches / 3 images)
    assert Image.open(out / "samples" / "grid.png").height == 5 * Image.open(rows[0]).height
    _, meta = load_lora(a["lora"])
    assert meta["ss_instance_prompt"] == "a photo of sks dog" and meta["ss_network_dim"] == "4"
    assert len(list((tmp_path / "a" / "class").glob("*.png"))) == 2


def test_class_images_are_reused_and_completed(tiny_sd1, tmp_path):
    from dreambooth_min.run.prior import ensure_class_images

    sd = load(tiny_sd1["single"])
    first = ensure_class_images(sd, tmp_path / "c", "a photo of dog", 3, 32, steps=2)
    pixels = np.asarray(Image.open(first[1]))
    first[1].unlink()  # as if generation had been interrupted before image 1
    mtime = first[0].stat().st_mtime_ns
    again = ensure_class_images(sd, tmp_path / "c", "a photo of dog", 3, 32, steps=2)
    # Same seed, same image (up to float rounding: it was drawn in a batch of 3 first, now alone).
    assert np.abs(np.asarray(Image.open(again[1])).astype(int) - pixels).max() <= 1
    assert first[0].stat().st_mtime_ns == mtime  # the existing ones were not redrawn


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_amp_training_on_cuda(tiny_sd1, tmp_path):
    r = train(config(tmp_path, tiny_sd1["single"], steps=4, device="cuda", precision="fp16"))
    tensors, _ = load_lora(r["lora"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())


def test_bf16_on_cpu(tiny_sd1, tmp_path):
    r = train(config(tmp_path, tiny_sd1["single"], steps=2, precision="bf16", prior_weight=0.0))
    tensors, _ = load_lora(r["lora"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear line each


def test_bad_inputs(tiny_sd1, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(config(tmp_path, tiny_sd1["single"], images=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        train(config(tmp_path, tiny_sd1["single"], images=str(tmp_path / "empty")))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot write to the output folder"):
        train(config(tmp_path, tiny_sd1["single"], output=str(tmp_path / "afile" / "run")))
    with pytest.raises(UserError, match="device must be cuda, cuda:N or cpu"):
        train(config(tmp_path, tiny_sd1["single"], device="tpu"))
    with pytest.raises(UserError, match="names no Linear or Conv2d layer"):
        train(config(tmp_path, tiny_sd1["single"], lora_targets=("no_such_layer",), prior_weight=0.0))


def test_unreadable_and_small_images_warn_and_go_on(tiny_sd1, tmp_path):
    images = synthetic_images(tmp_path / "imgs", n=2, size=16)  # smaller than the resolution
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    messages = []
    train(config(tmp_path, tiny_sd1["single"], images=str(images), steps=1, prior_weight=0.0), log=messages.append)
    assert any("broken.jpg" in m for m in messages)
    assert any("upscal" in m.lower() or "smaller" in m.lower() for m in messages)


def run_cli(args, cwd, env=None, **kw):
    env = env or dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, **kw)


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "weights").mkdir()
    synthetic_images(tmp_path / "imgs")
    offline = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = run_cli(["--images", "imgs"], tmp_path, env=offline)  # no model in weights/: SD 1.5 from the Hub, offline
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stable-diffusion-v1-5/stable-diffusion-v1-5 is not in the Hugging Face cache")
    assert not any((tmp_path / "runs").glob("*"))  # no run folder left behind
    r = run_cli(["--images", "missing", "--model", "x.safetensors"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr


def test_ctrl_c_saves_a_checkpoint(tiny_sd1, tmp_path):
    synthetic_images(tmp_path / "imgs")
    args = ["--images", "imgs", "--model", str(tiny_sd1["single"]), "--output", "run", "--resolution", "32",
            "--no-prior", "--steps", "100000", "--validate-every", "0", "--save-every", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "--resume" in out
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "lora.safetensors").exists()
    done = len(log.read_text().splitlines())
    assert int(ckpts[-1].name.split("_")[1]) == done


@pytest.mark.parametrize("change,message", [
    (dict(rank=0), "rank must be positive"), (dict(batch_size=0), "batch_size must be positive"),
    (dict(prompt="a photo of {oops}"), "unknown placeholder"), (dict(resolution=63), "multiple of 8"),
    (dict(steps=-5), "steps must not be negative"), (dict(steps=0, epochs=0), "epochs must be positive"),
    (dict(lr=-1.0), "lr must be positive"), (dict(num_class_images=-3), "num_class_images must not be negative"),
    (dict(validate_every=1, validation_images=0), "validation_images must be positive")])
def test_settings_that_cannot_train_are_refused_before_any_work(change, message, tmp_path):
    with pytest.raises(UserError, match=message):
        train(config(tmp_path, tmp_path / "no-model-needed.safetensors", **change))
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_resume_after_a_crash_drops_what_came_after_the_checkpoint(tiny_sd1, tmp_path):
    cfg = config(tmp_path, tiny_sd1["single"], steps=6, save_every=2, prior_weight=0.0)
    train(cfg, stop_after=5)  # checkpoints at steps 2, 4 and (on the interruption) 5
    out = Path(cfg.output)
    import shutil
    shutil.rmtree(out / "checkpoints" / "step_000005")  # as if the process had been killed after step 5
    train(cfg, resume=True)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(UserError, match="is finished"):
        train(cfg, resume=True)
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg)
    assert oct((out / "lora.safetensors").stat().st_mode & 0o777) != oct(0o600)  # readable by others too


def test_cli_resume_takes_no_other_settings(tmp_path):
    r = run_cli(["--resume", "somewhere", "--steps", "5"], tmp_path)
    assert r.returncode == 2 and "cannot be changed" in r.stderr and "Traceback" not in r.stderr
