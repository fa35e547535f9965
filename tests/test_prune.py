"""Pruning (gptlab.compress.prune): masks hit the requested sparsity and remove the lowest scores, Wanda's
input norms are the activations' own, structured pruning computes exactly what the dense model with the
removed units zeroed computes, a head-pruned model exports to transformers with the same logits, the
command's checkpoints run through sample / eval / quantize / export-hf / serve, and a recovery fine-tune
keeps the zeros."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from gptlab.checkpoint import find_checkpoint, load_checkpoint
from gptlab.cli import main
from gptlab.compress.prune import (
    LINEARS,
    PruneConfig,
    _input_norms,
    kept_units,
    magnitude_mask,
    prune_model,
    wanda_mask,
)
from gptlab.config import GPTConfig
from gptlab.errors import ConfigError
from gptlab.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "32"]
TRAIN = ["--batch-size", "4", "--warmup-steps", "2", "--eval-every", "4", "--eval-batches", "2", "--log-every", "1", "--device", "cpu", "--seed", "5", "-q"]


def model(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": 96, "block_size": 24, "n_layer": 2, "n_head": 4, "n_embd": 32, **changes})).eval()


def ids(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_magnitude_masks_remove_exactly_the_smallest_weights(sparsity):
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(2))
    keep = magnitude_mask(w, sparsity)
    assert (~keep).sum().item() == round(sparsity * w.numel())
    assert w[~keep].abs().max() <= w[keep].abs().min()
    tied = torch.ones(10, 10)  # all scores equal: ties still yield exactly the requested count
    assert (~magnitude_mask(tied, sparsity)).sum().item() == round(sparsity * 100)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_wanda_masks_remove_the_lowest_weight_times_input_norm_in_every_row(sparsity):
    g = torch.Generator().manual_seed(3)
    w, norm = torch.randn(16, 40, generator=g), torch.rand(40, generator=g) * 10
    keep = wanda_mask(w, norm, sparsity)
    score = w.abs() * norm
    for r in range(16):
        assert (~keep[r]).sum().item() == round(sparsity * 40)
        assert score[r][~keep[r]].max() <= score[r][keep[r]].min()
    # hand example: the input norm turns the order around
    w2, n2 = torch.tensor([[1.0, -2.0, 0.5, 3.0]]), torch.tensor([4.0, 1.0, 10.0, 0.1])  # scores 4, 2, 5, 0.3
    assert wanda_mask(w2, n2, 0.5).tolist() == [[True, False, True, False]]
    assert magnitude_mask(w2, 0.5).tolist() == [[False, True, False, True]]


def test_wandas_input_norms_are_the_l2_norms_of_each_linears_input_features():
    m = model()
    x = torch.randn(3, 24, 32, generator=torch.Generator().manual_seed(4))
    block = m.transformer.h[0]
    norms = _input_norms(block, x, None, chunk=2)
    assert torch.allclose(norms["attn.c_attn"], block.ln_1(x).reshape(-1, 32).norm(dim=0), rtol=1e-5)
    after_attn = x + block.attn(block.ln_1(x))
    assert torch.allclose(norms["mlp.c_fc"], block.ln_2(after_attn).reshape(-1, 32).norm(dim=0), rtol=1e-5)
    hidden = block.mlp.act(block.mlp.c_fc(block.ln_2(after_attn)))
    assert torch.allclose(norms["mlp.c_proj"], hidden.reshape(-1, 128).norm(dim=0), rtol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_pruning_hits_the_sparsity_in_every_matrix_and_leaves_the_rest(method):
    m, ref = model(), model()
    pruned, info = prune_model(m, PruneConfig(0.5, method), ids())
    assert pruned is m and info["removed_fraction"] == pytest.approx(0.5)
    for block, ref_block in zip(pruned.transformer.h, ref.transformer.h):
        for name in LINEARS:
            w, w0 = block.get_submodule(name).weight, ref_block.get_submodule(name).weight
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
            assert torch.equal(w[w != 0], w0[w != 0])  # kept weights untouched
    assert torch.equal(pruned.transformer.wte.weight, ref.transformer.wte.weight)  # embeddings and head are not pruned


def test_wanda_prunes_block_by_block_on_the_pruned_blocks_outputs():
    """Block 1's scores read the output of the already pruned block 0 (the paper's sequential order), which
    differs from scoring both blocks on the dense model."""
    x = ids()
    sequential, _ = prune_model(model(), PruneConfig(0.5, "wanda"), x)
    dense = model()
    emb = dense.transformer.wte(x) + dense.transformer.wpe.weight[:24]
    out0 = dense.transformer.h[0](emb)
    norms = _input_norms(dense.transformer.h[1], out0, None, chunk=8)
    w = dense.transformer.h[1].mlp.c_fc.weight
    one_shot = wanda_mask(w, norms["mlp.c_fc"], 0.5)
    assert not torch.equal(sequential.transformer.h[1].mlp.c_fc.weight != 0, one_shot)


def zeroed(m: GPT, structured: str, removed: list[list[int]]) -> GPT:
    """The dense model with the removed heads or channels' weights set to zero."""
    with torch.no_grad():
        for block, gone in zip(m.transformer.h, removed):
            for u in gone:
                if structured == "heads":
                    hs = m.config.head_dim
                    for part in range(3):
                        rows = slice(part * m.config.n_embd + u * hs, part * m.config.n_embd + (u + 1) * hs)
                        block.attn.c_attn.weight[rows] = 0
                        block.attn.c_attn.bias[rows] = 0
                    block.attn.c_proj.weight[:, u * hs : (u + 1) * hs] = 0
                else:
                    block.mlp.c_fc.weight[u] = 0
                    block.mlp.c_fc.bias[u] = 0
                    block.mlp.c_proj.weight[:, u] = 0
    return m


