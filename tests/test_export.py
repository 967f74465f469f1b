"""export.save_diffusers_folder: our modules -> a diffusers folder that load() and diffusers both read."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreambooth_min.errors import UserError
from dreambooth_min.formats import checkpoint
from dreambooth_min.formats.export import save_diffusers_folder
from dreambooth_min.formats.make_tiny import build_tiny

from conditioning import assert_well_conditioned

ROOT = Path(__file__).resolve().parents[1]
# Tolerances a tenth of which stays above what 1e-6 relative weight noise does (tests/conditioning.py): the
# UNet output moves by ~1.2e-5, the VAE latent mean by ~2e-6.
UNET_TOL, VAE_TOL = 1e-3, 1e-4


def _inputs(unet, text_dim, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, text_dim, generator=g))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request, tmp_path_factory):
    version = request.param
    unet, vae, text = build_tiny(version, seed=1)
    for m in (unet, vae, text):
        m.requires_grad_(False)  # as load() gives them: frozen layers take another (equal up to rounding) path
    pred = "epsilon" if version == "sd1" else "v_prediction"
    path = save_diffusers_folder(tmp_path_factory.mktemp("export") / "model", unet, vae, text, version, pred)
    return dict(version=version, pred=pred, unet=unet, vae=vae, text=text, path=path)


def test_load_gives_identical_tensors_and_output(exported):
    sd = checkpoint.load(exported["path"])
    assert (sd.version, sd.prediction_type) == (exported["version"], exported["pred"])
    for ours, loaded in ((exported["unet"], sd.unet), (exported["vae"], sd.vae), (exported["text"], sd.text_encoder)):
        a, b = ours.state_dict(), loaded.state_dict()
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert sd.unet.config == exported["unet"].config
    assert sd.vae.config == exported["vae"].config
    x, t, ctx = _inputs(sd.unet, sd.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(sd.unet(x, t, ctx), exported["unet"](x, t, ctx))
    # Prompts encode the same: the tokenizer written beside the weights pads as ours does.
    ids = sd.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77).input_ids
    assert len(ids[0]) == 77


def test_diffusers_reads_it_with_the_same_unet_output(exported):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(exported["path"], safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == exported["pred"]
    assert pipe.tokenizer.model_max_length == 77
    unet = exported["unet"]
    x, t, ctx = _inputs(unet, unet.config.cross_attention_dim)
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert_well_conditioned(f"exported {exported['version']} UNet and VAE in diffusers", lambda: [
        pipe.unet(x, t, encoder_hidden_states=ctx).sample, pipe.vae.encode(img).latent_dist.mean],
        [pipe.unet, pipe.vae], [UNET_TOL, VAE_TOL])
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        ours = unet(x, t, ctx)
        assert (ours - ref).abs().max() <= UNET_TOL, (ours - ref).abs().max()
        ref_mean = pipe.vae.encode(img).latent_dist.mean
        assert (exported["vae"].encode(img)[0] - ref_mean).abs().max() <= VAE_TOL
        # Text: diffusers' tokenizer + encoder from the folder equal our load()'s.
        sd = checkpoint.load(exported["path"])
        ref_ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                                 truncation=True, return_tensors="pt").input_ids
        ours_ids = sd.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                                truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ref_ids, ours_ids)


def test_replaces_a_model_folder_atomically_and_refuses_other_folders(tmp_path):
    unet, vae, text = build_tiny("sd1", seed=0)
    path = save_diffusers_folder(tmp_path / "m", unet, vae, text, "sd1", "epsilon")
    first = (path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    unet2, vae2, text2 = build_tiny("sd1", seed=5)
    save_diffusers_folder(path, unet2, vae2, text2, "sd1", "epsilon")
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left
    assert oct(path.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not a diffusers model folder"):
        save_diffusers_folder(other, unet, vae, text, "sd1", "epsilon")
    with pytest.raises(UserError, match="prediction type"):
        save_diffusers_folder(tmp_path / "n", unet, vae, text, "sd1", "eps")
    assert (other / "a.jpg").exists() and not (tmp_path / "n").exists()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_make_tiny_command_writes_a_loadable_model(tmp_path):
    # `python -m dreambooth_min.formats.make_tiny ...` with the test-only packages made unimportable: requirements.txt suffices.
    argv = ["make_tiny", str(tmp_path / "tiny-sd2"), "--version", "sd2", "--seed", "4"]
    code = ("import runpy, sys; sys.modules.update(diffusers=None, peft=None, accelerate=None); "
            f"sys.argv = {argv!r}; runpy.run_module('dreambooth_min.formats.make_tiny', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "noise" in r.stdout
    sd = checkpoint.load(tmp_path / "tiny-sd2")
    assert (sd.version, sd.prediction_type) == ("sd2", "v_prediction")
    assert json.loads((tmp_path / "tiny-sd2" / "unet" / "config.json").read_text())["sample_size"] == 8
    unet, _, text = build_tiny("sd2", seed=4)  # seeded: the same weights again
    for k, v in unet.state_dict().items():
        assert torch.equal(sd.unet.state_dict()[k], v), k
    for k, v in text.state_dict().items():
        assert torch.equal(sd.text_encoder.state_dict()[k], v), k
