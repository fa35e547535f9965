"""What the command groups share: argument helpers, the config fields flags map to, and the
training flags that `train`, `sft` and the other training commands take alike."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gptlab.config import ACTIVATIONS, ARCHITECTURES, MLPS, NORMS, POS_ENCODINGS  # dataclasses only: no torch

if TYPE_CHECKING:  # annotations only: the CLI imports torch-heavy modules lazily
    from gptlab.train import TrainResult

Register = Callable[..., argparse.ArgumentParser]  # command(name, handler, help, parent=...) in build_parser


def read_stdin_if(value: str | None) -> str:
    if value is None or value == "-":
        if sys.stdin is None or sys.stdin.isatty():
            from gptlab.errors import InputError

            raise InputError("no text given: pass --prompt/--text or pipe text on stdin")
        return sys.stdin.read()
    return value


def explicit(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """Options the user actually set (argparse defaults are None), keyed by config field name."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


MODEL_FIELDS = (
    "n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "pos_encoding", "norm_placement", "activation",
    "norm", "mlp", "n_kv_head", "qk_norm", "rope_theta", "tie_weights", "n_inner",
)  # fmt: skip
TRAIN_FIELDS = (
    "batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
    "eval_every", "eval_batches", "save_every", "keep_last", "log_every", "seed", "device", "dtype", "strategy",
    "compile", "activation_checkpointing", "tf32", "max_bad_steps", "time_budget", "optimizer", "muon_lr", "muon_momentum",
    "muon_ns_dtype",
)  # fmt: skip


def duration(text: str) -> float:
    """A time span for argparse: '90' or '90s' seconds, '10m' minutes, '1.5h' hours."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, scale = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 600, 90s, 10m or 1.5h; got {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return seconds


def add_model_flags(t: argparse.ArgumentParser) -> None:
    """The model's shape and architecture (train: a new model; other commands take the base's)."""
    m = t.add_argument_group("model (defaults: GPT-2 small, 124M)")
    for flag, typ in (("--n-layer", int), ("--n-head", int), ("--n-embd", int), ("--block-size", int), ("--dropout", float)):
        m.add_argument(flag, type=typ)
    m.add_argument("--arch", choices=sorted(ARCHITECTURES), help="a named architecture: gpt2 (default) or llama (RoPE, RMSNorm, "
                   "SwiGLU, no biases, untied embeddings); the flags below change it further")  # fmt: skip
    m.add_argument("--no-bias", dest="bias", action="store_false", default=None, help="no biases in Linear/LayerNorm")
    m.add_argument("--pos-encoding", choices=list(POS_ENCODINGS), help="learned (GPT-2), sinusoidal or rope")
    m.add_argument("--rope-theta", type=float, help="RoPE's base (default 10000)")
    m.add_argument("--norm-placement", choices=["pre", "post"], help="pre-LN (GPT-2) or post-LN (GPT-1)")
    m.add_argument("--norm", choices=list(NORMS), help="layernorm (GPT-2) or rmsnorm")
    m.add_argument("--activation", choices=list(ACTIVATIONS))
    m.add_argument("--mlp", choices=list(MLPS), help="standard, or gated (with --activation silu: SwiGLU)")
    m.add_argument("--n-inner", type=int, help="MLP hidden width (default 4 x n_embd; gated: 8/3 x n_embd)")
    m.add_argument("--n-kv-head", type=int, help="key/value heads for grouped-query attention (default: one per query head)")
    m.add_argument("--qk-norm", action="store_true", default=None, help="normalise each head's queries and keys")
    m.add_argument("--no-tie", dest="tie_weights", action="store_false", default=None, help="separate input and output embeddings")


def model_fields(args: argparse.Namespace) -> dict[str, Any]:
    """GPTConfig fields from the model flags: the --arch preset's, then each flag given explicitly."""
    return {**(ARCHITECTURES[args.arch] if getattr(args, "arch", None) else {}), **explicit(args, MODEL_FIELDS)}


def add_train_flags(t: argparse.ArgumentParser, defaults: dict[str, str] | None = None) -> None:
    """Optimisation flags, as TrainConfig fields; `defaults` overrides the help text of flags whose default differs by command."""
    o = t.add_argument_group("optimisation")
    defaults = {
        "--max-steps": "optimizer steps (default 1000)", "--warmup-steps": "linear warmup steps (default: a tenth of the steps, at most 100)",
        **(defaults or {}),
    }  # fmt: skip
    for flag, typ in (
        ("--batch-size", int), ("--grad-accum", int), ("--max-steps", int), ("--lr", float), ("--min-lr", float),
        ("--warmup-steps", int), ("--weight-decay", float), ("--grad-clip", float), ("--eval-every", int),
        ("--eval-batches", int), ("--save-every", int), ("--keep-last", int), ("--log-every", int), ("--seed", int),
    ):  # fmt: skip
        o.add_argument(flag, type=typ, help=defaults.get(flag))
    o.add_argument("--optimizer", choices=["adamw", "muon"], help="adamw (default), or muon: Muon for the blocks' matrices, AdamW for the rest")
    o.add_argument("--muon-lr", type=float, help="Muon's peak learning rate (default 0.02); --lr stays AdamW's")
    o.add_argument("--muon-momentum", type=float, help="Muon's momentum (default 0.95)")
    o.add_argument("--muon-ns-dtype", choices=["auto", "float32", "bfloat16"],
                   help="dtype of Muon's Newton-Schulz iteration (default auto: bfloat16 where bf16 matmuls are native)")  # fmt: skip
    o.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    o.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype (default float32)")
    o.add_argument("--strategy", choices=["ddp", "fsdp"], help="under torchrun: replicate (ddp, default) or shard (fsdp) the model")
    o.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    o.add_argument("--activation-checkpointing", action="store_true", default=None, help="recompute activations in backward to save memory")
    o.add_argument("--no-tf32", dest="tf32", action="store_false", default=None, help="on CUDA, keep float32 matmuls in full float32")
    o.add_argument("--max-bad-steps", type=int, help="non-finite steps in a row (each skipped) before stopping (default 5)")
    o.add_argument(
        "--time-budget", type=duration, metavar="DURATION",
        help="fit the run into this wall clock (600, 90s, 10m, 1.5h): the step time is measured and sets --max-steps; "
        "the run stops by then even if steps slow down. With --resume it only caps this session",
    )  # fmt: skip



def _metric(name: str, value: float) -> str:
    if name == "perplexity":
        return f"perplexity {value:.2f}"
    if name == "accuracy":
        return f"token accuracy {value:.2%}"
    return f"{name} {value:.4f}"


def report_train(result: TrainResult) -> None:
    from gptlab.train import format_seconds

    if result.stopped_by == "time budget":
        print(f"the time budget ended the run at step {result.step} of {result.max_steps}, before its schedule's end: "
              f"the schedule was cut short; --resume continues it")  # fmt: skip
    elif result.stopped_by is not None:
        print(f"stopped by {result.stopped_by} after step {result.step}; continue with the same command and --resume")
    if result.val is not None:
        print(f"step {result.step}: val " + " | ".join(_metric(k, v) for k, v in result.val.items()))
    print(f"checkpoint: {result.checkpoint}")
    print(f"throughput: {result.tokens_per_s:,.0f} tokens/s | peak memory {result.peak_mem_mb:,.0f} MiB | {format_seconds(result.seconds)} in all")
