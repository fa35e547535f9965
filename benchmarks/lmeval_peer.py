"""lm-evaluation-harness as the peer of gptlab's own multiple-choice evaluation (lm_eval 0.4.13).

`write_lmeval_task` writes a local task (train.jsonl, test.jsonl, NAME.yaml); `run_lmeval` runs lm_eval's
HF model on it and returns per-choice log-likelihoods, acc, acc_norm, the prompts and the wall time.
lm_eval's conventions, from its source (paths under lm_eval/):

* Prompt (api/task.py:ConfigurableTask.fewshot_context, build_qa_turn; api/utils.py:Message.to_text):
  context = description + sum(text_i + target_delimiter + choices_i[target_i] + fewshot_delimiter) + text.
  The description is a "system" message rendered with NO delimiter after it: end it with "\\n\\n" yourself.
  Defaults (config/task.py:TaskConfig): description "", target_delimiter " ", fewshot_delimiter "\\n\\n".
  doc_to_* is a field name if it is a column, else a Jinja template (utils.py:apply_template, trailing newline kept).
* Requests (api/task.py:ConfigurableTask.construct_requests): one (context, target_delimiter + choice)
  loglikelihood request per choice. acc = argmax ll; acc_norm = argmax ll / len(choice) in characters, the
  delimiter not counted (process_results).
* Exemplars (api/samplers.py:FirstNSampler.sample): the first K rows of the fewshot split in file order, the
  same K for every doc. The evaluated doc is removed (rm_eval_doc) only when fewshot_split == test_split
  (fewshot_context passes eval_doc only then); with a separate train split nothing is removed.
* Tokens (api/model.py:TemplateLM._encode_pair, loglikelihood): trailing whitespace of the context moves to the
  continuation; whole = enc(ctx + cont), ctx_enc = enc(ctx), cont_enc = whole[len(ctx_enc):]. An empty context
  scores the continuation after prefix_token_id (models/huggingface.py:HFLM.prefix_token_id: BOS, else EOS).
  No BOS is added unless add_bos_token=True (models/utils.py:_add_special_kwargs; gptlab's export writes
  add_bos_token false). Inputs longer than max_length + 1 are cut from the left (HFLM._loglikelihood_tokens).
* Logged samples (evaluator.py:evaluate): one per doc, doc_id in doc order, "arguments" = [(context,
  continuation)] per choice, "resps" = [[(ll, is_greedy)]], "filtered_resps" = [(ll, is_greedy)].
* Offline and fast: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (HFLM.get_model_info's HfApi sha look-up then fails
  fast and is caught), the datasets cache in the task dir (dataset_kwargs.cache_dir), TaskManager(
  include_defaults=False) skips indexing the built-in tasks, bootstrap_iters=0 skips 100k stderr resamples,
  cache_requests stays off (it would write to lm_eval/caching/.cache, or LM_HARNESS_CACHE_PATH).

    .venv/bin/python benchmarks/lmeval_peer.py   # tiny random gptlab model: lm-eval vs a direct forward pass
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def write_lmeval_task(
    dir: Path, name: str, train_rows: list[dict], test_rows: list[dict], *, doc_to_text: str, doc_to_choice: str, doc_to_target: str,
    description: str = "", target_delimiter: str = " ", fewshot_delimiter: str = "\n\n",
) -> Path:
    """Write DIR/train.jsonl, DIR/test.jsonl and DIR/NAME.yaml (a multiple_choice task over them); return the YAML's path."""
    import yaml  # a dependency of lm_eval

    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        files[split] = dir / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config: dict[str, Any] = {
        "task": name, "output_type": "multiple_choice", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {s: str(p) for s, p in files.items()}, "cache_dir": str(dir / ".hf_datasets")},
        "test_split": "test", "fewshot_split": "train", "fewshot_config": {"sampler": "first_n"},
        "doc_to_text": doc_to_text, "doc_to_choice": doc_to_choice, "doc_to_target": doc_to_target,
        "description": description, "target_delimiter": target_delimiter, "fewshot_delimiter": fewshot_delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    # JSON scalars are YAML double-quoted scalars: "\n\n" reads back as two newlines ('\n\n' would not)
    text = "".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in config.items())
    if yaml.safe_load(text) != config:
        raise ValueError(f"{name}: the task config does not survive YAML")
    path = dir / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def run_lmeval(hf_dir: Path, task_yaml: Path, *, num_fewshot: int, limit: int | None = None, batch_size: int = 16, server: str | None = None) -> dict:
    """Evaluate the HF model in `hf_dir` (float32, CPU) on the task in `task_yaml` with lm_eval's Python API.

    server: the base URL of an OpenAI-compatible server (gptlab serve) to score through lm-eval's
    `local-completions` model instead (echo + prompt log-probs), with hf_dir's tokenizer."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    import lm_eval
    import lm_eval.models.huggingface  # noqa: F401  (imported before the clock starts)
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    task_yaml = Path(task_yaml).resolve()
    name = str(_yaml_field(task_yaml, "task"))
    start = time.perf_counter()  # what simple_evaluate(model="hf", model_args=...) does first, timed apart
    if server is None:
        lm = get_model("hf").create_from_arg_obj({"pretrained": str(Path(hf_dir).resolve()), "dtype": "float32"},
                                                 {"batch_size": batch_size, "device": "cpu"})
    else:
        lm = get_model("local-completions").create_from_arg_obj(
            {"base_url": server + "/v1/completions", "model": "m", "tokenizer_backend": "huggingface", "tokenizer": str(Path(hf_dir).resolve()),
             "num_concurrent": 1, "max_retries": 1},
            {"batch_size": batch_size},
        )  # fmt: skip
    load_seconds, start = time.perf_counter() - start, time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[name], task_manager=TaskManager(include_path=str(task_yaml.parent), include_defaults=False),
        num_fewshot=num_fewshot, limit=limit, log_samples=True, bootstrap_iters=0, apply_chat_template=False, cache_requests=False,
    )
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    metrics = out["results"][name]
    return {
        "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        "acc": float(metrics["acc,none"]), "acc_norm": float(metrics["acc_norm,none"]), "docs": len(samples), "seconds": seconds, "load_seconds": load_seconds,
        "contexts": [s["arguments"][0][0] for s in samples],
        "continuations": [[a[1] for a in s["arguments"]] for s in samples],
    }


def _yaml_field(path: Path, key: str) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))[key]


def reference_loglikelihoods(hf_dir: Path, requests: list[list[tuple[str, str]]]) -> list[list[float]]:
    """Per (context, continuation): the sum of log-softmax over the continuation's tokens, by transformers
    directly, one unpadded sequence at a time, encoded as lm_eval's TemplateLM._encode_pair does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for doc in requests:
        lls = []
        for context, continuation in doc:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if context:
                whole, ctx = tok.encode(context + continuation), tok.encode(context)
            else:
                whole, ctx = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id] + tok.encode(continuation), [None]
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            targets = whole[len(ctx):]
            lls.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(targets)))
        out.append(lls)
    return out


