"""Tokenizer speed: gptlab (tiktoken encoding) vs HF `tokenizers`, same GPT-2 vocabulary on both sides.

The corpus is the Python standard library's top-level .py files in sorted order (about 5 MB,
the same on every run of one Python build), or --input FILE cut into ~64 KB pieces at line ends.
Runs are interleaved and the median is reported (--repeats for encoding, --train-repeats for
training, kept at 1 by default so the whole script stays under a minute); the ids of both sides must match.

    python benchmarks/tokenizer_speed.py [--input FILE] [--repeats 3] [--train-vocab 8192] [--train-repeats 1]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from gptlab.tokenizer import EOT, Tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "src" / "gptlab" / "assets" / "gpt2"


def load_corpus(path: str | None) -> tuple[list[str], str]:
    if path is None:
        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files], f"{len(files)} stdlib .py files"
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    docs, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line)
        if size >= 1 << 16:
            docs.append("".join(current))
            current, size = [], 0
    docs.append("".join(current))
    return docs, f"{path} in {len(docs)} pieces"


def hf_gpt2() -> HFTokenizer:
    hf = HFTokenizer(models.BPE.from_file(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return hf


def hf_train(docs: list[str], vocab_size: int) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[], show_progress=False
    )
    hf.train_from_iterator(docs, trainer=trainer)
    return hf


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="UTF-8 text file to use instead of the stdlib sources")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--train-vocab", type=int, default=8192, help="0 skips the training rows")
    parser.add_argument("--train-repeats", type=int, default=1)
    args = parser.parse_args()

    docs, source = load_corpus(args.input)
    n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    mb = n_bytes / 1e6
    load_s, tok = timed(Tokenizer.gpt2)
    hf = hf_gpt2()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # before HF's first parallel call

    # name -> (gptlab, HF) callables; each returns the ids so both sides can be checked
    encode_jobs: dict[str, tuple[Callable[[], list[list[int]]], Callable[[], list[list[int]]]]] = {
        f"encode, {args.threads} threads (MB/s)": (
            lambda: tok.encode_batch(docs, num_threads=args.threads),
            lambda: [e.ids for e in hf.encode_batch(docs)],
        ),
        "encode, 1 thread (MB/s)": (
            lambda: [tok.encode_ordinary(d) for d in docs],
            lambda: [hf.encode(d).ids for d in docs],
        ),
    }
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for name, (ours, theirs) in encode_jobs.items():
            seconds_ours, ids_ours = timed(ours)
            seconds_theirs, ids_theirs = timed(theirs)
            if ids_ours != ids_theirs:
                sys.exit(f"ids differ between gptlab and HF tokenizers in '{name}'")
            times.setdefault((name, 0), []).append(seconds_ours)
            times.setdefault((name, 1), []).append(seconds_theirs)
    for _ in range(args.train_repeats if args.train_vocab else 0):
        name = f"train {args.train_vocab} vocab (s)"
        seconds_ours, _ = timed(lambda: Tokenizer.train(docs, args.train_vocab, special_tokens=(EOT,), progress=False))
        seconds_theirs, _ = timed(lambda: hf_train(docs, args.train_vocab))
        times.setdefault((name, 0), []).append(seconds_ours)
        times.setdefault((name, 1), []).append(seconds_theirs)

    print(f"corpus: {source}, {mb:.2f} MB UTF-8; {os.cpu_count()} CPUs; interleaved runs, median of {args.repeats} (encode) / {args.train_repeats} (train)")
    print(f"tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}; gptlab GPT-2 load {load_s:.2f} s; ids identical")
    print()
    print("| task | gptlab | HF tokenizers | gptlab/HF speed |")
    print("|---|---:|---:|---:|")
    for name in dict.fromkeys(n for n, _ in times):
        ours, theirs = statistics.median(times[(name, 0)]), statistics.median(times[(name, 1)])
        if name.endswith("(MB/s)"):
            print(f"| {name} | {mb / ours:.2f} | {mb / theirs:.2f} | {theirs / ours:.2f}x |")
        else:
            print(f"| {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
