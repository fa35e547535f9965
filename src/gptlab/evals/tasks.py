"""Evaluation tasks: what to ask a model, over which documents, and how to score the answers.

A task is written as lm-evaluation-harness writes one, in YAML or JSON over local JSONL files,
so one file serves both harnesses (gptlab reads the subset below; its own few keys are marked):

    task: capitals
    output_type: multiple_choice          # or generate_until, loglikelihood_rolling
    dataset_path: json
    dataset_kwargs: {data_files: {train: train.jsonl, test: test.jsonl}}   # relative to this file
    test_split: test
    fewshot_split: train                  # exemplars (default: training_split, validation_split, else test_split)
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices                # a field holding a list, "{{field}}", or a YAML list
    doc_to_target: answer                 # an index into the choices, or the target text
    description: "Answer each question.\\n\\n"  # opens every prompt as written (end it with its own newlines)
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    num_fewshot: 3
    fewshot_config: {sampler: first_n}    # or random (default): drawn with the seed per document
    metric_list: [{metric: acc}, {metric: acc_norm}]
    generation_kwargs: {until: ["\\n"], max_gen_toks: 32, temperature: 0}
    filter_list: [{name: get-answer, filter: [{function: regex, regex_pattern: "(-?\\\\d+)"}, {function: take_first}]}]
    # gptlab's own keys (lm-eval does not know them; leave them out of a file for both):
    chat_text: "{{question}}"             # the user message under --chat (default: doc_to_text)
    fewshot_match: relation               # exemplars share this field's value with the document
    cot_target: "{{reasoning}} The answer is {{answer}}."   # an exemplar's answer under --cot
    cot_regex: "The answer is (-?\\\\d+)" # extracts the answer from a --cot reply (last match)
    stride: 512                           # loglikelihood_rolling: tokens each window moves on
    # and a data file may be a .txt: one document {"text": the whole file}

Templates substitute `{{field}}` (dotted paths and [index] reach into objects and lists); a
template that is a field name alone is that field. The prompt of a document with K exemplars
is lm-eval's (0.4.13): the description as written, then each exemplar as text + target_delimiter + target,
joined and followed by fewshot_delimiter, then the document's text. Multiple choice scores
target_delimiter + choice as the continuation of that prompt.

Every mistake in a task file is one line naming the file and the key (or file:line and the
key for a document): a missing key, an unknown metric or output type, an empty split, a
choice index out of range, a document without a field its template reads.

Built-in tasks (`BUILTIN_TASKS`) are generated offline from what ships with Python (see
gptlab.datasets.evaltasks) and written in the same schema.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gptlab.errors import DataError, InputError

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood_rolling")
METRICS = {
    "multiple_choice": ("acc", "acc_norm", "acc_bytes"),
    "generate_until": ("exact_match", "bleu", "chrf"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
SAMPLERS = ("random", "first_n")
# lm-eval keys that change nothing here (grouping, bookkeeping, decontamination).
_IGNORED_KEYS = frozenset({"tag", "group", "metadata", "dataset_name", "should_decontaminate", "doc_to_decontamination_query", "output_dir"})
_KEYS = frozenset({
    "task", "output_type", "dataset_path", "dataset_kwargs", "test_split", "fewshot_split", "training_split",
    "validation_split", "doc_to_text", "doc_to_choice", "doc_to_target", "description", "target_delimiter",
    "fewshot_delimiter", "num_fewshot", "fewshot_config", "metric_list", "generation_kwargs", "filter_list", "repeats",
    "chat_text", "fewshot_match", "cot_target", "cot_regex", "stride",
})  # fmt: skip
_FIELD = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*|\[-?\d+\])*$")


@dataclass(frozen=True)
class Doc:
    """One document and where it came from ("file:line", or "builtin:NAME/split:index")."""

    where: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Task:
    name: str
    output_type: str
    source: str  # the task file, or "builtin:NAME": every error names it
    data_files: dict[str, str] = field(default_factory=dict)  # split -> JSONL / text path (task files)
    test_split: str = "test"
    fewshot_split: str | None = "train"
    doc_to_text: str = ""
    doc_to_choice: str | list[str] | None = None
    doc_to_target: str = ""
    chat_text: str | None = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    sampler: str = "random"
    fewshot_match: str | None = None
    metrics: tuple[str, ...] = ()
    ignore_case: bool = False
    ignore_punctuation: bool = False
    until: tuple[str, ...] | None = None  # None: the fewshot delimiter, as lm-eval
    max_gen_toks: int = 256
    temperature: float = 0.0
    answer_regex: str | None = None  # the first match's first group (or whole match) is the answer
    cot_target: str | None = None
    cot_regex: str | None = None
    cot_trigger: str = "Let's think step by step."  # Kojima et al. 2022, zero-shot chain of thought
    cot_answer_trigger: str = "Therefore, the answer is"
    stride: int | None = None
    builtin: str | None = None

    # ------------------------------------------------------------------ documents

    def docs(self, split: str) -> list[Doc]:
        """The split's documents, in file order; an empty or missing split is an error naming the task."""
        if self.builtin is not None:
            from gptlab.datasets.evaltasks import eval_rows

            docs = [Doc(f"builtin:{self.builtin}/{split}:{i}", row) for i, row in enumerate(eval_rows(self.builtin, split))]
        elif split not in self.data_files:
            raise InputError(f"{self.source}: dataset_kwargs.data_files has no {split!r} split (it has {', '.join(self.data_files) or 'none'})")
        else:
            docs = list(_read_docs(Path(self.data_files[split])))
        if not docs:
            raise InputError(f"{self.source}: the {split!r} split holds no documents")
        return docs

    # ------------------------------------------------------------------ templates

    def text(self, doc: Doc, chat: bool = False) -> str:
        key = "chat_text" if chat and self.chat_text is not None else "doc_to_text"
        return _as_text(render(getattr(self, key), doc, key, self.source), doc.where, key, self.source)

    def choices(self, doc: Doc) -> list[str]:
        value = self.doc_to_choice if isinstance(self.doc_to_choice, list) else render(self.doc_to_choice or "", doc, "doc_to_choice", self.source)
        if isinstance(value, str) and value.startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise DataError(f"{doc.where}: doc_to_choice must give a non-empty list of strings, got {_short(value)} ({self.source}: doc_to_choice)")
        return value

    def gold(self, doc: Doc, choices: Sequence[str]) -> int:
        """The index of the right choice: doc_to_target as an index, or as the text of a choice."""
        value = render(self.doc_to_target, doc, "doc_to_target", self.source)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and value not in choices:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"{doc.where}: doc_to_target must give a choice index or a choice's text, got {_short(value)} ({self.source}: doc_to_target)")
        if isinstance(value, str):
            if value not in choices:
                raise DataError(f"{doc.where}: doc_to_target gives {value!r}, which is not one of the {len(choices)} choices ({self.source}: doc_to_target)")
            return choices.index(value)
        if not 0 <= value < len(choices):
            raise DataError(f"{doc.where}: doc_to_target gives choice index {value}, out of range for {len(choices)} choices ({self.source}: doc_to_target)")
        return value

    def target(self, doc: Doc, cot: bool = False) -> str:
        """The reference answer text (generation), or an exemplar's answer in a prompt (every kind)."""
        if cot and self.cot_target is not None:
            return _as_text(render(self.cot_target, doc, "cot_target", self.source), doc.where, "cot_target", self.source)
        if self.output_type == "multiple_choice":
            choices = self.choices(doc)
            return choices[self.gold(doc, choices)]
        value = render(self.doc_to_target, doc, "doc_to_target", self.source)
        if isinstance(value, list) and value:  # several acceptable references: an exemplar shows the first
            value = value[0]
        return _as_text(value, doc.where, "doc_to_target", self.source)

    def references(self, doc: Doc) -> list[str]:
        """Every acceptable reference of a generation document (doc_to_target may give a list)."""
        value = render(self.doc_to_target, doc, "doc_to_target", self.source)
        values = value if isinstance(value, list) else [value]
        return [_as_text(v, doc.where, "doc_to_target", self.source) for v in values]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.until if self.until is not None else (self.fewshot_delimiter,)


