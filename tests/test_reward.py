"""Reward models: the Bradley–Terry loss (margin, centring) by hand, the reward read at the conversation's
last token, Hugging Face export parity on a padded batch, and `gptlab reward train|score` learning a
synthetic preference, resuming, and refusing bad input in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

import pytest
import torch

from conftest import randomize_, small_text_corpus
from gptlab.align.reward import RewardConfig, check_same_tokenizer, collate_branched, load_reward_model, pad_right, reward_loss, score_replies
from gptlab.chat import IM_START, ChatTemplate, add_chat_tokens
from gptlab.checkpoint import HEAD_KEY, checkpoint_path, find_checkpoint, read_checkpoint_meta, save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import CheckpointError, ConfigError, InputError
from gptlab.finetune.heads import HeadSpec, TaskConfig, TaskModel
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=2, n_embd=32)
CONVERSATIONS = [
    [{"role": "user", "content": "colour of ada?"}, {"role": "assistant", "content": "red"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the colour of the sea by bob?"},
     {"role": "assistant", "content": "a deep and dark blue"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    chat, _ = add_chat_tokens(Tokenizer.train(small_text_corpus(30_000), vocab_size=400, progress=False))
    return chat


def _reward_model(seed: int, cfg: GPTConfig = CFG) -> TaskModel:
    torch.manual_seed(seed)
    model = TaskModel(cfg, HeadSpec("reward", dropout=0.0))
    randomize_(model, seed)
    return model.eval()


def test_bradley_terry_loss_with_margin_and_centring_by_hand() -> None:
    chosen, rejected = torch.tensor([1.0, -0.5], requires_grad=True), torch.tensor([0.0, 0.5], requires_grad=True)
    losses, gap = reward_loss(chosen, rejected, margin=0.5, center_weight=0.1)
    assert gap.tolist() == pytest.approx([1.0, -1.0])
    # -log sigmoid(gap - m) = log(1 + exp(m - gap)); centring 0.1 (r_w + r_l)^2 = 0.1 and 0
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)) + 0.1, math.log(1 + math.exp(1.5))])
    losses.sum().backward()
    # d/dr_w = -sigmoid(m - gap) + 2c (r_w + r_l); the second pair (sum 0) is pure Bradley-Terry: chosen up, rejected down
    assert chosen.grad.tolist() == pytest.approx([-1 / (1 + math.exp(0.5)) + 0.2, -1 / (1 + math.exp(-1.5))])
    assert chosen.grad[1] < 0 < rejected.grad[1]
    plain, _ = reward_loss(torch.tensor([2.0]), torch.tensor([2.0]))
    assert plain.item() == pytest.approx(math.log(2))  # a tie is a coin flip, wherever the rewards sit


def test_reward_head_is_scalar_and_not_a_finetune_task() -> None:
    assert HeadSpec("reward").n_outputs == 1
    with pytest.raises(ConfigError, match="no label names"):
        HeadSpec("reward", ("bad", "good"))
    with pytest.raises(ConfigError, match="task must be one of classify, entail, similar, choice; got 'reward'"):
        TaskConfig(task="reward", data=("x.jsonl",))
    with pytest.raises(ConfigError, match="center_weight"):
        RewardConfig(data=("x",), center_weight=-1.0)


@torch.no_grad()
def test_the_reward_is_read_at_the_last_token(tok: Tokenizer) -> None:
    model = _reward_model(0)
    template = ChatTemplate(tok)
    seqs = [np.asarray(template.render(c).ids) for c in CONVERSATIONS]
    assert all(ids[-1] == tok.encode_ordinary("\n")[-1] for ids in seqs)  # a rendered conversation ends after <|im_end|>
    x, last = pad_right(seqs)  # (2, 1, T), (2, 1)
    assert x.shape == (2, 1, max(map(len, seqs))) and last[:, 0].tolist() == [len(s) - 1 for s in seqs]
    scores = model(x, extract=last)[0]
    assert scores.shape == (2,)
    for b, ids in enumerate(seqs):  # by hand: the head on the trunk's final hidden state at the last token, unpadded
        ids_t = torch.from_numpy(ids)[None]
        h = model._trunk(ids_t, torch.arange(ids_t.size(1)), None)  # (1, T, C)
        assert scores[b].item() == pytest.approx((model.head.weight[0] @ h[0, -1]).item(), abs=1e-5)
    prompts, replies = [c[:-1] for c in CONVERSATIONS], [c[-1]["content"] for c in CONVERSATIONS]
    torch.testing.assert_close(score_replies(model, tok, prompts, replies, batch_size=1), scores, rtol=0, atol=1e-5)


@torch.no_grad()
def test_exported_reward_model_matches_transformers_on_a_padded_batch(tmp_path: Path, tok: Tokenizer, capsys) -> None:
    import transformers

    model = _reward_model(1)
    ckpt = save_checkpoint(tmp_path / "rm", 5, model, CFG, tok, extra_meta={HEAD_KEY: model.spec.to_dict()})
    assert main(["export-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "GPT2ForSequenceClassification" in capsys.readouterr().out
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    pad = tok.special_tokens[IM_START]
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == 1 and hf.config.pad_token_id == pad
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    template = ChatTemplate(tok)
    seqs = [np.asarray(template.render(c).ids) for c in CONVERSATIONS]
    # HF's tokenizer renders the same ids with its chat template, and pads with <|im_start|>
    assert [hf_tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in CONVERSATIONS] == [s.tolist() for s in seqs]
    assert hf_tok.pad_token_id == pad
    x, last = pad_right(seqs)
    ours = model(x, extract=last)[0]  # (2,)
    padded = torch.where(torch.arange(x.size(-1)) <= last, x[:, 0], pad)  # (2, T): right-padded with the pad id
    theirs = hf(input_ids=padded).logits  # (2, 1)
    assert theirs.shape == (2, 1) and (ours - theirs[:, 0]).abs().max().item() < 1e-4
    alone = hf(input_ids=torch.from_numpy(seqs[0])[None]).logits[0, 0]
    assert abs(alone.item() - ours[0].item()) < 1e-4


@torch.no_grad()
def test_branched_rows_give_each_side_the_reward_it_gets_alone(tok: Tokenizer) -> None:
    """The training batches store each pair's shared start once and pack pairs in rows (collate_branched);
    every reward must equal the one the whole conversation gets alone in a padded batch (the slow path)."""
    model = _reward_model(2)
    template = ChatTemplate(tok)
    prompts = [CONVERSATIONS[0][:-1], CONVERSATIONS[1][:-1], [{"role": "user", "content": "and the colour of the sky?"}]]
    replies = [("red", "a dark red"), ("a deep and dark blue", "blue"), ("blue by day", "black by night and by day")]
    sides = [(np.asarray(template.render(p + [{"role": "assistant", "content": r[k]}]).ids), None) for k in (0, 1) for p, r in zip(prompts, replies)]
    x_alone, last = pad_right([ids for ids, _ in sides])
    alone = model(x_alone, extract=last)[0]  # (6,): the chosen sides, then the rejected
    for row_len in (1, 40, 10_000):  # one pair per row, some rows of several pairs, one row of all
        x, segments, branches, extract, slots = collate_branched(sides, row_len)
        rewards = model(x, segments=segments, branches=branches, extract=extract)[0]
        assert rewards.shape == extract.shape and (rewards[extract < 0] == 0).all()
        picked = rewards.reshape(-1)[slots]  # (3, 2)
        torch.testing.assert_close(picked.T.reshape(-1), alone, rtol=0, atol=1e-5)
        stored = sum(len(a) + len(b) - int(np.cumprod(a[: min(len(a), len(b)) - 1] == b[: min(len(a), len(b)) - 1]).sum())
                     for (a, _), (b, _) in zip(sides[:3], sides[3:]))  # fmt: skip
        assert int((segments >= 0).sum()) == stored  # the shared start once per pair, no padding inside a pair
    assert x.size(0) == 1 and x.size(1) > CFG.block_size  # one row of all three pairs, longer than the context: positions fit it
    long = torch.zeros(1, CFG.block_size + 1, dtype=torch.long)  # one sequence past the context: a position reaches block_size
    with pytest.raises(InputError, match=f"position {CFG.block_size} is beyond block_size {CFG.block_size}"):
        model(long, segments=torch.zeros_like(long), branches=torch.zeros_like(long), extract=torch.tensor([[CFG.block_size]]))
    with pytest.raises(InputError, match="branched rows are ids, segments and branches"):
        model(x, branches=branches, extract=extract)  # no segments
    # the first tokens are the prompt, branch 0; each reply's tokens follow with its own branch id
    first = int(extract[0, 0])
    assert branches[0, 0] == 0 and branches[0, first] == 1 and branches[0, int(extract[0, 1])] == 2


def test_branched_positions_and_mask_by_hand() -> None:
    from gptlab.model import branched_positions_and_mask

    # one segment: prefix p0 p1, branch 1 (a0 a1), branch 2 (b0); then a second segment q0 | c0 | d0 d1; then a pad
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]])
    branches = torch.tensor([[0, 0, 1, 1, 2, 0, 1, 2, 2, 0, 0]])
    positions, mask = branched_positions_and_mask(segments, branches)
    assert positions[0].tolist() == [0, 1, 2, 3, 2, 0, 1, 1, 2, 0, 1]
    sees = {t: torch.nonzero(mask[0, 0, t]).flatten().tolist() for t in range(11)}
    assert sees[3] == [0, 1, 2, 3] and sees[4] == [0, 1, 4]  # a0 a1 follow the prefix; b0 sees the prefix, not a0 a1
    assert sees[7] == [5, 7] and sees[8] == [5, 7, 8]  # a new segment starts over
    assert sees[10] == [9, 10]  # padding attends among itself: no query row is fully masked (SDPA would give NaN)


def _pairs(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    names, colours = ["ada", "bob", "cy", "dee", "eve", "fay"], ["red", "blue", "green"]
    return [
        {"prompt": f"colour of {names[i]}?", "chosen": colours[i % 3], "rejected": colours[(i + 1 + j) % 3]}
        for i, j in zip(torch.randint(0, len(names), (n,), generator=g).tolist(), torch.randint(0, 2, (n,), generator=g).tolist())
    ]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sparse_token_table_trains_the_weights_the_dense_path_does(tmp_path: Path, tok: Tokenizer, monkeypatch, grad_accum: int) -> None:
    """The reward objective lets the loop train the token table from the looked-up rows (train.SparseTokenTable):
    the run must end with the weights and AdamW moments the dense gradient and torch's AdamW give, resume from
    its own checkpoint to the same end, and leave the model's embedding as it was."""
    from gptlab.align.reward import RewardObjective, train_reward
    from gptlab.checkpoint import load_checkpoint

    torch.manual_seed(0)
    base = GPT(CFG)
    save_checkpoint(tmp_path / "base", 0, base, base.config, tok)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(64, 3)))
    cfg = RewardConfig(data=(str(tmp_path / "train.jsonl"),), val_fraction=0.0)
    fields = {"max_steps": 6, "batch_size": 8, "grad_accum": grad_accum, "lr": 3e-3, "weight_decay": 0.1, "grad_clip": 0.5, "device": "cpu",
              "seed": 1, "save_every": 3, "keep_last": 2}  # fmt: skip
    ends = {}
    for sparse in (True, False):
        monkeypatch.setattr(RewardObjective, "sparse_token_grad", sparse)
        train_reward(str(tmp_path / "base"), cfg, dict(fields), tmp_path / f"rm{sparse}", progress=False, report=lambda line: None)
        ends[sparse] = load_checkpoint(tmp_path / f"rm{sparse}", with_trainer_state=True)
    # the same run resumed at step 3 (the table's rows with moments are read back from the optimizer state)
    monkeypatch.setattr(RewardObjective, "sparse_token_grad", True)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "rmTrue", resumed)
    shutil.rmtree(checkpoint_path(resumed, 6))
    train_reward(str(tmp_path / "base"), cfg, dict(fields), resumed, progress=False, report=lambda line: None, resume=True)
    ends["resumed"] = load_checkpoint(resumed, with_trainer_state=True)
    wte = "transformer.wte.weight"
    dense = ends[False]
    assert not torch.equal(ends[True].model.state_dict()[wte], base.transformer.wte.weight)  # the table trained (clipped steps, decayed rows)
    for run in (ends[True], ends["resumed"]):
        for name, value in run.model.state_dict().items():
            torch.testing.assert_close(value, dense.model.state_dict()[name], rtol=0, atol=2e-5, msg=name)
        ours, theirs = run.trainer_state["optimizer"]["state"], dense.trainer_state["optimizer"]["state"]
        assert ours.keys() == theirs.keys()
        for key in theirs:
            for field in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours[key][field], theirs[key][field], rtol=1e-4, atol=1e-7, msg=lambda m: f"{key} {field}: {m}")


