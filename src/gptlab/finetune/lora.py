"""Low-rank adaptation (LoRA, Hu et al. 2021) of a gptlab GPT, with QLoRA's quantized base and PEFT's files.

LoRA freezes the pretrained weight W (out, in) of chosen Linear layers and learns an update
of rank r: h = W x + (alpha / r) B A x, with A (r, in) and B (out, r) (Hu et al. 2021, eq. 3 and
section 4.1). Only A and B train, so gradients and optimizer state shrink from out*in to
r*(in + out) per layer, and an adapter file holds megabytes where the model holds gigabytes.
B starts at zero, so the adapted model computes exactly the base model's function at step 0;
A starts as PEFT's default does (kaiming-uniform with a = sqrt(5), nn.Linear's own init).
Dividing by r keeps the update's scale steady when r changes, so alpha need not be retuned.
After training, `merge_lora` folds (alpha / r) B A into W: the result is a plain GPT with no
inference cost.

QLoRA (Dettmers et al. 2023) stores the frozen W in 4-bit NormalFloat (see
gptlab.finetune.quant); gradients flow through the dequantized W into the adapters, which
stay float32. Only the targeted Linear layers are quantized: the embeddings (the tied head
included) and LayerNorms stay as they are.

The adapters are composed into the model rather than built into it: `apply_lora` replaces
each targeted nn.Linear by a LoRALinear holding the original layer as `base`, so parameter
names become `transformer.h.0.attn.c_attn.base.weight`, `...c_attn.lora_A.weight` and
`...c_attn.lora_B.weight`, and model.py knows nothing about LoRA.

Targets name Linear modules by the end of their dotted name: a target matches a module when
it equals the module's name or its last components, so "c_proj" matches both
`transformer.h.0.attn.c_proj` and `transformer.h.0.mlp.c_proj`, "attn.c_proj" only the first
kind, "h.0.attn.c_attn" one layer's. This is PEFT's rule for a list of target_modules.
`lm_head` is matched only by "lm_head" itself.

PEFT interoperability (checked against peft 0.21 on HF's GPT2LMHeadModel): PEFT names an
adapter tensor "base_model.model." + the HF module path + ".lora_A.weight" / ".lora_B.weight",
and HF's GPT-2 and GPT-1 module paths are gptlab's. Although HF's c_attn, c_proj and c_fc are
Conv1D layers storing W as (in, out), PEFT's lora_A and lora_B are nn.Linear layers in
nn.Linear's layout, A (r, in) and B (out, r), for them too (fan_in_fan_out only transposes the
base weight when PEFT merges). So an adapter converts by renaming alone, no transpose.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors
from torch import Tensor, nn

from gptlab.config import _in_range, _positive_int, _Serializable
from gptlab.errors import CheckpointError, ConfigError, InputError
from gptlab.fileio import staged_dir
from gptlab.finetune.quant import BITS, QuantizedEmbedding, QuantizedLinear, check_quant_args, quantize_embedding, quantize_linear
from gptlab.hf import check_out_dir
from gptlab.model import GPT

# every matmul of a block: Hu et al. adapt only W_q and W_v, but QLoRA (section 4) finds that
# adapters on all of a block's Linear layers are needed to match full fine-tuning
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")
HEAD = "lm_head"
_TARGET = re.compile(r"\w+(\.\w+)*")  # a dotted module name or suffix of one

# PEFT's file layout
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Module kinds gptlab can adapt: the last component of a Linear's name in GPT (and HF's GPT-2/GPT-1)
GPTLAB_LINEARS = ("c_attn", "c_proj", "c_fc", HEAD)
_PEFT_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")
# adapter_config.json fields whose non-default values change what the adapter computes in ways
# gptlab does not implement (DoRA: Liu et al. 2024; rsLoRA scales by alpha/sqrt(r): Kalajdzievski 2023)
_UNSUPPORTED_FLAGS = ("use_dora", "use_rslora", "lora_bias", "use_qalora")
_UNSUPPORTED_SETTINGS = ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LoRAConfig(_Serializable):
    """Which Linear layers get adapters, their rank and scale, and how the frozen base is stored.

    The update is (alpha / r) B A. dropout acts on the adapter's input only (Hu et al. 2021,
    as PEFT's lora_dropout). base_bits None keeps the frozen base as it is; 4 stores the
    targeted layers' weights in NF4 (QLoRA), 8 in block-wise int8, each with one float32
    absmax per block_size weights (see gptlab.finetune.quant).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # see the module docstring for the matching rule
    base_bits: int | None = None
    block_size: int = 64  # QLoRA's block size for the weights (Dettmers et al. 2023, section 3)

    def __post_init__(self) -> None:
        _positive_int(self, "r")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        _in_range(self, "dropout", 0.0, 1.0, hi_open=True)
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and _TARGET.fullmatch(t) for t in self.targets):
            raise ConfigError(f"targets must be a non-empty list of module names such as 'c_attn' or 'attn.c_proj', got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))  # a JSON list becomes a tuple
        check_quant_args(4, self.block_size)  # names block_size if it is not a positive even integer
        bits = self.base_bits
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS):
            raise ConfigError(f"base_bits must be none, 4 (NF4) or 8 (int8), got {bits!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def matches(name: str, target: str) -> bool:
    """Whether module `name` is matched by `target`: equal to it, or ending in "." + target."""
    return name == target or name.endswith("." + target)


# ----------------------------------------------------------------------------- the adapter layer


class LoRALinear(nn.Module):
    """A frozen Linear layer (full precision or QuantizedLinear) plus a trainable rank-r update.

    forward(x) = base(x) + scaling * lora_B(lora_A(dropout(x))), scaling = alpha / r. The
    adapters are float32 whatever the base's dtype, as PEFT keeps them, so their small
    updates are not lost to bf16 rounding; under autocast their matmuls run in its dtype.
    """

    def __init__(
        self,
        base: nn.Linear | QuantizedLinear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        device = base.weight.device if isinstance(base, nn.Linear) else base.qweight.device  # a quantized .weight would dequantize
        # built and initialised on the CPU, where `generator` lives, then moved: the same seed gives
        # the same adapters on every device
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)  # U(-1/sqrt(in), 1/sqrt(in))
            nn.init.zeros_(self.lora_B.weight)  # the update B A starts at 0: the base model's function exactly
        self.lora_A.to(device)
        self.lora_B.to(device)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The base weight (out, in): the frozen parameter itself, or a dequantized copy of a quantized one."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta_weight(self) -> Tensor:
        """scaling * B A, (out, in) float32: the update the adapters add to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def merged(self) -> nn.Linear:
        """A frozen plain nn.Linear computing W + scaling * B A (W dequantized if the base is quantized)."""
        quantized = isinstance(self.base, QuantizedLinear)
        dtype = torch.float32 if quantized else self.base.weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device=self.lora_A.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight.float() + self.delta_weight())
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


# ----------------------------------------------------------------------------- applying, merging, state


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def apply_lora(model: GPT, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze every parameter of `model` and wrap each targeted nn.Linear in a LoRALinear, in place.

    Returns the wrapped modules' names in module order; their A matrices are drawn in that
    order from a generator seeded with `seed`. With cfg.base_bits, each wrapped base is
    quantized first. A target that matches no Linear is a ConfigError, raised before the
    model is changed.
    """
    if _lora_modules(model):
        raise InputError("the model already has LoRA adapters; merge_lora it first to adapt it again")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in cfg.targets:
        if not any(matches(name, target) for name in linears):
            kinds = ", ".join(sorted({name.rpartition(".")[2] for name in linears}))
            raise ConfigError(f"targets: {target!r} matches no Linear module; the model's Linear modules end in {kinds}")
    chosen = [name for name in linears if any(matches(name, t) for t in cfg.targets)]
    if HEAD in chosen and model.config.tie_weights:
        # an adapted (or merged) head would no longer equal the token embedding it is tied to
        raise ConfigError(f"targets: {HEAD!r} is tied to the token embedding (tie_weights=True); adapt it only in an untied model")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in chosen:
        linear = model.get_submodule(name)
        base = quantize_linear(linear, cfg.base_bits, cfg.block_size) if cfg.base_bits is not None else linear
        _replace(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, generator))
    if cfg.base_bits is not None:
        _quantize_tables(model, cfg, HEAD in chosen)
    return chosen


