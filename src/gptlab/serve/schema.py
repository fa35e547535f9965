"""The OpenAI request fields gptlab serves, checked by hand, and the error shape clients expect.

Every check failure is an `ApiError` that the server answers with OpenAI's body,
{"error": {"message", "type", "param", "code"}}, and a 4xx status. Fields OpenAI defines that
gptlab does not use are ignored, as OpenAI ignores unknown ones; a known field of the wrong
type or out of range is a 400 naming it (`param`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_N = 16  # choices per request (OpenAI allows 128; each is a running request here)
MAX_STOP = 4  # stop sequences, as OpenAI
MAX_STOP_CHARS = 1000
MAX_CHOICES = 64  # prompts x n in one request
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object a POST carries."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8", code="invalid_json") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the request body is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# ----------------------------------------------------------------------------- field checks


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param, code="invalid_value")


def _number(body: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"expected a number, got {json.dumps(value)[:40]}")
    if not lo <= value <= hi:
        raise _bad(name, f"{value} is out of range [{lo:g}, {hi:g}]")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"expected an integer, got {json.dumps(value)[:40]}")
    if not lo <= value <= hi:
        raise _bad(name, f"{value} is out of range [{lo}, {hi}]")
    return value


def _top_p(body: dict) -> float | None:
    value = _number(body, "top_p", None, 0.0, 1.0)
    if value == 0:
        raise _bad("top_p", "must be above 0 (a nucleus holding no token); use temperature 0 for greedy")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {json.dumps(value)[:40]}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        raise _bad("stop", "expected a non-empty string or a list of them")
    if len(values) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop sequences, got {len(values)}")
    if max(map(len, values)) > MAX_STOP_CHARS:
        raise _bad("stop", f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
    return tuple(values)


def _logit_bias(body: dict, vocab: int) -> dict[int, float] | None:
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("logit_bias", "expected an object of token id -> bias")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab):
            raise _bad("logit_bias", f"token id {key!r} is not an integer in [0, {vocab})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise _bad("logit_bias", f"the bias of token {key} must be a number in [-100, 100]")
        out[int(key)] = float(bias)
    return out


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Sampling:
    """What a completion or chat request asks of generation, checked."""

    max_tokens: int | None  # None: until the context is full
    temperature: float
    top_p: float | None
    n: int
    stop: tuple[str, ...]
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[int, float] | None
    logprobs: int | None  # top alternatives per token; None: no log-probs
    stream: bool
    include_usage: bool


def check_model(body: dict, name: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "expected a string")
    if model is not None and model != name:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {name!r}", param="model", code="model_not_found")


def sampling(body: dict, vocab: int, max_tokens_cap: int, default_max: int | None, chat: bool) -> Sampling:
    """The sampling fields of a request; `chat` reads max_completion_tokens and boolean logprobs / top_logprobs."""
    max_tokens = _integer(body, "max_completion_tokens", None, 1, max_tokens_cap) if chat else None
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max, 0 if not chat else 1, max_tokens_cap)
    if chat:
        wants = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not wants:
            raise _bad("top_logprobs", "needs logprobs: true")
        logprobs = (top or 0) if wants else None
    else:
        logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "expected an object")
    include_usage = bool(options and options.get("include_usage") is True)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "expected a string")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),  # type: ignore[arg-type]
        top_p=_top_p(body),
        n=_integer(body, "n", 1, 1, MAX_N),  # type: ignore[arg-type]
        stop=_stop(body),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),  # type: ignore[arg-type]
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),  # type: ignore[arg-type]
        logit_bias=_logit_bias(body, vocab),
        logprobs=logprobs,
        stream=_flag(body, "stream"),
        include_usage=include_usage,
    )


def prompts(body: dict, vocab: int) -> list[str | list[int]]:
    """A completion's prompts: a string, a list of strings, a list of token ids, or a list of such lists."""
    value = body.get("prompt")
    if value is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(value, str):
        items: list = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise _bad("prompt", "expected a string, a list of strings, a list of token ids or a list of such lists")
    n = body.get("n", 1) if isinstance(body.get("n", 1), int) else 1
    if len(items) * n > MAX_CHOICES:
        raise _bad("prompt", f"{len(items)} prompts x n = {n} asks for {len(items) * n} completions; at most {MAX_CHOICES} per request")
    for item in items:
        if isinstance(item, str):
            continue
        if not isinstance(item, list) or not item or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            raise _bad("prompt", "each prompt must be a string or a non-empty list of token ids")
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
            raise _bad("prompt", f"token id {bad[0]} is outside [0, {vocab})")
    return items


def messages(body: dict) -> list[dict[str, str]]:
    """Chat messages: system / user / assistant with string content (or a list of text parts), ending
    with a user or system message."""
    value = body.get("messages")
    if value is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for k, message in enumerate(value):
        where = f"messages[{k}]"
        if not isinstance(message, dict):
            raise _bad(where, "expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role", f"expected system, user or assistant, got {json.dumps(role)[:40]}")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise _bad(f"{where}.content", "only text parts ({type: text, text}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "expected a string")
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise _bad("messages", "the last message must be the user's (or the system's), not the assistant's")
    return out
