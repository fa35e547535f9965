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
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.compress.prune import PruneConfig, calibration_ids, prune_and_recover, prune_model
from gptlab.config import GPTConfig, SampleConfig, TrainConfig
from gptlab.data import load_data
from gptlab.evaluate import evaluate_split
from gptlab.generate import Engine
from gptlab.model import GPT

STRUCTURES = {"weights": None, "heads": "heads", "mlp": "mlp"}


def recover_bpb(src: Path, data: str, cfg: PruneConfig, steps: int, work: Path, eval_tokens: int) -> float:
    train_cfg = TrainConfig(max_steps=steps, lr=1e-4, min_lr=1e-5, batch_size=8, eval_every=steps, eval_batches=4, save_every=steps, log_every=steps, device="cpu")
    run = work / f"rec-{cfg.structured}-{cfg.sparsity}"
    prune_and_recover(src, data, run, cfg, train_cfg, progress=False)
    return evaluate_split(load_checkpoint(run).model, load_data(data), "val", batch_size=8, max_tokens=eval_tokens)["bpb"]


def dense_control_bpb(src: Path, data: str, steps: int, work: Path, eval_tokens: int) -> float:
    """The dense model fine-tuned as the recovery runs are: what the extra steps alone buy."""
    from gptlab.train import LanguageModeling, train

    loaded = load_checkpoint(src)
    train_cfg = TrainConfig(max_steps=steps, lr=1e-4, min_lr=1e-5, batch_size=8, eval_every=steps, eval_batches=4, save_every=steps, log_every=steps, device="cpu")
    run = work / "dense-control"
    train(loaded.model_config, train_cfg, LanguageModeling(load_data(data)), run, progress=False, init_model=loaded.model.train())
    return evaluate_split(load_checkpoint(run).model, load_data(data), "val", batch_size=8, max_tokens=eval_tokens)["bpb"]


def decode_speed(models: dict[str, GPT], batches: list[int], new: int, rounds: int) -> dict[int, dict[str, float]]:
    engines = {name: Engine(m, tune=batches) for name, m in models.items()}
    cfg = SampleConfig(max_new_tokens=new, temperature=0.0, ignore_eot=True)
    out = {}
    for B in batches:
        prompt = torch.randint(0, 50257, (B, 16), generator=torch.Generator().manual_seed(B)).tolist()
        for e in engines.values():
            e.generate([p[:4] for p in prompt], cfg.replace(max_new_tokens=4))
        runs: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(rounds):
            for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                t0 = time.perf_counter()
                engines[name].generate(prompt, cfg)
                runs[name].append(B * new / (time.perf_counter() - t0))
        out[B] = {name: statistics.median(v) for name, v in runs.items()}
        print(f"  batch {B}: " + ", ".join(f"{n} {v:.1f}" for n, v in out[B].items()) + " tokens/s", flush=True)
    return out


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
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    lines = [f"CPU: {cpu}, {args.threads} threads, torch {torch.__version__}"]
    data = load_data(args.data)
    work = Path(tempfile.mkdtemp(prefix="gptlab_prunebench_"))
    for ckpt_arg in args.ckpt:
        loaded = load_checkpoint(ckpt_arg)
        c = loaded.model_config
        calib = calibration_ids(data, 32, c.block_size, 0)
        dense = evaluate_split(loaded.model, data, "val", batch_size=8, max_tokens=args.eval_tokens)["bpb"]
        print(f"{loaded.path}: dense bpb {dense:.4f}", flush=True)
        rows = []
        for label, structured in STRUCTURES.items():
            for method in ("magnitude", "wanda"):
                for s in args.sparsities:
                    model, info = prune_model(copy.deepcopy(loaded.model), PruneConfig(s, method, structured), calib)
                    bpb = evaluate_split(model, data, "val", batch_size=8, max_tokens=args.eval_tokens)["bpb"]
                    rows.append((label, method, s, info["removed_fraction"], model.num_params(non_embedding=False), bpb))
                    print(f"  {label} {method} {s}: removed {info['removed_fraction']:.3f}, bpb {bpb:.4f}", flush=True)
        lines += ["", f"**{loaded.path}** ({c.n_layer} layers x {c.n_embd}, {c.n_head} heads, vocabulary {c.vocab_size}); bpb on {args.data} val, "
                  f"{args.eval_tokens:,} tokens; dense {dense:.4f} bpb, {loaded.model.num_params(non_embedding=False) / 1e6:.2f}M parameters", "",
                  "| pruned | method | sparsity | block weights removed | parameters | bits per byte | vs dense |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for label, method, s, removed, n, bpb in rows:
            lines.append(f"| {label} | {method} | {s:g} | {100 * removed:.1f}% | {n / 1e6:.2f}M | {bpb:.4f} | {100 * (bpb / dense - 1):+.1f}% |")
        if args.recover_steps:
            control = dense_control_bpb(loaded.path, args.data, args.recover_steps, work, args.eval_tokens)
            lines += ["", f"Recovery: {args.recover_steps} steps of 8 x {c.block_size} tokens at lr 1e-4 after Wanda pruning at sparsity {args.recover_sparsity:g} "
                      f"(the dense model fine-tuned the same way: {control:.4f} bpb)", "",
                      "| pruned | bpb after pruning | after recovery | vs dense fine-tuned the same |", "|---|---:|---:|---:|"]  # fmt: skip
            for label, structured in STRUCTURES.items():
                cfg = PruneConfig(args.recover_sparsity, "wanda", structured)
                before = next(r[5] for r in rows if r[0] == label and r[1] == "wanda" and r[2] == args.recover_sparsity)
                after = recover_bpb(loaded.path, args.data, cfg, args.recover_steps, work, args.eval_tokens)
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
        speed = decode_speed(models, args.batches, args.new, args.rounds)
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
