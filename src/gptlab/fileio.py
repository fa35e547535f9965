"""Crash-safe file writes: write under a temporary name in the target's directory, fsync, rename.

`os.replace` within one filesystem is atomic, so a reader, or a run resumed after a
crash, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from gptlab.errors import DataError, GptlabError


def stage_file(directory: Path, write: Callable[[BinaryIO], object], name: str = "") -> Path:
    """A temporary file in `directory` filled by `write(f)` and flushed to disk; the caller renames it into place."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        set_default_mode(Path(tmp))
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


def unwritable_reason(directory: Path) -> str | None:
    """Why files cannot be written in `directory` (created if missing), or None when they can.

    The reason names the path at fault: a file where a directory should be, a missing
    parent, permissions, a read-only or special filesystem.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            return f"{blocker} is a file, not a directory"
        return f"{directory}: {err.strerror or err}"
    return None


def check_writable(directory: Path, what: str) -> None:
    """Fail before any long work starts when `directory` (the `what` of a command) cannot be written."""
    reason = unwritable_reason(directory)
    if reason is not None:
        raise GptlabError(f"the {what} is not writable: {reason}")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def set_default_mode(path: Path) -> None:
    """Give a file the mode a plain open() would: mkstemp makes owner-only files."""
    path.chmod(0o666 & ~_umask())


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temporary directory beside `final` for the caller to fill; it becomes `final` when the block ends.

    The files are fsynced, then the directory is renamed into place (an existing `final`
    is moved aside first and deleted after), so `final` is never seen half-written. If
    the block raises, the temporary directory is removed and `final` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    umask = _umask()
    try:
        yield tmp
        # mkdtemp (and some writers) make owner-only entries; give them the modes a plain mkdir/open would
        tmp.chmod(0o777 & ~umask)
        for p in tmp.iterdir():
            if p.is_file():
                p.chmod(0o666 & ~umask)
                with p.open("rb") as f:
                    os.fsync(f.fileno())
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.rename(final, old / final.name)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def jsonl_objects(path: str | Path) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSONL file of objects (the fine-tuning and
    alignment data). A line that is not UTF-8, not JSON or not an object, an unreadable file, and a
    file with no rows are DataErrors naming file:line (or the file)."""
    import json

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    rows = 0
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows += 1
        yield where, row
    if not rows:
        raise DataError(f"{path}: holds no rows")
