"""PPO with a KL penalty: RLHF's third stage (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

The policy π (a chat model, usually an SFT run) samples a reply y to each prompt x; a reward
scores the whole reply; and PPO (Schulman et al. 2017) maximises

    r(x, y) − β log(π(y|x) / π_ref(y|x))

with π_ref the frozen starting policy. The penalty is paid per token: token t of a reply gets
the reward −β (log π(y_t) − log π_ref(y_t)), and its last token also gets r(x, y). A value head
(a Linear on the policy's last hidden states, which it reads but does not train: the value loss
never moves the policy, which on small models destabilised it) predicts the return at every token, and
generalised advantage estimation (GAE, Schulman et al. 2016) turns rewards and values into
advantages:

    δ_t = r_t + γ V_{t+1} − V_t,    A_t = Σ_k (γλ)^k δ_{t+k},    return_t = A_t + V_t

(V after the reply's last token is 0). Advantages are whitened over the batch's tokens. Each
batch of rollouts then gets several epochs of minibatch updates of the clipped surrogate
−min(ρ A, clip(ρ, 1 ± ε) A), ρ = π / π_old, plus vf_coef times the clipped value loss
½ max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²). β follows an adaptive controller
toward a target KL (Ziegler et al. 2019, §2.2): β ← β (1 + clip(KL / target − 1, ±0.2) · n / horizon).

The value head's weights and β are saved with the loop's state, so --resume continues the
same run; the policy's checkpoint stays a plain GPT that sample, chat, eval and export take.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gptlab.align.rl import RLResult, describe_val, evaluate_policy, score, start_rl
from gptlab.align.rollout import collate_rollouts, sample_replies
from gptlab.config import SampleConfig, _in_range, _positive_int, _Serializable
from gptlab.errors import ConfigError, GptlabError
from gptlab.model import IGNORE_INDEX, label_logprobs, target_logprobs, unpack_rows

KEY = "ppo"  # checkpoint.json entry with the run's PPOConfig


@dataclass(frozen=True)
class PPOConfig(_Serializable):
    """What `gptlab ppo` samples, how it scores and how it updates; the optimizer's settings are the TrainConfig's."""

    prompts: tuple[str, ...] = ()  # JSONL files or builtin:NAME prompt sets
    reward: str = ""  # py:MODULE:FUNCTION, py:FILE.py:FUNCTION, builtin:exact, builtin:length, or a reward-model checkpoint
    val_prompts: tuple[str, ...] = ()
    prompts_per_step: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0
    epochs: int = 4  # PPO epochs over each batch of rollouts
    minibatches: int = 2
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    value_lr: float = 1e-3  # the value head's peak learning rate (the policy's is the TrainConfig's lr), same schedule
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # β at the start
    target_kl: float | None = 6.0  # nats per reply; None keeps β fixed
    kl_horizon: int = 10_000  # rollouts over which the controller closes the gap (Ziegler et al.)
    eval_prompts: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "val_prompts", tuple(self.val_prompts))
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ConfigError(f"prompts must name at least one JSONL file or builtin:NAME, got {self.prompts!r}")
        if not isinstance(self.reward, str) or not self.reward:
            raise ConfigError("reward must name a function (py:MODULE:FUNCTION, py:FILE.py:FUNCTION, builtin:exact, builtin:length) or a reward model")
        _positive_int(self, "prompts_per_step", "max_new_tokens", "epochs", "minibatches", "kl_horizon", "eval_prompts")
        if self.minibatches > self.prompts_per_step:
            raise ConfigError(f"minibatches ({self.minibatches}) cannot exceed prompts_per_step ({self.prompts_per_step})")
        _in_range(self, "temperature", 0.0, 10.0)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (PPO learns from sampled replies), got {self.temperature!r}")
        for name in ("clip", "value_clip", "gamma", "lam"):
            _in_range(self, name, 0.0, 1.0)
        _in_range(self, "vf_coef", 0.0, 100.0)
        _in_range(self, "value_lr", 0.0, 1.0)
        _in_range(self, "kl_coef", 0.0, 100.0)
        if self.target_kl is not None:
            _in_range(self, "target_kl", 0.0, 1e6)
            if self.target_kl <= 0:
                raise ConfigError(f"target_kl must be positive (or none, for a fixed KL coefficient), got {self.target_kl!r}")


def kl_penalised_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (B, T): −β (log π − log π_ref) at every reply token, plus the reply's score at its last token."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.cumsum(dim=1).argmax(dim=1)  # (B,): the index of each row's last reply token
    rows = torch.arange(mask.size(0), device=mask.device)
    rewards[rows, last] += scores
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns (B, T) over each row's reply tokens (a contiguous run of `mask`); V past the reply is 0."""
    m = mask.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.size(1) - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m[:, t]
        next_value = values[:, t] * m[:, t]  # 0 where t is past the reply, so the last token bootstraps from 0
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * m


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """x standardised over its masked entries (mean 0, variance 1), 0 elsewhere."""
    values = x[mask]
    return torch.where(mask, (x - values.mean()) / (values.std(unbiased=False) + 1e-8), 0.0)


