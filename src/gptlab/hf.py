"""Hugging Face interoperability: GPT-2 (GPT2LMHeadModel) and GPT-1 (OpenAIGPTLMHeadModel), both ways.

gptlab keeps OpenAI's parameter names, so the state dicts differ only in layout: HF
stores the four projection matrices as Conv1D weights, (in, out), where nn.Linear
stores (out, in), and HF's GPT-1 calls the embeddings tokens_embed/positions_embed.
The module reads top to bottom: config conversion, state-dict conversion (plain
dict and tensor code), HF model directories on disk, the hub, then `load_hf`,
`import_hf` and `export_hf`. It never imports transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors
from torch import Tensor

from gptlab.chat import CHAT_TOKENS, HF_CHAT_TEMPLATE, IM_END
from gptlab.checkpoint import load_checkpoint, write_checkpoint_dir
from gptlab.config import GPTConfig
from gptlab.errors import CheckpointError, ConfigError, GptlabError
from gptlab.fileio import staged_dir, unwritable_reason
from gptlab.hf_llama import (
    FAMILY,
    LLAMA,
    MISTRAL,
    QWEN3,
    check_llama_shaped,
    llama_config_from_hf,
    llama_config_to_hf,
    llama_state_dict_from_hf,
    llama_state_dict_to_hf,
    modern_model_type,
    uses_modern_options,
)
from gptlab.model import GPT, fixed_buffers, sinusoidal_positions
from gptlab.tokenizer import EOT, AnyTokenizer, load_hf_tokenizer

GPT2, GPT1 = "gpt2", "openai-gpt"  # HF model_type values

# HF activation names -> gptlab's. gelu_new and gelu_pytorch_tanh are the same function (GELU's
# tanh approximation, Hendrycks & Gimpel 2016), one written out in Python, one PyTorch's kernel.
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "relu2": "relu2"}
# HF's GPT-1 has its own table, in which "gelu" is the tanh approximation
_GPT1_ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
_GPT2_ACTIVATIONS_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "relu2": "relu2"}
_GPT1_ACTIVATIONS_OUT = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}

# Config defaults of each HF class, for fields a config.json leaves out
_DEFAULTS: dict[str, dict[str, Any]] = {
    GPT2: {
        "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
        "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": True,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    },
    GPT1: {
        "vocab_size": 40478, "n_positions": 512, "n_embd": 768, "n_layer": 12, "n_head": 12, "afn": "gelu",
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "tie_word_embeddings": True,
    },
}  # fmt: skip

# Parameters under transformer.h.{i}., the same in both HF classes and in gptlab: name, whether
# HF stores it transposed, and its gptlab shape in symbols that _dims resolves.
_LAYER_PARAMS = (
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
# Top-level parameters: HF name -> gptlab name, shape symbols
_TOP_PARAMS = {
    GPT2: (("wte.weight", "wte.weight", ("V", "C")), ("wpe.weight", "wpe.weight", ("T", "C")),
           ("ln_f.weight", "ln_f.weight", ("C",)), ("ln_f.bias", "ln_f.bias", ("C",))),
    GPT1: (("tokens_embed.weight", "wte.weight", ("V", "C")), ("positions_embed.weight", "wpe.weight", ("T", "C"))),
}  # fmt: skip
_PREFIX = "transformer."
_HEAD = "lm_head.weight"  # (V, C); in a tied model the same matrix as the token embedding
# Causal-mask buffers that some transformers versions save with the weights; gptlab has no such state
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# ----------------------------------------------------------------------------- configs


def _field(hf_config: Mapping[str, Any], model_type: str, name: str) -> Any:
    return hf_config.get(name, _DEFAULTS[model_type][name])


def _one_dropout(hf_config: Mapping[str, Any], model_type: str) -> float:
    dropouts = {name: _field(hf_config, model_type, name) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(dropouts.values())) > 1:
        listed = ", ".join(f"{k}={v!r}" for k, v in dropouts.items())
        raise ConfigError(f"HF config dropout fields differ ({listed}); gptlab uses one dropout rate")
    return float(dropouts["resid_pdrop"])


def model_type_of(hf_config: Mapping[str, Any]) -> str:
    """"gpt2", "openai-gpt", "llama", "qwen3" or "mistral"; ConfigError for any other architecture."""
    model_type = hf_config.get("model_type", GPT2)
    if model_type not in _DEFAULTS and model_type not in FAMILY:
        raise ConfigError(
            f"HF config model_type={model_type!r} is not supported; gptlab imports {GPT2!r} (GPT-2), {GPT1!r} (GPT-1), {LLAMA!r} (Llama), {QWEN3!r} (Qwen3) and {MISTRAL!r} (Mistral)"
        )
    if hf_config.get("add_cross_attention"):
        raise ConfigError("HF config field add_cross_attention=True is not supported (gptlab models are decoder-only)")
    return model_type


def config_from_hf(hf_config: Mapping[str, Any]) -> GPTConfig:
    """GPTConfig computing the same function as a GPT-2 or GPT-1 config.json; ConfigError names any field
    gptlab cannot honour."""
    model_type = model_type_of(hf_config)
    if model_type in FAMILY:
        return llama_config_from_hf(hf_config)

    def get(name: str) -> Any:
        return _field(hf_config, model_type, name)

    common = dict(
        vocab_size=get("vocab_size"),
        block_size=get("n_positions"),
        n_layer=get("n_layer"),
        n_head=get("n_head"),
        n_embd=get("n_embd"),
        dropout=_one_dropout(hf_config, model_type),
        bias=True,
        pos_encoding="learned",
        layer_norm_eps=get("layer_norm_epsilon"),
        tie_weights=bool(get("tie_word_embeddings")),
        init_std=get("initializer_range"),
    )
    if model_type == GPT1:
        # GPT-1 (Radford et al. 2018): post-LN, no final LayerNorm, MLP 4x wide, scores scaled by 1/sqrt(head_dim)
        afn = get("afn")
        if afn not in _GPT1_ACTIVATIONS:
            raise ConfigError(f"HF config field afn={afn!r} is not supported; use one of {', '.join(_GPT1_ACTIVATIONS)}")
        return GPTConfig(**common, norm_placement="post", activation=_GPT1_ACTIVATIONS[afn])

    activation = get("activation_function")
    if activation not in _GPT2_ACTIVATIONS:
        raise ConfigError(f"HF config field activation_function={activation!r} is not supported; use one of {', '.join(_GPT2_ACTIVATIONS)}")
    n_ctx = hf_config.get("n_ctx", get("n_positions"))
    if n_ctx != get("n_positions"):
        raise ConfigError(f"HF config fields n_ctx={n_ctx!r} and n_positions={get('n_positions')!r} differ; gptlab has one context length")
    return GPTConfig(
        **common,
        n_inner=get("n_inner"),
        norm_placement="pre",
        activation=_GPT2_ACTIVATIONS[activation],
        scale_attn_weights=bool(get("scale_attn_weights")),
        scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx")),
        upcast_attn=bool(get("reorder_and_upcast_attn")),
    )


def hf_model_type_for(cfg: GPTConfig) -> str:
    """The HF class that can hold a gptlab model: Llama for the modern options (RoPE, RMSNorm, gated MLPs, GQA),
    Qwen3 when they include QK-norm, else GPT-2 for pre-LN, GPT-1 for post-LN."""
    if uses_modern_options(cfg):
        return modern_model_type(cfg)
    return GPT2 if cfg.norm_placement == "pre" else GPT1


def config_to_hf(cfg: GPTConfig, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json dict for transformers' GPT2LMHeadModel (pre-LN) or OpenAIGPTLMHeadModel (post-LN).

    `cfg` must use learned positions and biases (see `hf_expressible`, which rewrites a model
    that does not). eos_token_id also serves as BOS, as in GPT-2. ConfigError names what HF cannot express.
    A model with the modern options gets LlamaForCausalLM's config, or Qwen3ForCausalLM's with QK-norm (hf_llama).
    """
    if hf_model_type_for(cfg) in FAMILY:
        return llama_config_to_hf(cfg, eos_token_id)
    _check_hf_shaped(cfg)
    common = {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }
    if hf_model_type_for(cfg) == GPT2:
        return {
            "model_type": GPT2,
            "architectures": ["GPT2LMHeadModel"],
            **common,
            "n_ctx": cfg.block_size,
            "n_inner": cfg.n_inner,
            "activation_function": _GPT2_ACTIVATIONS_OUT[cfg.activation],
            "scale_attn_weights": cfg.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": cfg.upcast_attn,
        }
    # GPT-1's HF class fixes what GPT-2's makes configurable
    fixed = (("n_inner", cfg.mlp_dim, 4 * cfg.n_embd), ("scale_attn_weights", cfg.scale_attn_weights, True),
             ("scale_attn_by_inverse_layer_idx", cfg.scale_attn_by_inverse_layer_idx, False))  # fmt: skip
    for name, value, required in fixed:
        if value != required:
            raise ConfigError(f"post-LN model with {name}={value!r}: HF's GPT-1 class only has {required!r}")
    if cfg.activation not in _GPT1_ACTIVATIONS_OUT:
        raise ConfigError(f"post-LN model with activation={cfg.activation!r}: HF's GPT-1 class has only {', '.join(_GPT1_ACTIVATIONS_OUT)}")
    return {"model_type": GPT1, "architectures": ["OpenAIGPTLMHeadModel"], **common, "afn": _GPT1_ACTIVATIONS_OUT[cfg.activation]}


