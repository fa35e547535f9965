"""gptlab evaluate: task files and their one-line errors, few-shot prompts, answer extraction and
exact match, BLEU / chrF against sacrebleu, perplexity windows, multiple choice on documents with
known log-probabilities, truncation, and the command end to end. Parity with lm-evaluation-harness
itself is test_lm_eval_parity (runs where lm_eval is installed)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import small_text_corpus
from gptlab.checkpoint import save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import DataError, InputError
from gptlab.evals.harness import (
    Prompter, build_prompts, corpus_scores, encode_pair, extract_answer, loglikelihoods, mean_stderr, normalize, run_task,
)  # fmt: skip
from gptlab.evals.tasks import builtin_task, exemplars, load_task_file, plain_context, resolve_tasks
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Iran", "Tehran")]  # fmt: skip


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def write_task(tmp: Path, name: str = "caps", ext: str = ".yaml", **overrides) -> Path:
    """A multiple-choice capitals task: 4 train and 6 test rows, each with 4 choices."""
    cities = [c for _, c in CAPITALS]
    rows = [{"country": k, "choices": [cities[(i + j) % 10] for j in range(4)], "answer": 0, "id": i} for i, (k, _) in enumerate(CAPITALS)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (tmp / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    spec = {
        "task": name, "output_type": "multiple_choice", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": "train.jsonl", "test": "test.jsonl"}}, "test_split": "test", "fewshot_split": "train",
        "doc_to_text": "Q: capital of {{country}}?\nA:", "doc_to_choice": "choices", "doc_to_target": "answer",
        "description": "Capitals.\n\n", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}], **overrides,
    }  # fmt: skip
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp / f"{name}{ext}"
    if ext == ".json":
        path.write_text(json.dumps(spec))
    else:
        import yaml

        path.write_text(yaml.safe_dump(spec))
    return path


# ----------------------------------------------------------------------------- task files


def test_a_task_file_reads_as_lm_eval_reads_it(tmp_path: Path) -> None:
    task = load_task_file(write_task(tmp_path, fewshot_config={"sampler": "first_n"}, num_fewshot=2))
    assert (task.name, task.output_type, task.sampler, task.num_fewshot, task.metrics) == ("caps", "multiple_choice", "first_n", 2, ("acc", "acc_norm"))
    doc = task.docs("test")[0]
    assert doc.where == f"{tmp_path / 'test.jsonl'}:1"
    assert task.text(doc) == "Q: capital of Egypt?\nA:" and task.choices(doc)[0] == "Cairo" and task.gold(doc, task.choices(doc)) == 0
    json_task = load_task_file(write_task(tmp_path, "caps_json", ".json"))
    assert json_task.text(doc) == task.text(doc)
    # without fewshot_split, exemplars come from training_split, then validation_split, then the test split (as lm-eval)
    assert load_task_file(write_task(tmp_path, "a", fewshot_split=None)).fewshot_split == "test"
    assert load_task_file(write_task(tmp_path, "b", fewshot_split=None, training_split="train")).fewshot_split == "train"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"doc_to_text": None}, "caps.yaml: missing key 'doc_to_text'"),
        ({"metric_list": [{"metric": "f1"}]}, "caps.yaml: metric_list names unknown metric 'f1' for multiple_choice"),
        ({"output_type": "ranking"}, "caps.yaml: output_type 'ranking' is not one of"),
        ({"process_docs": "!function utils.process"}, "caps.yaml: unknown key 'process_docs'"),
        ({"fewshot_config": {"sampler": "balanced"}}, "caps.yaml: fewshot_config.sampler 'balanced' is not one of"),
        ({"doc_to_text": "{{ country | upper }}"}, "caps.yaml: doc_to_text uses {{ country | upper }}"),
        ({"dataset_kwargs": {"data_files": {"test": "missing.jsonl"}}}, "missing.jsonl: no such file"),
    ],
)
def test_bad_task_files_are_one_line_errors_naming_file_and_key(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises((InputError, DataError)) as err:
        task = load_task_file(write_task(tmp_path, **overrides))
        task.text(task.docs(task.test_split)[0])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_documents_name_file_line_and_key(tmp_path: Path) -> None:
    task = load_task_file(write_task(tmp_path))
    (tmp_path / "test.jsonl").write_text('{"country": "Peru", "choices": ["Lima", "Rome"], "answer": 0}\n{"country": "Chile", "choices": ["Lima", "Rome"], "answer": 5}\n')
    docs = task.docs("test")
    with pytest.raises(DataError, match=r"test.jsonl:2: doc_to_target gives choice index 5, out of range for 2 choices \(.*caps.yaml: doc_to_target\)"):
        task.gold(docs[1], task.choices(docs[1]))
    (tmp_path / "test.jsonl").write_text('{"nation": "Peru", "choices": ["Lima"], "answer": 0}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: doc_to_text reads 'country', which the document lacks"):
        task.text(task.docs("test")[0])
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(InputError, match=r"caps.yaml: the 'test' split holds no documents"):
        task.docs("test")
    (tmp_path / "test.jsonl").write_text('{"country": "Peru", "choices": "Lima", "answer": 0}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: doc_to_choice must give a non-empty list of strings"):
        task.choices(task.docs("test")[0])


def test_tasks_resolve_by_name_file_and_text(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("some text")
    tasks = resolve_tasks(f"arithmetic_mc,{write_task(tmp_path)},{tmp_path / 't.txt'}")
    assert [t.output_type for t in tasks] == ["multiple_choice", "multiple_choice", "loglikelihood_rolling"]
    with pytest.raises(InputError, match="unknown task 'nope': built-in tasks are arithmetic_mc"):
        resolve_tasks("nope")
    with pytest.raises(InputError, match="names a task twice"):
        resolve_tasks("analogies,analogies")


# ----------------------------------------------------------------------------- prompts


def test_few_shot_prompts_are_lm_evals_and_never_hold_their_own_document(tmp_path: Path, tok: Tokenizer) -> None:
    task = load_task_file(write_task(tmp_path, fewshot_config={"sampler": "first_n"}))
    doc = task.docs("test")[0]
    shots = exemplars(task, 0, doc, task.docs("train"), 2, seed=0, same_split=False)
    assert plain_context(task, doc, shots) == "Capitals.\n\nQ: capital of France?\nA: Paris\n\nQ: capital of Italy?\nA: Rome\n\nQ: capital of Egypt?\nA:"
    # the same split for exemplars and documents: a document is never its own exemplar, whatever the seed
    same = replace(task, fewshot_split="test", sampler="random")
    pool = same.docs("test")
    for seed in range(20):
        for i, d in enumerate(pool):
            picked = exemplars(same, i, d, pool, 5, seed, same_split=True)
            assert d not in picked and len(set(x.where for x in picked)) == 5
    with pytest.raises(InputError, match="6 shots asked for, but the 'test' split offers only 5"):
        exemplars(same, 0, pool[0], pool, 6, 0, same_split=True)


def test_random_exemplars_are_fixed_by_the_seed_and_do_not_depend_on_limit(tmp_path: Path, tok: Tokenizer) -> None:
    task = builtin_task("arithmetic_mc")
    prompter = Prompter(tok)
    _, a = build_prompts(task, prompter, 3, seed=7, limit=20, cot=False)
    _, b = build_prompts(task, prompter, 3, seed=7, limit=5, cot=False)
    _, c = build_prompts(task, prompter, 3, seed=8, limit=20, cot=False)
    assert a[:5] == b and a != c
    train = {task.text(d) for d in task.docs("train")}
    for prompt in a:  # every exemplar comes from train; the last question is the document's own
        questions = [p.split("\nAnswer:")[0] + "\nAnswer:" for p in prompt.split("\n\n")]
        assert all(q in train for q in questions[:-1]) and len(questions) == 4


def test_exemplars_can_share_a_field_with_the_document() -> None:
    task = builtin_task("analogies")  # fewshot_match: relation
    docs, pool = task.docs("test"), task.docs("train")
    for i, doc in enumerate(docs[::10]):
        assert {d.data["relation"] for d in exemplars(task, i, doc, pool, 3, 0, False)} == {doc.data["relation"]}


# ----------------------------------------------------------------------------- scoring


def test_answers_are_extracted_by_regex_and_normalised() -> None:
    assert extract_answer("The answer is 24. Next: 7", r"(-?\d+)") == "24"
    assert extract_answer("3 * 4 = 12, 12 * 2 = 24. The answer is 24.", r"answer is (-?\d+)", last=True) == "24"
    assert extract_answer("12 then 24", r"-?\d+", last=True) == "24"  # no group: the whole match
    assert extract_answer("no digits", r"(\d+)") == ""
    assert extract_answer(" kept whole ", None) == " kept whole "
    assert normalize("  Forty-two\n apples ") == "Forty-two apples"
    assert normalize("Forty-Two!", ignore_case=True, ignore_punctuation=True) == "fortytwo"
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 1/4, n = 4
    assert mean_stderr([1.0]) is None


def test_bleu_and_chrf_are_sacrebleus() -> None:
    import sacrebleu

    hyps = ["the cat sat on the mat", "forty two", "a quick brown dog"]
    refs = [["the cat sat on a mat"], ["forty-two"], ["the quick brown fox"]]
    got = corpus_scores(hyps, refs, ["bleu", "chrf"])
    assert got["bleu"][0] == pytest.approx(sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]]).score)
    assert got["chrf"][0] == pytest.approx(sacrebleu.corpus_chrf(hyps, [[r[0] for r in refs]]).score)
    assert corpus_scores(["forty two"], [["forty two"]], ["bleu"])["bleu"][0] == pytest.approx(0.0)  # 2 words: no 3- or 4-grams
    assert corpus_scores(["one two three four five"], [["one two three four five"]], ["bleu"])["bleu"][0] == pytest.approx(100.0)
    assert all(e is not None and e > 0 for _, e in got.values())


class Uniform(torch.nn.Module):
    """A model whose every next-token distribution is uniform: each token costs exactly ln V."""

    def __init__(self, vocab: int, block: int) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=1, n_embd=8)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, segments=None, branches=None, logits_at=None):
        n = int(logits_at.sum()) if logits_at is not None else idx.numel()
        return torch.zeros(n, self.config.vocab_size), None


def test_multiple_choice_on_documents_with_known_log_probs(tmp_path: Path, tok: Tokenizer) -> None:
    # Under a uniform model a choice's log-likelihood is -(its tokens) ln V: acc picks the choice with the
    # fewest tokens (the first of ties), acc_norm divides by characters, acc_bytes by UTF-8 bytes.
    rows = [
        {"q": "one", "choices": ["aaaaaaaaaaaa", "the", "a b c d e"], "answer": 1},  # fewest tokens: "the"
        {"q": "two", "choices": ["é", "ab"], "answer": 0},  # acc_norm by chars favours é (1 char), acc_bytes ab
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"task": "known", "output_type": "multiple_choice", "dataset_kwargs": {"data_files": {"test": "t.jsonl"}},
            "doc_to_text": "{{q}}:", "doc_to_choice": "choices", "doc_to_target": "answer", "metric_list": ["acc", "acc_norm", "acc_bytes"]}  # fmt: skip
    (tmp_path / "known.json").write_text(json.dumps(spec))
    task = load_task_file(tmp_path / "known.json")
    V = 320
    result = run_task(Uniform(V, 64), tok, task, progress=False)
    for row, sample in zip(rows, result.samples):
        n_tokens = [len(encode_pair(tok, row["q"] + ":", " " + c)[1]) for c in row["choices"]]
        assert sample["loglikelihoods"] == pytest.approx([-n * math.log(V) for n in n_tokens])
        lls = sample["loglikelihoods"]
        first_best = lambda s: max(range(len(s)), key=lambda i: (s[i], -i))  # noqa: E731
        assert sample["acc"] == float(first_best(lls) == row["answer"])
        assert sample["acc_norm"] == float(first_best([lp / len(c) for lp, c in zip(lls, row["choices"])]) == row["answer"])
        assert sample["acc_bytes"] == float(first_best([lp / len(c.encode()) for lp, c in zip(lls, row["choices"])]) == row["answer"])
    acc = [s["acc"] for s in result.samples]
    assert result.metrics["acc"] == (pytest.approx(sum(acc) / 2), pytest.approx(mean_stderr(acc)))


def test_multiple_choice_equals_each_request_scored_alone_and_long_documents_are_truncated_and_counted(tmp_path: Path, tok: Tokenizer, model: GPT) -> None:
    task = load_task_file(write_task(tmp_path, fewshot_config={"sampler": "first_n"}))
    (tmp_path / "test.jsonl").write_text(json.dumps({"country": "Peru " * 80, "choices": ["Lima", "Rome"], "answer": 0}) + "\n"
                                         + json.dumps({"country": "Chile", "choices": ["Santiago", "Lima"], "answer": 0}) + "\n")  # fmt: skip
    result = run_task(model, tok, task, shots=1, progress=False)
    docs, contexts = build_prompts(task, Prompter(tok), 1, 0, None, False)
    block = model.config.block_size
    too_long = [any(sum(map(len, encode_pair(tok, c, " " + k))) > block + 1 for k in task.choices(d)) for d, c in zip(docs, contexts)]
    assert too_long == [True, False] and result.truncated == 1 and result.docs == 2
    for doc, context, sample in zip(docs, contexts, result.samples):
        alone = loglikelihoods(model, tok, [(context, " " + c) for c in task.choices(doc)])
        assert sample["loglikelihoods"] == pytest.approx([r.logprob for r in alone], abs=1e-4)


# ----------------------------------------------------------------------------- generation and chain of thought


class Canned:
    """An engine stub: replies are looked up by the prompt's decoded text; every prompt is recorded."""

    def __init__(self, tok: Tokenizer, reply) -> None:
        self.tok, self.reply, self.prompts, self.cfgs = tok, reply, [], []

    def generate(self, prompts, cfgs):
        from gptlab.generate import Completion

        texts = [self.tok.decode(p) for p in prompts]
        self.prompts += texts
        self.cfgs += cfgs
        return [Completion(text=self.reply(t)) for t in texts]


