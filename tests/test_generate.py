import json
import math
import shutil

import pytest
import torch
from conftest import tokens

from gptlab.config import GPTConfig, SampleConfig
from gptlab.errors import ConfigError, InputError
from gptlab.generate import (
    NATIVE_MAX_ROWS,
    Engine,
    KernelPlan,
    OneDNNLinear,
    TunedLinear,
    SamplingControls,
    TokenHistory,
    accept_or_resample,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    generate_uncached,
    greedy_argmax,
    min_p_filter,
    native_applies,
    top_k_filter,
    top_p_filter,
)
from gptlab.model import GPT, CacheStep, KVCache
from gptlab.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
NEG = float("-inf")
V = 97


# ----------------------------------------------------------------------------- sampling controls


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0]])
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[NEG, 4.0, NEG, 3.0], [4.0, 3.0, NEG, NEG]]))
    assert torch.equal(top_k_filter(logits, 10), logits)
    per_row = top_k_filter(logits, torch.tensor([[1], [4]]))
    assert torch.equal(per_row, torch.tensor([[NEG, 4.0, NEG, NEG], [4.0, 3.0, 2.0, 1.0]]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.8) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept(0.81) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # the top token always survives
    two = top_p_filter(torch.cat([logits, logits]), torch.tensor([[0.5], [0.81]]))
    assert torch.isfinite(two).tolist() == [[False, True, False, False], [False, True, True, True]]


def test_min_p_keeps_tokens_above_a_share_of_the_top_one():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert torch.isfinite(min_p_filter(logits, 0.5)).tolist() == [[True, True, True, False]]  # 0.1 < 0.5 * 0.4
    assert torch.isfinite(min_p_filter(logits, 0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(min_p_filter(logits, 0.0)).all()
    assert torch.isfinite(min_p_filter(logits, 1.0)).tolist() == [[True, False, False, False]]


def test_penalties_bias_and_temperature_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    counts = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    # logit - frequency * count - presence * [count > 0]
    expected = torch.tensor([[2.0, -1.0 - 0.5 * 3 - 0.25, 0.5 - 0.5 - 0.25, 3.0]])
    assert torch.allclose(apply_presence_frequency(logits, counts, 0.25, 0.5), expected)
    assert torch.equal(apply_logit_bias(logits, torch.tensor([[0.0, 5.0, 0.0, -100.0]])), torch.tensor([[2.0, 4.0, 0.5, -97.0]]))
    assert torch.equal(apply_temperature(logits, 0.5), logits * 2)


def test_composed_distribution_matches_the_hand_computed_one():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]])
    cfg = SampleConfig(temperature=0.5, top_k=3, top_p=0.95)
    # by hand: T=0.5 -> logits*2; top-3 keeps ids 1,2,3 with weights e^2, e^4, e^6 (probabilities
    # 0.0159, 0.1173, 0.8668); top-p 0.95 keeps the smallest set reaching 0.95, ids 3 and 2 (0.984)
    w = torch.tensor([0.0, 0.0, math.e**4, math.e**6, 0.0])
    probs = SamplingControls([cfg], 5, torch.device("cpu")).probs(logits, None)
    assert torch.allclose(probs[0], w / w.sum(), atol=1e-6)
    # min-p 0.2 on top of that drops id 2: e^4 / e^6 = 0.135 < 0.2
    probs = SamplingControls([cfg.replace(min_p=0.2)], 5, torch.device("cpu")).probs(logits, None)
    assert torch.allclose(probs[0], torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    # penalties come before greedy: id 3 seen with penalty 4 -> 0.75 < 2.0
    hist = TokenHistory([[3]], 5, torch.device("cpu"))
    greedy = SamplingControls([SampleConfig(temperature=0, repetition_penalty=4.0)], 5, torch.device("cpu"))
    assert greedy.next_tokens(logits, hist).tolist() == [2]
    # and the draws follow the distribution
    many = SamplingControls([cfg.replace(seed=0)], 5, torch.device("cpu"))
    draws = torch.cat([many.draw(many.probs(logits, None).expand(20_000, -1).contiguous()[i : i + 1]) for i in range(20_000)])
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert torch.allclose(freq, (w / w.sum()).double(), atol=0.015)


def test_speculative_rule_gives_the_target_distribution():
    p = torch.tensor([0.1, 0.6, 0.0, 0.3])
    q = torch.tensor([0.4, 0.2, 0.3, 0.1])
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(q, n, replacement=True, generator=g)
    u = torch.rand(n, generator=g)
    ok, residual = accept_or_resample(p.expand(n, -1), q.expand(n, -1), x, u)
    resampled = torch.multinomial(residual, 1, generator=g).squeeze(-1)
    out = torch.where(ok, x, resampled)
    freq = torch.bincount(out, minlength=4).double() / n
    assert torch.allclose(freq, p.double(), atol=0.006)
    assert not bool(ok[x == 2].any())  # a token the target never picks is never accepted


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=256, n_layer=2, n_head=2, n_embd=32)).double().eval()


