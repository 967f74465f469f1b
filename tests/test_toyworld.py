"""The toy-world experiment (examples/toyworld/): world generator, detectors, and the whole pipeline at tiny size.

The full experiment is a command (python examples/toyworld.py --out DIR --seeds 3), not a test; here it runs
with tiny models and a few steps, which checks every phase, the seeds path and the files it writes, not the
numbers.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.toyworld import detect, world  # noqa: E402
from examples.toyworld.cases import CASES, GOALS, PROMPTS, models  # noqa: E402
from examples.toyworld.experiment import main, run, tiny_settings  # noqa: E402
from examples.toyworld.figure import figure  # noqa: E402
from examples.toyworld.measure import goals_every_seed, noise_seed, summary, table  # noqa: E402

MODELS = [m.name for m in models()]


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


def _mtime(path):
    return path.stat().st_mtime_ns


def test_tiny_pipeline_end_to_end_then_more_seeds_on_the_same_model(tmp_path):
    results = run(tiny_settings(), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["goals"] == results["goals"] and saved["seeds"] == [0] and list(saved["per_seed"]) == ["0"]
    first = saved["per_seed"]["0"]
    for m in MODELS:
        for key in ("fidelity", "drift", "red_kept", "fidelity_magenta_stripes", "drift_magenta", "red_kept_hue"):
            assert 0.0 <= first[m][key] <= 1.0, (m, key)
            assert saved["summary"][m][key] == {"mean": first[m][key], "min": first[m][key], "max": first[m][key]}
    assert 0.0 <= first["pretrained"]["colour_accuracy"] <= 1.0
    assert saved["detector_accuracy"]["rendered"]["colour_correct"] >= 0.95
    assert saved["detector_accuracy"]["rendered"]["subject_found"] == 1.0
    phases = ("class_images", "dreambooth_no_prior", "dreambooth_prior", "sampling")
    assert saved["wall_seconds"]["pretrain"] >= 0 and all(saved["wall_seconds"]["seed_0"][p] >= 0 for p in phases)
    runs = tmp_path / "seed_0" / "runs"
    assert all((runs / c.name / "lora.safetensors").exists() for c in CASES)
    assert "prior_weight" not in saved["train_commands"]["no_prior"] and "--no-prior" in saved["train_commands"]["no_prior"]
    assert (tmp_path / "model" / "model_index.json").exists() and (tmp_path / "pretrain.json").exists()
    assert len(list((tmp_path / "seed_0").glob("class_images_*/*.png"))) == 4
    from PIL import Image

    with Image.open(tmp_path / "figure.png") as fig:
        assert fig.size[0] > 3 * 64 and fig.size[1] > 3 * 64
    assert len(list((tmp_path / "seed_0" / "grids").rglob("*.png"))) == 9
    assert table(saved, models()).count("\n") == 4

    # A second call with the same --out and two seeds, prior case only: the model is not pretrained again,
    # seed 0's finished run of the same command is reused (hence its numbers are the same), seed 1 is new.
    model_file = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    lora0 = runs / "prior" / "lora.safetensors"
    stamps = _mtime(model_file), _mtime(lora0)
    s = tiny_settings(seeds=2)
    s.cases = ("prior",)
    more = run(s, tmp_path)
    assert (_mtime(model_file), _mtime(lora0)) == stamps and "pretrain" not in more["wall_seconds"]
    assert more["seeds"] == [0, 1] and more["per_seed"]["0"]["prior"] == first["prior"]
    assert (tmp_path / "seed_1" / "runs" / "prior" / "lora.safetensors").exists()
    assert not (tmp_path / "seed_1" / "runs" / "no_prior").exists() and "no_prior" not in more["summary"]
    assert set(more["goals"]) == {g.label for g in GOALS if g.case == "prior"}
    values = [more["per_seed"][k]["prior"]["drift"] for k in ("0", "1")]
    assert more["summary"]["prior"]["drift"] == {"mean": sum(values) / 2, "min": min(values), "max": max(values)}
    assert json.loads((tmp_path / "results.json").read_text())["per_seed"]["1"] == more["per_seed"]["1"]

    # Other pretraining settings with the same --out: one error line before any work, nothing replaced.
    other = tiny_settings()
    other.vae_steps += 1
    with pytest.raises(SystemExit, match="error: .*pretrained with other settings"):
        run(other, tmp_path)
    assert _mtime(model_file) == stamps[0]


def test_summary_is_mean_and_range_and_goals_must_hold_on_every_seed():
    def numbers(drift, red):
        r = {"prior": {"fidelity": 1.0, "drift": drift, "red_kept": red}}
        r["goals"] = {g.label: g.met(r) for g in GOALS if g.case == "prior"}
        return r

    per_seed = {"0": numbers(0.0, 0.9), "1": numbers(0.125, 0.8), "2": numbers(0.05, 0.7)}
    stats = summary(per_seed)["prior"]
    assert stats["drift"] == {"mean": (0.0 + 0.125 + 0.05) / 3, "min": 0.0, "max": 0.125}
    assert stats["red_kept"]["min"] == 0.7 and stats["red_kept"]["max"] == 0.9
    every = goals_every_seed(per_seed)
    assert every["prior: drift <= 10%"] is False and every["prior: red kept >= 70%"] is True
    assert per_seed["0"]["goals"]["prior: drift <= 10%"] and not per_seed["1"]["goals"]["prior: drift <= 10%"]
    # Seeds k and k + 1 share no picture's noise (generate draws picture i from seed + i), nor do the batches
    # of one seed (samples, colours, class images) while a prompt has at most 1,000 samples.
    firsts = sorted(noise_seed(k, o) for k in range(3) for o in (1_000, 2_000, 5_000))
    assert all(b - a >= 1_000 for a, b in zip(firsts, firsts[1:])) and noise_seed(0, 1_000) == 1_000


def test_bad_seeds_and_cases_give_one_error_line(tmp_path, capsys):
    for argv in (["--seeds", "0"], ["--cases", "prior,masked"]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), "--tiny"] + argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("toyworld.py: error:") or "error:" in err[-1]
    assert not (tmp_path / "x").exists()


def test_margin_counts_half_blended_shapes_as_the_world_colour():
    protos = {"red": [200.0, 35.0, 35.0], "green": [40.0, 170.0, 50.0], "subject": [185.0, 145.0, 125.0]}
    a = np.full((32, 32, 3), 20, np.uint8)
    a[8:24, 8:24] = (190, 110, 100)  # between red and the subject, a little nearer the subject
    d = {n: float(np.linalg.norm(np.array([190, 110, 100]) - p)) for n, p in protos.items()}
    assert d["subject"] < d["red"]
    assert detect.nearest(a, protos) == "subject" and detect.nearest(a, protos, margin=0.0) == "subject"
    assert detect.nearest(a, protos, margin=d["red"] - d["subject"] - 1) == "subject"
    assert detect.nearest(a, protos, margin=d["red"] - d["subject"] + 1) == "red"
    a[8:24, 8:24] = (200, 40, 40)
    assert detect.nearest(a, protos, margin=1000.0) == "red"


def test_figure_headers_do_not_run_into_each_other(tmp_path):
    """At --tiny sizes a cell (2x2 samples) is narrower than its column's header: the column widens."""
    from PIL import Image

    tile = Image.new("RGB", (32, 32), (20, 20, 20))
    samples = {m.name: {p: [tile] * 4 for p in PROMPTS} for m in models()}
    with Image.open(figure(samples, models(), tmp_path / "f.png", zoom=2)) as im:
        header = np.asarray(im.convert("L"))[:26] < 128  # the header band: dark text pixels
    ink = np.flatnonzero(header.any(0))
    groups = 1 + int((np.diff(ink) > 8).sum())  # runs of text separated by more than a wide space
    assert groups == len(models())


@pytest.mark.parametrize("colour", list(world.COLOURS))
def test_colour_samples_render_in_their_colour(colour):
    image, caption, c, shape = world.world_sample(__import__("random").Random(5), colour=colour)
    assert c == colour and detect.colour(image) == colour
