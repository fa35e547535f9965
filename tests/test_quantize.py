"""Weight-only quantization for inference (gptlab.compress.quantize): error bounds of both codes,
the packed CPU kernels against dequantize-then-matmul, a trained model's logits and greedy text
after quantization, the checkpoint round trip, and the command's refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from gptlab.checkpoint import QUANT_KEY, load_checkpoint, save_checkpoint
from gptlab.cli import main
from gptlab.compress.quantize import (
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_checkpoint,
    quantize_int4,
    quantize_int8,
    quantize_model,
    set_kernel,
    unpack_nibbles,
    weight_bytes,
)
from gptlab.config import GPTConfig, SampleConfig, TrainConfig
from gptlab.errors import CheckpointError, ConfigError
from gptlab.generate import NATIVE_MAX_ROWS, generate, native_applies
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer
from gptlab.train import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")
# float32 rounding in w / s and back can exceed half a step by a few ulps of the step
SLACK = 1 + 1e-4


def weights(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, 3] = 0.9  # an outlier: it coarsens only its own row (int8) or group (int4)
    w[1] = 0.0  # an all-zero row
    w[2, :32] = 0.25  # a constant group
    return w


def test_int8_codes_are_within_half_a_step_of_each_weight_per_row():
    w = weights((48, 96), 0)
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape and scales.shape == (48,)
    assert codes.abs().max() <= 127 and codes[0, 3] == 127  # the row's absmax gets the end of the code
    err = (dequantize_int8(codes, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * SLACK).all()
    assert (dequantize_int8(codes, scales)[1] == 0).all()  # a zero row stays zero
    assert err[5:].max() < err[0].max()  # the outlier's row is coarser than the others


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_codes_are_within_half_a_step_of_each_weight_per_group(group):
    w = weights((24, 256), 1)
    packed, scales, zeros = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128) and scales.shape == zeros.shape == (24, 256 // group)
    codes = unpack_nibbles(packed)
    assert codes.max() <= 15 and torch.equal(pack_nibbles(codes), packed)
    deq = dequantize_int4(packed, scales, zeros)
    step = scales.repeat_interleave(group, dim=1)  # (N, K): each weight's group step
    assert ((deq - w).abs() <= step / 2 * SLACK).all()
    # a group's min and max are exact, so are constant groups (the zero row, and row 2's first 32 when group is 32)
    g = w.view(24, -1, group)
    assert torch.allclose(deq.view(24, -1, group).amin(2), g.amin(2), atol=1e-7) and torch.allclose(deq.view(24, -1, group).amax(2), g.amax(2), atol=1e-6)
    assert (deq[1] == 0).all()
    if group == 32:
        assert torch.equal(deq[2, :32], w[2, :32])


def test_nibbles_pack_the_even_column_low():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [[0x21, 0x0F]] and torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def kernel_reference(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the packed kernels compute, by dequantize-then-matmul in float32: bfloat16 activations, scales
    (and zero points, moved to the kernel's (q - 8) * s + z form) rounded to bfloat16, the product
    rounded to bfloat16 (the kernels' output), then the bias."""
    xb = x.reshape(-1, q.in_features).bfloat16().float()
    s = q.scales.float().bfloat16().float()
    if q.method == "int8":
        w = q.qweight.float() * s[:, None]
    else:
        z = (q.zeros.float() + 8 * q.scales.float()).bfloat16().float()
        codes = unpack_nibbles(q.qweight).float().view(q.out_features, -1, q.group_size)  # (N, K/G, G)
        w = ((codes - 8) * s[..., None] + z[..., None]).view(q.out_features, q.in_features)
    return (F.linear(xb, w).bfloat16().float() + q.bias.float()).view(*x.shape[:-1], q.out_features)


