"""Shared fixtures: a small prepared data directory built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"


def small_text_corpus(n_bytes: int = 120_000) -> list[str]:
    """Deterministic English documents from the pydoc topics (part of every CPython)."""
    from pydoc_data.topics import topics

    docs, total = [], 0
    for key in sorted(topics):
        docs.append(topics[key])
        total += len(topics[key])
        if total >= n_bytes:
            break
    return docs


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(small_text_corpus()):
        (root / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_dir) -> Path:
    from gptlab.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(out, "train:512", inputs=[corpus_dir], val_fraction=0.1, seed=0, progress=False)
    return out
