"""Alignment speed, memory and held-out quality: gptlab's DPO, GRPO and reward-model training against TRL's
DPOTrainer, GRPOTrainer and RewardTrainer, on the same model, data and settings, on the CPU in float32.

The model (made once, before the runs):

* Tokenizer: GPT-2's BPE (shipped with gptlab) plus the ChatML tokens <|im_start|> / <|im_end|>
  (ids 50257, 50258; the table is padded to 50304 rows), as in benchmarks/finetune.py: aligned
  models start from pretrained ones, whose vocabularies are that large, and the output layer is
  where DPO's and GRPO's log-probabilities are computed (at 4 layers x 256 wide it is four fifths
  of the FLOPs, so how each side computes log-softmax over 50k ids matters). `--tokenizer bpe`
  instead trains a small byte-level BPE (--vocab ids, default 1024, with <|endoftext|> and the
  ChatML tokens as its last ids) on the text of the built-in "mix" conversations: a model ~5x
  cheaper per token, whose steps are small enough that per-step framework overhead and the
  transformer blocks dominate (the --quick smoke run uses it, 512 ids).
* Model: GPT-2 shaped (default 4 layers, 4 heads, 256 wide, context 256), random init (seed),
  then gptlab's `sft()` on builtin:arithmetic (--sft-steps steps of --sft-batch-size packed rows
  at --sft-lr, cosine to a tenth): no pretrained weights can be downloaded, and GRPO needs a
  policy whose exact-match rewards are not all zero, so the SFT teaches it to answer "What is
  94 - 37?" with a number and <|im_end|> (a short SFT: right 1-2% of the time greedily, so some
  groups of 8 samples at temperature 1 hold a rewarded reply).
  That checkpoint is the start of every run: exported once with `gptlab.hf.export_hf` (the
  GPT2LMHeadModel TRL's DPO and GRPO load; its chat template has {% generation %} markers, its
  generation_config stops at [<|im_end|>, <|endoftext|>]). The reward model's start is the same
  checkpoint with the head `gptlab.align.reward.train_reward` adds (a bias-free Linear to one
  output, drawn from the run's seed), exported with `gptlab.finetune.heads.export_task_hf`
  (GPT2ForSequenceClassification, num_labels 1, pad token <|im_start|>, which never ends a
  conversation, so HF pools the last token as gptlab does). Both sides start from identical
  weights (see the checks).

Data: preference pairs are the first --train-pairs pairs of the built-in --pairs set (default
mix: arithmetic, sorting, spelling and stdlib questions, a correct and a near-miss answer) and
the first --eval-pairs of its test split as the held-out pairs, written once as JSONL
{"prompt": [messages], "chosen": [assistant message], "rejected": [...]} that both sides read
(gptlab through DPOConfig / RewardConfig data and val_data, TRL as a conversational
`datasets.Dataset`). GRPO trains on builtin:arithmetic's 4000 training prompts ({"prompt":
[messages], "answer"}, the same JSONL on both sides) and is scored on the first --eval-prompts
test prompts. One Python reward function file (written to the work directory) serves both:
1.0 when the reply equals the answer (`gptlab.datasets.exact_match`), else 0.0; gptlab loads it
as `py:FILE.py:gptlab_exact` (per sample, with the row's answer as `reference`), TRL calls
`trl_exact(prompts, completions, answer, completion_ids, **kwargs)` with the answer column.

Same batches on both sides: TRL is given the training rows in the order gptlab's own loader draws
them with the run's seed (gptlab.align.pairs.PairBatches for pairs, gptlab.align.rl.PromptCursor
for prompts), with its shuffling off (`train_sampling_strategy="sequential"`; GRPO
`shuffle_dataset=False`, whose RepeatSampler then takes P prompts in order, G times each). So
step k holds the same pairs (or prompts) in both frameworks: per-step cost compares like for
like although the pairs' lengths vary (padding is to each batch's longest), and the held-out
results differ only by what the frameworks do. The report checks it batch by batch.

What each side runs (lr, min lr, Adam betas (0.9, 0.95), eps 1e-8, weight decay 0, gradient
clipping 1.0, seed and threads alike; gptlab's cosine schedule from --lr to --min-lr with no
warm-up is TRL's `cosine_with_min_lr` with warmup_steps 0, the same formula):

* DPO. gptlab: `gptlab.align.dpo.dpo()` (sigmoid loss, --dpo-beta), --batch-size pairs per
  step, max_len --seq-len; reference log-probs are computed once, before training, and looked
  up per batch. TRL: `DPOTrainer` with `DPOConfig(loss_type=["sigmoid"], beta,
  per_device_train_batch_size=--batch-size, gradient_accumulation_steps=1, max_length=--seq-len,
  precompute_ref_log_probs=True, precompute_ref_batch_size=16)`, so it also computes the
  reference once (and keeps no reference model); `gradient_checkpointing=False` (TRL's default is
  True; gptlab does not checkpoint), `bf16=False`, `use_cpu=True`, no logging, saving or
  evaluation during training (the held-out pairs' reference log-probs are precomputed at
  construction, as gptlab computes them before training). TRL's completion is everything after
  the generation prompt, so it also scores the "\\n" after <|im_end|> (one token per reply that
  gptlab's mask leaves out: the check below shows the two agree exactly once that token is added).
* GRPO. gptlab: `gptlab.align.grpo.grpo()`, --prompts-per-step P prompts x --group-size G
  replies per step, sampled by gptlab's KV-cached batched Engine (<= --max-new-tokens tokens,
  --temperature, no top-k/top-p, stop at <|im_end|> or <|endoftext|>), one update per rollout,
  clip 0.2, KL penalty --grpo-beta (k3) to the frozen starting policy. TRL: `GRPOTrainer` with
  `GRPOConfig(per_device_train_batch_size=P*G, gradient_accumulation_steps=1,
  steps_per_generation=1, num_generations=G, max_completion_length=--max-new-tokens,
  temperature, top_p=1.0, top_k=0, beta=--grpo-beta, epsilon=0.2, num_iterations=1,
  loss_type="grpo", scale_rewards="group", use_bias_correction_kl=False)`: TRL counts its batch
  in completions, so one optimizer step is one generation batch of P prompts x G completions,
  exactly gptlab's step. It generates with HF `generate` (no vLLM on a CPU): one left-padded
  batch of all P*G rows, a DynamicCache, stopping at the tokenizer's eos and the export's
  generation_config eos ids [<|im_end|>, <|endoftext|>], the same stop rule and the same
  maximum length as gptlab. "grpo" is the loss gptlab computes (per-token clipped surrogate + beta
  k3, averaged over each reply's tokens, then over replies); use_bias_correction_kl=False keeps
  TRL's KL term gptlab's (TRL's default multiplies it by the importance ratio). Differences that
  remain: TRL standardises rewards with the sample standard deviation, gptlab with the
  population one (both + 1e-4); the samples themselves differ (each side's own random
  streams); and with one update per rollout gptlab still runs a no-grad forward for the "old"
  log-probs, which TRL takes from the policy's own forward (num_iterations=1).
* Reward model. gptlab: `gptlab.align.reward.train_reward()` (Bradley-Terry, no margin or
  centring), --batch-size pairs, max_len --seq-len; its batches store each pair's shared start
  once with the two replies as branches after it, pairs packed in rows of up to --seq-len tokens
  (the rewards are those of each conversation alone), and the token table's gradient is built
  from the looked-up rows; TRL pads the 2 x batch conversations to the longest. TRL: `RewardTrainer` on the exported
  sequence-classification model (`AutoModelForSequenceClassification`, num_labels 1; the
  tokenizer's pad token is <|im_start|>), `RewardConfig(per_device_train_batch_size=--batch-size,
  max_length=--seq-len, center_rewards_coefficient=None)`, the same other settings as DPO.

How it is measured. Each run (method x framework) is its own process, so peak RSS is that run's
alone; runs go one after another (gptlab then TRL for each method, the order flipped on every
other repeat), and the table gives the median over --repeats. A run takes --warmup untimed steps
(at least 1), then the timed ones. Step time is wall time from the end of one optimizer step to
the end of the next, with everything the framework does in it: for GRPO that is sampling,
rewards, the reference and policy passes, backward and the optimizer step. gptlab's step ends
when its loop writes the step's metrics.jsonl record (its own bookkeeping; the benchmark
timestamps that write), TRL's at an on_step_end callback. GRPO's sampling share of the step is the
time in gptlab's `sample_replies` and in the HF `generate` call TRL makes. Evaluation and checkpoints happen
after the last timed step on both sides. Peak RSS is ru_maxrss at the end of the run's last
training step (setup included). "process s" is the run's whole process: imports, loading,
data preparation, reference log-probs (gptlab's over all --train-pairs, TRL's over the pairs
it will draw), the timed steps and the held-out evaluation. The threads are the same on both sides (torch.set_num_threads
and OMP_NUM_THREADS).

Held-out quality after the same number of steps (both sides scored alike): DPO, the implicit
reward accuracy (the share of held-out pairs whose chosen reply gets the larger
beta * log(pi / pi_ref)) and margin: gptlab's end-of-run evaluation, and TRL's `evaluate()` on
the same pairs (their reference log-probs precomputed before training); reward model, the
held-out pairwise accuracy, from the same two sources; GRPO, the mean exact-match reward of
greedy replies to the held-out prompts, both policies scored by gptlab's engine (the TRL model
is saved with `save_model` and read back with `gptlab.hf.load_hf`), beside the starting policy's.

Checks before the runs (their own process): the chat template gives identical ids on both sides
for every pair and prompt; DPO reference log-probs: TRL's precomputed values against gptlab's
for the same pairs, with and without the trailing "\\n"; the reward model's initial rewards on the
same pairs through TRL's collator and gptlab's model; greedy replies of HF `generate` (TRL's
left-padded batch and stop ids) against gptlab's engine; parameter counts. From the runs: DPO's
first loss is log 2 on both sides (policy = reference).

    python benchmarks/align.py [--methods dpo grpo rm] [--steps 40] [--grpo-steps 30] [--warmup 2] [--batch-size 8]
                               [--group-size 8] [--prompts-per-step 4] [--max-new-tokens 16] [--repeats 1] [--quick] [--out results.md]

TRL is a benchmark-only dependency: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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

RESULT_PREFIX = "ALIGN_RESULT "
SETTINGS_FILE = "settings.json"
INIT_DIR = "init"  # random init (gptlab checkpoint)
SFT_DIR = "sft"  # gptlab sft() run on builtin:arithmetic: the start of every run
HF_DIR = "hf"  # its export_hf copy (TRL's DPO and GRPO)
RM_INIT_DIR = "rm-init"  # the SFT checkpoint with a fresh reward head
HF_RM_DIR = "hf-rm"  # its export_task_hf copy (TRL's RewardTrainer)
PAIRS_TRAIN, PAIRS_TEST = "pairs_train.jsonl", "pairs_test.jsonl"
PROMPTS_TRAIN, PROMPTS_TEST = "prompts_train.jsonl", "prompts_test.jsonl"
REWARD_FILE = "rewards.py"
METHODS = ("dpo", "grpo", "rm")
METHOD_NAMES = {"dpo": "DPO", "grpo": "GRPO", "rm": "reward model"}
GOALS = {"dpo": 2.0, "grpo": 3.0, "rm": 2.0}  # gptlab steps/s over TRL's
CLIP = 0.2
QUICK = {
    "layers": 2, "heads": 2, "width": 128, "seq_len": 128, "tokenizer": "bpe", "vocab": 512, "sft_steps": 30, "sft_batch_size": 8, "steps": 3,
    "grpo_steps": 2, "warmup": 1, "train_pairs": 64, "eval_pairs": 32, "eval_prompts": 32, "group_size": 4, "prompts_per_step": 2,
    "max_new_tokens": 8,
}  # fmt: skip

REWARD_SOURCE = '''"""Exact-match reward for the alignment benchmark: 1.0 when the reply is the prompt's answer, else 0.0.

