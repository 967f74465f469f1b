"""Other people's LoRAs: files that diffusers + peft write (alpha / rank in their metadata), the older diffusers
form, kohya variants (no alpha, fp16 / bf16, LDM names, LoCon with lora_mid), several at once in sample.py, and
one clear line for the kinds and model families we do not read. Images are compared with diffusers'
load_lora_weights on the tiny seeded pipelines (same seed, DDIM)."""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
from dreambooth_min.errors import UserError
from dreambooth_min.formats.checkpoint_names import unet_rename_table, unrename
from dreambooth_min.formats.lora_apply import apply_lora, lora_label, parse_lora_arg
from dreambooth_min.formats.lora_file import load_lora, lora_state_dict, save_lora
from dreambooth_min.formats.lora_names import kohya_name
from dreambooth_min.lora import TEXT_TARGETS, UNET_TARGETS, inject_lora
from dreambooth_min.unet import UNetConfig

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from test_sampling import PROMPT, _assert_same_pixels, _reference_images  # noqa: E402
from conditioning import assert_well_conditioned  # noqa: E402
from tiny import SD1_UNET, SD2_UNET, make_pipeline, save_folder  # noqa: E402

LOCON = UNET_TARGETS + ("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                        "upsamplers.0.conv")


def _randomize(loras, seed, std=0.15):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in loras.values():
            m.lora_up.weight.copy_(std * torch.randn(m.lora_up.weight.shape, generator=g))


def _peft_file(pipe, folder, name, seed=0):
    """A LoRA written by diffusers' save_lora_weights from peft adapters: UNet attention + 3x3 conv + 1x1 conv
    factors with a rank_pattern and an alpha_pattern, text-encoder factors with their own r / alpha. The alpha
    values exist only in the file's lora_adapter_metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet, text = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
                                                         "conv_shortcut"],
                      rank_pattern={"conv1": 2}, alpha_pattern={"conv2": 3.0})
    tcfg = LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "out_proj"])
    torch.manual_seed(seed)
    unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, text)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts B at 0: make every factor count
        for n, p in list(unet.named_parameters()) + list(text.named_parameters()):
            if "lora_B" in n:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text), unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=tcfg.to_dict(), weight_name=name)
    return folder / name


def _kohya_locon_file(pipe, path, seed=1, dtype=torch.float32):
    """A kohya LoCon file as our trainer writes it (attention + convs, conv rank/alpha of their own, text encoder)."""
    unet, text = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    torch.manual_seed(seed)
    ul = inject_lora(unet, LOCON, rank=4, alpha=2, conv_rank=3, conv_alpha=6)
    tl = inject_lora(text, TEXT_TARGETS, rank=2, alpha=1)
    _randomize(ul, seed)
    _randomize(tl, seed + 1)
    save_lora(path, lora_state_dict(ul, tl, dtype=dtype))
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    pipe = make_pipeline("sd1")
    return dict(pipe=pipe, root=root, folder=save_folder(pipe, root / "model"),
                peft=_peft_file(pipe, root, "peft.safetensors"),
                locon=_kohya_locon_file(pipe, root / "locon.safetensors"))


def _image(args, out):
    assert sample.main(args + ["--prompt", PROMPT, "--steps", "5", "--height", "48", "--width", "48", "--seed", "1",
                               "--out", str(out), "--no-progress"]) == 0
    return Image.open(out)


def _fresh_pipe(sd1):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(**{k: copy.deepcopy(v) for k, v in sd1["pipe"].components.items()})


def test_peft_file_matches_diffusers_image(sd1, tmp_path):
    """A diffusers/peft file with conv and text-encoder factors, alpha only in its metadata == diffusers' image."""
    image = _image(["--model", str(sd1["folder"]), "--lora", str(sd1["peft"])], tmp_path / "out.png")
    pipe = _fresh_pipe(sd1)
    pipe.load_lora_weights(str(sd1["root"]), weight_name="peft.safetensors")
    ref = _reference_images(pipe, [1], 48, 48, steps=5, name="peft LoRA adapter")
    _assert_same_pixels(np.asarray(image)[None], ref)
    plain = _reference_images(sd1["pipe"], [1], 48, 48, steps=5, name="foreign sd1")
    assert np.abs(ref.astype(int) - plain).mean() > 5  # the LoRA changes the picture
    assert image.text["parameters"].endswith(", LoRA: peft:1.0")


def test_two_loras_with_their_scales_match_diffusers(sd1, tmp_path):
    """--lora peft:0.8 --lora locon:0.6 == diffusers' two adapters with set_adapters weights [0.8, 0.6]."""
    image = _image(["--model", str(sd1["folder"]), "--lora", f"{sd1['peft']}:0.8", "--lora", f"{sd1['locon']}:0.6"],
                   tmp_path / "out.png")
    pipe = _fresh_pipe(sd1)
    pipe.load_lora_weights(str(sd1["root"]), weight_name="peft.safetensors", adapter_name="a")
    pipe.load_lora_weights(str(sd1["root"]), weight_name="locon.safetensors", adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.6])
    _assert_same_pixels(np.asarray(image)[None], _reference_images(pipe, [1], 48, 48, steps=5,
                                                                         name="two LoRA adapters"))
    assert image.text["parameters"].endswith(', LoRA: "peft:0.8, locon:0.6"')