@pytest.fixture(scope="module")
def draft():
    torch.manual_seed(1)
    return GPT(GPTConfig(vocab_size=V, block_size=256, n_layer=1, n_head=2, n_embd=16)).double().eval()


def mixed_prompts(n: int, seed: int = 1) -> list[list[int]]:
    lengths = [5, 17, 1, 30, 9, 12, 3, 25][:n]
    return [tokens((1, length), V, seed=seed + i)[0].tolist() for i, length in enumerate(lengths)]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_cached_greedy_equals_full_recompute_for_200_tokens(model, batch):
    prompts = mixed_prompts(batch)
    out = Engine(model).generate(prompts, SampleConfig(max_new_tokens=200, temperature=0))
    for p, c in zip(prompts, out, strict=True):
        assert c.token_ids == generate_uncached(model, torch.tensor([p]), 200)[0].tolist()
        assert c.finish_reason == "length"


@pytest.mark.parametrize(
    "variant",
    [dict(norm_placement="post"), dict(pos_encoding="sinusoidal", bias=False, tie_weights=False), dict(scale_attn_by_inverse_layer_idx=True, activation="relu")],
)
def test_cached_logits_equal_the_full_forward_for_every_architecture(variant):
    torch.manual_seed(2)
    m = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32, **variant)).double().eval()
    seq = tokens((3, 40), V, seed=4)
    lengths = [7, 12, 3]
    with torch.no_grad():
        full = m(seq)[0]  # (3, 40, V)
        cache = KVCache(m.config, 3, 40, torch.float64, "cpu")
        prompts = torch.stack([torch.where(torch.arange(12) < n, seq[i, :12], 0) for i, n in enumerate(lengths)])
        first = m.forward_cached(prompts, CacheStep(cache, 12, None, 12), torch.tensor(lengths) - 1)
        assert torch.allclose(first, full[torch.arange(3), torch.tensor(lengths) - 1], atol=1e-10)
        pos = torch.tensor(lengths)
        for _ in range(20):  # two tokens per step, at each row's own positions
            step = CacheStep(cache, 2, pos, int(pos.max()) + 2)
            out = m.forward_cached(seq[torch.arange(3)[:, None], pos[:, None] + torch.arange(2)], step)
            assert torch.allclose(out, full[torch.arange(3)[:, None], pos[:, None] + torch.arange(2)], atol=1e-10)
            pos = pos + torch.tensor([2, 1, 2])  # row 1 rewrites its second slot next step, as speculative decoding does
            if int(pos.max()) + 2 > 40:
                break


def test_static_shapes_give_the_same_tokens(model):
    prompts = mixed_prompts(3)
    cfg = SampleConfig(max_new_tokens=40, temperature=0)
    a = Engine(model).generate(prompts, cfg)
    b = Engine(model, static=True).generate(prompts, cfg)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_each_row_of_a_batch_equals_the_prompt_run_alone(model):
    prompts = mixed_prompts(4)
    cfgs = [
        SampleConfig(max_new_tokens=30, temperature=0),
        SampleConfig(max_new_tokens=25, temperature=0.9, top_k=20, seed=5),
        SampleConfig(max_new_tokens=30, temperature=1.2, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=6),
        SampleConfig(max_new_tokens=12, temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={3: 2.0}, seed=7),
    ]
    engine = Engine(model)
    together = engine.generate(prompts, cfgs)
    for p, c, t in zip(prompts, cfgs, together, strict=True):
        alone = engine.generate([p], c)[0]
        assert alone.token_ids == t.token_ids
        assert len(t.token_ids) == c.max_new_tokens


