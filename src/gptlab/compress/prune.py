"""Pruning: remove a fraction of a GPT's weights, unstructured (zeros in the matrices) or structured
(whole attention heads or MLP channels, so the matrices really shrink).

Which weights go is decided by a score per weight, smallest first:
- magnitude: |W_ij|, compared within each matrix (the classic baseline, Han et al. 2015).
- wanda: |W_ij| * ||X_j||_2, the weight times the L2 norm of its input feature over a few
  calibration sequences, compared within each output row (Sun et al. 2023, "A Simple and Effective
  Pruning Approach for Large Language Models", eq. 1 and section 3): a small weight on a feature
  with large activations matters more than its size says. As in the paper's code the layers are
  pruned in order, each block's input norms measured on the output of the blocks pruned before it.

Structured pruning scores whole units and keeps the best ones in every layer, the same number per
layer so one GPTConfig describes the result:
- an attention head: its query, key and value rows of c_attn and its columns of c_proj; removing
  heads keeps their width (GPTConfig.head_size), so n_head * head_size < n_embd afterwards.
- an MLP channel: its row of c_fc and its column of c_proj (GPTConfig.n_inner shrinks). The kept
  width is rounded to a multiple of 32, which int4 quantization groups and aligned matmuls want.
A unit's magnitude score is the L1 norm of its weights; its wanda score sums |W_ij| * ||X_j|| over
its c_proj columns, the activation-aware importance of its output (Wanda's metric per unit, as
its structured variant and FLAP, An et al. 2024, do).

The Linear layers inside the blocks are pruned; the token table, positions and the head (tied to
the table) are not, as in the Wanda paper. Unstructured zeros make a checkpoint no smaller or
faster with dense kernels; structured pruning shrinks both. `Recovery` fine-tunes a pruned model
on language-modelling data through the normal training loop, its zeros kept at zero.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gptlab.checkpoint import HEAD_KEY, QUANT_KEY, Checkpoint, find_checkpoint, load_checkpoint, read_checkpoint_meta, write_checkpoint_dir
from gptlab.config import TrainConfig, _Serializable
from gptlab.data import ShardLoader, TokenData, load_data
from gptlab.errors import CheckpointError, ConfigError
from gptlab.model import GPT, Block
from gptlab.tokenizer import same_encoding
from gptlab.train import LanguageModeling, TrainResult, train

PRUNE_KEY = "pruning"  # checkpoint.json entry of a pruned model
METHODS = ("magnitude", "wanda")
STRUCTURES = ("heads", "mlp")
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the pruned matrices of every block
MLP_MULTIPLE = 32  # kept MLP channels round to a multiple of this
WANDA_NEEDS_DATA = "wanda scores weights by their inputs' norms: it needs calibration text (--data, a prepared data directory)"


@dataclass(frozen=True)
class PruneConfig(_Serializable):
    sparsity: float = 0.5  # fraction of the pruned matrices' weights (or of the units) removed
    method: str = "magnitude"  # magnitude | wanda (needs calibration text)
    structured: str | None = None  # None: single weights; "heads" or "mlp": whole units
    calibration: int = 32  # calibration sequences of block_size tokens (wanda)
    seed: int = 0  # which calibration sequences

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be a fraction strictly between 0 and 1, got {self.sparsity!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.structured is not None and self.structured not in STRUCTURES:
            raise ConfigError(f"structured must be one of {', '.join(STRUCTURES)}; got {self.structured!r}")
        if not isinstance(self.calibration, int) or self.calibration < 1:
            raise ConfigError(f"calibration must be a positive number of sequences, got {self.calibration!r}")


# ----------------------------------------------------------------------------- scores and masks


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """True where a weight is kept: all but the round(sparsity * numel) smallest |W| of the matrix."""
    n = round(sparsity * weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    keep[weight.abs().flatten().argsort(stable=True)[:n]] = False  # argsort, not a threshold: ties cannot overshoot
    return keep.view_as(weight)


def wanda_mask(weight: Tensor, input_norm: Tensor, sparsity: float) -> Tensor:
    """True where a weight (out, in) is kept: in each row, all but the round(sparsity * in) smallest |W_ij| * ||X_j||."""
    score = weight.abs() * input_norm[None, :]  # (out, in)
    n = round(sparsity * weight.size(1))
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1, stable=True)[:, :n], False)
    return keep


def _unit_scores(block: Block, structured: str, method: str, norms: dict[str, Tensor]) -> Tensor:
    """One score per head (n_head,) or MLP channel (mlp_dim,) of a block; higher matters more."""
    if structured == "heads":
        attn = block.attn
        nh, hs = attn.n_head, attn.head_dim
        proj = attn.c_proj.weight.abs()  # (C, nh * hs)
        if method == "wanda":
            return (proj * norms["attn.c_proj"][None, :]).view(-1, nh, hs).sum((0, 2))  # (nh,)
        qkv = attn.c_attn.weight.abs().view(3, nh, hs, -1).sum((0, 2, 3))  # (nh,): its query, key and value rows
        return qkv + proj.view(-1, nh, hs).sum((0, 2))
    proj = block.mlp.c_proj.weight.abs()  # (C, F)
    if method == "wanda":
        return (proj * norms["mlp.c_proj"][None, :]).sum(0)  # (F,)
    fc = block.mlp.c_fc.weight.abs().sum(1)  # (F,), or (2F,) gated: channel j's gate row j and up row F + j
    return (fc.view(2, -1).sum(0) if block.mlp.gated else fc) + proj.sum(0)


def kept_units(structured: str, total: int, sparsity: float) -> int:
    """How many heads or MLP channels of `total` stay at `sparsity` (at least one head, at least one multiple of 32 channels)."""
    if structured == "heads":
        return max(1, round(total * (1 - sparsity)))
    if total <= MLP_MULTIPLE:
        return max(1, round(total * (1 - sparsity)))
    return max(MLP_MULTIPLE, round(total * (1 - sparsity) / MLP_MULTIPLE) * MLP_MULTIPLE)


def _shrink(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new Linear with only the given output rows and/or input columns of `linear`."""
    w = linear.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    out = nn.Linear(w.size(1), w.size(0), bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    return out


def _remove_units(block: Block, structured: str, keep: Tensor) -> None:
    """Cut a block's matrices down to the kept heads or channels `keep` (sorted indices), in place."""
    if structured == "heads":
        attn = block.attn
        nh, hs = attn.n_head, attn.head_dim
        cols = (keep[:, None] * hs + torch.arange(hs)).flatten()  # (k * hs,): the kept heads' features
        rows = torch.cat([part * nh * hs + cols for part in range(3)])  # their query, key and value rows
        attn.c_attn, attn.c_proj = _shrink(attn.c_attn, rows=rows), _shrink(attn.c_proj, cols=cols)
        attn.n_head = attn.n_kv_head = len(keep)  # one key/value head per query head: prune_model refuses grouped ones
    else:
        width = block.mlp.c_proj.weight.size(1)
        rows = torch.cat([keep, width + keep]) if block.mlp.gated else keep  # a gated channel is a gate row and an up row
        block.mlp.c_fc, block.mlp.c_proj = _shrink(block.mlp.c_fc, rows=rows), _shrink(block.mlp.c_proj, cols=keep)


# ----------------------------------------------------------------------------- the pass over the blocks


def _input_norms(block: Block, hidden: Tensor, rope: tuple[Tensor, Tensor] | None, chunk: int) -> dict[str, Tensor]:
    """||X_j||_2 over all calibration tokens for the input features of each of a block's pruned Linears."""
    sums: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].size(-1))  # (tokens, in)
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)

        return hook

    hooks = [block.get_submodule(name).register_forward_pre_hook(record(name)) for name in LINEARS]
    try:
        for s in range(0, hidden.size(0), chunk):
            block(hidden[s : s + chunk], None, None, rope)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: total.sqrt() for name, total in sums.items()}