def _quantize_tables(model: GPT, cfg: LoRAConfig, head_adapted: bool) -> None:
    """Quantize the frozen token table too (and the output head: tied, it is the same matrix), so the
    whole frozen base but LayerNorms, biases and the small position table is held in base_bits.
    In GPT-2 small the table is a third of the weights: left in float32 it would keep the base at ~40%."""
    wte = model.transformer.wte
    model.transformer.wte = quantize_embedding(wte, cfg.base_bits, cfg.block_size)
    if model.config.tie_weights:
        model.lm_head = model.transformer.wte.table  # one quantized matrix for the lookup and the head, as before
    elif not head_adapted:
        model.lm_head = quantize_linear(model.lm_head, cfg.base_bits, cfg.block_size)


def _dequantize_tables(model: nn.Module) -> None:
    """Undo _quantize_tables: a float token table (tied to the head again when it was) and head."""
    transformer = getattr(model, "transformer", None)
    if transformer is None or not isinstance(transformer.wte, QuantizedEmbedding):
        return
    table = transformer.wte.table
    transformer.wte = nn.Embedding(table.out_features, table.in_features, device=table.qweight.device).requires_grad_(False)
    with torch.no_grad():
        transformer.wte.weight.copy_(table.dequantized())
    if model.lm_head is table:
        model.lm_head = nn.Linear(table.in_features, table.out_features, bias=False, device=table.qweight.device).requires_grad_(False)
        model.lm_head.weight = transformer.wte.weight
    elif isinstance(model.lm_head, QuantizedLinear):
        model.lm_head = _plain_linear(model.lm_head)


