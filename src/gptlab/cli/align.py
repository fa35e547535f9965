"""Alignment commands: dpo, grpo, reward (train, score)."""

from __future__ import annotations

import argparse
import os

from gptlab.cli.common import TRAIN_FIELDS, Register, add_train_flags, explicit, report_train
from gptlab.cli.finetune import files


def _pair_config(args: argparse.Namespace, config_cls: type, names: tuple[str, ...]):
    """The run's config from --data/--val-data and the flags in `names` the user set (None without --data: a resume)."""
    if not args.data:
        return None
    set_flags = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return config_cls(data=files(args.data), val_data=files(args.val_data), **set_flags)


def _reported(result) -> int:
    if os.environ.get("RANK", "0") == "0":  # under torchrun the main process reports
        report_train(result)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from gptlab.align.dpo import DPOConfig, dpo

    cfg = _pair_config(args, DPOConfig, ("val_fraction", "beta", "loss", "label_smoothing", "sft_weight", "max_len", "epochs"))
    return _reported(dpo(args.policy, cfg, explicit(args, TRAIN_FIELDS), args.out, resume=args.resume, progress=not args.quiet, started=args.started))


RL_FIELDS = {
    "grpo": ("group_size", "prompts_per_step", "max_new_tokens", "temperature", "clip", "beta", "updates_per_rollout", "eval_prompts"),
    "ppo": ("prompts_per_step", "max_new_tokens", "temperature", "epochs", "minibatches", "clip", "value_clip", "vf_coef", "value_lr", "gamma", "lam",
            "kl_coef", "target_kl", "eval_prompts"),
}  # fmt: skip


