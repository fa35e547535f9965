"""Fine-tuning throughput and memory: gptlab's SFT (full and LoRA) against TRL's SFTTrainer (and TRL + PEFT for LoRA).

Both sides train the same model on the same conversations with the same batch shape, on
the CPU in float32:

* Model: a GPT-2-shaped model (default 6 layers, 6 heads, 384 wide, context 256), random
  init with a fixed seed, GPT-2's BPE vocabulary (shipped with gptlab) plus the ChatML tokens
  <|im_start|> / <|im_end|> (ids 50257, 50258; the table is padded to 50304 rows). It is
  written once as a gptlab checkpoint and exported with `gptlab.hf.export_hf`, so TRL loads
  the identical weights and tokenizer, with gptlab's chat template (its {% generation %}
  block marks the assistant's tokens). GPT-2's tokenizer rather than a small trained one:
  fine-tuning starts from pretrained models, whose vocabularies are that large, so the
  output layer's share of the work is the realistic one (about 2/3 of the FLOPs here).
* Data: the first --rows conversations of gptlab's built-in "mix" set (train split),
  written once to a JSONL file that both sides read. Loss on the assistant's tokens only.
* gptlab: the real `gptlab.finetune.sft.sft()` path (the `gptlab sft` command's), which
  runs `gptlab.train.train`: fused AdamW, gradient clipping 1.0, no evaluation (no held-out
  split), no checkpoint until the end (after the timed steps). Packing: next-fit of whole
  conversations into rows of T positions, each conversation attending only to itself.
  LoRA: `LoRAConfig(r, alpha)` on c_attn, c_proj, c_fc, dropout 0.
* TRL: `SFTTrainer` with `assistant_only_loss=True`, `packing=True` (TRL's default "bfd":
  best-fit decreasing, which turns on padding-free batches: the batch's packed rows are
  concatenated into one row with position_ids restarting at every conversation, and
  transformers builds a block-diagonal causal mask from them for SDPA attention on the
  CPU, provided the forward makes no KV cache, which TRL's compute_loss ensures with
  use_cache=False; the check below verifies that this gives per-conversation losses), `max_length` T,
  the same batch size, `gradient_accumulation_steps=1`, `gradient_checkpointing=False` (TRL
  defaults to True; gptlab does not checkpoint), `bf16=False`, `use_cpu=True`, no logging,
  evaluation or saving, the default optimizer; the same peak learning rate as gptlab.
  LoRA: PEFT `LoraConfig` with the same r, alpha, targets and dropout. The model is
  `GPT2LMHeadModel` with SDPA attention, as `AutoModelForCausalLM` loads the export.

How it is measured. Each run (framework x mode) is its own process, so peak RSS is that
run's alone; runs go one after another (gptlab then TRL for each mode, the order flipped
on every other repeat), and the table gives the median over --repeats. A run takes
--warmup untimed steps, then --steps timed ones. Step time is wall time from the end of one
optimizer step to the end of the next: fetching and collating the batch, forward,
backward, clipping, the optimizer step, and the framework's own bookkeeping (gptlab: the
metrics.jsonl record that gives it; TRL: an on_step_end callback). tokens/s = the tokens
of the conversations in the timed steps' batches / their summed step time, counted alike on
both sides: padding is not counted (gptlab's packed rows have some, TRL's padding-free
batches none), and a conversation of n tokens counts n on both sides although gptlab feeds
it as n - 1 input positions and HF as n. Peak RSS is the process's ru_maxrss at the end of its last
training step: setup included, gptlab's final checkpoint excluded. The threads are the
same on both sides (torch.set_num_threads and OMP_NUM_THREADS).

A check before the runs (its own process) confirms the two sides see the same thing:
gptlab's chat template and HF's apply_chat_template (what TRL calls) give the same ids and
assistant masks, and the untrained model's loss on the same packed conversations is the
same in gptlab, in TRL (its padding-free collator and its compute_loss), and in HF fed one
conversation at a time.

    python benchmarks/finetune.py [--steps 10] [--warmup 2] [--batch-size 8] [--seq-len 256] [--layers 6 --heads 6 --width 384]
                                  [--modes full lora] [--repeats 1] [--quick] [--out results.md]

TRL is a benchmark-only dependency: `pip install -e ".[bench]"` (check with `pip install
--dry-run` that it leaves torch alone).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA_FILE = "conversations.jsonl"
BASE_DIR = "base"  # the gptlab checkpoint (chat tokens included)
HF_DIR = "hf"  # its export_hf copy, which TRL loads
SETTINGS_FILE = "settings.json"
RESULT_PREFIX = "FINETUNE_RESULT "
MODES = ("full", "lora")
TARGETS = ("c_attn", "c_proj", "c_fc")  # gptlab's LoRA default; PEFT gets the same list
QUICK = {"layers": 2, "heads": 2, "width": 128, "seq_len": 128, "batch_size": 4, "steps": 3, "warmup": 1, "rows": 300}


# ----------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run before the timed ones")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (packed rows of --seq-len positions)")
    p.add_argument("--seq-len", type=int, default=256, help="positions per row: the model's context, gptlab's max_len and TRL's max_length")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384, help="n_embd")
    p.add_argument("--rows", type=int, default=2000, help="conversations: the first N of builtin:mix (train)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack conversations into rows (default); --no-packing: one conversation per row, padded to the batch's longest")  # fmt: skip
    p.add_argument("--peer-gelu", choices=("export", "fused"), default="export",
                   help="export: the HF model as export_hf writes it (activation gelu_new, HF's GPT-2 default); fused: "
                        "gelu_pytorch_tanh, the same function in one kernel")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="rounds of all runs; the table gives the median")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every run (default: all cores)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--workdir", type=Path, help="keep the model, data and run logs here (default: a temporary directory, removed at the end)")
    p.add_argument("--worker-timeout", type=float, default=1200, help="seconds before a run's process is stopped")
    p.add_argument("--out", type=Path, help="append the markdown report to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one side in this process
    args = p.parse_args(argv)
    if args.worker is not None:
        return args
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    for name in ("steps", "batch_size", "seq_len", "layers", "heads", "width", "rows", "lora_r", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.width % args.heads:
        p.error(f"--width ({args.width}) must be divisible by --heads ({args.heads})")
    args.modes = [m for m in MODES if m in args.modes]
    return args


# ----------------------------------------------------------------------------- shared helpers


def peak_rss_mib() -> float:
    """This process's peak resident set so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(name)
    except PackageNotFoundError:
        return "not installed"


