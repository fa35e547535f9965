"""DDP and FSDP through torchrun on CPU (gloo, 2 processes) against one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.config import GPTConfig, TrainConfig
from gptlab.train import train

MODEL = dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)
TRAIN = dict(batch_size=4, grad_accum=2, max_steps=20, warmup_steps=4, eval_every=10, eval_batches=2, save_every=10, log_every=5, seed=3, device="cpu")
FLAGS = ["--vocab-size", "512", "--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
         "--batch-size", "4", "--grad-accum", "2", "--max-steps", "20", "--warmup-steps", "4", "--eval-every", "10",
         "--eval-batches", "2", "--save-every", "10", "--log-every", "5", "--seed", "3", "--device", "cpu", "-q"]  # fmt: skip


def torchrun(data_dir: Path, run_dir: Path, *extra: str, flags: list[str] = FLAGS) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptlab", "train", "--data", str(data_dir), "--out", str(run_dir), *flags, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def weights(run_dir: Path, step: int = 20) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference over all parameters but the key part of each c_attn bias.

    Adding a constant to every key leaves softmax(q k^T) unchanged, so the key bias has an
    exactly zero gradient: what backward gives it is rounding noise, which Adam divides by
    its own magnitude into full-size steps. Any change in summation order (two processes
    instead of one) moves it, so it is checked against that bound instead.
    """
    assert a.keys() == b.keys()
    C = MODEL["n_embd"]
    worst = 0.0
    for k in a:
        d = (a[k] - b[k]).abs()
        if k.endswith("attn.c_attn.bias"):
            assert float(d[C : 2 * C].max()) <= TRAIN["max_steps"] * 6e-4  # at most one lr-sized step each
            d = torch.cat([d[:C], d[2 * C :]])
        worst = max(worst, float(d.max()))
    return worst


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    train(GPTConfig(**MODEL), TrainConfig(**TRAIN), data_dir, run_dir, progress=False)
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(strategy, data_dir, reference, tmp_path):
    out = torchrun(data_dir, tmp_path / "run", "--strategy", strategy)
    diff = max_diff(weights(tmp_path / "run"), weights(reference))
    print(f"\n{strategy}: max |param diff| after 20 steps = {diff:.2e}")
    assert diff <= 1e-6
    assert out.stdout.count("checkpoint:") == 1  # only the main process reports
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((reference / "metrics.jsonl").read_text().splitlines())  # and logs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_run_saved_by_two_processes_resumes_in_one(strategy, data_dir, reference, tmp_path):
    torchrun(data_dir, tmp_path / "run", "--stop-at", "10", "--strategy", strategy)
    train(None, None, data_dir, tmp_path / "run", resume=True, progress=False)
    diff = max_diff(weights(tmp_path / "run"), weights(reference))
    print(f"\n{strategy} 2 -> 1 process: max |param diff| after 20 steps = {diff:.2e}")
    assert diff <= 1e-6


def test_a_single_process_run_resumes_in_two(data_dir, reference, tmp_path):
    train(GPTConfig(**MODEL), TrainConfig(**TRAIN), data_dir, tmp_path / "run", stop_at=10, progress=False)
    torchrun(data_dir, tmp_path / "run", "--resume")
    diff = max_diff(weights(tmp_path / "run"), weights(reference))
    print(f"\n1 -> 2 processes: max |param diff| after 20 steps = {diff:.2e}")
    assert diff <= 1e-6


DROP = {FLAGS.index("--max-steps"), FLAGS.index("--warmup-steps")}
NO_LENGTH = [f for i, f in enumerate(FLAGS) if i not in DROP and i - 1 not in DROP]  # FLAGS without those two and their values


def test_a_short_run_without_a_warmup_flag_under_torchrun(data_dir, tmp_path):
    assert len(NO_LENGTH) == len(FLAGS) - 4
    out = torchrun(data_dir, tmp_path / "short", "--max-steps", "10", flags=NO_LENGTH)  # the bar a new user runs
    assert "warmup 1 step (auto" in out.stdout and "step 10: val loss" in out.stdout


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_time_budget_under_torchrun(strategy, data_dir, tmp_path):
    out = torchrun(data_dir, tmp_path / "budget", "--time-budget", "12s", "--strategy", strategy, flags=NO_LENGTH)
    plan = [line for line in out.stdout.splitlines() if line.startswith("time budget 12.0s")]
    assert len(plan) == 1, out.stdout  # both processes measured, one plan, reported once
    steps = int(plan[0].split("-> ")[1].split()[0])
    assert f"schedule: {steps} steps" in out.stdout and out.stdout.count("checkpoint:") == 1
    assert f"step {steps}: val loss" in out.stdout or "the time budget ended the run" in out.stdout


