"""Built-in preference and prompt sets (right chosen answers, wrong rejected ones, the SFT sets'
splits, deterministic) and Python reward functions (loading, skipping bad samples, built-ins)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from gptlab.align.rewards import (
    LENGTH_CAP,
    Reward,
    Scores,
    Skip,
    as_reward,
    exact_reward,
    length_reward,
    load_reward_function,
    safe_rewards,
)
from gptlab.datasets import (
    builtin_names,
    exact_match,
    load_builtin,
    load_preferences,
    load_prompts,
    parse_builtin,
    parse_builtin_preferences,
    parse_builtin_prompts,
    preference_names,
    prompt_names,
)
from gptlab.errors import ConfigError, InputError

NAMES = ["arithmetic", "compare", "mix", "sorting", "spelling", "stdlib"]
PROMPT_NAMES = ["arithmetic", "compare", "mix", "sorting", "spelling"]
CHECKABLE = ["arithmetic", "compare", "sorting", "spelling"]
MIXED = ["arithmetic", "sorting", "spelling"]  # the checkable sets in the instruction mix
SPLITS = ("train", "test")


def question(row: dict) -> str:
    return row["prompt"][-1]["content"]


def right_answer(task: str, text: str) -> str:
    """The answer to a checkable question, recomputed from the question alone."""
    assert subtask_of(text) == task, (task, text)
    if task.startswith("arithmetic/"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", text).groups()
        return str({"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(a), int(b)))
    if task == "sorting/numbers":
        return " ".join(map(str, sorted(int(n) for n in text.removeprefix("Sort these numbers: ").split())))
    if task == "sorting/words":
        return " ".join(sorted(text.removeprefix("Sort these words alphabetically: ").split()))
    if task.startswith("compare/"):
        a, b = (int(n) for n in re.findall(r"\d+", text))
        return str(max(a, b) if task == "compare/larger" else min(a, b))
    *letter, word = re.findall(r"'([a-z]+)'", text)
    return {
        "spelling/spell": " ".join(word),
        "spelling/reverse": " ".join(reversed(word)),
        "spelling/length": str(len(word)),
        "spelling/count_letter": str(word.count(letter[0])) if letter else "",
    }[task]


# subtask -> the form of its questions
QUESTIONS = {
    "arithmetic/addition": r"What is \d+ \+ \d+\?",
    "arithmetic/subtraction": r"What is \d+ - \d+\?",
    "arithmetic/multiplication": r"What is \d+ \* \d+\?",
    "sorting/numbers": r"Sort these numbers: [\d ]+",
    "compare/larger": r"Which is larger, \d+ or \d+\?",
    "compare/smaller": r"Which is smaller, \d+ or \d+\?",
    "sorting/words": r"Sort these words alphabetically: [a-z ]+",
    "spelling/spell": r"Spell '[a-z]+'\.",
    "spelling/reverse": r"Spell '[a-z]+' backwards\.",
    "spelling/length": r"How many letters are in '[a-z]+'\?",
    "spelling/count_letter": r"How many times does '[a-z]' appear in '[a-z]+'\?",
}


def subtask_of(text: str) -> str:
    """The checkable subtask a question belongs to, by its form (a two-turn prompt's earlier turn has no task)."""
    (task,) = [task for task, pattern in QUESTIONS.items() if re.fullmatch(pattern, text)]
    return task


def sft_questions(name: str, split: str) -> set[str]:
    return {m["content"] for row in load_builtin(name, split) for m in row["messages"] if m["role"] == "user"}


# ----------------------------------------------------------------------------- names and specs


def test_names_and_specs():
    assert preference_names() == NAMES == builtin_names()
    assert prompt_names() == PROMPT_NAMES
    assert parse_builtin("builtin:stdlib") == "stdlib"  # the SFT form is unchanged
    assert parse_builtin("builtin:stdlib", "preferences") == parse_builtin_preferences("builtin:stdlib") == "stdlib"
    assert parse_builtin("builtin:mix", "prompts") == parse_builtin_prompts("builtin:mix") == "mix"
    with pytest.raises(ValueError, match="kind must be one of"):
        parse_builtin("builtin:mix", "rewards")


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: load_preferences("maths"), ["preference set", "'maths'", "arithmetic, compare, mix, sorting, spelling, stdlib"]),
        (lambda: load_preferences("stdlib", "val"), ["'val'", "train, test"]),
        (lambda: load_prompts("stdlib"), ["'stdlib'", "cannot be checked", "arithmetic, compare, mix, sorting, spelling"]),
        (lambda: load_prompts("nope", "test"), ["prompt set", "'nope'", "arithmetic, compare, mix, sorting, spelling"]),
        (lambda: load_prompts("mix", "dev"), ["'dev'", "train, test"]),
        (lambda: parse_builtin_prompts("builtin:stdlib"), ["'stdlib'", "arithmetic, compare, mix, sorting, spelling"]),
        (lambda: parse_builtin_preferences("pairs.jsonl"), ["'pairs.jsonl'", "builtin:NAME", "arithmetic, compare, mix, sorting, spelling, stdlib"]),
    ],
)
def test_bad_names_and_splits_are_one_line_input_errors(call, words):
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------- preference pairs


