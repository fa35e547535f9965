"""Training throughput: gptlab's GPT against nanoGPT's model and Hugging Face's GPT2LMHeadModel, same shape, same process.

Each training step is forward + backward + optimizer step. gptlab runs its own
training step (its model and `gptlab.train.build_optimizer`); HF runs what an HF user
gets: GPT2LMHeadModel with SDPA attention and GPT-2's default activation (gelu_new),
and torch.optim.AdamW with its defaults at the same lr, betas and weight decay.
"nanoGPT" is `NanoGPT` below: nanoGPT's model (Karpathy, github.com/karpathy/nanoGPT,
model.py) as its README and code describe it, written here since nanoGPT is not a
package: pre-LN blocks of nn.LayerNorm, a fused q/k/v Linear, SDPA with is_causal,
nn.GELU (exact), the head tied to the token table and applied at every position,
F.cross_entropy over all logits, and AdamW with weight decay on the 2-D parameters
only (fused on CUDA only, as nanoGPT's configure_optimizers has it).
The runs' steps are interleaved one by one, so drift in machine speed reaches all of
them alike; only ratios from one run compare.

On CPU (the default without a GPU) the runs are gptlab/nanoGPT/HF x float32/bf16
autocast, at n_layer 6, n_head 6, n_embd 384, T 256, batch 8, and the report adds the
CPU's float32 and bf16 matmul peaks measured in the same process (torch.mm of
--cpu-matmul-size^3) and each run's model FLOP/s as a share of its precision's peak. On CUDA they are gptlab/HF in bf16
autocast, eager and (unless --no-compile) torch.compile'd, at GPT-2 124M's shape
(n_layer 12, n_head 12, n_embd 768, T 1024, batch 16) with TF32 on; the report adds
step time, MFU against the GPU's bf16 matmul peak measured in the same process, and
peak memory per run.

On CPU every run's big blocks are reused by malloc as in `gptlab train` (--malloc reuse,
gptlab.hostmem); --malloc default measures glibc as it comes, where each step faults in its
large tensors afresh.

    python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--steps N] [--warmup 3] [--repeats 1] [--malloc reuse|default] [--out results.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from gptlab.config import GPTConfig, TrainConfig
from gptlab.hf import config_to_hf, state_dict_to_hf
from gptlab.hostmem import reusing_freed_memory
from gptlab.model import GPT
from gptlab.train import build_optimizer


class Run(NamedTuple):
    impl: str  # "gptlab" or "HF"
    precision: str  # "fp32" or "bf16" (autocast)
    compiled: bool = False

    @property
    def mode(self) -> str:
        return self.precision + (" compiled" if self.compiled else "")


CPU_RUNS = tuple(Run(impl, precision) for precision in ("fp32", "bf16") for impl in ("gptlab", "nanoGPT", "HF"))
CPU_RATIOS = tuple((Run("gptlab", p), Run(peer, p)) for p in ("fp32", "bf16") for peer in ("nanoGPT", "HF")) + ((Run("gptlab", "bf16"), Run("nanoGPT", "fp32")),)
SPEED_GOAL, PEAK_GOAL = 1.5, 0.6  # the goals on CPU: >= 1.5x nanoGPT in each precision; bf16 >= 60% of the bf16 matmul peak
CUDA_RUNS = (Run("gptlab", "bf16"), Run("HF", "bf16"), Run("gptlab", "bf16", True), Run("HF", "bf16", True))
CUDA_RATIOS = ((CUDA_RUNS[0], CUDA_RUNS[1]), (CUDA_RUNS[2], CUDA_RUNS[3]), (CUDA_RUNS[2], CUDA_RUNS[1]))
MFU_GOAL = 0.5  # the goal for gptlab's compiled bf16 step on a GPU
MATMUL_ITERS, MATMUL_REPEATS = 20, 5  # the peak is the best of MATMUL_REPEATS timings of MATMUL_ITERS matmuls

# per-device defaults for the options left as None: CPU keeps the small shape this benchmark
# always had; CUDA takes GPT-2 124M and more steps, since one step there takes tens of ms
DEFAULTS = {
    "cpu": {"batch": 8, "seq_len": 256, "steps": 10, "compile": False},
    "cuda": {"batch": 16, "seq_len": 1024, "steps": 50, "compile": True},
}
SHAPES = {"cpu": {"n_layer": 6, "n_head": 6, "n_embd": 384}, "cuda": {"n_layer": 12, "n_head": 12, "n_embd": 768}}


class NanoGPT(nn.Module):
    """nanoGPT's GPT-2 model (see the module docstring): what a nanoGPT user trains, for the side-by-side step."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        C, self.n_head = cfg.n_embd, cfg.n_head
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, C), nn.Embedding(cfg.block_size, C)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln_1": nn.LayerNorm(C), "c_attn": nn.Linear(C, 3 * C), "c_proj": nn.Linear(C, C), "ln_2": nn.LayerNorm(C),
                           "c_fc": nn.Linear(C, 4 * C), "gelu": nn.GELU(), "mlp_proj": nn.Linear(4 * C, C)})  # fmt: skip
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for b in self.blocks:
            q, k, v = b["c_attn"](b["ln_1"](x)).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
            x = x + b["c_proj"](y)
            x = x + b["mlp_proj"](b["gelu"](b["c_fc"](b["ln_2"](x))))
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def optimizer(self, train_cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
        """nanoGPT's configure_optimizers: weight decay on the matrices and tables, none on biases and norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), fused=device.type == "cuda")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--steps", type=int, help="timed steps per run and repeat (default: 10 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run before timing (on CUDA these include compiling)")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds; the table reports the median")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch", type=int, help="sequences per step (default: 8 on CPU, 16 on CUDA)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence, also the model's block_size (default: 256 on CPU, 1024 on CUDA)")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="CUDA only: also time torch.compile'd models (default: on)")
    p.add_argument("--matmul-size", type=int, default=8192, help="CUDA only: M = N = K of the bf16 matmul that measures the peak")
    p.add_argument("--cpu-matmul-size", type=int, default=2048, help="CPU only: M = N = K of the matmuls that measure the CPU's peaks")
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                   help="CPU only: reuse (as gptlab's training loop runs: glibc keeps freed blocks mapped, gptlab.hostmem) or "
                        "default (glibc as it comes: every big block a fresh mmap); it applies to every run in the process")  # fmt: skip
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, help="append the markdown report to this file")
    args = p.parse_args()
    args.device = resolve_device(args.device)
    if args.device.type == "cpu" and args.compile:
        p.error("--compile applies to --device cuda only; the CPU runs are eager")
    for name, value in DEFAULTS[args.device.type].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "repeats", "threads", "batch", "seq_len", "vocab", "matmul_size", "cpu_matmul_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def resolve_device(name: str) -> torch.device:
    """The device to benchmark on; a CUDA request this machine cannot serve ends the run with one line, not a traceback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device cuda requested but CUDA is not available (torch {torch.__version__})")
        # an emulated bf16 matmul would make the measured peak, and so the MFU, meaningless
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise SystemExit(f"error: {torch.cuda.get_device_name(device)} has no native bf16 support; the CUDA runs are bf16")
    return device


def model_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token, as in PaLM (Chowdhery et al. 2022), appendix B.

    Every multiplied weight costs one multiply-add per token forward (2 FLOPs) and two
    backward (the gradients of its input and of itself, 4 FLOPs): 6 n_params. Attention's
    q.k scores and the weighted sum of values are matmuls without weights: per layer and
    token 2 x (2 seq_len n_embd) FLOPs forward, three times that with backward, so
    12 n_layer n_embd seq_len. This counts the full seq_len x seq_len score matrix although
    causal attention needs only half of it: the convention, so MFUs compare with published ones.
    n_params leaves out tables that are only looked up (the position table, and the token
    table unless tied to the output head), as GPT.num_params(non_embedding=True) counts.
    """
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def mfu(tokens_per_s: float, flops_per_token: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the model's arithmetic needs at this throughput, over the peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work; CUDA kernels run asynchronously to the Python that launches them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, size: int = 8192, iters: int = MATMUL_ITERS, repeats: int = MATMUL_REPEATS, warmup: int = 5
) -> float:
    """Best FLOP/s of a dense (size x size) @ (size x size) torch.mm over `repeats` timings of `iters` back-to-back matmuls.

    Operands are random normal: a GPU's tensor cores draw less power, and so clock
    higher, on zeros or repeated values, which would overstate the peak. The warm-up
    lets cuBLAS pick its kernel and the clocks ramp up; the best timing is the peak the
    hardware reaches, which is what MFU divides by.
    """
    if size < 1 or iters < 1 or repeats < 1:
        raise ValueError(f"size, iters and repeats must be at least 1, got {size}, {iters}, {repeats}")
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 * iters / best


def make_steps(
    cfg: GPTConfig, train_cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, seed: int, runs: tuple[Run, ...]
) -> tuple[dict[Run, Callable[[], float]], dict[str, tuple[nn.Module, torch.optim.Optimizer]], int]:
    """One step function per run, each implementation's (model, optimizer), on x's device, and the FLOPs per token.

    Both models start from the same weights. The runs of one implementation share its
    model and optimizer; a compiled run calls the model through torch.compile's wrapper,
    which holds the same parameters.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    device = x.device
    torch.manual_seed(seed)
    ours = GPT(cfg).train()
    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg), attn_implementation="sdpa")).train()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg))
    nano = NanoGPT(cfg).train()
    with torch.no_grad():  # gptlab's initial weights, by position: the same layers in the same order
        for mine, theirs in zip(nano.parameters(), ours.parameters(), strict=True):
            mine.copy_(theirs)
    ours.to(device)
    hf.to(device)
    nano.to(device)
    models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {
        "gptlab": (ours, build_optimizer(ours, train_cfg, device.type)),
        "nanoGPT": (nano, nano.optimizer(train_cfg, device)),
        "HF": (hf, torch.optim.AdamW(hf.parameters(), lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), weight_decay=train_cfg.weight_decay)),
    }
    models = {impl: m for impl, m in models.items() if any(r.impl == impl for r in runs)}
    compiled = {impl: torch.compile(model) for impl, (model, _) in models.items() if any(r.impl == impl and r.compiled for r in runs)}

    def autocast(precision: str):
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step(run: Run) -> float:
        model, opt = models[run.impl]
        forward = compiled[run.impl] if run.compiled else model
        with autocast(run.precision):
            if run.impl == "gptlab":
                _, loss = forward(x, y)
            elif run.impl == "nanoGPT":
                loss = forward(x, y)
            else:
                loss = forward(input_ids=x, labels=x).loss  # HF shifts the labels inside: the same next-token targets as y
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # also waits for the step's queued GPU work, so wall time around step() times all of it

    flops_per_token = model_flops_per_token(ours.num_params(non_embedding=True), cfg.n_layer, cfg.n_embd, x.size(1))
    return {run: (lambda r=run: step(r)) for run in runs}, models, flops_per_token


