"""Muon for the hidden matrices, AdamW for the rest, as one torch optimizer (`gptlab train --optimizer muon`).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; modded-nanogpt's speed records) keeps
SGD momentum for a weight matrix and replaces each update by the nearest semi-orthogonal matrix, which
it approximates with five steps of a quintic Newton-Schulz iteration. Embeddings, the output head and
the 1-D gains and biases keep AdamW (Loshchilov & Hutter 2019). One optimizer holds both kinds of
group, so the training loop's schedule, clipping, checkpoints and resume treat it as they treat AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# the quintic's coefficients: chosen to push every singular value of the normalised matrix towards 1 as fast as
# possible in five steps, at the cost of landing in [0.7, 1.2] rather than exactly 1 (Jordan et al. 2024)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> Tensor:
    """An approximately semi-orthogonal matrix with G's singular vectors: U V^T of G = U S V^T, by `steps` iterations
    of X <- a X + (b A + c A^2) X, A = X X^T, from X = G / ||G||_F (the Frobenius norm bounds the spectral one, so
    the iteration starts inside its basin). Normalised in G's dtype, iterated in `dtype` (default G's) on the wide
    orientation (fewer rows than columns). bfloat16 suffices for the iteration, as modded-nanogpt runs it: its
    result is only meant to land in [0.7, 1.2], and rounding moves it by ~2% of its norm (tests/test_optim.py)."""
    a, b, c = NS_COEFFICIENTS
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype or X.dtype)
    for _ in range(steps):
        A = X @ X.mT  # (rows, rows): the smaller Gram matrix
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def _sharded(t: Tensor) -> bool:
    """Whether `t` is a DTensor, as FSDP2 (`fully_shard`) makes parameters, their gradients and their state."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on groups with muon=True (2-D weights; `split` row counts orthogonalise stacked matrices such as a fused
    q/k/v one part by part), AdamW on the others. Muon's step for a matrix W with gradient G (Jordan et al. 2024):

        m <- beta m + (1 - beta) G;  u <- (1 - beta) G + beta m (Nesterov)  or  m
        W <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) NS(u)

    AdamW's step is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments).

    `ns_dtype` is the Newton-Schulz iteration's dtype (at least float32 if None): bfloat16 runs it 3.5-3.8x faster on a
    CPU with AVX512-BF16 (EPYC, 256- and 384-wide layers), where float32 made Muon's step cost about as much as the
    rest of a small model's training step. Momentum and weights stay in their own dtypes.

    Under torch.distributed the Newton-Schulz work is split, as modded-nanogpt splits it: every process holds the same
    update for a matrix (DDP's averaged gradients with `process_group` given; FSDP's gathered rows, among the processes
    of its 1-D mesh), so the matrices go in rounds of one per process, each orthogonalises its own and broadcasts the
    result. Each process does 1/world of the iterations, and the weights are bitwise those of one process doing all.
    Under FSDP a matrix's momentum stays sharded; the whole update is gathered for the iteration and each process
    keeps its own rows of the result."""

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 process_group: Any = None) -> None:  # fmt: skip
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, split=None)
        super().__init__(list(groups), defaults)
        # neither is a group entry, so checkpoints from before them load unchanged
        self.ns_dtype = ns_dtype
        self.process_group = process_group  # replicas with equal gradients (DDP's) that share the iterations; None: alone
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon: list[tuple[Tensor, dict[str, Any]]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["muon"]:
                    muon.append((p, group))
                else:
                    self._adamw(p, p.grad, group, self.state[p])
        self._muon(muon)
        return loss

    def _sharing(self, p: Tensor) -> Any:
        """The process group whose members split p's Newton-Schulz work, or None when this process does it all."""
        if _sharded(p):
            return p.device_mesh.get_group() if p.device_mesh.ndim == 1 else None  # FSDP's shards; HSDP: repeated
        return self.process_group

    def _muon(self, muon: list[tuple[Tensor, dict[str, Any]]]) -> None:
        """Muon's step for each (matrix, group): momentum here, Newton-Schulz on the matrix's process, the update here."""
        if not muon:
            return
        sharing = self._sharing(muon[0][0])
        world = dist.get_world_size(sharing) if sharing is not None else 1
        mine = dist.get_rank(sharing) if sharing is not None else 0
        for start in range(0, len(muon), world):  # a round: matrix start + i is orthogonalised by process i
            chunk = muon[start : start + world]
            updates = [self._momentum(p, group, self.state[p]) for p, group in chunk]
            orthos = []
            for i, ((_, group), update) in enumerate(zip(chunk, updates, strict=True)):
                whole = update.full_tensor() if _sharded(update) else update  # FSDP holds rows; the iteration needs all
                wide = torch.promote_types(whole.dtype, torch.float32)  # normalised in at least float32
                if world == 1 or i == mine:
                    orthos.append(self._orthogonalise(whole.to(wide), group))
                else:
                    orthos.append(torch.empty(whole.shape, dtype=self.ns_dtype or wide, device=whole.device))
            if world > 1:  # src is a global rank (group_src= arrived after torch 2.3)
                for work in [dist.broadcast(o, dist.get_global_rank(sharing, i), group=sharing, async_op=True) for i, o in enumerate(orthos)]:
                    work.wait()
            for (p, group), update, ortho in zip(chunk, updates, orthos, strict=True):
                if _sharded(update):  # each process keeps its own rows of the whole result (a local slice)
                    from torch.distributed.tensor import DTensor, Replicate

                    mesh = update.device_mesh
                    ortho = DTensor.from_local(ortho, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, update.placements)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(ortho.to(p.dtype), alpha=-group["lr"])

    @staticmethod
    def _momentum(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
        """The momentum buffer after p's gradient, and the update it gives (Nesterov's look-ahead, or the buffer)."""
        beta = group["momentum"]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - beta)
        return p.grad.lerp(buf, beta) if group["nesterov"] else buf.clone()

    def _orthogonalise(self, whole: Tensor, group: dict[str, Any]) -> Tensor:
        """NS of each `split` part of the update (rows_i, cols), scaled by sqrt(max(1, rows_i / cols)), in ns_dtype."""
        parts = whole.split(group["split"]) if group["split"] else (whole,)  # (rows_i, cols) each
        return torch.cat([newton_schulz(u, group["ns_steps"], dtype=self.ns_dtype) * max(1.0, u.size(0) / u.size(1)) ** 0.5 for u in parts])

    @staticmethod
    def _adamw(p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        if not state:  # torch.optim.AdamW's state layout, so the embedding-table path and checkpoints read it alike
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = group["lr"] / (1 - beta1**t)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