# ----------------------------------------------------------------------------- prompts


def exemplars(task: Task, doc_index: int, doc: Doc, pool: Sequence[Doc], k: int, seed: int, same_split: bool) -> list[Doc]:
    """The K exemplars of one document: the first K of the pool (`first_n`), or K drawn with a
    generator seeded by (seed, task, document index), so a document's prompt does not depend on
    --limit or on which other documents run. The document itself is never its own exemplar."""
    candidates = [d for i, d in enumerate(pool) if not (same_split and i == doc_index)]
    if task.fewshot_match is not None:
        key = doc.data.get(task.fewshot_match)
        matching = [d for d in candidates if d.data.get(task.fewshot_match) == key]
        candidates = matching if len(matching) >= k else candidates
    if k > len(candidates):
        raise InputError(f"{task.source}: {k} shots asked for, but the {task.fewshot_split!r} split offers only {len(candidates)} exemplars")
    if task.sampler == "first_n":
        return candidates[:k]
    return random.Random(f"{seed}/{task.name}/{doc_index}").sample(candidates, k)  # str seeds hash with SHA-512: stable


def plain_context(task: Task, doc: Doc, shots: Sequence[Doc], cot: bool = False) -> str:
    """lm-eval's prompt: description, exemplars with their answers, the document's text."""
    parts = [task.description]
    for ex in shots:
        parts.append(task.text(ex) + task.target_delimiter + task.target(ex, cot) + task.fewshot_delimiter)
    return "".join(parts) + task.text(doc)


