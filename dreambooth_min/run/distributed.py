"""Data-parallel training under torchrun: N processes, one LoRA, the same as one process with N times the batch.

    torchrun --nproc_per_node N train.py ... --batch-size B     # global batch: N * B photos per micro-batch

No DDP wrapper and no broadcast of data: every process holds the same generator (the same seed, the same
checkpoint on resume), draws the whole global batch -- epoch order, latents, noise, timesteps -- and keeps
its rows (`local_batch`). After the backward passes of a step, the gradients of the few LoRA tensors are
averaged over the processes in one all-reduce (`sync_step`), so every process takes the same AdamW step and
the factors stay equal without ever being sent. Rank 0 alone writes the run folder.

Outside torchrun (no RANK / WORLD_SIZE in the environment) every function here is a no-op for world size 1.
"""
import atexit
import dataclasses
import datetime
import functools
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as td

from ..errors import UserError

# A process that dies is noticed by torchrun, which stops the others at once; this timeout covers what it
# cannot see (a hung GPU, a lost node). It must exceed the longest one-sided wait: rank 0 drawing the
# validation images or its share of the class images while the others wait at a barrier.
TIMEOUT = datetime.timedelta(minutes=30)

_rank, _world = 0, 1
_stop_requested = False  # set by SIGINT / SIGTERM under torchrun; acted on at the next optimizer step


class PeerLost(UserError):
    """A collective operation failed: another process died or stopped answering."""


def init_from_env(device):
    """Join torchrun's process group when RANK / WORLD_SIZE say so; returns the device this process uses.

    NCCL on CUDA, each process on cuda:LOCAL_RANK; gloo on the CPU. A single process (no torchrun, or
    --nproc_per_node 1) gets `device` back and no process group.
    """
    global _rank, _world
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device
    if td.is_initialized():
        return _device(device)
    device = _device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    td.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT,
                          device_id=torch.device(device) if device.startswith("cuda") else None)
    atexit.register(_shutdown)
    _rank, _world = td.get_rank(), td.get_world_size()
    return device


def _device(device):
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        raise UserError(f"--device {device} names one GPU, but torchrun starts {os.environ['WORLD_SIZE']} processes: "
                        "give --device cuda (process i takes cuda:LOCAL_RANK) and choose GPUs with "
                        "CUDA_VISIBLE_DEVICES")
    return device


def _shutdown():
    if td.is_initialized():
        td.destroy_process_group()


def rank():
    return _rank


def world_size():
    return _world


def is_main():
    """Rank 0: the process that writes the run folder and speaks."""
    return _rank == 0


def command():
    """How to start train.py again: under torchrun with as many processes when this run is one."""
    return f"torchrun --nproc_per_node {world_size()} train.py" if world_size() > 1 else "python train.py"


def main_log(log):
    """`log` on rank 0; elsewhere a no-op, so that N processes print one plan and one progress bar."""
    return log if is_main() else (lambda *args, **kwargs: None)


def _collective(op, *args, **kwargs):
    try:
        return op(*args, **kwargs)
    except RuntimeError as e:  # DistError, and gloo's plain "Connection closed by peer"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(f"process {_rank} of {_world} lost the others ({reason}): one of them died (its error is "
                       f"above) or did not answer for {TIMEOUT}; continue from the last checkpoint with "
                       "torchrun ... train.py --resume RUN") from None


def barrier():
    if _world > 1:
        _collective(td.barrier)


def from_main(value):
    """Rank 0's `value` (any picklable object) on every process."""
    if _world == 1:
        return value
    box = [value]
    _collective(td.broadcast_object_list, box, src=0)
    return box[0]


def all_reduce_mean(tensors):
    """Replace each tensor by its mean over the processes, in place, in one all-reduce (returns them)."""
    if _world == 1 or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    _collective(td.all_reduce, flat)
    flat /= _world
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))
    return tensors


