"""gptlab serve against `transformers serve` (Hugging Face's OpenAI-compatible server) on the same model, same load.

* Model: GPT-2 shaped, random weights (seed 0; default 4 layers x 256 wide, context 1024, GPT-2's tokenizer:
  ~16M parameters), saved as a gptlab checkpoint and exported with `export_hf` for the peer.
* Servers, one at a time on loopback, each alone on the machine while measured: `gptlab serve --max-batch 32`;
  `transformers serve --continuous-batching` with its KV cache capped (--cb-num-blocks 256 --cb-block-size 32
  --cb-max-batch-tokens 1024; uncapped it reserves most of the RAM); `transformers serve` without batching.
* Load: at each concurrency C, C clients each send streaming /v1/completions requests back to back (prompt
  from a fixed list, max_tokens --tokens, temperature 0) until --requests requests have finished. Output
  tokens/s is the output tokens of all requests over the wall time; latency and time to first token
  (first non-empty text chunk) per request, p50 / p95. The load generator is this process (asyncio + httpx).

    .venv/bin/python benchmarks/serve.py                       # concurrency 1, 8, 32
    .venv/bin/python benchmarks/serve.py --servers gptlab --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["Return the", "The module provides", "def f(x):", "class Foo", "import os\n", "Hello there", "A list of", "Write the"]


def make_model(work: Path, layers: int, width: int) -> tuple[Path, Path]:
    import torch

    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import GPTConfig
    from gptlab.hf import export_hf
    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=layers, n_head=max(1, width // 64), n_embd=width)
    ckpt = save_checkpoint(work / "run", 0, GPT(cfg), cfg, Tokenizer.gpt2())
    return ckpt, export_hf(ckpt, work / "hf")


def start(kind: str, ckpt: Path, hf: Path, port: int, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    bin_dir = Path(sys.executable).parent
    if kind == "gptlab":
        cmd = [str(bin_dir / "gptlab"), "serve", "--ckpt", str(ckpt), "--port", str(port), "--max-batch", "32", "--dtype", "float32", "--model-name", "m"]
        model = "m"
    else:
        cmd = [str(bin_dir / "transformers"), "serve", str(hf), "--port", str(port), "--device", "cpu", "--dtype", "float32"]
        if kind == "hf-batching":
            cmd += ["--continuous-batching", "--cb-num-blocks", "256", "--cb-block-size", "32", "--cb-max-batch-tokens", "1024"]
        model = str(hf)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, model


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    t0 = time.time()
    async with httpx.AsyncClient() as c:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if (await c.get(url + "/health", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout} s")


async def one(c, url: str, model: str, prompt: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    first, n_chunks, usage = None, 0, None
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with c.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    n_chunks += 1
                    first = first or time.perf_counter()
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": usage["completion_tokens"] if usage else n_chunks, "counted": usage is None}


async def load(url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict:
    import httpx

    results: list[dict] = []
    next_i = 0

    async def worker(c) -> None:
        nonlocal next_i
        while next_i < requests:
            i = next_i
            next_i += 1
            results.append(await one(c, url, model, PROMPTS[i % len(PROMPTS)], tokens))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as c:
        await one(c, url, model, PROMPTS[0], 4)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" in r] == []
    done = [r for r in results if "error" not in r]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {
        "concurrency": concurrency, "requests": len(results), "failed": len(results) - len(done), "all_ok": ok,
        "tokens_per_s": sum(r["tokens"] for r in done) / wall, "mean_tokens": statistics.mean(r["tokens"] for r in done),
        "p50_latency": q([r["latency"] for r in done], 50), "p95_latency": q([r["latency"] for r in done], 95),
        "p50_ttft": q([r["ttft"] for r in done], 50), "counted_chunks": any(r["counted"] for r in done),
        "errors": [r["error"] for r in results if "error" in r][:3],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", nargs="+", default=["gptlab", "hf-batching", "hf"], choices=["gptlab", "hf-batching", "hf"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 4 x concurrency, at least 8)")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptlab_servebench_"))
    ckpt, hf = make_model(work, args.layers, args.width)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    print(f"model: GPT-2 shape, {args.layers} layers x {args.width}, vocab 50257, random weights; {cpu}, {args.threads} threads; "
          f"{args.tokens} tokens per request, greedy, streaming /v1/completions")  # fmt: skip
    rows = []
    for i, kind in enumerate(args.servers):
        port = 8700 + i
        proc, model = start(kind, ckpt, hf, port, args.threads)
        try:
            asyncio.run(wait_ready(f"http://127.0.0.1:{port}", proc))
            for c in args.concurrency:
                r = asyncio.run(load(f"http://127.0.0.1:{port}", model, c, args.requests or max(8, 4 * c), args.tokens))
                rows.append({"server": kind, **r})
                print(f"  {kind:12s} c={c:3d}: {r['tokens_per_s']:8.1f} tok/s, p50 {r['p50_latency']:.2f} s, p95 {r['p95_latency']:.2f} s, "
                      f"TTFT p50 {r['p50_ttft'] * 1000:.0f} ms, {r['failed']} failed {r['errors']}", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("\n| server | concurrency | requests | failed | output tokens/s | p50 latency | p95 latency | p50 TTFT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.1f} | {r['p50_latency']:.2f} s | "
              f"{r['p95_latency']:.2f} s | {r['p50_ttft'] * 1000:.0f} ms |")  # fmt: skip
    ours = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["server"] == "gptlab"}
    for peer in ("hf-batching", "hf"):
        ratios = [f"c={r['concurrency']}: {ours[r['concurrency']] / r['tokens_per_s']:.2f}x" for r in rows if r["server"] == peer and r["concurrency"] in ours and r["tokens_per_s"]]
        if ratios:
            print(f"gptlab / {peer} output tokens/s: {', '.join(ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