@pytest.mark.parametrize("name", NAMES)
def test_preferences_are_the_sft_rows_split_for_split(name):
    for split in SPLITS:
        rows = load_preferences(name, split)
        sft = load_builtin(name, split)
        assert len(rows) == len(sft)
        for row, sft_row in zip(rows, sft):
            assert set(row) == {"prompt", "chosen", "rejected", "task"}, row
            assert row["task"] == sft_row["task"]
            assert row["prompt"] == sft_row["messages"][:-1] and row["prompt"][-1]["role"] == "user"
            assert row["chosen"] == sft_row["messages"][-1]["content"]
            assert isinstance(row["rejected"], str) and row["rejected"].strip()
            assert row["rejected"] != row["chosen"] and not exact_match(row["rejected"], row["chosen"]), row
    test_questions = {question(row) for row in load_preferences(name, "test")}
    assert not test_questions & sft_questions(name, "train")
    assert test_questions <= sft_questions(name, "test")


@pytest.mark.parametrize("name", CHECKABLE)
def test_checkable_chosen_is_right_and_rejected_is_a_near_miss(name):
    tasks, kinds = Counter(), Counter()
    for split in SPLITS:
        for row in load_preferences(name, split):
            task, chosen, rejected = row["task"], row["chosen"], row["rejected"]
            assert chosen == right_answer(task, question(row)), row
            assert not exact_match(rejected, right_answer(task, question(row))), row
            tasks[task] += 1
            if task.startswith("arithmetic/"):
                wrong, right = int(rejected), int(chosen)  # off by at most 10, two digits swapped, or the sign flipped
                assert abs(wrong - right) <= 10 or sorted(str(abs(wrong))) == sorted(str(abs(right))) or wrong == -right, row
                assert task == "arithmetic/subtraction" or int(rejected) >= 0, row
            elif task.startswith("compare/"):  # the other number, one past the answer, or a miscopy
                wrong, right, numbers = int(rejected), int(chosen), [int(n) for n in re.findall(r"\d+", question(row))]
                past = 0 < (wrong - right) * (1 if task == "compare/larger" else -1) <= 10
                miscopy = len(rejected) == len(chosen) and sum(x != y for x, y in zip(rejected, chosen)) == 1
                assert 0 <= wrong < 100 and (sorted(numbers) == sorted([wrong, right]) or past or miscopy), row
                kinds[("other" if wrong in numbers else "past" if past else "miscopy")] += 1
            elif task.startswith("sorting/"):  # a permutation, or one of a run of equal numbers dropped
                assert Counter(rejected.split()) == Counter(chosen.split()) or rejected == chosen.rsplit(" ", 1)[0], row
            elif task in ("spelling/length", "spelling/count_letter"):
                assert abs(int(rejected) - int(chosen)) == 1 and int(rejected) >= 0, row
            else:  # one letter changed, two swapped, or (backwards) the word spelled forwards
                assert len(rejected.split()) == len(chosen.split()) and all(len(c) == 1 for c in rejected.split()), row
    assert len(tasks) == {"arithmetic": 3, "compare": 2, "sorting": 2, "spelling": 4}[name]
    assert name != "compare" or min(kinds[k] for k in ("other", "past", "miscopy")) > 500, kinds