def test_generation_extracts_answers_and_scores_exact_match(tok: Tokenizer, model: GPT) -> None:
    task = builtin_task("arithmetic")
    docs = task.docs("test")[:6]
    right = {task.text(d): d.data["answer"] for d in docs}

    def reply(prompt: str) -> str:  # right on even documents (with chatter around the number), wrong on odd ones
        i = list(right).index(prompt)
        return f" {right[prompt]} apples" if i % 2 == 0 else " 1000000"

    engine = Canned(tok, reply)
    result = run_task(model, tok, task, limit=6, engine=engine, progress=False)
    assert [s["exact_match"] for s in result.samples] == [1.0, 0.0] * 3
    assert result.metrics["exact_match"][0] == pytest.approx(0.5)
    assert all(c.temperature == 0 and c.stop == ("\n",) and c.max_new_tokens == 8 for c in engine.cfgs)


def test_chain_of_thought_exemplars_and_the_zero_shot_trigger(tok: Tokenizer, model: GPT) -> None:
    task = builtin_task("word_problems")
    model = GPT(replace(model.config, block_size=512)).eval()  # room for two exemplars' reasoning and 96 new tokens
    doc = task.docs("test")[0]
    # few-shot: the exemplars show their reasoning; the answer is the last "answer is N" of the reply
    engine = Canned(tok, lambda p: f" 2 + 2 = 4, so the answer is 3. No: the answer is {doc.data['answer']}.")
    r = run_task(model, tok, task, limit=1, shots=2, cot=True, engine=engine, seed=3, progress=False)
    assert r.samples[0]["answer"] == doc.data["answer"] and r.metrics["exact_match"][0] == 1.0
    shots = exemplars(task, 0, doc, task.docs("train"), 2, 3, False)
    assert shots[0].data["reasoning"] in engine.prompts[0] and f"The answer is {shots[0].data['answer']}." in engine.prompts[0]
    # zero-shot: "Let's think step by step." then a second prompt ending "Therefore, the answer is"
    engine = Canned(tok, lambda p: f" {doc.data['answer']}." if p.endswith("Therefore, the answer is") else " First, some reasoning.")
    r = run_task(model, tok, task, limit=1, shots=0, cot=True, engine=engine, progress=False)
    assert engine.prompts[0].endswith("Answer: Let's think step by step.")
    assert engine.prompts[1] == engine.prompts[0] + " First, some reasoning. Therefore, the answer is"
    assert r.samples[0]["answer"] == doc.data["answer"] and r.metrics["exact_match"][0] == 1.0
    with pytest.raises(InputError, match="--cot applies to generation tasks"):
        run_task(model, tok, builtin_task("analogies"), cot=True, progress=False)


