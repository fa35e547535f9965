"""Llama-format interop: gptlab models with the modern options against transformers' LlamaForCausalLM, and with
QK-norm against Qwen3ForCausalLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: the reference must be there, not skipped
from conftest import randomize_, small_text_corpus, tokens

from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.config import ARCHITECTURES, GPTConfig, SampleConfig
from gptlab.errors import CheckpointError, ConfigError
from gptlab.generate import Engine
from gptlab.hf import config_from_hf, config_to_hf, export_hf, import_hf, load_hf, state_dict_from_hf, state_dict_to_hf
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

VOCAB, CTX = 300, 48
LLAMA = ARCHITECTURES["llama"]
# random configs: GQA, multi-query, tied and untied heads, biases, an explicit head width, another activation and base
CASES = {
    "gqa-untied": dict(LLAMA, n_kv_head=2),
    "mqa-tied": dict(LLAMA, n_kv_head=1, tie_weights=True, rope_theta=500.0),
    "mha-bias": dict(LLAMA, bias=True, n_inner=40),
    "gqa-head-width": dict(LLAMA, n_kv_head=2, head_size=12, activation="gelu_tanh"),
    "relu2": dict(LLAMA, activation="relu2", layer_norm_eps=1e-6),
    "qwen3-gqa-qk-norm": dict(LLAMA, n_kv_head=2, qk_norm=True, layer_norm_eps=1e-6),
    "qwen3-tied-head-width": dict(LLAMA, qk_norm=True, tie_weights=True, head_size=12),
    # head width 8: wavelengths 6.3, 63, 628 and 6283 positions, so with 64 original positions one frequency is kept,
    # one blended and two slowed by Llama 3.1's rule
    "llama3-rope-scaling": dict(LLAMA, n_kv_head=2, rope_scaling="llama3", rope_factor=8.0, rope_original_context=64),
    "linear-rope-scaling": dict(LLAMA, rope_scaling="linear", rope_factor=4.0),
    "qwen3-llama3-rope-scaling": dict(LLAMA, qk_norm=True, rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=2.0,
                                      rope_high_freq_factor=8.0, rope_original_context=128),  # fmt: skip
    # head width 16 at theta 100 over 16 original positions: YaRN keeps pair 0, blends pair 1 and slows 2-7 (CTX 48 > 16);
    # with exact bounds over 24 positions and betas 8 / 0.5 it keeps pair 0, blends 1-3 and slows 4-7
    "yarn-rope-scaling": dict(LLAMA, n_kv_head=2, head_size=16, rope_theta=100.0, rope_scaling="yarn", rope_factor=4.0, rope_original_context=16),
    "qwen3-yarn-exact-bounds": dict(LLAMA, qk_norm=True, head_size=16, rope_theta=100.0, rope_scaling="yarn", rope_factor=8.0,
                                    rope_original_context=24, rope_beta_fast=8.0, rope_beta_slow=0.5, rope_truncate=False,
                                    rope_attention_factor=1.3),  # fmt: skip
}


def _tokenizer() -> Tokenizer:
    if not hasattr(_tokenizer, "cached"):
        _tokenizer.cached = Tokenizer.train(small_text_corpus(30_000), vocab_size=VOCAB, special_tokens=["<|endoftext|>"], progress=False)
    return _tokenizer.cached


def _model(fields: dict, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=2, n_head=4, n_embd=32, **fields)).eval()
    randomize_(model, seed + 1)
    return model


def _hf(model: GPT) -> transformers.PreTrainedModel:
    hf_config = config_to_hf(model.config)
    if model.config.qk_norm:
        assert hf_config["model_type"] == "qwen3" and hf_config["architectures"] == ["Qwen3ForCausalLM"]
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config)).eval()
    else:
        assert hf_config["model_type"] == "llama" and hf_config["architectures"] == ["LlamaForCausalLM"]
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    hf.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=True)
    return hf


def _saved_by_transformers(cls: type, hf_config: transformers.PretrainedConfig, seed: int, directory: Path) -> transformers.PreTrainedModel:
    """A random `cls` model, its norms' gains away from 1 (so a missed one shows), saved by transformers to `directory`."""
    torch.manual_seed(seed)
    hf = cls(hf_config).eval()
    randomize_(hf, seed + 1)
    hf.save_pretrained(directory)
    return hf


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_generation_equal_transformers_llama_and_qwen3(name):
    model = _model(CASES[name])
    hf = _hf(model)
    idx = tokens((2, CTX), VOCAB, 1)
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() <= 1e-4
        prompt = tokens((2, 6), VOCAB, 2)
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    got = Engine(model).generate(prompt.tolist(), SampleConfig(max_new_tokens=20, temperature=0, ignore_eot=True))
    assert [c.token_ids for c in got] == want[:, 6:].tolist()
    # and back: the HF state dict and config give the same model
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg == model.config
    back = state_dict_from_hf(hf.state_dict(), cfg)
    assert back.keys() == model.state_dict().keys() and all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_export_loads_in_automodel_and_imports_back_bit_identical(tmp_path: Path):
    model = _model(CASES["gqa-untied"])
    ckpt = save_checkpoint(tmp_path / "run", 3, model, model.config, _tokenizer())
    export_hf(ckpt, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2 and config["rope_theta"] == 10000.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = tokens((2, CTX), VOCAB, 3)
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() <= 1e-4
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert back.model_config == model.config and back.tokenizer == _tokenizer()
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(back.model(idx)[0], model(idx)[0])  # RoPE's frequencies rebuilt, not loaded


def test_a_llama_made_by_transformers_imports_with_logits_parity(tmp_path: Path):
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                                         num_key_value_heads=2, max_position_embeddings=64, rope_theta=2000.0, tie_word_embeddings=False)  # fmt: skip
    hf = _saved_by_transformers(transformers.LlamaForCausalLM, hf_config, 4, tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    assert loaded.model_type == "llama" and loaded.config.n_kv_head == 2 and loaded.config.rope_theta == 2000.0
    idx = tokens((2, 40), VOCAB, 6)
    with torch.no_grad():
        assert (hf(idx).logits - loaded.model(idx)[0]).abs().max() <= 1e-4


def test_a_llama_3_scaled_checkpoint_from_transformers_imports_with_logits_parity(tmp_path: Path):
    """Llama 3.2's rope scaling at a small size, read as transformers 5 writes it and as the hub copies (written by
    transformers 4) have it: rope_scaling, with rope_theta at the top level."""
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0, rope_scaling=scaling,
                                         tie_word_embeddings=True)  # fmt: skip
    hf = _saved_by_transformers(transformers.LlamaForCausalLM, hf_config, 10, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    loaded = load_hf(tmp_path / "hf")
    assert (loaded.config.rope_scaling, loaded.config.rope_factor, loaded.config.rope_original_context) == ("llama3", 32.0, 64)
    idx = tokens((1, 200), VOCAB, 12)  # past the 64 "original" positions, where the scaling matters
    with torch.no_grad():
        want = hf(idx).logits
        assert (want - loaded.model(idx)[0]).abs().max() <= 1e-4
        unscaled = GPT(loaded.config.replace(rope_scaling="none"))
        unscaled.load_state_dict(loaded.model.state_dict())
        assert (want - unscaled.eval()(idx)[0]).abs().max() > 1e-2  # the scaling is not a no-op at these positions
    assert (saved.get("rope_parameters") or saved.get("rope_scaling"))["rope_type"] == "llama3"  # what was read is what transformers wrote
    hub = {k: v for k, v in saved.items() if k != "rope_parameters"} | {"rope_scaling": scaling, "rope_theta": 500000.0}
    assert config_from_hf(hub) == loaded.config


@pytest.mark.parametrize(
    "params",
    [
        {"factor": 4.0, "original_max_position_embeddings": 32},  # Qwen3's documented long-context setting, scaled down
        {"factor": 16.0, "original_max_position_embeddings": 64, "beta_fast": 8, "beta_slow": 2, "truncate": False},
        {"factor": 2.0, "original_max_position_embeddings": 4},  # both bounds clamped to pair 0: the 0.001 step
        {"factor": 8.0, "original_max_position_embeddings": 32, "attention_factor": 0.9},
        {"factor": None, "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 1.0},  # DeepSeek's form
        {"factor": 40.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_slow": 0},
    ],
    ids=["qwen3", "betas-untruncated", "clamped", "attention-factor", "deepseek-mscale", "equal-mscales"],
)
def test_yarn_frequencies_and_attention_factor_equal_transformers(params):
    """transformers' own yarn initialiser is the reference for every parameter form a config can carry."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                                         max_position_embeddings=256, rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, **params})  # fmt: skip
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    cfg = config_from_hf(hf_config.to_dict())
    assert cfg.rope_scaling == "yarn" and cfg.head_dim == 32
    got = GPT(cfg).rope_inv_freq
    assert torch.allclose(got, want_freq, rtol=2e-6, atol=0), (got / want_freq - 1).abs().max()
    assert math.isclose(cfg.rope_attention_scale, want_factor, rel_tol=1e-12)


def test_a_qwen3_with_yarn_from_transformers_imports_with_logits_parity_past_its_original_context(tmp_path: Path):
    """Qwen3's long-context recipe (rope_scaling yarn, factor 4 over the original context) at a small size, in
    transformers 4's layout as the Qwen model cards give it, and as transformers 5 saves it."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hf_config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=10000.0,
                                         rope_scaling=scaling, tie_word_embeddings=True)  # fmt: skip
    hf = _saved_by_transformers(transformers.Qwen3ForCausalLM, hf_config, 16, tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    assert (loaded.config.rope_scaling, loaded.config.rope_factor, loaded.config.rope_original_context) == ("yarn", 4.0, 32)
    idx = tokens((1, 120), VOCAB, 17)  # past the 32 original positions
    with torch.no_grad():
        want = hf(idx).logits
        assert (want - loaded.model(idx)[0]).abs().max() <= 1e-4
        unscaled = GPT(loaded.config.replace(rope_scaling="none"))
        unscaled.load_state_dict(loaded.model.state_dict())
        assert (want - unscaled.eval()(idx)[0]).abs().max() > 1e-2  # frequencies and temperature both matter here
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    hub = {k: v for k, v in saved.items() if k != "rope_parameters"} | {"rope_scaling": scaling, "rope_theta": 10000.0}
    assert config_from_hf(hub) == loaded.config
    # Phi-3's habit: original_max_position_embeddings at the top level wins over the one in the rope dict (as transformers)
    top = config_from_hf({**hub, "original_max_position_embeddings": 64})
    assert top.rope_original_context == 64
    assert config_from_hf({**hub, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}).rope_original_context == 128  # else the context


def test_a_mistral_made_by_transformers_imports_with_logits_parity_and_exports_as_llama(tmp_path: Path):
    hf_config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                                           num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e6, sliding_window=None,
                                           tie_word_embeddings=False)  # fmt: skip
    hf = _saved_by_transformers(transformers.MistralForCausalLM, hf_config, 13, tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    assert loaded.model_type == "mistral" and loaded.config.n_kv_head == 2 and not loaded.config.bias
    idx = tokens((2, 40), VOCAB, 15)
    with torch.no_grad():
        assert (hf(idx).logits - loaded.model(idx)[0]).abs().max() <= 1e-4
    assert config_to_hf(loaded.config)["architectures"] == ["LlamaForCausalLM"]  # the same computation in Llama's class
    base = hf_config.to_dict()
    assert config_from_hf({**base, "sliding_window": 64}) == loaded.config  # a window covering the whole context is no window
    with pytest.raises(ConfigError, match="sliding_window=32 is shorter than the context \\(64\\)"):
        config_from_hf({**base, "sliding_window": 32})


def test_a_qwen3_made_by_transformers_exports_back_and_imports_with_logits_parity(tmp_path: Path):
    hf_config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=3000.0, tie_word_embeddings=False)  # fmt: skip
    hf = _saved_by_transformers(transformers.Qwen3ForCausalLM, hf_config, 7, tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    assert loaded.model_type == "qwen3" and loaded.config.qk_norm and loaded.config.head_dim == 16 and not loaded.config.bias
    idx = tokens((2, 40), VOCAB, 9)
    with torch.no_grad():
        assert (hf(idx).logits - loaded.model(idx)[0]).abs().max() <= 1e-4
    ckpt = save_checkpoint(tmp_path / "run", 1, loaded.model, loaded.config, _tokenizer())
    export_hf(ckpt, tmp_path / "again")  # and out again: the same class, loadable with no custom code
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(again).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        assert torch.equal(again(idx).logits, hf(idx).logits)


def test_what_llamas_class_cannot_hold_is_refused_in_one_line(tmp_path: Path):
    with pytest.raises(ConfigError, match="qk_norm=True with bias=True: HF's Qwen3 class .* has no MLP biases"):
        config_to_hf(GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=1, n_head=4, n_embd=32, **{**LLAMA, "bias": True}, qk_norm=True))
    with pytest.raises(ConfigError, match="pos_encoding='learned': HF's Llama class needs pos_encoding='rope'"):
        config_to_hf(GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=1, n_head=4, n_embd=32, norm="rmsnorm"))
    base = config_to_hf(_model(CASES["gqa-untied"]).config)
    with pytest.raises(ConfigError, match="rope type 'longrope' is not supported; gptlab has 'default', 'linear', 'llama3' and 'yarn' "
                       "\\(dynamic and longrope change the frequencies with the sequence length"):  # fmt: skip
        config_from_hf({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5, "short_factor": [1.0], "long_factor": [2.0]}})
    with pytest.raises(ConfigError, match="rope type 'llama3' lacks high_freq_factor, original_max_position_embeddings"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0}})
    with pytest.raises(ConfigError, match="rope type 'dynamic' is not supported"):  # transformers 4's spelling
        config_from_hf({**{k: v for k, v in base.items() if k != "rope_parameters"}, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5\\); gptlab's RoPE turns the whole head"):
        config_from_hf({**base, "partial_rotary_factor": 0.5})
    assert config_from_hf({**base, "partial_rotary_factor": None}) == config_from_hf(base)
    with pytest.raises(ConfigError, match="sliding-window layers \\(layer_types\\)"):
        config_from_hf({**base, "model_type": "mistral", "sliding_window": None, "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(ConfigError, match="attention_bias=True and mlp_bias=False differ"):
        config_from_hf({**base, "attention_bias": True, "mlp_bias": False})
    qwen3 = config_to_hf(_model(CASES["qwen3-gqa-qk-norm"]).config)
    with pytest.raises(ConfigError, match="attention_bias=True and mlp_bias=False differ"):  # Qwen3's MLP has none
        config_from_hf({**qwen3, "attention_bias": True})
    with pytest.raises(ConfigError, match="uses sliding-window attention"):
        config_from_hf({**qwen3, "use_sliding_window": True, "sliding_window": 16})
    with pytest.raises(ConfigError, match="model_type='qwen2' is not supported"):
        config_from_hf({**qwen3, "model_type": "qwen2"})
    sd = state_dict_to_hf(_model(CASES["gqa-untied"]).state_dict(), _model(CASES["gqa-untied"]).config)
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:8]
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(8, 32\), config needs \(16, 32\)"):
        state_dict_from_hf(sd, config_from_hf(base))
