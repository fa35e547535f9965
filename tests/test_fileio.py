"""Crash-safe writes: a staged directory replaces its target only when complete."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptlab.fileio import staged_dir


def test_staged_dir_replaces_the_target_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        (tmp / "new.txt").write_text("new")
        os.chmod(tmp / "new.txt", 0o600)
        assert (final / "old.txt").is_file()  # untouched until the block ends
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or moved-aside directories left
    mask = os.umask(0o022)
    os.umask(mask)
    assert (final / "new.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert final.stat().st_mode & 0o777 == 0o777 & ~mask


def test_staged_dir_leaves_the_target_alone_on_error(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
