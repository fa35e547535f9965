"""Preference pairs: a prompt with a preferred ("chosen") and a dispreferred ("rejected") reply.

Rows are JSONL, in either of the two shapes people use (TRL's and Anthropic HH's):

    explicit prompt   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
    implicit prompt   {"chosen": messages, "rejected": messages}: the two conversations share
                      their first turns (the prompt) and differ in the last assistant turn

A string prompt is one user message; a string reply one assistant message. Both replies are
rendered after the same prompt by the chat template (gptlab.chat), so a pair differs only in
the reply's tokens, and only those (with the <|im_end|> that closes them) are scored.

Errors name file:line: a malformed row, a reply that is not the assistant's, and a pair whose
chosen and rejected replies are identical (it teaches nothing, and DPO's loss on it is a
constant log 2 that hides a data bug). Over-long pairs keep their start, as SFT conversations
do; a pair left with no reply token on either side is skipped, and both are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gptlab.chat import ChatTemplate, check_messages
from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import ConfigError, DataError, InputError
from gptlab.model import IGNORE_INDEX, label_logprobs


@dataclass(frozen=True)
class Pair:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]  # the reply turn(s) after the prompt
    rejected: list[dict[str, str]]
    where: str  # "file:line", for errors


def _turns(value: Any, role: str, where: str, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return check_messages(value, f"{where}: {name!r}")
    raise InputError(f"{where}: {name!r} must be a string or a list of messages, got {type(value).__name__}")


def row_pair(row: Any, where: str) -> Pair:
    """A Pair from one decoded JSONL row (either shape); InputError naming `where` when malformed."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        raise InputError(f"{where}: a preference row needs 'chosen' and 'rejected' (and optionally 'prompt'); got {keys}")
    chosen = _turns(row["chosen"], "assistant", where, "chosen")
    rejected = _turns(row["rejected"], "assistant", where, "rejected")
    if "prompt" in row:
        prompt = _turns(row["prompt"], "user", where, "prompt")
    else:  # implicit prompt: the turns both conversations share
        if not isinstance(row["chosen"], list) or not isinstance(row["rejected"], list):
            raise InputError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be whole conversations (lists of messages)")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply[-1]["role"] != "assistant":
            raise InputError(f"{where}: the {name} reply must end with an assistant message, not a {reply[-1]['role']} one")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise InputError(f"{where}: the prompt must end with a user (or system) message")
    if chosen == rejected:
        raise InputError(f"{where}: chosen and rejected are identical; a pair must prefer one reply over another")
    return Pair(prompt, chosen, rejected, where)


def read_pairs(path: str | Path) -> list[Pair]:
    """The preference pairs of a JSONL file; errors name file:line."""
    from gptlab.fileio import jsonl_objects

    pairs = []
    for where, row in jsonl_objects(path):
        try:
            pairs.append(row_pair(row, where))
        except InputError as err:
            raise DataError(str(err)) from None
    return pairs


def load_pairs(spec: str, split: str = "train") -> list[Pair]:
    """Pairs from a JSONL file, or from a built-in preference set ("builtin:NAME")."""
    from gptlab.datasets import is_builtin

    if is_builtin(spec):
        from gptlab.datasets import load_preferences, parse_builtin_preferences

        name = parse_builtin_preferences(spec)
        return [row_pair(r, f"{spec}[{split}] row {i}") for i, r in enumerate(load_preferences(name, split))]
    return read_pairs(spec)


# ----------------------------------------------------------------------------- encoding


@dataclass
class EncodedPairs:
    """Each pair as two (ids, target mask) sequences of at most max_len + 1 tokens, sharing the prompt's ids."""

    chosen: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    rejected: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    truncated: int = 0  # pairs with a side cut to max_len + 1 tokens
    skipped: int = 0  # pairs the cut left with no reply token on a side

    def __len__(self) -> int:
        return len(self.chosen)


def encode_pairs(template: ChatTemplate, pairs: list[Pair], max_len: int) -> EncodedPairs:
    """Render both sides of every pair; the mask marks the reply's tokens (and its <|im_end|>)."""
    out = EncodedPairs()
    for pair in pairs:
        sides = []
        cut = False
        for reply in (pair.chosen, pair.rejected):
            r = template.render(pair.prompt + reply)
            ids, mask = np.asarray(r.ids, dtype=np.int64), np.asarray(r.mask, dtype=bool)
            # the prompt's own assistant turns (earlier in a conversation) are context, not the reply
            mask[: len(template.render(pair.prompt).ids)] = False
            if len(ids) > max_len + 1:
                ids, mask, cut = ids[: max_len + 1], mask[: max_len + 1], True
            sides.append((ids, mask))
        out.truncated += cut
        if not all(mask[1:].any() for _, mask in sides):
            out.skipped += 1
            continue
        out.chosen.append(sides[0])
        out.rejected.append(sides[1])
        out.sources.append(pair.where)
    return out


def split_pairs(data: EncodedPairs, fraction: float, seed: int) -> tuple[EncodedPairs, EncodedPairs | None]:
    """(train, val): a seeded `fraction` of the pairs held out (finetune.runs.held_out); no val under 10 pairs."""
    from gptlab.finetune.runs import held_out

    held = held_out(len(data), fraction, seed)
    if held is None:
        return data, None

    def part(keep: bool) -> EncodedPairs:
        idx = [i for i in range(len(data)) if (i in held) != keep]
        return EncodedPairs([data.chosen[i] for i in idx], [data.rejected[i] for i in idx], [data.sources[i] for i in idx])

    train = part(True)
    train.truncated, train.skipped = data.truncated, data.skipped
    return train, part(False)


