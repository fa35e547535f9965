"""Native CPU kernels, compiled on first use for the CPU at hand and cached.

decode.cpp holds a matrix-vector product for batch-1 decoding (see its header for why), a decode
step's attention with its KV-cache writes, and a whole decode step's layers in one call; train.cpp
the cross-entropy of training (log p(target) per row and its gradient) and GPT-2's GELU with its
derivative; simd.h their vector helpers.
`load()` compiles them into one library with the system's C++ compiler against the installed PyTorch
(~18 s, the sources side by side; once per CPU model, PyTorch version and source), keeps it under cache_dir()/native, and
registers torch.ops.gptlab.* (called through the functions below). Without a compiler, or when the
build fails, `load()` returns False and warns once with the reason: the Engine then measures only
PyTorch's own kernels and the loss takes its PyTorch path. GPTLAB_NATIVE=0 turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCES = tuple(Path(__file__).with_name(name) for name in ("decode.cpp", "train.cpp"))
HEADERS = (Path(__file__).with_name("simd.h"),)
# the matrix-vector kernels do all rows with each weight row, at the multiply-add rate of one row: past a few rows the
# GEMMs win, and measuring them at 32 rows would cost a second of start-up for nothing
MAX_ROWS = 8


def source_digest() -> str:
    """A hash of the kernels' source files: a change to any of them means another build (and other measurements)."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:16]


