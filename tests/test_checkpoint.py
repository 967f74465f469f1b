"""Loading: both layouts, parity with diffusers/transformers on the same weights, detection, bad input."""
import json
import shutil

import pytest
import torch

import dreambooth_min
from dreambooth_min import UserError, find_default_model, load
from dreambooth_min.formats.checkpoint_names import infer_unet_config, rename, unet_rename_table, unrename
from dreambooth_min.formats.checkpoint_names import vae_rename_table
from dreambooth_min.unet import UNetConfig
from dreambooth_min.vae import VAEConfig
from conditioning import assert_well_conditioned
from tiny import make_pipeline, save_single_file

# Tolerances a tenth of which is still above what 1e-6 relative weight noise does (tests/conditioning.py):
# VAE latents and text states move by ~1e-5; UNet outputs and decoded pixels (magnitude 2-3, ~60 layers deep)
# by ~7e-5, so they get 1e-3. Ours and diffusers agree far closer (~1e-6) on these tiny models.
TOL = 1e-4
DEEP_TOL = 1e-3
TOLS = dict(unet=DEEP_TOL, mean=TOL, logvar=TOL, decode=DEEP_TOL, text=TOL)


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _inputs(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 24, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    img, z = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1, torch.randn(1, 4, 8, 12, generator=g)
    ids = pipe.tokenizer(["a photo of sks dog", "a red cube on a table"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    return x, torch.tensor([999, 37]), ctx, img, z, ids


def _reference(pipe):
    """diffusers' / transformers' outputs: UNet, VAE mean, log-variance and decode, text hidden states."""
    x, t, ctx, img, z, ids = _inputs(pipe)
    latent = pipe.vae.encode(img).latent_dist
    return [pipe.unet(x, t, encoder_hidden_states=ctx).sample, latent.mean, latent.logvar, pipe.vae.decode(z).sample,
            pipe.text_encoder(ids).last_hidden_state]


@pytest.fixture(params=["sd1", "sd2"])
def tiny(request):
    tiny = request.getfixturevalue(f"tiny_{request.param}")
    pipe = tiny["pipe"]
    assert_well_conditioned(f"tiny_{request.param} UNet, VAE and text outputs", lambda: _reference(pipe),
                            [pipe.unet, pipe.vae, pipe.text_encoder], atol=list(TOLS.values()))
    return tiny


@pytest.mark.parametrize("layout", ["single", "folder"])
def test_unet_vae_text_match_reference(tiny, layout):
    pipe, sd = tiny["pipe"], load(tiny[layout])
    x, t, ctx, img, z, ids = _inputs(pipe)
    with torch.no_grad():
        ref = _reference(pipe)
        mean, logvar = sd.vae.encode(img)
        ours = [sd.unet(x, t, ctx), mean, logvar, sd.vae.decode(z), sd.text_encoder(ids).last_hidden_state]
        for (name, tol), a, b in zip(TOLS.items(), ours, ref):
            print(f"{name}: max |diff| {maxdiff(a, b):.2e}")
            assert maxdiff(a, b) <= tol, name
        prompt = sd.encode_prompt(["a photo of sks dog"]).context
        assert prompt.shape == (1, 77, ref[-1].shape[-1]) and maxdiff(prompt, ref[-1][:1]) <= TOL
    assert sd.vae.scaling_factor == pytest.approx(0.18215)


def test_single_file_and_folder_give_identical_tensors(tiny):
    a, b = load(tiny["single"]), load(tiny["folder"])
    assert a.version == b.version
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)


def test_version_and_prediction_type(tiny_sd1, tiny_sd2, tmp_path):
    assert (load(tiny_sd1["single"]).version, load(tiny_sd1["single"]).prediction_type) == ("sd1", "epsilon")
    assert (load(tiny_sd2["single"]).version, load(tiny_sd2["single"]).prediction_type) == ("sd2", "v_prediction")
    assert load(tiny_sd2["folder"]).prediction_type == "v_prediction"  # from scheduler_config.json
    assert load(tiny_sd2["folder"]).scheduler_config["steps_offset"] == 1
    base = tmp_path / "v2-1_512-ema-pruned.safetensors"
    shutil.copy(tiny_sd2["single"], base)
    assert load(base).prediction_type == "epsilon"  # 512-base models are epsilon
    assert load(base).default_resolution == 512
    yaml = tmp_path / "mine.yaml"
    shutil.copy(tiny_sd2["single"], tmp_path / "mine.safetensors")
    yaml.write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load(tmp_path / "mine.safetensors").prediction_type == "v_prediction"
    yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert load(tmp_path / "mine.safetensors").prediction_type == "epsilon"
    assert load(base, prediction_type="v_prediction").prediction_type == "v_prediction"
    assert load(tiny_sd2["single"]).default_resolution == 768
    with pytest.raises(UserError, match="prediction type"):
        load(base, prediction_type="sample")


def test_half_precision_files_load_into_requested_dtype(tiny_sd1, tmp_path):
    half = save_single_file(tiny_sd1["pipe"], tmp_path / "half.safetensors", dtype=torch.float16)
    sd = load(half)
    w = sd.unet.conv_in.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, tiny_sd1["pipe"].unet.conv_in.weight.half().float())
    sd = load(half, dtype=torch.bfloat16)
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {torch.bfloat16}


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


@pytest.mark.parametrize("which", ["unet-sd1", "unet-sd2", "vae"])
def test_rename_table_is_one_to_one_and_reversible(which):
    from dreambooth_min.unet import UNet2DConditionModel
    from dreambooth_min.vae import AutoencoderKL

    if which == "vae":
        cfg, table_fn, model = VAEConfig(), vae_rename_table, _meta(AutoencoderKL, VAEConfig())
    else:
        cfg = UNetConfig.sd1() if which == "unet-sd1" else UNetConfig.sd2()
        table_fn, model = unet_rename_table, _meta(UNet2DConditionModel, cfg)
    table = table_fn(cfg)
    ours = list(model.state_dict())
    ldm = [unrename(k, table) for k in ours]
    assert None not in ldm and len(set(ldm)) == len(ldm)
    assert [rename(k, table) for k in ldm] == ours


@pytest.mark.parametrize("cfg", [UNetConfig.sd1(), UNetConfig.sd2()], ids=["sd1", "sd2"])
def test_config_inferred_from_real_shapes(cfg):
    from dreambooth_min.unet import UNet2DConditionModel

    table = unet_rename_table(cfg)
    shapes = {unrename(k, table): tuple(v.shape) for k, v in _meta(UNet2DConditionModel, cfg).state_dict().items()}
    got = infer_unet_config(shapes)
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    for field in ("block_out_channels", "layers_per_block", "attention_levels", "num_attention_heads",
                  "num_head_channels", "cross_attention_dim", "use_linear_projection", "in_channels", "out_channels",
                  "transformer_layers_per_block"):
        assert as_tuple(getattr(got, field)) == as_tuple(getattr(cfg, field)), field


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear UserError each


def test_missing_path():
    with pytest.raises(UserError, match="model not found"):
        load("/nonexistent/model.safetensors")


def test_folder_of_neither_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load(tmp_path)


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(UserError, match="pickle"):
        load(ckpt)
    disguised = tmp_path / "model.safetensors"
    shutil.copy(ckpt, disguised)  # a zip archive under a safetensors name
    with pytest.raises(UserError, match="pickle"):
        load(disguised)


def test_truncated_and_foreign_files(tiny_sd1, tmp_path):
    data = tiny_sd1["single"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not tensors at all" * 10)
    with pytest.raises(UserError, match="not a .safetensors file"):
        load(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not a .safetensors file"):
        load(empty)


def _rewrite(src, dst, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst))
    return dst


def test_missing_misshaped_and_unknown_tensors(tiny_sd1, tmp_path):
    key = "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"
    f = _rewrite(tiny_sd1["single"], tmp_path / "a.safetensors", lambda t: t.pop(key))
    with pytest.raises(UserError, match="missing.*down_blocks.0.resnets.0.time_emb_proj.weight"):
        load(f)
    f = _rewrite(tiny_sd1["single"], tmp_path / "b.safetensors", lambda t: t.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(UserError, match=r"shape \(3, 3\)"):
        load(f)
    f = _rewrite(tiny_sd1["single"], tmp_path / "c.safetensors",
                 lambda t: [t.pop(k) for k in list(t) if k.startswith("model.diffusion_model.")])
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint"):
        load(f)
    f = _rewrite(tiny_sd1["single"], tmp_path / "d.safetensors",
                 lambda t: t.__setitem__("conditioner.embedders.0.model.ln_final.weight", torch.zeros(1)))
    with pytest.raises(UserError, match="SDXL refiner"):
        load(f)
    f = _rewrite(tiny_sd1["single"], tmp_path / "e.safetensors",
                 lambda t: t.__setitem__("lora_unet_down_blocks_0_x.lora_down.weight", torch.zeros(1)))
    with pytest.raises(UserError, match="LoRA file"):
        load(f)
    f = _rewrite(tiny_sd1["single"], tmp_path / "f.safetensors",
                 lambda t: t.pop("model.diffusion_model.out.2.weight"))
    with pytest.raises(UserError, match="unknown UNet architecture"):
        load(f)


def test_folder_with_pickle_weights(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1["folder"], tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        load(folder)


def test_find_default_model(tiny_sd1, tmp_path):
    assert find_default_model(tmp_path) == "sd15"  # nothing in weights/: SD 1.5 from the Hub
    shutil.copy(tiny_sd1["single"], tmp_path / "a.safetensors")
    assert find_default_model(tmp_path) == tmp_path / "a.safetensors"
    shutil.copytree(tiny_sd1["folder"], tmp_path / "b")
    with pytest.raises(UserError, match="several models"):
        find_default_model(tmp_path)


def test_package_does_not_import_diffusers():
    import subprocess
    import sys

    code = ("import sys, dreambooth_min; dreambooth_min.load; import dreambooth_min.formats.checkpoint, dreambooth_min.sampling;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'peft', 'accelerate')]; print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------------
# The real SD 1.5 / 2.1 file layouts. tests/data/sd15_keys.json and sd21_keys.json list every tensor name
# and shape of v1-5-pruned-emaonly / v2-1_768-ema-pruned (UNet, VAE, text; DDPM buffers left out), as the
# original LDM code (CompVis / Stability-AI, v1-inference.yaml / v2-inference-v.yaml) builds them.

DATA = __import__("pathlib").Path(__file__).parent / "data"


@pytest.mark.parametrize("name,version", [("sd15", "sd1"), ("sd21", "sd2")])
def test_real_layout_maps_onto_our_modules(name, version):
    from dreambooth_min.formats.checkpoint_names import UNET_PREFIX, VAE_PREFIX, infer_vae_config
    from dreambooth_min.formats.text_weights import convert_open_clip, match_text_prefix, text_config_from_state_dict
    from dreambooth_min.unet import UNet2DConditionModel
    from dreambooth_min.vae import AutoencoderKL
    from transformers import CLIPTextModel

    manifest = {k: tuple(v) for k, v in json.loads((DATA / f"{name}_keys.json").read_text()).items()}
    part = lambda prefix: {k[len(prefix):]: s for k, s in manifest.items() if k.startswith(prefix)}
    for prefix, infer, cls, table_fn in ((UNET_PREFIX, infer_unet_config, UNet2DConditionModel, unet_rename_table),
                                         (VAE_PREFIX, infer_vae_config, AutoencoderKL, vae_rename_table)):
        shapes = part(prefix)
        cfg = infer(shapes)
        ours = {k: tuple(v.shape) for k, v in _meta(cls, cfg).state_dict().items()}
        table = table_fn(cfg)
        mapped = {rename(k, table): (k, s) for k, s in shapes.items()}
        assert mapped.keys() == ours.keys(), (set(mapped) ^ set(ours))
        for k, (ldm, s) in mapped.items():  # 1x1-conv VAE attention weights fill linear ones
            assert s == ours[k] or (len(s) == 4 and s[2:] == (1, 1) and s[:2] == ours[k]), (ldm, s, ours[k])
    if version == "sd1":
        assert cfg_equal(infer_unet_config(part(UNET_PREFIX)), UNetConfig.sd1())
        text = {k: torch.empty(s, device="meta") for k, s in part("cond_stage_model.transformer.").items()}
    else:
        sd2 = infer_unet_config(part(UNET_PREFIX))
        assert cfg_equal(sd2, UNetConfig.sd2())
        text = convert_open_clip({k: torch.empty(s, device="meta") for k, s in part("cond_stage_model.model.").items()})
    config = text_config_from_state_dict(text, version)
    assert (config.hidden_size, config.num_attention_heads) == ((768, 12) if version == "sd1" else (1024, 16))
    assert config.num_hidden_layers == (12 if version == "sd1" else 23)  # SD 2.x: penultimate layer
    with torch.device("meta"):
        model = CLIPTextModel(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in match_text_prefix(text, model).items()} == ours


def cfg_equal(a, b):
    import dataclasses

    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    return all(as_tuple(getattr(a, f.name)) == as_tuple(getattr(b, f.name)) for f in dataclasses.fields(a))


def test_header_length_starting_with_0x80_is_not_a_pickle(tmp_path):
    """1 in 256 safetensors files start with byte 0x80 (their header length), as a pickle does."""
    from safetensors.torch import save_file

    from dreambooth_min.formats.safetensors_io import SafetensorsFile

    path = tmp_path / "x.safetensors"
    for pad in range(600):
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(SafetensorsFile(path).read("w"), torch.ones(2))


def test_yaml_beside_a_single_file_sets_the_head_count(tmp_path):
    """A model whose heads differ from the released rule loads right when its LDM yaml says so."""
    from tiny import SD2_UNET

    pipe = make_pipeline("sd2")
    from diffusers import UNet2DConditionModel

    heads4 = UNet2DConditionModel(**dict(SD2_UNET, attention_head_dim=(2, 4, 4)))  # heads of 16 channels
    heads4.load_state_dict(pipe.unet.state_dict())
    pipe.unet = heads4
    f = save_single_file(pipe, tmp_path / "odd.safetensors")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.tensor([500])
    assert_well_conditioned("heads-of-16 UNet", lambda: heads4(x, t, encoder_hidden_states=ctx).sample, [heads4],
                            DEEP_TOL)
    ref = heads4(x, t, encoder_hidden_states=ctx).sample
    with torch.no_grad():
        assert maxdiff(load(f).unet(x, t, ctx), ref) > 1e-3  # the default rule (64-channel heads) differs
        (tmp_path / "odd.yaml").write_text("model:\n  params:\n    unet_config:\n      params:\n"
                                           "        num_head_channels: 16\n        use_linear_in_transformer: true\n")
        assert maxdiff(load(f).unet(x, t, ctx), ref) <= DEEP_TOL
        (tmp_path / "odd.yaml").write_text("        num_heads: 4\n        num_head_channels: -1\n")
        assert load(f).unet.config.num_attention_heads[1] == 4


def test_a_pickle_in_weights_gets_the_conversion_hint(tmp_path):
    torch.save({}, tmp_path / "v1-5-pruned-emaonly.ckpt")
    with pytest.raises(UserError, match="pickle"):
        find_default_model(tmp_path)


def test_a_model_passed_as_lora_is_named_as_such(tiny_sd1):
    from dreambooth_min.formats.lora_apply import apply_lora
    from dreambooth_min.formats.lora_file import load_lora

    sd = load(tiny_sd1["single"])
    with pytest.raises(UserError, match="not a LoRA"):
        apply_lora(sd.unet, sd.text_encoder, load_lora(tiny_sd1["single"])[0])