@torch.no_grad()
def prune_model(model: GPT, cfg: PruneConfig, calibration: Tensor | None = None) -> tuple[GPT, dict[str, Any]]:
    """Prune `model` as `cfg` says; `calibration` (N, T) token ids for wanda. Returns the pruned model (a new, smaller GPT
    when structured; `model` itself, changed in place, otherwise) and what was removed (for checkpoint.json).
    Structured pruning cuts `model`'s blocks down in place on the way, so its config no longer describes it: use the
    returned model, not the one passed in."""
    if cfg.method == "wanda" and calibration is None:
        raise ConfigError(WANDA_NEEDS_DATA)
    if cfg.structured == "heads" and model.config.kv_heads != model.config.n_head:
        raise ConfigError(f"pruning whole heads of a grouped-query model ({model.config.n_head} query heads sharing {model.config.kv_heads} "
                          "key/value heads) is not supported; prune MLP channels or weights")  # fmt: skip
    model.eval()
    # what the first block reads, and with RoPE the angles every block reads
    hidden, rope = model.embed(calibration, torch.arange(calibration.size(1), device=calibration.device)) if cfg.method == "wanda" else (None, None)
    chunk = 4  # calibration sequences per forward pass: bounds the activations held at once
    zeros = total = 0
    removed: list[list[int]] = []
    for block in model.transformer.h:
        norms = _input_norms(block, hidden, rope, chunk) if hidden is not None else {}
        if cfg.structured is None:
            for name in LINEARS:
                w = block.get_submodule(name).weight
                keep = wanda_mask(w, norms[name], cfg.sparsity) if cfg.method == "wanda" else magnitude_mask(w, cfg.sparsity)
                w.mul_(keep)
                zeros, total = zeros + int((~keep).sum()), total + w.numel()
        else:
            scores = _unit_scores(block, cfg.structured, cfg.method, norms)
            k = kept_units(cfg.structured, scores.numel(), cfg.sparsity)
            keep = scores.argsort(descending=True, stable=True)[:k].sort().values  # the best k, in their original order
            removed.append(sorted(set(range(scores.numel())) - set(keep.tolist())))
            before = sum(block.get_submodule(name).weight.numel() for name in LINEARS)
            _remove_units(block, cfg.structured, keep)
            after = sum(block.get_submodule(name).weight.numel() for name in LINEARS)
            zeros, total = zeros + before - after, total + before
        if hidden is not None:
            hidden = torch.cat([block(hidden[s : s + chunk], None, None, rope) for s in range(0, hidden.size(0), chunk)])  # the pruned block's output
    info: dict[str, Any] = {**cfg.to_dict(), "removed_fraction": zeros / total}
    if cfg.structured is None:
        return model, info
    c = model.config
    new_cfg = c.replace(n_head=model.transformer.h[0].attn.n_head, head_size=c.head_dim) if cfg.structured == "heads" else c.replace(n_inner=k)
    pruned = GPT(new_cfg)
    pruned.load_state_dict(model.state_dict())
    info.update(units=scores.numel(), kept_units=k, removed=removed)  # per layer, the indices of the removed heads or channels
    return pruned.eval(), info


