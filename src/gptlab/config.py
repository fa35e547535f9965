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

POS_ENCODINGS = ("learned", "sinusoidal", "rope")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
NORM_PLACEMENTS = ("pre", "post")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu", "relu2")
MLPS = ("standard", "gated")
DTYPES = ("float32", "bfloat16")
CONTEXT_OVERFLOW = ("error", "slide")
STRATEGIES = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "muon")


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
    # width of one attention head; None means n_embd // n_head as in GPT-2. Structured pruning
    # (gptlab prune --structured heads) removes heads and keeps their width: n_head * head_size < n_embd
    head_size: int | None = None
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    # learned table (GPT-1/2), fixed sinusoids added to the input (Vaswani et al. 2017), or rotary embeddings
    # applied to each head's queries and keys (RoPE, Su et al. 2021) with base rope_theta
    pos_encoding: str = "learned"
    rope_theta: float = 10000.0
    # RoPE's frequencies stretched for contexts past the one pretrained (rope_original_context positions):
    # "linear" divides every frequency by rope_factor (position interpolation, Chen et al. 2023); "llama3" (Llama
    # 3.1, Meta 2024) divides those with wavelengths over rope_original_context / rope_low_freq_factor by rope_factor,
    # keeps those under rope_original_context / rope_high_freq_factor, and blends linearly in between; "yarn" (Peng
    # et al. 2023) keeps the head pairs that turn over rope_beta_fast times in rope_original_context positions,
    # divides those turning under rope_beta_slow times by rope_factor, blends linearly in the pair index between
    # (bounds rounded outwards when rope_truncate), and multiplies q.k by rope_attention_factor^2 (None: 0.1 ln(factor) + 1)
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    norm_placement: str = "pre"  # pre-LN (GPT-2) or post-LN (GPT-1)
    norm: str = "layernorm"  # LayerNorm (GPT-2) or RMSNorm (Zhang & Sennrich 2019: no centring, no bias)
    # the MLP's nonlinearity: GPT-2's GELU uses the tanh approximation; relu2 is ReLU squared (So et al. 2021)
    activation: str = "gelu_tanh"
    # standard: c_proj(act(c_fc x)); gated: c_fc makes two halves and c_proj(act(gate) * up) (Shazeer 2020:
    # SwiGLU is gated with silu, as Llama; GEGLU gated with gelu). n_inner is the width of each half
    mlp: str = "standard"
    # key/value heads: None is one per query head; fewer share each key/value head among n_head / n_kv_head
    # query heads (grouped-query attention, Ainslie et al. 2023; 1 is multi-query), shrinking the KV cache
    n_kv_head: int | None = None
    qk_norm: bool = False  # normalise each head's queries and keys (the `norm` kind, over head_dim) before RoPE
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
        if self.head_size is not None:
            _positive_int(self, "head_size")
        elif self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        _in_range(self, "dropout", 0.0, 1.0, hi_open=True)
        _choice(self, "pos_encoding", POS_ENCODINGS)
        _choice(self, "norm_placement", NORM_PLACEMENTS)
        _choice(self, "norm", NORMS)
        _choice(self, "activation", ACTIVATIONS)
        _choice(self, "mlp", MLPS)
        if self.n_kv_head is not None:
            _positive_int(self, "n_kv_head")
            if self.n_head % self.n_kv_head:
                raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or not 1.0 < self.rope_theta < math.inf:
            raise ConfigError(f"rope_theta must be a number above 1, got {self.rope_theta!r}")
        _in_range(self, "layer_norm_eps", 0.0, 1.0)
        for name in ("bias", "tie_weights", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "upcast_attn", "qk_norm", "rope_truncate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _in_range(self, "init_std", 0.0, 1.0)
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"n_embd ({self.n_embd}) must be even for sinusoidal positions")
        _choice(self, "rope_scaling", ROPE_SCALINGS)
        if self.rope_scaling != "none" and self.pos_encoding != "rope":
            raise ConfigError(f"rope_scaling={self.rope_scaling!r} needs pos_encoding='rope', got {self.pos_encoding!r}")
        _in_range(self, "rope_factor", 1.0, math.inf, hi_open=True)
        _in_range(self, "rope_low_freq_factor", 0.0, math.inf, hi_open=True)
        _in_range(self, "rope_high_freq_factor", 0.0, math.inf, hi_open=True)
        _positive_int(self, "rope_original_context")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(
                f"llama3 rope scaling needs 0 < rope_low_freq_factor < rope_high_freq_factor, got {self.rope_low_freq_factor!r} and {self.rope_high_freq_factor!r}"
            )
        _in_range(self, "rope_beta_slow", 0.0, math.inf, hi_open=True)
        _in_range(self, "rope_beta_fast", 0.0, math.inf, hi_open=True)
        if self.rope_scaling == "yarn" and not 0 < self.rope_beta_slow <= self.rope_beta_fast:
            raise ConfigError(f"yarn rope scaling needs 0 < rope_beta_slow <= rope_beta_fast, got {self.rope_beta_slow!r} and {self.rope_beta_fast!r}")
        factor = self.rope_attention_factor
        if factor is not None and not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor < math.inf):
            raise ConfigError(f"rope_attention_factor must be a positive number or None, got {factor!r}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"the head width ({self.head_dim}) must be even for rotary positions")

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def rope_attention_scale(self) -> float:
        """What yarn's RoPE multiplies queries and keys by (so q.k by its square; 1.0 for the other scalings): the
        given rope_attention_factor, else YaRN's sqrt(1/t) = 0.1 ln(rope_factor) + 1 (Peng et al. 2023)."""
        if self.rope_scaling != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        return 0.1 * math.log(self.rope_factor) + 1.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the key (or value) heads side by side: n_kv_head * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def attn_dim(self) -> int:
        """Width of the heads side by side: what c_attn makes three of and c_proj reads (n_embd unless heads were pruned)."""
        return self.n_head * self.head_dim

    @property
    def mlp_dim(self) -> int:
        """The MLP's hidden width: n_inner, else 4 * n_embd, or for a gated MLP 8/3 * n_embd rounded up to a multiple of
        64, which keeps its three matrices at the parameters of the standard two (as Llama sizes SwiGLU)."""
        if self.n_inner is not None:
            return self.n_inner
        return -(-8 * self.n_embd // 3 // 64) * 64 if self.mlp == "gated" else 4 * self.n_embd


# Named architectures: GPTConfig fields a preset sets (`gptlab train --arch NAME`; explicit flags still win).
# llama: the stack most open models since 2023 share (Touvron et al. 2023): rotary positions, RMSNorm, a SwiGLU
# MLP, no biases, untied input and output embeddings. gpt2 is GPTConfig's defaults.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {},
    "llama": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "gated", "activation": "silu", "bias": False, "tie_weights": False},
}


