"""Generation speed: gptlab's Engine against Hugging Face's `generate`, same weights, same process.

GPT-2 124M shape (12 layers, 768 wide, vocab 50257) with random weights, prompts of 16
tokens, 128 new tokens, greedy. gptlab runs `Engine` (KV cache, prefill + decode); HF runs
`GPT2LMHeadModel.generate(use_cache=True)` with SDPA attention, as an HF user gets it.
"gptlab fp32" / "gptlab bf16" run the Linear kernels measured fastest on this machine at that
batch size (`Engine(tune=[B])`, what `gptlab sample`, `chat` and `evaluate` do on CPU; the
candidates include gptlab's own matrix-vector kernel and its decode attention, gptlab/kernels);
"gptlab fp32 oneDNN" is the fixed rule the Engine falls back to (oneDNN's kernel in float32),
"gptlab fp32 BLAS" the same Engine with F.linear. The ceiling column divides the memory read
bandwidth measured here (the best of 5 sums over 1 GiB, right before every timed run) by the weight bytes one decode step
must read (every matrix once; the tied head once): batch-1 decoding cannot beat it.
The full-recompute row runs the model over the whole prefix at every step. Runs are
interleaved round by round so drift in machine speed reaches all of them alike; only
ratios from one run compare.

    python benchmarks/generate.py [--batches 1 8] [--repeats 3] [--threads 2] [--out results.md]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptlab.config import GPTConfig, SampleConfig
from gptlab.generate import Engine, cpu_name, generate_uncached
from gptlab.hf import config_to_hf, state_dict_to_hf
from gptlab.model import GPT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the table reports the median")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--no-recompute", action="store_true", help="skip the (slow) full-recompute row")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, help="append the markdown report to this file")
    args = p.parse_args()
    for name in ("prompt", "new", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        p.error(f"--batches must be at least 1, got {args.batches}")
    return args


def read_bandwidth(buf: torch.Tensor) -> float:
    """Bytes/s that summing `buf` (a 1 GiB float32 tensor) reads, best of 5: the rate batch-1 decoding streams weights at, at most."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def build(cfg: GPTConfig, seed: int, dtypes: list[str], new: int, batch: int) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], GPT]:
    """One function per (implementation, dtype) at batch size `batch`: prompt (B, T) -> new tokens (B, new). All share one set of weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    ours = GPT(cfg).eval()
    hf_cfg = GPT2Config(**config_to_hf(cfg), attn_implementation="sdpa")
    sample = SampleConfig(max_new_tokens=new, temperature=0.0)

    def run_ours(prompt: torch.Tensor, engine: Engine) -> torch.Tensor:
        return torch.tensor([c.token_ids for c in engine.generate(prompt.tolist(), sample)])

    def run_hf(prompt: torch.Tensor, hf: GPT2LMHeadModel) -> torch.Tensor:
        with torch.no_grad():
            out = hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0
            )
        return out[:, prompt.size(1) :]

    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in dtypes:
        dtype = DTYPES[name]
        hf = GPT2LMHeadModel(hf_cfg).eval()
        hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg))
        runs[f"gptlab {name}"] = functools.partial(run_ours, engine=Engine(ours, dtype=dtype, tune=[batch]))
        if name == "fp32":
            runs["gptlab fp32 oneDNN"] = functools.partial(run_ours, engine=Engine(ours))
            runs["gptlab fp32 BLAS"] = functools.partial(run_ours, engine=Engine(ours, onednn=False))
        runs[f"HF {name}"] = functools.partial(run_hf, hf=hf.to(dtype))
    return runs, ours


def timed(fn: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(prompt)
    return time.perf_counter() - t0, out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    # the read rate is measured right before every timed run: this host's drifts by 20-60% between minutes (a sum read
    # 42-73 GB/s within one session), so each run's speed is set against the ceiling measured next to it
    buf = torch.ones(1 << 28)
    bandwidths: dict[int, dict[str, list[float]]] = {}
    results: dict[int, dict[str, list[float]]] = {}
    agree: dict[int, dict[str, int]] = {}
    for B in args.batches:
        runs, model = build(cfg, args.seed, args.dtypes, args.new, B)
        prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(args.seed + B))
        short = prompt[:, :4]
        for fn in runs.values():  # warm-up: allocator, kernels, HF's lazy set-up
            fn(short)
        results[B] = {name: [] for name in runs}
        outs: dict[str, torch.Tensor] = {}
        bandwidths[B] = {name: [] for name in runs}
        for r in range(args.repeats):
            for name, fn in runs.items():
                bandwidths[B][name].append(read_bandwidth(buf))
                seconds, outs[name] = timed(fn, prompt)
                results[B][name].append(B * args.new / seconds)
            print(f"batch {B} round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.1f} tok/s" for n, v in results[B].items()), flush=True)
        if not args.no_recompute:
            seconds, outs["recompute fp32"] = timed(lambda p: generate_uncached(model, p, args.new), prompt)
            results[B]["recompute fp32"] = [B * args.new / seconds]
            print(f"batch {B} full recompute fp32: {results[B]['recompute fp32'][0]:.1f} tok/s", flush=True)
        agree[B] = {d: same_prefix(outs[f"gptlab {d}"], outs[f"HF {d}"]) for d in args.dtypes}
        if "recompute fp32" in outs and "fp32" in args.dtypes:
            agree[B]["recompute"] = same_prefix(outs["gptlab fp32"], outs["recompute fp32"])
    text = report(args, results, agree, bandwidths, model)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


def same_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading new tokens (B, N) are equal in every row of the two outputs."""
    differ = (a != b).any(0).nonzero()
    return int(differ[0]) if len(differ) else a.size(1)


