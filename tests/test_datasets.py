"""The built-in instruction sets: deterministic, valid chat rows, disjoint splits, right answers."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from gptlab.datasets import (
    BUILTIN_PREFIX,
    builtin_names,
    checkable,
    exact_match,
    is_builtin,
    load_builtin,
    parse_builtin,
)
from gptlab.datasets.stdlib_qa import stdlib_words
from gptlab.errors import InputError

NAMES = ["arithmetic", "compare", "mix", "sorting", "spelling", "stdlib"]
CHECKABLE = ["arithmetic", "compare", "sorting", "spelling"]


def turns(row: dict) -> list[tuple[str, str]]:
    messages = row["messages"]
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def digest() -> str:
    """A hash of every row of every set (mix holds the others), as the child process below computes it."""
    rows = [load_builtin("mix", split) for split in ("train", "test")]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_names_and_specs():
    assert builtin_names() == NAMES
    assert [name for name in NAMES if checkable(name)] == CHECKABLE
    assert BUILTIN_PREFIX == "builtin:"
    assert is_builtin("builtin:mix") and not is_builtin("data/mix.jsonl")
    assert parse_builtin("builtin:spelling") == "spelling"


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: load_builtin("arithmetics"), ["'arithmetics'", "arithmetic, compare, mix, sorting, spelling, stdlib"]),
        (lambda: load_builtin("sorting", "val"), ["'val'", "train, test"]),
        (lambda: parse_builtin("builtin:nope"), ["'nope'", "arithmetic, compare, mix, sorting, spelling, stdlib"]),
        (lambda: parse_builtin("data.jsonl"), ["'data.jsonl'", "builtin:NAME", "arithmetic, compare, mix"]),
        (lambda: checkable("maths"), ["'maths'", "arithmetic, compare, mix"]),
    ],
)
def test_bad_names_and_splits_are_one_line_input_errors(call, words):
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_exact_match_strips_and_collapses_whitespace_only():
    assert exact_match(" 1  2\t5\n9 \n", "1 2 5 9")
    assert exact_match("-8", "-8")
    assert not exact_match("12", "1 2")
    assert not exact_match("Json", "json")
    assert not exact_match("82.", "82")


def test_sizes_chat_format_and_disjoint_splits():
    sizes = {name: (len(load_builtin(name)), len(load_builtin(name, "test"))) for name in NAMES}
    for name in CHECKABLE:
        assert sizes[name] == (4000, 2000 if name == "compare" else 400), name  # compare: the alignment demo's larger test set
    assert 1000 <= sizes["stdlib"][0] <= 4000 and 100 <= sizes["stdlib"][1] <= 400, sizes["stdlib"]
    for name in NAMES:
        questions = {}
        for split in ("train", "test"):
            for row in load_builtin(name, split):
                assert set(row) == {"messages", "task"} and row["task"].split("/")[0] in NAMES, row
                messages = row["messages"]
                assert len(messages) >= 2 and len(messages) % 2 == 0, row
                for i, message in enumerate(messages):
                    assert set(message) == {"role", "content"}, row
                    assert message["role"] == ("user" if i % 2 == 0 else "assistant"), row
                    assert isinstance(message["content"], str) and message["content"].strip(), row
                for question, _ in turns(row):
                    assert questions.setdefault(question, split) == split, f"{name}: {question!r} in both splits"
    # mix is exactly the union of the instruction sets (compare, the alignment demo's task, stays out),
    # a few rows joined into two-turn conversations
    for split in ("train", "test"):
        mixed = load_builtin("mix", split)
        assert sorted(t for row in mixed for t in turns(row)) == sorted(
            t for name in ("arithmetic", "sorting", "spelling", "stdlib") for row in load_builtin(name, split) for t in turns(row)
        )
        assert 0 < sum(len(row["messages"]) == 4 for row in mixed) < len(mixed) // 10
        assert all(row["task"].split("/")[0] != "mix" for row in mixed)


def test_loading_is_deterministic_and_returns_fresh_rows():
    first = load_builtin("arithmetic")
    first[0]["messages"][0]["content"] = "changed"
    assert load_builtin("arithmetic")[0]["messages"][0]["content"] != "changed"
    assert load_builtin("mix", "test") == load_builtin("mix", "test")


def test_same_rows_in_another_process_with_another_hash_seed_and_no_library_imports():
    code = """
