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


def test_a_failed_build_warns_once_is_remembered_and_leaves_pytorchs_kernels(tmp_path, monkeypatch):
    from gptlab.config import GPTConfig
    from gptlab.generate import Engine, native_applies
    from gptlab.model import GPT

    monkeypatch.setenv("GPTLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")  # a "compiler" that always fails
    kernels.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the native decode kernel failed"):
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
