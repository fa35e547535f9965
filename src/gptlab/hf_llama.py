"""Hugging Face Llama and Qwen3 formats <-> gptlab, for the modern architecture options (gptlab/hf.py dispatches here).

transformers' LlamaForCausalLM is RoPE (rotate-half pairs (i, i + d/2), as gptlab's), RMSNorm before
each sublayer and at the end, a gated MLP, grouped-query attention, optional biases on all attention
(attention_bias) and all MLP (mlp_bias) projections, tied or untied embeddings. gptlab keeps q, k, v in
one matrix (c_attn) and gate and up in another (c_fc); Llama stores them apart, so conversion splits
and concatenates rows; nothing is transposed (both store Linear weights as (out, in)).
RoPE's "linear", "llama3" (Llama 3.1 and 3.2 checkpoints) and "yarn" (Qwen3's long-context setting) frequency
scalings map to GPTConfig.rope_scaling. "dynamic" and "longrope" are refused: their frequencies change with the
sequence length, so keys already in a KV cache would have been rotated at other speeds than new ones.

Mistral's checkpoints are Llama's layer without biases; those whose sliding window covers the whole context
(or that have none, as Mistral 7B v0.3) import, and export as Llama.

A model with QK-norm goes to Qwen3ForCausalLM instead: Llama's layout plus an RMSNorm over each head's
queries and keys before RoPE (q_norm, k_norm: one (head_dim,) gain per layer, shared by the heads, as
gptlab's), with biases on the attention projections only and none in the MLP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gptlab.config import GPTConfig
from gptlab.errors import CheckpointError, ConfigError

LLAMA, QWEN3, MISTRAL = "llama", "qwen3", "mistral"
FAMILY = (LLAMA, QWEN3, MISTRAL)  # the HF model types this module converts (Mistral's is imported only: it is Llama's)
_CLASSES = {LLAMA: "LlamaForCausalLM", QWEN3: "Qwen3ForCausalLM"}

# gptlab activation -> HF's ACT2FN name, and back (gelu_pytorch_tanh and gelu_new are the same function)
_ACTIVATIONS_OUT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu", "relu2": "relu2"}
_ACTIVATIONS_IN = {**{v: k for k, v in _ACTIVATIONS_OUT.items()}, "gelu_new": "gelu_tanh", "swish": "silu"}


def uses_modern_options(cfg: GPTConfig) -> bool:
    """Whether `cfg` has any option beyond GPT-2/GPT-1 (RoPE, RMSNorm, a gated MLP, shared key/value heads, QK-norm)."""
    return cfg.pos_encoding == "rope" or cfg.norm == "rmsnorm" or cfg.mlp == "gated" or cfg.kv_heads != cfg.n_head or cfg.qk_norm


def modern_model_type(cfg: GPTConfig) -> str:
    """The HF model type for a modern-options model: Qwen3 when it normalises queries and keys, else Llama."""
    return QWEN3 if cfg.qk_norm else LLAMA


def check_llama_shaped(cfg: GPTConfig) -> None:
    """ConfigError naming the first option LlamaForCausalLM (or, with QK-norm, Qwen3ForCausalLM) cannot hold."""
    needs = (("pos_encoding", "rope"), ("norm", "rmsnorm"), ("mlp", "gated"), ("norm_placement", "pre"),
             ("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False))  # fmt: skip
    for name, required in needs:
        if getattr(cfg, name) != required:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: HF's Llama class needs {name}={required!r} (GPT-2 export needs none of the modern options)")
    if cfg.qk_norm and cfg.bias:
        raise ConfigError("qk_norm=True with bias=True: HF's Qwen3 class (Llama's with QK-norm) has no MLP biases; use bias=False")
    if cfg.activation not in _ACTIVATIONS_OUT:
        raise ConfigError(f"activation={cfg.activation!r} has no HF name; use one of {', '.join(_ACTIVATIONS_OUT)}")


def llama_config_to_hf(cfg: GPTConfig, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM (Qwen3ForCausalLM with QK-norm) computing what `cfg` computes."""
    check_llama_shaped(cfg)
    model_type = modern_model_type(cfg)
    scaling = _rope_scaling_to_hf(cfg)
    config = {
        "model_type": model_type,
        "architectures": [_CLASSES[model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": _ACTIVATIONS_OUT[cfg.activation],
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.layer_norm_eps,
        # transformers 5 reads rope_parameters; 4.x and other readers (vLLM, llama.cpp's converter) read rope_theta
        # and rope_scaling
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta), **scaling},
        "rope_theta": float(cfg.rope_theta),
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_weights,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }
    if scaling:
        config["rope_scaling"] = scaling
    if model_type == QWEN3:  # full attention in every layer; the MLP has no bias setting of its own
        del config["mlp_bias"]
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer, layer_types=["full_attention"] * cfg.n_layer)
    return config


