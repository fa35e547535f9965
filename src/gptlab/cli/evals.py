"""`gptlab evaluate`: task accuracy, exact match, BLEU and perplexity; `gptlab attention`: what the model attends to."""

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


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from gptlab.checkpoint import load_checkpoint
    from gptlab.errors import InputError
    from gptlab.evals.harness import Prompter, build_prompts, report_card, run_task
    from gptlab.evals.tasks import resolve_tasks
    from gptlab.train import resolve_device

    for name in ("shots", "limit", "show_prompt"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.limit == 0 or args.batch_size < 1:
        raise InputError(f"--{'limit' if args.limit == 0 else 'batch-size'} must be at least 1")
    if args.out and not args.out.endswith(".json"):
        raise InputError(f"--out {args.out}: name a .json file (the report card goes next to it as .md)")
    tasks = resolve_tasks(args.tasks, args.stride)  # a bad task file fails before the model loads
    ckpt = load_checkpoint(args.ckpt, device=resolve_device(args.device))
    chat = None
    if args.chat:
        from gptlab.chat import ChatTemplate

        chat = ChatTemplate(ckpt.tokenizer)
    if args.show_prompt is not None:
        prompter = Prompter(ckpt.tokenizer, chat)
        for task in tasks:
            if task.output_type == "loglikelihood_rolling":
                print(f"== {task.name}: a perplexity task scores its documents whole; no prompt")
                continue
            shots = task.num_fewshot if args.shots is None else args.shots
            docs, contexts = build_prompts(task, prompter, shots, args.seed, args.show_prompt + 1, args.cot)
            if args.show_prompt >= len(docs):
                raise InputError(f"--show-prompt {args.show_prompt}: {task.name} has {len(docs)} test documents")
            doc, context = docs[-1], contexts[-1]
            print(f"== {task.name}, document {args.show_prompt} ({doc.where}), {shots} shots: the prompt between the rules")
            print("-" * 72)
            print(prompter.show(context), end="")
            print("\n" + "-" * 72)
            if task.output_type == "multiple_choice":
                choices = task.choices(doc)
                gold = task.gold(doc, choices)
                for j, c in enumerate(choices):
                    print(f"continuation {j}{' (gold)' if j == gold else ''}: {(task.target_delimiter if chat is None else '') + c!r}")
            else:
                print(f"reference: {task.references(doc)}; generation stops at {list(task.stop_strings)} or {task.max_gen_toks} tokens")
        return 0
    started = time.perf_counter()
    results = []
    for task in tasks:
        r = run_task(ckpt.model, ckpt.tokenizer, task, shots=args.shots, seed=args.seed, limit=args.limit, cot=args.cot, chat=chat,
                     batch_size=args.batch_size, progress=not args.quiet)  # fmt: skip
        results.append(r)
        shown = ", ".join(f"{k} {v:.4f}" + (f" ± {e:.4f}" if e is not None else "") for k, (v, e) in r.metrics.items())
        cut = f", {r.truncated} truncated from the left" if r.truncated else ""
        print(f"{task.name}: {shown} ({r.docs} docs, {r.shots} shots{cut}, {r.seconds:.1f} s, {r.docs / max(r.seconds, 1e-9):.1f} docs/s)", flush=True)
    title = f"{ckpt.path} (step {ckpt.step}){' with the chat template' if chat else ''}{', chain of thought' if args.cot else ''}"
    card = report_card(results, title)
    print()
    print(card, end="")
    if args.out:
        from gptlab.fileio import write_atomic

        out = Path(args.out)
        doc = {
            "checkpoint": str(ckpt.path), "step": ckpt.step, "tokenizer": ckpt.tokenizer.name,
            "settings": {"shots": args.shots, "seed": args.seed, "limit": args.limit, "cot": args.cot, "chat": args.chat, "stride": args.stride},
            "seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "results": [r.to_json(with_samples=args.log_samples) for r in results],
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, (json.dumps(doc, indent=1) + "\n").encode())
        write_atomic(out.with_suffix(".md"), card.encode())
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    t = command("evaluate", cmd_evaluate, "score a checkpoint on tasks: multiple choice by log-likelihood, generation with exact match / BLEU / chrF, perplexity; few-shot and chain of thought")
    t.add_argument("--ckpt", required=True, help="run directory or checkpoint directory (pretrained, fine-tuned or imported with import-hf)")
    t.add_argument("--tasks", required=True, help="comma-separated: built-in tasks (arithmetic_mc, arithmetic, word_problems, stdlib_mc, analogies, number_words), "
                                                   "task files (.yaml/.json, lm-eval's schema over local JSONL) and text files (.txt: perplexity and bits per byte)")  # fmt: skip
    t.add_argument("--shots", type=int, help="exemplars per prompt from the task's fewshot split (default: the task's num_fewshot, 0 for built-ins)")
    t.add_argument("--cot", action="store_true", help="chain of thought on generation tasks: exemplars with their reasoning (with --shots), "
                                                      "or zero-shot \"Let's think step by step.\" then \"Therefore, the answer is\"")  # fmt: skip
    t.add_argument("--chat", action="store_true", help="ask through the chat template (a fine-tuned chat model): exemplars as earlier turns")
    t.add_argument("--limit", type=int, help="evaluate only the first N test documents of each task")
    t.add_argument("--seed", type=int, default=0, help="draws the exemplars (per document) and seeds sampled generation")
    t.add_argument("--stride", type=int, help="perplexity tasks: tokens each window moves on (default: the context, no overlap)")
    t.add_argument("--batch-size", type=int, default=16, help="documents per forward pass")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--out", help="results JSON to write; a Markdown report card goes next to it (.md)")
    t.add_argument("--log-samples", action="store_true", help="with --out: keep every document's scores, generation and answer in the JSON")
    t.add_argument("--show-prompt", type=int, metavar="N", help="print test document N's exact prompt and continuations for each task, and stop")

    t = command("attention", cmd_attention, "draw a checkpoint's attention weights for a text: heatmaps per layer and head, tokens on both axes")
    t.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    t.add_argument("--text", required=True, help="the text to run (at most the model's context, in tokens)")
    t.add_argument("--out", required=True, help="PNG to write")
    t.add_argument("--layer", type=int, help="draw this layer's heads only (default: every layer)")
    t.add_argument("--head", type=int, help="with --layer: draw this one head, large")
    t.add_argument("--html", help="also write a self-contained HTML page to pick a layer and head and read each weight")
