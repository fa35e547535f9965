"""Group relative policy optimisation (GRPO, Shao et al. 2024, DeepSeekMath §4.1): RL without a value model.

Each step samples G replies to each of P prompts, scores them with a reward (a Python function
for verifiable tasks), and gives every reply the advantage of its reward within its group:

    A_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)        (population std; one A for all of a reply's tokens)

so a reply is pushed up exactly when it beats its siblings, and a group whose replies all
score alike teaches nothing. The policy then minimises, per token, PPO's clipped surrogate
plus a KL penalty toward the frozen reference (the starting policy), averaged over a reply's
tokens and then over replies (their eq. 3):

    −min(ρ A, clip(ρ, 1 − ε, 1 + ε) A) + β (π_ref/π − log(π_ref/π) − 1),   ρ = π / π_old

The KL term is Schulman's k3 estimator: unbiased, and never negative. With one update per
rollout (the default), π_old is π itself at the update: ρ = 1 and nothing is clipped; more
updates per rollout reuse the samples, and the clip keeps each from moving far.

Rollouts go through the KV-cached batched engine (gptlab.align.rollout). The run has its own
rollout → update loop, but train.py's optimizer, learning-rate schedule, checkpoints,
metrics log, progress bar and signal handling: Ctrl-C or SIGTERM saves a checkpoint, and
--resume continues with the optimizer, the prompt cursor and the RNG.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gptlab.align.rl import RLResult, describe_val, evaluate_policy, score, start_rl
from gptlab.align.rollout import collate_rollouts, sample_replies
from gptlab.config import SampleConfig, _in_range, _positive_int, _Serializable
from gptlab.errors import ConfigError, GptlabError
from gptlab.model import IGNORE_INDEX, label_logprobs

KEY = "grpo"  # checkpoint.json entry with the run's GRPOConfig
ADVANTAGE_EPS = 1e-4


@dataclass(frozen=True)
class GRPOConfig(_Serializable):
    """What `gptlab grpo` samples and how it scores and weighs it; the optimizer's settings are the TrainConfig's."""

    prompts: tuple[str, ...] = ()  # JSONL files or builtin:NAME prompt sets
    reward: str = ""  # py:MODULE:FUNCTION, py:FILE.py:FUNCTION, builtin:exact, builtin:length, or a reward-model checkpoint
    val_prompts: tuple[str, ...] = ()  # default: a built-in set's test split, else none
    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    clip: float = 0.2
    beta: float = 0.04  # Shao et al. 2024 §4.2
    updates_per_rollout: int = 1
    eval_prompts: int = 100  # held-out prompts scored (greedy) at each evaluation

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "val_prompts", tuple(self.val_prompts))
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ConfigError(f"prompts must name at least one JSONL file or builtin:NAME, got {self.prompts!r}")
        if not isinstance(self.reward, str) or not self.reward:
            raise ConfigError("reward must name a function (py:MODULE:FUNCTION, py:FILE.py:FUNCTION, builtin:exact, builtin:length) or a reward model")
        _positive_int(self, "prompts_per_step", "max_new_tokens", "updates_per_rollout", "eval_prompts")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigError(f"group_size must be an integer >= 2 (advantages compare replies within a group), got {self.group_size!r}")
        _in_range(self, "temperature", 0.0, 10.0)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive: a group of greedy replies is one reply G times, got {self.temperature!r}")
        _in_range(self, "clip", 0.0, 1.0, hi_open=True)
        _in_range(self, "beta", 0.0, 100.0)


def group_advantages(rewards: list[float | None], group_size: int) -> Tensor:
    """Each reply's reward standardised within its group (see the module docstring); 0 for a skipped (None) reply."""
    r = torch.tensor([math.nan if v is None else v for v in rewards], dtype=torch.float64).view(-1, group_size)  # (P, G)
    scored = ~r.isnan()
    n = scored.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.where(scored, r, 0).sum(dim=1, keepdim=True) / n
    std = (torch.where(scored, (r - mean) ** 2, 0).sum(dim=1, keepdim=True) / n).sqrt()
    return torch.where(scored, (r - mean) / (std + ADVANTAGE_EPS), 0).view(-1).float()


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, mask: Tensor, advantages: Tensor, clip: float, beta: float) -> tuple[Tensor, dict[str, float]]:
    """The GRPO objective over rows of reply tokens (B, T) with `mask`; returns the loss and per-step statistics."""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    a = advantages[:, None]  # (B, 1)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        log_ref_ratio = ref_logp - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3: an unbiased, non-negative estimate of KL(pi || pi_ref)
        per_token = per_token + beta * kl
    m = mask.float()
    lengths = m.sum(dim=1).clamp(min=1)  # (B,)
    loss = ((per_token * m).sum(dim=1) / lengths).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip) & mask
        stats = {"kl": ((kl * m).sum() / m.sum().clamp(min=1)).item(), "clip_fraction": (clipped.sum() / mask.sum().clamp(min=1)).item()}
    return loss, stats


