"""DPO: the loss and its gradient's sign by hand, the variants, reference log-probs, pair reading and
encoding, and `gptlab dpo` raising the held-out preference accuracy of a chat model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import small_text_corpus
from gptlab.align.dpo import DPOConfig, DPOObjective, dpo_loss, reference_logprobs
from gptlab.align.pairs import PairBatches, collate_sequences, encode_pairs, read_pairs, row_pair, sequence_logprobs
from gptlab.chat import ChatTemplate, add_chat_tokens
from gptlab.checkpoint import save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import DataError, InputError
from gptlab.model import GPT, IGNORE_INDEX
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_loss_by_hand_and_the_sign_of_its_gradient() -> None:
    pc, pr = torch.tensor([-3.0, -5.0], requires_grad=True), torch.tensor([-4.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -3.0])
    losses, h = dpo_loss(pc, pr, rc, rr, DPOConfig(data=("x",), beta=0.5))
    # h = beta * ((pc - rc) - (pr - rr)): 0.5 * (0.5 - (-0.5)) = 0.5 and 0.5 * (-1 - 1) = -1
    assert h.tolist() == pytest.approx([0.5, -1.0])
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))])
    losses.sum().backward()
    # descending the loss raises the chosen reply's log-prob and lowers the rejected one's
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/d pc of -log sigmoid(h) = -beta * sigmoid(-h)
    assert pc.grad.tolist() == pytest.approx([-0.5 / (1 + math.exp(0.5)), -0.5 / (1 + math.exp(-1.0))])


def test_ipo_and_conservative_dpo_by_hand() -> None:
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    ipo, h = dpo_loss(pc, pr, rc, rr, DPOConfig(data=("x",), beta=0.25, loss="ipo"))
    gap = (-1.0 + 1.5) - (-2.0 + 1.5)  # the log-ratio gap h / beta = 1
    assert ipo.item() == pytest.approx((gap - 1 / (2 * 0.25)) ** 2)
    cdpo, h = dpo_loss(pc, pr, rc, rr, DPOConfig(data=("x",), beta=0.25, label_smoothing=0.1))
    sig = 1 / (1 + math.exp(-0.25))
    assert cdpo.item() == pytest.approx(-0.9 * math.log(sig) - 0.1 * math.log(1 - sig))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    chat, _ = add_chat_tokens(Tokenizer.train(small_text_corpus(30_000), vocab_size=400, progress=False))
    return chat


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "chosen and rejected are identical"),
        ({"prompt": "q", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "without 'prompt'"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must end with an assistant message"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list"),
    ],
)
def test_bad_pairs_are_named(row: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        row_pair(row, "p.jsonl:7")


def test_both_pair_shapes_read_alike_and_only_the_reply_is_scored(tmp_path: Path, tok: Tokenizer) -> None:
    explicit = {"prompt": "colour of ada?", "chosen": "red", "rejected": "blue"}
    user = {"role": "user", "content": "colour of ada?"}
    implicit = {"chosen": [user, {"role": "assistant", "content": "red"}], "rejected": [user, {"role": "assistant", "content": "blue"}]}
    (tmp_path / "p.jsonl").write_text(json.dumps(explicit) + "\n\n" + json.dumps(implicit) + "\n")
    a, b = read_pairs(tmp_path / "p.jsonl")
    assert (a.prompt, a.chosen, a.rejected) == (b.prompt, b.chosen, b.rejected) and b.where.endswith("p.jsonl:3")
    enc = encode_pairs(ChatTemplate(tok), [a], max_len=64)
    ids, mask = enc.chosen[0]
    assert tok.decode(ids[mask].tolist()) == "red<|im_end|>"
    (tmp_path / "bad.jsonl").write_text(json.dumps(explicit) + "\n" + json.dumps({**explicit, "rejected": "red"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: chosen and rejected are identical"):
        read_pairs(tmp_path / "bad.jsonl")


def _pairs(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    names, colours = ["ada", "bob", "cy", "dee", "eve", "fay"], ["red", "blue", "green"]
    rows = []
    for i in torch.randint(0, len(names), (n,), generator=g).tolist():
        rows.append({"prompt": f"colour of {names[i]}?", "chosen": colours[i % 3], "rejected": colours[(i + 1) % 3]})
    return rows


def test_reference_log_probs_make_the_first_loss_log_2(tok: Tokenizer) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=448, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    pairs = [row_pair(r, f"x:{i}") for i, r in enumerate(_pairs(12, 0))]
    enc = encode_pairs(ChatTemplate(tok), pairs, 64)
    ref = reference_logprobs(model, enc, batch_size=5)
    x, y = collate_sequences([enc.chosen[3]])
    with torch.no_grad():
        full = torch.log_softmax(model(x)[0], -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)  # every position's, then the reply's
        assert ref[3, 0].item() == pytest.approx((full * (y != IGNORE_INDEX)).sum().item(), rel=1e-6)
        assert sequence_logprobs(model, x, y).item() == pytest.approx(ref[3, 0].item(), rel=1e-6)
    objective = DPOObjective(tok, DPOConfig(data=("x",)), enc, enc, ref, ref)
    loader = PairBatches(enc, 4, seed=0)
    batch = loader.next_batch()
    with torch.no_grad():
        assert objective.loss(model, batch, torch.device("cpu")).item() == pytest.approx(math.log(2), abs=1e-5)
        # RPO: plus sft_weight x the chosen reply's NLL per token, by hand from the full log-softmax
        rpo = DPOObjective(tok, DPOConfig(data=("x",), sft_weight=0.7), enc, enc, ref, ref)
        x, y, index = batch
        n = index.numel()
        full = torch.log_softmax(model(x[:n])[0], -1).gather(-1, y[:n].clamp(min=0)[..., None]).squeeze(-1) * (y[:n] != IGNORE_INDEX)
        nll_per_token = -full.sum(1) / (y[:n] != IGNORE_INDEX).sum(1)
        assert rpo.loss(model, batch, torch.device("cpu")).item() == pytest.approx(math.log(2) + 0.7 * nll_per_token.mean().item(), rel=1e-5)
    # held-out scoring covers every pair once, however the batches fall
    sums: dict[str, float] = {}
    val = objective.batches("val", 64, 5, 1, 0, 1)
    with torch.no_grad():
        for _ in range(4):
            for k, v in objective.score(model, val.next_batch(), torch.device("cpu")).items():
                sums[k] = sums.get(k, 0.0) + v
    assert sums["pairs"] == 12 and objective.metrics(sums)["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_dpo_raises_the_held_out_preference_accuracy(tmp_path: Path, tok: Tokenizer, capsys) -> None:
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "policy", 0, policy, policy.config, tok)
    for name, rows in (("train.jsonl", _pairs(300, 1)), ("val.jsonl", _pairs(60, 2))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["dpo", "--policy", str(tmp_path / "policy"), "--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path / "val.jsonl"),
            "--out", str(tmp_path / "run"), "--max-steps", "40", "--eval-every", "10", "--lr", "3e-3", "--batch-size", "8", "--beta", "0.5", "-q"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reference = the starting policy" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["val_reward_accuracy"] for r in records if "val_reward_accuracy" in r]
    assert accuracy[-1] >= 0.95 and accuracy[-1] > accuracy[0] - 1e-9
    assert main(["dpo", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "45", "-q"]) == 0
    # the starting checkpoint (the reference, reloaded to resume) replaced by a model with another vocabulary
    other = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32))
    shutil.rmtree(tmp_path / "policy")
    save_checkpoint(tmp_path / "policy", 0, other, other.config, tok)  # the step the run recorded as its start
    assert main(["dpo", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "50", "-q"]) == 2
    err = capsys.readouterr().err
    assert "has 512 token rows but the policy 448: it changed since the run began" in err and len(err.strip().splitlines()) == 1, err
    code = main(["dpo", "--policy", str(tmp_path / "policy"), "--data", str(tmp_path / "nowhere.jsonl"), "--out", str(tmp_path / "x"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere.jsonl: cannot read" in err and len(err.strip().splitlines()) == 1
