"""SDXL: the model against diffusers on a tiny random SDXL in both layouts, the real file layout, refusals, a seed image."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dreambooth_min import UserError, load
from dreambooth_min.conditioning import Cond, size_time_ids
from dreambooth_min.formats.checkpoint_names import UNET_PREFIX, VAE_PREFIX, infer_unet_config, infer_vae_config, rename
from dreambooth_min.formats.checkpoint_names import unet_rename_table, vae_rename_table
from dreambooth_min.formats.checkpoint_sdxl import BIGG_PREFIX, CLIP_L_PREFIX, single_file_family
from dreambooth_min.formats.safetensors_io import save_atomic
from dreambooth_min.formats.text_weights import convert_open_clip_with_projection, text_config_from_state_dict
from dreambooth_min.formats.text_weights import text_encoder_2_config
from dreambooth_min.unet import UNet2DConditionModel, UNetConfig
from dreambooth_min.vae import AutoencoderKL

TOL = 1e-4
PROMPTS = ["a photo of sks dog", "", "a red cube on a table, photograph"]
DATA = Path(__file__).parent / "data"


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _unet_inputs(seed=0):
    """Two rows: diffusers' default size conditioning, and a cropped photo of another size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 24, generator=g)
    cond = Cond(torch.randn(2, 77, 160, generator=g), torch.randn(2, 128, generator=g),
                torch.stack([size_time_ids((1024, 1024), (0, 0), (1024, 1024)),
                             size_time_ids((683, 1024), (24, 77), (1024, 1024))]))
    return x, torch.tensor([10, 700]), cond


def _reference_unet(pipe, x, t, cond):
    kwargs = dict(text_embeds=cond.pooled, time_ids=cond.time_ids)
    return pipe.unet(x, t, encoder_hidden_states=cond.context, added_cond_kwargs=kwargs).sample


@pytest.mark.parametrize("layout", ["single", "folder"])
def test_unet_text_encoders_vae_match_diffusers(tiny_sdxl, layout):
    pipe, sd = tiny_sdxl["pipe"], load(tiny_sdxl[layout])
    assert (sd.version, sd.prediction_type, sd.default_resolution) == ("sdxl", "epsilon", 1024)
    x, t, cond = _unet_inputs()
    with torch.no_grad():
        ours, ref = sd.unet(x, t, cond), _reference_unet(pipe, x, t, cond)
        print(f"UNet max |diff| {maxdiff(ours, ref):.2e} (output scale {ref.abs().max():.2f})")
        assert maxdiff(ours, ref) <= TOL
        for tokenizer, ours_tok, encoder, ours_enc in ((pipe.tokenizer, sd.tokenizer, pipe.text_encoder, sd.text_encoder),
                                                       (pipe.tokenizer_2, sd.tokenizer_2, pipe.text_encoder_2,
                                                        sd.text_encoder_2)):
            ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
            assert torch.equal(torch.tensor([r + [ours_tok.pad_token_id] * (77 - len(r))
                                             for r in ours_tok(PROMPTS).input_ids]), ids)  # same pad token
            a, b = ours_enc(ids, output_hidden_states=True), encoder(ids, output_hidden_states=True)
            assert max(maxdiff(h, k) for h, k in zip(a.hidden_states, b.hidden_states)) <= TOL
        assert maxdiff(a.text_embeds, b.text_embeds) <= TOL
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        c = sd.encode_prompt(PROMPTS)
        print(f"text: context {maxdiff(c.context, context):.2e}, pooled {maxdiff(c.pooled, pooled):.2e}")
        assert c.context.shape == (3, 77, 160) and maxdiff(c.context, context) <= TOL and maxdiff(c.pooled, pooled) <= TOL
        img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
        mean, logvar = sd.vae.encode(img)
        dist = pipe.vae.encode(img).latent_dist
        z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))
        print(f"VAE: encode {maxdiff(mean, dist.mean):.2e}, decode {maxdiff(sd.vae.decode(z), pipe.vae.decode(z).sample):.2e}")
        assert maxdiff(mean, dist.mean) <= TOL and maxdiff(logvar, dist.logvar) <= TOL
        assert maxdiff(sd.vae.decode(z), pipe.vae.decode(z).sample) <= TOL
    assert sd.vae.scaling_factor == pytest.approx(0.13025)


