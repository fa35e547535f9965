"""Weight-only quantized Linears layer by layer: gptlab's native kernel against torch's packed ones, per row count.

    python benchmarks/quant_kernels.py [--rows 1 2 3 4 6 8] [--layers 24] [--threads 2]

What QuantLinear's "auto" kernel choice (compress/quantize.py, NATIVE_ROWS) rests on: `--layers`
distinct 768 -> 3072 Linears (so that each call reads its codes from memory, as a decode step
does), quantized as int8 and int4 (groups of 128 and 32), called in turn with x of each row
count; the best of 5 timings of 10 passes, the two kernels interleaved. Inside the Engine's
one-call decode step (kernels.decode_layers) the native kernels run without the per-call
Python and input preparation timed here.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptlab import kernels
from gptlab.compress.quantize import QuantLinear
from gptlab.generate import cpu_name


def best_of(f, passes: int = 10, tries: int = 5) -> float:
    f()
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        for _ in range(passes):
            f()
        best = min(best, (time.perf_counter() - t0) / passes)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not kernels.load():
        raise SystemExit("the native kernels are not built here (a C++ compiler is needed)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {args.layers} Linears 768 -> 3072, ms for a pass over all\n")
    print("| scheme | rows | native ms | torch packed ms | packed / native |")
    print("|---|---:|---:|---:|---:|")
    for method, group in [("int8", 128), ("int4", 128), ("int4", 32)]:
        layers = [QuantLinear.from_linear(torch.nn.Linear(768, 3072), method, group) for _ in range(args.layers)]
        for M in args.rows:
            x = torch.randn(M, 768)
            ms = {}
            for kernel in ("native", "packed", "native", "packed"):  # interleaved; the better of the two tries each
                for layer in layers:
                    layer.kernel = kernel
                ms[kernel] = min(ms.get(kernel, float("inf")), 1e3 * best_of(lambda: [layer(x) for layer in layers]))
            name = method if method == "int8" else f"int4/{group}"
            print(f"| {name} | {M} | {ms['native']:.2f} | {ms['packed']:.2f} | {ms['packed'] / ms['native']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
