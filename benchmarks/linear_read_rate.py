"""How fast each CPU Linear kernel reads weights at one row (batch-1 decoding), against a plain sum of the same bytes.

    python benchmarks/linear_read_rate.py [--threads 1 2] [--rounds 3]

The 49 matrices of the GPT-2 124M shape (12 x c_attn, attn.c_proj, c_fc, mlp.c_proj, and the 768 -> 50257
head), random values, float32 and bfloat16, each called in turn with one input row: F.linear (the BLAS path),
torch.mv (float32), oneDNN on a weight reordered once into its blocked layout (the Engine's "onednn-packed"
kernel), gptlab's own matrix-vector kernel (gptlab/kernels/decode.cpp, the Engine's "native"), and `sum` over
the same weights, the rate a streaming read reaches. Best of 7 passes in each of 3 interleaved rounds; GB/s of weights.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gptlab import kernels as native
from gptlab.generate import cpu_name

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]


def best(f: Callable[[], object], n: int = 7) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the kernels; the table keeps each one's best")
    args = p.parse_args()
    lines = [f"{cpu_name()}, torch {torch.__version__}", "", "| threads | kernel | float32 GB/s | bfloat16 GB/s |", "|---|---|---:|---:|"]
    g = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates: dict[str, dict[torch.dtype, float]] = {}
        for dtype in (torch.float32, torch.bfloat16):
            ws = [torch.randn(o, i, generator=g).to(dtype) for o, i in SHAPES]
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            xs = {w.size(1): torch.randn(1, w.size(1), generator=g).to(dtype) for w in ws}
            kernels = {"F.linear": lambda: [F.linear(xs[w.size(1)], w) for w in ws]}
            if dtype == torch.float32:
                kernels["torch.mv"] = lambda: [torch.mv(w, xs[w.size(1)][0]) for w in ws]
            if torch.backends.mkldnn.is_available() and (dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
                packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
                kernels["oneDNN, reordered weight"] = lambda: [
                    torch.ops.mkldnn._linear_pointwise(xs[w.size(1)], pw, None, "none", [], "") for w, pw in zip(ws, packed, strict=True)
                ]
            if native.load():
                kernels["gptlab native gemv"] = lambda: [native.gemv(xs[w.size(1)], w, None) for w in ws]
            kernels["sum of the same weights"] = lambda: [w.sum() for w in ws]
            # interleaved rounds, best of each: this host's read rate drifts by tens of percent between minutes,
            # so kernels timed one after another would be compared across different rates
            for _ in range(args.rounds):
                for name, run in kernels.items():
                    rate = nbytes / best(run) / 1e9
                    rates.setdefault(name, {})[dtype] = max(rate, rates.get(name, {}).get(dtype, 0.0))
                    print(f"threads {threads} {dtype} {name}: {rate:.1f} GB/s", flush=True)
        for name, r in rates.items():
            cells = [f"{r[d]:.1f}" if d in r else "-" for d in (torch.float32, torch.bfloat16)]
            lines.append(f"| {threads} | {name} | {cells[0]} | {cells[1]} |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
