"""Muon's optimizer step under DDP: Newton-Schulz split among the processes (each orthogonalises its share of the
matrices and broadcasts them) against every process orthogonalising every matrix, in the same processes.

    python benchmarks/muon_split.py [--processes 2] [--threads 1] [--n-layer 6] [--n-embd 384] [--repeats 7]

The model is the llama preset at the given shape (vocabulary 50304); gradients are random and equal on every
process, as DDP's averaged ones are. Each row times MuonAdamW.step (the blocks' matrices under Muon, the rest under
AdamW) with a barrier before it, the slowest process's time, median of --repeats interleaved rounds, for the
Newton-Schulz dtypes float32 and bfloat16. gloo on the CPU, --threads per process (by default the cores divided
among the processes: 2 x 1 on the 2-core machine); run it alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptlab.config import ARCHITECTURES, GPTConfig, TrainConfig
from gptlab.generate import cpu_name
from gptlab.model import GPT
from gptlab.train import build_optimizer


def timed_step(opt: torch.optim.Optimizer) -> float:
    dist.barrier()
    t = time.perf_counter()
    opt.step()
    elapsed = torch.tensor(time.perf_counter() - t, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.processes)
    try:
        cfg = GPTConfig(vocab_size=50304, block_size=256, n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd, **ARCHITECTURES["llama"])
        model = GPT(cfg)
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        rows = []
        for ns_dtype in ("float32", "bfloat16"):
            tcfg = TrainConfig(optimizer="muon", muon_ns_dtype=ns_dtype)
            arms = {"every process": build_optimizer(model, tcfg, "cpu"), "split": build_optimizer(model, tcfg, "cpu", replicated=True)}
            for opt in arms.values():  # warm-up: state allocation, first-call kernel selection
                timed_step(opt)
            times: dict[str, list[float]] = {name: [] for name in arms}
            for _ in range(args.repeats):
                for name, opt in arms.items():
                    times[name].append(timed_step(opt))
            every, split = (statistics.median(times[name]) * 1e3 for name in arms)
            rows.append(f"| {ns_dtype} | {every:.1f} | {split:.1f} | {every / split:.2f}x |")
        if rank == 0:
            n_muon = sum(len(group["params"]) for group in arms["split"].param_groups if group["muon"])
            print(f"{cpu_name()}; {args.processes} processes x {args.threads} thread(s), gloo; llama {args.n_layer}L/{args.n_embd}, "
                  f"{n_muon} Muon matrices; MuonAdamW.step, median of {args.repeats}")  # fmt: skip
            print("\n| Newton-Schulz dtype | every process, ms | split, ms | speed-up |\n|---|---:|---:|---:|")
            print("\n".join(rows))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads per process (default: the cores shared among the processes)")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // args.processes)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "store")), nprocs=args.processes)


if __name__ == "__main__":
    main()
