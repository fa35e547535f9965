"""Typed configuration for the model, training and sampling.

Each dataclass validates itself on construction, so a bad value fails before any
work starts with a message naming the field. `to_dict`/`from_dict` give the JSON
form stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

from gptlab.errors import ConfigError

C = TypeVar("C")

POS_ENCODINGS = ("learned", "sinusoidal")
NORM_PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu")
DTYPES = ("float32", "bfloat16")


def _positive_int(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _in_range(cfg: Any, name: str, lo: float, hi: float, *, hi_open: bool = False) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and math.isfinite(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in [{lo}, {hi}{bracket}, got {value!r}")


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class GPTConfig(_Serializable):
    """Shape and architecture of a decoder-only transformer.

    The defaults are GPT-2 small (124M) with the vocabulary padded to 50304, a
    multiple of 64 that keeps matmuls aligned. GPT-1 is `norm_placement="post"`
    (Radford et al. 2018: LayerNorm after each residual add, no final LayerNorm).
    """

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd as in GPT-2
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    pos_encoding: str = "learned"  # learned table (GPT-1/2) or fixed sinusoids (Vaswani et al. 2017)
    norm_placement: str = "pre"  # pre-LN (GPT-2) or post-LN (GPT-1)
    activation: str = "gelu_tanh"  # GPT-2's GELU uses the tanh approximation
    layer_norm_eps: float = 1e-5
    # attention scores q.k are multiplied by 1/sqrt(head_dim) (Vaswani et al. 2017, eq. 1) when
    # scale_attn_weights, and by 1/(layer index + 1) when scale_attn_by_inverse_layer_idx (a
    # Megatron/Mistral stability trick that HF's GPT-2 offers); names as in HF's GPT2Config
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    upcast_attn: bool = False  # scores and softmax in float32 under bf16 autocast (HF: reorder_and_upcast_attn)
    tie_weights: bool = True  # output head shares the token embedding matrix (Press & Wolf 2017)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _positive_int(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.n_inner is not None:
            _positive_int(self, "n_inner")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        _in_range(self, "dropout", 0.0, 1.0, hi_open=True)
        _choice(self, "pos_encoding", POS_ENCODINGS)
        _choice(self, "norm_placement", NORM_PLACEMENTS)
        _choice(self, "activation", ACTIVATIONS)
        _in_range(self, "layer_norm_eps", 0.0, 1.0)
        for name in ("bias", "tie_weights", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "upcast_attn"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _in_range(self, "init_std", 0.0, 1.0)
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"n_embd ({self.n_embd}) must be even for sinusoidal positions")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@dataclass(frozen=True)
class TrainConfig(_Serializable):
    """Optimisation and bookkeeping for `gptlab train`.

    The effective batch is batch_size * grad_accum sequences of block_size tokens.
    The learning rate warms up linearly for warmup_steps, then follows a cosine
    from lr down to min_lr at max_steps (Loshchilov & Hutter 2017).
    """

    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    dtype: str = "float32"  # autocast dtype; parameters and optimizer state stay float32

    def __post_init__(self) -> None:
        _positive_int(self, "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every", "keep_last", "log_every")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"warmup_steps must be an integer in [0, max_steps={self.max_steps}], got {self.warmup_steps!r}")
        _in_range(self, "lr", 0.0, 10.0)
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        _in_range(self, "min_lr", 0.0, self.lr)
        _in_range(self, "weight_decay", 0.0, 10.0)
        _in_range(self, "beta1", 0.0, 1.0, hi_open=True)
        _in_range(self, "beta2", 0.0, 1.0, hi_open=True)
        _in_range(self, "grad_clip", 0.0, float("inf"), hi_open=True)
        _choice(self, "dtype", DTYPES)
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps; got {self.device!r}")


@dataclass(frozen=True)
class SampleConfig(_Serializable):
    """Decoding controls. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _positive_int(self, "max_new_tokens")
        _in_range(self, "temperature", 0.0, 100.0)
        if self.top_k is not None:
            _positive_int(self, "top_k")
        if self.top_p is not None:
            _in_range(self, "top_p", 0.0, 1.0)
            if self.top_p <= 0:
                raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
