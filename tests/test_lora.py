"""LoRA adapters: config validation, which modules a target wraps, exact start at the base model,
seeded init, merging, adapter state dicts, and PEFT adapter directories both ways, checked
against the real peft and transformers packages on tiny random models (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import peft  # a dev dependency: the reference must be there, not skipped
import pytest
import torch
import transformers
from conftest import randomize_, small_text_corpus, tokens
from safetensors.torch import load_file, save_file

from gptlab.checkpoint import save_checkpoint
from gptlab.config import GPTConfig
from gptlab.errors import CheckpointError, ConfigError, InputError
from gptlab.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    read_peft_adapter,
    trainable_parameters,
    write_peft_adapter,
)
from gptlab.hf import export_hf, load_hf
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300  # a byte-level BPE tokenizer needs 256 byte tokens plus merges and specials
CFG = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=64)
LAYER_LINEARS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def gpt(cfg: GPTConfig = CFG, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    randomize_(model, seed, scale=0.02)
    return model.eval()


def randomize_adapters_(model: torch.nn.Module, seed: int) -> None:
    """Non-zero B (it starts at zero) and a perturbed A, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.add_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.05)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(r=0), "r"),
        (dict(r=2.0), "r"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(targets=()), "targets"),
        (dict(targets="c_attn"), "targets"),
        (dict(targets=("c_attn", "")), "targets"),
        (dict(targets=("attn..c_proj",)), "targets"),
        (dict(base_bits=3), "base_bits"),
        (dict(block_size=65), "block_size"),
    ],
)
def test_bad_config_fields_are_named(fields: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{named} "):
        LoRAConfig(**fields)


def test_config_round_trips_through_json() -> None:
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["attn.c_attn", "c_fc"], base_bits=4, block_size=128)
    assert cfg.targets == ("attn.c_attn", "c_fc")
    back = LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.scaling == 2.0
    with pytest.raises(ConfigError, match="unknown LoRAConfig field"):
        LoRAConfig.from_dict({"rank": 4})


# ----------------------------------------------------------------------------- applying


def test_apply_lora_wraps_the_targets_freezes_the_rest_and_starts_at_the_base_model() -> None:
    model = gpt()
    idx = tokens((2, 32), VOCAB, seed=1)
    before = logits(model, idx)
    wrapped = apply_lora(model, LoRAConfig(r=4))
    assert wrapped == [f"transformer.h.{i}.{name}" for i in range(2) for name in LAYER_LINEARS]
    assert torch.equal(logits(model, idx), before)  # B = 0: exactly the base model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{w}.lora_{ab}.weight" for w in wrapped for ab in "AB"]
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight is block.attn.c_attn.base.weight  # code reading .weight keeps working
    assert (block.attn.c_attn.in_features, block.attn.c_attn.out_features) == (64, 192)
    assert block.mlp.c_fc.lora_A.weight.shape == (4, 64) and block.mlp.c_fc.lora_B.weight.shape == (256, 4)
    n_trainable, total = trainable_parameters(model)
    assert n_trainable == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert total == GPT(CFG).num_params(non_embedding=False) + n_trainable


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (("c_proj",), [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_proj", "mlp.c_proj")]),
        (("attn.c_proj",), ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
        (("h.1.mlp.c_fc", "attn.c_attn"), ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]),
    ],
)
def test_targets_match_the_end_of_module_names(targets: tuple[str, ...], expected: list[str]) -> None:
    assert apply_lora(gpt(), LoRAConfig(targets=targets)) == expected


def test_lm_head_is_adapted_only_when_named_and_untied() -> None:
    assert "lm_head" not in apply_lora(gpt(), LoRAConfig())
    with pytest.raises(ConfigError, match="tied"):
        apply_lora(gpt(), LoRAConfig(targets=("lm_head",)))
    untied = gpt(CFG.replace(tie_weights=False))
    assert apply_lora(untied, LoRAConfig(targets=("lm_head",))) == ["lm_head"]


