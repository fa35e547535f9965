"""Distillation pays: a student trained with a teacher's soft targets against the same student trained on the
data alone, at equal steps and data, a few seeds; held-out bits per byte.

    python benchmarks/distill.py [--teacher runs/demo/run] [--data runs/demo/data] [--seeds 1 2] [--steps 800]
                                 [--n-layer 2] [--n-embd 128] [--n-head 4] [--temperature 2] [--alpha 0.5] [--out FILE]

Both arms run gptlab's training loop with the same TrainConfig (batch 8 x block_size, lr 2e-3 cosine
to 2e-4, bfloat16 autocast, the seed fixing initialisation and batch order), so they see the same
batches in the same order; the distilled arm adds the teacher's term (gptlab.compress.distill).
bpb is measured afterwards on the whole validation split (up to --eval-tokens), float32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.compress.distill import distill, student_config
from gptlab.config import TrainConfig
from gptlab.data import load_data
from gptlab.evaluate import evaluate_split
from gptlab.generate import cpu_name
from gptlab.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/demo/run")
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eval-tokens", type=int, default=1 << 20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="append the markdown table here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_checkpoint(args.teacher)
    data = load_data(args.data)
    t_bpb = evaluate_split(teacher.model, data, "val", batch_size=8, max_tokens=args.eval_tokens)["bpb"]
    student = student_config(teacher.model_config, {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head})
    work = Path(tempfile.mkdtemp(prefix="gptlab_distillbench_"))
    rows: dict[str, list[float]] = {"plain": [], "distilled": []}
    secs: dict[str, list[float]] = {"plain": [], "distilled": []}
    for seed in args.seeds:
        cfg = TrainConfig(max_steps=args.steps, lr=args.lr, min_lr=args.lr / 10, batch_size=8, seed=seed, dtype=args.dtype, device="cpu",
                          eval_every=args.steps, eval_batches=4, save_every=args.steps, log_every=50)  # fmt: skip
        for arm in rows:
            run = work / f"{arm}-{seed}"
            t0 = time.perf_counter()
            if arm == "plain":
                train(student, cfg, args.data, run, progress=False)
            else:
                distill(args.teacher, args.data, run, student, cfg, {"temperature": args.temperature, "alpha": args.alpha}, progress=False)
            secs[arm].append(time.perf_counter() - t0)
            bpb = evaluate_split(load_checkpoint(run).model, data, "val", batch_size=8, max_tokens=args.eval_tokens)["bpb"]
            rows[arm].append(bpb)
            print(f"seed {seed} {arm}: {bpb:.4f} bpb ({secs[arm][-1]:.0f} s)", flush=True)
    n = sum(p.numel() for p in load_checkpoint(work / f"plain-{args.seeds[0]}").model.parameters())
    tc = teacher.model_config
    lines = [
        f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}",
        f"teacher {teacher.path} ({tc.n_layer} x {tc.n_embd}, {sum(p.numel() for p in teacher.model.parameters()) / 1e6:.2f}M parameters): {t_bpb:.4f} bpb; "
        f"student {student.n_layer} x {student.n_embd}, {student.n_head} heads ({n / 1e6:.2f}M); {args.steps} steps of 8 x {student.block_size} tokens, "
        f"lr {args.lr:g} cosine, {args.dtype}; distilled: temperature {args.temperature:g}, alpha {args.alpha:g}; bpb on {args.data} val",
        "",
        "| student | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | training time (mean) |",
        "|---|" + "---:|" * (len(args.seeds) + 2),
    ]
    for arm, values in rows.items():
        lines.append(f"| {arm} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {statistics.mean(values):.4f} | {statistics.mean(secs[arm]):.0f} s |")
    gain = [100 * (d / p - 1) for p, d in zip(rows["plain"], rows["distilled"])]
    lines.append(f"\ndistilled vs plain, per seed: {', '.join(f'{g:+.2f}%' for g in gain)}")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
