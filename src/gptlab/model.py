"""Decoder-only transformer: GPT-1 (post-LN) and GPT-2 (pre-LN) in one module.

Parameter names follow OpenAI's GPT-2 release (wte, wpe, h.N.ln_1, attn.c_attn, ...),
so checkpoints convert to and from Hugging Face with a short table (see gptlab.hf).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from gptlab import kernels as native
from gptlab.config import GPTConfig
from gptlab.errors import InputError

IGNORE_INDEX = -100  # target value that contributes no loss, as in torch and HF


# ----------------------------------------------------------------------------- helpers


def sinusoidal_positions(n_positions: int, dim: int) -> Tensor:
    """Fixed position code of Vaswani et al. 2017, section 3.5.

    PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(pos / 10000^(2i/dim)).
    """
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)  # (T, 1)
    inv_freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = pos * inv_freq  # (T, dim/2)
    pe = torch.empty(n_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe.float()


def fixed_buffers(config: GPTConfig) -> dict[str, Tensor]:
    """The tensors a GPT computes from its config rather than learns: the sinusoidal table or RoPE's frequencies.
    (A model built on the meta device and loaded with assign=True gets them from here.)"""
    if config.pos_encoding == "sinusoidal":
        return {"pos_table": sinusoidal_positions(config.block_size, config.n_embd)}
    if config.pos_encoding == "rope":
        return {"rope_inv_freq": scale_rope_frequencies(rope_frequencies(config.head_dim, config.rope_theta), config)}
    return {}


class _TargetLogProbs(torch.autograd.Function):
    """log softmax(logits)[target] for each row of logits (N, V), computed a few rows at a time; 0 where the target is -100.

    log_softmax + gather materialises log_softmax(logits) in the forward pass, then the
    softmax gradient and a scattered one-hot in the backward pass: more (N, V) buffers, each
    as large as the logits (412 MB at N=2048, V=50304) and each paid for in page faults on
    CPU. Here the forward keeps only the picked values, and the backward writes
    d picked / d logits = onehot(target) - softmax(logits), times the incoming gradient,
    straight into one buffer. Chunks of rows stay cache-sized and are computed in float32
    whatever the logits' dtype, so bf16 logits are never copied whole to float32.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, chunk_elems: int) -> Tensor:
        N, V = logits.shape
        rows = max(1, chunk_elems // V)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)  # (N, 1), ignored rows read column 0
        picked = torch.empty(N, dtype=torch.float32, device=logits.device)
        for s in range(0, N, rows):
            log_probs = torch.log_softmax(logits[s : s + rows], dim=1, dtype=torch.float32)  # (rows, V)
            picked[s : s + rows] = log_probs.gather(1, safe_targets[s : s + rows]).squeeze(1)
        ctx.save_for_backward(logits, safe_targets, valid)
        ctx.rows = rows
        return picked * valid

    @staticmethod
    def backward(ctx: Any, grad_picked: Tensor) -> tuple[Tensor, None, None]:
        logits, safe_targets, valid = ctx.saved_tensors
        rows = ctx.rows
        row_scale = -(grad_picked * valid).unsqueeze(1)  # (N, 1); 0 on ignored rows
        minus_one = torch.full((rows, 1), -1.0, device=logits.device)
        grad = torch.empty_like(logits)
        for s in range(0, logits.size(0), rows):
            probs = torch.softmax(logits[s : s + rows], dim=1, dtype=torch.float32)  # (rows, V)
            probs.scatter_add_(1, safe_targets[s : s + rows], minus_one[: probs.size(0)])  # softmax - onehot
            torch.mul(probs, row_scale[s : s + rows], out=grad[s : s + rows])
        return grad, None, None


def _native_cpu(t: Tensor) -> bool:
    """Whether the native training kernels (kernels/train.cpp) take `t`: a float32 or bfloat16 CPU tensor, outside
    torch.compile (which cannot trace them), with the kernels built."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling() and native.load()


class _NativeTargetLogProbs(torch.autograd.Function):
    """target_logprobs by the native kernels (kernels/train.cpp): the forward reads each row of logits twice while it is
    in cache and keeps its log-sum-exp; the backward writes -grad * (softmax - onehot) into the gradient in one pass."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        picked, lse = native.target_logprobs(logits, targets)  # (N,), (N,) float32
        ctx.save_for_backward(logits, targets, lse)
        return picked

    @staticmethod
    def backward(ctx: Any, grad_picked: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        scale = -(grad_picked.float() * (targets != IGNORE_INDEX)).contiguous()  # (N,); 0 on ignored rows
        return native.target_logprobs_grad(logits, targets, lse, scale), None


LOSS_KERNELS = ("auto", "native", "chunked")


def target_logprobs(logits: Tensor, targets: Tensor, chunk_elems: int = 1 << 20, kernel: str = "auto") -> Tensor:
    """log p(target) under each row of logits (N, V), (N,) in float32; 0 where the target is -100.

    Same value and gradient as log_softmax(logits).gather(targets), with far less memory traffic
    on CPU. `kernel`: "native" (kernels/train.cpp, float32 or bfloat16 logits: ~2-3x the chunked
    path's speed at GPT-2's vocabulary), "chunked" (_TargetLogProbs, chunk_elems a chunk), or "auto":
    native where it is built and applies (not inside torch.compile, which cannot trace it), else
    chunked. On CUDA it is log_softmax + gather: the extra buffers cost no page faults there.
    """
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(LOSS_KERNELS)}, got {kernel!r}")
    valid = targets != IGNORE_INDEX
    if logits.device.type == "cuda":
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
        return picked * valid
    if kernel == "native" and not native.load():
        raise RuntimeError("the native loss kernel is not available here (no C++ compiler, a failed build, or GPTLAB_NATIVE=0)")
    if kernel == "native" or (kernel == "auto" and _native_cpu(logits)):
        return _NativeTargetLogProbs.apply(logits.contiguous(), targets.long().contiguous())
    return _TargetLogProbs.apply(logits, targets, chunk_elems)


def cross_entropy(logits: Tensor, targets: Tensor, chunk_elems: int = 1 << 20, kernel: str = "auto") -> Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,), skipping targets equal to -100.

    Same value and gradient as F.cross_entropy(logits, targets, ignore_index=-100): minus the
    mean of target_logprobs (chunk_elems and kernel as there) over the counted rows. On CUDA it
    is F.cross_entropy itself: one fused kernel (which torch.compile fuses further) beats
    hundreds of chunk launches.
    """
    if logits.device.type == "cuda":
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return -target_logprobs(logits, targets, chunk_elems, kernel).sum() / (targets != IGNORE_INDEX).sum()


def label_logprobs(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """log p(y_t | x_{<=t}) under a GPT (or a wrapper whose forward passes `logits_at` on), (B, T); 0 where y is -100.

    The LM head runs only at the labelled positions: a reply's log-probabilities (RL, DPO) need
    the vocabulary projection at its tokens, not at the prompt's, and that projection is most of
    a small model's compute.
    """
    labelled = y != IGNORE_INDEX  # (B, T)
    logits = model(x, logits_at=labelled)[0]  # (N, V), N = labelled.sum()
    return unpack_rows(labelled, target_logprobs(logits, y[labelled]))  # (B, T)


def unpack_rows(mask: Tensor, values: Tensor) -> Tensor:
    """Per-position values (N,) taken at a boolean mask (B, T) put back in place, (B, T) with 0 elsewhere; differentiable."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).index_put((mask,), values)


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, Primer), the MLP activation of modded-nanogpt and nanochat."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class _NativeGeluTanh(torch.autograd.Function):
    """GELUTanh through kernels/train.cpp: forward and derivative in one pass each, computed in float32."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return native.gelu_tanh(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return native.gelu_tanh_backward(grad.contiguous(), x)


class GELUTanh(nn.Module):
    """GPT-2's GELU, the tanh approximation (Hendrycks & Gimpel 2016, eq. 2): HF's "gelu_new", nn.GELU(approximate="tanh").

    On CPU it runs the native kernel (kernels/train.cpp) where it is built: PyTorch's CPU kernel for this form
    takes ~6x as long as for the exact GELU, and its derivative likewise."""

    def forward(self, x: Tensor) -> Tensor:
        if _native_cpu(x):
            return _NativeGeluTanh.apply(x.contiguous())
        return F.gelu(x, approximate="tanh")


def _activation(name: str) -> nn.Module:
    # GPT-2's GELU is the tanh approximation (Hendrycks & Gimpel 2016, eq. 2)
    if name == "gelu_tanh":
        return GELUTanh()
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    if name == "relu2":
        return ReLUSquared()
    assert name == "relu", name
    return nn.ReLU()


def _norm(config: GPTConfig, dim: int) -> nn.Module:
    """The config's normalisation over the last `dim` features: LayerNorm (with a bias when config.bias) or RMSNorm,
    x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps, bias=config.bias)


