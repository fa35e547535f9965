"""Pruning: bits per byte against sparsity for magnitude and Wanda, unstructured and structured, with and
without a recovery fine-tune, and decode speed of structurally pruned GPT-2 124M shapes.

    python benchmarks/prune.py [--ckpt runs/demo/run] [--data runs/demo/data] [--sparsities 0.25 0.5 0.75]
                               [--recover-steps 200] [--rounds 3] [--new 64] [--out FILE]

Quality: for each --ckpt, bits per byte on the validation split of --data (up to --eval-tokens
tokens) of the dense model and of every (structure, method, sparsity): single weights, whole
attention heads, whole MLP channels; magnitude and Wanda (32 calibration sequences from the
training split). "removed" is the fraction of the blocks' matrix weights gone (embeddings and head
are never pruned). Recovery: at --recover-sparsity, each structure pruned with Wanda is fine-tuned
for --recover-steps steps (batch 8, lr 1e-4, as `gptlab prune --recover`) on the training split,
and so is the dense model, as the control: the extra steps alone lower its bpb too.
Speed: decode tokens/s at batch 1 and 8 (greedy, prompt 16, --new new tokens) through gptlab's
Engine of the GPT-2 124M shape (random weights: speed does not depend on the values) dense and
with heads or MLP channels removed; each with the Linear kernels it measures fastest at start-up,
rounds interleaved, median kept. Unstructured zeros leave the shapes, so the speed, unchanged.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.compress.prune import PruneConfig, calibration_ids, prune_and_recover, prune_model
from gptlab.config import GPTConfig, TrainConfig
from gptlab.data import TokenData, load_data
from gptlab.evaluate import evaluate_split
from gptlab.generate import Engine, cpu_name
from gptlab.model import GPT
from gptlab.train import LanguageModeling, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import decode_speed  # noqa: E402  (benchmarks/quantize.py: the same interleaved rounds, medians)

STRUCTURES = {"weights": None, "heads": "heads", "mlp": "mlp"}


def recovery_config(steps: int) -> TrainConfig:
    """What `gptlab prune --recover` runs by default (lr 1e-4 to 1e-5), for `steps` steps of 8 sequences, one evaluation at the end."""
    return TrainConfig(max_steps=steps, lr=1e-4, min_lr=1e-5, batch_size=8, eval_every=steps, eval_batches=4, save_every=steps, log_every=steps, device="cpu")


def val_bpb(model: GPT, data: TokenData, eval_tokens: int) -> float:
    return evaluate_split(model, data, "val", batch_size=8, max_tokens=eval_tokens)["bpb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", nargs="*", default=["runs/demo/run"], help="trained checkpoints; none: only the 124M speed table")
    p.add_argument("--data", default="runs/demo/data", help="prepared data directory (the checkpoints' tokenizer)")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--recover-sparsity", type=float, default=0.5)
    p.add_argument("--recover-steps", type=int, default=200, help="0: no recovery runs")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-124m", action="store_true")
    p.add_argument("--out", type=Path, help="append the markdown tables here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}"]
    data = load_data(args.data)
    work = Path(tempfile.mkdtemp(prefix="gptlab_prunebench_"))
    for ckpt_arg in args.ckpt:
        loaded = load_checkpoint(ckpt_arg)
        c = loaded.model_config
        calib = calibration_ids(data, 32, c.block_size, 0)
        dense = val_bpb(loaded.model, data, args.eval_tokens)
        print(f"{loaded.path}: dense bpb {dense:.4f}", flush=True)
        rows = []
        for label, structured in STRUCTURES.items():
            for method in ("magnitude", "wanda"):
                for s in args.sparsities:
                    model, info = prune_model(copy.deepcopy(loaded.model), PruneConfig(s, method, structured), calib)
                    bpb = val_bpb(model, data, args.eval_tokens)
                    rows.append((label, method, s, info["removed_fraction"], model.num_params(non_embedding=False), bpb))
                    print(f"  {label} {method} {s}: removed {info['removed_fraction']:.3f}, bpb {bpb:.4f}", flush=True)
        lines += ["", f"**{loaded.path}** ({c.n_layer} layers x {c.n_embd}, {c.n_head} heads, vocabulary {c.vocab_size}); bpb on {args.data} val, "
                  f"{args.eval_tokens:,} tokens; dense {dense:.4f} bpb, {loaded.model.num_params(non_embedding=False) / 1e6:.2f}M parameters", "",
                  "| pruned | method | sparsity | block weights removed | parameters | bits per byte | vs dense |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for label, method, s, removed, n, bpb in rows:
            lines.append(f"| {label} | {method} | {s:g} | {100 * removed:.1f}% | {n / 1e6:.2f}M | {bpb:.4f} | {100 * (bpb / dense - 1):+.1f}% |")
        if args.recover_steps:
            # the dense model fine-tuned as the recovery runs are: what the extra steps alone buy
            train(c, recovery_config(args.recover_steps), LanguageModeling(data), work / "dense", progress=False, init_model=load_checkpoint(loaded.path).model.train())
            control = val_bpb(load_checkpoint(work / "dense").model, data, args.eval_tokens)
            lines += ["", f"Recovery: {args.recover_steps} steps of 8 x {c.block_size} tokens at lr 1e-4 after Wanda pruning at sparsity {args.recover_sparsity:g} "
                      f"(the dense model fine-tuned the same way: {control:.4f} bpb)", "",
                      "| pruned | bpb after pruning | after recovery | vs dense fine-tuned the same |", "|---|---:|---:|---:|"]  # fmt: skip
            for label, structured in STRUCTURES.items():
                cfg = PruneConfig(args.recover_sparsity, "wanda", structured)
                before = next(r[5] for r in rows if r[0] == label and r[1] == "wanda" and r[2] == args.recover_sparsity)
                prune_and_recover(loaded.path, args.data, work / label, cfg, recovery_config(args.recover_steps), progress=False)
                after = val_bpb(load_checkpoint(work / label).model, data, args.eval_tokens)
                print(f"  recovered {label}: {before:.4f} -> {after:.4f}", flush=True)
                lines.append(f"| {label} | {before:.4f} | {after:.4f} | {100 * (after / control - 1):+.1f}% |")
    if not args.no_124m:
        torch.manual_seed(0)
        base = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)).eval()
        models = {"dense": base}
        for structured in ("heads", "mlp"):
            for s in args.sparsities:
                models[f"{structured} {s:g}"] = prune_model(copy.deepcopy(base), PruneConfig(s, "magnitude", structured))[0]
        print("GPT-2 124M shape, random weights", flush=True)
        speed = decode_speed({name: Engine(m, tune=args.batches) for name, m in models.items()}, 50257, args.batches, args.new, args.rounds)
        lines += ["", f"**GPT-2 124M shape** (random weights), float32 decode: greedy, prompt 16, {args.new} new tokens, median of {args.rounds} interleaved rounds", "",
                  "| model | parameters | " + " | ".join(f"tok/s, batch {B}" for B in args.batches) + " |", "|---|---:|" + "---:|" * len(args.batches)]  # fmt: skip
        for name, m in models.items():
            tps = " | ".join(f"{speed[B][name]:.1f} ({speed[B][name] / speed[B]['dense']:.2f}x)" for B in args.batches)
            lines.append(f"| {name} | {m.num_params(non_embedding=False) / 1e6:.1f}M | {tps} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
