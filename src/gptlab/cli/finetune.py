"""Fine-tuning commands: sft, merge-lora, finetune-cls, classify."""

from __future__ import annotations

import argparse
import os

from gptlab.cli.common import TRAIN_FIELDS, Register, add_train_flags, explicit, report_train


def files(values: list[str] | None) -> tuple[str, ...]:
    """--data a.jsonl,b.jsonl --data c.jsonl -> ("a.jsonl", "b.jsonl", "c.jsonl")."""
    return tuple(part for value in values or () for part in value.split(",") if part)


def cmd_sft(args: argparse.Namespace) -> int:
    from gptlab.errors import ConfigError
    from gptlab.finetune.sft import SFTConfig, sft

    cfg = None
    if args.data:
        fields = {"data": files(args.data), "val_data": files(args.val_data), "packing": not args.no_packing}
        fields |= {k: v for k, v in (("val_fraction", args.val_fraction), ("max_len", args.max_len), ("epochs", args.epochs)) if v is not None}
        cfg = SFTConfig(**fields)
    lora = None
    if args.lora_r is not None or args.qlora is not None:
        from gptlab.finetune.lora import LoRAConfig

        fields = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "base_bits": args.qlora}
        if args.lora_targets is not None:
            fields["targets"] = tuple(t for t in args.lora_targets.split(",") if t)
        lora = LoRAConfig(**{k: v for k, v in fields.items() if v is not None})
    elif any(v is not None for v in (args.lora_alpha, args.lora_dropout, args.lora_targets)):
        raise ConfigError("--lora-alpha, --lora-dropout and --lora-targets need --lora-r (or --qlora)")
    result = sft(
        args.ckpt, cfg, explicit(args, TRAIN_FIELDS), args.out, lora=lora, resume=args.resume, progress=not args.quiet, started=args.started
    )
    if os.environ.get("RANK", "0") == "0":
        report_train(result)
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from gptlab.finetune.lora import merge_lora_checkpoint

    out = merge_lora_checkpoint(args.run, args.out, force=args.force)
    print(f"merged the adapters into the weights: {out} (a plain checkpoint: sample, eval, chat, export-hf, sft take it)")
    return 0