def rope_frequencies(head_dim: int, theta: float) -> Tensor:
    """RoPE's rotation speeds theta^(-2i/d) for i < d/2 (Su et al. 2021, eq. 15), (head_dim/2,) float32."""
    return torch.pow(theta, -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim).float()


def scale_rope_frequencies(inv_freq: Tensor, config: GPTConfig) -> Tensor:
    """inv_freq stretched by config.rope_scaling, for contexts past the rope_original_context positions trained on.

    linear: every frequency / rope_factor, so position p turns as p / rope_factor did (Chen et al. 2023).
    llama3 (Llama 3.1): with wavelength w = 2 pi / f and L = rope_original_context, r = (L / w - low) / (high - low)
    clamped to [0, 1] (low, high: rope_low_/high_freq_factor), f' = f ((1 - r) / rope_factor + r): waves longer than
    L / low, which never completed a turn in training, slow down by the factor; those shorter than L / high,
    which carry local order, stay; the band between blends linearly in L / w (continuous at both ends).
    yarn (Peng et al. 2023, "NTK-by-parts", as transformers computes it): pair i of a head of width d turns
    L f_i / 2 pi times over the L trained positions, and the pair turning n times is i(n) = d ln(L / 2 pi n) / (2 ln
    theta); pairs below i(beta_fast) keep their speed, those above i(beta_slow) slow down by the factor, and the
    blend is linear in i between (bounds floored / ceiled when rope_truncate, clamped to [0, d - 1])."""
    if config.rope_scaling == "none":
        return inv_freq
    f = inv_freq.double()
    if config.rope_scaling == "linear":
        return (f / config.rope_factor).float()
    if config.rope_scaling == "yarn":
        dim, L = 2 * f.numel(), config.rope_original_context

        def pair_turning(n: float) -> float:
            return dim * math.log(L / (2 * math.pi * n)) / (2 * math.log(config.rope_theta))

        low, high = pair_turning(config.rope_beta_fast), pair_turning(config.rope_beta_slow)
        if config.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if high == low:  # both bounds on one pair: a step there instead of 0 / 0 (transformers' choice)
            high += 0.001
        r = ((torch.arange(f.numel(), dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)  # 1: slowed
        return (f * ((1 - r) + r / config.rope_factor)).float()
    assert config.rope_scaling == "llama3", config.rope_scaling
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelength = 2 * math.pi / f
    r = ((config.rope_original_context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (f * ((1 - r) / config.rope_factor + r)).float()


def rope_angles(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, (..., head_dim) for positions (...): each angle twice, once for each half
    of a head, the layout Llama's Hugging Face port uses (pairs (i, i + d/2) rotate together)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., hs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) of every head of x (B, T, nh, hs) by its angle: cos, sin (T, hs) or (B, T, hs).

    x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin: a rotation, so it keeps each head's norm, and q_m . k_n
    then depends on the positions only through m - n (Su et al. 2021, eq. 16).
    """
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, T, nh, hs)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # (T, 1, hs) or (B, T, 1, hs)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for a batch of sequences, allocated once at full length.

    k and v are (n_layer, B, n_kv_head, max_len, hs). Row b's entries for positions 0..n-1 are the
    keys and values of its first n tokens; slots past a row's length hold stale values that
    attention masks out. The shapes never change while generating, so a compiled decode
    step (torch.compile, CUDA graphs) is traced once.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if not 0 < max_len <= config.block_size:
            raise InputError(f"a KV cache holds 1..block_size ({config.block_size}) positions, asked for {max_len}")
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def first(self, n: int) -> KVCache:
        """Rows 0..n-1 as a cache of their own, sharing this one's memory (a continuous-batching step)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        return view


class CacheStep:
    """Where one forward pass writes into a KVCache, and which cached keys each query sees.

    start None: prefill, tokens at positions 0..T-1 of every row (rows right-padded, so a
    real token never sees padding under the causal mask). start (B,): row b's T tokens sit
    at positions start[b]..start[b]+T-1 and each sees the row's keys up to its own position.
    Attention reads the first kv_len slots, kv_len >= max(start) + T; a static kv_len equal
    to the cache length keeps shapes fixed for compilation.
    """

    def __init__(self, cache: KVCache, T: int, start: Tensor | None, kv_len: int) -> None:
        if start is None:
            kv_len = T
        if not T <= kv_len <= cache.max_len:
            raise InputError(f"{T} new tokens reaching slot {kv_len} do not fit a KV cache of {cache.max_len} positions")
        self.cache = cache
        self.kv_len = kv_len
        self.positions: Tensor | None = None  # (B, T): what the position embedding reads
        self.slots: Tensor | None = None  # (B, T): where the keys and values go; the positions, but for after_prefix
        self.mask: Tensor | None = None
        self.rows: Tensor | None = None
        # the kernel for a masked step's attention: None is update() then SDPA; the Engine may set one that does both,
        # (step, layer, q (B, nh, T, hs), k, v (B, T, nh, hs), scale) -> (B, nh, T, hs), storing k and v as update() does
        self.attention: Callable[[CacheStep, int, Tensor, Tensor, Tensor, float], Tensor] | None = None
        if start is not None:
            offsets = torch.arange(T, device=start.device)
            self.positions = self.slots = start[:, None] + offsets  # (B, T)
            slots = torch.arange(kv_len, device=start.device)
            self.mask = (slots <= self.positions[:, :, None]).unsqueeze(1)  # (B, 1, T, kv_len)
            self.rows = torch.arange(start.size(0), device=start.device)[:, None]  # (B, 1), pairs with positions

    @classmethod
    def after_prefix(cls, cache: KVCache, prefix_len: int, positions: Tensor, mask: Tensor) -> CacheStep:
        """Rows of T tokens that all continue one prefix, whose keys and values fill the cache's first
        prefix_len slots of every row. A row's tokens go to slots prefix_len..prefix_len+T-1, are numbered
        prefix_len + positions (B, T) (branched rows repeat numbers: model.branched_positions_and_mask), and
        each sees the whole prefix and the row's tokens its `mask` (B, 1, T, T) allows."""
        B, T = positions.shape
        step = cls(cache, T, torch.full((B,), prefix_len, device=positions.device), prefix_len + T)
        step.positions = prefix_len + positions  # (B, T)
        step.mask = torch.cat([mask.new_ones(B, 1, T, prefix_len), mask], dim=-1)  # (B, 1, T, prefix_len + T)
        return step

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this pass's k, v (B, T, n_kv, hs) and return the keys and values to attend over, (B, n_kv, kv_len, hs) each."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # (B, nh, S, hs)
        if self.positions is None:
            T = k.size(1)
            ck[:, :, :T] = k.transpose(1, 2)
            cv[:, :, :T] = v.transpose(1, 2)
        else:
            # advanced indices around a slice put their dims first: ck[rows, :, positions] is (B, T, nh, hs)
            ck[self.rows, :, self.slots] = k
            cv[self.rows, :, self.slots] = v
        return ck[:, :, : self.kv_len], cv[:, :, : self.kv_len]


def packed_positions_and_mask(segments: Tensor) -> tuple[Tensor, Tensor]:
    """Positions (B, T) and attention mask (B, 1, T, T) for rows that pack several sequences.

    A sequence is a run of equal segment ids. Its tokens are numbered from 0 at its first
    token, and a query attends to the keys at or before it in the same run: block-diagonal
    causal attention, so packed sequences never see each other (as if each were alone).
    """
    B, T = segments.shape
    t = torch.arange(T, device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # (B, T): where each run begins
    first = torch.where(starts, t, 0).cummax(dim=1).values  # (B, T): index of the run's first token
    positions = t - first
    run = starts.cumsum(dim=1)  # (B, T): the run's number, so a segment id that comes back later is a new sequence
    same = run[:, :, None] == run[:, None, :]  # (B, T, T)
    causal = t[:, None] >= t[None, :]  # (T, T)
    return positions, (same & causal).unsqueeze(1)  # (B, 1, T, T)


def branched_positions_and_mask(segments: Tensor, branches: Tensor) -> tuple[Tensor, Tensor]:
    """Positions (B, T) and attention mask (B, 1, T, T) for rows of shared prefixes and their branches.

    A segment (a run of equal `segments` ids, as in packed_positions_and_mask) is a prefix,
    the tokens whose `branches` id is 0, followed by one or more continuations of it, each
    a run of tokens with its own branch id >= 1: a prompt and the replies to compare, the
    prompt's tokens stored once. A query attends to the keys at or before it in its segment
    that are in the prefix or in its own branch, and is numbered by how many keys it sees
    before itself, so each continuation gets the hidden states it would get right after the
    prefix, alone (the prefix-sharing layout of tree attention, Miao et al. 2024, SpecInfer).
    """
    B, T = segments.shape
    t = torch.arange(T, device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # (B, T): where each segment begins
    run = starts.cumsum(dim=1)  # (B, T)
    same_run = run[:, :, None] == run[:, None, :]  # (B, T, T)
    same_branch = branches[:, :, None] == branches[:, None, :]  # (B, T, T)
    shared = (branches == 0)[:, None, :]  # (B, 1, T): prefix keys, which every branch sees
    mask = same_run & (same_branch | shared) & (t[:, None] >= t[None, :])  # (B, T, T)
    positions = mask.sum(dim=-1) - 1  # (B, T): the keys a query sees before itself
    return positions, mask.unsqueeze(1)  # (B, 1, T, T)


# ----------------------------------------------------------------------------- layers


# Up to this many positions a CPU training step's bfloat16 causal attention runs as explicit products (explicit_attention):
# forward and backward they took 0.56x the time of PyTorch's CPU flash-attention kernel at 256 positions and 0.73-0.78x
# at 512, but 1.11x at 768 and 1.13x at 1024 (2-core EPYC, heap reuse on as in gptlab train; benchmarks/RESULTS.md)
EXPLICIT_ATTENTION_MAX_T = 512
# ... and while a layer's B * nh * T * T probabilities stay within this many: the backward keeps them (float32, and
# rounded to bfloat16: 96 MB a layer at the bound) where the flash kernel keeps one log-sum-exp a row
EXPLICIT_ATTENTION_MAX_SCORES = 1 << 24


def explicit_attention_applies(q: Tensor) -> bool:
    """Whether a causal attention over q (B, nh, T, hs) takes explicit_attention: CPU, bfloat16, gradients on, T small."""
    B, nh, T, _ = q.shape
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and T <= EXPLICIT_ATTENTION_MAX_T
            and B * nh * T * T <= EXPLICIT_ATTENTION_MAX_SCORES)  # fmt: skip


class _ExplicitAttention(torch.autograd.Function):
    """softmax(scale q k^T + causal mask) v over (B * nh, T, hs) bfloat16 q, k, v: the scores and softmax in float32, the
    probabilities rounded to bfloat16 for the product with v. The backward is flash attention's (Dao et al. 2022,
    sec. 3.1): dP = dY V^T, dS = P * (dP - rowsum(dY * Y)), its three products in bfloat16 as PyTorch's kernel has
    them, where autograd through the float32 scores would run two of them in float32 at a quarter of the speed."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        T = q.size(1)
        future = torch.full((T, T), float("-inf"), device=q.device).triu_(1)  # (T, T): -inf where a key comes after the query
        scores = torch.baddbmm(future.expand(q.size(0), T, T), q.float(), k.float().mT, alpha=scale)  # (BH, T, T)
        probs = torch.softmax(scores, dim=-1)  # (BH, T, T) float32
        rounded = probs.to(v.dtype)  # (BH, T, T)
        y = torch.bmm(rounded, v)  # (BH, T, hs)
        ctx.save_for_backward(q, k, v, probs, rounded, y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, probs, rounded, y = ctx.saved_tensors
        dy = dy.contiguous()
        dv = torch.bmm(rounded.mT, dy)  # (BH, T, hs)
        dp = torch.bmm(dy, v.mT)  # (BH, T, T)
        delta = (dy.float() * y.float()).sum(-1, keepdim=True)  # (BH, T, 1): rowsum(P * dP) = dY . Y
        ds = ((dp - delta) * probs * ctx.scale).to(q.dtype)  # (BH, T, T): softmax's backward (float32 by promotion), the scale
        return torch.bmm(ds, k), torch.bmm(ds.mT, q), dv, None  # dq, dk (BH, T, hs)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(scale q k^T + causal mask) v for bfloat16 q (B, nh, T, hs) and k, v (B, nkv, T, hs), as SDPA with
    is_causal=True and enable_gqa=True, by batched products over B * nh (_ExplicitAttention)."""
    B, nh, T, hs = q.shape
    if k.size(1) != nh:  # each key/value head serves nh / nkv query heads, in order
        k, v = k.repeat_interleave(nh // k.size(1), dim=1), v.repeat_interleave(nh // v.size(1), dim=1)  # (B, nh, T, hs)
    with torch.autocast(q.device.type, enabled=False):  # autocast would round the float32 scores' inputs back to bf16
        y = _ExplicitAttention.apply(q.reshape(B * nh, T, hs), k.reshape(B * nh, T, hs), v.reshape(B * nh, T, hs), scale)  # (BH, T, hs)
    return y.view(B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # its slot in a KVCache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        # yarn's RoPE multiplies cos and sin (so q and k) by an attention factor: here q.k by its square, once
        self.scale *= config.rope_attention_scale**2
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.upcast = config.upcast_attn
        # q, k, v in one matmul: n_head query heads, then n_kv_head key and n_kv_head value heads
        self.c_attn = nn.Linear(config.n_embd, config.attn_dim + 2 * config.kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.attn_dim, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm, self.k_norm = _norm(config, config.head_dim), _norm(config, config.head_dim)
        self.attn_dropout = config.dropout  # applied to the attention probabilities inside SDPA
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, T, nh, hs), keys and values (B, T, nkv, hs) for x (B, T, C): QK-normed and rotated as configured."""
        B, T, _ = x.shape
        hs, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        # views, not copies: SDPA accepts the strided (B, nh, T, hs) layout directly
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q, k, v = q.view(B, T, nh, hs), k.view(B, T, nkv, hs), v.view(B, T, nkv, hs)
        if hasattr(self, "q_norm"):  # QK-norm (Dehghani et al. 2023): bounded scores whatever the weights grow to
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, T, nh, hs), (B, T, nkv, hs)
        return q, k, v

    def forward(self, x: Tensor, step: CacheStep | None = None, mask: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`mask` (B, 1, T, T), True where a query may attend, replaces the causal mask (packed sequences);
        `rope` is the cos and sin of the tokens' rotary angles (see rope_angles) when the model uses RoPE."""
        B, T, _ = x.shape
        q, k, v = self.heads(x, rope)
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        # softmax(scale * q k^T) v with the causal mask (Vaswani et al. 2017, eq. 1)
        dropout_p = self.attn_dropout if self.training else 0.0
        if step is not None and step.attention is not None and step.mask is not None and dropout_p == 0.0:
            y = step.attention(step, self.layer_idx, q, k, v, self.scale)  # (B, nh, T, hs); k, v stored in the cache
        else:
            if step is None:
                k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
            else:
                k, v = step.update(self.layer_idx, k, v)  # (B, nh, kv_len, hs)
                mask = step.mask
            causal = mask is None
            gqa = self.n_kv_head != self.n_head  # each key/value head serves n_head / n_kv_head query heads
            if causal and step is None and dropout_p == 0.0 and not self.upcast and explicit_attention_applies(q):
                y = explicit_attention(q, k, v, self.scale)  # (B, nh, T, hs)
            elif self.upcast and q.dtype != torch.float32:
                with torch.autocast(q.device.type, enabled=False):
                    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, dropout_p, is_causal=causal, scale=self.scale, enable_gqa=gqa)
                y = y.to(v.dtype)  # (B, nh, T, hs)
            else:
                y = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal=causal, scale=self.scale, enable_gqa=gqa)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hs): re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """c_proj(act(c_fc x)); gated (config.mlp): c_fc makes [gate, up] in one matmul, c_proj(act(gate) * up)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "gated"
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * config.mlp_dim, bias=config.bias)
        self.act = _activation(config.activation)
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)  # (B, T, mlp_dim), or (B, T, 2 * mlp_dim) gated
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # 2 x (B, T, mlp_dim)
            return self.dropout(self.c_proj(self.act(gate) * up))
        return self.dropout(self.c_proj(self.act(h)))


class Block(nn.Module):
    """One transformer layer: attention then MLP, each wrapped in a residual connection.

    pre-LN (GPT-2, Radford et al. 2019): x + f(LN(x)); the residual stream is never normalised.
    post-LN (GPT-1, Radford et al. 2018, as Vaswani et al. 2017): LN(x + f(x)).
    """

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_ln = config.norm_placement == "pre"
        self.ln_1 = _norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = _norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, step: CacheStep | None = None, mask: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln_1(x), step, mask, rope)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, step, mask, rope))
        return self.ln_2(x + self.mlp(x))


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        layers: dict[str, nn.Module] = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.pos_encoding == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers["drop"] = nn.Dropout(config.dropout)
        layers["h"] = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        if config.norm_placement == "pre":
            # pre-LN leaves the residual stream unnormalised, so GPT-2 adds a final LayerNorm
            layers["ln_f"] = _norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(layers)
        self.checkpoint_blocks = False  # activation checkpointing, a training option (TrainConfig.activation_checkpointing)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # input and output embeddings share one matrix (Press & Wolf 2017)
            self.lm_head.weight = self.transformer.wte.weight
        for name, buffer in fixed_buffers(config).items():  # non-persistent: recomputed from the config, never saved
            self.register_buffer(name, buffer, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(N), N = 2 per layer residual adds,
        # so the residual stream's variance does not grow with depth (Radford et al. 2019, sec. 2.3)
        residual_std = config.init_std / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, segments: Tensor | None = None, logits_at: Tensor | None = None,
        branches: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """Logits (B, T, vocab_size) for token ids (B, T), and the mean cross-entropy against targets (B, T).

        Targets equal to -100 are ignored. Position t's logits depend only on idx[:, :t+1].
        `segments` (B, T) packs several sequences in a row: runs of equal ids are separate
        sequences, each numbering its positions from 0 and attending only within itself, so
        every sequence gets the logits it would get alone. With `branches` (B, T) as well, each
        segment is a shared prefix followed by continuations of it (model.branched_positions_and_mask),
        and a row may be longer than block_size as long as no position reaches it. `logits_at`, a
        boolean (B, T), asks for the logits at those positions only, (N, vocab_size) in row-major
        order (see label_logprobs); it does not combine with targets.
        """
        if branches is not None and (segments is None or branches.shape != idx.shape or segments.shape != idx.shape):
            raise InputError(f"branches need segments, both shaped like the token ids {tuple(idx.shape)}")
        positions = mask = None
        if segments is not None:
            positions, mask = packed_positions_and_mask(segments) if branches is None else branched_positions_and_mask(segments, branches)
        self._check_input(idx, targets, positions if branches is not None else None)
        if logits_at is not None and (targets is not None or logits_at.shape != idx.shape or logits_at.dtype != torch.bool):
            raise InputError(f"logits_at must be a boolean mask shaped like the token ids {tuple(idx.shape)}, without targets; "
                             f"got {logits_at.dtype} {tuple(logits_at.shape)}{' and targets' if targets is not None else ''}")  # fmt: skip
        B, T = idx.shape
        # A tied token table gets two gradients: the head's, dense, and the lookup's, which touches B*T rows. Dense, the
        # lookup's is a zero-filled (V, C) tensor of its own, and on CPU filling its fresh pages cost more than the rest
        # (23 of 29 ms for 50304 x 384, 6% of a float32 training step); sparse, autograd adds it into the head's. Only
        # where the head's gradient is sure to come too (this forward always applies the head), on CPU (where the fill
        # costs), and outside torch.distributed (kept dense there: DDP's and FSDP's gradient hooks were not tried with it).
        sparse = (self.config.tie_weights and idx.device.type == "cpu" and torch.is_grad_enabled() and self.transformer.wte.weight.requires_grad
                  and isinstance(self.transformer.wte, nn.Embedding) and not (torch.distributed.is_available() and torch.distributed.is_initialized()))  # fmt: skip
        h = self._trunk(idx, torch.arange(T, device=idx.device) if positions is None else positions, None, mask, sparse)  # (B, T, C)
        logits = self.lm_head(h if logits_at is None else h[logits_at])  # (B, T, V), or (N, V) at logits_at
        if targets is None:
            return logits, None
        loss = cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def hidden_states(self, idx: Tensor) -> Tensor:
        """The last layer's output (after ln_f), (B, T, C): what lm_head and task or value heads read."""
        self._check_input(idx, None)
        return self._trunk(idx, torch.arange(idx.size(1), device=idx.device), None)

    def forward_cached(self, idx: Tensor, step: CacheStep, last: Tensor | None = None, logits_at: Tensor | None = None) -> Tensor:
        """Logits for tokens idx (B, T) placed in a KVCache as `step` says, reading the row's earlier keys and values.

        Returns (B, T, V), or (B, V) at index last[b] of each row when `last` (B,) is given
        (the prefill of right-padded prompts needs only each row's final position), or (N, V)
        at the N positions a boolean `logits_at` (B, T) marks, in row-major order. The
        generation engine checks ids and lengths before calling; this is its inner loop.
        """
        T = idx.size(1)
        x = self._trunk(idx, torch.arange(T, device=idx.device) if step.positions is None else step.positions, step)  # (B, T, C)
        if last is not None:
            x = x[torch.arange(x.size(0), device=x.device), last]  # (B, C)
        elif logits_at is not None:
            x = x[logits_at]  # (N, C)
        return self.lm_head(x)

    def embed(self, idx: Tensor, positions: Tensor, sparse_grad: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """What the first block reads for tokens idx (B, T) at positions (T,) or (B, T): the token embeddings plus the
        position table's rows (B, T, C), and with RoPE instead the rotary angles every block reads (2 x (T or B, T, hs)).
        sparse_grad: the token table's gradient from this lookup as a sparse tensor of the rows read (see forward)."""
        x = F.embedding(idx, self.transformer.wte.weight, sparse=True) if sparse_grad else self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_encoding == "rope":
            return x, rope_angles(self.rope_inv_freq, positions)
        table = self.pos_table if self.config.pos_encoding == "sinusoidal" else self.transformer.wpe.weight
        return x + table[positions], None  # (T, C) or (B, T, C) added

    def _trunk(self, idx: Tensor, positions: Tensor, step: CacheStep | None, mask: Tensor | None = None, sparse_grad: bool = False) -> Tensor:
        """Hidden states after the last layer (and ln_f), (B, T, C), for tokens idx (B, T) at positions (T,) or (B, T);
        `mask` as in CausalSelfAttention; sparse_grad as in embed."""
        x, rope = self.embed(idx, positions, sparse_grad)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                # keep only each block's input; its activations are recomputed in backward
                # (Chen et al. 2016): about one block's activations in memory instead of all
                x = torch.utils.checkpoint.checkpoint(block, x, step, mask, rope, use_reentrant=False)
            else:
                x = block(x, step, mask, rope)
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
        return x

    @classmethod
    def from_hf(cls, source: str | os.PathLike[str], device: str | torch.device = "cpu", revision: str | None = None) -> GPT:
        """A Hugging Face GPT-2 or GPT-1 model as a gptlab GPT, in eval mode.

        `source` is a local directory (config.json + model.safetensors or pytorch_model.bin),
        or a hub name such as "gpt2" when the hub is reachable. `gptlab.hf.load_hf` also
        returns the tokenizer.
        """
        from gptlab.hf import (
            load_hf,  # gptlab.hf builds on this module, so it is imported on use
        )

        return load_hf(source, device=device, revision=revision).model

    def _check_input(self, idx: Tensor, targets: Tensor | None, positions: Tensor | None = None) -> None:
        """Shapes and id ranges; a row whose tokens carry `positions` (B, T) (branched rows) may be longer than
        block_size as long as no position reaches it."""
        if idx.dim() != 2:
            raise InputError(f"token ids must have shape (batch, time), got shape {tuple(idx.shape)}")
        T = idx.size(1)
        if positions is None and T > self.config.block_size:
            raise InputError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if positions is not None and positions.numel() and idx.device.type == "cpu" and int(positions.max()) >= self.config.block_size:
            raise InputError(f"position {int(positions.max())} is beyond block_size {self.config.block_size}")
        if targets is not None and targets.shape != idx.shape:
            raise InputError(f"targets shape {tuple(targets.shape)} does not match token ids shape {tuple(idx.shape)}")
        if idx.device.type != "cpu":  # the value checks read results back: on a GPU that would stall every step
            return
        if idx.numel():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            bad = lo if lo < 0 else hi
            if lo < 0 or hi >= self.config.vocab_size:
                raise InputError(f"token id {bad} is out of range [0, {self.config.vocab_size})")
        if targets is not None:
            bad_targets = targets[((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= self.config.vocab_size)]
            if bad_targets.numel():
                raise InputError(f"target {int(bad_targets[0])} is out of range [0, {self.config.vocab_size}) and is not {IGNORE_INDEX}")

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters, each shared tensor counted once.

        non_embedding leaves out the tables that are only looked up, never multiplied
        (as nanoGPT): the learned position table, and the token table when it is not
        tied to lm_head (a tied table is also the output matmul, so it stays).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at full context, for MFU.

        6 N for the weight matmuls (2 forward, 4 backward per multiply-add) plus
        12 n_layer n_embd T for attention scores and values (Chowdhery et al. 2022, PaLM, appendix B).
        """
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def with_new_tokens(model: GPT, ids: list[int], known: int, multiple: int = 64) -> GPT:
    """`model` with trainable rows for new token ids (e.g. special tokens added for a chat template).

    The token table (and an untied head) grows when an id does not fit, to a multiple of
    `multiple` rows. Each new id's row starts at the mean of the `known` rows that real tokens
    use (Hewitt 2021, "Initializing new word embeddings"): a new token then begins with an
    average input embedding and, through the tied head, an output logit near the average
    one, instead of a random row the model never trained, which can dominate the output.
    Rows of ids a smaller tokenizer never used count as new when asked for. Returns `model`
    itself, changed in place, when the table is big enough; otherwise a new GPT.
    """
    if not ids:
        return model
    if not 0 < known <= model.config.vocab_size or min(ids) < known:
        raise InputError(f"new token ids {ids} must come after the {known} known ones (table of {model.config.vocab_size} rows)")
    need = max(ids) + 1
    if need > model.config.vocab_size:
        grown = GPT(model.config.replace(vocab_size=-(-need // multiple) * multiple))
        state = model.state_dict()
        for name in ("transformer.wte.weight", "lm_head.weight"):
            old = state[name]
            state[name] = torch.cat([old, old.new_zeros(grown.config.vocab_size - old.size(0), old.size(1))])  # (V', C)
        grown.load_state_dict(state)
        grown.train(model.training)
        model = grown.to(model.transformer.wte.weight.device)
    with torch.no_grad():
        tables = [model.transformer.wte.weight] + ([] if model.config.tie_weights else [model.lm_head.weight])
        for table in tables:
            table[ids] = table[:known].mean(dim=0)
    return model
