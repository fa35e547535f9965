"""Tokenizer tests. References: HF transformers' GPT2TokenizerFast for GPT-2 ids, an HF `tokenizers`
BPE trained the same way for our trained tokenizers, and Python's own UTF-8 codec for decoding."""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gptlab.tokenizer as tokmod
from gptlab.errors import ConfigError, TokenizerError
from gptlab.tokenizer import EOT, GPT2_PATTERN, Tokenizer, load_tokenizer


HAND_TEXTS = [
    "Hello world",
    "",
    " ",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\t\t\tend",
    "line one\nline two\n\n\nline five\r\nwindows\r\n",
    "\n\n  \n\t \n",
    "it's they're we've I'd you'll I'm don't 'S 'tis O'Neil",
    "numbers 0 12 345 6789 3.14159 1,000,000 1e-9 -42",
    "def f(x):\n    return x ** 2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
    'json = {"key": [1, 2, {"nested": null}]}',
    "emoji 😀🎉👍🏽 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "中文分词测试，日本語のテキスト、한국어 텍스트",
    "café naïve résumé Ångström Straße œuvre",
    "Ελληνικά Русский текст עברית العربية हिन्दी",
    "control \x00\x01\x07\x1b[0m\x7f chars",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic space\u2028line sep",
    "text before<|endoftext|>text after",
    "a <|endoftext|> b<|endoftext|><|endoftext|>\n<|endoftext|>",
    "<|endoftext",
    "combining e\u0301 vs é, ﬁ ligature, ½ ² Ⅻ",
    "URLs https://example.com/a?b=c&d=e#frag and e-mail a.b@c.org",
    "!!!??? ... --- *** $$$ %%% ^^^ ~~~ ```",
]

# Short fragments that hit the pre-tokeniser's edge cases, for random texts built from them.
FRAGMENTS = [" ", "  ", "\n", "\t", "\r\n", "'s", "'t", "'re", "'ll", "'", "a", "Z", "é", "ß", "7", "42", ".", ",", "!", "😀", "中", "\u00a0", "<|endoftext|>", "hello", " world"]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)
no_surrogate_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=120)
# st.characters() skips surrogates unless asked, so add them explicitly.
with_surrogates = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(["\n", " ", "'"])), max_size=120)
any_text = st.one_of(with_surrogates, st.lists(st.one_of(with_surrogates, fragment_text), max_size=4).map("".join))

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _wtf8_reference(data: bytes) -> str:
    """Python's codec machinery with an error handler: surrogatepass where it applies, else errors="replace"."""

    def handler(err: UnicodeError) -> tuple[str, int]:
        assert isinstance(err, UnicodeDecodeError)
        try:
            return codecs.lookup_error("surrogatepass")(err)
        except UnicodeDecodeError:
            return codecs.lookup_error("replace")(err)

    codecs.register_error("gptlab_test_wtf8", handler)
    return data.decode("utf-8", "gptlab_test_wtf8")


def _hf_bytes(tokens: list[str]) -> list[bytes]:
    return [bytes(tokmod._UNICODE_TO_BYTE[c] for c in t) for t in tokens]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_files):
    import transformers  # a dev dependency: the reference must be there, not skipped

    return transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_files))


def _corpus_docs() -> list[str]:
    """~0.5 MB: the first stdlib modules by name plus multilingual lines, so merges span several scripts."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:20]
    docs = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    docs += [t for t in HAND_TEXTS if EOT not in t] * 20
    return docs


@pytest.fixture(scope="module")
def trained() -> tuple[Tokenizer, object]:
    """Our tokenizer (docs joined by <|endoftext|>) and the HF reference trained on the docs as separate texts."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    docs = _corpus_docs()
    ours = Tokenizer.train([EOT.join(docs)], vocab_size=512, progress=False)
    ref = HFTokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=511, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    ref.train_from_iterator(docs, trainer=trainer)
    return ours, ref


# ----------------------------------------------------------------------------- GPT-2 parity


