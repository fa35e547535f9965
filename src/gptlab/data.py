"""Text to token shards, and batches from them.

`prepare` streams documents from files (or a built-in corpus) through tokenizer worker
processes into numbered shards, `train_000000.bin`, `val_000000.bin`, ... (flat token
ids, uint16 when the vocabulary fits, else uint32; every document ends with
`<|endoftext|>`), then writes `meta.json` and a copy of the tokenizer, so a data
directory is self-describing. Memory stays bounded whatever the corpus size, and an
interrupted prepare resumes where it stopped.

`ShardLoader` streams training windows across the shards (memory-mapped) in an order
fixed by the seed; its cursor is two integers, saved in every checkpoint.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import json
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from gptlab.errors import ConfigError, DataError, GptlabError
from gptlab.fileio import set_default_mode, write_atomic
from gptlab.tokenizer import AnyTokenizer, Tokenizer, WrappedTokenizer, encode_sized, line_break_cut, load_tokenizer, read_tokenizer, start_encode_worker

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = ".prepare-state.json"  # present only while a prepare is unfinished
SPLITS = ("train", "val")
SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
PIECE_CHARS = 1 << 18  # the largest pieces documents are cut into for splitting and tokenizing (see split_unit_chars)
JOB_CHARS = 1 << 22  # text per tokenizer job: large enough that sending it to a worker costs little
READ_BYTES = 1 << 20
TOKENIZER_SAMPLE_CHARS = 1 << 30  # `train:N` learns its merges from at most this much training text


# ----------------------------------------------------------------------------- reading text


@dataclass(frozen=True)
class Piece:
    """A document, or a part of a long one, as it streams out of the input."""

    index: int  # position in the input stream; the train/val split and a resume are keyed by it
    text: str
    raw_bytes: int  # input bytes it came from (progress: compressed bytes for .gz)
    doc_end: bool  # the last piece of its document
    doc: int  # which document (counted from 0 in the input stream) it belongs to


def _open(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(stream to read, underlying file): .gz files are decompressed; the raw position measures progress."""
    raw = open(path, "rb")  # the caller closes both
    return (gzip.GzipFile(fileobj=raw, mode="rb"), raw) if path.suffix == ".gz" else (raw, raw)


