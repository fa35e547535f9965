"""Text to token shards, and batches from them.

`prepare` turns documents into `train.bin` / `val.bin` (flat token ids, uint16
when the vocabulary fits, else uint32, documents separated by `<|endoftext|>`)
plus `meta.json` and a copy of the tokenizer, so a data directory is
self-describing. Training reads the shards through `np.memmap`, so a corpus never
has to fit in memory.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import ConfigError, DataError
from gptlab.fileio import stage_file
from gptlab.tokenizer import AnyTokenizer, Tokenizer, WrappedTokenizer, load_tokenizer, read_tokenizer

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- reading text


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid {encoding} at byte {err.start} (pass --encoding to read another encoding)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


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


def read_documents(paths: Sequence[str | Path], encoding: str = "utf-8") -> list[str]:
    """One document per file; directories are read recursively in sorted order (hidden files skipped)."""
    if not paths:
        raise DataError("no input paths given")
    docs = []
    for path in _expand(paths):
        text = read_text_file(path, encoding)
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"input is empty: {', '.join(str(p) for p in paths)} hold(s) no text")
    return docs


def load_corpus(name: str) -> list[str]:
    """A named built-in corpus; `pydoc` is Python's own documentation from this install."""
    if name == "pydoc":
        from gptlab.corpus import pydoc_corpus

        return pydoc_corpus()
    raise DataError(f"unknown corpus {name!r}; available: pydoc")


# ----------------------------------------------------------------------------- splitting


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle documents with `seed`, then move documents to val until it holds val_fraction of the bytes.

    A single document is cut at the line break nearest to the split point instead,
    so one text file still gives a validation set.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1.0 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > 0 else cut
        train, val = text[:cut], text[cut:]
        if not train.strip() or not val.strip():
            raise DataError("input is too small to split into train and validation text")
        return [train], [val]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sizes = [len(d.encode("utf-8", "surrogatepass")) for d in docs]
    target = val_fraction * sum(sizes)
    val_idx: list[int] = []
    val_bytes = 0
    for i in order[: len(order) - 1]:  # always leave at least one training document
        if val_bytes >= target:
            break
        val_idx.append(i)
        val_bytes += sizes[i]
    chosen = set(val_idx)
    train = [docs[i] for i in order if i not in chosen]
    val = [docs[i] for i in val_idx]
    return train, val


