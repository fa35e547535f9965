"""Log-likelihood requests and multiple-choice metrics, computed as lm-evaluation-harness computes them.

A request is (context, continuation): the log-probability of the continuation's tokens given the
context, and whether greedy decoding would have produced exactly those tokens. The pair is encoded
the way lm-eval's HF model encodes it (`_encode_pair`): trailing spaces of the context move to the
front of the continuation, the whole text is encoded once, and the continuation's tokens are the
whole's tokens after the context's own encoding. A request longer than the model's context keeps
its last block_size + 1 tokens (the continuation always survives whole when it fits), and is
counted as truncated.

Multiple choice scores each choice as one request and picks the highest: `acc` by the summed
log-likelihood, `acc_norm` by it divided by the choice's length in characters (lm-eval's
acc_norm), `acc_bytes` by its length in UTF-8 bytes. Ties go to the first choice, as np.argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gptlab.errors import InputError
from gptlab.model import IGNORE_INDEX, target_logprobs
from gptlab.tokenizer import AnyTokenizer


def encode_pair(tokenizer: AnyTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's rule (see the module docstring)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float  # the continuation's summed log-probability, in nats
    greedy: bool  # every continuation token was the argmax at its position
    truncated: bool  # the context lost tokens at its start to fit the model


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer: AnyTokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16) -> list[LogLikelihood]:
    """Score (context, continuation) requests, batched longest first; results in the requests' order."""
    block = model.config.block_size
    encoded = []
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise InputError(f"request {i}: the continuation {continuation!r} encodes to no tokens")
        if len(cont) > block:
            raise InputError(f"request {i}: the continuation has {len(cont)} tokens, more than the model's context ({block})")
        ids = ctx + cont
        if not ctx:  # nothing to condition the first token on: lm-eval starts such requests with the end-of-text token
            ids = [tokenizer.eot_id, *ids]
        truncated = len(ids) > block + 1
        encoded.append((ids[-(block + 1) :], len(cont), truncated))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[LogLikelihood | None] = [None] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i][0]) for i in rows) - 1
            x = torch.zeros(len(rows), width, dtype=torch.long)
            y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for b, i in enumerate(rows):
                ids, n_cont, _ = encoded[i]
                t = torch.tensor(ids)
                x[b, : len(ids) - 1] = t[:-1]
                y[b, len(ids) - 1 - n_cont : len(ids) - 1] = t[-n_cont:]  # position p predicts token p + 1
            scored = y != IGNORE_INDEX  # (B, T)
            logits = model(x.to(device), logits_at=scored.to(device))[0].float()  # (N, V), row-major over scored
            targets = y[scored].to(device)  # (N,)
            logp = target_logprobs(logits, targets).cpu()  # (N,)
            hit = (logits.argmax(dim=-1) == targets).cpu()  # (N,)
            counts = scored.sum(dim=1).tolist()
            for i, lp, ok in zip(rows, logp.split(counts), hit.split(counts), strict=True):
                out[i] = LogLikelihood(float(lp.double().sum()), bool(ok.all()), encoded[i][2])
    finally:
        model.train(was_training)
    assert all(r is not None for r in out), "every request was in a batch"
    return out  # type: ignore[return-value]


def choice_metrics(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm (log-likelihood per character of the choice) and acc_bytes (per UTF-8 byte) of one document."""
    if len(logprobs) != len(choices) or not choices:
        raise InputError(f"{len(logprobs)} log-likelihoods for {len(choices)} choices")
    if not 0 <= gold < len(choices):
        raise InputError(f"the gold index {gold} is out of range for {len(choices)} choices")

    def first_best(scores: Sequence[float]) -> int:
        return max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of equal maxima

    chars = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    nbytes = [lp / max(len(c.encode()), 1) for lp, c in zip(logprobs, choices, strict=True)]
    return {
        "acc": float(first_best(logprobs) == gold),
        "acc_norm": float(first_best(chars) == gold),
        "acc_bytes": float(first_best(nbytes) == gold),
    }
