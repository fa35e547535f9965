import gzip
import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import gptlab.data as datamod
from gptlab.data import (
    STATE_FILE, Piece, ShardLoader, Source, check_block_size, cut_for_validation, load_data, permute, plan_splits, prepare,
    sequential_batches, split_unit_chars, token_dtype,
)  # fmt: skip
from gptlab.errors import ConfigError, DataError
from gptlab.tokenizer import Tokenizer, split_at_line_breaks


def concat(data, split: str) -> np.ndarray:
    return np.concatenate(data.shards(split))


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _segments(plan, split):
    """The planned pieces of one split, grouped into the runs that <|endoftext|> ends."""
    runs, run = [], []
    for p in plan:
        if p.split == split:
            run.append(p)
            if p.eot:
                runs.append(run)
                run = []
    return runs


def test_prepare_writes_shards_meta_and_tokenizer(data_dir, corpus_dir):
    data = load_data(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["version"] == 2
    tok = data.tokenizer()
    assert tok.vocab_size == 512
    # shards hold exactly the documents' tokens; <|endoftext|> ends each document, and a part of one
    # that goes on in the other split. A document is counted in each split that holds some of it.
    plan = list(plan_splits(Source.of([corpus_dir], None).pieces(partial(split_unit_chars, val_fraction=0.1)), 0.1, seed=0))
    for split in ("train", "val"):
        mine = [p for p in plan if p.split == split]
        assert meta["splits"][split]["documents"] == len({p.piece.doc for p in mine})
        assert int((concat(data, split) == tok.eot_id).sum()) == sum(p.eot for p in mine)
    assert len({p.piece.doc for p in plan}) == len(list(corpus_dir.iterdir()))
    for split in ("train", "val"):
        arr = concat(data, split)
        names = [s["file"] for s in meta["splits"][split]["shards"]]
        assert names == [f"{split}_{i:06d}.bin" for i in range(len(names))]
        assert [len(a) for a in data.shards(split)] == [8192] * (len(names) - 1) + [len(arr) - 8192 * (len(names) - 1)]
        assert len(arr) == meta["splits"][split]["tokens"] == data.tokens(split)
        assert arr[-1] == tok.eot_id
    # the two splits decode back to the source documents, cut apart where one continues in the other split
    segments = {split: tok.decode(concat(data, split).tolist()).split("<|endoftext|>")[:-1] for split in ("train", "val")}
    assert segments == {split: ["".join(p.piece.text for p in seg) for seg in _segments(plan, split)] for split in ("train", "val")}
    sources = {p.read_text() for p in corpus_dir.iterdir()}
    assert all(any(seg in src for src in sources) for seg in segments["val"])
    assert sum(len(d.encode()) for d in segments["val"]) == meta["splits"]["val"]["bytes"]
    assert not (data_dir / STATE_FILE).exists()


def test_prepare_gpt2_matches_tokenizer_and_is_deterministic(tmp_path, corpus_dir):
    a = prepare(tmp_path / "a", "gpt2", inputs=[corpus_dir], seed=3, progress=False)
    b = prepare(tmp_path / "b", "gpt2", inputs=[corpus_dir], seed=3, progress=False)
    assert a["splits"] == b["splits"]
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    data = load_data(tmp_path / "a")
    gpt2 = Tokenizer.gpt2()
    train = concat(data, "train")
    first_doc = train[: list(train).index(gpt2.eot_id)]
    text = gpt2.decode(first_doc.tolist())
    assert gpt2.encode_ordinary(text) == first_doc.tolist()


def test_many_shards_and_parallel_workers_give_the_same_token_stream(tmp_path, corpus_dir):
    one = prepare(tmp_path / "one", "gpt2", inputs=[corpus_dir], workers=1, progress=False)
    many = prepare(tmp_path / "many", "gpt2", inputs=[corpus_dir], workers=2, shard_tokens=1000, progress=False)
    a, b = load_data(tmp_path / "one"), load_data(tmp_path / "many")
    for split in ("train", "val"):
        assert np.array_equal(concat(a, split), concat(b, split))
        sizes = [s["tokens"] for s in many["splits"][split]["shards"]]
        assert len(sizes) == -(-one["splits"][split]["tokens"] // 1000) and set(sizes[:-1]) <= {1000}
        assert {k: v for k, v in many["splits"][split].items() if k != "shards"} == {k: v for k, v in one["splits"][split].items() if k != "shards"}
    assert len(many["splits"]["train"]["shards"]) > 20


def test_token_dtype_widens_for_large_vocabularies():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def pieces(texts, ends=None) -> list[Piece]:
    ends = [True] * len(texts) if ends is None else ends
    docs = [sum(ends[:i]) for i in range(len(texts))]  # a document ends with its piece marked True
    return [Piece(i, t, len(t), ends[i], docs[i]) for i, t in enumerate(texts)]


def test_a_single_piece_is_split_at_a_line_break():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = cut_for_validation(text, 0.1)
    assert train + val == text
    assert train.endswith("\n") and 0.05 < len(val) / len(text) < 0.15
    planned = list(plan_splits(pieces([text]), 0.1, seed=0))
    assert [(p.split, p.piece.text, p.eot) for p in planned] == [("train", train, True), ("val", val, True)]
    with pytest.raises(DataError, match="too small to split"):
        list(plan_splits(pieces(["hello" + "\n" * 10]), 0.1, seed=0))  # nothing but line breaks would be left for val


def test_split_is_seeded_per_piece_and_never_leaves_a_split_empty():
    docs = [f"document {i} " * 10 for i in range(200)]
    plan = lambda seed, f=0.2: [p.split for p in plan_splits(pieces(docs), f, seed)]  # noqa: E731
    assert plan(1) == plan(1) and plan(1) != plan(2)
    assert all(39 <= plan(seed).count("val") <= 41 for seed in range(10))  # within one piece of 20%
    # a tiny fraction that no hash falls under still gives a validation set: the last piece
    assert plan(1, 1e-9) == ["train"] * 199 + ["val"]
    assert plan(1, 1 - 1e-9) == ["val"] * 199 + ["train"]


def one_megabyte_text() -> str:
    """~1 MB of English: the pydoc topics, repeated, as one document."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    return (text * (1 + 1_000_000 // len(text)))[:1_000_000]


@pytest.mark.parametrize("fraction", [0.005, 0.02, 0.1, 0.3])
def test_the_validation_share_is_what_was_asked_for_even_in_one_small_file(tmp_path, fraction):
    text = one_megabyte_text()
    for size in (1_000_000, 100_000, 20_000):  # the whole file, a tenth of it, a fiftieth
        (tmp_path / "in.txt").write_text(text[:size], encoding="utf-8")
        meta = prepare(tmp_path / f"d{size}", "gpt2", inputs=[tmp_path / "in.txt"], val_fraction=fraction, seed=3, progress=False)
        val, train = meta["splits"]["val"], meta["splits"]["train"]
        total = val["bytes"] + train["bytes"]
        # off by at most 3% of the share asked for, plus about one of the smallest pieces (256 chars and up to a line break)
        assert abs(val["bytes"] - fraction * total) <= 0.03 * fraction * total + 400, (size, val["bytes"] / total)
        assert val["tokens"] > 0 and train["tokens"] > 0


def test_val_fraction_zero_puts_everything_in_train(tmp_path, corpus_dir):
    meta = prepare(tmp_path / "d", "gpt2", inputs=[corpus_dir], val_fraction=0.0, progress=False)
    whole = prepare(tmp_path / "w", "gpt2", inputs=[corpus_dir], val_fraction=0.1, progress=False)
    assert meta["splits"]["val"] == {"tokens": 0, "bytes": 0, "documents": 0, "shards": []}
    assert meta["splits"]["train"]["bytes"] == whole["splits"]["train"]["bytes"] + whole["splits"]["val"]["bytes"]
    assert meta["splits"]["train"]["documents"] == len(list(corpus_dir.iterdir()))
    data = load_data(tmp_path / "d")
    check_block_size(data, 64)  # an empty val split is allowed
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\)"):
            prepare(tmp_path / "x", "gpt2", inputs=[corpus_dir], val_fraction=bad, progress=False)


def test_eot_ends_documents_and_a_document_continuing_in_the_other_split():
    texts = ["a1", "a2", "a3", "b1", "b2"]
    ends = [False, False, True, False, False]  # a1..a3 are one document, b1..b2 another (cut short)
    fractions = (1e-9, 0.3, 0.5, 0.7, 1 - 1e-9)  # the extremes move the last piece to the empty split
    for seed, f in ((seed, f) for seed in range(30) for f in fractions):
        planned = list(plan_splits(pieces(texts, ends), f, seed))
        for p, nxt in zip(planned, planned[1:] + [None]):
            assert p.eot == (nxt is None or p.piece.doc_end or nxt.split != p.split)
        for split in ("train", "val"):  # every split is non-empty and ends a document
            mine = [p for p in planned if p.split == split]
            assert mine and mine[-1].eot


def test_long_files_stream_in_pieces_that_tokenize_like_the_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(datamod, "READ_BYTES", 777)  # blocks end inside multi-byte characters
    text = "".join(f"Zeile {i}: grüße 🎉 — naïve café\n\n  indented {i}\n" for i in range(3000))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    parts = list(Source.of([tmp_path / "big.txt"], None).documents(lambda chars: 5000))
    assert len(parts) > 20 and [end for _, _, end in parts] == [False] * (len(parts) - 1) + [True]
    assert [t for t, _, _ in parts] == split_at_line_breaks(text, 5000)  # the cuts do not depend on how the file was read
    assert "".join(t for t, _, _ in parts) == text
    assert sum(raw for _, raw, _ in parts) == len(text.encode())
    gpt2 = Tokenizer.gpt2()
    assert [i for t, _, _ in parts for i in gpt2.encode_ordinary(t)] == gpt2.encode_ordinary(text)


def test_jsonl_and_gzip_inputs(tmp_path, corpus_dir):
    docs = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n")
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in docs))
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    for p in sorted(corpus_dir.iterdir()):
        with gzip.open(gz_dir / (p.name + ".gz"), "wt", encoding="utf-8") as f:
            f.write(p.read_text())
    reference = prepare(tmp_path / "ref", "gpt2", inputs=[corpus_dir], progress=False)
    for name, inputs, field in (("jsonl", [tmp_path / "docs.jsonl"], "text"), ("jsonlgz", [tmp_path / "docs.jsonl.gz"], "body"), ("gz", [gz_dir], "text")):
        meta = prepare(tmp_path / name, "gpt2", inputs=inputs, text_field=field, progress=False)
        assert meta["splits"] == reference["splits"], name
        for split in ("train", "val"):
            assert np.array_equal(concat(load_data(tmp_path / name), split), concat(load_data(tmp_path / "ref"), split))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no such file"),
        (lambda d: d.mkdir(), "holds no files"),
        (lambda d: (d.mkdir(), (d / "a.txt").write_text("  \n")), "input is empty"),
        (lambda d: (d.mkdir(), (d / "bad.txt").write_bytes(b"ok \xff\xfe bytes")), "bad.txt: not valid utf-8 at byte 3"),
        (lambda d: (d.mkdir(), (d / "x.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')), r"x.jsonl:2: not valid JSON"),
        (lambda d: (d.mkdir(), (d / "x.jsonl").write_text('{"text": "fine"}\n["no", "object"]\n')), r"x.jsonl:2: expected a JSON object with a string 'text' field"),
    ],
)
def test_bad_inputs_fail_with_the_file_named_and_nothing_written(tmp_path, setup, message):
    src = tmp_path / "in"
    setup(src)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare(out, "gpt2", inputs=[src], progress=False)
    assert not out.exists()


def test_an_unwritable_output_is_named(tmp_path, corpus_dir):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"cannot write to .*file/out \(Not a directory\)"):
        prepare(tmp_path / "file" / "out", "gpt2", inputs=[corpus_dir], progress=False)


def test_a_bad_file_after_shards_were_written_removes_them(tmp_path, corpus_dir):
    src = tmp_path / "in"
    src.mkdir()
    for p in corpus_dir.iterdir():
        (src / p.name).write_text(p.read_text())
    (src / "zzz.txt").write_bytes("fine text\n".encode() * 10 + b"\xc3(")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="zzz.txt: not valid utf-8 at byte 100"):
        prepare(out, "gpt2", inputs=[src], shard_tokens=500, progress=False)
    assert not out.exists()


def test_unreadable_file_is_named(tmp_path, corpus_dir, monkeypatch):
    secret = sorted(corpus_dir.iterdir())[3]
    real_open = datamod._open

    def fake_open(path):
        if path == secret:
            raise PermissionError(13, "Permission denied")
        return real_open(path)

    monkeypatch.setattr(datamod, "_open", fake_open)
    with pytest.raises(DataError, match=f"{secret}: cannot read \\(Permission denied\\)"):
        prepare(tmp_path / "out", "gpt2", inputs=[corpus_dir], progress=False)
    assert not (tmp_path / "out").exists()


class Interrupt:
    """Raises `error` at the n-th call of a _ShardWriter method, standing in for a kill or a full disk at that moment."""

    def __init__(self, monkeypatch, method: str, n: int, error: BaseException):
        self.calls, self.n, self.error = 0, n, error
        real = getattr(datamod._ShardWriter, method)

        def wrapper(writer, *args):
            self.calls += 1
            if self.calls == self.n:
                raise self.error
            return real(writer, *args)

        monkeypatch.setattr(datamod._ShardWriter, method, wrapper)


@pytest.fixture(scope="module")
def sharded_reference(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("reference")
    prepare(out, "train:400", inputs=[corpus_dir], shard_tokens=2000, progress=False)
    return out


@pytest.mark.parametrize("method, n", [("_write", 1), ("_write", 9), ("_publish", 3), ("_publish", 12), ("_write", 25)])
def test_an_interrupted_prepare_resumes_to_identical_files(tmp_path, corpus_dir, sharded_reference, monkeypatch, method, n):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        Interrupt(m, method, n, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            prepare(out, "train:400", inputs=[corpus_dir], shard_tokens=2000, progress=False)
    assert (out / STATE_FILE).is_file() and not (out / "meta.json").exists()
    assert not list(out.glob(".*.tmp-*"))  # the shard in progress was dropped
    with pytest.raises(DataError, match="unfinished prepare: run the same `gptlab prepare` again to resume"):
        load_data(out)
    (out / ".train_000004.bin.tmp-killed").write_bytes(b"half")  # what a SIGKILL mid-write leaves
    prepare(out, "train:400", inputs=[corpus_dir], shard_tokens=2000, progress=False)
    assert files_of(out) == files_of(sharded_reference)


def test_a_full_disk_keeps_finished_shards_and_resumes(tmp_path, corpus_dir, sharded_reference, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        Interrupt(m, "_write", 14, OSError(28, "No space left on device"))
        with pytest.raises(DataError, match=r"cannot write to .* \(No space left on device\); \d+ finished shard\(s\) kept: run the same command again"):
            prepare(out, "train:400", inputs=[corpus_dir], shard_tokens=2000, progress=False)
    prepare(out, "train:400", inputs=[corpus_dir], shard_tokens=2000, progress=False)
    assert files_of(out) == files_of(sharded_reference)


def test_other_settings_start_over_and_remove_stale_shards(tmp_path, corpus_dir, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        Interrupt(m, "_publish", 4, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            prepare(out, "gpt2", inputs=[corpus_dir], shard_tokens=1000, progress=False)
    with pytest.warns(UserWarning, match="unfinished prepare of other inputs or settings; starting over"):
        meta = prepare(out, "gpt2", inputs=[corpus_dir], shard_tokens=50_000, progress=False)
    names = {s["file"] for split in meta["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.glob("*.bin")} == names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(out, "gpt2", inputs=[corpus_dir], shard_tokens=50_000, progress=False)  # a finished directory is simply redone


def test_load_data_detects_missing_and_truncated_shards(tmp_path, data_dir):
    with pytest.raises(DataError, match="not a prepared data directory"):
        load_data(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in data_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "val_000000.bin").write_bytes((copy / "val_000000.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="val_000000.bin: missing or truncated"):
        load_data(copy)


def test_load_data_reads_the_single_file_format(tmp_path, data_dir):
    """Directories prepared before sharding hold train.bin / val.bin and a version 1 meta.json."""
    meta = json.loads((data_dir / "meta.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    for split in ("train", "val"):
        (old / f"{split}.bin").write_bytes(b"".join((data_dir / s["file"]).read_bytes() for s in meta["splits"][split]["shards"]))
        del meta["splits"][split]["shards"]
    meta["version"] = 1
    (old / "meta.json").write_text(json.dumps(meta))
    (old / "tokenizer.json").write_bytes((data_dir / "tokenizer.json").read_bytes())
    a, b = load_data(old), load_data(data_dir)
    assert all(np.array_equal(concat(a, s), concat(b, s)) for s in ("train", "val"))


def test_block_size_larger_than_data_names_the_field(data_dir):
    data = load_data(data_dir)
    with pytest.raises(ConfigError, match=r"block_size \(100000\)"):
        check_block_size(data, 100_000)


def fake_shards(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60000, n).astype(np.uint16) for n in sizes]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permute_is_a_keyed_bijection(n):
    keys = [11, 22, 33, 44]
    p = permute(np.arange(n), n, keys)
    assert sorted(p.tolist()) == list(range(n))
    assert np.array_equal(permute(np.arange(n)[::-1], n, keys), p[::-1])  # any index, in any order
    if n >= 64:
        assert not np.array_equal(permute(np.arange(n), n, [1, 2, 3, 4]), p)
        assert abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.3  # no trace of the input order
        assert (np.diff(p) > 0).mean() < 0.7


def test_loader_covers_every_window_once_per_epoch_in_a_seeded_order():
    shards = fake_shards([100, 5, 57, 300])  # the 5-token shard holds no window of 9
    T = 8
    loader = ShardLoader(shards, block_size=T, batch_size=3, seed=7)
    n = sum((len(s) - 1) // T for s in shards)
    assert n == 12 + 0 + 7 + 37
    seen = []
    for _ in range(n // 3 + 1):  # one epoch and a batch into the next
        x, y = loader.next_batch()
        assert x.shape == y.shape == (3, T) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        seen += [tuple(r) for r in torch.cat([x, y[:, -1:]], 1).tolist()]
    windows = {tuple(s[k * T : k * T + T + 1].astype(np.int64).tolist()) for s in shards for k in range((len(s) - 1) // T)}
    assert set(seen[:n]) == windows and len(set(seen[:n])) == n
    assert loader.state()["epoch"] == 1
    other = ShardLoader(shards, block_size=T, batch_size=3, seed=8)
    assert [tuple(r) for r in other.next_batch()[0].tolist()] != [s[:T] for s in seen[:3]]


def test_loader_cursor_resumes_exactly_with_any_number_of_processes():
    shards = fake_shards([400, 250, 333])
    whole = ShardLoader(shards, block_size=16, batch_size=4, seed=3)
    for _ in range(5):
        whole.next_batch()
    cursor = whole.state()
    rest = [whole.next_batch() for _ in range(40)]  # runs into later epochs
    # a fresh single process from the cursor
    single = ShardLoader(shards, block_size=16, batch_size=4, seed=3)
    single.load_state(cursor)
    for (xa, ya), (xb, yb) in zip(rest, [single.next_batch() for _ in range(40)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # two processes from the same cursor: their slices stacked are the single-process batch
    ranks = [ShardLoader(shards, block_size=16, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state(json.loads(json.dumps(cursor)))  # the cursor survives a round trip through plain JSON
    for x, y in rest:
        (x0, y0), (x1, y1) = (r.next_batch() for r in ranks)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0].state() == ranks[1].state() == single.state()


def test_loader_rejects_bad_settings_and_positions():
    shards = fake_shards([50])
    with pytest.raises(ConfigError, match="no window of 65 tokens"):
        ShardLoader(shards, block_size=64, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match=r"batch_size \(3\) must be divisible"):
        ShardLoader(shards, block_size=8, batch_size=3, seed=0, rank=0, world_size=2)
    loader = ShardLoader(shards, block_size=8, batch_size=2, seed=0)
    with pytest.raises(DataError, match="does not fit the 6 windows"):
        loader.load_state({"epoch": 0, "window": 6})
    with pytest.raises(DataError, match="malformed data-loader position"):
        loader.load_state({"epoch": 0})


def test_sequential_batches_score_every_target_once_across_shards():
    tokens = np.arange(1, 24, dtype=np.uint16)  # 23 tokens -> 22 targets
    for shards in ([tokens], [tokens[:4], tokens[4:5], tokens[5:17], tokens[17:]]):
        seen = []
        for x, y in sequential_batches(shards, block_size=5, batch_size=2):
            assert x.shape == y.shape and x.shape[1] == 5
            valid = y != -100
            assert torch.equal(y[valid], (x + 1)[valid])
            seen += y[valid].tolist()
        assert seen == list(range(2, 24))