def test_fixture_is_well_conditioned(tiny_sdxl):
    """A 1e-6 relative perturbation of every UNet and text weight moves the outputs by far less than TOL,
    so agreement within TOL is meaningful (the model is not chaotic). Measured: 1.7e-5 on a UNet output of
    scale 2 (a gain of ~8 through ~60 normalised layers; all of it from the UNet, the text moves 5e-6),
    so fp32 rounding (1e-7) cannot reach TOL, and a wrong tensor would exceed it by far."""
    pipe, sd = tiny_sdxl["pipe"], load(tiny_sdxl["folder"])
    x, t, cond = _unet_inputs()
    with torch.no_grad():
        before, text_before = sd.unet(x, t, cond), sd.encode_prompt(PROMPTS)
        g = torch.Generator().manual_seed(3)
        for module in (sd.unet, sd.text_encoder, sd.text_encoder_2):
            for p in module.parameters():
                p.mul_(1 + 1e-6 * torch.randn(p.shape, generator=g))
        after, text_after = sd.unet(x, t, cond), sd.encode_prompt(PROMPTS)
    moved = max(maxdiff(before, after), maxdiff(text_before.context, text_after.context),
                maxdiff(text_before.pooled, text_after.pooled))
    print(f"1e-6 weight noise moves the outputs by {moved:.1e}")
    assert moved < TOL / 4


def test_single_file_and_folder_load_identical_tensors(tiny_sdxl):
    a, b = load(tiny_sdxl["single"]), load(tiny_sdxl["folder"])
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_fixture_single_file_is_what_diffusers_reads_as_sdxl(tiny_sdxl):
    """The tiny file's layout is checked by an independent converter: diffusers' own single-file code
    turns it back into exactly the pipeline's weights (so our writer and reader do not merely agree)."""
    from diffusers.loaders import single_file_utils as su
    from safetensors.torch import load_file

    pipe, file = tiny_sdxl["pipe"], load_file(tiny_sdxl["single"])
    converted = {"unet": su.convert_ldm_unet_checkpoint(file, dict(pipe.unet.config)),
                 "vae": su.convert_ldm_vae_checkpoint(file, dict(pipe.vae.config)),
                 "text_encoder_2": su.convert_open_clip_checkpoint(pipe.text_encoder_2, file, prefix=BIGG_PREFIX)}
    for name, tensors in converted.items():
        ref = getattr(pipe, name).state_dict()
        assert tensors.keys() == ref.keys(), name
        assert all(torch.equal(tensors[k].reshape(ref[k].shape), ref[k]) for k in ref), name


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


# diffusers' unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (the keys that shape the network).
SDXL_UNET_JSON = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                                       "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, num_attention_heads=None, out_channels=4,
    projection_class_embeddings_input_dim=2816, resnet_time_scale_shift="default", sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None, use_linear_projection=True)


def _same_cfg(a, b):
    import dataclasses

    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    return all(as_tuple(getattr(a, f.name)) == as_tuple(getattr(b, f.name)) for f in dataclasses.fields(a))


def test_released_config_builds_diffusers_shapes():
    import diffusers

    assert _same_cfg(UNetConfig.from_diffusers(SDXL_UNET_JSON), UNetConfig.sdxl())
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**SDXL_UNET_JSON)
    ours = _meta(UNet2DConditionModel, UNetConfig.sdxl())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684  # SDXL base's 2.6B UNet


def test_real_sdxl_layout_maps_onto_our_modules():
    """tests/data/sdxl_keys.json: every tensor name and shape of sd_xl_base_1.0.safetensors (2515), as
    Stability-AI's generative-models code builds them from configs/inference/sd_xl_base.yaml: the UNet and
    VAE from sgm's own modules (openaimodel.UNetModel, model.Encoder/Decoder) on the meta device, CLIP-L
    from transformers' CLIPTextModel (ViT-L/14), and the OpenCLIP bigG text tower (32 resblocks, width
    1280) written out from open_clip's TextTransformer names."""
    manifest = {k: tuple(v) for k, v in json.loads((DATA / "sdxl_keys.json").read_text()).items()}
    assert len(manifest) == 2515 and single_file_family("sdxl", manifest) == "sdxl"
    part = lambda prefix: {k[len(prefix):]: s for k, s in manifest.items() if k.startswith(prefix)}
    unet_cfg = infer_unet_config(part(UNET_PREFIX), pooled_dim=manifest[BIGG_PREFIX + "text_projection"][1])
    assert _same_cfg(unet_cfg, UNetConfig.sdxl())
    for prefix, cfg, cls, table in ((UNET_PREFIX, unet_cfg, UNet2DConditionModel, unet_rename_table(unet_cfg)),
                                    (VAE_PREFIX, infer_vae_config(part(VAE_PREFIX)), AutoencoderKL, None)):
        ours = {k: tuple(v.shape) for k, v in _meta(cls, cfg).state_dict().items()}
        mapped = {rename(k, table or vae_rename_table(cfg)): s for k, s in part(prefix).items()}
        assert mapped.keys() == ours.keys(), set(mapped) ^ set(ours)
        assert all(s == ours[k] or (s[2:] == (1, 1) and s[:2] == ours[k]) for k, s in mapped.items())
    _check_text(part)