def llama_config_from_hf(hf: Mapping[str, Any]) -> GPTConfig:
    """GPTConfig computing what a Llama or Qwen3 config.json computes; ConfigError names any field gptlab cannot honour."""
    qwen3 = hf.get("model_type") == QWEN3
    if any(t != "full_attention" for t in hf.get("layer_types") or ()):
        raise ConfigError("HF config has sliding-window layers (layer_types); gptlab attends to the whole context")
    if qwen3:
        if hf.get("use_sliding_window", False):
            raise ConfigError("HF config uses sliding-window attention (use_sliding_window); gptlab attends to the whole context")
        hf = {**hf, "mlp_bias": False}  # Qwen3's MLP never has biases
    if hf.get("model_type") == MISTRAL:  # Llama's layer, no biases, and attention to a window of the last positions
        window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
        if window is not None and window < context:
            raise ConfigError(f"HF config sliding_window={window} is shorter than the context ({context}); gptlab attends to the whole context")
        hf = {**hf, "attention_bias": False, "mlp_bias": False}
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5's field, else 4.x's
    if rope.get("rope_type", rope.get("type")) == "yarn":  # as transformers: a top-level field wins, then the context
        rope["original_max_position_embeddings"] = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048)
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(f"HF config rotates part of each head (partial_rotary_factor={partial}); gptlab's RoPE turns the whole head")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise ConfigError(f"HF config attention_bias={hf.get('attention_bias')!r} and mlp_bias={hf.get('mlp_bias')!r} differ; gptlab has one bias setting")
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS_IN:
        raise ConfigError(f"HF config field hidden_act={act!r} is not supported; use one of {', '.join(_ACTIVATIONS_IN)}")
    if hf.get("pretraining_tp", 1) != 1:
        raise ConfigError(f"HF config field pretraining_tp={hf.get('pretraining_tp')!r} is not supported (1 only)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    cfg = GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=n_embd,
        n_inner=hf["intermediate_size"],
        head_size=None if head_dim * n_head == n_embd else head_dim,
        n_kv_head=None if hf.get("num_key_value_heads", n_head) in (None, n_head) else hf["num_key_value_heads"],  # None: one per query head
        dropout=float(hf.get("attention_dropout", 0.0)),
        bias=bool(hf.get("attention_bias", False)),
        pos_encoding="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        **_rope_scaling_from_hf(rope, hf.get("max_position_embeddings", 2048)),
        norm="rmsnorm",
        mlp="gated",
        activation=_ACTIVATIONS_IN[act],
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_weights=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        qk_norm=qwen3,
    )
    default = cfg.replace(n_inner=None)
    return default if default.mlp_dim == cfg.n_inner else cfg  # the default width stays implicit, so configs round-trip


def _rope_scaling_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """HF's rope_type and its parameters for cfg.rope_scaling ({} when there is none)."""
    if cfg.rope_scaling == "none":
        return {}
    out: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": float(cfg.rope_factor)}
    if cfg.rope_scaling == "llama3":
        out.update(low_freq_factor=float(cfg.rope_low_freq_factor), high_freq_factor=float(cfg.rope_high_freq_factor),
                   original_max_position_embeddings=cfg.rope_original_context)  # fmt: skip
    if cfg.rope_scaling == "yarn":
        out.update(original_max_position_embeddings=cfg.rope_original_context, beta_fast=float(cfg.rope_beta_fast), beta_slow=float(cfg.rope_beta_slow))
        if cfg.rope_attention_factor is not None:
            out["attention_factor"] = float(cfg.rope_attention_factor)
        if not cfg.rope_truncate:  # written only when off: readers older than the key take the rounded bounds
            out["truncate"] = False
    return out


