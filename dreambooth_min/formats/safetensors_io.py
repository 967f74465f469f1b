"""Read and write .safetensors files tensor by tensor; a file is checked whole before any tensor is read.

We read with plain `readinto` instead of safetensors' mmap: pages of a mapped file count towards the
process's resident memory, so an fp16 checkpoint loaded into fp32 modules would briefly hold 1.5x the
model. Reading one tensor at a time keeps the peak at the model plus its largest tensor.
The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes.

Files come from strangers, so `SafetensorsFile` trusts nothing in them (`_check_header`, the format's own
rules, as the safetensors library checks them): the header length is at most the file's size and 100 MB, and
only then is the header read (nothing else is allocated before); it is UTF-8 JSON, an object with each name
once; `__metadata__`, if any, maps strings to strings; every other entry is an object with a known `dtype`
string, a `shape` list of non-negative integers and `data_offsets` [begin, end] of integers with
end - begin = numel x the dtype's size; sorted by offset, the tensors tile the data region, from its start to
the end of the file, without gaps or overlaps. Each broken rule is one UserError line naming the file and the
tensor. Then `read` refuses a floating-point tensor holding NaN or infinity (NonFinite, naming it), checked as
it is read: a poisoned LoRA or embedding would otherwise draw black images without a word.
"""
import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import DiskFull, NonFinite, UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # bytes; the safetensors library's limit too: a real SDXL header is under 1 MB
PICKLE_HINT = ("it looks like a pickle checkpoint (.ckpt/.pt/.bin), which dreambooth_min never opens because "
               "unpickling can run code: convert it to .safetensors once (the command is in weights/README.md)")


def _is_pickle(head):
    # torch.save writes a zip archive ("PK"); older files are raw pickles (protocol byte 0x80). A
    # safetensors header length can start with 0x80 too, so this is asked only when byte 8 is not '{'.
    return head[:2] == b"PK" or head[:1] == b"\x80"


class SafetensorsFile:
    """Header of a .safetensors file, with `shapes`, `metadata` and `read(name)`; checked (module docstring)."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(9)
            n = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
            if (not 0 < n <= min(size - 8, MAX_HEADER) or head[8:9] != b"{") and _is_pickle(head):
                raise UserError(f"{self.path}: {PICKLE_HINT}")
            if not 0 < n <= min(size - 8, MAX_HEADER):  # before reading (allocating) n bytes
                raise UserError(f"{self.path} is not a .safetensors file (bad header; truncated or another format?)")
            f.seek(8)
            header = _parse_header(f.read(n), self.path)
        self.data_start = 8 + n
        self.metadata = _check_header(header, size - self.data_start, self.path)
        self.entries = header

    @property
    def shapes(self):
        return {k: tuple(e["shape"]) for k, e in self.entries.items()}

    def read(self, name, out=None):
        """The tensor `name` in its stored dtype, on the CPU, in memory of its own; or read straight into
        `out` when it is a CPU tensor of that dtype and shape (a parameter to fill: no second copy).
        A floating-point tensor holding NaN or infinity raises NonFinite naming it."""
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
        if not is_finite(target):
            raise NonFinite(f"{self.path}: tensor {name} holds NaN or infinite values: the file is damaged or was "
                            "saved from a training that diverged (it would draw black images)")
        return target


def is_finite(t):
    """Whether every value of `t` is finite, in one pass and without a copy: the minimum and maximum carry a
    NaN through, and an infinity is one of them. (An fp16 tensor's float32 sum would be 5-20x slower.)"""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _parse_header(raw, path):
    """The header's JSON; a name given twice is refused (JSON would keep the last and leave a gap)."""
    def unique(pairs):
        found = dict(pairs)
        if len(found) < len(pairs):
            twice = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
            raise UserError(f"{path} is not a valid .safetensors file: tensor {_short(twice)} appears twice in "
                            "its header")
        return found
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError, an integer of 5000 digits
        raise UserError(f"{path} is not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a .safetensors file (its header is a JSON {type(header).__name__}, "
                        "not an object)")
    return header


def _short(value, limit=200):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry_problem(e):
    """What is wrong with one header entry, in a few words, or None."""
    if not isinstance(e, dict):
        return f"is a JSON {type(e).__name__}, not an object"
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
    if missing:
        return f"has no {' and no '.join(missing)}"
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str):
        return f"has dtype {_short(dtype)}, not a string"
    if dtype not in DTYPES:
        return f"has dtype {_short(dtype)}, which is not supported (only {', '.join(DTYPES)})"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"has shape {_short(shape)}, not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {_short(offsets)}, not [begin, end] with 0 <= begin <= end"
    need = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != need:
        return (f"has shape {_short(shape)} of {dtype}, {need} bytes, but its data_offsets {_short(offsets)} "
                f"hold {offsets[1] - offsets[0]}")
    return None


def _check_header(header, data_size, path):
    """The metadata, once every entry of `header` (without __metadata__ after this) is checked, with the data
    region of `data_size` bytes: one UserError line naming the file and the tensor (module docstring)."""
    bad = f"{path} is not a valid .safetensors file"
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{bad}: its __metadata__ {_short(metadata)} is not a map of strings to strings")
    for name, e in header.items():
        problem = _entry_problem(e)
        if problem:
            raise UserError(f"{bad}: tensor {_short(name)} {problem}")
    position, previous = 0, None
    for name, e in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = e["data_offsets"]
        if end > data_size:
            raise UserError(f"{path} is truncated: tensor {_short(name)} ends {end} bytes into the data, the file "
                            f"holds {data_size} (download it again)")
        if begin != position:
            where = f"overlaps tensor {_short(previous)}" if begin < position else \
                f"leaves a gap of {begin - position} bytes after {_short(previous) if previous else 'the header'}"
            raise UserError(f"{bad}: tensor {_short(name)} {where}")
        position, previous = end, name
    if position != data_size:
        last = f"after tensor {_short(previous)}" if previous else "and no tensor"
        raise UserError(f"{bad}: {data_size - position} bytes of junk {last} at the end of the file")
    return metadata


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
