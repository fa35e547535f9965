"""Commands of the pretraining half: tokenizer, prepare, train, eval, plot, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gptlab.cli.common import (
    TRAIN_FIELDS,
    Register,
    add_model_flags,
    add_train_flags,
    explicit,
    model_fields,
    read_stdin_if,
    report_train,
)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from gptlab.data import Source
    from gptlab.fileio import check_writable
    from gptlab.tokenizer import EOT, Tokenizer

    check_writable(Path(args.out).parent, "tokenizer's directory")  # before the training, not after
    texts = (text for text, _, _ in Source.of(args.input, args.corpus, args.encoding).documents())  # streamed: any corpus size
    specials = [EOT, *(s for s in args.special_tokens if s != EOT)]  # gptlab separates documents with EOT
    tok = Tokenizer.train(texts, vocab_size=args.vocab_size, special_tokens=specials, progress=not args.quiet)
    tok.save(args.out)
    print(f"trained {tok.name}: {tok.vocab_size} tokens ({', '.join(f'{t}={i}' for t, i in tok.special_tokens.items())}) -> {args.out}")
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    from gptlab.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(read_stdin_if(args.text), allowed_special="all" if args.allow_special else None)
    print(" ".join(map(str, ids)))
    return 0


def cmd_tokenizer_decode(args: argparse.Namespace) -> int:
    from gptlab.errors import InputError
    from gptlab.tokenizer import load_tokenizer

    raw = args.ids if args.ids else read_stdin_if(None).split()
    try:
        ids = [int(t.strip(",[]")) for t in raw if t.strip(",[]")]
    except ValueError:
        raise InputError(f"token ids must be integers, got {' '.join(raw)[:60]!r}") from None
    sys.stdout.write(load_tokenizer(args.tokenizer).decode(ids) + "\n")
    return 0


def cmd_tokenizer_info(args: argparse.Namespace) -> int:
    from gptlab.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(f"name:           {tok.name}")
    print(f"vocab size:     {tok.vocab_size}")
    print(f"merges:         {len(tok.merges())}")
    print(f"special tokens: {', '.join(f'{t}={i}' for t, i in tok.special_tokens.items())}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import time

    from gptlab.data import prepare

    t0 = time.perf_counter()
    try:
        meta = prepare(
            args.out,
            args.tokenizer,
            inputs=args.input,
            corpus=args.corpus,
            val_fraction=args.val_fraction,
            seed=args.seed,
            encoding=args.encoding,
            text_field=args.text_field,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print("gptlab: interrupted; run the same command again to resume the prepare", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    total_mb = sum(info["bytes"] for info in meta["splits"].values()) / 1e6
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens from {info['documents']} documents ({info['bytes'] / 1e6:.2f} MB) in {len(info['shards'])} shard(s)")
    if args.val_fraction > 0:
        share = meta["splits"]["val"]["bytes"] / max(1, sum(info["bytes"] for info in meta["splits"].values()))
        print(f"validation share: {share:.2%} of the text (asked for {args.val_fraction:.2%})")
    else:
        print("validation: none (--val-fraction 0); evaluate a held-out file with `gptlab eval --text FILE`")
    print(f"tokenizer {meta['tokenizer_name']} ({meta['vocab_size']} tokens), dtype {meta['dtype']} -> {args.out}")
    print(f"{total_mb:.2f} MB in {seconds:.1f} s ({total_mb / max(seconds, 1e-9):.2f} MB/s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gptlab.checkpoint import find_checkpoint, read_checkpoint_meta
    from gptlab.config import GPTConfig, TrainConfig
    from gptlab.data import load_data
    from gptlab.errors import ConfigError
    from gptlab.train import train

    data = load_data(args.data)
    fields = model_fields(args)
    train_fields = explicit(args, TRAIN_FIELDS)
    ckpt = find_checkpoint(args.out) if args.resume and Path(args.out).is_dir() else None
    if ckpt is not None:
        # Resuming: the checkpoint's configs win; model flags may repeat them (so a supervisor can
        # always pass the same command line) but not change them; train flags override.
        saved = GPTConfig.from_dict(read_checkpoint_meta(ckpt)["model_config"]).to_dict()  # fields added since: their defaults
        changed = [f"--{k.replace('_', '-')}" for k, v in fields.items() if saved.get(k) != v]
        if changed:
            raise ConfigError(f"cannot change the model when resuming {ckpt}: {', '.join(changed)} differ(s) from the checkpoint")
        model_cfg, train_cfg = None, None
    else:
        if args.time_budget is not None and args.max_steps is not None:
            raise ConfigError("--time-budget sets the number of steps of a new run; give it or --max-steps, not both")
        # Pad the vocabulary to a multiple of 64: the extra rows are never targets, and aligned shapes are faster.
        vocab = args.vocab_size or -(-data.vocab_size // 64) * 64
        model_cfg, train_cfg = GPTConfig(vocab_size=vocab, **fields), TrainConfig(**train_fields)
    result = train(
        model_cfg, train_cfg, args.data, args.out, resume=args.resume, stop_at=args.stop_at,
        progress=not args.quiet, resume_overrides=train_fields, report=print, started=args.started,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # under torchrun the main process reports
        report_train(result)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: with gloo, a worker whose work
        # is all done and saved can still abort there ("terminate called without an active
        # exception", seen in about 1 of 30 launches on a loaded machine), failing the whole job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gptlab.checkpoint import load_checkpoint
    from gptlab.data import check_block_size, load_data, read_text_file
    from gptlab.errors import ConfigError
    from gptlab.evaluate import evaluate_split, evaluate_text
    from gptlab.train import resolve_device

    device = resolve_device(args.device)
    if args.text is not None:
        text = read_text_file(args.text, args.encoding)  # before the checkpoint: a bad file fails fast
        ckpt = load_checkpoint(args.ckpt, device=device)
        m = evaluate_text(ckpt.model, ckpt.tokenizer, text, args.stride, args.batch_size, args.max_tokens, args.dtype, progress=not args.quiet)
        block = ckpt.model.config.block_size
        rule = "non-overlapping" if m["stride"] == block else f"each predicting {m['stride']} tokens with at least {block - m['stride'] + 1} of context"
        print(f"text:            {args.text} ({m['tokens']:,} tokens, {m['bytes']:,} bytes, tokenizer {ckpt.tokenizer.name})")
        first = "the first after <|endoftext|>" if m["after_eot"] else "but the first (no <|endoftext|> to start with)"
        print(f"windows:         {m['windows']:,} of {block} tokens, stride {m['stride']} ({rule}); each token scored once, {first}")
    else:
        if args.stride is not None:
            raise ConfigError("--stride applies to --text; a data split is scored in non-overlapping windows")
        ckpt = load_checkpoint(args.ckpt, device=device)
        data = load_data(args.data)
        check_block_size(data, 1)
        m = evaluate_split(ckpt.model, data, args.split, args.batch_size, args.max_tokens, args.dtype, progress=not args.quiet)
        print(f"{args.split} tokens: {m['tokens']:,}")
    print(f"loss:            {m['loss']:.4f}")
    print(f"perplexity:      {m['perplexity']:.2f}")
    print(f"bits per byte:   {m['bpb']:.4f}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gptlab.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gptlab.demo import run_chat_demo, run_demo

    if args.rlhf:
        from gptlab.demo import run_rlhf_demo

        run_rlhf_demo(Path(args.out), progress=not args.quiet)
    elif args.chat:
        run_chat_demo(Path(args.out), pretrain_minutes=args.minutes, sft_minutes=args.sft_minutes, progress=not args.quiet)
    else:
        run_demo(Path(args.out), minutes=args.minutes, progress=not args.quiet)
    return 0


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    # tokenizer
    tp = sub.add_parser("tokenizer", help="train, inspect and run byte-level BPE tokenizers")
    tsub = tp.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = command("train", cmd_tokenizer_train, "train a byte-level BPE tokenizer on text", tsub)
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PATH", help="text files or directories")
    src.add_argument("--corpus", choices=["pydoc"], help="a built-in corpus")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including special tokens (default 8192)")
    t.add_argument("--out", required=True, help="tokenizer file to write")
    t.add_argument(
        "--special-tokens", nargs="+", default=[], metavar="TOKEN",
        help="special tokens besides <|endoftext|> (always included), e.g. <|im_start|> <|im_end|>; ids follow the merges",
    )  # fmt: skip
    t.add_argument("--encoding", default="utf-8", help="text encoding of the input files")
    for name, handler, help in (
        ("encode", cmd_tokenizer_encode, "print the token ids of a text (from --text or stdin)"),
        ("decode", cmd_tokenizer_decode, "print the text of token ids (arguments or stdin)"),
        ("info", cmd_tokenizer_info, "describe a tokenizer"),
    ):
        t = command(name, handler, help, tsub)
        t.add_argument("--tokenizer", default="gpt2", help="gpt2, a tokenizer file, or a directory (Hugging Face files, gptlab data or checkpoint)")
        if name == "encode":
            t.add_argument("--text", help="text to encode (default: stdin)")
            t.add_argument("--allow-special", action="store_true", help="turn special-token text such as <|endoftext|> into its id")
        if name == "decode":
            t.add_argument("ids", nargs="*", help="token ids (default: read from stdin)")


    # prepare
    t = command("prepare", cmd_prepare, "tokenize text into train/val token shards")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input", nargs="+", metavar="PATH", help="files or directories: a text file is one document, a .jsonl file one per line; .gz is read too"
    )
    src.add_argument("--corpus", choices=["pydoc"], help="built-in corpus: Python's own documentation")
    t.add_argument("--tokenizer", required=True, help="gpt2, a tokenizer file, or train:N to train an N-token BPE")
    t.add_argument("--out", required=True, help="data directory to write; rerunning an interrupted prepare resumes it")
    t.add_argument(
        "--val-fraction", type=float, default=0.1,
        help="share of the text held out for validation, in [0, 1) (default 0.1; 0: everything to train)",
    )  # fmt: skip
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--encoding", default="utf-8")
    t.add_argument("--text-field", default="text", help="the field of each .jsonl record that holds the text (default: text)")
    t.add_argument("--workers", type=int, help="tokenizer processes (default: all cores for large inputs)")
    t.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default: 100,000,000)")


    # train
    t = command("train", cmd_train, "pretrain a GPT on prepared shards")
    t.add_argument("--data", required=True, help="data directory from `gptlab prepare`")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint (fresh start if none)")
    t.add_argument("--stop-at", type=int, help="stop after this step (schedule still set by --max-steps)")
    t.add_argument("--vocab-size", type=int, help="default: tokenizer vocabulary rounded up to a multiple of 64")
    add_model_flags(t)
    add_train_flags(t)

    # eval
    t = command("eval", cmd_eval, "loss, perplexity and bits per byte of a data split or of any text file")
    t.add_argument("--ckpt", required=True)
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a prepared data directory: score one of its splits")
    src.add_argument("--text", "--input", dest="text", metavar="FILE", help="a text file (.gz too), scored as one document under the checkpoint's tokenizer")
    t.add_argument("--split", choices=["val", "train"], default="val")
    t.add_argument(
        "--stride", type=int, help="with --text: tokens each window moves on and predicts (default: the context, i.e. non-overlapping "
        "windows); smaller gives every token at least context - stride + 1 tokens of context, for context / stride times the compute",
    )  # fmt: skip
    t.add_argument("--encoding", default="utf-8", help="text encoding of --text")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")

    # plot
    t = command("plot", cmd_plot, "write loss and learning-rate curves of a run as PNG")
    t.add_argument("run_dir")
    t.add_argument("--out", help="directory for the PNGs (default: the run directory)")

    # demo
    t = command("demo", cmd_demo, "the whole pipeline on the built-in pydoc corpus: tokenizer, shards, training, sampling")
    t.add_argument("--out", default="runs/demo")
    t.add_argument("--minutes", type=float, help="time budget for corpus, tokenizer and training (default 9)")
    t.add_argument(
        "--chat", action="store_true",
        help="then fine-tune the demo's model into a chat model on the built-in instruction sets and compare the two (reuses --out's pretrained run)",
    )  # fmt: skip
    t.add_argument("--sft-minutes", type=float, help="with --chat: time budget for the fine-tuning (default 11)")
    t.add_argument(
        "--rlhf", action="store_true",
        help="then, from the chat model (made first if --out has none): SFT on a checkable task, a reward model, PPO, DPO and GRPO, compared in one table",
    )  # fmt: skip
