"""`gptlab serve`: the OpenAI-compatible HTTP API and chat page over continuous batching."""

from __future__ import annotations

import argparse

from gptlab.cli.common import Register


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from gptlab.checkpoint import load_checkpoint
    from gptlab.cli.generate import _dtype
    from gptlab.errors import InputError
    from gptlab.serve.app import ServeConfig, serve
    from gptlab.serve.scheduler import Scheduler
    from gptlab.train import resolve_device

    for name in ("port", "max_batch", "max_queue", "max_tokens", "max_request_tokens", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("port", "max_queue") else 1):
            raise InputError(f"--{name.replace('_', '-')} must be {'>= 0' if name in ('port', 'max_queue') else 'at least 1'}, got {value}")
    key = args.api_key or os.environ.get("GPTLAB_API_KEY") or None
    ckpt = load_checkpoint(args.ckpt, device=resolve_device(args.device))
    run = ckpt.path.parent.parent if ckpt.path.parent.name == "checkpoints" else ckpt.path
    name = args.model_name or run.name
    sched = Scheduler(ckpt.model, ckpt.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                      dtype=_dtype(args.dtype, next(ckpt.model.parameters()).device), thread=False, tune=args.kernels == "measure")  # fmt: skip
    if sched.engine.plan is not None:
        plan = sched.engine.plan
        print("decode kernels measured: " + ", ".join(f"batch {M}: {k} ({plan.times[M][k] * 1e3:.2f} ms/step)" for M, k in zip(plan.sizes, plan.kernels, strict=True)), flush=True)
    cfg = ServeConfig(model_name=name, api_key=key, max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                      max_request_tokens=args.max_request_tokens, max_body_bytes=args.max_body_bytes, cors_origins=tuple(args.cors_origin or ()))  # fmt: skip
    where = f"http://{args.host}:{args.port}"
    print(f"serving {ckpt.path} as model {name!r} at {where} (chat page {where}/, API {where}/v1, key {'required' if key else 'off'}); Ctrl-C stops", flush=True)
    if not serve(sched, cfg, args.host, args.port):
        raise InputError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    return 0


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    t = command("serve", cmd_serve, "serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, streaming) with a chat page")
    t.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    t.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 exposes it to the network)")
    t.add_argument("--port", type=int, default=8000)
    t.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: the GPTLAB_API_KEY variable, else no key)")
    t.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: the run directory's name)")
    t.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    t.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot; beyond it the server answers 429")
    t.add_argument("--max-tokens", type=int, help="tokens (prompt + output) all running requests may hold together (default: max-batch contexts)")
    t.add_argument("--max-request-tokens", type=int, help="largest max_tokens one request may ask (default: the context)")
    t.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB); larger gets 413")
    t.add_argument("--cors-origin", action="append", help="allow browser pages from this origin (repeatable); CORS is off by default")
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="weights while decoding; auto is bfloat16 where matmuls run it natively")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--kernels", choices=["measure", "default"], default="measure",
                   help="measure: time the Linear kernels at start-up at a few batch sizes and use the fastest at each (the default; "
                        "the winning kernels' weight copies are kept: a transposed copy, 1x the Linear weights, and MKL's packed one, ~2.7x); default: the engine's fixed rule "
                        "(oneDNN for float32 on CPU)")  # fmt: skip