def _check_hf_shaped(cfg: GPTConfig) -> None:
    for name, required in (("bias", True), ("pos_encoding", "learned")):
        if getattr(cfg, name) != required:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} has no HF GPT-2/GPT-1 equivalent (needs {name}={required!r}); see hf_expressible")


# ----------------------------------------------------------------------------- state dicts


def hf_expressible(sd: Mapping[str, Tensor], cfg: GPTConfig) -> tuple[dict[str, Tensor], GPTConfig]:
    """An equivalent state dict and config with learned positions and biases, which HF's classes need.

    Fixed sinusoids become the learned table's values, and missing biases become zeros:
    the model computes exactly the same function.
    """
    sd = dict(sd)
    if hf_model_type_for(cfg) in FAMILY:  # Llama's class holds RoPE, biases or none, explicit head widths: nothing to rewrite
        check_llama_shaped(cfg)
        return sd, cfg
    if cfg.pos_encoding == "sinusoidal":
        sd[_PREFIX + "wpe.weight"] = sinusoidal_positions(cfg.block_size, cfg.n_embd)
        cfg = cfg.replace(pos_encoding="learned")
    if not cfg.bias:
        names = [f"h.{i}.{name}" for i in range(cfg.n_layer) for name, _, _ in _LAYER_PARAMS if name.endswith(".bias")]
        names += ["ln_f.bias"] if cfg.norm_placement == "pre" else []
        for name in names:
            weight = sd[_PREFIX + name.removesuffix(".bias") + ".weight"]  # Linear (out, in) or LayerNorm (C,)
            sd[_PREFIX + name] = torch.zeros(weight.shape[0], dtype=weight.dtype)
        cfg = cfg.replace(bias=True)
    if cfg.head_size is not None:
        sd, cfg = _all_heads(sd, cfg)
    return sd, cfg


