"""lora_tools.py: merge (into a single file, a diffusers folder, or one LoRA), resize (kohya's ranks), extract.

Values are checked against closed forms (constructed singular values, the SVD's truncation error), against
base + LoRA sampled by sample.py's path, and the merged single file against diffusers' from_single_file."""
import math

import numpy as np
import pytest
import torch

import dreambooth_min
import lora_tools
from dreambooth_min.formats.lora_apply import apply_lora
from dreambooth_min.formats.lora_file import load_lora, module_groups, save_lora
from dreambooth_min.formats.lora_names import kohya_unet_paths
from dreambooth_min.formats.lora_svd import choose_rank, group_update, kept_fraction
from dreambooth_min.lora import CONV_TARGETS, TEXT_TARGETS, UNET_TARGETS, LoRALinear, inject_lora
from dreambooth_min.formats.lora_file import lora_state_dict
from dreambooth_min.sampling import generate


def random_lora(folder, path, rank, seed, conv=True, alpha=None):
    """A LoRA with random factors (B too: not a fresh one) on the model's attention, text encoder(s), and with
    `conv` its res-block convolutions (LoCon); saved as train.py saves, kohya names."""
    sd = dreambooth_min.load(folder)
    paths = kohya_unet_paths(sd.unet)
    unet = inject_lora(sd.unet, UNET_TARGETS + (CONV_TARGETS if conv else ()), rank, alpha, conv_rank=rank - 1)
    text = inject_lora(sd.text_encoder, TEXT_TARGETS, rank, alpha)
    text_2 = inject_lora(sd.text_encoder_2, TEXT_TARGETS, rank, alpha) if sd.text_encoder_2 is not None else None
    g = torch.Generator().manual_seed(seed)
    for m in [*unet.values(), *text.values(), *(text_2 or {}).values()]:
        for p in (m.lora_down.weight, m.lora_up.weight):
            p.data = 0.3 * torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
    save_lora(path, lora_state_dict(unet, text, text_loras_2=text_2, unet_paths=paths))
    return path


def _image(sd, seed=0):
    # two steps without guidance: the text encoders' LoRA still shapes the (conditional) prediction
    return np.asarray(generate(sd, "a photo of sks dog", "", 1, 2, 1.0, seed, 64, 64, progress=False)[0], dtype=int)


def _run(args, capsys):
    code = lora_tools.main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


# ---------------------------------------------------------------------------------------------------
# Ranks: kohya's rules on constructed singular values

def test_dynamic_ranks_follow_kohyas_rules_on_constructed_singular_values():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0, 0.0])
    # sv_ratio 5: s > 8/5 are 8, 4, 2 -> index 3, rank 4; sv_ratio 100: 6 nonzero -> rank 7
    assert choose_rank(s, 8, "sv_ratio", 5) == 4 and choose_rank(s, 8, "sv_ratio", 100) == 7
    # sv_fro 0.9: cumulative energy 64, 80, 84, 85, ... of 85.3125; 0.81 * 85.3125 = 69.1 first reached at j=1
    # -> index 2, rank 3 (kohya keeps one more than the two that suffice)
    assert choose_rank(s, 8, "sv_fro", 0.9) == 3
    # sv_cumulative 0.5: sums 8, 12 of 15.75; 0.5 * 15.75 = 7.875 reached at j=0 -> rank 2
    assert choose_rank(s, 8, "sv_cumulative", 0.5) == 2
    assert choose_rank(s, 2, "sv_ratio", 100) == 2  # capped at the largest rank given
    assert choose_rank(torch.zeros(4), 3) == 1  # a zero update keeps one
    assert kept_fraction(s, 2) == pytest.approx(math.sqrt(80 / 85.3125))


