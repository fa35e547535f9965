"""The embedded default corpus: Python's own documentation, built from the local install.

Every CPython ships `pydoc_data.topics` (the language reference topics behind
`help()`) and the standard library's source with its docstrings, so a demo can
train on a few MB of real English with no download. Sources are parsed with `ast`,
never imported, so building the corpus runs no library code and has no side
effects. Order is sorted and duplicates are dropped, so two builds on the same
Python are identical.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Directories of the stdlib that hold no user-facing documentation (or third-party code).
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "ensurepip"})


def _stdlib_sources(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel[:-1]):
            continue
        files.append(path)
    return files


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def _module_document(name: str, source: str) -> str | None:
    """One document per module: its docstring, then each documented class and function under a heading."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a few stdlib files are templates or target other Python versions
        return None
    sections = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        sections.append(f"{name}\n\n{module_doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                doc = ast.get_docstring(node)
                if doc:
                    sections.append(f"class {prefix}{node.name}\n\n{doc}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    sections.append(f"{prefix}{_signature(node)}\n\n{doc}")

    visit(tree.body, f"{name}.")
    return "\n\n".join(sections) if sections else None


def iter_pydoc_documents(stdlib: str | Path | None = None) -> Iterator[str]:
    """Yield the corpus documents: every pydoc topic, then one document per stdlib module.

    Documents whose text was already seen (same SHA-1) are skipped, which removes
    the many modules that share boilerplate docstrings.
    """
    from pydoc_data.topics import topics  # the text behind help('TOPIC'); part of every CPython

    seen: set[bytes] = set()

    def fresh(text: str) -> bool:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
        if digest in seen:
            return False
        seen.add(digest)
        return True

    for key in sorted(topics):
        text = topics[key].strip()
        if text and fresh(text):
            yield text
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources(root):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # unreadable files are not documentation we can use
            continue
        doc = _module_document(_module_name(root, path), source)
        if doc and fresh(doc):
            yield doc


def pydoc_corpus(stdlib: str | Path | None = None) -> list[str]:
    """The whole pydoc corpus as a list of documents (about 2 MB of text on CPython 3.11)."""
    return list(iter_pydoc_documents(stdlib))