def test_sparse_token_table_matches_torch_adamw_step_by_step() -> None:
    """SparseTokenTable.step against torch.optim.AdamW on the dense gradient: rows that appear late, rows looked up
    twice, steps with and without clipping, weight decay, the lr changing; and the object puts the embedding back."""
    from gptlab.train import SparseTokenTable, clip_gradients

    torch.manual_seed(0)
    ours, ref = torch.nn.Embedding(40, 6), torch.nn.Embedding(40, 6)
    ref.load_state_dict(ours.state_dict())
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    with SparseTokenTable(ours) as table:
        for step in range(8):
            ids = torch.randint(0, 10 + 4 * step, (12,))  # more of the vocabulary in use as steps go on
            ids[0] = ids[1]
            scale = torch.randn(12, 6)
            for group in (*opt.param_groups, *opt_ref.param_groups):
                group["lr"] = 1e-2 / (1 + step)
            (ours(ids) * scale).sum().backward()
            (ref(ids) * scale).sum().backward()
            assert ours.weight.grad is None and table.rows  # the loop's clipping and AdamW pass over the table
            max_norm = 2.0 if step % 2 else 0.0
            norm = clip_gradients(ours, max_norm, table)
            assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm or 1e9)), rel=1e-6)
            opt.step()
            table.step(opt)
            opt_ref.step()
            table.clear()
            opt_ref.zero_grad()
            torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=1e-6)
            for field in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[ours.weight][field], opt_ref.state[ref.weight][field], rtol=1e-5, atol=1e-9)
        assert not table.grad.any()  # cleared rows
    assert not ours.sparse and not ours.weight._post_accumulate_grad_hooks  # put back


