"""Built-in evaluation tasks: rows a harness scores a model on, generated offline and
deterministically like the instruction sets (seeded `random.Random`s, the standard library's
sources parsed with `ast`, never imported, and word tables written here), so one install
always gives the same rows, whatever PYTHONHASHSEED.

Each task has a "train" split, where few-shot exemplars come from, and a "test" split; no
question is in both. `eval_rows(name, split)` returns one split as fresh dicts:

    arithmetic_mc  {"question": "What is 72 + 32?", "choices": ["103", "40", "105", "104"], "answer": 3}
                   Choices are distinct number strings: the result and three near misses (off by
                   1, 2 or 10, two digits swapped, the sign flipped for a subtraction: the rejected
                   answers of the preference sets) or, half the time, the result of the wrong
                   operation. 400 test / 1000 train.
    arithmetic     {"question": "What is 72 + 32?", "answer": "104"}: the same questions, generative.
    word_problems  {"question": "A barn has 3 cats. Each cat catches 4 mice a day. How many mice do
                   the cats catch in 2 days?", "reasoning": "The 3 cats catch 3 * 4 = 12 mice a day.
                   In 2 days they catch 12 * 2 = 24 mice.", "answer": "24"}. Two steps from one of
                   five templates (multiply twice, add then multiply, buy and get change, add then
                   share equally, multiply then add); small numbers; every step "a op b = c" is
                   exact, and the last number of the reasoning is the answer. 300 test / 500 train.
    stdlib_mc      {"question": the first docstring sentence of a standard-library function or
                   class, "choices": four qualified names such as "textwrap.dedent", "answer": int}.
                   Distractors are other public definitions, of the same module half the time (when
                   it has three others). Sentences that name their own definition (too easy) or
                   describe several definitions (no single answer) are left out. About 55 test /
                   440 train on Python 3.11; other versions have other sources.
    analogies      {"word": "dog", "relation": "category", "choices": ["vehicle", "animal", "color",
                   "fruit"], "answer": 1}: relations "category", "opposite", "plural", "past tense"
                   and "capital", from tables below; the distractors are other answers of the same
                   relation. Each relation's words are split in half; ~120 test / ~120 train.
    number_words   {"number": "4521", "words": "four thousand five hundred twenty-one"}: numbers
                   below 100000, each digit count from 1 to 5 equally likely (as far as there are
                   numbers to draw: the test split takes all ten one-digit numbers), in American English
                   without "and". 300 test / 1000 train.

No test question reaches a model through fine-tuning on the built-in sets: arithmetic_mc and
arithmetic ask the test questions of the SFT set `arithmetic` (`gptlab sft --data
builtin:arithmetic`) in test and the first 1000 of its train questions in train, and a stdlib_mc
test sentence is never the answer to a "What does X do?" question of the SFT set `stdlib`'s train
split (definitions follow that set's split). The other tasks have no SFT counterpart.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from functools import cache

from gptlab.datasets import SPLITS, _splits
from gptlab.datasets.common import Example, Subtask, Turn, draw_splits, split_pool
from gptlab.datasets.preferences import _NEAR_MISS
from gptlab.datasets.stdlib_qa import stdlib_modules
from gptlab.errors import InputError

EVAL_TASKS: tuple[str, ...] = ("arithmetic_mc", "arithmetic", "word_problems", "stdlib_mc", "analogies", "number_words")

ARITHMETIC_MC_SEED = 11
WORD_PROBLEMS_SEED = 12
STDLIB_MC_SEED = 13
ANALOGIES_SEED = 14
NUMBER_WORDS_SEED = 15

MAX_ARITHMETIC_TRAIN = 1000  # exemplars enough for few-shot; all 4000 would only cost time
N_CHOICES = 4

Row = dict  # one row, as `eval_rows` documents it per task
Table = dict[str, tuple[Row, ...]]  # split -> its rows, in the cache: never handed out


def _multiple_choice(answer: str, distractors: Sequence[str], rng: random.Random) -> tuple[tuple[str, ...], int]:
    """The choices in a random order and the index of the right one."""
    choices = [answer, *distractors]
    if len(set(choices)) != N_CHOICES:  # a generator's bug: two equal choices cannot both be right or wrong
        raise RuntimeError(f"choices {choices!r} are not {N_CHOICES} distinct strings")
    rng.shuffle(choices)
    return tuple(choices), choices.index(answer)


# ----------------------------------------------------------------------------- arithmetic

_ARITHMETIC = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def _wrong_operation(question: str) -> str | None:
    """The result of the question with + read as -, and - or * read as +; None for an addition
    that would turn negative, which no one takes for a sum."""
    a, op, b = _ARITHMETIC.fullmatch(question).groups()
    result = int(a) - int(b) if op == "+" else int(a) + int(b)
    return None if result < 0 else str(result)


def _wrong_answers(example: Example, rng: random.Random) -> list[str]:
    """Three distinct wrong results: near misses, and half the time the wrong operation's result."""
    question, answer = example.turns[0]
    wrong: dict[str, None] = {}  # an ordered set
    misread = _wrong_operation(question)
    if misread not in (None, answer) and rng.random() < 0.5:
        wrong[misread] = None
    # Any result has three near misses or more (n + 1, n + 2 and n + 10 among them), so this ends.
    while len(wrong) < N_CHOICES - 1:
        wrong[_NEAR_MISS[example.task](answer, rng)] = None
    return list(wrong)


