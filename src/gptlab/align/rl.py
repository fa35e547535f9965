"""What the on-policy RL commands (grpo, ppo) share around their rollout → update loops: loading
the policy (fresh or resumed) and its frozen reference, the prompts and the reward, the prompt
cursor, the optimizer, the metrics log and checkpoints, and held-out evaluation.

The loops themselves are the methods; everything here reuses train.py's pieces (optimizer,
schedule, MetricsLog, checkpoints), so a policy checkpoint is a plain GPT checkpoint that
sample, chat, eval and export take, and --resume restores optimizer, cursor and RNG.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptlab.align.rewards import PY_PREFIX, Reward, Scores, Skip, load_reward_function, safe_rewards
from gptlab.align.rollout import PromptRow, read_prompt_rows
from gptlab.chat import ChatTemplate
from gptlab.config import SampleConfig, TrainConfig
from gptlab.errors import CheckpointError, ConfigError
from gptlab.tokenizer import AnyTokenizer


class PromptCursor:
    """Prompts in a seeded order, epoch after epoch; its position is two integers (saved in checkpoints)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.row = n, seed, 0, 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            out.append(int(np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[self.row]))
            self.row += 1
            if self.row == self.n:
                self.epoch, self.row = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


@torch.no_grad()
def greedy_replies(policy: nn.Module, template: ChatTemplate, rows: list[PromptRow], max_new_tokens: int) -> list[str]:
    """The policy's greedy replies to `rows`, through the KV-cached engine."""
    from gptlab.chat import reply_all
    from gptlab.generate import Engine

    engine = Engine(policy, template.tokenizer, onednn=False)  # the policy's current weights
    return reply_all(engine, template, [r.messages for r in rows], SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0))


def evaluate_replies(template: ChatTemplate, rows: list[PromptRow], replies: list[str], reward: Reward | ModelReward) -> dict[str, float]:
    """Replies to `rows` scored: their mean reward (skipped samples left out), their mean length in tokens, and,
    when the rows carry reference answers, the exact-match accuracy: a check that does not go through the
    reward, so a reward the policy learns to exploit shows as reward rising while accuracy falls."""
    from gptlab.datasets import exact_match

    scores = score(reward, [r.messages for r in rows], replies, [r.reference for r in rows])
    values = [v for v in scores.rewards if v is not None]
    out = {"reward": sum(values) / max(len(values), 1), "reply_tokens": sum(len(template.tokenizer.encode_ordinary(t)) for t in replies) / len(replies)}
    checked = [(reply, r.reference) for reply, r in zip(replies, rows, strict=True) if r.reference is not None]
    if checked:
        out["accuracy"] = sum(exact_match(reply, ref) for reply, ref in checked) / len(checked)
    return out


def evaluate_policy(policy: nn.Module, template: ChatTemplate, rows: list[PromptRow], reward: Reward | ModelReward, max_new_tokens: int) -> dict[str, float]:
    """The policy's greedy replies to `rows`, scored by evaluate_replies."""
    return evaluate_replies(template, rows, greedy_replies(policy, template, rows, max_new_tokens), reward)


def describe_val(val: dict[str, float]) -> str:
    """'mean reward 0.8125 | exact match 75.00% | 3.2 tokens' for a progress line."""
    parts = [f"mean reward {val['reward']:.4f}"] + ([f"exact match {val['accuracy']:.2%}"] if "accuracy" in val else [])
    return " | ".join([*parts, f"{val['reply_tokens']:.1f} tokens a reply"])


@dataclass
class RLResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    val: dict[str, float] | None
    stopped_by: str | None
    seconds: float


# training flags the rollout loop has no use for (yet), and why: an error, not a silent no-op
NOT_USED = {
    "batch_size": "a step's batch is set by the prompts per step (and group size)", "grad_accum": "a step's batch is set by the prompts per step",
    "eval_batches": "evaluations score --eval-prompts held-out prompts", "time_budget": "give --max-steps",
    "strategy": "it runs in one process", "compile": "it runs eagerly", "activation_checkpointing": "it keeps activations",
    "dtype": "it runs in float32", "max_bad_steps": "a non-finite loss stops it at once",
}  # fmt: skip