def _decoded_blocks(path: Path, encoding: str) -> Iterator[tuple[str, int, bool]]:
    """(text, raw bytes consumed, last) blocks of a file, decoded incrementally with a byte-exact error position."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise ConfigError(f"unknown text encoding {encoding!r}") from None
    try:
        stream, raw = _open(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    with raw, stream:
        decoded = 0  # bytes of the (decompressed) stream passed to the decoder
        raw_seen = 0
        while True:
            try:
                block = stream.read(READ_BYTES)
            except (OSError, EOFError) as err:  # gzip reports a damaged stream as either
                raise DataError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                at = decoded - pending + err.start
                raise DataError(f"{path}: not valid {encoding} at byte {at} (pass --encoding to read another encoding)") from None
            decoded += len(block)
            position = raw.tell()
            yield text, position - raw_seen, not block
            raw_seen = position
            if not block:
                return


def _cut(text: str, size: Callable[[], int], final: bool) -> Iterator[tuple[str, bool]]:
    """(piece, last) for the pieces of `text` (see tokenizer.line_break_cut), each `size()` chars
    or a little more, `size` asked afresh for every piece. When not `final`, the text continues
    beyond what is given: the rest after the last cut is yielded with last=None for the caller
    to prepend to what follows."""
    start = 0
    while (cut := line_break_cut(text, start, size())) is not None:
        yield text[start:cut], False
        start = cut
    yield text[start:], (True if final else None)  # type: ignore[misc]


def _text_file_docs(path: Path, encoding: str, size: Callable[[], int]) -> Iterator[tuple[str, int, bool]]:
    """One document per file, in pieces cut where token ids cannot change; whitespace-only files give none."""
    rest, raw, emitted = "", 0, False
    for text, raw_bytes, last in _decoded_blocks(path, encoding):
        raw += raw_bytes
        for piece, end in _cut(rest + text, size, last):
            if end is None:  # the text goes on in the next block
                rest = piece
            elif end is False or emitted or piece.strip():
                yield piece, raw, end
                raw, emitted = 0, True


def _jsonl_docs(path: Path, encoding: str, size: Callable[[], int], text_field: str) -> Iterator[tuple[str, int, bool]]:
    """One document per line: the string in `text_field` of each JSON object (blank lines skipped)."""
    buffer, raw, line_no = "", 0, 0
    for text, raw_bytes, last in _decoded_blocks(path, encoding):
        buffer += text
        raw += raw_bytes
        *lines, buffer = [*buffer.split("\n"), ""] if last else buffer.split("\n")
        for line in lines:
            line_no += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
            doc = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(doc, str):
                raise DataError(f"{path}:{line_no}: expected a JSON object with a string {text_field!r} field (set it with --text-field)")
            if doc.strip():
                for piece, end in _cut(doc, size, final=True):
                    yield piece, raw, end
                    raw = 0


def read_text_file(path: str | Path, encoding: str = "utf-8") -> str:
    """A whole text file (.gz read too); invalid text is an error naming the file and byte."""
    return "".join(text for text, _, _ in _decoded_blocks(Path(path), encoding))


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{path}: directory holds no files")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


@dataclass(frozen=True)
class Source:
    """Where documents come from: files (text: one document each; .jsonl: one per line; .gz either) or a built-in corpus."""

    files: tuple[Path, ...] = ()
    corpus: str | None = None
    encoding: str = "utf-8"
    text_field: str = "text"

    @classmethod
    def of(cls, inputs: Sequence[str | Path] | None, corpus: str | None, encoding: str = "utf-8", text_field: str = "text") -> Source:
        if (inputs is None) == (corpus is None):
            raise DataError("give either input paths or a corpus name (not both)")
        if corpus is not None:
            if corpus != "pydoc":
                raise DataError(f"unknown corpus {corpus!r}; available: pydoc")
            return cls(corpus=corpus)
        if not inputs:
            raise DataError("no input paths given")
        return cls(files=tuple(_expand(inputs)), encoding=encoding, text_field=text_field)

    def total_bytes(self) -> int | None:
        """Input size for the progress bar (on disk, so compressed for .gz); None for a built-in corpus."""
        return sum(f.stat().st_size for f in self.files) if self.corpus is None else None

    def fingerprint(self) -> dict:
        """What identifies this input, so a resumed prepare can tell whether it is still the same."""
        if self.corpus is not None:
            return {"corpus": self.corpus, "python": sys.version}
        files = [[str(f.resolve()), st.st_size, st.st_mtime_ns] for f, st in ((f, f.stat()) for f in self.files)]
        return {"files": files, "encoding": self.encoding, "text_field": self.text_field}

    def documents(self, unit: Callable[[int], int] = lambda chars: PIECE_CHARS) -> Iterator[tuple[str, int, bool]]:
        """(text, raw bytes, document ends) for every piece of every non-blank document, in a fixed order.

        Documents longer than a piece are cut into pieces of unit(chars in the pieces before) chars
        or a little more, so the cuts depend only on the text, never on its file format or on how
        it was read."""
        chars = 0
        size = lambda: unit(chars)  # noqa: E731  (reads `chars` as it grows)
        for text, raw, end in self._documents(size):
            chars += len(text)
            yield text, raw, end

    def _documents(self, size: Callable[[], int]) -> Iterator[tuple[str, int, bool]]:
        if self.corpus is not None:
            from gptlab.corpus import iter_pydoc_documents

            for doc in iter_pydoc_documents():
                for piece, end in _cut(doc, size, final=True):
                    yield piece, len(piece.encode("utf-8", "surrogatepass")), end
            return
        for path in self.files:
            if _is_jsonl(path):
                yield from _jsonl_docs(path, self.encoding, size, self.text_field)
            else:
                yield from _text_file_docs(path, self.encoding, size)

    def pieces(self, unit: Callable[[int], int] = lambda chars: PIECE_CHARS) -> Iterator[Piece]:
        doc = 0
        for index, (text, raw, end) in enumerate(self.documents(unit)):
            yield Piece(index, text, raw, end, doc)
            doc += int(end)


# ----------------------------------------------------------------------------- splitting


def _unit_hash(seed: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, index): which split a piece goes to never depends on reading order."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def cut_for_validation(text: str, val_fraction: float) -> tuple[str, str]:
    """Split one text at the line break nearest to leaving val_fraction of it for validation."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise DataError("input is too small to split into train and validation text")
    return train, val