def _constructed_lora(path, spectra, alpha=2.0):
    """kohya tensors whose modules' B A have exactly the singular values `spectra` (orthonormal factors)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, s in enumerate(spectra):
        u, _ = torch.linalg.qr(torch.randn(24, len(s), generator=g))
        v, _ = torch.linalg.qr(torch.randn(16, len(s), generator=g))
        key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{i + 1}_to_q"
        tensors[key + ".lora_up.weight"] = u * torch.tensor(s)
        tensors[key + ".lora_down.weight"] = v.T.contiguous()
        tensors[key + ".alpha"] = torch.tensor(alpha)
    save_lora(path, tensors)
    return path


def test_resize_keeps_the_scaled_truncated_svd_and_prints_ranks(tmp_path, capsys):
    lora = _constructed_lora(tmp_path / "in.safetensors", [[5.0, 3.0, 1.0, 0.1], [2.0, 2.0, 2.0, 2.0]])
    out = tmp_path / "out.safetensors"
    printed = _run(["resize", "--lora", lora, "--rank", 2, "--out", out, "--no-progress"], capsys)
    old, new = module_groups(load_lora(lora)[0]), module_groups(load_lora(out)[0])
    for key, g in old.items():
        full = group_update(g, 2.0 / 4)
        u, s, vh = torch.linalg.svd(full)
        h = new[key]
        assert h["down"].shape[0] == 2 and float(h["alpha"]) == pytest.approx(2 * 2.0 / 4)  # alpha / r kept
        torch.testing.assert_close(group_update(h, float(h["alpha"]) / 2), (u[:, :2] * s[:2]) @ vh[:2],
                                   atol=1e-6, rtol=1e-5)
    assert f"kept {math.sqrt(34 / 35.01):7.2%}" in printed and f"kept {math.sqrt(8 / 16):7.2%}" in printed
    printed = _run(["resize", "--lora", lora, "--rank", 8, "--dynamic", "sv_ratio", "--ratio", 4, "--out", out,
                    "--no-progress"], capsys)
    ranks = {k[1]: g["down"].shape[0] for k, g in module_groups(load_lora(out)[0]).items()}
    # [5, 3, 1, 0.1]: s > 5/4 -> index 2 -> rank 3; [2, 2, 2, 2]: index 4 -> rank 5, capped at the old rank 4
    assert sorted(ranks.values()) == [3, 4]
    assert load_lora(out)[1]["ss_network_dim"] == "Dynamic"


def test_resize_reads_peft_alphas_and_cp_locon_and_writes_kohya_names(tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    peft = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    cp = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {peft + ".lora_A.weight": torch.randn(4, 16, generator=g),
               peft + ".lora_B.weight": torch.randn(24, 4, generator=g),
               cp + ".lora_down.weight": torch.randn(3, 8, 1, 1, generator=g),
               cp + ".lora_mid.weight": torch.randn(3, 3, 3, 3, generator=g),
               cp + ".lora_up.weight": torch.randn(8, 3, 1, 1, generator=g), cp + ".alpha": torch.tensor(1.5)}
    lora, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_lora(lora, tensors, {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 8}'})
    _run(["resize", "--lora", lora, "--rank", 4, "--out", out, "--no-progress"], capsys)
    new = {name: g for (_, name), g in module_groups(load_lora(out)[0]).items()}
    old = {name: g for (_, name), g in module_groups(tensors).items()}
    kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(new[kohya]["alpha"]) == 8 and float(new[cp]["alpha"]) == 1.5  # full rank: alphas kept
    for theirs, ours, scale in ((old[peft.removeprefix("unet.")], new[kohya], 2.0), (old[cp], new[cp], 0.5)):
        torch.testing.assert_close(group_update(ours, float(ours["alpha"]) / ours["down"].shape[0]),
                                   group_update(theirs, scale), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# merge: the merged model draws base + LoRA's image; the single file loads here and in diffusers

@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def merged(request, tmp_path_factory):
    """A tiny model, two LoRAs (LoCon, text encoders) at strengths 0.7 and 1, and their merge as a single file."""
    tiny = request.getfixturevalue(f"tiny_{request.param}")
    root = tmp_path_factory.mktemp(f"merge_{request.param}")
    a = random_lora(tiny["folder"], root / "a.safetensors", rank=4, seed=1, alpha=2.0)
    b = random_lora(tiny["folder"], root / "b.safetensors", rank=3, seed=2, conv=False)
    out = root / "merged.safetensors"
    code = lora_tools.main(["merge", "--model", str(tiny["single"]), "--lora", f"{a}:0.7", "--lora", str(b),
                            "--out", str(out), "--dtype", "fp32", "--no-progress"])
    assert code == 0
    return dict(tiny, version=request.param, a=a, b=b, out=out, root=root)


def test_the_merged_file_draws_the_image_of_base_plus_loras(merged):
    """Against base + LoRA at run time: `a` merged as sample.py merges it, `b` as wrappers (its own forward path:
    wrappers do not stack, so one of the two must be merged). The LoRAs move pixels by ~90/255 here."""
    base = dreambooth_min.load(merged["single"])
    for path, scale, merge in ((merged["a"], 0.7, True), (merged["b"], 1.0, False)):
        tensors, metadata = load_lora(path)
        apply_lora(base.unet, base.text_encoder, tensors, scale=scale, merge=merge, metadata=metadata,
                   text_encoder_2=base.text_encoder_2)
    ours = dreambooth_min.load(merged["out"])
    assert ours.version == merged["version"] and ours.prediction_type == base.prediction_type
    assert np.abs(_image(ours) - _image(base)).max() <= 1
    for m in base.unet.modules():  # b's wrappers folded in: the file's weights, to fp32 rounding
        if isinstance(m, LoRALinear):
            m.merge()
    unet = {k.replace(".base.", "."): v for k, v in base.unet.state_dict().items() if ".lora_" not in k}
    for name, w in ours.unet.state_dict().items():
        torch.testing.assert_close(w, unet[name], atol=1e-6, rtol=0)


def test_the_merged_file_loads_in_diffusers_from_single_file(merged):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if merged["version"] == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_single_file(str(merged["out"]), config=str(merged["folder"]), local_files_only=True)
    ours = dreambooth_min.load(merged["out"])
    pairs = [(pipe.unet, ours.unet), (pipe.vae, ours.vae), (pipe.text_encoder, ours.text_encoder)]
    if merged["version"] == "sdxl":
        pairs.append((pipe.text_encoder_2, ours.text_encoder_2))
    for theirs, mine in pairs:
        theirs_sd = {k.removeprefix("text_model."): v for k, v in theirs.state_dict().items()}
        mine_sd = {k.removeprefix("text_model."): v for k, v in mine.state_dict().items()}
        assert theirs_sd.keys() >= mine_sd.keys()
        for k, v in mine_sd.items():
            assert torch.equal(theirs_sd[k].reshape(v.shape), v), k


def _expected_updates(merged):
    """{kohya name: 0.7 dW_a + dW_b} from the two files' own factors."""
    total = {}
    for path, strength in ((merged["a"], 0.7), (merged["b"], 1.0)):
        for (_, name), g in module_groups(load_lora(path)[0]).items():
            update = group_update(g, strength * float(g["alpha"]) / g["down"].shape[0])
            total[name] = total.get(name, 0) + update
    return total


