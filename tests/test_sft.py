"""Supervised fine-tuning: the masked loss by hand, packing = each conversation alone, the three row
shapes and their errors, truncation, resumable batches, and `gptlab sft` / `chat` / `merge-lora` /
`export-hf` end to end, full and LoRA / QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import small_text_corpus
from gptlab.chat import ChatTemplate, add_chat_tokens
from gptlab.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import DataError
from gptlab.finetune.sft import (
    ConversationBatches, Example, SFTConfig, SFTObjective, encode_examples, pack, read_jsonl_examples, split_off,
)  # fmt: skip
from gptlab.model import GPT, IGNORE_INDEX, with_new_tokens
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONVS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Spell 'cat'."},
        {"role": "assistant", "content": "c a t"},
        {"role": "user", "content": "And backwards?"},
        {"role": "assistant", "content": "t a c"},
    ],
    [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    base = Tokenizer.train(small_text_corpus(30_000), vocab_size=400, progress=False)
    chat, _ = add_chat_tokens(base)
    return chat


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=448, block_size=160, n_layer=2, n_head=2, n_embd=32)).eval()


def encoded(tok: Tokenizer, convs=CONVS, max_len: int = 160):
    return encode_examples(ChatTemplate(tok), [Example(c, f"x.jsonl:{i + 1}") for i, c in enumerate(convs)], max_len)


def test_masked_loss_by_hand(tok: Tokenizer, model: GPT) -> None:
    enc = encoded(tok, CONVS[:1])
    ids, mask = enc.rows[0]
    objective = SFTObjective(tok, SFTConfig(data=("x",)), enc, None, 160)
    batch = ConversationBatches(enc, 160, 1, seed=0, packing=False).collate([[0]])
    loss = objective.loss(model, batch, torch.device("cpu"))
    # by hand: -log p(ids[t] | ids[:t]) averaged over the t where mask[t] (the reply "42" and <|im_end|>)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1].tolist()]))[0][0], dim=-1)
    terms = [-log_probs[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]]
    assert len(terms) == len(tok.encode_ordinary("42")) + 1
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    sums = objective.score(model, batch, torch.device("cpu"))
    assert sums["tokens"] == len(terms) and sums["loss_sum"] == pytest.approx(sum(terms), rel=1e-5)


def test_a_packed_row_gives_each_conversation_the_loss_it_has_alone(tok: Tokenizer, model: GPT) -> None:
    enc = encoded(tok)
    packed = ConversationBatches(enc, 160, 1, seed=0, packing=True)
    assert pack(packed.lengths, np.arange(3), 160) == [[0, 1, 2]]  # all three fit one row
    x, y, seg = packed.collate([[0, 1, 2]])
    objective = SFTObjective(tok, SFTConfig(data=("x",)), enc, None, 160)
    with torch.no_grad():
        logits = model(x, None, seg)[0][0]  # (T, V)
        t = 0
        for ids, mask in enc.rows:
            n = len(ids) - 1
            alone = model(torch.tensor([ids[:-1].tolist()]))[0][0]
            torch.testing.assert_close(logits[t : t + n], alone, rtol=1e-5, atol=1e-5)
            t += n
        together = objective.score(model, (x, y, seg), torch.device("cpu"))
        padded = ConversationBatches(enc, 160, 3, seed=0, packing=False).collate([[0], [1], [2]])
        apart = objective.score(model, padded, torch.device("cpu"))
    assert together["tokens"] == apart["tokens"] == enc.targets
    assert together["loss_sum"] == pytest.approx(apart["loss_sum"], rel=1e-5)
    assert (y[0, t:] == IGNORE_INDEX).all() and (seg[0, t:] == 3).all()  # padding: untrained, its own segment


def test_rows_of_the_three_shapes(tmp_path: Path) -> None:
    rows = {
        "chat.jsonl": [{"messages": CONVS[0]}],
        "pc.jsonl": [{"prompt": "Q?", "completion": "A."}, {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "completion": "A"}],
        "alpaca.jsonl": [{"instruction": "Add.", "input": "2 3", "output": "5"}, {"instruction": "Say hi.", "output": "hi"}],
    }
    for name, items in rows.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in items) + "\n\n")
    chat, shape = read_jsonl_examples(tmp_path / "chat.jsonl")
    assert shape == "chat" and chat[0].messages == CONVS[0] and chat[0].where.endswith("chat.jsonl:1")
    pc, shape = read_jsonl_examples(tmp_path / "pc.jsonl")
    assert shape == "prompt/completion"
    assert pc[0].messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert [m["role"] for m in pc[1].messages] == ["system", "user", "assistant"]
    alpaca, shape = read_jsonl_examples(tmp_path / "alpaca.jsonl")
    assert shape == "alpaca"
    assert alpaca[0].messages == [{"role": "user", "content": "Add.\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert alpaca[1].messages[0] == {"role": "user", "content": "Say hi."}


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "{not json"], r"x\.jsonl:2: not JSON"),
        (['{"prompt": "a", "completion": "b"}', '{"instruction": "a", "output": "b"}'], r"x\.jsonl:2: the file's rows are prompt/completion rows"),
        (['{"question": "a", "answer": "b"}'], r"x\.jsonl:1: unknown row shape \(keys answer, question\)"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], r"x\.jsonl:1: no assistant message"),
        (['', '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}'], r"x\.jsonl:2: message 0 \(user\) needs 'content'"),
        (['{"instruction": "a", "input": 3, "output": "b"}'], r"x\.jsonl:1: Alpaca field 'input' must be a string"),
        (["[1, 2]"], r"x\.jsonl:1: expected a JSON object"),
        ([""], r"x\.jsonl: holds no rows"),
    ],
)
def test_malformed_rows_are_named_by_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        read_jsonl_examples(tmp_path / "x.jsonl")


def test_long_rows_keep_their_start_and_rows_left_with_nothing_are_skipped(tok: Tokenizer) -> None:
    long_user = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    enc = encoded(tok, [CONVS[0], long_user, long_reply], max_len=40)
    assert enc.truncated == 2 and enc.skipped == 1 and len(enc.rows) == 2
    ids, mask = enc.rows[1]
    full = ChatTemplate(tok).render(long_reply)
    assert len(ids) == 41 and ids.tolist() == full.ids[:41] and mask.tolist() == full.mask[:41]


def test_batches_resume_and_split_over_processes(tok: Tokenizer) -> None:
    enc = encoded(tok, CONVS * 7)
    a = ConversationBatches(enc, 100, 4, seed=3)
    first = [a.next_batch() for _ in range(3)]
    state = a.state()
    rest = [a.next_batch() for _ in range(5)]  # crosses into later epochs
    b = ConversationBatches(enc, 100, 4, seed=3)
    b.load_state(state)
    for x, y in zip(rest, [b.next_batch() for _ in range(5)], strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))
    ranks = [ConversationBatches(enc, 100, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for whole in first:
        parts = [r.next_batch() for r in ranks]
        for k in range(3):
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
    # every conversation is visited once per epoch
    one_epoch = ConversationBatches(enc, 100, 1, seed=3).rows_of_epoch(0)
    assert sorted(i for row in one_epoch for i in row) == list(range(len(enc.rows)))


def test_held_out_split_is_seeded_and_disjoint(tok: Tokenizer) -> None:
    enc = encoded(tok, CONVS * 20)
    train, val = split_off(enc, 0.1, seed=1)
    again, _ = split_off(enc, 0.1, seed=1)
    assert val is not None and len(val.rows) == 6 and len(train.rows) == 54
    assert train.sources == again.sources and not set(train.sources) & set(val.sources)
    assert split_off(encoded(tok, CONVS), 0.1, seed=1)[1] is None  # too few rows to hold any out


# ----------------------------------------------------------------------------- the commands


def _facts(n: int, seed: int, shift: int = 0) -> list[dict]:
    """A learnable chat task: the reply to "colour of NAME?" is fixed by the name (and `shift`)."""
    rng = np.random.default_rng(seed)
    names = ["ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]
    colours = ["red", "blue", "green", "black"]
    return [
        {"messages": [{"role": "user", "content": f"colour of {names[i]}?"}, {"role": "assistant", "content": colours[(i + shift) % 4]}]}
        for i in rng.integers(0, len(names), n)
    ]


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory, tok: Tokenizer):
    root = tmp_path_factory.mktemp("sft")
    plain = Tokenizer.train(small_text_corpus(30_000), vocab_size=400, progress=False)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(root / "base", 0, base, base.config, plain)
    sets = {"train.jsonl": _facts(400, 1), "val.jsonl": _facts(40, 2), "train_b.jsonl": _facts(400, 3, shift=1), "val_b.jsonl": _facts(40, 4, shift=1)}
    for name, rows in sets.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_sft_learns_resumes_and_chats(base_and_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    root = base_and_data
    out = tmp_path / "run"
    common = ["--data", str(root / "train.jsonl"), "--val-data", str(root / "val.jsonl"), "--batch-size", "8", "--lr", "1e-2", "--min-lr", "1e-3", "-q"]
    code, text, err = run(capsys, "sft", "--ckpt", str(root / "base"), "--out", str(out), *common, "--max-steps", "100", "--eval-every", "25")
    assert code == 0, err
    assert "chat tokens: added <|im_start|> (id 400), <|im_end|> (id 401)" in text and "the token table had room" in text
    assert "400 conversations" in text and "(chat)" in text and "held out: 40 conversations" in text
    losses = _val_losses(out)
    assert len(losses) == 4 and losses[-1] < 0.25 * losses[0]
    assert "token accuracy" in text
    code, text, err = run(capsys, "sft", "--out", str(out), "--resume", "--max-steps", "150", "-q")
    assert code == 0, err
    assert "resuming from" in text
    assert find_checkpoint(out).name == "step_00000150"
    ckpt = load_checkpoint(out)
    assert ckpt.meta["sft"]["data"] == [str(root / "train.jsonl")] and set(ckpt.tokenizer.special_tokens) >= {"<|im_start|>", "<|im_end|>"}

    monkeypatch.setattr("sys.stdin", _Lines("colour of ada?\n/reset\ncolour of bob?\n"))
    code, text, err = run(capsys, "chat", "--ckpt", str(out), "--temperature", "0", "--max-new-tokens", "5")
    assert code == 0, err
    assert text.splitlines() == ["red", "blue"]


class _Lines:
    """A piped stdin (not a terminal) holding some lines."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines(keepends=True)

    def isatty(self) -> bool:
        return False

    def readline(self) -> str:
        return self.lines.pop(0) if self.lines else ""