@dataclass(frozen=True)
class Planned:
    """A piece with its split and whether <|endoftext|> follows it there."""

    piece: Piece
    split: str
    eot: bool


def _mark_last(items: Iterable[Piece]) -> Iterator[tuple[Piece, bool]]:
    held: Piece | None = None
    for item in items:
        if held is not None:
            yield held, False
        held = item
    if held is not None:
        yield held, True


def check_val_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def split_unit_chars(chars_before: int, val_fraction: float) -> int:
    """The size of the next piece the split assigns, given the chars of the pieces before it.

    Pieces stay at most 1/32 of the smaller split's share of the text so far (and at least
    256 chars, at most PIECE_CHARS), so that split gets dozens of them and its share lands
    within a few percent of the one asked for, at any corpus size, without knowing the size
    in advance. With val_fraction 0 nothing needs balancing: pieces are as long as allowed.
    """
    smaller = min(val_fraction, 1.0 - val_fraction)
    if smaller == 0:
        return PIECE_CHARS
    return max(256, min(PIECE_CHARS, int(smaller * chars_before / 32)))


def plan_splits(pieces: Iterable[Piece], val_fraction: float, seed: int) -> Iterator[Planned]:
    """Assign every piece to train or val, streaming, and say where <|endoftext|> goes.

    The validation split tracks its target share of the characters seen so far: a piece of
    n chars goes to val when val_chars + n * u < val_fraction * chars_so_far (this piece
    included), u a uniform number fixed by a hash of (seed, its index). Val then never
    differs from its share by more than one piece, whatever the corpus size, and the seed
    decides which pieces it gets. If a split would stay empty at the last piece, that piece
    is cut at a line break between the two; val_fraction 0 puts everything in train.
    <|endoftext|> follows a piece that ends its document, or whose document goes on in the
    other split.
    """
    check_val_fraction(val_fraction)

    def assigned() -> Iterator[tuple[Piece, str]]:
        used: set[str] = set()
        chars = val_chars = 0
        for piece, last in _mark_last(pieces):
            n = len(piece.text)
            target = val_fraction * (chars + n)
            split = "val" if val_chars + n * _unit_hash(seed, piece.index) < target else "train"
            if last and val_fraction > 0 and len(used | {split}) < 2:  # a split would stay empty: share this piece
                tail = min(max((target - val_chars) / max(n, 1), 1e-9), 1.0 - 1e-9)
                if used and piece.text.rfind("\n", 0, int(n * (1.0 - tail))) <= 0:  # no line break to cut at: it goes whole
                    yield piece, ({"train", "val"} - used).pop()
                    return
                head, tail_text = cut_for_validation(piece.text, tail)
                yield replace(piece, text=head, doc_end=True), "train"
                yield Piece(piece.index + 1, tail_text, 0, True, piece.doc), "val"  # index + 1: no later piece exists to share it
                return
            used.add(split)
            chars += n
            val_chars += n if split == "val" else 0
            yield piece, split
        if not used:
            raise DataError("input is empty: it holds no text")

    held: tuple[Piece, str] | None = None
    for piece, split in assigned():
        if held is not None:
            yield Planned(held[0], held[1], eot=held[0].doc_end or split != held[1])
        held = (piece, split)
    if held is not None:
        yield Planned(held[0], held[1], eot=True)


# ----------------------------------------------------------------------------- tokenizing in workers