def cmd_rl(args: argparse.Namespace) -> int:
    from gptlab.train import format_seconds

    if args.command == "grpo":
        from gptlab.align.grpo import GRPOConfig as Config
        from gptlab.align.grpo import grpo as run
    else:
        from gptlab.align.ppo import PPOConfig as Config
        from gptlab.align.ppo import ppo as run
    cfg = None
    if args.prompts:
        fields = {"prompts": files(args.prompts), "val_prompts": files(args.val_prompts), "reward": args.reward or ""}
        fields |= {k: getattr(args, k) for k in RL_FIELDS[args.command] if getattr(args, k) is not None}
        if getattr(args, "fixed_kl", False):
            fields["target_kl"] = None
        cfg = Config(**fields)
    result = run(args.policy, cfg, explicit(args, TRAIN_FIELDS), args.out, resume=args.resume, progress=not args.quiet)
    if result.stopped_by is not None:
        print(f"stopped by {result.stopped_by} after step {result.step}; continue with the same command and --resume")
    if result.val is not None:
        from gptlab.align.rl import describe_val

        print(f"step {result.step}: held-out {describe_val(result.val)}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"{format_seconds(result.seconds)} in all")
    return 0


def cmd_reward_train(args: argparse.Namespace) -> int:
    from gptlab.align.reward import RewardConfig, train_reward

    cfg = _pair_config(args, RewardConfig, ("val_fraction", "max_len", "epochs", "margin", "center_weight", "head_dropout"))
    return _reported(train_reward(args.ckpt, cfg, explicit(args, TRAIN_FIELDS), args.out, resume=args.resume, progress=not args.quiet, started=args.started))


def cmd_reward_score(args: argparse.Namespace) -> int:
    from gptlab.align.pairs import Pair
    from gptlab.align.reward import load_reward_model, read_scoring_data, score_conversations
    from gptlab.train import resolve_device

    ckpt = load_reward_model(args.ckpt, resolve_device(args.device))
    rows = read_scoring_data(args.data)
    if isinstance(rows[0], Pair):
        pairs: list[Pair] = rows  # type: ignore[assignment]
        conversations = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        scores = score_conversations(ckpt.model, ckpt.tokenizer, conversations, args.batch_size).tolist()
        chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
        for c, r in zip(chosen, rejected):
            print(f"chosen {c:.4f}\trejected {r:.4f}\tmargin {c - r:+.4f}")
        gaps = [c - r for c, r in zip(chosen, rejected)]
        print(f"{len(pairs)} pairs: accuracy {sum(g > 0 for g in gaps) / len(gaps):.2%}, mean margin {sum(gaps) / len(gaps):.4f}, "
              f"mean reward {sum(scores) / len(scores):.4f}")  # fmt: skip
    else:
        conversations = [[*row.prompt, {"role": "assistant", "content": row.completion}] for row in rows]  # type: ignore[union-attr]
        for score in score_conversations(ckpt.model, ckpt.tokenizer, conversations, args.batch_size).tolist():
            print(f"{score:.4f}")
    return 0


def _pair_data_flags(t: argparse.ArgumentParser) -> None:
    """--data, --val-data and --val-fraction of the commands that train on preference pairs (dpo, reward train)."""
    t.add_argument(
        "--data", action="append", metavar="FILE[,FILE]",
        help='JSONL pairs {"prompt", "chosen", "rejected"} (strings or messages; or whole conversations without "prompt"), or builtin:NAME',
    )  # fmt: skip
    t.add_argument("--val-data", action="append", metavar="FILE[,FILE]", help="held-out pairs (default: a built-in set's test split, else --val-fraction)")
    t.add_argument("--val-fraction", type=float, help="share of --data held out when there is no --val-data (default 0.05)")


def _pair_run_flags(t: argparse.ArgumentParser) -> None:
    """--epochs, --out and --resume of the commands that train on preference pairs."""
    t.add_argument("--epochs", type=float, help="passes over the pairs, which set --max-steps (default 1)")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out with its saved data and settings")


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    t = command("dpo", cmd_dpo, "direct preference optimisation (Rafailov et al. 2023) of a chat model on preference pairs")
    t.add_argument("--policy", help="the chat model to optimise (an sft run or checkpoint); also the frozen reference")
    _pair_data_flags(t)
    t.add_argument("--beta", type=float, help="strength of the pull toward the reference (default 0.1)")
    t.add_argument("--loss", choices=["sigmoid", "ipo"], help="sigmoid: DPO (default); ipo: Azar et al. 2023")
    t.add_argument("--label-smoothing", type=float, help="conservative DPO: the share of labels assumed flipped (default 0)")
    t.add_argument("--sft-weight", type=float, help="add this times the chosen reply's NLL per token, which keeps its likelihood up (RPO; default 0)")
    t.add_argument("--max-len", type=int, help="tokens a side may predict; longer pairs keep their start (default: the context)")
    _pair_run_flags(t)
    add_train_flags(t, {
        "--max-steps": "optimizer steps (default: --epochs passes over the pairs)",
        "--lr": "peak learning rate (default 5e-6)", "--min-lr": "final learning rate (default 5e-7)",
        "--weight-decay": "AdamW decoupled weight decay (default 0)",
    })  # fmt: skip

    for name, help in (
        ("grpo", "group relative policy optimisation (Shao et al. 2024) of a chat model against a reward model or a Python reward function"),
        ("ppo", "PPO with a KL penalty toward the starting policy (RLHF's third stage; Ziegler et al. 2019) against a reward model or function"),
    ):
        t = command(name, cmd_rl, help)
        t.add_argument("--policy", help="the chat model to optimise (an sft run or checkpoint); also the frozen reference")
        t.add_argument("--prompts", action="append", metavar="FILE[,FILE]", help='JSONL {"prompt": str | messages, "answer": optional} or builtin:NAME')
        t.add_argument("--val-prompts", action="append", metavar="FILE[,FILE]", help="held-out prompts (default: a built-in set's test split)")
        t.add_argument(
            "--reward", help="a reward model (gptlab reward train), py:MODULE:FUNCTION or py:FILE.py:FUNCTION "
            "(fn(prompt, completion[, reference]) -> float), builtin:exact or builtin:length"
        )
        t.add_argument("--prompts-per-step", type=int, help=f"prompts per step (default {4 if name == 'grpo' else 16})")
        t.add_argument("--max-new-tokens", type=int, help="longest reply (default 32)")
        t.add_argument("--temperature", type=float, help="sampling temperature of the rollouts (default 1)")
        t.add_argument("--clip", type=float, help="PPO clip range of the probability ratio (default 0.2)")
        t.add_argument("--eval-prompts", type=int, help="held-out prompts scored (greedy) at each evaluation (default 100)")
        if name == "grpo":
            t.add_argument("--group-size", type=int, help="replies sampled per prompt (default 8)")
            t.add_argument("--beta", type=float, help="KL penalty toward the reference (default 0.04; 0: no reference)")
            t.add_argument("--updates-per-rollout", type=int, help="optimizer steps on each batch of rollouts (default 1)")
        else:
            t.add_argument("--epochs", type=int, help="PPO epochs over each batch of rollouts (default 4)")
            t.add_argument("--minibatches", type=int, help="minibatches per epoch (default 2)")
            t.add_argument("--value-clip", type=float, help="clip range of the value update (default 0.2)")
            t.add_argument("--vf-coef", type=float, help="weight of the value loss (default 0.1)")
            t.add_argument("--value-lr", type=float, help="the value head's peak learning rate, on --lr's schedule (default 1e-3)")
            t.add_argument("--gamma", type=float, help="discount (default 1)")
            t.add_argument("--lam", type=float, help="GAE lambda (default 0.95)")
            t.add_argument("--kl-coef", type=float, help="initial KL penalty coefficient beta (default 0.05)")
            t.add_argument("--target-kl", type=float, help="KL per reply (nats) the adaptive controller steers toward (default 6)")
            t.add_argument("--fixed-kl", action="store_true", help="keep the KL coefficient at --kl-coef (no controller)")
        t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
        t.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
        add_train_flags(t, {
            "--max-steps": "rollout-and-update steps (default 100)", "--lr": "peak learning rate (default 1e-5)",
            "--min-lr": "final learning rate (default 1e-6)", "--weight-decay": "AdamW decoupled weight decay (default 0)",
            "--eval-every": "steps between held-out evaluations (default 20)", "--save-every": "steps between checkpoints (default 50)",
        })  # fmt: skip

    # reward
    rp = sub.add_parser("reward", help="train and run reward models (RLHF stage 2) on preference pairs")
    rsub = rp.add_subparsers(dest="reward_command", required=True, metavar="ACTION")
    t = command("train", cmd_reward_train, "train a reward model: a scalar head on a chat model, Bradley-Terry loss on preference pairs", rsub)
    t.add_argument("--ckpt", help="the model to start from: an sft run (or a base model: the chat tokens are added)")
    _pair_data_flags(t)
    t.add_argument("--margin", type=float, help="reward gap m in -log sigmoid(r_w - r_l - m) (default 0)")
    t.add_argument("--center-weight", type=float, help="weight c of the centring term c (r_w + r_l)^2 that keeps rewards near 0 (default 0)")
    t.add_argument("--head-dropout", type=float, help="dropout before the reward head (default 0)")
    t.add_argument("--max-len", type=int, help="tokens a rendered conversation may have; longer pairs are skipped (default: the context)")
    _pair_run_flags(t)
    add_train_flags(t, {
        "--max-steps": "optimizer steps (default: --epochs passes over the pairs)",
        "--lr": "peak learning rate (default 1e-5)", "--min-lr": "final learning rate (default 1e-6)",
        "--weight-decay": "AdamW decoupled weight decay (default 0)",
    })  # fmt: skip
    t = command("score", cmd_reward_score, "score replies with a reward model: preference pairs, or prompt/completion rows", rsub)
    t.add_argument("--ckpt", required=True, help="a reward model (a reward train run or checkpoint)")
    t.add_argument(
        "--data", required=True, metavar="FILE",
        help='JSONL pairs {"prompt", "chosen", "rejected"} (a line per pair and the accuracy), builtin:NAME (its test split), '
        'or {"prompt", "completion"} rows (a score per row)',
    )  # fmt: skip
    t.add_argument("--batch-size", type=int, default=16, help="conversations per forward pass (default 16)")
    t.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
