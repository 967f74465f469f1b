"""LoRA: closed forms (W + (alpha/r) B A), fp32 factors under fp16 bases, kohya files, parity vs diffusers+peft."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dreambooth_min.errors import UserError
from dreambooth_min.layers import Conv2d
from dreambooth_min.lora import (CONV_TARGETS, TEXT_TARGETS, UNET_TARGETS, LoRAConv2d, LoRALinear, inject_lora,
                                 lora_parameters)
from dreambooth_min.formats.lora_apply import apply_lora
from dreambooth_min.formats.lora_file import load_lora, lora_state_dict, save_lora
from dreambooth_min.formats.lora_names import kohya_name

from conditioning import assert_well_conditioned

torch.set_num_threads(1)


class Attn(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(c, c, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])
        self.proj_in = nn.Conv2d(c, c, 1)

    def forward(self, x):  # x [B, C, H, W]
        h = self.proj_in(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        a = torch.softmax(self.to_q(h) @ self.to_k(h).transpose(1, 2), -1) @ self.to_v(h)
        return self.to_out[0](a)


class Tiny(nn.Module):
    """Module paths shaped like the UNet's: blocks.0.transformer_blocks.0.attn1.to_q, ...to_out.0."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([nn.ModuleDict({"attn1": Attn(), "attn2": Attn()}) for _ in range(2)])

    def forward(self, x):
        return sum(b["attn1"](x) + b["attn2"](x) for b in self.transformer_blocks)


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny().eval()


def randomize(loras, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in loras.values():  # B = 0 at init: make the update non-zero to test anything
        with torch.no_grad():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)


X = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(2))


def test_zero_init_is_identity():
    model = tiny().requires_grad_(False)  # the trainer freezes the model; inject_lora adds trainable factors
    ref = model(X)
    loras = inject_lora(model, UNET_TARGETS, rank=4, alpha=4)
    assert len(loras) == 2 * 2 * 4  # 2 blocks x 2 attentions x (q, k, v, out.0)
    assert torch.equal(model(X), ref)  # B = 0 exactly, not just close
    assert all(m.lora_down.weight.abs().sum() > 0 for m in loras.values())  # A is random (kaiming)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} and len(trainable) == 2 * len(loras)
    assert len(lora_parameters(loras)) == 2 * len(loras)


def test_closed_form_scale_and_multiplier():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    lora = LoRALinear(base, rank=3, alpha=12.0)
    randomize({"x": lora})
    assert lora.scale == 4.0  # alpha / r
    A, B = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
    x = torch.randn(4, 6)
    for mult in (1.0, 0.5, 0.0):
        lora.multiplier = mult
        expect = x @ (W + mult * 4.0 * B @ A).T + b  # LoRA eq. 3: (W + (alpha/r) B A) x + b
        assert (lora(x) - expect).abs().max() <= 1e-5
    assert not base.weight.requires_grad and lora.lora_down.weight.requires_grad
    # missing alpha means alpha = rank (kohya's convention): scale 1
    assert LoRALinear(nn.Linear(6, 5), rank=3).scale == 1.0


def test_merge_unmerge():
    model = tiny()
    w0 = {n: p.detach().clone() for n, p in model.state_dict().items()}
    loras = inject_lora(model, UNET_TARGETS + ("proj_in",), rank=4, alpha=2)
    randomize(loras)
    for m in loras.values():
        m.multiplier = 0.7
    unmerged = model(X)
    for m in loras.values():
        m.merge()
        m.merge()  # idempotent
    merged = model(X)
    assert (merged - unmerged).abs().max() <= 1e-5
    for m in loras.values():
        m.unmerge()
    for name, m in loras.items():
        assert (m.base.weight - w0[name + ".weight"]).abs().max() <= 1e-6
    assert (model(X) - unmerged).abs().max() <= 1e-5