def _updates(path):
    return {name: group_update(g, float(g["alpha"]) / g["down"].shape[0])
            for (_, name), g in module_groups(load_lora(path)[0]).items()}


def _assert_updates_close(got, expected):
    """Equal to fp32 noise: W + dW rounds dW to the ulp of W (~3e-8 here), and an fp32 SVD of an [n, m] matrix is
    exact to ~1e-7 sqrt(m) of its norm (measured at most 2.4e-7, 2.1e-5 of max |dW|, on the tiny SDXL's mid block)."""
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        err = float((got[name] - e).abs().max())
        assert err < 1e-7 + 5e-5 * float(e.abs().max()), (name, err, float(e.abs().max()))


# ---------------------------------------------------------------------------------------------------
# extract and merge --into-lora: exact at the updates' rank; at a lower one, the SVD's truncation error

def test_extract_from_base_and_merged_recovers_the_loras_updates(merged, capsys):
    out = merged["root"] / "extracted.safetensors"
    printed = _run(["extract", "--model", merged["single"], "--tuned", merged["out"], "--rank", 7,
                    "--out", out, "--no-progress"], capsys)
    expected = _expected_updates(merged)
    _assert_updates_close(_updates(out), expected)
    assert f"extracted: {len(expected)} modules, Frobenius norm kept 100.00%" in printed
    base = dreambooth_min.load(merged["single"])
    tensors, metadata = load_lora(out)  # loads as sample.py loads it: every module finds its layer
    assert len(apply_lora(base.unet, base.text_encoder, tensors, metadata=metadata,
                          text_encoder_2=base.text_encoder_2)) == len(expected)


