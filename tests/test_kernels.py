"""gptlab's native CPU kernels (gptlab/kernels) against the PyTorch functions they replace, in float64."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from gptlab import kernels

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernels with")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), "the native kernels must build where a compiler is installed"


# bfloat16 rounds each output once: half a unit in the last place of 8 bits, plus float32 sums in another order
def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    return bool(((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-3 * float(want.abs().max())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_is_f_linear_for_every_shape_row_count_and_bias(dtype):
    g = torch.Generator().manual_seed(0)
    # widths that leave every tail: not a multiple of 16, 32, 64 or 128; one wide head-like matrix
    for N, K in [(1, 1), (7, 5), (33, 17), (64, 64), (100, 129), (2304, 768), (50, 3072), (300, 1000)]:
        for M in (1, 2, 3, 8):
            w = torch.randn(N, K, generator=g).to(dtype)
            b = torch.randn(N, generator=g).to(dtype)
            x = torch.randn(M, 1, K, generator=g).to(dtype)  # (B, T, C), as a decode step has it
            for bias in (b, None):
                got = kernels.gemv(x, w, bias)
                assert got.shape == (M, 1, N) and got.dtype == dtype
                want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
                assert close(got, want, dtype), (N, K, M, bias is None)


def test_gemv_refuses_what_it_cannot_compute():
    w = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.gemv(torch.randn(1, 8), w.t(), None)  # a transposed (non-contiguous) weight
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.gemv(torch.randn(1, 4, dtype=torch.float64), w.double(), None)
    with pytest.raises(RuntimeError, match=r"\(\.\.\., 4\)"):
        kernels.gemv(torch.randn(1, 5), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.gemv(torch.randn(1, 4), w, torch.randn(7))


def reference_attention(q, k, v, cache_k, cache_v, slots, mask, scale):
    """What the fused kernel must equal: CacheStep.update's writes, then SDPA over the first L slots, in float64."""
    B, L = q.size(0), mask.size(-1)
    cache_k, cache_v = cache_k.clone(), cache_v.clone()
    rows = torch.arange(B)[:, None]
    cache_k[rows, :, slots] = k  # (B, T, nh, hs) into (B, nh, S, hs) at slots (B, T)
    cache_v[rows, :, slots] = v
    gqa = q.size(1) != cache_k.size(1)
    y = F.scaled_dot_product_attention(q.double(), cache_k[:, :, :L].double(), cache_v[:, :, :L].double(), mask, scale=scale, enable_gqa=gqa)
    return y, cache_k, cache_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_attention_is_the_cache_write_then_sdpa(dtype):
    g = torch.Generator().manual_seed(1)
    # head sizes with a register-resident version (16, 32, 64, 128) and others (20, 8); one query or several per row
    # ... and grouped-query attention: nkv key/value heads, each read by nh / nkv query heads
    shapes = [(1, 12, 12, 1, 144, 64), (3, 4, 4, 2, 37, 16), (2, 2, 2, 5, 9, 20), (2, 3, 3, 1, 40, 128), (1, 2, 2, 3, 50, 32), (4, 1, 1, 1, 1, 8)]
    shapes += [(2, 6, 2, 1, 30, 64), (1, 4, 1, 3, 20, 16)]
    for B, nh, nkv, T, L, hs in shapes:
        S = L + 7
        cache_k = torch.randn(B, nkv, S, hs, generator=g).to(dtype)
        cache_v = torch.randn(B, nkv, S, hs, generator=g).to(dtype)
        qkv = torch.randn(B, T, nh + 2 * nkv, hs, generator=g).to(dtype)
        q, k, v = qkv.split([nh, nkv, nkv], dim=2)  # strided views, as the model makes them
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        slots = torch.stack([torch.randperm(L, generator=g)[:T] for _ in range(B)])  # (B, T)
        mask = torch.rand(B, 1, T, L, generator=g) < 0.6
        mask[..., 0] = True
        want, want_k, want_v = reference_attention(q, k, v, cache_k, cache_v, slots, mask, 0.3)
        got = kernels.cached_attention(q, k, v, cache_k, cache_v, slots, mask, 0.3)
        assert got.shape == (B, nh, T, hs) and got.transpose(1, 2).is_contiguous()  # the caller's (B, T, nh * hs) is a view
        assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)
        assert close(got, want, dtype), (B, nh, nkv, T, L, hs)


