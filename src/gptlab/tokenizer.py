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

Tokenizers imported from Hugging Face that are not GPT-2-style byte-level BPE (GPT-1's
lower-casing BPE, for one) are kept as their tokenizer.json and run by `tokenizers` itself:
see `WrappedTokenizer` and `load_hf_tokenizer`.

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

import numpy as np
import tiktoken
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
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


def bytes_to_bytelevel(data: bytes) -> str:
    """GPT-2's printable text for some bytes, as vocab.json and merges.txt write tokens."""
    return "".join(_BYTE_TO_UNICODE[b] for b in data)


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


def line_break_cut(text: str, start: int, size: int) -> int | None:
    """Where the piece of `text` beginning at `start` ends if it is to hold about `size` chars
    and encode to the same ids as it does inside the whole text; None if `text` holds no such place.

    A cut goes just before the first "\\n" at or after start + size whose preceding char is not
    whitespace. No GPT-2 pre-token holds both a non-space char and "\\n" (only the whitespace
    alternatives match "\\n"), so a pre-token ends there, and the regex needs no look-ahead past
    it: matching restarts at the cut exactly as it would in the whole text. (`str.isspace`
    covers every Unicode White_Space char the regex engines treat as `\\s`, so "not isspace"
    is safe.) Since the first such place is taken, a text that grows at its end keeps its
    earlier cuts: a stream can be cut as it arrives.
    """
    cut = text.find("\n", start + size)
    while cut != -1 and text[cut - 1].isspace():
        cut = text.find("\n", cut + 1)
    return None if cut == -1 else cut


def split_at_line_breaks(text: str, size: int) -> list[str]:
    """Cut `text` into pieces of about `size` chars that encode to the same ids as the whole (see line_break_cut)."""
    pieces: list[str] = []
    start = 0
    while (cut := line_break_cut(text, start, size)) is not None:
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


def _adds_no_ids(post: Any) -> bool:
    """Whether a tokenizer.json post-processor leaves the ids alone: none, ByteLevel (it only fixes
    offsets), or a template made of the input sequences alone (what transformers 5 writes for GPT-2)."""
    if post is None:
        return True
    kind = post.get("type") if isinstance(post, dict) else None
    if kind == "ByteLevel":
        return True
    if kind == "Sequence":
        return all(_adds_no_ids(p) for p in post.get("processors") or [])
    if kind == "TemplateProcessing":
        return all(isinstance(item, dict) and set(item) == {"Sequence"} for item in post.get("single") or [])
    return False