def chat_messages(task: Task, doc: Doc, shots: Sequence[Doc], cot: bool = False) -> list[dict[str, str]]:
    """The same prompt as a conversation (lm-eval's --apply_chat_template --fewshot_as_multiturn):
    the description as the system message, each exemplar a user turn and its answer the assistant's."""
    messages = [{"role": "system", "content": task.description.strip()}] if task.description.strip() else []
    for ex in shots:
        messages += [{"role": "user", "content": task.text(ex, chat=True)}, {"role": "assistant", "content": task.target(ex, cot)}]
    return [*messages, {"role": "user", "content": task.text(doc, chat=True)}]


# ----------------------------------------------------------------------------- templates


def render(template: str, doc: Doc, key: str, source: str) -> Any:
    """A template's value for a document: a bare field name is the field itself; otherwise each
    {{path}} is replaced by its value's text, except that a template of one {{path}} alone is the value."""
    if _PATH.match(template) and _lookup(doc, template, key, source, missing_ok=True) is not _MISSING:
        return _lookup(doc, template, key, source)
    whole = _FIELD.fullmatch(template.strip())
    if whole:
        return _lookup(doc, whole.group(1), key, source)
    return _FIELD.sub(lambda m: _as_text(_lookup(doc, m.group(1), key, source), doc.where, key, source), template)


_MISSING = object()


def _lookup(doc: Doc, path: str, key: str, source: str, missing_ok: bool = False) -> Any:
    if not _PATH.match(path):
        raise InputError(f"{source}: {key} uses {{{{ {path} }}}}; templates can only name fields (a.b, a[0]), not expressions")
    value: Any = doc.data
    for name, index in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)|\[(-?\d+)\]", path):
        try:
            value = value[int(index)] if index else value[name]
        except (KeyError, IndexError, TypeError):
            if missing_ok:
                return _MISSING
            raise DataError(f"{doc.where}: {key} reads {path!r}, which the document lacks ({source}: {key})") from None
    return value


