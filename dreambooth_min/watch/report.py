"""What a training run leaves behind besides its charts (plots.py): its .jsonl logs (log.jsonl,
metrics.jsonl) read and written, small text files, and the sample grid (a labelled row per epoch, stacked).

Drawn with pillow alone (no matplotlib). Every file is written atomically.
"""
import errno
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

from ..formats.png import save_png
from ..formats.safetensors_io import atomic_path, writing


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def append_jsonl(path, record):
    """Append one line in a single write; a failed write (disk full) is cut off again, so the file never
    ends in half a line that this process wrote. A torn line a killed process left is ended first."""
    line = (json.dumps(record) + "\n").encode()
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "No space left on device")  # a short write: only a full disk does that
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def read_jsonl(path):
    """The records of a .jsonl file; a line that is not a whole JSON object (torn by a crash) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_jsonl_atomic(path, records):
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def labelled_row(images, label, label_width=110):
    """Images side by side with a label column on the left (one row of the epoch table)."""
    w, h = images[0].size
    row = Image.new("RGB", (label_width + w * len(images), h), "white")
    ImageDraw.Draw(row).text((8, h // 2 - 6), label, fill="black")
    for i, im in enumerate(images):
        row.paste(im, (label_width + i * w, 0))
    return row


def stack_rows(paths, out):
    """The rows in `paths` stacked top to bottom (the "samples at different epochs" table)."""
    rows = []
    for p in paths:
        try:
            with Image.open(p) as im:
                rows.append(im.convert("RGB"))
        except (OSError, SyntaxError):  # a damaged row (written by hand, a disk error) is left out, not fatal
            continue
    if not rows:
        return
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    save_png(grid, out)