def _arithmetic_examples() -> dict[str, tuple[Example, ...]]:
    sft = _splits("arithmetic")
    return {"train": sft.train[:MAX_ARITHMETIC_TRAIN], "test": sft.test}


def _arithmetic_mc() -> Table:
    rng = random.Random(ARITHMETIC_MC_SEED)
    table = {}
    for split, examples in _arithmetic_examples().items():
        rows = []
        for example in examples:
            question, answer = example.turns[0]
            choices, index = _multiple_choice(answer, _wrong_answers(example, rng), rng)
            rows.append({"question": question, "choices": choices, "answer": index})
        table[split] = tuple(rows)
    return table


def _arithmetic() -> Table:
    return {
        split: tuple({"question": e.turns[0][0], "answer": e.turns[0][1]} for e in examples)
        for split, examples in _arithmetic_examples().items()
    }


# ----------------------------------------------------------------------------- word problems

_NAMES = (("Anna", "she"), ("Ben", "he"), ("Maria", "she"), ("Sam", "he"), ("Nina", "she"), ("Leo", "he"))
# place, one worker, workers, what one does, what they do, the things made or caught
_RATES = (
    ("A barn", "cat", "cats", "catches", "catch", "mice"),
    ("A farm", "hen", "hens", "lays", "lay", "eggs"),
    ("A workshop", "worker", "workers", "makes", "make", "toys"),
    ("A bakery", "baker", "bakers", "bakes", "bake", "cakes"),
    ("A garden", "bee", "bees", "visits", "visit", "flowers"),
)
# container, containers, one kind, another kind, both kinds
_PACKS = (
    ("box", "boxes", "red pencils", "blue pencils", "pencils"),
    ("bag", "bags", "apples", "oranges", "pieces of fruit"),
    ("shelf", "shelves", "books", "magazines", "items"),
    ("basket", "baskets", "white eggs", "brown eggs", "eggs"),
)
_GOODS = ("notebooks", "pens", "tickets", "cupcakes", "toy cars")
_SMALL_THINGS = ("stickers", "marbles", "candies", "cards", "cookies", "shells")
_BILLS = (10, 20, 50, 100)

# A generator returns (question, reasoning): the reasoning plays the answer's part in a Turn,
# so `draw_splits` keeps questions distinct and apart, and the answer is its last number.
_LAST_NUMBER = re.compile(r"\d+(?=\D*$)")


def _rate(rng: random.Random) -> Turn:
    place, one, many, does, do, things = rng.choice(_RATES)
    a, b, days = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 7)
    question = f"{place} has {a} {many}. Each {one} {does} {b} {things} a day. How many {things} do the {many} {do} in {days} days?"
    reasoning = f"The {a} {many} {do} {a} * {b} = {a * b} {things} a day. In {days} days they {do} {a * b} * {days} = {a * b * days} {things}."
    return question, reasoning