def test_conv1x1_is_linear_on_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 1)
    lora = LoRALinear(conv, rank=2, alpha=1)
    randomize({"c": lora})
    assert lora.lora_down.weight.shape == (2, 8, 1, 1) and lora.lora_up.weight.shape == (6, 2, 1, 1)
    W = conv.weight + 0.5 * (lora.lora_up.weight.flatten(1) @ lora.lora_down.weight.flatten(1))[..., None, None]
    assert (lora(X) - F.conv2d(X, W, conv.bias)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="1x1"):
        LoRALinear(nn.Conv2d(8, 8, 3))


def test_lora_params_stay_fp32_after_half():
    model = tiny()
    loras = inject_lora(model, UNET_TARGETS + ("proj_in",), rank=4, alpha=4)
    randomize(loras)
    model.half()
    for m in loras.values():
        assert m.base.weight.dtype == torch.float16
        assert m.lora_down.weight.dtype == m.lora_up.weight.dtype == torch.float32
    model.to(torch.bfloat16).to(torch.float16)  # .to() goes through the same _apply
    assert all(m.lora_up.weight.dtype == torch.float32 for m in loras.values())
    # fp16 base without autocast: the output keeps the base's dtype, gradients are fp32
    y = model(X.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for p in lora_parameters(loras):
        assert p.grad is not None and p.grad.dtype == torch.float32
    assert all(m.base.weight.grad is None for m in loras.values())


def _amp_steps(model, loras, device, steps=3):
    opt = torch.optim.AdamW(lora_parameters(loras), lr=1e-3)
    scaler = torch.amp.GradScaler(device)
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.float16):
            y = model(X.to(device))
            loss = y.float().square().mean()
        assert y.dtype == torch.float16
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # raises "Attempting to unscale FP16 gradients" if the factors were fp16
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_autocast_fp16_base_with_gradscaler(device):
    """The mixed-precision recipe: fp16 frozen base, fp32 LoRA, autocast + GradScaler."""
    model = tiny().to(device)
    loras = inject_lora(model, UNET_TARGETS + ("proj_in",), rank=4, alpha=4)
    model.half()  # after injection, as a trainer casting the whole UNet would
    _amp_steps(model, loras, device)
    assert all(m.lora_up.weight.dtype == torch.float32 and m.lora_up.weight.abs().sum() > 0 for m in loras.values())
    # the failure the fp32 rule prevents: LoRA factors that followed the base into fp16
    for m in loras.values():
        m.lora_dtype = torch.float16
    model.half()
    with pytest.raises(ValueError, match="unscale FP16 gradients"):
        _amp_steps(model, loras, device, steps=1)


def test_inject_targets_suffix_and_errors():
    model = tiny()
    assert len(inject_lora(copy.deepcopy(model), ("to_out.0",), 2)) == 4
    assert len(inject_lora(copy.deepcopy(model), "attn1.to_q", 2)) == 2
    assert len(inject_lora(copy.deepcopy(model), ("proj_in", "to_v"), 2)) == 8
    with pytest.raises(UserError, match="match no module"):
        inject_lora(copy.deepcopy(model), ("q_proj", "o_q"), 2)  # 'o_q' is a string suffix of 'to_q', not a path suffix
    with pytest.raises(ValueError, match="Linear"):
        inject_lora(copy.deepcopy(model), ("to_out",), 2)  # a ModuleList
    m = copy.deepcopy(model)
    inject_lora(m, ("to_q",), 2)
    with pytest.raises(ValueError, match="already"):
        inject_lora(m, ("to_q",), 2)


