"""Held-out evaluation: loss, perplexity and bits per byte over a whole split."""

from __future__ import annotations

import torch

from gptlab.data import TokenData, sequential_batches
from gptlab.model import GPT
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
    device = next(model.parameters()).device
    model.eval()
    total_nll = 0.0
    total_targets = 0
    batches = sequential_batches(shards, model.config.block_size, batch_size, max_tokens)
    if progress:
        from tqdm.auto import tqdm

        n_tokens = data.tokens(split)
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