def ratio(runs: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a/b, each round's pair measured minutes apart at most; one-round rows use their one value."""
    if len(runs[a]) == len(runs[b]):
        return statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))
    return statistics.median(runs[a]) / statistics.median(runs[b])


def report(
    args: argparse.Namespace,
    results: dict[int, dict[str, list[float]]],
    agree: dict[int, dict[str, int]],
    bandwidths: dict[int, dict[str, list[float]]],
    model: GPT,
) -> str:
    med = {B: {n: statistics.median(v) for n, v in r.items()} for B, r in results.items()}
    names = list(next(iter(results.values())))
    batches = list(results)
    weights = sum(p.numel() for n, p in model.named_parameters() if ".wpe." not in n)  # the tied head counted once
    rates = [bw for per_run in (bandwidths.get(1) or next(iter(bandwidths.values()))).values() for bw in per_run]
    bandwidth = statistics.median(rates)
    ceiling = {"fp32": bandwidth / (4 * weights), "bf16": bandwidth / (2 * weights)}

    def share(n: str) -> str:
        """Median over rounds of batch-1 tok/s over the ceiling from the read rate measured just before that run."""
        if 1 not in results or n not in results[1] or "recompute" in n:
            return "-"
        per_byte = 4 if "bf16" not in n else 2
        return f"{100 * statistics.median(t * per_byte * weights / bw for t, bw in zip(results[1][n], bandwidths[1][n], strict=True)):.0f}%"

    lines = [
        f"### Greedy generation: GPT-2 124M shape, random weights, prompt {args.prompt}, {args.new} new tokens",
        "",
        f"{cpu_name()}, torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"{args.threads} thread(s); median of {args.repeats} interleaved round(s) (full recompute: one round); memory read bandwidth "
        f"(a sum over 1 GiB, before each run) {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f} GB/s, median {bandwidth / 1e9:.1f}, so batch-1 "
        f"ceilings of {ceiling['fp32']:.1f} tok/s in float32 and {ceiling['bf16']:.1f} in bfloat16; the share of the ceiling is the median of "
        "each run's speed over the ceiling from the rate read just before it",
        "",
        "| implementation | " + " | ".join(f"batch {B} tok/s" for B in batches) + " | batch 1, share of the ceiling |",
        "|---|" + "---:|" * (len(batches) + 1),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{med[B][n]:.1f}" if n in med[B] else "-" for B in batches) + f" | {share(n)} |")
    pairs = [(f"gptlab {d}", f"HF {d}") for d in args.dtypes]
    if "fp32" in args.dtypes:
        pairs += [("gptlab fp32 oneDNN", "HF fp32"), ("gptlab fp32 BLAS", "HF fp32")]
    if "fp32" in args.dtypes and "bf16" in args.dtypes:
        pairs.append(("gptlab bf16", "HF fp32"))
    if "recompute fp32" in names and "fp32" in args.dtypes:
        pairs.append(("gptlab fp32", "recompute fp32"))
    lines += ["", "| ratio (median of per-round ratios) | " + " | ".join(f"batch {B}" for B in batches) + " |", "|---|" + "---:|" * len(batches)]
    for a, b in pairs:
        lines.append(f"| {a} / {b} | " + " | ".join(f"{ratio(results[B], a, b):.2f}x" if b in results[B] else "-" for B in batches) + " |")
    lines += [
        "",
        f"Same greedy tokens (of {args.new}; 16-bit sums round differently, so random weights' near-ties can part ways): "
        + "; ".join(f"batch {B}: " + ", ".join(f"{k} {'all' if v == args.new else f'the first {v}'}" for k, v in agree[B].items()) for B in batches),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
