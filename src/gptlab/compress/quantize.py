"""Weight-only quantization for decoding: int8 per output channel, int4 in groups along the input.

At small batch a decode step reads every weight once, so its speed is the memory bandwidth
over the bytes of the weights (about 20 GB/s on the 2-core machines here: GPT-2 124M in
float32 is ~500 MB a token, a ceiling of ~40 tokens/s). Fewer bytes a weight is the only way
past that ceiling. Activations stay in floating point (float32 or bfloat16); the Linear
weights, and the token table when the head is tied to it, are stored in 8 or 4 bits, and the
matmul kernels read them packed, dequantizing inside the product rather than rebuilding the
whole matrix each step.

Schemes, for a Linear weight W of shape (N outputs, K inputs):

- int8, symmetric per output channel (row): s_n = max_k |W[n, k]| / 127, q = round(W / s) in
  [-127, 127], W ~ q * s. Each weight is off by at most s_n / 2. One byte a weight plus four
  a row. Symmetric because a row's weights centre on 0, and it keeps 0 exact.
- int4, asymmetric per group of G consecutive inputs of a row (G in 32, 64, 128, 256, dividing
  K): lo, hi = the group's min and max, s = (hi - lo) / 15, q = round((W - lo) / s) in [0, 15],
  W ~ q * s + lo. Off by at most s / 2. Asymmetric (a scale and a zero point a group), as
  gpt-fast's and torchao's int4 weight-only schemes: with 16 levels, a symmetric code spends
  levels on the side of 0 a skewed group does not reach. Half a byte a weight plus eight bytes
  a group: 0.5625 bytes a weight at G = 128.

Stored form, in model.safetensors (portable: the kernels' own layouts are built when the model
is first run, so a file depends neither on the PyTorch version nor on the CPU):

    <linear>.qweight   int8 (N, K)  |  uint8 (N, K/2), two codes a byte, the even column in the low nibble
    <linear>.scales    float32 (N,) |  float32 (N, K/G)
    <linear>.zeros                  |  float32 (N, K/G), each group's lo
    <linear>.bias      as it was

checkpoint.json's "quantization" entry holds the QuantConfig. Kernels (`QuantLinear.kernel`):
"native" is gptlab's own (kernels/decode.cpp, gemv_quant): it reads the stored codes as they are,
one row front to back (int8 widened to float32 against float32 activations; int4 through the CPU's
bfloat16 dot product where it has one, on activations rounded to bfloat16). "packed" on CPU is
torch._weight_int8pack_mm for int8 and torch._weight_int4pack_mm_for_cpu for int4 (its
dequantization is (q - 8) * s + z, so z = lo + 8 s), on bfloat16 activations (KERNEL_DTYPE).
"auto", the default, is "native" where it measured faster layer by layer (int8 up to 3 rows,
NATIVE_ROWS) and the native kernels are built, else "packed"; the Engine's one-call decode step
(kernels.decode_layers) reads the stored codes natively whatever the kernel. Elsewhere, and with
"reference" (the slow path tests compare against), the
weight is dequantized to the input's dtype and passed to F.linear.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab import kernels as native
from gptlab.checkpoint import HEAD_KEY, QUANT_KEY, load_checkpoint, write_checkpoint_dir
from gptlab.config import _Serializable
from gptlab.errors import CheckpointError, ConfigError

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel takes
KERNELS = ("auto", "native", "packed", "reference")
# The packed CPU kernels take activations in bfloat16: with float32 ones they run a generic path,
# measured 5-60x slower (3072 x 768 weight, Xeon with AMX: int8 1171 us vs 116 us at 1 row, int4
# 2502 vs 97; 9886 vs 375 at 8 rows). A float32 model's activations are rounded to bfloat16 going
# into a quantized matmul and its outputs come back in float32; bfloat16's 8-bit mantissa is finer
# than the weights' codes.
KERNEL_DTYPE = torch.bfloat16
# The rows up to which "auto" runs the native kernel, layer by layer (benchmarks/quant_kernels.py on the AMD EPYC: 24
# Linears of 768 -> 3072 read from memory, two runs): native int8 beat torch's packed kernel 1.08-1.79x up to 3 rows,
# was within 12% either way at 4-6 and lost at 8 (0.83-0.87x); native int4 lost at nearly every row count (0.55-0.92x),
# and pays off only inside the one-call decode step (kernels.decode_layers), which the Engine measures against the
# layer-by-layer path.
NATIVE_ROWS = {"int8": 3, "int4": 0}
_INT8_MAX = 127
_INT4_LEVELS = 15


@dataclass(frozen=True)
class QuantConfig(_Serializable):
    """How a checkpoint's weights are quantized; saved in its checkpoint.json."""

    method: str = "int8"  # int8: symmetric per output channel; int4: asymmetric per group of group_size inputs
    group_size: int = 128  # int4 only
    head: bool = True  # also the output head (and the token table tied to it): most of a small model's bytes

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}; got {self.group_size!r}")
        if not isinstance(self.head, bool):
            raise ConfigError(f"head must be true or false, got {self.head!r}")