def _all_heads(sd: dict[str, Tensor], cfg: GPTConfig) -> tuple[dict[str, Tensor], GPTConfig]:
    """A model whose heads were pruned (n_head * head_size < n_embd) as one with n_embd // head_size heads,
    the missing ones all zeros: a head with zero query, key and value weights outputs zero vectors,
    and zero c_proj columns add nothing, so the function is the same."""
    hs, nh = cfg.head_dim, cfg.n_head
    full = cfg.n_embd // hs
    if cfg.n_embd % hs or full < nh:
        raise ConfigError(f"{nh} heads of width {hs} do not fit n_embd {cfg.n_embd} as whole heads: HF's GPT-2 classes cannot express this model")
    for i in range(cfg.n_layer):
        name = f"{_PREFIX}h.{i}.attn."
        for suffix in ("c_attn.weight", "c_attn.bias"):
            t = sd[name + suffix].view(3, nh * hs, -1)  # (3, nh * hs, C or 1): q, k and v
            sd[name + suffix] = torch.cat([t, t.new_zeros(3, (full - nh) * hs, t.size(2))], 1).reshape(3 * full * hs, -1).squeeze(-1)  # fmt: skip
        proj = sd[name + "c_proj.weight"]  # (C, nh * hs)
        sd[name + "c_proj.weight"] = torch.cat([proj, proj.new_zeros(proj.size(0), (full - nh) * hs)], 1)  # (C, full * hs)
    return sd, cfg.replace(n_head=full, head_size=None)


