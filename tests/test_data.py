import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.data import BatchSampler, check_block_size, load_data, prepare, sequential_batches, split_documents, token_dtype
from gptlab.errors import ConfigError, DataError
from gptlab.tokenizer import Tokenizer


def test_prepare_writes_shards_meta_and_tokenizer(data_dir, corpus_dir):
    data = load_data(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    tok = data.tokenizer()
    assert tok.vocab_size == 512
    # shards hold exactly the documents' tokens, each followed by <|endoftext|>
    n_docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert n_docs == len(list(corpus_dir.iterdir()))
    for split in ("train", "val"):
        arr = data.split(split)
        assert len(arr) == meta["splits"][split]["tokens"]
        assert int((arr == tok.eot_id).sum()) == meta["splits"][split]["documents"]
        assert arr[-1] == tok.eot_id
    # the val text decodes back to whole source documents
    val_docs = tok.decode(data.val.tolist()).split("<|endoftext|>")[:-1]
    sources = {p.read_text() for p in corpus_dir.iterdir()}
    assert set(val_docs) <= sources
    assert sum(len(d.encode()) for d in val_docs) == meta["splits"]["val"]["bytes"]


def test_prepare_gpt2_matches_tokenizer_and_is_deterministic(tmp_path, corpus_dir):
    a = prepare(tmp_path / "a", "gpt2", inputs=[corpus_dir], seed=3, progress=False)
    b = prepare(tmp_path / "b", "gpt2", inputs=[corpus_dir], seed=3, progress=False)
    assert a["splits"] == b["splits"]
    assert (tmp_path / "a/train.bin").read_bytes() == (tmp_path / "b/train.bin").read_bytes()
    data = load_data(tmp_path / "a")
    gpt2 = Tokenizer.gpt2()
    first_doc = data.train[: list(data.train).index(gpt2.eot_id)]
    text = gpt2.decode(first_doc.tolist())
    assert gpt2.encode_ordinary(text) == first_doc.tolist()


def test_token_dtype_widens_for_large_vocabularies():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_single_document_is_split_at_a_line_break():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([text], 0.1, seed=0)
    assert train[0] + val[0] == text
    assert train[0].endswith("\n") and 0.05 < len(val[0]) / len(text) < 0.15


def test_split_is_by_documents_and_seeded():
    docs = [f"document {i} " * 10 for i in range(50)]
    t1, v1 = split_documents(docs, 0.2, seed=1)
    t2, v2 = split_documents(docs, 0.2, seed=1)
    assert (t1, v1) == (t2, v2)
    assert sorted(t1 + v1) == sorted(docs) and 8 <= len(v1) <= 12
    assert split_documents(docs, 0.2, seed=2)[1] != v1


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no such file"),
        (lambda d: d.mkdir(), "holds no files"),
        (lambda d: (d.mkdir(), (d / "a.txt").write_text("  \n")), "input is empty"),
        (lambda d: (d.mkdir(), (d / "bad.txt").write_bytes(b"ok \xff\xfe bytes")), "bad.txt: not valid utf-8 at byte 3"),
    ],
)
def test_bad_inputs_fail_with_the_file_named_and_nothing_written(tmp_path, setup, message):
    src = tmp_path / "in"
    setup(src)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare(out, "gpt2", inputs=[src], progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_unreadable_file_is_named(tmp_path, corpus_dir, monkeypatch):
    secret = sorted(corpus_dir.iterdir())[3]
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == secret:
            raise PermissionError(13, "Permission denied")
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(DataError, match=f"{secret}: cannot read \\(Permission denied\\)"):
        prepare(tmp_path / "out", "gpt2", inputs=[corpus_dir], progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_partial_files(tmp_path, corpus_dir, monkeypatch):
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gptlab.data.json.dumps", broken)
    with pytest.raises(OSError):
        prepare(out, "gpt2", inputs=[corpus_dir], progress=False)
    assert list(out.iterdir()) == []


def test_load_data_detects_missing_and_truncated_shards(tmp_path, data_dir):
    with pytest.raises(DataError, match="not a prepared data directory"):
        load_data(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in data_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "val.bin").write_bytes((copy / "val.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="val.bin: missing or truncated"):
        load_data(copy)


def test_block_size_larger_than_data_names_the_field(data_dir):
    data = load_data(data_dir)
    with pytest.raises(ConfigError, match=r"block_size \(100000\)"):
        check_block_size(data, 100_000)


def test_batch_sampler_windows_and_resumable_state(data_dir):
    data = load_data(data_dir)
    s = BatchSampler(data.train, block_size=16, batch_size=4, seed=7)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    state = s.state()
    after = [s.next_batch() for _ in range(3)]
    s2 = BatchSampler(data.train, block_size=16, batch_size=4, seed=999)
    s2.load_state(state)
    for (xa, ya), (xb, yb) in zip(after, [s2.next_batch() for _ in range(3)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_sequential_batches_score_every_target_once():
    tokens = np.arange(1, 24, dtype=np.uint16)  # 23 tokens -> 22 targets
    seen = []
    for x, y in sequential_batches(tokens, block_size=5, batch_size=2):
        assert x.shape == y.shape and x.shape[1] == 5
        valid = y != -100
        assert torch.equal(y[valid], (x + 1)[valid])
        seen += y[valid].tolist()
    assert seen == list(range(2, 24))
