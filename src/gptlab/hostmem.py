"""Host memory for CPU training: keep freed blocks for the next step instead of handing them back to the OS.

glibc's malloc serves every request above its mmap threshold (32 MB at most) with a fresh
mmap and returns it with munmap when freed. A training step frees and allocates the same
large tensors every time (bf16 copies of the weights, logits, activations, gradients), so
on CPU each step pays again for faulting in and zeroing every page of them. Measured on the
2-core EPYC: the bf16 cast of a 50304 x 384 token table took 15 ms into fresh pages and 3 ms
into reused ones, and a whole bf16 training step of a 6 x 384 model ran 19-27% faster with
its big blocks reused (benchmarks/RESULTS.md, 2026-12-02).

`reusing_freed_memory` turns off malloc's mmap path and its trimming of the heap's top for
the length of a run (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = INT_MAX), so freed blocks
stay mapped and the next step's allocations land in them. After the run it returns the
freed memory (malloc_trim) and leaves malloc as glibc's own tuning would have left it (big
blocks mmapped again; see SETTLED_MMAP_THRESHOLD). The process's peak memory is what the
run needed; between steps it keeps that peak mapped rather than only what is live.

The settings are the process's, not the block's: blocks are not meant to nest (an inner one's exit
would end the outer one's reuse early, costing speed, not correctness), and gptlab runs its training
loops one after another. Other C libraries (musl, macOS, Windows) are left alone: the context
manager does nothing there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
INT_MAX = 2**31 - 1
# What glibc's own tuning settles at in a process that frees big blocks: its mmap threshold rises to each freed
# mmapped block's size, at most 32 MB on 64-bit, and the trim threshold follows at twice that. Any mallopt call
# stops that tuning for good, so leaving the block sets these values, not the start-up ones (128 KB for both),
# which would send every later block over 128 KB to a fresh mmap.
SETTLED_MMAP_THRESHOLD, SETTLED_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 32 << 20, 64 << 20, 65536


def _glibc() -> ctypes.CDLL | None:
    """The running process's glibc, or None under another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mallopt(libc: ctypes.CDLL, param: int, value: int) -> None:
    if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:  # mallopt returns 1 on success
        raise OSError(f"mallopt({param}, {value}) failed")


@contextmanager
def reusing_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, malloc keeps freed memory mapped for reuse (glibc only); yields whether it is in effect."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    _mallopt(libc, M_MMAP_MAX, 0)
    _mallopt(libc, M_TRIM_THRESHOLD, INT_MAX)
    try:
        yield True
    finally:
        _mallopt(libc, M_MMAP_MAX, DEFAULT_MMAP_MAX)
        _mallopt(libc, M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
        _mallopt(libc, M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
        libc.malloc_trim(ctypes.c_size_t(0))