def test_reward_train_learns_a_preference_scores_and_resumes(tmp_path: Path, tok: Tokenizer, capsys) -> None:
    torch.manual_seed(0)
    base = GPT(CFG)
    save_checkpoint(tmp_path / "base", 0, base, base.config, tok)
    for name, rows in (("train.jsonl", _pairs(400, 1)), ("val.jsonl", _pairs(60, 2))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = str(tmp_path / "rm")
    argv = ["reward", "train", "--ckpt", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path / "val.jsonl"),
            "--out", run, "--max-steps", "200", "--eval-every", "50", "--lr", "3e-3", "--batch-size", "16", "--center-weight", "0.01", "-q"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Bradley-Terry" in out and "last token" in out
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["val_pair_accuracy"] for r in records if "val_pair_accuracy" in r]
    assert accuracy[-1] >= 0.9, accuracy
    meta = read_checkpoint_meta(find_checkpoint(run))
    assert meta["reward"]["center_weight"] == 0.01 and meta[HEAD_KEY]["task"] == "reward"  # what --resume and load_checkpoint rebuild from

    assert main(["reward", "score", "--ckpt", run, "--data", str(tmp_path / "val.jsonl"), "--device", "cpu", "--batch-size", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 61 and lines[0].startswith("chosen ") and lines[-1].startswith("60 pairs: accuracy ")
    scored = float(lines[-1].split("accuracy ")[1].split("%")[0]) / 100
    assert scored == pytest.approx(accuracy[-1], abs=1e-9)  # the same held-out pairs, the same final model
    rows = [{"prompt": "colour of ada?", "completion": "red"}, {"prompt": [{"role": "user", "content": "colour of ada?"}], "completion": "blue"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["reward", "score", "--ckpt", run, "--data", str(tmp_path / "c.jsonl"), "--device", "cpu"]) == 0
    red, blue = (float(v) for v in capsys.readouterr().out.split())
    assert red > blue  # ada's colour is red
    rm = load_reward_model(run)
    assert score_replies(rm.model, rm.tokenizer, [[{"role": "user", "content": "colour of ada?"}]], ["red"])[0].item() == pytest.approx(red, abs=1e-4)

    assert main(["reward", "train", "--out", run, "--resume", "--max-steps", "204", "-q"]) == 0
    assert json.loads((tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 204

    def error(*argv: str) -> str:
        code = main(list(argv))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    assert "is not a reward model (no 'task_head' of kind reward)" in error("reward", "score", "--ckpt", str(tmp_path / "base"), "--data", str(tmp_path / "c.jsonl"))
    assert "no such checkpoint" in error("reward", "train", "--ckpt", str(tmp_path / "nowhere"), "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "x"), "-q")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0] | {"chosen": "a", "rejected": "b"}) + "\n" + '{"prompt": "q", "chosen": "a"}\n')
    assert "bad.jsonl:2:" in error("reward", "train", "--ckpt", str(tmp_path / "base"), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "y"), "-q")
    (tmp_path / "badc.jsonl").write_text('{"prompt": "q"}\n')
    assert "badc.jsonl:1: a row to score needs" in error("reward", "score", "--ckpt", run, "--data", str(tmp_path / "badc.jsonl"), "--device", "cpu")
    assert "not a reward-model checkpoint" in error("reward", "train", "--out", str(tmp_path / "base"), "--resume", "-q")

    check_same_tokenizer(rm.tokenizer, tok)
    other, _ = add_chat_tokens(Tokenizer.train(small_text_corpus(20_000), vocab_size=300, progress=False))
    with pytest.raises(ConfigError, match="the reward model's tokenizer differs from the policy's"):
        check_same_tokenizer(rm.tokenizer, other)
    with pytest.raises(CheckpointError, match="is not a reward model"):
        load_reward_model(tmp_path / "base")