@pytest.fixture(scope="module")
def tuned(base_and_data: Path) -> Path:
    """A chat model: the base fully fine-tuned on the first colour mapping."""
    root = base_and_data
    argv = ["sft", "--ckpt", str(root / "base"), "--out", str(root / "tuned"), "--data", str(root / "train.jsonl"), "--max-steps", "100", "--lr", "1e-2", "-q"]
    assert main(argv) == 0
    return root / "tuned"


@pytest.mark.parametrize("qlora", [None, "4"])
def test_lora_sft_stores_the_adapter_alone_merges_and_exports_to_peft(base_and_data: Path, tuned: Path, tmp_path: Path, capsys, qlora) -> None:
    root = base_and_data
    out = tmp_path / "lora"
    flags = ["--lora-r", "4", "--lora-targets", "c_attn,mlp.c_proj"] + (["--qlora", qlora] if qlora else [])
    code, text, err = run(
        capsys, "sft", "--ckpt", str(tuned), "--out", str(out), "--data", str(root / "train_b.jsonl"), "--val-data", str(root / "val_b.jsonl"),
        "--batch-size", "8", "--max-steps", "40", "--eval-every", "10", "--lr", "1e-2", "-q", *flags,
    )  # fmt: skip
    assert code == 0, err
    assert "LoRA: rank 4" in text and ("NF4" in text) == bool(qlora)
    losses = _val_losses(out)
    assert losses[-1] < 0.5 * losses[0]  # the adapters alone teach the new mapping
    from safetensors.torch import load_file

    stored = load_file(find_checkpoint(out) / "model.safetensors")
    assert {k.rsplit(".", 2)[-2] for k in stored} == {"lora_A", "lora_B"}  # the base had the chat tokens: no rows added
    assert len([k for k in stored if "lora_A" in k]) == 4  # c_attn and mlp.c_proj of 2 layers

    adapter = load_checkpoint(out, merge_lora=False).model.eval()
    merged = load_checkpoint(out).model.eval()
    x = torch.randint(0, 402, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapter(x)[0], rtol=0, atol=1e-5)
    code, text, err = run(capsys, "merge-lora", str(out), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "merged").model(x)[0], adapter(x)[0], rtol=0, atol=1e-5)

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    code, text, err = run(capsys, "export-hf", str(out), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert "PeftModel" in text
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "base"), tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, adapter(x)[0], rtol=0, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("<|im_end|>") == [401]
    # and back: the PEFT directory imports as a gptlab adapter checkpoint on the exported base
    code, text, err = run(capsys, "import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"))
    assert code == 0, err
    imported = load_checkpoint(tmp_path / "imported", merge_lora=False)
    assert imported.meta["lora"]["config"]["r"] == 4
    with torch.no_grad():
        torch.testing.assert_close(imported.model.eval()(x)[0], adapter(x)[0], rtol=0, atol=1e-5)


