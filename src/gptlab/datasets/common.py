"""What every built-in instruction set shares: the example type, drawing unique questions
and splitting them into train and test so that no question is in both."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# One user question and the assistant's answer.
Turn = tuple[str, str]


@dataclass(frozen=True)
class Example:
    """A conversation of one or more (question, answer) turns. `task` is "set/subtask"
    (e.g. "arithmetic/addition"); for several turns it names the last one, the turn a
    checker scores."""

    task: str
    turns: tuple[Turn, ...]

    def to_row(self) -> dict:
        """The OpenAI chat format: alternating user / assistant messages, plus the task."""
        messages = []
        for question, answer in self.turns:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        return {"messages": messages, "task": self.task}


@dataclass(frozen=True)
class Splits:
    train: tuple[Example, ...]
    test: tuple[Example, ...]


@dataclass(frozen=True)
class Subtask:
    """A question generator and how many distinct questions each split gets from it."""

    task: str
    make: Callable[[random.Random], Turn]
    n_train: int
    n_test: int


def draw_unique(make: Callable[[random.Random], Turn], count: int, rng: random.Random) -> list[Turn]:
    """`count` turns from `make` with pairwise different questions, in the order drawn."""
    turns: dict[str, str] = {}  # question -> answer; dicts keep insertion order
    # Generous, yet bounded: a pool too small for the quota is a bug to report, not a hang.
    for _ in range(50 * count):
        if len(turns) == count:
            break
        question, answer = make(rng)
        turns.setdefault(question, answer)
    if len(turns) < count:
        raise RuntimeError(f"only {len(turns)} distinct questions for a quota of {count}")
    return list(turns.items())


def draw_splits(subtasks: Sequence[Subtask], seed: int) -> Splits:
    """Draw each subtask's train + test quota of distinct questions, the first ones drawn
    to test, and shuffle each split."""
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for sub in subtasks:
        turns = draw_unique(sub.make, sub.n_train + sub.n_test, rng)
        test.extend(Example(sub.task, (turn,)) for turn in turns[: sub.n_test])
        train.extend(Example(sub.task, (turn,)) for turn in turns[sub.n_test :])
    rng.shuffle(train)
    rng.shuffle(test)
    return checked(Splits(tuple(train), tuple(test)))


def split_pool(examples: Sequence[Example], seed: int, test_fraction: float, max_train: int, max_test: int) -> Splits:
    """Split a finite pool of examples with distinct questions at random: a `test_fraction`
    share to test, the rest to train, each capped."""
    pool = list(examples)
    random.Random(seed).shuffle(pool)
    n_test = min(max_test, max(1, round(len(pool) * test_fraction)))
    return checked(Splits(tuple(pool[n_test : n_test + max_train]), tuple(pool[:n_test])))


def checked(splits: Splits) -> Splits:
    """`splits`, after verifying that no question is asked twice within it or in both splits
    and that every question and answer is a non-empty string."""
    seen: dict[str, str] = {}
    for split in ("train", "test"):
        for example in getattr(splits, split):
            for question, answer in example.turns:
                if not (isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip()):
                    raise RuntimeError(f"{example.task}: empty question or answer in {example.turns!r}")
                if question in seen:
                    raise RuntimeError(f"{example.task}: question {question!r} is in {seen[question]} and {split}")
                seen[question] = split
    return splits


def merge(parts: Sequence[Splits], seed: int) -> Splits:
    """The union of `parts`, split by split, shuffled. One example in 20 is then paired
    with another into a two-turn conversation, so a model also sees questions that follow
    an earlier exchange."""
    rng = random.Random(seed)

    def combine(examples: list[Example]) -> tuple[Example, ...]:
        rng.shuffle(examples)
        n_pairs = len(examples) // 40  # 2 examples per pair: 1 in 20
        firsts, seconds = examples[0 : 2 * n_pairs : 2], examples[1 : 2 * n_pairs : 2]
        combined = [Example(b.task, a.turns + b.turns) for a, b in zip(firsts, seconds)] + examples[2 * n_pairs :]
        rng.shuffle(combined)
        return tuple(combined)

    train = combine([e for part in parts for e in part.train])
    test = combine([e for part in parts for e in part.test])
    return checked(Splits(train, test))
