"""The training loop: AdamW with decoupled weight decay, warmup + cosine LR, clipping,
gradient accumulation, bf16 autocast, periodic evaluation, atomic checkpoints and
exact resume; the same loop runs under torchrun with DDP or FSDP (gptlab.distributed).

A run stops cleanly on SIGINT/SIGTERM (checkpoint first), skips steps whose loss or
gradient is not finite, and resumes past a damaged newest checkpoint.

Resuming restores parameters, optimizer moments, the step (which fixes the LR
schedule), the global RNG (dropout) and the data loader's cursor, so a run
stopped at step k and resumed performs the same floating-point operations as one
that never stopped.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gptlab.checkpoint import CORE_META_KEYS, Checkpoint, checkpoint_path, load_checkpoint, save_checkpoint, step_dirs
from gptlab.config import GPTConfig, TrainConfig
from gptlab.data import ShardLoader, TokenData, check_block_size, load_data
from gptlab.distributed import (
    DistInfo, any_rank, full_state, grad_sync, load_optimizer_state, max_over_ranks, mean_over_ranks, reshard, setup,
    sum_over_ranks, teardown, wrap,
)  # fmt: skip
from gptlab.errors import CheckpointError, ConfigError, GptlabError
from gptlab.fileio import check_writable
from gptlab.hostmem import reusing_freed_memory
from gptlab.model import GPT, MLP, CausalSelfAttention
from gptlab.optim import MuonAdamW
from gptlab.tokenizer import AnyTokenizer

METRICS_FILE = "metrics.jsonl"
EVAL_SEED_OFFSET = 1  # the val loader's seed is seed + 1, so its order is not the train order


# ----------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available")
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: on CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX.

    On other CPUs PyTorch emulates bf16 matmuls and autocast becomes many times
    slower than float32 (measured: 0.7 vs 50 GFLOP/s on an AVX2-only EPYC).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast keeps float32 master weights and optimizer state; matmuls run in bf16."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup steps, then cosine decay from lr to min_lr at max_steps."""
    warmup = cfg.warmup
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str, fused: bool = True, replicated: bool = False) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices and embeddings only, or with
    cfg.optimizer == "muon", Muon on the blocks' weight matrices and AdamW on the rest (optim.MuonAdamW).

    Biases and LayerNorm gains (the 1-D parameters) are not decayed, as in GPT-2/3.
    The fused implementation is used where this PyTorch offers it (CUDA, CPU, MPS) and `fused`
    allows (FSDP's sharded parameters take the default one). `replicated`: the processes of torch.distributed's
    default group hold equal gradients (DDP), so Muon splits its Newton-Schulz work among them.
    """
    if any(getattr(m, "inference_only", False) for m in model.modules()):
        raise ConfigError("the model is quantized (gptlab quantize), which is for inference only; train or fine-tune the checkpoint it was made from")
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() already yields tied weights once
    muon = _muon_groups(model, cfg) if cfg.optimizer == "muon" else []
    in_muon = {id(p) for g in muon for p in g["params"]}
    groups = muon + [
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in in_muon], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if muon:
        ns_dtype = cfg.muon_ns_dtype
        if ns_dtype == "auto":
            ns_dtype = "bfloat16" if fast_bf16(torch.device(device_type)) else "float32"
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, momentum=cfg.muon_momentum, ns_dtype=getattr(torch, ns_dtype),
                         process_group=torch.distributed.group.WORLD if replicated else None)  # fmt: skip
    fused = fused and "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


def _muon_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Muon's param groups: every trainable weight matrix of the blocks' attention and MLP, a fused q/k/v or gate/up
    matrix orthogonalised part by part (as separate matrices would be), at lr muon_lr (lr_scale follows the schedule)."""
    by_split: dict[tuple[int, ...], list[nn.Parameter]] = {}
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            q, kv = m.n_head * m.head_dim, m.n_kv_head * m.head_dim
            pairs = [(m.c_attn, (q, kv, kv)), (m.c_proj, ())]
        elif isinstance(m, MLP):
            width = m.c_proj.in_features
            pairs = [(m.c_fc, (width, width) if m.gated else ()), (m.c_proj, ())]
        else:
            continue
        for linear, split in pairs:
            w = getattr(linear, "weight", None)
            if isinstance(w, nn.Parameter) and w.requires_grad:
                by_split.setdefault(split, []).append(w)
    scale = cfg.muon_lr / cfg.lr
    return [{"params": ps, "muon": True, "split": list(split) or None, "lr": cfg.muon_lr, "lr_scale": scale, "weight_decay": cfg.weight_decay}
            for split, ps in by_split.items()]  # fmt: skip


class SparseTokenTable:
    """The token table trained from the rows each batch looks up, for objectives that read the table only
    through the lookup (a reward model never applies the LM head). AdamW and clipping give the weights the
    dense path gives, to float rounding, at a cost that follows the rows in use rather than the vocabulary.

    The dense path, on a small model with GPT-2's 50,304-row table of which a batch touches a few hundred
    rows: the backward allocates and zero-fills a (vocab, C) gradient, clipping reads all of it and AdamW
    updates every row (profiled on a 16M-parameter reward model: moving clipping and AdamW to the rows in
    use took a step from 60 ms to 45). Here the backward yields the touched rows (Embedding(sparse=True));
    a hook adds them into a buffer kept across steps and leaves the parameter without a .grad, so the
    loop's clipping and AdamW pass over it, and the loop asks this object instead:
    `norm_sq` for the clipping norm, `step` for AdamW on the rows that have ever had a gradient. That is
    exact because a row never looked up has zero moments, so AdamW's step there is lr * 0 / (0 + eps) = 0;
    only weight decay moves it, and that multiplies the whole table as AdamW does. The moments and step
    count live in the optimizer's own state for the table, in torch's AdamW layout, so checkpoints and
    resume do not know the difference. Not under DDP, whose buckets want dense gradients, nor torch.compile.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        self.embedding = embedding
        self.weight = embedding.weight
        self.grad = torch.zeros_like(self.weight)  # the step's gradient; zero outside self.rows
        self.rows: list[torch.Tensor] = []  # each micro-batch's looked-up rows (repeats allowed)
        self.clip_coef = 1.0  # set by clip_gradients when the step's global norm is clipped
        self._touched: torch.Tensor | None = None  # torch.unique of self.rows, once a step
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None  # (the exp_avg_sq it was read from, rows with moments)

    def __enter__(self) -> SparseTokenTable:
        self._sparse = self.embedding.sparse
        self.embedding.sparse = True
        self._handle = self.weight.register_post_accumulate_grad_hook(self._take)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self.embedding.sparse = self._sparse

    def _take(self, param: torch.Tensor) -> None:
        grad = param.grad
        assert grad is not None and grad.is_sparse, "the table's gradient comes only from the sparse lookup"
        rows = grad._indices()[0]
        self.grad.index_add_(0, rows, grad._values())  # repeated rows add up, as in the dense backward
        self.rows.append(rows)
        self._touched = None
        param.grad = None  # clipping and AdamW skip the table; the loop asks norm_sq and step

    def touched(self) -> torch.Tensor:
        """The distinct rows with a gradient this step."""
        if self._touched is None:
            self._touched = torch.unique(torch.cat(self.rows)) if self.rows else self.grad.new_zeros(0, dtype=torch.long)
        return self._touched

    def norm_sq(self) -> torch.Tensor:
        """The squared L2 norm of the table's gradient, for the global clipping norm."""
        return self.grad.index_select(0, self.touched()).square().sum()

    def clear(self) -> None:
        """Drop this step's gradient (after the step, or when the step is skipped)."""
        if self.rows:
            self.grad.index_fill_(0, self.touched(), 0.0)
            self.rows.clear()
            self._touched = None
        self.clip_coef = 1.0

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """AdamW (torch.optim.AdamW's update, Loshchilov & Hutter 2019, alg. 2) on the table, with the
        gradient times clip_coef, reading the hyperparameters of the table's parameter group."""
        group = next(g for g in optimizer.param_groups if any(p is self.weight for p in g["params"]))
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = optimizer.state[self.weight]
        if not state:  # AdamW's own initial state, so a later dense step or a checkpoint reads it as its own
            state["step"] = torch.zeros((), dtype=torch.float32, device=self.weight.device)
            state["exp_avg"] = torch.zeros_like(self.weight)
            state["exp_avg_sq"] = torch.zeros_like(self.weight)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if self._seen is None or self._seen[0] is not exp_avg_sq:  # another optimizer, or state loaded from a checkpoint
            self._seen = (exp_avg_sq, exp_avg_sq.ne(0).any(1) | exp_avg.ne(0).any(1))
        seen = self._seen[1]
        seen[self.touched()] = True
        rows = seen.nonzero().squeeze(1)  # every row whose moments are not zero
        state["step"] += 1
        t = float(state["step"])
        if decay:
            self.weight.mul_(1.0 - lr * decay)  # decoupled decay reaches every row, looked up or not
        g = self.grad.index_select(0, rows)  # (R, C)
        if self.clip_coef != 1.0:
            g.mul_(self.clip_coef)
        m = exp_avg.index_select(0, rows).lerp_(g, 1.0 - beta1)
        v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
        denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        p = self.weight.index_select(0, rows).addcdiv_(m, denom, value=-lr / bias1)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)
        self.weight.index_copy_(0, rows, p)