def _merged(tensors, pipe, metadata=None, scale=1.0):
    unet, text = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    apply_lora(unet, text, tensors, scale=scale, metadata=metadata)
    return {**{"unet." + k: v for k, v in unet.state_dict().items()},
            **{"te." + k: v for k, v in text.state_dict().items()}}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_peft_alpha_and_rank_from_metadata(sd1):
    """Each module's update is (alpha / r) B A with r and alpha from the lora_adapter_metadata patterns."""
    tensors, meta = load_lora(sd1["peft"])
    pipe = sd1["pipe"]
    w = _merged(tensors, pipe, meta)
    base = {**{"unet." + k: v for k, v in pipe.unet.state_dict().items()},
            **{"te." + k: v for k, v in pipe.text_encoder.state_dict().items()}}
    for path, alpha, rank in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 4),
                              ("down_blocks.0.resnets.0.conv1", 8, 2), ("down_blocks.0.resnets.0.conv2", 3, 4),
                              ("up_blocks.0.resnets.0.conv_shortcut", 8, 4)):
        A, B = tensors[f"unet.{path}.lora_A.weight"], tensors[f"unet.{path}.lora_B.weight"]
        assert A.shape[0] == rank
        delta = torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A) if A.dim() == 4 else B @ A
        assert (w[f"unet.{path}.weight"] - base[f"unet.{path}.weight"] - alpha / rank * delta).abs().max() <= 1e-6
    path = "encoder.layers.1.self_attn.out_proj"
    A, B = tensors[f"text_encoder.{path}.lora_A.weight"], tensors[f"text_encoder.{path}.lora_B.weight"]
    assert (w[f"te.{path}.weight"] - base[f"te.{path}.weight"] - 5 / 2 * B @ A).abs().max() <= 1e-6
    # the same factors with `.alpha` keys instead of metadata give the same weights
    alphas = {k.replace("lora_A.weight", "alpha"): torch.tensor(8.0 if ".conv2." not in k else 3.0)
              for k in tensors if k.startswith("unet.") and k.endswith("lora_A.weight")}
    alphas.update({k.replace("lora_A.weight", "alpha"): torch.tensor(5.0) for k in tensors
                   if k.startswith("text_encoder.") and k.endswith("lora_A.weight")})
    assert _max_diff(_merged({**tensors, **alphas}, pipe), w) <= 1e-7
    # rsLoRA: alpha / sqrt(r)
    rs = re.sub(r'"unet.use_rslora": false', '"unet.use_rslora": true', meta["lora_adapter_metadata"])
    w_rs = _merged(tensors, pipe, dict(meta, lora_adapter_metadata=rs))
    k = "unet.down_blocks.0.resnets.0.conv1.weight"
    assert (w_rs[k] - base[k] - (w[k] - base[k]) * 2 ** 0.5).abs().max() <= 1e-6  # 8/sqrt(2) vs 8/2


def _old_diffusers_form(tensors):
    """peft keys -> diffusers' pre-peft form: <attn>.processor.to_q_lora.down.weight, text to_q_lora / to_out_lora."""
    out = {}
    for k, v in tensors.items():
        m = re.match(r"(unet|text_encoder)\.(.*)\.(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)\.lora_([AB])"
                     r"\.weight$", k)
        if not m:
            continue
        part, path, layer, ab = m.groups()
        layer = {"to_out.0": "to_out", "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}.get(
            layer, layer)
        path = path + ".processor" if part == "unet" else path
        out[f"{part}.{path}.{layer}_lora.{'down' if ab == 'A' else 'up'}.weight"] = v
    return out


