"""The noise schedule and DDIM against closed forms, and step by step against diffusers' DDIMScheduler."""
import math

import pytest
import torch

from dreambooth_min import scheduler as S


def _abar(t):
    """a_t from the definition, one factor at a time in Python floats (float64)."""
    lo, hi = 0.00085 ** 0.5, 0.012 ** 0.5
    return math.prod(1 - (lo + (hi - lo) * s / 999) ** 2 for s in range(t + 1))


def _reference(prediction_type="epsilon", spacing="leading"):
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                         timestep_spacing=spacing)


# ---------------------------------------------------------------------------------------------------
# Schedule

def test_schedule_endpoints_and_monotonicity():
    a = S.alphas_cumprod()
    assert a.dtype == torch.float64 and a.shape == (1000,)
    assert a[0].item() == pytest.approx(1 - 0.00085, abs=1e-15)  # a_0 = 1 - beta_0
    assert a[1].item() == pytest.approx(_abar(1), rel=1e-14)
    assert a[999].item() == pytest.approx(_abar(999), rel=1e-12)
    assert a[999].item() == pytest.approx(0.0046601, abs=1e-7)  # SD's terminal a_T: x_T keeps some signal
    assert (a[1:] < a[:-1]).all() and (a > 0).all()
    betas = 1 - a[1:] / a[:-1]  # recover beta_t and check the "scaled_linear" form: sqrt(beta) linear in t
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-10)
    assert torch.allclose(betas.sqrt().diff(), torch.full((998,), (0.012 ** 0.5 - 0.00085 ** 0.5) / 999,
                                                           dtype=torch.float64), rtol=1e-6)


def test_schedule_matches_diffusers():
    ref = _reference().alphas_cumprod  # float32 there; ours is the float64 it approximates
    assert (S.alphas_cumprod().float() - ref).abs().max().item() < 2e-6


def test_add_noise_closed_form_and_statistics():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 6, generator=g)
    noise = torch.randn(3, 4, 5, 6, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = S.add_noise(x0, noise, t)
    for i in range(3):
        a = _abar(t[i].item())
        assert torch.allclose(x_t[i], a ** 0.5 * x0[i] + (1 - a) ** 0.5 * noise[i], atol=1e-6)
    assert torch.allclose(x_t, _reference().add_noise(x0, noise, t), atol=1e-6)
    # q(x_t | x_0) = N(sqrt(a) x_0, (1 - a) I) for a constant x_0 = 2
    n, t = 200_000, 300
    x = S.add_noise(torch.full((n, 1, 1, 1), 2.0), torch.randn(n, 1, 1, 1, generator=g), torch.full((n,), t))
    a = _abar(t)
    assert x.mean().item() == pytest.approx(2 * a ** 0.5, abs=4 * ((1 - a) / n) ** 0.5)
    assert x.var().item() == pytest.approx(1 - a, rel=0.01)


def test_v_target_matches_definition_and_diffusers():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([10, 900])
    v = S.v_target(x0, noise, t)
    for i in range(2):
        a = _abar(t[i].item())
        assert torch.allclose(v[i], a ** 0.5 * noise[i] - (1 - a) ** 0.5 * x0[i], atol=1e-6)
    assert torch.allclose(v, _reference().get_velocity(x0, noise, t), atol=1e-6)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_prediction_round_trips(t):
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64, generator=g)
    a = _abar(t)
    x_t = S.add_noise(x0, eps, torch.tensor([t, t]))
    v = S.v_target(x0, eps, torch.tensor([t, t]))
    close = lambda p, q: torch.allclose(p, q, atol=1e-9 / min(a, 1 - a))  # x0 from eps divides by sqrt(a)
    assert close(S.x0_from_eps(x_t, eps, a), x0)
    assert close(_eps_from_x0(x_t, x0, a), eps)
    assert close(S.x0_from_v(x_t, v, a), x0)
    assert close(S.eps_from_v(x_t, v, a), eps)
    assert close(_v_from_eps(x_t, eps, a), v)
    for kind, out in (("epsilon", eps), ("v_prediction", v)):
        x0_hat, eps_hat = S.predicted_x0_and_eps(x_t, out, a, kind)
        assert close(x0_hat, x0) and close(eps_hat, eps)
        t_batch = torch.tensor([t, t])
        assert close(S.prediction(kind).target(x0, eps, t_batch), out)  # the training target is the same thing