class ModelReward:
    """A reward-model checkpoint (gptlab reward train) as the reward: it scores a batch of replies in one pass."""

    def __init__(self, path: str, policy_tokenizer: AnyTokenizer, device: torch.device) -> None:
        from gptlab.align.reward import check_same_tokenizer, load_reward_model

        ckpt = load_reward_model(path, device)
        check_same_tokenizer(ckpt.tokenizer, policy_tokenizer)
        self.name, self.model, self.tokenizer = f"reward model {ckpt.path}", ckpt.model, ckpt.tokenizer

    def scores(self, prompts: list[Any], completions: list[str]) -> Scores:
        from gptlab.align.reward import score_replies

        values = score_replies(self.model, self.tokenizer, prompts, completions).tolist()
        skips = [Skip(i, f"the reward model scored {v}") for i, v in enumerate(values) if not np.isfinite(v)]
        return Scores([v if np.isfinite(v) else None for v in values], skips)


def load_reward(spec: str, policy_tokenizer: AnyTokenizer, device: torch.device) -> Reward | ModelReward:
    """A reward function (py:..., builtin:...) or, for any other spec, the reward-model checkpoint it names."""
    if spec.startswith((PY_PREFIX, "builtin:")):
        return load_reward_function(spec)
    return ModelReward(spec, policy_tokenizer, device)


def score(reward: Reward | ModelReward, prompts: list[Any], completions: list[str], references: list[str | None]) -> Scores:
    """The rewards of a batch of replies, None (and a Skip) for any sample that could not be scored."""
    if isinstance(reward, ModelReward):
        return reward.scores(prompts, completions)
    return safe_rewards(reward, prompts, completions, references)


@dataclass
class RLRun:
    """A started (or resumed) RL run: the policy and what its loop needs."""

    run_dir: Path
    cfg: Any  # the method's config (GRPOConfig, PPOConfig), saved under `key` in checkpoint.json
    key: str
    train_cfg: TrainConfig
    model: Any  # gptlab.model.GPT: the policy, in training
    tokenizer: AnyTokenizer
    template: ChatTemplate
    reward: Reward | ModelReward
    rows: list[PromptRow]
    val_rows: list[PromptRow]
    device: torch.device
    cursor: PromptCursor
    start: int
    base_path: Path  # the starting policy: the reference
    trainer_state: dict[str, Any] | None  # a resumed run's optimizer, cursor, RNG and method state
    log: Any  # train.MetricsLog

    def reference_model(self) -> nn.Module:
        """The frozen reference: the starting policy (a copy of it on a fresh run, reloaded on resume)."""
        from gptlab.finetune.runs import check_reference
        from gptlab.checkpoint import load_checkpoint

        if self.trainer_state is None:
            ref = copy.deepcopy(self.model)
        else:
            start = load_checkpoint(self.base_path)
            check_reference(start, self.model.config, self.tokenizer)
            ref = start.model
        return ref.to(self.device).eval().requires_grad_(False)

    def optimizer(self, module: nn.Module, extra_groups: Sequence[dict[str, Any]] = ()) -> torch.optim.Optimizer:
        """AdamW over `module` (the policy) and any `extra_groups` (PPO's value head, at its own rate), its state
        restored on resume (the groups' own settings, such as an lr_scale, stay this call's)."""
        from gptlab.train import build_optimizer

        optimizer = build_optimizer(module, self.train_cfg, self.device.type)
        for group in extra_groups:
            optimizer.add_param_group(dict(group))
        if self.trainer_state is not None:
            saved = self.trainer_state["optimizer"]
            if len(saved["param_groups"]) != len(optimizer.param_groups):
                raise CheckpointError(
                    f"the optimizer state in {self.run_dir} has {len(saved['param_groups'])} parameter groups, this gptlab's "
                    f"{self.key} {len(optimizer.param_groups)} (an older gptlab wrote it); start a new run"
                )
            scales = [g.get("lr_scale") for g in optimizer.param_groups]
            optimizer.load_state_dict(saved)
            for group, scale in zip(optimizer.param_groups, scales, strict=True):
                if scale is not None:
                    group["lr_scale"] = scale
        return optimizer

    def describe(self, report: Callable[[str], None], uses_reference: bool) -> None:
        report(f"policy: {self.base_path} (also the frozen reference{'' if uses_reference else ', unused: beta 0'}); reward {self.reward.name}")
        report(f"prompts: {len(self.rows):,} to train on, {len(self.val_rows):,} held out (greedy, mean reward at each evaluation)")

    def save(self, done: int, optimizer: torch.optim.Optimizer, val: dict[str, float] | None, extra: dict[str, Any] | None = None) -> Path:
        """A checkpoint of the policy (a plain GPT) with the loop's state (optimizer, cursor, RNG, `extra`) for --resume."""
        from gptlab.checkpoint import save_checkpoint

        state = {"optimizer": optimizer.state_dict(), "cursor": self.cursor.state(), "rng_cpu": torch.get_rng_state(), **(extra or {})}
        meta = {self.key: self.cfg.to_dict(), "base": {"path": str(self.base_path.resolve())}}
        return save_checkpoint(self.run_dir, done, self.model, self.model.config, self.tokenizer, self.train_cfg, state, val or {}, self.train_cfg.keep_last, meta)


