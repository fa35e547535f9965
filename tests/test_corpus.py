import subprocess
import sys

from gptlab.corpus import pydoc_corpus


def test_pydoc_corpus_is_large_deterministic_english_without_duplicates():
    docs = pydoc_corpus()
    assert docs == pydoc_corpus()
    size = sum(len(d.encode()) for d in docs)
    assert size > 1_500_000, size  # ~2.3 MB on CPython 3.11
    assert len(set(docs)) == len(docs)
    text = "\n".join(docs)
    for phrase in ("Return a", "the list", "json.dumps(", "class collections.OrderedDict"):
        assert phrase in text, phrase


def test_building_the_corpus_imports_no_stdlib_modules():
    code = "import sys; before = set(sys.modules); from gptlab.corpus import pydoc_corpus; pydoc_corpus(); print(sorted(set(sys.modules) - before))"
    new = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for module in ("antigravity", "this", "tkinter", "turtle", "webbrowser", "json.tool"):
        assert f"'{module}'" not in new
