"""Weight-only quantization: bits per byte, decode speed and size of float32, bfloat16, int8 and int4, with torchao side by side.

    python benchmarks/quantize.py [--ckpt runs/demo/run ...] [--data runs/demo/data] [--rounds 3] [--new 64] [--out FILE]

Quality: for each --ckpt, bits per byte on the validation split of --data (up to --eval-tokens
tokens) for every variant: float32; bfloat16 weights; gptlab int8 (per output channel); gptlab
int4 at group sizes 32, 64 and 128; int8 and int4/128 with the head kept in float; torchao's
Int8WeightOnlyConfig and int4 weight-only at group 128 (PrototypeInt4WeightOnlyConfig in 0.18, its CPU form) on a
bfloat16 copy of the same model (their kernels' fast path), when torchao is installed.
Speed: decode tokens/s at batch 1 and 8 (greedy, prompt 16, --new new tokens) through gptlab's
Engine, for each checkpoint's model and for the GPT-2 124M shape (12 x 768, vocabulary 50257,
random weights: speed does not depend on the values). Float Linears (float32, bfloat16, a head kept
in float) run the kernels the Engine measures fastest at start-up on this CPU, as gptlab's commands
do; quantized ones gptlab's native kernels (QuantLinear's "auto"), and the "torch packed" rows the
same codes through torch's packed kernels, layer by layer; the variants' rounds are interleaved and the
table keeps the median, and each ratio is the median over rounds of the variant's speed over float32's in the
same round (the host's memory speed drifts ~2x within minutes). Size: model.safetensors as `gptlab quantize` writes it (float32: the
checkpoint's; bfloat16: its state dict in bfloat16; torchao: not written, its tensors' bytes).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_model

from gptlab.checkpoint import MODEL_FILE, load_checkpoint
from gptlab.compress.quantize import QuantConfig, quantize_checkpoint, quantize_model, set_kernel, weight_bytes
from gptlab.config import GPTConfig, SampleConfig
from gptlab.data import load_data
from gptlab.evaluate import evaluate_split
from gptlab.generate import Engine, cpu_name
from gptlab.model import GPT

GPTLAB = {
    "int8": QuantConfig("int8"),
    "int4/32": QuantConfig("int4", 32),
    "int4/64": QuantConfig("int4", 64),
    "int4/128": QuantConfig("int4", 128),
    "int8, head float": QuantConfig("int8", head=False),
    "int4/128, head float": QuantConfig("int4", 128, head=False),
}


def torchao_variants() -> dict[str, Callable[[GPT], GPT]]:
    """torchao's weight-only configs, applied to a copy of the model, or nothing when torchao is missing."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}

    # both on a bfloat16 copy: its CPU kernels' fast path (float32 activations take a path 5-20x slower)
    def int8(model: GPT) -> GPT:
        quantize_(model.to(torch.bfloat16), Int8WeightOnlyConfig())
        return model

    def int4(model: GPT) -> GPT:
        # 0.18's CPU int4 is the prototype "opaque" tensor on _weight_int4pack_mm_for_cpu, whose packing needs
        # a multiple of 16 output rows: a layer without (GPT-2's 50257-row head) stays in bfloat16
        quantize_(model.to(torch.bfloat16), PrototypeInt4WeightOnlyConfig(group_size=128),
                  filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.out_features % 16 == 0)  # fmt: skip
        return model

    return {"torchao int8": int8, "torchao int4/128": int4}


def variants(base: GPT) -> dict[str, Callable[[], tuple[GPT, torch.dtype | None]]]:
    """name -> a builder of (model, the Engine's dtype); each builds on its own copy of base."""
    out: dict[str, Callable[[], tuple[GPT, torch.dtype | None]]] = {
        "float32": lambda: (base, None),
        "bfloat16": lambda: (base, torch.bfloat16),
    }
    for name, cfg in GPTLAB.items():
        out[name] = lambda cfg=cfg: (quantized(base, cfg), None)
    for name in TORCH_PACKED:  # the same codes through torch's packed kernels, layer by layer: what the native ones replace
        out[f"{name}, torch packed"] = lambda name=name: (quantized(base, GPTLAB[name]), None)
    for name, apply in torchao_variants().items():
        out[name] = lambda apply=apply: (apply(copy.deepcopy(base)), None)
    return out


TORCH_PACKED = ("int8", "int4/128")


def quantized(base: GPT, cfg: QuantConfig) -> GPT:
    model = copy.deepcopy(base)
    quantize_model(model, cfg)
    return model


def engine_for(name: str, model: GPT, dtype: torch.dtype | None, batches: list[int]) -> Engine:
    if name.endswith("torch packed"):
        set_kernel(model, "packed")
        engine = Engine(model, dtype=dtype, tune=batches)
        engine.decoder = None  # the layers through their modules, so that the QuantLinears run torch's kernels
        return engine
    if not name.startswith("torchao"):
        # the float Linears (all of them, or a head kept in float) on the kernels measured fastest here, as gptlab's
        # commands pick them; QuantLinears run gptlab's native kernels at a few rows, in the one-call decode step
        return Engine(model, dtype=dtype, tune=batches)
    return Engine(model, dtype=dtype, onednn=False)  # torchao's tensor subclasses under F.linear