def _check_text(part):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_min.formats.text_weights import match_text_prefix

    clip_l = {k: torch.empty(s, device="meta") for k, s in part(CLIP_L_PREFIX).items()}
    bigg = convert_open_clip_with_projection({k: torch.empty(s, device="meta") for k, s in part(BIGG_PREFIX).items()})
    for tensors, config, cls, want in ((clip_l, text_config_from_state_dict(clip_l, "sd1"), CLIPTextModel, (768, 12, 12)),
                                       (bigg, text_encoder_2_config(bigg), CLIPTextModelWithProjection, (1280, 20, 32))):
        assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == want
        with torch.device("meta"):
            model = cls(config)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in match_text_prefix(tensors, model).items()} == ours
    assert config.projection_dim == 1280


# ---------------------------------------------------------------------------------------------------
# Refusals: one line, before slow work

def _rewrite(src, dst, edit):
    from safetensors.torch import load_file

    save_atomic(edit(load_file(src)), dst)
    return dst


def _as_refiner(t):
    """The refiner's layout: OpenCLIP bigG alone, as embedders.0."""
    return {k.replace(BIGG_PREFIX, "conditioner.embedders.0.model."): v for k, v in t.items()
            if not k.startswith(CLIP_L_PREFIX)}


@pytest.mark.parametrize("edit,message", [
    (_as_refiner, "is an SDXL refiner"),
    (lambda t: {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(4),
                "first_stage_model.decoder.conv_in.bias": torch.zeros(4)}, "is a Stable Diffusion 3 checkpoint"),
    (lambda t: {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4)}, "is a Flux checkpoint")])
def test_other_families_single_file_refused(tiny_sdxl, tmp_path, capsys, edit, message):
    import sample

    path = _rewrite(tiny_sdxl["single"], tmp_path / "other.safetensors", edit)
    with pytest.raises(UserError, match=message):
        load(path)
    assert sample.main(["--model", str(path), "--prompt", "x", "--out", str(tmp_path / "o.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("edit,message", [
    (dict(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True), "is an SDXL refiner"),
    (dict(_class_name="StableDiffusion3Pipeline", transformer=["diffusers", "SD3Transformer2DModel"],
          text_encoder_3=["transformers", "T5EncoderModel"]), "(no UNet)")])
def test_other_families_folder_refused(tiny_sdxl, tmp_path, edit, message):
    folder = tmp_path / "other"
    shutil.copytree(tiny_sdxl["folder"], folder)
    index = json.loads((folder / "model_index.json").read_text()) | edit
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(folder)


def test_unet_needs_the_size_conditioning(tiny_sdxl):
    sd = load(tiny_sdxl["folder"])
    x, t, cond = _unet_inputs()
    with pytest.raises(ValueError, match="pooled and time_ids"):
        sd.unet(x, t, cond.context)


def test_vae_stays_fp32_when_the_rest_is_fp16(tiny_sdxl):
    """SDXL's VAE overflows fp16 (NaN / black images): load() keeps it in fp32 under fp16."""
    from dreambooth_min.sampling import decode

    sd = load(tiny_sdxl["single"], dtype=torch.float16)
    assert sd.unet.conv_in.weight.dtype == torch.float16 and sd.text_encoder_2.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in sd.vae.parameters())
    fp32 = load(tiny_sdxl["single"])
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0)).half()
    assert torch.equal(decode(sd, z), decode(fp32, z))


# ---------------------------------------------------------------------------------------------------
# Cond: the rows CFG and the sampler handle

def test_cond_rows():
    g = torch.Generator().manual_seed(0)
    a = Cond(torch.randn(1, 3, 2, generator=g), torch.randn(1, 5, generator=g)).with_time_ids(
        size_time_ids((64, 96), (0, 0), (64, 96)))
    b = Cond(torch.randn(1, 3, 2, generator=g), torch.randn(1, 5, generator=g)).with_time_ids([[1, 2, 3, 4, 5, 6]])
    both = Cond.cat([a.repeat(2), b.repeat(2)])
    assert len(both) == 4 and both.time_ids.tolist()[0] == [64, 96, 0, 0, 64, 96] and both.time_ids.dtype == torch.float32
    u, c = both.chunk(2)
    assert torch.equal(u.context, a.context.repeat(2, 1, 1)) and torch.equal(c.pooled, b.pooled.repeat(2, 1))
    half = both.to(dtype=torch.float16)
    assert half.context.dtype == torch.float16 and half.time_ids.dtype == torch.float32
    assert torch.equal(both[3].context, b.context)
    with pytest.raises(ValueError, match="pooled"):
        Cond.cat([a, Cond(a.context)])


# ---------------------------------------------------------------------------------------------------
# Whole images vs diffusers' StableDiffusionXLPipeline with DDIM, CPU fp32

