"""Task heads (GPT-1 fine-tuning, Radford et al. 2018, section 3.3), checked against references built
by hand: the input transformations, the pooled hidden states, the loss L2 + lambda L1, a short real
run through the CLI that must learn a task, bit-exact resume, predictions, the Hugging Face export
against transformers itself, and the errors for bad input.

Every model is a tiny one built here; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, small_text_corpus

from gptlab.checkpoint import HEAD_KEY, load_checkpoint, save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.finetune.heads import (
    DELIM, EXTRACT, START, TASK_TOKENS, Example, HeadSpec, TaskConfig, TaskModel, TaskObjective, TaskTokens, collate, encode_examples,
    task_sequences,
)  # fmt: skip
from gptlab.model import GPT, IGNORE_INDEX
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=64)
WORDS = "the a cat dog sat on mat red blue green tree house car road sun moon".split()


def _tokenizer() -> Tokenizer:
    """A small BPE with the task tokens (ids 300..302)."""
    if not hasattr(_tokenizer, "cached"):
        base = Tokenizer.train(small_text_corpus(30_000), vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
        _tokenizer.cached = base, base.with_special_tokens(TASK_TOKENS)[0]
    return _tokenizer.cached[1]


def _model(spec: HeadSpec, cfg: GPTConfig = CFG, seed: int = 0) -> TaskModel:
    torch.manual_seed(seed)
    model = TaskModel.from_gpt(GPT(cfg), spec, seed)
    randomize_(model, seed)  # unit LayerNorm gains and zero biases cannot hide a mistake
    return model.eval()


def _rows(n: int, seed: int) -> list[dict]:
    """Deterministic rows of a learnable task: is "apple" among the words?"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        label = rng.choice(["no", "yes"])
        if label == "yes":
            words[rng.randrange(len(words))] = "apple"
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def single_thread():
    """As conftest's one_thread, for the module's shared run too: a resumed run must add floats in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory, single_thread) -> Path:
    """A random base checkpoint (its tokenizer without the task tokens) and train / val files."""
    root = tmp_path_factory.mktemp("heads")
    _tokenizer()
    torch.manual_seed(0)
    save_checkpoint(root / "base", 0, GPT(CFG), CFG, _tokenizer.cached[0])
    _jsonl(root / "train.jsonl", _rows(400, 0))
    _jsonl(root / "val.jsonl", _rows(200, 1))
    return root


# ----------------------------------------------------------------------------- input transformations


def test_input_transformations_match_figure_1_by_hand() -> None:
    tok = _tokenizer()
    s, d, e = (tok.special_tokens[t] for t in (START, DELIM, EXTRACT))
    assert TaskTokens.of(tok) == TaskTokens(s, d, e) and (s, d, e) == (300, 301, 302)
    enc = tok.encode_ordinary
    cases = {
        "classify": (("the cat sat",), [[s, *enc("the cat sat"), e]]),
        "entail": (("a dog ran", "an animal ran"), [[s, *enc("a dog ran"), d, *enc("an animal ran"), e]]),
        "similar": (("red car", "blue sun"), [[s, *enc("red car"), d, *enc("blue sun"), e], [s, *enc("blue sun"), d, *enc("red car"), e]]),
        "choice": (("the sun is", "hot", "a star"), [[s, *enc("the sun is"), d, *enc(c), e] for c in ("hot", "a star")]),
    }
    for task, (texts, expected) in cases.items():
        labels = None if task == "choice" else ("no", "yes")
        data = encode_examples([Example(texts, "yes" if labels else 1, "x:1")], task, tok, labels, max_len=32)
        assert [ids.tolist() for ids in data.examples[0]] == expected, task
        assert data.labels == [1] and data.truncated == 0  # "yes" is class 1 of (no, yes); a choice's label is its index
        x, y, extract, _ = collate(data.examples, data.labels)
        assert x.shape == (1, len(expected), max(map(len, expected)))
        for k, ids in enumerate(expected):
            n = len(ids)
            assert x[0, k, :n].tolist() == ids and int(extract[0, k]) == n - 1 and int(x[0, k, extract[0, k]]) == e
            assert y[0, k, : n - 1].tolist() == ids[1:] and (y[0, k, n - 1 :] == IGNORE_INDEX).all()  # next token; none past the extract
    # text that spells a special token is text, not the token
    assert e not in encode_examples([Example((EXTRACT,), None, "x:1")], "classify", tok, ("a", "b"), 32).examples[0][0][1:-1].tolist()


def test_long_inputs_lose_the_end_of_their_longest_part() -> None:
    tokens = TaskTokens(1, 2, 3)
    long, short = list(range(10, 30)), [7, 8]
    (seq,), cut = task_sequences("entail", [long, short], tokens, max_len=12)
    assert cut and seq == [1, *long[:7], 2, 7, 8, 3] and len(seq) == 12
    (seq,), _ = task_sequences("entail", [long, list(range(40, 60))], tokens, max_len=12)
    assert seq == [1, *long[:5], 2, 40, 41, 42, 43, 3]  # 9 places: 4 each, the spare one to the first part
    assert task_sequences("classify", [[5, 6]], tokens, 8) == ([[1, 5, 6, 3]], False)


# ----------------------------------------------------------------------------- the model


def _hidden_last(model: TaskModel, ids: list[int]) -> torch.Tensor:
    """The final hidden state (after ln_f) at a sequence's last token, the sequence run alone."""
    idx = torch.tensor([ids])
    return model._trunk(idx, torch.arange(len(ids)), None)[0, -1]  # (C,)


