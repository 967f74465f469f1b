"""Our AutoencoderKL against diffusers' on tiny random weights, and the full-size layout."""
import pytest
import torch

from dreambooth_min.errors import UserError
from dreambooth_min.vae import AutoencoderKL, VAEConfig

from conditioning import assert_well_conditioned

diffusers = pytest.importorskip("diffusers")

TINY = VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4)
# A tenth of it stays above what 1e-6 relative weight noise does to these outputs (1e-5 to 2.5e-5 on values up to
# 4; tests/conditioning.py). Ours and diffusers agree far closer.
TOL = 1e-3
X = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))  # non-square
X_ODD = torch.randn(1, 3, 13, 18, generator=torch.Generator().manual_seed(2))  # downsampler pads right/bottom only
Z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(3))


def reference(cfg, device=None):
    """diffusers' AutoencoderKL with the same sizes."""
    levels = len(cfg.block_out_channels)
    with torch.device(device or "cpu"):
        return diffusers.AutoencoderKL(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
            down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
            block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = reference(TINY).eval()
    with torch.no_grad():  # default init leaves norms at 1/0 and biases small: move every parameter
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = AutoencoderKL(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_well_conditioned("tiny VAE", lambda: [ref.encode(X).latent_dist.mean, ref.encode(X).latent_dist.logvar,
                                                 ref.encode(X_ODD).latent_dist.mean, ref.decode(Z).sample], [ref], TOL)
    return ours, ref


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ours, ref = pair
    mean, logvar = ours.encode(X)
    dist = ref.encode(X).latent_dist
    assert mean.shape == (2, 4, 6, 10)
    assert (mean - dist.mean).abs().max() <= TOL
    assert (logvar - dist.logvar).abs().max() <= TOL


@torch.no_grad()
def test_encode_odd_size_matches_diffusers(pair):
    ours, ref = pair  # the right/bottom-only padding of the downsampler decides odd sizes
    mean, _ = ours.encode(X_ODD)
    assert mean.shape == (1, 4, 3, 4)  # each level floors: 13 -> 6 -> 3, 18 -> 9 -> 4
    assert (mean - ref.encode(X_ODD).latent_dist.mean).abs().max() <= TOL


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ours, ref = pair
    image = ours.decode(Z)
    assert image.shape == (2, 3, 20, 28)
    assert (image - ref.decode(Z).sample).abs().max() <= TOL


@torch.no_grad()
def test_logvar_is_clamped():
    vae = AutoencoderKL(TINY).eval()
    vae.quant_conv.bias[4:] = 1e3  # pushes every logvar far above 20
    _, logvar = vae.encode(torch.zeros(1, 3, 8, 8))
    assert torch.all(logvar == 20.0)
    vae.quant_conv.bias[4:] = -1e3
    assert torch.all(vae.encode(torch.zeros(1, 3, 8, 8))[1] == -30.0)


def test_full_size_layout_equals_diffusers():
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.sd())
    ref = reference(VAEConfig.sd(), device="meta")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # SD 1.x / 2.x VAE
    assert len(ours.state_dict()) == 248
    assert ours.scaling_factor == 0.18215


def test_config_from_diffusers():
    assert VAEConfig.from_diffusers(dict(reference(TINY, device="meta").config)) == TINY
    assert VAEConfig.from_diffusers({}) == VAEConfig.sd()
    with pytest.raises(UserError):
        VAEConfig.from_diffusers({"use_quant_conv": False})
    with pytest.raises(UserError):
        VAEConfig.from_diffusers({"down_block_types": ["AttnDownEncoderBlock2D"]})
