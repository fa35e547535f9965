"""Questions about the standard library, answered from its own sources, and the words of
its docstrings (the vocabulary of the spelling and word-sorting tasks).

A fixed list of well-known top-level modules is parsed with `ast`, as `gptlab.corpus`
does: nothing is imported, so no library code runs. Only public module-level functions
and classes are asked about (those in `__all__` where the module declares it), in
source order, so one Python install always gives the same questions. Other Python
versions have other sources and so somewhat other questions; that is expected.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gptlab.datasets.common import Example, Splits, split_pool

# Well-known pure-Python modules present from 3.10 on, sorted. Each is either NAME.py or a
# package NAME/__init__.py, depending on the version (re and pathlib moved).
MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib", "dis",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "functools", "getpass", "gettext",
    "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "inspect", "ipaddress", "json",
    "linecache", "logging", "mimetypes", "numbers", "operator", "os", "pathlib", "pickle",
    "platform", "pprint", "queue", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shlex", "shutil", "socket", "statistics", "string", "subprocess", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "zipapp", "zipfile",
)  # fmt: skip

SEED = 4
# Answers a small model can hold: longer signatures and sentences are left out.
MAX_SIGNATURE = 100
MAX_SENTENCE = 160
# A sentence ends at a period followed by a capital letter or the end, but not in "e.g." / "i.e.".
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.(?=\s+[A-Z]|$)")
_WORD = re.compile(r"\b[a-z]{3,10}\b")


@dataclass(frozen=True)
class Definition:
    """A public module-level function or class of one module."""

    module: str
    name: str
    kind: str  # "function" or "class"
    signature: str | None  # functions only: module.name(args) as in the source
    summary: str | None  # the first sentence of the docstring, when short and plain


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    summary: str | None
    definitions: tuple[Definition, ...]
    docstrings: tuple[str, ...]  # every docstring in the module, methods' included


def stdlib_root() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def module_path(root: Path, name: str) -> Path | None:
    for path in (root / f"{name}.py", root / name / "__init__.py"):
        if path.is_file():
            return path
    return None


def first_sentence(doc: str | None) -> str | None:
    """The docstring's first sentence on one line, or None when it is too long or not
    plain prose (a signature line, a markup directive, no full stop)."""
    if not doc:
        return None
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = _SENTENCE_END.search(paragraph)
    if match is None:
        return None
    sentence = paragraph[: match.end()]
    if not 8 <= len(sentence) <= MAX_SENTENCE or not sentence[0].isalpha() or "(" in sentence.split(" ")[0]:
        return None
    return sentence


def _public_names(tree: ast.Module) -> set[str] | None:
    """The names in a literal `__all__` and its top-level extend / append / += calls, or
    None when the module has none we can read without running it."""
    names: set[str] | None = None
    for node in tree.body:
        try:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                names = set(ast.literal_eval(node.value))
            elif names is None:
                continue
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == "__all__":
                names |= set(ast.literal_eval(node.value))
            elif (
                isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and isinstance(node.value.func.value, ast.Name)
                and node.value.func.value.id == "__all__"
                and node.value.func.attr in ("append", "extend")
                and node.value.args
            ):
                value = ast.literal_eval(node.value.args[0])
                names |= {value} if node.value.func.attr == "append" else set(value)
        except ValueError:  # computed from other names: only running the module would tell
            return None
    return names


def _is_private(decorator: ast.expr) -> bool:
    """Whether a decorator is a private name, such as `_SpecialForm` or `_tp_cache(typed=True)`."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Name) and target.id.startswith("_")


def parse_module(name: str, source: str) -> ModuleInfo:
    tree = ast.parse(source)
    public = _public_names(tree)
    definitions = []
    seen: set[str] = set()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if public is not None and node.name not in public:
            continue
        if any(_is_private(d) for d in node.decorator_list):  # e.g. typing's @_SpecialForm: not a plain function
            continue
        if node.name in seen:  # defined twice (e.g. a fallback): which one is "the" definition is unclear
            definitions = [d for d in definitions if d.name != node.name]
            continue
        seen.add(node.name)
        is_class = isinstance(node, ast.ClassDef)
        signature = None if is_class else f"{name}.{node.name}({ast.unparse(node.args)})"
        definitions.append(Definition(name, node.name, "class" if is_class else "function", signature, first_sentence(ast.get_docstring(node))))
    docstrings = [
        doc
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node))
    ]
    return ModuleInfo(name, first_sentence(ast.get_docstring(tree)), tuple(definitions), tuple(docstrings))


@cache
def stdlib_modules() -> tuple[ModuleInfo, ...]:
    """The parsed MODULES of this Python install (those it has), in MODULES order."""
    root = stdlib_root()
    modules = []
    for name in MODULES:
        path = module_path(root, name)
        if path is None:
            continue
        try:
            modules.append(parse_module(name, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, SyntaxError):  # an unusual install; the other modules still serve
            continue
    return tuple(modules)


@cache
def stdlib_words() -> tuple[str, ...]:
    """Sorted distinct lowercase alphabetic words of 3 to 10 letters from the docstrings
    of MODULES (identifiers such as skip_keys or utf8 are not words: \\b excludes them)."""
    words = {word for module in stdlib_modules() for doc in module.docstrings for word in _WORD.findall(doc)}
    return tuple(sorted(words))


def stdlib_examples() -> list[Example]:
    """Every question the sources answer, each once, in MODULES and source order."""
    modules = stdlib_modules()
    defined_in: dict[str, set[str]] = {}
    for module in modules:
        for d in module.definitions:
            defined_in.setdefault(d.name, set()).add(module.name)
    examples = []
    for module in modules:
        if module.summary:
            examples.append(Example("stdlib/module_summary", ((f"What is the {module.name} module for?", module.summary),)))
        for d in module.definitions:
            # Only names one covered module defines have a single right answer.
            if len(defined_in[d.name]) == 1:
                examples.append(Example("stdlib/module_of", ((f"Which module defines the {d.kind} `{d.name}`?", d.module),)))
            if d.signature and len(d.signature) <= MAX_SIGNATURE:
                examples.append(Example("stdlib/signature", ((f"What is the signature of {d.module}.{d.name}?", d.signature),)))
            if d.summary:
                question = f"What does {d.module}.{d.name} do?" if d.kind == "function" else f"What is {d.module}.{d.name}?"
                examples.append(Example("stdlib/describe", ((question, d.summary),)))
    return examples


def stdlib(max_train: int = 4000, max_test: int = 400) -> Splits:
    """About a tenth of the questions to test, at random, the rest to train."""
    return split_pool(stdlib_examples(), SEED, 0.1, max_train, max_test)
