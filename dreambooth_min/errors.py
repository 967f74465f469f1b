"""Every error a command turns into one line, in one place: bad input, a bad setting, no memory, no disk.

The CLIs print the message as one `error:` line (no traceback) and exit with the error's `exit_code`
(run/cli.py: bad input 2, out of memory 3, disk full 4).
"""
from pathlib import Path

import torch


class UserError(Exception):
    """A problem with what the user gave us (a path, a flag, a file), explained in one sentence."""
    exit_code = 2


class SettingError(UserError):
    """A bad value of one setting. str() names the field; run/cli.py names the flag instead."""

    def __init__(self, setting, problem):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


class OutOfMemory(UserError):
    """The device (or the CPU allocator) ran out of memory; the CLIs exit with status 3."""
    exit_code = 3


class DiskFull(UserError):
    """A write failed for want of space (ENOSPC) or quota (EDQUOT). The CLIs exit with status 4."""
    exit_code = 4

    def __init__(self, message, path):
        super().__init__(message)
        self.path = Path(path)


class NonFinite(UserError):
    """NaN or infinity where numbers must be finite: a tensor of a file, or the latents of an image."""


def is_out_of_memory(error):
    """torch.OutOfMemoryError (CUDA), MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "could not allocate"))
