"""Data-parallel training under torchrun (gloo, CPU): N processes with batch B == one process with batch N*B.

The tiny model is trained at 64 px here: at 32 px its deepest level is 1x1 with two values per GroupNorm
group, which makes it chaotic (one process with 1 thread vs 2 threads already differs by 5e-4 after 4
steps), so no comparison of two ways of summing could meet 1e-4 there.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_min.dreambooth import Batch, dreambooth_loss
from dreambooth_min.formats.lora_file import load_lora
from dreambooth_min.run import distributed as dist
from test_training import synthetic_images

ROOT = Path(__file__).resolve().parents[1]

# Runs train.py and records what this process created, wrote, renamed or removed under $AUDIT_WATCH
# (Python's audit hooks see every open, rename, mkdir and rmtree), into $AUDIT_OUT<rank>.
AUDIT = '''
import os, runpy, sys, atexit
watch, seen = os.environ["AUDIT_WATCH"], []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(watch) and args[2] & WRITE or \\
            event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree") and \\
            str(args[0]).startswith(watch):
        seen.append(f"{event} {args[0]}")
sys.addaudithook(hook)
atexit.register(lambda: open(os.environ["AUDIT_OUT"] + os.environ.get("RANK", "0"), "w").write("\\n".join(seen)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def common_args(tmp_path, model, steps=4):
    images = tmp_path / "images"
    if not images.exists():
        synthetic_images(images)  # 3 photos: with a global batch of 2 each epoch ends with a batch of 1
    return ["--images", str(images), "--model", str(model), "--class-noun", "dog", "--resolution", "64",
            "--num-class-images", "2", "--class-steps", "2", "--steps", str(steps), "--validate-every", "0",
            "--save-every", "0", "--lr", "1e-3", "--seed", "3"]


def launch(tmp_path, args, processes, wait=True):
    """train.py under torchrun (processes > 1) or alone, through the audit wrapper."""
    (tmp_path / "audit.py").write_text(AUDIT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", AUDIT_WATCH=str(tmp_path / "runs"),
               AUDIT_OUT=str(tmp_path / f"audit-{processes}-"))
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    command = runner + [str(tmp_path / "audit.py"), str(ROOT / "train.py"), *args]
    if not wait:
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def lora_difference(a, b):
    ta, tb = load_lora(a)[0], load_lora(b)[0]
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def log_records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# The pieces, in-process


@pytest.fixture
def world_of_two(monkeypatch):
    """distributed.py as process `rank` of 2 sees it (no process group is needed for the local parts)."""
    def be(rank):
        monkeypatch.setattr(dist, "_rank", rank)
        monkeypatch.setattr(dist, "_world", 2)
    return be


@pytest.mark.parametrize("n_instance", [2, 3, 1])
def test_shards_make_up_the_global_batch_and_its_mean_loss(world_of_two, n_instance):
    g = torch.Generator().manual_seed(0)
    rows = 2 * n_instance  # subject rows, then as many class rows
    x = torch.randn(rows, 4, 2, 2, generator=g)
    batch = Batch(x, -x, torch.arange(rows), [f"p{i}" for i in range(rows)], n_instance)
    pred, target = torch.randn(rows, 4, 2, 2, generator=g), torch.randn(rows, 4, 2, 2, generator=g)
    total = dreambooth_loss(pred, target, n_instance, prior_weight=0.7)
    mine, weighted = [], torch.zeros(3)
    for rank in range(2):
        world_of_two(rank)
        local, w = dist.local_batch(batch)
        index = local.timesteps.tolist()  # the timesteps are the row numbers here
        mine.append(index)
        assert local.n_instance == sum(i < n_instance for i in index)
        assert local.prompts == [f"p{i}" for i in index] and torch.equal(local.noise, -x[index])
        if local.n_instance:
            weighted += w * torch.stack(dreambooth_loss(pred[index], target[index], local.n_instance, 0.7))
        else:
            assert w == 0
    # Every row exactly once; subject rows with their class rows; the weighted mean is the global loss.
    assert sorted(mine[0] + mine[1]) == list(range(rows))
    assert all(i < n_instance for i in mine[0][:len(mine[0]) // 2])
    assert torch.allclose(weighted / 2, torch.stack(total), rtol=1e-6)


def test_a_single_process_needs_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist.init_from_env("cpu") == "cpu" and dist.world_size() == 1 and dist.is_main()
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_mean([t])[0].tolist() == [1.0, 2.0]
    running, stop = dist.sync_step([], t)
    assert running is t and stop is False
    assert dist.from_main("x") == "x" and dist.local_batch("batch") == ("batch", 1.0)
    dist.barrier()  # no-op
    calls = []
    assert dist.main_only(lambda: calls.append(1) or "done")() == "done" and calls == [1]


def test_more_processes_than_one_gpu_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(dist.UserError, match="--device cuda:1 names one GPU"):
        dist.init_from_env("cuda:1")


def test_resume_keeps_the_number_of_processes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "resolved": {"processes": 2}}))
    with pytest.raises(dist.UserError, match="trained by 2 process.*torchrun --nproc_per_node 2"):
        dist.check_resume(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "resolved": {}}))
    dist.check_resume(tmp_path / "config.json")  # a run from before torchrun support: one process


# ---------------------------------------------------------------------------------------------------
# torchrun


def test_two_processes_equal_one_with_the_doubled_batch(tiny_sd1, tmp_path):
    args = common_args(tmp_path, tiny_sd1["single"])
    one = launch(tmp_path, args + ["--batch-size", "2", "--output", str(tmp_path / "runs" / "one"),
                                   "--class-dir", str(tmp_path / "class-one")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(tmp_path, args + ["--batch-size", "1", "--output", str(tmp_path / "runs" / "two"),
                                   "--class-dir", str(tmp_path / "class-two")], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    runs = tmp_path / "runs"
    difference = lora_difference(runs / "one" / "lora.safetensors", runs / "two" / "lora.safetensors")
    assert difference < 1e-4, difference  # measured: 5e-7 .. 9e-6
    # The class images were drawn half by each process: the same files as one process drew.
    for name in ("0000.png", "0001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "class-one" / name)),
                              np.asarray(Image.open(tmp_path / "class-two" / name)))
    # One log line per step, with the global means of the loss parts.
    a, b = log_records(runs / "one"), log_records(runs / "two")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and [r["epoch"] for r in b] == [0.5, 1.0, 1.5, 2.0]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_instance", "loss_prior", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), (key, ra, rb)
    assert b[0]["loss_prior"] > 0
    resolved = json.loads((runs / "two" / "config.json").read_text())["resolved"]
    assert resolved["processes"] == 2 and resolved["global_batch_size"] == 2
    assert two.stdout.count("done: 4 steps") == 1  # one voice
    # Only rank 0 wrote in the run folder (and it did write: the audit works).
    assert (tmp_path / "audit-2-1").read_text() == ""
    written = (tmp_path / "audit-2-0").read_text()
    assert "lora.safetensors" in written and "log.jsonl" in written and "config.json" in written


def _worker_of_rank(torchrun_pid, rank):
    """The pid of torchrun's worker with RANK=rank (Linux /proc)."""
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers in /proc")
def test_sigterm_to_one_process_saves_one_checkpoint_and_resume_continues_exactly(tiny_sd1, tmp_path):
    from dreambooth_min.run.config import TrainConfig
    from dreambooth_min.run.training import train

    steps, run = 12, tmp_path / "runs" / "two"  # the signal lands at step 3 or so
    args = common_args(tmp_path, tiny_sd1["single"], steps)
    p = launch(tmp_path, args + ["--batch-size", "1", "--output", str(run), "--class-dir", str(tmp_path / "c")],
               2, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.jsonl").exists() and len(log_records(run)) >= 2):
        time.sleep(0.05)
    rank1 = _worker_of_rank(p.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGTERM)  # one process only: the others must stop at the same step
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "interrupted at step" in out, err[-3000:]
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    stopped = len(log_records(run))
    assert [c.name for c in checkpoints] == [f"step_{stopped:06d}"] and stopped < steps
    assert out.count("interrupted at step") == 1

    resumed = launch(tmp_path, ["--resume", str(run)], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in log_records(run)] == list(range(1, steps + 1))
    # Uninterrupted reference: one process with the doubled batch (in this process: faster).
    reference = train(TrainConfig(images=args[1], model=args[3], class_noun="dog", resolution=64, num_class_images=2,
                                  class_steps=2, class_dir=str(tmp_path / "c"), steps=steps, validate_every=0,
                                  save_every=0, lr=1e-3, seed=3, batch_size=2, output=str(tmp_path / "ref")))
    difference = lora_difference(reference["lora"], run / "lora.safetensors")
    assert difference < 1e-4, difference
