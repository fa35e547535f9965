"""Hugging Face interoperability, checked against transformers itself: GPT-2 and GPT-1 logits, losses,
greedy generation, bit-exact round trips through files, tokenizers, and the errors for what cannot convert.

Every model is a tiny random one built here; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: the reference must be there, not skipped
from conftest import randomize_, small_text_corpus, tokens
from safetensors.torch import load_file

from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig, SampleConfig
from gptlab.errors import CheckpointError, ConfigError
from gptlab.generate import generate
from gptlab.hf import config_from_hf, config_to_hf, export_hf, import_hf, load_hf, state_dict_from_hf, state_dict_to_hf
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer, WrappedTokenizer, load_hf_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX = 300, 80  # CTX leaves room for an 8-token prompt plus 64 generated tokens

# Every GPT2Config field that changes the computation, each in at least one case
GPT2_CASES = {
    "gelu_new-tied": dict(activation_function="gelu_new"),
    "gelu-n_inner": dict(activation_function="gelu", n_inner=40),
    "relu-untied": dict(activation_function="relu", tie_word_embeddings=False),
    "gelu_pytorch_tanh-eps": dict(activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-3),
    "unscaled-attn": dict(scale_attn_weights=False),
    "inverse-layer-idx": dict(scale_attn_by_inverse_layer_idx=True),
    "upcast-reorder": dict(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True, n_inner=24),
}
GPT1_CASES = {
    "gelu-tied": dict(afn="gelu"),
    "relu-untied-eps": dict(afn="relu", tie_word_embeddings=False, layer_norm_epsilon=1e-3),
}
CASES = [("gpt2", name) for name in GPT2_CASES] + [("openai-gpt", name) for name in GPT1_CASES]
# HF's GPT-2 runs eager or SDPA attention (reorder_and_upcast_attn only acts in eager); its GPT-1 only eager
ATTN_CASES = [(t, name, attn) for t, name in CASES for attn in (("eager", "sdpa") if t == "gpt2" else ("eager",))]


def hf_model(model_type: str, case: str, attn: str = "eager", seed: int = 10):
    if model_type == "gpt2":
        from transformers import GPT2Config as Config
        from transformers import GPT2LMHeadModel as Model

        fields = dict(n_layer=3, bos_token_id=None, eos_token_id=None, **GPT2_CASES[case])
    else:
        from transformers import OpenAIGPTConfig as Config
        from transformers import OpenAIGPTLMHeadModel as Model

        fields = dict(n_layer=2, **GPT1_CASES[case])
    config = Config(vocab_size=VOCAB, n_positions=CTX, n_embd=32, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **fields)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Model(config).float().eval()
    randomize_(model, seed)
    return model


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("model_type", "case", "attn"), ATTN_CASES)
def test_logits_and_loss_match_transformers(model_type: str, case: str, attn: str, tmp_path: Path) -> None:
    hf = hf_model(model_type, case, attn)
    loaded = load_hf(save_hf(hf, tmp_path / "hf"))
    model, cfg = loaded.model, loaded.config
    assert loaded.model_type == model_type and cfg.norm_placement == ("pre" if model_type == "gpt2" else "post")
    assert (model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()) == cfg.tie_weights

    idx = tokens((3, CTX), VOCAB, seed=11)  # full context, no padding
    targets = torch.cat([idx[:, 1:], torch.full((3, 1), -100)], dim=1)  # HF shifts labels inside the model
    with torch.no_grad():
        out = hf(idx, labels=idx)
        logits, loss = model(idx, targets)
    diff = (logits - out.logits).abs().max().item()
    print(f"\nparity {model_type} {case} {attn}: max |logits diff| = {diff:.3e}, |loss diff| = {abs(loss.item() - out.loss.item()):.3e}")
    assert diff <= 1e-4
    assert abs(loss.item() - out.loss.item()) <= 1e-5


@pytest.mark.parametrize(("model_type", "case"), CASES)
def test_greedy_generation_matches_transformers(model_type: str, case: str, tmp_path: Path) -> None:
    hf = hf_model(model_type, case, "sdpa" if model_type == "gpt2" else "eager")
    model = GPT.from_hf(save_hf(hf, tmp_path / "hf"))
    prompt = tokens((1, 8), VOCAB, seed=12)
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=64, min_new_tokens=64, pad_token_id=0)
    ours = generate(model, prompt.tolist(), SampleConfig(max_new_tokens=64, temperature=0.0))[0]
    assert ours.token_ids == expected[0, 8:].tolist()


@pytest.mark.parametrize(("model_type", "case"), CASES)
def test_hf_to_gptlab_to_hf_is_bit_identical(model_type: str, case: str, tmp_path: Path) -> None:
    hf = hf_model(model_type, case)
    src = save_hf(hf, tmp_path / "hf")
    _write_gpt2_style_tokenizer(src)
    import_hf(src, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == model_type


@pytest.mark.parametrize(
    "fields",
    [
        dict(norm_placement="pre", activation="gelu", tie_weights=False, n_inner=40),
        dict(norm_placement="pre", scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False, upcast_attn=True, activation="silu"),
        dict(norm_placement="post", activation="relu"),
        dict(norm_placement="post", activation="gelu_tanh", tie_weights=False),
    ],
)
def test_gptlab_to_hf_to_gptlab_is_bit_identical(fields: dict, tmp_path: Path) -> None:
    cfg = GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=2, n_head=4, n_embd=32, **fields)
    torch.manual_seed(0)
    model = GPT(cfg)
    randomize_(model, seed=1)
    ckpt = save_checkpoint(tmp_path / "run", 5, model, cfg, _trained_tokenizer())
    export_hf(ckpt, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert back.model_config == cfg
    sd, back_sd = model.state_dict(), back.model.state_dict()
    assert sd.keys() == back_sd.keys()
    for key, value in sd.items():
        assert back_sd[key].dtype == value.dtype and torch.equal(back_sd[key], value), key
    assert back.tokenizer == _trained_tokenizer()

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = tokens((2, CTX), VOCAB, seed=2)
    with torch.no_grad():
        assert (hf(idx).logits - model.eval()(idx)[0]).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- export of models HF cannot express as they are


def test_sinusoidal_bias_free_model_exports_as_equivalent_weights(tmp_path: Path) -> None:
    cfg = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=32, pos_encoding="sinusoidal", bias=False)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    randomize_(model, seed=3)
    ckpt = save_checkpoint(tmp_path / "run", 1, model, cfg, _trained_tokenizer())
    export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = tokens((2, 32), VOCAB, seed=4)
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() <= 1e-4
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["GPT2LMHeadModel"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(norm_placement="post", activation="gelu"), "activation"),
        (dict(norm_placement="post", n_inner=40), "n_inner"),
        (dict(norm_placement="post", scale_attn_weights=False), "scale_attn_weights"),
    ],
)
def test_what_hf_gpt1_cannot_express_is_named(fields: dict, named: str, tmp_path: Path) -> None:
    cfg = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16, **fields)
    with pytest.raises(ConfigError, match=named):
        config_to_hf(cfg)
    ckpt = save_checkpoint(tmp_path / "run", 1, GPT(cfg), cfg, _trained_tokenizer())
    assert main(["export-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()  # nothing half-written


# ----------------------------------------------------------------------------- tokenizers


def _trained_tokenizer() -> Tokenizer:
    if not hasattr(_trained_tokenizer, "cached"):
        _trained_tokenizer.cached = Tokenizer.train(small_text_corpus(30_000), vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)
    return _trained_tokenizer.cached


def _write_gpt2_style_tokenizer(directory: Path) -> None:
    _trained_tokenizer().to_hf_files(directory, model_max_length=CTX)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)  # leave vocab.json + merges.txt, as OpenAI shipped them


TEXTS = [
    "Hello world! It's 2026; x = [1, 2, 3]  # comment\n\n\tindented   spaces",
    "Ünïcödé, 日本語のテキスト, emoji 🎉 and <|endoftext|> in the middle",
    "  leading spaces, trailing   ",
    "",
]


@pytest.fixture(scope="module")
def gpt2_dir(gpt2_files) -> Path:
    return gpt2_files


@pytest.mark.parametrize("files", ["vocab.json+merges.txt", "tokenizer.json"])
def test_gpt2_tokenizer_files_encode_as_autotokenizer(files: str, gpt2_dir: Path, tmp_path: Path) -> None:
    """OpenAI's vocab.json + merges.txt, or HF's tokenizer.json, beside a config.json as on the hub."""
    if files == "tokenizer.json":
        transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir).backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    else:
        for name in ("vocab.json", "merges.txt"):
            (tmp_path / name).write_bytes((gpt2_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    ours = load_hf_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(ours, Tokenizer) and ours == Tokenizer.gpt2()
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text


def _gpt1_tokenizer_files(directory: Path) -> None:
    """GPT-1-style vocab.json + merges.txt: lower-cased BERT pre-tokens, BPE with "</w>" word ends."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB + 200, special_tokens=["<unk>"], end_of_word_suffix="</w>", show_progress=False)
    hf.train_from_iterator(small_text_corpus(30_000), trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    hf.model.save(str(directory))


def test_gpt1_import_brings_its_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    src = tmp_path / "gpt1"
    _gpt1_tokenizer_files(src)
    vocab_size = len(json.loads((src / "vocab.json").read_text()))
    torch.manual_seed(0)
    OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(src)
    ref = transformers.AutoTokenizer.from_pretrained(src)
    texts = ["Hello, World! Return the value of X.", "Ünïcödé and 日本 and <|endoftext|>", "multiple   spaces\nand lines"]

    loaded = load_hf(src)
    assert isinstance(loaded.tokenizer, WrappedTokenizer)
    for text in texts:
        assert loaded.tokenizer.encode(text) == ref(text)["input_ids"], text
        assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == ref.decode(ref(text)["input_ids"])

    # through a gptlab checkpoint and back out to HF files, the tokenizer still encodes the same
    import_hf(src, tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt").tokenizer.encode(texts[0]) == ref(texts[0])["input_ids"]
    sample = ["sample", "--ckpt", str(tmp_path / "ckpt"), "--max-new-tokens", "4", "--device", "cpu", "--seed", "0", "--prompt"]
    assert main([*sample, "return the"]) == 0
    assert capsys.readouterr().out.startswith("return the ")  # GPT-1 decoding puts the space after "the</w>"
    assert main([*sample, ""]) == 2  # no <|endoftext|> to start from
    assert "has no <|endoftext|>" in capsys.readouterr().err
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    for text in texts:
        assert back(text)["input_ids"] == ref(text)["input_ids"], text


def test_exported_tokenizer_loads_in_autotokenizer(tmp_path: Path) -> None:
    tok = _trained_tokenizer()
    cfg = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16)
    export_hf(save_checkpoint(tmp_path / "run", 1, GPT(cfg), cfg, tok), tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS + ["<|pad|> special <|pad|>"]:
        assert ref(text)["input_ids"] == tok.encode(text), text
        assert ref.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert ref.eos_token == "<|endoftext|>" and ref.eos_token_id == tok.eot_id
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eot_id


# ----------------------------------------------------------------------------- config conversion


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(activation_function="quick_gelu"), "activation_function"),
        (dict(resid_pdrop=0.1, attn_pdrop=0.0), "attn_pdrop"),
        (dict(n_ctx=512, n_positions=1024), "n_ctx"),
        (dict(model_type="gpt_neo"), "model_type"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(model_type="openai-gpt", afn="gelu_fast"), "afn"),
    ],
)
def test_unsupported_hf_config_is_named(fields: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        config_from_hf(fields)


def test_hf_config_defaults() -> None:
    gpt2 = config_from_hf({"model_type": "gpt2"})
    assert (gpt2.vocab_size, gpt2.n_layer, gpt2.n_embd, gpt2.block_size, gpt2.dropout) == (50257, 12, 768, 1024, 0.1)
    assert gpt2.activation == "gelu_tanh" and gpt2.tie_weights and gpt2.norm_placement == "pre"
    gpt1 = config_from_hf({"model_type": "openai-gpt"})
    assert (gpt1.vocab_size, gpt1.block_size, gpt1.norm_placement, gpt1.activation) == (40478, 512, "post", "gelu_tanh")


def test_hf_checkpoint_without_prefix_or_head_loads() -> None:
    """The original OpenAI weights on the hub are base-model state dicts: no "transformer.", no lm_head, mask buffers."""
    for model_type, case in (("gpt2", "gelu_new-tied"), ("openai-gpt", "gelu-tied")):
        hf = hf_model(model_type, case)
        cfg = config_from_hf(hf.config.to_dict())
        bare = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        bare["h.0.attn.bias"] = torch.ones(1, 1, CTX, CTX)
        sd, reference = state_dict_from_hf(bare, cfg), state_dict_from_hf(hf.state_dict(), cfg)
        assert sd.keys() == reference.keys() and all(torch.equal(sd[k], reference[k]) for k in sd)


def test_bad_state_dicts_are_checkpoint_errors() -> None:
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16)
    sd = state_dict_to_hf(GPT(cfg).state_dict(), cfg)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(CheckpointError, match="transformer.h.1.mlp.c_fc.bias"):
        state_dict_from_hf(missing, cfg)
    with pytest.raises(CheckpointError, match="unexpected key.*extra"):
        state_dict_from_hf({**sd, "extra": torch.zeros(1)}, cfg)
    with pytest.raises(CheckpointError, match="c_attn.weight has shape"):
        state_dict_from_hf({**sd, "transformer.h.0.attn.c_attn.weight": torch.zeros(48, 16)}, cfg)
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        state_dict_from_hf({**sd, "lm_head.weight": torch.zeros(61, 16)}, cfg)