def start_rl(
    key: str, cfg_cls: type, cfg: Any, policy: str | Path | None, train_fields: dict[str, Any], run_dir: str | Path, resume: bool,
    defaults: dict[str, Any], command: str, needs: str,
) -> RLRun:
    """Load the policy (or resume run_dir), prompts, reward and cursor; one-line errors for what does not fit."""
    from gptlab.checkpoint import load_checkpoint
    from gptlab.fileio import check_writable
    from gptlab.finetune.runs import check_fresh, find_resumed
    from gptlab.train import METRICS_FILE, MetricsLog, load_resumable, resolve_device

    unused = sorted(set(train_fields) & set(NOT_USED))
    if unused:
        raise ConfigError(f"{command} does not take --{unused[0].replace('_', '-')}: {NOT_USED[unused[0]]}")
    run_dir = Path(run_dir)
    resumed = find_resumed(run_dir, key, cfg_cls, cfg, command) if resume else None
    if resumed is not None:
        ckpt = load_resumable(run_dir)
        assert ckpt is not None and ckpt.trainer_state is not None
        cfg, base_path, state = resumed.settings, Path(resumed.meta["base"]["path"]), ckpt.trainer_state
        train_cfg = (ckpt.train_config or TrainConfig()).replace(**train_fields)
        start = ckpt.step
    else:
        check_fresh(policy, cfg, train_fields, needs)
        ckpt = load_checkpoint(policy)  # type: ignore[arg-type]
        base_path, state, start = ckpt.path, None, 0
        train_cfg = TrainConfig(**(defaults | train_fields))
    template = ChatTemplate(ckpt.tokenizer)  # the policy must be a chat model
    device = resolve_device(train_cfg.device)
    reward = load_reward(cfg.reward, ckpt.tokenizer, device)
    rows = [r for spec in cfg.prompts for r in read_prompt_rows(spec, "train")]
    val_specs = cfg.val_prompts or (cfg.prompts if all(p.startswith("builtin:") for p in cfg.prompts) else ())
    val_rows = [r for spec in val_specs for r in read_prompt_rows(spec, "train" if cfg.val_prompts else "test")][: cfg.eval_prompts]
    ckpt.model.to(device).train()
    torch.manual_seed(train_cfg.seed)
    cursor = PromptCursor(len(rows), train_cfg.seed)
    if state is not None:
        cursor.load_state(state["cursor"])
        torch.set_rng_state(state["rng_cpu"])
    check_writable(run_dir, "run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / METRICS_FILE, truncate_after_step=start if state is not None else None)
    return RLRun(run_dir, cfg, key, train_cfg, ckpt.model, ckpt.tokenizer, template, reward, rows, val_rows, device, cursor, start, Path(base_path), state, log)


@torch.no_grad()
def kl_to(policy: nn.Module, reference: nn.Module, template: ChatTemplate, rows: list[PromptRow], max_new_tokens: int, seed: int) -> float:
    """KL(π ‖ π_ref) per reply, in nats, estimated on replies the policy samples (temperature 1) to `rows`:
    the mean over replies of Σ_t log π(y_t) − log π_ref(y_t), an unbiased estimate of the sequence KL."""
    from gptlab.align.rollout import collate_rollouts, sample_replies
    from gptlab.model import label_logprobs

    rollouts = sample_replies(policy, template, [r.messages for r in rows], 1, SampleConfig(max_new_tokens=max_new_tokens, temperature=1.0), seed)
    x, y = collate_rollouts(rollouts)
    device = next(policy.parameters()).device
    x, y = x.to(device), y.to(device)
    was_training = policy.training
    policy.eval()
    gap = label_logprobs(policy, x, y) - label_logprobs(reference.eval(), x, y)
    policy.train(was_training)
    return gap.sum(dim=1).mean().item()