def test_bleu_task_scores_the_replies_with_sacrebleu(tok: Tokenizer, model: GPT) -> None:
    import sacrebleu

    task = builtin_task("number_words")
    docs = task.docs("test")[:8]
    engine = Canned(tok, lambda p: " " + {task.text(d): d.data["words"] for d in docs}.get(p.rsplit("\n", 1)[-1], "zero").replace("-", " "))
    r = run_task(model, tok, task, limit=8, engine=engine, progress=False)
    hyps = [s["output"].strip() for s in r.samples]
    refs = [d.data["words"] for d in docs]
    assert r.metrics["bleu"][0] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert r.metrics["chrf"][0] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert r.metrics["exact_match"][0] == pytest.approx(sum("-" not in w for w in refs) / 8)


def test_generation_prompts_keep_room_for_the_answer(tok: Tokenizer, model: GPT, tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(json.dumps({"q": "word " * 200, "a": "x"}) + "\n" + json.dumps({"q": "short", "a": "x"}) + "\n")
    spec = {"task": "long", "output_type": "generate_until", "dataset_kwargs": {"data_files": {"test": "t.jsonl"}}, "doc_to_text": "{{q}}",
            "doc_to_target": "a", "generation_kwargs": {"max_gen_toks": 10}}  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps(spec))
    engine = Canned(tok, lambda p: "x")
    r = run_task(model, tok, load_task_file(tmp_path / "t.json"), engine=engine, progress=False)
    assert r.truncated == 1 and len(tok.encode(engine.prompts[0])) <= model.config.block_size - 10


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_task_uses_the_stated_windows_and_counts_bytes(tmp_path: Path, tok: Tokenizer, model: GPT) -> None:
    text = small_text_corpus(2_000)[0][:600]
    (tmp_path / "doc.txt").write_text(text)
    task = resolve_tasks(str(tmp_path / "doc.txt"))[0]
    r = run_task(model, tok, task, progress=False)
    # by hand: <|endoftext|> then the text; non-overlapping windows of the full context, each token predicted once
    seq = [tok.eot_id, *tok.encode(text)]
    block = model.config.block_size
    nll, scored = 0.0, 0
    with torch.no_grad():  # targets first..end-1, each window's inputs the block tokens before its last target
        for first in range(1, len(seq), block):
            end = min(first + block, len(seq))
            start = max(0, end - 1 - block)
            logits = model(torch.tensor([seq[start : end - 1]]))[0][0, first - 1 - start :]
            nll += torch.nn.functional.cross_entropy(logits.double(), torch.tensor(seq[first:end]), reduction="sum").item()
            scored += end - first
    assert scored == len(seq) - 1 and (len(seq) - 1) % block != 0  # the last window overlaps the one before
    nbytes = len(text.encode())
    assert r.metrics["bits_per_byte"][0] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    assert r.metrics["byte_perplexity"][0] == pytest.approx(math.exp(nll / nbytes), rel=1e-5)
    assert r.metrics["word_perplexity"][0] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-4)
    assert r.samples[0]["windows"] == -(-(len(seq) - 1) // block)
    # a smaller stride gives every token more context: more windows over the same scored tokens
    strided = run_task(model, tok, replace(task, stride=16), progress=False)
    assert strided.samples[0]["windows"] > r.samples[0]["windows"] and strided.samples[0]["tokens"] == r.samples[0]["tokens"]


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok: Tokenizer) -> Path:
    from gptlab.chat import add_chat_tokens

    chat_tok, _ = add_chat_tokens(tok)
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=320, block_size=128, n_layer=2, n_head=2, n_embd=32)
    out = tmp_path_factory.mktemp("evalrun") / "run"
    save_checkpoint(out, 3, GPT(cfg), cfg, chat_tok)
    return out


