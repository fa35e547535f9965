"""Shared fixtures and helpers: a small prepared data directory built once per session, seeded random weights and ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Perturb every parameter, so zero biases and unit LayerNorm gains cannot hide a mapping error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tokens(shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine each op can wait milliseconds for the second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    # small shards, so every training, resume and distributed test streams across several of them
    prepare(out, "train:512", inputs=[corpus_dir], val_fraction=0.1, seed=0, shard_tokens=8192, progress=False)
    return out
