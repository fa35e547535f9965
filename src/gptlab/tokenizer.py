"""Byte-level BPE tokenizer: GPT-2's, or one trained on your corpus.

Text is cut into pre-tokens by GPT-2's regex (Radford et al. 2019), each pre-token's
UTF-8 bytes start as one token per byte, and learned merges join adjacent tokens.
Training uses Hugging Face `tokenizers`; encoding uses `tiktoken`, whose rank-based
BPE (repeatedly merge the adjacent pair whose concatenation has the lowest id) gives
the same tokens as merge-list BPE when merge i produces token 256 + i, which every
constructor here checks.

Ids: the 256 single bytes are 0..255 (byte value for trained tokenizers; GPT-2 keeps
its own order), merge i makes id 256 + i, and special tokens such as <|endoftext|>
come last, as in GPT-2 where <|endoftext|> is 50256.

The one-file JSON format (`save`/`load`/`to_dict`):
    {"format": "gptlab-bpe", "version": 1, "name": str, "pattern": str,
     "tokens": [base64 of the bytes of each ordinary token, by id],
     "merges": [[left_id, right_id], ...] in merge order,
     "special_tokens": {text: id}}
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import operator
import os
import re
from collections.abc import Iterable, Iterator, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers
from tqdm import tqdm

from gptlab.errors import ConfigError, TokenizerError
from gptlab.fileio import write_atomic

EOT = "<|endoftext|>"

# GPT-2's pre-tokenisation: contractions, optional-space + letters, optional-space + digits,
# optional-space + other symbols, then whitespace. `\s+(?!\S)` leaves the last space of a run
# to prefix the next word, so " world" stays one pre-token. Same as tiktoken's r50k_base and
# HF's ByteLevel(use_regex=True).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

FORMAT = "gptlab-bpe"
VERSION = 1
N_BYTES = 256

# UTF-8 cannot hold U+D800..U+DFFF; Python strs can, as lone code points.
_SURROGATE_CLASS = "[\ud800-\udfff]"
_SURROGATE = re.compile(f"({_SURROGATE_CLASS})")  # the group makes re.split keep each surrogate

# Texts longer than this are cut (at boundaries that keep every pre-token whole) so that
# one huge document still spreads over threads and the progress bar moves.
_CHUNK_CHARS = 1 << 18


# ----------------------------------------------------------------------------- helpers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, used in vocab.json/merges.txt and by HF ByteLevel.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68 (controls,
    space, DEL, NBSP, soft hyphen, ...) get U+0100, U+0101, ... in byte order, so that a space
    shows as "Ġ" (U+0120).
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in visible}
    extra = 0
    for b in range(N_BYTES):
        if b not in mapping:
            mapping[b] = chr(N_BYTES + extra)
            extra += 1
    return mapping


_BYTE_TO_UNICODE = _bytes_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}


def _bytelevel_to_bytes(text: str, where: str) -> bytes:
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise TokenizerError(f"{where}: {text!r} is not byte-level BPE text (character {e.args[0]!r})") from None


def _has_surrogates(text: str) -> bool:
    if text.isascii():  # O(1): CPython records it
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # the only str that UTF-8 rejects is one with a surrogate
        return True
    return False


def _surrogate_bytes(surrogate: str) -> bytes:
    # WTF-8: the 3-byte form UTF-8 would give the code point if it were allowed (ED A0..BF 80..BF).
    return surrogate.encode("utf-8", "surrogatepass")


def _decode_wtf8(data: bytes) -> str:
    """UTF-8 decode where 3-byte encoded surrogates become lone surrogates and other bad bytes U+FFFD.

    Replacement follows Python's errors="replace" (one U+FFFD per maximal invalid subpart, as
    the Unicode Standard §3.9 recommends); decoding resumes after each error rather than
    registering a process-wide codec error handler.
    """
    view = memoryview(data)
    parts: list[str] = []
    pos = 0
    while pos < len(data):
        try:
            parts.append(codecs.utf_8_decode(view[pos:], "surrogatepass", True)[0])
            break
        except UnicodeDecodeError as e:  # positions are relative to view[pos:]
            parts.append(codecs.utf_8_decode(view[pos : pos + e.start], "surrogatepass", True)[0])
            parts.append("\ufffd")
            pos += e.end
    return "".join(parts)


def _split_for_parallel(text: str, size: int) -> list[str]:
    """Cut `text` into pieces of about `size` chars that encode to the same ids as the whole.

    A cut goes just before a "\\n" whose preceding char is not whitespace. No GPT-2 pre-token
    holds both a non-space char and "\\n" (only the whitespace alternatives match "\\n"), so a
    pre-token ends there, and the regex needs no look-ahead past it: matching restarts at
    the cut exactly as it would in the whole text. (`str.isspace` covers every Unicode
    White_Space char the regex engines treat as `\\s`, so "not isspace" is safe.)
    """
    if len(text) <= size:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _check_special_tokens(special_tokens: Sequence[str], where: str) -> None:
    for s in special_tokens:
        if not isinstance(s, str) or not s or _has_surrogates(s):
            raise TokenizerError(f"{where}: special tokens must be non-empty UTF-8 strings, got {s!r}")
    if len(set(special_tokens)) != len(special_tokens):
        raise TokenizerError(f"{where}: special tokens must be distinct, got {list(special_tokens)!r}")


def _read_text(path: Path, what: str) -> str:
    if path.is_dir():
        raise TokenizerError(f"{what} {path} is a directory")
    if not path.is_file():
        raise TokenizerError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {what} {path}: {e}") from None


def _read_json(path: Path, what: str) -> Any:
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """Byte-level BPE tokenizer with GPT-2 pre-tokenisation; lossless on every Python str.

    `decode(encode(s)) == s` for every str `s`, including lone surrogates (U+D800..U+DFFF,
    which Python strs can hold but UTF-8, tiktoken and HF cannot): the text is cut at each
    lone surrogate, the pieces in between are encoded as usual, and each surrogate becomes
    its own pre-token made of its 3-byte "surrogatepass" form (WTF-8), BPE-merged like any
    other bytes. `decode` turns such 3-byte sequences back into the surrogate and any other
    invalid UTF-8 (e.g. a multi-byte char cut between tokens) into U+FFFD.

    `encode` turns special-token text such as "<|endoftext|>" into its id (as HF's
    GPT2TokenizerFast does); `encode_ordinary` never does. Build one with `gpt2()`,
    `train()`, `load()`, `from_dict()` or `from_gpt2_files()`.
    """

    def __init__(
        self,
        tokens: Sequence[bytes],
        merges: Sequence[tuple[int, int]],
        special_tokens: dict[str, int],
        name: str,
        pattern: str = GPT2_PATTERN,
        *,
        source: str = "tokenizer",
    ) -> None:
        """Check the vocabulary (errors name `source`) and build the tiktoken encoder.

        `tokens[i]` is the bytes of ordinary token i; merge k joins ids `merges[k]` into token 256 + k.
        """
        self.name = name
        self.pattern = pattern
        self._tokens = list(tokens)
        self._merges = [(int(left), int(right)) for left, right in merges]
        self._special = dict(special_tokens)
        self._validate(source)
        self._vocab_size = max([len(self._tokens) - 1, *self._special.values()]) + 1
        self._ranks = {tok: i for i, tok in enumerate(self._tokens)}  # rank = id
        try:
            self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=self._ranks, special_tokens=self._special)
        except ValueError as e:  # tiktoken reports a bad regex this way
            raise TokenizerError(f"{source}: cannot build encoder: {e}") from None

    def _validate(self, source: str) -> None:
        tokens, merges = self._tokens, self._merges
        if len(tokens) != N_BYTES + len(merges):
            raise TokenizerError(
                f"{source}: expected {N_BYTES} byte tokens + {len(merges)} merges = {N_BYTES + len(merges)} tokens, got {len(tokens)}"
            )
        if sorted(tokens[:N_BYTES]) != [bytes([b]) for b in range(N_BYTES)]:
            raise TokenizerError(f"{source}: ids 0..255 must be the 256 single bytes")
        for i, (left, right) in enumerate(merges):
            new = N_BYTES + i
            if not (0 <= left < new and 0 <= right < new):
                raise TokenizerError(f"{source}: merge {i} joins ids ({left}, {right}); both must be below {new}, the id it makes")
            if tokens[left] + tokens[right] != tokens[new]:
                raise TokenizerError(f"{source}: merge {i} ({left}, {right}) does not make token {new} ({tokens[new]!r})")
        if len(set(tokens)) != len(tokens):
            seen: dict[bytes, int] = {}
            for i, tok in enumerate(tokens):
                if tok in seen:
                    raise TokenizerError(f"{source}: token {i} duplicates token {seen[tok]} ({tok!r})")
                seen[tok] = i
        _check_special_tokens(list(self._special), source)
        for text, i in self._special.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < len(tokens):
                raise TokenizerError(f"{source}: special token {text!r} has id {i!r}; special ids must be integers >= {len(tokens)}")
        if len(set(self._special.values())) != len(self._special):
            raise TokenizerError(f"{source}: special tokens share ids: {self._special}")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        special_tokens: Sequence[str] = (EOT,),
        progress: bool = True,
    ) -> Tokenizer:
        """Learn `vocab_size - len(special_tokens)` byte-level BPE tokens from `texts`, then add the specials.

        Special-token text and lone surrogates in the corpus are cut out before counting,
        since `encode` never merges across them either.
        """
        special_tokens = list(special_tokens)
        _check_special_tokens(special_tokens, "train")
        n_min = N_BYTES + len(special_tokens)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < n_min:
            raise ConfigError(f"vocab_size must be an integer >= {n_min} (256 bytes + {len(special_tokens)} special tokens), got {vocab_size!r}")
        if isinstance(texts, str):
            texts = [texts]

        n_chars = 0
        cut = re.compile("|".join([re.escape(s) for s in special_tokens] + [_SURROGATE_CLASS]))

        def pieces() -> Iterator[str]:
            nonlocal n_chars
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TokenizerError(f"training texts must be str, item {i} is {type(text).__name__}")
                n_chars += len(text)
                for segment in cut.split(text):
                    if segment:
                        # many pieces instead of one long text lets HF count words on all cores
                        yield from _split_for_parallel(segment, _CHUNK_CHARS)

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=progress,
        )
        hf.train_from_iterator(pieces(), trainer=trainer)
        if n_chars == 0:
            raise TokenizerError("cannot train a tokenizer on an empty corpus")

        hf_merges = json.loads(hf.to_str())["model"]["merges"]
        tokens = [bytes([b]) for b in range(N_BYTES)]
        ids = {tok: i for i, tok in enumerate(tokens)}
        merges: list[tuple[int, int]] = []
        for pair in hf_merges:
            left_s, right_s = pair.split(" ") if isinstance(pair, str) else pair  # older tokenizers: "a b"
            left, right = _bytelevel_to_bytes(left_s, "trained merges"), _bytelevel_to_bytes(right_s, "trained merges")
            new = left + right
            if new in ids:  # rank-based encoding needs one merge per token
                raise TokenizerError(f"the trainer merged {left!r} + {right!r} into an existing token; cannot encode it by rank")
            merges.append((ids[left], ids[right]))
            ids[new] = len(tokens)
            tokens.append(new)
        if len(tokens) + len(special_tokens) < vocab_size:
            raise TokenizerError(
                f"corpus too small for vocab_size {vocab_size}: it yields only {len(merges)} merges "
                f"(vocab_size at most {len(tokens) + len(special_tokens)})"
            )
        specials = {s: len(tokens) + i for i, s in enumerate(special_tokens)}
        return cls(tokens, merges, specials, name=f"bpe-{vocab_size}", source="trained tokenizer")

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """OpenAI's GPT-2 tokenizer (50257 ids), from the files shipped with gptlab; cached."""
        return _load_gpt2()

    @classmethod
    def from_gpt2_files(cls, vocab_path: str | os.PathLike[str], merges_path: str | os.PathLike[str], name: str | None = None) -> Tokenizer:
        """Read OpenAI/HF byte-level BPE files (vocab.json + merges.txt) as GPT-2 ships them.

        Token id = the vocab.json id. Entries that are neither a single byte nor a merge
        result (GPT-2's <|endoftext|>) become special tokens and must come after the others.
        """
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        vocab = _read_json(vocab_path, "vocab file")
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise TokenizerError(f"{vocab_path}: expected a JSON object mapping token text to integer id")
        if len(set(vocab.values())) != len(vocab):
            raise TokenizerError(f"{vocab_path}: two tokens share an id")

        lines = _read_text(merges_path, "merges file").splitlines()  # byte-level text has no line-break chars
        first = 1 if lines and lines[0].startswith("#version") else 0
        pairs: list[tuple[int, str, str]] = []  # (line number, left, right)
        for lineno, line in enumerate(lines[first:], start=first + 1):
            if not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise TokenizerError(f"{merges_path} line {lineno}: expected two tokens separated by one space, got {line!r}")
            pairs.append((lineno, parts[0], parts[1]))

        n_ordinary = N_BYTES + len(pairs)
        tokens: list[bytes] = [b""] * n_ordinary
        for b in range(N_BYTES):
            i = vocab.get(_BYTE_TO_UNICODE[b])
            if i is None or not 0 <= i < N_BYTES:
                raise TokenizerError(f"{vocab_path}: byte 0x{b:02x} ({_BYTE_TO_UNICODE[b]!r}) must have an id in 0..255, got {i!r}")
            tokens[i] = bytes([b])
        merges: list[tuple[int, int]] = []
        for k, (lineno, left, right) in enumerate(pairs):
            where = f"{merges_path} line {lineno}"
            new = N_BYTES + k
            ids = [vocab.get(left), vocab.get(right), vocab.get(left + right)]
            if None in ids:
                raise TokenizerError(f"{where}: {left!r}, {right!r} or {left + right!r} is missing from {vocab_path.name}")
            i_left, i_right, i_new = ids
            if i_new != new:
                raise TokenizerError(
                    f"{where}: merge {left} {right} makes id {i_new}, expected {new}; "
                    "ids must follow merge order (256 + merge index) for rank-based encoding"
                )
            if not (i_left < new and i_right < new):
                raise TokenizerError(f"{where}: merge {left} {right} uses a token defined by a later merge")
            tokens[new] = _bytelevel_to_bytes(left + right, where)
            merges.append((i_left, i_right))
        specials = {text: i for text, i in vocab.items() if i >= n_ordinary}
        if len(vocab) != n_ordinary + len(specials):
            raise TokenizerError(f"{vocab_path}: has {len(vocab)} entries; expected {n_ordinary} byte/merge tokens plus special tokens after them")
        name = name if name is not None else (vocab_path.resolve().parent.name or "bpe")
        return cls(tokens, merges, specials, name=name, source=str(vocab_path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "tokenizer data") -> Tokenizer:
        """Rebuild a tokenizer from `to_dict()`'s JSON form, checking every field."""
        if not isinstance(data, dict):
            raise TokenizerError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise TokenizerError(f"{source}: not a gptlab tokenizer (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") != VERSION:
            raise TokenizerError(f"{source}: unsupported tokenizer version {data.get('version')!r} (this gptlab reads {VERSION})")
        missing = [k for k in ("name", "pattern", "tokens", "merges", "special_tokens") if k not in data]
        if missing:
            raise TokenizerError(f"{source}: missing field(s) {', '.join(missing)}")
        name, pattern, tokens_b64, merges, specials = (data[k] for k in ("name", "pattern", "tokens", "merges", "special_tokens"))
        if not isinstance(name, str) or not isinstance(pattern, str):
            raise TokenizerError(f"{source}: 'name' and 'pattern' must be strings")
        if not isinstance(tokens_b64, list):
            raise TokenizerError(f"{source}: 'tokens' must be a list of base64 strings")
        tokens: list[bytes] = []
        for i, t in enumerate(tokens_b64):
            try:
                tokens.append(base64.b64decode(t, validate=True))
            except (binascii.Error, TypeError, ValueError):
                raise TokenizerError(f"{source}: token {i} is not valid base64: {t!r}") from None
        if not isinstance(merges, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in m) for m in merges
        ):
            raise TokenizerError(f"{source}: 'merges' must be a list of [left_id, right_id] integer pairs")
        if not isinstance(specials, dict):
            raise TokenizerError(f"{source}: 'special_tokens' must be an object mapping text to id")
        return cls(tokens, [(m[0], m[1]) for m in merges], specials, name=name, pattern=pattern, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read a tokenizer written by `save`."""
        path = Path(path)
        return cls.from_dict(_read_json(path, "tokenizer file"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "tokens": [base64.b64encode(t).decode("ascii") for t in self._tokens],
            "merges": [[left, right] for left, right in self._merges],
            "special_tokens": dict(self._special),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the one-file JSON form atomically: a reader sees the old file or the new one, never half."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8"))

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids including special tokens (largest id + 1): the model's embedding rows."""
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eot_id(self) -> int:
        if EOT not in self._special:
            raise TokenizerError(f"tokenizer {self.name!r} has no {EOT} token")
        return self._special[EOT]

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The BPE merges in priority order, as (left bytes, right bytes)."""
        return [(self._tokens[left], self._tokens[right]) for left, right in self._merges]

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (a special token's UTF-8 text)."""
        try:
            i = operator.index(id)  # ints, numpy ints, 0-d tensors
        except TypeError:
            i = -1
        if 0 <= i < len(self._tokens):
            return self._tokens[i]
        for text, special_id in self._special.items():
            if i == special_id:
                return text.encode("utf-8")
        raise TokenizerError(f"token id {id!r} is out of range for tokenizer {self.name!r} (vocab_size {self.vocab_size})")

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return (self.pattern, self._tokens, self._merges, self._special) == (other.pattern, other._tokens, other._merges, other._special)

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ encoding

    def _bpe(self, piece: bytes) -> list[int]:
        # Rank BPE on one pre-token, the rule tiktoken applies: merge the adjacent pair whose
        # concatenation has the lowest id until none is a token. Only used for the 3 bytes of a surrogate.
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while True:
            best: tuple[int, int] | None = None  # (rank, position)
            for i in range(len(parts) - 1):
                rank = self._ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self._ranks[p] for p in parts]

    def _encode_text(self, text: str, allowed: frozenset[str]) -> list[int]:
        if not _has_surrogates(text):
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=()) if allowed else self._enc.encode_ordinary(text)
        ids: list[int] = []
        for k, segment in enumerate(_SURROGATE.split(text)):  # odd positions hold the surrogates
            if k % 2:
                ids.extend(self._bpe(_surrogate_bytes(segment)))
            elif segment:
                ids.extend(self._encode_text(segment, allowed))
        return ids

    def encode(self, text: str, allowed_special: Literal["all"] | Set[str] | None = "all") -> list[int]:
        """Token ids of `text`. Special-token text in `allowed_special` ("all" by default) becomes its id; None or
        an empty set treats all of it as ordinary text."""
        if allowed_special == "all":
            allowed = frozenset(self._special)
        elif allowed_special is None:
            allowed = frozenset()
        else:
            allowed = frozenset(allowed_special)
            unknown = sorted(allowed - self._special.keys())
            if unknown:
                raise TokenizerError(f"unknown special token(s) {unknown} for tokenizer {self.name!r}; it has {sorted(self._special)}")
        return self._encode_text(text, allowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, never producing special ids (special-token text is encoded as plain text)."""
        return self._encode_text(text, frozenset())

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None, progress: bool = False) -> list[list[int]]:
        """`[encode_ordinary(t) for t in texts]`, on `num_threads` threads (default: all cores).

        tiktoken's Rust core releases the GIL, so threads run in parallel. Work goes out in
        chunks of about 256K chars (long texts are cut where the ids cannot change), and the
        progress bar counts UTF-8 bytes.
        """
        threads = (os.cpu_count() or 1) if num_threads is None else num_threads
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"num_threads must be a positive integer, got {num_threads!r}")
        texts = list(texts)
        # jobs: lists of (text index, piece); consecutive short texts share a job
        jobs: list[list[tuple[int, str]]] = [[]]
        job_chars = 0
        for i, text in enumerate(texts):
            for piece in _split_for_parallel(text, _CHUNK_CHARS):
                if job_chars >= _CHUNK_CHARS:
                    jobs.append([])
                    job_chars = 0
                jobs[-1].append((i, piece))
                job_chars += len(piece)

        def run(job: list[tuple[int, str]]) -> list[list[int]]:
            return [self.encode_ordinary(piece) for _, piece in job]

        sizes = [sum(len(p.encode("utf-8", "surrogatepass")) for _, p in job) if progress else 0 for job in jobs]
        out: list[list[int]] = [[] for _ in texts]
        with ThreadPoolExecutor(threads) as pool, tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="encode", disable=not progress) as bar:
            for job, size, results in zip(jobs, sizes, pool.map(run, jobs)):
                for (i, _), ids in zip(job, results):
                    out[i].extend(ids)
                bar.update(size)
        return out

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of `ids` (special tokens as their UTF-8 text)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays and torch tensors too
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            for i in ids:
                self.token_bytes(i)  # raises TokenizerError naming the first bad id
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: inverse of `encode` (see the class docstring for invalid UTF-8)."""
        return _decode_wtf8(self.decode_bytes(ids))


# ----------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=1)
def _load_gpt2() -> Tokenizer:
    assets = resources.files("gptlab") / "assets" / "gpt2"
    with resources.as_file(assets / "vocab.json") as vocab, resources.as_file(assets / "merges.txt") as merges:
        return Tokenizer.from_gpt2_files(vocab, merges, name="gpt2")


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """"gpt2", a gptlab tokenizer file, or a directory holding vocab.json + merges.txt."""
    if str(spec) == "gpt2":
        return Tokenizer.gpt2()
    path = Path(spec)
    if path.is_dir():
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise TokenizerError(f"tokenizer directory {path} has no vocab.json + merges.txt")
        return Tokenizer.from_gpt2_files(vocab, merges)
    if not path.exists():
        raise TokenizerError(f"no tokenizer at {str(spec)!r}: expected 'gpt2', a gptlab tokenizer file, or a directory with vocab.json and merges.txt")
    return Tokenizer.load(path)
