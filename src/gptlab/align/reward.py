"""Reward models, the second stage of RLHF (Stiennon et al. 2020, "Learning to summarize from
human feedback", section 3.4; Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", section 3.5): a language model whose output is one scalar
r(x, y), how much people prefer reply y to prompt x, learnt from preference pairs.

The model is a chat (or base) GPT with a bias-free Linear head to one output
(gptlab.finetune.heads.TaskModel, head kind "reward") read at the last token of the
conversation prompt + reply as the chat template renders it. That token is always the "\\n"
after the reply's <|im_end|>, so the head sees the whole reply, and the model is the one HF's
GPT2ForSequenceClassification computes with num_labels 1 (TRL's reward-model format; see
heads.export_task_hf): `gptlab export-hf` writes it.

Loss. The Bradley–Terry model says P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)); its negative
log-likelihood on a pair (Ouyang et al. 2022, eq. 1) is

    L = −log σ(r_w − r_l − m) + c · (r_w + r_l)²

with m an optional margin (Touvron et al. 2023, Llama 2, section 3.2.2: the reward gap a
pair must exceed before it stops pulling) and c an optional centring weight (TRL's
center_rewards_coefficient, Eisenstein et al. 2023): the Bradley–Terry term only sees
differences, so rewards can drift by any constant; the square keeps them near zero, which a
later PPO stage (whose KL penalty is added to the reward) wants.

Sequences are never cut: a pair whose rendering exceeds max_len is skipped (and counted), as
TRL's RewardTrainer filters by max_length, since a reward read at a cut conversation's last
token would score a reply it has not seen the end of. Scoring (score_replies, `gptlab reward
score`) keeps instead the last block_size tokens of an over-long conversation: the end is what
the head reads. RewardObjective plugs into train.train, so reward models get the loop's
schedule, checkpoints, resume, time budget and torchrun.

Speed. A pair's two conversations share their start (the system and user turns, often the
reply's first tokens): training rows hold it once, with the rest of each side as a branch
after it that attends to the shared start and to itself only, several pairs to a row and none
padded to the batch's longest (collate_branched, TaskModel's branched rows). Each side gets the
reward it gets alone (tested against the padded batch). And since only the embedding lookup
reads the token table, its gradient and AdamW step follow the rows looked up (train.SparseTokenTable).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.align.pairs import EncodedPairs, Pair, PairObjective, encode_pairs, load_pairs
from gptlab.chat import ChatTemplate
from gptlab.checkpoint import HEAD_KEY, Checkpoint
from gptlab.config import TrainConfig, _in_range, _Serializable
from gptlab.errors import CheckpointError, ConfigError, DataError, InputError
from gptlab.tokenizer import AnyTokenizer, same_encoding

KEY = "reward"  # checkpoint.json entry with the run's RewardConfig (and the head kind in "task_head")

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class RewardConfig(_Serializable):
    """What `gptlab reward train` trains on and how; saved in every checkpoint, so --resume rebuilds it."""

    data: tuple[str, ...] = ()  # JSONL files or builtin:NAME preference sets
    val_data: tuple[str, ...] = ()  # default: a built-in set's test split, else val_fraction of data
    val_fraction: float = 0.05
    max_len: int | None = None  # tokens a rendered conversation may have; None: the model's block_size
    epochs: float = 1.0  # Ouyang et al. 2022 (section C.2): a second epoch overfits
    margin: float = 0.0
    center_weight: float = 0.0
    head_dropout: float = 0.0  # a scalar head: dropout would only add noise to the reward difference

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "val_data", tuple(self.val_data))
        if not self.data or not all(isinstance(d, str) and d for d in self.data):
            raise ConfigError(f"data must name at least one JSONL file or builtin:NAME, got {self.data!r}")
        _in_range(self, "val_fraction", 0.0, 0.5)
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len <= 0):
            raise ConfigError(f"max_len must be a positive integer, got {self.max_len!r}")
        _in_range(self, "epochs", 0.0, 1e6)
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs!r}")
        _in_range(self, "margin", -100.0, 100.0)
        _in_range(self, "center_weight", 0.0, 100.0)
        _in_range(self, "head_dropout", 0.0, 1.0, hi_open=True)


def reward_loss(chosen: Tensor, rejected: Tensor, margin: float = 0.0, center_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-pair losses −log σ(r_w − r_l − m) + c (r_w + r_l)² and margins r_w − r_l, each (N,), from rewards (N,)."""
    gap = chosen - rejected
    losses = -F.logsigmoid(gap - margin)
    if center_weight:
        losses = losses + center_weight * (chosen + rejected) ** 2
    return losses, gap


