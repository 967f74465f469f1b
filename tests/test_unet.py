"""Our UNet against diffusers' UNet2DConditionModel: same names, same numbers, same sizes.

Tiny seeded models; diffusers is only the reference here (the package never imports it).
"""
import math

import pytest
import torch

from dreambooth_min.errors import UserError
from dreambooth_min.unet import UNet2DConditionModel, UNetConfig, timestep_embedding

from conditioning import assert_well_conditioned

diffusers = pytest.importorskip("diffusers")

# A tenth of it stays above what 1e-6 relative weight noise does to these outputs (1e-5 to 2e-5: every one of
# ~60 layers adds its share; tests/conditioning.py). Ours and diffusers agree far closer, to ~1e-6.
TOL = 1e-3

# SD 1.x topology at toy size: 8 heads everywhere, 1x1-conv projections, two res blocks per level.
SD1_LIKE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)
# SD 2.x topology: heads per level chosen so every head is 8 wide, Linear projections, upcast; and, to
# exercise the other code paths, four levels, one res block per level, two transformer blocks deep.
SD2_LIKE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                attention_head_dim=(2, 4, 8, 8), cross_attention_dim=24, norm_num_groups=8,
                use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2)

# The released unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SD15_JSON = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
             "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768, "down_block_types": DOWN, "downsample_padding": 1, "flip_sin_to_cos": True,
             "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
             "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": UP}
SD21_JSON = dict(SD15_JSON, _diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20],
                 cross_attention_dim=1024, dual_cross_attention=False, num_class_embeds=None,
                 only_cross_attention=False, sample_size=96, upcast_attention=True, use_linear_projection=True)