gptlab calls gptlab_exact once per sample (py:rewards.py:gptlab_exact); TRL calls trl_exact once per
generation batch with the dataset's "answer" column. Both compare with gptlab.datasets.exact_match.
"""

from gptlab.datasets import exact_match

CALLS = []  # one (completions, completion tokens, mean reward, the group prompts' last messages) per TRL call


def gptlab_exact(prompt, completion, reference=None):
    return 1.0 if reference is not None and exact_match(completion, reference) else 0.0


def trl_exact(prompts, completions, answer, completion_ids=None, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    rewards = [1.0 if exact_match(t, a) else 0.0 for t, a in zip(texts, answer)]
    groups = [p[-1]["content"] if isinstance(p, list) else p for k, p in enumerate(prompts) if k == 0 or p != prompts[k - 1]]
    CALLS.append((len(rewards), sum(len(ids) for ids in completion_ids or []), sum(rewards) / max(len(rewards), 1), groups))
    return rewards
'''


# ----------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per DPO and reward-model run")
    p.add_argument("--grpo-steps", type=int, default=30, help="timed optimizer steps per GRPO run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run before the timed ones (>= 1)")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per DPO / reward-model step")
    p.add_argument("--group-size", type=int, default=8, help="GRPO replies per prompt (TRL's num_generations)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="GRPO prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=16, help="GRPO reply length cap (TRL's max_completion_length)")
    p.add_argument("--temperature", type=float, default=1.0, help="GRPO sampling temperature")
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--grpo-beta", type=float, default=0.04, help="GRPO's KL coefficient (gptlab's default)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of every run (gptlab's RLHF demo's for this model size)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--seq-len", type=int, default=256, help="the model's context; DPO / reward max_len (gptlab) and max_length (TRL)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=256, help="n_embd")
    p.add_argument("--tokenizer", choices=("gpt2", "bpe"), default="gpt2", help="gpt2: GPT-2's + ChatML tokens (50304 rows); bpe: trained on builtin:mix's text (--vocab ids)")
    p.add_argument("--vocab", type=int, default=1024, help="ids of the trained BPE tokenizer (--tokenizer bpe), specials included")
    p.add_argument("--sft-steps", type=int, default=150, help="steps of the starting SFT on builtin:arithmetic")
    p.add_argument("--sft-batch-size", type=int, default=4, help="packed rows of --seq-len positions per SFT step")
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--pairs", choices=("mix", "arithmetic", "sorting", "spelling", "stdlib"), default="mix", help="built-in preference set")
    p.add_argument("--train-pairs", type=int, default=512, help="training pairs: the first N of the set's train split")
    p.add_argument("--eval-pairs", type=int, default=400, help="held-out pairs: the first N of its test split")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out GRPO prompts: the first N of builtin:arithmetic's test split")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all runs; the table gives the median")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every run (default: all cores)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--workdir", type=Path, help="keep the model, data and run logs here (default: a temporary directory, removed at the end)")
    p.add_argument("--worker-timeout", type=float, default=1200, help="seconds before a run's process is stopped")
    p.add_argument("--out", type=Path, help="append the markdown report to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = p.parse_args(argv)
    if args.worker is not None:
        return args
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    positive = ("steps", "grpo_steps", "warmup", "batch_size", "prompts_per_step", "max_new_tokens", "seq_len", "layers", "heads", "width",
                "sft_steps", "sft_batch_size", "train_pairs", "eval_pairs", "eval_prompts", "repeats", "threads")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.group_size < 2:
        p.error(f"--group-size must be at least 2 (advantages compare replies within a group), got {args.group_size}")
    if args.width % args.heads:
        p.error(f"--width ({args.width}) must be divisible by --heads ({args.heads})")
    if args.tokenizer == "bpe" and not 259 <= args.vocab <= 8192:
        p.error(f"--vocab must be in 259..8192 (256 bytes + 3 special tokens), got {args.vocab}")
    if not args.temperature > 0:
        p.error(f"--temperature must be positive, got {args.temperature}")
    args.methods = [m for m in METHODS if m in args.methods]
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def eval_batch_size(n: int, cap: int = 16) -> int:
    """The largest divisor of n up to cap: TRL's evaluate() averages per-batch means, exact only when the batches are equal."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def optimizer_fields(s: dict[str, Any]) -> dict[str, Any]:
    """gptlab TrainConfig fields every run shares (the TRL configs get the same values)."""
    return {"lr": s["lr"], "min_lr": s["min_lr"], "warmup_steps": 0, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
            "device": "cpu", "seed": s["seed"]}  # fmt: skip