class _Encoder:
    """Tokenizes jobs in order, in `workers` processes (in this process when workers is 1).

    At most 2 x workers jobs are in flight, so reading never runs far ahead of writing
    and memory stays bounded whatever the corpus size.
    """

    def __init__(self, tok: AnyTokenizer, dtype: np.dtype, workers: int):
        self.tok, self.dtype, self.workers = tok, dtype.name, workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            import multiprocessing

            # spawn, not fork: the parent may hold threads (tokenizers, torch) that a fork would copy mid-lock.
            # The workers import gptlab.tokenizer only, not torch.
            self.pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_encode_worker, initargs=(tok.to_dict(),)
            )

    def map(self, jobs: Iterable[list[Planned]]) -> Iterator[tuple[list[Planned], list[tuple[np.ndarray, int]]]]:
        if self.pool is None:
            for job in jobs:
                yield job, encode_sized([p.piece.text for p in job], self.dtype, self.tok)
            return
        inflight: deque[tuple[list[Planned], Future]] = deque()
        for job in jobs:
            inflight.append((job, self.pool.submit(encode_sized, [p.piece.text for p in job], self.dtype)))
            if len(inflight) >= 2 * self.workers:
                done, future = inflight.popleft()
                yield done, future.result()
        while inflight:
            done, future = inflight.popleft()
            yield done, future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _jobs(planned: Iterable[Planned], job_chars: int) -> Iterator[list[Planned]]:
    job: list[Planned] = []
    chars = 0
    for p in planned:
        job.append(p)
        chars += len(p.piece.text)
        if chars >= job_chars:
            yield job
            job, chars = [], 0
    if job:
        yield job


# ----------------------------------------------------------------------------- writing shards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, number: int) -> str:
    return f"{split}_{number:06d}.bin"


@dataclass
class SplitProgress:
    """What a split has published, and where its stream resumes: the first token of piece
    `next_piece` past `skip_tokens` (its <|endoftext|> counted) not yet in a published shard.
    bytes and documents count the pieces before `next_piece`; last_doc is the document of the
    last of them (a document cut across the splits counts once in each)."""

    shards: list[dict] = field(default_factory=list)
    next_piece: int = 0
    skip_tokens: int = 0
    bytes: int = 0
    documents: int = 0
    last_doc: int = -1

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


class _ShardWriter:
    """Appends one split's tokens to fixed-size shards, each written under a temporary name and renamed when full."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, progress: SplitProgress, on_publish: Callable[[], None]):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.published = progress  # what is on disk; saved by on_publish
        self.on_publish = on_publish
        # running counts, in-progress shard included
        self.bytes, self.documents, self.last_doc = progress.bytes, progress.documents, progress.last_doc
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._filled = 0

    def add(self, planned: Planned, ids: np.ndarray, n_bytes: int, eot_id: int) -> None:
        piece = planned.piece
        tokens = np.append(ids, np.array([eot_id], self.dtype)) if planned.eot else ids
        offset = self.published.skip_tokens if piece.index == self.published.next_piece else 0
        before = (self.bytes, self.documents, self.last_doc)
        self.bytes += n_bytes
        self.documents += int(piece.doc != self.last_doc)
        self.last_doc = piece.doc
        pos = offset
        while pos < len(tokens):
            take = min(len(tokens) - pos, self.shard_tokens - self._filled)
            self._write(tokens[pos : pos + take])
            pos += take
            if self._filled == self.shard_tokens:
                if pos == len(tokens):  # the piece is all published
                    self._publish(piece.index + 1, 0, self.bytes, self.documents, self.last_doc)
                else:
                    self._publish(piece.index, pos, *before)

    @property
    def tokens_written(self) -> int:
        """Tokens in published shards plus the shard in progress."""
        return self.published.tokens + self._filled

    def finish(self, next_piece: int) -> None:
        if self._filled:
            self._publish(next_piece, 0, self.bytes, self.documents, self.last_doc)

    def discard(self) -> None:
        """Drop the shard in progress (interrupted): a resume rewrites it from the saved position."""
        if self._file is not None:
            self._file.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._file = self._tmp = None

    def _write(self, tokens: np.ndarray) -> None:
        if self._file is None:
            name = shard_name(self.split, len(self.published.shards))
            fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.tmp-")
            self._file, self._tmp = os.fdopen(fd, "wb"), Path(tmp)
        tokens.tofile(self._file)
        self._filled += len(tokens)

    def _publish(self, next_piece: int, skip_tokens: int, n_bytes: int, documents: int, last_doc: int) -> None:
        assert self._file is not None and self._tmp is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.split, len(self.published.shards))
        set_default_mode(self._tmp)
        os.replace(self._tmp, self.out / name)
        self._file = self._tmp = None
        p = self.published
        p.shards.append({"file": name, "tokens": self._filled})
        p.next_piece, p.skip_tokens, p.bytes, p.documents, p.last_doc = next_piece, skip_tokens, n_bytes, documents, last_doc
        self._filled = 0
        self.on_publish()


# ----------------------------------------------------------------------------- prepare


def _tokenizer_key(tokenizer: str | AnyTokenizer) -> str:
    if isinstance(tokenizer, (Tokenizer, WrappedTokenizer)):
        return "sha256:" + hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()
    return str(tokenizer)


def _train_texts(source: Source, val_fraction: float, seed: int, unit: Callable[[int], int]) -> Iterator[str]:
    """The training split's text, streamed, up to TOKENIZER_SAMPLE_CHARS: what `train:N` learns from."""
    chars = 0
    for p in plan_splits(source.pieces(unit), val_fraction, seed):
        if p.split == "train":
            yield p.piece.text
            chars += len(p.piece.text)
            if chars >= TOKENIZER_SAMPLE_CHARS:
                return