def cmd_finetune_cls(args: argparse.Namespace) -> int:
    import dataclasses

    from gptlab.finetune.heads import TaskConfig, finetune_task

    cfg = None
    if args.data:
        fields = {"task": args.task, "data": files(args.data), "val_data": files(args.val_data)}
        optional = (("val_fraction", args.val_fraction), ("lm_weight", args.lm_weight), ("epochs", args.epochs), ("head_dropout", args.head_dropout))
        cfg = TaskConfig(**fields, **{k: v for k, v in optional if v is not None})
    result = finetune_task(args.ckpt, cfg, explicit(args, TRAIN_FIELDS), args.out, resume=args.resume, progress=not args.quiet, started=args.started)
    if os.environ.get("RANK", "0") == "0":
        report_train(dataclasses.replace(result, val=None))  # its val line would call the accuracy a token accuracy
        if result.val is not None:
            print(f"step {result.step}: held-out loss {result.val['loss']:.4f} | accuracy {result.val['accuracy']:.2%}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from gptlab.errors import InputError
    from gptlab.finetune.heads import Classifier, read_examples
    from gptlab.train import resolve_device

    if (args.text is None) == (args.input is None):
        raise InputError("give --text (one example) or --input FILE (JSONL rows), not both")
    clf = Classifier(args.ckpt, device=resolve_device(args.device))
    if args.input is not None:
        examples = read_examples(args.input, clf.spec.task, need_label=False)
    else:
        examples = [clf.example(args.text, args.text_b, args.choices)]
    probs, data = clf.probabilities(examples, batch_size=args.batch_size)
    if args.text is not None:
        p = probs[0]
        names = clf.spec.names(len(p))
        print(names[int(p.argmax())])
        print("probabilities: " + " | ".join(f"{name} {float(q):.4f}" for name, q in zip(names, p)))
        return 0
    correct = labelled = 0
    for p, label in zip(probs, data.labels):
        best = int(p.argmax())
        print(f"{clf.spec.names(len(p))[best]}\t{float(p[best]):.4f}")
        if label >= 0:  # rows without a label are predicted, not scored
            labelled += 1
            correct += best == label
    if labelled:
        print(f"accuracy: {correct / labelled:.2%} ({correct} of {labelled} labelled rows)")
    return 0


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    t = command("sft", cmd_sft, "supervised fine-tuning on conversations (chat, prompt/completion or Alpaca JSONL, or builtin:NAME)")
    t.add_argument("--ckpt", help="the base model: a run or checkpoint directory (not needed with --resume)")
    t.add_argument(
        "--data", action="append", metavar="FILE[,FILE]",
        help="JSONL files (each in one of the three shapes) or builtin:NAME (arithmetic, spelling, sorting, stdlib, mix); repeatable",
    )  # fmt: skip
    t.add_argument("--val-data", action="append", metavar="FILE[,FILE]", help="held-out conversations (default: a built-in set's test split, else --val-fraction of --data)")
    t.add_argument("--val-fraction", type=float, help="share of --data held out when there is no --val-data (default 0.05)")
    t.add_argument("--max-len", type=int, help="tokens a conversation may predict; longer ones keep their start (default: the model's context)")
    t.add_argument("--epochs", type=float, help="passes over the data, which set --max-steps (default 3)")
    t.add_argument("--no-packing", action="store_true", help="one conversation per row, padded, instead of packing several per row")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out with its saved data and settings")
    lo = t.add_argument_group("LoRA / QLoRA (Hu et al. 2021; Dettmers et al. 2023): freeze the base, train low-rank adapters")
    lo.add_argument("--lora-r", type=int, help="adapter rank; turns LoRA on (default 8 with --qlora)")
    lo.add_argument("--lora-alpha", type=float, help="the update is scaled by alpha / r (default 16)")
    lo.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    lo.add_argument("--lora-targets", metavar="NAME[,NAME]", help="Linear layers to adapt, by name or dotted suffix (default c_attn,c_proj,c_fc)")
    lo.add_argument("--qlora", type=int, choices=[4, 8], help="keep the frozen base in 4-bit NF4 or int8, dequantized on the fly")
    add_train_flags(t, {
        "--max-steps": "optimizer steps (default: --epochs passes over the data)",
        "--lr": "peak learning rate (default 5e-5; 2e-4 with LoRA)", "--min-lr": "final learning rate (default 5e-6; 2e-5 with LoRA)",
        "--weight-decay": "AdamW decoupled weight decay (default 0)",
    })  # fmt: skip

    t = command("merge-lora", cmd_merge_lora, "fold a LoRA run's adapters into its base: a plain checkpoint")
    t.add_argument("run", help="the LoRA run (or one of its checkpoints)")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--force", action="store_true", help="replace --out if it already holds files")

    t = command(
        "finetune-cls", cmd_finetune_cls,
        "fine-tune with a task head as GPT-1 (Radford et al. 2018): classify, entail, similar or choice JSONL rows",
    )  # fmt: skip
    t.add_argument("--ckpt", help="the base model: a run or checkpoint directory (not needed with --resume)")
    t.add_argument("--task", default="classify", metavar="{classify,entail,similar,choice}",  # checked by TaskConfig: one line, exit 2
                   help='rows {"text", "label"} | {"premise", "hypothesis", "label"} | {"text_a", "text_b", "label"} | '
                   '{"context", "choices", "label": index} (default classify)')  # fmt: skip
    t.add_argument("--data", action="append", metavar="FILE[,FILE]", help="JSONL files of labelled rows; repeatable")
    t.add_argument("--val-data", action="append", metavar="FILE[,FILE]", help="held-out rows (default: --val-fraction of --data)")
    t.add_argument("--val-fraction", type=float, help="share of --data held out when there is no --val-data (default 0.1)")
    t.add_argument("--lm-weight", type=float, help="lambda of the auxiliary language-model loss, L = L_task + lambda L_lm (default 0.5)")
    t.add_argument("--head-dropout", type=float, help="dropout on the hidden state the head reads (default 0.1)")
    t.add_argument("--epochs", type=float, help="passes over the data, which set --max-steps (default 3)")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out with its saved data and settings")
    add_train_flags(t, {
        "--max-steps": "optimizer steps (default: --epochs passes over the data)", "--batch-size": "examples per batch (default 8; the paper used 32)",
        "--lr": "peak learning rate (default 6.25e-5, the paper's)", "--min-lr": "final learning rate (default 0)",
        "--weight-decay": "AdamW decoupled weight decay (default 0.01, the paper's)",
    })  # fmt: skip

    t = command("classify", cmd_classify, "predict with a finetune-cls model: the label and its probabilities")
    t.add_argument("--ckpt", required=True, help="a finetune-cls run or checkpoint directory")
    t.add_argument("--text", help="the text (classify), premise (entail), first text (similar) or context (choice)")
    t.add_argument("--text-b", help="the hypothesis (entail) or second text (similar)")
    t.add_argument("--choices", nargs="+", metavar="CHOICE", help="the choices (choice)")
    t.add_argument("--input", metavar="FILE", help="JSONL rows of the task's shape: one prediction per line, and the accuracy over rows with a label")
    t.add_argument("--batch-size", type=int, default=32, help="examples per forward pass with --input (default 32)")
    t.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
