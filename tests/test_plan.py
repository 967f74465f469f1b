"""What a run says before slow work, and what it leaves behind when it never started."""
import pytest

from dreambooth_min.errors import UserError
from dreambooth_min.run import setup
from dreambooth_min.run.training import train
from test_training import config, run_cli, synthetic_images


def test_the_plan_is_printed_before_slow_work(tiny_sd1, tmp_path):
    lines = []
    train(config(tmp_path, tiny_sd1["single"], steps=1, class_noun="person", prompt="a photo of sks {class_noun}"),
          log=lines.append)
    plan = lines[0]
    for part in ("model ", "(sd1, epsilon)", "photos      3 from", "32 px", "'a photo of sks person'",
                 "--class-noun", "prior       2 of 'a photo of person'", "0 cached, 2 to draw", "training    1 step ",
                 "hardware    cpu, fp32", "output"):
        assert part in plan, part


def test_resuming_a_run_that_never_started_says_so_before_any_work(tiny_sd1, tmp_path, monkeypatch):
    cfg = config(tmp_path, tiny_sd1["single"])

    def interrupted(*args, **kwargs):  # Ctrl-C while the class images are drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(setup, "ensure_class_images", interrupted)  # as run/setup.py calls it
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # no folder holding only config.json
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg, resume=True, log=lambda *_: None)


def test_usage_shows_that_images_are_required(tmp_path):
    r = run_cli(["--help"], tmp_path)
    assert r.stdout.startswith("usage: train.py --images FOLDER")
    assert "jpg/png/webp/bmp/tiff" in r.stdout and "--no-prior" in r.stdout and "(default: 4)" in r.stdout
    r = run_cli(["--class-noun", "dog"], tmp_path)
    assert r.returncode == 2 and "--images is required" in r.stderr
    synthetic_images(tmp_path / "imgs")
    r = run_cli(["--images", "imgs", "--rank", "0", "--model", "x.safetensors"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: --rank must be positive, not 0"