def test_kohya_names():
    assert kohya_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    # transformers 5 CLIPTextModel paths lack 'text_model.'; kohya names always have it
    for path in ("encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"):
        assert kohya_name(path, "te") == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_kohya_round_trip(tmp_path):
    model = tiny()
    base = copy.deepcopy(model)
    loras = inject_lora(model, UNET_TARGETS + ("proj_in",), rank=4, alpha=2)
    randomize(loras)
    ref = model(X)
    sd = lora_state_dict(loras)
    k = "lora_unet_transformer_blocks_1_attn2_to_out_0"
    assert sd[k + ".lora_down.weight"].shape == (4, 8) and sd[k + ".lora_up.weight"].shape == (8, 4)
    assert sd[k + ".alpha"].dtype == torch.float32 and sd[k + ".alpha"].ndim == 0 and sd[k + ".alpha"].item() == 2
    assert sd["lora_unet_transformer_blocks_0_attn1_proj_in.lora_down.weight"].shape == (4, 8, 1, 1)
    assert len(sd) == 3 * len(loras)

    path = tmp_path / "lora.safetensors"
    save_lora(path, sd, {"rank": 4, "prompt": "a sks dog"})
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # the temp file was renamed away
    tensors, meta = load_lora(path)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["prompt"] == "a sks dog"
    assert tensors.keys() == sd.keys() and all(torch.equal(tensors[k], sd[k]) for k in sd)

    merged = copy.deepcopy(base)
    applied = apply_lora(merged, None, tensors, merge=True)
    assert len(applied) == len(loras)
    assert (merged(X) - ref).abs().max() <= 1e-5
    wrapped = copy.deepcopy(base)
    applied = apply_lora(wrapped, None, tensors, merge=False, scale=0.5)
    assert all(isinstance(m, LoRALinear) and m.multiplier == 0.5 for m in applied.values())
    for m in applied.values():
        m.multiplier = 1.0
    assert (wrapped(X) - ref).abs().max() <= 1e-5
    # scale is the strength: W + scale * (alpha/r) B A, so the half-strength weights are the midpoints
    half = copy.deepcopy(base)
    apply_lora(half, None, tensors, scale=0.5)
    w0, w1, wh = base.state_dict(), merged.state_dict(), half.state_dict()
    assert max((wh[k] - (w0[k] + w1[k]) / 2).abs().max() for k in w0) <= 1e-6


def test_apply_errors(tmp_path):
    model = tiny()
    loras = inject_lora(copy.deepcopy(model), UNET_TARGETS, rank=2)
    sd = lora_state_dict(loras)
    bad = dict(sd, **{"lora_unet_mid_block_attentions_0_to_q.lora_down.weight": torch.zeros(2, 8),
                      "lora_unet_mid_block_attentions_0_to_q.lora_up.weight": torch.zeros(8, 2)})
    with pytest.raises(UserError, match="1 of 17 LoRA modules match nothing.*mid_block"):
        apply_lora(copy.deepcopy(model), None, bad)
    with pytest.raises(UserError, match="unsupported"):
        apply_lora(copy.deepcopy(model), None, dict(sd, **{"lora_unet_x.hada_w1_a": torch.zeros(1)}))
    wrong = {k: (v[:, :4] if k.endswith("down.weight") else v) for k, v in sd.items()}
    with pytest.raises(UserError, match="do not fit"):
        apply_lora(copy.deepcopy(model), None, wrong)
    with pytest.raises(UserError, match="does not exist"):
        load_lora(tmp_path / "nope.safetensors")


def test_peft_style_keys():
    model = tiny()
    base = copy.deepcopy(model)
    loras = inject_lora(model, ("to_q", "to_v"), rank=2, alpha=2)  # alpha = r: peft files carry no alpha
    randomize(loras)
    peft = {}
    for path, m in loras.items():
        peft[f"unet.{path}.lora_A.weight"] = m.lora_down.weight.detach()
        peft[f"unet.{path}.lora_B.weight"] = m.lora_up.weight.detach()
    apply_lora(base, None, peft)
    assert (base(X) - model(X)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# parity with diffusers + peft reading the same kohya file (tiny random models)

def _tiny_diffusers_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8).eval()


def _tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()


UNET_ALL = UNET_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TOL = 1e-3


