"""Generation engine: KV-cached prefill and decode for batches of requests.

A prompt is run through the model once (prefill), filling a KV cache allocated at full
length; each new token then costs one single-position forward pass (decode) instead of
a pass over the whole prefix. Prompts of different lengths share a batch: rows are
right-padded for the prefill, and from then on each row writes and attends at its own
positions, stopping on its own.

Sampling controls are small pure functions over (B, V) logits, composed per row by
`SamplingControls`. Text comes out through the tokenizer's `TextStream`, so streamed pieces are
always whole characters. With a draft model, speculative decoding (Leviathan et al.
2023; Chen et al. 2023) proposes several tokens with the draft and verifies them in one
target pass; greedy output is that of the target alone, and sampled output follows the
target's distribution.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import itertools
import json
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.config import SampleConfig
from gptlab.errors import ConfigError, InputError
from gptlab import kernels as native
from gptlab.kernels import MAX_ROWS as NATIVE_MAX_ROWS
from gptlab.kernels import cache_dir
from gptlab.model import GPT, CacheStep, KVCache
from gptlab.tokenizer import EOT, AnyTokenizer, TextStream

# ----------------------------------------------------------------------------- sampling controls
# Each takes (B, V) float logits and a number, or a (B, 1) tensor with one value per row.


def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    return logits / temperature


def top_k_filter(logits: Tensor, k: int | Tensor) -> Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept), the rest -> -inf.

    A (B, 1) k gives each row its own k; k >= V keeps the whole row.
    """
    V = logits.size(-1)
    if isinstance(k, int):
        k = min(k, V)
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    else:
        k = k.clamp(max=V)
        top = torch.topk(logits, int(k.max()), dim=-1).values  # (B, kmax)
        kth = top.gather(-1, k - 1)  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float | Tensor) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability mass reaches p; the most likely token is always kept."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float | Tensor) -> Tensor:
    """Keep tokens whose probability is at least min_p times the top token's (Nguyen et al. 2024).

    p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p), so no softmax is needed.
    """
    floor = logits.amax(dim=-1, keepdim=True) + torch.log(torch.as_tensor(min_p, dtype=logits.dtype, device=logits.device))
    return logits.masked_fill(logits < floor, float("-inf"))


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float | Tensor) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019) on tokens already seen (B, V bool): a positive logit
    is divided by the penalty and a negative one multiplied, so both become less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: float | Tensor, frequency: float | Tensor) -> Tensor:
    """OpenAI's penalties: logit - frequency * count - presence * [count > 0], counts (B, V) over the output."""
    return logits - frequency * counts - presence * (counts > 0)


def apply_logit_bias(logits: Tensor, bias: Tensor) -> Tensor:
    return logits + bias


_ARGMAX_CHUNK = 256


def greedy_argmax(logits: Tensor) -> Tensor:
    """torch.argmax over the last dim of (B, V) logits (the first index among equal maxima, NaN
    counted as the maximum), faster on CPU.

    PyTorch's CPU argmax runs a scalar loop (1.8 ms for 32 x 50257 float32 here) while amax is
    vectorised: so take the max of each chunk of 256 logits, find the first chunk holding the
    row's maximum, and run argmax inside that chunk only (0.4 ms; the same indices).
    """
    B, V = logits.shape
    C = _ARGMAX_CHUNK
    if logits.device.type != "cpu" or V < 4 * C:
        return logits.argmax(-1)
    full = V // C * C
    best = logits[:, :full].reshape(B, V // C, C).amax(-1)  # (B, V // C): each chunk's maximum
    if full < V:
        best = torch.cat([best, logits[:, full:].amax(-1, keepdim=True)], dim=1)  # the short last chunk
    chunk = best.argmax(-1)  # (B,): the first chunk holding the row's maximum
    # a short last chunk is padded with copies of the row's last logit, which come after it: argmax still finds the first
    index = (chunk[:, None] * C + torch.arange(C, device=logits.device)).clamp_(max=V - 1)  # (B, C)
    return chunk * C + logits.gather(1, index).argmax(-1)


def upcast_logits(logits: Tensor) -> Tensor:
    """Logits in at least float32 for the sampling arithmetic; float64 stays float64."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def accept_or_resample(p: Tensor, q: Tensor, draft: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """The speculative sampling rule for one position of each row.

    p, q (B, V): target and draft distributions; draft (B,): the draft's token; u (B,): uniform
    draws. The token is accepted when u <= p(x)/q(x); otherwise a replacement is due from
    norm(max(0, p - q)). Together the two give exactly p (Leviathan et al. 2023, theorem 1).
    Returns (accepted (B,) bool, residual distribution (B, V)).
    """
    px = p.gather(-1, draft[:, None]).squeeze(-1)
    qx = q.gather(-1, draft[:, None]).squeeze(-1)
    accepted = (px > 0) & (u * qx <= px)  # u <= p/q without dividing; p(x) = 0 always rejects, whatever u
    residual = (p - q).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # zero mass means p == q, where no draft token is ever rejected; p keeps the row valid
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
    return accepted, residual


# ----------------------------------------------------------------------------- CPU linear kernel


class OneDNNLinear(nn.Module):
    """An nn.Linear computed by oneDNN's linear kernel, its weight and bias shared, not copied.

    F.linear on CPU goes to a BLAS GEMM, which reads the (out, in) weight slowly at decode
    shapes; oneDNN's kernel reads the same float32 weight faster (measured at batch 1:
    0.31 vs 0.65 ms for 768 -> 2304, 6.5 vs 12.5 ms for the 768 -> 50257 head; in bf16 the
    two are even, so only float32 uses it). Same function, float32 sums in another order.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def onednn_applies(model: GPT) -> bool:
    """Whether `with_onednn_linears` speeds `model` up: float32 weights on a CPU whose PyTorch has oneDNN."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def with_onednn_linears(model: GPT) -> GPT:
    """A view of `model` for inference: the same parameters and buffers (no copy), every Linear an OneDNNLinear."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, shared).eval()  # the memo hands back every tensor itself: only modules are new
    for module in list(view.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, OneDNNLinear(child))
    return view