def _eps_from_x0(x_t, x0, a):
    return (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5


def _v_from_eps(x_t, eps, a):
    return a ** 0.5 * eps - (1 - a) ** 0.5 * S.x0_from_eps(x_t, eps, a)


# ---------------------------------------------------------------------------------------------------
# DDIM

def test_timesteps_closed_form():
    assert S.ddim_timesteps(20) == list(range(951, 0, -50))  # 951, 901, ..., 1 (released SD configs)
    assert S.ddim_timesteps(50)[:3] == [981, 961, 941] and S.ddim_timesteps(50)[-1] == 1
    assert S.ddim_timesteps(20, "trailing") == list(range(999, 0, -50))  # 999, 949, ..., 49
    assert S.ddim_timesteps(1) == [1] and S.ddim_timesteps(1, "trailing") == [999]
    with pytest.raises(ValueError):
        S.ddim_timesteps(0)
    with pytest.raises(ValueError):
        S.ddim_timesteps(10, "karras")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 25, 50, 999, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    ref = _reference(spacing=spacing)
    ref.set_timesteps(steps)
    if ref.timesteps[0] > 999:  # leading, 1000 steps, offset 1: diffusers' first t = 1000 has no a_t
        with pytest.raises(ValueError, match="reach t = 1000"):
            S.ddim_timesteps(steps, spacing)
    else:
        assert S.ddim_timesteps(steps, spacing) == ref.timesteps.tolist()


def test_one_step_by_hand():
    # eps-model: x_t = 1, eps_hat = 0.5 at t = 951 -> t_prev = 901, eta = 0
    a_t, a_p = _abar(951), _abar(901)
    x0_hat = (1 - (1 - a_t) ** 0.5 * 0.5) / a_t ** 0.5
    expected = a_p ** 0.5 * x0_hat + (1 - a_p) ** 0.5 * 0.5
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    got = S.ddim_step(x, torch.full_like(x, 0.5), 951, 901)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # v-model, eta = 1 with noise z = -1: sigma^2 is DDPM's posterior variance (DDIM eq. 16 at eta = 1)
    v = 0.25
    x0_hat, eps_hat = a_t ** 0.5 * 1 - (1 - a_t) ** 0.5 * v, (1 - a_t) ** 0.5 * 1 + a_t ** 0.5 * v
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    expected = a_p ** 0.5 * x0_hat + (1 - a_p - var) ** 0.5 * eps_hat - var ** 0.5
    got = S.ddim_step(x, torch.full_like(x, v), 951, 901, "v_prediction", eta=1.0, noise=-torch.ones_like(x))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # last step: t_prev = -1 lands on a_0 (set_alpha_to_one=False), or on x0_hat itself with True
    a_1, a_0 = _abar(1), _abar(0)
    x0_hat = (1 - (1 - a_1) ** 0.5 * 0.5) / a_1 ** 0.5
    got = S.ddim_step(x, torch.full_like(x, 0.5), 1, -1)
    assert got.item() == pytest.approx(a_0 ** 0.5 * x0_hat + (1 - a_0) ** 0.5 * 0.5, rel=1e-12)
    assert S.ddim_step(x, torch.full_like(x, 0.5), 1, -1, set_alpha_to_one=True).item() == pytest.approx(x0_hat, rel=1e-12)


def test_eta_zero_is_deterministic_and_ignores_noise():
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    a = S.ddim_step(x, out, 501, 451)
    assert torch.equal(a, S.ddim_step(x, out, 501, 451))
    assert torch.equal(a, S.ddim_step(x, out, 501, 451, eta=0.0, noise=torch.randn(1, 4, 8, 8, generator=g)))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_with_oracle_model_recovers_x0(kind, set_alpha_to_one):
    """A model that returns the true noise (or true v) of x_t keeps DDIM on the path
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, so it ends at x0 (or at a_0's noise level)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 4, 8, 8, dtype=torch.float64, generator=g)
    ts = S.ddim_timesteps(20)
    x = S.add_noise(x0, eps, torch.tensor([ts[0]]))
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        a = S.alphas_cumprod()[t].item()
        true_eps = _eps_from_x0(x, x0, a)
        out = true_eps if kind == "epsilon" else _v_from_eps(x, true_eps, a)
        x = S.ddim_step(x, out, t, t_prev, kind, set_alpha_to_one=set_alpha_to_one)
    expected = x0 if set_alpha_to_one else S.add_noise(x0, eps, torch.tensor([0]))
    assert (x - expected).abs().max().item() < 1e-10


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_trajectory_matches_diffusers(kind, spacing, eta):
    """A whole 10-step trajectory with a fixed toy "model", and eta > 0 noise from equal generators."""
    ref = _reference(kind, spacing)
    ref.set_timesteps(10)
    ts = S.ddim_timesteps(10, spacing)
    assert ts == ref.timesteps.tolist()
    model = lambda x, t: torch.tanh(0.8 * x) + 0.1 * math.sin(t)  # any smooth deterministic function
    x = x_ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    g, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        z = torch.randn(x.shape, generator=g) if eta > 0 else None
        x = S.ddim_step(x, model(x, t), t, t_prev, kind, eta, z)
        x_ref = ref.step(model(x_ref, t), t, x_ref, eta=eta, generator=g_ref).prev_sample
        # diffusers' schedule is float32 (ours float64): agreement to float32 precision, relative
        assert (x - x_ref).abs().max().item() < 1e-5 * max(1.0, x_ref.abs().max().item())


def test_clip_sample_clamps_x0():
    x = torch.full((1, 1, 1, 1), 5.0, dtype=torch.float64)
    out = torch.zeros_like(x)  # eps = 0: x0_hat = x / sqrt(a_t) > 1, clamped to 1
    a_p = _abar(901)
    assert S.ddim_step(x, out, 951, 901, clip_sample=True).item() == pytest.approx(a_p ** 0.5, rel=1e-12)