def is_gpt2_style_hf_json(data: Any) -> bool:
    """Whether a HF tokenizer.json is byte-level BPE exactly as GPT-2's: no normalizer, ByteLevel
    pre-tokenisation with GPT-2's regex and no prefix space, plain merges, no added BOS/EOS,
    added tokens matched as plain text."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return False
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    post, decoder = data.get("post_processor"), data.get("decoder")
    return (
        model.get("type") == "BPE"
        and isinstance(model.get("vocab"), dict)
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("dropout")
        and not model.get("byte_fallback")
        and not model.get("ignore_merges")
        and data.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space")
        and pre.get("use_regex", True)
        and _adds_no_ids(post)
        and (decoder is None or decoder.get("type") == "ByteLevel")
        # added tokens that swallow neighbouring spaces or match only whole words have no tiktoken equivalent
        and not any(isinstance(t, dict) and (t.get("lstrip") or t.get("rstrip") or t.get("single_word")) for t in data.get("added_tokens") or [])
    )


# ----------------------------------------------------------------------------- tokenizer


def _incomplete_tail(data: bytes) -> int:
    """Length of a trailing UTF-8 sequence that more bytes could still complete (0..3).

    Lenient on purpose: a lead byte followed by fewer continuation bytes than it announces
    is held back even if it could never become valid, which only delays its U+FFFD.
    """
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if 0x80 <= byte <= 0xBF:  # continuation byte: look further back for the lead
            continue
        need = 2 if 0xC0 <= byte <= 0xDF else 3 if 0xE0 <= byte <= 0xEF else 4 if 0xF0 <= byte <= 0xF7 else 1
        return back if back < need else 0
    return 0


class TextStream:
    """Turns token ids into text pieces as they arrive; the pieces concatenate to `decode(ids)`.

    `push(id)` returns the text that id completes, or "" while it ends inside a multi-byte
    character (held back until the next ids finish it); `flush()` returns what is held back
    at the end. Made by a tokenizer's `stream()`.
    """

    def __init__(self, tokenizer: _Vocabulary, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._bytewise = isinstance(tokenizer, Tokenizer)
        self._pending = b""
        # decoders that place spaces by the neighbouring tokens (GPT-1's "</w>") need the ids
        # before the first new one; the text is decoded with them in front and cut off
        self._context = list(context)[-4:]
        self._ids: list[int] = []
        self._out = ""  # text given out so far
        self._head = "" if self._bytewise else tokenizer.decode(self._context)

    def push(self, token_id: int) -> str:
        if self._bytewise:
            data = self._pending + self._tok.token_bytes(token_id)  # a table lookup: a decode call costs ~20 us per token
            keep = _incomplete_tail(data)
            self._pending = data[len(data) - keep :]
            # a cut before a lead byte never splits a maximal invalid subpart, so the pieces
            # decode to the same text as the whole
            return _decode_wtf8(data[: len(data) - keep])
        self._ids.append(token_id)
        text = self._text()
        if text.endswith("\ufffd"):  # maybe a character the next ids complete
            return ""
        return self._take(text)

    def flush(self) -> str:
        if self._bytewise:
            data, self._pending = self._pending, b""
            return _decode_wtf8(data)
        return self._take(self._text())

    def _text(self) -> str:
        full = self._tok.decode(self._context + self._ids)
        return full[len(self._head) :] if full.startswith(self._head) else self._tok.decode(self._ids)

    def _take(self, text: str) -> str:
        # a decoder may rewrite text it already produced (cleanup rules); what was given out stays
        if not text.startswith(self._out):
            return ""
        piece = text[len(self._out) :]
        self._out = text
        return piece


class _Vocabulary:
    """What both tokenizer kinds share: a name, special tokens, the vocabulary size and saving.

    Subclasses set `name`, `_special` ({text: id}) and `_vocab_size`, and define `to_dict`.
    """

    name: str
    _special: dict[str, int]
    _vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

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

    def stream(self, context: Sequence[int] = ()) -> TextStream:
        """A decoder for ids that arrive one at a time (generation); `context` is the prompt's ids."""
        return TextStream(self, context)

    def with_special_tokens(self, texts: Sequence[str]) -> tuple[AnyTokenizer, dict[str, int]]:
        """This tokenizer plus the special tokens in `texts` it lacks, given the next free ids in order,
        and {text: id} of those added (empty, and the tokenizer itself, when it has them all)."""
        _check_special_tokens(list(texts), "with_special_tokens")
        added = {}
        for text in texts:
            if text not in self._special:
                added[text] = self.vocab_size + len(added)
        return (self._plus_specials(added) if added else self), added  # type: ignore[return-value]

    def _plus_specials(self, added: dict[str, int]) -> AnyTokenizer:
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the one-file JSON form atomically: a reader sees the old file or the new one, never half."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        except OSError as err:
            raise TokenizerError(f"{path}: cannot write the tokenizer ({err.strerror or err})") from None