def cache_dir() -> Path:
    """Where gptlab keeps what it measures or builds per machine: $GPTLAB_CACHE_DIR, else $XDG_CACHE_HOME/gptlab, else ~/.cache/gptlab."""
    root = os.environ.get("GPTLAB_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab"
    return Path(root)


def _cpu_flags() -> str:
    """The CPU's model and instruction-set flags: a library built with -march=native runs only where these match."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return ""


def _flags(native: bool) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch.compiled_with_cxx11_abi())
    return ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + (["-march=native"] if native else []) \
        + [f"-I{p}" for p in cpp_extension.include_paths()]  # fmt: skip


def _link_flags() -> list[str]:
    from torch.utils import cpp_extension

    libs = cpp_extension.library_paths()
    return ["-shared", "-fopenmp"] + [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"]


def _run_all(commands: list[list[str]]) -> str | None:
    """Run the commands side by side (one compiler per source file); None when all succeed, else the first complaint."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    error = None
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            err = "timed out after 600 s"
        if proc.returncode != 0 and error is None:
            error = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return error


def _build(compiler: str, path: Path) -> str | None:
    """Compile the sources (in parallel) and link them to `path` (atomically: a temporary file renamed). None when built,
    else the compiler's complaint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    error = ""
    for native in (True, False):  # -march=native first; a compiler without it still builds a portable copy
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
            library = Path(tmp) / "lib.so"
            try:
                error = _run_all([[compiler, *_flags(native), "-c", str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objects)])
                if error is None:
                    error = _run_all([[compiler, *map(str, objects), "-o", str(library), *_link_flags()]])
                if error is None:
                    os.replace(library, path)
                    return None
            except OSError as e:
                error = str(e)
    return error


@functools.cache
def load() -> bool:
    """Whether torch.ops.gptlab.gemv is available, building and registering it on the first call."""
    if os.environ.get("GPTLAB_NATIVE", "1") == "0" or sys.platform == "win32":
        return False
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        warnings.warn("gptlab: no C++ compiler (c++, g++, clang++ or $CXX) found: decoding and the training loss use PyTorch's kernels only", stacklevel=2)
        return False
    what = "\n".join([source_digest(), torch.__version__, compiler, _cpu_flags(), " ".join(_flags(True) + _link_flags())])
    path = cache_dir() / "native" / f"gptlab-{hashlib.sha256(what.encode()).hexdigest()[:24]}.so"
    failed = path.with_suffix(".failed")
    if failed.is_file():  # a build that failed once for this source, compiler and CPU fails again: do not pay for it per process
        return False
    if not path.is_file():
        error = _build(compiler, path)
        if error is not None:
            warnings.warn(
                f"gptlab: building the native kernels failed ({error}); PyTorch's kernels are used instead (delete {failed} to try again)",
                stacklevel=2,
            )
            try:
                failed.write_text(error + "\n", encoding="utf-8")
            except OSError:
                pass
            return False
    try:
        torch.ops.load_library(str(path))
    except OSError as e:  # a library the loader refuses (another PyTorch in the same place?): build it again next time
        warnings.warn(f"gptlab: loading the native kernels {path} failed ({e}); PyTorch's kernels are used instead", stacklevel=2)
        path.unlink(missing_ok=True)
        return False
    return True


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias) for x (..., in) with a few rows, float32 or bfloat16, all contiguous; after load()."""
    return torch.ops.gptlab.gemv(x, weight, bias)


def cached_attention(q: Tensor, k_new: Tensor, v_new: Tensor, cache_k: Tensor, cache_v: Tensor, slots: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One layer's attention in a decode step: k_new, v_new (B, T, nkv, hs) written into cache_k, cache_v (B, nkv, S, hs)
    at slots (B, T), then F.scaled_dot_product_attention(q, cache_k[:, :, :L], cache_v[:, :, :L], mask, scale=scale,
    enable_gqa=True) for q (B, nh, T, hs), nh a multiple of nkv, and mask (B, 1, T, L) bool; float32 or bfloat16, summed
    in float32 (a query that may see no key gets zeros); after load()."""
    return torch.ops.gptlab.cached_attention(q, k_new, v_new, cache_k, cache_v, slots, mask, scale)


def gemv_quant(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None) -> Tensor:
    """A weight-only quantized Linear for x (..., K) with a few rows, float32 or bfloat16: int8 codes (N, K) with scales (N,)
    and no zeros, or int4 codes packed two a byte (N, K/2) with scales and zeros (N, K/G), G a multiple of 32, all float32
    (compress/quantize.py's layout); bias (N,) in x's dtype. Returns (..., N) in x's dtype; after load()."""
    return torch.ops.gptlab.gemv_quant(x, qweight, scales, zeros, bias)


def decode_layers(
    x: Tensor, params: list[Tensor | None], cache_k: Tensor, cache_v: Tensor, slots: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor] | None,
    scales: list[float], n_head: int, norm: str, activation: str, gated: bool, pre_ln: bool, eps: float,
) -> Tensor:  # fmt: skip
    """Every layer of a GPT and its final norm for a decode step, in one call: x (B, T, C) the embedded tokens, their keys
    and values stored at slots (B, T) of the cache (n_layer, B, nkv, S, hs), attention under mask (B, 1, T, L); rope the
    (cos, sin) of rope_angles, (B, T, hs) float32, or None. params: per layer the weight and bias of ln_1, q_norm, k_norm
    and ln_2, then for each of c_attn, attn.c_proj, c_fc and mlp.c_proj its weight (in x's dtype, or int8 / int4 codes as
    gemv_quant takes them), bias, scales and zeros (None where absent); then ln_f's weight and bias. Returns (B, T, C);
    after load()."""
    cos, sin = rope if rope is not None else (None, None)
    return torch.ops.gptlab.decode_layers(x, params, cache_k, cache_v, slots, mask, cos, sin, scales, n_head, norm, activation, gated, pre_ln, eps)


def target_logprobs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(log softmax(logits)[target] per row, 0 where the target is -100; log-sum-exp per row), float32 (N,) each, for
    contiguous float32 or bfloat16 logits (N, V) and int64 targets (N,); after load()."""
    return torch.ops.gptlab.target_logprobs(logits, targets)


def target_logprobs_grad(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor) -> Tensor:
    """scale[:, None] * (softmax(logits) - onehot(targets)) in the logits' dtype (no one-hot where the target is -100):
    the gradient of -sum(scale * log p(target)); lse from target_logprobs, scale float32 (N,); after load()."""
    return torch.ops.gptlab.target_logprobs_grad(logits, targets, lse, scale)


def gelu_tanh(x: Tensor) -> Tensor:
    """F.gelu(x, approximate="tanh") for contiguous float32 or bfloat16 x, computed in float32; after load()."""
    return torch.ops.gptlab.gelu_tanh(x)


def gelu_tanh_backward(grad: Tensor, x: Tensor) -> Tensor:
    """grad * d gelu_tanh(x) / dx, both contiguous and of x's dtype; after load()."""
    return torch.ops.gptlab.gelu_tanh_backward(grad, x)