def test_a_prompt_repeated_in_a_batch_is_prefilled_once(model, monkeypatch):
    """n samples of one prompt (a GRPO group): the prefill runs each distinct prompt once, copies its keys and
    values to every row that asks it, and each row still samples what the prompt run alone samples."""
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8], [5, 6, 7, 8], [9, 10]]
    cfgs = [SampleConfig(max_new_tokens=15, temperature=1.0, seed=s, logprobs=0) for s in range(len(prompts))]
    engine = Engine(model)
    forward, shapes = engine.model.forward_cached, []

    def counted(idx, step, *args):
        shapes.append(tuple(idx.shape))
        return forward(idx, step, *args)

    monkeypatch.setattr(engine.model, "forward_cached", counted)  # engine.model may be the shared fixture itself
    together = engine.generate(prompts, cfgs)
    assert shapes[0] == (2, 4)  # two distinct prompts, padded to the longer
    for p, c, t in zip(prompts, cfgs, together, strict=True):
        alone = engine.generate([p], c)[0]
        assert alone.token_ids == t.token_ids and alone.logprobs == pytest.approx(t.logprobs, abs=1e-5)
    assert len({tuple(together[i].token_ids) for i in (0, 2, 3)}) > 1  # seeds differ: the rows are not one sample copied


def test_seeded_sampling_repeats_and_seeds_differ(model):
    engine = Engine(model)
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0, top_k=50, seed=123)
    a, b = engine.generate([[1, 2, 3]], cfg), engine.generate([[1, 2, 3]], cfg)
    assert a[0].token_ids == b[0].token_ids
    assert a[0].token_ids != engine.generate([[1, 2, 3]], cfg.replace(seed=124))[0].token_ids


def test_logprobs_are_the_models_own(model):
    prompt = [4, 8, 15, 16]
    out = Engine(model).generate([prompt], SampleConfig(max_new_tokens=10, temperature=0.8, seed=0, logprobs=3))[0]
    seq = prompt + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq]))[0][0], -1)  # (T, V)
    for i, tok in enumerate(out.token_ids):
        row = ref[len(prompt) - 1 + i]
        assert out.logprobs[i] == pytest.approx(float(row[tok]), abs=1e-9)
        top = out.top_logprobs[i]
        assert [t for t, _ in top] == torch.topk(row, 3).indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-9)


def test_stop_token_ends_its_row_only(model):
    prompts = mixed_prompts(2)
    cfg = SampleConfig(max_new_tokens=20, temperature=0)
    free = Engine(model).generate(prompts, cfg)
    stop = free[0].token_ids[5]
    out = Engine(model).generate(prompts, [cfg.replace(stop_token_ids=(stop,)), cfg])
    first = free[0].token_ids.index(stop)
    assert out[0].token_ids == free[0].token_ids[: first + 1] and out[0].finish_reason == "stop"
    assert out[1].token_ids == free[1].token_ids and out[1].finish_reason == "length"


def test_speculative_greedy_is_the_target_alone(model, draft):
    prompts = mixed_prompts(3)
    cfg = SampleConfig(max_new_tokens=60, temperature=0)
    ref = Engine(model).generate(prompts, cfg)
    spec = Engine(model, draft=draft, draft_tokens=3)
    assert [c.token_ids for c in spec.generate(prompts, cfg)] == [c.token_ids for c in ref]
    assert 0 < spec.stats.acceptance_rate < 1
    same = Engine(model, draft=model, draft_tokens=4)
    assert [c.token_ids for c in same.generate(prompts, cfg)] == [c.token_ids for c in ref]
    assert same.stats.acceptance_rate == 1.0


def test_speculative_sampling_reproduces_with_a_seed_and_returns_logprobs(model, draft):
    engine = Engine(model, draft=draft)
    cfg = SampleConfig(max_new_tokens=40, temperature=1.0, top_k=30, repetition_penalty=1.2, seed=9, logprobs=0)
    a, b = engine.generate(mixed_prompts(2), cfg), engine.generate(mixed_prompts(2), cfg)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.token_ids) == 40 == len(c.logprobs) for c in a)
    seq = mixed_prompts(1)[0] + a[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq]))[0][0], -1)
    p = len(mixed_prompts(1)[0])
    assert a[0].logprobs == pytest.approx([float(ref[p - 1 + i, t]) for i, t in enumerate(a[0].token_ids)], abs=1e-9)