def _pack(rng: random.Random) -> Turn:
    one, many, kind_a, kind_b, both = rng.choice(_PACKS)
    a, b, n = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 9)
    question = f"Each {one} holds {a} {kind_a} and {b} {kind_b}. How many {both} are in {n} {many}?"
    reasoning = f"Each {one} holds {a} + {b} = {a + b} {both}. So {n} {many} hold {a + b} * {n} = {(a + b) * n} {both}."
    return question, reasoning


def _change(rng: random.Random) -> Turn:
    (name, pronoun), goods = rng.choice(_NAMES), rng.choice(_GOODS)
    n, price = rng.randint(2, 9), rng.randint(2, 9)
    cost = n * price
    bill = rng.choice([b for b in _BILLS if b > cost])
    question = f"{name} buys {n} {goods} at {price} dollars each and pays with a {bill}-dollar bill. How many dollars of change does {pronoun} get?"
    reasoning = f"The {goods} cost {n} * {price} = {cost} dollars. The change is {bill} - {cost} = {bill - cost} dollars."
    return question, reasoning


def _share(rng: random.Random) -> Turn:
    (name, pronoun), things = rng.choice(_NAMES), rng.choice(_SMALL_THINGS)
    friends, each = rng.randint(2, 6), rng.randint(2, 9)
    total = friends * each  # drawn from the quotient, so the sharing always comes out even
    had = rng.randint(2, total - 2)
    question = (
        f"{name} has {had} {things} and gets {total - had} more. {pronoun.capitalize()} shares them equally "
        f"among {friends} friends. How many {things} does each friend get?"
    )
    reasoning = f"{name} has {had} + {total - had} = {total} {things}. Each friend gets {total} / {friends} = {each} {things}."
    return question, reasoning


def _bags_and_loose(rng: random.Random) -> Turn:
    (name, pronoun), things = rng.choice(_NAMES), rng.choice(_SMALL_THINGS)
    bags, per_bag, loose = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
    question = f"{name} has {bags} bags of {per_bag} {things} and {loose} loose {things}. How many {things} does {pronoun} have?"
    reasoning = f"The bags hold {bags} * {per_bag} = {bags * per_bag} {things}. With the {loose} loose ones, {name} has {bags * per_bag} + {loose} = {bags * per_bag + loose} {things}."
    return question, reasoning


def _word_problems() -> Table:
    splits = draw_splits(
        [
            Subtask("word_problems/rate", _rate, 100, 60),
            Subtask("word_problems/pack", _pack, 100, 60),
            Subtask("word_problems/change", _change, 100, 60),
            Subtask("word_problems/share", _share, 100, 60),
            Subtask("word_problems/bags_and_loose", _bags_and_loose, 100, 60),
        ],
        WORD_PROBLEMS_SEED,
    )
    return {
        split: tuple(
            {"question": question, "reasoning": reasoning, "answer": _LAST_NUMBER.search(reasoning).group()}
            for example in getattr(splits, split)
            for question, reasoning in example.turns
        )
        for split in SPLITS
    }


# ----------------------------------------------------------------------------- stdlib


def _stdlib_mc() -> Table:
    definitions = [d for module in stdlib_modules() for d in module.definitions]
    names_in: dict[str, list[str]] = {}  # module -> its qualified names, in source order
    for d in definitions:
        names_in.setdefault(d.module, []).append(f"{d.module}.{d.name}")
    all_names = [name for names in names_in.values() for name in names]
    describing: dict[str, int] = {}  # sentence -> how many definitions it summarizes
    for d in definitions:
        if d.summary:
            describing[d.summary] = describing.get(d.summary, 0) + 1
    # A "What does X do?" question of the SFT set is answered by X's summary: a sentence it trains on stays in train.
    sft_train = {e.turns[-1][1] for e in _splits("stdlib").train if e.task == "stdlib/describe"}
    rng = random.Random(STDLIB_MC_SEED)
    table: dict[str, list[Row]] = {split: [] for split in SPLITS}
    for d in definitions:
        if not d.summary or describing[d.summary] > 1 or d.name.lower() in d.summary.lower():
            continue
        answer = f"{d.module}.{d.name}"
        same_module = [name for name in names_in[d.module] if name != answer]
        if len(same_module) >= N_CHOICES - 1 and rng.random() < 0.5:
            pool = same_module
        else:
            pool = [name for name in all_names if name != answer]
        choices, index = _multiple_choice(answer, rng.sample(pool, N_CHOICES - 1), rng)
        table["train" if d.summary in sft_train else "test"].append({"question": d.summary, "choices": choices, "answer": index})
    for rows in table.values():  # source order would put one module's questions first
        rng.shuffle(rows)
    return {split: tuple(rows) for split, rows in table.items()}


