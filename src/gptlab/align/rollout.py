"""Rollouts for on-policy RL (GRPO, PPO): sample replies with the KV-cached engine, then score
their tokens' log-probabilities under the policy (with gradients) and under a frozen reference.

Sampling goes through gptlab.generate.Engine: every prompt of a batch, and every sample of a
group, runs in one batched, KV-cached generation, each row with its own seed (so a run
reproduces) and stopping at <|im_end|>, which is kept as the reply's last token (the policy
must learn to end its turn). The engine reads the policy's current weights, not a copy.

The log-probabilities are then recomputed in one teacher-forced forward pass over prompt +
reply, as the loss needs them with gradients; the sampling-time values would differ in the
last bits anyway (another kernel, batch shape and dtype), which is why PPO-style ratios use
this recomputation, not the sampler's numbers, as the "old" policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gptlab.chat import ChatTemplate
from gptlab.config import SampleConfig
from gptlab.model import IGNORE_INDEX


@dataclass
class Rollouts:
    """Sampled replies: for row i, prompt_ids[i] then reply_ids[i] (ending at <|im_end|> unless cut by length)."""

    prompts: list[Sequence[Mapping[str, str]]]  # the conversation each row answers
    prompt_ids: list[list[int]]
    reply_ids: list[list[int]]
    texts: list[str]  # the replies' text, without <|im_end|>
    finished: list[bool]  # whether the reply ended with <|im_end|> (not cut by max_new_tokens or the context)

    def __len__(self) -> int:
        return len(self.reply_ids)


def sample_replies(
    policy: nn.Module, template: ChatTemplate, prompts: Sequence[Sequence[Mapping[str, str]]], group_size: int, cfg: SampleConfig, seed: int
) -> Rollouts:
    """group_size sampled replies to each prompt (rows prompt-major: the group of prompt k is rows k*G .. k*G+G-1)."""
    from gptlab.generate import Engine

    engine = Engine(policy, template.tokenizer, onednn=False)  # shares the policy's weights: always the current ones
    rows = [p for p in prompts for _ in range(group_size)]
    ids = [template.generation_prompt(p) for p in rows]
    cfgs = [cfg.replace(seed=seed + i, stop_token_ids=(template.end_id,)) for i in range(len(rows))]
    done = engine.generate(ids, cfgs)
    return Rollouts(
        list(rows), ids, [d.token_ids for d in done], [d.text for d in done], [bool(d.token_ids) and d.token_ids[-1] == template.end_id for d in done]
    )


def collate_rollouts(rollouts: Rollouts, rows: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """(x, y) for teacher forcing prompt + reply: y holds the reply's tokens, IGNORE_INDEX elsewhere (right-padded)."""
    rows = range(len(rollouts)) if rows is None else rows
    seqs = [(rollouts.prompt_ids[i] + rollouts.reply_ids[i], len(rollouts.prompt_ids[i])) for i in rows]
    width = max(len(s) for s, _ in seqs) - 1
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    y = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids)
        x[b, : len(ids) - 1] = t[:-1]
        y[b, n_prompt - 1 : len(ids) - 1] = t[n_prompt:]  # position p predicts token p + 1: the reply's tokens
    return x, y


def wrong_reply_pairs(policy: nn.Module, template: ChatTemplate, rows: Sequence[PromptRow], samples: int, cfg: SampleConfig, seed: int) -> list[dict]:
    """Preference pairs from the policy's own mistakes: `samples` sampled replies to each row, and for every
    distinct reply that misses the row's reference answer (exact_match), {"prompt", "chosen": the reference,
    "rejected": that reply}. Labelled by a checker instead of people, these are RLHF's comparisons of
    model samples (Ouyang et al. 2022): the rejected side is what this policy actually gets wrong."""
    from gptlab.datasets import exact_match

    checked = [r for r in rows if r.reference is not None]
    rollouts = sample_replies(policy, template, [r.messages for r in checked], samples, cfg, seed)
    pairs = []
    for k, row in enumerate(checked):
        wrong = dict.fromkeys(t for t in rollouts.texts[k * samples : (k + 1) * samples] if t.strip() and not exact_match(t, row.reference))
        pairs += [{"prompt": row.messages, "chosen": row.reference, "rejected": text} for text in wrong]
    return pairs


# ----------------------------------------------------------------------------- prompt sets


@dataclass(frozen=True)
class PromptRow:
    messages: list[dict[str, str]]  # the conversation to answer, ending with the user's turn
    reference: str | None  # the row's reference answer ("answer"), given to rewards that take one
    where: str  # "file:line", for errors


def read_prompt_rows(spec: str, split: str = "train") -> list[PromptRow]:
    """Prompts from a JSONL file ({"prompt": str | messages, "answer": optional str}; errors name file:line)
    or a built-in prompt set ("builtin:NAME")."""
    from gptlab.chat import as_prompt
    from gptlab.datasets import is_builtin
    from gptlab.errors import DataError, InputError
    from gptlab.fileio import jsonl_objects

    if is_builtin(spec):
        from gptlab.datasets import load_prompts, parse_builtin_prompts

        rows = load_prompts(parse_builtin_prompts(spec), split)
        return [PromptRow(r["prompt"], r.get("answer"), f"{spec}[{split}] row {i}") for i, r in enumerate(rows)]
    out = []
    for where, row in jsonl_objects(spec):
        if "prompt" not in row:
            raise DataError(f'{where}: a prompt row is {{"prompt": str | messages, "answer": optional str}}')
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise DataError(f"{where}: 'answer' must be a string, got {type(answer).__name__}")
        try:
            out.append(PromptRow(as_prompt(row["prompt"], where), answer, where))
        except InputError as err:
            raise DataError(str(err)) from None
    return out
