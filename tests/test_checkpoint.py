import json
import pickle

import pytest
import torch

from gptlab.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, step_dirs
from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import CheckpointError
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

CFG = GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def tok():
    from conftest import small_text_corpus

    return Tokenizer.train(small_text_corpus(20_000), vocab_size=300, progress=False)


def _model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return GPT(cfg)


def test_round_trip_is_exact_and_keeps_weight_tying(tmp_path, tok):
    model = _model()
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []}, "rng_cpu": torch.get_rng_state()}
    path = save_checkpoint(tmp_path, 7, model, CFG, tok, TrainConfig(), state, metrics={"loss": 1.5})
    assert path.name == "step_00000007" and find_checkpoint(tmp_path) == path
    ck = load_checkpoint(tmp_path, with_trainer_state=True)
    assert ck.step == 7 and ck.model_config == CFG and ck.train_config == TrainConfig()
    for (name, a), b in zip(model.state_dict().items(), ck.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert ck.model.lm_head.weight.data_ptr() == ck.model.transformer.wte.weight.data_ptr()
    assert torch.equal(ck.trainer_state["rng_cpu"], state["rng_cpu"])
    assert ck.tokenizer.encode("hello world") == tok.encode("hello world")
    assert ck.meta["metrics"] == {"loss": 1.5}


@pytest.mark.parametrize("cfg", [CFG.replace(tie_weights=False), CFG.replace(pos_encoding="sinusoidal", norm_placement="post", bias=False)])
def test_round_trip_other_architectures(tmp_path, tok, cfg):
    model = _model(cfg=cfg)
    save_checkpoint(tmp_path, 1, model, cfg, tok)
    loaded = load_checkpoint(tmp_path).model
    x = torch.randint(0, 300, (2, 16))
    assert torch.equal(model(x)[0], loaded(x)[0])


def test_keep_last_prunes_old_checkpoints(tmp_path, tok):
    model = _model()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, CFG, tok, keep_last=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_00000003", "step_00000004"]


def test_corrupted_weights_are_detected(tmp_path, tok):
    path = save_checkpoint(tmp_path, 1, _model(), CFG, tok)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted"):
        load_checkpoint(path)


def test_truncated_and_missing_files(tmp_path, tok):
    path = save_checkpoint(tmp_path / "a", 1, _model(), CFG, tok)
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["files"].pop("model.safetensors")  # without a recorded checksum the loader itself must refuse
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.safetensors: cannot load weights"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "b", 1, _model(), CFG, tok)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        load_checkpoint(path)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json: unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no checkpoint yet"):
        load_checkpoint(tmp_path / "empty")


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tok, monkeypatch):
    model = _model()
    first = save_checkpoint(tmp_path, 1, model, CFG, tok, trainer_state={"x": torch.ones(1)})

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gptlab.checkpoint.torch.save", crash)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, 2, model, CFG, tok, trainer_state={"x": torch.ones(1)})
    assert step_dirs(tmp_path) == [first] and find_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]  # no temp directory left
    load_checkpoint(tmp_path, with_trainer_state=True)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_trainer_state_is_loaded_without_running_pickled_code(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = save_checkpoint(tmp_path, 1, _model(), CFG, tok, trainer_state={"x": torch.ones(1)})
    with open(path / "trainer.pt", "wb") as f:
        pickle.dump({"x": _Exploit()}, f, protocol=2)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["files"].pop("trainer.pt")  # get past the checksum to reach the unpickler itself
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trainer.pt: cannot load"):
        load_checkpoint(path, with_trainer_state=True)
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_do_not_match_the_config(tmp_path, tok):
    path = save_checkpoint(tmp_path, 1, _model(), CFG, tok)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["model_config"]["n_layer"] = 3
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_checkpoint(path)
