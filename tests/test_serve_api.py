"""gptlab serve over HTTP on loopback: the official openai client (completions, chat, streaming, logprobs,
echo, n > 1, seeds), OpenAI's error shapes for bad requests, the key, limits, metrics."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import LoopbackServer  # noqa: E402
from gptlab.chat import add_chat_tokens  # noqa: E402
from gptlab.config import GPTConfig, SampleConfig  # noqa: E402
from gptlab.generate import Engine  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.serve.app import ServeConfig, create_app  # noqa: E402
from gptlab.serve.scheduler import Scheduler  # noqa: E402

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def setup(tok):
    chat_tok, _ = add_chat_tokens(tok)
    torch.manual_seed(5)
    model = GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32, init_std=0.2)).eval()
    sched = Scheduler(model, chat_tok, max_batch=8, max_queue=64)
    server = LoopbackServer(create_app(sched, ServeConfig(model_name="tiny", api_key=KEY, max_batch=8, max_queue=64)))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    yield model, chat_tok, server, client
    server.close()
    sched.close()


def test_completions_match_the_engine_with_logprobs_and_n(setup) -> None:
    model, tok, server, client = setup
    end = (tok.special_tokens["<|im_end|>"],)  # a chat model's end of turn ends a completion too
    ref = Engine(model, tok).generate(["Return the"], SampleConfig(max_new_tokens=10, temperature=0, logprobs=2, stop_token_ids=end))[0]
    r = client.completions.create(model="tiny", prompt="Return the", max_tokens=10, temperature=0, logprobs=2, n=2)
    assert [c.index for c in r.choices] == [0, 1] and all(c.text == ref.text for c in r.choices)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4) and len(lp.top_logprobs[0]) == 2
    assert "".join(lp.tokens) == ref.text and lp.text_offset[0] == 0
    assert r.usage.prompt_tokens == len(tok.encode("Return the")) and r.usage.completion_tokens == 2 * len(ref.token_ids)
    assert r.choices[0].finish_reason == ref.finish_reason and r.id.startswith("cmpl-") and r.created > 0
    # token-id prompts and a list of prompts: choice i*n + j belongs to prompt i
    r = client.completions.create(model="tiny", prompt=[tok.encode("Return the"), "The module"], max_tokens=5, temperature=0)
    assert r.choices[0].text == ref.text[: len(r.choices[0].text)] and len(r.choices) == 2


def test_echo_reports_the_prompts_log_probs_as_lm_eval_reads_them(setup) -> None:
    model, tok, server, client = setup
    prompt = "The module provides"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1, : tok.vocab_size].double(), -1)  # over the tokenizer's ids, as generation
    assert r.choices[0].text == prompt and lp.token_logprobs[0] is None and r.usage.completion_tokens == 0
    assert lp.token_logprobs[1:] == pytest.approx([ref[i, t].item() for i, t in enumerate(ids[1:])], abs=1e-4)
    assert all(max(top.values()) >= lp.token_logprobs[i + 1] - 1e-6 for i, top in enumerate(lp.top_logprobs[1:]))


def test_chat_streaming_and_seeds(setup) -> None:
    model, tok, server, client = setup
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the json module for?"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    sampled = [client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=1.0, seed=s).choices[0].message.content for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    lp = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3).choices[0].logprobs
    assert len(lp.content) == 4 and len(lp.content[0].top_logprobs) == 3 and bytes(lp.content[0].bytes).decode(errors="replace") == lp.content[0].token


def test_bad_requests_get_openais_error_shape(setup) -> None:
    _, _, server, _ = setup
    h = {"Authorization": f"Bearer {KEY}"}
    url = server.url + "/v1/completions"
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"prompt": "hi", "max_tokens": -1}), 400, "invalid_value"),
        (json.dumps({"prompt": "hi", "max_tokens": 10**9}), 400, "invalid_value"),
        (json.dumps({"prompt": "hi", "temperature": "hot"}), 400, "invalid_value"),
        (json.dumps({"prompt": "hi", "n": 1000}), 400, "invalid_value"),
        (json.dumps({"prompt": ""}), 400, "invalid_value"),
        (json.dumps({"prompt": "word " * 500}), 400, "context_length_exceeded"),
        (json.dumps({"prompt": "hi", "model": "gpt-9"}), 404, "model_not_found"),
        (json.dumps({"max_tokens": 3}), 400, "missing_required_parameter"),
        (json.dumps({"prompt": [1, -5]}), 400, "invalid_value"),
        (json.dumps({"prompt": "x" * (1 << 20)}), 413, "body_too_large"),
    ]
    for body, status, code in cases:
        r = httpx.post(url, content=body, headers=h, timeout=30)
        assert r.status_code == status and r.json()["error"]["code"] == code, (body[:60], r.status_code, r.text[:200])
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url, json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/nowhere", headers=h)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(url, json={"prompt": "Return the", "max_tokens": 3, "temperature": 0, "unknown_field": [1, 2]}, headers=h)  # unknown fields ignored
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_health_and_metrics(setup) -> None:
    _, _, server, _ = setup
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/v1/models", headers=h).json()["data"][0]["id"] == "tiny"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("gptlab_requests_total{status=\"200\"}", "gptlab_generation_tokens_total", "gptlab_queue_depth", "gptlab_batch_size_bucket",
                 "gptlab_time_to_first_token_seconds_bucket", "gptlab_request_latency_seconds_count"):  # fmt: skip
        assert name in text, name


FUZZ_COMPLETIONS = [
    b"", b"null", b"[]", b'"a string"', b"{", b'{"prompt": "hi",}', b"\xff\xfe{}", b'{"prompt": "hi"}' * 2, b"[" * 100_000 + b"]" * 100_000,
    {"prompt": ["hi"] * 40, "n": 2}, {"prompt": "hi", "stop": ["x" * 5000]},
    {"prompt": None}, {"prompt": 5}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [["a"]]}, {"prompt": [True, False]},
    {"prompt": [1.5, 2]}, {"prompt": [10**12]}, {"prompt": {"text": "hi"}}, {"prompt": "hi", "max_tokens": "10"},
    {"prompt": "hi", "max_tokens": 1.5}, {"prompt": "hi", "max_tokens": True}, {"prompt": "hi", "temperature": -1},
    {"prompt": "hi", "temperature": 1e308}, {"prompt": "hi", "top_p": 2}, {"prompt": "hi", "top_p": 0}, {"prompt": "hi", "n": 0}, {"prompt": "hi", "n": -3},
    {"prompt": "hi", "stop": 5}, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, {"prompt": "hi", "stop": [""]},
    {"prompt": "hi", "seed": "x"}, {"prompt": "hi", "seed": 2**70}, {"prompt": "hi", "logprobs": 50}, {"prompt": "hi", "logprobs": -1},
    {"prompt": "hi", "logit_bias": {"abc": 1}}, {"prompt": "hi", "logit_bias": {"1": 500}}, {"prompt": "hi", "logit_bias": {"99999": 1}},
    {"prompt": "hi", "logit_bias": [1, 2]}, {"prompt": "hi", "presence_penalty": 3}, {"prompt": "hi", "frequency_penalty": "a"},
    {"prompt": "hi", "echo": "yes"}, {"prompt": "hi", "stream": "true"}, {"prompt": "hi", "stream_options": "x"},
    {"prompt": "hi", "user": 5}, {"prompt": "hi", "model": 7},
]  # fmt: skip
FUZZ_CHAT = [
    {"messages": None}, {"messages": []}, {"messages": "hi"}, {"messages": [5]}, {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "assistant", "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
    {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99}, {"messages": [{"role": "user", "content": "word " * 400}]},
]  # fmt: skip


def test_hostile_requests_get_4xx_json_and_the_server_lives_on(setup) -> None:
    _, _, server, client = setup
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [("/v1/completions", c) for c in FUZZ_COMPLETIONS] + [("/v1/chat/completions", c) for c in FUZZ_CHAT]
    assert len(cases) >= 40
    for path, body in cases:
        content = body if isinstance(body, bytes) else json.dumps(body)
        r = httpx.post(server.url + path, content=content, headers=h, timeout=30)
        assert 400 <= r.status_code < 500, (path, content[:80], r.status_code, r.text[:200])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"], (content[:80], r.text[:200])
    # no key, a wrong method, a half-sent body whose client goes away, a stalled one that closes
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(server.url + "/v1/completions", headers=h).status_code == 405
    for partial in (b'{"prompt": "hel', b""):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 500\r\n\r\n" + partial)
    # path traversal on the static route goes nowhere
    for path in ("/../../etc/passwd", "/static/../../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd"):
        r = httpx.get(server.url + path)
        assert r.status_code == 404 and "root:" not in r.text
    r = client.completions.create(model="tiny", prompt="Return the", max_tokens=4, temperature=0)  # still serving
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_full_queue_answers_429_with_retry_after(tok) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=1024, n_layer=2, n_head=2, n_embd=32)).eval()
    sched = Scheduler(model, tok, max_batch=1, max_queue=1)
    server = LoopbackServer(create_app(sched, ServeConfig(max_batch=1, max_queue=1)))
    try:
        # a long request that cannot end early (<|endoftext|> forbidden) holds the one slot while the others arrive
        body = {"prompt": "a", "max_tokens": 1000, "temperature": 0, "logit_bias": {str(tok.eot_id): -100}}
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream, and the server cancels the request
            next(lines)  # the first request runs
            statuses = []
            short = {**body, "max_tokens": 5}
            threads = [threading.Thread(target=lambda: statuses.append(httpx.post(server.url + "/v1/completions", json=short, timeout=60))) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        busy = [r for r in statuses if r.status_code == 429]
        assert busy and busy[0].headers["retry-after"] == "1" and busy[0].json()["error"]["code"] == "rate_limit_exceeded"
        assert any(r.status_code == 200 for r in statuses)  # the one that waited was served
    finally:
        server.close()
        sched.close()


def test_many_concurrent_streams_all_complete_and_a_dropped_client_frees_its_slot(setup) -> None:
    # 64 clients, 4 streaming requests each, against 8 slots and 64 queue places (a client told 429 would come
    # back after Retry-After); every stream must end with [DONE] and the engine's text
    model, tok, server, _ = setup
    h = {"Authorization": f"Bearer {KEY}"}
    words = ("Return", "The", "A", "Make", "Open", "Read", "Write", "Call")
    results: dict[tuple[int, int], str | None] = {}
    refused = []

    def client(i: int) -> None:
        for k in range(4):
            prompt = f"{words[(i + k) % 8]} the"
            while True:
                text, done = "", False
                with httpx.stream("POST", server.url + "/v1/completions", headers=h, timeout=120,
                                  json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}) as r:  # fmt: skip
                    if r.status_code == 429:
                        refused.append(r.headers["retry-after"])
                        time.sleep(float(r.headers["retry-after"]))
                        continue
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            text += json.loads(line[6:])["choices"][0]["text"]
                results[i, k] = (prompt, text) if done else None
                break

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    engine = Engine(model, tok)
    cfg = SampleConfig(max_new_tokens=12, temperature=0, stop_token_ids=(tok.special_tokens["<|im_end|>"],))
    want = {f"{w} the": engine.generate([f"{w} the"], cfg)[0].text for w in words}
    assert len(results) == 256 and all(r is not None and r[1] == want[r[0]] for r in results.values())
    assert all(after == "1" for after in refused)
    # a client that reads two chunks and hangs up: its request leaves the batch
    with httpx.stream("POST", server.url + "/v1/completions", headers=h, timeout=60,
                      json={"prompt": "a", "max_tokens": 80, "temperature": 0, "stream": True}) as r:  # fmt: skip
        lines = r.iter_lines()
        next(lines), next(lines)
    deadline = time.time() + 10
    while httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_serve_command_checks_its_limits_before_loading(capsys) -> None:
    from gptlab.cli import main

    for flag, value in (("--max-batch", "0"), ("--max-body-bytes", "0"), ("--port", "-1")):
        assert main(["serve", "--ckpt", "nowhere", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert flag in err and len(err.splitlines()) == 1, err
