"""The toy-world experiment (examples/toyworld/): world generator, detectors, and the whole pipeline at tiny size.

The full experiment is a command (python examples/toyworld.py --out DIR --seeds 3), not a test; here it runs
with tiny models and a few steps, which checks every phase, the seeds path and the files it writes, not the
numbers.
"""
import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.toyworld import detect, world  # noqa: E402
from examples.toyworld.cases import CASES, GOALS, PROMPTS, TRAIN_PROMPT, models, table_models  # noqa: E402
from examples.toyworld.experiment import main, run, tiny_settings  # noqa: E402
from examples.toyworld.finetune import train_command  # noqa: E402
from examples.toyworld.figure import figure  # noqa: E402
from examples.toyworld.measure import goals_every_seed, noise_seed, summary, table  # noqa: E402



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
    assert not any("cyan" in c or "white" in c or "sks" in c for c in captions)


def _flat(rgb):
    a = np.full((32, 32, 3), 20, np.uint8)
    a[8:24, 8:24] = rgb
    return a


@lru_cache(maxsize=None)
def _rendered_prototypes(seed):
    images, _, colours, _ = world.make_world(120, seed)
    return detect.calibrate(images, colours, world.make_subject(12, seed))


def test_detector_calibrated_on_pictures_reads_held_out_pictures():
    protos = _rendered_prototypes(1)
    assert sorted(protos) == sorted(list(world.COLOURS) + ["subject", "background"])
    images, _, colours, _ = world.make_world(120, 2)
    acc = detect.accuracy(images, colours, world.make_subject(12, 2), protos)
    for reading in ("nearest", "pixel_vote"):
        assert acc[reading]["colour_correct"] >= 0.99 and acc[reading]["subject_found"] == 1.0
        assert acc[reading]["subject_false_alarm"] == 0.0
    assert detect.nearest(np.zeros((32, 32, 3), np.uint8), protos) == "none"


def test_no_blend_of_world_colours_reads_as_the_subject():
    """The subject lies outside the hull of the world's colours and the background: no mix of world colours
    (what the pretrained model draws for a prompt that names no colour), darkened or not, reads as it."""
    protos = _rendered_prototypes(1)
    rng = np.random.default_rng(0)
    vertices = np.array([protos[n] for n in world.COLOURS] + [protos["background"]])
    mixes = np.concatenate([rng.dirichlet(np.full(5, a), size=200) for a in (0.3, 1.0)]) @ vertices
    names = detect._read(mixes[mixes.max(1) >= detect.FOREGROUND], protos)
    assert "subject" not in names and len(names) > 200
    assert detect.nearest(_flat(world.CYAN), protos) == "subject"


def test_pixel_vote_reads_pixels_and_nearest_reads_the_mean():
    protos = {"red": [220.0, 35.0, 35.0], "blue": [45.0, 80.0, 230.0], "subject": [130.0, 228.0, 232.0],
              "background": [20.0, 20.0, 20.0]}
    a = _flat((220, 35, 35))
    a[8:14, 8:24] = (240, 240, 240)  # 6 of 16 rows white: most pixels red
    assert detect.pixel_vote(a, protos) == "red"
    a[14:24, 8:24] = (15, 215, 225)  # the other 10 rows cyan: the subject's stripes, pixel by pixel and mean
    assert detect.pixel_vote(a, protos) == "subject" and detect.nearest(a, protos) == "subject"


def test_train_commands_of_the_cases():
    s = tiny_settings()
    by_name = {c.name: c for c in CASES}
    cmd = lambda name: train_command(s, 3, "m", Path("o"), Path("r"), by_name[name], "c")
    assert "--no-prior" in cmd("no_prior") and "--prior-weight" not in cmd("no_prior")
    assert cmd("prior")[cmd("prior").index("--save-every") + 1] == str(s.curve_every)
    assert "--no-prior" in cmd("pivotal_no_prior") and "--pivotal" in cmd("pivotal_no_prior")
    assert "--pivotal" in cmd("pivotal") and cmd("pivotal")[cmd("pivotal").index("--prompt") + 1] == TRAIN_PROMPT
    assert by_name["pivotal"].prompt(PROMPTS[0]) == "a photo of <s0><s1> circle"
    assert "--masks" not in cmd("busy") and cmd("busy_masked")[cmd("busy_masked").index("--masks") + 1] == "o_masks"


