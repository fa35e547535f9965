"""Rewards that are Python functions: the user's own, for tasks a program can verify
(`py:MODULE:FUNCTION`, `py:path/to/file.py:FUNCTION`), or built in (`builtin:exact`,
`builtin:length`). A reward model checkpoint is the other kind of reward; it is not loaded here.

The protocol. A reward function is called once per sample, as

    fn(prompt, completion) -> float
    fn(prompt, completion, reference=...) -> float  when it has a `reference` parameter (or **kwargs)

  prompt      what the model was given. For a chat prompt (every built-in prompt set, and
              rows whose "prompt" is messages) the conversation as a list of
              {"role": ..., "content": ...} dicts ending with the user's question; for a
              plain text prompt, the string.
  completion  the model's reply as text: without the prompt, without the end-of-turn marker.
  reference   the row's reference answer ("answer" in the built-in prompt sets), or None
              when the row has none.

It returns the sample's reward: an int or a float (numpy's count), and finite. A bool is
not a reward: `return answer in completion` is more often a slip than a decision to score
1 or 0 (say, a graded score compared against a threshold by accident), and the message
says how to mean it (`float(...)`). Whether to call with `reference` is settled once, from
the signature, when the function is loaded (`as_reward`), and a function that cannot take
(prompt, completion) is refused then, not on every sample.

`safe_rewards` scores a batch: a sample whose call raises, or returns a non-number, NaN or
an infinity, is skipped (its reward None) and reported with a one-line reason for the
caller to log, so one bad sample never ends a run and no NaN reaches a loss. When every
sample of a batch fails, the function is broken, not the samples: InputError, naming the
first reason, so the run stops at once instead of training on nothing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from gptlab.datasets import BUILTIN_PREFIX, exact_match, prompt_names
from gptlab.errors import ConfigError, InputError

PY_PREFIX = "py:"
LENGTH_CAP = 20  # builtin:length stops paying at this many words
_MAX_REPR = 80  # characters of a bad return value quoted in a skip reason

# What the chat prompt of a sample is: its messages, or a plain text prompt.
Prompt = str | list[dict]


# ----------------------------------------------------------------------------- built-in rewards


def exact_reward(prompt: Prompt, completion: str, reference: str | None = None) -> float:
    """`builtin:exact`: 1.0 when the completion is the reference answer (`exact_match`: the
    same once whitespace is collapsed), else 0.0. A sample without a reference cannot be
    scored: InputError, which `safe_rewards` reports as a skip."""
    if reference is None:
        sets = ", ".join(f"{BUILTIN_PREFIX}{name}" for name in prompt_names())
        raise InputError(f"{BUILTIN_PREFIX}exact needs a reference answer; use a prompt set with answers ({sets})")
    return 1.0 if exact_match(completion, reference) else 0.0


def length_reward(prompt: Prompt, completion: str) -> float:
    """`builtin:length`: min(words, 20) / 20, whatever the words say. Made to be hacked: a
    policy optimizing it learns to ramble rather than to answer, the reward-hacking demo's
    point that a reward gets what it pays for, not what it was meant to pay for."""
    return min(len(completion.split()), LENGTH_CAP) / LENGTH_CAP


BUILTIN_REWARDS: dict[str, Callable[..., float]] = {"exact": exact_reward, "length": length_reward}


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Reward:
    """A reward function (see the module docstring), named for messages ("py:rewards.py:score"),
    with whether it takes `reference` settled from its signature."""

    name: str
    fn: Callable[..., object]
    takes_reference: bool

    def __call__(self, prompt: Prompt, completion: str, reference: str | None = None) -> object:
        """The function's return value, unchecked: `safe_rewards` checks it is a finite number."""
        if self.takes_reference:
            return self.fn(prompt, completion, reference=reference)
        return self.fn(prompt, completion)


def as_reward(fn: Callable[..., object], name: str | None = None) -> Reward:
    """`fn` as a Reward: given `reference=` when it has a parameter of that name or **kwargs.
    ConfigError when it is not callable, or its signature cannot take (prompt, completion)."""
    name = name or getattr(fn, "__qualname__", repr(fn))
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: an object of type {type(fn).__name__} is not callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-in and C callables have none: call with two arguments
        return Reward(name, fn, takes_reference=False)
    parameters = signature.parameters
    takes_reference = any(p.kind is p.VAR_KEYWORD for p in parameters.values()) or (
        "reference" in parameters and parameters["reference"].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    try:
        signature.bind("prompt", "completion", **({"reference": None} if takes_reference else {}))
    except TypeError:
        raise ConfigError(f"reward {name!r}: a function {signature} cannot be called as fn(prompt, completion[, reference=...])") from None
    return Reward(name, fn, takes_reference)


def _forms() -> str:
    builtins = ", ".join(f"{BUILTIN_PREFIX}{name}" for name in sorted(BUILTIN_REWARDS))
    return f"expected {PY_PREFIX}MODULE:FUNCTION, {PY_PREFIX}path/to/file.py:FUNCTION or one of {builtins}"


def _describe(error: BaseException) -> str:
    """An exception on one line: its type, message and where it was raised ("rewards.py:12"),
    leaving out the import machinery (a SyntaxError's message says where it is)."""
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith("<frozen ")]
    return f"{text} ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else text