# ----------------------------------------------------------------------------- analogies

_CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango pear peach plum pineapple",
    "animal": "dog cat horse lion tiger elephant rabbit bear wolf monkey",
    "vehicle": "car bus truck bicycle train motorcycle tractor van taxi scooter",
    "color": "red blue green yellow purple pink brown black white gray",
    "tool": "hammer saw wrench screwdriver drill pliers chisel shovel rake",
    "instrument": "piano guitar violin drum flute trumpet cello harp clarinet saxophone",
    "body part": "hand foot knee elbow shoulder finger ankle nose ear wrist",
    "furniture": "chair table sofa bed desk wardrobe bookcase stool dresser cabinet",
}


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    """ "a b, c d" -> (("a", "b"), ("c", "d")): words separated by a space, pairs by a comma."""
    return tuple((word, answer) for word, answer in (pair.split() for pair in text.split(",")))


# relation -> (word, answer) pairs. Every word is asked once per relation, and an opposite is
# listed one way only, so a test word's pair never turns up reversed in train.
RELATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "category": tuple((word, category) for category, words in _CATEGORIES.items() for word in words.split()),
    "opposite": _pairs(
        "hot cold, big small, up down, fast slow, happy sad, light dark, open closed, early late, full empty,"
        "hard soft, high low, long short, old young, rich poor, strong weak, thick thin, wet dry, loud quiet,"
        "clean dirty, push pull, win lose, buy sell, give take, love hate, first last, before after,"
        "inside outside, top bottom, left right, north south, east west, day night, true false, good bad,"
        "near far, above below, always never, friend enemy, wide narrow, sweet sour, alive dead,"
        "remember forget, increase decrease, begin end, cheap expensive, smooth rough, awake asleep,"
        "ancient modern, question answer, entrance exit, success failure, minimum maximum"
    ),
    "plural": _pairs(
        "mouse mice, child children, man men, woman women, foot feet, tooth teeth, goose geese,"
        "person people, ox oxen, sheep sheep, leaf leaves, knife knives, wolf wolves, half halves,"
        "life lives, cactus cacti, crisis crises, phenomenon phenomena, baby babies, city cities,"
        "story stories, party parties, potato potatoes, hero heroes, box boxes, church churches,"
        "dish dishes, glass glasses, bus buses, book books, cat cats, tree trees, house houses, key keys,"
        "day days, bird birds, cup cups, window windows"
    ),
    "past tense": _pairs(
        "go went, eat ate, see saw, run ran, swim swam, write wrote, take took, give gave, come came,"
        "speak spoke, buy bought, think thought, bring brought, catch caught, teach taught, fly flew,"
        "drink drank, sing sang, begin began, break broke, choose chose, drive drove, fall fell,"
        "feel felt, find found, forget forgot, know knew, leave left, lose lost, make made, meet met,"
        "sleep slept, stand stood, tell told, win won, walk walked, jump jumped, play played, cry cried,"
        "stop stopped, study studied, carry carried"
    ),
    # Two-word names are joined by "_" in the table, so that a space can separate word from answer.
    "capital": tuple(
        (country.replace("_", " "), city.replace("_", " "))
        for country, city in _pairs(
            "France Paris, Germany Berlin, Italy Rome, Spain Madrid, Portugal Lisbon, Japan Tokyo,"
            "China Beijing, Russia Moscow, Egypt Cairo, Kenya Nairobi, Greece Athens, Norway Oslo,"
            "Sweden Stockholm, Finland Helsinki, Denmark Copenhagen, Poland Warsaw, Austria Vienna,"
            "Hungary Budapest, Ireland Dublin, Belgium Brussels, Netherlands Amsterdam, Canada Ottawa,"
            "Mexico Mexico_City, Argentina Buenos_Aires, Peru Lima, Chile Santiago, Thailand Bangkok,"
            "Vietnam Hanoi, South_Korea Seoul, India New_Delhi, Indonesia Jakarta, Turkey Ankara,"
            "Iran Tehran, Cuba Havana, Australia Canberra, Czechia Prague, Switzerland Bern"
        )
    ),
}
ANALOGY_TEST_FRACTION = 0.5


