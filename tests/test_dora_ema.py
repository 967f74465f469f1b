"""DoRA (--dora) against its closed form and against diffusers + peft; --ema-decay's average, resume and files."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import sample
from dreambooth_min.formats.checkpoint import load
from dreambooth_min.formats.lora_apply import apply_lora
from dreambooth_min.formats.lora_file import load_lora, lora_state_dict
from dreambooth_min.formats.lora_names import kohya_name
from dreambooth_min.lora import DoRAConv2d, DoRALinear, channel_norm, inject_lora
from dreambooth_min.run.ema import EMA
from dreambooth_min.run.training import add_lora, train

from conditioning import assert_well_conditioned
from test_sampling import PROMPT, _assert_same_pixels, _reference_images
from test_training import config

torch.set_num_threads(1)
QUIET = dict(log=lambda *_: None)


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(6, 5, 1), nn.Conv2d(6, 5, 3, 2, 1)], ids=str)
def test_dora_closed_form(axis, layer):
    """W' = m (W + dW) / ||W + dW|| (eq. 5) per channel, at strength s: W + s (W' - W); the base at init;
    merge / unmerge exact; the norm detached (sec. 4.3): no gradient reaches m through it."""
    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(layer))
    d = inject_lora(model, ("0",), rank=2, alpha=3, dora=axis)["0"]
    assert type(d) is (DoRAConv2d if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) else DoRALinear)
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 7, 7)
    w = layer.weight.detach()
    assert torch.equal(model(x), layer(x))  # B = 0 and m = ||W||: exactly the base
    assert d.magnitude.shape == ((5,) + (1,) * (w.dim() - 1) if axis == "out" else (1, 6) + (1,) * (w.dim() - 2))
    with torch.no_grad():
        d.lora_up.weight.normal_()
        d.magnitude.mul_(1 + 0.3 * torch.rand_like(d.magnitude))
    v = w + 1.5 * (d.lora_up.weight.flatten(1) @ d.lora_down.weight.flatten(1)).view(w.shape)
    dims = tuple(i for i in range(w.dim()) if i != {"out": 0, "in": 1}[axis])
    closed = d.magnitude * v / v.pow(2).sum(dims, keepdim=True).sqrt()
    for s in (1.0, 0.4):
        d.multiplier = s
        ref = copy.deepcopy(layer)
        ref.weight.data = w + s * (closed - w)
        assert (model(x) - ref(x)).abs().max() < 1e-5
        d.merge()
        assert (model(x) - ref(x)).abs().max() < 1e-5
        d.unmerge()
        assert torch.equal(d.base.weight, w)
    d.multiplier = 1.0
    model(x).square().sum().backward()
    ours = d.lora_up.weight.grad.clone()
    grads = []
    for detach in (True, False):  # eq. 5 by hand, its norm a constant or not
        d.lora_up.weight.grad = None
        v = w + d.delta_weight()
        n = channel_norm(v, axis)
        ref_w = d.magnitude * v / (n.detach() if detach else n)
        y = nn.functional.linear(x, ref_w, layer.bias) if isinstance(layer, nn.Linear) else \
            nn.functional.conv2d(x, ref_w, layer.bias, layer.stride, layer.padding)
        y.square().sum().backward()
        grads.append(d.lora_up.weight.grad.clone())
    assert torch.allclose(ours, grads[0], rtol=1e-4, atol=1e-5)
    assert (grads[1] - grads[0]).abs().max() > 1e-3 * grads[0].abs().max()  # detaching is a choice that shows


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_fp16_base_with_autocast_and_gradscaler(axis, device):
    """fp16 frozen base, fp32 factors and magnitudes (they stay fp32 through .half()), autocast + GradScaler."""
    from test_lora import UNET_TARGETS, _amp_steps, tiny

    model = tiny().to(device)
    loras = inject_lora(model, UNET_TARGETS + ("proj_in",), rank=4, alpha=4, dora=axis)
    start = {k: m.magnitude.detach().clone() for k, m in loras.items()}
    model.half()
    assert all(m.magnitude.dtype == torch.float32 and m.base.weight.dtype == torch.float16 for m in loras.values())
    _amp_steps(model, loras, device)
    assert all(torch.isfinite(m.magnitude).all() and m.lora_up.weight.abs().sum() > 0 for m in loras.values())
    assert all((m.magnitude - start[k]).abs().max() > 0 for k, m in loras.items())


def test_ema_closed_form_and_swap():
    """shadow_t = d_t shadow + (1 - d_t) p_t with d_t = min(decay, (1 + t) / (10 + t)); applied() swaps and restores."""
    p = nn.Parameter(torch.zeros(3))
    ema = EMA([p], 0.9)
    expected = torch.zeros(3)
    for t in range(30):
        with torch.no_grad():
            p.add_(1.0)
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * p.detach()
    assert torch.allclose(ema.shadow[0], expected, atol=1e-6)
    raw = p.detach().clone()
    with ema.applied():
        assert torch.allclose(p, expected, atol=1e-6)
    assert torch.equal(p, raw)
    again = EMA([p], 0.5)
    again.load_state_dict(ema.state_dict())
    assert again.decay == 0.9 and again.updates == 30 and torch.equal(again.shadow[0], ema.shadow[0])


def test_dora_ema_run_resumes_byte_identically(tiny_sd1, tmp_path, monkeypatch):
    """train.py --dora --ema-decay, with LoCon convs and the text encoder: Ctrl-C + --resume writes the same
    lora.safetensors and lora_raw.safetensors as an uninterrupted run, byte for byte; lora.safetensors is the
    average of the checkpoints' factors (closed form), with dora_scale keys of LyCORIS' shape; validation
    (at the end of epoch 1, step 3) sees the average."""
    from dreambooth_min.run import training

    seen = {}
    monkeypatch.setattr(training, "validate_on_main", lambda cfg, setup, epoch, step=0: seen.setdefault(
        (cfg.output, step), {k: v.clone() for k, v in setup.lora_tensors().items()}))
    kw = dict(steps=4, dora="out", ema_decay=0.9, save_every=1, keep_checkpoints=10, prior_weight=0.0,
              lora_targets=("to_q", "to_k", "to_v", "to_out.0", "conv1"), conv_rank=2, train_text_encoder=True,
              validate_every=1)
    whole = train(config(tmp_path / "a", tiny_sd1["single"], **kw), **QUIET)
    cfg = config(tmp_path / "b", tiny_sd1["single"], **kw)
    train(cfg, stop_after=2, **QUIET)
    resumed = train(cfg, resume=True, **QUIET)
    out_a, out_b = Path(whole["output"]), Path(resumed["output"])
    for name in ("lora.safetensors", "lora_raw.safetensors"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name
    final, _ = load_lora(out_a / "lora.safetensors")
    raw, _ = load_lora(out_a / "lora_raw.safetensors")
    k = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert final[k + ".dora_scale"].shape == (32, 1, 1, 1) and final[k + ".lora_down.weight"].shape == (2, 32, 3, 3)
    assert final["lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale"].shape == (32, 1)
    # the average from the start (step 0: our own initialisation, same seed) and the 4 checkpoints' raw tensors
    start_cfg = config(tmp_path / "c", tiny_sd1["single"], **kw)
    sd = load(tiny_sd1["single"])
    unet_loras, text_loras, _ = add_lora(start_cfg, sd)
    average = lora_state_dict(unet_loras, text_loras)
    for t in range(4):  # steps 1-3 in checkpoints; the last step's tensors in lora_raw.safetensors
        step, _ = load_lora(out_a / ("checkpoints" / Path(f"step_{t + 1:06d}") / "lora.safetensors" if t < 3
                                     else Path("lora_raw.safetensors")))
        d = min(0.9, (1 + t) / (10 + t))
        average = {key: d * v + (1 - d) * step[key] if "alpha" not in key else v for key, v in average.items()}
        if t == 2:  # what validation drew with after step 3
            validated = seen[(str(tmp_path / "a" / "run"), 3)]
            assert max((average[key] - validated[key]).abs().max().item() for key in validated) < 1e-6
            assert (validated[k + ".lora_up.weight"] - step[k + ".lora_up.weight"]).abs().max() > 1e-5
    assert max((average[key] - final[key]).abs().max().item() for key in final) < 1e-6
    assert (raw[k + ".lora_up.weight"] - final[k + ".lora_up.weight"]).abs().max() > 1e-5
    assert (raw[k + ".dora_scale"] - final[k + ".dora_scale"]).abs().max() > 0


# ---------------------------------------------------------------------------------------------------
# Against diffusers + peft (LoraConfig(use_dora=True)): a DoRA we trained, loaded into peft's layers

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1")


@pytest.fixture(scope="module")
def trained_dora(tiny_sd1, tmp_path_factory):
    """A DoRA trained by train.py on the tiny SD 1.x model (a high rate: visible in a 4-step run)."""
    tmp = tmp_path_factory.mktemp("dora")
    r = train(config(tmp, tiny_sd1["folder"], steps=4, lr=2e-2, dora="out", prior_weight=0.0, lora_targets=TARGETS,
                     conv_rank=2, alpha=2), **QUIET)
    return Path(r["lora"])


def _peft_dora(unet, tensors):
    """diffusers' UNet with peft's DoRA layers (LoRA ranks and alphas as in the file), holding the file's tensors."""
    from peft import LoraConfig

    ranks = {n: tensors[kohya_name(n, "unet") + ".lora_down.weight"].shape[0] for n, _ in unet.named_modules()
             if kohya_name(n, "unet") + ".lora_down.weight" in tensors}
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, use_dora=True, target_modules=sorted(ranks),
                                rank_pattern={n: r for n, r in ranks.items() if r != 4}))
    with torch.no_grad():
        for name, m in unet.named_modules():
            if name in ranks:
                k = kohya_name(name, "unet")
                for theirs, ours in ((m.lora_A["default"].weight, "lora_down.weight"),
                                     (m.lora_B["default"].weight, "lora_up.weight"),
                                     (m.lora_magnitude_vector["default"].weight, "dora_scale")):
                    theirs.copy_(tensors[f"{k}.{ours}"].reshape(theirs.shape))
    return unet