def ppo_losses(
    logp: Tensor, old_logp: Tensor, values: Tensor, old_values: Tensor, returns: Tensor, advantages: Tensor, mask: Tensor, clip: float,
    value_clip: float,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """The clipped policy loss and the clipped value loss, each a mean over the masked tokens, and statistics."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    policy_loss = (torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)) * m).sum() / n
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value_loss = 0.5 * (torch.max((values - returns) ** 2, (clipped_values - returns) ** 2) * m).sum() / n
    with torch.no_grad():
        stats = {
            "clip_fraction": ((((ratio - 1).abs() > clip) & mask).sum() / n).item(),
            "approx_kl": (0.5 * ((logp - old_logp) ** 2) * m).sum().item() / n.item(),  # between the rollout policy and now
        }
    return policy_loss, value_loss, stats


class AdaptiveKL:
    """Ziegler et al. 2019's proportional controller: β moves so the per-reply KL approaches target."""

    def __init__(self, value: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n / self.horizon


class ActorCritic(nn.Module):
    """The policy (a GPT) and a value head on its last hidden states (detached): one forward gives logits and values."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: GAE's first advantages are the rewards themselves
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(policy.transformer.wte.weight.device)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log π(y_t) (B, T), values (B, T) and the policy's entropy per position (B, T); 0 where y is IGNORE_INDEX."""
        h = self.policy.hidden_states(x)  # (B, T, C)
        trained = y != IGNORE_INDEX  # (B, T)
        logits = self.policy.lm_head(h[trained])  # (N, V): the head at the reply's tokens only (see label_logprobs)
        picked = target_logprobs(logits, y[trained])  # (N,)
        with torch.no_grad():  # logged, not trained on
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
            entropy_rows = -(log_probs.exp() * log_probs).sum(dim=-1)  # (N,)
        logp, entropy = unpack_rows(trained, picked), unpack_rows(trained, entropy_rows)  # (B, T) each
        values = self.value_head(h.detach()).squeeze(-1).float()  # (B, T)
        return logp, values, entropy


DEFAULTS = {"lr": 1e-5, "min_lr": 1e-6, "weight_decay": 0.0, "max_steps": 100, "eval_every": 20, "save_every": 50, "grad_clip": 1.0}


def ppo(
    policy: str | Path | None, cfg: PPOConfig | None, train_fields: dict[str, Any], run_dir: str | Path, resume: bool = False,
    progress: bool = True, report: Any = print,
) -> RLResult:
    """Train the chat model `policy` with PPO against the reward of `cfg`; see the module docstring."""
    from gptlab.hostmem import reusing_freed_memory
    from gptlab.train import clip_gradients, lr_at, progress_bar, stop_on_signals

    t_start = time.perf_counter()
    run = start_rl(KEY, PPOConfig, cfg, policy, train_fields, run_dir, resume, DEFAULTS, "ppo", "a policy checkpoint (--policy), prompts (--prompts) and a reward (--reward)")
    cfg, train_cfg, device = run.cfg, run.train_cfg, run.device
    reference = run.reference_model()
    actor_critic = ActorCritic(run.model)
    controller = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    if run.trainer_state is not None:
        actor_critic.value_head.load_state_dict(run.trainer_state["value_head"])
        controller.value = float(run.trainer_state["kl_coef"])
    # The value head is a fresh linear layer: at the policy's learning rate (1e-5) it would stay near 0 for the
    # whole run, and the advantages would be the rewards less a batch mean (REINFORCE); its own, larger rate
    # lets it learn each prompt's expected reward within tens of steps, the per-prompt baseline PPO relies on.
    optimizer = run.optimizer(actor_critic.policy, [{"params": list(actor_critic.value_head.parameters()), "weight_decay": 0.0,
                                                     "lr_scale": cfg.value_lr / train_cfg.lr}])  # fmt: skip
    P = cfg.prompts_per_step
    run.describe(report, True)
    report(f"schedule: {train_cfg.max_steps} steps of {P} replies (<= {cfg.max_new_tokens} tokens, temperature {cfg.temperature:g}), {cfg.epochs} epochs "
           f"of {cfg.minibatches} minibatches each; lr {train_cfg.lr:g} -> {train_cfg.min_lr:g}, clip {cfg.clip:g}, KL coefficient {cfg.kl_coef:g}"
           + (f" adapting toward {cfg.target_kl:g} nats" if cfg.target_kl is not None else " (fixed)"))  # fmt: skip
    sample_cfg = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    generator = torch.Generator().manual_seed(train_cfg.seed)  # minibatch order
    bar = progress_bar(run.start, train_cfg.max_steps, progress, desc="ppo")
    val: dict[str, float] | None = None
    last: Path | None = None
    signals: list[str] = []
    step = run.start
    with stop_on_signals(signals), reusing_freed_memory(device.type == "cpu"):  # gptlab.hostmem: no page faults per step
        for step in range(run.start, train_cfg.max_steps):
            batch = [run.rows[i] for i in run.cursor.take(P)]
            actor_critic.eval()  # rollouts and the old policy's numbers: no dropout
            rollouts = sample_replies(run.model, run.template, [r.messages for r in batch], 1, sample_cfg, seed=train_cfg.seed * 1_000_003 + step * P)
            scored = score(run.reward, rollouts.prompts, rollouts.texts, [r.reference for r in batch])
            for skip in scored.skips:
                report(f"step {step + 1}: reward skipped {skip}")
            keep = [i for i, v in enumerate(scored.rewards) if v is not None]
            x, y = (t.to(device) for t in collate_rollouts(rollouts, keep))
            scores = torch.tensor([scored.rewards[i] for i in keep], device=device)
            mask = y != IGNORE_INDEX
            with torch.no_grad():
                old_logp, old_values, _ = actor_critic(x, y)
                ref_logp = label_logprobs(reference, x, y)
                rewards = kl_penalised_rewards(scores, old_logp, ref_logp, mask, controller.value)
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                advantages = whiten(advantages, mask)
                kl = ((old_logp - ref_logp) * mask).sum(dim=1).mean().item()  # nats per reply
            actor_critic.train()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, train_cfg) * group.get("lr_scale", 1.0)
            totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "entropy": 0.0}
            updates = 0
            for _ in range(cfg.epochs):
                for rows in torch.randperm(len(keep), generator=generator).chunk(cfg.minibatches):
                    rows = rows.to(device)
                    logp, values, entropy = actor_critic(x[rows], y[rows])
                    policy_loss, value_loss, stats = ppo_losses(
                        logp, old_logp[rows], values, old_values[rows], returns[rows], advantages[rows], mask[rows], cfg.clip, cfg.value_clip
                    )
                    loss = policy_loss + cfg.vf_coef * value_loss
                    if not torch.isfinite(loss):
                        raise GptlabError(f"step {step + 1}: the PPO loss is {loss.item()}; lower --lr (the last checkpoint is {last})")
                    loss.backward()
                    clip_gradients(actor_critic, train_cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for key, value in (("policy_loss", policy_loss.item()), ("value_loss", value_loss.item()), *stats.items()):
                        totals[key] += value
                    totals["entropy"] += (entropy.sum() / mask[rows].sum().clamp(min=1)).item()
                    updates += 1
            controller.update(kl, len(keep))
            done = step + 1
            record = {
                "step": done, "reward": scores.mean().item(), "kl": kl, "kl_coef": controller.value, "reply_tokens": mask.sum().item() / len(keep),
                "finished": sum(rollouts.finished) / len(rollouts), "skipped": len(scored.skips), "lr": lr_at(step, train_cfg),
                **{k: v / updates for k, v in totals.items()},
            }  # fmt: skip
            if run.val_rows and (done % train_cfg.eval_every == 0 or done == train_cfg.max_steps):
                val = evaluate_policy(run.model, run.template, run.val_rows, run.reward, cfg.max_new_tokens)
                record |= {f"val_{k}": v for k, v in val.items()}
                if bar is not None:
                    bar.write(f"step {done}: held-out {describe_val(val)} | KL to the reference {kl:.3f} nats per reply")
            run.log.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{kl:.3f}", refresh=False)
            if done % train_cfg.save_every == 0 or done == train_cfg.max_steps or signals:
                last = run.save(done, optimizer, val, {"value_head": actor_critic.value_head.state_dict(), "kl_coef": controller.value})
            if signals:
                break
    if bar is not None:
        bar.close()
    return RLResult(run.run_dir, step + 1 if train_cfg.max_steps > run.start else run.start, last, val, signals[0] if signals else None, time.perf_counter() - t_start)

