"""Checkable tasks: arithmetic, spelling, sorting and comparison, each answer one exact string.

A 4-layer model trained for minutes on CPU has to learn these, so every subtask has one
fixed question template, small operands and short answers. Questions are drawn by a
seeded `random.Random` until each split's quota of distinct questions is met; words come
from the standard library's docstrings (`stdlib_words`), so nothing is downloaded.
"""

from __future__ import annotations

import random

from gptlab.datasets.common import Splits, Subtask, Turn, draw_splits
from gptlab.datasets.stdlib_qa import stdlib_words

ARITHMETIC_SEED = 1
SPELLING_SEED = 2
SORTING_SEED = 3
COMPARE_SEED = 8


# ----------------------------------------------------------------------------- arithmetic


def _addition(rng: random.Random) -> Turn:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"What is {a} + {b}?", str(a + b)


def _subtraction(rng: random.Random) -> Turn:
    a, b = rng.randrange(100), rng.randrange(100)  # b > a half the time: negative results too
    return f"What is {a} - {b}?", str(a - b)


def _multiplication(rng: random.Random) -> Turn:
    # A 2-digit number times a 1-digit one (0 and 1 teach nothing), in either order.
    a, b = rng.randrange(10, 100), rng.randrange(2, 10)
    if rng.random() < 0.5:
        a, b = b, a
    return f"What is {a} * {b}?", str(a * b)


def arithmetic() -> Splits:
    """4000 train / 400 test questions: 40% addition, 40% subtraction, 20% multiplication."""
    return draw_splits(
        [
            Subtask("arithmetic/addition", _addition, 1600, 160),
            Subtask("arithmetic/subtraction", _subtraction, 1600, 160),
            Subtask("arithmetic/multiplication", _multiplication, 800, 80),
        ],
        ARITHMETIC_SEED,
    )


# ----------------------------------------------------------------------------- spelling


def _spell(rng: random.Random) -> Turn:
    word = rng.choice(stdlib_words())
    return f"Spell '{word}'.", " ".join(word)


def _reverse(rng: random.Random) -> Turn:
    word = rng.choice(stdlib_words())
    return f"Spell '{word}' backwards.", " ".join(reversed(word))


def _length(rng: random.Random) -> Turn:
    word = rng.choice(stdlib_words())
    return f"How many letters are in '{word}'?", str(len(word))


def _count_letter(rng: random.Random) -> Turn:
    word = rng.choice(stdlib_words())
    present = sorted(set(word))
    # Mostly a letter of the word; one time in five one it lacks, so "0" is an answer too.
    absent = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in present]
    letter = rng.choice(present if rng.random() < 0.8 else absent)
    return f"How many times does '{letter}' appear in '{word}'?", str(word.count(letter))


def spelling() -> Splits:
    """4000 train / 400 test questions: spell, spell backwards, count letters, count one letter."""
    return draw_splits(
        [
            Subtask("spelling/spell", _spell, 1200, 120),
            Subtask("spelling/reverse", _reverse, 800, 80),
            Subtask("spelling/length", _length, 1000, 100),
            Subtask("spelling/count_letter", _count_letter, 1000, 100),
        ],
        SPELLING_SEED,
    )


# ----------------------------------------------------------------------------- sorting


def _sort_numbers(rng: random.Random) -> Turn:
    numbers = [rng.randrange(100) for _ in range(rng.randint(3, 6))]  # repeats allowed
    return f"Sort these numbers: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def _sort_words(rng: random.Random) -> Turn:
    words = rng.sample(stdlib_words(), rng.randint(3, 5))
    return f"Sort these words alphabetically: {' '.join(words)}", " ".join(sorted(words))


def sorting() -> Splits:
    """4000 train / 400 test questions: 60% lists of 3-6 numbers below 100, 40% of 3-5 words."""
    return draw_splits(
        [
            Subtask("sorting/numbers", _sort_numbers, 2400, 240),
            Subtask("sorting/words", _sort_words, 1600, 160),
        ],
        SORTING_SEED,
    )


# ----------------------------------------------------------------------------- comparison


def _larger(rng: random.Random) -> Turn:
    a, b = rng.sample(range(100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _smaller(rng: random.Random) -> Turn:
    a, b = rng.sample(range(100), 2)
    return f"Which is smaller, {a} or {b}?", str(min(a, b))


def compare() -> Splits:
    """4000 train / 2000 test questions: the larger or the smaller of two different numbers below 100.

    Not in `mix`: the alignment demo's task. A small model learns the choice quickly but copies
    the number slowly (the prompt spells " 85" as " 8" + "5", the answer as "85"), so a short
    fine-tune leaves mistakes of both kinds for preference and RL methods to remove. The test split
    is five times the other sets': a gain of 3 points is then beyond the test set's sampling noise.
    """
    return draw_splits(
        [
            Subtask("compare/larger", _larger, 2000, 1000),
            Subtask("compare/smaller", _smaller, 2000, 1000),
        ],
        COMPARE_SEED,
    )
