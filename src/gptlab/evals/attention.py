"""Attention maps: what each head of each layer attends to, for one text.

The model's forward pass is run unchanged (scaled_dot_product_attention never returns its
weights); forward hooks on each layer's query/key/value projection keep the queries and keys it
computed, and the weights are recomputed from them as softmax(scale * q k^T + causal mask)
(Vaswani et al. 2017, eq. 1), with the layer's own scale. So the fast path stays untouched and
the maps are the weights that path used, up to float rounding.

`gptlab attention` draws them as a grid of heatmaps (layers x heads, or the heads of one layer,
or one head large) with the tokens on both axes, and optionally as a self-contained HTML page.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import Tensor

from gptlab.errors import InputError
from gptlab.fileio import write_atomic
from gptlab.model import GPT
from gptlab.tokenizer import AnyTokenizer


@torch.no_grad()
def attention_maps(model: GPT, idx: Tensor) -> Tensor:
    """The attention probabilities of every layer and head for one sequence of token ids idx (T,):
    (n_layer, n_head, T, T), float32, row t the weights query t puts on keys 0..T-1 (0 above the diagonal)."""
    if idx.dim() != 1 or not len(idx):
        raise InputError(f"attention maps take one non-empty sequence of token ids, got shape {tuple(idx.shape)}")
    if len(idx) > model.config.block_size:
        raise InputError(f"the text has {len(idx)} tokens but the model's context is {model.config.block_size}; shorten it")
    blocks = model.transformer.h
    captured: list[tuple[Tensor, tuple[Tensor, Tensor] | None]] = []  # each layer's attention input and rotary angles

    def capture(module: torch.nn.Module, args: tuple) -> None:
        x, rope = args[0], args[3] if len(args) > 3 else None
        captured.append((x, rope))

    hooks = [block.attn.register_forward_pre_hook(capture) for block in blocks]
    was_training = model.training
    model.eval()
    try:
        model(idx[None].to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    T = len(idx)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    maps = []
    for block, (x, rope) in zip(blocks, captured, strict=True):
        q, k, _ = block.attn.heads(x, rope)  # (1, T, nh, hs), (1, T, nkv, hs): as the layer's forward made them
        k = k.repeat_interleave(q.size(2) // k.size(2), dim=2)  # each key head for the query heads that share it
        scores = torch.einsum("qhd,khd->hqk", q[0].float().cpu(), k[0].float().cpu()) * block.attn.scale  # (nh, T, T)
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(dim=-1))
    return torch.stack(maps)  # (n_layer, nh, T, T)


def token_labels(tokenizer: AnyTokenizer, ids: list[int]) -> list[str]:
    """Each token's text for an axis: spaces shown as '·', newlines and tabs escaped, bytes that are part of a
    longer character as '?'."""
    out = []
    for i in ids:
        text = tokenizer.decode_bytes([i]).decode("utf-8", errors="replace").replace("\ufffd", "?")
        out.append(text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "∅")
    return out


def select(maps: Tensor, layer: int | None, head: int | None) -> tuple[list[int], list[int]]:
    """The layers and heads to draw: all, one layer's heads, or one head; an InputError names an index out of range."""
    n_layer, n_head = maps.shape[:2]
    if layer is not None and not 0 <= layer < n_layer:
        raise InputError(f"--layer {layer} is out of range: the model has layers 0..{n_layer - 1}")
    if head is not None and not 0 <= head < n_head:
        raise InputError(f"--head {head} is out of range: the model has heads 0..{n_head - 1}")
    if head is not None and layer is None:
        raise InputError("--head needs --layer (which layer's head to draw)")
    layers = list(range(n_layer)) if layer is None else [layer]
    heads = list(range(n_head)) if head is None else [head]
    return layers, heads


def plot_attention(maps: Tensor, labels: list[str], out: str | Path, layer: int | None = None, head: int | None = None) -> Path:
    """A PNG grid of heatmaps (rows: layers, columns: heads) with the tokens on both axes; written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    layers, heads = select(maps, layer, head)
    T = len(labels)
    cell = max(2.2, min(8.0, 0.22 * T)) if len(layers) * len(heads) > 1 else max(4.0, min(16.0, 0.3 * T))
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(cell * len(heads) + 1, cell * len(layers) + 0.6), squeeze=False)
    show_ticks = T <= 64  # past that the labels overlap into a black band
    for r, lyr in enumerate(layers):
        for c, hd in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(maps[lyr, hd].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {lyr} head {hd}", fontsize=8)
            if show_ticks:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(T), labels, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.supxlabel("key (attended to)", fontsize=8)
    fig.supylabel("query", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path = Path(out)
    write_atomic(path, buffer.getvalue())
    return path


def attention_html(maps: Tensor, labels: list[str], out: str | Path, title: str) -> Path:
    """A self-contained page (no network): pick a layer and a head, hover a cell for its weight."""
    data = {"labels": labels, "maps": [[[[round(float(w), 5) for w in row] for row in head] for head in layer] for layer in maps]}
    page = _PAGE.replace("__TITLE__", json.dumps(title)[1:-1].replace("<", "&lt;")).replace("__DATA__", json.dumps(data, ensure_ascii=False).replace("</", "<\\/"))
    path = Path(out)
    write_atomic(path, page.encode())
    return path


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>attention: __TITLE__</title>
<style>
body { font: 13px sans-serif; margin: 1em; }
table { border-collapse: collapse; }
td { width: 16px; height: 16px; padding: 0; }
th { font-weight: normal; font-size: 11px; white-space: pre; }
th.col { writing-mode: vertical-rl; transform: rotate(180deg); height: auto; }
#info { margin: .5em 0; min-height: 1.2em; }
</style></head>
<body>
<h3>attention: __TITLE__</h3>
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<div id="info">rows: queries, columns: keys; hover a cell</div>
<table id="grid"></table>
<script>
const DATA = __DATA__;
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
DATA.maps.forEach((_, i) => layerSel.add(new Option(i, i)));
DATA.maps[0].forEach((_, i) => headSel.add(new Option(i, i)));
function shade(w) { const v = Math.round(255 * (1 - w)); return `rgb(${v},${v},255)`; }
function draw() {
  const m = DATA.maps[+layerSel.value][+headSel.value], labels = DATA.labels;
  const grid = document.getElementById("grid");
  grid.textContent = "";
  const top = grid.insertRow();
  top.appendChild(document.createElement("th"));
  for (const l of labels) { const th = document.createElement("th"); th.className = "col"; th.textContent = l; top.appendChild(th); }
  m.forEach((row, q) => {
    const tr = grid.insertRow();
    const th = document.createElement("th"); th.textContent = labels[q]; tr.appendChild(th);
    row.forEach((w, k) => {
      const td = tr.insertCell();
      td.style.background = k > q ? "#eee" : shade(w);
      td.title = `${labels[q]} -> ${labels[k]}: ${w.toFixed(4)}`;
      td.onmouseenter = () => { document.getElementById("info").textContent = td.title; };
    });
  });
}
layerSel.onchange = draw; headSel.onchange = draw; draw();
</script></body></html>
"""
