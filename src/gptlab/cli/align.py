"""Alignment commands: dpo."""

from __future__ import annotations

import argparse
import os

from gptlab.cli.common import TRAIN_FIELDS, Register, add_train_flags, explicit, report_train
from gptlab.cli.finetune import files


def cmd_dpo(args: argparse.Namespace) -> int:
    from gptlab.align.dpo import DPOConfig, dpo

    cfg = None
    if args.data:
        fields = {"data": files(args.data), "val_data": files(args.val_data)}
        optional = (("val_fraction", args.val_fraction), ("beta", args.beta), ("loss", args.loss), ("label_smoothing", args.label_smoothing),
                    ("max_len", args.max_len), ("epochs", args.epochs))  # fmt: skip
        cfg = DPOConfig(**fields, **{k: v for k, v in optional if v is not None})
    result = dpo(args.policy, cfg, explicit(args, TRAIN_FIELDS), args.out, resume=args.resume, progress=not args.quiet, started=args.started)
    if os.environ.get("RANK", "0") == "0":
        report_train(result)
    return 0


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    t = command("dpo", cmd_dpo, "direct preference optimisation (Rafailov et al. 2023) of a chat model on preference pairs")
    t.add_argument("--policy", help="the chat model to optimise (an sft run or checkpoint); also the frozen reference")
    t.add_argument(
        "--data", action="append", metavar="FILE[,FILE]",
        help='JSONL pairs {"prompt", "chosen", "rejected"} (strings or messages; or whole conversations without "prompt"), or builtin:NAME',
    )  # fmt: skip
    t.add_argument("--val-data", action="append", metavar="FILE[,FILE]", help="held-out pairs (default: a built-in set's test split, else --val-fraction)")
    t.add_argument("--val-fraction", type=float, help="share of --data held out when there is no --val-data (default 0.05)")
    t.add_argument("--beta", type=float, help="strength of the pull toward the reference (default 0.1)")
    t.add_argument("--loss", choices=["sigmoid", "ipo"], help="sigmoid: DPO (default); ipo: Azar et al. 2023")
    t.add_argument("--label-smoothing", type=float, help="conservative DPO: the share of labels assumed flipped (default 0)")
    t.add_argument("--max-len", type=int, help="tokens a side may predict; longer pairs keep their start (default: the context)")
    t.add_argument("--epochs", type=float, help="passes over the pairs, which set --max-steps (default 1)")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out with its saved data and settings")
    add_train_flags(t, {
        "--max-steps": "optimizer steps (default: --epochs passes over the pairs)",
        "--lr": "peak learning rate (default 5e-6)", "--min-lr": "final learning rate (default 5e-7)",
        "--weight-decay": "AdamW decoupled weight decay (default 0)",
    })  # fmt: skip