def _as_text(value: Any, where: str, key: str, source: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: {key} gives {_short(value)}, not text ({source}: {key})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_docs(path: Path) -> list[Doc]:
    """JSONL documents; a .txt file is one document {"text": its contents} (for perplexity)."""
    from gptlab.fileio import jsonl_objects

    if path.suffix == ".txt":
        try:
            return [Doc(str(path), {"text": path.read_text(encoding="utf-8")})]
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read as UTF-8 text ({err})") from None
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return [Doc(where, row) for where, row in jsonl_objects(path)]
    except DataError as err:
        if str(err).endswith("holds no rows"):
            return []  # the caller names the split
        raise


# ----------------------------------------------------------------------------- loading


def load_task_file(path: str | Path) -> Task:
    """A task from a YAML (.yaml/.yml) or JSON file; one-line InputErrors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the task file ({err})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            spec = yaml.safe_load(text)  # plain data only: no tag can run code
        except yaml.YAMLError as err:
            raise InputError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    else:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err})") from None
    return task_from_dict(spec, str(path), base=path.parent)


def task_from_dict(spec: Any, source: str, base: Path | None = None, builtin: str | None = None) -> Task:
    """Check a task definition (the schema in the module docstring) and build the Task."""
    if not isinstance(spec, dict):
        raise InputError(f"{source}: a task file holds one mapping of keys, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _KEYS - _IGNORED_KEYS)
    if unknown:
        raise InputError(f"{source}: unknown key {unknown[0]!r}; known keys are {', '.join(sorted(_KEYS))}")

    def need(key: str, kind: type | tuple[type, ...] = str) -> Any:
        if key not in spec or spec[key] is None:
            raise InputError(f"{source}: missing key {key!r}")
        return check(key, kind)

    def check(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = spec.get(key, default)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise InputError(f"{source}: {key} must be {names}, got {_short(value)}")
        return value

    name = need("task")
    output_type = need("output_type")
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"{source}: output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    kw: dict[str, Any] = {"name": name, "output_type": output_type, "source": source, "builtin": builtin}
    if builtin is None:
        if spec.get("dataset_path", "json") != "json":
            raise InputError(f"{source}: dataset_path {spec['dataset_path']!r}: only local JSONL files (dataset_path: json) can be read; hub datasets need lm-eval")
        files = (check("dataset_kwargs", dict) or {}).get("data_files")
        if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
            raise InputError(f"{source}: missing key 'dataset_kwargs.data_files' (a mapping of split name to a local JSONL file)")
        kw["data_files"] = {split: str((base or Path(".")) / f) for split, f in files.items()}
    kw["test_split"] = check("test_split", str) or check("validation_split", str) or "test"
    # lm-eval's fallbacks: the training split, the validation split, else the test split less the document itself
    kw["fewshot_split"] = check("fewshot_split", str) or check("training_split", str) or check("validation_split", str) or kw["test_split"]
    kw["doc_to_text"] = need("doc_to_text")
    if output_type == "multiple_choice":
        kw["doc_to_choice"] = need("doc_to_choice", (str, list))
        if isinstance(kw["doc_to_choice"], list) and not all(isinstance(c, str) for c in kw["doc_to_choice"]):
            raise InputError(f"{source}: doc_to_choice as a list must hold strings")
    if output_type != "loglikelihood_rolling":
        kw["doc_to_target"] = need("doc_to_target", (str, int))
        kw["doc_to_target"] = str(kw["doc_to_target"])
    for key in ("description", "target_delimiter", "fewshot_delimiter", "chat_text", "fewshot_match", "cot_target", "cot_regex"):
        if check(key, str) is not None:
            kw[key] = spec[key]
    kw["num_fewshot"] = check("num_fewshot", int, 0)
    if kw["num_fewshot"] < 0:
        raise InputError(f"{source}: num_fewshot must be >= 0, got {kw['num_fewshot']}")
    sampler = (check("fewshot_config", dict) or {}).get("sampler", "random")
    if sampler not in SAMPLERS:
        raise InputError(f"{source}: fewshot_config.sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    kw["sampler"] = sampler
    if check("repeats", int, 1) != 1:
        raise InputError(f"{source}: repeats must be 1 (repeated sampling is not supported)")
    if check("stride", int) is not None:
        kw["stride"] = spec["stride"]
    kw.update(_metrics(check("metric_list", list), output_type, source))
    kw.update(_generation(check("generation_kwargs", dict), source))
    kw["answer_regex"] = _filter_regex(check("filter_list", list), source)
    for key in ("answer_regex", "cot_regex"):
        if kw.get(key) is not None:
            try:
                re.compile(kw[key])
            except re.error as err:
                raise InputError(f"{source}: {'filter_list regex_pattern' if key == 'answer_regex' else key} is not a regular expression ({err})") from None
    return Task(**kw)


def _metrics(items: list | None, output_type: str, source: str) -> dict[str, Any]:
    valid = METRICS[output_type]
    if not items:
        return {"metrics": valid if output_type != "generate_until" else ("exact_match",)}
    names, out = [], {}
    for item in items:
        entry = {"metric": item} if isinstance(item, str) else item
        metric = entry.get("metric") if isinstance(entry, dict) else None
        if metric not in valid:
            raise InputError(f"{source}: metric_list names unknown metric {metric!r} for {output_type}; known: {', '.join(valid)}")
        names.append(metric)
        for flag in ("ignore_case", "ignore_punctuation"):
            if entry.get(flag):
                out[flag] = True
    return {"metrics": tuple(dict.fromkeys(names)), **out}


def _generation(kwargs: dict | None, source: str) -> dict[str, Any]:
    if not kwargs:
        return {}
    out: dict[str, Any] = {}
    until = kwargs.get("until")
    if until is not None:
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, list) or not all(isinstance(s, str) and s for s in until):
            raise InputError(f"{source}: generation_kwargs.until must be a string or a list of non-empty strings")
        out["until"] = tuple(until)
    if "max_gen_toks" in kwargs:
        if not isinstance(kwargs["max_gen_toks"], int) or kwargs["max_gen_toks"] < 1:
            raise InputError(f"{source}: generation_kwargs.max_gen_toks must be a positive integer, got {_short(kwargs['max_gen_toks'])}")
        out["max_gen_toks"] = kwargs["max_gen_toks"]
    # as lm-eval's HF model: do_sample false is greedy whatever the temperature; sampling without one draws at 1
    temperature, do_sample = kwargs.get("temperature", 0.0), kwargs.get("do_sample")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 100:
        raise InputError(f"{source}: generation_kwargs.temperature must be a number in [0, 100], got {_short(temperature)}")
    if do_sample is False:
        temperature = 0.0
    elif do_sample and temperature == 0:
        temperature = 1.0
    out["temperature"] = float(temperature)
    return out


def _filter_regex(filters: list | None, source: str) -> str | None:
    """The regex of lm-eval's one common filter chain: [regex, take_first]."""
    if not filters:
        return None
    if len(filters) != 1 or not isinstance(filters[0], dict):
        raise InputError(f"{source}: filter_list: only one filter chain ([regex, take_first]) is supported")
    steps = filters[0].get("filter") or []
    functions = [s.get("function") if isinstance(s, dict) else None for s in steps]
    if not steps or functions[0] != "regex" or any(f != "take_first" for f in functions[1:]):
        raise InputError(f"{source}: filter_list: only [regex, take_first] is supported, got {functions}")
    pattern = steps[0].get("regex_pattern")
    if not isinstance(pattern, str):
        raise InputError(f"{source}: filter_list: the regex step needs regex_pattern as a string")
    return pattern


# ----------------------------------------------------------------------------- built-in tasks

_NUMBER = r"(-?\d+)"
# Each built-in in the task schema. Plain prompts suit a base model; chat_text is the question alone,
# as the built-in fine-tuning sets ask it, for a chat model under --chat.
BUILTIN_TASKS: dict[str, dict[str, Any]] = {
    "arithmetic_mc": {
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:", "chat_text": "{{question}}",
        "doc_to_choice": "choices", "doc_to_target": "answer", "metric_list": ["acc", "acc_norm", "acc_bytes"],
    },
    "arithmetic": {
        "output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:", "chat_text": "{{question}}",
        "doc_to_target": "answer", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8},
        "filter_list": [{"name": "number", "filter": [{"function": "regex", "regex_pattern": _NUMBER}, {"function": "take_first"}]}],
        "metric_list": ["exact_match"],
    },
    "word_problems": {
        "output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:", "chat_text": "{{question}}",
        "doc_to_target": "answer", "cot_target": "{{reasoning}} The answer is {{answer}}.", "cot_regex": "answer is " + _NUMBER,
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 96},
        "filter_list": [{"name": "number", "filter": [{"function": "regex", "regex_pattern": _NUMBER}, {"function": "take_first"}]}],
        "metric_list": ["exact_match"],
    },
    "stdlib_mc": {
        "output_type": "multiple_choice", "description": "Which Python standard library function or class does each description fit?\n\n",
        "doc_to_text": "Description: {{question}}\nName:", "chat_text": "Which standard library function or class does this describe? {{question}}",
        "doc_to_choice": "choices", "doc_to_target": "answer", "metric_list": ["acc", "acc_norm", "acc_bytes"],
    },
    "analogies": {
        "output_type": "multiple_choice", "doc_to_text": "{{word}} ->", "doc_to_choice": "choices", "doc_to_target": "answer",
        "fewshot_delimiter": "\n", "fewshot_match": "relation", "metric_list": ["acc", "acc_norm", "acc_bytes"],
    },
    "number_words": {
        "output_type": "generate_until", "description": "Write each number in English words.\n",
        "doc_to_text": "{{number}} =", "chat_text": "Write {{number}} in words.", "doc_to_target": "words",
        "fewshot_delimiter": "\n", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 32},
        "metric_list": ["exact_match", "bleu", "chrf"],
    },
}  # fmt: skip


