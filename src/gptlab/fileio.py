"""Crash-safe file writes: write under a temporary name in the target's directory, fsync, rename.

`os.replace` within one filesystem is atomic, so a reader, or a run resumed after a
crash, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def stage_file(directory: Path, write: Callable[[BinaryIO], object], name: str = "") -> Path:
    """A temporary file in `directory` filled by `write(f)` and flushed to disk; the caller renames it into place."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (its directory must exist)."""
    tmp = stage_file(path.parent, lambda f: f.write(data), path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