# ----------------------------------------------------------------------------- the codes


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes (N, K) and per-row scales (N,) float32 for a weight (N, K)."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / _INT8_MAX  # (N,): an all-zero row keeps a usable scale
    codes = torch.round(w / scales[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (codes.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Packed int4 codes (N, K/2) uint8, scales and zero points (N, K/G) float32 for a weight (N, K)."""
    N, K = w.shape
    if K % group_size:
        raise ConfigError(f"int4 group size {group_size} does not divide the input width {K}")
    groups = w.detach().float().reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)  # (N, K/G)
    scales = ((hi - lo) / _INT4_LEVELS).clamp(min=torch.finfo(torch.float32).tiny)  # a constant group: every code 0, exact
    codes = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, _INT4_LEVELS).to(torch.uint8)
    return pack_nibbles(codes.reshape(N, K)), scales, lo


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    N, groups = scales.shape
    codes = unpack_nibbles(packed).float().reshape(N, groups, -1)  # (N, K/G, G)
    return (codes * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, -1).to(dtype)


def pack_nibbles(codes: Tensor) -> Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, column 2j in the low nibble and 2j+1 in the high one."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) codes in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.size(0), -1)  # (N, K/2, 2) -> (N, K)


# ----------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """An inference-only nn.Linear whose weight is stored in int8 or int4 (see the module docstring).

    The codes, scales and zero points are persistent buffers (saved in the state dict); the
    bias stays in floating point. The kernels' own packed forms are built on first use for
    the input's dtype and device, and rebuilt if the buffers change (loading, `.to()`).
    """

    inference_only = True  # the training loop refuses a model holding one (gptlab.train.build_optimizer)

    def __init__(self, in_features: int, out_features: int, method: str = "int8", group_size: int = 128, bias: bool = True,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        QuantConfig(method, group_size)  # checks both
        if method == "int4" and in_features % group_size:
            raise ConfigError(f"int4 group size {group_size} does not divide the input width {in_features}")
        self.in_features, self.out_features, self.method, self.group_size = in_features, out_features, method, group_size
        if method == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, device=device))
            self.zeros = None
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(out_features, groups, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, groups, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.kernel = "auto"
        self._prepared: tuple[tuple, tuple[Tensor, ...]] | None = None
        self._native: tuple[tuple, tuple[Tensor, Tensor | None]] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "int8", group_size: int = 128) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, method, group_size, bias=linear.bias is not None, device=linear.weight.device)
        with torch.no_grad():
            if method == "int8":
                codes, scales = quantize_int8(linear.weight)
            else:
                codes, scales, zeros = quantize_int4(linear.weight, group_size)
                q.zeros.copy_(zeros)
            q.qweight.copy_(codes)
            q.scales.copy_(scales)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (out_features, in_features) in `dtype`."""
        if self.method == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.zeros, dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantized()

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "reference" or x.device.type != "cpu":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized(x.dtype), bias)
        rows = x.numel() // self.in_features
        if self.kernel == "native" or (self.kernel == "auto" and rows <= NATIVE_ROWS[self.method] and x.dtype in (torch.float32, torch.bfloat16) and native.load()):
            if not native.load():
                raise ConfigError("the native quantized kernel is not built here (a C++ compiler is needed); use kernel 'packed'")
            scales, zeros = self.native_form()
            return native.gemv_quant(x.contiguous(), self.qweight, scales, zeros, None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()  # (M, K)
        if self.method == "int8":
            qweight, scales = self._kernel_form()
            y = torch._weight_int8pack_mm(x2, qweight, scales)  # (M, N)
        else:
            packed, scales_and_zeros = self._kernel_form()
            y = torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales_and_zeros)[:, : self.out_features]  # (M, N)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _kernel_form(self) -> tuple[Tensor, ...]:
        """The kernel's operands, made once (again after the buffers change)."""
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales.data_ptr(), self.scales._version)
        if self._prepared is None or self._prepared[0] != key:
            if self.method == "int8":
                form: tuple[Tensor, ...] = (self.qweight, self.scales.to(KERNEL_DTYPE))
            else:
                # the kernel takes a multiple of 16 output rows: pad with zero rows and drop their outputs
                pad = -self.out_features % 16
                codes = F.pad(unpack_nibbles(self.qweight).to(torch.int32), (0, 0, 0, pad))  # (N + pad, K): what the packing op takes
                packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
                # the kernel computes (q - 8) * s + z, so the zero point moves by 8 steps from ours, q * s + lo
                scales, zeros = (F.pad(t.float(), (0, 0, 0, pad)) for t in (self.scales, self.zeros + 8 * self.scales))
                scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)  # (K/G, N + pad, 2)
                form = (packed, scales_and_zeros)
            self._prepared = (key, form)
        return self._prepared[1]

    def native_weights(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """What kernels.decode_layers takes for this Linear: the codes, the bias, float32 scales and zero points."""
        return (self.qweight, self.bias, *self.native_form())

    def native_form(self) -> tuple[Tensor, Tensor | None]:
        """Scales and zero points in float32, as the native kernels take them (a model cast to bfloat16 holds them in
        bfloat16): the buffers themselves when they are float32 already, else copies made once."""
        key = (self.scales.data_ptr(), self.scales._version) + ((self.zeros.data_ptr(), self.zeros._version) if self.zeros is not None else ())
        if self._native is None or self._native[0] != key:
            zeros = None if self.zeros is None else self.zeros.float().contiguous()
            self._native = (key, (self.scales.float().contiguous(), zeros))
        return self._native[1]

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.method}{group}"


