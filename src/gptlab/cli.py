"""The `gptlab` command line. Thin: parse arguments, build configs, call the library.

Subcommand handlers import their modules lazily, so `gptlab --help` never loads torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI imports torch-heavy modules lazily
    from gptlab.train import TrainResult

# ----------------------------------------------------------------------------- helpers


def _read_stdin_if(value: str | None) -> str:
    if value is None or value == "-":
        if sys.stdin is None or sys.stdin.isatty():
            from gptlab.errors import InputError

            raise InputError("no text given: pass --prompt/--text or pipe text on stdin")
        return sys.stdin.read()
    return value


def _explicit(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """Options the user actually set (argparse defaults are None), keyed by config field name."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "pos_encoding", "norm_placement", "activation")
TRAIN_FIELDS = (
    "batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
    "eval_every", "eval_batches", "save_every", "keep_last", "log_every", "seed", "device", "dtype", "strategy",
    "compile", "activation_checkpointing", "tf32", "max_bad_steps", "time_budget",
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


# ----------------------------------------------------------------------------- handlers


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
    ids = tok.encode(_read_stdin_if(args.text), allowed_special="all" if args.allow_special else None)
    print(" ".join(map(str, ids)))
    return 0


def cmd_tokenizer_decode(args: argparse.Namespace) -> int:
    from gptlab.errors import InputError
    from gptlab.tokenizer import load_tokenizer

    raw = args.ids if args.ids else _read_stdin_if(None).split()
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
    model_fields = _explicit(args, MODEL_FIELDS)
    train_fields = _explicit(args, TRAIN_FIELDS)
    ckpt = find_checkpoint(args.out) if args.resume and Path(args.out).is_dir() else None
    if ckpt is not None:
        # Resuming: the checkpoint's configs win; model flags may repeat them (so a supervisor can
        # always pass the same command line) but not change them; train flags override.
        saved = read_checkpoint_meta(ckpt)["model_config"]
        changed = [f"--{k.replace('_', '-')}" for k, v in model_fields.items() if saved.get(k) != v]
        if changed:
            raise ConfigError(f"cannot change the model when resuming {ckpt}: {', '.join(changed)} differ(s) from the checkpoint")
        model_cfg, train_cfg = None, None
    else:
        if args.time_budget is not None and args.max_steps is not None:
            raise ConfigError("--time-budget sets the number of steps of a new run; give it or --max-steps, not both")
        # Pad the vocabulary to a multiple of 64: the extra rows are never targets, and aligned shapes are faster.
        vocab = args.vocab_size or -(-data.vocab_size // 64) * 64
        model_cfg, train_cfg = GPTConfig(vocab_size=vocab, **model_fields), TrainConfig(**train_fields)
    result = train(
        model_cfg, train_cfg, args.data, args.out, resume=args.resume, stop_at=args.stop_at,
        progress=not args.quiet, resume_overrides=train_fields, report=print, started=args.started,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # under torchrun the main process reports
        _report_train(result)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: with gloo, a worker whose work
        # is all done and saved can still abort there ("terminate called without an active
        # exception", seen in about 1 of 30 launches on a loaded machine), failing the whole job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _report_train(result: TrainResult) -> None:
    from gptlab.train import format_seconds

    if result.stopped_by == "time budget":
        print(f"the time budget ended the run at step {result.step} of {result.max_steps}, before its schedule's end: "
              f"the schedule was cut short; --resume continues it")  # fmt: skip
    elif result.stopped_by is not None:
        print(f"stopped by {result.stopped_by} after step {result.step}; continue with the same command and --resume")
    if result.val is not None:
        print(f"step {result.step}: val loss {result.val['loss']:.4f} | perplexity {result.val['perplexity']:.2f} | bpb {result.val['bpb']:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"throughput: {result.tokens_per_s:,.0f} tokens/s | peak memory {result.peak_mem_mb:,.0f} MiB | {format_seconds(result.seconds)} in all")


def _read_batch_file(path: str) -> list[str]:
    """Prompts from a file: one per line, or in a .jsonl file one JSON string or {"prompt": ...} per line."""
    import json
    from pathlib import Path

    from gptlab.errors import InputError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read batch file {path}: {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise InputError(f'{path}:{n}: expected a JSON string or an object with a "prompt" string')
        prompts.append(prompt)
    if not prompts:
        raise InputError(f"batch file {path} holds no prompts")
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from gptlab.checkpoint import load_checkpoint
    from gptlab.config import SampleConfig
    from gptlab.errors import ConfigError, InputError
    from gptlab.generate import Engine
    from gptlab.tokenizer import EOT
    from gptlab.train import fast_bf16, resolve_device

    cfg = SampleConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop), ignore_eot=args.ignore_eot, seed=args.seed, context_overflow="slide" if args.sliding_window else "error",
    )  # fmt: skip
    prompts = _read_batch_file(args.batch_file) if args.batch_file else [_read_stdin_if(args.prompt)]
    if args.batch_file and args.prompt is not None:
        raise ConfigError("give either --prompt or --batch-file, not both")
    if args.stream and len(prompts) > 1:
        raise ConfigError("--stream prints one prompt's text as it is generated; use it without --batch-file")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.ckpt, device=device)
    tok = ckpt.tokenizer
    draft = None
    if args.draft_ckpt:
        d = load_checkpoint(args.draft_ckpt, device=device)
        if d.tokenizer.to_dict() != tok.to_dict():
            raise ConfigError(f"the draft checkpoint {args.draft_ckpt} has a different tokenizer from {args.ckpt}; speculative decoding needs the same one")
        draft = d.model
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.bfloat16 if fast_bf16(device) else torch.float32}[args.dtype]
    engine = Engine(ckpt.model, tok, draft=draft, draft_tokens=args.draft_tokens, dtype=dtype)
    eot = tok.special_tokens.get(EOT)  # imported GPT-1 tokenizers have none
    ids = []
    for text in prompts:
        row = tok.encode(text)
        if not row:
            if eot is None:
                raise InputError(f"the prompt is empty and tokenizer {tok.name!r} has no {EOT} to start a document with")
            row = [eot]  # an empty prompt starts a fresh document
        ids.append(row)
    # one seed per row, so rows differ from each other and every row reproduces
    cfgs = [cfg.replace(seed=None if cfg.seed is None else cfg.seed + i) for i in range(len(ids))]
    if args.stream:
        sys.stdout.write(prompts[0])
        for ev in engine.stream(ids, cfgs):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for i, (text, done) in enumerate(zip(prompts, engine.generate(ids, cfgs), strict=True)):
            if len(prompts) > 1:
                print(f"===== {i} ({done.finish_reason}, {len(done.token_ids)} tokens)")
            sys.stdout.write(text + done.text + "\n")
    st = engine.stats
    rate = "" if st.acceptance_rate is None else f", draft acceptance {st.acceptance_rate:.0%}"
    print(f"[{st.new_tokens} tokens in {st.seconds:.2f} s, {st.tokens_per_second:.1f} tokens/s{rate}]", file=sys.stderr)
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


def cmd_import_hf(args: argparse.Namespace) -> int:
    from gptlab.hf import import_hf

    loaded = import_hf(args.src, args.out, revision=args.revision, force=args.force)
    cfg, tok = loaded.config, loaded.tokenizer
    print(f"imported {args.src} ({loaded.model_type}): {loaded.model.num_params(non_embedding=False):,} parameters, {cfg.n_layer} layers, "
          f"{cfg.n_embd} wide, context {cfg.block_size}; tokenizer {type(tok).__name__} with {tok.vocab_size:,} ids")  # fmt: skip
    print(f"checkpoint: {args.out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from gptlab.hf import export_hf

    out = export_hf(args.ckpt, args.out, force=args.force)
    print(f"exported to {out}: loads with transformers.AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gptlab.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gptlab.demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, progress=not args.quiet)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptlab", description="Build GPT models end to end: tokenizer, data, training, sampling, evaluation.")
    p.add_argument("--version", action="version", version="gptlab 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str, parent=sub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return sp

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
    m = t.add_argument_group("model (defaults: GPT-2 small, 124M)")
    for flag, typ in (("--n-layer", int), ("--n-head", int), ("--n-embd", int), ("--block-size", int), ("--dropout", float)):
        m.add_argument(flag, type=typ)
    m.add_argument("--no-bias", dest="bias", action="store_false", default=None, help="no biases in Linear/LayerNorm")
    m.add_argument("--pos-encoding", choices=["learned", "sinusoidal"])
    m.add_argument("--norm-placement", choices=["pre", "post"], help="pre-LN (GPT-2) or post-LN (GPT-1)")
    m.add_argument("--activation", choices=["gelu_tanh", "gelu", "relu", "silu"])
    o = t.add_argument_group("optimisation")
    defaults = {"--max-steps": "optimizer steps (default 1000)", "--warmup-steps": "linear warmup steps (default: a tenth of the steps, at most 100)"}
    for flag, typ in (
        ("--batch-size", int), ("--grad-accum", int), ("--max-steps", int), ("--lr", float), ("--min-lr", float),
        ("--warmup-steps", int), ("--weight-decay", float), ("--grad-clip", float), ("--eval-every", int),
        ("--eval-batches", int), ("--save-every", int), ("--keep-last", int), ("--log-every", int), ("--seed", int),
    ):  # fmt: skip
        o.add_argument(flag, type=typ, help=defaults.get(flag))
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

    # sample
    t = command("sample", cmd_sample, "generate text from a checkpoint (KV cache, batches, streaming, speculative decoding)")
    t.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    t.add_argument("--prompt", help="prompt text; '-' or omitted reads stdin")
    t.add_argument("--batch-file", help="prompts to run as one batch: one per line, or a .jsonl file of strings / {\"prompt\": ...}")
    t.add_argument("--max-new-tokens", type=int, default=256)
    t.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    t.add_argument("--top-k", type=int)
    t.add_argument("--top-p", type=float)
    t.add_argument("--min-p", type=float, help="drop tokens less likely than min-p times the most likely one")
    t.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on tokens already seen (1.0: off)")
    t.add_argument("--presence-penalty", type=float, default=0.0)
    t.add_argument("--frequency-penalty", type=float, default=0.0)
    t.add_argument("--stop", action="append", default=[], help="stop string, cut from the output (repeatable)")
    t.add_argument("--seed", type=int, help="seed of the first prompt; prompt i of a batch uses seed + i")
    t.add_argument("--stream", action="store_true", help="print text as it is generated")
    t.add_argument("--draft-ckpt", help="a smaller model with the same tokenizer for speculative decoding")
    t.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    t.add_argument("--sliding-window", action="store_true", help="keep going past the context: a long prompt keeps its end and the window slides")
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="weights while generating; auto is bfloat16 where matmuls run it natively")
    t.add_argument("--device", default="auto")
    t.add_argument("--ignore-eot", action="store_true", help="keep going past <|endoftext|>")

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

    # Hugging Face interop
    t = command("import-hf", cmd_import_hf, "convert a Hugging Face GPT-2 or GPT-1 model (local directory or hub name) into a gptlab checkpoint")
    t.add_argument("src", help="directory with config.json + model.safetensors/pytorch_model.bin, or a hub name such as gpt2 (needs network)")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--revision", help="hub branch, tag or commit (hub names only)")
    t.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    t = command("export-hf", cmd_export_hf, "write a checkpoint as a Hugging Face model directory (config.json, model.safetensors, tokenizer)")
    t.add_argument("ckpt", help="run directory or checkpoint directory")
    t.add_argument("--out", required=True, help="directory to write")
    t.add_argument("--force", action="store_true", help="replace --out if it already holds files")

    # plot
    t = command("plot", cmd_plot, "write loss and learning-rate curves of a run as PNG")
    t.add_argument("run_dir")
    t.add_argument("--out", help="directory for the PNGs (default: the run directory)")

    # demo
    t = command("demo", cmd_demo, "the whole pipeline on the built-in pydoc corpus: tokenizer, shards, training, sampling")
    t.add_argument("--out", default="runs/demo")
    t.add_argument("--minutes", type=float, help="time budget for corpus, tokenizer and training (default 9)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import time

    started = time.perf_counter()  # a time budget counts from here, torch's import included
    args = build_parser().parse_args(argv)
    args.started = started
    from gptlab.errors import GptlabError

    try:
        return args.handler(args)
    except GptlabError as err:
        print(f"gptlab: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file-system problem no command anticipated: still one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"gptlab: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130
