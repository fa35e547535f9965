"""Built-in instruction sets for supervised fine-tuning, generated offline and deterministically,
and the preference pairs and prompt sets for alignment derived from them.

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
    compare     "Which is larger, 37 or 45?" -> "45"; also the smaller. Not in mix: the alignment
                demo's task (`gptlab demo --rlhf`), with 2000 test questions.  Checkable.
    stdlib      "What is the signature of json.dumps?", "What does textwrap.dedent do?" (the first
                sentence of its docstring), "Which module defines the function `dedent`?" (only
                names one covered module defines), "What is the json module for?".  Not checkable:
                a paraphrase of a docstring is as good an answer.
    mix         all of the above, shuffled; 1 row in 20 has two turns.

Rows are in the OpenAI chat format, with the subtask ("set/subtask") that made them:

    {"messages": [{"role": "user", "content": "What is 37 + 45?"},
                  {"role": "assistant", "content": "82"}],
     "task": "arithmetic/addition"}

Each set has a "train" and a "test" split (4000 / 400 rows for the checkable sets, 4000 / 2000 for compare); no
question is in both. A row's answer to score is its last assistant message, and it can
be scored by `exact_match` when `checkable(row["task"].split("/")[0])`.

Alignment reuses each set's questions, split for split, so nothing a fine-tuned model was
trained on turns up in an alignment test split (see `gptlab.datasets.preferences`):

    load_preferences(NAME, split)  every set: {"prompt": [messages], "chosen": answer,
                                    "rejected": a wrong answer, "task": "set/subtask"}
    load_prompts(NAME, split)      the checkable sets and a mix of the mix's three only (stdlib's
                                    answers cannot be checked): {"prompt": [messages],
                                    "answer": the reference a reward checks, "task": ...}

"prompt" is the conversation up to the question scored: the row's messages less its last
answer. A spec "builtin:NAME" names any of them: `parse_builtin(spec, kind)`, or
`parse_builtin_preferences(spec)` and `parse_builtin_prompts(spec)`.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Literal

from gptlab.errors import InputError

if TYPE_CHECKING:
    from gptlab.datasets.common import Splits

BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "test")
_CHECKABLE = frozenset({"arithmetic", "compare", "sorting", "spelling"})
_NAMES = ("arithmetic", "compare", "mix", "sorting", "spelling", "stdlib")
# Prompt sets are for rewards that check the answer: stdlib has none, and their mix holds the
# checkable sets of the instruction mix only.
_PROMPT_NAMES = ("arithmetic", "compare", "mix", "sorting", "spelling")
MIX_SEED = 5

Kind = Literal["sft", "preferences", "prompts"]
# kind -> (what its sets are called in messages, their names)
_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sft": ("dataset", _NAMES),
    "preferences": ("preference set", _NAMES),
    "prompts": ("prompt set", _PROMPT_NAMES),
}


def _kind(kind: Kind) -> tuple[str, tuple[str, ...]]:
    if kind not in _KINDS:  # a caller's bug, not the user's input
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    return _KINDS[kind]


def builtin_names() -> list[str]:
    """The names of the built-in sets, sorted."""
    return sorted(_NAMES)


def preference_names() -> list[str]:
    """The names of the built-in preference sets, sorted: one per built-in set."""
    return sorted(_kind("preferences")[1])


def prompt_names() -> list[str]:
    """The names of the built-in prompt sets, sorted: the checkable sets and their mix."""
    return sorted(_kind("prompts")[1])


def _check_name(name: str, kind: Kind = "sft") -> str:
    noun, names = _kind(kind)
    if name not in names:
        valid = ", ".join(sorted(names))
        if name in _NAMES:  # stdlib: a known set, but a reward could not check its answers
            raise InputError(f"built-in set {name!r} has no {noun}: its answers cannot be checked; valid names: {valid}")
        raise InputError(f"unknown built-in {noun} {name!r}; valid names: {valid}")
    return name


def _check_split(name: str, split: str, kind: Kind) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} for built-in {_kind(kind)[0]} {name!r}; valid splits: {', '.join(SPLITS)}")
    return split


def is_builtin(spec: str) -> bool:
    """Whether a --data value names a built-in set ("builtin:NAME") rather than a file."""
    return spec.startswith(BUILTIN_PREFIX)


def parse_builtin(spec: str, kind: Kind = "sft") -> str:
    """The set name in "builtin:NAME"; InputError when it is not a built-in spec or NAME is
    not a set of that kind ("sft": `load_builtin`, "preferences", "prompts")."""
    if not is_builtin(spec):
        noun, names = _kind(kind)
        raise InputError(f"{spec!r} is not a built-in {noun}; expected {BUILTIN_PREFIX}NAME with NAME one of: {', '.join(sorted(names))}")
    return _check_name(spec[len(BUILTIN_PREFIX) :], kind)


def parse_builtin_preferences(spec: str) -> str:
    """The preference set name in "builtin:NAME": `parse_builtin(spec, "preferences")`."""
    return parse_builtin(spec, "preferences")


def parse_builtin_prompts(spec: str) -> str:
    """The prompt set name in "builtin:NAME": `parse_builtin(spec, "prompts")`."""
    return parse_builtin(spec, "prompts")


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
    generate = {"arithmetic": tasks.arithmetic, "compare": tasks.compare, "sorting": tasks.sorting, "spelling": tasks.spelling, "stdlib": stdlib_qa.stdlib}
    return generate[name]()


def load_builtin(name: str, split: str = "train") -> list[dict]:
    """The rows of one split of a built-in set, as fresh dicts (see the module docstring).

    Generated on first use (under a second per set) and cached for the rest of the process.
    """
    _check_split(_check_name(name), split, "sft")
    return [example.to_row() for example in getattr(_splits(name), split)]


def load_preferences(name: str, split: str = "train", per_question: int = 1) -> list[dict]:
    """The preference pairs of one split, one per row of `load_builtin(name, split)`, as fresh
    dicts: {"prompt": [messages], "chosen": str, "rejected": str, "task": "set/subtask"}.

    "chosen" is the set's answer; "rejected" a plausible wrong one for the checkable sets, and
    another question's answer of the same subtask and split for stdlib. With per_question k, each
    row gives up to k pairs with distinct rejected answers (the first is the k = 1 pair).
    """
    from gptlab.datasets.preferences import preference_rows

    if not isinstance(per_question, int) or isinstance(per_question, bool) or per_question < 1:
        raise InputError(f"per_question must be a positive integer, got {per_question!r}")
    return preference_rows(name, _check_split(_check_name(name, "preferences"), split, "preferences"), per_question)


def load_prompts(name: str, split: str = "train") -> list[dict]:
    """The prompts of one split of a checkable set (or of the checkable sets in mix), as fresh dicts:
    {"prompt": [messages], "answer": str, "task": "set/subtask"}; `exact_match(reply, answer)`
    scores a reply."""
    from gptlab.datasets.preferences import prompt_rows

    return prompt_rows(name, _check_split(_check_name(name, "prompts"), split, "prompts"))