def loss_metrics(loss: float, bytes_per_token: float) -> dict[str, float]:
    """Loss (nats/token) as perplexity and bits per byte; bpb = loss / ln 2 / (bytes per token),
    which does not depend on the tokenizer and so compares runs with different vocabularies."""
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bpb": loss / math.log(2) / bytes_per_token,
    }


# ----------------------------------------------------------------------------- objectives


def _next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
    x, y = batch
    return model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))[1]


class Batches(Protocol):
    """An endless, resumable stream of batches for one process (ShardLoader is one)."""

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...

    def state(self) -> dict[str, Any]: ...  # plain ints and tensors: checkpoints load it with weights_only

    def load_state(self, state: dict[str, Any]) -> None: ...


class Objective(Protocol):
    """What a run optimises: where its batches come from and the loss on one.

    The loop (train) owns everything else: schedule, accumulation, clipping, evaluation
    timing, checkpoints, resume, signals, time budget, torchrun. Pretraining is
    `LanguageModeling`; supervised fine-tuning (gptlab.finetune.sft) and the alignment
    losses are objectives too, so they get all of that without a second loop.
    An objective whose batches average over varying counts (e.g. trained tokens) also has
    `weight(batch) -> int`, the count; see train_step. One whose loss reads the token table only
    through the embedding lookup (a reward model) sets `sparse_token_grad = True`; see SparseTokenTable.
    """

    tokenizer: AnyTokenizer  # saved with every checkpoint
    has_val: bool

    def check(self, model_config: GPTConfig) -> None:
        """Raise ConfigError when the model cannot train on this data (vocabulary, context length)."""

    def batches(self, split: str, block_size: int, batch_size: int, seed: int, rank: int, world_size: int) -> Batches:
        """This process's stream of `split` ("train" or "val") batches of rows up to block_size tokens."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        """The scalar to minimise on one micro-batch (a mean, so accumulation divides it by grad_accum)."""

    def score(self, model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device) -> dict[str, float]:
        """Sums over one held-out batch (e.g. loss and a count); summed over batches and processes, then `metrics`."""

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics from the summed `score`s; "loss" first."""

    def describe(self) -> list[str]:
        """The run summary's lines about the data."""

    def tokens_per_step(self, cfg: TrainConfig, block_size: int) -> int:
        """Token positions per optimizer step, for throughput."""

    def run_info(self) -> dict[str, Any]:
        """What run.json records about the data (and checkpoint.json, when it says how to rebuild the run)."""


