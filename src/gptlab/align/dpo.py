"""Direct preference optimisation (DPO, Rafailov et al. 2023): preferences without a reward model or RL.

With the policy π, the frozen reference π_ref (the model DPO starts from), and a pair (x, y_w, y_l),
the implicit reward of a reply is r(x, y) = β log(π(y|x) / π_ref(y|x)), and DPO minimises
the Bradley–Terry loss on it (their eq. 7):

    L = −log σ(h),   h = β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]

whose gradient raises the chosen reply's likelihood and lowers the rejected one's, weighted by
σ(−h): how wrongly the implicit reward orders the pair. Variants: "ipo" (Azar et al. 2023)
regresses the log-ratio gap to 1/(2β), (h/β − 1/(2β))², which does not drive the gap to
infinity on deterministic preferences; label_smoothing ε is conservative DPO (cDPO: a pair's
label is wrong with probability ε), (1 − ε)·(−log σ(h)) + ε·(−log σ(−h)).

DPO only orders the pair: it can lower the chosen reply's likelihood too, as long as the
rejected one falls faster, and on pairs that differ in a token or two (a near-miss answer)
that drifts the policy away from the answers it should give. sft_weight α adds the chosen
reply's negative log-likelihood per token, α · (−log π(y_w|x) / |y_w|) (Pang et al. 2024,
"Iterative Reasoning Preference Optimization"; TRL's rpo_alpha), which holds it up.

The reference log-probabilities never change, so they are computed once, before training
(and again on resume, from the same starting checkpoint), and travel with each batch's pair
indices: training then runs one model, not two. DPOObjective plugs into train.train, so DPO
gets the loop's schedule, checkpoints, resume, time budget and torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.align.pairs import EncodedPairs, PairObjective, collate_sequences, pair_splits, sequence_logprobs
from gptlab.chat import ChatTemplate
from gptlab.config import GPTConfig, TrainConfig, _in_range, _Serializable
from gptlab.errors import ConfigError
from gptlab.model import IGNORE_INDEX
from gptlab.tokenizer import AnyTokenizer

LOSSES = ("sigmoid", "ipo")
KEY = "dpo"  # checkpoint.json entry with the run's DPOConfig


@dataclass(frozen=True)
class DPOConfig(_Serializable):
    """What `gptlab dpo` trains on and how; saved in every checkpoint, so --resume rebuilds it."""

    data: tuple[str, ...] = ()  # JSONL files or builtin:NAME preference sets
    val_data: tuple[str, ...] = ()  # default: a built-in set's test split, else val_fraction of data
    val_fraction: float = 0.05
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0  # α of the chosen reply's per-token NLL added to each pair's loss
    max_len: int | None = None  # tokens a side may predict; None: the model's block_size
    epochs: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "val_data", tuple(self.val_data))
        if not self.data or not all(isinstance(d, str) and d for d in self.data):
            raise ConfigError(f"data must name at least one JSONL file or builtin:NAME, got {self.data!r}")
        _in_range(self, "val_fraction", 0.0, 0.5)
        _in_range(self, "beta", 0.0, 100.0)
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        _in_range(self, "label_smoothing", 0.0, 0.5, hi_open=True)
        _in_range(self, "sft_weight", 0.0, 1e3)
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len <= 0):
            raise ConfigError(f"max_len must be a positive integer, got {self.max_len!r}")
        _in_range(self, "epochs", 0.0, 1e6)
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs!r}")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, cfg: DPOConfig) -> tuple[Tensor, Tensor]:
    """Per-pair losses and margins h (the implicit reward of chosen minus that of rejected), each (N,), from sequence log-probs."""
    h = cfg.beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    if cfg.loss == "ipo":
        losses = (h / cfg.beta - 1 / (2 * cfg.beta)) ** 2
    else:
        eps = cfg.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return losses, h


@torch.no_grad()
def reference_logprobs(model: nn.Module, data: EncodedPairs, batch_size: int = 16, dtype: str = "float32") -> Tensor:
    """log π_ref(reply | prompt) of every pair's chosen and rejected side, (N, 2), with `model` as the reference."""
    from gptlab.train import autocast_context

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(data), 2, dtype=torch.float64)
    for side, seqs in enumerate((data.chosen, data.rejected)):
        for s in range(0, len(seqs), batch_size):
            x, y = collate_sequences(seqs[s : s + batch_size])
            with autocast_context(device, dtype):
                out[s : s + batch_size, side] = sequence_logprobs(model, x.to(device), y.to(device)).double().cpu()
    model.train(was_training)
    return out


