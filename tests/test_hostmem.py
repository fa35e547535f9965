"""gptlab.hostmem: inside `reusing_freed_memory`, glibc serves large blocks from its heap (kept for reuse), not fresh mmaps."""

from __future__ import annotations

import ctypes
import platform

import pytest

from gptlab.hostmem import reusing_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BIG = 64 << 20  # above glibc's largest mmap threshold (32 MB): a fresh mmap by default


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mmapped_blocks() -> int:
    """glibc's count of blocks it serves with their own mmap (mallinfo2().hblks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblks


def run_fresh(code: str) -> str:
    """stdout of `code` run in a fresh interpreter: a heap that earlier tests' runs have not shaped."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


A_RUN = """
import torch
from gptlab.hostmem import reusing_freed_memory
from test_hostmem import BIG, mmapped_blocks
before = mmapped_blocks()
t = torch.empty(BIG, dtype=torch.uint8)
counts = [mmapped_blocks() - before]  # glibc's default: a block this big is its own mmap
del t
with reusing_freed_memory() as active:
    assert active
    for _ in range(3):  # a step's allocations, freed and made again
        t = torch.empty(BIG, dtype=torch.uint8).fill_(1)
        counts.append(mmapped_blocks() - before)
        del t
print(*counts)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_big_blocks_come_from_the_heap_inside_and_from_mmap_outside():
    assert run_fresh(A_RUN) == "1 0 0 0"


AFTER_A_RUN = """
import ctypes
from gptlab.hostmem import reusing_freed_memory
from test_hostmem import mmapped_blocks
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
with reusing_freed_memory():
    pass
before = mmapped_blocks()
block = libc.malloc(ctypes.c_size_t(8 << 20))
print(mmapped_blocks() - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_mid_sized_blocks_come_from_the_heap_after_the_block():
    """Any mallopt freezes glibc's own mmap threshold; in a fresh process it would stay at 128 KB and send every
    later block above that to a fresh mmap, slower than never having called mallopt. Leaving sets it to 32 MB."""
    assert run_fresh(AFTER_A_RUN) == "0"


DISABLED = """
import torch
from gptlab.hostmem import reusing_freed_memory
from test_hostmem import BIG, mmapped_blocks
before = mmapped_blocks()
with reusing_freed_memory(enabled=False) as active:
    t = torch.empty(BIG, dtype=torch.uint8)
    print(active, mmapped_blocks() - before)
"""


def test_disabled_or_another_libc_leaves_malloc_alone():
    with reusing_freed_memory(enabled=False) as active:
        assert not active
    if GLIBC:  # in a fresh interpreter: this test process's heap may hold a free block this big from earlier runs
        assert run_fresh(DISABLED) == "False 1"


def test_a_cpu_training_run_keeps_freed_memory_for_its_length(data_dir, tmp_path, monkeypatch):
    import contextlib

    import gptlab.train
    from gptlab.config import GPTConfig, TrainConfig

    seen = []

    @contextlib.contextmanager
    def recording(enabled: bool = True):
        seen.append("enter")
        with reusing_freed_memory(enabled) as active:
            yield active
        seen.append("exit")

    monkeypatch.setattr(gptlab.train, "reusing_freed_memory", recording)
    model = GPTConfig(vocab_size=512, block_size=16, n_layer=1, n_head=2, n_embd=16)
    gptlab.train.train(model, TrainConfig(batch_size=2, max_steps=2, eval_every=2, eval_batches=1, device="cpu"), data_dir, tmp_path / "run", progress=False)
    assert seen == ["enter", "exit"]