class LanguageModeling:
    """Pretraining: next-token prediction on a prepared data directory (gptlab prepare)."""

    def __init__(self, data: TokenData) -> None:
        self.data = data
        self.tokenizer = data.tokenizer()
        self.has_val = data.tokens("val") > 0
        self._bpt = data.bytes_per_token("val") if self.has_val else 1.0

    def check(self, model_config: GPTConfig) -> None:
        if model_config.vocab_size < self.data.vocab_size:
            raise ConfigError(
                f"vocab_size ({model_config.vocab_size}) is smaller than the tokenizer's vocabulary ({self.data.vocab_size}) in {self.data.path}"
            )
        check_block_size(self.data, model_config.block_size)

    def batches(self, split: str, block_size: int, batch_size: int, seed: int, rank: int, world_size: int) -> ShardLoader:
        return ShardLoader(self.data.shards(split), block_size, batch_size, seed=seed, rank=rank, world_size=world_size)

    loss = staticmethod(_next_token_loss)

    def score(self, model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device) -> dict[str, float]:
        return {"loss": self.loss(model, batch, device).item(), "batches": 1.0}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return loss_metrics(sums["loss"] / sums["batches"], self._bpt)

    def describe(self) -> list[str]:
        data, val = self.data, self.data.tokens("val")
        return [
            f"data: {data.tokens('train'):,} train tokens, " + (f"{val:,} val tokens" if val else "no validation split (evaluation off)") + f" in {data.path}"
        ]

    def tokens_per_step(self, cfg: TrainConfig, block_size: int) -> int:
        return cfg.batch_size * cfg.grad_accum * block_size

    def run_info(self) -> dict[str, Any]:
        return {"data": str(self.data.path.resolve())}