class KernelPlan:
    """Which kernel the TunedLinears of one model run for x with M rows: kernels[i] for M <= sizes[i]
    (the last one for more). One plan is shared by all of a model's layers, so a measurement can
    switch every layer at once. times: the measured seconds per decode step, {M: {kernel: s}}."""

    def __init__(self, sizes: Sequence[int], kernel: str) -> None:
        self.sizes = sorted(set(sizes))
        self.kernels = [kernel] * len(self.sizes)
        self.times: dict[int, dict[str, float]] = {}
        self.gemm = "blas"  # for many rows where the plan says "native": a kernel that needs no weight copy

    def pick(self, rows: int) -> str:
        kernel = self.kernels[min(bisect.bisect_left(self.sizes, rows), len(self.sizes) - 1)]
        # past the sizes measured, a prompt's prefill say, the native matrix-vector kernel would do one row at a time
        return self.gemm if kernel == "native" and rows > NATIVE_MAX_ROWS else kernel


def mkl_packed_applies(model: GPT) -> bool:
    """Whether MKL's packed GEMM can run `model`'s Linears: float32 weights on a CPU whose PyTorch has MKL."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


def onednn_packed_applies(model: GPT) -> bool:
    """Whether oneDNN can run `model`'s Linears on a weight reordered into its own blocked layout: float32, or
    bfloat16 where this CPU has bf16 instructions."""
    p = next(model.parameters())
    if p.device.type != "cpu" or not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class TunedLinear(nn.Module):
    """An nn.Linear computed by the kernel its KernelPlan names for the rows at hand: "blas" (F.linear),
    "onednn" (as OneDNNLinear), "transposed" (a GEMM on a contiguous (in, out) copy of the weight),
    "packed" (MKL's GEMM on a copy of the weight packed once for it, cblas_sgemm_pack, as PyTorch's
    compiler does for frozen CPU weights: 1.4 vs 3.6 ms for the 256 -> 50257 head at 8 rows on a
    Xeon; the packed copy takes ~2.7x the weight's memory there) or "onednn-packed" (oneDNN's kernel
    on a copy reordered once into its blocked layout, as the compiler does for bfloat16 weights) or
    "native" (gptlab's own matrix-vector kernel, kernels/decode.cpp, for a few rows: it reads the weight
    at the rate of a streaming sum, where the others reach 40-75% of it at one row). The copies are
    made only when the plan uses them, and do not follow later changes to the weight: this is for
    models that stay fixed, as a served one does. The same function, its sums in another order."""

    def __init__(self, linear: nn.Linear, plan: KernelPlan) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.plan = plan
        self.weight_t: Tensor | None = None
        self.weight_packed: Tensor | None = None
        self.weight_onednn: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.plan.pick(x.numel() // x.size(-1))
        if kernel == "native":
            return native.gemv(x.contiguous(), self.weight, self.bias)
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if kernel == "onednn-packed":
            assert self.weight_onednn is not None, "a plan names the reordered kernel only after tune_linears made the copies"
            return torch.ops.mkldnn._linear_pointwise(x, self.weight_onednn, self.bias, "none", [], "")
        if kernel == "blas":
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.size(-1))  # (M, in)
        if kernel == "transposed":
            assert self.weight_t is not None, "a plan names the transposed kernel only after tune_linears made the copies"
            out = torch.mm(rows, self.weight_t) if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)  # (M, out)
        else:
            assert kernel == "packed" and self.weight_packed is not None, kernel
            # the packed buffer's size does not depend on the row count it was packed for, and passing the actual
            # count makes _mkl_linear use it (tune_linears checks the logits against F.linear's at every size)
            out = torch.ops.mkl._mkl_linear(rows, self.weight_packed, self.weight, self.bias, rows.size(0))  # (M, out)
        return out.view(*x.shape[:-1], out.size(-1))

    def native_weights(self) -> tuple[Tensor, Tensor | None, None, None]:
        """What kernels.decode_layers takes for this Linear: the weight and bias (no scales or zero points)."""
        return self.weight, self.bias, None, None

    def make_copies(self, kernels: Sequence[str]) -> None:
        """The weight copies `kernels` need, and no others."""
        w = self.weight.detach()
        self.weight_t = w.t().contiguous() if "transposed" in kernels else None  # (in, out)
        # packed for the plan's largest row count: that layout measured fast at fewer rows too (6.8-8.8 ms per
        # step at 8 rows with a pack for 32, 8.6-10.5 with a pack for 1), while a pack for 8 was slow at 32
        rows = self.plan.sizes[-1]
        self.weight_packed = torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), rows) if "packed" in kernels else None
        self.weight_onednn = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows) if "onednn-packed" in kernels else None


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor"), for figures and kernel plans."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_plan_cache() -> Path:
    """Where measured kernel plans are kept: kernel_plans.json in gptlab's cache directory (gptlab.kernels.cache_dir)."""
    return cache_dir() / "kernel_plans.json"


def _plan_key(model: GPT, sizes: Sequence[int], kernels: Sequence[str], tuned: Sequence[TunedLinear]) -> str:
    """What a measured plan depends on: the machine, the software (gptlab's own kernels' source included), the threads, the
    model's shapes and dtype, which of its layers are float Linears (a quantized model of the same shape has fewer), the batch sizes."""
    p = next(model.parameters())
    what = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(p.device), "dtype": str(p.dtype),
            "model": model.config.to_dict(), "linears": [list(t.weight.shape) + [str(t.weight.dtype)] for t in tuned],
            "sizes": sorted(set(sizes)), "kernels": list(kernels),
            "native": native.source_digest() if "native" in kernels else None}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _cached_plan(path: Path, key: str, kernels: Sequence[str], sizes: Sequence[int]) -> tuple[list[str], dict[int, dict[str, float]]] | None:
    """The kernels and step times a plan file holds for `key`, or None (no file, unreadable, another layout: measure again)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get("plans", {}).get(key)
        picked, ms = entry["kernels"], entry["ms_per_step"]
        times = {int(M): {k: float(v) / 1e3 for k, v in ms[str(M)].items()} for M in sizes}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return None
    if isinstance(picked, list) and len(picked) == len(sizes) and all(k in kernels for k in picked):
        return picked, times
    return None


def _store_plan(path: Path, key: str, plan: KernelPlan) -> None:
    """Add a measured plan to the file (atomically; a plan file that cannot be written only costs a measurement next time)."""
    from gptlab.fileio import write_atomic

    try:
        plans = json.loads(path.read_text(encoding="utf-8")).get("plans", {}) if path.is_file() else {}
        plans = plans if isinstance(plans, dict) else {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        plans = {}
    plans[key] = {"kernels": plan.kernels, "sizes": plan.sizes, "cpu": cpu_name(), "ms_per_step": {str(M): {k: round(v * 1e3, 3) for k, v in t.items()} for M, t in plan.times.items()},
                  "measured": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps({"version": 1, "plans": plans}, indent=1) + "\n").encode())
    except OSError:
        pass


def measured_kernels(device: torch.device, batch: int) -> dict[str, object]:
    """Engine arguments that run a CPU's Linear layers with the kernels measured fastest on this machine for the model at
    this batch size: measured once, then read from the plan cache. What sample, chat and evaluate use; nothing elsewhere."""
    return {"tune": (batch,), "plan_cache": default_plan_cache()} if device.type == "cpu" else {}


def native_applies(model: GPT) -> bool:
    """Whether gptlab's own matrix-vector kernel can run `model`'s Linears: float32 or bfloat16 weights on a CPU, and the
    kernel built (or buildable) here."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16) and native.load()


