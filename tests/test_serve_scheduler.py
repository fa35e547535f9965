"""Continuous batching against the generation engine: a request's tokens and log-probs are the same alone
and inside a busy batch that requests join and leave at every step; seeds, cancellation, queue limits."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gptlab.config import GPTConfig, SampleConfig
from gptlab.generate import Engine
from gptlab.model import GPT
from gptlab.serve.scheduler import QueueFull, Request, Scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(3)
    return GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32, init_std=0.2)).eval()


class Collect:
    """A request's events, and an Event set when its last one arrives."""

    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events]


def run(sched: Scheduler, prompt: list[int], cfg: SampleConfig) -> tuple[Request, Collect]:
    out = Collect()
    req = Request(prompt, cfg, out)
    sched.submit(req)
    return req, out


@pytest.mark.parametrize("tune", [False, True], ids=["fixed-kernels", "measured-kernels"])
def test_a_request_gets_the_engines_tokens_alone_and_in_a_busy_changing_batch(model, tok, tune) -> None:
    prompts = [tok.encode(t) for t in ("Return the", "The module", "def f(x):", "class A", "import os", "a b c d e f", "x", "Hello there, how")]
    cfgs = [SampleConfig(max_new_tokens=8 + 3 * i, temperature=0, logprobs=2) for i in range(len(prompts))]
    engine = Engine(model, tok)
    alone = [engine.generate([p], c)[0] for p, c in zip(prompts, cfgs)]
    sched = Scheduler(model, tok, max_batch=4, max_queue=64, tune=tune)  # measured: whichever kernel won at 1, 2 and 4 rows
    try:
        # two waves: the first requests are mid-generation when the others arrive; at most 4 run at once,
        # so requests also wait, join when others leave, and slots are reused
        handles = [run(sched, p, c) for p, c in zip(prompts[:3], cfgs[:3])]
        while len(handles[2][1].events) < 2:
            time.sleep(0.001)
        handles += [run(sched, p, c) for p, c in zip(prompts[3:], cfgs[3:])]
        for _, out in handles:
            assert out.done.wait(30)
        assert max(sched.stats.batch_sizes) == 4
        for (req, out), ref in zip(handles, alone):
            assert out.tokens == ref.token_ids  # never another request's tokens
            assert [e.logprob for e in out.events] == pytest.approx(ref.logprobs, abs=1e-4)
            assert "".join(e.text for e in out.events) == ref.text and out.events[-1].finish_reason == ref.finish_reason
            assert req.first_token is not None
        assert sched.stats.running == 0 and sched._held == 0
    finally:
        sched.close()


def test_seeded_sampling_is_reproducible_under_any_load(model, tok) -> None:
    cfg = SampleConfig(max_new_tokens=12, temperature=1.0, seed=7)
    sched = Scheduler(model, tok, max_batch=8)
    try:
        _, lone = run(sched, tok.encode("Return the"), cfg)
        assert lone.done.wait(30)
        crowd = [run(sched, tok.encode(f"noise {i}"), SampleConfig(max_new_tokens=20, temperature=1.0, seed=i)) for i in range(6)]
        _, busy = run(sched, tok.encode("Return the"), cfg)
        for _, out in [*crowd, (None, busy)]:
            assert out.done.wait(30)
        assert busy.tokens == lone.tokens
        assert Engine(model, tok).generate([tok.encode("Return the")], cfg)[0].token_ids == lone.tokens
    finally:
        sched.close()


def test_a_cancelled_request_frees_its_slot_and_a_full_queue_refuses(model, tok) -> None:
    sched = Scheduler(model, tok, max_batch=1, max_queue=1)
    try:
        long_req, long_out = run(sched, tok.encode("a"), SampleConfig(max_new_tokens=60, temperature=0, ignore_eot=True))
        while not long_out.events:
            time.sleep(0.001)
        _, waiting = run(sched, tok.encode("b"), SampleConfig(max_new_tokens=3, temperature=0))  # waits: the one slot is taken
        with pytest.raises(QueueFull):
            sched.submit(Request(tok.encode("c"), SampleConfig(max_new_tokens=3), Collect()))
        long_req.cancel()
        assert waiting.done.wait(30) and not long_out.done.is_set()  # the slot went to the waiting request
        assert len(long_out.events) < 60
    finally:
        sched.close()


def test_bad_requests_are_refused_before_they_queue(model, tok) -> None:
    sched = Scheduler(model, tok, max_batch=2, max_tokens=50)
    try:
        for prompt, cfg, message in [
            ([], SampleConfig(), "the prompt is empty"),
            ([1] * 65, SampleConfig(), "more than the model's context of 64"),
            ([400], SampleConfig(), "token id 400"),
            ([1] * 60, SampleConfig(max_new_tokens=40), "the server holds at most 50"),
        ]:
            with pytest.raises(Exception, match=message):
                sched.submit(Request(prompt, cfg, Collect()))
    finally:
        sched.close()


def test_a_failed_step_ends_its_requests_with_an_error_and_the_loop_lives_on(model, tok, monkeypatch) -> None:
    sched = Scheduler(model, tok, max_batch=2)
    try:
        real, calls = sched.engine.step, []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("simulated kernel failure")
            return real(*a, **k)

        monkeypatch.setattr(sched.engine, "step", flaky)
        req, out = run(sched, tok.encode("Return the"), SampleConfig(max_new_tokens=20, temperature=0, ignore_eot=True))
        assert out.done.wait(30) and out.events[-1].finish_reason == "error" and isinstance(req.error, RuntimeError)
        _, after = run(sched, tok.encode("Return the"), SampleConfig(max_new_tokens=5, temperature=0))
        assert after.done.wait(30) and after.events[-1].finish_reason in ("stop", "length")
        assert sched._held == 0 and sched.stats.running == 0
    finally:
        sched.close()