# ----------------------------------------------------------------------------- batches


def pad_right(seqs: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """(x (N, 1, T), last (N, 1)): the sequences right-padded to the longest, and each one's last position."""
    width = max(len(ids) for ids in seqs)
    x = torch.zeros(len(seqs), 1, width, dtype=torch.long)  # the pad id is never read: attention is causal
    last = torch.empty(len(seqs), 1, dtype=torch.long)
    for b, ids in enumerate(seqs):
        x[b, 0, : len(ids)] = torch.from_numpy(ids)
        last[b, 0] = len(ids) - 1
    return x, last


def collate_branched(sides: list[tuple[np.ndarray, np.ndarray]], row_len: int) -> tuple[Tensor, ...]:
    """PairBatches' collate for a reward model: (x, segments, branches, extract, slots) with the pairs packed in
    rows of about row_len tokens, each pair stored as the tokens its two sides share, then the rest of the
    chosen side (branch 1), then the rest of the rejected side (branch 2): see TaskModel's branched rows.

    The shared start (the prompt, and any first reply tokens both sides have) is computed once instead of
    twice, and no pair is padded to the batch's longest; each branch keeps at least its last token, where
    the reward is read. x, segments, branches (R, W); extract (R, K) the read positions (-1: none);
    slots (n, 2) where pair j's chosen and rejected rewards are in the flattened (R * K) rewards. Padding
    is a segment of its own.
    """
    n = len(sides) // 2
    pieces = []  # (ids, branch ids, chosen end, rejected end) per pair
    for (c, _), (r, _) in zip(sides[:n], sides[n:], strict=True):
        cut = max(min(len(c), len(r)) - 1, 0)  # each branch keeps at least its last token
        differ = np.flatnonzero(c[:cut] != r[:cut])
        k = int(differ[0]) if len(differ) else cut  # the tokens both sides share
        ids = np.concatenate([c, r[k:]])  # the shared start and the chosen rest, then the rejected rest
        branch = np.concatenate([np.zeros(k, np.int64), np.ones(len(c) - k, np.int64), np.full(len(r) - k, 2, np.int64)])
        pieces.append((ids, branch, len(c) - 1, len(ids) - 1))
    rows: list[list[int]] = []  # pairs per row, in order: a row takes the next pair while it fits in row_len
    width = 0
    for j, (ids, *_) in enumerate(pieces):
        if not rows or width + len(ids) > row_len:
            rows.append([])
            width = 0
        rows[-1].append(j)
        width += len(ids)
    W = max(sum(len(pieces[j][0]) for j in row) for row in rows)
    K = 2 * max(len(row) for row in rows)
    x = torch.zeros(len(rows), W, dtype=torch.long)
    segments = torch.full((len(rows), W), -1, dtype=torch.long)  # -1: padding
    branches = torch.zeros(len(rows), W, dtype=torch.long)
    extract = torch.full((len(rows), K), -1, dtype=torch.long)
    slots = torch.empty(n, 2, dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for s, j in enumerate(row):
            ids, branch, chosen_end, rejected_end = pieces[j]
            x[i, at : at + len(ids)] = torch.from_numpy(ids)
            segments[i, at : at + len(ids)] = s
            branches[i, at : at + len(ids)] = torch.from_numpy(branch)
            extract[i, 2 * s], extract[i, 2 * s + 1] = at + chosen_end, at + rejected_end
            slots[j, 0], slots[j, 1] = i * K + 2 * s, i * K + 2 * s + 1
            at += len(ids)
    return x, segments, branches, extract, slots


def encode_reward_pairs(template: ChatTemplate, pairs: list[Pair], max_len: int) -> EncodedPairs:
    """Both sides of every pair rendered whole; a pair with a side over max_len tokens is skipped (and counted)."""
    rendered = encode_pairs(template, pairs, sys.maxsize)  # no cut
    out = EncodedPairs()
    for chosen, rejected, where in zip(rendered.chosen, rendered.rejected, rendered.sources, strict=True):
        if max(len(chosen[0]), len(rejected[0])) > max_len:
            out.skipped += 1
            continue
        out.chosen.append(chosen)
        out.rejected.append(rejected)
        out.sources.append(where)
    out.skipped += rendered.skipped
    return out


# ----------------------------------------------------------------------------- objective


def _idle_lm_head(model: nn.Module) -> Tensor | None:
    """Under DDP, the language-model head's weight when it is not the token embedding's: the reward never reads it,
    and DDP (without find_unused_parameters) waits for a gradient on every parameter."""
    core, ddp = model, False
    while True:  # the loop may hand over the model compiled (torch.compile) around DDP
        if hasattr(core, "_orig_mod"):
            core = core._orig_mod
        elif isinstance(core, nn.parallel.DistributedDataParallel):
            core, ddp = core.module, True
        else:
            break
    return core.lm_head.weight if ddp and not core.config.tie_weights else None


class RewardObjective(PairObjective):
    """The Bradley–Terry loss of a reward model on batches of pairs (see train.Objective)."""

    sparse_token_grad = True  # the loss reads the token table only through the embedding lookup (no LM head): see train

    def __init__(self, tokenizer: AnyTokenizer, cfg: RewardConfig, train: EncodedPairs, val: EncodedPairs | None, row_len: int) -> None:
        super().__init__(tokenizer, train, val)
        self.cfg, self.row_len = cfg, row_len

    def collate(self, sides: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, ...]:
        """Both sides of each pair in one branched row (collate_branched); the reply masks are not used."""
        return collate_branched(sides, self.row_len)

    def _pair_terms(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Losses, margins r_w − r_l and reward sums r_w + r_l of the batch's pairs, each (n,)."""
        x, segments, branches, extract, slots, index = batch
        rewards = model(x.to(device), segments=segments.to(device), branches=branches.to(device), extract=extract.to(device))[0]
        picked = rewards.float().reshape(-1)[slots.to(device)]  # (n, 2): each pair's chosen and rejected reward
        losses, gap = reward_loss(picked[:, 0], picked[:, 1], self.cfg.margin, self.cfg.center_weight)
        keep = (index >= 0).to(device)  # exact held-out batches end with no pairs
        return losses[keep], gap[keep], picked.sum(dim=1)[keep]

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> Tensor:
        loss = self._pair_terms(model, batch, device)[0].mean()
        idle = _idle_lm_head(model)
        if idle is not None:  # a zero gradient, so that DDP's all-reduce completes
            loss = loss + 0.0 * idle.sum()
        return loss

    def score(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> dict[str, float]:
        losses, gap, total = self._pair_terms(model, batch, device)
        return {"loss_sum": losses.sum().item(), "correct": (gap > 0).sum().item(), "margin_sum": gap.sum().item(),
                "reward_sum": total.sum().item(), "pairs": float(gap.numel())}  # fmt: skip

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        return {"loss": sums["loss_sum"] / n, "pair_accuracy": sums["correct"] / n, "margin": sums["margin_sum"] / n,
                "mean_reward": sums["reward_sum"] / (2 * n)}  # fmt: skip

    def describe(self) -> list[str]:
        t, v, cfg = self.train_set, self.val_set, self.cfg
        terms = "-log sigmoid(r_w - r_l" + (f" - {cfg.margin:g})" if cfg.margin else ")") + (f" + {cfg.center_weight:g} (r_w + r_l)^2" if cfg.center_weight else "")
        return [
            f"data: {len(t):,} preference pairs from {', '.join(cfg.data)}; {t.skipped} skipped (longer than max_len)",
            f"held out: {len(v):,} pairs" if v is not None else "held out: none (evaluation off)",
            f"loss: Bradley-Terry, {terms}; the reward is read at each conversation's last token",
        ]

    def run_info(self) -> dict[str, Any]:
        return {KEY: self.cfg.to_dict()}


def build_objective(tokenizer: AnyTokenizer, cfg: RewardConfig, block_size: int, seed: int) -> RewardObjective:
    """Read and encode the training and held-out pairs for a model of `block_size` context."""
    from gptlab.align.pairs import pair_splits

    max_len = cfg.max_len or block_size
    if max_len > block_size:
        raise ConfigError(f"max_len ({max_len}) exceeds the model's block_size ({block_size})")
    train, val = pair_splits(cfg.data, cfg.val_data, cfg.val_fraction, ChatTemplate(tokenizer), max_len, seed, encode_reward_pairs)
    return RewardObjective(tokenizer, cfg, train, val, block_size)


# ----------------------------------------------------------------------------- the run

# Ouyang et al. 2022 (appendix C.2) train their 6B reward model for one epoch at lr 9e-6 with a cosine
# schedule down to 10% of it: a reward model starts from a capable language model, and larger steps
# overfit the comparisons within an epoch. The head is new but a single Linear, which learns at this
# rate too. Weight decay 0: the pretrained weights should move little, not shrink.
DEFAULTS = {"lr": 1e-5, "min_lr": 1e-6, "weight_decay": 0.0}


def train_reward(
    base: str | Path | None, cfg: RewardConfig | None, train_fields: dict[str, Any], run_dir: str | Path, resume: bool = False,
    progress: bool = True, report: Any = print, started: float | None = None,
) -> Any:
    """Train a reward model from the checkpoint `base` (an SFT chat model, or a base model: the chat tokens are
    added) on preference pairs; returns train.train's TrainResult.

    Unset TrainConfig fields take DEFAULTS; max_steps covers cfg.epochs passes unless given. With
    `resume`, the run continues with the settings saved in its checkpoint (base and cfg may be None).
    """
    from gptlab.finetune.heads import HeadSpec, TaskModel
    from gptlab.finetune.runs import check_fresh, find_resumed, schedule
    from gptlab.finetune.sft import start_model
    from gptlab.tokenizer import read_tokenizer
    from gptlab.train import train

    run_dir = Path(run_dir)
    if train_fields.get("strategy") == "fsdp":
        # FSDP's checkpoints reassemble a plain GPT (distributed.full_state), which would drop the head
        raise ConfigError("reward models cannot train with --strategy fsdp (its checkpoints hold a plain GPT, without the head): use ddp, the default")
    resumed = find_resumed(run_dir, KEY, RewardConfig, cfg, "reward-model") if resume else None
    if resumed is not None:
        head = resumed.meta.get(HEAD_KEY)
        if not isinstance(head, dict) or head.get("task") != "reward":
            raise ConfigError(f"{resumed.path} is not a reward model (no {HEAD_KEY!r} of kind reward)")
        objective = build_objective(read_tokenizer(resumed.path / "tokenizer.json"), resumed.settings, resumed.block_size, resumed.seed)
        return train(None, None, objective, run_dir, resume=True, progress=progress, resume_overrides=train_fields, report=report, started=started)
    check_fresh(base, cfg, train_fields, "a base or SFT checkpoint (--ckpt) and preference pairs (--data)")
    start = start_model(base)
    seed = train_fields.get("seed", TrainConfig().seed)
    objective = build_objective(start.tokenizer, cfg, start.model.config.block_size, seed)
    spec = HeadSpec(KEY, None, cfg.head_dropout)
    model = TaskModel.from_gpt(start.model, spec, seed)
    train_cfg = schedule(
        DEFAULTS, train_fields, cfg.epochs, lambda c: len(objective.train_set),
        lambda c: max(1, min(100, -(-len(objective.val_set) // c.batch_size))) if objective.val_set is not None else c.eval_batches,
    )  # fmt: skip
    for line in start.lines:
        report(line)
    report(f"head: Linear({model.config.n_embd} -> 1, no bias) on the hidden state at the conversation's last token")
    meta = {HEAD_KEY: spec.to_dict(), KEY: cfg.to_dict(), "base": {"path": str(start.ckpt.path.resolve()), "step": start.ckpt.step}}
    return train(model.config, train_cfg, objective, run_dir, progress=progress, report=report, started=started, init_model=model, checkpoint_meta=meta)


# ----------------------------------------------------------------------------- scoring


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A reward-model checkpoint (or run directory's latest), its model in eval mode; CheckpointError for any other model."""
    from gptlab.checkpoint import load_checkpoint
    from gptlab.finetune.heads import TaskModel

    ckpt = load_checkpoint(path, device=device)
    if not isinstance(ckpt.model, TaskModel) or ckpt.model.spec.task != "reward":
        raise CheckpointError(f"{ckpt.path} is not a reward model (no {HEAD_KEY!r} of kind reward)")
    ckpt.model.eval()
    return ckpt


def check_same_tokenizer(reward: AnyTokenizer, policy: AnyTokenizer) -> None:
    """ConfigError unless the reward model reads the policy's token ids as the same text: PPO hands it the
    policy's ids."""
    if not same_encoding(reward, policy):
        raise ConfigError(
            f"the reward model's tokenizer differs from the policy's ({reward.name!r}, {reward.vocab_size} ids vs {policy.name!r}, {policy.vocab_size} ids)"
        )


@torch.no_grad()
def score_conversations(model: nn.Module, tokenizer: AnyTokenizer, conversations: Sequence[Messages], batch_size: int = 16) -> Tensor:
    """The reward of each whole conversation (its last message the reply), (N,) float32 on the CPU.

    A conversation longer than the model's context keeps its last block_size tokens (the reward reads the end).
    """
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    template = ChatTemplate(tokenizer)
    block = model.config.block_size
    seqs = [np.asarray(template.render(c).ids[-block:], dtype=np.int64) for c in conversations]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(seqs), dtype=torch.float32)
    for s in range(0, len(seqs), batch_size):
        x, last = pad_right(seqs[s : s + batch_size])
        out[s : s + batch_size] = model(x.to(device), extract=last.to(device))[0].float().cpu()
    model.train(was_training)
    return out


def score_replies(model: nn.Module, tokenizer: AnyTokenizer, prompts: Sequence[Messages], replies: Sequence[str], batch_size: int = 16) -> Tensor:
    """r(prompt, reply) of each prompt (a conversation ending with the user's turn) and the assistant reply to it, (B,)."""
    if len(prompts) != len(replies):
        raise InputError(f"{len(prompts)} prompts but {len(replies)} replies; each prompt needs one reply")
    return score_conversations(model, tokenizer, [[*p, {"role": "assistant", "content": r}] for p, r in zip(prompts, replies)], batch_size)


@dataclass(frozen=True)
class Completion:
    """A prompt (messages) and a reply to score."""

    prompt: list[dict[str, str]]
    completion: str
    where: str  # "file:line", for errors


def read_completions(path: str | Path) -> list[Completion]:
    """The {"prompt": str | messages, "completion": str} rows of a JSONL file; errors name file:line."""
    from gptlab.chat import as_prompt
    from gptlab.fileio import jsonl_objects

    rows = []
    for where, row in jsonl_objects(path):
        if "prompt" not in row or not isinstance(row.get("completion"), str):
            raise DataError(f"{where}: a row to score needs 'prompt' (a string or messages) and 'completion' (a string)")
        try:
            rows.append(Completion(as_prompt(row["prompt"], where), row["completion"], where))
        except InputError as err:
            raise DataError(str(err)) from None
    return rows


def read_scoring_data(spec: str) -> list[Pair] | list[Completion]:
    """What `gptlab reward score` scores: preference pairs (a built-in set's test split, or a file whose first
    row has "chosen"), else {"prompt", "completion"} rows."""
    from gptlab.datasets import is_builtin

    if is_builtin(spec):
        return load_pairs(spec, "test")
    try:
        with open(spec, "rb") as f:
            first = next((line for line in f if line.strip()), b"")
        head = json.loads(first) if first else None
    except OSError as err:
        raise DataError(f"{spec}: cannot read ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        head = None  # the readers name the bad line
    return load_pairs(spec) if isinstance(head, dict) and "chosen" in head else read_completions(spec)
