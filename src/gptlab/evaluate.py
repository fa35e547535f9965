"""Held-out evaluation: loss, perplexity and bits per byte over a whole split of a data
directory, or over any text file under a checkpoint's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.data import TokenData, sequential_batches
from gptlab.errors import ConfigError, DataError
from gptlab.model import GPT
from gptlab.tokenizer import EOT, AnyTokenizer
from gptlab.train import autocast_context, loss_metrics


@torch.no_grad()
def evaluate_split(
    model: GPT,
    data: TokenData,
    split: str = "val",
    batch_size: int = 8,
    max_tokens: int | None = None,
    dtype: str = "float32",
    progress: bool = False,
) -> dict[str, float]:
    """Exact mean loss over every target token of `split` (non-overlapping windows), as
    loss / perplexity / bpb, plus the number of tokens scored."""
    shards = data.shards(split)
    n_tokens = data.tokens(split)
    if n_tokens < 2:
        raise DataError(f"{data.path}: the {split} split holds no tokens to score (prepared with --val-fraction 0?); evaluate a text file instead")
    device = next(model.parameters()).device
    model.eval()
    total_nll = 0.0
    total_targets = 0
    batches = sequential_batches(shards, model.config.block_size, batch_size, max_tokens)
    if progress:
        from tqdm.auto import tqdm

        n_windows = -(-(min(n_tokens - 1, max_tokens or n_tokens)) // model.config.block_size)
        batches = tqdm(batches, total=-(-n_windows // batch_size), desc=f"eval {split}", unit="batch")
    for x, y in batches:
        with autocast_context(device, dtype):
            logits, _ = model(x.to(device))
        nll = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum"
        )
        total_nll += nll.item()
        total_targets += int((y != -100).sum())
    loss = total_nll / max(total_targets, 1)
    return {**loss_metrics(loss, data.bytes_per_token(split)), "tokens": total_targets}


# ----------------------------------------------------------------------------- any text


@dataclass(frozen=True)
class Window:
    """One forward pass of a rolling evaluation: inputs seq[start:end - 1] predict seq[start + 1:end],
    and the targets from `first` (an index into seq) to end - 1 are scored."""

    start: int
    first: int
    end: int


def rolling_windows(n: int, block_size: int, stride: int) -> list[Window]:
    """Windows that predict tokens 1..n-1 of a sequence of n tokens, each exactly once.

    The first window predicts its block_size tokens; each later one moves on by `stride`
    tokens and predicts only those: its inputs are the block_size tokens that end just
    before its last target, so its first target sees at least block_size - stride + 1
    tokens. stride = block_size gives non-overlapping windows. This is lm-evaluation-harness's
    rolling log-likelihood (`get_rolling_token_windows` with context_len = block_size -
    stride + 1), which scores perplexity tasks with stride = block_size.
    """
    if not isinstance(stride, int) or not 1 <= stride <= block_size:
        raise ConfigError(f"stride must be an integer in [1, block_size={block_size}], got {stride!r}")
    windows, first = [], 1
    while first < n:
        end = min(first + (block_size if first == 1 else stride), n)
        windows.append(Window(max(0, end - 1 - block_size), first, end))
        first = end
    return windows


@torch.no_grad()
def evaluate_text(
    model: GPT,
    tokenizer: AnyTokenizer,
    text: str,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    dtype: str = "float32",
    progress: bool = False,
) -> dict[str, float | bool]:
    """Loss, perplexity and bits per byte of `text` under `model`, by `rolling_windows`.

    The text is one document: its tokens follow <|endoftext|>, as every document in
    training does, so the first token is predicted too (a tokenizer without that token
    leaves the first token unscored). stride defaults to the context (non-overlapping
    windows); a smaller stride gives each token more context and costs block_size / stride
    times the compute. Bits per byte is the summed loss in bits over the UTF-8 bytes of the
    scored text, exact rather than through an average bytes per token. max_tokens scores
    only the first tokens (and bytes) of the text.
    """
    block = model.config.block_size
    stride = block if stride is None else stride
    ids = tokenizer.encode_batch([text])[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    eot = tokenizer.special_tokens.get(EOT)
    seq = ([eot] if eot is not None else []) + ids
    if len(seq) < 2:
        raise DataError("the text holds too few tokens to score (it needs at least one after the first)")
    n_bytes = len(tokenizer.decode(seq[1:]).encode("utf-8", "surrogatepass"))  # what the scored tokens spell
    windows = rolling_windows(len(seq), block, stride)
    device = next(model.parameters()).device
    model.eval()
    tokens = torch.tensor(seq, dtype=torch.long)
    batches = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="eval text", unit="batch")
    total_nll = 0.0
    for b in batches:
        group = windows[b : b + batch_size]
        width = max(w.end - 1 - w.start for w in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full_like(x, -100)  # ignored: padding and targets an earlier window scored
        for row, w in enumerate(group):
            n = w.end - 1 - w.start
            x[row, :n] = tokens[w.start : w.end - 1]
            skip = w.first - 1 - w.start
            y[row, skip:n] = tokens[w.first : w.end]
        with autocast_context(device, dtype):
            logits, _ = model(x.to(device))
        total_nll += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum").item()
    n_scored = len(seq) - 1
    # loss_metrics' bpb, loss / ln 2 / (bytes per token), is the summed loss in bits over the bytes
    return {
        **loss_metrics(total_nll / n_scored, max(n_bytes, 1) / n_scored),
        "tokens": n_scored,
        "after_eot": eot is not None,  # whether the first token was scored, after <|endoftext|>
        "bytes": n_bytes,
        "windows": len(windows),
        "stride": stride,
    }
