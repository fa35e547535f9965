"""Preference pairs and prompt sets for alignment, derived from the built-in instruction sets.

A preference row pairs a set's own answer ("chosen") with a wrong one ("rejected"), so that
a reward model or DPO learns what a checker knows. For the checkable sets the rejected
answer is a near miss, the kind of slip a small model makes (a result off by a little or
with two digits swapped, a list sorted but for one adjacent pair, a word with one letter
changed, a count off by one, the other number of a comparison or one past the answer): obvious
nonsense would teach only to tell nonsense apart.
For stdlib it is the answer to another question of the same subtask in the same split
(another function's signature or docstring sentence, another module): real text, wrong here.

Rows are made from the same split of the set they are named after, question for question,
so an alignment test split shares no question with the fine-tuning train split of any set,
and a stdlib rejected answer never carries a test answer into train. Each wrong answer is
drawn by a `random.Random` seeded with its question (a string seed is hashed with SHA-512,
not `hash()`): the same question gets the same rejected answer in its set and in mix, in
every process, whatever PYTHONHASHSEED.

A prompt row is a conversation up to a checkable question and that question's answer, for
rewards that score a model's own reply (PPO, GRPO).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import cache

from gptlab.datasets import _splits, exact_match
from gptlab.datasets.common import Example, Splits, merge

REJECT_SEED = 6  # salts each question's seed, so rejected answers are not tied to other draws
PROMPT_MIX_SEED = 7
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_CHECKABLE_PARTS = ("arithmetic", "sorting", "spelling")

# ----------------------------------------------------------------------------- near misses


def _near_number(answer: str, rng: random.Random, signed: bool) -> str:
    """Off by 1, 2 or 10, two adjacent digits swapped, or (`signed`, for subtraction) the sign
    flipped. Only a result that can be negative gets negative wrong answers."""
    n = int(answer)
    candidates = {n + d for d in (-10, -2, -1, 1, 2, 10)}
    digits = str(abs(n))
    for i in range(len(digits) - 1):
        swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]
        if not swapped.startswith("0"):
            candidates.add(-int(swapped) if n < 0 else int(swapped))
    if signed:
        candidates.add(-n)
    else:
        candidates = {c for c in candidates if c >= 0}
    candidates.discard(n)
    return str(rng.choice(sorted(candidates)))


def _off_by_one(answer: str, rng: random.Random) -> str:
    """A count one more or one less, never below zero."""
    n = int(answer)
    return str(rng.choice((n - 1, n + 1)) if n > 0 else n + 1)


def _misspelled(answer: str, rng: random.Random, backwards: bool) -> str:
    """The spaced letters with one letter changed or two adjacent different letters swapped;
    spelled `backwards`, also the word spelled forwards (unless it is a palindrome)."""
    letters = answer.split()
    i = rng.randrange(len(letters))
    candidates = [letters[:i] + [rng.choice([c for c in _LETTERS if c != letters[i]])] + letters[i + 1 :]]
    swaps = [j for j in range(len(letters) - 1) if letters[j] != letters[j + 1]]
    if swaps:
        j = rng.choice(swaps)
        candidates.append(letters[:j] + [letters[j + 1], letters[j]] + letters[j + 2 :])
    if backwards and letters != letters[::-1]:
        candidates.append(letters[::-1])
    return " ".join(rng.choice(candidates))


def _almost_sorted(answer: str, rng: random.Random) -> str:
    """The sorted items with one adjacent pair of different items swapped; a list of equal
    numbers has no such pair, so one of them is dropped instead."""
    items = answer.split()
    swaps = [j for j in range(len(items) - 1) if items[j] != items[j + 1]]
    if not swaps:
        return " ".join(items[:-1])
    j = rng.choice(swaps)
    items[j], items[j + 1] = items[j + 1], items[j]
    return " ".join(items)


def _wrong_choice(question: str, answer: str, rng: random.Random) -> str:
    """A wrong answer to "Which is larger (smaller), A or B?": the other number, a number past the
    answer (larger still, or smaller still: it pays to know which number was asked for, not only the
    direction), or the answer with one digit changed (a miscopy)."""
    a, b = question.rstrip("?").split(", ")[1].split(" or ")
    n, step = int(answer), (1 if question.startswith("Which is larger") else -1)
    past = [n + step * d for d in (1, 2, 5, 10) if 0 <= n + step * d < 100]
    miscopies = [answer[:i] + c + answer[i + 1 :] for i in range(len(answer)) for c in "0123456789" if c != answer[i] and not (i == 0 and c == "0" and len(answer) > 1)]
    kinds = [[b if a == answer else a], [str(v) for v in past], miscopies]
    return rng.choice(rng.choice([k for k in kinds if k]))


# subtask -> a wrong answer near its right one
_NEAR_MISS: dict[str, Callable[[str, random.Random], str]] = {
    "arithmetic/addition": lambda answer, rng: _near_number(answer, rng, signed=False),
    "arithmetic/subtraction": lambda answer, rng: _near_number(answer, rng, signed=True),
    "arithmetic/multiplication": lambda answer, rng: _near_number(answer, rng, signed=False),
    "sorting/numbers": _almost_sorted,
    "sorting/words": _almost_sorted,
    "spelling/spell": lambda answer, rng: _misspelled(answer, rng, backwards=False),
    "spelling/reverse": lambda answer, rng: _misspelled(answer, rng, backwards=True),
    "spelling/length": _off_by_one,
    "spelling/count_letter": _off_by_one,
}


@cache
def _stdlib_answers(split: str) -> dict[str, tuple[str, ...]]:
    """stdlib subtask -> the distinct answers of its questions in one split, sorted."""
    answers: dict[str, set[str]] = {}
    for example in getattr(_splits("stdlib"), split):
        answers.setdefault(example.task, set()).add(example.turns[-1][1])
    return {task: tuple(sorted(texts)) for task, texts in answers.items()}


def _rejected(example: Example, split: str, draw: int = 0) -> str:
    """A wrong answer to the example's last question, checked to differ from the right one; `draw` k > 0
    seeds another draw (draw 0 is the one every set's single pair uses)."""
    question, answer = example.turns[-1]
    rng = random.Random(f"{REJECT_SEED}/{example.task}/{question}" + (f"/{draw}" if draw else ""))
    if example.task.startswith("stdlib/"):
        others = [text for text in _stdlib_answers(split)[example.task] if not exact_match(text, answer)]
        if not others:
            raise RuntimeError(f"{example.task}: no other answer in the {split} split to reject for {question!r}")
        rejected = rng.choice(others)
    elif example.task.startswith("compare/"):
        rejected = _wrong_choice(question, answer, rng)
    else:
        rejected = _NEAR_MISS[example.task](answer, rng)
    if not rejected.strip() or exact_match(rejected, answer):
        raise RuntimeError(f"{example.task}: rejected answer {rejected!r} to {question!r} is empty or the right one")
    return rejected


# ----------------------------------------------------------------------------- rows


@cache
def _pairs(name: str, split: str, per_question: int = 1) -> tuple[tuple[Example, str], ...]:
    """Each example with up to `per_question` distinct wrong answers (draws 0, 1, ...; repeats dropped)."""
    return tuple(
        (example, rejected)
        for example in getattr(_splits(name), split)
        for rejected in dict.fromkeys(_rejected(example, split, draw) for draw in range(per_question))
    )


@cache
def _prompt_splits(name: str) -> Splits:
    if name == "mix":  # the checkable sets only: a reward must be able to check every answer
        return merge([_splits(part) for part in _CHECKABLE_PARTS], PROMPT_MIX_SEED)
    return _splits(name)


def _prompt(example: Example) -> list[dict]:
    """The conversation up to the last question: the row's messages less the answer to score."""
    return example.to_row()["messages"][:-1]


def preference_rows(name: str, split: str, per_question: int = 1) -> list[dict]:
    """`load_preferences`'s rows (which checks name, split and per_question first), as fresh dicts."""
    return [
        {"prompt": _prompt(example), "chosen": example.turns[-1][1], "rejected": rejected, "task": example.task}
        for example, rejected in _pairs(name, split, per_question)
    ]


def prompt_rows(name: str, split: str) -> list[dict]:
    """`load_prompts`'s rows (which checks name and split first), as fresh dicts."""
    return [
        {"prompt": _prompt(example), "answer": example.turns[-1][1], "task": example.task}
        for example in getattr(_prompt_splits(name), split)
    ]