@pytest.mark.parametrize("layout,negative", [("folder", None), ("single", "blurry, low quality")])
def test_generate_matches_diffusers(tiny_sdxl, layout, negative):
    """Default size conditioning (original = target = 64x96, crop 0, 0); no negative prompt means zero
    embeddings (force_zeros_for_empty_prompt), a negative prompt is encoded."""
    from diffusers import DDIMScheduler

    from dreambooth_min.sampling import generate

    pipe, sd = tiny_sdxl["pipe"], load(tiny_sdxl[layout])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(PROMPTS[0], negative_prompt=negative, num_inference_steps=10, guidance_scale=5.0, height=64, width=96,
               output_type="np", generator=torch.Generator().manual_seed(3)).images[0]
    ref = (ref * 255).round().astype(np.uint8)
    ours = np.asarray(generate(sd, PROMPTS[0], negative or "", steps=10, guidance=5.0, seed=3, height=64, width=96,
                               progress=False)[0])
    diff = np.abs(ours.astype(int) - ref.astype(int))
    print(f"max |diff| {diff.max()}/255, {np.mean(diff > 0):.2%} of values differ")
    assert ours.shape == ref.shape == (64, 96, 3)
    assert diff.max() <= 2 and np.mean(diff > 0) < 0.05 and ref.std() > 20


# ---------------------------------------------------------------------------------------------------
# --model sdxl: the Hub repo and the files fetched from it

# stabilityai/stable-diffusion-xl-base-1.0's file list (the parts that matter: onnx/openvino exports, single files,
# the fp16 variants and the second VAE folder are all there).
SDXL_REPO = ["model_index.json", "scheduler/scheduler_config.json", "sd_xl_base_1.0.safetensors",
             "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors"] + [
    f"{sub}/{f}" for sub in ("tokenizer", "tokenizer_2")
    for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")] + [
    f"{sub}/{f}" for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                                   ("vae_1_0", "diffusion_pytorch_model"), ("text_encoder", "model"),
                                   ("text_encoder_2", "model"))
    for f in ("config.json", f"{stem}.safetensors", f"{stem}.fp16.safetensors", "model.onnx", "openvino_model.bin")]


@pytest.mark.parametrize("fp16", [True, False])
def test_sdxl_short_name_and_files(fp16):
    from dreambooth_min.formats import hub

    assert hub.parse_spec("sdxl") == ("stabilityai/stable-diffusion-xl-base-1.0", None)
    chosen = hub.choose_files(SDXL_REPO, "stabilityai/stable-diffusion-xl-base-1.0", prefer_fp16=fp16)
    weights = [f for f in chosen if f.endswith(".safetensors")]
    variant = ".fp16" if fp16 else ""
    assert weights == [f"unet/diffusion_pytorch_model{variant}.safetensors", f"vae/diffusion_pytorch_model{variant}.safetensors",
                       f"text_encoder/model{variant}.safetensors", f"text_encoder_2/model{variant}.safetensors"]
    assert {"tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "text_encoder_2/config.json"} <= set(chosen)
    assert not any(f.startswith("vae_1_0/") or f.endswith((".onnx", ".bin")) for f in chosen)
    refiner = [f for f in SDXL_REPO if not f.startswith(("text_encoder/", "tokenizer/"))]
    with pytest.raises(UserError, match="not a Stable Diffusion 1.x/2.x/XL base model: it has no text_encoder/"):
        hub.choose_files(refiner, "stabilityai/stable-diffusion-xl-refiner-1.0", prefer_fp16=fp16)


def test_sample_cli_makes_the_generate_image(tiny_sdxl, tmp_path):
    import sample
    from PIL import Image

    from dreambooth_min.sampling import generate

    out = tmp_path / "x.png"
    args = ["--model", str(tiny_sdxl["single"]), "--prompt", PROMPTS[0], "--out", str(out), "--steps", "3",
            "--height", "64", "--width", "96", "--seed", "5", "--device", "cpu", "--no-progress"]
    assert sample.main(args) == 0
    image = Image.open(out)
    want = generate(load(tiny_sdxl["single"]), PROMPTS[0], steps=3, seed=5, height=64, width=96, progress=False)[0]
    assert np.array_equal(np.asarray(image), np.asarray(want))
    assert "Size: 96x64" in image.text["parameters"] and "Model: tiny-sdxl" in image.text["parameters"]


def test_full_shape_parity_script_runs_at_toy_size(capsys):
    """benchmarks/sdxl_parity.py (the full-shape check the GPU machine runs) stays in working order."""
    from benchmarks.sdxl_parity import main

    assert main(["--small", "--resolution", "32"]) == 0
    assert "OK: 4/4 within 0.0001" in capsys.readouterr().out
