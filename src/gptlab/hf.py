"""Conversion between gptlab and Hugging Face GPT2LMHeadModel configs and state dicts.

gptlab keeps OpenAI's GPT-2 parameter names, so the state dicts differ only in
layout: HF stores the four projection matrices as Conv1D weights, (in, out), where
nn.Linear stores (out, in). Everything here is plain dict and tensor code; it does
not import transformers, so it also serves checkpoints read from config.json and
safetensors files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from gptlab.config import GPTConfig
from gptlab.errors import CheckpointError, ConfigError

# HF config.json activation names -> gptlab's. gelu_new and gelu_pytorch_tanh are the same
# function (tanh approximation of GELU), one written in Python, one a fused kernel.
_ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

# GPT2Config defaults, used for fields a config.json leaves out
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
}

# HF fields that change the computation in ways gptlab does not implement: field -> the only value accepted.
# (reorder_and_upcast_attn is absent on purpose: it changes only the precision of the attention softmax.)
_HF_REQUIRED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}

# The parameter table: name, whether HF stores it transposed (Conv1D keeps (in, out) where
# nn.Linear keeps (out, in)), and its gptlab shape in symbols resolved by _dims.
_LAYER_PARAMS = (  # under transformer.h.{i}.
    ("ln_1.weight", False, ("C",)),
    ("ln_1.bias", False, ("C",)),
    ("attn.c_attn.weight", True, ("3C", "C")),
    ("attn.c_attn.bias", False, ("3C",)),
    ("attn.c_proj.weight", True, ("C", "C")),
    ("attn.c_proj.bias", False, ("C",)),
    ("ln_2.weight", False, ("C",)),
    ("ln_2.bias", False, ("C",)),
    ("mlp.c_fc.weight", True, ("F", "C")),
    ("mlp.c_fc.bias", False, ("F",)),
    ("mlp.c_proj.weight", True, ("C", "F")),
    ("mlp.c_proj.bias", False, ("C",)),
)
_TOP_PARAMS = (  # under transformer.
    ("wte.weight", False, ("V", "C")),
    ("wpe.weight", False, ("T", "C")),
    ("ln_f.weight", False, ("C",)),
    ("ln_f.bias", False, ("C",)),
)
_HEAD = "lm_head.weight"  # (V, C); in a tied model the same matrix as transformer.wte.weight

# Buffers some transformers versions save with the weights (the causal mask); gptlab has no such state.
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")

_PREFIX = "transformer."


def config_from_hf_gpt2(hf_config: Mapping[str, Any]) -> GPTConfig:
    """GPTConfig equivalent to a GPT-2 config.json dict; ConfigError names any field gptlab cannot honour."""
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ConfigError(f"model_type must be 'gpt2', got {model_type!r}")
    for field, required in _HF_REQUIRED.items():
        value = hf_config.get(field, required)
        if value != required:
            raise ConfigError(f"HF config field {field}={value!r} is not supported (gptlab needs {required!r})")

    def get(field: str) -> Any:
        return hf_config.get(field, _HF_DEFAULTS[field])

    activation = get("activation_function")
    if activation not in _ACTIVATIONS_FROM_HF:
        raise ConfigError(f"HF config field activation_function={activation!r} is not supported; use one of {', '.join(_ACTIVATIONS_FROM_HF)}")
    n_ctx = hf_config.get("n_ctx", get("n_positions"))
    if n_ctx != get("n_positions"):
        raise ConfigError(f"HF config fields n_ctx={n_ctx!r} and n_positions={get('n_positions')!r} differ; gptlab has one context length")
    dropouts = {field: get(field) for field in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(dropouts.values())) > 1:
        listed = ", ".join(f"{k}={v!r}" for k, v in dropouts.items())
        raise ConfigError(f"HF config dropout fields differ ({listed}); gptlab uses one dropout rate")
    return GPTConfig(
        vocab_size=get("vocab_size"),
        block_size=get("n_positions"),
        n_layer=get("n_layer"),
        n_head=get("n_head"),
        n_embd=get("n_embd"),
        n_inner=get("n_inner"),
        dropout=float(dropouts["resid_pdrop"]),
        bias=True,
        pos_encoding="learned",
        norm_placement="pre",
        activation=_ACTIVATIONS_FROM_HF[activation],
        layer_norm_eps=get("layer_norm_epsilon"),
        tie_weights=bool(get("tie_word_embeddings")),
        init_std=get("initializer_range"),
    )


def config_to_hf_gpt2(cfg: GPTConfig, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json dict for transformers' GPT2LMHeadModel. eos_token_id also serves as BOS, as in GPT-2."""
    _check_gpt2_shaped(cfg)
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": _ACTIVATIONS_TO_HF[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_weights,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }


