"""`gptlab serve`: an OpenAI-compatible HTTP API (FastAPI) over the continuous-batching scheduler.

    POST /v1/completions        prompt (string, strings, token ids), echo with prompt log-probs
    POST /v1/chat/completions   messages through the model's chat template
    GET  /v1/models, /health, /metrics (Prometheus text), / (the chat page)

Requests are checked by `gptlab.serve.schema`; every refusal is OpenAI's error body with a 4xx
status (400 bad field, 401 key, 404 model or path, 413 body too large, 429 queue full with
Retry-After), never a 500 for bad input. Streaming answers are Server-Sent Events, one chunk per
token's text (whole characters; text a stop string may still claim is held back), then
`data: [DONE]`. A client that disconnects cancels its requests, which leave the batch within a
step.

The chat template: a model fine-tuned for chat (its tokenizer has <|im_start|> / <|im_end|>) gets
gptlab's ChatML template and stops at <|im_end|>. A base model gets a plain one, each message as
"User: ...", "System: ..." or "Assistant: ..." on its own line, then "Assistant:", and stops at a
new "\\nUser:" line.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest

from gptlab.config import SampleConfig
from gptlab.errors import ConfigError, InputError
from gptlab.generate import TokenEvent
from gptlab.serve.schema import ApiError, Sampling, check_model, messages, parse_body, prompts, sampling
from gptlab.serve.scheduler import QueueFull, Request, Scheduler
from gptlab.tokenizer import AnyTokenizer

log = logging.getLogger("gptlab.serve")
STATIC = Path(__file__).parent / "static"
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "gptlab"
    api_key: str | None = None  # None: no key asked
    max_batch: int = 16  # requests decoded together
    max_queue: int = 256  # requests waiting for a slot; more get 429
    max_tokens: int | None = None  # tokens (prompt + output) all running requests may hold; None: max_batch contexts
    max_request_tokens: int | None = None  # cap on one request's max_tokens; None: the context
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()  # CORS stays off unless origins are given


# ----------------------------------------------------------------------------- metrics


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum, self.n = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        self.n += times
        self.sum += value * times
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += times

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts, strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]


@dataclass
class Metrics:
    by_status: dict[int, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)))
    latency: Histogram = field(default_factory=lambda: Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)))

    def render(self, sched: Scheduler) -> str:
        batch = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        for size, steps in list(sched.stats.batch_sizes.items()):  # a snapshot: the scheduler's thread adds to it
            batch.observe(size, steps)
        lines = ["# TYPE gptlab_requests_total counter"]
        lines += [f'gptlab_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.by_status.items())]
        st = sched.stats
        lines += [
            "# TYPE gptlab_prompt_tokens_total counter", f"gptlab_prompt_tokens_total {st.prompt_tokens}",
            "# TYPE gptlab_generation_tokens_total counter", f"gptlab_generation_tokens_total {st.new_tokens}",
            "# TYPE gptlab_decode_steps_total counter", f"gptlab_decode_steps_total {st.steps}",
            "# TYPE gptlab_queue_depth gauge", f"gptlab_queue_depth {st.waiting}",
            "# TYPE gptlab_running_requests gauge", f"gptlab_running_requests {st.running}",
        ]  # fmt: skip
        lines += batch.lines("gptlab_batch_size") + self.ttft.lines("gptlab_time_to_first_token_seconds")
        lines += self.latency.lines("gptlab_request_latency_seconds")
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the app


def create_app(sched: Scheduler, cfg: ServeConfig) -> FastAPI:
    tok = sched.tokenizer
    block = sched.block
    cap = min(cfg.max_request_tokens or block, block)
    chat = _chat_template(tok)
    metrics = Metrics()
    relays: list[_Relay] = []

    def relay() -> _Relay:
        """The app's one relay, made on the first request (the event loop is known only then)."""
        if not relays:
            relays.append(_Relay(asyncio.get_running_loop()))
        return relays[0]

    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, openapi_url=None)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"])

    def error(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    app.add_middleware(_Guard, api_key=cfg.api_key, metrics=metrics)

    @app.exception_handler(ApiError)
    async def refused(request: HttpRequest, err: ApiError) -> JSONResponse:
        return error(err)

    @app.exception_handler(Exception)
    async def fault(request: HttpRequest, err: Exception) -> JSONResponse:  # a bug still answers in OpenAI's shape
        log.error("internal error on %s %s: %r", request.method, request.url.path, err)
        return error(ApiError(500, "internal server error", type="server_error"))

    @app.exception_handler(404)
    async def not_found(request: HttpRequest, exc: Exception) -> JSONResponse:
        return error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def not_allowed(request: HttpRequest, exc: Exception) -> JSONResponse:
        return error(ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

    async def read_json(request: HttpRequest) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
            raise ApiError(413, f"the request body is larger than {cfg.max_body_bytes} bytes", code="body_too_large")
        raw = bytearray()
        try:
            async for piece in request.stream():
                raw += piece
                if len(raw) > cfg.max_body_bytes:
                    raise ApiError(413, f"the request body is larger than {cfg.max_body_bytes} bytes", code="body_too_large")
        except ClientDisconnect:
            raise ApiError(400, "the client went away before sending the whole body", code="incomplete_body") from None
        return parse_body(bytes(raw))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": sched.stats.running, "waiting": sched.stats.waiting}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(sched), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "gptlab", "context_length": block}]}

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        body = await read_json(request)
        check_model(body, cfg.model_name)
        s = sampling(body, sched.engine.V, cap, 16, chat=False)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, "'echo': expected true or false", param="echo", code="invalid_value")
        items = prompts(body, sched.engine.V)
        ids = [tok.encode(p) if isinstance(p, str) else p for p in items]
        run = Run(sched, metrics, relay(), "cmpl", "text_completion", cfg.model_name, tok, s, chat=False, echo=echo)
        run.start(ids, _sample_config(s, (), chat.stop_ids), request)  # a chat model's end of turn ends a completion too
        return await run.respond()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        body = await read_json(request)
        check_model(body, cfg.model_name)
        s = sampling(body, sched.engine.V, cap, None, chat=True)
        ids = chat.prompt(messages(body))
        run = Run(sched, metrics, relay(), "chatcmpl", "chat.completion", cfg.model_name, tok, s, chat=True, echo=False)
        run.start([ids], _sample_config(s, chat.stops, chat.stop_ids), request)
        return await run.respond()

    return app


class _Guard:
    """ASGI middleware: the API key on /v1 (compared in constant time, so no key leaks by timing), one log
    line and a status count per request. Plain ASGI rather than Starlette's BaseHTTPMiddleware, which
    adds a task and a queue to every chunk of a streamed response."""

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.key, self.metrics = app, api_key.encode() if api_key is not None else None, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"].startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                token = given[7:] if given[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(token, self.key):
                    err = ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
                    return await JSONResponse(err.body(), status_code=401)(scope, receive, sending)
            await self.app(scope, receive, sending)
        finally:
            self.metrics.by_status[status] = self.metrics.by_status.get(status, 0) + 1
            log.info("%s %s %d %.3fs", scope["method"], scope["path"], status, time.perf_counter() - t0)


def _sample_config(s: Sampling, extra_stops: tuple[str, ...], stop_ids: tuple[int, ...] = ()) -> SampleConfig:
    try:
        return _settings(s, extra_stops, stop_ids)
    except ConfigError as err:  # a combination the schema let through but generation refuses: still the client's 400
        raise ApiError(400, str(err), code="invalid_value") from None


def _settings(s: Sampling, extra_stops: tuple[str, ...], stop_ids: tuple[int, ...]) -> SampleConfig:
    return SampleConfig(
        max_new_tokens=max(s.max_tokens or 1, 1), temperature=s.temperature, top_p=s.top_p, stop=(*s.stop, *extra_stops), stop_token_ids=stop_ids,
        seed=s.seed, presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty, logit_bias=s.logit_bias, logprobs=s.logprobs,
    )  # fmt: skip


# ----------------------------------------------------------------------------- one request's generations


class Run:
    """The scheduler requests of one HTTP request (prompts x n choices), and its response."""

    def __init__(
        self, sched: Scheduler, metrics: Metrics, relay: _Relay, prefix: str, kind: str, model: str, tok: AnyTokenizer, s: Sampling, chat: bool, echo: bool,
    ) -> None:  # fmt: skip
        self.sched, self.metrics, self.tok, self.s, self.chat, self.echo = sched, metrics, tok, s, chat, echo
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.kind, self.model, self.created = kind, model, int(time.time())
        self.relay = relay
        self.events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.reqs: list[Request] = []
        self.prompts: list[list[int]] = []

    def start(self, ids: list[list[int]], sc: SampleConfig, http: Any) -> None:
        self.http = http
        if self.s.max_tokens is None:  # chat without a limit: until the context is full
            sc = sc.replace(max_new_tokens=max(self.sched.block - max(map(len, ids)), 1))
        try:
            for p, prompt in enumerate(ids):
                if not prompt:
                    raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
                if len(prompt) > self.sched.block:
                    raise ApiError(400, f"the prompt has {len(prompt)} tokens; this model's context is {self.sched.block}", param="prompt", code="context_length_exceeded")
                for j in range(self.s.n):
                    index = p * self.s.n + j
                    seed = None if sc.seed is None else sc.seed + j  # n choices: n different seeded streams
                    on_prompt = (lambda lps, i=index: self._put(i, ("prompt", lps))) if self.echo and self.s.logprobs is not None else None
                    req = Request(prompt, sc.replace(seed=seed), lambda ev, i=index: self._put(i, ev), on_prompt=on_prompt)
                    self.sched.submit(req)
                    self.reqs.append(req)
                self.prompts.append(prompt)
        except QueueFull:
            self.cancel()
            raise ApiError(429, "the server is busy: too many requests are waiting; retry shortly", code="rate_limit_exceeded", type="server_busy",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        except InputError as err:
            self.cancel()
            raise ApiError(400, str(err), param="prompt", code="context_length_exceeded") from None
        except ApiError:
            self.cancel()
            raise

    def _put(self, index: int, item: Any) -> None:
        self.relay.put(self.events, (index, item))

    def cancel(self) -> None:
        for req in self.reqs:
            req.cancel()

    # ------------------------------------------------------------------ results

    async def respond(self) -> StreamingResponse | JSONResponse:
        if self.s.stream:
            return StreamingResponse(self._sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await self._whole())

    async def _next(self) -> tuple[int, Any]:
        """The next event; a client that went away cancels everything (checked each second)."""
        while True:
            if not self.events.empty():
                return self.events.get_nowait()
            try:
                async with asyncio.timeout(1.0):  # a timer handle, where wait_for (3.11) makes a task per event
                    return await self.events.get()
            except TimeoutError:
                if await self.http.is_disconnected():
                    self.cancel()
                    raise asyncio.CancelledError from None

    async def _whole(self) -> dict[str, Any]:
        choices = [_Choice(self, i) for i in range(len(self.reqs))]
        try:
            while not all(c.finish for c in choices):
                index, item = await self._next()
                choices[index].add(item)
        finally:
            self.cancel()  # a no-op for finished requests
        self._observe()
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": [c.final() for c in choices], "usage": self._usage(choices)}  # fmt: skip

    async def _sse(self) -> AsyncIterator[str]:
        choices = [_Choice(self, i) for i in range(len(self.reqs))]
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        try:
            if self.chat:
                for c in choices:
                    yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            while not all(c.finish_sent for c in choices):
                batch = [await self._next()]
                while not self.events.empty():  # whatever else already arrived goes out with it
                    batch.append(self.events.get_nowait())
                try:
                    for index, item in batch:
                        choices[index].add(item)
                except ApiError as err:  # the headers are sent: the error goes in the stream, as OpenAI does
                    yield _sse(err.body())
                    return
                out = "".join(_sse({**head, "choices": [chunk]}) for chunk in (choices[i].chunk() for i in sorted({i for i, _ in batch})) if chunk)
                if out:
                    yield out
            self._observe()
            if self.s.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(choices)})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()

    def _observe(self) -> None:
        now = time.perf_counter()
        for req in self.reqs:
            self.metrics.latency.observe(now - req.submitted)
            if req.first_token is not None:
                self.metrics.ttft.observe(req.first_token - req.submitted)

    def _usage(self, choices: list[_Choice]) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.generated for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Relay:
    """Hands events from the scheduler's thread to the event loop: appended to one inbox, delivered by one
    callback however many arrive before it runs (one wake-up of the loop per decode step, not per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.inbox, self.pending = loop, collections.deque(), False

    def put(self, queue: asyncio.Queue, item: Any) -> None:  # on the scheduler's thread
        self.inbox.append((queue, item))  # before the flag is read: a drain running now either takes it or is followed by another
        if not self.pending:
            self.pending = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # on the event loop
        self.pending = False
        while self.inbox:
            queue, item = self.inbox.popleft()
            queue.put_nowait(item)


class _Choice:
    """One choice's text, tokens and log-probs as its events arrive; OpenAI's shapes for it."""

    def __init__(self, run: Run, index: int) -> None:
        self.run, self.index = run, index
        self.prompt = run.prompts[index // run.s.n] if run.prompts else []
        self.text, self.finish, self.generated = "", None, 0
        self.prompt_lps: list | None = None
        self.tokens: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
        self.zero = run.s.max_tokens == 0  # echo only: the one token drawn is not reported
        self.chunked = self.finish_sent = False  # what the stream has sent so far
        self.sent_text = self.sent_tokens = 0

    def add(self, item: Any) -> None:
        """Record an event (a token, or the prompt's log-probs for echo)."""
        if isinstance(item, tuple) and item[0] == "prompt":
            self.prompt_lps = item[1]
            return
        ev: TokenEvent = item
        if ev.finish_reason == "error":  # the scheduler's step failed: a server fault, reported as one
            raise ApiError(500, "generation failed on the server; see its log", type="server_error")
        if not self.zero:
            self.generated += 1
            self.text += ev.text
            self.tokens.append((ev.token_id, ev.logprob, ev.top_logprobs))
        if ev.finish_reason is not None:
            self.finish = "length" if self.zero else ev.finish_reason

    def chunk(self) -> dict[str, Any] | None:
        """The stream chunk for what arrived since the last one (several tokens when the client reads
        slower than they come), or None when there is nothing to say."""
        first = not self.chunked
        text = self.text[self.sent_text :]
        tokens = self.tokens[self.sent_tokens :]
        if first and self.run.echo:
            text = self.run.tok.decode(self.prompt) + text
        ended = self.finish is not None and not self.finish_sent
        if not text and not ended and not (tokens and self.run.s.logprobs is not None):
            return None
        self.chunked, self.finish_sent = True, self.finish is not None
        self.sent_text, self.sent_tokens = len(self.text), len(self.tokens)
        wants = self.run.s.logprobs is not None
        if self.run.chat:
            lp = self._chat_logprobs(tokens) if wants and tokens else None
            return {"index": self.index, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": self.finish}
        lp = self._completion_logprobs(tokens, with_prompt=first) if wants else None
        return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": self.finish}

    def final(self) -> dict[str, Any]:
        if self.run.chat:
            lp = self._chat_logprobs(self.tokens) if self.run.s.logprobs is not None else None
            return {"index": self.index, "message": {"role": "assistant", "content": self.text}, "logprobs": lp, "finish_reason": self.finish}
        text = (self.run.tok.decode(self.prompt) if self.run.echo else "") + self.text
        lp = self._completion_logprobs(self.tokens, with_prompt=True) if self.run.s.logprobs is not None else None
        return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": self.finish}

    def _piece(self, token: int) -> str:
        return self.run.tok.decode_bytes([token]).decode("utf-8", errors="replace")

    def _completion_logprobs(self, tokens: list, with_prompt: bool) -> dict[str, list]:
        rows: list[tuple[int, float | None, list | None]] = []
        if with_prompt and self.run.echo:
            lps = self.prompt_lps or [None] * len(self.prompt)
            rows += [(t, None if lp is None else lp[0], None if lp is None else lp[1]) for t, lp in zip(self.prompt, lps, strict=True)]
        rows += tokens
        pieces = [self._piece(t) for t, _, _ in rows]
        offsets, at = [], 0
        for p in pieces:
            offsets.append(at)
            at += len(p)
        return {
            "tokens": pieces,
            "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [None if top is None else {self._piece(i): v for i, v in top} for _, _, top in rows],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, tokens: list) -> dict[str, list]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            return {"token": self._piece(t), "logprob": lp, "bytes": list(self.run.tok.decode_bytes([t]))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top or []]} for t, lp, top in tokens]}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- chat templates


@dataclass(frozen=True)
class _ChatFormat:
    prompt: Any  # messages -> ids
    stops: tuple[str, ...]
    stop_ids: tuple[int, ...]


def _chat_template(tok: AnyTokenizer) -> _ChatFormat:
    """ChatML for a chat model; the plain "Role: content" lines for a base model (see the module docstring)."""
    from gptlab.chat import CHAT_TOKENS, ChatTemplate

    if all(t in tok.special_tokens for t in CHAT_TOKENS):
        template = ChatTemplate(tok)
        return _ChatFormat(template.generation_prompt, (), (template.end_id,))

    def plain(msgs: list[dict[str, str]]) -> list[int]:
        text = "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in msgs) + "Assistant:"
        return tok.encode_ordinary(text)

    return _ChatFormat(plain, ("\nUser:", "\nSystem:"), ())


def serve(sched: Scheduler, cfg: ServeConfig, host: str, port: int) -> bool:
    """Serve until Ctrl-C or SIGTERM; False when the server could not start (the port is taken).

    uvicorn's event loop runs on a second thread and the scheduler (made with thread=False) on this
    one, the main thread, where PyTorch's kernels run fastest (see Scheduler.run)."""
    import signal
    import sys
    import threading

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = uvicorn.Server(uvicorn.Config(create_app(sched, cfg), host=host, port=port, log_level="warning", access_log=False,
                                           timeout_keep_alive=5, limit_concurrency=cfg.max_queue + cfg.max_batch + 64))  # fmt: skip
    web = threading.Thread(target=server.run, name="gptlab-http", daemon=True)
    web.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: sched.close())  # a scheduler's preemption: stop like Ctrl-C
    # Every PyTorch call releases the GIL and takes it back; while the HTTP thread runs Python, taking it back
    # waits up to the switch interval (5 ms). A decode step makes ~100 calls: measured with 32 streams, the
    # scheduler waited ~2 ms per step at 5 ms and 0.3-0.6 ms at 0.2 ms (tokens/s +2% to +27% over two pairs of runs).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    try:
        sched.run(until=lambda: not web.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        sys.setswitchinterval(interval)
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        web.join(10)
    return server.started