def trl_common(s: dict[str, Any], out_dir: Path, total: int) -> dict[str, Any]:
    """TrainingArguments every TRL run shares: gptlab's optimizer and schedule, no logging, saving or evaluation."""
    return {
        "output_dir": str(out_dir), "max_steps": total, "gradient_accumulation_steps": 1, "learning_rate": s["lr"],
        "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": s["min_lr"]}, "warmup_steps": 0, "weight_decay": 0.0,
        "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "seed": s["seed"], "bf16": False, "fp16": False,
        "use_cpu": True, "gradient_checkpointing": False, "report_to": "none", "logging_strategy": "no", "save_strategy": "no",
        "eval_strategy": "no", "dataloader_num_workers": 0, "disable_tqdm": True,
    }  # fmt: skip


def pair_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Built-in preference rows as conversational pairs, the replies as assistant messages (TRL needs lists to concatenate)."""
    return [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]  # fmt: skip


# ----------------------------------------------------------------------------- workers: timing hooks


class GptlabRecords:
    """Timestamps every metrics.jsonl record gptlab's loops write (train.MetricsLog.write): a step ends when its record is written."""

    def __init__(self) -> None:
        from gptlab import train

        self.records: list[tuple[float, dict[str, Any], float]] = []  # (perf_counter, record, peak RSS MiB)
        original = train.MetricsLog.write
        outer = self

        def write(log: Any, record: dict[str, Any]) -> None:
            original(log, record)
            outer.records.append((time.perf_counter(), dict(record), peak_rss_mib()))

        train.MetricsLog.write = write  # type: ignore[method-assign]

    def steps(self, total: int) -> tuple[list[float], list[dict[str, Any]], float]:
        """(step times from the second step on (the first has no start mark), the step records, peak RSS at the last step)."""
        steps = [(t, r, rss) for t, r, rss in self.records if "loss" in r and "step" in r]
        if [r["step"] for _, r, _ in steps] != list(range(1, total + 1)):
            raise RuntimeError(f"expected one metrics record per step 1..{total}, got steps {[r['step'] for _, r, _ in steps]}")
        times = [t for t, _, _ in steps]
        return [b - a for a, b in zip(times, times[1:])], [r for _, r, _ in steps], steps[-1][2]

    def val(self) -> dict[str, float]:
        """The last held-out evaluation record, without the "val_" prefix."""
        vals = [r for _, r, _ in self.records if any(k.startswith("val_") for k in r)]
        return {k[4:]: v for k, v in vals[-1].items() if k.startswith("val_")} if vals else {}


