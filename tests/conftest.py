"""Shared fixtures and helpers: a small prepared data directory built once per session, seeded random weights and ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The GPT-2 tokenizer files the package ships (OpenAI's encoder.json and vocab.bpe under Hugging Face's
# names). Reference tokenizers are built from them, so every test runs in a fresh clone; the checksums
# are those of OpenAI's released files, so a damaged or edited copy fails instead of testing itself.
GPT2_FILES = REPO / "src" / "gptlab" / "assets" / "gpt2"
GPT2_SHA256 = {
    "vocab.json": "a2d6a81348c03831f7cf229a74875a8a70d2dc3a08009208108a1d5cf426002d",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


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


@pytest.fixture(scope="session", autouse=True)
def plan_cache_dir(tmp_path_factory):
    """Kernel plans measured by the tests go to a temporary directory, not the user's ~/.cache/gptlab."""
    import os

    before = os.environ.get("GPTLAB_CACHE_DIR")
    os.environ["GPTLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptlab_cache"))
    yield
    if before is None:
        os.environ.pop("GPTLAB_CACHE_DIR", None)
    else:
        os.environ["GPTLAB_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def gpt2_files() -> Path:
    """The packaged GPT-2 vocab.json + merges.txt, checked against OpenAI's release."""
    import hashlib

    for name, digest in GPT2_SHA256.items():
        assert hashlib.sha256((GPT2_FILES / name).read_bytes()).hexdigest() == digest, f"{GPT2_FILES / name} differs from OpenAI's file"
    return GPT2_FILES


@pytest.fixture(scope="session")
def tok():
    """A 300-id byte-level BPE trained on pydoc text: real merges, cheap models (the evaluation tests)."""
    from gptlab.tokenizer import Tokenizer

    return Tokenizer.train(small_text_corpus(30_000), vocab_size=300, progress=False)


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


class LoopbackServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread (the serving tests)."""

    def __init__(self, app) -> None:
        import socket
        import threading
        import time

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