@pytest.mark.parametrize("name", ["compare", "arithmetic"])
def test_several_rejected_answers_per_question_start_with_the_single_one(name):
    one, four = load_preferences(name, "test"), load_preferences(name, "test", per_question=4)
    by_question: dict[str, list[str]] = {}
    for row in four:
        assert row["chosen"] == right_answer(row["task"], question(row)) and not exact_match(row["rejected"], row["chosen"]), row
        by_question.setdefault(question(row), []).append(row["rejected"])
    assert [by_question[question(row)][0] for row in one] == [row["rejected"] for row in one]
    assert all(len(set(r)) == len(r) <= 4 for r in by_question.values()) and len(four) > 2.5 * len(one)
    with pytest.raises(InputError, match="per_question must be a positive integer, got 0"):
        load_preferences(name, "test", per_question=0)


def test_stdlib_rejected_is_another_answer_of_the_same_subtask_and_split():
    for split in SPLITS:
        answers: dict[str, set[str]] = {}
        for row in load_builtin("stdlib", split):
            answers.setdefault(row["task"], set()).add(row["messages"][-1]["content"])
        rows = load_preferences("stdlib", split)
        for row in rows:
            assert row["rejected"] in answers[row["task"]] and row["rejected"] != row["chosen"], row
        # spread over many answers, not one repeated
        assert len({row["rejected"] for row in rows}) > len(rows) // 3


def test_mix_pairs_are_the_sets_pairs():
    """A question gets the same rejected answer in its own set and in mix."""
    for split in SPLITS:
        own = {question(row): row for name in ("arithmetic", "sorting", "spelling", "stdlib") for row in load_preferences(name, split)}
        mixed = load_preferences("mix", split)
        assert sum(len(row["prompt"]) == 3 for row in mixed) > 0  # two-turn conversations, as in the SFT mix
        assert len({question(row) for row in mixed}) == len(mixed)
        for row in mixed:
            mine = own[question(row)]
            assert (row["task"], row["chosen"], row["rejected"]) == (mine["task"], mine["chosen"], mine["rejected"])


def test_rows_are_fresh_and_deterministic():
    first = load_preferences("sorting", "test")
    first[0]["prompt"][0]["content"] = "changed"
    first[1]["rejected"] = "changed"
    again = load_preferences("sorting", "test")
    assert again[0]["prompt"][0]["content"] != "changed" and again[1]["rejected"] != "changed"
    assert load_prompts("spelling", "test") == load_prompts("spelling", "test")


def digest() -> str:
    rows = [load_preferences("mix", "test"), load_prompts("mix", "test")]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_same_rows_in_another_process_with_another_hash_seed():
    code = """
import hashlib, json, sys
from gptlab.datasets import load_preferences, load_prompts
assert "gptlab.datasets.preferences" not in sys.modules and "ast" not in sys.modules, "imported before use"
rows = [load_preferences("mix", "test"), load_prompts("mix", "test")]
print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())
"""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == digest()


# ----------------------------------------------------------------------------- prompt sets


@pytest.mark.parametrize("name", PROMPT_NAMES)
def test_prompt_answers_are_right_and_splits_are_the_sft_ones(name):
    parts = MIXED if name == "mix" else [name]
    for split in SPLITS:
        rows = load_prompts(name, split)
        for row in rows:
            assert set(row) == {"prompt", "answer", "task"} and row["prompt"][-1]["role"] == "user", row
            assert row["task"].split("/")[0] in parts, row
            assert row["answer"] == right_answer(row["task"], question(row)), row
            for asked, answered in zip(row["prompt"][:-1:2], row["prompt"][1::2]):  # an earlier turn of the mix
                assert answered["content"] == right_answer(subtask_of(asked["content"]), asked["content"]), row
        # the same questions as the SFT sets' split: none from the other split, none from stdlib
        asked = Counter(m["content"] for row in rows for m in row["prompt"] if m["role"] == "user")
        expected = Counter(q for part in parts for q in sft_questions(part, split))
        assert asked == expected
    if name != "mix":
        assert [(row["prompt"], row["answer"]) for row in load_prompts(name)] == [(r["messages"][:-1], r["messages"][-1]["content"]) for r in load_builtin(name)]