@torch.no_grad()
def estimate_loss(
    model: nn.Module, loader: Batches, n_batches: int, device: torch.device, dtype: str, info: DistInfo | None, objective: Objective
) -> dict[str, float]:
    """The objective's validation metrics over the next n_batches of `loader` (eval mode: no dropout), over all processes."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for _ in range(n_batches):
        with autocast_context(device, dtype):
            scored = objective.score(model, loader.next_batch(), device)
        for key, value in scored.items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    return objective.metrics(sum_over_ranks(sums, info or DistInfo(), device))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Batches,
    cfg: TrainConfig,
    device: torch.device,
    info: DistInfo | None = None,
    sync_target: nn.Module | None = None,
    objective: Objective | None = None,
    table: SparseTokenTable | None = None,
) -> tuple[float, float, bool]:
    """One optimizer step over cfg.grad_accum micro-batches.

    Returns the mean loss (over all processes), the pre-clip gradient norm, and whether the
    step was taken: a non-finite loss or gradient skips the update (the gradients are
    dropped), since one inf would otherwise turn the Adam moments and every weight into NaN.
    sync_target is the DDP/FSDP module when `model` is a compiled wrapper of it. The loss is
    the objective's (next-token prediction on (x, y) batches by default).

    Every micro-batch of pretraining holds the same number of targets, so the mean of the
    micro-batch means is the batch mean. An objective whose batches hold varying numbers of
    targets (conversations: only the replies count) has a `weight(batch)`, the count its loss
    averages over; each micro-batch's mean is then weighted by its share of the count over all
    micro-batches and processes, so the step's gradient is that of the mean over every target
    of the step, as one process with one large batch would compute it.
    """
    info = info or DistInfo()
    loss_of = objective.loss if objective is not None else _next_token_loss
    weight_of = getattr(objective, "weight", None)
    batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
    shares = None
    if weight_of is not None:
        weights = [float(weight_of(batch)) for batch in batches]
        total = sum_over_ranks({"weight": sum(weights)}, info, device)["weight"]
        # DDP averages gradients over processes: scale by world_size so the average is the sum
        shares = [w * info.world_size / total if total else 0.0 for w in weights]
    loss_sum = 0.0
    for micro, batch in enumerate(batches):
        with grad_sync(sync_target or model, micro == cfg.grad_accum - 1):
            with autocast_context(device, cfg.dtype):
                loss = loss_of(model, batch, device)
            if shares is None:
                (loss / cfg.grad_accum).backward()  # the mean over micro-batches, as one large batch would give
                loss_sum += loss.item()
            else:
                (loss * shares[micro]).backward()
                loss_sum += loss.item() * shares[micro]
    grad_norm = clip_gradients(model, cfg.grad_clip, table)
    mean_loss = mean_over_ranks(loss_sum / cfg.grad_accum if shares is None else loss_sum, info, device)
    stepped = math.isfinite(mean_loss) and math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
        if table is not None:
            table.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    if table is not None:
        table.clear()
    return mean_loss, grad_norm, stepped


def clip_gradients(model: nn.Module, max_norm: float, table: SparseTokenTable | None = None) -> float:
    """The gradients' global L2 norm, and when it is above max_norm (> 0) the gradients scaled by
    max_norm / (norm + 1e-6): torch.nn.utils.clip_grad_norm_'s result, without its multiplication of
    every gradient by 1.0 when nothing is clipped (it avoids a device sync there; the loop reads the norm
    anyway). On a small model with a large vocabulary that pass is a tenth of the step. A sparse token
    table's gradient counts in the norm and takes the same scale, applied by its step."""
    params = [p for p in model.parameters() if p.grad is not None]
    with_table = table is not None and bool(table.rows)
    if not params and not with_table:
        return 0.0
    norm = nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
    if with_table:
        norm = (norm.square() + table.norm_sq()).sqrt()
    value = float(norm)
    if max_norm > 0 and max_norm / (value + 1e-6) < 1.0:
        if params:
            nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        if with_table:
            table.clip_coef = max_norm / (value + 1e-6)
    return value


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far in MiB: tensors allocated on a CUDA device, otherwise the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only; imported where used

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def load_resumable(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of a run that loads and passes its checksums, with its trainer state.

    A damaged newer one (bad checksum, torn file) is skipped with a warning, so a resume
    loses at most the steps since the previous one. None when the run has no checkpoint;
    an error when it has some but none loads, rather than silently starting over.
    """
    if (run_dir / "checkpoint.json").is_file():
        return load_checkpoint(run_dir, with_trainer_state=True, merge_lora=False)
    candidates = step_dirs(run_dir)[::-1]  # newest first
    problems = []
    for path in candidates:
        try:
            return load_checkpoint(path, with_trainer_state=True, merge_lora=False)
        except CheckpointError as err:
            problems.append(str(err))
            warnings.warn(f"skipping a damaged checkpoint: {err}", stacklevel=2)
    if candidates:
        raise CheckpointError(f"{run_dir}: none of its {len(candidates)} checkpoints loads; the newest: {problems[0]}")
    return None


def parameter_count(model_config: GPTConfig) -> int:
    """Parameters of GPT(model_config), a tied matrix counted once (the model's shape, however its weights are stored)."""
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        return sum(p.numel() for p in GPT(model_config).parameters())


def checkpoint_bytes(model_config: GPTConfig) -> int:
    """About what one checkpoint of this model takes: the float32 weights and AdamW's two moments, 12 bytes per parameter."""
    return 12 * parameter_count(model_config)


def check_disk_space(run_dir: Path, model_config: GPTConfig) -> None:
    """Fail before training when the run directory's disk cannot hold even one checkpoint.
    (A disk that fills up later fails at that save, keeping the previous one.)"""
    need = checkpoint_bytes(model_config)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise GptlabError(f"{run_dir}: {free / 1e6:,.0f} MB free on its disk, but one checkpoint needs about {need / 1e6:,.0f} MB")


def _record_step(line: str) -> float:
    """The step of one metrics.jsonl line; +inf for a blank or unparseable (torn) line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    return record.get("step", 0) if isinstance(record, dict) else math.inf


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (what `gptlab plot` reads)."""

    def __init__(self, path: Path, truncate_after_step: int | None):
        self.path = path
        if truncate_after_step is not None and path.exists():
            # a resumed run repeats the steps after its checkpoint: drop the stale records for them,
            # and a line torn by a killed process
            kept = [line for line in path.read_text().splitlines() if _record_step(line) <= truncate_after_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- time budget

clock = time.perf_counter  # what the time budget is measured with; tests substitute a simulated clock
CALIBRATION_WARM_STEPS = 2  # untimed: allocator growth, optimizer state creation, compilation
CALIBRATION_STEPS = 5  # timed, fewer when they would take over CALIBRATION_SHARE of the budget
CALIBRATION_SHARE = 0.05
PLAN_MARGIN = 0.97  # plan for 97% of the time left, so small timing noise does not cut the schedule
SAVE_BYTES_PER_S = 100e6  # assumed until the run's first checkpoint is timed


@dataclass(frozen=True)
class BudgetPlan:
    """How a fresh run fits its time budget: measured costs, and the step count they allow."""

    budget_s: float
    setup_s: float  # from the start (see train's `started`) to the end of calibration
    step_s: float  # median optimizer step (all micro-batches)
    eval_s: float  # one evaluation of eval_batches batches (0 without a validation split)
    save_s: float  # one checkpoint (estimated from its size)
    steps: int

    def describe(self, cfg: TrainConfig) -> str:
        evals = f", an evaluation {self.eval_s:.2f} s every {cfg.eval_every} steps" if self.eval_s else ""
        train_s = self.steps * self.step_s
        return (
            f"time budget {format_seconds(self.budget_s)}: setup and calibration took {self.setup_s:.1f} s; a step takes {self.step_s:.3f} s"
            f"{evals}, a checkpoint ~{self.save_s:.2f} s -> {self.steps} steps (~{format_seconds(train_s)} of training)"
        )


def format_seconds(seconds: float) -> str:
    """90 -> '1m30s', 3725 -> '1h02m05s', 7.5 -> '7.5s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def steps_for_budget(cfg: TrainConfig, seconds_left: float, step_s: float, eval_s: float, save_s: float) -> int:
    """Optimizer steps that fit `seconds_left`, with an evaluation every eval_every steps, a checkpoint
    every save_every, and a final evaluation and checkpoint at the end."""
    per_step = step_s + eval_s / cfg.eval_every + save_s / cfg.save_every
    return int(PLAN_MARGIN * (seconds_left - eval_s - save_s) / per_step)


def calibrate(
    model: nn.Module, sync_target: nn.Module, cfg: TrainConfig, loader: Batches, val_loader: Batches | None,
    device: torch.device, info: DistInfo, budget_s: float, objective: Objective, table: SparseTokenTable | None = None,
) -> tuple[float, float]:
    """(seconds per optimizer step, seconds per evaluation), measured on the run's own model and data.

    The steps run with the learning rate at 0 through a throw-away optimizer: AdamW then
    leaves every weight exactly as it was (decay multiplies by 1 - 0, the update is 0 times a
    finite number), and the RNG and the loader's cursor are put back, so the run that follows
    is bit-identical to one with the same step count and no calibration. Every process runs
    the same number of steps; the slowest process's time counts.
    """
    rng = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state() if device.type == "cuda" else None
    position = loader.state()
    optimizer = build_optimizer(model, cfg, device.type, fused=cfg.strategy != "fsdp" or not info.enabled, replicated=info.enabled and cfg.strategy == "ddp")
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    t_start, times = clock(), []
    for i in range(CALIBRATION_WARM_STEPS + CALIBRATION_STEPS):
        t0 = clock()
        train_step(model, optimizer, loader, cfg, device, info, sync_target=sync_target, objective=objective, table=table)
        if i >= CALIBRATION_WARM_STEPS:
            times.append(clock() - t0)
            if any_rank(clock() - t_start > CALIBRATION_SHARE * budget_s, info, device):
                break
    del optimizer
    step_s = max_over_ranks(statistics.median(times), info, device)
    eval_s = 0.0
    if val_loader is not None:
        n = min(2, cfg.eval_batches)
        t0 = clock()
        estimate_loss(model, val_loader, n, device, cfg.dtype, info, objective)
        eval_s = max_over_ranks((clock() - t0) * cfg.eval_batches / n, info, device)
        reshard(sync_target)
    torch.set_rng_state(rng)
    if rng_cuda is not None:
        torch.cuda.set_rng_state(rng_cuda)
    loader.load_state(position)
    return step_s, eval_s


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    val: dict[str, float] | None
    tokens_per_s: float
    # "SIGINT" or "SIGTERM" when a signal ended the run early, "time budget" when the budget did (after a checkpoint)
    stopped_by: str | None = None
    peak_mem_mb: float = 0.0  # see peak_memory_mb
    max_steps: int = 0  # the schedule's length (planned by the time budget when one was given)
    seconds: float = 0.0  # wall clock from the start (see train's `started`) to the return
    plan: BudgetPlan | None = None


def train(
    model_config: GPTConfig | None,
    train_config: TrainConfig | None,
    data: str | Path | Objective,
    run_dir: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    resume_overrides: dict[str, Any] | None = None,
    report: Callable[[str], None] | None = None,
    started: float | None = None,
    init_model: GPT | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a GPT: pretrain on a prepared data directory, or optimise any `Objective`.

    A fresh run starts from `init_model` (e.g. a base model to fine-tune, possibly wrapped
    with LoRA adapters) or, when None, from a randomly initialised GPT(model_config).
    `checkpoint_meta` is added to every checkpoint's checkpoint.json (what the run is); a resumed
    run keeps its checkpoint's by default.

    With `resume`, continue from the run's latest checkpoint: its model and train
    configs are used (the ones passed may be None), with `resume_overrides` (e.g. a
    larger max_steps) applied to the train config; a run directory without a
    checkpoint starts from scratch with the configs passed. A time budget applies
    only to the call that passes it: a resumed run keeps its schedule and stops by
    the end of the budget given in resume_overrides, if any.
    `stop_at` ends the run after that step (with a checkpoint) without changing the
    schedule, which max_steps sets.
    `report` receives the run summary (model, data, schedule, the time budget's plan)
    as lines of text, on the main process only. The time budget counts from `started`
    (a `clock()` reading, e.g. when the command began), by default from this call.
    """
    t_enter = clock() if started is None else started
    run_dir = Path(run_dir)
    objective: Objective = LanguageModeling(load_data(data)) if isinstance(data, (str, Path)) else data
    ckpt = load_resumable(run_dir) if resume and run_dir.exists() else None
    if ckpt is not None:
        if model_config is not None and model_config != ckpt.model_config:
            changed = [k for k, v in model_config.to_dict().items() if ckpt.model_config.to_dict()[k] != v]
            raise ConfigError(f"cannot change the model when resuming {ckpt.path}: {', '.join(changed)} differ(s) from the checkpoint")
        model_config = ckpt.model_config
        if checkpoint_meta is None:  # what the run is (e.g. a fine-tuning run's data and adapters) carries over
            checkpoint_meta = {k: v for k, v in ckpt.meta.items() if k not in CORE_META_KEYS}
        saved = (ckpt.train_config or train_config or TrainConfig()).replace(time_budget=None)
        train_config = saved.replace(**(resume_overrides or {}))
    if model_config is None or train_config is None:
        raise ConfigError("a fresh run needs both a model config and a train config")
    objective.check(model_config)
    check_writable(run_dir, "run directory")
    check_disk_space(run_dir, model_config)
    cfg = train_config
    info, device = setup(resolve_device(cfg.device))
    try:
        with ExitStack() as cleanup:
            result = _train(
                model_config, cfg, objective, run_dir, ckpt, stop_at, progress, info, device, t_enter, report or (lambda line: None), init_model,
                checkpoint_meta or {}, cleanup,
            )  # fmt: skip
    except BaseException:
        teardown(info, clean=False)
        raise
    teardown(info)
    return result


def describe_run(
    model_config: GPTConfig, cfg: TrainConfig, objective: Objective, n_params: int, n_trainable: int, device: torch.device, info: DistInfo
) -> list[str]:
    """The run summary printed before training: what is trained, on what, for how long."""
    m = model_config
    tokens_per_step = objective.tokens_per_step(cfg, m.block_size)
    warmup = f"warmup {cfg.warmup} step{'' if cfg.warmup == 1 else 's'}"
    if cfg.warmup_steps is None:
        warmup += " (auto: a tenth of the steps, at most 100; --warmup-steps sets it)"
    procs = f" x {info.world_size} processes ({cfg.strategy})" if info.enabled else ""
    trained = f" ({n_trainable / 1e6:.3f}M trained, {100 * n_trainable / n_params:.2f}%)" if n_trainable != n_params else ""
    return [
        f"model: {n_params / 1e6:.2f}M parameters{trained}, {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, "
        f"vocabulary {m.vocab_size}",
        *objective.describe(),
        f"schedule: {cfg.max_steps} steps of {tokens_per_step:,} tokens ({cfg.batch_size} x {cfg.grad_accum} x {m.block_size}"
        f"{'' if tokens_per_step == cfg.batch_size * cfg.grad_accum * m.block_size else ' positions at most'}), "
        f"lr {cfg.lr:g} -> {cfg.min_lr:g} cosine, {warmup}",
        f"device: {device}{procs}, {cfg.dtype}",
    ]


def _train(
    model_config: GPTConfig, cfg: TrainConfig, objective: Objective, run_dir: Path, ckpt: Any, stop_at: int | None, progress: bool, info: DistInfo,
    device: torch.device, t_enter: float, report: Callable[[str], None], init_model: GPT | None, checkpoint_meta: dict[str, Any],
    cleanup: ExitStack,
) -> TrainResult:
    if cfg.dtype == "bfloat16" and not fast_bf16(device):
        warnings.warn(f"{device.type} has no native bfloat16 matmul here; bf16 autocast will run slower than float32", stacklevel=3)
    if not info.is_main:
        report = lambda line: None  # noqa: E731  (one summary per run, from the main process)
    torch.manual_seed(cfg.seed)  # parameter init and dropout draw from the global generator, alike in every process
    if device.type == "cpu":  # big per-step tensors land in memory already mapped, not in fresh pages (gptlab.hostmem)
        cleanup.enter_context(reusing_freed_memory())
    raw = ckpt.model if ckpt is not None else init_model if init_model is not None else GPT(model_config)
    raw.to(device)
    raw.train()
    raw.checkpoint_blocks = cfg.activation_checkpointing
    wte = raw.transformer.wte
    table = None
    if getattr(objective, "sparse_token_grad", False) and wte.weight.requires_grad and not info.enabled and not cfg.compile:
        table = cleanup.enter_context(SparseTokenTable(wte))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    wrapped = wrap(raw, cfg.strategy, info, device)  # what gradient sync talks to
    model = torch.compile(wrapped) if cfg.compile else wrapped  # what the loop calls
    block = model_config.block_size
    loader = objective.batches("train", block, cfg.batch_size, cfg.seed, info.rank, info.world_size)
    has_val = objective.has_val

    def val_loader() -> Batches:
        # a fresh loader each time: every evaluation scores the same batches, so values compare across steps
        return objective.batches("val", block, cfg.batch_size, cfg.seed + EVAL_SEED_OFFSET, info.rank, info.world_size)

    # before any forward pass: FSDP swaps in gathered parameters for a forward without backward
    optimizer = build_optimizer(model, cfg, device.type, fused=cfg.strategy != "fsdp" or not info.enabled, replicated=info.enabled and cfg.strategy == "ddp")
    plan = None
    save_s = 0.05 + checkpoint_bytes(model_config) / SAVE_BYTES_PER_S  # until the first checkpoint is timed
    if cfg.time_budget is not None and ckpt is None:
        step_s, eval_s = calibrate(model, wrapped, cfg, loader, val_loader() if has_val else None, device, info, cfg.time_budget, objective, table)
        setup_s = max_over_ranks(clock() - t_enter, info, device)
        steps = steps_for_budget(cfg, cfg.time_budget - setup_s, step_s, eval_s, save_s)
        if steps < 1:
            raise ConfigError(
                f"time budget {format_seconds(cfg.time_budget)} leaves no time to train: setup and calibration took {setup_s:.1f} s, "
                f"a step takes {step_s:.2f} s, an evaluation {eval_s:.2f} s and a checkpoint ~{save_s:.2f} s"
            )
        plan = BudgetPlan(cfg.time_budget, setup_s, step_s, eval_s, save_s, steps)
        try:
            cfg = cfg.replace(max_steps=steps)
        except ConfigError:
            raise ConfigError(f"the time budget fits {steps} steps, fewer than warmup_steps ({cfg.warmup_steps}); lower it or allow more time") from None
    tokenizer = objective.tokenizer if ckpt is None else ckpt.tokenizer
    start = 0
    if ckpt is not None:
        state = ckpt.trainer_state
        assert state is not None
        load_optimizer_state(model, optimizer, state["optimizer"])
        if "loader" in state:
            loader.load_state(state["loader"])
        else:  # written before the shard loader: its position was a random generator's, which has no equivalent here
            warnings.warn(f"{ckpt.path} holds no data-loader position (an older gptlab wrote it); the data order starts over", stacklevel=3)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start = ckpt.step
    n_trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    for line in describe_run(model_config, cfg, objective, parameter_count(model_config), n_trainable, device, info):
        report(line)
    if ckpt is not None:
        report(f"resuming from {ckpt.path} (step {start})")
    if plan is not None:
        report(plan.describe(cfg))
    elif cfg.time_budget is not None:
        report(f"time budget {format_seconds(cfg.time_budget)}: the run stops by then, with a checkpoint, if the schedule has not ended")
    log = None
    if info.is_main:
        _write_run_info(run_dir, model_config, cfg, objective)
        log = MetricsLog(run_dir / METRICS_FILE, truncate_after_step=start if ckpt is not None else None)

    end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    tokens_per_step = objective.tokens_per_step(cfg, model_config.block_size)
    val_metrics: dict[str, float] | None = None
    last_ckpt: Path | None = ckpt.path if ckpt is not None else None
    deadline = None if cfg.time_budget is None else t_enter + cfg.time_budget
    # what the deadline check expects the next step, an evaluation and a checkpoint to take: the
    # plan's figures, then the run's own (a slower machine is noticed at the next step)
    step_est = plan.step_s if plan is not None else 0.0
    eval_est = plan.eval_s if plan is not None else None
    done_eval = done_save = -1  # the last step evaluated / saved

    def save(step: int) -> Path:
        nonlocal save_s, done_save
        t0 = clock()
        plain, optim_state = full_state(wrapped, optimizer, model_config, info)  # collective under FSDP
        path = checkpoint_path(run_dir, step)
        if plain is not None:
            trainer_state = {"optimizer": optim_state, "loader": loader.state(), "rng_cpu": torch.get_rng_state()}
            if device.type == "cuda":
                trainer_state["rng_cuda"] = torch.cuda.get_rng_state()
            try:
                path = save_checkpoint(
                    run_dir, step, plain, model_config, tokenizer, cfg, trainer_state, metrics=val_metrics or {}, keep_last=cfg.keep_last,
                    extra_meta=checkpoint_meta,
                )  # fmt: skip
            except OSError as err:  # disk full, quota, permissions: the partial copy is gone, the previous one stays
                kept = f"the previous checkpoint {last_ckpt} is kept" if last_ckpt is not None else "no earlier checkpoint exists"
                raise CheckpointError(f"cannot write the step {step} checkpoint in {run_dir} ({err.strerror or err}); {kept}") from None
        if info.enabled:
            torch.distributed.barrier()  # no process runs ahead of a checkpoint still being written
        save_s, done_save = max(save_s, clock() - t0), step
        return path

    def evaluate(step: int) -> dict[str, float]:
        nonlocal eval_est, done_eval
        t0 = clock()
        metrics = estimate_loss(model, val_loader(), cfg.eval_batches, device, cfg.dtype, info, objective)
        if log is not None:
            log.write({"step": step, **{f"val_{k}": v for k, v in metrics.items()}})
        if bar is not None:
            bar.write(f"step {step}: val " + " | ".join(_format_metric(k, v) for k, v in metrics.items()))
        eval_est, done_eval = clock() - t0, step
        return metrics

    def out_of_time(step_s: float) -> bool:
        """Whether one more step, then the final evaluation and checkpoint, would end past the deadline."""
        nonlocal step_est
        if deadline is None:
            return False
        step_est = max(step_s, 0.7 * step_est + 0.3 * step_s)  # a sudden slowdown counts at once, a speedup slowly
        evaluation = (eval_est if eval_est is not None else cfg.eval_batches * step_est / (3 * cfg.grad_accum)) if has_val else 0.0
        return clock() + step_est + evaluation + save_s > deadline

    bar = progress_bar(start, cfg.max_steps, progress and info.is_main)
    t_window, tokens_window = time.perf_counter(), 0
    t_start = time.perf_counter()
    bad_steps = 0
    signals: list[str] = []  # names of SIGINT/SIGTERM received; the loop saves and stops after the current step
    stopped_by = None
    done = start
    with stop_on_signals(signals):
        for step in range(start, end):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups follow the schedule at their own scale
            t_step = clock()
            train_loss, grad_norm, stepped = train_step(model, optimizer, loader, cfg, device, info, sync_target=wrapped, objective=objective, table=table)
            step_s = clock() - t_step
            done = step + 1
            bad_steps = 0 if stepped else bad_steps + 1
            if not stepped:
                msg = f"step {done}: loss {train_loss} / gradient norm {grad_norm} is not finite; update skipped"
                if bad_steps >= cfg.max_bad_steps:
                    raise GptlabError(
                        f"{bad_steps} steps in a row ending at step {done} had a non-finite loss or gradient; stopping "
                        f"(lower --lr, train in float32, or check the data); the last checkpoint is {last_ckpt}"
                    )
                warnings.warn(msg, stacklevel=2)
            tokens_window += tokens_per_step
            if log is not None and (done % cfg.log_every == 0 or done == end):
                now = time.perf_counter()
                tok_s = tokens_window / max(now - t_window, 1e-9)
                t_window, tokens_window = now, 0
                log.write({
                    "step": done, "loss": train_loss, "lr": lr, "tokens": done * tokens_per_step, "tokens_per_s": tok_s,
                    "grad_norm": grad_norm, "peak_mem_mb": peak_memory_mb(device),
                })  # fmt: skip
            if bar is not None:
                bar.update(1)
                avg_tok_s = (done - start) * tokens_per_step / max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{avg_tok_s:,.0f}", refresh=False)
            if has_val and (done % cfg.eval_every == 0 or done == end):
                val_metrics = evaluate(done)
            if done % cfg.save_every == 0 or done == end:
                last_ckpt = save(done)
            # every process stops after the same step: 2 = a signal (save and leave), 1 = out of time (evaluate, save, leave)
            why = max_over_ranks(2.0 if signals else 1.0 if done < end and out_of_time(step_s) else 0.0, info, device)
            if why:
                if why == 1.0 and has_val and done_eval != done:
                    val_metrics = evaluate(done)
                if done_save != done:
                    last_ckpt = save(done)
                stopped_by = "time budget" if why == 1.0 else signals[0] if signals else "a signal to another process"
                break
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    tokens_done = max(0, done - start) * tokens_per_step
    return TrainResult(
        run_dir, done, last_ckpt, val_metrics, tokens_done / elapsed if elapsed > 0 else 0.0, stopped_by, peak_memory_mb(device),
        cfg.max_steps, clock() - t_enter, plan,
    )  # fmt: skip


@contextmanager
def stop_on_signals(received: list[str]) -> Iterator[None]:
    """While training, SIGINT and SIGTERM append their name to `received` instead of killing the process.

    The loop then writes a checkpoint and returns, so Ctrl-C or a scheduler's preemption loses
    no work. Signal handlers can only be set from the main thread; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _format_metric(name: str, value: float) -> str:
    short = {"perplexity": "ppl"}.get(name, name)
    return f"{short} {value:.2f}" if name == "perplexity" else f"{short} {value:.4f}"


def _write_run_info(run_dir: Path, model_config: GPTConfig, cfg: TrainConfig, objective: Objective) -> None:
    info = {"model_config": model_config.to_dict(), "train_config": cfg.to_dict(), **objective.run_info()}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))


def progress_bar(start: int, total: int, enabled: bool, desc: str = "train"):
    """A step bar with rate and ETA (None when disabled)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