class Tokenizer(_Vocabulary):
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
                        yield from split_at_line_breaks(segment, _CHUNK_CHARS)

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
    def from_gpt2_files(
        cls,
        vocab_path: str | os.PathLike[str],
        merges_path: str | os.PathLike[str],
        name: str | None = None,
        added_tokens: dict[str, int] | None = None,
    ) -> Tokenizer:
        """Read OpenAI/HF byte-level BPE files (vocab.json + merges.txt) as GPT-2 ships them.

        Token id = the vocab.json id. Entries that are neither a single byte nor a merge
        result (GPT-2's <|endoftext|>) become special tokens and must come after the others.
        `added_tokens` ({text: id}, e.g. from tokenizer_config.json) are further special tokens.
        """
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        vocab = _read_json(vocab_path, "vocab file")
        lines = _read_text(merges_path, "merges file").splitlines()  # byte-level text has no line-break chars
        first = 1 if lines and lines[0].startswith("#version") else 0
        pairs: list[tuple[str, str, str]] = []  # (where, left, right)
        for lineno, line in enumerate(lines[first:], start=first + 1):
            if not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise TokenizerError(f"{merges_path} line {lineno}: expected two tokens separated by one space, got {line!r}")
            pairs.append((f"{merges_path} line {lineno}", parts[0], parts[1]))
        name = name if name is not None else (vocab_path.resolve().parent.name or "bpe")
        return cls._from_bytelevel_vocab(vocab, pairs, added_tokens or {}, name, str(vocab_path))

    @classmethod
    def from_hf_json(cls, data: Any, name: str = "bpe", *, source: str = "tokenizer.json") -> Tokenizer:
        """Read a Hugging Face tokenizer.json that describes GPT-2-style byte-level BPE.

        TokenizerError if it is some other kind (see `is_gpt2_style_hf_json`) or its ids do not
        follow merge order; `load_hf_tokenizer` then keeps it as a `WrappedTokenizer` instead.
        """
        if not is_gpt2_style_hf_json(data):
            raise TokenizerError(f"{source}: not GPT-2-style byte-level BPE (normalizer, pre-tokenizer or model differ)")
        model = data["model"]
        vocab = model.get("vocab")
        pairs: list[tuple[str, str, str]] = []
        for k, pair in enumerate(model.get("merges") or []):
            parts = pair.split(" ") if isinstance(pair, str) else pair  # tokenizers < 0.20 wrote "a b"
            if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(x, str) and x for x in parts)):
                raise TokenizerError(f"{source}: merge {k} is not a pair of tokens: {pair!r}")
            pairs.append((f"{source} merge {k}", parts[0], parts[1]))
        added = {t["content"]: t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and "content" in t and "id" in t}
        return cls._from_bytelevel_vocab(vocab, pairs, added, name, source)

    @classmethod
    def _from_bytelevel_vocab(
        cls, vocab: Any, pairs: list[tuple[str, str, str]], added: dict[str, int], name: str, source: str
    ) -> Tokenizer:
        """Build from a byte-level vocab {text: id} and merges (where, left, right); `added` are extra special tokens."""
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise TokenizerError(f"{source}: expected a vocabulary mapping token text to integer id")
        if len(set(vocab.values())) != len(vocab):
            raise TokenizerError(f"{source}: two tokens share an id")
        n_ordinary = N_BYTES + len(pairs)
        tokens: list[bytes] = [b""] * n_ordinary
        for b in range(N_BYTES):
            i = vocab.get(_BYTE_TO_UNICODE[b])
            if i is None or not 0 <= i < N_BYTES:
                raise TokenizerError(f"{source}: byte 0x{b:02x} ({_BYTE_TO_UNICODE[b]!r}) must have an id in 0..255, got {i!r}")
            tokens[i] = bytes([b])
        merges: list[tuple[int, int]] = []
        for k, (where, left, right) in enumerate(pairs):
            new = N_BYTES + k
            ids = [vocab.get(left), vocab.get(right), vocab.get(left + right)]
            if None in ids:
                raise TokenizerError(f"{where}: {left!r}, {right!r} or {left + right!r} is missing from the vocabulary")
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
            raise TokenizerError(f"{source}: has {len(vocab)} entries; expected {n_ordinary} byte/merge tokens plus special tokens after them")
        for text, i in added.items():
            # an added token is matched whole in the text before BPE runs; as a special token
            # gptlab does the same, but an ordinary id matched that way has no rank-BPE equivalent
            if i < n_ordinary or specials.get(text, i) != i:
                raise TokenizerError(f"{source}: added token {text!r} has id {i}, which the vocabulary gives to another token")
            specials[text] = i
        return cls(tokens, merges, specials, name=name, source=source)

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

    def _plus_specials(self, added: dict[str, int]) -> Tokenizer:
        return Tokenizer(self._tokens, self._merges, self._special | added, name=self.name, pattern=self.pattern, source=f"tokenizer {self.name!r}")

    def to_hf_files(self, out_dir: str | os.PathLike[str], model_max_length: int) -> None:
        """Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json for transformers' GPT2Tokenizer.

        `AutoTokenizer.from_pretrained(out_dir)` then gives the same ids as `encode` (lone
        surrogates aside, which HF cannot take). <|endoftext|>, when present, is BOS, EOS and UNK as in GPT-2.
        """
        if self.pattern != GPT2_PATTERN:
            raise TokenizerError(f"tokenizer {self.name!r} pre-tokenises with its own regex; HF's GPT2Tokenizer only has GPT-2's")
        out = Path(out_dir)
        text = [bytes_to_bytelevel(t) for t in self._tokens]
        vocab = {t: i for i, t in enumerate(text)} | self._special
        merges = [(text[left], text[right]) for left, right in self._merges]
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self._special])
        hf.save(str(out / "tokenizer.json"))

        config: dict[str, Any] = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": model_max_length,
            "add_prefix_space": False,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,  # HF would otherwise rewrite " ." to "." when decoding
            "errors": "replace",
            "added_tokens_decoder": {
                str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
                for t, i in self._special.items()
            },
        }
        if EOT in self._special:
            config |= {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
            (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2))
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

    # ------------------------------------------------------------------ properties

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
            for piece in split_at_line_breaks(text, _CHUNK_CHARS):
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


