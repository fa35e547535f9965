"""Compression commands: quantize, prune, distill."""

from __future__ import annotations

import argparse

from gptlab.cli.common import TRAIN_FIELDS, Register, add_model_flags, add_train_flags, explicit, model_fields, report_train


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


def cmd_prune(args: argparse.Namespace) -> int:
    from gptlab.compress.prune import PruneConfig, prune_and_recover, prune_checkpoint
    from gptlab.config import TrainConfig
    from gptlab.errors import ConfigError

    cfg = PruneConfig(sparsity=args.sparsity, method=args.method, structured=args.structured, calibration=args.calibration)
    train_fields = explicit(args, TRAIN_FIELDS)
    if not args.recover:
        if train_fields or args.resume or args.stop_at is not None:
            raise ConfigError("training flags (and --resume, --stop-at) set the recovery fine-tune: add --recover")
        out, info = prune_checkpoint(args.ckpt, args.out, cfg, data=args.data, force=args.force)
    else:
        if args.data is None:
            raise ConfigError("--recover fine-tunes on a prepared data directory: give --data")
        fields = {"max_steps": 200, "lr": 1e-4, **train_fields}  # a short, gentle fine-tune unless told otherwise
        recover = TrainConfig(**{"min_lr": fields["lr"] / 10, **fields})
        result, info = prune_and_recover(
            args.ckpt, args.data, args.out, cfg, recover, resume=args.resume, stop_at=args.stop_at, progress=not args.quiet,
            resume_overrides=train_fields, report=print, started=args.started,
        )  # fmt: skip
        report_train(result)
        out = args.out
    what = "of the blocks' matrix weights set to zero"
    if info["structured"] is not None:
        what = f"of the blocks' matrix weights removed: {info['kept_units']} of {info['units']} {'heads' if info['structured'] == 'heads' else 'MLP channels'} kept per layer"
    print(f"pruned {args.ckpt} ({info['method']}): {100 * info['removed_fraction']:.1f}% {what}")
    print(f"checkpoint: {out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from gptlab.checkpoint import find_checkpoint, read_checkpoint_meta
    from gptlab.compress.distill import distill, student_config
    from gptlab.config import GPTConfig, TrainConfig
    from gptlab.errors import CheckpointError, ConfigError

    teacher = find_checkpoint(args.teacher)
    if teacher is None:
        raise CheckpointError(f"{args.teacher}: run directory has no checkpoint yet")
    if args.time_budget is not None and args.max_steps is not None:
        raise ConfigError("--time-budget sets the number of steps of a new run; give it or --max-steps, not both")
    student = student_config(GPTConfig.from_dict(read_checkpoint_meta(teacher)["model_config"]), model_fields(args))
    train_fields = explicit(args, TRAIN_FIELDS)
    result = distill(
        teacher, args.data, args.out, student, TrainConfig(**train_fields), {k: v for k, v in (("temperature", args.temperature), ("alpha", args.alpha)) if v is not None},
        resume=args.resume, stop_at=args.stop_at, progress=not args.quiet, resume_overrides=train_fields, report=print, started=args.started,
    )  # fmt: skip
    report_train(result)
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

    t = command("prune", cmd_prune, "remove a fraction of a checkpoint's weights: single weights, attention heads or MLP channels (magnitude or Wanda)")
    t.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    t.add_argument("--out", required=True, help="checkpoint directory to write (with --recover: the fine-tuning run's directory)")
    t.add_argument("--sparsity", type=float, required=True, help="fraction removed, e.g. 0.5")
    t.add_argument("--method", choices=("magnitude", "wanda"), default="magnitude", help="score |W| (default) or |W| x input norm (Wanda, needs --data)")
    t.add_argument("--structured", choices=("heads", "mlp"), help="remove whole attention heads or MLP channels (the matrices shrink) instead of single weights")
    t.add_argument("--data", help="prepared data directory (same tokenizer): Wanda's calibration text and the recovery fine-tune's data")
    t.add_argument("--calibration", type=int, default=32, help="calibration sequences for Wanda (default 32)")
    t.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    t.add_argument("--recover", action="store_true", help="then fine-tune the pruned model on --data (pruned weights stay zero); default 200 steps at lr 1e-4")
    t.add_argument("--resume", action="store_true", help="with --recover: continue the recovery run in --out")
    t.add_argument("--stop-at", type=int, help="with --recover: stop after this step")
    add_train_flags(t, {"--max-steps": "recovery steps (default 200)", "--lr": "recovery learning rate (default 1e-4)", "--min-lr": "final learning rate (default: --lr / 10)"})

    t = command("distill", cmd_distill, "train a smaller student on prepared shards with a teacher's soft targets (knowledge distillation, Hinton et al. 2015)")
    t.add_argument("--teacher", required=True, help="the teacher's run or checkpoint directory (the data's tokenizer)")
    t.add_argument("--data", required=True, help="data directory from `gptlab prepare`, tokenized with the teacher's tokenizer")
    t.add_argument("--out", required=True, help="the student's run directory")
    t.add_argument("--temperature", type=float, help="tau: softens both distributions (default 2; a resumed run keeps its own)")
    t.add_argument("--alpha", type=float, help="weight of the teacher's term; 1 - alpha goes to the data's tokens (default 0.5; a resumed run keeps its own)")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint (fresh start if none)")
    t.add_argument("--stop-at", type=int, help="stop after this step (schedule still set by --max-steps)")
    add_model_flags(t)  # the student's shape: the teacher's with these changes (none: half its layers)
    add_train_flags(t)