def test_bad_fine_tuning_input_is_one_line_and_exit_2(base_and_data: Path, tmp_path: Path, capsys) -> None:
    root = base_and_data
    data = ["--data", str(root / "train.jsonl")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"text": "plain"}\n')
    cases = [
        (["sft", "--ckpt", str(tmp_path / "nowhere"), *data], "no such checkpoint"),
        (["sft", "--ckpt", str(root / "base"), "--data", str(bad)], f"{bad}:2: the file's rows are chat rows"),
        (["sft", "--ckpt", str(root / "base"), *data, "--lora-r", "4", "--lora-targets", "q_proj"], "'q_proj' matches no Linear module"),
        (["sft", "--ckpt", str(root / "base"), *data, "--max-len", "500"], "max_len (500) exceeds the model's block_size (64)"),
        (["sft", "--ckpt", str(root / "base"), "--data", "builtin:nope"], "valid names"),
        (["sft", "--out", str(tmp_path / "fresh"), "--resume"], "needs a base checkpoint"),
        (["merge-lora", str(root / "base"), "--out", str(tmp_path / "m")], "not a LoRA checkpoint"),
    ]
    for argv, named in cases:
        code, out, err = run(capsys, *argv, "--out" if "--out" not in argv else "-q", *([str(tmp_path / "o")] if "--out" not in argv else []))
        assert code == 2, (argv, out, err)
        assert named in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_an_adapter_whose_base_changed_is_refused(base_and_data: Path, tmp_path: Path, capsys) -> None:
    root = base_and_data
    base = tmp_path / "base"
    plain = load_checkpoint(root / "base")
    save_checkpoint(base, 0, plain.model, plain.model_config, plain.tokenizer)
    out = tmp_path / "lora"
    code, _, err = run(capsys, "sft", "--ckpt", str(base), "--out", str(out), "--data", str(root / "train.jsonl"), "--max-steps", "2", "--lora-r", "2", "-q")
    assert code == 0, err
    from safetensors.torch import load_file

    stored = load_file(find_checkpoint(out) / "model.safetensors")
    assert stored["added_tokens.wte"].shape == (2, 32)  # the chat tokens' rows travel with the adapter
    x = torch.randint(0, 402, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # before any change to the base, the stored adapter rebuilds the trained model
        assert load_checkpoint(out).model(x)[0].isfinite().all()
    torch.manual_seed(5)
    other = GPT(plain.model_config)
    save_checkpoint(base, 0, other, other.config, plain.tokenizer)  # retrained in place: same path, other weights
    code, _, err = run(capsys, "sample", "--ckpt", str(out), "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2 and "has changed since the adapter was trained" in err


def test_with_new_tokens_then_chat_template_round_trip(tok: Tokenizer) -> None:
    torch.manual_seed(0)
    grown = with_new_tokens(GPT(GPTConfig(vocab_size=400, block_size=32, n_layer=1, n_head=1, n_embd=8)), [400, 401], known=400)
    assert grown.config.vocab_size == 448
    r = ChatTemplate(tok).render(CONVS[0])
    assert grown(torch.tensor([r.ids]))[0].shape == (1, len(r.ids), 448)
    assert F.softmax(grown(torch.tensor([r.ids]))[0][0, -1], -1).sum().item() == pytest.approx(1.0)


def test_a_step_is_the_mean_over_every_trained_token_however_it_is_accumulated(tok: Tokenizer) -> None:
    from gptlab.config import TrainConfig
    from gptlab.train import build_optimizer, train_step

    convs = [CONVS[0], CONVS[1], CONVS[2], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a much longer reply " * 3}]]
    enc = encoded(tok, convs)
    objective = SFTObjective(tok, SFTConfig(data=("x",), packing=False), enc, None, 160)
    grads = []
    for batch_size, accum in ((4, 1), (1, 4), (2, 2)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=448, block_size=160, n_layer=1, n_head=2, n_embd=32))
        cfg = TrainConfig(batch_size=batch_size, grad_accum=accum, grad_clip=0.0)
        loader = ConversationBatches(enc, 160, batch_size, seed=0, packing=False)
        optimizer = build_optimizer(model, cfg, "cpu")
        optimizer.step = lambda: None  # keep the gradients: compare them, not the update
        optimizer.zero_grad = lambda set_to_none=True: None
        loss, _, _ = train_step(model, optimizer, loader, cfg, torch.device("cpu"), objective=objective)
        grads.append((loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    # the conversations' reply lengths differ, so a plain mean of micro-batch means would differ here
    for loss, grad in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-5)
        torch.testing.assert_close(grad, grads[0][1], rtol=1e-4, atol=1e-7)


def test_a_classifier_run_fine_tunes_into_a_chat_model(base_and_data: Path, tmp_path: Path, capsys) -> None:
    from gptlab.checkpoint import HEAD_KEY
    from gptlab.finetune.heads import HeadSpec, TaskModel

    root = base_and_data
    plain = load_checkpoint(root / "base")
    spec = HeadSpec(task="classify", labels=("no", "yes"))
    classifier = TaskModel.from_gpt(plain.model, spec, seed=0)
    save_checkpoint(tmp_path / "cls", 0, classifier, plain.model_config, plain.tokenizer, extra_meta={HEAD_KEY: spec.to_dict()})
    code, text, err = run(capsys, "sft", "--ckpt", str(tmp_path / "cls"), "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "chat"), "--max-steps", "2", "-q")
    assert code == 0, err
    assert "task head is left out" in text
    assert type(load_checkpoint(tmp_path / "chat").model) is GPT


def test_chat_needs_a_chat_model(base_and_data: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", _Lines("hello\n"))
    code, out, err = run(capsys, "chat", "--ckpt", str(base_and_data / "base"))
    assert code == 2 and "lacks the chat token(s) <|im_start|>, <|im_end|>" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("packing", [True, False])
def test_held_out_evaluation_scores_every_conversation_exactly_once(tok: Tokenizer, model: GPT, packing: bool) -> None:
    from gptlab.config import TrainConfig
    from gptlab.finetune.sft import eval_batches_for, evaluate_conversations
    from gptlab.train import estimate_loss

    enc = encoded(tok, CONVS * 5)  # 15 conversations: batches of 4 leave a partial last one
    objective = SFTObjective(tok, SFTConfig(data=("x",), packing=packing), enc, enc, 160)
    cfg = TrainConfig(batch_size=4)
    n = eval_batches_for(objective, cfg, 160)
    sums = {}
    loader = objective.batches("val", 160, 4, seed=1, rank=0, world_size=1)
    with torch.no_grad():
        for _ in range(n + 2):  # more batches than needed add nothing
            for k, v in objective.score(model, loader.next_batch(), torch.device("cpu")).items():
                sums[k] = sums.get(k, 0.0) + v
    assert sums["tokens"] == enc.targets
    exact = evaluate_conversations(model, enc, packing=packing, batch_size=4)
    assert objective.metrics(sums)["loss"] == pytest.approx(exact["loss"], rel=1e-5)
    assert estimate_loss(model, objective.batches("val", 160, 4, 1, 0, 1), n, torch.device("cpu"), "float32", None, objective)["loss"] == pytest.approx(exact["loss"], rel=1e-5)
