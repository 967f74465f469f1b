"""Sampling: guidance and the DDIM loop against closed forms and diffusers, and whole images (library and
CLI) against diffusers' StableDiffusionPipeline on the tiny seeded models, pixel for pixel."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from dreambooth_min import sampling
from dreambooth_min.formats import png
from dreambooth_min.scheduler import ddim_timesteps

from conditioning import assert_well_conditioned

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks girl"


class ToyUNet(torch.nn.Module):
    """out = w * x * mean(context) + t / 1000: cheap, deterministic, and sensitive to every input."""

    def __init__(self, in_channels=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.config = type("Config", (), {"in_channels": in_channels})()
        self.batches = []

    def forward(self, x, t, context):
        self.batches.append(x.shape[0])
        return self.w * x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1).to(x.dtype) + t / 1000


def test_guidance_closed_form_uncond_first():
    unet = ToyUNet()
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    uncond, cond = torch.full((2, 77, 8), -1.0), torch.full((2, 77, 8), 2.0)
    out = sampling.guided_prediction(unet, x, 501, torch.cat([uncond, cond]), 7.5)
    u, c = 0.3 * x * -1 + 0.501, 0.3 * x * 2 + 0.501
    assert torch.allclose(out, u + 7.5 * (c - u), atol=1e-5)
    assert unet.batches == [4]  # both halves in one UNet batch
    out = sampling.guided_prediction(unet, x, 501, cond, 1.0)  # w = 1: conditional model alone
    assert torch.allclose(out, c, atol=1e-6) and unet.batches[-1] == 2


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_sample_matches_diffusers_loop(kind):
    """Our loop (guidance, eta noise from per-image generators) == diffusers' DDIMScheduler driven the
    way StableDiffusionPipeline drives it, with generator=[...] lists."""
    from diffusers import DDIMScheduler

    unet = ToyUNet()
    context = torch.cat([torch.full((2, 77, 8), -0.5), torch.full((2, 77, 8), 1.5)])
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x_T = sampling._gaussian(gens, (1, 4, 4, 4), context)  # the generators go on to draw each step's noise
    ours = sampling.ddim_sample(unet, x_T, context, steps=10, guidance=5.0, eta=0.5, prediction_type=kind,
                                generators=gens, progress=False)
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, prediction_type=kind)
    ref.set_timesteps(10)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x = torch.cat([torch.randn((1, 4, 4, 4), generator=g) for g in gens])
    assert torch.equal(x, x_T)
    for t in ref.timesteps:
        u, c = unet(torch.cat([x, x]), t, context).chunk(2)
        x = ref.step(u + 5.0 * (c - u), t, x, eta=0.5, generator=gens).prev_sample
    assert (ours - x).abs().max().item() < 1e-5 * max(1.0, x.abs().max().item())


def test_ddim_sample_keeps_latents_float32_with_a_bf16_unet():
    unet = ToyUNet().to(torch.bfloat16)
    context = torch.ones(2, 77, 8, dtype=torch.bfloat16)
    x = sampling.ddim_sample(unet, torch.ones(1, 4, 2, 2), context, steps=3, progress=False)
    assert x.dtype == torch.float32


def test_ddim_options_from_a_scheduler_config():
    assert sampling.ddim_options({}) == dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                             clip_sample=False)
    sd21 = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction"}
    assert sampling.ddim_options(sd21) == sampling.ddim_options({})
    assert sampling.ddim_options({"timestep_spacing": "trailing", "steps_offset": 0})["timestep_spacing"] == "trailing"
    with pytest.warns(UserWarning, match="beta_schedule"):
        sampling.ddim_options({"beta_schedule": "linear"})
    with pytest.raises(sampling.UserError, match="timestep_spacing"):
        sampling.ddim_options({"timestep_spacing": "karras"})


# ---------------------------------------------------------------------------------------------------
# Whole images vs diffusers' StableDiffusionPipeline (DDIM, eta 0), on the CPU in fp32

def _reference_images(pipe, seeds, height, width, negative_prompt=None, steps=20, guidance=7.5, *, name):
    """diffusers' images, after showing once per (name, settings) that the comparison is well-conditioned: 1e-6
    relative noise on the pipeline's weights moves the float image by < 0.2/255 at most and < 0.005/255 on
    average (a tenth of _assert_same_pixels' 2/255 and 5%). At 32x32 the tiny UNet's lowest level is 1x1 and
    its GroupNorm normalises 2 numbers per group: the image is chaotic there, so comparisons use >= 40 pixels."""
    def float_images():
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPT, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                    height=height, width=width, num_images_per_prompt=len(seeds), output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images * 255

    assert_well_conditioned(f"{name} image {height}x{width} {steps} steps seeds {seeds} neg {negative_prompt}",
                            float_images, [pipe.unet, pipe.text_encoder, pipe.vae], atol=2, mean_atol=0.05)
    return float_images().round().astype(np.uint8)  # diffusers' own numpy -> PIL rounding


def _assert_same_pixels(ours, ref):
    diff = np.abs(ours.astype(int) - ref.astype(int))
    print(f"max |diff| {diff.max()}/255, {np.mean(diff > 0):.2%} of values differ")
    assert ours.shape == ref.shape
    assert diff.max() <= 2 and np.mean(diff > 0) < 0.05
    assert ref.std() > 20  # a real image, not a saturated or flat one that would match anything


@pytest.mark.parametrize("layout", ["folder", "single"])
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_generate_matches_diffusers(version, layout, request):
    import dreambooth_min

    tiny = request.getfixturevalue(f"tiny_{version}")
    sd = dreambooth_min.load(tiny[layout])
    assert sd.prediction_type == ("epsilon" if version == "sd1" else "v_prediction")
    seeds = [7, 8] if layout == "folder" else [7]  # two images batched together in one case of each version
    images = sampling.generate(sd, PROMPT, "blurry", num_images=len(seeds), steps=10, seed=7, height=64, width=48,
                               progress=False)
    ours = np.stack([np.asarray(im) for im in images])
    _assert_same_pixels(ours, _reference_images(tiny["pipe"], seeds, 64, 48, negative_prompt="blurry", steps=10,
                                                name=f"tiny_{version}"))


def test_generate_follows_the_folder_scheduler_config(tiny_sd1):
    """A folder whose scheduler config says trailing spacing, offset 0 and set_alpha_to_one gets them."""
    import dreambooth_min
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    changes = dict(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True)
    sd = dreambooth_min.load(tiny_sd1["folder"])
    sd.scheduler_config = dict(sd.scheduler_config, **changes)
    ours = np.asarray(sampling.generate(sd, PROMPT, steps=5, seed=4, height=32, width=40, progress=False)[0])
    pipe = tiny_sd1["pipe"]
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **changes)
    pipe = StableDiffusionPipeline(**dict(pipe.components, scheduler=scheduler))
    _assert_same_pixels(ours[None], _reference_images(pipe, [4], 32, 40, steps=5, name="trailing-spacing scheduler"))


def test_cli_matches_diffusers_and_records_settings(tiny_sd2, tmp_path):
    out = tmp_path / "img" / "out.png"
    args = ["--model", str(tiny_sd2["single"]), "--prompt", PROMPT, "--seed", "3", "--steps", "20",
            "--guidance", "7.5", "--height", "48", "--width", "64", "--out", str(out), "--no-progress"]
    assert sample.main(args) == 0
    image = Image.open(out)
    _assert_same_pixels(np.asarray(image)[None], _reference_images(tiny_sd2["pipe"], [3], 48, 64, name="tiny_sd2"))
    assert image.text["parameters"] == (f"{PROMPT}\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 3, "
                                        "Size: 64x48, Model: tiny-sd2, Eta: 0.0")
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]  # no temp file left behind


def test_cli_several_images_use_consecutive_seeds(tiny_sd1, tmp_path):
    out = tmp_path / "out.png"
    args = ["--model", str(tiny_sd1["folder"]), "--prompt", PROMPT, "--negative-prompt", "ugly", "--seed", "10",
            "--steps", "5", "--num-images", "3", "--height", "48", "--width", "48", "--out", str(out), "--no-progress"]
    assert sample.main(args) == 0
    ref = _reference_images(tiny_sd1["pipe"], [12], 48, 48, negative_prompt="ugly", steps=5, name="tiny_sd1")
    third = Image.open(tmp_path / "out-2.png")
    _assert_same_pixels(np.asarray(third)[None], ref)  # image 2 is seed 12's image, alone or in a batch
    assert "Negative prompt: ugly\nSteps: 5," in third.text["parameters"] and "Seed: 12," in third.text["parameters"]
    grid = np.asarray(Image.open(out))
    assert grid.shape == (96, 96, 3)  # 3 images in a 2 x 2 grid
    assert np.array_equal(grid[48:, :48], np.asarray(third)) and not grid[48:, 48:].any()


def test_cli_lora_matches_diffusers_fused_lora(tmp_path):
    """--lora FILE --lora-scale s == diffusers' load_lora_weights + fuse_lora(lora_scale=s) (kohya file,
    UNet and text encoder layers)."""
    pytest.importorskip("peft")  # diffusers' LoRA loader needs it
    from dreambooth_min.formats.lora_file import save_lora
    from dreambooth_min.formats.lora_names import kohya_name
    from tiny import make_pipeline, save_folder

    pipe = make_pipeline("sd1")  # our own copy: loading a LoRA changes the pipeline
    save_folder(pipe, tmp_path / "model")
    g, tensors = torch.Generator().manual_seed(0), {}
    for part, model, targets in (("unet", pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")),
                                 ("te", pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"))):
        for name, m in model.named_modules():
            if name.endswith(targets):
                k = kohya_name(name, part)
                tensors[k + ".lora_down.weight"] = 0.3 * torch.randn(2, m.in_features, generator=g)
                tensors[k + ".lora_up.weight"] = 0.3 * torch.randn(m.out_features, 2, generator=g)
                tensors[k + ".alpha"] = torch.tensor(1.0)
    save_lora(tmp_path / "sks.safetensors", tensors)
    out = tmp_path / "out.png"
    assert sample.main(["--model", str(tmp_path / "model"), "--prompt", PROMPT, "--steps", "5", "--height", "48",
                        "--width", "48", "--seed", "1", "--lora", str(tmp_path / "sks.safetensors"),
                        "--lora-scale", "0.7", "--out", str(out), "--no-progress"]) == 0
    pipe.load_lora_weights(str(tmp_path), weight_name="sks.safetensors")
    pipe.fuse_lora(lora_scale=0.7)
    image = Image.open(out)
    _assert_same_pixels(np.asarray(image)[None], _reference_images(pipe, [1], 48, 48, steps=5, name="fused kohya LoRA"))
    assert image.text["parameters"].endswith(", Eta: 0.0, LoRA: sks:0.7")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_fp16_cuda_close_to_fp32_cpu(tiny_sd2):
    """fp16 UNet/VAE on CUDA with float32 DDIM arithmetic stays near the fp32 CPU image."""
    import dreambooth_min

    sd = dreambooth_min.load(tiny_sd2["folder"], dtype=torch.float16, device="cuda")
    ours = np.asarray(sampling.generate(sd, PROMPT, steps=20, seed=7, height=64, width=48, progress=False)[0])
    ref = _reference_images(tiny_sd2["pipe"], [7], 64, 48, name="tiny_sd2")[0]
    diff = np.abs(ours.astype(int) - ref.astype(int))
    print(f"fp16 CUDA vs fp32 CPU: max |diff| {diff.max()}/255, mean {diff.mean():.3f}")
    assert ours.std() > 20 and diff.mean() < 4


# ---------------------------------------------------------------------------------------------------
# Files and errors

def test_save_png_is_atomic_and_keeps_parameters(tmp_path):
    path = tmp_path / "a" / "x.png"
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    text = png.parameters_text("ein Foto von sks Hündin 🐕", "", 20, 7.5, 0, 512, 768, "v1-5-pruned-emaonly", 0.0)
    assert text == ("ein Foto von sks Hündin 🐕\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 512x768, "
                    "Model: v1-5-pruned-emaonly, Eta: 0.0")
    png.save_png(image, path, text)
    back = Image.open(path)
    assert back.text["parameters"] == text and np.array_equal(np.asarray(back), np.asarray(image))
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]


def test_decode_postprocess_rounds_like_diffusers():
    class IdentityVAE(torch.nn.Module):
        scaling_factor = 0.5
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
        def decode(self, z):
            return z

    sd = type("SD", (), {"vae": IdentityVAE()})()
    x = torch.tensor([-2.0, -1.0, 0.0, 1 / 255, 0.5, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    got = sampling.decode(sd, x * 0.5)[0, 0, :, 0].tolist()  # latents are multiplied by 1/scaling_factor first
    assert got == [0, 0, 128, 128, 191, 255, 255]  # (x/2 + 0.5).clamp(0, 1) * 255, round half to even


@pytest.mark.parametrize("extra, message", [
    (["--height", "500"], "error: height must be a positive multiple of 8, not 500"),
    (["--width", "0"], "error: width must be a positive multiple of 8, not 0"),
    (["--out", "x.jpg"], "error: --out must be a .png file"),
    (["--model", "/nonexistent/model.safetensors"], "error: model not found: /nonexistent/model.safetensors"),
    (["--eta", "-1"], "error: --eta must be >= 0, not -1.0"),
    (["--device", "gpu0"], "error: --device must be cuda, cuda:N or cpu, not 'gpu0'"),
])
def test_cli_errors_are_one_line(extra, message, capsys):
    args = ["--model", "/nonexistent/model.safetensors", "--prompt", "", "--no-progress"] + extra
    assert sample.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_script_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(tmp_path / "missing"), "--prompt", "x"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: model not found") and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_timesteps_passed_to_the_unet_are_diffusers():
    unet = ToyUNet()
    seen = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    sampling.ddim_sample(unet, torch.zeros(1, 4, 2, 2), torch.zeros(2, 77, 8), steps=20, progress=False)
    assert seen == ddim_timesteps(20) == list(range(951, 0, -50))