def test_packaged_assets_are_openai_files_and_what_gpt2_loads(gpt2_files):
    from importlib import resources

    import conftest

    installed = resources.files("gptlab") / "assets" / "gpt2"
    for name, digest in conftest.GPT2_SHA256.items():
        data = (installed / name).read_bytes()  # what Tokenizer.gpt2() reads, wherever the package is installed
        assert hashlib.sha256(data).hexdigest() == digest, name
    assert len(json.loads((gpt2_files / "vocab.json").read_text(encoding="utf-8"))) == 50257
    assert (gpt2_files / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"


def test_gpt2_vocabulary(gpt2, gpt2_files):
    vocab = json.loads((gpt2_files / "vocab.json").read_text(encoding="utf-8"))
    assert gpt2.name == "gpt2"
    assert gpt2.vocab_size == len(vocab) == 50257
    assert gpt2.eot_id == vocab[EOT] == 50256
    assert gpt2.special_tokens == {EOT: 50256}
    assert len(gpt2.merges()) == 50000
    assert gpt2.merges()[0] == (b" ", b"t")  # first line of merges.txt: "Ġ t"
    assert gpt2.token_bytes(vocab["Ġworld"]) == b" world"
    assert gpt2.token_bytes(50256) == EOT.encode()
    assert Tokenizer.gpt2() is gpt2  # cached


def test_byte_alphabet_matches_hf():
    from tokenizers import pre_tokenizers

    assert set(tokmod._BYTE_TO_UNICODE.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    # Every byte valid UTF-8 can hold (all but C0, C1, F5..FF, which map to themselves) through HF's own mapping:
    # U+0000..U+00FF give ASCII, C2, C3 and every continuation byte; the rest give one lead byte each.
    lead2 = [(b - 0xC0) << 6 for b in range(0xC4, 0xE0)]
    lead3 = [0x800] + [(b - 0xE0) << 12 for b in range(0xE1, 0xF0)]
    lead4 = [0x10000, 0x40000, 0x80000, 0xC0000, 0x100000]
    probe = "".join(map(chr, [*range(0x100), *lead2, *lead3, *lead4]))
    (pieces,) = [p for p, _ in pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(probe)]
    assert b"".join(_hf_bytes([pieces])) == probe.encode("utf-8")
    assert len(set(probe.encode("utf-8"))) == 256 - 13


@pytest.mark.parametrize("text", HAND_TEXTS)
def test_gpt2_matches_hf_on_hand_texts(gpt2, hf_gpt2, text):
    assert gpt2.encode(text) == hf_gpt2(text)["input_ids"]
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_hello_world(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]  # the check value stated with the shared GPT-2 files


@FAST
@given(text=st.one_of(no_surrogate_text, fragment_text))
def test_gpt2_matches_hf_on_random_text(gpt2, hf_gpt2, text):
    assert gpt2.encode(text) == hf_gpt2(text)["input_ids"]


def test_special_token_handling(gpt2):
    text = "a<|endoftext|>b"
    assert gpt2.encode(text) == [64, 50256, 65]
    assert gpt2.encode(text, allowed_special={EOT}) == [64, 50256, 65]
    plain = gpt2.encode_ordinary(text)
    assert gpt2.encode(text, allowed_special=None) == gpt2.encode(text, allowed_special=set()) == plain
    assert 50256 not in plain and gpt2.decode(plain) == text
    with pytest.raises(TokenizerError, match="<\\|im_start\\|>"):
        gpt2.encode(text, allowed_special={"<|im_start|>"})


# ----------------------------------------------------------------------------- lossless round trip


@FAST
@given(text=any_text)
def test_round_trip_any_str_gpt2(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text


@FAST
@given(text=any_text)
def test_round_trip_any_str_trained(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_lone_surrogates_are_their_own_pre_tokens(gpt2, hf_gpt2, trained):
    """Each surrogate's 3 WTF-8 bytes are BPE'd alone; HF's BPE model applied to that one word is the reference."""
    for tok, model in ((gpt2, hf_gpt2.backend_tokenizer.model), (trained[0], trained[1].model)):
        for cp in range(0xD800, 0xE000):
            word = "".join(tokmod._BYTE_TO_UNICODE[b] for b in chr(cp).encode("utf-8", "surrogatepass"))
            expected = _hf_bytes([t.value for t in model.tokenize(word)])
            assert [tok.token_bytes(i) for i in tok.encode(chr(cp))] == expected
        text = "x \ud800\udfffy"
        ids = tok.encode(text)
        assert ids == tok.encode("x ") + tok.encode("\ud800") + tok.encode("\udfff") + tok.encode("y")
        assert tok.decode(ids) == text


@FAST
@given(word=st.text(st.characters(categories=["L"]), min_size=1, max_size=30) | st.sampled_from(["hello", "Hello", "antidisestablishment", "ŋŋŋŋ"]), space=st.booleans())
def test_python_bpe_matches_tiktoken(gpt2, word, space):
    """The small rank BPE used for surrogates equals tiktoken's on any single pre-token (" ?\\p{L}+")."""
    word = " " * space + word
    assert gpt2._bpe(word.encode("utf-8")) == gpt2.encode_ordinary(word)


@FAST
@given(data=st.binary(max_size=64) | st.lists(st.sampled_from([b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed", b"\xa0", b"\xe2\x82", b"a", b"\xf0\x9f\x98\x80", b"\xff"])).map(b"".join))
def test_decode_bytes_rule_matches_python_codec(data):
    assert tokmod._decode_wtf8(data) == _wtf8_reference(data)


@FAST
@given(ids=st.lists(st.integers(0, 511), max_size=40))
def test_decode_of_any_ids(trained, ids):
    tok, _ = trained
    data = tok.decode_bytes(ids)
    assert data == b"".join(tok.token_bytes(i) for i in ids)
    assert tok.decode(ids) == _wtf8_reference(data)


def test_decode_accepts_arrays_and_iterators(gpt2):
    import numpy as np

    ids = gpt2.encode("Hello world<|endoftext|>")
    assert gpt2.decode(np.array(ids)) == gpt2.decode(iter(ids)) == "Hello world<|endoftext|>"
    assert gpt2.token_bytes(np.int64(995)) == b" world"


def test_decode_replaces_partial_characters(gpt2):
    ids = gpt2.encode("😀")
    assert len(ids) > 1
    assert gpt2.decode(ids[:1]) == "\ufffd"


# ----------------------------------------------------------------------------- training


def test_trained_matches_hf_trainer(trained):
    tok, ref = trained
    assert tok.vocab_size == 512 and tok.name == "bpe-512"
    assert tok.special_tokens == {EOT: 511} and tok.eot_id == 511
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([b]) for b in range(256)]
    merges = json.loads(ref.to_str())["model"]["merges"]
    # same merges in the same order, although our corpus had <|endoftext|> between the docs
    assert tok.merges() == [tuple(_hf_bytes(pair)) for pair in merges]
    assert all(tok.token_bytes(256 + i) == a + b for i, (a, b) in enumerate(tok.merges()))


@pytest.mark.parametrize("text", HAND_TEXTS)
def test_trained_encode_matches_hf(trained, text):
    tok, ref = trained
    ours = tok.encode_ordinary(text)
    assert [tok.token_bytes(i) for i in ours] == _hf_bytes(ref.encode(text).tokens)


@FAST
@given(text=st.one_of(no_surrogate_text, fragment_text))
def test_trained_encode_matches_hf_random(trained, text):
    tok, ref = trained
    assert [tok.token_bytes(i) for i in tok.encode_ordinary(text)] == _hf_bytes(ref.encode(text).tokens)


def test_save_load_round_trip(trained, tmp_path):
    tok, _ = trained
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    tok.save(path)  # overwriting works too
    assert sorted(p.name for p in path.parent.iterdir()) == ["tok.json"]  # no temp files left
    loaded = Tokenizer.load(path)
    assert loaded == tok and loaded.name == tok.name and loaded.vocab_size == tok.vocab_size
    text = "\n".join(HAND_TEXTS)
    assert loaded.encode(text) == tok.encode(text)
    assert Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))) == tok
    assert load_tokenizer(str(path)) == tok


def test_gpt2_save_load(gpt2, tmp_path):
    gpt2.save(tmp_path / "gpt2.json")
    loaded = Tokenizer.load(tmp_path / "gpt2.json")
    assert loaded == gpt2 and loaded.encode("Hello<|endoftext|>") == [15496, 50256]


def test_training_on_cut_long_texts_matches_hf(monkeypatch):
    """Long texts are cut at safe line ends so HF counts words in parallel; the merges must not change."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    text = "\n".join(_corpus_docs()[:3])
    ref = HFTokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.train_from_iterator([text], trainer=trainers.BpeTrainer(vocab_size=383, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    monkeypatch.setattr(tokmod, "_CHUNK_CHARS", 100)
    assert len(tokmod.split_at_line_breaks(text, 100)) > 50
    tok = Tokenizer.train([text], vocab_size=384, progress=False)
    assert tok.merges() == [tuple(_hf_bytes(pair)) for pair in json.loads(ref.to_str())["model"]["merges"]]


def test_training_cuts_at_special_tokens_and_surrogates():
    a = Tokenizer.train(["hello world\ud800hello<|endoftext|>worlds"], vocab_size=264, progress=False)
    b = Tokenizer.train(["hello world", "hello", "worlds"], vocab_size=264, progress=False)
    assert a == b and a.vocab_size == 264
    assert a.decode(a.encode("hello world\ud800")) == "hello world\ud800"


def test_training_several_special_tokens():
    tok = Tokenizer.train(["abc abc abd"], vocab_size=260, special_tokens=["<pad>", EOT], progress=False)
    assert tok.special_tokens == {"<pad>": 258, EOT: 259} and tok.eot_id == 259 and tok.vocab_size == 260
    assert tok.encode("x<pad>") == [ord("x"), 258]


# ----------------------------------------------------------------------------- batch encoding


def test_encode_batch_matches_encode_ordinary(gpt2, monkeypatch):
    texts = HAND_TEXTS + ["x \ud800 y", "", "\n".join(HAND_TEXTS) * 30]
    expected = [gpt2.encode_ordinary(t) for t in texts]
    assert gpt2.encode_batch(texts) == expected
    assert gpt2.encode_batch(texts, num_threads=1, progress=True) == expected
    # small chunks: the long text is cut into many pieces that must not change its ids
    monkeypatch.setattr(tokmod, "_CHUNK_CHARS", 50)
    assert gpt2.encode_batch(texts, num_threads=2) == expected
    assert gpt2.encode_batch([]) == []


@FAST
@given(text=st.lists(st.one_of(fragment_text, st.sampled_from(["\n", " \n", "\n\n", "x\n", "\t\n "])), max_size=20).map("".join))
def test_parallel_cuts_keep_ids(gpt2, text):
    pieces = tokmod.split_at_line_breaks(text, 3)
    assert "".join(pieces) == text
    assert [i for p in pieces for i in gpt2.encode_ordinary(p)] == gpt2.encode_ordinary(text)


# ----------------------------------------------------------------------------- errors


def test_train_rejects_empty_corpus():
    with pytest.raises(TokenizerError, match="empty corpus"):
        Tokenizer.train([], vocab_size=300, progress=False)
    with pytest.raises(TokenizerError, match="empty corpus"):
        Tokenizer.train(["", ""], vocab_size=300, progress=False)


def test_train_rejects_small_vocab():
    with pytest.raises(ConfigError, match="vocab_size.*200"):
        Tokenizer.train(["hello"], vocab_size=200, progress=False)
    with pytest.raises(ConfigError, match="vocab_size.*257"):
        Tokenizer.train(["hello"], vocab_size=257, special_tokens=["<a>", "<b>"], progress=False)


def test_train_rejects_corpus_too_small_for_vocab():
    with pytest.raises(TokenizerError, match="corpus too small for vocab_size 5000"):
        Tokenizer.train(["tiny corpus"], vocab_size=5000, progress=False)


def test_decode_out_of_range_id(gpt2):
    for bad in (50257, -1, 10**12):
        with pytest.raises(TokenizerError, match=f"token id {bad} is out of range"):
            gpt2.decode([15496, bad])
    with pytest.raises(TokenizerError, match="token id 99999"):
        gpt2.token_bytes(99999)


def test_load_errors_name_the_path(tmp_path, trained):
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match="not found.*nope.json"):
        Tokenizer.load(missing)
    with pytest.raises(TokenizerError, match="no tokenizer at.*nope.json"):
        load_tokenizer(str(missing))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad.json: not valid JSON"):
        Tokenizer.load(bad_json)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="other.json: not a gptlab tokenizer.*something-else"):
        Tokenizer.load(other)
    with pytest.raises(TokenizerError, match="has neither tokenizer.json nor vocab.json"):
        load_tokenizer(str(tmp_path))


def _tampered(tok: Tokenizer, tmp_path: Path, change) -> Path:
    data = tok.to_dict()
    change(data)
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("merges"), "missing field.*merges"),
        (lambda d: d.update(version=2), "unsupported tokenizer version 2"),
        (lambda d: d["tokens"].__setitem__(300, "@@not base64@@"), "token 300 is not valid base64"),
        (lambda d: d["tokens"].__setitem__(300, d["tokens"][299]), "does not make token 300|duplicates"),
        (lambda d: d["merges"].__setitem__(10, [d["merges"][10][1], d["merges"][10][0]]), "merge 10 .* does not make token 266"),
        (lambda d: d["merges"].__setitem__(5, [300, 1]), "merge 5 joins ids \\(300, 1\\)"),
        (lambda d: d["tokens"].pop(), "expected 256 byte tokens"),
        (lambda d: d["special_tokens"].update({EOT: 3}), "special token .* has id 3"),
        (lambda d: d.update(merges="x"), "'merges' must be a list"),
        (lambda d: d["special_tokens"].update({"": 600}), "special tokens must be non-empty"),
        (lambda d: d.update(pattern="(unclosed"), "cannot build encoder"),
    ],
)
def test_load_rejects_malformed_files(trained, tmp_path, change, message):
    tok, _ = trained
    path = _tampered(tok, tmp_path, change)
    with pytest.raises(TokenizerError, match=message) as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _write_bpe_files(directory: Path, vocab: dict[str, int], merges: list[str]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return directory / "vocab.json", directory / "merges.txt"


def test_from_gpt2_files_small_vocab(tmp_path):
    base = {c: b for b, c in tokmod._BYTE_TO_UNICODE.items()}
    vocab = {**base, "ab": 256, "Ġab": 257, EOT: 258}
    vocab_path, merges_path = _write_bpe_files(tmp_path / "mini", vocab, ["a b", "Ġ ab"])
    tok = Tokenizer.from_gpt2_files(vocab_path, merges_path)
    assert tok.name == "mini" and tok.vocab_size == 259 and tok.eot_id == 258
    assert tok.encode("ab ab abc<|endoftext|>") == [256, 257, 257, ord("c"), 258]
    assert load_tokenizer(str(tmp_path / "mini")) == tok


def test_from_gpt2_files_rejects_bad_order_and_lines(tmp_path):
    base = {c: b for b, c in tokmod._BYTE_TO_UNICODE.items()}
    # "abc" (merge 2) has id 256, before "ab" (merge 1): rank-based encoding would differ
    vocab_path, merges_path = _write_bpe_files(tmp_path / "order", {**base, "abc": 256, "ab": 257}, ["a b", "ab c"])
    with pytest.raises(TokenizerError, match="merges.txt line 2: merge a b makes id 257, expected 256"):
        Tokenizer.from_gpt2_files(vocab_path, merges_path)
    vocab_path, merges_path = _write_bpe_files(tmp_path / "lines", {**base, "ab": 256}, ["a b extra"])
    with pytest.raises(TokenizerError, match="merges.txt line 2: expected two tokens"):
        Tokenizer.from_gpt2_files(vocab_path, merges_path)
    vocab_path, merges_path = _write_bpe_files(tmp_path / "missing", base, ["a b"])
    with pytest.raises(TokenizerError, match="'ab' is missing"):
        Tokenizer.from_gpt2_files(vocab_path, merges_path)
    with pytest.raises(TokenizerError, match="vocab file not found"):
        Tokenizer.from_gpt2_files(tmp_path / "none.json", merges_path)


def test_pattern_is_gpt2s(gpt2):
    assert gpt2.pattern == GPT2_PATTERN
    assert gpt2.to_dict()["pattern"] == GPT2_PATTERN