def test_kohya_file_matches_diffusers(tmp_path):
    """Our kohya file, read by diffusers' loader into peft layers, gives our outputs (SD1: 1x1-conv proj_in)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    unet, te = _tiny_diffusers_unet(), _tiny_text_encoder()
    ref_unet, ref_te = copy.deepcopy(unet), copy.deepcopy(te)
    ul = inject_lora(unet, UNET_ALL, rank=4, alpha=8)
    tl = inject_lora(te, TEXT_TARGETS, rank=4, alpha=2)
    # 4 transformers (down, mid, 2 up) x (q, k, v, out for attn1 and attn2 + 2 ff + proj_in/out); 2 layers x 4
    assert len(ul) == 4 * 12 and len(tl) == 2 * 4
    randomize(ul)
    randomize(tl, seed=3)
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora_state_dict(ul, tl))

    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, ref_unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, ref_te, prefix="text_encoder")
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    ids = torch.randint(3, 1000, (2, 7))
    # text states (up to ~3) move by 1.3e-5 under 1e-6 relative weight noise: their tolerance is 1e-3
    assert_well_conditioned("kohya LoRA in diffusers' UNet and text encoder", lambda: [
        ref_unet(x, 10, c).sample, ref_te(ids).last_hidden_state], [ref_unet, ref_te], [1e-4, TEXT_TOL])
    with torch.no_grad():
        ours, theirs = unet(x, 10, c).sample, ref_unet(x, 10, c).sample
        assert (ours - theirs).abs().max() <= 1e-4
        assert (ours - _tiny_diffusers_unet()(x, 10, c).sample).abs().max() > 1e-2  # the LoRA does something
        assert (te(ids).last_hidden_state - ref_te(ids).last_hidden_state).abs().max() <= TEXT_TOL

    # and our apply_lora (merged) into the plain models gives the same outputs
    unet2, te2 = _tiny_diffusers_unet(), _tiny_text_encoder()
    tensors, _ = load_lora(path)
    assert len(apply_lora(unet2, te2, tensors)) == len(ul) + len(tl)
    with torch.no_grad():
        assert (unet2(x, 10, c).sample - theirs).abs().max() <= 1e-4
        assert (te2(ids).last_hidden_state - ref_te(ids).last_hidden_state).abs().max() <= TEXT_TOL


def test_our_unet_matches_diffusers_with_lora(tmp_path):
    """Our UNet (diffusers' state dict loaded strictly) + apply_lora == diffusers UNet + diffusers' LoRA loader."""
    pytest.importorskip("diffusers")
    unet_mod = pytest.importorskip("dreambooth_min.unet")
    from diffusers import StableDiffusionPipeline

    ref = _tiny_diffusers_unet()
    ours = unet_mod.UNet2DConditionModel(unet_mod.UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    loras = inject_lora(copy.deepcopy(ref), UNET_ALL, rank=4, alpha=8)
    randomize(loras)
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora_state_dict(loras))
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, ref)
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    assert_well_conditioned("kohya LoRA in diffusers' UNet, one input", lambda: ref(x, 10, c).sample, [ref], 1e-4)
    for merge in (True, False):
        mine = copy.deepcopy(ours)
        assert len(apply_lora(mine, None, load_lora(path)[0], merge=merge)) == len(loras)
        with torch.no_grad():
            assert (mine(x, torch.tensor(10), c) - ref(x, 10, c).sample).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# LoCon: LoRA on k x k convolutions (kohya sd-scripts conv_dim / LyCORIS locon)

@pytest.mark.parametrize("conv_cls", [nn.Conv2d, Conv2d])
@pytest.mark.parametrize("stride", [1, 2])
def test_locon_closed_form(conv_cls, stride):
    """3x3 down (base stride and padding) then 1x1 up == one 3x3 conv of weight W + s * sum_j up[o, j] down[j, i]."""
    torch.manual_seed(0)
    conv = conv_cls(8, 6, 3, stride=stride, padding=1)
    W, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    lora = inject_lora(nn.ModuleDict({"conv1": conv}), ("conv1",), rank=2, alpha=3)["conv1"]
    assert isinstance(lora, LoRAConv2d) and lora.scale == 1.5
    randomize({"c": lora})
    down, up = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
    assert down.shape == (2, 8, 3, 3) and up.shape == (6, 2, 1, 1)
    hand = torch.einsum("oj,jikl->oikl", up[:, :, 0, 0], down)  # the composition of the two convs, by hand
    assert torch.equal(lora.delta_weight(), 1.5 * (up[:, :, 0, 0] @ down.flatten(1)).view(6, 8, 3, 3))
    assert (lora.delta_weight() - 1.5 * hand).abs().max() <= 1e-6
    for mult in (1.0, 0.3):
        lora.multiplier = mult
        expect = F.conv2d(X, W + mult * 1.5 * hand, b, stride=stride, padding=1)
        assert (lora(X) - expect).abs().max() <= 1e-5
        lora.merge()
        assert (lora(X) - expect).abs().max() <= 1e-5 and lora.merged == mult
        lora.unmerge()
        assert (conv.weight - W).abs().max() <= 1e-6


def test_locon_gradients_through_the_frozen_conv_path():
    """Our Conv2d keeps no input when frozen; the LoRA factors still get autograd's exact gradients."""
    torch.manual_seed(0)
    ours, ref = Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    ref.load_state_dict(ours.state_dict())
    grads = []
    for conv in (ours, ref):
        torch.manual_seed(1)
        lora = LoRAConv2d(conv, rank=3, alpha=6)
        randomize({"c": lora})
        x = X.clone().requires_grad_(True)
        lora(x).square().sum().backward()
        grads.append((lora.lora_down.weight.grad, lora.lora_up.weight.grad, x.grad))
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_locon_inject_ranks_and_fp32():
    """conv_rank / conv_alpha apply to k x k convs; 1x1 convs (conv_shortcut) and Linear layers keep rank / alpha."""
    unet = _tiny_diffusers_unet()
    targets = ("to_q", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in")
    loras = inject_lora(unet, targets, rank=4, alpha=8, conv_rank=2, conv_alpha=1)
    kinds = {n: (type(m).__name__, m.rank, m.alpha) for n, m in loras.items()}
    assert kinds["down_blocks.0.resnets.0.conv1"] == ("LoRAConv2d", 2, 1.0)
    assert kinds["down_blocks.0.downsamplers.0.conv"] == ("LoRAConv2d", 2, 1.0)
    assert loras["down_blocks.0.downsamplers.0.conv"].lora_down.stride == (2, 2)
    assert kinds["up_blocks.0.resnets.0.conv_shortcut"] == ("LoRALinear", 4, 8.0)
    assert kinds["conv_in"][0] == "LoRAConv2d" and kinds["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        ("LoRALinear", 4, 8.0)
    # defaults: conv_rank = rank, conv_alpha = alpha
    m = inject_lora(_tiny_diffusers_unet(), ("conv2",), rank=3, alpha=5)["mid_block.resnets.0.conv2"]
    assert (m.rank, m.alpha) == (3, 5.0)
    unet.half()
    assert all(p.dtype == torch.float32 for p in lora_parameters(loras))
    sd = lora_state_dict(loras)
    k = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[k + ".lora_down.weight"].shape == (2, 32, 3, 3) and sd[k + ".lora_up.weight"].shape == (32, 2, 1, 1)
    assert sd[k + ".alpha"].item() == 1.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_locon_autocast_fp16_base_with_gradscaler(device):
    """fp16 frozen convs (our Conv2d's no-input-kept path under autocast), fp32 LoCon factors, GradScaler."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv1": Conv2d(8, 8, 3, padding=1), "conv2": Conv2d(8, 8, 3, stride=2, padding=1)})
    model.forward = lambda x: model["conv2"](F.silu(model["conv1"](x)))
    loras = inject_lora(model.requires_grad_(False).to(device), ("conv1", "conv2"), rank=2)
    model.half()
    assert all(m.base.weight.dtype == torch.float16 and m.lora_up.weight.dtype == torch.float32 for m in loras.values())
    _amp_steps(model, loras, device)
    assert all(m.lora_up.weight.abs().sum() > 0 for m in loras.values())


def test_locon_merge_unmerge_in_a_unet():
    unet = _tiny_diffusers_unet()
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    loras = inject_lora(unet, UNET_TARGETS + ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                                               "upsamplers.0.conv"), rank=4, alpha=2, conv_rank=3)
    randomize(loras)
    with torch.no_grad():
        unmerged = unet(x, 10, c).sample
        for m in loras.values():
            m.merge()
        merged = unet(x, 10, c).sample
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (unmerged - _tiny_diffusers_unet()(x, 10, c).sample).abs().max() > 1e-2


LOCON_TARGETS = UNET_ALL + CONV_TARGETS + ("conv_in", "conv_out")


def test_locon_file_matches_diffusers(tmp_path):
    """Our LoCon file (attention + every UNet conv, conv rank/alpha != linear rank/alpha, + text encoder) read by
    diffusers' loader gives our UNet's output; our apply_lora on our own UNet too (merged and wrapped)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    unet_mod = pytest.importorskip("dreambooth_min.unet")
    from diffusers import StableDiffusionPipeline

    unet = _tiny_diffusers_unet()
    ours = unet_mod.UNet2DConditionModel(unet_mod.UNetConfig.from_diffusers(dict(unet.config))).eval()
    ours.load_state_dict(unet.state_dict(), strict=True)
    loras = inject_lora(unet, LOCON_TARGETS, rank=4, alpha=8, conv_rank=3, conv_alpha=1.5)
    randomize(loras)
    path = tmp_path / "locon.safetensors"
    save_lora(path, lora_state_dict(loras))
    meta = load_lora(path)[1]  # kohya's metadata: linear dim / alpha, and the conv ones in ss_network_args
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.5"}
    ref = _tiny_diffusers_unet()
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, ref)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    assert_well_conditioned("LoCon in diffusers' UNet", lambda: ref(x, 10, c).sample, [ref], 1e-4)
    with torch.no_grad():
        theirs = ref(x, 10, c).sample
        assert (unet(x, 10, c).sample - theirs).abs().max() <= 1e-4
        assert (theirs - _tiny_diffusers_unet()(x, 10, c).sample).abs().max() > 1e-2
    for merge in (True, False):
        mine = copy.deepcopy(ours)
        applied = apply_lora(mine, None, load_lora(path)[0], merge=merge)
        assert len(applied) == len(loras)
        if not merge:  # the same wrapper kinds as trained: 5 + 4 + 9 3x3 convs in down, mid, up; conv_in, conv_out
            n_conv = sum(isinstance(m, LoRAConv2d) for m in loras.values())
            assert n_conv == 20 and sum(isinstance(m, LoRAConv2d) for m in applied.values()) == n_conv
        with torch.no_grad():
            assert (mine(x, torch.tensor(10), c) - theirs).abs().max() <= 1e-4


def test_locon_training_run_resumes_identically_and_writes_kohya_conv_keys(tiny_sd1, tmp_path):
    """train.py with LoCon targets (attention + conv1/conv2) and the text encoder: a 3x3 down, 1x1 up per
    conv, its own rank, and Ctrl-C + resume equal to an uninterrupted run, byte for byte."""
    from pathlib import Path

    from test_training import config

    from dreambooth_min.run.training import train

    kw = dict(steps=4, lora_targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"), conv_rank=2,
              train_text_encoder=True, prior_weight=0.0)
    whole = train(config(tmp_path / "a", tiny_sd1["single"], **kw), log=lambda *_: None)
    cfg = config(tmp_path / "b", tiny_sd1["single"], **kw)
    train(cfg, stop_after=2, log=lambda *_: None)
    resumed = train(cfg, resume=True, log=lambda *_: None)
    assert Path(whole["lora"]).read_bytes() == Path(resumed["lora"]).read_bytes()
    tensors, meta = load_lora(whole["lora"])
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert down.shape[0] == 2 and down.shape[2:] == (3, 3) and up.shape[1:] == (2, 1, 1)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4
    assert any(k.startswith("lora_te_") for k in tensors) and "conv_dim" in meta.get("ss_network_args", "")