def test_a_target_matching_nothing_is_named_and_leaves_the_model_alone() -> None:
    model = gpt()
    with pytest.raises(ConfigError, match=r"'q_proj' matches no Linear module.*c_attn, c_fc, c_proj, lm_head"):
        apply_lora(model, LoRAConfig(targets=("c_attn", "q_proj")))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model, LoRAConfig())
    with pytest.raises(InputError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


def test_init_is_seeded_and_drawn_in_module_order() -> None:
    a, b, c = gpt(), gpt(), gpt()
    apply_lora(a, LoRAConfig(), seed=7)
    apply_lora(b, LoRAConfig(), seed=7)
    apply_lora(c, LoRAConfig(), seed=8)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.h.0.attn.c_attn.lora_A.weight"], sc["transformer.h.0.attn.c_attn.lora_A.weight"])
    bound = 1 / 64**0.5  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    A = sa["transformer.h.0.attn.c_attn.lora_A.weight"]
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert all(v.abs().sum() == 0 for k, v in sa.items() if k.endswith("lora_B.weight"))


def test_dropout_acts_on_the_adapter_input_in_training_only() -> None:
    model = gpt()
    apply_lora(model, LoRAConfig(dropout=0.5))
    randomize_adapters_(model, seed=2)
    idx = tokens((2, 16), VOCAB, seed=3)
    torch.manual_seed(0)
    assert not torch.equal(logits(model.train(), idx), logits(model.eval(), idx))
    assert torch.equal(logits(model.eval(), idx), logits(model, idx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_model_matches_the_adapter_model(dtype: torch.dtype) -> None:
    model = gpt()
    apply_lora(model, LoRAConfig(r=4, alpha=32))
    randomize_adapters_(model, seed=4)
    idx = tokens((2, 32), VOCAB, seed=5)
    model.to(dtype)
    with_adapters = logits(model, idx)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(GPT(CFG).state_dict())
    assert merged.transformer.h[0].attn.c_attn.weight.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bf16: the merged W is rounded to 8 bits of mantissa
    assert (logits(merged, idx).float() - with_adapters.float()).abs().max() <= tolerance


# ----------------------------------------------------------------------------- adapter state dicts


def test_lora_state_dict_round_trips_and_reports_what_does_not_fit() -> None:
    src, dst = gpt(), gpt()
    apply_lora(src, LoRAConfig(r=4), seed=1)
    apply_lora(dst, LoRAConfig(r=4), seed=2)
    randomize_adapters_(src, seed=6)
    sd = {k: v.clone() for k, v in lora_state_dict(src).items()}
    assert len(sd) == 16 and "transformer.h.0.attn.c_attn.lora_A.weight" in sd
    load_lora_state_dict(dst, sd)
    idx = tokens((1, 16), VOCAB, seed=7)
    assert torch.equal(logits(dst, idx), logits(src, idx))

    missing = dict(sd)
    del missing["transformer.h.1.mlp.c_fc.lora_B.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): transformer.h.1.mlp.c_fc.lora_B.weight"):
        load_lora_state_dict(dst, missing)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): extra"):
        load_lora_state_dict(dst, sd | {"extra": torch.zeros(1)})
    wrong = sd | {"transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(8, 64)}
    before = lora_state_dict(dst)["transformer.h.0.attn.c_proj.lora_A.weight"].clone()
    with pytest.raises(CheckpointError, match=r"c_attn.lora_A.weight has shape \(8, 64\), the model's adapter is \(4, 64\)"):
        load_lora_state_dict(dst, wrong | {"transformer.h.0.attn.c_proj.lora_A.weight": torch.ones(4, 64)})
    assert torch.equal(lora_state_dict(dst)["transformer.h.0.attn.c_proj.lora_A.weight"], before)  # nothing copied
    with pytest.raises(InputError, match="no LoRA adapters"):
        load_lora_state_dict(gpt(), sd)


# ----------------------------------------------------------------------------- PEFT


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(small_text_corpus(30_000), vocab_size=VOCAB, special_tokens=["<|endoftext|>"], progress=False)


def test_gptlab_adapter_loads_in_peft_with_the_same_logits(tmp_path: Path, tokenizer: Tokenizer) -> None:
    model = gpt(seed=1)
    hf_dir = export_hf(save_checkpoint(tmp_path / "run", 1, model, CFG, tokenizer), tmp_path / "hf")
    idx = tokens((2, 32), VOCAB, seed=5)
    base_logits = logits(model, idx)
    cfg = LoRAConfig(r=4, alpha=8)
    apply_lora(model, cfg, seed=3)
    randomize_adapters_(model, seed=4)
    adapter_dir = write_peft_adapter(model, cfg, tmp_path / "adapter", base_name_or_path=str(hf_dir))
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    stored = load_file(adapter_dir / "adapter_model.safetensors")
    assert stored["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"].shape == (256, 4)

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=idx).logits
    assert (logits(model, idx) - expected).abs().max() <= 1e-4
    assert (expected - base_logits).abs().max() > 0.1  # the adapters matter (measured 0.88)
    # PEFT read every tensor: its adapter state dict is ours, renamed
    theirs = peft.get_peft_model_state_dict(peft_model)
    ours = lora_state_dict(model)
    assert {k.removeprefix("base_model.model.") for k in theirs} == set(ours)
    assert all(torch.equal(theirs["base_model.model." + k], v) for k, v in ours.items())


def test_peft_adapter_imports_into_gptlab_with_the_same_logits(tmp_path: Path) -> None:
    hf_config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")  # the base, before PEFT wraps it in place
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, peft_cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")

    cfg, adapter = read_peft_adapter(tmp_path / "adapter")
    assert cfg == LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("c_attn", "c_fc", "c_proj"))  # sorted: PEFT keeps a set
    model = load_hf(tmp_path / "hf").model
    apply_lora(model, cfg)
    load_lora_state_dict(model, adapter)
    idx = tokens((2, 32), VOCAB, seed=2)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=idx).logits
        without = load_hf(tmp_path / "hf").model(idx)[0]
    assert (logits(model, idx) - expected).abs().max() <= 1e-4
    assert (expected - without).abs().max() > 0.1  # the adapters matter


