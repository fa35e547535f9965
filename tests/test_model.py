"""The GPT model: causality, initialisation, loss and errors (parity with HF transformers is in test_hf.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, tokens

from gptlab.config import GPTConfig
from gptlab.errors import ConfigError, InputError
from gptlab.model import GPT, cross_entropy, label_logprobs, sinusoidal_positions, target_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return GPTConfig(**{**base, **overrides})


def make(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


# ----------------------------------------------------------------------------- causality and loss


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_logits_at_t_ignore_later_tokens(norm: str, pos: str) -> None:
    cfg = tiny(norm_placement=norm, pos_encoding=pos)
    model = make(cfg).eval()
    randomize_(model, seed=1)
    idx = tokens((2, cfg.block_size), cfg.vocab_size, seed=2)
    with torch.no_grad():
        logits, _ = model(idx)
        for t in (0, 5, cfg.block_size - 2):
            changed = idx.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(cfg.block_size - t - 1)) % cfg.vocab_size
            new_logits, _ = model(changed)
            torch.testing.assert_close(new_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
            # the change is visible from t+1 on, so the comparison above can fail
            assert (new_logits[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4


def test_initial_loss_is_log_vocab() -> None:
    cfg = GPTConfig(vocab_size=1000, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = make(cfg)
    idx = tokens((8, 32), 1000, seed=3)
    _, loss = model(idx, tokens((8, 32), 1000, seed=4))
    assert abs(loss.item() - math.log(1000)) < 0.1


def test_overfits_one_batch() -> None:
    cfg = tiny(vocab_size=32, n_layer=2, n_embd=32, n_head=4)
    model = make(cfg)
    idx = tokens((4, cfg.block_size), cfg.vocab_size, seed=5)
    targets = torch.roll(idx, -1, dims=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_loss_matches_torch_cross_entropy_with_ignored_targets() -> None:
    cfg = tiny()
    model = make(cfg)
    idx = tokens((3, cfg.block_size), cfg.vocab_size, seed=6)
    targets = tokens((3, cfg.block_size), cfg.vocab_size, seed=7)
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


# the native kernel (kernels/train.cpp) and the chunked PyTorch path; vocabularies that leave 16- and 32-lane tails, and
# logits spread wide enough that an unshifted e^x would overflow float32
LOSS_CASES = [("chunked", 53, 3.0), ("native", 53, 3.0), ("native", 1000, 3.0), ("native", 1000, 40.0)]


@pytest.fixture
def native_loss(request):
    if request.node.callspec.params["case"][0] == "native":
        from gptlab import kernels

        if not kernels.load():
            pytest.skip("no native kernels here (no C++ compiler)")


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{c[0]}-V{c[1]}-x{c[2]:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype: torch.dtype, case, native_loss) -> None:
    kernel, V, spread = case
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(37, V, generator=g) * spread).to(dtype)
    targets = torch.randint(0, V, (37,), generator=g)
    targets[[0, 5, 36]] = -100
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = cross_entropy(ours, targets, chunk_elems=4 * V, kernel=kernel)  # chunked: 4 rows per chunk, 10 chunks, the last partial
    # autocast's reference: float32 softmax, gradient rounded back to the logits' dtype
    expected = F.cross_entropy(ref.float(), targets, ignore_index=-100)
    (loss * 2.5).backward()
    (expected * 2.5).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6 * spread)
    assert ours.grad.dtype == dtype
    assert ours.grad[[0, 5, 36]].abs().max() == 0
    # float32's e^(x - lse) is good to ~|x - lse| ulps, so the bound grows with the logits' spread
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-7 * spread / 3 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{c[0]}-V{c[1]}-x{c[2]:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_match_log_softmax_and_gather(dtype: torch.dtype, case, native_loss) -> None:
    kernel, V, spread = case
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(37, V, generator=g) * spread).to(dtype)
    targets = torch.randint(0, V, (37,), generator=g)
    targets[[0, 5, 36]] = -100
    weights = torch.randn(37, generator=g)  # any downstream use: each row's gradient scales with its own weight
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    picked = target_logprobs(ours, targets, chunk_elems=4 * V, kernel=kernel)
    valid = targets != -100
    expected = torch.log_softmax(ref.float(), -1).gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1) * valid
    (picked * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(picked, expected, rtol=1e-6, atol=1e-6 * spread)
    assert picked[[0, 5, 36]].abs().max() == 0 and ours.grad[[0, 5, 36]].abs().max() == 0
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-6 * spread / 3 if dtype == torch.float32 else 1e-2)


def test_the_native_loss_refuses_a_target_outside_the_vocabulary_and_auto_takes_it_in_training() -> None:
    from gptlab import kernels

    if not kernels.load():
        pytest.skip("no native kernels here (no C++ compiler)")
    with pytest.raises(RuntimeError, match="target 53 outside a vocabulary of 53"):
        target_logprobs(torch.randn(4, 53), torch.tensor([1, 2, 53, 0]), kernel="native")
    with pytest.raises(ValueError, match="kernel must be one of auto, native, chunked"):
        target_logprobs(torch.randn(4, 53), torch.tensor([1, 2, 3, 0]), kernel="fused")
    logits = torch.randn(4, 53, requires_grad=True)
    assert target_logprobs(logits, torch.tensor([1, 2, 3, 0])).grad_fn.name() == "_NativeTargetLogProbsBackward"


def test_label_logprobs_run_the_head_only_at_labels_and_match_the_full_logits() -> None:
    cfg = tiny()
    model = make(cfg)
    idx = tokens((3, 12), cfg.vocab_size, seed=10)
    y = torch.full((3, 12), -100)
    y[0, 4:9], y[2, 1:3] = idx[0, 5:10], idx[2, 2:4]  # row 1 has no labels
    full = model(idx)[0]
    assert model(idx, logits_at=y != -100)[0].shape == (7, cfg.vocab_size)
    ours = label_logprobs(model, idx, y)
    expected = torch.log_softmax(full, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    grad, ref_grad = (torch.autograd.grad(v.sum(), model.transformer.h[0].attn.c_attn.weight)[0] for v in (ours, expected))
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="logits_at must be a boolean mask"):
        model(idx, torch.roll(idx, -1, 1), logits_at=y != -100)


# ----------------------------------------------------------------------------- initialisation and parameters


def test_init_follows_gpt2() -> None:
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=256)
    model = make(cfg)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - residual_std) / residual_std < 0.03, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - cfg.init_std) / cfg.init_std < 0.03, name
        elif "ln_" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        else:
            assert name.endswith(".bias") and not p.any(), name
        if p.dim() == 2:
            assert abs(p.mean().item()) < 5 * p.std().item() / math.sqrt(p.numel()), name


def test_weight_tying_shares_storage() -> None:
    tied = make(tiny(tie_weights=True))
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    untied = make(tiny(tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def test_the_tied_tables_gradient_is_the_dense_sum_whether_the_lookups_part_is_sparse_or_not(monkeypatch) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    x[0, :8] = 7  # a row read many times: the sparse rows repeat and must add up
    lookups = []
    real_embedding = F.embedding
    monkeypatch.setattr(F, "embedding", lambda *args, **kw: lookups.append(kw.get("sparse", False)) or real_embedding(*args, **kw))
    model(x, y)[1].backward()
    monkeypatch.setattr(F, "embedding", real_embedding)
    assert lookups == [True]  # a training forward on CPU looks the tied table up with a sparse gradient
    got = model.transformer.wte.weight.grad
    assert got.layout == torch.strided  # the head's dense gradient with the lookup's rows added: what AdamW takes
    model.zero_grad(set_to_none=True)
    dense_embed = GPT.embed
    monkeypatch.setattr(GPT, "embed", lambda self, idx, positions, sparse_grad=False: dense_embed(self, idx, positions, False))
    model(x, y)[1].backward()
    want = model.transformer.wte.weight.grad
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    monkeypatch.setattr(GPT, "embed", dense_embed)
    model.zero_grad(set_to_none=True)
    model.embed(x, torch.arange(32), sparse_grad=True)[0].sum().backward()
    assert model.transformer.wte.weight.grad.is_sparse  # the lookup alone: the rows it read, sparse
    model.zero_grad(set_to_none=True)
    model.hidden_states(x).sum().backward()  # no head (reward and task heads): the lookup's gradient stays dense
    assert model.transformer.wte.weight.grad.layout == torch.strided


def test_num_params_hand_count() -> None:
    V, T, L, C = 61, 16, 2, 16
    ln = 2 * C
    layer = ln + (C * 3 * C + 3 * C) + (C * C + C) + ln + (C * 4 * C + 4 * C) + (4 * C * C + C)
    wte, wpe = V * C, T * C
    model = make(tiny())
    assert model.num_params(non_embedding=False) == wte + wpe + L * layer + ln
    assert model.num_params() == wte + L * layer + ln  # the tied table is also the output matmul
    untied = make(tiny(tie_weights=False))
    assert untied.num_params(non_embedding=False) == 2 * wte + wpe + L * layer + ln
    assert untied.num_params() == wte + L * layer + ln  # the head stays, the looked-up table goes
    no_bias = make(tiny(bias=False, pos_encoding="sinusoidal", n_inner=24))
    layer_nb = C + C * 3 * C + C * C + C + C * 24 + 24 * C
    assert no_bias.num_params(non_embedding=False) == wte + L * layer_nb + C
    assert "pos_table" not in no_bias.state_dict()  # fixed sinusoids are not saved
    assert model.flops_per_token() == 6 * (wte + L * layer + ln) + 12 * L * C * T


def test_sinusoidal_positions_match_vaswani_formula() -> None:
    pe = sinusoidal_positions(50, 8)
    pos, i = 37, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


# ----------------------------------------------------------------------------- errors and dropout


def test_sequence_longer_than_block_size_is_an_input_error() -> None:
    model = make(tiny())
    with pytest.raises(InputError, match="sequence length 17 exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bad", [61, -3])
def test_out_of_range_token_is_an_input_error(bad: int) -> None:
    model = make(tiny())
    idx = torch.zeros(2, 8, dtype=torch.long)
    idx[1, 3] = bad
    with pytest.raises(InputError, match=f"token id {bad} is out of range"):
        model(idx)


def test_out_of_range_target_is_an_input_error() -> None:
    model = make(tiny())
    idx = torch.zeros(2, 8, dtype=torch.long)
    targets = torch.full((2, 8), -100)
    targets[0, 2] = -7
    with pytest.raises(InputError, match="target -7 is out of range"):
        model(idx, targets)


def test_indivisible_heads_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="n_embd"):
        GPTConfig(n_embd=10, n_head=3)


def test_dropout_is_random_in_training_only() -> None:
    model = make(tiny(dropout=0.2))
    idx = tokens((2, 16), 61, seed=9)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_attention_scaling_options() -> None:
    """scale_attn_weights=False drops 1/sqrt(hs); scale_attn_by_inverse_layer_idx divides layer i's scores by i+1."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16)
    base = make(tiny()).eval()
    for fields, scale in ((dict(scale_attn_weights=False), 1.0), (dict(scale_attn_by_inverse_layer_idx=True), 8**-0.5 / 2)):
        other = GPT(tiny(**fields)).eval()
        other.load_state_dict(base.state_dict())
        attn, ref = other.transformer.h[1].attn, base.transformer.h[1].attn
        q, k, v = ref.c_attn(x).split(16, dim=2)
        q, k, v = (t.view(2, 16, 2, 8).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2).reshape(2, 16, 16)
        with torch.no_grad():
            assert torch.allclose(attn(x), ref.c_proj(y), atol=1e-6)