@pytest.mark.parametrize("structured", ["heads", "mlp"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_structured_pruning_shrinks_the_matrices_and_computes_what_zeroing_the_units_computes(structured, method):
    x = ids()
    pruned, info = prune_model(model(), PruneConfig(0.5, method, structured), x)
    c = pruned.config
    if structured == "heads":
        assert (c.n_head, c.head_size, c.attn_dim) == (2, 8, 16) and pruned.transformer.h[0].attn.c_attn.weight.shape == (48, 32)
    else:
        assert c.n_inner == 64 and pruned.transformer.h[0].mlp.c_fc.weight.shape == (64, 32)
    assert all(len(gone) == (2 if structured == "heads" else 64) for gone in info["removed"])
    reference = zeroed(model(), structured, info["removed"])
    assert torch.allclose(pruned(x)[0], reference(x)[0], atol=1e-5)
    # magnitude keeps the units with the largest weights
    if method == "magnitude" and structured == "mlp":
        block = model().transformer.h[0].mlp
        score = block.c_fc.weight.abs().sum(1) + block.c_proj.weight.abs().sum(0)
        gone = info["removed"][0]
        kept = sorted(set(range(128)) - set(gone))
        assert score[gone].max() <= score[kept].min()


def test_kept_widths_and_bad_settings():
    assert kept_units("heads", 12, 0.5) == 6 and kept_units("heads", 4, 0.9) == 1
    assert kept_units("mlp", 3072, 0.25) == 2304 and kept_units("mlp", 3072, 0.7) == 928 and kept_units("mlp", 1024, 0.99) == 32
    for bad in ({"sparsity": 0}, {"sparsity": 1.0}, {"method": "random"}, {"structured": "layers"}, {"calibration": 0}):
        with pytest.raises(ConfigError):
            PruneConfig(**bad)
    with pytest.raises(ConfigError, match="calibration text"):
        prune_model(model(), PruneConfig(0.5, "wanda"))


def test_a_head_pruned_model_exports_to_transformers_with_the_same_logits(tmp_path):
    from gptlab.checkpoint import save_checkpoint
    from gptlab.hf import export_hf
    from gptlab.tokenizer import Tokenizer

    pruned, _ = prune_model(model(vocab_size=50257), PruneConfig(0.5, "magnitude", "heads"))
    save_checkpoint(tmp_path / "run", 1, pruned, pruned.config, Tokenizer.gpt2())
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.n_head == 4  # the two removed heads come back as zeros
    x = ids()
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, pruned(x)[0], atol=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("prune") / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY, *TRAIN, "--max-steps", "6"]) == 0
    return run