def test_dora_forward_matches_peft(tiny_sd1, trained_dora):
    """Our DoRA wrappers (as trained), and the file merged by apply_lora, == peft's DoRA layers with the same
    tensors, on the tiny UNet: within fp32 noise. And peft's own DoRA file (lora_magnitude_vector: [out], convs
    [1, out, 1, 1]) read by apply_lora gives the same."""
    pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    tensors, _ = load_lora(trained_dora)
    peft_unet = _peft_dora(copy.deepcopy(tiny_sd1["pipe"].unet), tensors)
    peft_file = {"unet." + k: v for k, v in get_peft_model_state_dict(peft_unet).items()}
    x, c = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.randn(2, 5, 32)
    assert_well_conditioned("trained DoRA in peft's UNet", lambda: peft_unet(x, 10, c).sample, [peft_unet], 5e-4)
    sd = load(tiny_sd1["folder"])
    with torch.no_grad():
        theirs = peft_unet(x, 10, c).sample
        base = sd.unet(x, torch.tensor(10), c)
        assert (theirs - base).abs().max() > 1e-3  # the DoRA does something
        for merge, file, meta in ((False, tensors, None), (True, tensors, None),
                                  (True, peft_file, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2})})):
            unet = copy.deepcopy(sd.unet)
            applied = apply_lora(unet, None, file, merge=merge, metadata=meta)
            assert len(applied) == len(tensors) // 4  # down, up, alpha, dora_scale per layer
            assert all(isinstance(m, DoRALinear) is not merge for m in applied.values())
            diff = (unet(x, torch.tensor(10), c) - theirs).abs().max().item()
            print(f"DoRA forward, ours ({'merged' if merge else 'wrappers'}, {'peft' if meta else 'our'} file) "
                  f"vs peft: max |diff| {diff:.2e}")
            assert diff < 5e-4