def test_context_overflow_is_an_error_or_a_sliding_window(model):
    block = model.config.block_size
    with pytest.raises(InputError, match=r"has 257 tokens but the model's context \(block_size\) is 256"):
        Engine(model).generate([[1] * 257], SampleConfig(max_new_tokens=1))
    prompt = tokens((1, block - 2), V, seed=3)[0].tolist()
    cfg = SampleConfig(max_new_tokens=10, temperature=0)
    full = Engine(model).generate([prompt], cfg)[0]
    assert len(full.token_ids) == 3 and full.finish_reason == "length"  # positions 0..255 used, the last token never fed
    slid = Engine(model).generate([prompt], cfg.replace(context_overflow="slide", max_new_tokens=80))[0]
    assert slid.token_ids[:3] == full.token_ids and len(slid.token_ids) == 80
    # the reference: when the context would pass block_size it restarts from the newest 3/4 of
    # it (192 tokens) and grows again, here twice; each token recomputed from scratch
    seq, lo = list(prompt), 0
    for _ in range(80):
        if len(seq) - lo > block:
            lo = len(seq) - 192
        seq.append(int(generate_uncached(model, torch.tensor([seq[lo:]]), 1)[0, 0]))
    assert slid.token_ids == seq[len(prompt) :]
    spec = Engine(model, draft=model).generate([prompt], cfg.replace(context_overflow="slide", max_new_tokens=80))[0]
    assert spec.token_ids == slid.token_ids
    long = Engine(model).generate([[5] * 400], cfg.replace(context_overflow="slide"))[0]
    assert len(long.token_ids) == 10


def test_bad_requests_fail_before_any_work(model):
    engine = Engine(model)
    with pytest.raises(InputError, match="empty"):
        engine.generate([[]], SampleConfig())
    with pytest.raises(InputError, match="prompt 1 has token id 97"):
        engine.generate([[1], [97]], SampleConfig())
    with pytest.raises(ConfigError, match="stop strings need a tokenizer"):
        engine.generate([[1]], SampleConfig(stop=("x",)))
    with pytest.raises(ConfigError, match="logit_bias token id 500"):
        engine.generate([[1]], SampleConfig(logit_bias={500: 1.0}))
    with pytest.raises(ConfigError, match="2 sample configs for 1 prompts"):
        engine.generate([[1]], [SampleConfig(), SampleConfig()])
    for bad in (dict(min_p=1.5), dict(repetition_penalty=0.0), dict(stop="x"), dict(stop=("",)), dict(logprobs=21),
                dict(context_overflow="wrap"), dict(logit_bias={"a": 1}), dict(top_p=0.0), dict(temperature=-1.0)):  # fmt: skip
        with pytest.raises(ConfigError):
            SampleConfig(**bad)
    assert SampleConfig(logit_bias={"50256": -100}).logit_bias == {50256: -100.0}  # JSON keys are strings


def test_onednn_linears_share_the_weights_and_compute_the_same_function(model):
    fp32 = GPT(model.config).eval()
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    engine = Engine(fp32)
    assert any(isinstance(m, OneDNNLinear) for m in engine.model.modules()) and engine.model is not fp32
    assert not any(isinstance(m, OneDNNLinear) for m in fp32.modules())
    ours, theirs = dict(engine.model.named_parameters()), dict(fp32.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)  # shared, not copied
    cfg = SampleConfig(max_new_tokens=50, temperature=0, logprobs=0)
    a = engine.generate(mixed_prompts(3), cfg)
    b = Engine(fp32, onednn=False).generate(mixed_prompts(3), cfg)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert max(abs(x - y) for c, d in zip(a, b, strict=True) for x, y in zip(c.logprobs, d.logprobs, strict=True)) < 1e-5


