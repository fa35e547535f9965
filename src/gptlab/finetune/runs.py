"""What every fine-tuning command does around train.train: find the run to resume and the
settings saved in it, and fill in the schedule a user did not set.

A fine-tuning run (sft, finetune-cls, dpo, reward) saves its data settings under one key of
checkpoint.json (checkpoint_meta), so `--resume` rebuilds the same objective from the
checkpoint alone; the settings cannot change on resume (the batches would not continue).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import ConfigError
from gptlab.tokenizer import AnyTokenizer, same_encoding


@dataclass
class Resumed:
    """A run directory's latest checkpoint and what it says about the run."""

    path: Path  # the checkpoint directory
    meta: dict[str, Any]  # its checkpoint.json
    settings: Any  # the run's saved settings (cfg_cls.from_dict of meta[key])
    block_size: int
    seed: int


def find_resumed(run_dir: Path, key: str, cfg_cls: type, cfg: Any, command: str) -> Resumed | None:
    """The checkpoint to resume in run_dir (None: start fresh); a ConfigError if it is not a `command` run or cfg differs."""
    from gptlab.checkpoint import find_checkpoint, read_checkpoint_meta

    ckpt_dir = find_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt_dir is None:
        return None
    meta = read_checkpoint_meta(ckpt_dir)
    if key not in meta:
        raise ConfigError(f"{ckpt_dir} is not a {command} checkpoint (no {key!r} settings in checkpoint.json)")
    saved = cfg_cls.from_dict(meta[key])
    if cfg is not None and cfg != saved:
        changed = [k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v]
        raise ConfigError(f"cannot change the data or its settings when resuming {ckpt_dir}: {', '.join(changed)} differ(s) from the checkpoint")
    block = GPTConfig.from_dict(meta["model_config"]).block_size
    seed = (meta.get("train_config") or {}).get("seed", TrainConfig().seed)
    return Resumed(ckpt_dir, meta, saved, block, seed)


def check_reference(reference: Any, policy_config: GPTConfig, policy_tokenizer: AnyTokenizer) -> None:
    """A resumed DPO or RL run reloads its frozen reference (a Checkpoint) from the starting checkpoint's path;
    ConfigError when what is there now cannot be the model the run started from (another vocabulary or
    tokenizer): its log-probabilities would be read at the wrong ids, silently."""
    what = f"the reference {reference.path} (the run's starting policy, reloaded to resume)"
    if reference.model_config.vocab_size != policy_config.vocab_size:
        raise ConfigError(f"{what} has {reference.model_config.vocab_size} token rows but the policy {policy_config.vocab_size}: it changed since the run began")
    if not same_encoding(reference.tokenizer, policy_tokenizer):
        raise ConfigError(f"{what} has another tokenizer than the policy ({reference.tokenizer.name!r}, {reference.tokenizer.vocab_size} ids vs "
                          f"{policy_tokenizer.name!r}, {policy_tokenizer.vocab_size} ids): it changed since the run began")  # fmt: skip


def check_fresh(base: Any, cfg: Any, train_fields: dict[str, Any], needs: str) -> None:
    """A new run needs its base and data; --time-budget and --max-steps exclude each other."""
    if base is None or cfg is None:
        raise ConfigError(f"a new run needs {needs}")
    if train_fields.get("time_budget") is not None and train_fields.get("max_steps") is not None:
        raise ConfigError("--time-budget sets the number of steps of a new run; give it or --max-steps, not both")


def schedule(
    defaults: dict[str, Any], train_fields: dict[str, Any], epochs: float, rows_per_epoch: Callable[[TrainConfig], int],
    eval_batches: Callable[[TrainConfig], int] | None,
) -> TrainConfig:
    """The TrainConfig of a fine-tuning run: the user's fields over `defaults`; unless set, max_steps covers
    `epochs` passes of rows_per_epoch rows, eval_batches covers the held-out set once, and there are ~5 evaluations."""
    cfg = TrainConfig(**(defaults | train_fields))
    if "max_steps" not in train_fields:
        cfg = cfg.replace(max_steps=max(1, math.ceil(epochs * rows_per_epoch(cfg) / (cfg.batch_size * cfg.grad_accum))))
    if "eval_batches" not in train_fields and eval_batches is not None:
        cfg = cfg.replace(eval_batches=eval_batches(cfg))
    if "eval_every" not in train_fields:
        cfg = cfg.replace(eval_every=max(1, min(cfg.eval_every, cfg.max_steps // 5)))
    return cfg


def held_out(n: int, fraction: float, seed: int) -> set[int] | None:
    """The indices of a seeded `fraction` of n rows to hold out for evaluation; None (no held-out set)
    under 10 rows or when the fraction rounds to none. Every fine-tuning command splits its data this way."""
    import numpy as np

    n_val = round(n * fraction)
    if n < 10 or n_val == 0:
        return None
    return set(np.random.default_rng([seed, 0]).permutation(n)[:n_val].tolist())
