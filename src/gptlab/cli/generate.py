"""Commands that generate text: sample and chat."""

from __future__ import annotations

import argparse
import sys

from gptlab.cli.common import Register, read_stdin_if


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
    from gptlab.checkpoint import load_checkpoint
    from gptlab.errors import ConfigError, InputError
    from gptlab.generate import Engine, measured_kernels
    from gptlab.tokenizer import EOT, same_encoding
    from gptlab.train import resolve_device

    cfg = _sample_config(args, context_overflow="slide" if args.sliding_window else "error")
    prompts = _read_batch_file(args.batch_file) if args.batch_file else [read_stdin_if(args.prompt)]
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
        if not same_encoding(d.tokenizer, tok):
            raise ConfigError(f"the draft checkpoint {args.draft_ckpt} has a different tokenizer from {args.ckpt}; speculative decoding needs the same one")
        draft = d.model
    dtype = _dtype(args.dtype, device)
    engine = Engine(ckpt.model, tok, draft=draft, draft_tokens=args.draft_tokens, dtype=dtype, **measured_kernels(device, len(prompts)))
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


def _sample_config(args: argparse.Namespace, **fields):
    from gptlab.config import SampleConfig

    return SampleConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop), ignore_eot=args.ignore_eot, seed=args.seed, **fields,
    )  # fmt: skip


def _dtype(name: str, device):
    import torch

    from gptlab.train import fast_bf16

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.bfloat16 if fast_bf16(device) else torch.float32}[name]


CHAT_HELP = "commands: /reset forgets the conversation, /system TEXT sets the system message, /quit leaves"


def cmd_chat(args: argparse.Namespace) -> int:
    from gptlab.chat import ChatTemplate, fit_history
    from gptlab.checkpoint import load_checkpoint
    from gptlab.errors import InputError
    from gptlab.generate import Engine, measured_kernels
    from gptlab.train import resolve_device

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.ckpt, device=device)  # a LoRA run's adapters are merged in
    template = ChatTemplate(ckpt.tokenizer)
    engine = Engine(ckpt.model, ckpt.tokenizer, dtype=_dtype(args.dtype, device), **measured_kernels(device, 1))
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    room = ckpt.model.config.block_size - min(args.max_new_tokens, ckpt.model.config.block_size // 2)
    if interactive:
        print(f"chatting with {ckpt.path} ({CHAT_HELP})")
    turn = 0
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            history = []
            print("(conversation cleared)" if interactive else "", end="\n" if interactive else "")
            continue
        if line.startswith("/system"):
            text = line[len("/system") :].strip()
            system = [{"role": "system", "content": text}] if text else []
            if interactive:
                print(f"(system message {'set' if text else 'cleared'})")
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {CHAT_HELP}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            messages = fit_history(template, system + history, room)
        except InputError as err:
            history.pop()
            print(f"gptlab: {err}", file=sys.stderr)
            continue
        cfg = _sample_config(args, stop_token_ids=(template.end_id,), context_overflow="error")
        if args.seed is not None:
            cfg = cfg.replace(seed=args.seed + turn)  # every turn reproducible, not all alike
        if interactive:
            sys.stdout.write("assistant> ")
        reply = ""
        for ev in engine.stream([template.generation_prompt(messages)], cfg):
            reply += ev.text
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
        turn += 1
    return 0


def _add_sampling_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--max-new-tokens", type=int, default=256)
    t.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    t.add_argument("--top-k", type=int)
    t.add_argument("--top-p", type=float)
    t.add_argument("--min-p", type=float, help="drop tokens less likely than min-p times the most likely one")
    t.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on tokens already seen (1.0: off)")
    t.add_argument("--presence-penalty", type=float, default=0.0)
    t.add_argument("--frequency-penalty", type=float, default=0.0)
    t.add_argument("--stop", action="append", default=[], help="stop string, cut from the output (repeatable)")
    t.add_argument("--ignore-eot", action="store_true", help="keep going past <|endoftext|>")
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="weights while generating; auto is bfloat16 where matmuls run it natively")
    t.add_argument("--device", default="auto")


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    t = command("sample", cmd_sample, "generate text from a checkpoint (KV cache, batches, streaming, speculative decoding)")
    t.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    t.add_argument("--prompt", help="prompt text; '-' or omitted reads stdin")
    t.add_argument("--batch-file", help="prompts to run as one batch: one per line, or a .jsonl file of strings / {\"prompt\": ...}")
    _add_sampling_flags(t)
    t.add_argument("--seed", type=int, help="seed of the first prompt; prompt i of a batch uses seed + i")
    t.add_argument("--stream", action="store_true", help="print text as it is generated")
    t.add_argument("--draft-ckpt", help="a smaller model with the same tokenizer for speculative decoding")
    t.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    t.add_argument("--sliding-window", action="store_true", help="keep going past the context: a long prompt keeps its end and the window slides")

    t = command("chat", cmd_chat, f"chat with a fine-tuned model in the terminal, replies streamed ({CHAT_HELP}); piped stdin: one message per line")
    t.add_argument("--ckpt", required=True, help="a chat model: an sft run (LoRA runs too) or checkpoint directory")
    t.add_argument("--system", help="system message at the start of the conversation")
    _add_sampling_flags(t)
    t.add_argument("--seed", type=int, help="seed of the first reply; reply i uses seed + i")

