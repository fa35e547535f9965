"""A run survives being killed, interrupted, fed non-finite numbers or a full disk."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.checkpoint import load_checkpoint, step_dirs
from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import CheckpointError, GptlabError
from gptlab.model import GPT
from gptlab.train import build_optimizer, train, train_step

# about 3 s of training: long enough that a kill lands inside it, not before or after
FLAGS = ["--vocab-size", "512", "--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
         "--batch-size", "16", "--max-steps", "150", "--warmup-steps", "4", "--eval-every", "50", "--eval-batches", "2",
         "--save-every", "7", "--keep-last", "2", "--log-every", "1", "--seed", "7", "--device", "cpu", "-q"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(data_dir: Path, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptlab", "train", "--data", str(data_dir), "--out", str(run_dir), "--resume", *FLAGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, past: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(run_dir) <= past:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(step_dirs(run_dir)[-1] / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("whole")
    proc = start(data_dir, run_dir)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    return final_weights(run_dir)


def test_killed_three_times_at_random_moments_ends_bit_identical(data_dir, uninterrupted, tmp_path):
    run_dir, rng = tmp_path / "run", random.Random(0)
    killed_after: list[int] = []
    for _ in range(3):
        proc = start(data_dir, run_dir)
        wait_for_step(proc, run_dir, logged_step(run_dir))  # it is training, past where it was killed last time
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere in a step, an evaluation or a checkpoint write
        proc.kill()
        killed_after.append(logged_step(run_dir))
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read()  # killed mid-run, not after it had finished
        for ckpt in step_dirs(run_dir):  # whatever it was doing, every published checkpoint is whole
            load_checkpoint(ckpt, with_trainer_state=True)
    (run_dir / "checkpoints" / ".step_00000099.tmp-left-by-a-kill").mkdir()
    proc = start(data_dir, run_dir)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    resumed = final_weights(run_dir)
    differ = [k for k in uninterrupted if not torch.equal(resumed[k], uninterrupted[k])]
    assert not differ, f"{differ} differ; kills after steps {killed_after}"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # half-written copies cleared


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(data_dir, run_dir)
    wait_for_step(proc, run_dir, 4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM after step" in out
    stopped = int(out.split("after step ")[1].split(";")[0])
    assert load_checkpoint(run_dir).step == stopped < 150  # saved where it stopped, not at the last save_every
    proc = start(data_dir, run_dir)
    assert proc.wait(timeout=120) == 0
    resumed = final_weights(run_dir)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


TINY = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)


def tcfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, max_steps=8, warmup_steps=2, eval_every=4, eval_batches=2, save_every=4, log_every=1, device="cpu", seed=11)
    return TrainConfig(**{**base, **kw})


@pytest.mark.filterwarnings("ignore:skipping a damaged checkpoint")
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path):
    train(TINY, tcfg(), data_dir, tmp_path / "whole", progress=False)
    train(TINY, tcfg(), data_dir, tmp_path / "run", progress=False)  # checkpoints at 4 and 8
    latest = step_dirs(tmp_path / "run")[-1] / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:-8] + b"garbage!")
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint.*step_00000008"):
        result = train(None, None, data_dir, tmp_path / "run", resume=True, progress=False)
    assert result.step == 8  # steps 5..8 done again from step 4, to the same weights
    a, b = load_checkpoint(tmp_path / "whole").model.state_dict(), load_checkpoint(tmp_path / "run").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for ckpt in step_dirs(tmp_path / "run"):
        (ckpt / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="none of its 2 checkpoints loads"):
        train(None, None, data_dir, tmp_path / "run", resume=True, progress=False)


def test_non_finite_steps_are_skipped_then_the_run_stops(data_dir, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = GPT(TINY)
    cfg = tcfg()
    opt = build_optimizer(model, cfg, "cpu")
    from gptlab.data import ShardLoader, load_data

    sampler = ShardLoader(load_data(data_dir).shards("train"), 32, 4, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.transformer.wpe.weight[0, 0] = float("inf")
    loss, norm, stepped = train_step(model, opt, sampler, cfg, torch.device("cpu"))
    assert not stepped and not opt.state  # no update, no Adam moments touched
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model.transformer.wpe.weight[0, 0] = before["transformer.wpe.weight"][0, 0]
    assert train_step(model, opt, sampler, cfg, torch.device("cpu"))[2]

    # from step 3 on every loss is NaN: two skipped steps warn, the third in a row stops the run
    import gptlab.model

    real, calls = gptlab.model.cross_entropy, []

    def poisoned(logits, targets):
        calls.append(1)
        return real(logits, targets) * (float("nan") if len(calls) > 2 else 1.0)

    monkeypatch.setattr(gptlab.model, "cross_entropy", poisoned)
    with pytest.warns(UserWarning, match=r"step [34]: loss nan .* is not finite; update skipped"):
        with pytest.raises(GptlabError, match="3 steps in a row ending at step 5 had a non-finite loss"):
            train(TINY, tcfg(max_bad_steps=3, eval_every=100), data_dir, tmp_path / "nan", progress=False)
    assert load_checkpoint(tmp_path / "nan").step == 4  # the regular save at step 4 still happened


def test_a_full_disk_at_save_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    import gptlab.checkpoint as checkpoint

    real, calls = checkpoint._save_safetensors_model, []

    def fill_up(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_save_safetensors_model", fill_up)
    with pytest.raises(CheckpointError, match=r"cannot write the step 8 checkpoint .*No space left on device.*step_00000004 is kept"):
        train(TINY, tcfg(), data_dir, tmp_path / "run", progress=False)
    assert [p.name for p in step_dirs(tmp_path / "run")] == ["step_00000004"]
    assert load_checkpoint(tmp_path / "run", with_trainer_state=True).step == 4
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written copy left


def test_too_little_disk_for_a_checkpoint_fails_before_training(data_dir, tmp_path, monkeypatch):
    import shutil

    import gptlab.train

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(gptlab.train.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    with pytest.raises(GptlabError, match="0 MB free on its disk, but one checkpoint needs about 1 MB"):
        train(TINY, tcfg(), data_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def published_shards(out: Path) -> int:
    try:
        state = json.loads((out / ".prepare-state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(len(s["shards"]) for s in state["splits"].values())


def test_a_prepare_killed_twice_resumes_to_identical_shards(tmp_path):
    """SIGKILL a parallel `gptlab prepare` twice while it writes shards; the resumed result equals one uninterrupted run."""
    from pydoc_data.topics import topics

    from gptlab.data import prepare

    src = tmp_path / "in"
    src.mkdir()
    texts = list(topics.values())
    for i in range(30):  # about 20 MB: one to two seconds of tokenizing
        random.Random(i).shuffle(texts)
        (src / f"part{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    reference = tmp_path / "reference"
    prepare(reference, "gpt2", inputs=[src], shard_tokens=50_000, workers=2, progress=False)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gptlab", "prepare", "--input", str(src), "--tokenizer", "gpt2", "--out", str(out),
           "--shard-tokens", "50000", "--workers", "2", "-q"]  # fmt: skip
    rng = random.Random(0)
    killed_at = []
    for _ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        before = published_shards(out)
        deadline = time.monotonic() + 60
        while published_shards(out) <= before:  # a kill after new shards exist, at a random moment
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the prepare made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        killed_at.append(published_shards(out))
    print(f"killed after {killed_at} published shards")
    assert not (out / "meta.json").exists() and killed_at[0] < killed_at[1]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not list(out.glob(".*"))  # no state file, no half-written shard left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in reference.iterdir()}