def pair_splits(
    data: tuple[str, ...], val_data: tuple[str, ...], val_fraction: float, template: ChatTemplate, max_len: int, seed: int,
    encode: Callable[[ChatTemplate, list[Pair], int], EncodedPairs] = encode_pairs,
) -> tuple[EncodedPairs, EncodedPairs | None]:
    """(train, held-out) encoded pairs: the held-out set is val_data, else a built-in set's test split, else
    val_fraction of data. `encode` turns pairs into sequences (DPO: encode_pairs; reward models: whole, uncut)."""
    from gptlab.datasets import is_builtin

    def encoded(specs: tuple[str, ...], split: str) -> EncodedPairs:
        out = encode(template, [p for spec in specs for p in load_pairs(spec, split)], max_len)
        if not len(out):
            raise DataError(f"{', '.join(specs)}: no pair fits in max_len ({max_len} tokens) with a reply token on both sides")
        return out

    train = encoded(data, "train")
    if val_data:
        return train, encoded(val_data, "train")
    if all(is_builtin(spec) for spec in data):
        return train, encoded(data, "test")
    return split_pairs(train, val_fraction, seed)


def collate_sequences(seqs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor]:
    """(x, y) for sequences padded to the longest: y holds the masked tokens' ids, IGNORE_INDEX elsewhere."""
    width = max(len(ids) - 1 for ids, _ in seqs)
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    y = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        x[b, :n] = torch.from_numpy(ids[:-1])
        y[b, :n] = torch.from_numpy(np.where(mask[1:], ids[1:], IGNORE_INDEX))
    return x, y


def sequence_logprobs(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """log p(reply | prompt) per row: the sum of the log-probabilities of the target tokens (y != IGNORE_INDEX), (B,)."""
    return label_logprobs(model, x, y).sum(dim=-1)


Collate = Callable[[list[tuple[np.ndarray, np.ndarray]]], tuple[Tensor, ...]]  # sequences -> batch tensors


class PairBatches:
    """An endless, resumable stream of batches of pairs, each (*collate(sides), index), where `sides`
    holds the batch's chosen sides followed by its rejected sides and `index` (B,) names the pairs.
    The default collate gives (x, y) to score the replies' tokens (collate_sequences);
    a reward model's stores each pair's shared start once, the two replies as branches after it
    (gptlab.align.reward.collate_branched).

    Epoch e visits the pairs in the permutation keyed by (seed, e). batch_size pairs make a
    global batch; each process takes its slice. With `exact` there is one epoch, then batches
    of no pairs, so batches covering the epoch score every pair once (held-out evaluation).
    """

    def __init__(
        self, data: EncodedPairs, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, exact: bool = False,
        collate: Collate = collate_sequences,
    ) -> None:  # fmt: skip
        if batch_size % world_size:
            raise InputError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        self.data, self.batch_size, self.seed, self.exact, self.collate = data, batch_size, seed, exact, collate
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.epoch, self.row = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def next_batch(self) -> tuple[Tensor, ...]:
        picked: list[int] = []
        order = self._order(self.epoch)
        for _ in range(self.batch_size):
            if self.exact and self.epoch > 0:
                picked.append(-1)
                continue
            picked.append(int(order[self.row]))
            self.row += 1
            if self.row == len(order):
                self.epoch, self.row = self.epoch + 1, 0
                order = self._order(self.epoch)
        mine = [i for i in picked[self.local] if i >= 0]
        if not mine:  # only padding left (exact mode): one empty pair that scores nothing
            empty = (np.zeros(2, dtype=np.int64), np.zeros(2, dtype=bool))
            return *self.collate([empty, empty]), torch.full((1,), -1, dtype=torch.long)
        sides = [self.data.chosen[i] for i in mine] + [self.data.rejected[i] for i in mine]
        return *self.collate(sides), torch.tensor(mine, dtype=torch.long)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


class PairObjective:
    """The plumbing the DPO and reward-model objectives share (see train.Objective): the encoded pairs,
    their batches (with the subclass's `collate`), the vocabulary check and the per-pair step weights.
    Each objective adds its loss, score, metrics and description."""

    collate: Collate = staticmethod(collate_sequences)

    def __init__(self, tokenizer: Any, train: EncodedPairs, val: EncodedPairs | None) -> None:
        self.tokenizer, self.train_set, self.val_set = tokenizer, train, val
        self.has_val = val is not None

    def check(self, model_config: GPTConfig) -> None:
        if model_config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"the model has {model_config.vocab_size} token rows but the tokenizer {self.tokenizer.vocab_size} ids")

    def batches(self, split: str, block_size: int, batch_size: int, seed: int, rank: int, world_size: int) -> PairBatches:
        data = self.train_set if split == "train" else self.val_set
        if data is None:
            raise DataError("no held-out pairs")
        return PairBatches(data, batch_size, seed, rank, world_size, exact=split != "train", collate=self.collate)

    def weight(self, batch: tuple[Tensor, ...]) -> int:
        """Pairs in the batch (train_step weights micro-batches by it)."""
        return int((batch[-1] >= 0).sum())

    def tokens_per_step(self, cfg: TrainConfig, block_size: int) -> int:
        sides = zip(self.train_set.chosen, self.train_set.rejected, strict=True)
        mean = sum(len(a) + len(b) for (a, _), (b, _) in sides) / max(len(self.train_set), 1)
        return int(cfg.batch_size * cfg.grad_accum * mean)
