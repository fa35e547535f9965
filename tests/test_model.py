"""The GPT model: causality, initialisation, loss, errors, and parity with HF transformers' GPT-2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import GPTConfig
from gptlab.errors import CheckpointError, ConfigError, InputError
from gptlab.hf import config_from_hf_gpt2, config_to_hf_gpt2, state_dict_from_hf_gpt2, state_dict_to_hf_gpt2
from gptlab.model import GPT, cross_entropy, sinusoidal_positions

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine each op can wait milliseconds for the second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return GPTConfig(**{**base, **overrides})


def make(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Perturb every parameter, so zero biases and unit LayerNorm gains cannot hide a mapping error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tokens(shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(37, 53, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 53, (37,), generator=g)
    targets[[0, 5, 36]] = -100
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = cross_entropy(ours, targets, chunk_elems=4 * 53)  # 4 rows per chunk: 10 chunks, the last partial
    # autocast's reference: float32 softmax, gradient rounded back to the logits' dtype
    expected = F.cross_entropy(ref.float(), targets, ignore_index=-100)
    (loss * 2.5).backward()
    (expected * 2.5).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert ours.grad.dtype == dtype
    assert ours.grad[[0, 5, 36]].abs().max() == 0
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-3)


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


# ----------------------------------------------------------------------------- Hugging Face GPT-2 parity

HF_CASES = {
    "gelu_new-tied": dict(activation_function="gelu_new"),
    "gelu-n_inner": dict(activation_function="gelu", n_inner=40),
    "relu-untied": dict(activation_function="relu", tie_word_embeddings=False),
    "gelu_pytorch_tanh-eps": dict(activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-3),
}


def hf_model(attn: str, seed: int, **fields):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=97, n_positions=24, n_embd=32, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, attn_implementation=attn, **fields,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_cfg).float().eval()
    randomize_(model, seed)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_gpt2_parity(case: str, attn: str) -> None:
    hf = hf_model(attn, seed=10, **HF_CASES[case])
    cfg = config_from_hf_gpt2(hf.config.to_dict())
    model = GPT(cfg).eval()
    model.load_state_dict(state_dict_from_hf_gpt2(hf.state_dict(), cfg))
    assert (model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()) == cfg.tie_weights

    idx = tokens((3, 24), 97, seed=11)
    targets = torch.cat([idx[:, 1:], torch.full((3, 1), -100)], dim=1)  # HF shifts labels inside the model
    with torch.no_grad():
        out = hf(idx, labels=idx)
        logits, loss = model(idx, targets)
    assert (logits - out.logits).abs().max() <= 1e-4
    assert abs(loss.item() - out.loss.item()) <= 1e-5

    hf_sd = hf.state_dict()
    back = state_dict_to_hf_gpt2(state_dict_from_hf_gpt2(hf_sd, cfg), cfg)
    assert back.keys() == hf_sd.keys()
    for key, value in hf_sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_gptlab_model_runs_in_hf() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = tiny(vocab_size=97, n_embd=32, n_head=4, activation="gelu", tie_weights=False)
    model = make(cfg).eval()
    randomize_(model, seed=12)
    hf_cfg = config_to_hf_gpt2(cfg)
    hf = GPT2LMHeadModel(GPT2Config(**hf_cfg)).eval()
    hf.load_state_dict(state_dict_to_hf_gpt2(model.state_dict(), cfg))
    assert config_from_hf_gpt2(hf.config.to_dict()) == cfg
    idx = tokens((2, 16), 97, seed=13)
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


def test_hf_checkpoint_without_prefix_or_head_loads() -> None:
    """The original gpt2 weights are a GPT2Model state dict: no "transformer." and no lm_head, plus mask buffers."""
    hf = hf_model("sdpa", seed=14)
    cfg = config_from_hf_gpt2(hf.config.to_dict())
    bare = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 24, 24)
    sd = state_dict_from_hf_gpt2(bare, cfg)
    reference = state_dict_from_hf_gpt2(hf.state_dict(), cfg)
    assert sd.keys() == reference.keys() and all(torch.equal(sd[k], reference[k]) for k in sd)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(activation_function="swish"), "activation_function"),
        (dict(resid_pdrop=0.1, attn_pdrop=0.0), "attn_pdrop"),
        (dict(n_ctx=512, n_positions=1024), "n_ctx"),
        (dict(model_type="gpt_neo"), "model_type"),
    ],
)
def test_unsupported_hf_config_is_named(fields: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        config_from_hf_gpt2(fields)


def test_hf_config_defaults_are_gpt2_small() -> None:
    cfg = config_from_hf_gpt2({"model_type": "gpt2", "vocab_size": 50257})
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout) == (12, 12, 768, 1024, 0.1)
    assert cfg.activation == "gelu_tanh" and cfg.tie_weights


@pytest.mark.parametrize(("field", "value"), [("bias", False), ("pos_encoding", "sinusoidal"), ("norm_placement", "post")])
def test_non_gpt2_config_has_no_hf_form(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        config_to_hf_gpt2(tiny(**{field: value}))


def test_bad_state_dicts_are_checkpoint_errors() -> None:
    cfg = tiny()
    sd = state_dict_to_hf_gpt2(make(cfg).state_dict(), cfg)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(CheckpointError, match="transformer.h.1.mlp.c_fc.bias"):
        state_dict_from_hf_gpt2(missing, cfg)
    with pytest.raises(CheckpointError, match="unexpected key.*extra"):
        state_dict_from_hf_gpt2({**sd, "extra": torch.zeros(1)}, cfg)
    with pytest.raises(CheckpointError, match="c_attn.weight has shape"):
        state_dict_from_hf_gpt2({**sd, "transformer.h.0.attn.c_attn.weight": torch.zeros(48, 16)}, cfg)
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        state_dict_from_hf_gpt2({**sd, "lm_head.weight": torch.zeros(61, 16)}, cfg)
