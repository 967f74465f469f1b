"""When the machine fails a run: out of memory or a full disk become one line, and a checkpoint to resume.

Beside the loop, not in it: `train()` runs the loop inside `guarded(...)`.
"""
import contextlib

import torch

from ..errors import DiskFull, OutOfMemory, is_out_of_memory
from . import distributed as dist
from .state import save_checkpoint


@contextlib.contextmanager
def guarded(cfg, setup, state, total_steps):
    """A full disk: one line with the space the run needs (the last whole checkpoint stays). Out of memory:
    a checkpoint at the last finished step, then one line of advice (exit status 3). Always: the tracker is closed."""
    out_of_memory = None
    try:
        yield
    except DiskFull as e:
        raise setup.run.disk_full(e, state.checkpoint_bytes(), cfg.keep_checkpoints) from None
    except Exception as e:
        if not is_out_of_memory(e) or dist.world_size() > 1:  # other processes wait in a collective: no save
            raise
        out_of_memory = str(e).strip().split("\n")[0][:200]  # handled below, once the failed step is freed
    finally:
        if setup.monitor is not None:
            setup.monitor.close()
    if out_of_memory is not None:
        raise out_of_memory_error(cfg, setup, state, total_steps, out_of_memory)


def out_of_memory_error(cfg, setup, state, total_steps, message):
    """Save the last finished step, then the OutOfMemory error that says what to try."""
    torch.cuda.empty_cache()
    try:
        saved = save_checkpoint(cfg, setup, state) if state.rewind() else setup.run.whole_checkpoint()[0]
    except DiskFull as e:
        return setup.run.disk_full(e, state.checkpoint_bytes(), cfg.keep_checkpoints)
    return OutOfMemory(f"out of memory in step {state.step + 1} of {total_steps} ({message}); checkpoint: "
                       f"{saved or 'none'}; {memory_advice(cfg, setup.resolution, setup.hardware.precision)} "
                       f"in a new run, or continue this one where more memory is free: {dist.command()} "
                       f"--resume {setup.run.path} --gradient-checkpointing")


def memory_advice(cfg, resolution, precision):
    """What to try, for a run of these settings, after running out of memory (the settings it does not use yet)."""
    tips = [] if cfg.gradient_checkpointing else ["--gradient-checkpointing"]
    tips.append(f"a lower --resolution (this run: {resolution})")
    tips += ["--batch-size 1"] if cfg.batch_size > 1 else []
    tips += ["--precision fp16 (CUDA)"] if precision != "fp16" else []
    return "try " + ", ".join(tips[:-1]) + f" or {tips[-1]}" if len(tips) > 1 else "try " + tips[0]