# ----------------------------------------------------------------------------- files, the hub, the CLI


def test_pytorch_bin_loads_and_pickled_code_is_refused(tmp_path: Path) -> None:
    hf = hf_model("gpt2", "gelu_new-tied")
    src = save_hf(hf, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    torch.save(hf.state_dict(), src / "pytorch_model.bin")
    idx = tokens((1, 8), VOCAB, seed=5)
    with torch.no_grad():
        assert (GPT.from_hf(src)(idx)[0] - hf(idx).logits).abs().max() <= 1e-4

    marker = tmp_path / "pwned"
    torch.save({"x": _Exploit(str(marker))}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load weights"):
        GPT.from_hf(src)
    assert not marker.exists()


class _Exploit:
    """Unpickling this would create a file; weights_only loading must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_hub_name_offline_fails_fast_with_advice(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gptlab", "import-hf", "gpt2", "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2
    assert "offline" in proc.stderr and "directory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert elapsed < 30
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(CheckpointError, match="unreachable.*pass that directory"):
        load_hf("openai-community/gpt2")


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """huggingface_hub with the network replaced: records the calls; `cached` and `remote` are the local copies it hands back."""
    import socket

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = {"calls": [], "cached": None, "remote": save_hf(hf_model("gpt2", "gelu_new-tied"), tmp_path / "remote")}
    _write_gpt2_style_tokenizer(hub["remote"])

    class Connection:
        def close(self) -> None:
            hub["calls"].append("probe")

    def snapshot_download(repo_id, *, revision=None, local_files_only=False, allow_patterns=None, etag_timeout=10, **kwargs):
        hub["calls"].append(("snapshot", repo_id, revision, local_files_only, tuple(allow_patterns or ())))
        if local_files_only:
            if hub["cached"] is None:
                raise LocalEntryNotFoundError("not in the cache")
            return str(hub["cached"])
        return str(hub["remote"])

    def list_repo_files(repo_id, *, revision=None, **kwargs):
        hub["calls"].append(("list", repo_id, revision))
        return ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "vocab.json", "merges.txt"]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    return hub


def test_hub_name_online_fetches_config_tokenizer_and_one_weights_format(fake_hub) -> None:
    loaded = load_hf("openai-community/gpt2", revision="main")
    assert loaded.directory == fake_hub["remote"] and loaded.model_type == "gpt2" and isinstance(loaded.tokenizer, Tokenizer)
    cache_try, probe, listing, fetch = fake_hub["calls"]
    assert cache_try[3] is True and probe == "probe" and listing == ("list", "openai-community/gpt2", "main")
    patterns = fetch[4]
    assert fetch[3] is False and "model.safetensors" in patterns and "config.json" in patterns and "vocab.json" in patterns
    assert not any("pytorch_model" in p or "h5" in p for p in patterns)  # safetensors only, not every format the repo holds


def test_hub_name_in_local_cache_needs_no_network(fake_hub) -> None:
    fake_hub["cached"] = fake_hub["remote"]
    assert load_hf("gpt2").directory == fake_hub["remote"]
    assert [c[0] for c in fake_hub["calls"]] == ["snapshot"]  # no probe, no listing, no download


@pytest.mark.parametrize("src", ["no/such/dir/here", "./missing"])
def test_missing_local_source_is_named(src: str) -> None:
    with pytest.raises(CheckpointError, match="no such directory"):
        load_hf(src)


def test_cli_import_sample_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = hf_model("gpt2", "gelu_new-tied")
    src = save_hf(hf, tmp_path / "hf")
    _write_gpt2_style_tokenizer(src)
    assert main(["import-hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert "gpt2" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "The", "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]) == 0
    assert main(["import-hf", str(src), "--out", str(tmp_path / "ckpt")]) == 2  # will not overwrite
    assert "not empty" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").is_file()
    assert main(["import-hf", str(src), "--out", str(tmp_path / "ckpt"), "--force"]) == 0


# ----------------------------------------------------------------------------- the wrapped (non-byte-level) tokenizer


@pytest.fixture(scope="module")
def gpt1_tokenizer(tmp_path_factory) -> WrappedTokenizer:
    directory = tmp_path_factory.mktemp("gpt1-tok")
    _gpt1_tokenizer_files(directory)
    tok = load_hf_tokenizer(directory)
    assert isinstance(tok, WrappedTokenizer)
    return tok


def test_wrapped_tokenizer_saves_loads_and_batches(gpt1_tokenizer: WrappedTokenizer, tmp_path: Path) -> None:
    from gptlab.tokenizer import read_tokenizer

    texts = ["Return the value.", "An object's type", ""]
    gpt1_tokenizer.save(tmp_path / "tok.json")
    again = read_tokenizer(tmp_path / "tok.json")
    assert isinstance(again, WrappedTokenizer) and again.vocab_size == gpt1_tokenizer.vocab_size
    assert [again.encode(t) for t in texts] == [gpt1_tokenizer.encode(t) for t in texts]
    assert gpt1_tokenizer.encode_batch(texts) == [gpt1_tokenizer.encode_ordinary(t) for t in texts]
    assert gpt1_tokenizer.decode(gpt1_tokenizer.encode("Return the value.")) == "return the value ."  # GPT-1 lower-cases


def test_wrapped_tokenizer_streams_text_with_word_boundaries(gpt1_tokenizer: WrappedTokenizer) -> None:
    prompt = gpt1_tokenizer.encode("Return the")
    new = gpt1_tokenizer.encode("value of an object.")
    stream = gpt1_tokenizer.stream(prompt)
    pieces = [stream.push(i) for i in new] + [stream.flush()]
    full = gpt1_tokenizer.decode(prompt + new)
    assert "".join(pieces) == full[len(gpt1_tokenizer.decode(prompt)) :] == " value of an object ."
    assert sum(bool(p) for p in pieces) > 1  # text arrives as it is generated, not all at the end


def test_wrapped_tokenizer_errors_are_tokenizer_errors(gpt1_tokenizer: WrappedTokenizer, tmp_path: Path) -> None:
    from gptlab.errors import TokenizerError
    from gptlab.tokenizer import read_tokenizer

    with pytest.raises(TokenizerError, match="out of range"):
        gpt1_tokenizer.decode([gpt1_tokenizer.vocab_size + 5])
    with pytest.raises(TokenizerError, match="no <\\|endoftext\\|>"):
        gpt1_tokenizer.eot_id  # noqa: B018
    bad = gpt1_tokenizer.to_dict() | {"tokenizer": {"model": {"type": "Nonsense"}}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json"):
        read_tokenizer(tmp_path / "bad.json")


def test_non_gpt2_style_tokenizer_json_is_wrapped_and_encodes_as_hf(gpt2_dir: Path, tmp_path: Path) -> None:
    """A byte-level tokenizer.json with add_prefix_space cannot be rank BPE as GPT-2's; HF's own encoder runs it."""
    backend = json.loads(transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir).backend_tokenizer.to_str())
    backend["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(backend))
    # the generic class runs tokenizer.json as written (GPT2Tokenizer would rebuild its own pre-tokenizer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    ours = load_hf_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(ours, WrappedTokenizer)
    for text in TEXTS[:3]:
        assert ours.encode(text) == ref(text)["input_ids"], text
    assert ours.encode("hi <|endoftext|>", allowed_special=set()) != ours.encode("hi <|endoftext|>")
    assert ours.encode("hi <|endoftext|>", allowed_special={"<|endoftext|>"}) == ours.encode("hi <|endoftext|>")
