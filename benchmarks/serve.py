"""gptlab serve against `transformers serve` (Hugging Face's OpenAI-compatible server) on the same model, same load.

* Model: GPT-2 shaped, random weights (seed 0; default 4 layers x 256 wide, context 1024, GPT-2's tokenizer:
  ~16M parameters), saved as a gptlab checkpoint and exported with `export_hf` for the peer.
* Servers, all started at once on loopback and measured one at a time (the others idle), in --rounds rounds
  that alternate between them; medians reported: `gptlab serve --max-batch 32`;
  `transformers serve --continuous-batching` with its KV cache capped (--cb-num-blocks 256 --cb-block-size 32
  --cb-max-batch-tokens 1024; uncapped it reserves most of the RAM); `transformers serve` without batching.
* Load: at each concurrency C, C clients each send streaming /v1/completions requests back to back (prompt
  from a fixed list, max_tokens --tokens, temperature 0) until --requests requests have finished. Output
  tokens/s is the output tokens of all requests over the wall time; latency and time to first token
  (first non-empty text chunk) per request, p50 / p95. The load generator is this process: asyncio streams
  and a minimal HTTP/1.1 reader (`Conn`), light because it shares the two cores with the server.

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


def start(kind: str, ckpt: Path, hf: Path, port: int, threads: int, dtype: str = "float32") -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    bin_dir = Path(sys.executable).parent
    if kind == "gptlab":
        cmd = [str(bin_dir / "gptlab"), "serve", "--ckpt", str(ckpt), "--port", str(port), "--max-batch", "32", "--dtype", dtype, "--model-name", "m"]
        model = "m"
    else:
        cmd = [str(bin_dir / "transformers"), "serve", str(hf), "--port", str(port), "--device", "cpu", "--dtype", dtype]
        if kind == "hf-batching":
            cmd += ["--continuous-batching", "--cb-num-blocks", "256", "--cb-block-size", "32", "--cb-max-batch-tokens", "1024"]
        model = str(hf)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, model


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s (the peer with a dead batching worker ignores SIGTERM)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


class Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for these requests.

    The load generator shares the machine's two cores with the server it measures, so it is kept
    light: asyncio streams (uvloop's loop when installed) and a hand-written chunked-transfer reader,
    about a tenth of the CPU per streamed token that an httpx client spent here."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: dict):
        """Yield the body's pieces as they arrive (one per chunk); the status first, as an int."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
        status = int((await self.reader.readline()).split()[1])
        yield status
        length, chunked = None, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            yield await self.reader.readexactly(length or 0)
            return
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            yield (await self.reader.readexactly(size + 2))[:-2]
        await self.reader.readline()  # the blank line after the last chunk

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def one(c: Conn, model: str, prompt: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    first, n_chunks, usage, pending, status, body = None, 0, None, b"", None, b""
    req = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async for piece in c.post_stream("/v1/completions", req):
        if status is None:
            status = piece
            continue
        if status != 200:
            body += piece
            continue
        events = (pending + piece).split(b"\n\n")  # SSE events end with a blank line; one may span chunks
        pending = events.pop()
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            chunk = json.loads(event[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    n_chunks += 1
                    first = first or time.perf_counter()
    if status != 200:
        return {"error": f"{status} {body[:200]!r}"}
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": usage["completion_tokens"] if usage else n_chunks, "counted": usage is None}


async def load(url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict:
    host, port = url.split("//")[1].split(":")
    results: list[dict] = []
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        c = Conn(host, int(port))
        try:
            while next_i < requests:
                i = next_i
                next_i += 1
                results.append(await one(c, model, PROMPTS[i % len(PROMPTS)], tokens))
        finally:
            c.close()

    warm = Conn(host, int(port))
    await one(warm, model, PROMPTS[0], 4)
    warm.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
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


def run_async(coro):
    """uvloop's event loop when installed (lighter per chunk), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", nargs="+", default=["gptlab", "hf-batching", "hf"], choices=["gptlab", "hf-batching", "hf"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 4 x concurrency, at least 8)")
    p.add_argument("--rounds", type=int, default=3, help="each level this many times per server, interleaved; medians reported")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both servers' weights")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptlab_servebench_"))
    ckpt, hf = make_model(work, args.layers, args.width)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    print(f"model: GPT-2 shape, {args.layers} layers x {args.width}, vocab 50257, random weights, {args.dtype}; {cpu}, {args.threads} threads; "
          f"{args.tokens} tokens per request, greedy, streaming /v1/completions; {args.rounds} interleaved rounds")  # fmt: skip
    servers = {}
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        # all servers up at once (idle, each takes under 1% of a core), so that the rounds can alternate
        # between them and the machine's drift (figures here move by 20-40% over minutes) hits all alike
        for i, kind in enumerate(args.servers):
            servers[kind] = (*start(kind, ckpt, hf, 8700 + i, args.threads, args.dtype), f"http://127.0.0.1:{8700 + i}")
            run_async(wait_ready(servers[kind][2], servers[kind][0]))
        for rnd in range(args.rounds):
            for c in args.concurrency:
                order = args.servers[rnd % len(args.servers) :] + args.servers[: rnd % len(args.servers)]  # who goes first rotates
                for kind in order:
                    proc, model, url = servers[kind]
                    r = run_async(load(url, model, c, args.requests or max(8, 4 * c), args.tokens))
                    runs.setdefault((kind, c), []).append(r)
                    print(f"  round {rnd + 1} {kind:12s} c={c:3d}: {r['tokens_per_s']:8.1f} tok/s, p50 {r['p50_latency']:.2f} s, p95 {r['p95_latency']:.2f} s, "
                          f"TTFT p50 {r['p50_ttft'] * 1000:.0f} ms, {r['failed']} failed {r['errors']}", flush=True)  # fmt: skip
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    med = statistics.median
    rows = [{"server": kind, "concurrency": c, "rounds": len(rs), "requests": sum(r["requests"] for r in rs), "failed": sum(r["failed"] for r in rs),
             **{k: med(r[k] for r in rs) for k in ("tokens_per_s", "p50_latency", "p95_latency", "p50_ttft")},
             "tokens_per_s_all": [round(r["tokens_per_s"], 1) for r in rs]} for (kind, c), rs in runs.items()]  # fmt: skip
    rows.sort(key=lambda r: (args.servers.index(r["server"]), r["concurrency"]))
    print("\nmedians over the rounds (all rounds' tokens/s in brackets)")
    print("| server | concurrency | requests | failed | output tokens/s | p50 latency | p95 latency | p50 TTFT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.1f} ({', '.join(map(str, r['tokens_per_s_all']))}) | "
              f"{r['p50_latency']:.2f} s | {r['p95_latency']:.2f} s | {r['p50_ttft'] * 1000:.0f} ms |")  # fmt: skip
    ours = {r["concurrency"]: r for r in rows if r["server"] == "gptlab"}
    for peer in ("hf-batching", "hf"):
        ratios = [f"c={r['concurrency']}: {ours[r['concurrency']]['tokens_per_s'] / r['tokens_per_s']:.2f}x (TTFT {ours[r['concurrency']]['p50_ttft'] * 1000:.0f} vs "
                  f"{r['p50_ttft'] * 1000:.0f} ms)" for r in rows if r["server"] == peer and r["concurrency"] in ours and r["tokens_per_s"]]  # fmt: skip
        if ratios:
            print(f"gptlab / {peer} output tokens/s: {', '.join(ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
