"""QLoRA's frozen-base quantization: the NF4 code against its published table, provable round-trip
error bounds for NF4 and int8, storage per weight, and QLoRA models that forward, backpropagate
only into the adapters, merge and train."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tokens

from gptlab.config import GPTConfig
from gptlab.errors import ConfigError
from gptlab.finetune.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from gptlab.finetune.quant import (
    QuantizedLinear,
    dequantize_int8,
    dequantize_nf4,
    frozen_base_bytes,
    nf4_codebook,
    quantize_int8,
    quantize_linear,
    quantize_nf4,
)
from gptlab.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

# NF4 as published (bitsandbytes' table, QLoRA appendix E)
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
CFG = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64)
# float32 rounding in w / absmax * 127 and back can exceed half a step by a few ulps of the step
ULP_SLACK = 1e-4


def weights(shape: tuple[int, ...], seed: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def test_nf4_codebook_matches_the_published_table() -> None:
    code = nf4_codebook()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert (code - torch.tensor(NF4_PUBLISHED)).abs().max() <= 1e-6
    assert code[7] == 0.0 and code[0] == -1.0 and code[-1] == 1.0  # 0 exact, range [-1, 1]


def test_nf4_round_trip_error_bounds() -> None:
    w = weights((256, 1024), seed=0)
    packed, absmax = quantize_nf4(w, block_size=64)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2 and absmax.numel() == w.numel() // 64
    back = dequantize_nf4(packed, absmax, w.shape)
    assert back.shape == w.shape and back.dtype == torch.float32
    rel_rms = ((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
    assert rel_rms < 0.1  # measured 0.092 for N(0, 0.02) at block size 64
    # provable: each scaled value is at most half the widest gap between neighbouring levels from its level
    half_gap = (nf4_codebook().diff().max() / 2).item()  # 0.152, between -1 and -0.696
    per_block = (back - w).abs().view(-1, 64).amax(dim=1)
    assert (per_block <= absmax * half_gap * (1 + ULP_SLACK)).all()
    # each block's absmax value is a level (+-1) and so comes back exactly (up to the scale's rounding)
    assert torch.allclose(back.abs().view(-1, 64).amax(dim=1), absmax, rtol=1e-6, atol=0)


def test_int8_round_trip_error_bounds() -> None:
    w = weights((256, 1024), seed=1)
    codes, absmax = quantize_int8(w, block_size=64)
    assert codes.dtype == torch.int8 and codes.numel() == w.numel()
    back = dequantize_int8(codes, absmax, w.shape)
    rel_rms = ((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
    assert rel_rms < 0.01  # measured 0.0059
    per_block = (back - w).abs().view(-1, 64).amax(dim=1)
    assert (per_block <= absmax / 254 * (1 + ULP_SLACK)).all()  # half of one step absmax / 127


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_any_size_pads_the_last_block_and_zeros_stay_exact(quant: str) -> None:
    q, dq = (quantize_nf4, dequantize_nf4) if quant == "nf4" else (quantize_int8, dequantize_int8)
    w = weights((7, 9), seed=2, std=1.0)  # 63 values: one block of 64 with one zero of padding
    w[0, :3] = 0.0
    data, absmax = q(w, 64)
    assert absmax.numel() == 1
    back = dq(data, absmax, w.shape, torch.bfloat16)
    assert back.shape == w.shape and back.dtype == torch.bfloat16
    assert (back[0, :3] == 0).all()
    zeros = torch.zeros(4, 64)  # an all-zero block has absmax 0 and must not divide by it
    assert (dq(*q(zeros, 64), zeros.shape) == 0).all()


@pytest.mark.parametrize("block_size", [0, -2, 3, 63, 64.0, True, "64"])
def test_invalid_block_size_is_a_config_error(block_size) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        quantize_nf4(torch.zeros(64), block_size)
    with pytest.raises(ConfigError, match="block_size"):
        LoRAConfig(block_size=block_size)


@pytest.mark.parametrize("bits", [2, 16, 4.0, True])
def test_invalid_bits_is_a_config_error(bits) -> None:
    with pytest.raises(ConfigError, match="bits"):
        QuantizedLinear(8, 8, bits=bits)
    with pytest.raises(ConfigError, match="base_bits"):
        LoRAConfig(base_bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_forward_state_dict_and_dtype(bits: int) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    q = quantize_linear(linear, bits, 64)
    x = torch.randn(3, 5, 64)
    expected = torch.nn.functional.linear(x, q.weight, linear.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert q(x.bfloat16()).dtype == torch.bfloat16  # dequantized to the input's dtype
    assert q.weight.shape == (96, 64) and not any(p.requires_grad for p in q.parameters())
    fresh = QuantizedLinear(64, 96, bits, 64)
    fresh.load_state_dict(q.state_dict())  # codes and scales are persistent buffers
    assert set(q.state_dict()) == {"qweight", "absmax", "bias"}
    assert torch.equal(fresh(x), q(x))


def _lora_model(cfg: LoRAConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG)
    randomize_(model, seed, scale=0.02)
    apply_lora(model, cfg, seed=seed)
    with torch.no_grad():  # non-zero B, so the adapters change the output
        g = torch.Generator().manual_seed(seed + 1)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize(("bits", "max_ratio"), [(4, 0.15), (8, 0.27)])
def test_quantized_base_bytes_per_weight(bits: int, max_ratio: float) -> None:
    full = _lora_model(LoRAConfig())
    quant = _lora_model(LoRAConfig(base_bits=bits))
    bases = [m.base for m in full.modules() if isinstance(m, LoRALinear)]
    qbases = [m.base for m in quant.modules() if isinstance(m, LoRALinear)]
    weight_bytes = sum(b.weight.numel() * 4 for b in bases)
    qweight_bytes = sum(frozen_base_bytes(b) - b.bias.nbytes for b in qbases)  # codes + absmax scales
    # NF4: 0.5 byte + 4 bytes per 64 weights = 0.5625 bytes a weight (14%); int8: 1.0625 (27%)
    assert qweight_bytes / weight_bytes <= max_ratio <= 0.30
    assert frozen_base_bytes(quant) < frozen_base_bytes(full)


@pytest.mark.parametrize(("bits", "max_rel"), [(4, 0.2), (8, 0.02)])
def test_qlora_forward_is_close_to_lora_and_only_adapters_get_gradients(bits: int, max_rel: float) -> None:
    full = _lora_model(LoRAConfig())
    quant = _lora_model(LoRAConfig(base_bits=bits))
    idx = tokens((2, 32), CFG.vocab_size, seed=3)
    with torch.no_grad():
        ref, got = full(idx)[0], quant(idx)[0]
    assert ((got - ref).norm() / ref.norm()).item() < max_rel  # measured 0.11 (NF4), 0.0097 (int8)
    _, loss = quant.train()(idx, idx)
    loss.backward()
    trained = {n for n, p in quant.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in quant.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert all(quant.get_parameter(n).grad.abs().sum() > 0 for n in trained)


def test_merged_qlora_model_matches_the_adapter_model() -> None:
    model = _lora_model(LoRAConfig(base_bits=4))
    idx = tokens((2, 32), CFG.vocab_size, seed=4)
    with torch.no_grad():
        before = model(idx)[0]
        after = merge_lora(model)(idx)[0]
    assert (after - before).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(GPT(CFG).state_dict())


def test_a_few_adam_steps_lower_a_qlora_models_loss() -> None:
    model = _lora_model(LoRAConfig(r=4, base_bits=4)).train()
    idx = tokens((4, 33), CFG.vocab_size, seed=5)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
