"""Read and write .safetensors files tensor by tensor.

We read with plain `readinto` instead of safetensors' mmap: pages of a mapped file count towards the
process's resident memory, so an fp16 checkpoint loaded into fp32 modules would briefly hold 1.5x the
model. Reading one tensor at a time keeps the peak at the model plus its largest tensor.
The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes.
"""
import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import DiskFull, UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_HINT = ("it is a pickle checkpoint (.ckpt/.pt/.bin), which dreambooth_min never opens because "
               "unpickling can run code: convert it to .safetensors once (the command is in weights/README.md)")


def _is_pickle(head):
    # torch.save writes a zip archive ("PK"); older files are raw pickles (protocol byte 0x80). A
    # safetensors header length can start with 0x80 too, so this is asked only when byte 8 is not '{'.
    return head[:2] == b"PK" or head[:1] == b"\x80"


class SafetensorsFile:
    """Header of a .safetensors file, with `shapes`, `metadata` and `read(name)`."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(9)
            n = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
            if (not 0 < n <= min(size - 8, 100 << 20) or head[8:9] != b"{") and _is_pickle(head):
                raise UserError(f"{self.path}: {PICKLE_HINT}")
            f.seek(8)
            if not 0 < n <= min(size - 8, 100 << 20):
                raise UserError(f"{self.path} is not a .safetensors file (bad header; truncated or another format?)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"{self.path} is not a .safetensors file (its header is not JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise UserError(f"{self.path} is truncated: its header needs {self.data_start + end} bytes, "
                            f"the file has {size} (download it again)")
        unknown = {e["dtype"] for e in header.values()} - DTYPES.keys()
        if unknown:
            raise UserError(f"{self.path} holds tensors of unsupported dtype {sorted(unknown)}")

    @property
    def shapes(self):
        return {k: tuple(e["shape"]) for k, e in self.entries.items()}

    def read(self, name, out=None):
        """The tensor `name` in its stored dtype, on the CPU, in memory of its own; or read straight into
        `out` when it is a CPU tensor of that dtype and shape (a parameter to fill: no second copy)."""
        e = self.entries[name]
        start, end = e["data_offsets"]
        dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
        direct = out is not None and out.device.type == "cpu" and out.dtype == dtype and tuple(out.shape) == shape \
            and out.is_contiguous()
        target = out if direct else torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if end > start and f.readinto(target.reshape(-1).view(torch.uint8).numpy()) != end - start:
                raise UserError(f"{self.path} is truncated at tensor {name}")
        return target


FULL = (errno.ENOSPC, errno.EDQUOT)


def _free(path):
    try:
        return f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def writing(path):
    """Turn an OSError while writing `path` into one line naming it: DiskFull for a full disk or quota,
    a UserError for the rest (read-only file system, permissions, I/O error)."""
    try:
        yield
    except OSError as e:
        if e.errno in FULL:
            raise DiskFull(f"the disk is full: could not write {path} ({_free(path)})", path) from None
        raise UserError(f"could not write {path}: {e.strerror or e}") from None


def check_writable(path, what, folder=False):
    """Raise one UserError line, before any slow work, when `what` cannot be written at `path` (a file, or a
    folder when `folder`): a part of the path is a file, it is the wrong kind, or the place is not writable."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents, *path.absolute().parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise UserError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    if existing == path and path.is_dir() != folder:
        raise UserError(f"cannot write {what} {path}: it is {'a file' if folder else 'a folder'}")
    place = existing if existing.is_dir() else existing.parent  # a file is replaced by a rename in its folder
    if not os.access(place, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {place} is not writable")


def fsync_path(path):
    """Flush a file's or a folder's data to the disk (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, so readers
    (and a run interrupted mid-write) see either the old file or the whole new one, never half of it.
    The data is on the disk before the rename: a power loss leaves the old file or the new one, never an
    empty one. A failed write (disk full, ...) removes the temporary file and raises one line (`writing`)."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private (0600); give the usual permissions
            fsync_path(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_bytes_atomic(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _header(tensors, metadata):
    """The JSON header, keys sorted, padded with spaces to a multiple of 8 bytes (the format's alignment)."""
    names = {v: k for k, v in DTYPES.items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def save_atomic(tensors, path, metadata=None):
    """Write a .safetensors file atomically, tensor by tensor.

    We write the format ourselves rather than with safetensors.save_file, whose metadata order changes from
    one process to the next: with sorted keys, the same tensors and metadata always give the same bytes."""
    header = _header(tensors, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name in sorted(tensors):
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