def measure(steps: dict[Run, Callable[[], float]], n_steps: int, tokens_per_step: int) -> dict[Run, float]:
    """Tokens/s of each run over n_steps, the runs' steps interleaved."""
    elapsed = dict.fromkeys(steps, 0.0)
    for _ in range(n_steps):
        for run, step in steps.items():
            t0 = time.perf_counter()
            step()
            elapsed[run] += time.perf_counter() - t0
    return {run: n_steps * tokens_per_step / seconds for run, seconds in elapsed.items()}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def peak_memory(steps: dict[Run, Callable[[], float]], models: dict[str, tuple[nn.Module, torch.optim.Optimizer]], device: torch.device) -> dict[Run, int]:
    """Bytes each run would hold at its peak if it ran alone on the CUDA device, from one more step per run.

    All models live on the device at once, so torch.cuda.max_memory_allocated alone would
    count the other runs' weights too. Per run: the step's peak above what was allocated
    before it (activations, gradients, workspaces), plus its own model's weights and
    AdamW state, which outlive steps.
    """
    resident = {impl: tensor_bytes(model.parameters()) + tensor_bytes(v for s in opt.state.values() for v in s.values()) for impl, (model, opt) in models.items()}
    peaks = {}
    for run, step in steps.items():
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        peaks[run] = torch.cuda.max_memory_allocated(device) - before + resident[run.impl]
    return peaks


