"""Atomic file replacement: a reader (DVC, the next stage, a resumed run) sees the old file or the new one, never
half of one, even when the writer is killed or several workers write the same file at once."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)  # read once at import (there is no getter); set straight back
os.umask(_UMASK)


@contextmanager
def replacing(path: Path, fsync: bool = False) -> Iterator[Path]:
    """A fresh temp path beside ``path`` to write; on success it is renamed over ``path`` (after an fsync when
    ``fsync``), on any failure it is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give a new file, not mkstemp's private 0600
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: Path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def copy_atomic(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` (contents and mode); a reader sees the old ``dst`` or the whole copy."""
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)