@dataclass(frozen=True)
class TrainConfig(_Serializable):
    """Optimisation and bookkeeping for `gptlab train`.

    The effective batch is batch_size * grad_accum sequences of block_size tokens.
    The learning rate warms up linearly for warmup_steps, then follows a cosine
    from lr down to min_lr at max_steps (Loshchilov & Hutter 2017). Left unset,
    warmup_steps follows the run's length (`auto_warmup`), so any max_steps is valid.

    With time_budget (seconds), a fresh run measures its step time and replaces
    max_steps with the number of steps that fit the budget, evaluation and checkpoints
    included, and stops by the budget's end if steps slow down (the schedule is then cut
    short, never stretched), with a final evaluation and checkpoint. A resumed run keeps
    its schedule; a budget given for the resume caps that session (see train.train).
    """

    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int | None = None  # None: auto_warmup(max_steps)
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
    # under torchrun: "ddp" replicates the model in every process, "fsdp" shards it; batch_size
    # stays the global batch (sequences per micro-step over all processes)
    strategy: str = "ddp"
    compile: bool = False  # torch.compile the model (costs a compile at start; pays off on GPUs)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    tf32: bool = True  # on CUDA, float32 matmuls use TF32 tensor cores (10-bit mantissa products, float32 sums)
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss or gradient (each skipped) before the run stops
    # adamw, or muon: Muon (Jordan et al. 2024) for the blocks' weight matrices at muon_lr with momentum muon_momentum,
    # AdamW at lr for embeddings, head, gains and biases; both follow the warmup + cosine schedule
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # the dtype of Muon's Newton-Schulz iteration: auto is bfloat16 where bf16 matmuls are native (train.fast_bf16),
    # else float32
    muon_ns_dtype: str = "auto"
    time_budget: float | None = None  # seconds of wall clock for the run, from the start of its setup

    def __post_init__(self) -> None:
        _positive_int(self, "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every", "keep_last", "log_every", "max_bad_steps")
        if self.warmup_steps is not None and (
            not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or not 0 <= self.warmup_steps <= self.max_steps
        ):
            raise ConfigError(f"warmup_steps must be an integer in [0, max_steps={self.max_steps}], got {self.warmup_steps!r}")
        if self.time_budget is not None:
            _in_range(self, "time_budget", 0.0, float("inf"), hi_open=True)
            if self.time_budget <= 0:
                raise ConfigError(f"time_budget must be a positive number of seconds, got {self.time_budget!r}")
        _in_range(self, "lr", 0.0, 10.0)
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        _in_range(self, "min_lr", 0.0, self.lr)
        _in_range(self, "weight_decay", 0.0, 10.0)
        _in_range(self, "beta1", 0.0, 1.0, hi_open=True)
        _in_range(self, "beta2", 0.0, 1.0, hi_open=True)
        _in_range(self, "grad_clip", 0.0, float("inf"), hi_open=True)
        _choice(self, "dtype", DTYPES)
        _choice(self, "strategy", STRATEGIES)
        _choice(self, "optimizer", OPTIMIZERS)
        _in_range(self, "muon_lr", 0.0, 10.0)
        if self.muon_lr <= 0:
            raise ConfigError(f"muon_lr must be positive, got {self.muon_lr!r}")
        _in_range(self, "muon_momentum", 0.0, 1.0, hi_open=True)
        _choice(self, "muon_ns_dtype", ("auto", "float32", "bfloat16"))
        for name in ("compile", "activation_checkpointing", "tf32"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps; got {self.device!r}")


    @property
    def warmup(self) -> int:
        """The warmup length in steps: warmup_steps if set, else auto_warmup(max_steps)."""
        return auto_warmup(self.max_steps) if self.warmup_steps is None else self.warmup_steps


def auto_warmup(max_steps: int) -> int:
    """Default warmup: a tenth of the run, at most 100 steps (gptlab's former fixed default, so
    runs of 1000 steps or more keep the schedule they had; shorter ones now fit)."""
    return min(100, max_steps // 10)


@dataclass(frozen=True)
class SampleConfig(_Serializable):
    """Decoding controls for one request; every field's default leaves the model's distribution alone.

    Logits pass through, in order: logit_bias, repetition_penalty, presence/frequency
    penalties, then (unless temperature is 0, which is greedy argmax) temperature, top_k,
    top_p and min_p, and a token is drawn. A request ends after max_new_tokens, on one of
    stop_token_ids (and the tokenizer's <|endoftext|> unless ignore_eot), or when the
    decoded text contains one of the stop strings, which is cut off the text.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # keep tokens with p >= min_p * p_max (Nguyen et al. 2024)
    # CTRL's penalty (Keskar et al. 2019) on every token of the prompt and output so far:
    # positive logits are divided by it, negative ones multiplied; 1.0 is off
    repetition_penalty: float = 1.0
    # OpenAI's penalties over the output so far: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # added to the logits of these token ids
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eot: bool = False
    logprobs: int | None = None  # also return the top-n alternatives' log-probabilities at each step
    seed: int | None = None
    # a prompt longer than the context is an error, and output stops when the context is full;
    # "slide" keeps the prompt's last block_size tokens and slides the window on as output grows
    context_overflow: str = "error"

    def __post_init__(self) -> None:
        _positive_int(self, "max_new_tokens")
        _in_range(self, "temperature", 0.0, 100.0)
        if self.top_k is not None:
            _positive_int(self, "top_k")
        for name in ("top_p", "min_p"):
            if getattr(self, name) is not None:
                _in_range(self, name, 0.0, 1.0)
        if self.top_p is not None and self.top_p <= 0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _in_range(self, "repetition_penalty", 0.0, 100.0)
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be positive, got {self.repetition_penalty!r}")
        _in_range(self, "presence_penalty", -100.0, 100.0)
        _in_range(self, "frequency_penalty", -100.0, 100.0)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ConfigError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            # JSON object keys are strings: accept "50256": -100 as OpenAI's API does
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    tid = int(key)
                except (TypeError, ValueError):
                    raise ConfigError(f"logit_bias key {key!r} is not a token id") from None
                if tid < 0 or not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise ConfigError(f"logit_bias entry {key!r}: {value!r} needs a token id >= 0 and a finite number")
                bias[tid] = float(value)
            object.__setattr__(self, "logit_bias", bias)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, int) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.ignore_eot, bool):
            raise ConfigError(f"ignore_eot must be true or false, got {self.ignore_eot!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 20):
            raise ConfigError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        _choice(self, "context_overflow", CONTEXT_OVERFLOW)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
