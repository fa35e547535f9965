import json
import math
import os

import pytest
import torch
from torch import nn

from gptlab.checkpoint import load_checkpoint, step_dirs
from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import ConfigError, DataError, GptlabError
from gptlab.model import GPT
from gptlab.plot import plot_run
from gptlab.train import build_optimizer, loss_metrics, lr_at, train

TINY = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)


def tcfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, max_steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4, eval_batches=2,
                save_every=4, log_every=1, device="cpu", seed=11)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule_hand_values():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.5 * 0.9)  # half way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)


def test_optimizer_decays_only_matrices_and_matches_reference_adamw():
    torch.manual_seed(0)
    model = GPT(TINY)
    opt = build_optimizer(model, tcfg(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_tensors = len(decay["params"]) + len(no_decay["params"])
    assert n_tensors == len(list(model.parameters()))
    # one step equals the textbook (non-fused, per-parameter) AdamW on the same groups
    ref_model = GPT(TINY)
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW(
        [{"params": [p for p in ref_model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in ref_model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )  # fmt: skip
    x = torch.randint(0, 512, (2, 32))
    for m, o in ((model, opt), (ref_model, ref)):
        _, loss = m(x, x)
        loss.backward()
        o.step()
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_loss_metrics_hand_computed():
    m = loss_metrics(2.0, bytes_per_token=4.0)
    assert m["perplexity"] == pytest.approx(math.exp(2.0))
    assert m["bpb"] == pytest.approx(2.0 / math.log(2) / 4.0)


def test_training_reduces_loss_and_writes_metrics_checkpoints_and_plots(tmp_path, data_dir):
    run = tmp_path / "run"
    result = train(TINY, tcfg(max_steps=30, lr=1e-2, min_lr=1e-3, eval_every=10, save_every=10, keep_last=2), data_dir, run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 30 and len(vals) == 3
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5 and vals[-1] < vals[0]
    assert {"lr", "tokens_per_s", "grad_norm", "tokens"} <= set(records[0])
    assert [p.name for p in step_dirs(run)] == ["step_00000020", "step_00000030"]  # keep_last=2
    assert result.checkpoint == step_dirs(run)[-1] and result.val["bpb"] > 0
    ckpt = load_checkpoint(run)
    assert ckpt.step == 30 and ckpt.model_config == TINY
    pngs = plot_run(run)
    assert [p.name for p in pngs] == ["loss.png", "lr.png"] and all(p.stat().st_size > 5000 for p in pngs)


def test_plot_skips_a_torn_last_line_but_rejects_a_broken_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    good = [json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 1e-3}) for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(good) + '\n{"step": 6, "lo')  # a trainer mid-write
    assert [p.name for p in plot_run(run)] == ["loss.png", "lr.png"]
    (run / "metrics.jsonl").write_text(good[0] + '\n{"step": 2, "lo\n' + good[2] + "\n")
    with pytest.raises(DataError, match="metrics.jsonl:2: not a JSON line"):
        plot_run(run)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data_dir, dropout):
    cfg = TINY.replace(dropout=dropout)
    train(cfg, tcfg(), data_dir, tmp_path / "full", progress=False)
    full = params(load_checkpoint(tmp_path / "full").model)

    train(cfg, tcfg(), data_dir, tmp_path / "split", stop_at=3, progress=False)  # stops between saves
    assert load_checkpoint(tmp_path / "split").step == 3
    with (tmp_path / "split/metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a record torn by a killed process
    train(cfg, tcfg(), data_dir, tmp_path / "split", resume=True, progress=False)
    resumed = params(load_checkpoint(tmp_path / "split").model)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no records duplicated by the resume


def test_a_checkpoint_without_a_loader_cursor_resumes_with_a_warning(tmp_path, data_dir, monkeypatch):
    """Checkpoints from before the shard loader kept a torch.Generator state under "sampler" instead."""
    import gptlab.train

    real = gptlab.train.save_checkpoint

    def old_format(run_dir, step, model, model_config, tokenizer, cfg, trainer_state, **kw):
        trainer_state = {**trainer_state, "sampler": torch.Generator().get_state()}
        del trainer_state["loader"]
        return real(run_dir, step, model, model_config, tokenizer, cfg, trainer_state, **kw)

    with monkeypatch.context() as m:
        m.setattr(gptlab.train, "save_checkpoint", old_format)
        train(TINY, tcfg(), data_dir, tmp_path / "run", stop_at=4, progress=False)
    with pytest.warns(UserWarning, match="holds no data-loader position .* the data order starts over"):
        result = train(None, None, data_dir, tmp_path / "run", resume=True, progress=False)
    assert result.step == tcfg().max_steps


def test_resume_without_checkpoint_starts_fresh(tmp_path, data_dir):
    train(TINY, tcfg(max_steps=3), data_dir, tmp_path / "a", progress=False)
    train(TINY, tcfg(max_steps=3), data_dir, tmp_path / "b", resume=True, progress=False)
    a, b = params(load_checkpoint(tmp_path / "a").model), params(load_checkpoint(tmp_path / "b").model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_the_large_batch(tmp_path, data_dir):
    train(TINY, tcfg(max_steps=3, batch_size=8), data_dir, tmp_path / "big", progress=False)
    train(TINY, tcfg(max_steps=3, batch_size=4, grad_accum=2), data_dir, tmp_path / "acc", progress=False)
    a, b = params(load_checkpoint(tmp_path / "big").model), params(load_checkpoint(tmp_path / "acc").model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.filterwarnings("ignore:.*no native bfloat16")
def test_bf16_autocast_trains(tmp_path, data_dir):
    result = train(TINY, tcfg(max_steps=10, eval_every=10, dtype="bfloat16"), data_dir, tmp_path / "bf16", progress=False)
    ckpt = load_checkpoint(tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())  # master weights stay fp32
    assert math.isfinite(result.val["loss"]) and result.val["loss"] < math.log(512)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: GPTConfig(n_embd=100, n_head=3), "n_embd"),
        (lambda: GPTConfig(n_layer=0), "n_layer"),
        (lambda: GPTConfig(dropout=1.5), "dropout"),
        (lambda: GPTConfig(pos_encoding="rotary"), "pos_encoding"),
        (lambda: TrainConfig(warmup_steps=50, max_steps=10), "warmup_steps"),
        (lambda: TrainConfig(lr=1e-3, min_lr=1e-2), "min_lr"),
        (lambda: TrainConfig(dtype="float8"), "dtype"),
        (lambda: TrainConfig(batch_size=0), "batch_size"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_bad_run_setups_fail_before_any_work(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="block_size"):
        train(TINY.replace(block_size=10**6), tcfg(), data_dir, tmp_path / "r1", progress=False)
    with pytest.raises(ConfigError, match="vocab_size"):
        train(TINY.replace(vocab_size=100), tcfg(), data_dir, tmp_path / "r2", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(GptlabError, match=f"run directory is not writable: {blocker} is a file, not a directory"):
        train(TINY, tcfg(), data_dir, blocker / "run", progress=False)
    with pytest.raises(GptlabError, match="not writable: /proc/nope: No such file or directory"):  # refused even to root
        train(TINY, tcfg(), data_dir, "/proc/nope", progress=False)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_run_dir(tmp_path, data_dir):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(GptlabError, match="not writable"):
        train(TINY, tcfg(), data_dir, ro / "run", progress=False)


def test_activation_checkpointing_gives_the_same_weights_and_peak_memory_is_logged(tmp_path, data_dir, monkeypatch):
    plain = train(TINY, tcfg(max_steps=4), data_dir, tmp_path / "plain", progress=False)
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(TINY, tcfg(max_steps=4, activation_checkpointing=True), data_dir, tmp_path / "ckpt", progress=False)
    assert len(calls) == 4 * TINY.n_layer  # every block of every training step (not evaluation)
    a, b = params(load_checkpoint(tmp_path / "plain").model), params(load_checkpoint(tmp_path / "ckpt").model)
    assert all(torch.equal(a[k], b[k]) for k in a)  # recomputed activations are the same numbers
    record = json.loads((tmp_path / "ckpt/metrics.jsonl").read_text().splitlines()[0])
    assert record["peak_mem_mb"] > 10 and plain.peak_mem_mb > 10


# ----------------------------------------------------------------------------- warmup default and time budget


def test_warmup_follows_the_run_length_unless_given():
    assert [TrainConfig(max_steps=n).warmup for n in (5, 30, 999, 1000, 5000)] == [0, 3, 99, 100, 100]
    assert TrainConfig(max_steps=30, warmup_steps=7).warmup == 7
    with pytest.raises(ConfigError, match=r"warmup_steps must be an integer in \[0, max_steps=30\], got 100"):
        TrainConfig(max_steps=30, warmup_steps=100)  # an explicit value that does not fit stays an error
    no_warmup = TrainConfig(max_steps=5, lr=1.0, min_lr=0.0)
    assert lr_at(0, no_warmup) == pytest.approx(1.0) and lr_at(5, no_warmup) == 0.0  # straight into the cosine


class FakeClock:
    """A clock that moves only when the test says: training steps and evaluations cost simulated seconds."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def simulated(monkeypatch):
    """Simulated time for gptlab.train: each optimizer step costs `step_s` (calibration steps, which run
    at learning rate 0, cost `calibration_step_s`), each evaluation batch `eval_batch_s`."""
    import gptlab.train as trainmod

    clock = FakeClock()
    costs = {"calibration_step_s": 0.1, "step_s": 0.1, "eval_batch_s": 0.01}
    real_step, real_eval = trainmod.train_step, trainmod.estimate_loss

    def train_step(model, optimizer, *args, **kwargs):
        out = real_step(model, optimizer, *args, **kwargs)
        calibrating = optimizer.param_groups[0]["lr"] == 0.0
        clock.now += costs["calibration_step_s" if calibrating else "step_s"]
        return out

    def estimate_loss(model, loader, n_batches, *args, **kwargs):
        clock.now += n_batches * costs["eval_batch_s"]
        return real_eval(model, loader, n_batches, *args, **kwargs)

    monkeypatch.setattr(trainmod, "clock", clock)
    monkeypatch.setattr(trainmod, "train_step", train_step)
    monkeypatch.setattr(trainmod, "estimate_loss", estimate_loss)
    return clock, costs


def test_a_time_budget_plans_the_steps_and_leaves_the_run_as_a_plain_one(tmp_path, data_dir, simulated):
    clock, costs = simulated
    lines = []
    t0 = clock.now
    budget = train(TINY, tcfg(time_budget=6.0, warmup_steps=None, eval_every=10, save_every=20), data_dir, tmp_path / "budget", progress=False, report=lines.append)
    plan = budget.plan
    assert plan is not None and plan.step_s == pytest.approx(0.1) and plan.eval_s == pytest.approx(2 * 0.01)
    assert budget.stopped_by is None and budget.step == budget.max_steps == plan.steps
    # the plan uses the budget: calibration (7 steps at most) and the run end within it, with little left over
    assert 0.9 * 6.0 <= clock.now - t0 <= 6.0
    assert 40 <= plan.steps <= 52
    summary = "\n".join(lines)
    assert f"-> {plan.steps} steps" in summary and "time budget 6.0s" in summary
    assert f"warmup {plan.steps // 10} steps (auto" in summary

    # calibration left no trace: the same step count without a budget gives bit-identical weights
    plain = train(TINY, tcfg(max_steps=plan.steps, warmup_steps=None, eval_every=10, save_every=20), data_dir, tmp_path / "plain", progress=False)
    a, b = load_checkpoint(budget.checkpoint).model.state_dict(), load_checkpoint(plain.checkpoint).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "budget" / "run.json").read_text())["train_config"]["max_steps"] == plan.steps


def test_a_slower_machine_cuts_the_schedule_and_still_evaluates_and_saves_on_time(tmp_path, data_dir, simulated):
    clock, costs = simulated
    costs["step_s"] = 0.3  # three times slower than calibrated, from the first real step on
    t0 = clock.now
    result = train(TINY, tcfg(time_budget=6.0, eval_every=1000, save_every=1000), data_dir, tmp_path / "run", progress=False)
    assert result.stopped_by == "time budget" and result.step < result.max_steps == result.plan.steps
    assert clock.now - t0 <= 6.0  # on time, final evaluation included
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / f"step_{result.step:08d}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == result.step and "val_loss" in records[-1] and result.val is not None
    # cut, not stretched: the last step's learning rate is the planned schedule's
    last_train = [r for r in records if "lr" in r][-1]
    assert last_train["lr"] == pytest.approx(lr_at(result.step - 1, tcfg(max_steps=result.max_steps)))
    assert load_checkpoint(result.checkpoint).train_config.max_steps == result.max_steps


def test_a_resumed_run_keeps_its_schedule_and_takes_a_budget_only_when_given(tmp_path, data_dir, simulated):
    clock, costs = simulated
    run_dir = tmp_path / "run"
    first = train(TINY, tcfg(time_budget=4.0), data_dir, run_dir, progress=False)
    assert first.plan is not None and first.stopped_by is None
    # the saved budget does not carry over: extending the schedule runs to its end
    longer = first.max_steps + 30
    resumed = train(None, None, data_dir, run_dir, resume=True, progress=False, resume_overrides={"max_steps": longer})
    assert resumed.step == resumed.max_steps == longer and resumed.plan is None
    # a budget given at the resume caps that session without changing the schedule
    costs["step_s"] = 0.5
    capped = train(None, None, data_dir, run_dir, resume=True, progress=False, resume_overrides={"max_steps": longer + 100, "time_budget": 3.0})
    assert capped.stopped_by == "time budget" and capped.max_steps == longer + 100 and longer < capped.step < longer + 10


def test_a_budget_too_short_for_one_step_is_refused(tmp_path, data_dir, simulated):
    clock, costs = simulated
    costs["calibration_step_s"] = costs["step_s"] = 2.0
    with pytest.raises(ConfigError, match="leaves no time to train"):
        train(TINY, tcfg(time_budget=7.0, warmup_steps=None), data_dir, tmp_path / "run", progress=False)  # calibration takes 6 s
    costs["calibration_step_s"] = costs["step_s"] = 0.1
    with pytest.raises(ConfigError, match=r"fits \d+ steps, fewer than warmup_steps \(500\)"):
        train(TINY, tcfg(time_budget=5.0, warmup_steps=500, max_steps=1000), data_dir, tmp_path / "run2", progress=False)


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1e9])
def test_clip_gradients_matches_torch_clip_grad_norm(max_norm: float) -> None:
    from gptlab.train import clip_gradients

    torch.manual_seed(0)
    ours, theirs = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    ours[1].bias.grad = None  # a parameter without a gradient is skipped by both
    theirs[1].bias.grad = None
    norm = clip_gradients(ours, max_norm)
    expected = nn.utils.clip_grad_norm_(theirs.parameters(), max_norm if max_norm > 0 else math.inf)
    assert norm == pytest.approx(float(expected), rel=1e-6) and norm > 0.05
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    if max_norm == 0.05:
        assert float(nn.utils.get_total_norm([p.grad for p in ours.parameters() if p.grad is not None])) == pytest.approx(0.05, rel=1e-4)