def _resolve_tokenizer(
    tokenizer: str | AnyTokenizer, source: Source, val_fraction: float, seed: int, unit: Callable[[int], int], progress: bool
) -> AnyTokenizer:
    if isinstance(tokenizer, (Tokenizer, WrappedTokenizer)):
        return tokenizer
    if tokenizer.startswith("train:"):
        size = tokenizer.split(":", 1)[1]
        if not size.isdigit():
            raise ConfigError(f"tokenizer spec {tokenizer!r}: expected train:N with N an integer vocabulary size")
        return Tokenizer.train(_train_texts(source, val_fraction, seed, unit), vocab_size=int(size), progress=progress)
    return load_tokenizer(tokenizer)


def _read_state(out: Path) -> dict | None:
    try:
        state = json.loads((out / STATE_FILE).read_text())
        return state if isinstance(state, dict) and "settings" in state and "splits" in state else None
    except (OSError, json.JSONDecodeError):  # none, or torn by a crash mid-write: start over
        return None


def _default_workers(source: Source) -> int:
    """All cores, but one process for inputs too small to give each worker a job."""
    size = source.total_bytes()
    if size is None or size < 4 * JOB_CHARS:
        return 1
    return max(1, min(os.cpu_count() or 1, size // JOB_CHARS))


def prepare(
    out_dir: str | Path,
    tokenizer: str | AnyTokenizer,
    inputs: Sequence[str | Path] | None = None,
    corpus: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 1337,
    encoding: str = "utf-8",
    text_field: str = "text",
    workers: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
) -> dict:
    """Tokenize documents into `out_dir/{train,val}_NNNNNN.bin` shards, `meta.json` and `tokenizer.json`.

    `tokenizer` is a Tokenizer, "gpt2", a tokenizer file, or "train:N" to train an
    N-token BPE on the training split. Inputs stream through `workers` tokenizer processes
    (default: all cores for large inputs), so memory stays bounded. Each full shard is
    renamed into place and the position saved; running the same call again after an
    interruption (Ctrl-C, a kill, a full disk) resumes from there and produces the same
    files. meta.json is written last: its presence means the directory is complete. Bad
    input (an unreadable file, invalid text) removes what this call wrote.
    """
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    check_val_fraction(val_fraction)
    source = Source.of(inputs, corpus, encoding, text_field)
    unit = functools.partial(split_unit_chars, val_fraction=val_fraction)
    out = Path(out_dir)
    settings = {
        "source": source.fingerprint(), "tokenizer": _tokenizer_key(tokenizer), "val_fraction": val_fraction, "seed": seed,
        "shard_tokens": shard_tokens, "piece_chars": PIECE_CHARS, "split_rule": 2,
    }  # fmt: skip
    state = _read_state(out)
    resuming = state is not None and state["settings"] == settings and (out / TOKENIZER_FILE).is_file()
    if state is not None and not resuming:
        import warnings

        warnings.warn(f"{out} holds an unfinished prepare of other inputs or settings; starting over", stacklevel=2)
    created = not out.exists()
    try:
        tok = read_tokenizer(out / TOKENIZER_FILE) if resuming else _resolve_tokenizer(tokenizer, source, val_fraction, seed, unit, progress)
        eot = tok.eot_id  # before writing: a tokenizer without <|endoftext|> cannot separate documents
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp-*"):  # half-written files a killed prepare left behind
            stale.unlink(missing_ok=True)
        if resuming:
            assert state is not None
            splits = {s: SplitProgress(**state["splits"][s]) for s in SPLITS}
        else:
            (out / META_FILE).unlink(missing_ok=True)  # incomplete from here until meta.json is written again
            write_atomic(out / TOKENIZER_FILE, json.dumps(tok.to_dict()).encode())
            splits = {s: SplitProgress() for s in SPLITS}
    except (GptlabError, OSError) as err:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(err, OSError):
            raise DataError(f"cannot write to {out} ({err.strerror or err})") from None
        raise

    def save_state() -> None:
        write_atomic(out / STATE_FILE, json.dumps({"settings": settings, "splits": {s: vars(p) for s, p in splits.items()}}).encode())

    if not resuming:
        save_state()
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens, splits[s], save_state) for s in SPLITS}
    try:
        _stream_into(writers, source, tok, eot, val_fraction, seed, unit, workers or _default_workers(source), progress)
    except GptlabError:  # bad input: resuming would meet it again, so nothing of this prepare is kept
        for w in writers.values():
            w.discard()
        for s in SPLITS:
            for shard in splits[s].shards:
                (out / shard["file"]).unlink(missing_ok=True)
        for name in (STATE_FILE, TOKENIZER_FILE):
            (out / name).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    except OSError as err:  # disk full and the like: what was published stays, for a resume
        for w in writers.values():
            w.discard()
        kept = sum(len(p.shards) for p in splits.values())
        raise DataError(f"cannot write to {out} ({err.strerror or err}); {kept} finished shard(s) kept: run the same command again to resume") from None
    except BaseException:  # interrupted: the published shards and the saved position stay
        for w in writers.values():
            w.discard()
        raise

    meta = {
        "format": "gptlab-shards",
        "version": 2,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_name": tok.name,
        "vocab_size": tok.vocab_size,
        "eot_id": eot,
        "dtype": dtype.name,
        "splits": {
            s: {"tokens": splits[s].tokens, "bytes": writers[s].bytes, "documents": writers[s].documents, "shards": splits[s].shards} for s in SPLITS
        },
        "source": {"corpus": corpus} if corpus is not None else {"inputs": [str(p) for p in inputs or ()]},
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
    }
    write_atomic(out / META_FILE, json.dumps(meta, indent=2).encode())
    (out / STATE_FILE).unlink(missing_ok=True)
    keep = {shard["file"] for s in SPLITS for shard in splits[s].shards}
    for old in [*out.glob("train*.bin"), *out.glob("val*.bin")]:  # shards of an earlier, larger prepare
        if old.name not in keep:
            old.unlink()
    return meta


