"""What a newcomer meets (issue 20): each bad input is one line before slow work and leaves nothing behind;
the plan says when a model is a tiny random one and how long the run will take; the words are right."""
import importlib
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_min.formats import checkpoint

from dreambooth_min.errors import SettingError, UserError
from dreambooth_min.formats.lora_apply import apply_lora, file_family, model_family, parse_lora_arg
from dreambooth_min.formats.lora_file import lora_state_dict
from dreambooth_min.formats.make_tiny import build_tiny, make_tiny
from dreambooth_min.lora import inject_lora
from dreambooth_min.run import estimate, prior, setup
from dreambooth_min.run.cli import run_command
from dreambooth_min.run.config import config_from_json
from dreambooth_min.run.training import train
from test_training import config, synthetic_images

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # sample.py, train.py

import sample  # noqa: E402
import train as train_cli  # noqa: E402


def _no_load(monkeypatch):
    """Loading the model is slow work: the checks under test must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(checkpoint, "load", refuse)
    monkeypatch.setattr(sample.dreambooth_min, "load", refuse)


# 1. sample.py checks --out before loading the model and drawing

@pytest.mark.parametrize("out, message", [
    ("afile/x.png", "error: cannot write --out afile/x.png: afile is a file, not a folder"),
    ("afile/sub/x.png", "error: cannot write --out afile/sub/x.png: afile is a file, not a folder"),
    ("folder.png", "error: cannot write --out folder.png: it is a folder")])
def test_sample_checks_its_destination_first(out, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.png").mkdir()
    _no_load(monkeypatch)
    assert sample.main(["--model", "m.safetensors", "--prompt", "x", "--out", out]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.png"]  # nothing left behind


# 2. a tiny random model says so; 10. "1 epoch"

def test_the_plan_says_a_tiny_model_is_random_and_counts_in_words(tmp_path, monkeypatch, capsys):
    make_tiny(tmp_path / "weights" / "tiny-sd1")
    monkeypatch.chdir(tmp_path)  # the model comes from weights/, as in the README's try-out recipe
    monkeypatch.setattr(setup, "ensure_class_images", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    lines = []
    cfg = config(tmp_path, "", steps=3, validate_every=1, validation_images=1, validation_steps=1)
    with pytest.raises(KeyboardInterrupt):  # stop after the plan, as Ctrl-C would
        train(cfg, log=lines.append)
    plan = lines[0].splitlines()
    assert plan[0] == ("model       weights/tiny-sd1 (sd1, epsilon): a tiny random model (python -m "
                       "dreambooth_min.formats.make_tiny): its pictures are noise (the one model in weights/; --model "
                       "chooses another)")
    assert plan[4] == "validation  'a photo of sks dog in the snow' every 1 epoch"
    assert plan[5].startswith("training    3 steps (1 epoch), LoRA rank 4")
    assert plan[9].startswith("time        about ") and "for the class images, " in plan[9]
    assert len(plan) == 10  # no CPU warning for a tiny model
    assert not (tmp_path / "run").exists()

    capsys.readouterr()
    sample.main(["--prompt", "x", "--steps", "1", "--height", "32", "--width", "32", "--out", "x.png",
                 "--no-progress"])
    assert capsys.readouterr().err.splitlines()[0] == \
        "warning: weights/tiny-sd1 is a tiny random model (python -m dreambooth_min.formats.make_tiny): its pictures are noise"


def test_counts_are_singular_or_plural():
    from dreambooth_min.run.setup import plural

    assert [plural(n, "epoch") for n in (1, 1.0, 2, 0.5, 1500000)] == \
        ["1 epoch", "1 epoch", "2 epochs", "0.5 epochs", "1500000 epochs"]


def test_only_make_tiny_marks_its_models(tiny_sd1):
    assert checkpoint.load(tiny_sd1["folder"]).random_note == ""
    assert checkpoint.load(tiny_sd1["single"]).random_note == ""


# 3. a time estimate, and a warning for a full-size model on the CPU

def test_estimate_counts_unet_passes(tmp_path):
    cfg = config(tmp_path, "", batch_size=2, grad_accum=3, class_steps=30, validation_images=4,
                 validation_steps=20, gradient_checkpointing=True)
    class_images, step, validation = estimate.estimate(cfg, 0.5, to_draw=10, validations=7)
    assert class_images == 10 * 30 * 2 * 0.5  # CFG: two latents per DDIM step
    assert step == pytest.approx(2 * 2 * 3 * 0.5 * estimate.STEP_PASSES * estimate.CHECKPOINTING)  # instance+class
    assert validation == 7 * 4 * 20 * 2 * 0.5
    cfg.prior_weight, cfg.gradient_checkpointing = 0.0, False
    assert estimate.estimate(cfg, 0.5, 0, 0)[1] == pytest.approx(2 * 3 * 0.5 * estimate.STEP_PASSES)
    assert [estimate.duration(s) for s in (0.2, 89, 95, 5399, 9000)] == ["1 s", "89 s", "2 min", "90 min", "2.5 h"]


def test_a_full_size_model_on_the_cpu_is_warned_about(tmp_path, monkeypatch):
    make_tiny(tmp_path / "tiny")
    monkeypatch.setattr(estimate, "FULL_SIZE", 1000)  # the tiny UNet stands in for a full-size one
    monkeypatch.setattr(setup, "seconds_per_latent", lambda *a: 2.0)
    monkeypatch.setattr(setup, "ensure_class_images", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    lines = []
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, tmp_path / "tiny", steps=100, num_class_images=3), log=lines.append)
    plan = lines[0].splitlines()
    # 3 class images x 2 DDIM steps x 2 latents x 2 s; 100 steps x 2 latents x 3 passes x 2 s
    assert plan[-2] == ("time        about 24 s for the class images, 20 min for the training (rough: from one "
                        "timed UNet pass; the progress bars show the real rate)")
    assert plan[-1] == ("warning: a full-size model trains on the CPU, about 12 s a step: use a GPU, or try the "
                        "commands first on a tiny model (python -m dreambooth_min.formats.make_tiny)")
    assert not estimate.is_full_size(torch.nn.Linear(10, 10))


# 4. --class-dir under a file; 5. a --lora-targets typo: before the model / the plan, nothing left behind

def test_class_dir_under_a_file_stops_before_loading(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    _no_load(monkeypatch)
    lines = []
    with pytest.raises(UserError) as e:
        train(config(tmp_path, "m.safetensors", class_dir=str(tmp_path / "afile" / "class")), log=lines.append)
    assert str(e.value) == f"cannot write --class-dir {tmp_path}/afile/class: {tmp_path}/afile is a file, not a folder"
    assert lines == [] and not (tmp_path / "run").exists()


def test_a_lora_target_typo_stops_before_the_plan(tiny_sd1, tmp_path, capsys):
    lines = []
    with pytest.raises(SettingError) as e:
        train(config(tmp_path, tiny_sd1["single"], lora_targets=("to_q", "to_kk", "nothing_like_it")),
              log=lines.append)
    assert e.value.setting == "lora_targets" and e.value.problem == (
        "'to_kk' (did you mean 'to_k'?), 'nothing_like_it' name no Linear or Conv2d layer of this UNet (a target "
        "is the end of layer names, e.g. to_q, to_out.0, proj_in, ff.net.2, conv1)")
    assert lines == [] and not (tmp_path / "run").exists()
    with pytest.raises(SettingError, match=r"^lora_targets 'attn1' \(did you mean 'attn1.to_\w+'\?\) names no"):
        train(config(tmp_path, tiny_sd1["single"], lora_targets=("attn1",)), log=lines.append)  # not a layer


# 6. config.json values of the wrong type; 9. --resume of a folder that is not a run

@pytest.mark.parametrize("saved, message", [
    ('{"config": {"steps": "ten"}}', "steps must be a whole number, not 'ten'"),
    ('{"config": {"lr": "fast"}}', "lr must be a number, not 'fast'"),
    ('{"config": {"flip": 1}}', "flip must be true or false, not 1"),
    ('{"config": {"rank": 4.5}}', "rank must be a whole number, not 4.5"),
    ('{"config": {"lora_targets": ["to_q", 3]}}', "lora_targets must be a list of names, not ('to_q', 3)")])
def test_resume_with_a_mistyped_config_is_one_line(saved, message, tmp_path, capsys):
    (tmp_path / "config.json").write_text(saved)
    assert train_cli.main(["--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: the run's configuration {tmp_path}/config.json is damaged: {message}\n"


def test_a_well_typed_config_still_resumes(tmp_path):
    (tmp_path / "config.json").write_text('{"config": {"steps": 10, "lr": 1, "flip": false, "lora_targets": ["to_q"]}}')
    cfg = config_from_json(tmp_path / "config.json")  # an integer is a fine float
    assert (cfg.steps, cfg.lr, cfg.flip, cfg.lora_targets) == (10, 1, False, ("to_q",))


def test_resume_of_a_photo_folder_says_it_is_not_a_run(tmp_path, capsys):
    synthetic_images(tmp_path / "dog")
    assert train_cli.main(["--resume", str(tmp_path / "dog")]) == 2
    assert capsys.readouterr().err == (f"error: --resume {tmp_path}/dog: not a run folder (it has no config.json); "
                                       "give the folder that train.py made, e.g. runs/20261125-101500\n")
    assert train_cli.main(["--resume", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (f"error: --resume {tmp_path}/nope: no such run folder (runs are in "
                                       "runs/<timestamp>/ or --output)\n")


# 7. a LoRA of another family is named by family

def _lora_of(version):
    unet, _, _ = build_tiny(version)
    return lora_state_dict(inject_lora(unet, ("to_k",), 2))


WIDTHS = ": its cross-attention layers expect 64-wide text and do not fit this model's 32-wide text"


@pytest.mark.parametrize("metadata, families", [
    ({"ss_sd_version": "sd2"}, ", SD 2.x, and this model is SD 1.x (use an SD 1.x LoRA, or the SD 2.x model)"),
    ({"ss_base_model_version": "sd_v2"}, ", SD 2.x, and this model is SD 1.x (use an SD 1.x LoRA, or the SD 2.x model)"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
     ", SDXL, and this model is SD 1.x (use an SD 1.x LoRA, or the SDXL model)"),
    ({}, "")])  # no metadata and widths of no released family (tiny models): the widths alone
def test_a_lora_of_another_family_names_both(metadata, families):
    unet, _, text = build_tiny("sd1")
    with pytest.raises(UserError) as e:
        apply_lora(unet, text, _lora_of("sd2"), metadata=metadata)
    assert str(e.value) == f"this LoRA was made for another model family{families}{WIDTHS}"


def test_families_from_metadata_and_shapes():
    assert file_family({"ss_v2": "True"}) == "SD 2.x" and file_family({"ss_v2": "False"}) == "SD 1.x"
    assert file_family({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}) == "SD 2.x"
    assert file_family({}, 768) == "SD 1.x" and file_family({}, 2048) == "SDXL" and file_family({}, 32) is None
    assert model_family(build_tiny("sd1")[0]) == "SD 1.x" and model_family(build_tiny("sd2")[0]) == "SD 2.x"


# 8. Ctrl-C while class images are drawn: its own line, and what is kept

def test_ctrl_c_while_drawing_class_images_is_its_own_line(tmp_path, monkeypatch, capsys):
    calls = []

    def generate(sd, prompt, negative, num_images, **kw):
        calls.append(num_images)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return [Image.new("RGB", (8, 8))] * num_images

    monkeypatch.setattr(prior, "generate", generate)
    sd = type("SD", (), {"name": "m"})()
    folder = tmp_path / "class"
    assert run_command(lambda: prior.ensure_class_images(sd, folder, "a dog", 8, 8, steps=1, batch_size=4)) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"\ninterrupted: run the same command again: the 4 class images drawn so far (in {folder}) "
                        "are reused\n")
    assert len(list(folder.glob("*.png"))) == 4


# 9. --lora FILE:bad; evaluate.py's Hub warnings; personal photos are git-ignored

def test_lora_with_a_bad_strength_says_so(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(UserError) as e:
        parse_lora_arg(f"{lora}:abc")
    assert str(e.value) == f"--lora {lora}:abc: bad strength 'abc': give a number, e.g. {lora}:0.8"
    assert parse_lora_arg(f"{lora}:0.5") == (lora, 0.5)
    with pytest.raises(UserError, match="does not exist"):
        parse_lora_arg(str(tmp_path / "missing.safetensors"))


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluators_that_cannot_load_log_no_hub_warnings(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import huggingface_hub.utils._http as http

    from dreambooth_min.watch import evaluators

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # the Hub cannot be reached
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    importlib.reload(huggingface_hub.constants)
    monkeypatch.setattr(http.time, "sleep", lambda s: None)  # its retries wait up to 8 s each
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("huggingface_hub").addHandler(handler)
    try:
        with pytest.raises(UserError, match=r"^--clip-model 'someone/clip': cannot load the CLIP model"):
            evaluators.load_evaluators("someone/clip", "someone/dino", "cpu")
    finally:
        logging.getLogger("huggingface_hub").removeHandler(handler)
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_personal_photos_under_data_are_not_committed():
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("data/mathilda/01.jpg") and ignored("data/me.png")
    assert not ignored("data/dog/00.jpg")


# A mistyped flag: one line in every command, with the nearest flag (run/cli.py CommandParser)

@pytest.mark.parametrize("script, args, line", [
    ("train.py", ["--images", "x", "--stepz", "3"], "unrecognized arguments: --stepz 3 (did you mean --steps?)"),
    ("sample.py", ["--prompt", "x", "--stepz", "3"], "unrecognized arguments: --stepz 3 (did you mean --steps?)"),
    ("evaluate.py", ["run", "--marign", "0.1"], "unrecognized arguments: --marign 0.1 (did you mean --margin?)")])
def test_a_mistyped_flag_is_one_line_with_the_nearest_flag(script, args, line, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: {line}; see --help"]