def test_cached_attention_softmax_over_a_wide_score_range_and_a_query_that_sees_nothing():
    g = torch.Generator().manual_seed(2)
    B, nh, T, L, hs = 2, 3, 2, 70, 64
    q = torch.randn(B, nh, T, hs, generator=g) * 6  # scores spread over hundreds: e^x far below float32's range
    cache_k, cache_v = torch.randn(B, nh, L, hs, generator=g) * 6, torch.randn(B, nh, L, hs, generator=g)
    k, v = torch.randn(B, T, nh, hs, generator=g), torch.randn(B, T, nh, hs, generator=g)
    slots = torch.tensor([[3, 4], [60, 61]])
    mask = torch.rand(B, 1, T, L, generator=g) < 0.5
    mask[..., 3] = True
    want, _, _ = reference_attention(q, k, v, cache_k, cache_v, slots, mask, 1.0)
    assert close(kernels.cached_attention(q, k, v, cache_k.clone(), cache_v.clone(), slots, mask, 1.0), want, torch.float32)
    mask[1, 0, 1] = False  # a query allowed no key at all gets zeros (SDPA would give NaN)
    got = kernels.cached_attention(q, k, v, cache_k.clone(), cache_v.clone(), slots, mask, 1.0)
    assert torch.equal(got[1, :, 1], torch.zeros(nh, hs)) and close(got[0], want[0], torch.float32)


def test_cached_attention_refuses_a_slot_outside_the_cache_and_mismatched_shapes():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    cache = torch.zeros(1, 2, 4, 8)
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="slot 4 outside a cache of 4"):
        kernels.cached_attention(q, k, v, cache, cache.clone(), torch.tensor([[4]]), mask, 1.0)
    with pytest.raises(RuntimeError, match="new keys and values"):
        kernels.cached_attention(q, k[:, :, :1], v, cache, cache.clone(), torch.tensor([[0]]), mask, 1.0)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        kernels.cached_attention(q, k, v, cache, cache.clone(), torch.tensor([[0]]), mask.float(), 1.0)


QUANT_SHAPES = [("int8", 128, 37, 100), ("int8", 128, 300, 768), ("int4", 32, 45, 96), ("int4", 32, 300, 768), ("int4", 64, 33, 192),
                ("int4", 128, 64, 768), ("int4", 256, 20, 512)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_quant_is_dequantize_then_matmul(dtype):
    from gptlab.compress.quantize import QuantLinear

    g = torch.Generator().manual_seed(5)
    for method, group, N, K in QUANT_SHAPES:  # widths with and without a 64-column tail
        linear = torch.nn.Linear(K, N)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(N, K, generator=g) * 0.1 + torch.rand(N, 1, generator=g) * 0.05)  # groups off centre
            linear.bias.normal_(0, 0.1, generator=g)
        q = QuantLinear.from_linear(linear, method, group)
        w = q.dequantized(torch.float64)
        for M in (1, 3, 8):
            x = torch.randn(M, 1, K, generator=g).to(dtype)
            for bias in (q.bias.to(dtype), None):
                got = kernels.gemv_quant(x, q.qweight, q.scales, q.zeros, bias)
                assert got.shape == (M, 1, N) and got.dtype == dtype
                want = F.linear(x.double(), w, None if bias is None else bias.double())
                # float32 sums; int4 may meet float32 inputs rounded to bfloat16 (the CPU's bfloat16 dot product):
                # 2^-9 of each |x|; a bfloat16 result rounds once more
                spread = x.double().abs() @ w.abs().t() + (0 if bias is None else bias.double().abs())
                rounding = 2**-8 if method == "int4" and dtype == torch.float32 else 1e-5
                bound = rounding * spread + (2**-8 * want.abs() if dtype == torch.bfloat16 else 0) + 1e-6
                assert ((got.double() - want).abs() <= bound).all(), (method, group, N, K, M, float((got.double() - want).abs().max()))


