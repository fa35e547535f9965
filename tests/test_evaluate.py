"""Evaluation of any text file: the rolling windows by hand, the batched computation against a
one-token-at-a-time slow path, and the `gptlab eval --text` command."""

import math

import pytest
import torch
from conftest import randomize_, small_text_corpus

from gptlab.checkpoint import write_checkpoint_dir
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import ConfigError
from gptlab.evaluate import Window, evaluate_text, rolling_windows
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rolling_windows_by_hand():
    # 10 tokens (targets 1..9), context 4
    assert rolling_windows(10, 4, 4) == [Window(0, 1, 5), Window(4, 5, 9), Window(5, 9, 10)]
    assert rolling_windows(10, 4, 2) == [Window(0, 1, 5), Window(2, 5, 7), Window(4, 7, 9), Window(5, 9, 10)]
    assert rolling_windows(10, 4, 1)[1:3] == [Window(1, 5, 6), Window(2, 6, 7)]
    assert rolling_windows(3, 8, 8) == [Window(0, 1, 3)]
    assert rolling_windows(1, 8, 8) == []
    for bad in (0, 5, 2.0):
        with pytest.raises(ConfigError, match="stride"):
            rolling_windows(10, 4, bad)


@pytest.mark.parametrize("n, block, stride", [(n, b, s) for n in (2, 7, 50, 129) for b in (1, 4, 16) for s in sorted({1, b // 2 or 1, b})])
def test_rolling_windows_predict_every_token_once_with_the_promised_context(n, block, stride):
    windows = rolling_windows(n, block, stride)
    assert [t for w in windows for t in range(w.first, w.end)] == list(range(1, n))
    for k, w in enumerate(windows):
        assert 1 <= w.end - 1 - w.start <= block  # the inputs fit the context
        assert w.start < w.first  # a target's input is inside the window
        if k:  # later windows read at least block - stride + 1 tokens before their first target, or all there is
            assert w.first - w.start >= min(block - stride + 1, w.first)


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.train(small_text_corpus(30_000), vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    randomize_(model, seed=1)
    return model, tok


def slow_nll(model, seq, windows) -> float:
    """One forward per scored token, over exactly its window's tokens before it."""
    total = 0.0
    with torch.no_grad():
        for w in windows:
            for j in range(w.first, w.end):
                logits, _ = model(torch.tensor([seq[w.start : j]]))
                total -= torch.log_softmax(logits[0, -1].double(), -1)[seq[j]].item()
    return total


@pytest.mark.parametrize("stride", [16, 5, 1])
def test_evaluate_text_matches_the_slow_path(tiny, stride):
    model, tok = tiny
    text = "The quick brown fox.\nIt jumps over the lazy dog, twice: 'naïve café' 🎉\n" * 3
    seq = [tok.eot_id, *tok.encode_ordinary(text)]
    nll = slow_nll(model, seq, rolling_windows(len(seq), 16, stride))
    m = evaluate_text(model, tok, text, stride=stride, batch_size=3)
    assert m["tokens"] == len(seq) - 1 and m["bytes"] == len(text.encode())
    assert m["loss"] == pytest.approx(nll / (len(seq) - 1), rel=1e-5)
    assert m["bpb"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)  # summed bits over bytes
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert evaluate_text(model, tok, text, stride=stride, batch_size=1)["loss"] == pytest.approx(m["loss"], rel=1e-6)
    # max_tokens scores the first tokens only
    head = evaluate_text(model, tok, text, stride=stride, max_tokens=10)
    assert head["tokens"] == 10 and head["loss"] == pytest.approx(slow_nll(model, seq[:11], rolling_windows(11, 16, stride)) / 10, rel=1e-5)


def test_a_tokenizer_without_endoftext_leaves_the_first_token_unscored(tiny):
    model, tok = tiny

    class NoEOT:  # as an imported GPT-1 tokenizer: no <|endoftext|>
        special_tokens: dict = {}
        encode_batch = staticmethod(tok.encode_batch)
        decode = staticmethod(tok.decode)

    text = "Hello there.\nGeneral Kenobi!\n" * 4
    ids = tok.encode_ordinary(text)
    m = evaluate_text(model, NoEOT(), text)
    assert m["tokens"] == len(ids) - 1 and m["bytes"] == len(tok.decode(ids[1:]).encode())
    assert m["loss"] == pytest.approx(slow_nll(model, ids, rolling_windows(len(ids), 16, 16)) / (len(ids) - 1), rel=1e-5)


def test_eval_text_through_the_cli(tiny, tmp_path, capsys):
    model, tok = tiny
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_checkpoint_dir(ckpt, 0, model, model.config, tok)
    text = "".join(small_text_corpus(3_000))
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    code = main(["eval", "--ckpt", str(ckpt), "--text", str(tmp_path / "held.txt"), "--device", "cpu", "--stride", "8", "-q"])
    out = capsys.readouterr().out
    expected = evaluate_text(model, tok, text, stride=8)
    assert code == 0 and f"loss:            {expected['loss']:.4f}" in out and f"bits per byte:   {expected['bpb']:.4f}" in out
    assert "stride 8 (each predicting 8 tokens with at least 9 of context)" in out and "the first after <|endoftext|>" in out
    code = main(["eval", "--ckpt", str(ckpt), "--input", str(tmp_path / "held.txt"), "--device", "cpu", "-q"])
    assert code == 0 and "stride 16 (non-overlapping)" in capsys.readouterr().out

    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe")
    for argv, message in (
        (["--text", str(tmp_path / "bad.txt")], "bad.txt: not valid utf-8 at byte 5"),
        (["--text", str(tmp_path / "missing.txt")], "missing.txt: cannot read"),
        (["--text", str(tmp_path / "held.txt"), "--stride", "17"], "stride must be an integer in [1, block_size=16], got 17"),
        (["--data", str(tmp_path), "--stride", "4"], "--stride applies to --text"),
    ):
        code = main(["eval", "--ckpt", str(ckpt), *argv, "--device", "cpu", "-q"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
