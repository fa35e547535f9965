"""`gptlab attention`: what the model attends to."""

from __future__ import annotations

import argparse

from gptlab.cli.common import Register


def cmd_attention(args: argparse.Namespace) -> int:
    import torch

    from gptlab.checkpoint import load_checkpoint
    from gptlab.evals.attention import attention_html, attention_maps, plot_attention, select, token_labels
    from gptlab.errors import InputError

    if not args.text:
        raise InputError("--text is empty: give the text whose attention to draw")
    ckpt = load_checkpoint(args.ckpt)  # on the CPU: one short forward pass
    ids = ckpt.tokenizer.encode(args.text)
    maps = attention_maps(ckpt.model, torch.tensor(ids))
    select(maps, args.layer, args.head)  # a bad index fails before anything is written
    labels = token_labels(ckpt.tokenizer, ids)
    print(f"{len(ids)} tokens, {maps.shape[0]} layers x {maps.shape[1]} heads from {ckpt.path}")
    print(f"wrote {plot_attention(maps, labels, args.out, args.layer, args.head)}")
    if args.html:
        print(f"wrote {attention_html(maps, labels, args.html, args.text[:60])}")
    return 0


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    t = command("attention", cmd_attention, "draw a checkpoint's attention weights for a text: heatmaps per layer and head, tokens on both axes")
    t.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    t.add_argument("--text", required=True, help="the text to run (at most the model's context, in tokens)")
    t.add_argument("--out", required=True, help="PNG to write")
    t.add_argument("--layer", type=int, help="draw this layer's heads only (default: every layer)")
    t.add_argument("--head", type=int, help="with --layer: draw this one head, large")
    t.add_argument("--html", help="also write a self-contained HTML page to pick a layer and head and read each weight")