def state_dict_from_hf(hf_sd: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """gptlab state dict from a GPT2LMHeadModel/OpenAIGPTLMHeadModel state dict (or the base model's: keys
    without "transformer.", as the original OpenAI checkpoints on the hub), or a LlamaForCausalLM / Qwen3ForCausalLM one. `cfg` from `config_from_hf`."""
    if hf_model_type_for(cfg) in FAMILY:
        return llama_state_dict_from_hf(hf_sd, cfg)
    source = {k if k.startswith(_PREFIX) or k == _HEAD else _PREFIX + k: v for k, v in hf_sd.items()}
    source = {k: v for k, v in source.items() if not k.endswith(_HF_BUFFER_SUFFIXES)}
    sd = _convert(source, cfg, "HF", from_hf=True)
    if source:
        raise CheckpointError(f"HF state dict has unexpected key(s): {', '.join(sorted(source)[:5])}")
    return sd


def state_dict_to_hf(sd: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """HF state dict (GPT-2 for pre-LN, GPT-1 for post-LN) from a gptlab one; transposed weights are new
    tensors, the rest shared. A tied head is included as the same tensor as the token embedding. A model with
    the modern options gets LlamaForCausalLM's (or Qwen3ForCausalLM's) names."""
    if hf_model_type_for(cfg) in FAMILY:
        return llama_state_dict_to_hf(sd, cfg)
    source = dict(sd)
    hf_sd = _convert(source, cfg, "gptlab", from_hf=False)
    if source:
        raise CheckpointError(f"gptlab state dict has unexpected key(s): {', '.join(sorted(source)[:5])}")
    return hf_sd


def _convert(source: dict[str, Tensor], cfg: GPTConfig, origin: str, from_hf: bool) -> dict[str, Tensor]:
    """Move every table entry out of source into a new dict under the other side's names, transposing
    Conv1D weights; checks shapes against cfg."""
    _check_hf_shaped(cfg)
    dims = _dims(cfg)
    out: dict[str, Tensor] = {}
    for hf_key, key, transposed, symbols in _key_table(cfg):
        src_key, dst_key = (hf_key, key) if from_hf else (key, hf_key)
        if src_key not in source:
            raise CheckpointError(f"{origin} state dict has no {src_key!r}")
        tensor = source.pop(src_key)
        shape = tuple(dims[s] for s in symbols)
        gptlab_shape = tuple(tensor.shape[::-1]) if transposed and from_hf else tuple(tensor.shape)
        if gptlab_shape != shape:
            layout = "HF Conv1D (in, out) of " if transposed and from_hf else ""
            raise CheckpointError(f"{origin} {src_key} has shape {tuple(tensor.shape)}, config needs {layout}{shape}")
        out[dst_key] = tensor.t().contiguous() if transposed else tensor
    hf_wte, wte_key = _key_table(cfg)[0][:2]  # the token embedding, which a tied head shares
    wte_name, wte = (hf_wte, out[wte_key]) if from_hf else (wte_key, out[hf_wte])
    head = source.pop(_HEAD, None)
    if cfg.tie_weights:
        # a tied checkpoint may store the head (as the same matrix) or leave it out
        if head is not None and not head.equal(wte):
            raise CheckpointError(f"{origin} {_HEAD} differs from {wte_name}, but the config ties them")
        out[_HEAD] = wte
    else:
        if head is None:
            raise CheckpointError(f"{origin} state dict has no {_HEAD!r} (the config has untied embeddings)")
        if tuple(head.shape) != tuple(wte.shape):
            raise CheckpointError(f"{origin} {_HEAD} has shape {tuple(head.shape)}, config needs {tuple(wte.shape)}")
        out[_HEAD] = head
    return out


def _key_table(cfg: GPTConfig) -> list[tuple[str, str, bool, tuple[str, ...]]]:
    """(HF name, gptlab name, HF-transposed, gptlab shape symbols) for every key but lm_head.weight; token embedding first."""
    keys = [(_PREFIX + hf, _PREFIX + ours, False, shape) for hf, ours, shape in _TOP_PARAMS[hf_model_type_for(cfg)]]
    for i in range(cfg.n_layer):
        keys += [(f"{_PREFIX}h.{i}.{name}",) * 2 + (transposed, shape) for name, transposed, shape in _LAYER_PARAMS]
    return keys


def _dims(cfg: GPTConfig) -> dict[str, int]:
    C = cfg.n_embd
    return {"C": C, "3C": 3 * C, "F": cfg.mlp_dim, "V": cfg.vocab_size, "T": cfg.block_size}


# ----------------------------------------------------------------------------- HF directories


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _load_weight_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            return _load_safetensors(str(path))
        # weights_only: a .bin is a pickle, and this refuses any pickled code instead of running it
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot load weights ({first_line})") from None


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """State dict of a HF model directory: model.safetensors, else pytorch_model.bin (either may be
    sharded with an index.json)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return _load_weight_file(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index}: not a valid shard index ({err})") from None
            sd: dict[str, Tensor] = {}
            for shard in shards:
                if Path(shard).name != shard:
                    raise CheckpointError(f"{index}: shard {shard!r} is not a file name in {directory}")
                sd.update(_load_weight_file(directory / shard))
            return sd
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (sharded or not)")


# ----------------------------------------------------------------------------- the hub

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]
_HUB_SAFETENSORS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
_HUB_BIN = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]
_PROBE_TIMEOUT_S = 5.0


def _offline_message(name: str, reason: str) -> str:
    return (
        f"{name!r} is no local directory, and fetching it from the Hugging Face hub failed: {reason}. Download it where the hub is reachable "
        f"(e.g. `hf download {name} --local-dir DIR`) and pass that directory instead"
    )


def resolve_hf_source(src: str | os.PathLike[str], revision: str | None = None) -> Path:
    """Local directory for `src`: itself if it is one, else the hub model of that name (from the local
    HF cache, or downloaded). Offline, a hub name fails at once with a message saying what to do."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    name = str(src)
    if path.exists():
        raise CheckpointError(f"{name}: is a file; expected a Hugging Face model directory or a hub name such as 'gpt2'")
    if not _HUB_NAME.fullmatch(name) or ".." in name:
        raise CheckpointError(f"{name}: no such directory (and not a hub model name such as 'gpt2' or 'openai-community/gpt2')")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise CheckpointError(f"{name}: no such directory; fetching it from the hub needs huggingface_hub (pip install huggingface_hub)") from None

    def complete(d: Path) -> bool:
        return (d / "config.json").is_file() and any((d / w).is_file() for w in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))

    try:  # a copy in the local cache needs no network
        cached = Path(huggingface_hub.snapshot_download(name, revision=revision, local_files_only=True))
        if complete(cached):
            return cached
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is an OSError) or a malformed name
        pass
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(_offline_message(name, "offline mode (HF_HUB_OFFLINE) is on and it is not in the local cache"))
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:  # fail in seconds where the network is filtered, rather than wait out HTTP retries
        socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise CheckpointError(_offline_message(name, f"{host} is unreachable ({err})")) from None
    try:
        files = huggingface_hub.list_repo_files(name, revision=revision)
        has_safetensors = "model.safetensors" in files or "model.safetensors.index.json" in files
        weights = _HUB_SAFETENSORS if has_safetensors else _HUB_BIN  # not both: a repo often holds each format
        local = Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=_HUB_FILES + weights, etag_timeout=_PROBE_TIMEOUT_S))
    except Exception as err:  # the hub's HTTP client (requests, httpx, ...) and its errors change between versions
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot fetch {name!r} from the Hugging Face hub: {first_line}") from None
    if not complete(local):
        raise CheckpointError(f"hub model {name!r} has no config.json with safetensors or pytorch_model.bin weights")
    return local