def _stream_into(
    writers: dict[str, _ShardWriter], source: Source, tok: AnyTokenizer, eot: int, val_fraction: float, seed: int,
    unit: Callable[[int], int], workers: int, progress: bool,
) -> None:
    from tqdm.auto import tqdm

    n_pieces = 0
    bar = tqdm(total=source.total_bytes(), unit="B", unit_scale=True, desc="prepare", disable=not progress, dynamic_ncols=True)

    def todo() -> Iterator[Planned]:
        nonlocal n_pieces
        for p in plan_splits(source.pieces(unit), val_fraction, seed):
            n_pieces = p.piece.index + 1
            if p.piece.index < writers[p.split].published.next_piece:  # in a shard published before an interruption
                bar.update(p.piece.raw_bytes)
                continue
            yield p

    encoder = _Encoder(tok, token_dtype(tok.vocab_size), workers)
    try:
        for job, results in encoder.map(_jobs(todo(), JOB_CHARS)):
            for p, (ids, n_bytes) in zip(job, results):
                writers[p.split].add(p, ids, n_bytes, eot)
                bar.update(p.piece.raw_bytes)
            bar.set_postfix(tokens=f"{sum(w.tokens_written for w in writers.values()):,}", refresh=False)
        for w in writers.values():
            w.finish(n_pieces)
    finally:
        encoder.close()
        bar.close()