class QuantEmbedding(nn.Module):
    """A token table read from a QuantLinear (num, dim): the quantized head it is tied to, one copy of the codes.

    A lookup dequantizes only the rows it reads (both schemes quantize along a row).
    """

    def __init__(self, table: QuantLinear) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def forward(self, idx: Tensor) -> Tensor:
        t, flat = self.table, idx.reshape(-1)
        dtype = t.scales.dtype  # float32, or the model's dtype after .to(dtype)
        if t.method == "int8":
            rows = dequantize_int8(t.qweight[flat], t.scales[flat], dtype)  # (n, dim)
        else:
            rows = dequantize_int4(t.qweight[flat], t.scales[flat], t.zeros[flat], dtype)  # (n, dim)
        return rows.view(*idx.shape, self.embedding_dim)  # (..., dim)


# ----------------------------------------------------------------------------- whole models


def _targets(model: nn.Module, cfg: QuantConfig) -> Iterator[tuple[str, nn.Linear]]:
    """The Linears `cfg` quantizes: every one in the transformer blocks, and the head if cfg.head."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.startswith("transformer.h.") or (cfg.head and name == "lm_head")):
            yield name, module


def check_quantizable(model: nn.Module, cfg: QuantConfig) -> None:
    """ConfigError naming the first layer the config cannot quantize (an int4 group that does not divide its width)."""
    from gptlab.model import GPT

    if not isinstance(model, GPT):
        raise ConfigError(f"quantization takes a language model (GPT); got a {type(model).__name__}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ConfigError("the model is quantized already")
    if cfg.method == "int4":
        for name, linear in _targets(model, cfg):
            if linear.in_features % cfg.group_size:
                raise ConfigError(f"int4 group size {cfg.group_size} does not divide {name}'s input width {linear.in_features}; "
                                  f"choose one of {', '.join(str(g) for g in GROUP_SIZES if linear.in_features % g == 0) or 'none'}")  # fmt: skip


def quantize_model(model: nn.Module, cfg: QuantConfig, *, empty: bool = False) -> list[str]:
    """Replace the Linears `cfg` names by QuantLinears, in place; returns their names.

    With empty, the QuantLinears hold no codes yet (a checkpoint is about to be loaded into
    them). A token table tied to a quantized head becomes a QuantEmbedding on the same codes.
    """
    check_quantizable(model, cfg)
    tied = cfg.head and model.lm_head.weight is model.transformer.wte.weight
    done = []
    for name, linear in list(_targets(model, cfg)):
        if empty:
            q = QuantLinear(linear.in_features, linear.out_features, cfg.method, cfg.group_size, bias=linear.bias is not None, device=linear.weight.device)
        else:
            q = QuantLinear.from_linear(linear, cfg.method, cfg.group_size)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)
        done.append(name)
    if tied:
        model.transformer.wte = QuantEmbedding(model.lm_head)
    model.requires_grad_(False)
    return done


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Every QuantLinear's kernel: "auto" (the default: "native" where it measured faster, NATIVE_ROWS, else "packed"), "native"
    (gptlab's kernel on the stored codes), "packed" (torch's CPU kernels on their packed codes) or "reference" (dequantize,
    then F.linear)."""
    if kernel not in KERNELS:
        raise ConfigError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (a tied table counts once); a tensor
    subclass that wraps others (torchao's quantized weights) counts the tensors it holds."""
    seen: set[int] = set()

    def size(t: Tensor) -> int:
        if type(t) not in (Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, name)) for name in names)
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    return sum(size(t) for t in [*model.parameters(), *model.buffers()])