import hashlib, json, sys
from gptlab.datasets import load_builtin
assert "torch" not in sys.modules and "ast" not in sys.modules, "gptlab.datasets should import little"
rows = [load_builtin("mix", split) for split in ("train", "test")]
print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())
print(sorted({"webbrowser", "tkinter", "subprocess", "zipapp"} & set(sys.modules)))
"""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    their_digest, imported = out.stdout.splitlines()
    assert their_digest == digest()
    assert imported == "[]"  # the sources are parsed with ast, never imported


# ----------------------------------------------------------------------------- the answers are right


def expected_answer(task: str, question: str) -> str:
    """The answer, recomputed from the question alone."""
    if task.startswith("arithmetic/"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
        a, b = int(a), int(b)
        expected = {"arithmetic/addition": ("+", a + b), "arithmetic/subtraction": ("-", a - b), "arithmetic/multiplication": ("*", a * b)}[task]
        assert op == expected[0], (task, question)
        return str(expected[1])
    if task == "sorting/numbers":
        numbers = [int(n) for n in question.removeprefix("Sort these numbers: ").split()]
        assert 3 <= len(numbers) <= 6 and all(0 <= n < 100 for n in numbers), question
        return " ".join(map(str, sorted(numbers)))
    if task == "sorting/words":
        words = question.removeprefix("Sort these words alphabetically: ").split()
        assert 3 <= len(words) <= 5 and len(set(words)) == len(words), question
        return " ".join(sorted(words))
    if task.startswith("compare/"):
        kind, a, b = re.fullmatch(r"Which is (larger|smaller), (\d+) or (\d+)\?", question).groups()
        a, b = int(a), int(b)
        assert task == f"compare/{kind}" and a != b and max(a, b) < 100, (task, question)
        return str(max(a, b) if kind == "larger" else min(a, b))
    patterns = {
        "spelling/spell": r"Spell '([a-z]+)'\.",
        "spelling/reverse": r"Spell '([a-z]+)' backwards\.",
        "spelling/length": r"How many letters are in '([a-z]+)'\?",
        "spelling/count_letter": r"How many times does '([a-z])' appear in '([a-z]+)'\?",
    }
    groups = re.fullmatch(patterns[task], question).groups()
    word = groups[-1]
    assert 3 <= len(word) <= 10, word
    return {
        "spelling/spell": " ".join(word),
        "spelling/reverse": " ".join(word[::-1]),
        "spelling/length": str(len(word)),
        "spelling/count_letter": str(word.count(groups[0])),
    }[task]


def test_checkable_answers_are_right():
    words = set(stdlib_words())
    assert len(words) > 1000
    tasks = set()
    for name in CHECKABLE:
        for split in ("train", "test"):
            for row in load_builtin(name, split):
                ((question, answer),) = turns(row)
                assert answer == expected_answer(row["task"], question), (row["task"], question, answer)
                tasks.add(row["task"])
                for quoted in re.findall(r"'([a-z]{2,})'", question):
                    assert quoted in words, question
    assert len(tasks) == 11
    # subtraction goes below zero, and some letters are absent from their word
    answers = {turns(row)[0][1] for row in load_builtin("arithmetic") if row["task"] == "arithmetic/subtraction"}
    assert any(a.startswith("-") for a in answers)
    assert any(turns(row)[0][1] == "0" for row in load_builtin("spelling") if row["task"] == "spelling/count_letter")


@functools.cache
def module_tree(module: str) -> ast.Module:
    # importlib's find_spec would say "frozen" for os, codecs, ...: read the file from the stdlib directory
    root = Path(sysconfig.get_paths()["stdlib"])
    (path,) = [p for p in (root / f"{module}.py", root / module / "__init__.py") if p.is_file()]
    return ast.parse(path.read_text(encoding="utf-8"))


def flat(text: str) -> str:
    return " ".join(text.split())


def test_stdlib_answers_come_from_the_sources():
    tasks = set()
    for split in ("train", "test"):
        for row in load_builtin("stdlib", split):
            ((question, answer),) = turns(row)
            task = row["task"]
            tasks.add(task)
            if task == "stdlib/module_summary":
                module = re.fullmatch(r"What is the (\w+) module for\?", question).group(1)
                tree = module_tree(module)
                assert answer in flat(ast.get_docstring(tree)), question
                continue
            if task == "stdlib/module_of":
                kind, name = re.fullmatch(r"Which module defines the (function|class) `(\w+)`\?", question).groups()
                module = answer
            else:
                module, name = re.fullmatch(r"What (?:is the signature of|does|is) (\w+)\.(\w+)(?: do)?\?", question).groups()
            tree = module_tree(module)
            (node,) = [n for n in tree.body if getattr(n, "name", None) == name]
            assert not name.startswith("_")
            if task == "stdlib/module_of":
                assert isinstance(node, ast.ClassDef) == (kind == "class"), question
            elif task == "stdlib/signature":
                assert answer.startswith(f"{module}.{name}("), answer
                (parsed,) = ast.parse(f"def {answer[len(module) + 1 :]}: pass").body
                assert parsed.name == name and ast.dump(parsed.args) == ast.dump(node.args), answer
            else:
                assert task == "stdlib/describe", task
                assert question.endswith(" do?") == (not isinstance(node, ast.ClassDef)), question
                assert answer.endswith(".") and answer in flat(ast.get_docstring(node)), (question, answer)
    assert tasks == {"stdlib/module_summary", "stdlib/module_of", "stdlib/signature", "stdlib/describe"}
    # a well-known example, present on every supported Python
    rows = load_builtin("stdlib") + load_builtin("stdlib", "test")
    assert ("What is the signature of textwrap.dedent?", "textwrap.dedent(text)") in [turns(r)[0] for r in rows]