def report(cfg: GPTConfig, args: argparse.Namespace, rounds: list[dict[Run, float]], flops_per_token: int, peaks: dict[str, float]) -> str:
    median = {run: statistics.median(r[run] for r in rounds) for run in CPU_RUNS}
    lines = [
        f"### Training throughput: n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}, T {cfg.block_size}, "
        f"batch {args.batch}, vocab {cfg.vocab_size}",
        "",
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s); {args.warmup} warm-up + {args.steps} timed steps per run, steps interleaved; "
        f"median of {len(rounds)} round(s); malloc {args.malloc} for every run"
        + (" (glibc keeps freed blocks mapped for reuse, as `gptlab train` sets it: gptlab.hostmem)" if args.malloc == "reuse" else " (glibc's defaults)"),
        "",
        f"Matmul peaks measured in the same process (best of {MATMUL_REPEATS} x {MATMUL_ITERS} torch.mm of {args.cpu_matmul_size}^3): "
        f"float32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s. Model FLOPs per token: {flops_per_token:,} "
        "(6 N + 12 L C T, PaLM appendix B).",
        "",
        "| implementation | precision | tokens/s | min-max over rounds | model GFLOP/s | share of the precision's matmul peak |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run in CPU_RUNS:
        values = [r[run] for r in rounds]
        gflops = median[run] * flops_per_token / 1e9
        lines.append(f"| {run.impl} | {run.precision} | {median[run]:,.0f} | {min(values):,.0f}-{max(values):,.0f} | {gflops:.1f} | "
                     f"{gflops * 1e9 / peaks[run.precision]:.0%} |")  # fmt: skip
    lines += ["", "| ratio | value |", "|---|---:|"]
    for a, b in CPU_RATIOS:
        lines.append(f"| {a.impl} {a.precision} / {b.impl} {b.precision} | {median[a] / median[b]:.2f}x |")
    speed = {p: median[Run("gptlab", p)] / median[Run("nanoGPT", p)] for p in ("fp32", "bf16")}
    share = median[Run("gptlab", "bf16")] * flops_per_token / peaks["bf16"]
    lines += ["", f"Goals: gptlab >= {SPEED_GOAL}x nanoGPT in fp32 ({speed['fp32']:.2f}x: {'met' if speed['fp32'] >= SPEED_GOAL else 'not met'}) "
              f"and bf16 ({speed['bf16']:.2f}x: {'met' if speed['bf16'] >= SPEED_GOAL else 'not met'}); gptlab bf16 >= {PEAK_GOAL:.0%} of the bf16 "
              f"matmul peak ({share:.0%}: {'met' if share >= PEAK_GOAL else 'not met'})"]  # fmt: skip
    return "\n".join(lines) + "\n"