def test_old_diffusers_form_and_kohya_variants(sd1, tmp_path):
    """The pre-peft diffusers form (== diffusers' own reading of it); kohya files without alpha, in fp16 / bf16,
    with LDM names: the same weights."""
    pipe = sd1["pipe"]
    peft, _ = load_lora(sd1["peft"])
    attn = {k: v for k, v in peft.items() if re.search(r"(to_[qkv]|to_out\.0|_proj)\.lora_[AB]", k)}
    old = _old_diffusers_form(attn)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in old
    assert "text_encoder.encoder.layers.0.self_attn.to_q_lora.down.weight" in old and len(old) == len(attn)
    assert _max_diff(_merged(old, pipe), _merged(attn, pipe)) == 0  # no metadata: alpha = r both ways
    save_lora(tmp_path / "old.safetensors", old)
    ref = _fresh_pipe(sd1)
    ref.load_lora_weights(str(tmp_path), weight_name="old.safetensors")
    unet, text = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    apply_lora(unet, text, old)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    ids = torch.randint(3, 1000, (1, 7), generator=g)
    # 1e-6 relative weight noise moves the UNet output by 1.7e-5, the text states by 4e-6: tolerances 10x above
    assert_well_conditioned("old-form LoRA in diffusers' UNet and text encoder", lambda: [
        ref.unet(x, 10, c).sample, ref.text_encoder(ids).last_hidden_state], [ref.unet, ref.text_encoder], [1e-3, 1e-4])
    with torch.no_grad():
        assert (unet(x, 10, c).sample - ref.unet(x, 10, c).sample).abs().max() <= 1e-3
        assert (text(ids).last_hidden_state - ref.text_encoder(ids).last_hidden_state).abs().max() <= 1e-4

    locon, _ = load_lora(sd1["locon"])
    ref = _merged(locon, pipe)
    for dtype in (torch.float16, torch.bfloat16):
        low = {k: (v.to(dtype) if k.endswith("weight") else v) for k, v in locon.items()}
        exact = _merged({k: v.float() for k, v in low.items()}, pipe)
        assert _max_diff(_merged(low, pipe), exact) <= 1e-6 and _max_diff(exact, ref) < 1e-2
    no_alpha = {k: v for k, v in locon.items() if not k.endswith(".alpha")}  # alpha = r: scale 1
    half = {k: (v * 0.5 if k.endswith(".alpha") else v) for k, v in locon.items()}
    assert _max_diff(_merged(no_alpha, pipe), ref) > 1e-3
    assert _max_diff(_merged(half, pipe, scale=2.0), ref) <= 1e-6  # scale * alpha / r
    table = unet_rename_table(UNetConfig.from_diffusers(dict(pipe.unet.config)))
    ldm = {}
    for k, v in locon.items():
        name, _, field = k.partition(".")
        for path, _ in pipe.unet.named_modules():
            if path and kohya_name(path, "unet") == name:
                name = kohya_name(unrename(path + ".weight", table)[: -len(".weight")], "unet")
        ldm[f"{name}.{field}"] = v
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in ldm
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in ldm
    assert "lora_unet_output_blocks_2_1_conv.lora_up.weight" in ldm  # up_blocks.0.upsamplers.0.conv
    assert _max_diff(_merged(ldm, pipe), ref) == 0