def test_a_finished_run_is_reused_only_for_the_same_photos(tmp_path):
    from examples.toyworld.finetune import photos_digest

    photos, masks = tmp_path / "photos", tmp_path / "photos_masks"
    for folder in (photos, masks):
        folder.mkdir()
        (folder / "00.png").write_bytes(b"one")
    cmd = ["python", "train.py", "--images", str(photos), "--masks", str(masks)]
    first = photos_digest(cmd)
    assert photos_digest(cmd) == first and photos_digest(cmd[:4]) != first  # the masks count
    (masks / "00.png").write_bytes(b"two")
    assert photos_digest(cmd) != first


def test_busy_background_pictures_and_masks():
    """The masked case's photos: the subject on dark checks that never reach the foreground threshold, and a
    mask that lies a latent cell inside the circle; the background reading tells them from the world's."""
    from PIL import Image, ImageFilter

    pairs = world.make_subject_on_busy(6, 0)
    for image, mask in pairs:
        a, m = np.asarray(image), np.asarray(mask)
        shape = a.max(-1) >= detect.FOREGROUND
        assert m.shape == a.shape[:2] and m.max() == 255 and m.min() == 0
        assert shape[m > 0].all()  # the mask lies inside the shape...
        assert (a[~shape].max(-1) < detect.FOREGROUND).all()  # ...and the background is never read as it
        inside = np.asarray(Image.fromarray(shape).filter(ImageFilter.MinFilter(2 * world.MASK_INSET - 1)))
        assert not (m[~inside] == 255).any()  # fully white only a MASK_INSET inside the outline
    images, _, colours, _ = world.make_world(120, 1)
    busy = [im for im, _ in world.make_subject_on_busy(24, 1)]
    protos = detect.calibrate(images, colours, world.make_subject(12, 1), busy)
    assert protos["tint"]["plain"] < 2 < 40 < protos["tint"]["busy"]
    test, _, test_colours, _ = world.make_world(120, 2)
    acc = detect.accuracy(test, test_colours, world.make_subject(12, 2), protos, [im for im, _ in pairs])
    assert acc["background"] == {"busy_found": 1.0, "busy_false_alarm": 0.0, "subject_found_on_busy": 1.0}


def _mtime(path):
    return path.stat().st_mtime_ns