def read_rows(work: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (work / DATA_FILE).read_text().splitlines() if line.strip()]


def learning_rate(mode: str) -> float:
    """gptlab's fine-tuning default for the mode; TRL gets the same (it does not change the speed)."""
    from gptlab.finetune.sft import FULL_DEFAULTS, LORA_DEFAULTS

    return (LORA_DEFAULTS if mode == "lora" else FULL_DEFAULTS)["lr"]


# ----------------------------------------------------------------------------- setup (parent process)


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write the base checkpoint, its HF export, the conversations and the settings the workers read."""
    import torch

    from gptlab.chat import add_chat_tokens
    from gptlab.checkpoint import write_checkpoint_dir
    from gptlab.config import GPTConfig
    from gptlab.datasets import load_builtin
    from gptlab.hf import export_hf
    from gptlab.model import GPT, with_new_tokens
    from gptlab.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    chat_tokenizer, added = add_chat_tokens(tokenizer)
    cfg = GPTConfig(vocab_size=50304, block_size=args.seq_len, n_layer=args.layers, n_head=args.heads, n_embd=args.width)
    torch.manual_seed(args.seed)
    model = with_new_tokens(GPT(cfg), sorted(added.values()), known=tokenizer.vocab_size)
    base = work / BASE_DIR
    base.mkdir(parents=True)
    write_checkpoint_dir(base, 0, model, model.config, chat_tokenizer)
    export_hf(base, work / HF_DIR)
    if args.peer_gelu == "fused":
        path = work / HF_DIR / "config.json"
        hf_config = json.loads(path.read_text())
        hf_config["activation_function"] = "gelu_pytorch_tanh"
        path.write_text(json.dumps(hf_config, indent=2) + "\n")
    activation = json.loads((work / HF_DIR / "config.json").read_text())["activation_function"]
    rows = load_builtin("mix", "train")
    if args.rows > len(rows):
        raise SystemExit(f"error: --rows {args.rows}: builtin:mix has {len(rows)} training conversations")
    with (work / DATA_FILE).open("w") as f:
        for row in rows[: args.rows]:
            f.write(json.dumps({"messages": row["messages"]}) + "\n")
    settings = {
        "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
        "seed": args.seed, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "packing": args.packing,
    }  # fmt: skip
    (work / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_rows": model.config.vocab_size,
        "tokenizer_ids": chat_tokenizer.vocab_size,
        "hf_activation": activation,
    }


def run_worker(name: str, work: Path, threads: int, timeout: float) -> dict[str, Any]:
    """Run `--worker name` in a fresh process; its log goes to WORK/logs/NAME.log; returns its result."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONUNBUFFERED="1")  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--workdir", str(work)]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: {name} ran past --worker-timeout {timeout:.0f} s; its log: {log_path}") from None
    wall = time.perf_counter() - t0
    with log_path.open("a") as log:
        log.write(proc.stdout)
    results = [line[len(RESULT_PREFIX) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        raise SystemExit(f"error: {name} failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
    result = json.loads(results[-1])
    result["wall_s"] = wall
    return result


# ----------------------------------------------------------------------------- workers


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def worker_check(work: Path, s: dict[str, Any]) -> dict[str, Any]:
    """Tokenization and initial-loss agreement between gptlab and HF/TRL on the benchmark's data."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from gptlab.chat import ChatTemplate
    from gptlab.checkpoint import load_checkpoint
    from gptlab.finetune.sft import ConversationBatches, Encoded
    from gptlab.model import IGNORE_INDEX

    torch.set_num_threads(s["threads"])
    rows = read_rows(work)
    ckpt = load_checkpoint(work / BASE_DIR)
    template = ChatTemplate(ckpt.tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(work / HF_DIR)
    same_ids = same_masks = 0
    ours_encoded: list[tuple[list[int], list[bool]]] = []
    targets = positions = 0
    for row in rows:
        r = template.render(row["messages"])
        hf = hf_tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        same_ids += r.ids == list(hf["input_ids"])
        same_masks += r.ids == list(hf["input_ids"]) and [int(m) for m in r.mask] == list(hf["assistant_masks"])
        ours_encoded.append((r.ids, r.mask))
        targets += sum(r.mask[1:])
        positions += len(r.ids) - 1
    # the first conversations that fit one row of seq_len positions, packed as gptlab packs them
    group, used = [], 0
    for i, (ids, _) in enumerate(ours_encoded):
        if used + len(ids) - 1 > s["seq_len"]:
            break
        group.append(i)
        used += len(ids) - 1
    import numpy as np

    enc = Encoded([(np.asarray(ours_encoded[i][0]), np.asarray(ours_encoded[i][1], dtype=bool)) for i in group], [str(i) for i in group])
    x, y, seg = ConversationBatches(enc, s["seq_len"], 1, 0, packing=True).collate([list(range(len(group)))])
    model = ckpt.model.eval()
    hf_model = AutoModelForCausalLM.from_pretrained(work / HF_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = []
    for i in group:
        ids, mask = ours_encoded[i]
        examples.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]})
    # TRL's own loss path: the trainer the runs build (on these conversations), its padding-free collator and compute_loss
    args = SFTConfig(
        output_dir=str(work / "runs" / "check"), per_device_train_batch_size=1, bf16=False, use_cpu=True, gradient_checkpointing=False,
        report_to="none", max_length=s["seq_len"], packing=True, assistant_only_loss=True, disable_tqdm=True,
    )  # fmt: skip
    rows_used = Dataset.from_list([{"messages": rows[i]["messages"]} for i in group])
    trainer = SFTTrainer(model=hf_model, args=args, train_dataset=rows_used, processing_class=hf_tok)
    with torch.no_grad():
        ours = model(x, y, seg)[1].item()
        batch = trainer.data_collator(examples)  # padding-free: one row, position_ids restarting per conversation
        packed = trainer.compute_loss(trainer.model.train(), dict(batch)).item()
        trainer.model.eval()
        loss_sum, count = 0.0, 0
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            loss_sum += hf_model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return {
        "rows": len(rows), "same_ids": same_ids, "same_masks": same_masks, "target_share": targets / (positions + len(rows)),
        "mean_positions": positions / len(rows), "loss_rows": len(group), "loss_targets": int((y != IGNORE_INDEX).sum()),
        "loss_gptlab": ours, "loss_trl_packed": packed, "loss_hf_each": loss_sum / count,
    }  # fmt: skip


def worker_gptlab(work: Path, s: dict[str, Any], mode: str) -> dict[str, Any]:
    """gptlab's `sft()` on the base checkpoint; timings from the run's metrics.jsonl (one record per step)."""
    import torch

    torch.set_num_threads(s["threads"])
    from gptlab.config import TrainConfig
    from gptlab.finetune.lora import LoRAConfig, apply_lora
    from gptlab.finetune.sft import ConversationBatches, SFTConfig, build_objective, sft, start_model
    from gptlab.train import METRICS_FILE

    run_dir = work / "runs" / f"gptlab-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    total = s["warmup"] + s["steps"]
    cfg = SFTConfig(data=(str(work / DATA_FILE),), val_fraction=0.0, max_len=s["seq_len"], packing=s["packing"])
    fields = {"batch_size": s["batch_size"], "grad_accum": 1, "max_steps": total, "log_every": 1, "eval_every": 10**9,
              "save_every": 10**9, "device": "cpu", "dtype": "float32", "seed": s["seed"]}  # fmt: skip
    lora = LoRAConfig(r=s["lora_r"], alpha=s["lora_alpha"], dropout=0.0, targets=TARGETS) if mode == "lora" else None
    lines: list[str] = []
    t0 = time.perf_counter()
    result = sft(str(work / BASE_DIR), cfg, fields, run_dir, lora=lora, progress=False, report=lines.append)
    sft_s = time.perf_counter() - t0
    for line in lines:
        print(line, file=sys.stderr)
    print(f"sft() returned after {sft_s:.1f} s", file=sys.stderr)
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    records = [r for r in records if "tokens_per_s" in r]
    if [r["step"] for r in records] != list(range(1, total + 1)):
        raise RuntimeError(f"expected one metrics record per step 1..{total}, got steps {[r['step'] for r in records]}")
    # Replay the loop's batches (the same loader, seed and order) to count each step's real tokens;
    # the loop logs tokens_per_s = tokens_per_step / (time since the previous record), so that gives the step time.
    start = start_model(work / BASE_DIR)
    objective = build_objective(start.tokenizer, cfg, start.model.config.block_size, s["seed"])
    tokens_per_step = objective.tokens_per_step(TrainConfig(batch_size=s["batch_size"]), start.model.config.block_size)
    counts: list[tuple[int, int]] = []

    class Counting(ConversationBatches):
        def collate(self, groups):  # counts instead of tensors
            real = sum(self.lengths[i] for g in groups for i in g)  # a conversation of n tokens is n - 1 input positions
            width = self.block_size if self.packing else max(self.lengths[g[0]] for g in groups)
            counts.append((real + sum(len(g) for g in groups), real, len(groups) * width))
            return ()

    loader = Counting(objective.train_set, start.model.config.block_size, s["batch_size"], s["seed"], packing=s["packing"])
    for _ in range(total):
        loader.next_batch()
    step_s = [tokens_per_step / r["tokens_per_s"] for r in records]
    if sum(step_s) > sft_s:  # the records' step times must fit in the call that ran them
        raise RuntimeError(f"step times from {METRICS_FILE} ({sum(step_s):.1f} s) exceed sft()'s wall time ({sft_s:.1f} s): its tokens_per_s changed meaning")
    n_total = sum(p.numel() for p in start.model.parameters())
    n_trainable = n_total
    if lora is not None:
        apply_lora(start.model, lora, s["seed"])
        n_trainable = sum(p.numel() for p in start.model.parameters() if p.requires_grad)
    return {
        "framework": "gptlab", "mode": mode, "step_s": step_s,
        "tokens": [c[0] for c in counts], "real_positions": [c[1] for c in counts], "positions": [c[2] for c in counts], "losses": [r["loss"] for r in records],
        "peak_rss_mib": records[-1]["peak_mem_mb"], "trainable": n_trainable, "params": n_total, "target_share": objective.train_set.targets / (objective.train_set.positions + len(objective.train_set.rows)), "steps_done": result.step,
        "notes": {"optimizer": "torch AdamW (fused)", "packing": "next-fit, segments" if s["packing"] else "none, padded to the batch's longest"},
    }  # fmt: skip


def worker_trl(work: Path, s: dict[str, Any], mode: str) -> dict[str, Any]:
    """TRL's SFTTrainer (with PEFT for LoRA) on the HF export; timings from an on_step_end callback."""
    import torch

    torch.set_num_threads(s["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    total = s["warmup"] + s["steps"]
    dataset = Dataset.from_list(read_rows(work))
    tokenizer = AutoTokenizer.from_pretrained(work / HF_DIR)
    model = AutoModelForCausalLM.from_pretrained(work / HF_DIR, dtype=torch.float32, attn_implementation="sdpa")
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        # GPT-2's c_attn / c_proj / c_fc are Conv1D layers (weights stored (in, out)): fan_in_fan_out=True
        peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, target_modules=list(TARGETS),
                                 fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    out_dir = work / "runs" / f"trl-{mode}"
    args = SFTConfig(
        output_dir=str(out_dir), max_steps=total, per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        learning_rate=learning_rate(mode), weight_decay=0.0, max_grad_norm=1.0, seed=s["seed"], bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, max_length=s["seq_len"], packing=s["packing"], assistant_only_loss=True,
    )  # fmt: skip

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.rss: list[float] = []
            self.t = 0.0

        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.step_s.append(now - self.t)
            self.t = now
            self.rss.append(peak_rss_mib())

    class Recording(SFTTrainer):
        losses: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                self.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    class Counting:
        """Wraps TRL's collator to count each batch's real tokens (and the positions the model computes)."""

        def __init__(self, inner) -> None:
            self.inner = inner
            self.counts: list[tuple[int, int]] = []

        def __call__(self, examples):
            batch = self.inner(examples)
            # a conversation of n tokens is n input positions (HF shifts the labels inside the model)
            if "attention_mask" in batch:  # padded rows
                real = int(batch["attention_mask"].sum())
            else:  # padding-free: the batch's sequences end to end in one row, no padding
                real = batch["input_ids"].numel()
            self.counts.append((real, real, batch["input_ids"].numel()))
            return batch

    timer = StepTimer()
    trainer = Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    counter = Counting(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    if len(timer.step_s) != total:
        raise RuntimeError(f"TRL ran {len(timer.step_s)} steps, expected {total}")
    labels = trainer.train_dataset["labels"]
    trained = sum(sum(t != -100 for t in row) for row in labels)
    seen = sum(len(row) for row in labels)
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    packing = "none, padded to the batch's longest"
    if s["packing"]:
        packing = f"{args.packing_strategy}" + (", padding-free (position_ids)" if trainer.padding_free else "")
    return {
        "framework": "trl", "mode": mode, "step_s": timer.step_s, "tokens": [c[0] for c in counter.counts[:total]],
        "real_positions": [c[1] for c in counter.counts[:total]], "positions": [c[2] for c in counter.counts[:total]], "losses": Recording.losses, "peak_rss_mib": timer.rss[-1],
        "trainable": n_trainable, "params": n_total, "target_share": trained / seen,
        "notes": {"optimizer": str(args.optim.value if hasattr(args.optim, "value") else args.optim), "packing": packing,
                  "attention": str(trainer.model.config._attn_implementation),
                  "activation": str(getattr(trainer.model.config, "activation_function", "?"))},
    }  # fmt: skip


def worker_main(args: argparse.Namespace) -> None:
    work = args.workdir
    settings = json.loads((work / SETTINGS_FILE).read_text())
    name = args.worker
    if name == "check":
        emit(worker_check(work, settings))
        return
    framework, _, mode = name.partition("-")
    if framework not in ("gptlab", "trl") or mode not in MODES:
        raise SystemExit(f"unknown worker {name!r}")
    result = (worker_gptlab if framework == "gptlab" else worker_trl)(work, settings, mode)
    result["threads"] = __import__("torch").get_num_threads()
    emit(result)


# ----------------------------------------------------------------------------- report


def summarize(result: dict[str, Any], warmup: int) -> dict[str, float]:
    """tokens/s over the timed steps (after the warm-up) and the other per-run figures."""
    secs = result["step_s"][warmup:]
    tokens = result["tokens"][warmup:]
    return {
        "tok_s": sum(tokens) / sum(secs),
        "step_s": statistics.median(secs),
        "tokens_per_step": sum(tokens) / len(tokens),
        "fill": sum(result["real_positions"][warmup:]) / sum(result["positions"][warmup:]),
        "rss": result["peak_rss_mib"],
    }


def loss_verdict(check: dict[str, Any], tol: float = 1e-4) -> str:
    losses = [check["loss_gptlab"], check["loss_trl_packed"], check["loss_hf_each"]]
    spread = max(losses) - min(losses)
    return f"agree to {spread:.1e}" if spread <= tol else f"DISAGREE by {spread:.1e}: the two sides do not compute the same loss"


def label(framework: str, mode: str, r: int) -> tuple[str, str]:
    name = {"gptlab": "gptlab `sft()`", "trl": "TRL `SFTTrainer`" if mode == "full" else "TRL `SFTTrainer` + PEFT"}[framework]
    return name, "full" if mode == "full" else f"LoRA r={r}"


def report(args: argparse.Namespace, info: dict[str, Any], check: dict[str, Any], rounds: list[dict[tuple[str, str], dict[str, Any]]]) -> str:
    runs = list(rounds[0])
    figures = {run: [summarize(rd[run], args.warmup) for rd in rounds] for run in runs}
    med = {run: {k: statistics.median(f[k] for f in fs) for k in fs[0]} for run, fs in figures.items()}
    any_result = {run: rounds[0][run] for run in runs}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    trl_notes = next((r["notes"] for (fw, _), r in any_result.items() if fw == "trl"), {})
    gl_notes = next((r["notes"] for (fw, _), r in any_result.items() if fw == "gptlab"), {})
    threads = sorted({r["threads"] for r in any_result.values()})
    lines = [
        f"### Fine-tuning: gptlab vs TRL SFTTrainer (+ PEFT), {args.layers} layers, {args.heads} heads, {args.width} wide, "
        f"T {args.seq_len}, batch {args.batch_size}, CPU fp32",
        "",
        f"{cpu_model()}, {os.cpu_count()} cores, {'/'.join(map(str, threads))} torch thread(s) per run; {date}; Python {platform.python_version()}, "
        f"torch {version('torch')}, transformers {version('transformers')}, trl {version('trl')}, peft {version('peft')}, "
        f"datasets {version('datasets')}",
        "",
        f"Model: {info['params'] / 1e6:.2f}M parameters, random init (seed {args.seed}), GPT-2 BPE + ChatML tokens "
        f"({info['tokenizer_ids']} ids, {info['vocab_rows']} rows); TRL loads gptlab's `export_hf` copy as GPT2LMHeadModel "
        f"(attention {trl_notes.get('attention', '?')}, activation {info['hf_activation']}). Data: the first {check['rows']} "
        f"conversations of builtin:mix (mean {check['mean_positions'] + 1:.1f} tokens, {check['target_share']:.1%} of them "
        f"assistant targets), loss on the assistant's tokens. Packing: gptlab {gl_notes.get('packing', '?')}; TRL "
        f"{trl_notes.get('packing', '?')}. Optimizer: gptlab {gl_notes.get('optimizer', '?')}, TRL {trl_notes.get('optimizer', '?')}.",
        "",
        f"Each run in its own process, {args.warmup} warm-up + {args.steps} timed steps, median of {len(rounds)} round(s). "
        "tokens/s = tokens of the conversations in the timed steps' batches / the steps' wall time (step end to step end: "
        "batch, forward, backward, clip, optimizer); padding is not counted. fill = real positions / positions computed "
        "(gptlab computes its packed rows' padding; TRL's padding-free batches have none). Peak RSS = the process's "
        "ru_maxrss at the end of its last step (setup included).",
        "",
        "| framework | mode | tokens/s | gptlab / peer | peak RSS MiB | gptlab / peer | s/step | tokens/step | fill | trained params | loss step 1 → last |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    goals = []
    for mode in args.modes:
        ours, peer = med.get(("gptlab", mode)), med.get(("trl", mode))
        for fw in ("gptlab", "trl"):
            run = (fw, mode)
            if run not in med:
                continue
            m, res = med[run], any_result[run]
            name, mode_name = label(fw, mode, args.lora_r)
            speed = f"{ours['tok_s'] / peer['tok_s']:.2f}x" if fw == "gptlab" and ours and peer else ""
            mem = f"{ours['rss'] / peer['rss']:.2f}x" if fw == "gptlab" and ours and peer else ""
            losses = res["losses"]
            lines.append(
                f"| {name} | {mode_name} | {m['tok_s']:,.0f} | {speed} | {m['rss']:,.0f} | {mem} | {m['step_s']:.2f} | "
                f"{m['tokens_per_step']:,.0f} | {m['fill']:.0%} | {res['trainable']:,} | {losses[0]:.3f} → {losses[-1]:.3f} |"
            )
        if ours and peer:
            ratio = ours["tok_s"] / peer["tok_s"]
            goals.append(f"{'full' if mode == 'full' else 'LoRA'} tokens/s ≥ 2x the peer: {'met' if ratio >= 2 else 'not met'} ({ratio:.2f}x)")
            if mode == "lora":
                mem = ours["rss"] / peer["rss"]
                goals.append(f"LoRA peak RSS ≤ PEFT's: {'met' if mem <= 1 else 'not met'} ({mem:.2f}x)")
    if len(rounds) > 1:
        lines += ["", "tokens/s per round: " + "; ".join(
            f"{' '.join(label(fw, mode, args.lora_r))} " + ", ".join(f"{f['tok_s']:,.0f}" for f in figures[(fw, mode)]) for fw, mode in runs
        )]  # fmt: skip
    lines += ["", "Goals: " + "; ".join(goals) + "." if goals else ""]
    ok_tok = check["same_ids"] == check["rows"] and check["same_masks"] == check["rows"]
    lines += [
        "",
        f"Checks: gptlab's chat template and HF's apply_chat_template (TRL's tokenization) give identical ids for "
        f"{check['same_ids']}/{check['rows']} conversations and identical assistant masks for {check['same_masks']}/{check['rows']}"
        f"{'' if ok_tok else ' (differences: see gptlab.chat, content starting with 2+ whitespace characters)'}. "
        f"Untrained loss on the first {check['loss_rows']} conversations packed in one row ({check['loss_targets']} targets): "
        f"gptlab {check['loss_gptlab']:.5f}, TRL (its padding-free collator and compute_loss) {check['loss_trl_packed']:.5f}, "
        f"HF one conversation at a time {check['loss_hf_each']:.5f} ({loss_verdict(check)}). Trained (assistant) share of the training data's tokens: "
        + ", ".join(f"{fw} {r['target_share']:.2%}" for (fw, mode), r in any_result.items() if mode == args.modes[0])
        + " (TRL's assistant mask is not empty). Step-1 losses differ only because the two sides' batches hold different conversations.",
        "",
        "Rerun: `" + shlex.join(["python", "benchmarks/finetune.py", *sys.argv[1:]]) + "`",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker_main(args)
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit('error: TRL is not installed: pip install -e ".[bench]" (check with --dry-run that torch stays as it is)') from None
    keep = args.workdir is not None
    work = args.workdir.resolve() if keep else Path(tempfile.mkdtemp(prefix="gptlab-finetune-bench-"))
    if keep:
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"error: --workdir {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        print(f"setting up in {work} ...", flush=True)
        info = prepare(args, work)
        check = run_worker("check", work, args.threads, args.worker_timeout)
        print(f"check: ids identical {check['same_ids']}/{check['rows']}, masks {check['same_masks']}/{check['rows']}; untrained loss "
              f"gptlab {check['loss_gptlab']:.5f} / TRL packed {check['loss_trl_packed']:.5f} / HF each {check['loss_hf_each']:.5f}: {loss_verdict(check)}", flush=True)  # fmt: skip
        rounds = []
        for r in range(args.repeats):
            results: dict[tuple[str, str], dict[str, Any]] = {}
            for mode in args.modes:
                order = ("gptlab", "trl") if r % 2 == 0 else ("trl", "gptlab")
                for fw in order:
                    name = f"{fw}-{mode}"
                    res = run_worker(name, work, args.threads, args.worker_timeout)
                    results[(fw, mode)] = res
                    f = summarize(res, args.warmup)
                    print(f"round {r + 1}/{args.repeats} {name}: {f['tok_s']:,.0f} tok/s, {f['step_s']:.2f} s/step, peak RSS "
                          f"{f['rss']:,.0f} MiB, loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f} ({res['wall_s']:.0f} s in all)", flush=True)  # fmt: skip
                    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # gptlab's final checkpoint
            rounds.append(dict(sorted(results.items(), key=lambda kv: (args.modes.index(kv[0][1]), kv[0][0] != "gptlab"))))
        text = report(args, info, check, rounds)
        print(f"\n(total {time.perf_counter() - t_start:.0f} s)\n")
        print(text)
        if args.out is not None:
            with args.out.open("a", encoding="utf-8") as f:
                f.write(text + "\n")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
