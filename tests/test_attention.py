"""Attention maps: the weights are the model's own (softmax(scale q k^T + causal mask) recomputed by hand from
the checkpoint's weights, rows summing to 1, nothing above the diagonal), the forward pass is left as it
was, and `gptlab attention` writes the PNG and a self-contained page or refuses bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import randomize_, small_text_corpus
from gptlab.checkpoint import save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.evals.attention import attention_maps, token_labels
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

VARIANTS = [
    {},  # GPT-2: pre-LN, learned positions
    {"norm_placement": "post", "pos_encoding": "sinusoidal"},  # GPT-1's post-LN; fixed sinusoids
    {"scale_attn_by_inverse_layer_idx": True},  # a per-layer scale the maps must use too
]


def by_hand(model: GPT, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """softmax(scale q k^T + causal mask) of one layer, (nh, T, T), from the weights: the layers below run as blocks."""
    cfg, T = model.config, len(idx)
    table = model.pos_table if cfg.pos_encoding == "sinusoidal" else model.transformer.wpe.weight
    x = model.transformer.wte.weight[idx] + table[:T]  # (T, C)
    for block in model.transformer.h[:layer]:
        x = block(x[None])[0]
    block = model.transformer.h[layer]
    h = block.ln_1(x) if cfg.norm_placement == "pre" else x
    qkv = h @ block.attn.c_attn.weight.T + block.attn.c_attn.bias  # (T, 3C)
    nh, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    q = qkv[:, : cfg.n_embd].view(T, nh, hs).transpose(0, 1)  # (nh, T, hs)
    k = qkv[:, cfg.n_embd : 2 * cfg.n_embd].view(T, nh, hs).transpose(0, 1)
    scale = hs**-0.5 / ((layer + 1) if cfg.scale_attn_by_inverse_layer_idx else 1)
    scores = q @ k.transpose(1, 2) * scale  # (nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


@pytest.mark.parametrize("variant", VARIANTS, ids=["gpt2", "gpt1-sinusoidal", "inverse-layer-scale"])
def test_maps_are_the_models_own_weights(variant: dict) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=4, n_embd=32, **variant))
    randomize_(model, seed=1, scale=0.3)  # weights large enough that the heads attend unevenly
    model.train()  # the maps are taken in eval mode and the mode is put back
    idx = torch.randint(0, 64, (17,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.eval()(idx[None])[0]
    model.train()
    maps = attention_maps(model, idx)
    assert maps.shape == (3, 4, 17, 17) and model.training
    assert torch.allclose(maps.sum(-1), torch.ones(3, 4, 17), atol=1e-6)
    assert (maps.triu(1) == 0).all()  # causal
    assert (maps[:, :, 1:].amax(-1) < 0.99).float().mean() > 0.5  # most rows past the first spread their weight
    with torch.no_grad():
        for layer in range(3):
            torch.testing.assert_close(maps[layer], by_hand(model.eval(), idx, layer), rtol=0, atol=1e-5)
        assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone
        assert torch.equal(model.eval()(idx[None])[0], before)  # the forward pass is the one it was


def test_attention_command_writes_the_png_and_a_self_contained_page(tmp_path: Path, capsys) -> None:
    tok = Tokenizer.train(small_text_corpus(20_000), vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "run", 0, model, model.config, tok)
    text = "Return a list of the words\tin it."
    argv = ["attention", "--ckpt", str(tmp_path / "run"), "--text", text, "--out", str(tmp_path / "a.png"), "--html", str(tmp_path / "a.html")]
    assert main(argv) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "a.html").read_text()
    labels = token_labels(tok, tok.encode(text))
    assert "".join(labels).replace("·", " ").replace("\\t", "\t") == text
    assert all(f'"{label}"' in page.replace("\\\\", "\\") for label in labels) and "http" not in page  # no CDN: it opens offline
    assert main([*argv[:5], "--out", str(tmp_path / "h.png"), "--layer", "1", "--head", "0"]) == 0
    capsys.readouterr()
    for extra, message in ((["--layer", "2"], "--layer 2 is out of range: the model has layers 0..1"), (["--head", "1"], "--head needs --layer"),
                           (["--text", "word " * 40], "the model's context is 32")):  # fmt: skip
        args = [*argv[:3], "--text", text, "--out", str(tmp_path / "bad.png"), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.png").exists()