def test_upcast_attention_is_exact_in_float32_and_runs_in_bf16() -> None:
    base, upcast = make(tiny()).eval(), make(tiny(upcast_attn=True)).eval()
    idx = tokens((2, 16), 61, seed=3)
    with torch.no_grad():
        assert torch.equal(base(idx)[0], upcast(idx)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = upcast(idx)[0]
    assert torch.isfinite(logits).all() and (logits.float() - base(idx)[0]).abs().max() < 0.1


@pytest.mark.parametrize("nkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("T", [1, 7, 64])
def test_explicit_attention_is_as_close_to_exact_as_pytorchs_bf16_kernel(nkv: int, T: int) -> None:
    """Output and all three input gradients, against SDPA in float64 on the same bf16 inputs: no worse than 1.5x the
    error of PyTorch's own bf16 SDPA (its CPU flash kernel) plus a bf16 ulp at the values' scale."""
    from gptlab.model import explicit_attention

    g = torch.Generator().manual_seed(T * 10 + nkv)
    q = (torch.randn(2, 4, T, 16, generator=g) * 2).bfloat16()  # scores spread over ~+-16: softmax far from uniform
    k, v = ((torch.randn(2, nkv, T, 16, generator=g) * 2).bfloat16() for _ in range(2))
    grad_out = torch.randn(2, 4, T, 16, generator=g).bfloat16()

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        y = fn(*inputs)
        y.backward(grad_out.to(dtype))
        return [y.detach()] + [t.grad for t in inputs]

    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=0.25, enable_gqa=nkv != 4)  # noqa: E731
    exact = run(sdpa, torch.float64)
    ours = run(lambda a, b, c: explicit_attention(a, b, c, 0.25), torch.bfloat16)
    theirs = run(sdpa, torch.bfloat16)
    for name, e, o, t in zip(("out", "dq", "dk", "dv"), exact, ours, theirs, strict=True):
        assert o.dtype == torch.bfloat16 and o.shape == e.shape
        err, ref_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 1.5 * ref_err + e.abs().max().item() * 2**-8, f"{name}: {err:.4f} vs PyTorch's {ref_err:.4f}"


def test_a_cpu_bf16_training_forward_takes_explicit_attention_and_matches_sdpa(monkeypatch) -> None:
    import gptlab.model as model_module

    bf16 = dict(dtype=torch.bfloat16)
    assert model_module.explicit_attention_applies(torch.zeros(64, 1, 512, 1, **bf16))  # 2^24 probabilities a layer
    assert not model_module.explicit_attention_applies(torch.zeros(65, 1, 512, 1, **bf16))  # more to keep: the flash kernel
    assert not model_module.explicit_attention_applies(torch.zeros(1, 1, 513, 1, **bf16))  # past the measured bound
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=2)
    model = GPT(cfg)
    x = tokens((2, 32), 97, seed=3)
    calls = []
    real = model_module.explicit_attention
    monkeypatch.setattr(model_module, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, loss = model(x, x)
        loss.backward()
        assert len(calls) == cfg.n_layer
        with torch.no_grad():  # evaluation keeps PyTorch's kernel
            model(x)
        assert len(calls) == cfg.n_layer
        monkeypatch.setattr(model_module, "EXPLICIT_ATTENTION_MAX_T", 16)  # past the bound: PyTorch's kernel
        theirs, _ = model(x, x)
    assert len(calls) == cfg.n_layer
    assert (ours.float() - theirs.float()).abs().max() < 0.05
    assert not model_module.explicit_attention_applies(torch.zeros(1, 1, 8, 4))  # float32: PyTorch's kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_gelu_tanh_and_its_gradient_match_pytorchs(dtype: torch.dtype) -> None:
    """Against F.gelu(approximate="tanh") in float64: within PyTorch's own error in the same dtype, plus an ulp."""
    from gptlab import kernels
    from gptlab.model import GELUTanh

    if not kernels.load():
        pytest.skip("no native kernels here (no C++ compiler)")
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(3, 1001, generator=g) * 3, torch.linspace(-12, 12, 3003).view(3, 1001)]).to(dtype)  # 1001: a 9-element tail
    grad = torch.randn(x.shape, generator=g).to(dtype)

    def run(fn, t):
        t = t.clone().requires_grad_()
        y = fn(t)
        y.backward(grad.to(t.dtype))
        return y.detach().double(), t.grad.double()

    exact = run(lambda t: F.gelu(t, approximate="tanh"), x.double())
    ours = run(GELUTanh(), x)
    theirs = run(lambda t: F.gelu(t, approximate="tanh"), x)
    ulp = 1e-7 if dtype == torch.float32 else 2**-8
    for o, t, e in zip(ours, theirs, exact, strict=True):
        assert ((o - e).abs() <= 1.5 * (t - e).abs().max() + ulp * e.abs().clamp(min=1)).all()
    assert GELUTanh()(x[:, :5].clone().requires_grad_()).grad_fn.name() == "_NativeGeluTanhBackward"