def test_evaluate_command_writes_results_and_a_report_card(tmp_path: Path, run_dir: Path, capsys) -> None:
    (tmp_path / "doc.txt").write_text("Return the list of words in the string.")
    caps = write_task(tmp_path)
    out = tmp_path / "res" / "results.json"
    assert main(["evaluate", "--ckpt", str(run_dir), "--tasks", f"analogies,{caps},{tmp_path / 'doc.txt'}", "--shots", "2", "--limit", "5",
                 "--out", str(out), "--log-samples", "-q"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [r["task"] for r in results["results"]] == ["analogies", "caps", "doc.txt"]
    analogies = results["results"][0]
    assert analogies["docs"] == 5 and analogies["shots"] == 2 and set(analogies["metrics"]) == {"acc", "acc_norm", "acc_bytes"}
    assert len(analogies["samples"]) == 5 and results["results"][2]["metrics"]["bits_per_byte"]["stderr"] is None
    card = out.with_suffix(".md").read_text()
    assert "| task | metric | value | ± stderr | shots | docs | truncated | seconds | docs/s |" in card
    assert "| analogies | acc |" in card and "| doc.txt | bits_per_byte |" in card and card in printed


def test_evaluate_show_prompt_chat_and_bad_input(tmp_path: Path, run_dir: Path, capsys) -> None:
    assert main(["evaluate", "--ckpt", str(run_dir), "--tasks", "arithmetic", "--shots", "1", "--chat", "--show-prompt", "2"]) == 0
    shown = capsys.readouterr().out
    task = builtin_task("arithmetic")
    question = task.docs("test")[2].data["question"]
    assert f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n" in shown and shown.count("<|im_start|>user") == 2
    assert main(["evaluate", "--ckpt", str(run_dir), "--tasks", "arithmetic", "--chat", "--limit", "3", "-q"]) == 0
    capsys.readouterr()
    bad = write_task(tmp_path, metric_list=[{"metric": "bleu"}])
    for argv, message in [
        (["--tasks", str(bad)], "caps.yaml: metric_list names unknown metric 'bleu' for multiple_choice"),
        (["--tasks", "analogies", "--show-prompt", "9999"], "--show-prompt 9999: analogies has"),
        (["--tasks", "analogies", "--cot"], "--cot applies to generation tasks"),
        (["--tasks", "analogies", "--limit", "0"], "--limit must be at least 1"),
        (["--tasks", "analogies", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--tasks", "analogies", "--out", str(tmp_path / "r.md")], "name a .json file"),
        (["--tasks", str(tmp_path / "missing.yaml")], "missing.yaml: cannot read the task file"),
    ]:
        assert main(["evaluate", "--ckpt", str(run_dir), *argv, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_sampled_generation_is_fixed_by_the_seed_whatever_the_batch(tmp_path: Path, tok: Tokenizer, model: GPT) -> None:
    rows = [{"q": f"Say {w}:", "a": w} for w in ("one", "two", "three", "four", "five")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"task": "say", "output_type": "generate_until", "dataset_kwargs": {"data_files": {"test": "t.jsonl"}}, "doc_to_text": "{{q}}",
            "doc_to_target": "a", "generation_kwargs": {"max_gen_toks": 12, "do_sample": True, "temperature": 1.0, "until": ["\n\n\n"]}}  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps(spec))
    task = load_task_file(tmp_path / "t.json")
    assert task.temperature == 1.0
    outputs = lambda seed, bs: [s["output"] for s in run_task(model, tok, task, seed=seed, batch_size=bs, progress=False).samples]  # noqa: E731
    first = outputs(0, 2)
    assert first == outputs(0, 5) and first != outputs(1, 2) and len(set(first)) > 1