def record_gptlab_batches(method: str) -> dict[str, list]:
    """Patches gptlab's training-batch and prompt streams, and GRPO's sampling, to record what each step took and how long sampling ran."""
    seen: dict[str, list] = {"batches": [], "gen_s": []}
    if method == "grpo":
        from gptlab.align import grpo, rl

        take, sample = rl.PromptCursor.take, grpo.sample_replies

        def taking(cursor: Any, k: int) -> list[int]:
            out = take(cursor, k)
            seen["batches"].append(list(out))
            return out

        def sampling(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = sample(*a, **k)
            seen["gen_s"].append(time.perf_counter() - t0)
            return out

        rl.PromptCursor.take = taking  # type: ignore[method-assign]
        grpo.sample_replies = sampling  # type: ignore[assignment]
    else:
        from gptlab.align import pairs

        next_batch = pairs.PairBatches.next_batch

        def batch(loader: Any) -> Any:
            out = next_batch(loader)
            if not loader.exact:  # a training batch (evaluation loaders are exact)
                seen["batches"].append([fingerprint(loader.data.chosen[i][0].tolist()) for i in out[-1].tolist() if i >= 0])
            return out

        pairs.PairBatches.next_batch = batch  # type: ignore[method-assign]
    return seen


def fingerprint(ids: list[int]) -> int:
    """A pair's identity across processes: the hash of its chosen side's full token ids (int tuples hash alike in every process)."""
    return hash(tuple(int(i) for i in ids))


def gptlab_order(work: Path, s: dict[str, Any], method: str, n_rows: int, total: int) -> list[int]:
    """The rows gptlab's run draws at steps 1..total, in order: its own loader (PairBatches) or prompt cursor with the run's seed,
    so that TRL, given these rows in this order with shuffling off, trains on the same batches."""
    if method == "grpo":
        from gptlab.align.rl import PromptCursor

        cursor = PromptCursor(n_rows, s["seed"])
        return [i for _ in range(total) for i in cursor.take(s["prompts_per_step"])]
    from gptlab.align.pairs import PairBatches, encode_pairs, load_pairs
    from gptlab.align.reward import encode_reward_pairs
    from gptlab.chat import ChatTemplate
    from gptlab.checkpoint import load_checkpoint

    template = ChatTemplate(load_checkpoint(work / SFT_DIR).tokenizer)
    encode = encode_pairs if method == "dpo" else encode_reward_pairs
    enc = encode(template, load_pairs(str(work / PAIRS_TRAIN)), s["seq_len"])
    if len(enc) != n_rows:  # the order is a permutation of the encoded pairs: it must be all of them
        raise RuntimeError(f"gptlab keeps {len(enc)} of the {n_rows} training pairs within max_len {s['seq_len']}; raise --seq-len")
    loader = PairBatches(enc, s["batch_size"], s["seed"])
    return [i for _ in range(total) for i in loader.next_batch()[-1].tolist()]


def trl_timer():
    from transformers import TrainerCallback

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

    return StepTimer()


def recording(cls):
    """A TRL trainer subclass that keeps every training step's loss."""

    class Recording(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.losses: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                self.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    return Recording


def counting_collator(inner, method: str):
    """Wraps a TRL collator to record each training batch's pairs (their fingerprints)."""

    class Counting:
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        def __call__(self, examples):
            key = (lambda e: e["prompt_ids"] + e["chosen_ids"]) if method == "dpo" else (lambda e: e["chosen_ids"])
            self.batches.append([fingerprint(key(e)) for e in examples])
            return inner(examples)

    return Counting()


# ----------------------------------------------------------------------------- workers: setup


def worker_prepare(work: Path, s: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer, random model, its SFT on builtin:arithmetic, the two HF exports, the data files and the reward file."""
    import torch

    torch.set_num_threads(s["threads"])
    from gptlab.chat import CHAT_TOKENS, ChatTemplate, add_chat_tokens
    from gptlab.checkpoint import HEAD_KEY, load_checkpoint, write_checkpoint_dir
    from gptlab.config import GPTConfig
    from gptlab.datasets import load_builtin, load_preferences, load_prompts
    from gptlab.finetune.heads import HeadSpec, TaskModel, export_task_hf
    from gptlab.finetune.sft import SFTConfig, sft
    from gptlab.hf import export_hf
    from gptlab.model import GPT, with_new_tokens
    from gptlab.tokenizer import EOT, Tokenizer, load_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(s["seed"])
    if s["tokenizer"] == "gpt2":
        base_tok = load_tokenizer("gpt2")
        tokenizer, added = add_chat_tokens(base_tok)
        cfg = GPTConfig(vocab_size=50304, block_size=s["seq_len"], n_layer=s["layers"], n_head=s["heads"], n_embd=s["width"], dropout=0.0)
        model = with_new_tokens(GPT(cfg), sorted(added.values()), known=base_tok.vocab_size)
    else:
        texts = [m["content"] for row in load_builtin("mix", "train") for m in row["messages"]]
        tokenizer = Tokenizer.train(texts, s["vocab"], special_tokens=(EOT, *CHAT_TOKENS), progress=False)
        rows = -(-s["vocab"] // 64) * 64  # the token table padded to a multiple of 64, as gptlab pads GPT-2's
        cfg = GPTConfig(vocab_size=rows, block_size=s["seq_len"], n_layer=s["layers"], n_head=s["heads"], n_embd=s["width"], dropout=0.0)
        model = GPT(cfg)
    tok_s = time.perf_counter() - t0
    (work / INIT_DIR).mkdir()
    write_checkpoint_dir(work / INIT_DIR, 0, model, model.config, tokenizer)

    # the starting policy: a short SFT on arithmetic, so that GRPO's exact-match rewards are not all zero
    t0 = time.perf_counter()
    fields = {"batch_size": s["sft_batch_size"], "max_steps": s["sft_steps"], "lr": s["sft_lr"], "min_lr": s["sft_lr"] / 10, "weight_decay": 0.0, "log_every": 10,
              "eval_every": 10**9, "save_every": 10**9, "device": "cpu", "seed": s["seed"]}  # fmt: skip
    lines: list[str] = []
    result = sft(str(work / INIT_DIR), SFTConfig(data=("builtin:arithmetic",)), fields, work / SFT_DIR, progress=False, report=lines.append)
    sft_s = time.perf_counter() - t0
    sft_log = read_jsonl(work / SFT_DIR / "metrics.jsonl")
    sft_losses = [r["loss"] for r in sft_log if "loss" in r]
    base = load_checkpoint(work / SFT_DIR)
    export_hf(work / SFT_DIR, work / HF_DIR)
    spec = HeadSpec("reward", None, 0.0)  # what train_reward builds: RewardConfig's head_dropout 0, the head drawn from the run's seed
    rm = TaskModel.from_gpt(base.model, spec, s["seed"])
    (work / RM_INIT_DIR).mkdir()
    write_checkpoint_dir(work / RM_INIT_DIR, 0, rm, rm.config, base.tokenizer, extra_meta={HEAD_KEY: spec.to_dict()})
    export_task_hf(work / RM_INIT_DIR, work / HF_RM_DIR)

    train_pairs = load_preferences(s["pairs"], "train")[: s["train_pairs"]]
    test_pairs = load_preferences(s["pairs"], "test")[: s["eval_pairs"]]
    write_jsonl(work / PAIRS_TRAIN, pair_rows(train_pairs))
    write_jsonl(work / PAIRS_TEST, pair_rows(test_pairs))
    write_jsonl(work / PROMPTS_TRAIN, [{"prompt": r["prompt"], "answer": r["answer"]} for r in load_prompts("arithmetic", "train")])
    test_prompts = load_prompts("arithmetic", "test")[: s["eval_prompts"]]
    write_jsonl(work / PROMPTS_TEST, [{"prompt": r["prompt"], "answer": r["answer"]} for r in test_prompts])
    (work / REWARD_FILE).write_text(REWARD_SOURCE)

    template = ChatTemplate(base.tokenizer)
    start_eval = greedy_eval(base.model, template, read_jsonl(work / PROMPTS_TEST), s["max_new_tokens"])
    lengths = [len(template.render(r["prompt"] + r[side]).ids) for r in pair_rows(train_pairs) for side in ("chosen", "rejected")]
    return {
        "tokenizer": base.tokenizer.name, "tokenizer_ids": base.tokenizer.vocab_size, "vocab_rows": base.model.config.vocab_size,
        "params": sum(p.numel() for p in base.model.parameters()), "tokenizer_s": tok_s, "sft_s": sft_s, "sft_steps": result.step,
        "sft_loss_first": sft_losses[0], "sft_loss_last": sft_losses[-1], "sft_val": result.val or {}, "start_eval": start_eval,
        "n_train_pairs": len(train_pairs), "n_test_pairs": len(test_pairs), "n_test_prompts": len(test_prompts),
        "pair_tokens_mean": statistics.mean(lengths), "pair_tokens_max": max(lengths),
        "hf_activation": json.loads((work / HF_DIR / "config.json").read_text())["activation_function"],
    }  # fmt: skip


def greedy_eval(model: Any, template: Any, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, float]:
    """Mean exact-match reward of the model's greedy replies to the prompt rows (gptlab's engine), and their mean length."""
    from gptlab.chat import reply_all
    from gptlab.config import SampleConfig
    from gptlab.datasets import exact_match
    from gptlab.generate import Engine

    model.eval()
    engine = Engine(model, template.tokenizer, onednn=False)
    replies = reply_all(engine, template, [r["prompt"] for r in rows], SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    rewards = [1.0 if exact_match(reply, r["answer"]) else 0.0 for reply, r in zip(replies, rows, strict=True)]
    tokens = [len(template.tokenizer.encode_ordinary(reply)) for reply in replies]
    return {"reward": sum(rewards) / len(rewards), "reply_tokens": sum(tokens) / len(tokens), "prompts": len(rows)}


def worker_check(work: Path, s: dict[str, Any]) -> dict[str, Any]:
    """Both sides see the same ids, reference log-probs, initial rewards, greedy replies and parameter counts."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from gptlab.align.pairs import encode_pairs, load_pairs
    from gptlab.chat import ChatTemplate
    from gptlab.checkpoint import load_checkpoint
    from gptlab.config import SampleConfig
    from gptlab.finetune.heads import HeadSpec, TaskModel
    from gptlab.generate import Engine

    torch.set_num_threads(s["threads"])
    base = load_checkpoint(work / SFT_DIR)
    model = base.model.eval()
    template = ChatTemplate(base.tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(work / HF_DIR)
    out: dict[str, Any] = {}

    # 1. the chat template: every pair side and every GRPO prompt
    pairs = read_jsonl(work / PAIRS_TRAIN) + read_jsonl(work / PAIRS_TEST)
    same = total = 0
    for row in pairs:
        for side in ("chosen", "rejected"):
            ids = hf_tok.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True)["input_ids"]
            same += template.render(row["prompt"] + row[side]).ids == list(ids)
            total += 1
    out["pair_ids_same"], out["pair_ids_total"] = same, total
    prompts = read_jsonl(work / PROMPTS_TRAIN) + read_jsonl(work / PROMPTS_TEST)
    same = 0
    for row in prompts:
        ids = hf_tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        same += template.generation_prompt(row["prompt"]) == list(ids)
    out["prompt_ids_same"], out["prompt_ids_total"] = same, len(prompts)

    # 2. DPO reference log-probs of the first pairs: TRL's precomputed values vs gptlab's (reply + <|im_end|>), and with the "\n" after it
    n = min(32, s["train_pairs"])
    first = read_jsonl(work / PAIRS_TRAIN)[:n]
    hf_model = AutoModelForCausalLM.from_pretrained(work / HF_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    args = DPOConfig(**trl_common(s, work / "runs" / "check-dpo", 1), per_device_train_batch_size=8, max_length=s["seq_len"], beta=s["dpo_beta"],
                     precompute_ref_log_probs=True, precompute_ref_batch_size=16)  # fmt: skip
    trainer = DPOTrainer(model=hf_model, args=args, train_dataset=Dataset.from_list(first), processing_class=hf_tok)
    trl_ref = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in trainer.train_dataset], dtype=torch.float64)
    enc = encode_pairs(template, load_pairs(str(work / PAIRS_TRAIN))[:n], s["seq_len"])
    ours = torch.empty(n, 2, dtype=torch.float64)
    ours_nl = torch.empty(n, 2, dtype=torch.float64)
    with torch.no_grad():
        for side, seqs in enumerate((enc.chosen, enc.rejected)):
            for i, (ids, mask) in enumerate(seqs):
                x = torch.from_numpy(ids[:-1]).unsqueeze(0)
                logp = torch.log_softmax(model(x)[0].float(), dim=-1)[0].gather(-1, torch.from_numpy(ids[1:]).unsqueeze(-1)).squeeze(-1).double()
                target = torch.from_numpy(mask[1:].copy())
                ours[i, side] = logp[target].sum()
                last = int(np.nonzero(mask)[0][-1])  # the <|im_end|>; TRL's completion also holds the token after it
                ours_nl[i, side] = logp[target].sum() + (logp[last] if last < len(ids) - 1 else 0.0)
    out["dpo_ref_pairs"] = n
    out["dpo_ref_diff_with_nl"] = float((ours_nl - trl_ref).abs().max())
    out["dpo_ref_diff_gptlab_mask"] = float((ours - trl_ref).abs().max())
    out["dpo_completion_tokens"] = {
        "gptlab": float(np.mean([m[1:].sum() for seqs in (enc.chosen, enc.rejected) for _, m in seqs])),
        "trl": float(np.mean([len(r[k]) for r in trainer.train_dataset for k in ("chosen_ids", "rejected_ids")])),
    }
    out["params_policy"] = {"gptlab": sum(p.numel() for p in model.parameters()), "trl": sum(p.numel() for p in hf_model.parameters())}
    del trainer

    # 3. the reward model's initial rewards: gptlab's model as train_reward builds it vs TRL's (its collator and forward)
    rm = TaskModel.from_gpt(load_checkpoint(work / SFT_DIR).model, HeadSpec("reward", None, 0.0), s["seed"]).eval()
    rm_tok = AutoTokenizer.from_pretrained(work / HF_RM_DIR)
    hf_rm = AutoModelForSequenceClassification.from_pretrained(work / HF_RM_DIR, num_labels=1, dtype=torch.float32, attn_implementation="sdpa").eval()
    args = RewardConfig(**trl_common(s, work / "runs" / "check-rm", 1), per_device_train_batch_size=8, max_length=s["seq_len"])
    trainer = RewardTrainer(model=hf_rm, args=args, train_dataset=Dataset.from_list(first), processing_class=rm_tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    enc_all = [template.render(r["prompt"] + r[side]).ids for side in ("chosen", "rejected") for r in first]
    with torch.no_grad():
        trl_rewards = hf_rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).double()
        width = max(len(ids) for ids in enc_all)
        x = torch.zeros(len(enc_all), 1, width, dtype=torch.long)
        last = torch.tensor([[len(ids) - 1] for ids in enc_all])
        for b, ids in enumerate(enc_all):
            x[b, 0, : len(ids)] = torch.tensor(ids)
        ours_rewards = rm(x, extract=last)[0].double()
    out["rm_pairs"] = len(first)
    out["rm_reward_diff"] = float((ours_rewards - trl_rewards).abs().max())
    out["rm_pad"] = {"token": rm_tok.pad_token, "id": rm_tok.pad_token_id, "config": hf_rm.config.pad_token_id, "im_start": template.start_id}
    out["params_rm"] = {"gptlab": sum(p.numel() for p in rm.parameters()), "trl": sum(p.numel() for p in hf_rm.parameters())}
    del trainer

    # 4. greedy replies: HF generate as TRL calls it (one left-padded batch, its eos ids) vs gptlab's engine
    rows = read_jsonl(work / PROMPTS_TEST)[:32]
    hf_model = AutoModelForCausalLM.from_pretrained(work / HF_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()  # unpatched by DPOTrainer
    eos = hf_model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos = ([hf_tok.eos_token_id] if hf_tok.eos_token_id not in eos else []) + eos  # GRPOTrainer's eos list
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id
    ids = [template.generation_prompt(r["prompt"]) for r in rows]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(i)) + i for i in ids])
    attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    gen = GenerationConfig(max_new_tokens=s["max_new_tokens"], do_sample=False, eos_token_id=eos, pad_token_id=pad_id)
    with torch.no_grad():
        done = hf_model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen)[:, width:]
    hf_replies = []
    for row in done.tolist():
        cut = next((k for k, t in enumerate(row) if t in eos), None)
        hf_replies.append(row[: cut + 1] if cut is not None else row)
    engine = Engine(model, base.tokenizer, onednn=False)
    cfg = SampleConfig(max_new_tokens=s["max_new_tokens"], temperature=0.0, stop_token_ids=(template.end_id,))
    ours_replies = [d.token_ids for d in engine.generate(ids, [cfg] * len(ids))]
    out["greedy_same"], out["greedy_total"] = sum(a == b for a, b in zip(ours_replies, hf_replies, strict=True)), len(rows)
    out["greedy_mean_tokens"] = {"gptlab": statistics.mean(map(len, ours_replies)), "hf": statistics.mean(map(len, hf_replies))}
    out["eos_ids"] = eos
    return out