class WrappedTokenizer(_Vocabulary):
    """A tokenizer run by Hugging Face `tokenizers` exactly as its tokenizer.json defines it.

    Imported models whose tokenizer is not GPT-2-style byte-level BPE get one of these:
    GPT-1's lower-casing BPE with "</w>" word ends, or any other tokenizer.json. Encoding is
    HF's own, so the ids are those of `AutoTokenizer` on the same files. Unlike `Tokenizer`
    it need not round-trip every text (GPT-1 lower-cases and maps unknown characters to <unk>).
    It has the same methods as `Tokenizer`; `hf_config` keeps tokenizer_config.json for export.

    The one-file JSON form: {"format": "gptlab-hf-tokenizer", "version": 1, "name": str,
    "tokenizer": the tokenizer.json object, "hf_config": the tokenizer_config.json object}.
    """

    FORMAT = "gptlab-hf-tokenizer"

    def __init__(self, hf_json: dict[str, Any], name: str, hf_config: dict[str, Any] | None = None, *, source: str = "tokenizer") -> None:
        if not isinstance(hf_json, dict):
            raise TokenizerError(f"{source}: a tokenizer.json must hold a JSON object, got {type(hf_json).__name__}")
        self.name = name
        self.hf_json = hf_json
        self.hf_config = dict(hf_config or {})
        self._hf = self._build(hf_json, source)
        added = [t for t in hf_json.get("added_tokens") or [] if isinstance(t, dict)]
        self._special = {t["content"]: t["id"] for t in added if t.get("special")}
        # the same tokenizer without its special tokens: encode_ordinary must not match their text
        self._plain = self._build({**hf_json, "added_tokens": [t for t in added if not t.get("special")]}, source)
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        if self._vocab_size == 0:
            raise TokenizerError(f"{source}: the tokenizer has an empty vocabulary")

    @staticmethod
    def _build(hf_json: dict[str, Any], source: str) -> HFTokenizer:
        try:
            return HFTokenizer.from_str(json.dumps(hf_json))
        except Exception as e:  # tokenizers reports every parse problem as a plain Exception
            raise TokenizerError(f"{source}: not a valid Hugging Face tokenizer.json ({e})") from None

    @classmethod
    def openai_gpt(cls, vocab_path: Path, merges_path: Path, name: str, hf_config: dict[str, Any] | None = None) -> WrappedTokenizer:
        """GPT-1's tokenizer from its vocab.json + merges.txt (Radford et al. 2018: spaCy/ftfy there,
        BERT's lower-casing normaliser and pre-tokeniser in HF): BPE over words, "</w>" marks a word's end."""
        _read_json(vocab_path, "vocab file")  # clear errors for a missing or broken file before tokenizers sees it
        _read_text(merges_path, "merges file")
        unk = (hf_config or {}).get("unk_token", "<unk>")
        unk = unk.get("content", "<unk>") if isinstance(unk, dict) else unk
        try:
            vocab, merges = models.BPE.read_file(str(vocab_path), str(merges_path))
        except Exception as e:  # tokenizers reports every parse problem as a plain Exception
            raise TokenizerError(f"{vocab_path.parent}: cannot read GPT-1 vocab.json/merges.txt ({e})") from None
        if unk not in vocab:
            raise TokenizerError(f"{vocab_path}: has no entry for the unknown-word token {unk!r}")
        hf = HFTokenizer(models.BPE(vocab, merges, unk_token=unk, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
        hf.normalizer = normalizers.BertNormalizer(lowercase=True)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.BPEDecoder(suffix="</w>")
        config = {"tokenizer_class": "OpenAIGPTTokenizer", "unk_token": unk} | dict(hf_config or {})
        return cls(json.loads(hf.to_str()), name, config, source=str(vocab_path.parent))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "tokenizer data") -> WrappedTokenizer:
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise TokenizerError(f"{source}: not a wrapped HF tokenizer (format {data.get('format') if isinstance(data, dict) else None!r})")
        if data.get("version") != VERSION:
            raise TokenizerError(f"{source}: unsupported tokenizer version {data.get('version')!r} (this gptlab reads {VERSION})")
        name, hf_json, hf_config = data.get("name"), data.get("tokenizer"), data.get("hf_config")
        if not isinstance(name, str) or not isinstance(hf_json, dict) or not isinstance(hf_config, (dict, type(None))):
            raise TokenizerError(f"{source}: needs 'name' (string), 'tokenizer' (object) and 'hf_config' (object)")
        return cls(hf_json, name, hf_config, source=source)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": VERSION, "name": self.name, "tokenizer": self.hf_json, "hf_config": self.hf_config}

    def _plus_specials(self, added: dict[str, int]) -> WrappedTokenizer:
        flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        tokens = [*(self.hf_json.get("added_tokens") or []), *({"id": i, "content": t, **flags} for t, i in added.items())]
        return WrappedTokenizer({**self.hf_json, "added_tokens": tokens}, self.name, self.hf_config, source=f"tokenizer {self.name!r}")

    def to_hf_files(self, out_dir: str | os.PathLike[str], model_max_length: int) -> None:
        """Write tokenizer.json and tokenizer_config.json as they were imported (new model_max_length)."""
        out = Path(out_dir)
        (out / "tokenizer.json").write_text(json.dumps(self.hf_json, ensure_ascii=False), encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast"} | self.hf_config | {"model_max_length": model_max_length}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

    def merges(self) -> list[tuple[str, str]]:
        """The BPE merges in priority order, as tokenizer.json writes the tokens (empty if not BPE)."""
        return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in self.hf_json.get("model", {}).get("merges") or []]

    def __repr__(self) -> str:
        return f"WrappedTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, allowed_special: Literal["all"] | Set[str] | None = "all") -> list[int]:
        """Token ids of `text`; special-token text in `allowed_special` ("all" by default) becomes its id."""
        if allowed_special == "all":
            return self._ids(self._hf, text)
        allowed = frozenset(allowed_special or ())
        unknown = sorted(allowed - self._special.keys())
        if unknown:
            raise TokenizerError(f"unknown special token(s) {unknown} for tokenizer {self.name!r}; it has {sorted(self._special)}")
        if not allowed:
            return self.encode_ordinary(text)
        # cut at the allowed specials' text; everything between is ordinary text
        cut = re.compile("(" + "|".join(re.escape(t) for t in sorted(allowed, key=len, reverse=True)) + ")")
        ids: list[int] = []
        for k, piece in enumerate(cut.split(text)):
            if k % 2:
                ids.append(self._special[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, special-token text encoded as plain text."""
        return self._ids(self._plain, text)

    def _ids(self, hf: HFTokenizer, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, got {type(text).__name__}")
        try:
            return hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # tokenizers reports every failure as a plain Exception
            raise TokenizerError(f"tokenizer {self.name!r} cannot encode {text[:40]!r}: {e}") from None

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None, progress: bool = False) -> list[list[int]]:
        """`[encode_ordinary(t) for t in texts]`; `tokenizers` spreads each batch over its own thread pool."""
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ConfigError(f"num_threads must be a positive integer, got {num_threads!r}")
        texts = list(texts)
        out: list[list[int]] = []
        step = 256
        with tqdm(total=len(texts), unit="doc", desc="encode", disable=not progress) as bar:
            for s in range(0, len(texts), step):
                try:
                    out.extend(e.ids for e in self._plain.encode_batch(texts[s : s + step], add_special_tokens=False))
                except Exception as e:  # tokenizers reports every failure as a plain Exception
                    raise TokenizerError(f"tokenizer {self.name!r} cannot encode texts {s}..{s + step - 1}: {e}") from None
                bar.update(len(texts[s : s + step]))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i in ids:
            if not isinstance(i, int) or self._hf.id_to_token(i) is None:
                raise TokenizerError(f"token id {i!r} is out of range for tokenizer {self.name!r} (vocab_size {self.vocab_size})")
        return self._hf.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")


AnyTokenizer = Tokenizer | WrappedTokenizer


# ----------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=1)
def _load_gpt2() -> Tokenizer:
    assets = resources.files("gptlab") / "assets" / "gpt2"
    with resources.as_file(assets / "vocab.json") as vocab, resources.as_file(assets / "merges.txt") as merges:
        return Tokenizer.from_gpt2_files(vocab, merges, name="gpt2")


def same_encoding(a: AnyTokenizer, b: AnyTokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (their names aside): what two models that read
    each other's token ids (draft and target, policy and reward model or reference) must share."""

    def content(tok: AnyTokenizer) -> dict[str, Any]:
        return {k: v for k, v in tok.to_dict().items() if k != "name"}

    return type(a) is type(b) and content(a) == content(b)


def tokenizer_from_dict(data: Any, *, source: str = "tokenizer data") -> AnyTokenizer:
    """Either kind of tokenizer from its one-file JSON form, by its "format" field."""
    if isinstance(data, dict) and data.get("format") == WrappedTokenizer.FORMAT:
        return WrappedTokenizer.from_dict(data, source=source)
    return Tokenizer.from_dict(data, source=source)


def read_tokenizer(path: str | os.PathLike[str]) -> AnyTokenizer:
    """Read a tokenizer file written by either kind's `save`."""
    path = Path(path)
    return tokenizer_from_dict(_read_json(path, "tokenizer file"), source=str(path))


def load_hf_tokenizer(directory: str | os.PathLike[str]) -> AnyTokenizer:
    """The tokenizer of a Hugging Face model directory, encoding as `AutoTokenizer.from_pretrained(directory)` does.

    tokenizer.json wins when present, else vocab.json + merges.txt. GPT-2-style byte-level BPE
    becomes a gptlab `Tokenizer` (tiktoken speed); anything else, GPT-1's included, a
    `WrappedTokenizer`. A gptlab tokenizer.json (a data or checkpoint directory) is read as such.
    """
    d = Path(directory)
    config_path = d / "tokenizer_config.json"
    config = _read_json(config_path, "tokenizer config") if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise TokenizerError(f"{config_path}: expected a JSON object")
    # keys that describe where the files were, not how to tokenize
    config = {k: v for k, v in config.items() if k not in ("name_or_path", "tokenizer_file", "vocab_file", "merges_file", "auto_map")}
    name = d.resolve().name or "hf"
    decoder = config.get("added_tokens_decoder") or {}
    added = {v["content"]: int(k) for k, v in decoder.items() if isinstance(v, dict) and v.get("special") and str(k).isdigit()}
    if (d / "tokenizer.json").is_file():
        data = _read_json(d / "tokenizer.json", "tokenizer file")
        if isinstance(data, dict) and "format" in data:
            return tokenizer_from_dict(data, source=str(d / "tokenizer.json"))
        if is_gpt2_style_hf_json(data):
            try:
                return Tokenizer.from_hf_json(data, name, source=str(d / "tokenizer.json"))
            except TokenizerError:
                pass  # e.g. ids not in merge order: valid for HF, not for rank BPE, so HF runs it
        return WrappedTokenizer(data, name, config, source=str(d / "tokenizer.json"))
    vocab, merges = d / "vocab.json", d / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise TokenizerError(f"tokenizer directory {d} has neither tokenizer.json nor vocab.json + merges.txt")
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class is None:  # no declared class: GPT-1's vocabulary marks word ends with "</w>", byte-level BPE never does
        vocab_data = _read_json(vocab, "vocab file")
        gpt1_style = isinstance(vocab_data, dict) and any(k.endswith("</w>") for k in vocab_data)
    else:
        gpt1_style = tokenizer_class in ("OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast")
    if gpt1_style:
        return WrappedTokenizer.openai_gpt(vocab, merges, name, config)
    return Tokenizer.from_gpt2_files(vocab, merges, name=name, added_tokens=added)


def load_tokenizer(spec: str | os.PathLike[str]) -> AnyTokenizer:
    """"gpt2", a tokenizer file, or a directory: Hugging Face files, or a gptlab data/checkpoint directory."""
    if str(spec) == "gpt2":
        return Tokenizer.gpt2()
    path = Path(spec)
    if path.is_dir():
        return load_hf_tokenizer(path)
    if not path.exists():
        raise TokenizerError(f"no tokenizer at {str(spec)!r}: expected 'gpt2', a tokenizer file, or a directory with tokenizer files")
    data = _read_json(path, "tokenizer file")
    if isinstance(data, dict) and "format" not in data and "model" in data:  # a HF tokenizer.json on its own
        return load_hf_tokenizer(path.parent) if path.name == "tokenizer.json" else WrappedTokenizer(data, path.stem, source=str(path))
    return tokenizer_from_dict(data, source=str(path))


# ----------------------------------------------------------------------------- encoding in worker processes

_worker_tokenizer: AnyTokenizer | None = None  # a worker process's tokenizer, set once by start_encode_worker


def start_encode_worker(tokenizer_data: dict) -> None:
    """Process-pool initializer: build the tokenizer every later `encode_sized` call in this process uses.

    Ctrl-C is the parent's to handle (it stops the pool), so the worker ignores SIGINT.
    It leaves when its parent dies: a pool's workers each hold the task queue's write
    end, so a SIGKILLed parent would otherwise leave them waiting forever.
    """
    import multiprocessing
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_dict(tokenizer_data)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True, name="exit-with-parent").start()


def encode_sized(texts: list[str], dtype: str, tok: AnyTokenizer | None = None) -> list[tuple[np.ndarray, int]]:
    """(ids as a `dtype` array, UTF-8 size) of each text, encoded as `encode_ordinary` does.

    Without `tok` it uses the worker's tokenizer from `start_encode_worker`; arrays, not
    lists, keep what travels back from a worker process small.
    """
    tok = tok or _worker_tokenizer
    if tok is None:
        raise TokenizerError("encode_sized needs a tokenizer: pass one, or start the process with start_encode_worker")
    ids = tok.encode_batch(texts, num_threads=1)
    return [(np.asarray(t, dtype=dtype), len(text.encode("utf-8", "surrogatepass"))) for t, text in zip(ids, texts)]
