"""gptlab's evaluation harness against lm-evaluation-harness (`lm_eval --model hf`): the same numbers, and how fast.

One model and one task, run by both on the CPU in float32 with the same threads:

* Model: a gptlab checkpoint (--ckpt; default a GPT-2 124M-shaped model with random weights and
  GPT-2's tokenizer, seed 0: speed does not depend on the weights), exported once with
  `gptlab.hf.export_hf` for lm-eval's HF model (`get_model("hf")`, pretrained=the export, dtype float32).
* Task: a built-in multiple-choice task's rows (--task; gptlab.datasets.evaltasks) written as local
  JSONL plus one lm-eval YAML (`dataset_path: json`, `fewshot_config: {sampler: first_n}`, acc and
  acc_norm; benchmarks/lmeval_peer.py). gptlab reads that same YAML file (`gptlab.evals.tasks.load_task_file`),
  so both build their prompts from one definition.
* For each --shots: lm-eval's `simple_evaluate` (log_samples on, bootstrap off, model loaded
  before the clock starts) and gptlab's `run_task` (checkpoint loaded before the clock), each
  timed on its own, one after the other, nothing else running.

Parity (the first table): per-choice log-likelihoods from lm-eval's logged samples against gptlab's,
the largest difference over every choice of every document (goal <= 1e-4), the prompts compared
character for character, and acc / acc_norm from both (goal: identical). Speed (the second table):
documents per second of each and the ratio (goal >= 3x).

    .venv/bin/python benchmarks/evaluate.py                        # GPT-2 124M shape, arithmetic_mc, 0 and 5 shots
    .venv/bin/python benchmarks/evaluate.py --ckpt runs/demo/run --task stdlib_mc
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lmeval_peer import OFFLINE, run_lmeval, write_lmeval_task  # noqa: E402


def make_model(out: Path, layers: int, heads: int, width: int, block: int) -> Path:
    import torch

    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import GPTConfig
    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=block, n_layer=layers, n_head=heads, n_embd=width)
    save_checkpoint(out, 0, GPT(cfg), cfg, Tokenizer.gpt2())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="a gptlab run or checkpoint (default: a random GPT-2 shaped model, --layers/--width)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--task", default="arithmetic_mc", help="a built-in multiple-choice task")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    p.add_argument("--limit", type=int, default=200, help="test documents")
    p.add_argument("--batch-size", type=int, default=16, help="both harnesses")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gptlab_evalbench_"))
    os.environ.update(OFFLINE | {"HF_HOME": str(work / "hf_home"), "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"})
    import torch

    from gptlab.checkpoint import load_checkpoint
    from gptlab.datasets.evaltasks import eval_rows
    from gptlab.evals.harness import Prompter, build_prompts, run_task
    from gptlab.evals.tasks import BUILTIN_TASKS, load_task_file
    from gptlab.hf import export_hf

    torch.set_num_threads(args.threads)
    spec = BUILTIN_TASKS[args.task]
    if spec["output_type"] != "multiple_choice":
        raise SystemExit(f"--task {args.task} is {spec['output_type']}; parity compares multiple-choice tasks")
    ckpt_path = args.ckpt or make_model(work / "run", args.layers, args.heads, args.width, args.block)
    ckpt = load_checkpoint(ckpt_path)
    hf_dir = export_hf(ckpt.path, work / "hf")
    yaml_path = write_lmeval_task(
        work / "task", f"gptlab_{args.task}", eval_rows(args.task, "train"), eval_rows(args.task, "test"),
        doc_to_text=spec["doc_to_text"], doc_to_choice=spec["doc_to_choice"], doc_to_target=spec["doc_to_target"],
        description=spec.get("description", ""), target_delimiter=spec.get("target_delimiter", " "), fewshot_delimiter=spec.get("fewshot_delimiter", "\n\n"),
    )  # fmt: skip
    task = load_task_file(yaml_path)
    cfg = ckpt.model.config
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    print(f"model: {ckpt.path} ({ckpt.model.num_params(non_embedding=False) / 1e6:.1f}M parameters, {cfg.n_layer} layers, {cfg.n_embd} wide, context {cfg.block_size}); "
          f"task {args.task} ({args.limit} test docs), batch {args.batch_size}, {args.threads} threads, {cpu}, torch {torch.__version__}")  # fmt: skip

    rows = []
    for shots in args.shots:
        peer = run_lmeval(hf_dir, yaml_path, num_fewshot=shots, limit=args.limit, batch_size=args.batch_size)
        start = time.perf_counter()
        ours = run_task(ckpt.model, ckpt.tokenizer, task, shots=shots, limit=args.limit, batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - start
        lls = [s["loglikelihoods"] for s in ours.samples]
        diff = max(abs(a - b) for la, lb in zip(lls, peer["loglikelihoods"], strict=True) for a, b in zip(la, lb, strict=True))
        _, contexts = build_prompts(task, Prompter(ckpt.tokenizer), shots, 0, args.limit, False)
        rows.append({
            "shots": shots, "docs": ours.docs, "max_abs_diff": diff, "prompts_equal": contexts == peer["contexts"],
            "acc": (ours.metrics["acc"][0], peer["acc"]), "acc_norm": (ours.metrics["acc_norm"][0], peer["acc_norm"]),
            "gptlab_seconds": seconds, "lmeval_seconds": peer["seconds"], "truncated": ours.truncated,
        })  # fmt: skip
        print(f"  {shots}-shot: gptlab {seconds:.1f} s, lm-eval {peer['seconds']:.1f} s; max |dll| {diff:.2e}", flush=True)

    print("\n| shots | docs | max abs diff of per-choice log-likelihoods | prompts identical | acc gptlab / lm-eval | acc_norm gptlab / lm-eval | identical |")
    print("|---:|---:|---:|:-:|---:|---:|:-:|")
    for r in rows:
        same = r["acc"][0] == r["acc"][1] and r["acc_norm"][0] == r["acc_norm"][1] and r["max_abs_diff"] <= 1e-4 and r["prompts_equal"]
        print(f"| {r['shots']} | {r['docs']} | {r['max_abs_diff']:.1e} | {'yes' if r['prompts_equal'] else 'NO'} | "
              f"{100 * r['acc'][0]:.2f}% / {100 * r['acc'][1]:.2f}% | {100 * r['acc_norm'][0]:.2f}% / {100 * r['acc_norm'][1]:.2f}% | {'yes' if same else 'NO'} |")  # fmt: skip
    print("\n| shots | docs | gptlab docs/s | lm-eval docs/s | gptlab / lm-eval |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        ours, peer = r["docs"] / r["gptlab_seconds"], r["docs"] / r["lmeval_seconds"]
        print(f"| {r['shots']} | {r['docs']} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