def test_optimizer_state_loads_in_both_formats():
    from gptlab.distributed import DistInfo, full_state, load_optimizer_state
    from gptlab.model import GPT
    from gptlab.train import build_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    opt = build_optimizer(model, TrainConfig(), "cpu")
    x = torch.randint(0, 512, (2, 32))
    model(x, x)[1].backward()
    opt.step()
    model.zero_grad(set_to_none=True)  # as at a resume: the state helpers create missing state by a zero step
    _, by_name = full_state(model, opt, model.config, DistInfo())
    for saved in (opt.state_dict(), by_name):  # by position (checkpoints before distributed training), by name
        fresh = build_optimizer(model, TrainConfig(), "cpu")
        load_optimizer_state(model, fresh, saved)
        for p in model.parameters():
            assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> Path:
    """A tiny base checkpoint and conversations whose replies differ in length (so ranks hold different token counts)."""
    import json

    from conftest import small_text_corpus
    from gptlab.checkpoint import save_checkpoint
    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("sft")
    tok = Tokenizer.train(small_text_corpus(30_000), vocab_size=400, progress=False)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(root / "base", 0, base, base.config, tok)
    rows = [
        {"messages": [{"role": "user", "content": f"item {i}?"}, {"role": "assistant", "content": "yes " * (1 + i % 5)}]} for i in range(64)
    ]
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("lora", [[], ["--lora-r", "4"]], ids=["full", "lora"])
def test_sft_in_two_processes_matches_one(sft_inputs, lora, tmp_path):
    from gptlab.cli import main

    args = ["--ckpt", str(sft_inputs / "base"), "--data", str(sft_inputs / "chats.jsonl"), "--val-fraction", "0", "--batch-size", "4",
            "--grad-accum", "2", "--max-steps", "6", "--lr", "3e-3", "--seed", "3", "--device", "cpu", "-q", *lora]  # fmt: skip
    assert main(["sft", "--out", str(tmp_path / "one"), *args]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptlab", "sft", "--out", str(tmp_path / "two"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = weights(tmp_path / "one", 6), weights(tmp_path / "two", 6)
    adapter_only = set(one) == {k for k in one if "lora_" in k} | {"added_tokens.wte"}  # and the chat tokens' rows
    assert adapter_only == bool(lora)
    assert max_diff(one, two) < 1e-5


@pytest.fixture(scope="module")
def muon_reference(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("muon_single")
    train(GPTConfig(**MODEL), TrainConfig(**TRAIN, optimizer="muon", muon_ns_dtype="float32"), data_dir, run_dir, progress=False)
    return run_dir


# Newton-Schulz in float32 in these comparisons: in bfloat16 a last-bit difference in the summed gradients flips
# roundings of the update, and the runs part by ~3e-3 in 20 steps however exact the distributed algorithm is
MUON = ("--optimizer", "muon", "--muon-ns-dtype", "float32")


def test_muon_in_two_processes_matches_one(data_dir, muon_reference, tmp_path):
    """DDP averages the gradients before the step, so every process orthogonalises the same momentum."""
    torchrun(data_dir, tmp_path / "run", *MUON, "--strategy", "ddp")
    diff = max_diff(weights(tmp_path / "run"), weights(muon_reference))
    print(f"\nmuon ddp: max |param diff| after 20 steps = {diff:.2e}")
    assert diff <= 1e-5


def test_muon_under_fsdp_matches_one_process_and_resumes_in_one(data_dir, muon_reference, tmp_path):
    """FSDP shards each matrix by rows: Muon gathers the whole update, orthogonalises it and keeps its rows, and its
    sharded momentum is saved whole. 10 sharded steps, then 10 in one process, equal 20 in one process."""
    torchrun(data_dir, tmp_path / "run", *MUON, "--strategy", "fsdp", "--stop-at", "10")
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000010" / "trainer.pt", weights_only=True)["optimizer"]["state"]
    buffers = [s["momentum_buffer"] for s in state.values() if "momentum_buffer" in s]
    assert len(buffers) == 4 * MODEL["n_layer"] and all(b.shape in {(96, 32), (32, 32), (128, 32), (32, 128)} for b in buffers)
    train(None, None, data_dir, tmp_path / "run", resume=True, progress=False)
    diff = max_diff(weights(tmp_path / "run"), weights(muon_reference))
    print(f"\nmuon fsdp 2 -> 1 process: max |param diff| after 20 steps = {diff:.2e}")
    assert diff <= 1e-5