def _analogies() -> Table:
    rng = random.Random(ANALOGIES_SEED)
    table: dict[str, list[Row]] = {split: [] for split in SPLITS}
    for relation, pairs in RELATIONS.items():
        answers = sorted({answer for _, answer in pairs})
        # Splitting the words, not the rows: a test word is never a train exemplar of its relation.
        splits = split_pool([Example(relation, (pair,)) for pair in pairs], ANALOGIES_SEED, ANALOGY_TEST_FRACTION, len(pairs), len(pairs))
        for split in SPLITS:
            for example in getattr(splits, split):
                word, answer = example.turns[0]
                distractors = rng.sample([a for a in answers if a != answer], N_CHOICES - 1)
                choices, index = _multiple_choice(answer, distractors, rng)
                table[split].append({"word": word, "relation": relation, "choices": choices, "answer": index})
    for rows in table.values():  # relation order would put one relation's questions first
        rng.shuffle(rows)
    return {split: tuple(rows) for split, rows in table.items()}


# ----------------------------------------------------------------------------- number words

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
MAX_NUMBER_DIGITS = 5


def _below_thousand(n: int) -> str:
    """1 <= n <= 999 in words: "four hundred twenty-one"."""
    hundreds, rest = divmod(n, 100)
    words = [f"{_ONES[hundreds]} hundred"] if hundreds else []
    if rest >= 20:
        words.append(_TENS[rest // 10] + (f"-{_ONES[rest % 10]}" if rest % 10 else ""))
    elif rest:
        words.append(_ONES[rest])
    return " ".join(words)


def number_to_words(n: int) -> str:
    """0 <= n < 1000000 in American English words, without "and": 4521 -> "four thousand five
    hundred twenty-one", 0 -> "zero"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words covers 0 to 999999, got {n}")
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    words = [f"{_below_thousand(thousands)} thousand"] if thousands else []
    if rest:
        words.append(_below_thousand(rest))
    return " ".join(words)


def _number(rng: random.Random) -> Turn:
    # The digit count first: uniform over 0..99999, four numbers in five would have five digits.
    digits = rng.randint(1, MAX_NUMBER_DIGITS)
    n = rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)
    return str(n), number_to_words(n)


def _number_words() -> Table:
    splits = draw_splits([Subtask("number_words", _number, 1000, 300)], NUMBER_WORDS_SEED)
    return {split: tuple({"number": e.turns[0][0], "words": e.turns[0][1]} for e in getattr(splits, split)) for split in SPLITS}


# ----------------------------------------------------------------------------- the API

_GENERATORS: dict[str, Callable[[], Table]] = {
    "arithmetic_mc": _arithmetic_mc,
    "arithmetic": _arithmetic,
    "word_problems": _word_problems,
    "stdlib_mc": _stdlib_mc,
    "analogies": _analogies,
    "number_words": _number_words,
}


@cache
def _table(name: str) -> Table:
    return _GENERATORS[name]()


def eval_rows(name: str, split: str) -> list[Row]:
    """The rows of one split ("train" or "test") of an evaluation task in EVAL_TASKS, as fresh
    dicts (see the module docstring for each task's fields). Generated on first use and cached
    for the rest of the process; InputError for an unknown task or split."""
    if name not in EVAL_TASKS:
        raise InputError(f"unknown evaluation task {name!r}; valid names: {', '.join(EVAL_TASKS)}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} for evaluation task {name!r}; valid splits: {', '.join(SPLITS)}")
    # The cache holds choices as tuples; each caller gets lists of its own.
    return [{key: list(value) if isinstance(value, tuple) else value for key, value in row.items()} for row in _table(name)[split]]