class DPOObjective(PairObjective):
    """The DPO loss on batches of pairs (see train.Objective); reference log-probs are looked up by pair index."""

    def __init__(self, tokenizer: AnyTokenizer, cfg: DPOConfig, train: EncodedPairs, val: EncodedPairs | None, ref_train: Tensor, ref_val: Tensor | None) -> None:
        super().__init__(tokenizer, train, val)
        self.cfg = cfg
        self.refs = {"train": ref_train, "val": ref_val}

    def _pair_terms(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device, split: str) -> tuple[Tensor, Tensor]:
        x, y, index = batch
        keep = index >= 0  # exact held-out batches end with no pairs
        y = y.to(device)
        logprobs = sequence_logprobs(model, x.to(device), y)  # (2n,)
        n = index.numel()
        ref = self.refs[split][index.clamp(min=0)].to(device=device, dtype=logprobs.dtype)  # (n, 2)
        losses, h = dpo_loss(logprobs[:n], logprobs[n:], ref[:, 0], ref[:, 1], self.cfg)
        if self.cfg.sft_weight:
            chosen_tokens = (y[:n] != IGNORE_INDEX).sum(dim=1).clamp(min=1)  # (n,)
            losses = losses - self.cfg.sft_weight * logprobs[:n] / chosen_tokens
        keep = keep.to(device)
        return losses[keep], h[keep]

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> Tensor:
        losses, _ = self._pair_terms(model, batch, device, "train")
        return losses.mean()

    def score(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> dict[str, float]:
        losses, h = self._pair_terms(model, batch, device, "val")
        return {"loss_sum": losses.sum().item(), "correct": (h > 0).sum().item(), "margin_sum": h.sum().item(), "pairs": float(h.numel())}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        return {"loss": sums["loss_sum"] / n, "reward_accuracy": sums["correct"] / n, "reward_margin": sums["margin_sum"] / n}

    def describe(self) -> list[str]:
        t, v = self.train_set, self.val_set
        kind = {"sigmoid": "DPO", "ipo": "IPO"}[self.cfg.loss] + (f", label smoothing {self.cfg.label_smoothing:g}" if self.cfg.label_smoothing else "")
        kind += f" + {self.cfg.sft_weight:g} x the chosen reply's NLL per token" if self.cfg.sft_weight else ""
        return [
            f"data: {len(t):,} preference pairs from {', '.join(self.cfg.data)}; {t.truncated} cut to max_len, {t.skipped} skipped (no reply token left)",
            f"held out: {len(v):,} pairs" if v is not None else "held out: none (evaluation off)",
            f"loss: {kind}, beta {self.cfg.beta:g}; reference = the starting policy (its log-probs computed once)",
        ]

    def run_info(self) -> dict[str, Any]:
        return {KEY: self.cfg.to_dict()}


def build_objective(policy: nn.Module, tokenizer: AnyTokenizer, cfg: DPOConfig, block_size: int, seed: int, dtype: str = "float32") -> DPOObjective:
    """Read and encode the pairs and compute the reference log-probs with `policy` (the starting model)."""
    max_len = cfg.max_len or block_size
    if max_len > block_size:
        raise ConfigError(f"max_len ({max_len}) exceeds the model's block_size ({block_size})")
    train, val = pair_splits(cfg.data, cfg.val_data, cfg.val_fraction, ChatTemplate(tokenizer), max_len, seed)
    ref_train = reference_logprobs(policy, train, dtype=dtype)
    ref_val = reference_logprobs(policy, val, dtype=dtype) if val is not None else None
    return DPOObjective(tokenizer, cfg, train, val, ref_train, ref_val)


DEFAULTS = {"lr": 5e-6, "min_lr": 5e-7, "weight_decay": 0.0}  # Rafailov et al. 2023 train with lr 1e-6 on large models


def dpo(
    policy: str | Path | None, cfg: DPOConfig | None, train_fields: dict[str, Any], run_dir: str | Path, resume: bool = False,
    progress: bool = True, report: Any = print, started: float | None = None,
) -> Any:
    """Optimise the checkpoint `policy` (a chat model, usually an SFT run) on preference pairs with DPO; returns the TrainResult.

    Unset TrainConfig fields take DEFAULTS; max_steps covers cfg.epochs passes unless given. With
    `resume`, the run continues with the settings saved in its checkpoint; the reference
    log-probs are computed again from the starting policy recorded there.
    """
    from gptlab.checkpoint import load_checkpoint
    from gptlab.finetune.runs import check_fresh, check_reference, find_resumed, schedule
    from gptlab.train import train

    run_dir = Path(run_dir)
    resumed = find_resumed(run_dir, KEY, DPOConfig, cfg, "DPO") if resume else None
    if resumed is not None:
        from gptlab.checkpoint import TOKENIZER_FILE
        from gptlab.tokenizer import read_tokenizer

        start = load_checkpoint(resumed.meta["base"]["path"])
        check_reference(start, GPTConfig.from_dict(resumed.meta["model_config"]), read_tokenizer(resumed.path / TOKENIZER_FILE))
        objective = build_objective(start.model, start.tokenizer, resumed.settings, resumed.block_size, resumed.seed)
        del start
        return train(None, None, objective, run_dir, resume=True, progress=progress, resume_overrides=train_fields, report=report, started=started)
    check_fresh(policy, cfg, train_fields, "a policy checkpoint (--policy) and preference pairs (--data)")
    start = load_checkpoint(policy)
    ChatTemplate(start.tokenizer)  # DPO scores replies in the chat format: the policy must be a chat model
    seed = train_fields.get("seed", TrainConfig().seed)
    objective = build_objective(start.model, start.tokenizer, cfg, start.model_config.block_size, seed, train_fields.get("dtype", "float32"))
    train_cfg = schedule(
        DEFAULTS, train_fields, cfg.epochs, lambda c: len(objective.train_set),
        lambda c: max(1, min(100, -(-len(objective.val_set) // c.batch_size))) if objective.val_set is not None else c.eval_batches,
    )  # fmt: skip
    report(f"policy: {start.path} (step {start.step}); it is also the frozen reference")
    meta = {KEY: cfg.to_dict(), "base": {"path": str(start.path.resolve()), "step": start.step}}
    return train(
        start.model_config, train_cfg, objective, run_dir, progress=progress, report=report, started=started, init_model=start.model,
        checkpoint_meta=meta,
    )  # fmt: skip