def test_greedy_argmax_equals_torch_argmax_with_ties_nan_and_short_chunks():
    g = torch.Generator().manual_seed(0)
    for V in (7, 1023, 1024, 1025, 50257):
        x = torch.randn(6, V, generator=g)
        x[1, :] = 0.5  # every logit tied: the first index
        x[2, V // 3] = x[2, V - 1] = 100.0  # tied maxima in different chunks, the second in the short last chunk
        x[3, V - 1] = 100.0  # the maximum in the short last chunk
        x[4, V // 2] = float("nan")  # NaN counts as the maximum, as torch.argmax has it
        x[5, :] = float("-inf")
        assert torch.equal(greedy_argmax(x), x.argmax(-1)), V
        wide = torch.randn(3, 1, V + 47, generator=g)[:, 0, :V]  # a non-contiguous slice of padded logits
        assert torch.equal(greedy_argmax(wide), wide.argmax(-1))
    ints = torch.randint(0, 5, (64, 4096), generator=g).float()  # many ties everywhere
    assert torch.equal(greedy_argmax(ints), ints.argmax(-1))


def test_tuned_linears_pick_a_measured_kernel_per_batch_size_and_compute_the_same_function(model):
    fp32 = GPT(model.config).eval()
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    engine = Engine(fp32, tune=[1, 3])
    plan = engine.plan
    assert plan is not None and plan.sizes == [1, 3] and set(plan.times) == {1, 3}
    native = ("native",) if native_applies(fp32) else ()
    assert native or shutil.which("c++") is None, "with a compiler here the native kernels must build and be measured"
    assert all(k in ("blas", "transposed", "onednn", "packed", "onednn-packed") + native and plan.times[M][k] == min(plan.times[M].values()) for M, k in zip(plan.sizes, plan.kernels, strict=True))
    assert any(isinstance(m, TunedLinear) for m in engine.model.modules()) and not any(isinstance(m, TunedLinear) for m in fp32.modules())
    assert (engine.decoder is not None) == bool(native)  # with the native kernels, decode steps run every layer in one call
    ours, theirs = dict(engine.model.named_parameters()), dict(fp32.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)  # shared, not copied
    cfg = SampleConfig(max_new_tokens=30, temperature=0, logprobs=0)
    want = Engine(fp32, onednn=False).generate(mixed_prompts(3), cfg)
    kernels = ("blas", "transposed", "onednn", "packed", "onednn-packed") + native
    for layer in engine.model.modules():
        if isinstance(layer, TunedLinear):
            layer.make_copies(kernels)
    for kernel in kernels:  # each kernel, forced: 3 rows per decode step, more in the prefill (past the largest size tuned)
        plan.kernels = [kernel] * len(plan.sizes)
        got = engine.generate(mixed_prompts(3), cfg)
        assert [c.token_ids for c in got] == [c.token_ids for c in want], kernel
        assert max(abs(x - y) for c, d in zip(got, want, strict=True) for x, y in zip(c.logprobs, d.logprobs, strict=True)) < 1e-5
    # bfloat16: the kernels it can run, forced one by one, agree with F.linear to bf16 rounding
    bf16 = Engine(fp32, dtype=torch.bfloat16, tune=[1, 3])
    tuned = [m for m in bf16.model.modules() if isinstance(m, TunedLinear)]
    usable = ["blas", "transposed"] + (["onednn-packed"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []) + list(native)
    for layer in tuned:
        layer.make_copies(usable)
    bf16.plan.kernels = ["blas"] * 2
    base = bf16.generate(mixed_prompts(3), cfg)
    for kernel in usable:
        bf16.plan.kernels = [kernel] * 2
        got = bf16.generate(mixed_prompts(3), cfg)
        assert max(abs(x - y) for c, d in zip(got, base, strict=True) for x, y in zip(c.logprobs[:3], d.logprobs[:3], strict=True)) < 0.1, kernel
    picks = KernelPlan([16, 1, 4], "blas")
    picks.kernels = ["a", "b", "c"]  # sizes sorted: 1, 4, 16
    assert [picks.pick(M) for M in (1, 2, 4, 5, 16, 17, 500)] == ["a", "b", "b", "c", "c", "c", "c"]
    picks.kernels, picks.gemm = ["native"] * 3, "onednn"  # past NATIVE_MAX_ROWS (a prefill) the native kernel gives way
    assert [picks.pick(M) for M in (1, NATIVE_MAX_ROWS, NATIVE_MAX_ROWS + 1, 500)] == ["native", "native", "onednn", "onednn"]
    with pytest.raises(ConfigError, match="do not also set onednn"):
        Engine(fp32, tune=[1], onednn=True)
    with pytest.raises(ConfigError, match="batch sizes >= 1"):
        Engine(fp32, tune=[0])


def test_a_measured_plan_is_kept_per_machine_and_model_shape_and_reused_without_measuring(model, tmp_path, monkeypatch):
    import gptlab.generate as gen

    fp32 = GPT(model.config).eval()
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    cache = tmp_path / "plans" / "kernel_plans.json"
    first = Engine(fp32, tune=[1, 4], plan_cache=cache).plan
    stored = json.loads(cache.read_text())["plans"]
    assert len(stored) == 1 and next(iter(stored.values()))["kernels"] == first.kernels
    real_close = gen._close
    monkeypatch.setattr(gen, "_close", lambda *a: pytest.fail("a cached plan must not be measured again"))
    again = Engine(fp32, tune=[1, 4], plan_cache=cache)
    assert again.plan.kernels == first.kernels and set(again.plan.times) == {1, 4}
    want = Engine(fp32, onednn=False).generate(mixed_prompts(3), SampleConfig(max_new_tokens=12, temperature=0))
    assert [c.token_ids for c in again.generate(mixed_prompts(3), SampleConfig(max_new_tokens=12, temperature=0))] == [c.token_ids for c in want]
    monkeypatch.setattr(gen, "_close", real_close)
    Engine(fp32, tune=[2], plan_cache=cache)  # other batch sizes, another plan
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # other threads: another plan too
    Engine(fp32, tune=[2], plan_cache=cache)
    assert len(json.loads(cache.read_text())["plans"]) == 3
    cache.write_text("{not json")  # a damaged file costs a measurement, never a failure, and is rewritten
    Engine(fp32, tune=[1], plan_cache=cache)
    assert len(json.loads(cache.read_text())["plans"]) == 1


def test_engine_leaves_the_model_as_it_was(model):
    model.train()
    Engine(model, dtype=torch.float32).generate([[1, 2]], SampleConfig(max_new_tokens=3))
    assert model.training and next(model.parameters()).dtype == torch.float64
    model.eval()


# ----------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def gpt2_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=16)).eval()


def test_stop_string_across_token_boundaries(gpt2_model):
    tok = load_tokenizer("gpt2")
    engine = Engine(gpt2_model, tok)
    cfg = SampleConfig(max_new_tokens=40, temperature=1.0, seed=4, ignore_eot=True)
    free = engine.generate(["Hello there"], cfg)[0]
    pieces = [tok.decode([t]) for t in free.token_ids]
    cut = len("".join(pieces[:6]))
    stop = free.text[cut - 1 : cut + 1]  # last char of token 6 and first of token 7
    expected = free.text[: free.text.index(stop)]
    events = list(engine.stream(["Hello there"], cfg.replace(stop=(stop, "never-seen-stop"))))
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])
    assert [e.token_id for e in events] == free.token_ids[: len(events)]


def test_streamed_text_is_whole_characters_and_adds_up(gpt2_model):
    tok = load_tokenizer("gpt2")
    engine = Engine(gpt2_model, tok)
    # favour the byte tokens of "🎉" (a lead byte and continuation bytes): many characters split
    # across tokens, some completed and some never
    bias = dict.fromkeys(tok.encode("🎉") + tok.encode(" 🎉"), 6.0)
    cfg = SampleConfig(max_new_tokens=120, temperature=1.0, seed=1, ignore_eot=True, logit_bias=bias)
    events = list(engine.stream(["日本語 "], cfg))
    ids = [e.token_id for e in events]
    assert "".join(e.text for e in events) == tok.decode(ids)
    assert any(e.text == "" for e in events)  # some tokens ended inside a character and were held back
    text = "héllo wörld 日本語 🎉🎉 naïve"
    stream = tok.stream()
    parts = [stream.push(i) for i in tok.encode(text)] + [stream.flush()]
    assert "".join(parts) == text and "\ufffd" not in "".join(parts)


def test_eot_ends_a_row_and_is_not_in_the_text(gpt2_model):
    tok = load_tokenizer("gpt2")
    cfg = SampleConfig(max_new_tokens=5, temperature=0, logit_bias={tok.eot_id: 100.0})
    out = Engine(gpt2_model, tok).generate(["a"], cfg)[0]
    assert out.token_ids == [tok.eot_id] and out.text == "" and out.finish_reason == "stop"