def _plain_linear(q: QuantizedLinear) -> nn.Linear:
    """A frozen nn.Linear with a QuantizedLinear's dequantized weight and its bias."""
    plain = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.device)
    with torch.no_grad():
        plain.weight.copy_(q.dequantized(torch.float32))
        if q.bias is not None:
            plain.bias.copy_(q.bias)
    return plain.requires_grad_(False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a frozen nn.Linear holding W + (alpha / r) B A, in place; returns `model`.

    A quantized base is dequantized into a float32 weight. The merged model has GPT's own
    parameter names again, so it saves, exports and loads as a plain checkpoint. Everything
    stays frozen: model.requires_grad_(True) makes it fully trainable again.
    """
    for name, module in _lora_modules(model):
        _replace(model, name, module.merged())
    _dequantize_tables(model)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only, under gptlab names: {"transformer.h.0.attn.c_attn.lora_A.weight": (r, in), "...lora_B.weight": (out, r), ...}."""
    sd: dict[str, Tensor] = {}
    for name, module in _lora_modules(model):
        sd[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        sd[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return sd


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_lora_state_dict(model: nn.Module, sd: Mapping[str, Tensor]) -> None:
    """Copy adapter tensors (as `lora_state_dict` names them) into a model wrapped by `apply_lora`.

    The keys must be exactly the model's adapter keys and every shape must match; otherwise
    CheckpointError says what differs and nothing is copied.
    """
    own = lora_state_dict(model)
    if not own:
        raise InputError("the model has no LoRA adapters to load into; apply_lora it first")
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        parts = ([f"missing {len(missing)} key(s): {_first(missing)}"] if missing else []) + (
            [f"unexpected {len(unexpected)} key(s): {_first(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(f"LoRA state dict does not fit the model's adapters: {'; '.join(parts)}")
    for key, tensor in own.items():
        if tuple(sd[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"LoRA tensor {key} has shape {tuple(sd[key].shape)}, the model's adapter is {tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(sd[key])


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once; quantized buffers are not parameters."""
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- PEFT adapter directories


def _check_against_model(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, LoRALinear]]:
    """The model's adapters, after checking that cfg describes them (PEFT re-creates them from cfg alone)."""
    modules = _lora_modules(model)
    if not modules:
        raise InputError("the model has no LoRA adapters to write; apply_lora it first")
    for name, module in modules:
        if module.r != cfg.r or not math.isclose(module.scaling, cfg.scaling):
            raise ConfigError(f"{name} has r={module.r}, scaling={module.scaling:g} but the config r={cfg.r}, alpha/r={cfg.scaling:g}")
    wrapped = {name for name, _ in modules}
    inside = {f"{name}.{child}" for name, module in modules for child, _ in module.named_modules() if child}  # base, lora_A, lora_B
    linears = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and name not in inside}
    matched = {name for name in linears if any(matches(name, t) for t in cfg.targets)}
    if matched != wrapped:
        differ = sorted(matched ^ wrapped)
        raise ConfigError(f"targets {list(cfg.targets)} do not select exactly the model's adapted modules (they differ on {_first(differ)})")
    return modules


def write_peft_adapter(
    model: nn.Module, cfg: LoRAConfig, out_dir: str | os.PathLike[str], base_name_or_path: str, force: bool = False
) -> Path:
    """Write the model's adapters as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)` then
    computes what the gptlab model computes, `base` being the HF export of its base weights
    (gptlab.hf.export_hf). A QLoRA adapter is written the same way; PEFT applies it to the
    base it is given. The directory appears whole or not at all; returns it.
    """
    out = Path(out_dir)
    _check_against_model(model, cfg)
    check_out_dir(out, force)
    try:
        with staged_dir(out) as tmp:
            write_peft_files(tmp, model, cfg, base_name_or_path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot write {out} ({getattr(err, 'strerror', None) or err}); nothing was written there") from None
    return out


def write_peft_files(directory: Path, model: nn.Module, cfg: LoRAConfig, base_name_or_path: str) -> None:
    """adapter_config.json and adapter_model.safetensors of the model's adapters, into `directory`."""
    from gptlab.hf_llama import uses_modern_options

    config = getattr(model, "config", None)
    if config is not None and uses_modern_options(config):
        raise ConfigError("PEFT adapter files are written for GPT-2/GPT-1 bases; for a model with the modern options (RoPE, RMSNorm, "
                          "gated MLP, GQA) merge the adapters into the weights and export-hf the merged checkpoint (Llama format)")  # fmt: skip
    modules = _check_against_model(model, cfg)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets),
        "fan_in_fan_out": True,  # HF's GPT-2 and GPT-1 store these layers as Conv1D, (in, out)
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, module in modules:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().float().cpu().contiguous()
    _save_safetensors(tensors, str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / PEFT_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a PEFT adapter directory (no {PEFT_CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _gptlab_module(peft_module: str) -> str:
    """gptlab's name for the module of a PEFT key (after its prefix), or ConfigError if GPT has no such Linear."""
    # an adapter made on GPT2Model (no LM head) names modules without "transformer.", as hf.py accepts
    name = peft_module if peft_module.startswith("transformer.") or peft_module == HEAD else "transformer." + peft_module
    if name != HEAD and not re.fullmatch(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", name):
        raise ConfigError(f"PEFT adapter targets module {peft_module!r}, which a gptlab GPT does not have (it adapts {', '.join(GPTLAB_LINEARS)})")
    return name


def read_peft_adapter(adapter_dir: str | os.PathLike[str]) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """A PEFT LoRA adapter for HF GPT-2/GPT-1 as (LoRAConfig, adapter tensors under gptlab names).

    Use them with `apply_lora(model, cfg)` and `load_lora_state_dict(model, tensors)`, the model
    being the adapter's base (e.g. gptlab.hf.load_hf(base).model). targets are PEFT's
    target_modules list, sorted; a regular-expression target_modules, layers_to_transform or
    exclude_modules become the exact module names the file holds. Settings gptlab does not
    implement (DoRA, rsLoRA, trained biases, per-module ranks, extra saved modules) are a
    ConfigError naming the field; a missing or malformed file a CheckpointError.
    """
    directory = Path(adapter_dir)
    config = _read_adapter_config(directory)
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{directory}: peft_type={config.get('peft_type')!r}; gptlab reads LORA adapters only")
    for field in _UNSUPPORTED_FLAGS:
        if config.get(field):
            raise ConfigError(f"{directory}: PEFT adapter uses {field}={config[field]!r}, which gptlab does not support")
    for field in _UNSUPPORTED_SETTINGS:
        if config.get(field):
            raise ConfigError(f"{directory}: PEFT adapter sets {field}={config[field]!r}, which gptlab does not support")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{directory}: PEFT adapter trains biases (bias={config['bias']!r}); gptlab supports bias='none' only")

    try:
        scalars = LoRAConfig(r=config.get("r", 8), alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0))
    except ConfigError as err:
        raise ConfigError(f"{directory}: {err}") from None

    path = directory / PEFT_WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {PEFT_WEIGHTS_FILE}")
    try:
        peft_sd = _load_safetensors(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot load weights ({err})") from None

    r = scalars.r
    tensors: dict[str, Tensor] = {}
    modules: set[str] = set()
    for key, tensor in peft_sd.items():
        found = _PEFT_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
        if found is None:
            raise ConfigError(f"{path}: tensor {key!r} is not a LoRA A or B matrix; gptlab supports plain LoRA adapters only")
        module = _gptlab_module(found["module"])
        rank_dim = 0 if found["part"] == "lora_A" else 1  # A (r, in), B (out, r)
        if tensor.dim() != 2 or tensor.shape[rank_dim] != r:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected rank r={r} in dimension {rank_dim}")
        tensors[f"{module}.{found['part']}.weight"] = tensor.float()
        modules.add(module)
    if not tensors:
        raise CheckpointError(f"{path}: holds no LoRA tensors")

    target_modules = config.get("target_modules")
    exact = isinstance(target_modules, str) or config.get("layers_to_transform") is not None or config.get("exclude_modules")
    if exact:  # the file's modules are the ones adapted, whatever pattern chose them
        targets = tuple(sorted(modules))
    else:
        if not isinstance(target_modules, list) or not target_modules:
            raise ConfigError(f"{directory}: target_modules must be a list of module names or a pattern, got {target_modules!r}")
        for target in target_modules:
            if not isinstance(target, str) or target.rpartition(".")[2] not in GPTLAB_LINEARS:
                raise ConfigError(f"{directory}: target_modules entry {target!r} names no module a gptlab GPT has (it adapts {', '.join(GPTLAB_LINEARS)})")
        targets = tuple(sorted(target_modules))  # a set in PEFT, written in hash order
    return scalars.replace(targets=targets), tensors


# ----------------------------------------------------------------------------- adapter checkpoints

# A LoRA run's checkpoint holds the adapter, not the model: checkpoint.json's "lora" entry says
# how to rebuild it from the base checkpoint (whose weights' sha256 it records), and
# model.safetensors holds the lora_A / lora_B tensors plus the rows of tokens added to the base
# (the chat tokens, at the mean embedding: they stay frozen like the rest of the base).
ADDED_WTE = "added_tokens.wte"
ADDED_HEAD = "added_tokens.lm_head"


def adapter_meta(cfg: LoRAConfig, base_dir: Path, base_meta: Mapping[str, Any], base_vocab: int, added: Mapping[str, int]) -> dict[str, Any]:
    """checkpoint.json's "lora" entry for a run adapting the checkpoint `base_dir` (with `added` tokens after its `base_vocab` ids)."""
    return {
        "config": cfg.to_dict(),
        "base": {"path": str(Path(base_dir).resolve()), "step": base_meta.get("step"), "sha256": base_meta.get("files", {}).get("model.safetensors")},
        "base_vocab": base_vocab,
        "added_tokens": dict(added),
    }


def adapter_tensors(model: GPT, lora_meta: Mapping[str, Any]) -> dict[str, Tensor]:
    """What an adapter checkpoint stores: the LoRA tensors and the added tokens' rows."""
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    ids = sorted(lora_meta["added_tokens"].values())
    if ids:
        tensors[ADDED_WTE] = model.transformer.wte.weight.detach()[ids].clone()
        if not model.config.tie_weights:
            tensors[ADDED_HEAD] = model.lm_head.weight.detach()[ids].clone()
    return tensors


def load_adapter_checkpoint(path: Path, lora_meta: Mapping[str, Any], model_config: Any, device: str | torch.device) -> GPT:
    """Rebuild an adapter checkpoint's model: its base, grown by the added tokens, wrapped by LoRA, with the stored tensors."""
    from gptlab.checkpoint import load_checkpoint, read_checkpoint_meta  # this module is imported on use by gptlab.checkpoint
    from gptlab.model import with_new_tokens

    base = lora_meta["base"]
    base_dir = Path(base["path"])
    if not (base_dir / "checkpoint.json").is_file():
        raise CheckpointError(f"{path.parent}: a LoRA adapter on the base checkpoint {base_dir}, which is not there (moved or deleted?)")
    recorded = read_checkpoint_meta(base_dir).get("files", {}).get("model.safetensors")
    if base.get("sha256") is not None and recorded != base["sha256"]:
        raise CheckpointError(f"{path.parent}: its base {base_dir} has changed since the adapter was trained (weights' sha256 differs)")
    model = load_checkpoint(base_dir, device=device).model
    ids = sorted(lora_meta["added_tokens"].values())
    model = with_new_tokens(model, ids, known=int(lora_meta["base_vocab"]))
    if model.config != model_config:
        raise CheckpointError(f"{path.parent}: the base {base_dir} grown by the added tokens does not give the recorded model config")
    try:
        tensors = _load_safetensors(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot load adapter weights ({err})") from None
    added = {k: tensors.pop(k) for k in (ADDED_WTE, ADDED_HEAD) if k in tensors}
    with torch.no_grad():
        if ADDED_WTE in added:
            model.transformer.wte.weight[ids] = added[ADDED_WTE]
        if ADDED_HEAD in added:
            model.lm_head.weight[ids] = added[ADDED_HEAD]
    apply_lora(model, LoRAConfig.from_dict(lora_meta["config"]))
    load_lora_state_dict(model, tensors)
    return model.to(device)


def strip_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its frozen base as a plain nn.Linear (a quantized one dequantized), in place: the base model."""
    for name, module in _lora_modules(model):
        _replace(model, name, _plain_linear(module.base) if isinstance(module.base, QuantizedLinear) else module.base)
    _dequantize_tables(model)
    return model


BASE_SUBDIR = "base"


def export_adapter_hf(ckpt: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> Path:
    """Write a LoRA run's checkpoint for Hugging Face: OUT is a PEFT adapter directory (with the tokenizer files), OUT/base the base model.

    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/base), OUT)` computes what
    gptlab's adapter model computes. The base is the one the run adapted, with the added chat
    tokens' rows (and a QLoRA base dequantized, as the adapters were trained against it).
    """
    import copy
    import shutil

    from gptlab.checkpoint import LORA_KEY, load_checkpoint
    from gptlab.hf import write_hf_model, writing

    out = Path(out)
    check_out_dir(out, force)
    loaded = load_checkpoint(ckpt, merge_lora=False)
    if LORA_KEY not in loaded.meta:
        raise CheckpointError(f"{loaded.path} is not a LoRA checkpoint; gptlab.hf.export_hf writes it")
    cfg = LoRAConfig.from_dict(loaded.meta[LORA_KEY]["config"])
    base = strip_lora(copy.deepcopy(loaded.model))
    with writing(out) as tmp:
        (tmp / BASE_SUBDIR).mkdir()
        write_hf_model(tmp / BASE_SUBDIR, base, loaded.model_config, loaded.tokenizer)
        write_peft_files(tmp, loaded.model, cfg, str((out / BASE_SUBDIR).resolve()))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
            if (tmp / BASE_SUBDIR / name).is_file():  # AutoTokenizer.from_pretrained(OUT) works too
                shutil.copyfile(tmp / BASE_SUBDIR / name, tmp / name)
    return out


def merge_lora_checkpoint(ckpt: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> Path:
    """Write a LoRA run's checkpoint with the adapters folded into the weights as a plain, self-contained checkpoint directory."""
    from gptlab.checkpoint import LORA_KEY, load_checkpoint, write_checkpoint_dir
    from gptlab.hf import writing

    out = Path(out)
    check_out_dir(out, force)
    loaded = load_checkpoint(ckpt)  # merges
    if LORA_KEY not in loaded.meta:
        raise CheckpointError(f"{loaded.path} is not a LoRA checkpoint (no adapters to merge)")
    source = {"merged_from": str(loaded.path.resolve()), "lora": loaded.meta[LORA_KEY]}
    with writing(out) as tmp:
        write_checkpoint_dir(tmp, loaded.step, loaded.model, loaded.model_config, loaded.tokenizer, metrics=loaded.meta.get("metrics"), extra_meta={"source": source})
    return out


def import_peft_adapter(adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Turn a PEFT LoRA adapter for GPT-2/GPT-1 into a gptlab adapter checkpoint at `out`; returns it.

    The base is the gptlab checkpoint `base`, or else the adapter's base_model_name_or_path
    (a local HF directory, or a hub name when online) imported into out/base. The adapter
    checkpoint then loads, samples, chats, merges and fine-tunes further like one gptlab trained.
    """
    from gptlab.checkpoint import load_checkpoint, read_checkpoint_meta, write_checkpoint_dir
    from gptlab.hf import import_hf, writing

    directory, out = Path(adapter_dir), Path(out)
    check_out_dir(out, force)
    cfg, tensors = read_peft_adapter(directory)  # before any import: a bad adapter fails fast
    with writing(out) as tmp:
        if base is None:
            source = _read_adapter_config(directory).get("base_model_name_or_path")
            if not isinstance(source, str) or not source:
                raise CheckpointError(f"{directory}: adapter_config.json names no base_model_name_or_path; pass the base checkpoint (--base)")
            import_hf(source, tmp / BASE_SUBDIR)
            base_dir = out / BASE_SUBDIR  # where it will be once `out` is in place
        else:
            base_dir = Path(base)
        loaded = load_checkpoint(tmp / BASE_SUBDIR if base is None else base_dir)
        apply_lora(loaded.model, cfg)
        load_lora_state_dict(loaded.model, tensors)
        meta = adapter_meta(cfg, loaded.path if base is not None else base_dir, read_checkpoint_meta(loaded.path), loaded.tokenizer.vocab_size, {})
        source_meta = {"peft_adapter": str(directory.resolve())}
        write_checkpoint_dir(tmp, 0, loaded.model, loaded.model_config, loaded.tokenizer, extra_meta={"lora": meta, "source": source_meta})
    return out