# ----------------------------------------------------------------------------- import and export


@dataclass
class HFModel:
    """What `load_hf` returns."""

    model: GPT
    config: GPTConfig
    tokenizer: AnyTokenizer | None  # None when the directory has no tokenizer files
    model_type: str  # "gpt2", "openai-gpt", "llama", "qwen3" or "mistral"
    directory: Path


def load_hf(src: str | os.PathLike[str], device: str | torch.device = "cpu", revision: str | None = None) -> HFModel:
    """A gptlab GPT (and tokenizer) from a HF GPT-2/GPT-1 directory or hub name; see `resolve_hf_source`."""
    directory = resolve_hf_source(src, revision)
    hf_config = read_hf_config(directory)
    model_type = model_type_of(hf_config)
    cfg = config_from_hf(hf_config)
    sd = state_dict_from_hf(read_hf_weights(directory), cfg)
    with torch.device("meta"):  # no random initialisation that the loaded weights would overwrite
        model = GPT(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    if cfg.tie_weights:
        model.lm_head.weight = model.transformer.wte.weight  # assign replaced both; tie them again
    for name, buffer in fixed_buffers(cfg).items():  # computed from the config, so never in a state dict
        setattr(model, name, buffer)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "a tensor was not loaded"
    model.to(device).eval()
    has_tokenizer = (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()
    tokenizer = load_hf_tokenizer(directory) if has_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} embeddings")
    return HFModel(model, cfg, tokenizer, model_type, directory)


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an output that cannot be written before any download, load or conversion."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out}: directory exists and is not empty (use --force to replace it)")
    reason = unwritable_reason(out.parent)  # out itself appears by a rename from a sibling directory
    if reason is not None:
        raise CheckpointError(f"{out}: cannot be written ({reason})")