def calibration_ids(data: TokenData, n: int, block_size: int, seed: int) -> Tensor:
    """n sequences of block_size tokens from the training split, (n, T), the same for the same seed."""
    return ShardLoader(data.shards("train"), block_size, n, seed=seed).next_batch()[0]


# ----------------------------------------------------------------------------- checkpoints


def _pruned(src: str | os.PathLike[str], data: TokenData | None, cfg: PruneConfig) -> tuple[Checkpoint, GPT, dict[str, Any]]:
    """The checkpoint `src`, its model pruned as `cfg` says (calibrated on `data` for wanda), and the checkpoint.json entries
    that say what was removed, from what. Refuses what cannot be pruned: a quantized checkpoint, a task model, data in another
    tokenizer."""
    if cfg.method == "wanda" and data is None:
        raise ConfigError(WANDA_NEEDS_DATA)
    loaded = load_checkpoint(src)
    if QUANT_KEY in loaded.meta:
        raise CheckpointError(f"{loaded.path} is quantized; prune the float checkpoint it was made from, then quantize")
    if HEAD_KEY in loaded.meta:
        raise CheckpointError(f"{loaded.path} is a task model (a classification head); prune takes a language model")
    if data is not None and not same_encoding(data.tokenizer(), loaded.tokenizer):
        raise ConfigError(f"{data.path} was tokenized with another tokenizer than {loaded.path}'s model")
    calibration = calibration_ids(data, cfg.calibration, loaded.model_config.block_size, cfg.seed) if cfg.method == "wanda" else None
    model, info = prune_model(loaded.model, cfg, calibration)
    return loaded, model, {PRUNE_KEY: info, "source": {"pruned_from": str(loaded.path.resolve()), "step": loaded.step}}