def cuda_report(
    cfg: GPTConfig,
    args: argparse.Namespace,
    rounds: list[dict[Run, float]],
    flops_per_token: int,
    peak_flops: float,
    memory: dict[Run, int],
) -> str:
    runs = list(rounds[0])
    median = {run: statistics.median(r[run] for r in rounds) for run in runs}
    tokens_per_step = args.batch * args.seq_len
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Training throughput on CUDA: n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}, T {cfg.block_size}, "
        f"batch {args.batch}, vocab {cfg.vocab_size}",
        "",
        f"{torch.cuda.get_device_name(args.device)}, {date}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformers {__import__('transformers').__version__}; bf16 autocast, TF32 on; {args.warmup} warm-up + {args.steps} timed "
        f"steps per run, steps interleaved; median of {len(rounds)} round(s)",
        "",
        f"Measured bf16 matmul peak: {peak_flops / 1e12:.1f} TFLOP/s (best of {MATMUL_REPEATS} x {MATMUL_ITERS} torch.mm of {args.matmul_size}^3). "
        f"Model FLOPs per token: {flops_per_token:,} (6 N + 12 L C T, PaLM appendix B). "
        "Peak memory: the step's peak allocation above what was allocated before it, plus the run's own weights and AdamW state.",
        "",
        "| implementation | mode | tokens/s | min-max over rounds | step ms | model TFLOP/s | MFU | peak memory GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        values = [r[run] for r in rounds]
        lines.append(
            f"| {run.impl} | {run.mode} | {median[run]:,.0f} | {min(values):,.0f}-{max(values):,.0f} | {tokens_per_step / median[run] * 1e3:.1f} | "
            f"{median[run] * flops_per_token / 1e12:.1f} | {mfu(median[run], flops_per_token, peak_flops):.1%} | {memory[run] / 2**30:.2f} |"
        )
    lines += ["", "| ratio | value |", "|---|---:|"]
    for a, b in CUDA_RATIOS:
        if a in median and b in median:
            lines.append(f"| {a.impl} {a.mode} / {b.impl} {b.mode} | {median[a] / median[b]:.2f}x |")
    goal_run = [run for run in runs if run.impl == "gptlab"][-1]  # the compiled one unless --no-compile
    achieved = mfu(median[goal_run], flops_per_token, peak_flops)
    verdict = "met" if achieved >= MFU_GOAL else "not met"
    lines += ["", f"MFU goal (gptlab {goal_run.mode} >= {MFU_GOAL:.0%} of the measured peak): {verdict}, {achieved:.1%}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    with reusing_freed_memory(args.device.type == "cpu" and args.malloc == "reuse"):
        run(args)


def run(args: argparse.Namespace) -> None:
    device = args.device
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # TF32 for the float32 matmuls autocast leaves in float32, as gptlab's trainer sets it on CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        runs = tuple(run for run in CUDA_RUNS if args.compile or not run.compiled)
    else:
        runs = CPU_RUNS
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq_len, **SHAPES[device.type])
    train_cfg = TrainConfig(batch_size=args.batch, seed=args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(args.seed))
    x, y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)
    steps, models, flops_per_token = make_steps(cfg, train_cfg, x, y, args.seed, runs)
    for run, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            print(f"warm-up {run.impl} {run.mode}: {time.perf_counter() - t0:.1f} s", flush=True)
    rounds = []
    for r in range(args.repeats):
        rounds.append(measure(steps, args.steps, x.numel()))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{run.impl} {run.mode} {v:,.0f} tok/s" for run, v in rounds[-1].items()), flush=True)
    if device.type == "cuda":
        memory = peak_memory(steps, models, device)
        peak_flops = matmul_peak_flops(device, torch.bfloat16, size=args.matmul_size)
        text = cuda_report(cfg, args, rounds, flops_per_token, peak_flops, memory)
    else:
        peaks = {name: matmul_peak_flops(device, dtype, size=args.cpu_matmul_size) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        text = report(cfg, args, rounds, flops_per_token, peaks)
    print(text)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
