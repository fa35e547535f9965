"""Continuous batching: one thread owns the model and serves every request through one KV cache.

The cache has a row ("slot") per running request, up to max_batch. Each turn of the loop
admits waiting requests into free slots (their prompts prefilled together, each row at its
own length, and their first tokens drawn from the prefill), then runs one decode step for
every running request, each at its own position with its own sampling settings and seed.
A request leaves the moment it finishes or its client goes away: the last running slot
moves into its place (only that row's filled part of the cache is copied), so running
requests always occupy slots 0..n-1 and a step computes exactly n rows. This is the
iteration-level scheduling of Orca (Yu et al. 2022) without paging the cache.

A request's tokens come out of the same code as the generation engine's (`gptlab.generate`):
the same sampling controls, the same stop-string and UTF-8-safe text streaming, the same
finish reasons, so a greedy request gives the engine's tokens whether it runs alone or
in a busy batch.

Admission limits: at most max_batch running requests, at most max_queue waiting ones
(`submit` refuses more: the server answers 429), and at most max_tokens tokens (prompt
plus requested output) held by running requests together; a request waits until it fits.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptlab.config import SampleConfig
from gptlab.errors import InputError
from gptlab.generate import Engine, GenerationStats, TokenEvent, SamplingControls, TokenHistory, RowProgress, upcast_logits
from gptlab.model import GPT, KVCache
from gptlab.tokenizer import AnyTokenizer

Emit = Callable[[TokenEvent], None]
log = logging.getLogger("gptlab.serve")


class QueueFull(Exception):
    """The scheduler holds max_queue waiting requests already."""


@dataclass(eq=False)
class Request:
    """One generation: its prompt ids, settings, and where its tokens go (`emit`, called on the
    scheduler's thread; the last event has a finish_reason). `cancel()` ends it within a step."""

    prompt: list[int]
    cfg: SampleConfig
    emit: Emit
    # with on_prompt: called once, before the first token, with each prompt token's log-prob and the top
    # alternatives (cfg.logprobs of them) at its position; the first token's are None (OpenAI's echo)
    on_prompt: Callable[[list[tuple[float, list[tuple[int, float]]] | None]], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when its first token came out
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def budget(self) -> int:
        return len(self.prompt) + self.cfg.max_new_tokens


@dataclass(eq=False)
class _Slot:
    req: Request
    rows: RowProgress  # the engine's per-row bookkeeping, for this one request
    generator: torch.Generator | None
    hist: TokenHistory | None


@dataclass
class SchedulerStats:
    """What /metrics reports: counters since start and the current load."""

    requests: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    running: int = 0
    waiting: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # decode steps by batch size (bounded by max_batch)


class Scheduler:
    """Owns `model` on a background thread (or, with thread=False, on the thread that calls `run`);
    `submit` requests from any thread."""

    def __init__(
        self, model: GPT, tokenizer: AnyTokenizer, *, max_batch: int = 16, max_queue: int = 256, max_tokens: int | None = None,
        dtype: torch.dtype | None = None, thread: bool = True, tune: bool = False,
    ) -> None:  # fmt: skip
        if max_batch < 1 or max_queue < 0:
            raise InputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        # tune: measure the Linear kernels at each power of two up to max_batch (Engine's tune) rather than use the
        # fixed rule; the winner can change between neighbouring sizes (measured: BLAS at 2 rows, MKL's packed GEMM at 4-16)
        sizes = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch}) if tune else ()
        self.engine = Engine(model, tokenizer, dtype=dtype, tune=sizes)  # its prepared model, prefill and step
        self.model = self.engine.model.eval()
        self.tokenizer = tokenizer
        self.block = self.model.config.block_size
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_tokens = max_tokens if max_tokens is not None else max_batch * self.block
        self.stats = SchedulerStats()
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._pending = 0  # submitted and not yet running or dropped: the queue plus the loop's held-back list
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._running: list[_Slot] = []
        self._cache = KVCache(self.model.config, max_batch, self.block, self.engine.dtype, self.engine.device)
        self._held = 0  # tokens reserved by running requests
        self._controls: tuple[tuple[int, ...], SamplingControls | None] = ((), None)  # the last batch's request ids and sampling settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gptlab-scheduler", daemon=True) if thread else None
        if self._thread is not None:
            self._thread.start()

    # ------------------------------------------------------------------ from any thread

    def submit(self, req: Request) -> None:
        """Queue a request (checked first: a bad one raises InputError here, on the caller's thread)."""
        if not req.prompt:
            raise InputError("the prompt is empty")
        if len(req.prompt) > self.block:
            raise InputError(f"the prompt has {len(req.prompt)} tokens, more than the model's context of {self.block}")
        bad = [t for t in req.prompt if not 0 <= t < self.engine.V]
        if bad:
            raise InputError(f"the prompt has token id {bad[0]}, outside [0, {self.engine.V})")
        if min(req.budget, self.block) > self.max_tokens:
            raise InputError(f"the request needs {req.budget} tokens (prompt plus max tokens); the server holds at most {self.max_tokens} at once")
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests are waiting already")
            self._pending += 1
            self.stats.waiting = self._pending
        self._waiting.put(req)
        self._wake.set()

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The loop on the calling thread (made with thread=False), until close() or until() is true.

        `gptlab serve` runs it on the main thread: on these CPUs PyTorch's parallel kernels (SDPA
        among them) cost several times more per call on a thread started later (measured 23 us vs
        100-160 us for one decode-sized attention), which halves batch-1 decoding."""
        self._loop(until)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _loop(self, until: Callable[[], bool] = lambda: False) -> None:
        held_back: list[Request] = []  # admitted from the queue but waiting for room, oldest first
        while not self._stop.is_set() and not until():
            try:
                with torch.no_grad():
                    held_back = self._admit(held_back)
                    self._drop_cancelled()
                    if self._running:
                        self._decode()
            except Exception as err:  # noqa: BLE001 - the loop must outlive a failed step; the requests in it learn why
                log.exception("a scheduler step failed; its %d running requests end with an error", len(self._running))
                for slot in self._running:
                    self._finish_with_error(slot.req, err)
                self._running.clear()
                self._held = 0
                self.stats.running = 0
            if not self._running:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _admit(self, held_back: list[Request]) -> list[Request]:
        while True:
            try:
                held_back.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        fresh, rest = [], []
        for req in held_back:
            if req.cancelled.is_set():
                pass  # its client left while it waited: nothing to send, nothing reserved
            elif len(self._running) + len(fresh) < self.max_batch and self._held + min(req.budget, self.block) <= self.max_tokens:
                self._held += min(req.budget, self.block)
                fresh.append(req)
            else:
                rest.append(req)
        with self._lock:
            self._pending -= len(held_back) - len(rest)
            self.stats.waiting = self._pending
        if fresh:
            self._prefill(fresh)
        return rest

    def _prefill(self, reqs: list[Request]) -> None:
        start = len(self._running)
        slots = []
        for req in reqs:
            stats = GenerationStats()
            rows = RowProgress([req.prompt], [req.cfg], self.block, self.tokenizer, stats)
            gen = None if req.cfg.seed is None else torch.Generator(device=self.engine.device).manual_seed(req.cfg.seed)
            penalised = req.cfg.repetition_penalty != 1 or req.cfg.presence_penalty or req.cfg.frequency_penalty
            hist = TokenHistory([req.prompt], self.engine.V, self.engine.device) if penalised else None
            slots.append(_Slot(req, rows, gen, hist))
            self.stats.requests += 1
            self.stats.prompt_tokens += len(req.prompt)
            if req.on_prompt is not None:
                req.on_prompt(self._prompt_logprobs(req.prompt, req.cfg.logprobs or 0))
        self._running += slots
        self.stats.running = len(self._running)
        logits = upcast_logits(self.engine.prefill(self.model, self._cache, list(range(start, start + len(reqs))), [r.prompt for r in reqs])[:, : self.engine.V])
        self._sample(slots, logits, fed=False)

    def _decode(self) -> None:
        n = len(self._running)
        pending = torch.tensor([[s.rows.seqs[0][-1]] for s in self._running], device=self.engine.device)  # (n, 1)
        start = [s.rows.cached[0] for s in self._running]
        logits = self.engine.step(self.model, self._cache.first(n), pending, start, decode=True)[:, 0, : self.engine.V]  # (n, V)
        self.stats.steps += 1
        self.stats.batch_sizes[n] += 1
        self._sample(list(self._running), upcast_logits(logits), fed=True)

    def _sample(self, slots: Sequence[_Slot], logits: Tensor, fed: bool) -> None:
        """Draw each slot's next token from its row of logits (n, V), emit it, and retire finished slots."""
        key = tuple(s.req.id for s in slots)
        if key != self._controls[0]:  # the batch changed: its settings as tensors again (kept while it does not)
            ctl = SamplingControls([s.req.cfg for s in slots], self.engine.V, self.engine.device)
            ctl.generators = [s.generator for s in slots]  # each request's own stream of random numbers, kept across steps
            self._controls = (key, ctl)
        ctl = self._controls[1]
        hist = None
        if ctl.needs_history:
            hist = TokenHistory([[]] * len(slots), self.engine.V, self.engine.device)
            for b, s in enumerate(slots):
                if s.hist is not None:
                    hist.seen[b], hist.counts[b] = s.hist.seen[0], s.hist.counts[0]
        toks = ctl.next_tokens(logits, hist).tolist()
        lps = torch.log_softmax(logits, -1) if any(s.req.cfg.logprobs is not None for s in slots) else None
        now = time.perf_counter()
        done = []
        for b, (slot, tok) in enumerate(zip(slots, toks, strict=True)):
            slot.rows.cached[0] += fed
            if slot.hist is not None:
                slot.hist.add(torch.tensor([tok], device=self.engine.device))
            event = slot.rows.emit(0, tok, None if lps is None else lps[b])
            self.stats.new_tokens += 1
            if slot.req.first_token is None:
                slot.req.first_token = now
            slot.req.emit(event)
            if event.finish_reason is not None:
                done.append(slot)
        for slot in done:
            self._retire(slot)

    def _drop_cancelled(self) -> None:
        for slot in [s for s in self._running if s.req.cancelled.is_set()]:
            self._retire(slot)

    def _retire(self, slot: _Slot) -> None:
        """Free the slot: the last running request moves into it, cache rows and all."""
        i, last = self._running.index(slot), len(self._running) - 1
        if i != last:
            moved = self._running[last]
            n = moved.rows.cached[0]
            self._cache.k[:, i, :, :n] = self._cache.k[:, last, :, :n]  # (n_layer, nh, n, hs)
            self._cache.v[:, i, :, :n] = self._cache.v[:, last, :, :n]
            self._running[i] = moved
        self._running.pop()
        self._held -= min(slot.req.budget, self.block)
        self.stats.running = len(self._running)

    def _finish_with_error(self, req: Request, err: BaseException) -> None:
        req.error = err
        req.emit(TokenEvent(-1, -1, "", finish_reason="error"))

    def _prompt_logprobs(self, prompt: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """(log p(prompt[t] | prompt[:t]), the `top` most likely (id, log-prob)) for t >= 1; None for t = 0."""
        idx = torch.tensor([prompt], device=self.engine.device)
        lps = torch.log_softmax(upcast_logits(self.model(idx)[0][0, :-1, : self.engine.V]), -1)  # (T-1, V)
        chosen = lps.gather(1, idx[0, 1:, None])[:, 0].tolist()
        values, ids = lps.topk(top, dim=-1) if top else (lps[:, :0], lps[:, :0].long())  # (T-1, top)
        alternatives = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return [None, *zip(chosen, alternatives, strict=True)]
