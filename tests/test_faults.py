"""Fault injection: what a run survives (SIGKILL, full disk, damaged files, out of memory), and how.

Every fault below either ends in one `error:` line (with its exit status) or is passed over with one
warning; afterwards `--resume` gives the LoRA of an uninterrupted run, byte for byte (sha256).
"""
import builtins
import errno
import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_min.errors import DiskFull, OutOfMemory, UserError, is_out_of_memory
from dreambooth_min.run.cli import run_command
from dreambooth_min.run.state import checkpoint_problem
from dreambooth_min.run.training import train
from dreambooth_min.watch import plots, report
from test_training import ROOT, config, synthetic_images

STEPS = 6  # every run here has the same settings but for when and how often it saves: one reference LoRA


def settings(tmp_path, model, **kw):
    return config(tmp_path, model, **{"steps": STEPS, "prior_weight": 0.0, "save_every": 2, **kw})


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tiny_sd1, tmp_path_factory):
    """The sha256 of the uninterrupted run's lora.safetensors (checkpoints do not change the result)."""
    result = train(settings(tmp_path_factory.mktemp("reference"), tiny_sd1["single"]), log=lambda m: None)
    return sha(result["lora"])


def error_lines(capsys):
    """The `error:` lines on stderr (besides progress bars), after checking there is no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error")]


def assert_nothing_half_written(run):
    """What a reader takes for whole is whole: no temporary leftovers, every checkpoint matches its manifest,
    every log line and PNG reads back."""
    run = Path(run)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    for folder in (run / "checkpoints").glob("step_*"):
        assert checkpoint_problem(folder) is None, folder
    if (run / "log.jsonl").exists():
        for line in (run / "log.jsonl").read_text().splitlines():
            json.loads(line)
    for png in run.rglob("*.png"):
        with Image.open(png) as im:
            im.load()
    if (run / "config.json").exists():
        json.loads((run / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------
# Checkpoints verify themselves


def test_a_checkpoint_verifies_itself(tiny_sd1, tmp_path):
    cfg = settings(tmp_path, tiny_sd1["single"])
    train(cfg, stop_after=2, log=lambda m: None)
    good = Path(cfg.output) / "checkpoints" / "step_000002"
    manifest = json.loads((good / "manifest.json").read_text())
    assert manifest["step"] == 2
    for name in ("lora.safetensors", "state.pt"):
        assert manifest["files"][name] == {"bytes": (good / name).stat().st_size, "sha256": sha(good / name)}
    assert checkpoint_problem(good) is None

    def damaged(how):
        folder = tmp_path / "copies" / good.name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(good, folder)
        how(folder)
        return checkpoint_problem(folder)

    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))

    assert "truncated" in damaged(lambda f: os.truncate(f / "lora.safetensors", 1000))
    assert "SHA-256" in damaged(lambda f: flip(f / "state.pt"))
    assert "no manifest.json" in damaged(lambda f: (f / "manifest.json").unlink())
    assert "manifest.json is damaged" in damaged(lambda f: (f / "manifest.json").write_text('{"step": 2, "fi'))
    assert "state.pt is missing" in damaged(lambda f: (f / "state.pt").unlink())


def test_truncated_latest_checkpoint_resumes_from_the_one_before(tiny_sd1, tmp_path, reference):
    cfg = settings(tmp_path, tiny_sd1["single"])
    train(cfg, stop_after=5, log=lambda m: None)  # checkpoints 4 and (on the interruption) 5 are kept
    run = Path(cfg.output)
    latest = run / "checkpoints" / "step_000005" / "lora.safetensors"
    os.truncate(latest, latest.stat().st_size // 2)  # as a machine crash or a full disk can leave it
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 6, "epoch": 2.0, "lo')  # and a torn last line of the log
    messages = []
    result = train(cfg, resume=True, log=messages.append)
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "step_000005" in warnings[0] and "lora.safetensors" in warnings[0], messages
    assert any(m.startswith("resumed from") and m.split()[2].endswith("step_000004") for m in messages), messages
    assert sha(result["lora"]) == reference
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert_nothing_half_written(run)


def test_no_whole_checkpoint_starts_again_from_step_0(tiny_sd1, tmp_path, reference):
    cfg = settings(tmp_path, tiny_sd1["single"], save_every=0)
    train(cfg, stop_after=3, log=lambda m: None)
    state = Path(cfg.output) / "checkpoints" / "step_000003" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    state.write_bytes(bytes(data))
    messages = []
    result = train(cfg, resume=True, log=messages.append)
    assert any("starting again from step 0" in m and "SHA-256" in m for m in messages), messages
    assert sha(result["lora"]) == reference


# ---------------------------------------------------------------------------------------------------
# Disk full


class FullDisk:
    """Writes to files whose name contains `name` fail with ENOSPC from the `after`-th such file on, after
    half of the bytes went through (what a disk filling up mid-write does)."""

    def __init__(self, monkeypatch, name, after=1):
        self.name, self.left, self.real = name, after, builtins.open
        monkeypatch.setattr(builtins, "open", self.open)
        monkeypatch.setattr(io, "open", self.open)  # pathlib's write_text
        real_write = os.write

        def write(fd, data):  # report.append_jsonl writes with os.write
            if self.hit(os.readlink(f"/proc/self/fd/{fd}")):
                real_write(fd, data[:len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(report.os, "write", write)

    def hit(self, path):
        if self.name not in Path(str(path)).name:
            return False
        self.left -= 1
        return self.left <= 0

    def open(self, file, mode="r", *args, **kw):
        f = self.real(file, mode, *args, **kw)
        if any(c in mode for c in "wax") and self.hit(file):
            return _FailingFile(f)
        return f


class _FailingFile:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("name,after,where", [
    ("lora.safetensors", 2, "checkpoints"),  # the second checkpoint's LoRA (step 4)
    ("state.pt", 2, "checkpoints"),
    ("manifest.json", 1, "checkpoints"),
    ("log.jsonl", 3, "log.jsonl"),
    ("loss.png", 1, "loss.png"),
    ("lora.safetensors", 3, "lora.safetensors"),  # the final LoRA, after the checkpoints at steps 2 and 4
])
def test_disk_full_at_each_write_is_one_line_and_resumable(tiny_sd1, tmp_path, reference, monkeypatch, capsys,
                                                           name, after, where):
    cfg = settings(tmp_path, tiny_sd1["single"])
    with monkeypatch.context() as patch:
        FullDisk(patch, name, after)
        code = run_command(lambda: train(cfg, log=lambda m: None))
    err = error_lines(capsys)
    assert code == 4 and len(err) == 1, err
    assert err[0].startswith("error: the disk is full: could not write ") and where in err[0] and "MiB" in err[0]
    run = Path(cfg.output)
    assert_nothing_half_written(run)
    if where == "log.jsonl":
        assert len((run / "log.jsonl").read_text().splitlines()) == 2  # the half line was cut off again
    assert f"--resume {run}" in err[0]  # from the last whole checkpoint, or from step 0 (before the first)
    assert sha(train(cfg, resume=True, log=lambda m: None)["lora"]) == reference


def test_disk_full_writing_config_json_leaves_no_run_folder(tiny_sd1, tmp_path, monkeypatch):
    cfg = settings(tmp_path, tiny_sd1["single"])
    FullDisk(monkeypatch, "config.json")
    with pytest.raises(DiskFull, match="config.json"):
        train(cfg, log=lambda m: None)
    assert not Path(cfg.output).exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1.6 MB file system (root only): room for two of the tiny model's checkpoints, not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_file_system(tiny_sd1, tmp_path, small_tmpfs, reference, capsys):
    cfg = settings(tmp_path, tiny_sd1["single"], save_every=1, output=str(small_tmpfs / "run"))
    code = run_command(lambda: train(cfg, log=lambda m: None))
    err = error_lines(capsys)
    assert code == 4 and len(err) == 1, err
    assert err[0].startswith("error: the disk is full: could not write ") and "--resume" in err[0]
    run = Path(cfg.output)
    assert_nothing_half_written(run)
    assert len(list((run / "checkpoints").glob("step_*"))) == 2
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)  # space freed
    assert sha(train(cfg, resume=True, log=lambda m: None)["lora"]) == reference


# ---------------------------------------------------------------------------------------------------
# Out of memory


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")])
def test_out_of_memory_in_a_step_saves_the_last_finished_one(tiny_sd1, tmp_path, reference, monkeypatch, capsys,
                                                               error):
    from dreambooth_min.run import training

    cfg = settings(tmp_path, tiny_sd1["single"], save_every=0)
    real, calls = training.dreambooth_step, []

    def step(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # in step 4, after its random draws: they must be undone
            raise error
        return real(*args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(training, "dreambooth_step", step)
        code = run_command(lambda: train(cfg, log=lambda m: None))
    err = error_lines(capsys)
    assert code == 3 and len(err) == 1, err
    for advice in ("--gradient-checkpointing", "--resolution", "--precision fp16", "--resume"):
        assert advice in err[0], err
    folder = Path(cfg.output) / "checkpoints" / "step_000003"
    assert checkpoint_problem(folder) is None and str(folder) in err[0]
    assert sha(train(cfg, resume=True, log=lambda m: None)["lora"]) == reference


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_out_of_memory_drawing_class_images_keeps_those_drawn(tiny_sd1, tmp_path, monkeypatch):
    from dreambooth_min import load
    from dreambooth_min.run import prior

    real, calls = prior.generate, []

    def generate(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real(*args, **kw)

    monkeypatch.setattr(prior, "generate", generate)
    sd = load(tiny_sd1["single"])
    with pytest.raises(OutOfMemory, match=r"1 of 3 .* kept.*--resolution") as e:
        prior.ensure_class_images(sd, tmp_path / "c", "a photo of dog", 3, 32, steps=2, batch_size=1)
    assert e.value.exit_code == 3
    assert [p.name for p in sorted((tmp_path / "c").iterdir())] == ["0000.png"]


def test_a_failed_validation_is_a_warning(tiny_sd1, tmp_path, reference, monkeypatch, capsys):
    from dreambooth_min.watch import validation

    def draw(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(validation, "draw", draw)
    messages = []
    result = train(settings(tmp_path, tiny_sd1["single"], validate_every=1, validation_images=1,
                            validation_steps=2), log=messages.append)
    out = capsys.readouterr()
    lines = messages + (out.out + out.err).splitlines()  # through train's `log` or tqdm.write
    assert any(m.startswith("warning:") and "validation" in m and "out of memory" in m for m in lines), lines
    assert sha(result["lora"]) == reference


# ---------------------------------------------------------------------------------------------------
# Interrupted and damaged writes of other files


def test_damaged_class_image_is_drawn_again(tiny_sd1, tmp_path):
    from dreambooth_min import load
    from dreambooth_min.run.data import load_image
    from dreambooth_min.run.prior import ensure_class_images

    sd = load(tiny_sd1["single"])
    paths = ensure_class_images(sd, tmp_path / "c", "a photo of dog", 2, 32, steps=2)
    pixels = torch.tensor(list(Image.open(paths[1]).convert("RGB").tobytes()), dtype=torch.int)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:len(data) // 2])  # a half-copied file
    with pytest.raises(OSError):
        load_image(paths[1], 32)
    messages = []
    again = ensure_class_images(sd, tmp_path / "c", "a photo of dog", 2, 32, steps=2, log=messages.append)
    assert len(messages) == 1 and "0001.png" in messages[0] and "drawn again" in messages[0]
    load_image(again[1], 32)
    assert (torch.tensor(list(Image.open(again[1]).convert("RGB").tobytes()), dtype=torch.int) - pixels).abs().max() <= 1  # the same seed's image


def test_torn_log_line(tmp_path):
    log = tmp_path / "log.jsonl"
    report.append_jsonl(log, {"step": 1, "loss": 0.5})
    with open(log, "a") as f:
        f.write('{"step": 2, "lo')  # a process killed mid-line
    assert report.read_jsonl(log) == [{"step": 1, "loss": 0.5}]
    report.append_jsonl(log, {"step": 2, "loss": 0.25})  # starts on a line of its own
    assert report.read_jsonl(log) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    plots.plot_loss(report.read_jsonl(log), tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (800, 400)


def test_damaged_row_is_left_out_of_grid_png(tmp_path):
    rows = [tmp_path / f"epoch_{i:04d}.png" for i in range(3)]
    for i, p in enumerate(rows):
        Image.new("RGB", (8, 4), (80 * i, 0, 0)).save(p)
    rows[1].write_bytes(rows[1].read_bytes()[:20])
    report.stack_rows(rows, tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (8, 8)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_script():
    return _script("train")


def test_corrupt_config_json_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "config.json").write_text('{"config": {"images": "x", "st')  # torn
    assert _train_script().main(["--resume", str(run)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: cannot read the run's configuration") and "config.json" in err[0]


def test_exit_codes(capsys):
    def fails(error):
        def main():
            raise error
        return run_command(main)

    assert fails(UserError("bad")) == 2
    assert fails(OutOfMemory("out of memory in step 3")) == 3
    assert fails(DiskFull("the disk is full: could not write x", "x")) == 4
    assert fails(OSError(errno.ENOSPC, "No space left on device", "/out/y.png")) == 4  # the last net
    assert fails(torch.OutOfMemoryError("CUDA out of memory")) == 3
    err = error_lines(capsys)
    assert len(err) == 5 and all(line.startswith("error: ") for line in err) and "/out/y.png" in err[3]
    with pytest.raises(ValueError):
        fails(ValueError("a bug stays a traceback"))


# Where each command's work starts, with arguments that get there: a failure raised there must end the same way.
COMMANDS = {"train": ("train", ["--images", "photos"]),
            "sample": ("generate", ["--prompt", "x", "--model", "m", "--no-progress"]),
            "evaluate": ("folder_mode", ["--generated", "g", "--real", "r", "--prompt", "p"])}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("error, code", [
    (UserError("bad"), 2),
    (OutOfMemory("out of memory drawing"), 3),
    (torch.OutOfMemoryError("CUDA out of memory"), 3),
    (DiskFull("the disk is full: could not write x.png", "x.png"), 4),
    (OSError(errno.ENOSPC, "No space left on device", "x.png"), 4),
    (KeyboardInterrupt(), 130)])
def test_the_three_commands_share_one_error_path(command, error, code, capsys, monkeypatch, tmp_path):
    """train.py, sample.py and evaluate.py all end through run_command: the same exit status and one line."""
    monkeypatch.chdir(tmp_path)
    module = _script(command)
    where, argv = COMMANDS[command]
    if command == "sample":  # its work starts after loading the model: a stand-in model
        stand_in = type("SD", (), {"random_note": None, "default_resolution": 64})()
        monkeypatch.setattr(module.dreambooth_min, "load", lambda *args, **kwargs: stand_in)

    def fails(*args, **kwargs):
        raise error
    monkeypatch.setattr(module, where, fails)
    assert module.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("interrupted" if code == 130 else "error: ")


@pytest.mark.parametrize("command, argv, message", [
    ("evaluate.py", ["no_such_run"], "error: run folder no_such_run does not exist"),
    ("evaluate.py", ["--generated", "g", "--real", "r", "--prompt", "p", "--device", "gpu0"],
     "error: --device must be cuda, cuda:N or cpu, not 'gpu0'")])
def test_bad_input_to_evaluate_py_is_exit_2_and_one_line(command, argv, message, tmp_path):
    """evaluate.py as a user runs it (sample.py: tests/test_sampling.py): exit status 2 and one `error:` line."""
    r = subprocess.run([sys.executable, str(ROOT / command)] + argv, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(message), r.stderr


# ---------------------------------------------------------------------------------------------------
# SIGKILL at random moments, then --resume until done


@pytest.mark.parametrize("seed", [int(os.environ.get("FAULTS_SEED", 0))])  # FAULTS_SEED=n tries other moments
def test_sigkill_then_resume_gives_the_same_lora(tiny_sd1, tmp_path, reference, seed):
    """Killed twice at random moments (a step, a checkpoint write, a log append), then resumed to the end; a
    python start costs seconds here, so one chain of three processes keeps the test near 15 s."""
    synthetic_images(tmp_path / "images")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # the reference ran on one thread too
    args = ["--images", "images", "--model", str(tiny_sd1["single"]), "--output", "run", "--resolution", "32",
            "--class-noun", "dog", "--no-prior", "--steps", str(STEPS), "--validate-every", "0", "--save-every", "1",
            "--lr", "1e-3", "--seed", "3"]
    log, rng = tmp_path / "run" / "log.jsonl", random.Random(seed)
    for kill in range(3):
        command = args if kill == 0 else ["--resume", "run"]
        p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *command], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kill < 2:
            start = len(log.read_text().splitlines()) if log.exists() else 0
            # Step 1's line exists once training runs; its checkpoint once line 2 does (keep resuming possible).
            target = start + rng.randint(2 if start == 0 else 1, 2)
            deadline = time.time() + 60
            while p.poll() is None and time.time() < deadline and \
                    not (log.exists() and len(log.read_text().splitlines()) >= target):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.2))  # somewhere in the next step or its checkpoint write
            p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=120)
        if p.returncode == 0 or (p.returncode == 2 and "is finished" in err):  # killed after its last write
            break
        assert p.returncode == -signal.SIGKILL, err
    finished = p.returncode == 0 or "is finished" in err
    assert finished or subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "run"],
                                      cwd=tmp_path, env=env, capture_output=True).returncode == 0
    assert sha(tmp_path / "run" / "lora.safetensors") == reference
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, STEPS + 1))
    assert_nothing_half_written(tmp_path / "run")