def test_dora_image_matches_peft(tiny_sd1, trained_dora, tmp_path):
    """sample.py --lora DORA == diffusers' pipeline with peft's DoRA layers holding the same tensors: within 1/255."""
    pytest.importorskip("peft")
    pipe = copy.deepcopy(tiny_sd1["pipe"])
    pipe.unet = _peft_dora(pipe.unet, load_lora(trained_dora)[0])
    out = tmp_path / "out.png"
    assert sample.main(["--model", str(tiny_sd1["folder"]), "--prompt", PROMPT, "--steps", "5", "--height", "48",
                        "--width", "48", "--seed", "1", "--lora", str(trained_dora), "--out", str(out),
                        "--no-progress"]) == 0
    ours = np.asarray(Image.open(out))[None]
    ref = _reference_images(pipe, [1], 48, 48, steps=5, name="trained DoRA in peft")
    base = _reference_images(tiny_sd1["pipe"], [1], 48, 48, steps=5, name="tiny_sd1")
    diff = np.abs(ours.astype(int) - ref.astype(int))
    print(f"DoRA image vs peft: max |diff| {diff.max()}/255; vs the base model {np.abs(base.astype(int) - ref).max()}")
    _assert_same_pixels(ours, ref)
    assert diff.max() <= 1 and np.abs(base.astype(int) - ref.astype(int)).max() > 4  # and the DoRA shows
