"""Built-in instruction sets for supervised fine-tuning, generated offline and deterministically.

`gptlab sft --data builtin:NAME` trains on one of them, and the chat demo scores a base
model against its fine-tuned version on the checkable ones. Each is generated from
what every Python install has (seeded arithmetic, and the standard library's own
sources, parsed with `ast`, never imported), so nothing is downloaded and one install
always gives the same rows, whatever PYTHONHASHSEED or the time.

    arithmetic  "What is 37 + 45?" -> "82"; addition and subtraction of numbers below 100
                (negative results too), a 2-digit number times a 1-digit one.  Checkable.
    spelling    "Spell 'module'." -> "m o d u l e"; also spelled backwards, the number of
                letters, how often one letter appears. Words from stdlib docstrings.  Checkable.
    sorting     "Sort these numbers: 5 2 9 1" -> "1 2 5 9"; also 3-5 words alphabetically.  Checkable.
    stdlib      "What is the signature of json.dumps?", "What does textwrap.dedent do?" (the first
                sentence of its docstring), "Which module defines the function `dedent`?" (only
                names one covered module defines), "What is the json module for?".  Not checkable:
                a paraphrase of a docstring is as good an answer.
    mix         all of the above, shuffled; 1 row in 20 has two turns.

Rows are in the OpenAI chat format, with the subtask ("set/subtask") that made them:

    {"messages": [{"role": "user", "content": "What is 37 + 45?"},
                  {"role": "assistant", "content": "82"}],
     "task": "arithmetic/addition"}

Each set has a "train" and a "test" split (4000 / 400 rows for the checkable sets); no
question is in both. A row's answer to score is its last assistant message, and it can
be scored by `exact_match` when `checkable(row["task"].split("/")[0])`.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from gptlab.errors import InputError

if TYPE_CHECKING:
    from gptlab.datasets.common import Splits

BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "test")
_CHECKABLE = frozenset({"arithmetic", "sorting", "spelling"})
_NAMES = ("arithmetic", "mix", "sorting", "spelling", "stdlib")
MIX_SEED = 5


def builtin_names() -> list[str]:
    """The names of the built-in sets, sorted."""
    return sorted(_NAMES)


def _check_name(name: str) -> str:
    if name not in _NAMES:
        raise InputError(f"unknown built-in dataset {name!r}; valid names: {', '.join(builtin_names())}")
    return name


def is_builtin(spec: str) -> bool:
    """Whether a --data value names a built-in set ("builtin:NAME") rather than a file."""
    return spec.startswith(BUILTIN_PREFIX)


def parse_builtin(spec: str) -> str:
    """The set name in "builtin:NAME"; InputError when it is not a built-in spec or NAME is unknown."""
    if not is_builtin(spec):
        raise InputError(f"{spec!r} is not a built-in dataset; expected {BUILTIN_PREFIX}NAME with NAME one of: {', '.join(builtin_names())}")
    return _check_name(spec[len(BUILTIN_PREFIX) :])


def checkable(name: str) -> bool:
    """Whether the set's answers can be scored by `exact_match` (a docstring sentence cannot)."""
    return _check_name(name) in _CHECKABLE


def exact_match(prediction: str, reference: str) -> bool:
    """Whether two answers are equal once surrounding whitespace is stripped and every
    inner run of whitespace (spaces, tabs, newlines) is collapsed to one space: "1  2\\n"
    matches "1 2", but "12" does not match "1 2" and case matters."""
    return " ".join(prediction.split()) == " ".join(reference.split())


@cache
def _splits(name: str) -> Splits:
    # Imported here so that `import gptlab.datasets` (and so `gptlab --help`) does no more than it must.
    from gptlab.datasets import stdlib_qa, tasks
    from gptlab.datasets.common import merge

    if name == "mix":
        return merge([_splits(part) for part in ("arithmetic", "sorting", "spelling", "stdlib")], MIX_SEED)
    generate = {"arithmetic": tasks.arithmetic, "sorting": tasks.sorting, "spelling": tasks.spelling, "stdlib": stdlib_qa.stdlib}
    return generate[name]()


def load_builtin(name: str, split: str = "train") -> list[dict]:
    """The rows of one split of a built-in set, as fresh dicts (see the module docstring).

    Generated on first use (under a second per set) and cached for the rest of the process.
    """
    _check_name(name)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} for built-in dataset {name!r}; valid splits: {', '.join(SPLITS)}")
    return [example.to_row() for example in getattr(_splits(name), split)]