def state_dict_from_hf_gpt2(hf_sd: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """gptlab state dict from a GPT2LMHeadModel (or GPT2Model: keys without "transformer.") state dict."""
    _check_gpt2_shaped(cfg)
    # GPT2Model checkpoints (e.g. the original gpt2 safetensors) name weights without the prefix
    source = {k if k.startswith(_PREFIX) or k == _HEAD else _PREFIX + k: v for k, v in hf_sd.items()}
    source = {k: v for k, v in source.items() if not k.endswith(_HF_BUFFER_SUFFIXES)}
    sd = _convert(source, cfg, "HF GPT-2", from_hf=True)
    if source:
        raise CheckpointError(f"HF GPT-2 state dict has unexpected key(s): {', '.join(sorted(source))}")
    return sd


def state_dict_to_hf_gpt2(sd: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """GPT2LMHeadModel state dict from a gptlab state dict; HF's transposed weights are new tensors, the rest shared."""
    _check_gpt2_shaped(cfg)
    source = dict(sd)
    hf_sd = _convert(source, cfg, "gptlab", from_hf=False)
    if source:
        raise CheckpointError(f"gptlab state dict has unexpected key(s): {', '.join(sorted(source))}")
    return hf_sd


def _convert(source: dict[str, Tensor], cfg: GPTConfig, origin: str, from_hf: bool) -> dict[str, Tensor]:
    """Move every table entry out of source into a new dict, transposing Conv1D weights; checks gptlab shapes."""
    dims = _dims(cfg)
    out: dict[str, Tensor] = {}
    for key, transposed, symbols in _key_table(cfg):
        if key not in source:
            raise CheckpointError(f"{origin} state dict has no {key!r}")
        tensor = source.pop(key)
        shape = tuple(dims[s] for s in symbols)
        gptlab_shape = tuple(tensor.shape[::-1]) if transposed and from_hf else tuple(tensor.shape)
        if gptlab_shape != shape:
            layout = "HF Conv1D (in, out) of " if transposed and from_hf else ""
            raise CheckpointError(f"{origin} {key} has shape {tuple(tensor.shape)}, config needs {layout}{shape}")
        out[key] = tensor.t().contiguous() if transposed else tensor
    wte = out[_PREFIX + "wte.weight"]
    head = source.pop(_HEAD, None)
    if cfg.tie_weights:
        # a tied checkpoint may store the head (as the same matrix) or leave it out
        if head is not None and not head.equal(wte):
            raise CheckpointError(f"{origin} {_HEAD} differs from transformer.wte.weight, but the config ties them")
        out[_HEAD] = wte
    else:
        if head is None:
            raise CheckpointError(f"{origin} state dict has no {_HEAD!r} (the config has untied embeddings)")
        if tuple(head.shape) != tuple(wte.shape):
            raise CheckpointError(f"{origin} {_HEAD} has shape {tuple(head.shape)}, config needs {tuple(wte.shape)}")
        out[_HEAD] = head
    return out


def _check_gpt2_shaped(cfg: GPTConfig) -> None:
    """HF's GPT-2 is pre-LN with learned positions and biases everywhere; other gptlab models have no GPT-2 form."""
    for field, required in (("bias", True), ("pos_encoding", "learned"), ("norm_placement", "pre")):
        value = getattr(cfg, field)
        if value != required:
            raise ConfigError(f"{field}={value!r} has no HF GPT-2 equivalent (GPT-2 needs {field}={required!r})")


def _key_table(cfg: GPTConfig) -> list[tuple[str, bool, tuple[str, ...]]]:
    """Every key both formats share (all but lm_head.weight): full name, HF-transposed, gptlab shape symbols."""
    keys = [(_PREFIX + name, transposed, shape) for name, transposed, shape in _TOP_PARAMS]
    for i in range(cfg.n_layer):
        keys += [(f"{_PREFIX}h.{i}.{name}", transposed, shape) for name, transposed, shape in _LAYER_PARAMS]
    return keys


def _dims(cfg: GPTConfig) -> dict[str, int]:
    C = cfg.n_embd
    return {"C": C, "3C": 3 * C, "F": cfg.mlp_dim, "V": cfg.vocab_size, "T": cfg.block_size}