def test_merge_into_lora_keeps_the_best_low_rank_approximation_of_the_summed_updates(merged, capsys):
    low = merged["root"] / "low.safetensors"
    printed = _run(["merge", "--model", merged["single"], "--lora", f"{merged['a']}:0.7", "--lora", merged["b"],
                    "--into-lora", "--rank", 2, "--conv-rank", 1, "--out", low, "--no-progress"], capsys)
    expected = _expected_updates(merged)
    got = _updates(low)
    assert got.keys() == expected.keys() and "merged LoRA:" in printed
    for name, update in got.items():
        s = torch.linalg.svdvals(expected[name].flatten(1))
        kept = 1 if expected[name].dim() == 4 and expected[name].shape[-1] > 1 else 2
        # Eckart-Young: the best rank-q approximation misses exactly the dropped singular values
        err = float(torch.linalg.matrix_norm((update - expected[name]).flatten(1)))
        assert err == pytest.approx(float(s[kept:].pow(2).sum().sqrt()), rel=1e-4, abs=1e-6), name


def test_merge_into_a_diffusers_folder(merged, capsys):
    """Any OUT but .safetensors is a diffusers folder; SDXL's (two text encoders) loads here and in diffusers with the
    single file's merged weights."""
    import diffusers

    if merged["version"] != "sdxl":
        pytest.skip("SD 1.x / 2.x folders: tests/test_export.py; the merge is the single file's")
    out = merged["root"] / "merged"
    _run(["merge", "--model", merged["folder"], "--lora", f"{merged['a']}:0.7", "--lora", merged["b"], "--out", out,
          "--dtype", "fp32", "--no-progress"], capsys)
    expected, ours = dreambooth_min.load(merged["out"]), dreambooth_min.load(out)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    assert ours.version == "sdxl" and type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for a, b, c in ((expected.unet, ours.unet, pipe.unet), (expected.text_encoder_2, ours.text_encoder_2,
                                                             pipe.text_encoder_2)):
        theirs = c.state_dict()
        for k, v in a.state_dict().items():
            assert torch.equal(b.state_dict()[k], v) and torch.equal(theirs[k], v), k


