"""The DreamBooth step against a hand computation of eq. 1 + eq. 2 on tiny real UNets."""
import math

import pytest
import torch

from dreambooth_min import load
from dreambooth_min.dreambooth import Batch, assemble_batch, dreambooth_step


def _alpha_bar(t):
    """a_t by hand: the product of (1 - beta_s), betas evenly spaced in sqrt between 0.00085 and 0.012."""
    betas = [(0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * s / 999) ** 2 for s in range(1000)]
    return math.prod(1 - b for b in betas[:t + 1])


@pytest.mark.parametrize("version,snr_gamma", [("sd1", 0.0), ("sd2", 5.0)])
def test_dreambooth_step_is_eq2_by_hand(version, snr_gamma, request):
    sd = load(request.getfixturevalue(f"tiny_{version}")["single"])
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, 4, generator=g)  # one subject row, two class rows
    t = torch.tensor([999, 0, 421])
    batch = Batch(x0, eps, t, ["a photo of sks dog", "a photo of dog", "a photo of dog"], n_instance=1)
    context = sd.encode_prompt(batch.prompts)
    with torch.no_grad():
        loss, instance, prior = dreambooth_step(sd.unet, batch, context, sd.prediction_type, prior_weight=0.6,
                                                snr_gamma=snr_gamma)
    rows = []
    for i in range(3):
        a = _alpha_bar(int(t[i]))
        x_t = a ** 0.5 * x0[i] + (1 - a) ** 0.5 * eps[i]
        y = eps[i] if version == "sd1" else a ** 0.5 * eps[i] - (1 - a) ** 0.5 * x0[i]  # eps, or v for SD 2.x
        with torch.no_grad():
            pred = sd.unet(x_t[None].float(), t[i:i + 1], context[i:i + 1])[0]
        err = ((pred - y) ** 2).mean().item()
        snr = a / (1 - a)
        w = min(snr, snr_gamma) / (snr + 1) if snr_gamma else 1.0  # min-SNR on v: min(SNR, gamma) / (SNR + 1)
        rows.append(w * err)
    assert instance.item() == pytest.approx(rows[0], rel=1e-4)
    assert prior.item() == pytest.approx((rows[1] + rows[2]) / 2, rel=1e-4)
    assert loss.item() == pytest.approx(rows[0] + 0.6 * (rows[1] + rows[2]) / 2, rel=1e-4)


class _Latents:
    """A stand-in LatentCache: row i is the constant i (sample() draws nothing)."""

    def __init__(self, n, offset=0.0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def sample(self, index, generator=None):
        return torch.stack([torch.full((4, 2, 2), float(i) + self.offset) for i in index])

    def draw(self, index, generator=None):  # no masks
        return self.sample(index, generator), None

    def time_ids(self, index):  # an SD 1.x / 2.x model: no size conditioning
        return None


def test_assemble_batch_puts_the_subject_first_then_as_many_class_rows():
    g = torch.Generator().manual_seed(0)
    batch = assemble_batch(_Latents(3), ["c0", "c1", "c2"], torch.tensor([2, 0]), _Latents(5, 100.0), "a dog", g)
    assert batch.n_instance == 2 and batch.prompts == ["c2", "c0", "a dog", "a dog"]
    assert batch.latents[:2, 0, 0, 0].tolist() == [2.0, 0.0]
    chosen = torch.randint(5, (2,), generator=torch.Generator().manual_seed(0))
    assert batch.latents[2:, 0, 0, 0].tolist() == (chosen + 100.0).tolist()
    assert batch.noise.shape == batch.latents.shape and batch.timesteps.shape == (4,)
    assert 0 <= batch.timesteps.min() and batch.timesteps.max() <= 999
    alone = assemble_batch(_Latents(3), ["c0", "c1", "c2"], torch.tensor([1]), None, "a dog", g)
    assert alone.n_instance == 1 and alone.prompts == ["c1"] and len(alone.latents) == 1

