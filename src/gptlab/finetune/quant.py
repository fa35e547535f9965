"""Block-wise quantization of frozen weights: QLoRA's 4-bit NormalFloat (NF4) and absmax int8.

QLoRA (Dettmers et al. 2023) fine-tunes LoRA adapters on top of a base model whose
frozen weights are stored in 4 bits, cutting the base's memory by about 7x. Two ideas
make 4 bits enough:

- Block-wise absmax scaling: the weights are cut into blocks of `block_size` (64 in the
  paper), each divided by its largest magnitude, so one outlier only coarsens its own block.
- NormalFloat: pretrained weights are close to normally distributed, so the 16 levels are
  quantiles of N(0, 1) rescaled to [-1, 1] (section 3, eq. 4): each level is equally likely,
  which makes the code information-theoretically optimal for normal data, and 0 is exact.

int8 is the symmetric absmax code of Dettmers et al. 2022 (LLM.int8()), block-wise here:
q = round(127 w / absmax), so each weight is off by at most half a step, absmax / 254.

This is plain PyTorch and runs anywhere, CPU included; it trades speed for that: each
forward dequantizes the whole weight to the input's dtype and calls F.linear, where
bitsandbytes' CUDA kernels dequantize inside the matmul. The absmax constants are kept in
float32 (QLoRA's double quantization, which stores them in 8 bits, is not done here): 4
bytes per block, so NF4 with 64-weight blocks costs 0.5625 bytes per weight.

Rule for sizes: a weight is flattened and split into blocks of block_size values; the last
block is padded with zeros (which every code stores exactly) and the padding is dropped on
dequantization, so any block size fits any weight. block_size must be a positive even
integer, because NF4 packs two codes per byte and a byte must not straddle two blocks.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.errors import ConfigError

BITS = (4, 8)  # NF4, int8
# Where the outermost NF4 quantile is taken, as bitsandbytes' create_normal_map: the quantiles of
# the N(0, 1) tails at exactly 0 and 1 are infinite, so the levels come from [1 - offset, offset].
# It is 1 - (1/32 + 1/30) / 2: halfway between the cuts 1 - 1/(2n) for n = 16 and n = 15 levels.
NF4_OFFSET = 0.9677083
_INT8_MAX = 127  # symmetric code: -127..127, so 0 is exact and the code is sign-symmetric


def nf4_codebook() -> Tensor:
    """The 16 NF4 levels, ascending, float32, from -1 to 1 with 0 exact (Dettmers et al. 2023, eq. 4).

    NF4 is asymmetric so that 0 has a code: 8 positive levels are the N(0, 1) quantiles at 8
    evenly spaced probabilities from offset down to 0.5 (excluded), 7 negative levels the
    mirrored quantiles at 7 probabilities, plus 0; all are divided by the largest, ndtri(offset).
    """
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values  # (16,)
    return (levels / levels.max()).float()


@functools.lru_cache(maxsize=None)
def _codebook_on(device: torch.device) -> Tensor:
    # one copy per device, so dequantizing on a GPU does not copy the table from the host every call
    return nf4_codebook().to(device)


def check_quant_args(bits: int, block_size: int) -> None:
    """ConfigError naming bits or block_size when they are not a supported code and block size."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise ConfigError(f"bits must be 4 (NF4) or 8 (int8), got {bits!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0 or block_size % 2:
        raise ConfigError(f"block_size must be a positive even integer, got {block_size!r}")


def _blocks(w: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """w as (n_blocks, block_size) float32 values scaled into [-1, 1], and each block's absmax (n_blocks,)."""
    flat = w.detach().reshape(-1).float()  # (numel,)
    flat = F.pad(flat, (0, -flat.numel() % block_size))  # zeros up to a whole number of blocks
    blocks = flat.view(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero block stays zeros
    return blocks / scale[:, None], absmax


def quantize_nf4(w: Tensor, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """NF4 codes of w, two per byte, and the per-block absmax: (uint8 (n_blocks * block_size / 2,), float32 (n_blocks,)).

    Each scaled value takes the nearest codebook level; of a byte's two codes the first
    value's is in the high nibble, as bitsandbytes stores them.
    """
    check_quant_args(4, block_size)
    normed, absmax = _blocks(w, block_size)
    levels = _codebook_on(normed.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # (15,): nearest level = number of midpoints below the value
    codes = torch.bucketize(normed, midpoints).to(torch.uint8).view(-1, 2)  # (n_blocks * block_size / 2, 2)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def dequantize_nf4(packed: Tensor, absmax: Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight of `shape` that quantize_nf4 encoded, in `dtype`."""
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).view(-1).long()  # (n_blocks * block_size,)
    values = _codebook_on(packed.device)[codes].view(absmax.numel(), -1) * absmax[:, None]  # (n_blocks, block_size)
    return values.view(-1)[: math.prod(shape)].view(shape).to(dtype)


def quantize_int8(w: Tensor, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes round(127 w / absmax) per block, and the absmax: (int8 (n_blocks * block_size,), float32 (n_blocks,))."""
    check_quant_args(8, block_size)
    normed, absmax = _blocks(w, block_size)
    codes = torch.round(normed * _INT8_MAX).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)  # (n_blocks, block_size)
    return codes.view(-1), absmax


def dequantize_int8(codes: Tensor, absmax: Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight of `shape` that quantize_int8 encoded, in `dtype`."""
    values = codes.view(absmax.numel(), -1).float() * (absmax / _INT8_MAX)[:, None]  # (n_blocks, block_size)
    return values.view(-1)[: math.prod(shape)].view(shape).to(dtype)


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored block-quantized (NF4 or int8).

    The codes (`qweight`) and scales (`absmax`) are persistent buffers, so they are saved
    in the state dict; the bias, if any, stays full precision as a frozen parameter (it is
    tiny). `weight` gives the dequantized float32 matrix (out, in) for code that reads it.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, block_size: int = 64, bias: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_quant_args(bits, block_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.block_size = block_size
        n_blocks = -(-in_features * out_features // block_size)
        codes_shape, codes_dtype = (n_blocks * block_size // 2, torch.uint8) if bits == 4 else (n_blocks * block_size, torch.int8)
        self.register_buffer("qweight", torch.zeros(codes_shape, dtype=codes_dtype, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (out_features, in_features) in `dtype`."""
        shape = (self.out_features, self.in_features)
        if self.bits == 4:
            return dequantize_nf4(self.qweight, self.absmax, shape, dtype)
        return dequantize_int8(self.qweight, self.absmax, shape, dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantized()

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        code = "nf4" if self.bits == 4 else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {code}, block_size={self.block_size}"


def quantize_linear(linear: nn.Linear, bits: int = 4, block_size: int = 64) -> QuantizedLinear:
    """A QuantizedLinear holding `linear`'s weight in `bits` (4: NF4, 8: int8) and its bias as it is."""
    module = QuantizedLinear(linear.in_features, linear.out_features, bits, block_size, bias=linear.bias is not None, device=linear.weight.device)
    codes, absmax = (quantize_nf4 if bits == 4 else quantize_int8)(linear.weight, block_size)
    with torch.no_grad():
        module.qweight.copy_(codes)
        module.absmax.copy_(absmax)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
    return module


class QuantizedEmbedding(nn.Module):
    """A frozen token table stored block-quantized: the rows of `table`, a bias-free QuantizedLinear (num, dim).

    A tied output head is that same QuantizedLinear, so the one quantized matrix serves both
    the lookup and the head, as the float one did. When block_size divides dim, a lookup
    dequantizes only the rows it reads; otherwise the whole table.
    """

    def __init__(self, table: QuantizedLinear) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def forward(self, idx: Tensor) -> Tensor:
        t = self.table
        if self.embedding_dim % t.block_size:
            return t.dequantized()[idx]
        blocks = self.embedding_dim // t.block_size
        absmax = t.absmax.view(self.num_embeddings, blocks)[idx.reshape(-1)].reshape(-1)  # (N * blocks,)
        if t.bits == 4:
            codes = t.qweight.view(self.num_embeddings, -1)[idx.reshape(-1)].reshape(-1)  # (N * dim / 2,): two codes a byte
            rows = dequantize_nf4(codes, absmax, (idx.numel(), self.embedding_dim))
        else:
            codes = t.qweight.view(self.num_embeddings, -1)[idx.reshape(-1)].reshape(-1)  # (N * dim,)
            rows = dequantize_int8(codes, absmax, (idx.numel(), self.embedding_dim))
        return rows.view(*idx.shape, self.embedding_dim)  # (..., dim)


def quantize_embedding(embedding: nn.Embedding, bits: int = 4, block_size: int = 64) -> QuantizedEmbedding:
    """A QuantizedEmbedding holding `embedding`'s table in `bits` (4: NF4, 8: int8)."""
    as_linear = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
    as_linear.weight = embedding.weight  # (num, dim) is a Linear's (out, in)
    return QuantizedEmbedding(quantize_linear(as_linear, bits, block_size))


def frozen_base_bytes(module: nn.Module) -> int:
    """Bytes of a module's frozen state: parameters that do not require grad and persistent buffers.

    Each storage is counted once (a tied head and embedding are one matrix). For a LoRA
    model this is the base the adapters sit on; for a QuantizedLinear, its codes, scales and bias.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():  # parameters and persistent buffers
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            continue
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total