def quantize_checkpoint(src: str | os.PathLike[str], out: str | os.PathLike[str], cfg: QuantConfig, force: bool = False) -> tuple[Path, int, int]:
    """Write `src`'s model quantized as `cfg` says to the checkpoint directory `out`.

    Returns (out, bytes of the weights before, after). A LoRA run's adapters are merged first.
    """
    from gptlab.hf import check_out_dir, writing

    out = Path(out)
    check_out_dir(out, force)
    loaded = load_checkpoint(src)
    if QUANT_KEY in loaded.meta:
        raise CheckpointError(f"{loaded.path} is quantized already ({loaded.meta[QUANT_KEY].get('method')}); quantize the checkpoint it was made from")
    if HEAD_KEY in loaded.meta:
        raise CheckpointError(f"{loaded.path} is a task model (a classification head); quantize takes a language model")
    before = weight_bytes(loaded.model)
    quantize_model(loaded.model, cfg)
    source = {"quantized_from": str(loaded.path.resolve()), "step": loaded.step}
    with writing(out) as tmp:
        write_checkpoint_dir(tmp, loaded.step, loaded.model, loaded.model_config, loaded.tokenizer, metrics=loaded.meta.get("metrics"),
                             extra_meta={QUANT_KEY: cfg.to_dict(), "source": source})  # fmt: skip
    return out, before, weight_bytes(loaded.model)