def builtin_task(name: str) -> Task:
    if name not in BUILTIN_TASKS:
        raise InputError(f"unknown task {name!r}: built-in tasks are {', '.join(BUILTIN_TASKS)}, or give a .yaml/.json task file or a .txt file")
    return task_from_dict({"task": name, "test_split": "test", "fewshot_split": "train", **BUILTIN_TASKS[name]}, f"builtin:{name}", builtin=name)


def text_file_task(path: str | Path, stride: int | None = None) -> Task:
    """Perplexity and bits per byte of one text file, read as one document."""
    path = Path(path)
    return Task(name=path.name, output_type="loglikelihood_rolling", source=str(path), data_files={"test": str(path)},
                fewshot_split=None, doc_to_text="text", metrics=METRICS["loglikelihood_rolling"], stride=stride)  # fmt: skip


def resolve_tasks(spec: str, stride: int | None = None) -> list[Task]:
    """Tasks from --tasks: comma-separated built-in names, task files (.yaml/.yml/.json) and text files (.txt)."""
    tasks = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise InputError(f"--tasks {spec!r} has an empty name")
        if item.endswith((".yaml", ".yml", ".json")):
            task = load_task_file(item)
            tasks.append(replace(task, stride=stride) if stride is not None else task)
        elif item.endswith(".txt"):
            if not Path(item).is_file():
                raise InputError(f"--tasks: {item}: no such file")
            tasks.append(text_file_task(item, stride))
        else:
            tasks.append(builtin_task(item))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"--tasks names a task twice: {', '.join(names)}")
    return tasks