# ----------------------------------------------------------------------------- reading shards


@dataclass(frozen=True)
class TokenData:
    """A prepared data directory: each split's memory-mapped shards, their byte counts, and the tokenizer."""

    path: Path
    meta: dict
    arrays: dict[str, list[np.ndarray]]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def shards(self, split: str) -> list[np.ndarray]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.arrays[split]

    def tokens(self, split: str) -> int:
        return sum(len(a) for a in self.shards(split))

    def bytes_per_token(self, split: str) -> float:
        info = self.meta["splits"][split]
        return info["bytes"] / info["tokens"]

    def tokenizer(self) -> AnyTokenizer:
        return read_tokenizer(self.path / self.meta["tokenizer"])


def load_data(data_dir: str | Path) -> TokenData:
    path = Path(data_dir)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        hint = "an unfinished prepare: run the same `gptlab prepare` again to resume" if (path / STATE_FILE).is_file() else "run `gptlab prepare` first"
        raise DataError(f"{path}: not a prepared data directory (no {META_FILE}; {hint})")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        arrays: dict[str, list[np.ndarray]] = {}
        for split in SPLITS:
            info = meta["splits"][split]
            # version 1 wrote one file per split
            shards = info["shards"] if meta.get("version", 1) >= 2 else [{"file": f"{split}.bin", "tokens": info["tokens"]}]
            arrays[split] = []
            for shard in shards:
                file, n = path / shard["file"], int(shard["tokens"])
                if not file.is_file() or file.stat().st_size != n * dtype.itemsize:
                    raise DataError(f"{file}: missing or truncated (expected {n} tokens of {dtype.name})")
                arrays[split].append(np.memmap(file, dtype=dtype, mode="r", shape=(n,)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{meta_path}: malformed ({err.__class__.__name__}: {err})") from None
    return TokenData(path=path, meta=meta, arrays=arrays)


def check_block_size(data: TokenData, block_size: int) -> None:
    """The train split, and the val split unless it is empty (prepared with val_fraction 0), must each
    hold at least one full (input, target) window of block_size + 1 tokens in one shard."""
    for split in SPLITS:
        n = max((len(a) for a in data.shards(split)), default=0)
        if split == "val" and n == 0:
            continue
        if n < block_size + 1:
            raise ConfigError(
                f"block_size ({block_size}) is larger than the {split} split allows ({n} tokens in its largest shard in {data.path}); "
                f"use a block_size below {n} or more data"
            )


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele et al. 2014): a bijective scramble of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, keys: Sequence[int]) -> np.ndarray:
    """A keyed pseudo-random permutation of range(n), evaluated at `index` without building it.

    A balanced Feistel network (Luby & Rackoff 1988) on 2h-bit numbers, one round per
    key, is a bijection of [0, 4^h) whatever its round function; "cycle walking"
    (Black & Rogaway 2002) re-applies it to values >= n until they land below n, which
    keeps it a bijection of [0, n). With 4^h < 4n a value needs under 4 passes on average.
    So the loader can shuffle billions of windows in constant memory.
    """
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    y = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(y.shape, dtype=bool)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the mixer intends
        while todo.any():
            v = y[todo]
            left, right = v >> np.uint64(half), v & mask
            for key in keys:
                left, right = right, left ^ (_mix(right ^ np.uint64(key)) & mask)
            y[todo] = (left << np.uint64(half)) | right
            todo = y >= np.uint64(n)
    return y.astype(np.int64)


