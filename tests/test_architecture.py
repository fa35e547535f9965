"""The modern architecture options of GPTConfig (RoPE, RMSNorm, gated MLPs, ReLU^2, grouped-query attention,
QK-norm, the llama preset) against closed forms and hand computations, and every option through cached decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, tokens

from gptlab.config import ARCHITECTURES, GPTConfig, SampleConfig
from gptlab.errors import ConfigError
from gptlab.generate import Engine, generate_uncached
from gptlab.model import GPT, MLP, KVCache, apply_rope, rope_angles, rope_frequencies, scale_rope_frequencies

TINY = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)

# every option alone and the combinations a modern model uses (GQA 2 and multi-query, with and without RoPE)
OPTIONS = {
    "rope": dict(pos_encoding="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="gated", activation="silu"),
    "relu2": dict(activation="relu2"),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "qk_norm": dict(qk_norm=True),
    "llama": dict(ARCHITECTURES["llama"]),
    "llama+gqa+qk_norm": dict(ARCHITECTURES["llama"], n_kv_head=2, qk_norm=True),
    "post-ln+rmsnorm+rope": dict(norm_placement="post", norm="rmsnorm", pos_encoding="rope"),
    "llama+llama3-rope-scaling": dict(ARCHITECTURES["llama"], n_kv_head=2, rope_scaling="llama3", rope_factor=8.0, rope_original_context=64),
    "llama+yarn-rope-scaling": dict(ARCHITECTURES["llama"], qk_norm=True, rope_scaling="yarn", rope_factor=4.0, rope_original_context=16),
}


def model_for(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **changes})).double().eval()
    randomize_(model, seed + 1)  # gains and biases away from 1 and 0, so a mapping error cannot hide
    return model


# ----------------------------------------------------------------------------- RoPE


def test_rope_frequencies_and_rotation_match_the_complex_closed_form():
    hs, theta = 8, 500.0
    inv = rope_frequencies(hs, theta)
    assert torch.allclose(inv.double(), torch.tensor([theta ** (-2 * i / hs) for i in range(hs // 2)], dtype=torch.float64), rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, hs, generator=g)  # (B, T, nh, hs)
    positions = torch.tensor([0, 1, 7, 30, 63])
    got = apply_rope(x, *rope_angles(inv, positions))
    # pair (x_i, x_{i + hs/2}) is the complex number z_i; RoPE multiplies it by e^{i m theta_i} (Su et al. 2021, eq. 13)
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2 :].double())  # (B, T, nh, hs/2)
    angle = positions.double()[:, None] * inv.double()  # (T, hs/2)
    want = z * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    assert torch.allclose(got.double(), torch.cat([want.real, want.imag], dim=-1), atol=1e-5)


def test_rope_keeps_norms_and_scores_depend_only_on_the_offset():
    hs = 16
    inv = rope_frequencies(hs, 10000.0).double()
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, hs, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, hs, generator=g, dtype=torch.float64)

    def at(x: torch.Tensor, m: int) -> torch.Tensor:
        return apply_rope(x, *rope_angles(inv, torch.tensor([m])))[0, 0, 0]

    for m in (0, 3, 100, 1000):
        assert math.isclose(float(at(q, m).norm()), float(q.norm()), rel_tol=1e-12)  # a rotation
    # q_m . k_n depends on m - n only (Su et al. 2021, eq. 16)
    for offset in (0, 1, 5, 37):
        scores = [float(at(q, n + offset) @ at(k, n)) for n in (0, 4, 19, 250)]
        assert max(scores) - min(scores) < 1e-9, (offset, scores)
    assert abs(float(at(q, 5) @ at(k, 0)) - float(at(q, 6) @ at(k, 0))) > 1e-3  # and it does depend on the offset


def test_rope_scaling_is_its_formula():
    hs, theta, L, factor = 16, 10000.0, 64, 8.0
    inv = rope_frequencies(hs, theta)  # wavelengths 2 pi / f from 6.3 to ~1.9e4 positions
    assert torch.equal(scale_rope_frequencies(inv, GPTConfig(**TINY, pos_encoding="rope")), inv)
    linear = scale_rope_frequencies(inv, GPTConfig(**TINY, pos_encoding="rope", rope_scaling="linear", rope_factor=factor))
    assert torch.allclose(linear.double(), inv.double() / factor, rtol=1e-7)
    cfg = GPTConfig(**TINY, pos_encoding="rope", rope_scaling="llama3", rope_factor=factor, rope_original_context=L,
                    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)  # fmt: skip
    got = scale_rope_frequencies(inv, cfg).double()
    kinds = set()
    for f, g in zip(inv.double().tolist(), got.tolist(), strict=True):  # Llama 3.1's rule, case by case
        wavelength = 2 * math.pi / f
        if wavelength < L / 4.0:  # fast waves (local order) are kept
            want, kind = f, "kept"
        elif wavelength > L / 1.0:  # waves that never completed a turn in training slow down by the factor
            want, kind = f / factor, "slowed"
        else:
            smooth = (L / wavelength - 1.0) / (4.0 - 1.0)
            want, kind = (1 - smooth) * f / factor + smooth * f, "blended"
        kinds.add(kind)
        assert math.isclose(g, want, rel_tol=1e-6), (wavelength, g, want)
    assert kinds == {"kept", "slowed", "blended"}
    model = GPT(cfg)  # the model turns its heads (8 wide) by them
    assert torch.equal(model.rope_inv_freq, scale_rope_frequencies(rope_frequencies(cfg.head_dim, theta), cfg))


def test_yarn_rope_scaling_is_its_formula():
    """YaRN by hand for a 16-wide head, theta 100, 32 original positions, betas 4 and 0.5: pair i turns
    32 * 100^(-i/8) / 2 pi times, which crosses 4 turns at i = 0.42 and 0.5 turns at i = 4.03, so with the bounds
    rounded outwards pair 0 keeps its speed, pairs 5-7 slow down by the factor and pairs 1-4 blend at i / 5."""
    hs, theta, L, factor = 16, 100.0, 32, 4.0
    inv = rope_frequencies(hs, theta)
    fields = dict(TINY, pos_encoding="rope", rope_theta=theta, head_size=hs, rope_scaling="yarn", rope_factor=factor,
                  rope_original_context=L, rope_beta_fast=4.0, rope_beta_slow=0.5)  # fmt: skip
    got = scale_rope_frequencies(inv, GPTConfig(**fields)).double()
    for i, (f, g) in enumerate(zip(inv.double().tolist(), got.tolist(), strict=True)):
        r = min(i / 5, 1.0)  # 0: kept, 1: slowed by the factor
        assert math.isclose(g, (1 - r) * f + r * f / factor, rel_tol=1e-6), (i, g)
    # without rounding the blend runs from 0.4203 to 4.0326 (clamped at pair 0 below)
    low = hs * math.log(L / (2 * math.pi * 4.0)) / (2 * math.log(theta))
    high = hs * math.log(L / (2 * math.pi * 0.5)) / (2 * math.log(theta))
    exact = scale_rope_frequencies(inv, GPTConfig(**fields, rope_truncate=False)).double()
    for i, (f, g) in enumerate(zip(inv.double().tolist(), exact.tolist(), strict=True)):
        r = min(max((i - low) / (high - low), 0.0), 1.0)
        assert math.isclose(g, (1 - r) * f + r * f / factor, rel_tol=1e-6), (i, g)
    # the attention temperature: q.k times (0.1 ln 4 + 1)^2 by default, or the given factor squared
    model = GPT(GPTConfig(**fields))
    assert math.isclose(model.transformer.h[0].attn.scale, hs**-0.5 * (0.1 * math.log(factor) + 1) ** 2, rel_tol=1e-12)
    model = GPT(GPTConfig(**fields, rope_attention_factor=1.5))
    assert math.isclose(model.transformer.h[1].attn.scale, hs**-0.5 * 2.25, rel_tol=1e-12)
    assert GPTConfig(**dict(fields, rope_scaling="linear"), rope_attention_factor=1.5).rope_attention_scale == 1.0  # yarn's alone


def test_rope_scaling_settings_are_checked():
    with pytest.raises(ConfigError, match="rope_scaling='llama3' needs pos_encoding='rope', got 'learned'"):
        GPTConfig(**TINY, rope_scaling="llama3")
    with pytest.raises(ConfigError, match="rope_scaling must be one of none, linear, llama3, yarn"):
        GPTConfig(**TINY, pos_encoding="rope", rope_scaling="dynamic")
    with pytest.raises(ConfigError, match="0 < rope_beta_slow <= rope_beta_fast, got 32.0 and 1.0"):
        GPTConfig(**TINY, pos_encoding="rope", rope_scaling="yarn", rope_beta_fast=1.0, rope_beta_slow=32.0)
    with pytest.raises(ConfigError, match="rope_attention_factor must be a positive number or None, got 0"):
        GPTConfig(**TINY, pos_encoding="rope", rope_scaling="yarn", rope_attention_factor=0)
    with pytest.raises(ConfigError, match="rope_truncate must be true or false, got 'no'"):
        GPTConfig(**TINY, pos_encoding="rope", rope_scaling="yarn", rope_truncate="no")
    with pytest.raises(ConfigError, match="rope_factor must be in"):
        GPTConfig(**TINY, pos_encoding="rope", rope_scaling="linear", rope_factor=0.5)
    with pytest.raises(ConfigError, match="0 < rope_low_freq_factor < rope_high_freq_factor, got 4.0 and 1.0"):
        GPTConfig(**TINY, pos_encoding="rope", rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)


def test_rope_model_has_no_position_table_and_odd_head_widths_are_refused():
    model = GPT(GPTConfig(**TINY, pos_encoding="rope"))
    assert "transformer.wpe.weight" not in model.state_dict() and "rope_inv_freq" not in model.state_dict()  # recomputed, not stored
    with pytest.raises(ConfigError, match="must be even for rotary"):
        GPTConfig(**{**TINY, "n_embd": 36, "n_head": 4}, pos_encoding="rope")  # head width 9
    with pytest.raises(ConfigError, match="rope_theta"):
        GPTConfig(**TINY, rope_theta=1.0)


# ----------------------------------------------------------------------------- norms and MLPs


def test_rmsnorm_is_its_formula():
    model = model_for(norm="rmsnorm")
    norm = model.transformer.h[0].ln_1
    assert isinstance(norm, torch.nn.RMSNorm) and not hasattr(norm, "bias")
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    eps = model.config.layer_norm_eps
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight  # Zhang & Sennrich 2019, eq. 4
    assert torch.allclose(norm(x), want, atol=1e-12)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu2"])
def test_gated_mlp_is_its_formula_and_relu2_is_relu_squared(activation):
    cfg = GPTConfig(**TINY, mlp="gated", activation=activation)
    assert cfg.mlp_dim == 128 and GPTConfig(**TINY, mlp="gated", n_inner=40).mlp_dim == 40  # 8/3 * 32 -> 86 -> 128 (multiple of 64)
    mlp = MLP(cfg).double()
    randomize_(mlp, 3)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    Wg, Wu = mlp.c_fc.weight[:128], mlp.c_fc.weight[128:]  # [gate; up] in one matrix
    bg, bu = mlp.c_fc.bias[:128], mlp.c_fc.bias[128:]
    act = {"silu": lambda t: t * torch.sigmoid(t), "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu2": lambda t: t.clamp(min=0) ** 2}[activation]
    want = (act(x @ Wg.T + bg) * (x @ Wu.T + bu)) @ mlp.c_proj.weight.T + mlp.c_proj.bias  # Shazeer 2020, eq. 6
    assert torch.allclose(mlp(x), want, atol=1e-12)
    plain = MLP(GPTConfig(**TINY, activation="relu2")).double()
    assert torch.allclose(plain.act(torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)), torch.tensor([0.0, 0.0, 9.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- grouped-query attention


def test_gqa_with_one_kv_head_per_query_head_is_multi_head_attention():
    a, b = model_for(n_kv_head=4), model_for()
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    idx = tokens((2, 20), 97, 0)
    assert torch.equal(a(idx)[0], b(idx)[0])


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_equals_multi_head_attention_with_each_kv_head_repeated(n_kv_head):
    gqa = model_for(n_kv_head=n_kv_head, pos_encoding="rope", qk_norm=True)
    mha = model_for(pos_encoding="rope", qk_norm=True)
    sd = dict(gqa.state_dict())
    C, hs, group = 32, 8, 4 // n_kv_head
    for i in range(2):
        for name in ("weight", "bias"):
            t = sd[f"transformer.h.{i}.attn.c_attn.{name}"]
            q, k, v = t.split([C, n_kv_head * hs, n_kv_head * hs])
            # each key/value head's rows once for every query head of its group
            k, v = (x.view(n_kv_head, hs, *x.shape[1:]).repeat_interleave(group, dim=0).reshape(C, *x.shape[1:]) for x in (k, v))
            sd[f"transformer.h.{i}.attn.c_attn.{name}"] = torch.cat([q, k, v])
    mha.load_state_dict(sd)
    idx = tokens((2, 24), 97, 1)
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-10)
    cache = KVCache(gqa.config, 3, 16, torch.float32, "cpu")  # the KV cache shrinks by the group size
    assert cache.k.shape == (2, 3, n_kv_head, 16, hs) and cache.k.numel() * group == KVCache(mha.config, 3, 16, torch.float32, "cpu").k.numel()


def test_gqa_needs_a_divisor_of_the_heads():
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        GPTConfig(**TINY, n_kv_head=3)


# ----------------------------------------------------------------------------- every option end to end


@pytest.mark.parametrize("name", list(OPTIONS))
def test_cached_decoding_equals_full_recompute_for_every_option(name, one_thread):
    model = model_for(**OPTIONS[name])
    prompts = tokens((3, 7), 97, 2)
    want = generate_uncached(model, prompts, 12)
    got = Engine(model).generate(prompts.tolist(), SampleConfig(max_new_tokens=12, temperature=0, ignore_eot=True))
    assert [c.token_ids for c in got] == want.tolist()
    # packed sequences: each gets the logits it gets alone (positions restart, so do the rotary angles)
    a, b = tokens((1, 9), 97, 3), tokens((1, 6), 97, 4)
    packed = model(torch.cat([a, b], 1), segments=torch.tensor([[0] * 9 + [1] * 6]))[0]
    assert torch.allclose(packed[0, :9], model(a)[0][0], atol=1e-10) and torch.allclose(packed[0, 9:], model(b)[0][0], atol=1e-10)


@pytest.mark.parametrize("name", ["llama+gqa+qk_norm", "mqa", "rope"])
def test_measured_kernels_speculative_decoding_and_bf16_for_modern_options(name, one_thread):
    model = model_for(**OPTIONS[name]).float()
    prompts = tokens((2, 5), 97, 5).tolist()
    cfg = SampleConfig(max_new_tokens=10, temperature=0, ignore_eot=True, logprobs=0)
    want = Engine(model, onednn=False).generate(prompts, cfg)
    tuned = Engine(model, tune=[2])  # the native decode kernels where built: GQA in the cached attention
    draft = model_for(seed=9, **OPTIONS[name]).float()
    speculative = Engine(model, draft=draft, tune=[2])  # the draft's steps through the native attention as well
    for got in (tuned.generate(prompts, cfg), speculative.generate(prompts, cfg), Engine(model, draft=draft).generate(prompts, cfg)):
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert max(abs(x - y) for c, d in zip(got, want, strict=True) for x, y in zip(c.logprobs, d.logprobs, strict=True)) < 1e-4
    bf16 = Engine(model, dtype=torch.bfloat16, tune=[2]).generate(prompts, cfg)
    assert max(abs(x - y) for c, d in zip(bf16, want, strict=True) for x, y in zip(c.logprobs[:2], d.logprobs[:2], strict=True)) < 0.1


def test_modern_models_train_and_export_as_llama_or_qwen3_or_say_why_not(tmp_path):
    from gptlab.hf import config_to_hf, hf_expressible

    model = model_for(**OPTIONS["llama+gqa+qk_norm"]).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = tokens((4, 33), 97, 6)
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied, as the preset says
    sd, cfg = hf_expressible(model.state_dict(), model.config)  # QK-norm: Qwen3's class (test_hf_llama: parity)
    assert config_to_hf(cfg)["architectures"] == ["Qwen3ForCausalLM"] and sd.keys() == model.state_dict().keys()
    with pytest.raises(ConfigError, match="pos_encoding='learned': HF's Llama class needs pos_encoding='rope'"):
        config_to_hf(GPTConfig(**TINY, n_kv_head=2))


def test_the_llama_preset_through_the_cli_and_a_pruned_gated_mlp(tmp_path, data_dir, capsys):
    from gptlab.checkpoint import find_checkpoint, read_checkpoint_meta
    from gptlab.cli import main
    from gptlab.compress.prune import PruneConfig, prune_model

    out = tmp_path / "run"
    code = main(["train", "--data", str(data_dir), "--out", str(out), "--arch", "llama", "--n-kv-head", "2", "--n-layer", "1", "--n-head", "4",
                 "--n-embd", "32", "--block-size", "32", "--batch-size", "2", "--max-steps", "3", "--eval-batches", "1", "--device", "cpu", "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    saved = GPTConfig.from_dict(read_checkpoint_meta(find_checkpoint(out))["model_config"])
    assert (saved.pos_encoding, saved.norm, saved.mlp, saved.activation, saved.bias, saved.tie_weights, saved.n_kv_head) == (
        "rope", "rmsnorm", "gated", "silu", False, False, 2
    )
    model = model_for(**OPTIONS["llama"])
    calib = tokens((4, 16), 97, 7)
    pruned, info = prune_model(model, PruneConfig(sparsity=0.5, method="wanda", structured="mlp"), calib)
    assert pruned.config.n_inner == 64 and pruned.transformer.h[0].mlp.c_fc.weight.shape == (128, 32)  # gate and up halves kept together
    assert torch.isfinite(pruned(calib)[0]).all()
    with pytest.raises(ConfigError, match="grouped-query"):
        prune_model(model_for(n_kv_head=2), PruneConfig(sparsity=0.5, method="magnitude", structured="heads"))


def test_lora_on_a_llama_model_merges_exactly_and_its_peft_export_says_what_to_do(tmp_path):
    from gptlab.finetune.lora import LoRAConfig, apply_lora, merge_lora, write_peft_files

    model = model_for(**OPTIONS["llama+gqa+qk_norm"]).float()
    cfg = LoRAConfig(r=4, alpha=8.0)
    apply_lora(model, cfg, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))  # B starts at 0: make the update real
    idx = tokens((2, 12), 97, 8)
    adapted = model(idx)[0]
    with pytest.raises(ConfigError, match="merge the adapters into the weights and export-hf"):
        write_peft_files(tmp_path, model, cfg, "base")
    assert torch.allclose(merge_lora(model)(idx)[0], adapted, atol=1e-5)  # W + (alpha / r) B A, summed in another order