@contextlib.contextmanager
def writing(out: Path):
    """staged_dir(out), with a failed write (disk full, a filesystem that refuses renames) reported in one line."""
    try:
        with staged_dir(out) as tmp:
            yield tmp
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot write {out} ({getattr(err, 'strerror', None) or err}); nothing was written there") from None


def import_hf(src: str | os.PathLike[str], out: str | os.PathLike[str], revision: str | None = None, force: bool = False) -> HFModel:
    """Convert a HF GPT-2/GPT-1 model into a gptlab checkpoint directory at `out`; returns what it loaded."""
    out = Path(out)
    check_out_dir(out, force)  # before any download or conversion
    loaded = load_hf(src, revision=revision)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.directory}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); a checkpoint needs one")
    source = {"hf_source": str(src), "hf_model_type": loaded.model_type, "hf_revision": revision}
    with writing(out) as tmp:
        write_checkpoint_dir(tmp, 0, loaded.model, loaded.config, loaded.tokenizer, extra_meta={"source": source})
    return loaded


def export_hf(ckpt: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> Path:
    """Write a gptlab checkpoint (or run directory's latest) as a HF model directory that
    `AutoModelForCausalLM` and `AutoTokenizer` load with no custom code; returns it."""
    out = Path(out)
    check_out_dir(out, force)
    loaded = load_checkpoint(ckpt)
    with writing(out) as tmp:
        write_hf_model(tmp, loaded.model, loaded.model_config, loaded.tokenizer)
    return out


def write_hf_model(tmp: Path, model: torch.nn.Module, model_config: GPTConfig, tok: AnyTokenizer) -> None:
    """The files of a HF model directory (weights, config, generation config, tokenizer) into the empty directory `tmp`."""
    sd, cfg = hf_expressible(model.state_dict(), model_config)
    eot = tok.special_tokens.get(EOT)
    hf_config = config_to_hf(cfg, eos_token_id=eot) | {"torch_dtype": "float32"}
    hf_sd = state_dict_to_hf(sd, cfg)
    if cfg.tie_weights:
        del hf_sd[_HEAD]  # HF re-ties it on load; safetensors cannot store one tensor twice
    _save_safetensors({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
    chat = all(t in tok.special_tokens for t in CHAT_TOKENS)
    if chat:  # a chat model's turn ends at <|im_end|>: HF's generate stops there (and still at <|endoftext|>)
        generation["eos_token_id"] = [tok.special_tokens[IM_END]] + ([eot] if eot is not None else [])
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    try:
        tok.to_hf_files(tmp, model_max_length=cfg.block_size)
    except GptlabError as err:
        raise CheckpointError(f"cannot export the tokenizer: {err}") from None
    if chat:
        _add_chat_template(tmp / "tokenizer_config.json")


def _add_chat_template(config_path: Path) -> None:
    """Put gptlab's chat template in tokenizer_config.json, so `apply_chat_template` renders as gptlab does."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = HF_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