def test_tiny_pipeline_end_to_end_then_more_seeds_on_the_same_model(tmp_path):
    first_settings = tiny_settings()
    first_settings.cases = ("prior", "pivotal", "busy_masked")  # the curves, --pivotal's tokens, the masks
    results = run(first_settings, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["goals"] == results["goals"] and saved["seeds"] == [0] and list(saved["per_seed"]) == ["0"]
    first, names = saved["per_seed"]["0"], ("pretrained", "prior", "pivotal", "busy_masked")
    for m in names:
        for key in ("fidelity", "drift", "red_kept", "floor", "fidelity_pixels", "drift_pixels"):
            assert 0.0 <= first[m][key] <= 1.0, (m, key)
            assert saved["summary"][m][key] == {"mean": first[m][key], "min": first[m][key], "max": first[m][key]}
        assert first[m]["floor"] == max(first[m][k] for k in ("fidelity", "drift", "red_subject"))
    assert 0.0 <= first["pretrained"]["colour_accuracy"] <= 1.0
    assert all(0.0 <= first[m][k] <= 1.0 for m in names for k in ("busy", "busy_class"))
    masks = tmp_path / "subject_busy_masks"
    assert sorted(p.name for p in masks.iterdir()) == sorted(p.name for p in (tmp_path / "subject_busy").iterdir())
    assert f"masks from {masks}" in (tmp_path / "seed_0" / "runs" / "busy_masked" / "plan.txt").read_text()
    assert "--masks" in saved["train_commands"]["busy_masked"]
    acc = saved["detector_accuracy"]  # calibrated on a tiny autoencoder's pictures: the values mean nothing here
    assert all(0 <= acc[k][r][m] <= 1 for k in ("rendered", "autoencoded") for r in ("nearest", "pixel_vote")
               for m in ("colour_correct", "subject_found", "subject_false_alarm"))
    for name in ("prior", "pivotal"):  # a point every 2 steps (tiny), read by the same detector
        points = first["curves"][name]["curve"]
        assert [p["step"] for p in points] == [2, 4] and all(0 <= p["fidelity"] <= 1 for p in points)
        assert saved["curves"][name]["reached"] in ("0 of 1", "1 of 1")
        assert saved["curves"][name]["by_step"]["4"]["fidelity"]["mean"] == points[1]["fidelity"]
    phases = ("class_images", "dreambooth_prior", "dreambooth_pivotal", "sampling", "curves")
    assert saved["wall_seconds"]["pretrain"] >= 0 and all(saved["wall_seconds"]["seed_0"][p] >= 0 for p in phases)
    runs = tmp_path / "seed_0" / "runs"
    assert (runs / "pivotal" / "embedding.safetensors").exists()
    assert saved["model"] == "model" and str(tmp_path) not in json.dumps(saved)  # paths relative to --out
    assert (tmp_path / "model" / "model_index.json").exists() and (tmp_path / "pretrain.json").exists()
    assert len(list((tmp_path / "seed_0").glob("class_images_*/*.png"))) == 4
    from PIL import Image

    with Image.open(tmp_path / "figure.png") as fig:
        assert fig.size[0] > 3 * 64 and fig.size[1] > 3 * 64
    assert len(list((tmp_path / "seed_0" / "grids").rglob("*.png"))) == 12
    main_models, busy_models = table_models(first_settings.cases)
    assert table(saved, main_models).count("\n") == 5  # header, rule, 3 models, floor row
    assert [m.name for m in busy_models] == ["pretrained", "busy_masked"]

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
    assert not (tmp_path / "seed_1" / "runs" / "pivotal").exists() and "pivotal" not in more["summary"]
    assert set(more["goals"]) == {g.label for g in GOALS if g.case in ("prior", "pretrained")}
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
    def numbers(drift, red, floor=0.0):
        r = {"prior": {"fidelity": 1.0, "drift": drift, "red_kept": red}, "pretrained": {"drift": floor}}
        r["goals"] = {g.label: g.met(r) for g in GOALS if g.case == "prior"}
        return r

    per_seed = {"0": numbers(0.0, 0.9), "1": numbers(0.125, 0.8), "2": numbers(0.05, 0.7)}
    assert numbers(0.125, 0.8, floor=0.03)["goals"]["prior: drift <= floor + 10%"]  # 12.5% <= 3% + 10%
    stats = summary(per_seed)["prior"]
    assert stats["drift"]["max"] == 0.125
    assert stats["drift"] == {"mean": (0.0 + 0.125 + 0.05) / 3, "min": 0.0, "max": 0.125}
    assert stats["red_kept"]["min"] == 0.7 and stats["red_kept"]["max"] == 0.9
    every = goals_every_seed(per_seed)
    assert every["prior: drift <= floor + 10%"] is False and every["prior: red kept >= 70%"] is True
    assert per_seed["0"]["goals"]["prior: drift <= floor + 10%"] and not per_seed["1"]["goals"]["prior: drift <= floor + 10%"]
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
    assert c == colour and detect.nearest(image, _rendered_prototypes(1)) == colour


def test_readme_and_docs_show_the_measured_tables():
    """The tables in README.md and docs/toyworld.md are the ones the committed results.json gives (the masked
    cases' in the docs only: the README is short)."""
    from examples.toyworld.measure import background_table

    results = json.loads((ROOT / "docs" / "toyworld" / "results.json").read_text())
    main_models, busy_models = table_models(results["settings"]["cases"])
    main_table, busy_table = table(results, main_models), background_table(results, busy_models)
    readme, docs = ((ROOT / doc).read_text() for doc in ("README.md", "docs/toyworld.md"))
    assert main_table in readme and main_table in docs and busy_table in docs
    assert str(ROOT) not in json.dumps(results) and "/tmp/" not in json.dumps(results)
