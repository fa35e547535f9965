"""Data-parallel (DDP) and sharded (FSDP) training on PyTorch's own distributed engine.

`torchrun` starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; the
training loop calls `setup` and runs unchanged in every process. Each optimizer step
consumes the same global batch whatever the number of processes (rank r takes its
slice of every micro-batch, see data.ShardLoader), and checkpoints hold full,
unsharded state, so a run saved by N processes resumes on M.

DDP keeps a full model per process and averages gradients (Li et al. 2020); FSDP shards
parameters, gradients and optimizer state across processes (Zhao et al. 2023, FSDP2's
`fully_shard`, one unit per transformer block plus the root).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gptlab.config import GPTConfig
from gptlab.errors import ConfigError
from gptlab.model import GPT, fixed_buffers


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The one process that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise); a no-op in a single process.

    On CUDA each process takes the GPU of its local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown(info: DistInfo, clean: bool = True) -> None:
    """Leave the process group; after a normal end, only once every process has reached it
    (gloo aborts a process whose peer closes its connections under it)."""
    if info.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: GPT, strategy: str, info: DistInfo, device: torch.device) -> nn.Module:
    """The module the training loop calls: the model itself, DDP around it, or the model sharded in place."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)  # embeddings, ln_f and the (tied) head stay in the root unit
        return model
    raise ConfigError(f"strategy must be ddp or fsdp, got {strategy!r}")


def grad_sync(model: nn.Module, sync: bool) -> AbstractContextManager[Any]:
    """Skip the gradient all-reduce on accumulation micro-steps; the last one reduces the sum once."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2-sharded module
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def mean_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a per-process number over all processes (each process's loss is its slice's mean)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / info.world_size


def sum_over_ranks(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Each number of a per-process dict summed over all processes (every process has the same keys)."""
    if not info.enabled:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def max_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """The largest of a per-process number over all processes (e.g. the slowest process's step time)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every process when it is true on any (e.g. one process received SIGTERM)."""
    return bool(max_over_ranks(float(flag), info, device))


def reshard(model: nn.Module) -> None:
    """Put an FSDP-sharded model's sharded parameters back in place (a no-op for others).

    FSDP keeps the root's gathered weights after a forward without backward (evaluation);
    the optimizer and the state-dict helpers want the sharded parameters."""
    if hasattr(model, "reshard"):
        model.reshard()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, config: GPTConfig, info: DistInfo) -> tuple[GPT | None, dict[str, Any] | None]:
    """Unsharded model and optimizer state on CPU for the main process (None on the others).

    Every process must call it: with FSDP the parameters are gathered collectively. The
    optimizer state is keyed by parameter name, so it loads into any number of processes.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        plain = model.module
    elif info.enabled:  # sharded: assemble a plain model on the main process from the gathered weights
        weights = get_model_state_dict(model, options=options)
        plain = None
        if info.is_main:
            with torch.device("meta"):
                plain = GPT(config)
            plain.load_state_dict(weights, assign=True, strict=False)  # a tied head is one tensor, listed once
            if config.tie_weights:
                plain.lm_head.weight = plain.transformer.wte.weight
            for name, buffer in fixed_buffers(config).items():  # not in a state dict: from the config
                setattr(plain, name, buffer)
    else:
        plain = model  # type: ignore[assignment]
    return (plain, optim_state) if info.is_main else (None, None)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore optimizer state saved by `full_state` (any number of processes), or by gptlab before it (parameter ids)."""
    # the two formats differ in how param_groups list their parameters: positions or names
    if all(isinstance(p, int) for group in state["param_groups"] for p in group["params"]):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