@torch.no_grad()
def test_similar_adds_the_hidden_states_of_both_orderings() -> None:
    tok = _tokenizer()
    model = _model(HeadSpec("similar", ("0", "1", "2")))
    examples = [Example(("red car", "blue sun on the road"), "1", "x:1"), Example(("a cat", "a dog sat"), "2", "x:2")]
    data = encode_examples(examples, "similar", tok, ("0", "1", "2"), 32)
    x, _, extract, _ = collate(data.examples, data.labels)
    logits, lm_loss = model(x, extract=extract)
    assert logits.shape == (2, 3) and lm_loss is None
    for b, seqs in enumerate(data.examples):
        h = _hidden_last(model, seqs[0].tolist()) + _hidden_last(model, seqs[1].tolist())  # padding never changes a shorter row
        torch.testing.assert_close(logits[b], h @ model.head.weight.T, rtol=1e-5, atol=1e-5)
        one_order = model.head(_hidden_last(model, seqs[0].tolist()))
        assert not torch.allclose(logits[b], one_order, atol=1e-3)  # the second ordering counts


@torch.no_grad()
def test_choice_scores_each_choice_and_softmaxes_over_an_examples_own_choices() -> None:
    tok = _tokenizer()
    model = _model(HeadSpec("choice"), CFG.replace(norm_placement="post"))  # GPT-1's post-LN: no ln_f
    examples = [Example(("the sun is", "hot", "cold", "a star"), 2, "x:1"), Example(("a cat", "sat", "flew"), 0, "x:2")]
    data = encode_examples(examples, "choice", tok, None, 32)
    x, _, extract, labels = collate(data.examples, data.labels)
    scores = model(x, extract=extract)[0]
    assert scores.shape == (2, 3) and labels.tolist() == [2, 0]
    assert torch.isinf(scores[1, 2]) and torch.softmax(scores, -1)[1, 2] == 0  # the second example has two choices
    for b, seqs in enumerate(data.examples):
        for k, ids in enumerate(seqs):
            torch.testing.assert_close(scores[b, k], model.head(_hidden_last(model, ids.tolist()))[0], rtol=1e-5, atol=1e-5)
    probs = torch.softmax(scores, dim=-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_loss_is_cross_entropy_plus_lambda_times_the_lm_loss_by_hand() -> None:
    tok = _tokenizer()
    spec = HeadSpec("entail", ("contradiction", "entailment", "neutral"), dropout=0.0)
    model = _model(spec).train()  # config dropout 0 and head dropout 0: train mode is deterministic
    examples = [Example(("a dog ran on the road", "an animal ran"), "entailment", "x:1"), Example(("the sun", "moon"), "neutral", "x:2"),
                Example(("red", "blue tree house"), "contradiction", "x:3")]  # fmt: skip
    data = encode_examples(examples, "entail", tok, spec.labels, 32)
    objective = TaskObjective(tok, TaskConfig(task="entail", data=("x",), lm_weight=0.3), spec.labels, data, None)
    loss = objective.loss(model, collate(data.examples, data.labels), torch.device("cpu"))

    logits, nll, n_targets = [], 0.0, 0
    for (ids,) in data.examples:
        ids = ids.tolist()
        logits.append(model.head(_hidden_last(model, ids)))
        lm_logits = model(torch.tensor([ids]))[0][0]  # (T, V): the plain GPT forward
        log_probs = torch.log_softmax(lm_logits[:-1], dim=-1)  # each position but the extract predicts the next token
        nll = nll - log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()
        n_targets += len(ids) - 1
    expected = F.cross_entropy(torch.stack(logits), torch.tensor(data.labels)) + 0.3 * nll / n_targets  # mean over all tokens, not per row
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_from_gpt_shares_the_base_and_keeps_the_tie(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gpt = GPT(CFG.replace(pos_encoding="sinusoidal"))
    model = TaskModel.from_gpt(gpt, HeadSpec("classify", ("a", "b")), seed=3)
    assert model.transformer.wte.weight is gpt.transformer.wte.weight and model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.pos_table, gpt.pos_table) and not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    again = TaskModel.from_gpt(GPT(CFG.replace(pos_encoding="sinusoidal")), HeadSpec("classify", ("a", "b")), seed=3)
    assert torch.equal(model.head.weight, again.head.weight)  # the head's init is seeded
    # a checkpoint keeps the head; loading builds a TaskModel; a TaskModel base gets a new head
    meta = {HEAD_KEY: model.spec.to_dict()}
    loaded = load_checkpoint(save_checkpoint(tmp_path / "run", 1, model, model.config, _tokenizer(), extra_meta=meta)).model
    assert isinstance(loaded, TaskModel) and loaded.spec == model.spec
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert TaskModel.from_gpt(loaded, HeadSpec("similar", (1, 2, 3)), seed=0).head.weight.shape == (3, 64)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def trained(work: Path) -> Path:
    """A finetune-cls run on the synthetic task (75 steps, checkpoints at 40 and 75)."""
    run_dir = work / "run"
    argv = ["finetune-cls", "--ckpt", str(work / "base"), "--data", str(work / "train.jsonl"), "--val-data", str(work / "val.jsonl"),
            "--out", str(run_dir), "--lr", "3e-3", "--batch-size", "16", "--save-every", "40", "--keep-last", "5", "--device", "cpu",
            "--seed", "0", "-q"]  # fmt: skip
    assert main(argv) == 0
    return run_dir


def test_finetune_cls_learns_the_task(trained: Path) -> None:
    run_dir = trained
    ckpt = load_checkpoint(run_dir)
    assert ckpt.step == 75 and isinstance(ckpt.model, TaskModel)  # 3 epochs of 400 rows in batches of 16
    assert ckpt.meta[HEAD_KEY] == {"task": "classify", "labels": ["no", "yes"], "dropout": 0.1}
    assert ckpt.tokenizer.special_tokens[EXTRACT] == 302
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_accuracy" in r][-1]
    assert final["step"] == 75 and final["val_accuracy"] >= 0.9, final  # chance is 0.5; measured 1.0


def test_classify_prints_labels_probabilities_and_accuracy(trained: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = trained
    code, out, _ = run(capsys, "classify", "--ckpt", str(run_dir), "--text", "the red apple sat on a mat", "--device", "cpu")
    label, probs = out.splitlines()
    assert code == 0 and label == "yes" and probs.startswith("probabilities: no 0.") and "| yes 0.9" in probs
    assert run(capsys, "classify", "--ckpt", str(run_dir), "--text", "the red car sat on a mat", "--device", "cpu")[1].startswith("no\n")
    code, out, _ = run(capsys, "classify", "--ckpt", str(run_dir), "--input", str(work / "val.jsonl"), "--device", "cpu")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 201 and lines[0].split("\t")[0] in ("no", "yes")
    assert lines[-1].startswith("accuracy: ") and "of 200 labelled rows" in lines[-1]
    assert float(lines[-1].split()[1].rstrip("%")) >= 90


def test_resume_continues_bit_exactly(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = trained
    split = run_dir.parent / "split"
    shutil.copytree(run_dir, split)
    shutil.rmtree(split / "checkpoints" / "step_00000075")
    (split / "latest").write_text("checkpoints/step_00000040\n")  # as if the run had stopped at step 40
    code, out, _ = run(capsys, "finetune-cls", "--out", str(split), "--resume", "--device", "cpu", "-q")
    assert code == 0 and "resuming from" in out and "step 75: held-out loss" in out
    full, resumed = load_checkpoint(run_dir), load_checkpoint(split)
    assert resumed.step == 75 and isinstance(resumed.model, TaskModel)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


# ----------------------------------------------------------------------------- Hugging Face


def _hf_inputs(data, pad: int) -> torch.Tensor:
    """The sequences of encoded examples right-padded with `pad`, as HF takes them."""
    x, _, extract, _ = collate(data.examples, data.labels)
    keep = torch.arange(x.size(-1)) <= extract[..., None]  # (B, S, T)
    return torch.where(keep, x, pad)


@pytest.mark.parametrize(
    "task,norm", [("classify", "pre"), ("entail", "pre"), ("similar", "pre"), ("choice", "pre"), ("classify", "post"), ("choice", "post")]
)
@torch.no_grad()
def test_exported_task_model_matches_transformers(task: str, norm: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    tok = _tokenizer()
    labels = {"classify": ("neg", "pos"), "entail": ("contradiction", "entailment", "neutral"), "similar": (0, 1), "choice": None}[task]
    cfg = CFG.replace(norm_placement=norm, tie_weights=norm == "pre")
    model = _model(HeadSpec(task, labels), cfg)
    ckpt = save_checkpoint(tmp_path / "run", 3, model, cfg, tok, extra_meta={HEAD_KEY: model.spec.to_dict()})
    code, out, _ = run(capsys, "export-hf", str(ckpt), "--out", str(tmp_path / "hf"))
    assert code == 0 and "exported the task model" in out

    rows = {
        "classify": [("the cat sat on the mat",), ("red",), ("a blue house by the road",)],
        "entail": [("a dog sat", "an animal sat on a mat"), ("the sun", "moon")],
        "similar": [("red car", "a blue sun on the road"), ("a cat", "the dog")],
        "choice": [("the sun is", "hot", "a star in the sky"), ("a cat", "sat", "flew over the moon")],
    }[task]
    data = encode_examples([Example(r, None, f"x:{i}") for i, r in enumerate(rows)], task, tok, labels, 32)
    x, _, extract, _ = collate(data.examples, data.labels)
    ours = model(x, extract=extract)[0]
    if task == "choice":
        hf = getattr(transformers, "GPT2DoubleHeadsModel" if norm == "pre" else "OpenAIGPTDoubleHeadsModel").from_pretrained(tmp_path / "hf").eval()
        both = hf(input_ids=_hf_inputs(data, 0), mc_token_ids=extract)
        theirs = both.mc_logits  # (B, choices)
        n = int(extract[0, 0]) + 1
        torch.testing.assert_close(both.logits[0, 0, :n], model(x[:1, 0, :n])[0][0], rtol=1e-4, atol=1e-4)  # the LM head came along
    else:
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
        assert type(hf).__name__ == ("GPT2" if norm == "pre" else "OpenAIGPT") + "ForSequenceClassification"
        assert hf.config.id2label == {i: str(v) for i, v in enumerate(labels)} and hf.config.label2id == {str(v): i for i, v in enumerate(labels)}
        pad = hf.config.pad_token_id
        assert pad == tok.special_tokens[DELIM] and transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").pad_token_id == pad
        inputs = _hf_inputs(data, pad)  # (B, S, T)
        theirs = sum(hf(input_ids=inputs[:, k]).logits for k in range(inputs.size(1)))  # similar: both orderings' logits added
        if task == "classify":  # HF's tokenizer builds the same ids from the text and the special tokens
            hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
            assert [hf_tok(f"{START}{text}{EXTRACT}")["input_ids"] for (text,) in rows] == [seqs[0].tolist() for seqs in data.examples]
    assert (ours - theirs).abs().max() < 1e-4


# ----------------------------------------------------------------------------- errors


def test_bad_input_is_one_line_and_exit_2(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, train = str(work / "base"), str(work / "train.jsonl")
    common = ["--out", str(tmp_path / "out"), "--device", "cpu", "-q", "--max-steps", "1"]

    def error(*argv: str) -> str:
        code, _, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    assert "no such checkpoint or run directory" in error("finetune-cls", "--ckpt", str(tmp_path / "nope"), "--data", train, *common)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"sentence": "c", "label": "x"}])
    assert f"{bad}:3: a classify row needs 'text', 'label'; this one lacks 'text'" in error("finetune-cls", "--ckpt", base, "--data", str(bad), *common)
    assert "task must be one of classify, entail, similar, choice; got 'sentiment'" in error(
        "finetune-cls", "--ckpt", base, "--data", train, "--task", "sentiment", *common
    )
    unseen = _jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": "no"}, {"text": "b", "label": "maybe"}])
    assert f"{unseen}:2: label 'maybe' does not occur in the training data (labels: 'no', 'yes')" in error(
        "finetune-cls", "--ckpt", base, "--data", train, "--val-data", str(unseen), *common
    )
    choice = _jsonl(tmp_path / "choice.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 2}])
    assert f"{choice}:1: a choice row's 'label' must be the index of the right choice, 0..1; got 2" in error(
        "finetune-cls", "--ckpt", base, "--data", str(choice), "--task", "choice", *common
    )
    one = _jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    assert "every row has the label 1; a classifier needs at least two" in error("finetune-cls", "--ckpt", base, "--data", str(one), *common)
    assert "has no task head" in error("classify", "--ckpt", base, "--text", "hi", "--device", "cpu")
    assert "fsdp" in error("finetune-cls", "--ckpt", base, "--data", train, "--strategy", "fsdp", *common)
