"""The RLHF demo's pipeline end to end, at a sliver of its size, on a tiny chat model: every stage runs,
writes what it says, and the table has one row per method and seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import small_text_corpus
from gptlab.chat import add_chat_tokens
from gptlab.checkpoint import save_checkpoint
from gptlab.config import GPTConfig
from gptlab.demo import paired_gain, run_rlhf_demo
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer


def test_the_rlhf_demo_runs_every_stage_and_reports_each_method(tmp_path: Path, capsys) -> None:
    tok, _ = add_chat_tokens(Tokenizer.train(small_text_corpus(30_000), vocab_size=400, progress=False))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=448, block_size=128, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "chat", 0, model, model.config, tok)  # stands in for the chat demo's model
    summary = run_rlhf_demo(tmp_path, seeds=(3,), scale=0.03, progress=False)
    out = capsys.readouterr().out
    for stage in ("[1/5] SFT", "[2/5] preference pairs", "[3/5] reward model", "[4/5] seed 3", "[5/5] held-out results"):
        assert stage in out, out
    assert [(r["method"], r["seed"]) for r in summary["table"]] == [("SFT", 0), ("PPO", 3), ("DPO", 3), ("GRPO", 3)]
    for method in ("PPO", "DPO", "GRPO"):
        assert f"{method}: above SFT beyond the paired 95% interval in" in out, out
    assert all("gain" in r and r["gain_95"] >= 0 for r in summary["table"][1:])
    assert summary["eval_prompts"] == 2000 and 0 <= summary["rm_pair_accuracy"] <= 1
    assert all(0 <= r["accuracy"] <= 1 and r["kl"] == r["kl"] for r in summary["table"])  # no NaN KL
    assert json.loads((tmp_path / "rlhf_demo.json").read_text())["table"] == summary["table"]
    pairs = [json.loads(line) for line in (tmp_path / "rlhf" / "pairs_train.jsonl").read_text().splitlines()]
    assert len(pairs) > 4000 and all(p["chosen"] != p["rejected"] for p in pairs)
    for run in ("sft", "rm", "ppo-3", "dpo-3", "grpo-3"):
        assert (tmp_path / "rlhf" / run / "metrics.jsonl").is_file(), run


def test_paired_gain_by_hand() -> None:
    # d = [1, 0, 0, 1]: mean 0.5, sample variance (4 x 0.25) / 3 = 1/3, standard error sqrt(1/3 / 4)
    gain, half = paired_gain([True, True, False, True], [False, True, False, False])
    assert gain == 0.5 and abs(half - 1.96 * (1 / 12) ** 0.5) < 1e-12
    assert paired_gain([True, False], [True, False]) == (0.0, 0.0)  # the same answers: no gain, no noise
    with pytest.raises(ValueError, match="equal lists"):
        paired_gain([True], [True, False])