def test_locon_with_cp_mid_is_the_three_convs():
    """LyCORIS LoCon with lora_mid: 1x1 down, 3x3 mid (base stride / padding), 1x1 up, composed into one conv."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
    model = torch.nn.ModuleDict({"conv1": conv})
    down, mid, up = (0.3 * torch.randn(s, generator=g) for s in ((3, 6, 1, 1), (3, 3, 3, 3), (5, 3, 1, 1)))
    x = torch.randn(2, 6, 9, 9, generator=g)
    with torch.no_grad():
        expect = conv(x) + 0.7 * 4 / 3 * F.conv2d(F.conv2d(F.conv2d(x, down), mid, stride=2, padding=1), up)
        apply_lora(model, None, {"lora_unet_conv1.lora_down.weight": down, "lora_unet_conv1.lora_mid.weight": mid,
                                 "lora_unet_conv1.lora_up.weight": up, "lora_unet_conv1.alpha": torch.tensor(4.0)},
                   scale=0.7)
        assert (model["conv1"](x) - expect).abs().max() <= 1e-5


def _unet(config):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def test_refused_kinds_and_families(sd1):
    """LoHa / LoKr / LyCORIS' DoRA of the difference, SDXL, SD2-on-SD1: one UserError line naming what the file is;
    a DoRA scale that fits neither axis of its layer too."""
    locon, _ = load_lora(sd1["locon"])
    unet, text = sd1["pipe"].unet, sd1["pipe"].text_encoder
    w0 = copy.deepcopy(unet.state_dict())
    k = "lora_unet_down_blocks_0_resnets_0_conv1"
    for extra, kind in (({k + ".dora_scale": torch.ones(32, 1, 1, 1), k + ".wd_for_diff": torch.tensor(True)},
                         "DoRA of the difference"),
                        ({k + ".hada_w1_a": torch.ones(32, 2)}, "LoHa"), ({k + ".lokr_w1": torch.ones(4, 4)}, "LoKr")):
        with pytest.raises(UserError, match=f"^this file is a {kind}[^\n]*unsupported[^\n]*$"):
            apply_lora(copy.deepcopy(unet), None, dict(locon, **extra))
    with pytest.raises(UserError, match=r"DoRA scale of shape \(1, 7, 1, 1\), which fits neither axis"):
        apply_lora(copy.deepcopy(unet), copy.deepcopy(text), dict(locon, **{k + ".dora_scale": torch.ones(1, 7, 1, 1)}))
    with pytest.raises(UserError, match="made for SDXL"):
        apply_lora(unet, text, {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                                torch.ones(2, 768)})
    sdxl = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.ones(4, 2048),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.ones(640, 4)}
    with pytest.raises(UserError, match=r"another model family.*2048-wide text \(SDXL\).*32-wide text$"):
        apply_lora(unet, None, sdxl)
    # an SD2 (tiny: 64-wide text) LoRA on SD1 (32-wide)
    sd2 = _unet(SD2_UNET)
    loras = inject_lora(sd2, LOCON, rank=2)
    with pytest.raises(UserError, match="another model family: its cross-attention layers expect 64-wide text"):
        apply_lora(_unet(SD1_UNET), None, lora_state_dict(loras))
    assert all(torch.equal(w0[k], v) for k, v in unet.state_dict().items())  # refused files changed nothing


def test_lora_args(tmp_path, monkeypatch, sd1, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a.safetensors", "C:\\x.safetensors", "b:c.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert parse_lora_arg("a.safetensors") == (tmp_path.joinpath("a.safetensors").relative_to(tmp_path), 1.0)
    assert parse_lora_arg("a.safetensors:0.8")[1] == 0.8 and parse_lora_arg("a.safetensors:-1e-1")[1] == -0.1
    assert parse_lora_arg("a.safetensors", 0.5)[1] == 0.5
    assert parse_lora_arg("C:\\x.safetensors") == (type(tmp_path)("C:\\x.safetensors"), 1.0)
    assert parse_lora_arg("C:\\x.safetensors:0.6") == (type(tmp_path)("C:\\x.safetensors"), 0.6)
    assert parse_lora_arg("b:c.safetensors:2")[1] == 2.0
    with pytest.raises(UserError, match="does not exist"):
        parse_lora_arg("nope.safetensors:0.8")
    with pytest.raises(UserError, match="finite"):
        parse_lora_arg("a.safetensors:nan")
    assert lora_label([("runs/x/lora.safetensors", 1.0)]) == "x/lora:1.0" and lora_label([]) is None
    # the CLI: a LoHa file is one error line, exit status 2
    save_lora(tmp_path / "loha.safetensors", {"lora_unet_conv_in.hada_w1_a": torch.ones(2, 2)})
    assert sample.main(["--model", str(sd1["folder"]), "--prompt", "x", "--lora", "loha.safetensors:0.5",
                        "--out", "o.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: loha.safetensors: this file is a LoHa (hada_) network") and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()
