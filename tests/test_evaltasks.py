"""The built-in evaluation tasks: contract fields, right answers, disjoint splits, no leakage
from the SFT sets, determinism across processes, and the number-to-words converter."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from gptlab.datasets import load_builtin
from gptlab.datasets.evaltasks import EVAL_TASKS, RELATIONS, eval_rows, number_to_words
from gptlab.datasets.stdlib_qa import stdlib_modules
from gptlab.errors import InputError

SPLITS = ("train", "test")
# task -> {field: type}
FIELDS = {
    "arithmetic_mc": {"question": str, "choices": list, "answer": int},
    "arithmetic": {"question": str, "answer": str},
    "word_problems": {"question": str, "reasoning": str, "answer": str},
    "stdlib_mc": {"question": str, "choices": list, "answer": int},
    "analogies": {"word": str, "relation": str, "choices": list, "answer": int},
    "number_words": {"number": str, "words": str},
}


def key(name: str, row: dict) -> tuple[str, ...]:
    """What a row asks: its question, or for analogies the word and relation, or the number."""
    if name == "analogies":
        return (row["relation"], row["word"])
    return (row["number"],) if name == "number_words" else (row["question"],)


def arithmetic(question: str) -> int:
    """The result of "What is A op B?", parsed, not evaluated."""
    a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_task_names():
    assert EVAL_TASKS == ("arithmetic_mc", "arithmetic", "word_problems", "stdlib_mc", "analogies", "number_words")
    assert set(FIELDS) == set(EVAL_TASKS)


@pytest.mark.parametrize("name", EVAL_TASKS)
def test_fields_choices_and_disjoint_splits(name):
    keys = {}
    for split in SPLITS:
        rows = eval_rows(name, split)
        assert rows, (name, split)
        for row in rows:
            assert set(row) == set(FIELDS[name]), row
            for field, kind in FIELDS[name].items():
                assert type(row[field]) is kind, (field, row)
            if "choices" in row:
                assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row
                assert all(isinstance(c, str) and c.strip() for c in row["choices"]), row
                assert 0 <= row["answer"] < 4, row
        keys[split] = [key(name, row) for row in rows]
        assert len(set(keys[split])) == len(keys[split]), f"{name} {split}: a question asked twice"
    assert not set(keys["train"]) & set(keys["test"])


def test_multiple_choice_answer_positions_are_spread():
    for name in ("arithmetic_mc", "stdlib_mc", "analogies"):
        positions = [row["answer"] for split in SPLITS for row in eval_rows(name, split)]
        assert all(positions.count(i) > len(positions) / 8 for i in range(4)), name


def test_arithmetic_answers_are_right_and_follow_the_sft_split():
    sft = {split: {row["messages"][0]["content"] for row in load_builtin("arithmetic", split)} for split in SPLITS}
    for split in SPLITS:
        mc, generative = eval_rows("arithmetic_mc", split), eval_rows("arithmetic", split)
        assert [row["question"] for row in mc] == [row["question"] for row in generative]
        for row in mc:
            assert row["choices"][row["answer"]] == str(arithmetic(row["question"])), row
            assert all(re.fullmatch(r"-?\d+", c) for c in row["choices"]), row
        for row in generative:
            assert row["answer"] == str(arithmetic(row["question"])), row
        questions = {row["question"] for row in mc}
        assert questions <= sft[split]
    assert len(eval_rows("arithmetic_mc", "test")) == len(sft["test"]) == 400
    assert not {row["question"] for row in eval_rows("arithmetic_mc", "test")} & sft["train"]
    assert len(eval_rows("arithmetic_mc", "train")) == 1000


def test_word_problems_reasoning_is_right_and_ends_with_the_answer():
    for split in SPLITS:
        for row in eval_rows("word_problems", split):
            steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", row["reasoning"])
            assert len(steps) == 2, row
            for a, op, b, c in steps:
                a, b, c = int(a), int(b), int(c)
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, row
            assert re.findall(r"\d+", row["reasoning"])[-1] == row["answer"] == steps[-1][3], row
            assert steps[0][3] in {a for step in steps[1:] for a in (step[0], step[2])}, f"the second step uses the first: {row}"
            assert int(row["answer"]) >= 0, row


def test_stdlib_mc_answers_are_the_described_definitions_and_follow_the_sft_split():
    summaries = {f"{d.module}.{d.name}": d.summary for m in stdlib_modules() for d in m.definitions}
    sft_train = {row["messages"][-1]["content"] for row in load_builtin("stdlib", "train") if row["task"] == "stdlib/describe"}
    for split in SPLITS:
        for row in eval_rows("stdlib_mc", split):
            answer = row["choices"][row["answer"]]
            assert summaries[answer] == row["question"], row
            assert all(c in summaries and summaries[c] != row["question"] for i, c in enumerate(row["choices"]) if i != row["answer"]), row
            assert answer.rsplit(".", 1)[1].lower() not in row["question"].lower(), row
            assert (row["question"] in sft_train) == (split == "train"), row


def test_analogies_answers_come_from_the_tables_and_choices_from_the_relation():
    table = {relation: dict(pairs) for relation, pairs in RELATIONS.items()}
    assert all(len(table[relation]) == len(pairs) for relation, pairs in RELATIONS.items()), "a word listed twice"
    assert len(set(table["category"].values())) >= 8 and len(table["opposite"]) >= 40 and len(table["capital"]) >= 30
    # An opposite listed both ways would put a test pair's reverse into train.
    assert not set(table["opposite"]) & set(table["opposite"].values())
    seen: dict[str, set[str]] = {}
    for split in SPLITS:
        for row in eval_rows("analogies", split):
            answers = set(table[row["relation"]].values())
            assert row["choices"][row["answer"]] == table[row["relation"]][row["word"]], row
            assert set(row["choices"]) <= answers, row
            seen.setdefault(row["relation"], set()).add(split)
    assert all(splits == set(SPLITS) for splits in seen.values()) and set(seen) == set(RELATIONS)
    # Every word is asked once: the splits together are the tables.
    assert sum(len(eval_rows("analogies", split)) for split in SPLITS) == sum(len(pairs) for pairs in RELATIONS.values())


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (21, "twenty-one"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (110, "one hundred ten"),
        (999, "nine hundred ninety-nine"),
        (1000, "one thousand"),
        (1001, "one thousand one"),
        (12345, "twelve thousand three hundred forty-five"),
        (99999, "ninety-nine thousand nine hundred ninety-nine"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = {word: 10 * i for i, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}


def words_to_number(words: str) -> int:
    """An independent reading of the words: sums of ones and tens, times a hundred or a thousand."""
    total = group = 0
    for word in words.split():
        if word == "thousand":
            total, group = total + group * 1000, 0
        elif word == "hundred":
            group *= 100
        else:
            group += sum(TENS[part] if part in TENS else ONES.index(part) for part in word.split("-"))
    return total + group


def test_number_words_round_trip_and_spread_over_magnitudes():
    for split in SPLITS:
        rows = eval_rows("number_words", split)
        for row in rows:
            assert re.fullmatch(r"0|[1-9]\d{0,4}", row["number"]), row
            assert words_to_number(row["words"]) == int(row["number"]), row
            assert row["words"] == number_to_words(int(row["number"])) and " and " not in row["words"], row
        assert len({len(row["number"]) for row in rows}) >= 4, f"{split}: a mix of magnitudes"
    for n in range(0, 100_000, 7):
        assert words_to_number(number_to_words(n)) == n
    with pytest.raises(ValueError):
        number_to_words(-1)


def digest() -> str:
    rows = {name: [eval_rows(name, split) for split in SPLITS] for name in EVAL_TASKS}
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_deterministic_fresh_rows_and_the_same_in_another_process_with_another_hash_seed():
    for name in EVAL_TASKS:
        assert eval_rows(name, "test") == eval_rows(name, "test")
    first = eval_rows("arithmetic_mc", "test")
    first[0]["choices"].append("changed")
    first[1]["question"] = "changed"
    again = eval_rows("arithmetic_mc", "test")
    assert len(again[0]["choices"]) == 4 and again[1]["question"] != "changed"
    code = """
import hashlib, json
from gptlab.datasets.evaltasks import EVAL_TASKS, eval_rows
rows = {name: [eval_rows(name, split) for split in ("train", "test")] for name in EVAL_TASKS}
print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())
"""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == digest()


@pytest.mark.parametrize(
    ("name", "split", "words"),
    [
        ("arithmetic_mcq", "test", ["unknown evaluation task 'arithmetic_mcq'", "arithmetic_mc, arithmetic, word_problems"]),
        ("analogies", "validation", ["unknown split 'validation'", "train, test"]),
    ],
)
def test_bad_names_and_splits_are_input_errors(name, split, words):
    with pytest.raises(InputError) as error:
        eval_rows(name, split)
    assert all(word in str(error.value) for word in words)