def prune_checkpoint(
    src: str | os.PathLike[str], out: str | os.PathLike[str], cfg: PruneConfig, data: str | os.PathLike[str] | None = None, force: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Write `src`'s model pruned as `cfg` says to the checkpoint directory `out`; `data` (a prepared directory) calibrates wanda."""
    from gptlab.hf import check_out_dir, writing

    out = Path(out)
    check_out_dir(out, force)
    loaded, model, meta = _pruned(src, load_data(data) if data is not None else None, cfg)
    with writing(out) as tmp:
        write_checkpoint_dir(tmp, loaded.step, model, model.config, loaded.tokenizer, extra_meta=meta)
    return out, meta[PRUNE_KEY]


# ----------------------------------------------------------------------------- recovery fine-tuning


class Recovery(LanguageModeling):
    """Next-token training of a pruned model; with `keep_zeros` (unstructured pruning) the pruned weights stay zero.

    The zeros are kept by masking the gradients of the blocks' Linear weights: a weight whose
    gradient is always zero keeps AdamW's moments at zero, so its update, decoupled weight decay
    included, is zero too. The masks are read off the model's zeros when the loop first calls
    `loss`, so a resumed run (a freshly loaded model) gets them back.
    """

    def __init__(self, data: TokenData, keep_zeros: bool) -> None:
        super().__init__(data)
        self.keep_zeros = keep_zeros
        self._seen: set[int] = set()  # the models (and wrappers) whose parameters have been looked at, then the parameters masked

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> Tensor:
        if self.keep_zeros and id(model) not in self._seen:
            self._seen.add(id(model))
            for p in _pruned_weights(model):
                if id(p) not in self._seen:
                    self._seen.add(id(p))
                    p.register_hook(lambda grad, keep=(p.detach() != 0): grad * keep)
        return super().loss(model, batch, device)

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "keep_zeros": self.keep_zeros}


def _pruned_weights(model: nn.Module) -> Iterator[nn.Parameter]:
    """The weights of the blocks' pruned Linears, whatever wraps the GPT (DDP, torch.compile)."""
    for name, p in model.named_parameters():
        if any(name.endswith(f"{linear}.weight") for linear in LINEARS):
            yield p


def prune_and_recover(
    src: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str], cfg: PruneConfig, train_config: TrainConfig | None, *,
    resume: bool = False, stop_at: int | None = None, progress: bool = True, resume_overrides: dict[str, Any] | None = None,
    report: Callable[[str], None] | None = None, started: float | None = None,
) -> tuple[TrainResult, dict[str, Any]]:  # fmt: skip
    """Prune `src` as `cfg` says, then fine-tune it on `data` into the run directory `out` through the normal
    training loop (`Recovery`); with `resume`, continue that run from its latest checkpoint instead."""
    tokens = load_data(data)
    last = find_checkpoint(out) if resume and Path(out).is_dir() else None
    if last is not None:
        info = read_checkpoint_meta(last).get(PRUNE_KEY)
        if not isinstance(info, dict):
            raise CheckpointError(f"{last} is not a pruned model's recovery run; resume it with the command that started it")
        objective = Recovery(tokens, keep_zeros=info["structured"] is None)
        return train(None, None, objective, out, resume=True, stop_at=stop_at, progress=progress, resume_overrides=resume_overrides,
                     report=report, started=started), info  # fmt: skip
    _, model, meta = _pruned(src, tokens, cfg)
    objective = Recovery(tokens, keep_zeros=cfg.structured is None)
    result = train(model.config, train_config, objective, out, stop_at=stop_at, progress=progress, report=report, started=started,
                   init_model=model.train(), checkpoint_meta=meta)  # fmt: skip
    return result, meta[PRUNE_KEY]