@pytest.mark.parametrize("structured", ["heads", "mlp"])
def test_a_structurally_pruned_checkpoint_runs_through_every_command(tmp_path, data_dir, teacher, structured, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--ckpt", str(teacher), "--out", str(out), "--sparsity", "0.5", "--method", "wanda", "--structured", structured, "--data", str(data_dir), "--calibration", "4"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert ("2 of 4 heads kept" if structured == "heads" else "128 of 256 MLP channels kept") in said
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["pruning"]["structured"] == structured and meta["pruning"]["method"] == "wanda"
    assert main(["sample", "--ckpt", str(out), "--device", "cpu", "--prompt", "the", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 8)
    assert main(["eval", "--ckpt", str(out), "--text", str(text), "--device", "cpu"]) == 0
    assert "bits per byte:" in capsys.readouterr().out
    assert main(["evaluate", "--ckpt", str(out), "--tasks", "analogies,arithmetic", "--limit", "3", "--device", "cpu", "-q"]) == 0  # choices, generation
    assert "| analogies | acc |" in capsys.readouterr().out
    assert main(["quantize", "--ckpt", str(out), "--out", str(tmp_path / "q"), "--method", "int4", "--group-size", "32"]) == 0
    assert main(["sample", "--ckpt", str(tmp_path / "q"), "--device", "cpu", "--prompt", "the", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert main(["export-hf", str(out), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    # the server's scheduler batches it like any model
    from gptlab.generate import SampleConfig, generate
    from gptlab.serve.scheduler import Request, Scheduler

    loaded = load_checkpoint(out).model.eval()
    cfg = SampleConfig(max_new_tokens=6, temperature=0, ignore_eot=True)
    alone = generate(loaded, [[5, 6, 7]], cfg)[0]
    sched = Scheduler(loaded, None, max_batch=2, thread=False, tune=False)
    events = []
    sched.submit(Request([5, 6, 7], cfg, events.append))
    sched.submit(Request([9, 10], cfg, lambda ev: None))
    sched.run(until=lambda: bool(events) and events[-1].finish_reason is not None)
    assert [e.token_id for e in events] == alone.token_ids
    # and it trains on: a recovery fine-tune through the normal loop
    run = tmp_path / "recovered"
    assert main(["prune", "--ckpt", str(teacher), "--out", str(run), "--sparsity", "0.5", "--structured", structured, "--data", str(data_dir), "--recover", *TRAIN, "--max-steps", "3"]) == 0  # fmt: skip
    assert json.loads((find_checkpoint(run) / "checkpoint.json").read_text())["model_config"]["n_head" if structured == "heads" else "n_inner"] == (2 if structured == "heads" else 128)


def test_recovery_keeps_the_pruned_weights_at_zero_across_a_resume(tmp_path, data_dir, teacher, capsys):
    run = tmp_path / "rec"
    base = ["prune", "--ckpt", str(teacher), "--out", str(run), "--sparsity", "0.5", "--data", str(data_dir), "--recover", *TRAIN]
    assert main([*base, "--max-steps", "6", "--stop-at", "3", "--lr", "1e-2"]) == 0
    mid = load_checkpoint(run).model
    assert main([*base, "--max-steps", "6", "--resume"]) == 0
    end, start = load_checkpoint(run).model, load_checkpoint(teacher).model
    for name in LINEARS:
        for i in range(2):
            w_mid, w_end = mid.transformer.h[i].get_submodule(name).weight, end.transformer.h[i].get_submodule(name).weight
            assert (w_end == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
            assert torch.equal(w_end == 0, w_mid == 0)  # the same zeros before and after the resume
            assert not torch.equal(w_end, start.transformer.h[i].get_submodule(name).weight * (w_end != 0))  # the rest trained
    assert json.loads((find_checkpoint(run) / "checkpoint.json").read_text())["step"] == 6


def test_the_prune_command_refuses_what_it_cannot_do(tmp_path, data_dir, teacher, capsys):
    base = ["prune", "--ckpt", str(teacher), "--sparsity", "0.5"]
    assert main([*base, "--out", str(tmp_path / "w"), "--method", "wanda"]) == 2
    assert "calibration text" in capsys.readouterr().err
    assert main([*base[:4], "1.5", "--out", str(tmp_path / "s")]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "r"), "--max-steps", "3"]) == 2
    assert "add --recover" in capsys.readouterr().err
    assert main(["quantize", "--ckpt", str(teacher), "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["prune", "--ckpt", str(tmp_path / "q"), "--out", str(tmp_path / "p"), "--sparsity", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is quantized" in err and not (tmp_path / "p").exists()