def decode_speed(engines: dict[str, Engine], vocab: int, batches: list[int], new: int, rounds: int) -> dict[int, dict[str, list[float]]]:
    """Tokens/s of every engine in every round, per batch size: rounds interleaved (the order reversed every other round),
    so that the host's drift in memory speed reaches all alike; ratio() compares within a round."""
    cfg = SampleConfig(max_new_tokens=new, temperature=0.0, ignore_eot=True)
    out = {}
    for B in batches:
        prompt = torch.randint(0, vocab, (B, 16), generator=torch.Generator().manual_seed(B)).tolist()
        for e in engines.values():  # warm-up: packing, allocator
            e.generate([p[:4] for p in prompt], cfg.replace(max_new_tokens=4))
        runs: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(rounds):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for name in order:
                t0 = time.perf_counter()
                engines[name].generate(prompt, cfg)
                runs[name].append(B * new / (time.perf_counter() - t0))
        out[B] = runs
        print(f"  batch {B}: " + ", ".join(f"{n} {statistics.median(v):.1f}" for n, v in runs.items()) + " tokens/s", flush=True)
    return out


def speed_cell(runs: dict[str, list[float]], name: str) -> str:
    """The median tokens/s and the median over rounds of this variant's speed over float32's in the same round."""
    ratio = statistics.median(a / b for a, b in zip(runs[name], runs["float32"], strict=True))
    return f"{statistics.median(runs[name]):.1f} ({ratio:.2f}x)"


def disk_size(name: str, src: Path, model: GPT, work: Path) -> float | None:
    """MiB of model.safetensors for this variant."""
    work.mkdir(parents=True, exist_ok=True)
    if name == "float32":
        return (src / MODEL_FILE).stat().st_size / 2**20
    if name == "bfloat16":
        path = work / "bf16.safetensors"
        save_model(copy.deepcopy(model).to(torch.bfloat16), str(path))
        return path.stat().st_size / 2**20
    if name in GPTLAB:
        out, _, _ = quantize_checkpoint(src, work / name.replace("/", "-").replace(", ", "-").replace(" ", "-"), GPTLAB[name])
        return (out / MODEL_FILE).stat().st_size / 2**20
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", nargs="*", default=["runs/demo/run"], help="trained checkpoints (run or checkpoint directories); none: only the 124M speed table")
    p.add_argument("--data", default="runs/demo/data", help="prepared data directory whose val split is scored")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new", type=int, default=64, help="new tokens per row in the speed runs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-124m", action="store_true", help="skip the GPT-2 124M-shape speed table")
    p.add_argument("--out", type=Path, help="append the markdown tables here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}; decode: greedy, prompt 16, {args.new} new tokens, median of {args.rounds} interleaved rounds "
        "(ratios: the median of per-round ratios to float32)"
    ]
    data = load_data(args.data) if args.ckpt else None
    work = Path(tempfile.mkdtemp(prefix="gptlab_quantbench_"))
    for i, ckpt_arg in enumerate(args.ckpt):
        loaded = load_checkpoint(ckpt_arg)
        base = loaded.model.eval()
        c = base.config
        print(f"{loaded.path}: {c.n_layer} x {c.n_embd}, vocabulary {c.vocab_size}", flush=True)
        rows: dict[str, dict] = {}
        engines = {}
        for name, build in variants(base).items():
            model, dtype = build()
            scored = copy.deepcopy(model).to(dtype) if dtype is not None else model
            t0 = time.perf_counter()
            bpb = evaluate_split(scored, data, "val", batch_size=8, max_tokens=args.eval_tokens)["bpb"]
            rows[name] = {"bpb": bpb, "MiB": disk_size(name, loaded.path, base, work / str(i)), "eval_s": time.perf_counter() - t0,
                          "weights": weight_bytes(scored) / 2**20}  # fmt: skip
            engines[name] = engine_for(name, model, dtype, args.batches)
            print(f"  {name}: bpb {bpb:.5f} ({rows[name]['eval_s']:.1f} s)", flush=True)
        speed = decode_speed(engines, c.vocab_size, args.batches, args.new, args.rounds)
        ref = rows["float32"]["bpb"]
        lines += ["", f"**{loaded.path}** ({c.n_layer} layers x {c.n_embd}, vocabulary {c.vocab_size}, {base.num_params(non_embedding=False) / 1e6:.1f}M parameters); "
                  f"bpb on {args.data} val, {args.eval_tokens:,} tokens", "",
                  "| variant | bits per byte | vs float32 | model.safetensors | " + " | ".join(f"decode tok/s, batch {B}" for B in args.batches) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(args.batches)]  # fmt: skip
        for name, r in rows.items():
            size = f"{r['MiB']:.1f} MiB" if r["MiB"] is not None else f"({r['weights']:.1f} MiB in memory)"
            tps = " | ".join(speed_cell(speed[B], name) for B in args.batches)
            lines.append(f"| {name} | {r['bpb']:.4f} | {100 * (r['bpb'] / ref - 1):+.2f}% | {size} | {tps} |")
        del engines
    if not args.no_124m:
        torch.manual_seed(0)
        base = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)).eval()
        print("GPT-2 124M shape, random weights", flush=True)
        engines = {name: engine_for(name, *build(), args.batches) for name, build in variants(base).items()}
        speed = decode_speed(engines, 50257, args.batches, args.new, args.rounds)
        lines += ["", "**GPT-2 124M shape** (12 x 768, vocabulary 50257, random weights): decode speed", "",
                  "| variant | weights in memory | " + " | ".join(f"decode tok/s, batch {B}" for B in args.batches) + " |",
                  "|---|---:|" + "---:|" * len(args.batches)]  # fmt: skip
        for name, e in engines.items():
            tps = " | ".join(speed_cell(speed[B], name) for B in args.batches)
            lines.append(f"| {name} | {weight_bytes(e.model) / 2**20:.1f} MiB | {tps} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