def _yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's attention-factor term for yarn: 0.1 mscale ln(factor) + 1, or 1 when the factor does not stretch."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_scaling_from_hf(rope: Mapping[str, Any], context: int) -> dict[str, Any]:
    """GPTConfig's rope_scaling fields for an HF rope_parameters / rope_scaling dict (`context`: the config's
    max_position_embeddings); ConfigError for other kinds."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": the name before transformers 4.45
    if rope_type == "default":
        return {}
    if rope_type not in ("linear", "llama3", "yarn"):
        raise ConfigError(
            f"HF config rope type {rope_type!r} is not supported; gptlab has 'default', 'linear', 'llama3' and 'yarn' "
            "(dynamic and longrope change the frequencies with the sequence length, which cached keys cannot follow)"
        )
    if rope_type == "yarn":
        return _yarn_from_hf(rope, context)
    if "factor" not in rope:
        raise ConfigError(f"HF config rope type {rope_type!r} has no 'factor'")
    fields = {"rope_scaling": rope_type, "rope_factor": float(rope["factor"])}
    if rope_type == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k not in rope]
        if missing:
            raise ConfigError(f"HF config rope type 'llama3' lacks {', '.join(missing)}")
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]), rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_context=int(rope["original_max_position_embeddings"]))  # fmt: skip
    return fields


def _yarn_from_hf(rope: Mapping[str, Any], context: int) -> dict[str, Any]:
    """GPTConfig's fields for HF's yarn parameters, read as transformers reads them: a missing factor is the context
    over the original one (DeepSeek's configs), missing or zero betas are 32 and 1, and without an attention_factor
    one comes from mscale / mscale_all_dim when both are set (else GPTConfig's default, 0.1 ln(factor) + 1)."""
    original = int(rope["original_max_position_embeddings"])
    factor = float(rope["factor"]) if rope.get("factor") is not None else context / original
    attention = rope.get("attention_factor")
    if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):
        attention = _yarn_mscale(factor, float(rope["mscale"])) / _yarn_mscale(factor, float(rope["mscale_all_dim"]))
    return {
        "rope_scaling": "yarn", "rope_factor": factor, "rope_original_context": original,
        "rope_beta_fast": float(rope.get("beta_fast") or 32.0), "rope_beta_slow": float(rope.get("beta_slow") or 1.0),
        "rope_attention_factor": None if attention is None else float(attention), "rope_truncate": bool(rope.get("truncate", True)),
    }  # fmt: skip


def _layer_names(i: int) -> tuple[str, str]:
    return f"model.layers.{i}.", f"transformer.h.{i}."


def llama_state_dict_to_hf(sd: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """LlamaForCausalLM (or Qwen3ForCausalLM) state dict from a gptlab one: q, k, v and gate, up split into their own matrices."""
    check_llama_shaped(cfg)
    source = dict(sd)
    out: dict[str, Tensor] = {"model.embed_tokens.weight": source.pop("transformer.wte.weight"), "model.norm.weight": source.pop("transformer.ln_f.weight")}
    q_rows, kv_rows, F = cfg.attn_dim, cfg.kv_dim, cfg.mlp_dim
    for i in range(cfg.n_layer):
        hf, ours = _layer_names(i)
        out[hf + "input_layernorm.weight"] = source.pop(ours + "ln_1.weight")
        out[hf + "post_attention_layernorm.weight"] = source.pop(ours + "ln_2.weight")
        if cfg.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = source.pop(ours + "attn.q_norm.weight")
            out[hf + "self_attn.k_norm.weight"] = source.pop(ours + "attn.k_norm.weight")
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = source.pop(ours + f"attn.c_attn.{suffix}").split([q_rows, kv_rows, kv_rows])
            out[hf + f"self_attn.q_proj.{suffix}"], out[hf + f"self_attn.k_proj.{suffix}"], out[hf + f"self_attn.v_proj.{suffix}"] = q, k, v
            out[hf + f"self_attn.o_proj.{suffix}"] = source.pop(ours + f"attn.c_proj.{suffix}")
            gate, up = source.pop(ours + f"mlp.c_fc.{suffix}").split([F, F])
            out[hf + f"mlp.gate_proj.{suffix}"], out[hf + f"mlp.up_proj.{suffix}"] = gate, up
            out[hf + f"mlp.down_proj.{suffix}"] = source.pop(ours + f"mlp.c_proj.{suffix}")
    out["lm_head.weight"] = source.pop("lm_head.weight")
    if source:
        raise CheckpointError(f"gptlab state dict has unexpected key(s): {', '.join(sorted(source)[:5])}")
    return out


def llama_state_dict_from_hf(hf_sd: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """gptlab state dict from a LlamaForCausalLM or Qwen3ForCausalLM one (`cfg` from llama_config_from_hf), shapes checked."""
    source = {k: v for k, v in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer some versions saved

    def take(name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in source:
            raise CheckpointError(f"HF state dict has no {name!r}")
        t = source.pop(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"HF {name} has shape {tuple(t.shape)}, config needs {shape}")
        return t

    C, V, F, q_rows, kv_rows = cfg.n_embd, cfg.vocab_size, cfg.mlp_dim, cfg.attn_dim, cfg.kv_dim
    wte = take("model.embed_tokens.weight", (V, C))
    out = {"transformer.wte.weight": wte, "transformer.ln_f.weight": take("model.norm.weight", (C,))}
    for i in range(cfg.n_layer):
        hf, ours = _layer_names(i)
        out[ours + "ln_1.weight"] = take(hf + "input_layernorm.weight", (C,))
        out[ours + "ln_2.weight"] = take(hf + "post_attention_layernorm.weight", (C,))
        if cfg.qk_norm:
            out[ours + "attn.q_norm.weight"] = take(hf + "self_attn.q_norm.weight", (cfg.head_dim,))
            out[ours + "attn.k_norm.weight"] = take(hf + "self_attn.k_norm.weight", (cfg.head_dim,))
        for suffix, cols in (("weight", (C,)), ("bias", ())) if cfg.bias else (("weight", (C,)),):
            q = take(hf + f"self_attn.q_proj.{suffix}", (q_rows, *cols))
            k = take(hf + f"self_attn.k_proj.{suffix}", (kv_rows, *cols))
            v = take(hf + f"self_attn.v_proj.{suffix}", (kv_rows, *cols))
            out[ours + f"attn.c_attn.{suffix}"] = torch.cat([q, k, v])
            out[ours + f"attn.c_proj.{suffix}"] = take(hf + f"self_attn.o_proj.{suffix}", (C, q_rows)[: 1 + len(cols)])
            gate, up = take(hf + f"mlp.gate_proj.{suffix}", (F, *cols)), take(hf + f"mlp.up_proj.{suffix}", (F, *cols))
            out[ours + f"mlp.c_fc.{suffix}"] = torch.cat([gate, up])
            out[ours + f"mlp.c_proj.{suffix}"] = take(hf + f"mlp.down_proj.{suffix}", (C, F)[: 1 + len(cols)])
    head = source.pop("lm_head.weight", None)
    if cfg.tie_weights:
        if head is not None and not head.equal(wte):
            raise CheckpointError("HF lm_head.weight differs from model.embed_tokens.weight, but the config ties them")
        out["lm_head.weight"] = wte
    else:
        if head is None:
            raise CheckpointError("HF state dict has no 'lm_head.weight' (the config has untied embeddings)")
        if tuple(head.shape) != (V, C):
            raise CheckpointError(f"HF lm_head.weight has shape {tuple(head.shape)}, config needs {(V, C)}")
        out["lm_head.weight"] = head
    if source:
        raise CheckpointError(f"HF state dict has unexpected key(s): {', '.join(sorted(source)[:5])}")
    return out