def test_gemv_quant_refuses_codes_that_do_not_fit():
    from gptlab.compress.quantize import QuantLinear

    q8, q4 = QuantLinear.from_linear(torch.nn.Linear(64, 8), "int8"), QuantLinear.from_linear(torch.nn.Linear(64, 8), "int4", 32)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match=r"int4 codes must be \[8, 32\] with scales \[8, groups\] for groups of a multiple of 32"):
        kernels.gemv_quant(x, q4.qweight, q4.scales.repeat(1, 2), q4.zeros.repeat(1, 2), None)  # groups of 16
    with pytest.raises(RuntimeError, match="int8 codes must be"):
        kernels.gemv_quant(x, q8.qweight, q8.scales, q8.scales, None)
    with pytest.raises(RuntimeError, match="float32 scales"):
        kernels.gemv_quant(x, q8.qweight, q8.scales.double(), None, None)
    with pytest.raises(RuntimeError, match="the bias must be"):
        kernels.gemv_quant(x, q8.qweight, q8.scales, None, torch.zeros(8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="int8 or packed int4"):
        kernels.gemv_quant(x, torch.randn(8, 64), q8.scales, None, None)


# option sets for decode_layers: GPT-2; GPT-1's post-LN with ReLU; the llama stack; grouped and multi-query heads with
# QK-norm; exact GELU with sinusoidal positions; relu^2; head widths without a register version (20) and heads pruned
# narrower than the model (head_size); per-layer attention scales; Llama 3.1's and YaRN's RoPE scalings
DECODE_OPTIONS = [
    {},
    {"norm_placement": "post", "activation": "relu"},
    {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "gated", "activation": "silu", "bias": False, "tie_weights": False},
    {"n_kv_head": 2, "qk_norm": True},
    {"pos_encoding": "rope", "n_kv_head": 1, "qk_norm": True, "norm": "rmsnorm"},
    {"activation": "gelu", "pos_encoding": "sinusoidal"},
    {"activation": "relu2", "n_embd": 60, "n_head": 3},
    {"head_size": 16, "n_head": 3, "scale_attn_by_inverse_layer_idx": True},
    {"pos_encoding": "rope", "rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_context": 16, "n_kv_head": 2, "norm": "rmsnorm"},
    {"pos_encoding": "rope", "rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_context": 16, "qk_norm": True, "norm": "rmsnorm"},
]


@pytest.mark.parametrize("options", DECODE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "gpt2")
def test_decode_layers_compute_the_models_cached_forward(options):
    import copy

    from gptlab.config import GPTConfig
    from gptlab.generate import NativeDecoder, tune_linears
    from gptlab.model import GPT, CacheStep, KVCache

    torch.manual_seed(3)
    # weights 10x GPT-2's init: activations of order 1, where the nonlinearities bend (at 0.02 they are nearly linear)
    cfg = GPTConfig(**{"vocab_size": 97, "block_size": 48, "n_layer": 3, "n_head": 4, "n_embd": 64, "init_std": 0.2, **options})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms' gains and biases away from 1 and 0, where a missing one would show
                p.add_(torch.randn_like(p) * 0.3)
    exact = copy.deepcopy(model).double()
    B, S = 3, 20
    history = torch.randn(2, cfg.n_layer, B, cfg.kv_heads, S, cfg.head_dim)  # earlier tokens' keys and values
    for T in (1, 2):  # a decode step, and a speculative verification's few tokens
        start = torch.tensor([0, 7, 13])  # row 0 has no history: its token sees only itself
        idx = torch.randint(0, cfg.vocab_size, (B, T))
        errors = {}

        def step_in(dtype):
            cache = KVCache(cfg, B, S, dtype, "cpu")
            cache.k.copy_(history[0]), cache.v.copy_(history[1])
            return CacheStep(cache, T, start, 13 + T)

        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            step = step_in(dtype)
            cache = step.cache
            with torch.no_grad():
                if dtype == torch.float64:
                    want, want_cache = exact.forward_cached(idx, step), cache
                    continue
                cast = copy.deepcopy(model).to(dtype)
                torch_path = cast.forward_cached(idx, step_in(dtype)) if dtype == torch.bfloat16 else None
                view, _ = tune_linears(cast, (B * T,))
                assert NativeDecoder.applies(view)
                got = NativeDecoder(view)(idx, step)
            assert got.shape == (B, T, cfg.vocab_size) and got.dtype == dtype
            errors[dtype] = float((got.double() - want).abs().max()) / float(want.abs().max())
            rows = torch.arange(B)[:, None]
            written = (cache.k[:, rows, :, step.slots].double() - want_cache.k[:, rows, :, step.slots]).abs().max()
            if dtype == torch.float32:
                assert errors[dtype] < 2e-6 and written < 1e-5, (errors, written)
                assert torch.equal(cache.k[:, :, :, 13 + T :].double(), want_cache.k[:, :, :, 13 + T :])  # nothing else written
            else:  # hidden states kept in float32: no worse than PyTorch's own bfloat16 path
                assert errors[dtype] <= 1.5 * float((torch_path.double() - want).abs().max()) / float(want.abs().max()) + 1e-3, errors


@pytest.mark.parametrize("scheme", [("int8", 128, True), ("int4", 32, True), ("int4", 128, False)], ids=["int8", "int4-32", "int4-128-head-float"])
@pytest.mark.parametrize("arch", [{}, {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "gated", "activation": "silu", "bias": False, "n_kv_head": 2}],
                         ids=["gpt2", "llama"])  # fmt: skip
def test_decode_layers_run_quantized_weights_as_their_dequantized_floats(scheme, arch):
    import copy

    from gptlab.compress.quantize import QuantConfig, quantize_model, set_kernel
    from gptlab.config import GPTConfig
    from gptlab.generate import NativeDecoder, tune_linears
    from gptlab.model import GPT, CacheStep, KVCache

    torch.manual_seed(4)
    cfg = GPTConfig(vocab_size=130, block_size=48, n_layer=2, n_head=4, n_embd=128, init_std=0.2, **arch)
    model = GPT(cfg).eval()
    quantize_model(model, QuantConfig(scheme[0], scheme[1], head=scheme[2]))
    history = torch.randn(2, cfg.n_layer, 2, cfg.kv_heads, 16, cfg.head_dim)
    idx, start = torch.randint(0, cfg.vocab_size, (2, 1)), torch.tensor([3, 11])

    def logits(run, kernel):
        set_kernel(model, kernel)
        cache = KVCache(cfg, 2, 16, torch.float32, "cpu")
        cache.k.copy_(history[0]), cache.v.copy_(history[1])
        with torch.no_grad():
            return run(idx, CacheStep(cache, 1, start, 12)).double()

    want = logits(model.forward_cached, "reference")  # the dequantized float32 weights through F.linear
    view, _ = tune_linears(copy.deepcopy(model), (2,))
    assert NativeDecoder.applies(view)
    got = logits(NativeDecoder(view), "auto")
    error = float((got - want).abs().max() / want.abs().max())
    if scheme[0] == "int8":  # float32 inputs against float32 widened codes: summation order only
        assert error < 2e-6, error
    else:  # inputs rounded to bfloat16 where the CPU's bfloat16 dot product runs int4: no worse than torch's packed kernel's
        packed = float((logits(model.forward_cached, "packed") - want).abs().max() / want.abs().max())
        assert error <= max(1.5 * packed, 1e-3), (error, packed)


def test_decode_layers_refuse_parameters_and_inputs_that_do_not_fit():
    from gptlab.config import GPTConfig
    from gptlab.generate import NativeDecoder, tune_linears
    from gptlab.model import GPT, CacheStep, KVCache

    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    view, _ = tune_linears(GPT(cfg).eval(), (1,))
    dec = NativeDecoder(view)
    cache = KVCache(cfg, 1, 8, torch.float32, "cpu")
    step = CacheStep(cache, 1, torch.tensor([3]), 4)
    x = torch.randn(1, 1, 16)

    def call(params=dec.params, cache_k=cache.k, slots=step.slots, activation="gelu_tanh", norm="layernorm", x=x):
        return kernels.decode_layers(x, params, cache_k, cache.v, slots, step.mask, None, dec.scales, 2, norm, activation, False, True, 1e-5)

    assert call().shape == (1, 1, 16)
    with pytest.raises(RuntimeError, match="50 parameters for 2 layers, got 49"):
        call(params=dec.params[:-1])
    attn = next(i for i, p in enumerate(dec.params) if p is view.transformer.h[0].attn.c_attn.weight)  # after the norms' eight
    assert attn == 8
    with pytest.raises(RuntimeError, match=r"layer 0 attn.c_attn: weight must be \[48, 16\], got \[48, 15\]"):
        call(params=dec.params[:attn] + [dec.params[attn][:, :15].contiguous()] + dec.params[attn + 1 :])
    with pytest.raises(RuntimeError, match="layer 0 attn.c_attn: a contiguous weight is required"):
        call(params=dec.params[:attn] + [None] + dec.params[attn + 1 :])
    with pytest.raises(RuntimeError, match=r"parameter 0 \(a norm's\) must be"):
        call(params=[None] + dec.params[1:])
    with pytest.raises(RuntimeError, match="slot 8 outside a cache of 8"):
        call(slots=torch.tensor([[8]]))
    with pytest.raises(RuntimeError, match="the cache must be"):
        call(cache_k=cache.k[:1])
    with pytest.raises(RuntimeError, match="no activation named swish"):
        call(activation="swish")
    with pytest.raises(RuntimeError, match="no norm named batchnorm"):
        call(norm="batchnorm")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        call(x=x.double())


def test_a_failed_build_warns_once_is_remembered_and_leaves_pytorchs_kernels(tmp_path, monkeypatch):
    from gptlab.config import GPTConfig
    from gptlab.generate import Engine, native_applies
    from gptlab.model import GPT

    monkeypatch.setenv("GPTLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")  # a "compiler" that always fails
    kernels.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the native kernels failed"):
            assert not kernels.load()
        assert list((tmp_path / "native").glob("*.failed")) and not list((tmp_path / "native").glob("*.so*"))
        kernels.load.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the remembered failure: no second build, no second warning
            assert not kernels.load()
        model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
        assert not native_applies(model)
        engine = Engine(model, tune=[1])
        assert "native" not in engine.plan.times[1] and engine.attention is None
        monkeypatch.setenv("GPTLAB_NATIVE", "0")
        kernels.load.cache_clear()
        assert not kernels.load()
    finally:
        kernels.load.cache_clear()
        monkeypatch.undo()
        assert kernels.load()  # rebuilt state for the other tests: the real library, already loaded