def _config_kwargs(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@torch.no_grad()
def reference_pair(cfg, seed=0):
    """A diffusers UNet with every parameter perturbed (no zero-init layer may hide a bug) and ours
    loaded from its state dict, strictly."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in ref.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    ref, ours = reference_pair(SD1_LIKE if request.param == "sd1" else SD2_LIKE)
    assert_well_conditioned(f"{request.param}-like UNet", lambda: [ref(*inputs(ref, hw)).sample for hw in SIZES],
                            [ref], TOL)
    return ref, ours


def inputs(ref, hw, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *hw, generator=g)
    ctx = torch.randn(2, 7, ref.config.cross_attention_dim, generator=g)
    return x, torch.tensor([3, 900]), ctx


SIZES = [(16, 24), (18, 14)]  # non-square; 18x14 is not divisible by 2^levels


@pytest.mark.parametrize("hw", SIZES)
def test_matches_diffusers(pair, hw):
    ref, ours = pair
    x, t, ctx = inputs(ref, hw)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == want.shape == x.shape
    assert want.std() > 0.1  # a non-trivial output
    assert (want[0] - want[1]).abs().max() > 0.1  # the two timesteps/noises really differ
    diff = (got - want).abs().max().item()
    print(f"max|diff| {hw}: {diff:.3g}")
    assert diff <= TOL


def test_timestep_forms_broadcast(pair):
    _, ours = pair
    x, _, ctx = inputs(ours, (16, 16))
    with torch.no_grad():
        want = ours(x, torch.tensor([500, 500]), ctx)
        for t in (500, torch.tensor(500), torch.tensor([500]), torch.tensor([500.0])):
            assert torch.equal(ours(x, t, ctx), want)


def test_timestep_embedding_closed_form():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 320)
    i = 7  # a frequency checked by hand: w_i = 10000^(-i/160), cos first then sin
    w = math.exp(-math.log(10000) * i / 160)
    # fp32 arguments up to t*w ~ 700 carry ~1e-4 rounding; the fp64 closed form is exact
    assert torch.allclose(emb[:, i], torch.cos(t.double() * w).float(), atol=5e-4)
    assert torch.allclose(emb[:, 160 + i], torch.sin(t.double() * w).float(), atol=5e-4)
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(emb, ref)


def test_from_diffusers_real_configs():
    assert UNetConfig.from_diffusers(SD15_JSON) == UNetConfig.sd1()
    assert UNetConfig.from_diffusers(SD21_JSON) == UNetConfig.sd2()
    sd2 = UNetConfig.sd2()
    assert sd2.num_attention_heads == (5, 10, 20, 20) and sd2.num_head_channels == (64, 64, 64, 64)
    assert UNetConfig.sd1().num_head_channels == (40, 80, 160, 160)
    # a config that names heads `num_attention_heads` (the correct name) means the same
    renamed = dict(SD21_JSON, num_attention_heads=[5, 10, 20, 20], attention_head_dim=None)
    assert UNetConfig.from_diffusers(renamed) == sd2
    # diffusers' own (fully filled-in) config dicts
    for cfg in (SD1_LIKE, SD2_LIKE):
        with torch.device("meta"):
            ref = diffusers.UNet2DConditionModel(**cfg)
        ours = UNetConfig.from_diffusers(dict(ref.config))
        assert ours.block_out_channels == cfg["block_out_channels"]
        assert ours.attention_levels == tuple(t.startswith("CrossAttn") for t in cfg["down_block_types"])
    ours = UNetConfig.from_diffusers(SD2_LIKE)  # a sparse dict: missing keys take diffusers' defaults
    assert ours.num_attention_heads == (2, 4, 8, 8) and ours.num_head_channels == (8, 8, 8, 8)
    assert ours.use_linear_projection and ours.upcast_attention and ours.transformer_layers_per_block == 2


@pytest.mark.parametrize("bad", [dict(addition_embed_type="text_image"), dict(class_embed_type="timestep"),
                                 dict(down_block_types=["AttnDownBlock2D"] + DOWN[1:]),
                                 dict(up_block_types=list(reversed(UP))), dict(attention_head_dim=7),
                                 dict(resnet_time_scale_shift="scale_shift")])
def test_from_diffusers_rejects_other_unets(bad):
    with pytest.raises(UserError):
        UNetConfig.from_diffusers(dict(SD15_JSON, **bad))


@pytest.mark.parametrize("version,count", [("sd1", 859_520_964), ("sd2", 865_910_724)])
def test_full_size_names_shapes_and_count(version, count):
    cfg_json = SD15_JSON if version == "sd1" else SD21_JSON
    with torch.device("meta"):
        ours = UNet2DConditionModel(getattr(UNetConfig, version)())
        ref = diffusers.UNet2DConditionModel(**_config_kwargs(cfg_json))
    assert sum(p.numel() for p in ours.parameters()) == count
    assert sum(p.numel() for p in ref.parameters()) == count
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_attention_projections_are_called_by_name():
    """LoRA replaces `to_q` & co. by module name, so each must be called as a module once per forward."""
    _, ours = reference_pair(SD1_LIKE)
    calls = {}
    suffixes = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    for name, m in ours.named_modules():
        if name.endswith(suffixes):
            m.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    n_transformers = sum(1 for name, _ in ours.named_modules() if name.endswith("transformer_blocks.0"))
    assert n_transformers == 2 * 2 + 1 + 2 * 3  # down levels 0-1, mid, up levels 1-0
    x, t, ctx = inputs(ours, (8, 8))
    with torch.no_grad():
        ours(x, t, ctx)
    assert len(calls) == n_transformers * (2 + 2 * 4 + 2) and set(calls.values()) == {1}


def test_gradient_checkpointing_same_values_and_grads():
    _, ours = reference_pair(SD2_LIKE)
    ours.train()
    x, t, ctx = inputs(ours, (18, 14))
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    resnet = ours.down_blocks[1].resnets[0]
    runs = []
    resnet.register_forward_pre_hook(lambda *a: runs.append(1))  # (recompute stops early: no post-hook)

    def step(ckpt):
        ours.gradient_checkpointing = ckpt
        ours.zero_grad()
        xs, cs = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        runs.clear()
        out = ours(xs, t, cs)
        (out * w).sum().backward()
        return out.detach(), xs.grad, cs.grad, ours.down_blocks[0].attentions[0].proj_in.weight.grad.clone(), len(runs)

    out0, gx0, gc0, gw0, runs0 = step(False)
    out1, gx1, gc1, gw1, runs1 = step(True)
    assert (runs0, runs1) == (1, 2)  # checkpointing really recomputes the block in backward
    assert gx0.abs().max() > 0 and gc0.abs().max() > 0
    for a, b in ((out0, out1), (gx0, gx1), (gc0, gc1), (gw0, gw1)):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, a.abs().max().item())
    # no recomputation outside training with gradients
    ours.eval()
    runs.clear()
    with torch.no_grad():
        ours(x, t, ctx)
    assert len(runs) == 1
    ours.gradient_checkpointing = False
