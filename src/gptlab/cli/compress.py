"""Compression commands: quantize."""

from __future__ import annotations

import argparse

from gptlab.cli.common import Register


def cmd_quantize(args: argparse.Namespace) -> int:
    import time

    from gptlab.compress.quantize import QuantConfig, quantize_checkpoint

    cfg = QuantConfig(method=args.method, group_size=args.group_size, head=not args.keep_head)
    t0 = time.perf_counter()
    out, before, after = quantize_checkpoint(args.ckpt, args.out, cfg, force=args.force)
    scheme = "int8 per output channel" if cfg.method == "int8" else f"int4 in groups of {cfg.group_size} inputs"
    print(f"quantized {args.ckpt} to {scheme}{'' if cfg.head else ' (head and token table kept in float)'} in {time.perf_counter() - t0:.1f} s: "
          f"weights {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB ({before / after:.2f}x smaller)")  # fmt: skip
    print(f"checkpoint: {out} (sample, chat, evaluate and serve take it)")
    return 0


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    t = command("quantize", cmd_quantize, "store a checkpoint's weights in int8 or int4 for faster, smaller decoding (weight-only; activations stay float)")
    t.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--method", choices=["int8", "int4"], default="int8",
                   help="int8: symmetric, a scale per output channel; int4: asymmetric, a scale and zero point per group of inputs (default int8)")  # fmt: skip
    t.add_argument(
        "--group-size", type=int, choices=[32, 64, 128, 256], default=128, help="int4: inputs per group (default 128; smaller is closer, larger is smaller)"
    )
    t.add_argument("--keep-head", action="store_true", help="leave the output head (and the token table tied to it) in float")
    t.add_argument("--force", action="store_true", help="replace --out if it already holds files")
