"""GRPO: group advantages and the clipped, KL-penalised loss by hand; rollouts through the engine; a toy
problem with a known optimum solved in a bounded number of steps; resume; bad rewards."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import small_text_corpus
from gptlab.align.grpo import grpo_loss, group_advantages
from gptlab.align.rollout import PromptRow, collate_rollouts, sample_replies, wrong_reply_pairs
from gptlab.chat import ChatTemplate, add_chat_tokens
from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig, SampleConfig
from gptlab.model import GPT, IGNORE_INDEX, label_logprobs
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_advantages_by_hand() -> None:
    a = group_advantages([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, None, 5.0], group_size=4)
    # group 1: mean 0.5, population std 0.5; group 2 scores 2, 2, 5 (the None is left out): mean 3, std sqrt(2)
    x = 0.5 / (0.5 + 1e-4)
    assert a[:4].tolist() == pytest.approx([x, -x, -x, x])
    s = math.sqrt(6 / 3)  # deviations -1, -1, 2: variance 6 / 3
    assert a[4:].tolist() == pytest.approx([-1 / (s + 1e-4), -1 / (s + 1e-4), 0.0, 2 / (s + 1e-4)])
    assert group_advantages([3.0] * 4, 4).abs().max() == 0  # a group that agrees teaches nothing


def test_grpo_loss_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    # on-policy (old = current): ratio 1, nothing clipped, and without a reference the loss is -mean over replies of A
    loss, stats = grpo_loss(logp, logp.detach(), None, mask, adv, clip=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-(1.0 + -2.0) / 2) and stats["clip_fraction"] == 0.0
    loss.backward()
    # d/d logp of -A * exp(logp - old) at ratio 1 is -A, averaged over each reply's tokens, then over replies
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25, 0.0], [1.0, 0.0, 0.0]]))
    # off-policy: ratio e^0.5 > 1.2 is clipped for a positive advantage; k3 KL against a reference by hand
    old = logp.detach() - 0.5
    ref = logp.detach() - 1.0
    loss, stats = grpo_loss(logp.detach(), old, ref, mask, adv, clip=0.2, beta=0.1)
    k3 = math.exp(-1.0) + 1.0 - 1
    ratio = math.exp(0.5)
    first = -min(ratio * 1.0, 1.2 * 1.0) + 0.1 * k3  # every token of reply 1 alike
    second = -min(ratio * -2.0, 1.2 * -2.0) + 0.1 * k3
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(1.0) and stats["kl"] == pytest.approx(k3, rel=1e-6)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """A chat model that answers "colour of NAME?" with one of four colours, each about as likely, and prompts for it."""
    root = tmp_path_factory.mktemp("grpo")
    tok, _ = add_chat_tokens(Tokenizer.train(small_text_corpus(30_000), vocab_size=400, progress=False))
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(root / "base", 0, base, base.config, tok)
    names, palette = ["ada", "bob", "cy", "dee", "eve", "fay"], ["red", "blue", "green", "black"]
    g = torch.Generator().manual_seed(0)
    rows = [
        {"messages": [{"role": "user", "content": f"colour of {names[i]}?"}, {"role": "assistant", "content": palette[int(c)]}]}
        for i in range(len(names)) for c in torch.randint(0, 4, (60,), generator=g)
    ]  # fmt: skip
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["sft", "--ckpt", str(root / "base"), "--data", str(root / "sft.jsonl"), "--out", str(root / "sft"), "--max-steps", "120",
            "--lr", "1e-2", "--val-fraction", "0", "-q"]  # fmt: skip
    assert main(argv) == 0
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"colour of {n}?", "answer": "red"}) + "\n" for n in names))
    return root


def test_rollouts_sample_groups_and_score_only_the_replies(colours: Path) -> None:
    from gptlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(colours / "sft")
    template = ChatTemplate(ckpt.tokenizer)
    prompts = [[{"role": "user", "content": "colour of ada?"}], [{"role": "user", "content": "colour of bob?"}]]
    roll = sample_replies(ckpt.model, template, prompts, 4, SampleConfig(max_new_tokens=6, temperature=1.0), seed=5)
    assert len(roll) == 8 and roll.prompts[3] == prompts[0] and roll.prompts[4] == prompts[1]
    assert all(r[-1] == template.end_id for r, done in zip(roll.reply_ids, roll.finished, strict=True) if done)
    again = sample_replies(ckpt.model, template, prompts, 4, SampleConfig(max_new_tokens=6, temperature=1.0), seed=5)
    assert again.reply_ids == roll.reply_ids  # seeded: a run reproduces
    x, y = collate_rollouts(roll)
    lp = label_logprobs(ckpt.model.eval(), x, y)
    for i in range(len(roll)):
        assert (y[i] != IGNORE_INDEX).sum() == len(roll.reply_ids[i])
        # the summed log-prob of a reply equals the one computed from its own forward pass
        ids = torch.tensor([roll.prompt_ids[i] + roll.reply_ids[i]])
        with torch.no_grad():
            own = torch.log_softmax(ckpt.model(ids[:, :-1])[0][0], -1)
        n = len(roll.prompt_ids[i])
        expected = sum(own[n - 1 + t, tok].item() for t, tok in enumerate(roll.reply_ids[i]))
        assert lp[i].sum().item() == pytest.approx(expected, abs=1e-4)


def test_wrong_reply_pairs_are_the_policys_own_distinct_mistakes(colours: Path) -> None:
    from gptlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(colours / "sft")
    template = ChatTemplate(ckpt.tokenizer)
    rows = [PromptRow([{"role": "user", "content": f"colour of {n}?"}], "red", f"x:{i}") for i, n in enumerate(["ada", "bob", "cy"])]
    rows.append(PromptRow([{"role": "user", "content": "colour of dee?"}], None, "x:3"))  # nothing to check it against: no pairs
    cfg = SampleConfig(max_new_tokens=4, temperature=1.0)
    pairs = wrong_reply_pairs(ckpt.model, template, rows, 8, cfg, seed=3)
    sampled = sample_replies(ckpt.model, template, [r.messages for r in rows[:3]], 8, cfg, seed=3).texts  # the same draws
    for k, row in enumerate(rows[:3]):
        mine = [p["rejected"] for p in pairs if p["prompt"] == row.messages]
        assert all(p["chosen"] == "red" for p in pairs if p["prompt"] == row.messages)
        assert mine == list(dict.fromkeys(t for t in sampled[k * 8 : (k + 1) * 8] if t.strip() and t.strip() != "red"))
    assert len(pairs) > 3 and not [p for p in pairs if p["prompt"] == rows[3].messages]


def test_grpo_solves_a_toy_problem_with_a_known_optimum(colours: Path, tmp_path: Path, capsys) -> None:
    # the optimum: always answer "red" (reward 1); the starting policy says it about a quarter of the time
    argv = ["grpo", "--policy", str(colours / "sft"), "--prompts", str(colours / "prompts.jsonl"), "--val-prompts", str(colours / "prompts.jsonl"),
            "--reward", "builtin:exact", "--group-size", "8", "--prompts-per-step", "3", "--max-new-tokens", "4", "--max-steps", "30",
            "--eval-every", "10", "--lr", "3e-3", "--min-lr", "3e-3", "--beta", "0.01", "--out", str(tmp_path / "run"), "-q"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["reward"] < 0.6
    assert records[-1]["val_reward"] == 1.0  # greedy replies to every held-out prompt are "red"
    assert all(r["kl"] >= 0 for r in records) and records[-1]["kl"] > 0
    out = capsys.readouterr().out
    assert "held-out mean reward 1.0000" in out
    assert main(["grpo", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "32", "-q"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 32


def test_a_broken_reward_function_stops_the_run_in_one_line(colours: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.py").write_text("def score(prompt, completion):\n    return 'high'\n")
    base = ["grpo", "--policy", str(colours / "sft"), "--prompts", str(colours / "prompts.jsonl"), "--out", str(tmp_path / "run"), "-q"]
    for reward, named in ((f"py:{tmp_path / 'bad.py'}:score", "failed on all 32 samples"), (f"py:{tmp_path / 'bad.py'}:nope", "nope")):
        assert main([*base, "--reward", reward, "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
    assert main([*base, "--reward", "builtin:exact", "--batch-size", "4"]) == 2
    assert "grpo does not take --batch-size" in capsys.readouterr().err


def test_resuming_against_a_changed_reference_is_refused_in_one_line(colours: Path, tmp_path: Path, capsys) -> None:
    """The frozen reference is reloaded from the starting checkpoint on resume: a model there with another
    tokenizer (same vocabulary size) must be refused, not scored at the wrong ids."""
    shutil.copytree(colours / "sft", tmp_path / "start")
    argv = ["grpo", "--policy", str(tmp_path / "start"), "--prompts", str(colours / "prompts.jsonl"), "--reward", "builtin:exact",
            "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "4", "--max-steps", "2", "--out", str(tmp_path / "run"), "-q"]  # fmt: skip
    assert main(argv) == 0
    other, _ = add_chat_tokens(Tokenizer.train(small_text_corpus(20_000), vocab_size=380, progress=False))
    model = GPT(GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=2, n_embd=32))
    step = load_checkpoint(tmp_path / "start").step  # the checkpoint the run recorded as its start
    shutil.rmtree(tmp_path / "start")
    save_checkpoint(tmp_path / "start", step, model, model.config, other)
    assert main(["grpo", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "3", "-q"]) == 2
    err = capsys.readouterr().err
    assert "(the run's starting policy, reloaded to resume) has another tokenizer than the policy" in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- PPO


def test_kl_penalised_per_token_rewards_by_hand() -> None:
    from gptlab.align.ppo import kl_penalised_rewards

    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.25, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    r = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) on reply tokens; the score lands on each reply's last token
    expected = torch.tensor([[0.0, -0.05, 0.1 + 2.0, 0.0], [0.0, 0.025 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)


def test_gae_against_a_plain_loop() -> None:
    from gptlab.align.ppo import gae

    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:6], mask[1, 1:7], mask[2, 4:5] = True, True, True  # each reply a contiguous run of tokens
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        t = mask[b].nonzero().flatten().tolist()
        r, v = rewards[b, t].tolist(), values[b, t].tolist() + [0.0]  # V after the last token is 0
        expected = [0.0] * len(t)
        running = 0.0
        for k in reversed(range(len(t))):
            running = r[k] + gamma * v[k + 1] - v[k] + gamma * lam * running
            expected[k] = running
        assert adv[b, t].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert ret[b, t].tolist() == pytest.approx([a + v[k] for k, a in enumerate(expected)], rel=1e-5, abs=1e-6)
        assert (adv[b][~mask[b]] == 0).all()


def test_the_first_minibatch_of_an_epoch_has_ratio_one_and_clips_nothing() -> None:
    from gptlab.align.ppo import ppo_losses

    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 5, generator=g).requires_grad_()
    values = torch.randn(4, 5, generator=g).requires_grad_()
    mask = torch.rand(4, 5, generator=g) > 0.3
    adv, ret = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    policy_loss, value_loss, stats = ppo_losses(logp, logp.detach(), values, values.detach(), ret, adv, mask, clip=0.2, value_clip=0.2)
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0
    m = mask.float()
    assert policy_loss.item() == pytest.approx((-(adv * m).sum() / m.sum()).item(), rel=1e-5)  # ratio 1: -mean A
    assert value_loss.item() == pytest.approx((0.5 * ((values - ret) ** 2 * m).sum() / m.sum()).item(), rel=1e-5)


def test_ppo_solves_the_toy_problem_and_reports_kl(colours: Path, tmp_path: Path) -> None:
    argv = ["ppo", "--policy", str(colours / "sft"), "--prompts", str(colours / "prompts.jsonl"), "--val-prompts", str(colours / "prompts.jsonl"),
            "--reward", "builtin:exact", "--prompts-per-step", "16", "--max-new-tokens", "4", "--max-steps", "25", "--eval-every", "25",
            "--lr", "1e-3", "--min-lr", "1e-3", "--value-lr", "2e-2", "--kl-coef", "0.01", "--out", str(tmp_path / "run"), "-q"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["reward"] < 0.6 and records[-1]["val_reward"] == 1.0
    # the value head trains at its own rate, in its own AdamW group, and learns the returns
    groups = load_checkpoint(tmp_path / "run", with_trainer_state=True).trainer_state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 2e-2]) and len(groups[-1]["params"]) == 2
    # (step to step it jumps whenever the policy changes what it earns: compare the first and last five steps)
    first, last = (sum(r["value_loss"] for r in part) / len(part) for part in (records[:5], records[-5:]))
    assert last < first / 2
    assert records[-1]["kl"] > 0 and all({"value_loss", "entropy", "approx_kl", "clip_fraction", "kl_coef"} <= r.keys() for r in records)
    # resumed at another learning rate: the value head keeps its own peak rate (value_lr), not the saved ratio
    assert main(["ppo", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "26", "--lr", "2e-3", "--min-lr", "2e-3", "-q"]) == 0
    groups = load_checkpoint(tmp_path / "run", with_trainer_state=True).trainer_state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([2e-3, 2e-3, 2e-2])


def test_a_reward_model_drives_grpo_and_a_foreign_one_is_refused(colours: Path, tmp_path: Path, capsys) -> None:
    names, palette = ["ada", "bob", "cy", "dee", "eve", "fay"], ["blue", "green", "black"]
    pairs = [{"prompt": f"colour of {n}?", "chosen": "red", "rejected": c} for n in names for c in palette] * 8
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rm = ["reward", "train", "--ckpt", str(colours / "sft"), "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "rm"),
          "--max-steps", "60", "--lr", "3e-3", "--batch-size", "16", "--val-fraction", "0", "-q"]  # fmt: skip
    assert main(rm) == 0
    argv = ["grpo", "--policy", str(colours / "sft"), "--prompts", str(colours / "prompts.jsonl"), "--reward", str(tmp_path / "rm"),
            "--group-size", "8", "--prompts-per-step", "3", "--max-new-tokens", "4", "--max-steps", "20", "--lr", "3e-3", "--min-lr", "3e-3",
            "--beta", "0.01", "--out", str(tmp_path / "run"), "-q"]  # fmt: skip
    assert main(argv) == 0
    assert "reward reward model" in capsys.readouterr().out
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.5  # the policy learns what the reward model pays for
    # a reward model on another tokenizer: refused in one line
    other = Tokenizer.train(small_text_corpus(20_000), vocab_size=300, progress=False)
    other, _ = add_chat_tokens(other)
    torch.manual_seed(0)
    cfg2 = GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(tmp_path / "base2", 0, GPT(cfg2), cfg2, other)
    rm2 = ["reward", "train", "--ckpt", str(tmp_path / "base2"), "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "rm2")]
    assert main([*rm2, "--max-steps", "1", "--val-fraction", "0", "-q"]) == 0
    argv[argv.index("--reward") + 1] = str(tmp_path / "rm2")
    assert main([*argv[:-2], str(tmp_path / "run2"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "the reward model's tokenizer differs from the policy's" in err and len(err.strip().splitlines()) == 1


def test_reward_hacking_shows_as_reward_up_accuracy_down_and_kl_up(tmp_path: Path) -> None:
    """A reward that pays for long replies (characters, like builtin:length's words): the policy learns to
    ramble, and the run's own held-out exact-match check and its KL to the reference make that visible."""
    tok, _ = add_chat_tokens(Tokenizer.train(small_text_corpus(30_000), vocab_size=400, progress=False))
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "base", 0, base, base.config, tok)
    names, palette = ["ada", "bob", "cy", "dee", "eve", "fay"], ["red", "blue", "green", "black"]
    rows = [{"messages": [{"role": "user", "content": f"colour of {n}?"}, {"role": "assistant", "content": palette[i % 4]}]} for i, n in enumerate(names)]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 40))
    assert main(["sft", "--ckpt", str(tmp_path / "base"), "--data", str(tmp_path / "facts.jsonl"), "--out", str(tmp_path / "sft"), "--max-steps", "80",
                 "--lr", "1e-2", "--val-fraction", "0", "-q"]) == 0  # fmt: skip
    prompts = [{"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in rows]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "long.py").write_text("def score(prompt, completion):\n    return min(len(completion), 40) / 40\n")
    reward = f"py:{tmp_path / 'long.py'}:score"
    argv = ["grpo", "--policy", str(tmp_path / "sft"), "--prompts", str(tmp_path / "prompts.jsonl"), "--val-prompts", str(tmp_path / "prompts.jsonl"),
            "--reward", reward, "--group-size", "8", "--prompts-per-step", "3", "--max-new-tokens", "16", "--max-steps", "40",
            "--eval-every", "40", "--lr", "3e-3", "--min-lr", "3e-3", "--out", str(tmp_path / "run"), "-q"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    from gptlab.align.rewards import load_reward_function
    from gptlab.align.rl import evaluate_policy
    from gptlab.align.rollout import read_prompt_rows
    from gptlab.checkpoint import load_checkpoint

    rows_ = read_prompt_rows(str(tmp_path / "prompts.jsonl"))
    start = evaluate_policy(load_checkpoint(tmp_path / "sft").model, ChatTemplate(tok), rows_, load_reward_function(reward), 16)
    end = records[-1]
    assert start["accuracy"] == 1.0 and end["val_accuracy"] < 0.5  # the task is lost...
    assert end["val_reward"] > start["reward"] + 0.2  # ...while the reward it was given rises
    assert end["kl"] > 1.0 and end["val_reply_tokens"] > 2 * start["reply_tokens"]  # and the drift is in the log