def native_cached_attention(step: CacheStep, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """A CacheStep's attention for one layer by gptlab's kernel: k, v (B, T, n_kv_head, hs) stored at the step's
    slots, q (B, nh, T, hs) attending under its mask (grouped-query heads included); what update() and SDPA compute (a step's mask always lets a
    query see its own key). SDPA's CPU kernels spend most of a batch-1 step's attention on set-up: 21 vs 15 us
    a layer in float32 and 110 vs 15 in bfloat16 for 12 heads over 144 keys (AMD EPYC), plus two index_put calls."""
    assert step.slots is not None and step.mask is not None, "only steps placed at per-row positions have slots and a mask"
    return native.cached_attention(q, k, v, step.cache.k[layer], step.cache.v[layer], step.slots, step.mask, scale)


# the activations and norms decode.cpp's decode_layers computes (model._activation's and _norm's names)
NATIVE_ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu", "relu2")


class NativeDecoder:
    """A decode step of a tuned view (tune_linears) with its layers in one native call, kernels.decode_layers: the token
    embedding in PyTorch, then every block and the final norm in decode.cpp, then the head.

    The native matrix-vector kernel reads the weights at the memory's rate, and at batch 1 the ~15 other operator
    calls a layer (norms, activation, residual adds, views, the cache step's attention call) cost 1.3-2.9 ms a token
    for the 124M shape on the AMD EPYC: 10-20% of a step that should be all weight reading, and more for a quantized
    model, whose weights take fewer bytes. For views whose every block Linear can hand decode_layers its weights
    (`native_weights`: a TunedLinear in the model's dtype, or a weight-only quantized QuantLinear) and whose norms
    and activation decode.cpp knows: `applies`. Hidden states stay in float32 between layers (see decode.cpp), so
    bfloat16 results differ from PyTorch's bfloat16 path by that path's own rounding; float32 ones by summation order.
    """

    def __init__(self, view: GPT) -> None:
        assert self.applies(view), "NativeDecoder needs a tuned view (NativeDecoder.applies)"
        cfg = view.config
        self.view = view
        self.params: list[Tensor | None] = []
        for block in view.transformer.h:
            attn, mlp = block.attn, block.mlp
            norms = (block.ln_1, attn.q_norm, attn.k_norm, block.ln_2) if cfg.qk_norm else (block.ln_1, None, None, block.ln_2)
            for norm in norms:
                self.params += [None, None] if norm is None else [norm.weight, getattr(norm, "bias", None)]
            for linear in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj):
                self.params += linear.native_weights()
        ln_f = view.transformer["ln_f"] if "ln_f" in view.transformer else None
        self.params += [None, None] if ln_f is None else [ln_f.weight, getattr(ln_f, "bias", None)]
        self.scales = [float(block.attn.scale) for block in view.transformer.h]
        self.settings = (cfg.n_head, cfg.norm, cfg.activation, cfg.mlp == "gated", cfg.norm_placement == "pre", float(cfg.layer_norm_eps))

    @staticmethod
    def applies(view: GPT) -> bool:
        """Whether `view` (a tune_linears view) can decode through decode_layers: on CPU with the kernels built, its blocks'
        Linears all able to hand over their weights (float ones contiguous in the model's dtype, float32 or bfloat16;
        quantized ones as stored), its norms affine, its activation one decode.cpp computes."""
        cfg = view.config
        dtype = view.transformer.h[0].ln_1.weight.dtype
        if cfg.activation not in NATIVE_ACTIVATIONS or dtype not in (torch.float32, torch.bfloat16) or not native_applies(view):
            return False
        for block in view.transformer.h:
            for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                if not hasattr(linear, "native_weights"):
                    return False  # a plain nn.Linear, a LoRA wrapper: the view's own forward runs them
                weight, bias = linear.native_weights()[:2]
                if not weight.is_contiguous() or weight.dtype not in (dtype, torch.int8, torch.uint8) or (bias is not None and bias.dtype != dtype):
                    return False
        norms = [m for m in view.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
        return all(m.weight is not None and m.weight.dtype == dtype and m.eps == cfg.layer_norm_eps for m in norms)

    def __call__(self, idx: Tensor, step: CacheStep) -> Tensor:
        """Logits (B, T, V) for idx (B, T) at the step's per-row positions, as view.forward_cached(idx, step) computes them."""
        assert step.positions is not None and step.slots is not None and step.mask is not None, "a decode step has per-row positions"
        x, rope = self.view.embed(idx, step.positions)  # (B, T, C); RoPE's angles (B, T, hs)
        h = native.decode_layers(x.contiguous(), self.params, step.cache.k, step.cache.v, step.slots, step.mask, rope, self.scales, *self.settings)
        return self.view.lm_head(h)  # (B, T, V)


def tune_linears(model: GPT, sizes: Sequence[int], rounds: int = 3, calls: int = 5, plan_cache: Path | None = None) -> tuple[GPT, KernelPlan]:
    """A view of `model` for inference whose Linears run, for each batch size in `sizes`, the kernel that
    made a whole decode step fastest when measured here, now (its dropout layers, no-ops in eval mode, gone).

    The fastest GEMM for decode shapes depends on the CPU and on the number of rows (on one Xeon,
    oneDNN's kernel took 6.1 ms per step of a 16M-parameter model at batch 1 where BLAS took 3.4,
    while at batch 32 BLAS on a transposed weight copy was fastest), so it is measured rather than
    fixed: whole decode steps, each of TunedLinear's kernels in turn for every layer, the best of
    `rounds` timings of `calls` steps, after checking that the kernel gives F.linear's logits. The
    kernels are measured one after another, each with only its own weight copies made, so the
    measurement never holds more than the weights and one copy (MKL's packed one: ~2.7x).
    Whole steps, because timing one layer alone in a loop misleads: the 256 -> 50257 head at 8
    rows took 2.0 ms on the transposed copy and 3.4 with BLAS when repeated, while whole steps
    with it were faster with BLAS (its weight is no longer in the caches when its turn comes).
    With `plan_cache` (a JSON file, see default_plan_cache) a plan measured before for the same
    machine, software, threads, model shape and batch sizes is reused instead of measured again,
    and a new measurement is added to it.
    """
    kernels = ["blas", "transposed"] + (["onednn"] if onednn_applies(model) else []) + (["packed"] if mkl_packed_applies(model) else [])
    kernels += ["onednn-packed"] if onednn_packed_applies(model) else []
    kernels += ["native"] if native_applies(model) else []
    plan = KernelPlan(sizes, "blas")
    # a 16-token prefill of the 124M shape in float32: 24 ms with oneDNN, 51 with BLAS (in bfloat16 they are even)
    plan.gemm = "onednn" if "onednn" in kernels else "blas"
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, shared).eval()  # new modules over the same tensors
    tuned: list[TunedLinear] = []
    for module in list(view.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                tuned.append(TunedLinear(child, plan))
                setattr(module, name, tuned[-1])
            elif isinstance(child, nn.Dropout):
                setattr(module, name, nn.Identity())  # a no-op in eval mode that still costs ~2.7 us a call, 25 calls a token
    key = _plan_key(model, sizes, kernels, tuned) if plan_cache is not None else ""
    known = _cached_plan(plan_cache, key, kernels, plan.sizes) if plan_cache is not None else None
    if known is not None:  # measured here before, for this model's shape: no measurement
        try:
            for layer in tuned:
                layer.make_copies(known[0])
            plan.kernels, plan.times = known
            return view, plan
        except RuntimeError:
            pass  # its packed copies fail now (another MKL build under the same version?): measure
    p = next(model.parameters())
    kv = min(64, model.config.block_size)
    # weight-only quantized layers: their kernels round activations to bfloat16 or not (compress/quantize.py), so a
    # quantized model's logits agree between paths only to bfloat16's rounding
    quantized = any(getattr(m, "inference_only", False) for m in model.modules())
    steps = []
    with torch.no_grad():
        for M in plan.sizes:
            cache = KVCache(model.config, M, kv, p.dtype, p.device)
            step = CacheStep(cache, 1, torch.full((M,), kv - 1, device=p.device), kv)  # one token at the last slot
            idx = torch.zeros(M, 1, dtype=torch.long, device=p.device)
            plan.kernels = ["blas"] * len(plan.sizes)
            steps.append((idx, step, view.forward_cached(idx, step)))  # the logits every kernel must compute
        times: dict[int, dict[str, float]] = {M: {} for M in plan.sizes}
        # one kernel's weight copies at a time, so measuring never holds more than the weights and one copy of them
        for kernel in kernels:
            try:
                for layer in tuned:
                    layer.make_copies([kernel])
            except RuntimeError:
                if kernel not in ("packed", "onednn-packed"):
                    raise
                continue  # a build that refuses to pack: measure the others
            # "native" decodes as the Engine will run it: every layer in one call where NativeDecoder applies (whose
            # quantized layers read the codes natively, where the module-by-module path may run torch's packed kernels)
            run = NativeDecoder(view) if kernel == "native" and NativeDecoder.applies(view) else view.forward_cached
            for M, (idx, step, want) in zip(plan.sizes, steps, strict=True):
                if (kernel == "native" and M > NATIVE_MAX_ROWS) or not _close(run, plan, kernel, idx, step, want, quantized):
                    continue
                run(idx, step)  # warm-up: first calls allocate
                for _ in range(rounds):
                    _synchronize(p.device)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        run(idx, step)
                    _synchronize(p.device)  # a GPU runs the calls after they return
                    times[M][kernel] = min(times[M].get(kernel, float("inf")), (time.perf_counter() - t0) / calls)
    plan.times = times
    plan.kernels = [min(times[M], key=times[M].__getitem__) for M in plan.sizes]
    for layer in tuned:
        layer.make_copies(plan.kernels)
    if plan_cache is not None:
        _store_plan(plan_cache, key, plan)
    return view, plan


def _close(run: Callable[[Tensor, CacheStep], Tensor], plan: KernelPlan, kernel: str, idx: Tensor, step: CacheStep, want: Tensor,
           quantized: bool = False) -> bool:  # fmt: skip
    """Whether `kernel` in every layer gives `want`'s logits through `run` (a view's forward_cached, or a NativeDecoder),
    to the summation-order error of the model's dtype (float32: 1e-4 relative; 16-bit floats round each layer's output
    to 8 or 11 bits, so a few of their steps; a quantized model's kernels may round activations to bfloat16)."""
    plan.kernels = [kernel] * len(plan.sizes)
    got = run(idx, step).float()
    tol = 1e-4 if want.dtype == torch.float32 and not quantized else 3e-2
    return bool(torch.allclose(got, want.float(), rtol=tol, atol=tol * float(want.abs().max())))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- per-request state


class TokenHistory:
    """Which tokens each row has seen (prompt and output) and how often each was output."""

    def __init__(self, prompts: Sequence[Sequence[int]], V: int, device: torch.device) -> None:
        self.seen = torch.zeros(len(prompts), V, dtype=torch.bool, device=device)
        for b, ids in enumerate(prompts):
            self.seen[b, torch.tensor(ids, device=device)] = True
        self.counts = torch.zeros(len(prompts), V, device=device)

    def add(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        rows = torch.arange(tokens.size(0), device=tokens.device) if rows is None else rows
        self.seen[rows, tokens] = True
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)

    def plus(self, tokens: Tensor) -> TokenHistory:
        out = copy.copy(self)
        out.seen, out.counts = self.seen.clone(), self.counts.clone()
        out.add(tokens)
        return out


class SamplingControls:
    """The sampling settings of a batch of requests as per-row tensors, and drawing with them."""

    def __init__(self, cfgs: Sequence[SampleConfig], V: int, device: torch.device) -> None:
        col = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device)[:, None]  # noqa: E731
        self.greedy = torch.tensor([c.greedy for c in cfgs], device=device)
        self.all_greedy = all(c.greedy for c in cfgs)
        self.temperature = col([c.temperature if not c.greedy else 1.0 for c in cfgs])
        self.top_k = col([c.top_k or V for c in cfgs], torch.long) if any(c.top_k for c in cfgs) else None
        self.top_p = col([c.top_p or 1.0 for c in cfgs]) if any(c.top_p is not None and c.top_p < 1 for c in cfgs) else None
        self.min_p = col([c.min_p or 0.0 for c in cfgs]) if any(c.min_p for c in cfgs) else None
        self.repetition = col([c.repetition_penalty for c in cfgs]) if any(c.repetition_penalty != 1 for c in cfgs) else None
        self.presence = col([c.presence_penalty for c in cfgs])
        self.frequency = col([c.frequency_penalty for c in cfgs])
        self.counted = any(c.presence_penalty or c.frequency_penalty for c in cfgs)
        self.bias = None
        if any(c.logit_bias for c in cfgs):
            self.bias = torch.zeros(len(cfgs), V, device=device)
            for b, c in enumerate(cfgs):
                for tid, value in (c.logit_bias or {}).items():
                    self.bias[b, tid] = value
        self.generators = [None if c.seed is None else torch.Generator(device=device).manual_seed(c.seed) for c in cfgs]

    @property
    def needs_history(self) -> bool:
        return self.repetition is not None or self.counted

    def adjust(self, logits: Tensor, hist: TokenHistory | None) -> Tensor:
        """Bias and penalties: what shapes the distribution before greedy or sampling choose."""
        if self.bias is not None:
            logits = apply_logit_bias(logits, self.bias)
        if hist is not None and self.repetition is not None:
            logits = apply_repetition_penalty(logits, hist.seen, self.repetition)
        if hist is not None and self.counted:
            logits = apply_presence_frequency(logits, hist.counts, self.presence, self.frequency)
        return logits

    def probs(self, logits: Tensor, hist: TokenHistory | None) -> Tensor:
        """The distribution each row draws from, (B, V); one-hot on the argmax for greedy rows."""
        logits = self.adjust(logits, hist)
        onehot = torch.zeros_like(logits).scatter_(-1, greedy_argmax(logits)[:, None], 1.0)
        if self.all_greedy:
            return onehot
        logits = apply_temperature(logits, self.temperature)
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p is not None:
            logits = min_p_filter(logits, self.min_p)
        return torch.where(self.greedy[:, None], onehot, torch.softmax(logits, dim=-1))

    def draw(self, probs: Tensor) -> Tensor:
        """One token per row from (B, V) probabilities, each row with its own generator."""
        if self.all_greedy:
            return greedy_argmax(probs)
        if all(g is None for g in self.generators):
            return torch.multinomial(probs, 1).squeeze(-1)
        return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(self.generators)])

    def next_tokens(self, logits: Tensor, hist: TokenHistory | None) -> Tensor:
        if self.all_greedy:
            return greedy_argmax(self.adjust(logits, hist))
        return self.draw(self.probs(logits, hist))

    def uniform(self, n: int, device: torch.device) -> Tensor:
        """(B, n) uniform draws from each row's generator."""
        return torch.stack([torch.rand(n, generator=g, device=device) for g in self.generators])