@pytest.mark.parametrize("args, message", [
    (["resize", "--lora", "x.safetensors", "--out", "y.safetensors"], "the following arguments are required: --rank"),
    (["resize", "--lora", "{lora}", "--rank", "2", "--dynamic", "sv_fro", "--out", "y.safetensors"],
     "--dynamic and --ratio go together"),
    (["resize", "--lora", "{lora}", "--rank", "2", "--out", "y.png"], "--out must be a .safetensors file"),
    (["resize", "--lora", "missing.safetensors", "--rank", "2", "--out", "y.safetensors"], "does not exist"),
    (["merge", "--lora", "missing.safetensors", "--out", "m.safetensors"],
     "LoRA file missing.safetensors does not exist"),
    (["merge", "--lora", "{lora}", "--into-lora", "--out", "m.safetensors"], "--rank R is needed"),
    (["merge", "--lora", "{lora}", "--rank", "4", "--out", "m.safetensors"], "go with --into-lora"),
    (["extract", "--model", "{sd1}", "--tuned", "{sd2}", "--rank", "2", "--out", "e.safetensors", "--no-progress"],
     "--model is sd1 and --tuned is sd2"),
])
def test_bad_input_is_one_error_line(args, message, tmp_path, tiny_sd1, tiny_sd2, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lora = _constructed_lora(tmp_path / "l.safetensors", [[1.0, 0.5]])
    try:
        code = lora_tools.main([a.format(lora=lora, sd1=tiny_sd1["folder"], sd2=tiny_sd2["folder"]) for a in args])
    except SystemExit as e:  # argparse's own mistakes (CommandParser): the same one line
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_merge_bakes_a_dora_by_its_own_rule(tiny_sd1, tmp_path, capsys):
    """DoRA (dora_scale [out, 1], LyCORIS' key): the merged layer is m (W + (alpha / r) B A) / ||W + (alpha / r) B A||,
    the norm of each output row (Liu et al. 2024, eq. 5), and --into-lora keeps that update's best rank-R part."""
    lora = random_lora(tiny_sd1["folder"], tmp_path / "l.safetensors", rank=2, seed=4, conv=False)
    tensors, metadata = load_lora(lora)
    g = torch.Generator().manual_seed(6)
    downs = [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]
    for k in downs:
        tensors[k + ".dora_scale"] = 0.5 + torch.rand(tensors[k + ".lora_up.weight"].shape[0], 1, generator=g)
    dora = tmp_path / "dora.safetensors"
    save_lora(dora, tensors, metadata)
    out = tmp_path / "merged.safetensors"
    _run(["merge", "--model", tiny_sd1["single"], "--lora", dora, "--out", out, "--dtype", "fp32", "--no-progress"],
         capsys)
    base, ours = dreambooth_min.load(tiny_sd1["single"]), dreambooth_min.load(out)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w = base.unet.get_submodule(path).weight
    v = w + float(tensors[key + ".alpha"]) / 2 * tensors[key + ".lora_up.weight"] @ tensors[key + ".lora_down.weight"]
    expected = tensors[key + ".dora_scale"] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(ours.unet.get_submodule(path).weight, expected, atol=1e-6, rtol=1e-5)
    wrapped = dreambooth_min.load(tiny_sd1["single"])  # as sample.py could run it: DoRA wrappers
    apply_lora(wrapped.unet, wrapped.text_encoder, tensors, merge=False, metadata=metadata)
    assert np.abs(_image(ours) - _image(wrapped)).max() <= 1
    low = tmp_path / "low.safetensors"
    _run(["merge", "--model", tiny_sd1["single"], "--lora", dora, "--into-lora", "--rank", 4, "--out", low,
          "--no-progress"], capsys)
    update = _updates(low)[key]
    s = torch.linalg.svdvals(expected - w)
    err = float(torch.linalg.matrix_norm(update - (expected - w)))
    assert err == pytest.approx(float(s[4:].pow(2).sum().sqrt()), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_single_file_keys_and_shapes_are_the_released_files(name):
    """At full size (on the meta device): every tensor name and shape of v1-5-pruned-emaonly, v2-1_768-ema-pruned
    and sd_xl_base_1.0 (tests/data/*_keys.json), nothing more."""
    import json
    from types import SimpleNamespace

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_min.formats.single_file import single_file_tensors
    from dreambooth_min.unet import UNet2DConditionModel, UNetConfig
    from dreambooth_min.vae import AutoencoderKL, VAEConfig

    version = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[name]
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    open_clip = dict(hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                     num_attention_heads=16)
    big_g = CLIPTextConfig(hidden_act="gelu", hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, projection_dim=1280)
    with torch.device("meta"):
        sd = SimpleNamespace(version=version, unet=UNet2DConditionModel(getattr(UNetConfig, version)()),
                             vae=AutoencoderKL(VAEConfig.sd()), text_encoder_2=None,
                             text_encoder=CLIPTextModel(CLIPTextConfig(**open_clip) if version == "sd2" else clip_l))
        if version == "sdxl":
            sd.text_encoder_2 = CLIPTextModelWithProjection(big_g)
    released = json.loads((__import__("pathlib").Path(__file__).parent / "data" / f"{name}_keys.json").read_text())
    ours = {k: list(v.shape) for k, v in single_file_tensors(sd).items()}
    assert ours.keys() == released.keys(), sorted(ours.keys() ^ released.keys())[:5]
    assert ours == released