def _adapter_dir(tmp_path: Path) -> Path:
    model = gpt()
    cfg = LoRAConfig(r=2)
    apply_lora(model, cfg)
    return write_peft_adapter(model, cfg, tmp_path / "adapter", "base")


def _edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (dict(use_dora=True), ConfigError, "use_dora=True, which gptlab does not support"),
        (dict(use_rslora=True), ConfigError, "use_rslora"),
        (dict(bias="all"), ConfigError, "bias='all'"),
        (dict(modules_to_save=["score"]), ConfigError, "modules_to_save"),
        (dict(rank_pattern={"c_fc": 8}), ConfigError, "rank_pattern"),
        (dict(peft_type="IA3"), ConfigError, "LORA adapters only"),
        (dict(target_modules=["q_proj", "v_proj"]), ConfigError, "'q_proj' names no module a gptlab GPT has"),
        (dict(r=0), ConfigError, "r must be a positive integer"),
        (dict(r=3), CheckpointError, "expected rank r=3"),
    ],
)
def test_unsupported_peft_adapters_fail_in_one_line(tmp_path: Path, changes: dict, error: type, message: str) -> None:
    adapter_dir = _adapter_dir(tmp_path)
    _edit_config(adapter_dir, **changes)
    with pytest.raises(error, match=message) as info:
        read_peft_adapter(adapter_dir)
    assert "\n" not in str(info.value)


def test_peft_adapter_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        read_peft_adapter(tmp_path / "nowhere")
    adapter_dir = _adapter_dir(tmp_path)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    save_file(weights | {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)}, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="targets module 'model.layers.0.self_attn.q_proj'"):
        read_peft_adapter(adapter_dir)
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        read_peft_adapter(adapter_dir)


def test_pattern_targets_become_the_exact_modules_in_the_file(tmp_path: Path) -> None:
    model = gpt()
    cfg = LoRAConfig(r=2, targets=("h.1.attn.c_attn", "h.0.mlp.c_fc"))
    apply_lora(model, cfg)
    adapter_dir = write_peft_adapter(model, cfg, tmp_path / "adapter", "base")
    _edit_config(adapter_dir, target_modules=r".*\.h\.(1\.attn\.c_attn|0\.mlp\.c_fc)")
    back, tensors = read_peft_adapter(adapter_dir)
    assert sorted(back.targets) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"]
    fresh = gpt()
    assert sorted(apply_lora(fresh, back)) == sorted(back.targets)
    load_lora_state_dict(fresh, tensors)


def test_write_peft_adapter_checks_the_config_and_the_output(tmp_path: Path) -> None:
    model = gpt()
    cfg = LoRAConfig(r=2, targets=("attn.c_attn",))
    apply_lora(model, cfg)
    with pytest.raises(ConfigError, match="r=2, scaling=8 but the config r=4"):
        write_peft_adapter(model, cfg.replace(r=4), tmp_path / "a", "base")
    with pytest.raises(ConfigError, match="do not select exactly"):
        write_peft_adapter(model, cfg.replace(targets=("c_attn", "c_fc")), tmp_path / "a", "base")
    with pytest.raises(InputError, match="no LoRA adapters"):
        write_peft_adapter(gpt(), cfg, tmp_path / "a", "base")
    assert not (tmp_path / "a").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        write_peft_adapter(model, cfg, tmp_path / "full", "base")
    write_peft_adapter(model, cfg, tmp_path / "full", "base", force=True)
    assert not (tmp_path / "full" / "keep").exists()
    written = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["attn.c_attn"] and written["lora_alpha"] == 16.0 and written["fan_in_fan_out"] is True


@pytest.mark.parametrize(("bits", "tie"), [(4, True), (8, True), (4, False)])
def test_qlora_holds_the_whole_frozen_base_quantized_and_merges_back_to_a_plain_gpt(bits: int, tie: bool) -> None:
    from gptlab.finetune.quant import QuantizedEmbedding, frozen_base_bytes

    cfg = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=4, n_embd=128, tie_weights=tie)
    model = gpt(cfg)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    idx = tokens((2, 16), 512, seed=3)
    reference = logits(model, idx)
    apply_lora(model, LoRAConfig(r=4, base_bits=bits))
    assert isinstance(model.transformer.wte, QuantizedEmbedding)
    if tie:
        assert model.lm_head is model.transformer.wte.table  # one quantized matrix for the lookup and the head
    share = frozen_base_bytes(model) / fp32
    assert share <= (0.30 if bits == 4 else 0.45), share  # NF4: 0.5625 bytes a weight; float32 LayerNorms and positions remain
    # the quantized model computes nearly what the float one did, and only the adapters train
    assert (logits(model, idx) - reference).norm() / reference.norm() < (0.2 if bits == 4 else 0.02)
    loss = model(idx, idx)[1]
    loss.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    randomize_adapters_(model, 1)
    adapted = logits(model, idx)
    merge_lora(model)
    assert type(model.transformer.wte) is torch.nn.Embedding and all(type(m) is not LoRALinear for m in model.modules())
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    assert set(model.state_dict()) == set(GPT(cfg).state_dict())
    torch.testing.assert_close(logits(model, idx), adapted, rtol=0, atol=1e-5)