def grpo(
    policy: str | Path | None, cfg: GRPOConfig | None, train_fields: dict[str, Any], run_dir: str | Path, resume: bool = False,
    progress: bool = True, report: Any = print,
) -> RLResult:
    """Train the chat model `policy` with GRPO on the prompts and reward of `cfg`; see the module docstring.

    train_fields are TrainConfig fields (lr, max_steps, seed, eval_every, save_every, ...) over
    DEFAULTS. With `resume` and a checkpoint in run_dir, the run continues with the settings
    saved in it (policy and cfg may be None).
    """
    from gptlab.hostmem import reusing_freed_memory
    from gptlab.train import clip_gradients, lr_at, progress_bar, stop_on_signals

    t_start = time.perf_counter()
    run = start_rl(KEY, GRPOConfig, cfg, policy, train_fields, run_dir, resume, DEFAULTS, "grpo", "a policy checkpoint (--policy), prompts (--prompts) and a reward (--reward)")
    cfg, model, train_cfg, device = run.cfg, run.model, run.train_cfg, run.device
    reference = run.reference_model() if cfg.beta > 0 else None
    optimizer = run.optimizer(model)
    P, G = cfg.prompts_per_step, cfg.group_size
    run.describe(report, cfg.beta > 0)
    report(f"schedule: {train_cfg.max_steps} steps of {P} prompts x {G} replies (<= {cfg.max_new_tokens} tokens, temperature {cfg.temperature:g}), "
           f"{cfg.updates_per_rollout} update(s) each; lr {train_cfg.lr:g} -> {train_cfg.min_lr:g}, clip {cfg.clip:g}, beta {cfg.beta:g}")  # fmt: skip
    sample_cfg = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    bar = progress_bar(run.start, train_cfg.max_steps, progress, desc="grpo")
    val: dict[str, float] | None = None
    last: Path | None = None
    signals: list[str] = []
    step = run.start

    with stop_on_signals(signals), reusing_freed_memory(device.type == "cpu"):  # gptlab.hostmem: no page faults per step
        for step in range(run.start, train_cfg.max_steps):
            batch = [run.rows[i] for i in run.cursor.take(P)]
            model.eval()  # sampling and the old policy's log-probs: no dropout
            rollouts = sample_replies(model, run.template, [r.messages for r in batch], G, sample_cfg, seed=train_cfg.seed * 1_000_003 + step * P * G)
            refs = [r.reference for r in batch for _ in range(G)]
            scores = score(run.reward, rollouts.prompts, rollouts.texts, refs)
            advantages = group_advantages(scores.rewards, G).to(device)
            x, y = (t.to(device) for t in collate_rollouts(rollouts))
            mask = y != IGNORE_INDEX
            with torch.no_grad():
                # with one update per rollout, π_old is the policy of that update: its own detached log-probs, no extra pass
                old = label_logprobs(model, x, y) if cfg.updates_per_rollout > 1 else None
                ref = label_logprobs(reference, x, y) if reference is not None else None
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, train_cfg) * group.get("lr_scale", 1.0)
            for _ in range(cfg.updates_per_rollout):
                logp = label_logprobs(model, x, y)
                loss, stats = grpo_loss(logp, logp.detach() if old is None else old, ref, mask, advantages, cfg.clip, cfg.beta)
                if not torch.isfinite(loss):
                    raise GptlabError(f"step {step + 1}: the GRPO loss is {loss.item()}; lower --lr (the last checkpoint is {last})")
                loss.backward()
                grad_norm = clip_gradients(model, train_cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            done = step + 1
            valid = [v for v in scores.rewards if v is not None]
            record = {
                "step": done, "loss": loss.item(), "reward": sum(valid) / max(len(valid), 1), "kl": stats["kl"], "clip_fraction": stats["clip_fraction"],
                "grad_norm": grad_norm, "reply_tokens": mask.sum().item() / len(rollouts), "finished": sum(rollouts.finished) / len(rollouts),
                "skipped": len(scores.skips), "lr": lr_at(step, train_cfg),
            }  # fmt: skip
            for skip in scores.skips:
                report(f"step {done}: reward skipped {skip}")
            if run.val_rows and (done % train_cfg.eval_every == 0 or done == train_cfg.max_steps):
                val = evaluate_policy(model, run.template, run.val_rows, run.reward, cfg.max_new_tokens)
                record |= {f"val_{k}": v for k, v in val.items()}
                if bar is not None:
                    bar.write(f"step {done}: held-out {describe_val(val)} | KL to the reference {record['kl']:.3f}")
            run.log.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}", refresh=False)
            if done % train_cfg.save_every == 0 or done == train_cfg.max_steps or signals:
                last = run.save(done, optimizer, val)
            if signals:
                break
    if bar is not None:
        bar.close()
    return RLResult(run.run_dir, step + 1 if train_cfg.max_steps > run.start else run.start, last, val, signals[0] if signals else None, time.perf_counter() - t_start)


DEFAULTS = {"lr": 1e-5, "min_lr": 1e-6, "weight_decay": 0.0, "max_steps": 100, "eval_every": 20, "save_every": 50, "grad_clip": 1.0}