def _demo() -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="lmeval_peer_"))
    os.environ.update(OFFLINE | {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(tmp / "hf_home"), "HF_DATASETS_CACHE": str(tmp / "hf_datasets")})
    t0 = time.perf_counter()
    import torch

    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import GPTConfig
    from gptlab.hf import export_hf
    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    torch.set_num_threads(1)
    cfg = GPTConfig(vocab_size=50257, block_size=256, n_layer=2, n_head=2, n_embd=64, init_std=0.3)
    torch.manual_seed(0)
    hf_dir = export_hf(save_checkpoint(tmp / "run", 1, GPT(cfg), cfg, Tokenizer.gpt2()), tmp / "hf")
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    things = ["grass", "the sky", "snow", "coal", "a banana", "a tomato", "a plum", "a carrot", "a lemon", "the sea",
              "milk", "a crow", "a lime", "an orange", "a cherry", "ink"]
    rows = [{"question": f"What color is {t}?", "choices": [colors[(i + k) % 8] for k in range(4)], "answer": (i * 3) % 4}
            for i, t in enumerate(things)]
    desc = "The following are questions about colors.\n\n"
    task = write_lmeval_task(tmp / "task", "colors_mc", rows[:6], rows[6:], doc_to_text="Question: {{question}}\nAnswer:",
                             doc_to_choice="choices", doc_to_target="answer", description=desc)
    print(f"setup (torch, gptlab, export): {time.perf_counter() - t0:.1f}s; task {task}")
    t0 = time.perf_counter()
    import lm_eval  # noqa: F401  (timed apart from the evaluation)
    from lm_eval.tasks import TaskManager  # noqa: F401

    print(f"import lm_eval: {time.perf_counter() - t0:.1f}s")
    for shots in (0, 3):
        res = run_lmeval(hf_dir, task, num_fewshot=shots, batch_size=16)
        shots_text = "".join(f"Question: {r['question']}\nAnswer: {r['choices'][r['answer']]}\n\n" for r in rows[:shots])
        expected = [desc + shots_text + f"Question: {r['question']}\nAnswer:" for r in rows[6:]]
        requests = [[(c, " " + ch) for ch in r["choices"]] for c, r in zip(expected, rows[6:])]
        ref = reference_loglikelihoods(hf_dir, requests)
        diff = max(abs(a - b) for la, lb in zip(res["loglikelihoods"], ref) for a, b in zip(la, lb))
        acc = sum(max(range(4), key=lambda k: lr[k]) == r["answer"] for lr, r in zip(ref, rows[6:])) / len(ref)
        acc_norm = sum(max(range(4), key=lambda k: lr[k] / len(r["choices"][k])) == r["answer"] for lr, r in zip(ref, rows[6:])) / len(ref)
        print(f"\n{shots}-shot: {res['docs']} docs x 4 choices in {res['seconds']:.2f}s ({res['docs'] / res['seconds']:.1f} docs/s; model load {res['load_seconds']:.2f}s apart)")
        print(f"  contexts == description + first {shots} train rows + doc: {res['contexts'] == expected}; "
              f"continuations == ' ' + choice: {res['continuations'] == [[c for _, c in q] for q in requests]}")
        print(f"  max |ll_lmeval - ll_direct| = {diff:.2e} ({'OK' if diff <= 1e-4 else 'FAIL'} at 1e-4)")
        print(f"  acc {res['acc']:.2f} (direct {acc:.2f}), acc_norm {res['acc_norm']:.2f} (direct {acc_norm:.2f})")
        print(f"  doc 0 lls lm-eval {[round(x, 4) for x in res['loglikelihoods'][0]]}\n  doc 0 lls direct  {[round(x, 4) for x in ref[0]]}")
        if shots:
            print("  doc 0 context: " + repr(res["contexts"][0]))


if __name__ == "__main__":
    _demo()
