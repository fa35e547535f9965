"""gptlab evaluate against lm-evaluation-harness itself: one exported model, one lm-eval YAML task over local
JSONL, run by `lm_eval`'s HF model and by gptlab. Per-choice log-likelihoods agree within 1e-4 and acc /
acc_norm are identical, zero-shot and few-shot (first_n), including a document truncated from the left.
Skipped where lm_eval is not installed (it comes with the dev and bench extras, never the core)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

lm_eval = pytest.importorskip("lm_eval")
sys.path.insert(0, str(REPO / "benchmarks"))
from lmeval_peer import OFFLINE, run_lmeval, write_lmeval_task  # noqa: E402

from gptlab.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from gptlab.config import GPTConfig  # noqa: E402
from gptlab.evals.harness import Prompter, build_prompts, run_task  # noqa: E402
from gptlab.evals.tasks import load_task_file  # noqa: E402
from gptlab.hf import export_hf  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = ["red", "green", "blue", "yellow", "dark purple", "orange", "black", "white"]
THINGS = ["grass", "the sky", "snow", "coal", "a banana", "a tomato", "a plum", "a carrot", "a lemon", "the sea",
          "milk", "a crow", "a lime", "an orange", "a cherry", "ink", "a very long story " * 40]  # fmt: skip


def test_loglikelihoods_and_accuracy_equal_lm_evals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**OFFLINE, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "ds"), "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=64, init_std=0.3)  # peaked: choices differ clearly
    run = save_checkpoint(tmp_path / "run", 1, GPT(cfg), cfg, Tokenizer.gpt2())
    hf_dir = export_hf(run, tmp_path / "hf")
    rows = [{"question": f"What color is {t}?", "choices": [COLORS[(i + k) % 8] for k in range(4)], "answer": (i * 3) % 4} for i, t in enumerate(THINGS)]
    yaml_path = write_lmeval_task(tmp_path / "task", "colors", rows[:6], rows[6:], doc_to_text="Question: {{question}}\nAnswer:",
                                  doc_to_choice="choices", doc_to_target="answer", description="Colors of things.\n\n")  # fmt: skip
    task = load_task_file(yaml_path)  # the same file
    ckpt = load_checkpoint(run)
    for shots in (0, 3):
        peer = run_lmeval(hf_dir, yaml_path, num_fewshot=shots, batch_size=4)
        ours = run_task(ckpt.model, ckpt.tokenizer, task, shots=shots, batch_size=4, progress=False)
        _, contexts = build_prompts(task, Prompter(ckpt.tokenizer), shots, 0, None, False)
        assert contexts == peer["contexts"]
        got = [s["loglikelihoods"] for s in ours.samples]
        assert len(got) == len(peer["loglikelihoods"]) == 11
        for a, b in zip(got, peer["loglikelihoods"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
        assert ours.metrics["acc"][0] == peer["acc"] and ours.metrics["acc_norm"][0] == peer["acc_norm"]
        assert ours.truncated == 1  # the long story lost its start in both
        assert len({tuple(round(x, 3) for x in lls) for lls in got}) == 11  # the documents really differ
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_lm_evals_local_completions_scores_through_gptlab_serve_as_gptlab_evaluate_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's `local-completions` model reads the prompt's log-probs from /v1/completions with echo: through
    gptlab serve it must give the log-likelihoods, acc and acc_norm that `gptlab evaluate` computes itself."""
    from conftest import LoopbackServer

    from gptlab.serve.app import ServeConfig, create_app
    from gptlab.serve.scheduler import Scheduler

    for key, value in {**OFFLINE, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "ds"), "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=64, init_std=0.3)
    run = save_checkpoint(tmp_path / "run", 1, GPT(cfg), cfg, Tokenizer.gpt2())
    hf_dir = export_hf(run, tmp_path / "hf")  # only its tokenizer is used: lm-eval tokenizes, gptlab serve scores
    rows = [{"question": f"What color is {t}?", "choices": [COLORS[(i + k) % 8] for k in range(4)], "answer": (i * 3) % 4} for i, t in enumerate(THINGS[:12])]
    yaml_path = write_lmeval_task(tmp_path / "task", "colors_api", rows[:4], rows[4:], doc_to_text="Question: {{question}}\nAnswer:",
                                  doc_to_choice="choices", doc_to_target="answer")  # fmt: skip
    ckpt = load_checkpoint(run)
    sched = Scheduler(ckpt.model, ckpt.tokenizer, max_batch=4)
    server = LoopbackServer(create_app(sched, ServeConfig(model_name="m")))
    try:
        peer = run_lmeval(hf_dir, yaml_path, num_fewshot=2, batch_size=1, server=server.url)
    finally:
        server.close()
        sched.close()
    ours = run_task(ckpt.model, ckpt.tokenizer, load_task_file(yaml_path), shots=2, batch_size=4, progress=False)
    got = [s["loglikelihoods"] for s in ours.samples]
    assert len(got) == len(peer["loglikelihoods"]) == 8
    for a, b in zip(got, peer["loglikelihoods"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert ours.metrics["acc"][0] == peer["acc"] and ours.metrics["acc_norm"][0] == peer["acc_norm"]
