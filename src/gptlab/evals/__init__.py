"""Evaluation beyond loss: `gptlab evaluate` and `gptlab attention`.

    tasks      task definitions: lm-evaluation-harness's YAML schema over local JSONL (or JSON), the
               built-in tasks, few-shot exemplars and prompts
    harness    running a task: log-likelihood requests and multiple-choice metrics as lm-eval computes
               them (each document's context run once), generation with answer extraction, exact match,
               BLEU / chrF (sacrebleu), chain of thought, perplexity; results and the report card
    attention  attention maps: the weights each head computes for a text, as a PNG grid or an HTML page

The submodules are imported on use; this package imports nothing itself.
"""
