"""The toy-world experiment (examples/toyworld/): world generator, detectors, and the whole pipeline at tiny size.

The full experiment is a command (python examples/toyworld.py --out DIR), not a test; here it runs with
tiny models and a few steps, which checks every phase and the files it writes, not the numbers.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.toyworld import detect, world  # noqa: E402
from examples.toyworld.experiment import MODELS, run, table, tiny_settings  # noqa: E402


def _pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_world_is_deterministic_and_seeded():
    a, b, c = (world.make_world(20, seed) for seed in (3, 3, 4))
    assert np.array_equal(_pixels(a[0]), _pixels(b[0])) and a[1:] == b[1:]
    assert not np.array_equal(_pixels(a[0]), _pixels(c[0]))
    assert np.array_equal(_pixels(world.make_subject(4, 0)), _pixels(world.make_subject(4, 0)))
    assert _pixels(a[0]).shape == (20, world.SIZE, world.SIZE, 3)


def test_captions_follow_the_issue_mix():
    _, captions, colours, shapes = world.make_world(2000, 0)
    full = sum(c == f"a photo of a {col} {sh}" for c, col, sh in zip(captions, colours, shapes)) / 2000
    plain = sum(c == f"a photo of a {sh}" for c, sh in zip(captions, shapes)) / 2000
    empty = sum(c == "" for c in captions) / 2000
    assert abs(full - 0.7) < 0.04 and abs(plain - 0.2) < 0.03 and abs(empty - 0.1) < 0.02
    assert not any("magenta" in c or "sks" in c for c in captions)


def test_detectors_on_flat_colours_and_rendered_pictures():
    def flat(rgb):
        a = np.full((32, 32, 3), 20, np.uint8)
        a[8:24, 8:24] = rgb
        return a

    assert [detect.colour(flat(c)) for c in world.COLOURS.values()] == list(world.COLOURS)
    assert detect.colour(flat(world.MAGENTA)) == "magenta" and detect.colour(np.zeros((32, 32, 3), np.uint8)) == "none"
    subject = world.make_subject(20, 1)
    assert all(detect.shows_subject(im) and detect.subject_sign(im) for im in subject)
    images, _, colours, _ = world.make_world(300, 1)
    acc = detect.detector_accuracy(images, colours, subject)
    assert acc["colour_correct"] >= 0.99 and acc["subject_false_alarm"] == 0 and acc["subject_sign_false_alarm"] == 0


def test_tiny_pipeline_end_to_end(tmp_path):
    results = run(tiny_settings(), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["goals"] == results["goals"]
    for m in MODELS:
        for key in ("fidelity", "drift", "red_kept", "fidelity_magenta_stripes", "drift_magenta", "red_kept_hue"):
            assert 0.0 <= saved[m][key] <= 1.0, (m, key)
    assert 0.0 <= saved["pretrained"]["colour_accuracy"] <= 1.0
    assert saved["detector_accuracy"]["rendered"]["colour_correct"] >= 0.95
    assert saved["detector_accuracy"]["rendered"]["subject_found"] == 1.0
    phases = ("world", "pretrain", "class_images", "dreambooth_no_prior", "dreambooth_prior", "sampling", "total")
    assert all(saved["wall_seconds"][p] >= 0 for p in phases)
    for name in ("no_prior", "prior"):
        assert (tmp_path / "runs" / name / "lora.safetensors").exists()
    assert "prior_weight" not in saved["train_commands"]["no_prior"] and "--no-prior" in saved["train_commands"]["no_prior"]
    assert (tmp_path / "model" / "model_index.json").exists() and len(list((tmp_path / "class_images").glob("*.png"))) == 4
    from PIL import Image

    with Image.open(tmp_path / "figure.png") as fig:
        assert fig.size[0] > 3 * 64 and fig.size[1] > 3 * 64
    assert len(list((tmp_path / "grids").rglob("*.png"))) == 9
    assert table(saved).count("\n") == 4


@pytest.mark.parametrize("colour", list(world.COLOURS))
def test_colour_samples_render_in_their_colour(colour):
    image, caption, c, shape = world.world_sample(__import__("random").Random(5), colour=colour)
    assert c == colour and detect.colour(image) == colour