# ----------------------------------------------------------------------------- loading reward functions

USER_REWARDS = '''
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:  # a dataclass with string annotations needs its module in sys.modules
    bonus: float = 0.5


def score(prompt, completion):
    return len(completion) + Config().bonus


def checked(prompt, completion, reference=None):
    return float(reference is not None and completion == reference)


def anything(prompt, completion, **extras):
    return float(len(extras))


def one_argument(completion):
    return 1.0


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS, encoding="utf-8")
    return path


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """A module importable by name, gone from sys.modules again after the test."""
    name = "gptlab_test_rewards_module"
    (tmp_path / f"{name}.py").write_text(USER_REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_load_from_a_file_path(rewards_file):
    score = load_reward_function(f"py:{rewards_file}:score")
    assert isinstance(score, Reward) and score.name == f"py:{rewards_file}:score" and not score.takes_reference
    assert score([{"role": "user", "content": "hi"}], "abc", "ignored") == 3.5
    checked = load_reward_function(f"py:{rewards_file}:checked")
    assert checked.takes_reference and checked("q", "42", "42") == 1.0 and checked("q", "42") == 0.0
    anything = load_reward_function(f"py:{rewards_file}:anything")
    assert anything.takes_reference and anything("q", "a", "ref") == 1.0
    assert "json" in sys.modules  # a file's module has a name of its own: nothing is shadowed


def test_load_by_module_name(rewards_module):
    reward = load_reward_function(f"py:{rewards_module}:score")
    assert reward("q", "ab") == 2.5


def test_builtin_rewards():
    exact, length = load_reward_function("builtin:exact"), load_reward_function("builtin:length")
    assert exact.fn is exact_reward and exact.takes_reference and length.fn is length_reward
    prompt = [{"role": "user", "content": "Sort these numbers: 3 1 2"}]
    assert exact(prompt, " 1  2\n3 ", "1 2 3") == 1.0
    assert exact(prompt, "1 2 3.", "1 2 3") == 0.0
    assert exact(prompt, "123", "1 2 3") == 0.0
    assert LENGTH_CAP == 20
    assert length(prompt, "") == 0.0
    assert length(prompt, "one two  three\nfour five") == 0.25
    assert length(prompt, "word " * 20) == length(prompt, "word " * 500) == 1.0  # the hack pays, up to the cap
    # every built-in prompt row's own answer earns the full reward
    rows = load_prompts("mix", "test")
    scores = safe_rewards(exact, [r["prompt"] for r in rows], [r["answer"] for r in rows], [r["answer"] for r in rows])
    assert scores.rewards == [1.0] * len(rows) and scores.skips == []
    # and the preference sets' rejected answers earn nothing
    pairs = load_preferences("arithmetic", "test")
    scores = safe_rewards(exact, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], [p["chosen"] for p in pairs])
    assert scores.rewards == [0.0] * len(pairs)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("py:{file}", ["expected py:MODULE:FUNCTION", "builtin:exact, builtin:length"]),
        ("py:{file}:", ["expected py:MODULE:FUNCTION"]),
        ("py::score", ["expected py:MODULE:FUNCTION"]),
        ("py:not a module:score", ["expected py:MODULE:FUNCTION"]),
        ("rewards.py:score", ["'rewards.py:score'", "expected py:MODULE:FUNCTION"]),
        ("builtin:exactly", ["'builtin:exactly'", "builtin:exact, builtin:length"]),
        ("py:{missing}:score", ["no file", "missing.py"]),
        ("py:gptlab_no_such_module_xyz:score", ["no module 'gptlab_no_such_module_xyz'", "py:path/to/file.py:score"]),
        ("py:{file}:nope", ["has no attribute 'nope'"]),
        ("py:{file}:NOT_A_FUNCTION", ["NOT_A_FUNCTION is of type int, not a function"]),
        ("py:{file}:one_argument", ["(completion)", "cannot be called as fn(prompt, completion"]),
        ("py:{broken}:score", ["running", "ZeroDivisionError: division by zero", "broken.py:2"]),
        ("py:{bad_syntax}:score", ["SyntaxError: ", "(bad_syntax.py, line 1)"]),
        ("py:{bad_import}:score", ["ModuleNotFoundError", "gptlab_no_such_dependency"]),
    ],
)
def test_bad_reward_specs_are_one_line_config_errors(tmp_path, rewards_file, spec, words):
    (tmp_path / "broken.py").write_text("x = 1\ny = x / 0\n", encoding="utf-8")
    (tmp_path / "bad_syntax.py").write_text("def score(prompt, completion)\n    return 1\n", encoding="utf-8")
    (tmp_path / "bad_import.py").write_text("import gptlab_no_such_dependency\n", encoding="utf-8")
    paths = {name: tmp_path / f"{name}.py" for name in ("broken", "bad_syntax", "bad_import", "missing")}
    spec = spec.format(file=rewards_file, **paths)
    with pytest.raises(ConfigError) as info:
        load_reward_function(spec)
    message = str(info.value)
    assert "\n" not in message and spec in message and "<frozen" not in message, message
    for word in words:
        assert word in message, message


def test_a_missing_dependency_of_a_module_is_not_a_missing_module(tmp_path, monkeypatch):
    (tmp_path / "gptlab_test_needs_dep.py").write_text("import gptlab_no_such_dependency\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing gptlab_test_needs_dep raised ModuleNotFoundError"):
        load_reward_function("py:gptlab_test_needs_dep:score")


def test_as_reward_refuses_what_cannot_be_called():
    with pytest.raises(ConfigError, match="'three': an object of type int is not callable"):
        as_reward(3, "three")  # type: ignore[arg-type]

    class Scorer:
        def __call__(self, prompt, completion, reference):
            return 1.0

    assert as_reward(Scorer()).takes_reference is True


# ----------------------------------------------------------------------------- scoring a batch


def test_bad_samples_are_skipped_with_one_line_reasons():
    import numpy as np

    values = {"int": 2, "float": 0.5, "np": np.float32(0.25), "nan": math.nan, "inf": -math.inf, "bool": True, "str": "1.0", "none": None}

    def reward(prompt, completion):
        if completion == "raise":
            raise ValueError("no\nanswer")
        return values[completion]

    completions = [*values, "raise"]
    scores = safe_rewards(as_reward(reward, "mine"), ["q"] * len(completions), completions)
    assert isinstance(scores, Scores)
    assert scores.rewards == [2.0, 0.5, 0.25, None, None, None, None, None, None]
    assert all(type(r) is float for r in scores.rewards if r is not None)
    assert [s.index for s in scores.skips] == [3, 4, 5, 6, 7, 8]
    reasons = [s.reason for s in scores.skips]
    assert all("\n" not in r for r in reasons)
    assert reasons[0] == "returned nan, not a finite number" and reasons[1] == "returned -inf, not a finite number"
    assert "a bool, not a number" in reasons[2] and "float(" in reasons[2]
    assert reasons[3] == "returned str '1.0', not a number" and reasons[4] == "returned NoneType None, not a number"
    assert reasons[5].startswith("raised ValueError: no answer (test_preferences.py:")
    assert str(scores.skips[0]) == "sample 3: returned nan, not a finite number"


def test_a_batch_where_every_sample_fails_is_an_error():
    def broken(prompt, completion):
        return completion.missing_method()

    with pytest.raises(InputError) as info:
        safe_rewards(as_reward(broken, "py:mine.py:broken"), ["a", "b"], ["x", "y"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("reward 'py:mine.py:broken' failed on all 2 samples of the batch; sample 0: raised AttributeError:"), message
    # builtin:exact without references: nothing it could score
    with pytest.raises(InputError, match="needs a reference answer"):
        safe_rewards(load_reward_function("builtin:exact"), ["q"], ["1"])
    # one good sample is enough to go on; an empty batch is no failure
    nan_but_one = as_reward(lambda prompt, completion: 1.0 if completion == "ok" else math.nan)
    assert safe_rewards(nan_but_one, ["q"] * 3, ["x", "ok", "y"]).rewards == [None, 1.0, None]
    assert safe_rewards(nan_but_one, [], []) == Scores([], [])
    with pytest.raises(ValueError, match="one each per sample"):
        safe_rewards(nan_but_one, ["q"], ["a", "b"])
    assert Skip(3, "why").index == 3