def main_only(fn):
    """Decorator: `fn` runs on rank 0 alone (it writes the run folder); the others wait for it and get None."""
    @functools.wraps(fn)
    def on_main(*args, **kwargs):
        result = fn(*args, **kwargs) if is_main() else None
        barrier()
        return result
    return on_main


# ---------------------------------------------------------------------------------------------------
# The training step


def global_config(cfg):
    """cfg with batch_size = the global batch (world * --batch-size), for the epoch and step arithmetic."""
    return cfg if _world == 1 else dataclasses.replace(cfg, batch_size=cfg.batch_size * _world)


def schedule_length(cfg, n_images, bucket_sizes=None):
    """cfg.schedule_length for the global batch: (micro-batches per epoch, optimizer steps)."""
    return global_config(cfg).schedule_length(n_images, bucket_sizes)


def local_batch(batch):
    """This process's rows of the global `batch` and its weight w in the global mean.

    The subject's rows and the class rows are each split into world contiguous parts, as evenly as they go
    (the last batch of an epoch can be short: 3 photos in batches of 2). A process with k of the K subject
    rows computes means over its k rows, so the global means are sum_r (k_r / K) * mean_r; `sync_step`
    averages over the world, hence w = world * k / K (1 when the batch divides evenly).
    """
    if _world == 1:
        return batch, 1.0
    n_inst, n_class = batch.n_instance, len(batch.prompts) - batch.n_instance

    def part(start, count):
        return list(range(start + count * _rank // _world, start + count * (_rank + 1) // _world))

    mine, k = part(0, n_inst) + part(n_inst, n_class), len(part(0, n_inst))
    local = dataclasses.replace(batch, latents=batch.latents[mine], noise=batch.noise[mine],
                                timesteps=batch.timesteps[mine], prompts=[batch.prompts[i] for i in mine],
                                n_instance=k, time_ids=None if batch.time_ids is None else batch.time_ids[mine],
                                mask=None if batch.mask is None else batch.mask[mine])
    return local, _world * k / n_inst


def sync_step(params, running):
    """Average the gradients of `params` and the step's loss parts over the processes, before unscale/clip.

    One all-reduce carries them and a stop flag: (mean loss parts, stop) where stop is True on every
    process once any of them got SIGINT / SIGTERM, so all stop after the same step.
    """
    if _world == 1:
        return running, False
    for p in params:
        if p.grad is None:  # a process without rows this step contributes zeros
            p.grad = torch.zeros_like(p)
    flag = torch.tensor([float(_stop_requested)], device=running.device)
    all_reduce_mean([p.grad for p in params] + [running, flag])
    return running, flag.item() > 0


def stop_on_signal():
    """Under torchrun, SIGINT / SIGTERM ask for a stop instead of raising KeyboardInterrupt at once.

    torchrun passes a Ctrl-C on to every worker and, when one exits, sends SIGTERM to the rest; a process
    that stopped mid-step would leave the others blocked in the all-reduce. So a signal only sets a flag,
    which `sync_step` shares; every process finishes the step, rank 0 saves the checkpoint. Kept until the
    process exits, so that torchrun's SIGTERM cannot cut rank 0 short while it writes.
    """
    if _world == 1:
        return

    def request(signum, frame):
        global _stop_requested
        _stop_requested = True

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, request)


def check_resume(config_path):
    """A run continues with as many processes as it had (config.json says), so each step keeps its batch."""
    try:
        before = json.loads(Path(config_path).read_text())["resolved"].get("processes", 1)
    except (OSError, ValueError, KeyError):
        return  # RunFolder / config_from_json explain a missing or broken config.json
    if before != _world:
        raise UserError(f"this run was trained by {before} process(es) and is resumed by {_world}: resume it with "
                        f"torchrun --nproc_per_node {before} (or python train.py for 1), so each step keeps its "
                        "batch")


def describe(cfg):
    """What config.json records about the processes."""
    return {"processes": _world, "global_batch_size": cfg.batch_size * _world}