class ShardLoader:
    """(input, target) windows streamed across shards in an order fixed by the seed.

    Each shard is cut into windows of block_size + 1 tokens starting every block_size
    tokens (neighbours share one token), so an epoch predicts every token of a shard but
    its first exactly once. The windows of all shards are numbered together, and epoch e
    visits them in a pseudo-random permutation keyed by (seed, e) (see `permute`): every
    batch mixes the whole corpus, however it was ordered on disk, and a window is read
    straight from its shard's memory map, so memory use does not grow with the corpus.

    batch_size is the global batch: every process walks the same window sequence and
    reads only its contiguous slice of each batch, so N processes together see exactly
    the batches one process would. The cursor (epoch, windows read this epoch) is the
    loader's whole position: saved in a checkpoint, it continues the same sequence with
    any number of processes.
    """

    ROUNDS = 4

    def __init__(self, shards: Sequence[np.ndarray], block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"the data order needs a non-negative integer seed, got {seed!r}")
        self.shards = list(shards)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.first_window = np.cumsum([0, *(max(0, (len(a) - 1) // block_size) for a in self.shards)])  # per shard, in the joint numbering
        self.n_windows = int(self.first_window[-1])
        if not self.n_windows:
            raise ConfigError(f"block_size ({block_size}) leaves no window of {block_size + 1} tokens in any of {len(self.shards)} shard(s)")
        self.epoch = self.position = 0
        self._keys: tuple[int, list[int]] | None = None  # (epoch, Feistel round keys)

    def _round_keys(self, epoch: int) -> list[int]:
        if self._keys is None or self._keys[0] != epoch:
            self._keys = (epoch, [int(k) for k in np.random.default_rng([self.seed, epoch]).integers(0, 2**63, self.ROUNDS)])
        return self._keys[1]

    def _next_windows(self, count: int) -> list[tuple[int, int]]:
        """(shard, start token) of the next `count` windows, advancing the cursor across epochs."""
        out: list[tuple[int, int]] = []
        while len(out) < count:
            take = min(count - len(out), self.n_windows - self.position)
            ids = permute(np.arange(self.position, self.position + take), self.n_windows, self._round_keys(self.epoch))
            shard = np.searchsorted(self.first_window, ids, side="right") - 1
            out += zip(shard.tolist(), ((ids - self.first_window[shard]) * self.block_size).tolist())
            self.position += take
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self._next_windows(self.batch_size)[self.rows]
        rows = np.stack([self.shards[s][a : a + self.block_size + 1] for s, a in windows]).astype(np.int64)
        batch = torch.from_numpy(rows)  # (B, T+1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "window": self.position}

    def load_state(self, state: dict[str, Any]) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["window"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"malformed data-loader position {state!r}; expected epoch and window") from None
        if not (epoch >= 0 and 0 <= position < self.n_windows):
            raise DataError(f"data-loader position {state!r} does not fit the {self.n_windows} windows of this data; was it prepared again?")
        self.epoch, self.position = epoch, position


def sequential_batches(shards: Sequence[np.ndarray], block_size: int, batch_size: int, max_tokens: int | None = None):
    """Non-overlapping windows covering the shards in order, as one stream: the deterministic pass used by `gptlab eval`.

    Every token after the first is predicted exactly once (up to max_tokens). The
    last window is padded; padded targets are -100, which the loss ignores.
    Yields (x, y), each (B, block_size).
    """
    bounds = np.cumsum([0, *(len(a) for a in shards)])
    total = int(bounds[-1])

    def read(a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the concatenated shards."""
        first = int(np.searchsorted(bounds, a, side="right")) - 1
        parts = []
        while a < b:
            take = min(b, int(bounds[first + 1])) - a
            parts.append(np.asarray(shards[first][a - bounds[first] : a - bounds[first] + take]))
            a += take
            first += 1
        return np.concatenate(parts).astype(np.int64)

    limit = max(total - 1, 0) if max_tokens is None else min(max(total - 1, 0), max_tokens)
    starts = range(0, limit, block_size)
    for i in range(0, len(starts), batch_size):
        x = torch.zeros(len(starts[i : i + batch_size]), block_size, dtype=torch.long)
        y = torch.full_like(x, -100)
        for row, s in enumerate(starts[i : i + batch_size]):
            n = min(block_size, limit - s)
            window = torch.from_numpy(read(s, s + n + 1))
            x[row, :n] = window[:-1]
            y[row, :n] = window[1:]
        yield x, y
