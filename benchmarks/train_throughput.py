"""Training throughput: gptlab's GPT against Hugging Face's GPT2LMHeadModel, same shape, same process.

Each training step is forward + backward + optimizer step. gptlab runs its own
training step (its model and `gptlab.train.build_optimizer`); HF runs what an HF user
gets: GPT2LMHeadModel with SDPA attention and GPT-2's default activation (gelu_new),
and torch.optim.AdamW with its defaults at the same lr, betas and weight decay.
Steps of the four runs (gptlab/HF x float32/bf16 autocast) are interleaved one by
one, so drift in machine speed reaches all of them alike; only ratios from one run
compare.

    python benchmarks/train_throughput.py [--steps 10] [--warmup 3] [--repeats 1] [--out results.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from gptlab.config import GPTConfig, TrainConfig
from gptlab.hf import config_to_hf, state_dict_to_hf
from gptlab.model import GPT
from gptlab.train import build_optimizer

RUNS = (("gptlab", "fp32"), ("HF", "fp32"), ("gptlab", "bf16"), ("HF", "bf16"))
RATIOS = ((("gptlab", "fp32"), ("HF", "fp32")), (("gptlab", "bf16"), ("HF", "fp32")), (("gptlab", "bf16"), ("HF", "bf16")))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run and repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run before timing")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds; the table reports the median")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, help="append the markdown report to this file")
    args = p.parse_args()
    for name in ("steps", "repeats", "threads", "batch", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def make_steps(
    cfg: GPTConfig, train_cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, seed: int
) -> tuple[dict[tuple[str, str], Callable[[], float]], int]:
    """One step function per run (both models start from the same weights), and gptlab's FLOPs per token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    ours = GPT(cfg).train()
    ours_opt = build_optimizer(ours, train_cfg, "cpu")

    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg), attn_implementation="sdpa")).train()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg))
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), weight_decay=train_cfg.weight_decay)

    def autocast(precision: str):
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def ours_step(precision: str) -> float:
        with autocast(precision):
            _, loss = ours(x, y)
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return loss.item()

    def hf_step(precision: str) -> float:
        with autocast(precision):
            loss = hf(input_ids=x, labels=x).loss  # HF shifts the labels inside: the same next-token targets as y
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.item()

    steps = {"gptlab": ours_step, "HF": hf_step}
    runs = {(impl, precision): (lambda f=steps[impl], p=precision: f(p)) for impl, precision in RUNS}
    return runs, ours.flops_per_token()


def measure(steps: dict[tuple[str, str], Callable[[], float]], n_steps: int, tokens_per_step: int) -> dict[tuple[str, str], float]:
    """Tokens/s of each run over n_steps, the runs' steps interleaved."""
    elapsed = dict.fromkeys(steps, 0.0)
    for _ in range(n_steps):
        for run, step in steps.items():
            t0 = time.perf_counter()
            step()
            elapsed[run] += time.perf_counter() - t0
    return {run: n_steps * tokens_per_step / seconds for run, seconds in elapsed.items()}


def report(cfg: GPTConfig, args: argparse.Namespace, rounds: list[dict[tuple[str, str], float]], flops_per_token: int) -> str:
    median = {run: statistics.median(r[run] for r in rounds) for run in RUNS}
    lines = [
        f"### Training throughput: n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}, T {cfg.block_size}, "
        f"batch {args.batch}, vocab {cfg.vocab_size}",
        "",
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s); {args.warmup} warm-up + {args.steps} timed steps per run, steps interleaved; "
        f"median of {len(rounds)} round(s)",
        "",
        "| implementation | precision | tokens/s | min-max over rounds | model GFLOP/s |",
        "|---|---|---:|---:|---:|",
    ]
    for run in RUNS:
        values = [r[run] for r in rounds]
        lines.append(f"| {run[0]} | {run[1]} | {median[run]:,.0f} | {min(values):,.0f}-{max(values):,.0f} | {median[run] * flops_per_token / 1e9:.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    for a, b in RATIOS:
        lines.append(f"| {a[0]} {a[1]} / {b[0]} {b[1]} | {median[a] / median[b]:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=256, n_layer=6, n_head=6, n_embd=384)
    train_cfg = TrainConfig(batch_size=args.batch, seed=args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size + 1), generator=torch.Generator().manual_seed(args.seed))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    steps, flops_per_token = make_steps(cfg, train_cfg, x, y, args.seed)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    rounds = []
    for r in range(args.repeats):
        rounds.append(measure(steps, args.steps, x.numel()))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{i} {p} {v:,.0f} tok/s" for (i, p), v in rounds[-1].items()), flush=True)
    text = report(cfg, args, rounds, flops_per_token)
    print(text)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