# ----------------------------------------------------------------------------- results


@dataclass
class TokenEvent:
    """One generated token of one row, as the stream yields it.

    text is the new text this token completes ("" while a character is still incomplete,
    and for a stop token); logprob is the token's log-probability under the model's own
    distribution (before sampling controls); top_logprobs the n most likely (id, logprob)
    when asked for; finish_reason "stop" or "length" on a row's last event.
    """

    row: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    draft_proposed: int = 0
    draft_accepted: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of draft tokens the target accepted; None without a draft model."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else None


class _RowText:
    """A row's decoded text, cut at the first stop string; gives out only text no stop string can still claim."""

    def __init__(self, stream: TextStream | None, stops: tuple[str, ...]) -> None:
        self.stream = stream
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.sent = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """Text given out for this token, and whether a stop string ended the row."""
        if self.stream is None:
            return "", False
        before = len(self.text)
        self.text += self.stream.push(token_id)
        if self._cut(before):
            return self._send(len(self.text)), True
        # hold back a tail that could be the start of a stop string
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self._send(len(self.text) - hold), False

    def finish(self) -> str:
        if self.stream is None:
            return ""
        before = len(self.text)
        self.text += self.stream.flush()
        self._cut(before)
        return self._send(len(self.text))

    def _cut(self, before: int) -> bool:
        if not self.stops:
            return False
        start = max(0, before - self.longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _send(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


# ----------------------------------------------------------------------------- engine


def _window(block_size: int) -> int:
    """Tokens a row keeps when its context is full and the window slides: 3/4 of the context."""
    return max(1, block_size - max(1, block_size // 4))


class Engine:
    """Batched, KV-cached generation from a GPT, optionally with a draft model.

    dtype: None keeps the model's; another dtype (torch.bfloat16 halves the bytes read per
    token, which bound decoding at small batches) runs a private copy cast to it. onednn:
    compute the Linear layers with oneDNN's kernel (`OneDNNLinear`, sharing the weights)
    where that applies, float32 on CPU; None does so unless compiling. static keeps
    every decode step's shapes fixed (attention over the whole cache, masked), as
    torch.compile and CUDA graphs want; compile=True also compiles the decode step.
    tune: batch sizes at which to measure the Linear kernels now and use the fastest at each
    (`tune_linears`; for a server, whose batch size varies), in place of the onednn rule; the
    plan is `self.plan`; plan_cache, a file of plans measured before (`default_plan_cache()`), skips
    the measurement when it holds one for this machine and model shape. Where the plan runs gptlab's
    native kernel (a few rows), decode steps run every layer in one native call (`self.decoder`,
    a NativeDecoder). The model passed in is never changed. The draft model must share the
    tokenizer; draft_tokens is how many tokens it proposes per step.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: AnyTokenizer | None = None,
        *,
        draft: GPT | None = None,
        draft_tokens: int = 4,
        dtype: torch.dtype | None = None,
        onednn: bool | None = None,
        static: bool = False,
        compile: bool = False,
        tune: Sequence[int] = (),
        plan_cache: Path | None = None,
    ) -> None:
        if tune and (onednn is not None or compile):
            raise ConfigError("tune measures the Linear kernels itself: do not also set onednn or compile")
        if any(not isinstance(M, int) or M < 1 for M in tune):
            raise ConfigError(f"tune takes batch sizes >= 1, got {list(tune)}")
        if onednn is None:
            onednn = not compile and not tune
        self.model = self._prepare(model, dtype, onednn)
        self.plan: KernelPlan | None = None
        if tune:
            self.model, self.plan = tune_linears(self.model, tune, plan_cache=plan_cache)
        # decode steps' attention and cache writes in one native call where the kernels are built, as for the Linears
        self.attention = native_cached_attention if tune and native_applies(self.model) else None
        # and, where the view allows, a decode step's layers in one native call
        self.decoder = NativeDecoder(self.model) if self.attention is not None and NativeDecoder.applies(self.model) else None
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.V = tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size
        if self.V > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {self.V} ids but the model only {model.config.vocab_size}")
        self.draft = None
        if draft is not None:
            if draft.config.vocab_size < self.V:
                raise ConfigError(f"the draft model has {draft.config.vocab_size} ids, fewer than the tokenizer's {self.V}")
            if not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= 16:
                raise ConfigError(f"draft_tokens must be an integer in [1, 16], got {draft_tokens!r}")
            if next(draft.parameters()).device != self.device:
                raise ConfigError(f"the draft model is on {next(draft.parameters()).device} but the model on {self.device}")
            self.draft = self._prepare(draft, self.dtype, onednn)
        self.draft_tokens = draft_tokens
        self.static = static or compile
        self._decode = torch.compile(self.model.forward_cached, dynamic=False) if compile else self.model.forward_cached
        self.stats = GenerationStats()

    @staticmethod
    def _prepare(model: GPT, dtype: torch.dtype | None, onednn: bool) -> GPT:
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model = copy.deepcopy(model).to(dtype)
        if onednn and onednn_applies(model):
            model = with_onednn_linears(model)
        return model

    # ------------------------------------------------------------------ public

    def generate(self, prompts: Sequence[str | Sequence[int]], cfg: SampleConfig | Sequence[SampleConfig]) -> list[Completion]:
        """Run the requests to the end; one Completion per prompt, in order."""
        out = [Completion() for _ in prompts]
        for ev in self.stream(prompts, cfg):
            c = out[ev.row]
            c.token_ids.append(ev.token_id)
            c.text += ev.text
            if ev.logprob is not None:
                c.logprobs = c.logprobs if c.logprobs is not None else []
                c.logprobs.append(ev.logprob)
            if ev.top_logprobs is not None:
                c.top_logprobs = c.top_logprobs if c.top_logprobs is not None else []
                c.top_logprobs.append(ev.top_logprobs)
            if ev.finish_reason is not None:
                c.finish_reason = ev.finish_reason
        return out

    def stream(self, prompts: Sequence[str | Sequence[int]], cfg: SampleConfig | Sequence[SampleConfig]) -> Iterator[TokenEvent]:
        """TokenEvents as tokens are generated (rows interleaved); `self.stats` counts the run.

        prompts are strings (encoded with the tokenizer) or lists of token ids; cfg is one
        SampleConfig for all or one per prompt. Bad requests raise here, before any work.
        """
        ids, cfgs = self._check(prompts, cfg)
        return self._guarded(ids, cfgs)

    def _guarded(self, ids: list[list[int]], cfgs: list[SampleConfig]) -> Iterator[TokenEvent]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield from self._run(ids, cfgs)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ checks

    def _check(self, prompts: Sequence[str | Sequence[int]], cfg: SampleConfig | Sequence[SampleConfig]) -> tuple[list[list[int]], list[SampleConfig]]:
        if isinstance(prompts, str) or not len(prompts):
            raise InputError("prompts must be a non-empty list of strings or token-id lists")
        cfgs = [cfg] * len(prompts) if isinstance(cfg, SampleConfig) else list(cfg)
        if len(cfgs) != len(prompts):
            raise ConfigError(f"{len(cfgs)} sample configs for {len(prompts)} prompts")
        block = self.model.config.block_size
        ids: list[list[int]] = []
        for i, (p, c) in enumerate(zip(prompts, cfgs, strict=True)):
            name = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise InputError("text prompts need a tokenizer; pass token ids or give the Engine one")
                p = self.tokenizer.encode(p)
            p = [int(t) for t in p]
            if not p:
                raise InputError(f"{name} is empty; start it with a token such as {EOT}")
            bad = [t for t in p if not 0 <= t < self.V]
            if bad:
                raise InputError(f"{name} has token id {bad[0]} outside [0, {self.V})")
            if len(p) > block:
                if c.context_overflow == "error":
                    raise InputError(f"{name} has {len(p)} tokens but the model's context (block_size) is {block}; shorten it or let the window slide (context_overflow='slide', or --sliding-window)")
                p = p[-_window(block) :]
            if c.stop and self.tokenizer is None:
                raise ConfigError("stop strings need a tokenizer to decode the text")
            if any(t >= self.V for t in c.stop_token_ids):
                raise ConfigError(f"stop_token_ids {list(c.stop_token_ids)} has an id outside [0, {self.V})")
            if c.logit_bias and max(c.logit_bias) >= self.V:
                raise ConfigError(f"logit_bias token id {max(c.logit_bias)} is out of range [0, {self.V})")
            ids.append(p)
        return ids, cfgs

    # ------------------------------------------------------------------ the loop

    def _cache_len(self, ids: list[list[int]], cfgs: list[SampleConfig]) -> int:
        """Positions the run can use: the last fed token of a row is its (max_new_tokens - 1)-th new one."""
        block = self.model.config.block_size
        if any(c.context_overflow == "slide" for c in cfgs):
            return block
        extra = self.draft_tokens if self.draft is not None else 0
        return min(block, max(len(p) + c.max_new_tokens - 1 + extra for p, c in zip(ids, cfgs, strict=True)))

    # prefill and step, with SamplingControls, TokenHistory and RowProgress, are the parts a scheduler composes
    # when requests come and go between steps (gptlab.serve.scheduler); `_run` composes them for one batch

    def prefill(self, model: GPT, cache: KVCache, rows: list[int], seqs: list[list[int]]) -> Tensor:
        """Fill cache rows `rows` with the keys and values of `seqs` (from position 0); logits at each one's end, (n, V).

        A prompt asked several times (n samples of one prompt, a GRPO group) is run once and its keys and
        values copied to each of its rows: the forward pass is most of a prefill, the copy a small part.
        """
        index_of: dict[tuple[int, ...], int] = {}
        inverse = [index_of.setdefault(tuple(s), len(index_of)) for s in seqs]  # row -> its distinct prompt
        distinct = [list(s) for s in index_of]
        n, T = len(distinct), max(len(s) for s in distinct)
        idx = torch.zeros(n, T, dtype=torch.long, device=self.device)  # right padding; the causal mask hides it
        for i, s in enumerate(distinct):
            idx[i, : len(s)] = torch.tensor(s, device=self.device)
        last = torch.tensor([len(s) - 1 for s in distinct], device=self.device)
        if n == len(seqs) == cache.batch_size:
            return model.forward_cached(idx, CacheStep(cache, T, None, T), last)
        part = KVCache(model.config, n, T, cache.k.dtype, self.device)
        logits = model.forward_cached(idx, CacheStep(part, T, None, T), last)  # (n, V)
        index = torch.tensor(rows, device=self.device)
        pick = torch.tensor(inverse, device=self.device) if n < len(seqs) else slice(None)  # distinct prompt -> its rows
        cache.k[:, index, :, :T] = part.k[:, pick]  # (n_layer, len(rows), nh, T, hs)
        cache.v[:, index, :, :T] = part.v[:, pick]
        return logits[pick]

    def step(self, model: GPT, cache: KVCache, idx: Tensor, start: list[int], decode: bool = False) -> Tensor:
        """Logits (B, T, V) for idx (B, T) placed at per-row positions start[b]...; decode: the target's one-token step, compiled if asked."""
        T = idx.size(1)
        kv_len = cache.max_len if self.static else max(start) + T
        step = CacheStep(cache, T, torch.tensor(start, device=self.device), kv_len)
        step.attention = self.attention
        if self.decoder is not None and model is self.model and self.plan is not None and self.plan.pick(idx.numel()) == "native":
            return self.decoder(idx, step)  # few rows, where the plan runs the native kernel in every Linear
        return (self._decode if decode else model.forward_cached)(idx, step)

    def _run(self, ids: list[list[int]], cfgs: list[SampleConfig]) -> Iterator[TokenEvent]:
        t0 = time.perf_counter()
        self.stats = GenerationStats(prompt_tokens=sum(map(len, ids)))
        S = self._cache_len(ids, cfgs)
        rows = RowProgress(ids, cfgs, S, self.tokenizer, self.stats)
        ctl = SamplingControls(cfgs, self.V, self.device)
        hist = TokenHistory(ids, self.V, self.device) if ctl.needs_history else None
        B, block = len(ids), self.model.config.block_size
        cache = KVCache(self.model.config, B, S, self.dtype, self.device)
        dcache = KVCache(self.draft.config, B, S, self.dtype, self.device) if self.draft is not None else None
        try:
            logits = upcast_logits(self.prefill(self.model, cache, list(range(B)), ids)[:, : self.V])  # (B, V)
            if dcache is not None:
                self.prefill(self.draft, dcache, list(range(B)), ids)
            # the first token of every row comes from the prefill
            yield from self._sample_and_emit(logits, list(range(B)), ctl, hist, rows, fed=False)
            while any(rows.active):
                # a row whose next token has no slot left slides its window (rows that may not
                # slide were ended by rows.emit when they filled the context)
                for r in range(B):
                    if rows.active[r] and rows.cached[r] >= S:
                        keep = rows.seqs[r][-_window(block) :][:-1]  # the newest token is fed below, as every step
                        self.prefill(self.model, cache, [r], [keep])
                        if dcache is not None:
                            self.prefill(self.draft, dcache, [r], [keep])
                        rows.cached[r] = len(keep)
                live = [r for r in range(B) if rows.active[r]]
                # finished rows still ride along in the batch, writing to early slots nobody reads
                start = [rows.cached[r] if rows.active[r] else min(1, S - 1) for r in range(B)]
                pending = torch.tensor([seq[-1] for seq in rows.seqs], device=self.device)
                gamma = 0
                if dcache is not None:
                    room = S - 1 - max(start[r] for r in live)
                    left = max(cfgs[r].max_new_tokens - rows.made[r] for r in live) - 1
                    gamma = max(0, min(self.draft_tokens, room, left))
                if gamma == 0:
                    logits = upcast_logits(self.step(self.model, cache, pending[:, None], start, decode=True)[:, 0, : self.V])  # (B, V)
                    yield from self._sample_and_emit(logits, live, ctl, hist, rows, fed=True)
                else:
                    assert dcache is not None
                    yield from self._speculate(gamma, start, pending, live, ctl, hist, rows, cache, dcache)
        finally:
            self.stats.seconds = time.perf_counter() - t0

    def _sample_and_emit(self, logits: Tensor, live: list[int], ctl: SamplingControls, hist: TokenHistory | None, rows: RowProgress, fed: bool) -> Iterator[TokenEvent]:
        """One ordinary step: a token for each live row from its (B, V) logits; fed: the step put one more token in the cache."""
        toks = ctl.next_tokens(logits, hist)
        lps = torch.log_softmax(logits, -1) if rows.want_logprobs else None
        for r in live:
            yield rows.emit(r, int(toks[r]), None if lps is None else lps[r])
            rows.cached[r] += fed
        if hist is not None:
            index = torch.tensor(live, device=self.device)
            hist.add(toks[index], index)

    def _speculate(
        self, gamma: int, start: list[int], pending: Tensor, live: list[int], ctl: SamplingControls, hist: TokenHistory | None, rows: RowProgress, cache: KVCache, dcache: KVCache
    ) -> Iterator[TokenEvent]:
        """One round of speculative decoding: the draft proposes gamma tokens per row, the target checks them in one pass."""
        assert self.draft is not None
        V, dev, B = self.V, self.device, pending.size(0)
        # the draft re-reads the token before the pending one: after a round where all gamma
        # proposals were accepted, the last proposal was never fed to it
        prev = torch.tensor([seq[-2] for seq in rows.seqs], device=dev)
        dlogits = upcast_logits(self.step(self.draft, dcache, torch.stack([prev, pending], 1), [s - 1 for s in start])[:, -1, :V])
        h = hist
        proposals, qs = [], []
        for i in range(gamma):
            q = ctl.probs(dlogits, h)  # (B, V)
            x = ctl.draw(q)
            proposals.append(x)
            qs.append(q)
            if h is not None:
                h = h.plus(x)
            if i + 1 < gamma:
                dlogits = upcast_logits(self.step(self.draft, dcache, x[:, None], [s + 1 + i for s in start])[:, 0, :V])
        xs = torch.stack(proposals, 1)  # (B, gamma)
        out = upcast_logits(self.step(self.model, cache, torch.cat([pending[:, None], xs], 1), start)[:, :, :V])  # (B, gamma+1, V)
        lps = torch.log_softmax(out, -1) if rows.want_logprobs else None
        h = hist
        ps = []  # the target's distribution after the pending token and after each proposal
        for i in range(gamma + 1):
            ps.append(ctl.probs(out[:, i], h))
            if h is not None and i < gamma:
                h = h.plus(xs[:, i])
        u = torch.zeros(B, gamma, device=dev) if ctl.all_greedy else ctl.uniform(gamma, dev)
        n_ok = torch.full((B,), gamma, dtype=torch.long, device=dev)
        final = torch.empty(B, dtype=torch.long, device=dev)
        decided = torch.zeros(B, dtype=torch.bool, device=dev)
        for i in range(gamma):
            ok, residual = accept_or_resample(ps[i], qs[i], xs[:, i], u[:, i])
            reject = ~ok & ~decided  # the first rejection of a row ends its run of accepted proposals
            if bool(reject.any()):
                n_ok[reject] = i
                final[reject] = ctl.draw(residual)[reject]
            decided |= reject
        if not bool(decided.all()):
            bonus = ctl.draw(ps[gamma])  # every proposal accepted: one more token from the target
            final[~decided] = bonus[~decided]
        n_list, final_list, xs_list = n_ok.tolist(), final.tolist(), xs.tolist()
        for r in live:
            n = n_list[r]
            self.stats.draft_proposed += gamma
            self.stats.draft_accepted += n
            for i, tok in enumerate(xs_list[r][:n] + [final_list[r]]):
                yield rows.emit(r, tok, None if lps is None else lps[r, i])
                if hist is not None:
                    hist.add(torch.tensor([tok], device=dev), torch.tensor([r], device=dev))
                if not rows.active[r]:
                    break
            rows.cached[r] = start[r] + n + 1  # the pending token and the accepted proposals


class RowProgress:
    """Per-row progress of a run: tokens, cache fill, text, and when each row is done."""

    def __init__(self, ids: list[list[int]], cfgs: list[SampleConfig], S: int, tokenizer: AnyTokenizer | None, stats: GenerationStats) -> None:
        self.cfgs = cfgs
        self.S = S
        self.stats = stats
        self.seqs = [list(p) for p in ids]  # every row's tokens, prompt and output
        self.cached = [len(p) for p in ids]  # how many of the row's tokens the KV cache holds
        self.made = [0] * len(ids)
        self.active = [True] * len(ids)
        self.texts = [_RowText(None if tokenizer is None else tokenizer.stream(p), c.stop) for p, c in zip(ids, cfgs, strict=True)]
        eot = tokenizer.special_tokens.get(EOT) if tokenizer is not None else None
        self.stop_ids = [set(c.stop_token_ids) | ({eot} if eot is not None and not c.ignore_eot else set()) for c in cfgs]
        self.want_logprobs = any(c.logprobs is not None for c in cfgs)

    def emit(self, r: int, tok: int, lp: Tensor | None) -> TokenEvent:
        """Record token `tok` of row r (lp: the log-probabilities it was drawn at) and make its event."""
        cfg = self.cfgs[r]
        self.seqs[r].append(tok)
        self.made[r] += 1
        self.stats.new_tokens += 1
        finish = None
        if tok in self.stop_ids[r]:
            text, finish = self.texts[r].finish(), "stop"
        else:
            text, hit = self.texts[r].add(tok)
            if hit:
                finish = "stop"
            elif self.made[r] >= cfg.max_new_tokens or (cfg.context_overflow == "error" and len(self.seqs[r]) - 1 >= self.S):
                # out of tokens, or the context is full: the next token would have no position
                text, finish = text + self.texts[r].finish(), "length"
        ev = TokenEvent(r, tok, text, finish_reason=finish)
        if lp is not None and cfg.logprobs is not None:
            ev.logprob = float(lp[tok])
            if cfg.logprobs:
                vals, top = torch.topk(lp, cfg.logprobs)
                ev.top_logprobs = list(zip(top.tolist(), vals.tolist(), strict=True))
        if finish is not None:
            self.active[r] = False
        return ev


def generate(model: GPT, prompts: Sequence[str | Sequence[int]], cfg: SampleConfig, tokenizer: AnyTokenizer | None = None) -> list[Completion]:
    """One-call generation: `Engine(model, tokenizer).generate(prompts, cfg)`."""
    return Engine(model, tokenizer).generate(prompts, cfg)


@torch.no_grad()
def generate_uncached(model: GPT, prompt: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy tokens (B, max_new_tokens) by recomputing the whole prefix every step: no cache, same-length prompts.

    The slow reference the cached engine is tested and benchmarked against.
    """
    idx = prompt
    for _ in range(max_new_tokens):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # (B, T+1)
    return idx[:, prompt.size(1) :]