def _load_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"reward {spec!r}: no file {path}")
    # A name of its own, so that a file called json.py cannot replace the json module.
    module_name = f"_gptlab_reward_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickle look a module up there while it runs
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code, so any error: reported on one line, not as a traceback
        del sys.modules[module_name]
        raise ConfigError(f"reward {spec!r}: running {path} raised {_describe(error)}") from None
    return module


def _import(spec: str, name: str, function: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as error:  # the user's code, so any error: reported on one line, not as a traceback
        # The module itself (or a package above it) missing, not something it imports.
        missing = isinstance(error, ModuleNotFoundError) and error.name is not None and (name == error.name or name.startswith(f"{error.name}."))
        if missing:
            hint = f"for a file, give its path: {PY_PREFIX}path/to/file.py:{function}"
            raise ConfigError(f"reward {spec!r}: no module {name!r} on the Python path; {hint}") from None
        raise ConfigError(f"reward {spec!r}: importing {name} raised {_describe(error)}") from None


def load_reward_function(spec: str) -> Reward:
    """The reward a --reward value names: "py:MODULE:FUNCTION" (a module importable by name),
    "py:path/to/file.py:FUNCTION" (a file, loaded from its path: a target ending in .py or
    holding a path separator), or "builtin:exact" / "builtin:length". ConfigError, one line
    naming the spec, when it is malformed or names no function."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_REWARDS:
            raise ConfigError(f"unknown built-in reward {spec!r}; {_forms()}")
        return as_reward(BUILTIN_REWARDS[name], spec)
    # rpartition: the last colon ends the target, which may hold one (C:\rewards.py)
    target, _, function = spec.removeprefix(PY_PREFIX).rpartition(":")
    is_path = target.endswith(".py") or "/" in target or os.sep in target
    well_formed = spec.startswith(PY_PREFIX) and target and function.isidentifier()
    if not well_formed or not (is_path or all(part.isidentifier() for part in target.split("."))):
        raise ConfigError(f"reward {spec!r}: {_forms()}")
    module = _load_file(spec, Path(target).expanduser()) if is_path else _import(spec, target, function)
    if not hasattr(module, function):
        raise ConfigError(f"reward {spec!r}: {target} has no attribute {function!r}")
    fn = getattr(module, function)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {target}:{function} is of type {type(fn).__name__}, not a function")
    return as_reward(fn, spec)


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Skip:
    """A sample the reward could not score, and why, on one line."""

    index: int
    reason: str

    def __str__(self) -> str:
        return f"sample {self.index}: {self.reason}"


@dataclass(frozen=True)
class Scores:
    """A batch's rewards, one per sample in order, None where skipped; `skips` says why."""

    rewards: list[float | None]
    skips: list[Skip]


def _as_reward_value(value: object) -> tuple[float | None, str]:
    """The value as a finite float, or None and why it is not one."""
    if isinstance(value, bool):
        return None, f"returned {value}, a bool, not a number; return float(...) to score a check as 1.0 or 0.0"
    if not isinstance(value, numbers.Real):  # int, float, numpy's ints and floats, Fraction
        shown = " ".join(repr(value).split())
        shown = shown if len(shown) <= _MAX_REPR else shown[: _MAX_REPR - 3] + "..."
        return None, f"returned {type(value).__name__} {shown}, not a number"
    try:
        number = float(value)
    except OverflowError:  # an int or Fraction beyond float range
        return None, "returned a number too large for a float"
    if not math.isfinite(number):
        return None, f"returned {number}, not a finite number"
    return number, ""


def safe_rewards(
    reward: Reward,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    references: Sequence[str | None] | None = None,
) -> Scores:
    """Score each (prompt, completion, reference) sample; see the module docstring. A sample
    that fails is skipped; InputError when every sample of a non-empty batch fails."""
    if references is None:
        references = [None] * len(prompts)
    if not len(prompts) == len(completions) == len(references):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(references)} references: one each per sample")
    rewards: list[float | None] = []
    skips: list[Skip] = []
    for index, (prompt, completion, reference) in enumerate(zip(prompts, completions, references)):
        try:
            value = reward(prompt, completion, reference)
        except Exception as error:  # the user's function, so any error: one bad sample, not the end of the run
            number, reason = None, f"raised {_describe(error)}"
        else:
            number, reason = _as_reward_value(value)
        if number is None:
            skips.append(Skip(index, reason))
        rewards.append(number)
    if skips and len(skips) == len(rewards):
        raise InputError(f"reward {reward.name!r} failed on all {len(rewards)} samples of the batch; {skips[0]}")
    return Scores(rewards, skips)
