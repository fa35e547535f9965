"""Autoregressive sampling.

Sampling controls are small pure functions over a (B, V) logits tensor, composed
in `sample_next`. Each step recomputes the whole (cropped) context; the cached
engine arrives with the generation-engine work and must give identical greedy output.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gptlab.config import SampleConfig
from gptlab.errors import InputError
from gptlab.model import GPT


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept), the rest -> -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability mass reaches p; the most likely token is always kept."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of (B, V) logits; temperature 0 is greedy. Returns (B,)."""
    logits = logits.float()
    if cfg.temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    model: GPT, prompt: torch.Tensor, cfg: SampleConfig, stop_id: int | None = None, vocab_size: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield (B,) next-token tensors for a (B, T) prompt, up to cfg.max_new_tokens.

    The context is cropped to the last block_size tokens once it grows past the
    model's window. Stops early when every row has produced `stop_id`. `vocab_size`
    (the tokenizer's) keeps sampling off the padding rows of a padded embedding.
    """
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise InputError(f"prompt must be a non-empty (batch, tokens) tensor, got shape {tuple(prompt.shape)}")
    block = model.config.block_size
    if prompt.size(1) > block:
        raise InputError(f"prompt has {prompt.size(1)} tokens but the model's context (block_size) is {block}")
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(cfg.seed)
    model.eval()
    idx = prompt
    finished = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    for _ in range(cfg.max_new_tokens):
        logits, _ = model(idx[:, -block:])
        nxt = sample_next(logits[:, -1, :vocab_size], cfg, generator)  # (B,)
        yield nxt
        idx = torch.cat([idx, nxt[:, None]], dim=1)  # (B, T+1)
        if stop_id is not None:
            finished |= nxt == stop_id
            if bool(finished.all()):
                return


def generate(
    model: GPT, prompt: torch.Tensor, cfg: SampleConfig, stop_id: int | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """Prompt followed by the generated tokens, (B, T + new)."""
    new = list(generate_tokens(model, prompt, cfg, stop_id, vocab_size))
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt
