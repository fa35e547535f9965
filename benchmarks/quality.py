"""Quality per CPU-minute: the GPT-2 preset against the modern one (`--arch llama`), each with AdamW and with Muon,
trained for the same wall-clock budget on the same data; held-out bits per byte, a few seeds.

    python benchmarks/quality.py [--budget 60] [--seeds 1 2] [--corpora pydoc stdlib-code] [--out FILE]

Corpora, both built offline from the Python install: "pydoc" (gptlab's default corpus: the language reference
topics and the standard library's docstrings, English) and "stdlib-code" (the standard library's own .py
sources, sorted, the first --code-mb MB: code). Each gets a 2048-token BPE and a 10% validation split by document.
Model: the demo's shape (4 layers, 4 heads, 256 wide, context 256), batch 8, bfloat16 autocast where the CPU has
fast bf16, AdamW lr 2e-3 -> 2e-4 cosine (the demo's), Muon lr 0.02 for the blocks' matrices (AdamW 2e-3 for the
rest). Every run gets `TrainConfig.time_budget` seconds (the training loop fits its step count to the machine, setup
and a final evaluation included), so a faster step buys more steps. bpb is measured afterwards on up to
--eval-tokens of the validation split, float32. Runs are interleaved by seed so drift in machine speed reaches all
arms alike; run it alone.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.config import ARCHITECTURES, GPTConfig, TrainConfig
from gptlab.data import load_data, prepare
from gptlab.evaluate import evaluate_split
from gptlab.generate import cpu_name
from gptlab.train import fast_bf16, resolve_device, train

ARMS = {  # name: (architecture preset, optimizer, Muon's Newton-Schulz dtype)
    "gpt2 + adamw": ("gpt2", "adamw", "auto"),
    "gpt2 + muon": ("gpt2", "muon", "auto"),
    "llama + adamw": ("llama", "adamw", "auto"),
    "llama + muon": ("llama", "muon", "auto"),
    "gpt2 + muon (ns float32)": ("gpt2", "muon", "float32"),  # not run unless asked for: --arms
    "llama + muon (ns float32)": ("llama", "muon", "float32"),
}
DEFAULT_ARMS = ["gpt2 + adamw", "gpt2 + muon", "llama + adamw", "llama + muon"]


def stdlib_code(dest: Path, megabytes: float) -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), sorted by path, copied to dest until `megabytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    out, total = [], 0
    for i, path in enumerate(files):
        text = path.read_bytes()
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            continue
        target = dest / f"{i:05d}_{path.name}"
        target.write_bytes(text)
        out.append(target)
        total += len(text)
        if total >= megabytes * 1e6:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=60.0, help="seconds of training per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--corpora", nargs="+", choices=["pydoc", "stdlib-code"], default=["pydoc", "stdlib-code"])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    p.add_argument("--code-mb", type=float, default=4.0)
    p.add_argument("--eval-tokens", type=int, default=200_000)
    p.add_argument("--out", type=Path, help="append the markdown report to this file")
    args = p.parse_args()
    device = resolve_device("auto")
    dtype = "bfloat16" if fast_bf16(device) else "float32"
    work = Path(tempfile.mkdtemp(prefix="gptlab_quality_"))
    bpb: dict[tuple[str, str], list[float]] = {}
    steps: dict[tuple[str, str], list[int]] = {}
    try:
        for corpus in args.corpora:
            data_dir = work / corpus / "data"
            if corpus == "pydoc":
                meta = prepare(data_dir, "train:2048", corpus="pydoc", progress=False)
            else:
                (work / "code").mkdir(parents=True, exist_ok=True)
                meta = prepare(data_dir, "train:2048", inputs=stdlib_code(work / "code", args.code_mb), progress=False)
            data = load_data(data_dir)
            print(f"{corpus}: train {meta['splits']['train']['tokens']:,} tokens, val {meta['splits']['val']['tokens']:,}", flush=True)
            for seed in args.seeds:
                for arm in args.arms:
                    arch, optimizer, ns_dtype = ARMS[arm]
                    model_cfg = GPTConfig(vocab_size=meta["vocab_size"], block_size=256, n_layer=4, n_head=4, n_embd=256, **ARCHITECTURES[arch])
                    train_cfg = TrainConfig(
                        batch_size=8, lr=2e-3, min_lr=2e-4, weight_decay=0.1, eval_every=10_000, eval_batches=10, save_every=10_000,
                        log_every=50, seed=seed, device=str(device), dtype=dtype, time_budget=args.budget, optimizer=optimizer, muon_lr=0.02,
                        muon_ns_dtype=ns_dtype,
                    )  # fmt: skip
                    run = work / corpus / f"{arch}-{optimizer}-{ns_dtype}-{seed}"
                    t0 = time.perf_counter()
                    result = train(model_cfg, train_cfg, data_dir, run, progress=False)
                    seconds = time.perf_counter() - t0
                    value = evaluate_split(load_checkpoint(run).model, data, "val", batch_size=8, max_tokens=args.eval_tokens)["bpb"]
                    bpb.setdefault((corpus, arm), []).append(value)
                    steps.setdefault((corpus, arm), []).append(result.step)
                    print(f"{corpus} seed {seed} {arm}: {result.step} steps in {seconds:.0f} s, val bpb {value:.4f}", flush=True)
                    shutil.rmtree(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"### Quality at equal wall clock: {args.budget:.0f} s of training per run, demo shape (4 x 256), BPE 2048",
        "",
        f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}; held-out bits per byte (lower is better), "
        f"seeds {', '.join(map(str, args.seeds))}",
        "",
        "| corpus | arm | steps (mean) | bpb per seed | mean bpb | vs gpt2 + adamw |",
        "|---|---|---:|---|---:|---:|",
    ]
    for corpus in args.corpora:
        base = statistics.mean(bpb[(corpus, args.arms[0])])
        for arm in args.arms:
            values = bpb[(corpus, arm)]
            lines.append(
                f"| {corpus} | {arm} | {statistics.mean(steps[(corpus, arm)]):.0f} | {' / '.join(f'{v:.4f}' for v in values)} | "
                f"{statistics.mean(values):.4f} | {100 * (statistics.mean(values) / base - 1):+.1f}% |"
            )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