@pytest.mark.parametrize(("method", "group", "n_out"), [("int8", 128, 80), ("int4", 32, 80), ("int4", 64, 83), ("int4", 128, 80), ("int4", 256, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kernels_equal_dequantize_then_matmul(method, group, n_out, dtype):
    linear = torch.nn.Linear(256, n_out)  # 83 outputs: int4's kernel needs a multiple of 16, so they are padded
    with torch.no_grad():
        linear.weight.copy_(weights((n_out, 256), 2))
        linear.bias.normal_(0, 0.1)
    q = QuantLinear.from_linear(linear, method, group).to(dtype)
    for shape in [(1, 256), (5, 256), (2, 17, 256)]:  # one decode row, a few, a prefill (B, T, C)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        q.kernel = "packed"
        fast = q(x)
        assert fast.shape == (*shape[:-1], n_out) and fast.dtype == dtype
        # equal up to summation order, which may move a bfloat16 rounding by one step (2^-8 relative)
        assert torch.allclose(fast.float(), kernel_reference(q, x), atol=1e-5, rtol=2**-7), (fast.float() - kernel_reference(q, x)).abs().max()
        # against the full-precision dequantized weight (the "reference" kernel): what bfloat16 operands cost, under 1%
        q.kernel = "reference"
        ref = q(x).float()
        assert (fast.float() - ref).norm() < 0.01 * ref.norm()
    exact = F.linear(x.float(), q.dequantized(), q.bias.float())
    assert torch.allclose(q(x).float(), exact, atol=5e-2 if dtype == torch.bfloat16 else 1e-5)


def test_auto_kernel_runs_the_native_one_where_it_measured_faster():
    from gptlab.compress.quantize import NATIVE_ROWS

    if not native_applies(GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4))):
        pytest.skip("no native kernels here")
    for method in ("int8", "int4"):
        q = QuantLinear.from_linear(torch.nn.Linear(128, 40), method, 32)
        for rows in (1, 4, 6):
            x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
            q.kernel = "auto"
            auto = q(x)
            q.kernel = "native" if rows <= NATIVE_ROWS[method] else "packed"
            assert torch.equal(auto, q(x)), (method, rows)  # (tests/test_kernels.py holds the native kernel to the reference)


def test_kernels_follow_new_weights_after_loading_a_state_dict():
    a, b = (QuantLinear.from_linear(torch.nn.Linear(64, 16), "int4", 32) for _ in range(2))
    x = torch.randn(3, 64)
    a(x)  # builds a's packed form
    a.load_state_dict(b.state_dict())
    assert torch.allclose(a(x), b(x), atol=1e-6)


def trained_model() -> GPT:
    """A tiny model trained to recite one sequence, so its greedy continuation has clear margins."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=48, n_layer=2, n_head=2, n_embd=64))
    seq = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval()


@pytest.mark.parametrize(("method", "group", "tol"), [("int8", 128, 0.1), ("int4", 32, 0.6)])
def test_a_quantized_trained_model_keeps_its_logits_close_and_its_greedy_text(method, group, tol):
    model = trained_model()
    prompt = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(1))[0, :6].tolist()
    with torch.no_grad():
        ref_logits = model(torch.tensor([prompt]))[0]
    ref = generate(model, [prompt], SampleConfig(max_new_tokens=30, temperature=0, ignore_eot=True))[0].token_ids
    names = quantize_model(model, QuantConfig(method, group))
    assert len(names) == 2 * 4 + 1 and isinstance(model.transformer.wte, QuantEmbedding) and model.transformer.wte.table is model.lm_head
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0]
    # stated tolerance: max |logit difference| against the float model, whose logits span ~20; the kernels return
    # bfloat16, whose rounding alone is up to 0.03 at logits of 8-16
    assert (logits - ref_logits).abs().max() < tol
    assert generate(model, [prompt], SampleConfig(max_new_tokens=30, temperature=0, ignore_eot=True))[0].token_ids == ref


def test_a_tied_table_reads_the_heads_codes():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=64))
    randomize_(model, 0)
    quantize_model(model, QuantConfig("int4", 32))
    idx = torch.tensor([[3, 0, 49, 3]])
    assert torch.equal(model.transformer.wte(idx), model.lm_head.dequantized()[idx])
    untied = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=64, tie_weights=False))
    quantize_model(untied, QuantConfig("int8"))
    assert isinstance(untied.lm_head, QuantLinear) and isinstance(untied.transformer.wte, torch.nn.Embedding)
    kept = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=64))
    quantize_model(kept, QuantConfig("int8", head=False))
    assert isinstance(kept.lm_head, torch.nn.Linear) and kept.lm_head.weight is kept.transformer.wte.weight


def test_bad_configs_name_the_problem():
    with pytest.raises(ConfigError, match="method"):
        QuantConfig("int3")
    with pytest.raises(ConfigError, match="group_size"):
        QuantConfig("int4", 48)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=96))
    with pytest.raises(ConfigError, match=r"int4 group size 64 does not divide transformer.h.0.attn.c_attn's input width 96; choose one of 32"):
        quantize_model(model, QuantConfig("int4", 64))
    quantize_model(model, QuantConfig("int8"))
    with pytest.raises(ConfigError, match="quantized already"):
        quantize_model(model, QuantConfig("int8"))
    with pytest.raises(ConfigError, match="inference only"):
        build_optimizer(model, TrainConfig(), "cpu")


def test_a_quantized_checkpoint_loads_as_it_was_saved_and_is_smaller(tmp_path):
    model = GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=2, n_head=2, n_embd=64))
    randomize_(model, 1)
    src = save_checkpoint(tmp_path / "run", 7, model, model.config, Tokenizer.gpt2())
    out, before, after = quantize_checkpoint(src, tmp_path / "q", QuantConfig("int4", 32))
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta[QUANT_KEY] == {"method": "int4", "group_size": 32, "head": True} and meta["step"] == 7
    assert after < before / 4  # float32 -> int4 with a float32 scale and zero per 32 weights (0.75 bytes a weight); biases, norms in float
    q = load_checkpoint(out)
    assert isinstance(q.model.lm_head, QuantLinear) and q.model.transformer.wte.table is q.model.lm_head
    assert weight_bytes(q.model) == after
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    quantize_model(ref, QuantConfig("int4", 32))
    idx = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        assert torch.equal(q.model(idx)[0], ref(idx)[0])
        set_kernel(q.model, "reference")  # the slow path: float32 all through
        slow, fast = q.model(idx)[0], ref(idx)[0]
        assert (slow - fast).norm() < 0.02 * slow.norm()
    assert (out / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size / 4  # the tied table stored once
    with pytest.raises(CheckpointError, match="quantized already"):
        quantize_checkpoint(out, tmp_path / "qq", QuantConfig("int8"))


def test_the_quantize_command_and_sampling_from_its_checkpoint(tmp_path, capsys):
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=64))
    randomize_(model, 2)
    src = save_checkpoint(tmp_path / "run", 1, model, model.config, Tokenizer.gpt2())
    assert main(["quantize", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "q8")]) == 0
    out = capsys.readouterr().out
    assert "int8 per output channel" in out and "MiB ->" in out and "checkpoint:" in out
    sample = ["sample", "--device", "cpu", "--prompt", "the", "--max-new-tokens", "8", "--temperature", "0", "--ignore-eot"]
    assert main([*sample, "--ckpt", str(tmp_path / "q8")]) == 0
    quantized_text = capsys.readouterr().out
    assert quantized_text.startswith("the") and len(quantized_text) > 4

    # refusals: one line each, exit 2
    assert main(["quantize", "--ckpt", str(tmp_path / "q8"), "--out", str(tmp_path / "again")]) == 2
    assert "quantized already (int8)" in capsys.readouterr().err
    wide = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=96))
    save_checkpoint(tmp_path / "wide", 1, wide, wide.config, Tokenizer.gpt2())
    assert main(["quantize", "--ckpt", str(tmp_path / "wide"), "--out", str(tmp_path / "w4"), "--method", "int4", "--group-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group size 64 does not divide" in err and not (tmp_path / "w4").exists()
    assert main(["quantize", "--ckpt", str(src), "--out", str(tmp_path / "q8")]) == 2  # not empty, no --force
    assert "not empty" in capsys.readouterr().err


def test_serving_and_scoring_a_quantized_checkpoint(tmp_path, capsys):
    from gptlab.serve.scheduler import Request, Scheduler

    model = trained_model()
    quantize_model(model, QuantConfig("int4", 32))
    prompt = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(1))[0, :6].tolist()
    cfg = SampleConfig(max_new_tokens=12, temperature=0, ignore_eot=True, logprobs=1)
    alone = generate(model, [prompt], cfg)[0]
    sched = Scheduler(model, None, max_batch=2, thread=False, tune=True)  # the start-up kernel measurement skips QuantLinears
    assert (sched.engine.decoder is not None) == native_applies(model)  # quantized layers in the one-call native decode step too
    if native_applies(model):  # measured against the module-by-module path, though the two round activations differently
        assert all("native" in times for M, times in sched.engine.plan.times.items() if M <= NATIVE_MAX_ROWS), sched.engine.plan.times
    events = []
    sched.submit(Request(prompt, cfg, events.append))
    sched.submit(Request(prompt[:3], cfg, lambda ev: None))  # a neighbour in the batch
    sched.run(until=lambda: bool(events) and events[-1].finish_reason is not None)
    assert [e.token_id for e in events] == alone.token_ids
    assert [e.logprob for e in events] == pytest.approx(alone.logprobs, abs=1e-4)

    save_checkpoint(tmp_path / "run", 1, GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=64)),
                    GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=64), Tokenizer.gpt2())  # fmt: skip
    assert main(["quantize", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "q"), "--method", "int4", "--group-size", "32"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 8)
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "q"), "--text", str(text), "--device", "cpu"]) == 0
    assert "bits per byte:" in capsys.readouterr().out