# ----------------------------------------------------------------------------- workers: runs


def worker_gptlab(work: Path, s: dict[str, Any], method: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(s["threads"])
    from gptlab.chat import ChatTemplate
    from gptlab.checkpoint import load_checkpoint

    hooks = GptlabRecords()
    seen = record_gptlab_batches(method)
    run_dir = work / "runs" / f"gptlab-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    lines: list[str] = []
    n_eval = len(read_jsonl(work / PAIRS_TEST))
    if method == "grpo":
        from gptlab.align.grpo import GRPOConfig, grpo

        total = s["warmup"] + s["grpo_steps"]
        cfg = GRPOConfig(
            prompts=(str(work / PROMPTS_TRAIN),), reward=f"py:{work / REWARD_FILE}:gptlab_exact", group_size=s["group_size"],
            prompts_per_step=s["prompts_per_step"], max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], clip=CLIP,
            beta=s["grpo_beta"], updates_per_rollout=1,
        )  # fmt: skip
        fields = optimizer_fields(s) | {"max_steps": total, "eval_every": 10**9, "save_every": 10**9}
        grpo(str(work / SFT_DIR), cfg, fields, run_dir, progress=False, report=lines.append)
    else:
        total = s["warmup"] + s["steps"]
        fields = optimizer_fields(s) | {"batch_size": s["batch_size"], "grad_accum": 1, "max_steps": total, "log_every": 1, "eval_every": 10**9,
                                        "save_every": 10**9, "dtype": "float32", "eval_batches": -(-n_eval // s["batch_size"])}  # fmt: skip
        data = {"data": (str(work / PAIRS_TRAIN),), "val_data": (str(work / PAIRS_TEST),), "max_len": s["seq_len"]}
        if method == "dpo":
            from gptlab.align.dpo import DPOConfig, dpo

            dpo(str(work / SFT_DIR), DPOConfig(**data, beta=s["dpo_beta"], loss="sigmoid"), fields, run_dir, progress=False, report=lines.append)
        else:
            from gptlab.align.reward import RewardConfig, train_reward

            train_reward(str(work / SFT_DIR), RewardConfig(**data), fields, run_dir, progress=False, report=lines.append)
    for line in lines:
        print(line, file=sys.stderr)
    step_s, records, rss = hooks.steps(total)
    result: dict[str, Any] = {"step_s": [math.nan, *step_s], "losses": [r["loss"] for r in records], "peak_rss_mib": rss}
    trained = load_checkpoint(run_dir)
    result["trainable"] = sum(p.numel() for p in trained.model.parameters() if p.requires_grad)
    result["batches"] = seen["batches"][:total]
    if method == "grpo":
        n = s["prompts_per_step"] * s["group_size"]
        rows = read_jsonl(work / PROMPTS_TRAIN)
        result["batches"] = [[rows[i]["prompt"][-1]["content"] for i in b] for b in result["batches"]]
        result["gen_s"] = seen["gen_s"][:total]
        result["units"] = [n] * total
        result["reply_tokens"] = [r["reply_tokens"] * n for r in records]
        result["train_reward"] = [r["reward"] for r in records]
        result["held_out"] = greedy_eval(trained.model, ChatTemplate(trained.tokenizer), read_jsonl(work / PROMPTS_TEST), s["max_new_tokens"])
    else:
        result["units"] = [s["batch_size"]] * total
        val = hooks.val()
        if method == "dpo":
            result["held_out"] = {"accuracy": val["reward_accuracy"], "margin": val["reward_margin"], "pairs": n_eval}
        else:
            result["held_out"] = {"accuracy": val["pair_accuracy"], "margin": val["margin"], "pairs": n_eval}
    result["notes"] = {"optimizer": "torch AdamW (fused)"}
    return result


def worker_trl(work: Path, s: dict[str, Any], method: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(s["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out_dir = work / "runs" / f"trl-{method}"
    timer = trl_timer()
    result: dict[str, Any] = {}
    if method == "grpo":
        import importlib.util

        from trl import GRPOConfig, GRPOTrainer

        from gptlab.chat import ChatTemplate
        from gptlab.checkpoint import load_checkpoint
        from gptlab.hf import load_hf

        spec = importlib.util.spec_from_file_location("align_bench_rewards", work / REWARD_FILE)
        rewards = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rewards)
        total = s["warmup"] + s["grpo_steps"]
        n = s["prompts_per_step"] * s["group_size"]
        tokenizer = AutoTokenizer.from_pretrained(work / HF_DIR)
        model = AutoModelForCausalLM.from_pretrained(work / HF_DIR, dtype=torch.float32, attn_implementation="sdpa")
        gen_s: list[float] = []
        generate = model.generate

        def timed_generate(*a, **k):  # TRL calls the policy's generate once per step (one batch of P*G rows)
            t0 = time.perf_counter()
            out = generate(*a, **k)
            gen_s.append(time.perf_counter() - t0)
            return out

        model.generate = timed_generate
        rows = read_jsonl(work / PROMPTS_TRAIN)
        ordered = [rows[i] for i in gptlab_order(work, s, method, len(rows), total)]  # gptlab's prompts, in its order
        args = GRPOConfig(
            **trl_common(s, out_dir, total), per_device_train_batch_size=n, steps_per_generation=1, num_generations=s["group_size"],
            max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_p=1.0, top_k=0, beta=s["grpo_beta"], epsilon=CLIP,
            num_iterations=1, loss_type="grpo", scale_rewards="group", use_bias_correction_kl=False, mask_truncated_completions=False,
            shuffle_dataset=False,
        )  # fmt: skip
        trainer = recording(GRPOTrainer)(
            model=model, reward_funcs=[rewards.trl_exact], args=args, train_dataset=Dataset.from_list(ordered), processing_class=tokenizer,
            callbacks=[timer],
        )  # fmt: skip
        trainer.train()
        result["gen_s"] = gen_s[:total]
        result["batches"] = [c[3] for c in rewards.CALLS][:total]
        calls = rewards.CALLS
        if len(calls) != total or any(c[0] != n for c in calls):
            raise RuntimeError(f"expected {total} generation batches of {n} completions, got {[c[0] for c in calls]}")
        result["units"] = [c[0] for c in calls]
        result["reply_tokens"] = [c[1] for c in calls]
        result["train_reward"] = [c[2] for c in calls]
        trainer.save_model(str(out_dir / "final"))
        base = load_checkpoint(work / SFT_DIR)
        trained = load_hf(out_dir / "final").model
        result["held_out"] = greedy_eval(trained, ChatTemplate(base.tokenizer), read_jsonl(work / PROMPTS_TEST), s["max_new_tokens"])
        result["notes"] = {
            "generation_batch_size": args.generation_batch_size, "steps_per_generation": args.steps_per_generation,
            "eos_token_ids": list(trainer.eos_token_ids), "pad_token": tokenizer.pad_token, "ref_model": type(trainer.ref_model).__name__,
        }  # fmt: skip
    else:
        total = s["warmup"] + s["steps"]
        rows = read_jsonl(work / PAIRS_TRAIN)
        train_ds = Dataset.from_list([rows[i] for i in gptlab_order(work, s, method, len(rows), total)])  # gptlab's batches, in its order
        eval_rows = read_jsonl(work / PAIRS_TEST)
        eval_ds = Dataset.from_list(eval_rows)
        common = trl_common(s, out_dir, total) | {"per_device_train_batch_size": s["batch_size"], "per_device_eval_batch_size": eval_batch_size(len(eval_rows)),
                                                 "max_length": s["seq_len"], "train_sampling_strategy": "sequential"}  # fmt: skip
        if method == "dpo":
            from trl import DPOConfig, DPOTrainer

            tokenizer = AutoTokenizer.from_pretrained(work / HF_DIR)
            model = AutoModelForCausalLM.from_pretrained(work / HF_DIR, dtype=torch.float32, attn_implementation="sdpa")
            args = DPOConfig(**common, beta=s["dpo_beta"], loss_type=["sigmoid"], precompute_ref_log_probs=True, precompute_ref_batch_size=16)
            trainer = recording(DPOTrainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                            callbacks=[timer])  # fmt: skip
            keys = ("eval_rewards/accuracies", "eval_rewards/margins")
        else:
            from trl import RewardConfig, RewardTrainer

            tokenizer = AutoTokenizer.from_pretrained(work / HF_RM_DIR)
            model = AutoModelForSequenceClassification.from_pretrained(work / HF_RM_DIR, num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
            args = RewardConfig(**common, center_rewards_coefficient=None)
            trainer = recording(RewardTrainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                               callbacks=[timer])  # fmt: skip
            keys = ("eval_accuracy", "eval_margin")
        collator = trainer.data_collator
        counter = counting_collator(collator, method)
        trainer.data_collator = counter
        if len(trainer.eval_dataset) != len(eval_rows):
            raise RuntimeError(f"TRL kept {len(trainer.eval_dataset)} of the {len(eval_rows)} held-out pairs")
        trainer.train()
        result["batches"] = counter.batches[:total]
        result["units"] = [len(b) for b in result["batches"]]
        trainer.data_collator = collator  # evaluation batches are not training batches
        metrics = trainer.evaluate()
        result["held_out"] = {"accuracy": metrics[keys[0]], "margin": metrics[keys[1]], "pairs": len(trainer.eval_dataset)}
        result["notes"] = {"pad_token": tokenizer.pad_token, "ref_model": type(getattr(trainer, "ref_model", None)).__name__}
    if len(timer.step_s) != total:
        raise RuntimeError(f"TRL ran {len(timer.step_s)} steps, expected {total}")
    result |= {
        "step_s": timer.step_s, "losses": trainer.losses[:total], "peak_rss_mib": timer.rss[-1],
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    result["notes"] |= {"optimizer": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
                        "attention": str(trainer.model.config._attn_implementation)}  # fmt: skip
    return result


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def worker_main(args: argparse.Namespace) -> None:
    work = args.workdir
    settings = json.loads((work / SETTINGS_FILE).read_text())
    name = args.worker
    if name == "prepare":
        emit(worker_prepare(work, settings))
        return
    if name == "check":
        emit(worker_check(work, settings))
        return
    framework, _, method = name.partition("-")
    if framework not in ("gptlab", "trl") or method not in METHODS:
        raise SystemExit(f"unknown worker {name!r}")
    result = (worker_gptlab if framework == "gptlab" else worker_trl)(work, settings, method)
    result["threads"] = __import__("torch").get_num_threads()
    emit(result)


# ----------------------------------------------------------------------------- parent: running the workers


def run_worker(name: str, work: Path, threads: int, timeout: float) -> dict[str, Any]:
    """Run `--worker name` in a fresh process; its log goes to WORK/logs/NAME.log; returns its result."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")  # fmt: skip
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


# ----------------------------------------------------------------------------- report


def summarize(result: dict[str, Any], warmup: int) -> dict[str, float]:
    """Per-run figures over the timed steps (after the warm-up)."""
    secs = result["step_s"][warmup:]
    out = {
        "steps_s": len(secs) / sum(secs),
        "units_s": sum(result["units"][warmup:]) / sum(secs),
        "step_med": statistics.median(secs),
        "rss": result["peak_rss_mib"],
        "wall": result["wall_s"],
    }
    if "reply_tokens" in result:
        out["gen_share"] = sum(result["gen_s"][warmup:]) / sum(secs)
        out["reply_tok_s"] = sum(result["reply_tokens"][warmup:]) / sum(secs)
        out["reply_tokens"] = sum(result["reply_tokens"][warmup:]) / sum(result["units"][warmup:])
    return out


def diff_se(p: float, q: float, n: int) -> float:
    """Standard error of the difference of two proportions measured on n items each."""
    return math.sqrt(max(p * (1 - p) + q * (1 - q), 1e-12) / max(n, 1))


def held_out_text(method: str, h: dict[str, Any]) -> str:
    if method == "grpo":
        return f"reward {h['reward']:.3f} ({h['prompts']} prompts), {h['reply_tokens']:.1f} tok/reply"
    what = "reward acc" if method == "dpo" else "pair acc"
    return f"{what} {h['accuracy']:.1%}, margin {h['margin']:+.3f} ({h['pairs']} pairs)"


def trajectory(method: str, res: dict[str, Any]) -> str:
    """Loss at the first and last step; for GRPO the batch's mean reward (its loss is ~0 by construction: advantages sum to 0 in a group)."""
    if method == "grpo":
        r = res["train_reward"]
        return f"reward {r[0]:.3f} → {r[-1]:.3f} (mean {statistics.mean(r):.3f})"
    return f"{res['losses'][0]:.4f} → {res['losses'][-1]:.4f}"


def held_out_value(method: str, h: dict[str, Any]) -> tuple[float, int]:
    return (h["reward"], h["prompts"]) if method == "grpo" else (h["accuracy"], h["pairs"])


def report(args: argparse.Namespace, info: dict[str, Any], check: dict[str, Any], rounds: list[dict[tuple[str, str], dict[str, Any]]]) -> str:
    runs = list(rounds[0])
    figures = {run: [summarize(rd[run], args.warmup) for rd in rounds] for run in runs}
    med = {run: {k: statistics.median(f[k] for f in fs) for k in fs[0]} for run, fs in figures.items()}
    first = rounds[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    threads = sorted({r["threads"] for r in first.values()})
    trl_notes = {m: r["notes"] for (fw, m), r in first.items() if fw == "trl"}
    start = info["start_eval"]
    lines = [
        f"### Alignment: gptlab vs TRL (DPOTrainer, GRPOTrainer, RewardTrainer), {args.layers} layers, {args.heads} heads, {args.width} wide, "
        f"T {args.seq_len}, CPU fp32",
        "",
        f"{cpu_model()}, {os.cpu_count()} cores, {'/'.join(map(str, threads))} torch thread(s) per run; {date}; Python {platform.python_version()}, "
        f"torch {version('torch')}, transformers {version('transformers')}, trl {version('trl')}, datasets {version('datasets')}",
        "",
        f"Model: {info['params'] / 1e6:.2f}M parameters, tokenizer {info['tokenizer']} ({info['tokenizer_ids']} ids incl. ChatML, "
        f"{info['vocab_rows']} rows), random init (seed {args.seed}) + gptlab SFT on builtin:arithmetic ({info['sft_steps']} steps of {args.sft_batch_size} packed "
        f"rows at lr {args.sft_lr:g}, {info['sft_s']:.0f} s, loss {info['sft_loss_first']:.2f} → {info['sft_loss_last']:.2f}); the start of every run, "
        f"exported once (TRL: GPT2LMHeadModel / GPT2ForSequenceClassification, SDPA attention, activation {info['hf_activation']}). "
        f"Its greedy exact-match reward on the {start['prompts']} held-out arithmetic prompts: {start['reward']:.3f} ({start['reply_tokens']:.1f} "
        f"tokens a reply). Pairs: the first {info['n_train_pairs']} of builtin:{args.pairs} (train), held out the first {info['n_test_pairs']} of "
        f"its test split ({info['pair_tokens_mean']:.0f} tokens a side on average, at most {info['pair_tokens_max']}).",
        "",
        f"Settings (both sides): lr {args.lr:g} cosine to {args.min_lr:g}, no warm-up, AdamW (0.9, 0.95), no weight decay, clip 1.0, seed {args.seed}. "
        f"DPO: sigmoid loss, beta {args.dpo_beta:g}, {args.batch_size} pairs a step, max length {args.seq_len}, reference log-probs precomputed "
        f"(TRL precompute_ref_log_probs=True). Reward model: {args.batch_size} pairs a step, Bradley-Terry. GRPO: {args.prompts_per_step} prompts x "
        f"{args.group_size} replies a step (TRL per_device_train_batch_size {args.prompts_per_step * args.group_size}, "
        f"generation_batch_size {trl_notes.get('grpo', {}).get('generation_batch_size', '?')}, steps_per_generation "
        f"{trl_notes.get('grpo', {}).get('steps_per_generation', '?')}), ≤ {args.max_new_tokens} new tokens, temperature {args.temperature:g}, "
        f"stop at ids {check['eos_ids']} (<|im_end|>, <|endoftext|>), beta {args.grpo_beta:g} (k3 KL, TRL use_bias_correction_kl=False), "
        f"clip {CLIP:g}, loss \"grpo\", exact-match reward (one Python function).",
        "",
        f"Each run in its own process, {args.warmup} warm-up + {args.steps} (DPO, reward model) / {args.grpo_steps} (GRPO) timed steps, median of "
        f"{len(rounds)} round(s). Step time = wall time from one optimizer step's end to the next's (GRPO: sampling, rewards, reference and policy "
        "passes, backward, optimizer). Peak RSS = ru_maxrss at the end of the last step (setup included). Held-out figures after the "
        "same steps: DPO implicit-reward accuracy and margin, reward-model pairwise accuracy and margin (each side's own evaluation "
        "of the same pairs), GRPO mean exact-match reward of greedy replies (both policies scored by gptlab's engine).",
        "",
        "| method | framework | steps/s | gptlab / TRL | pairs or completions /s | s/step | peak RSS MiB | gptlab / TRL | trained params | "
        "loss (GRPO: train reward) step 1 → last | held-out after the run | process s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    goals = []
    quality = []
    for method in args.methods:
        ours, peer = med.get(("gptlab", method)), med.get(("trl", method))
        for fw in ("gptlab", "trl"):
            run = (fw, method)
            if run not in med:
                continue
            m, res = med[run], first[run]
            name = {"gptlab": {"dpo": "gptlab `dpo()`", "grpo": "gptlab `grpo()`", "rm": "gptlab `train_reward()`"},
                    "trl": {"dpo": "TRL `DPOTrainer`", "grpo": "TRL `GRPOTrainer`", "rm": "TRL `RewardTrainer`"}}[fw][method]  # fmt: skip
            speed = f"{ours['steps_s'] / peer['steps_s']:.2f}x" if fw == "gptlab" and ours and peer else ""
            mem = f"{ours['rss'] / peer['rss']:.2f}x" if fw == "gptlab" and ours and peer else ""
            unit = "pairs" if method != "grpo" else "compl."
            units = f"{m['units_s']:,.1f} {unit}/s"
            if method == "grpo":
                units += f" ({m['reply_tok_s']:,.0f} reply tok/s, {m['reply_tokens']:.1f} tok/reply, sampling {m['gen_share']:.0%} of the step)"
            lines.append(
                f"| {METHOD_NAMES[method]} | {name} | {m['steps_s']:.2f} | {speed} | {units} | {m['step_med']:.3f} | {m['rss']:,.0f} | {mem} | "
                f"{res['trainable']:,} | {trajectory(method, res)} | {held_out_text(method, res['held_out'])} | {m['wall']:.0f} |"
            )
        if ours and peer:
            ratio = ours["steps_s"] / peer["steps_s"]
            goals.append(f"{METHOD_NAMES[method]} steps/s ≥ {GOALS[method]:g}x TRL's: {'met' if ratio >= GOALS[method] else 'not met'} ({ratio:.2f}x)")
            (a, n), (b, _) = held_out_value(method, first[("gptlab", method)]["held_out"]), held_out_value(method, first[("trl", method)]["held_out"])
            se = diff_se(min(max(a, 0), 1), min(max(b, 0), 1), n)
            verdict = "met" if a >= b else f"met within noise (gap {b - a:.3f} ≤ 2 s.e. {2 * se:.3f})" if b - a <= 2 * se else "not met"
            quality.append(f"{METHOD_NAMES[method]} {a:.3f} vs TRL {b:.3f}: {verdict}")
    if len(rounds) > 1:
        lines += ["", "steps/s per round: " + "; ".join(
            f"{METHOD_NAMES[m]} {fw} " + ", ".join(f"{f['steps_s']:.2f}" for f in figures[(fw, m)]) for fw, m in runs
        )]  # fmt: skip
    if goals:
        lines += ["", "Goals: " + "; ".join(goals) + ". Held-out after equal steps, not worse than TRL (first round): " + "; ".join(quality) + "."]
    checks = [
        f"chat template ids identical for {check['pair_ids_same']}/{check['pair_ids_total']} pair sides and "
        f"{check['prompt_ids_same']}/{check['prompt_ids_total']} generation prompts",
        f"DPO reference log-probs of {check['dpo_ref_pairs']} pairs: TRL's precomputed values and gptlab's agree to "
        f"{check['dpo_ref_diff_with_nl']:.1e} once the \"\\n\" after <|im_end|> is added to gptlab's reply mask (without it they differ by up to "
        f"{check['dpo_ref_diff_gptlab_mask']:.2f}: TRL scores {check['dpo_completion_tokens']['trl']:.2f} tokens a reply, gptlab "
        f"{check['dpo_completion_tokens']['gptlab']:.2f})",
        f"reward model's initial rewards on {check['rm_pairs']} pairs (TRL's collator and forward vs gptlab's train_reward head): agree to "
        f"{check['rm_reward_diff']:.1e}; TRL pads with {check['rm_pad']['token']!r} (id {check['rm_pad']['id']}, config {check['rm_pad']['config']}, "
        f"<|im_start|> is {check['rm_pad']['im_start']})",
        f"greedy replies to {check['greedy_total']} held-out prompts: HF generate (TRL's left-padded batch and stop ids) and gptlab's engine "
        f"identical for {check['greedy_same']}/{check['greedy_total']} (mean {check['greedy_mean_tokens']['gptlab']:.2f} vs "
        f"{check['greedy_mean_tokens']['hf']:.2f} tokens)",
        f"parameters: policy gptlab {check['params_policy']['gptlab']:,} / HF {check['params_policy']['trl']:,}, reward model gptlab "
        f"{check['params_rm']['gptlab']:,} / HF {check['params_rm']['trl']:,}",
    ]
    for method in args.methods:
        if ("gptlab", method) in first and ("trl", method) in first:
            a, b = first[("gptlab", method)]["batches"], first[("trl", method)]["batches"]
            same = sum(x == y for x, y in zip(a, b)) if len(a) == len(b) else 0
            what = "prompts" if method == "grpo" else "pairs"
            checks.append(f"{METHOD_NAMES[method]}: the same {what} in the same batches at {same}/{len(a)} steps on both sides")
    if "dpo" in args.methods:
        l1 = {fw: first[(fw, "dpo")]["losses"][0] for fw in ("gptlab", "trl") if (fw, "dpo") in first}
        checks.append("DPO loss at step 1 (policy = reference) " + ", ".join(f"{fw} {v:.6f}" for fw, v in l1.items()) + f" (log 2 = {math.log(2):.6f})")
    lines += ["", "Checks: " + "; ".join(checks) + "."]
    lines += ["", "Rerun: `" + shlex.join(["python", "benchmarks/align.py", *sys.argv[1:]]) + "`"]
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
    work = args.workdir.resolve() if keep else Path(tempfile.mkdtemp(prefix="gptlab-align-bench-"))
    if keep:
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"error: --workdir {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        settings = {k: getattr(args, k) for k in (
            "steps", "grpo_steps", "warmup", "batch_size", "group_size", "prompts_per_step", "max_new_tokens", "temperature", "dpo_beta", "grpo_beta",
            "lr", "min_lr", "seq_len", "layers", "heads", "width", "tokenizer", "vocab", "sft_steps", "sft_batch_size", "sft_lr", "pairs", "train_pairs", "eval_pairs",
            "eval_prompts", "threads", "seed")}  # fmt: skip
        (work / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        print(f"setting up in {work}: tokenizer, model, {args.sft_steps} SFT steps on builtin:arithmetic, exports ...", flush=True)
        info = run_worker("prepare", work, args.threads, args.worker_timeout)
        print(f"prepare: {info['params'] / 1e6:.2f}M parameters, SFT {info['sft_s']:.0f} s (loss {info['sft_loss_first']:.2f} -> "
              f"{info['sft_loss_last']:.2f}), held-out greedy reward {info['start_eval']['reward']:.3f} ({info['wall_s']:.0f} s in all)", flush=True)  # fmt: skip
        check = run_worker("check", work, args.threads, args.worker_timeout)
        print(f"check: ids {check['pair_ids_same']}/{check['pair_ids_total']} pairs, {check['prompt_ids_same']}/{check['prompt_ids_total']} prompts; "
              f"DPO ref log-probs diff {check['dpo_ref_diff_with_nl']:.1e}; RM rewards diff {check['rm_reward_diff']:.1e}; greedy replies "
              f"{check['greedy_same']}/{check['greedy_total']} identical ({check['wall_s']:.0f} s)", flush=True)  # fmt: skip
        rounds = []
        for r in range(args.repeats):
            results: dict[tuple[str, str], dict[str, Any]] = {}
            for method in args.methods:
                order = ("gptlab", "trl") if r % 2 == 0 else ("trl", "gptlab")
                for fw in order:
                    name = f"{fw}-{method}"
                    res = run_worker(name, work, args.threads, args.worker_timeout)
                    results[(fw, method)] = res
                    f = summarize(res, args.warmup)
                    print(f"round {r + 1}/{args.repeats} {name}: {f['steps_s']:.2f} steps/s, {f['step_med']:.3f} s/step, peak RSS {f['rss']:,.0f} MiB, "
                          f"{trajectory(method, res)}, held-out {held_out_text(method, res['held_out'])} "
                          f"({res['wall_s']:.0f} s in all)", flush=True)  # fmt: skip
                    shutil.rmtree(work / "runs" / name, ignore_errors=True)
            rounds.append(dict(sorted(results.items(), key=lambda kv: (args.methods.index(kv[0][1]), kv[0][0] != "gptlab"))))
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