# ----------------------------------------------------------------------------- writing shards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _encode_split(tok: AnyTokenizer, docs: Sequence[str], dtype: np.dtype, eot: int, progress: bool) -> np.ndarray:
    encoded = tok.encode_batch(list(docs), progress=progress)
    total = sum(len(ids) + 1 for ids in encoded)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for ids in encoded:
        out[pos : pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = eot  # documents end with <|endoftext|>, as in GPT-2's training data
        pos += 1
    return out


def prepare(
    out_dir: str | Path,
    tokenizer: str | AnyTokenizer,
    inputs: Sequence[str | Path] | None = None,
    corpus: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 1337,
    encoding: str = "utf-8",
    progress: bool = True,
) -> dict:
    """Tokenize documents into `out_dir/{train,val}.bin` and write `meta.json` and `tokenizer.json`.

    `tokenizer` is a Tokenizer, "gpt2", a tokenizer file, or "train:N" to train an
    N-token BPE on the training split. Files are written under temporary names and
    renamed only when everything succeeded, so a failure leaves nothing half-written.
    """
    if (inputs is None) == (corpus is None):
        raise DataError("give either input paths or a corpus name (not both)")
    docs = read_documents(inputs, encoding) if inputs is not None else load_corpus(corpus)  # type: ignore[arg-type]
    if not docs:
        raise DataError(f"corpus {corpus!r} is empty")
    train_docs, val_docs = split_documents(docs, val_fraction, seed)

    if isinstance(tokenizer, (Tokenizer, WrappedTokenizer)):
        tok = tokenizer
    elif tokenizer.startswith("train:"):
        size = tokenizer.split(":", 1)[1]
        if not size.isdigit():
            raise ConfigError(f"tokenizer spec {tokenizer!r}: expected train:N with N an integer vocabulary size")
        tok = Tokenizer.train(train_docs, vocab_size=int(size), progress=progress)
    else:
        tok = load_tokenizer(tokenizer)

    eot = tok.eot_id  # before encoding: a tokenizer without <|endoftext|> cannot separate documents
    dtype = token_dtype(tok.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    arrays = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        arrays[split] = _encode_split(tok, split_docs, dtype, eot, progress)
        splits[split] = {
            "tokens": int(arrays[split].size),
            "bytes": sum(len(d.encode("utf-8", "surrogatepass")) for d in split_docs),
            "documents": len(split_docs),
        }
    meta = {
        "format": "gptlab-shards",
        "version": 1,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_name": tok.name,
        "vocab_size": tok.vocab_size,
        "eot_id": eot,
        "dtype": dtype.name,
        "splits": splits,
        "source": {"corpus": corpus} if corpus is not None else {"inputs": [str(p) for p in inputs or ()]},
        "val_fraction": val_fraction,
        "seed": seed,
    }
    staged: list[tuple[Path, Path]] = []
    try:
        for split in SPLITS:
            staged.append((stage_file(out, lambda f, a=arrays[split]: a.tofile(f)), out / f"{split}.bin"))
        staged.append((stage_file(out, lambda f: f.write(json.dumps(tok.to_dict()).encode())), out / TOKENIZER_FILE))
        staged.append((stage_file(out, lambda f: f.write(json.dumps(meta, indent=2).encode())), out / META_FILE))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:  # meta.json goes last: its presence means the directory is complete
        os.replace(tmp, final)
    return meta


# ----------------------------------------------------------------------------- reading shards


@dataclass(frozen=True)
class TokenData:
    """A prepared data directory: memory-mapped splits, their byte counts, and the tokenizer."""

    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return self.train if name == "train" else self.val

    def bytes_per_token(self, split: str) -> float:
        info = self.meta["splits"][split]
        return info["bytes"] / info["tokens"]

    def tokenizer(self) -> AnyTokenizer:
        return read_tokenizer(self.path / self.meta["tokenizer"])


def load_data(data_dir: str | Path) -> TokenData:
    path = Path(data_dir)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{path}: not a prepared data directory (no {META_FILE}; run `gptlab prepare` first)")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for split in SPLITS:
            expected = int(meta["splits"][split]["tokens"])
            file = path / f"{split}.bin"
            if not file.is_file() or file.stat().st_size != expected * dtype.itemsize:
                raise DataError(f"{file}: missing or truncated (expected {expected} tokens of {dtype.name})")
            arrays[split] = np.memmap(file, dtype=dtype, mode="r", shape=(expected,)) if expected else np.empty(0, dtype)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: malformed ({err.__class__.__name__}: {err})") from None
    return TokenData(path=path, meta=meta, train=arrays["train"], val=arrays["val"])


def check_block_size(data: TokenData, block_size: int) -> None:
    """Every split must hold at least one full (input, target) window of block_size + 1 tokens."""
    for split in SPLITS:
        n = len(data.split(split))
        if n < block_size + 1:
            raise ConfigError(
                f"block_size ({block_size}) is larger than the {split} split allows ({n} tokens in {data.path}); "
                f"use a block_size below {n} or more data"
            )


class BatchSampler:
    """Random (input, target) windows from a token array, drawn with its own torch.Generator.

    The generator state is the sampler's whole position, so saving and restoring it
    in a checkpoint continues the exact batch sequence after a resume. batch_size is the
    global batch: every process draws the same batch_size windows and keeps its own
    contiguous slice of them, so N processes together see exactly the
    batches one process would, and the position carries over to any number of processes.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,), generator=self.generator)[self.rows]
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts.tolist()]).astype(np.int64)
        batch = torch.from_numpy(rows)  # (B, T+1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def sequential_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int | None = None):
    """Non-overlapping windows covering the array in order: the deterministic pass used by `gptlab eval`.

    Every token after the first is predicted exactly once (up to max_tokens). The
    last window is padded; padded targets are -100, which the loss ignores.
    Yields (x, y), each (B, block_size).
    """
    limit = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    starts = range(0, limit, block_size)
    for i in range(0, len(starts), batch_size):
        x = torch.zeros(len(starts[i : i + batch_size]), block_size, dtype=torch.long)
        y = torch.full_like(x, -100)
        for row, s in enumerate(starts[i : i + batch_size]):
            n = min(block_size, limit - s)
            window = torch.from_numpy(tokens[s : s + n + 1].astype(np.int64))
            x[row, :n] = window[:-1]
            y[row, :n] = window[1:]
        yield x, y
