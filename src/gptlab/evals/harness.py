"""Running evaluation tasks: log-likelihoods and multiple choice as lm-evaluation-harness computes them,
generation with answer extraction, chain of thought, BLEU / chrF, perplexity, and the report card.

A log-likelihood request is (context, continuation): the log-probability of the continuation's tokens
given the context, and whether greedy decoding would have produced exactly those tokens. The pair is
encoded the way lm-eval's HF model encodes it (`_encode_pair`): trailing whitespace of the context
moves to the front of the continuation, the whole text is encoded once, and the continuation's tokens
are the whole's tokens after the context's own encoding. A request longer than the model's context
keeps its last block_size + 1 tokens (the continuation always survives whole when it fits), and is
counted as truncated.

Multiple choice scores each choice as one request and picks the highest: `acc` by the summed
log-likelihood, `acc_norm` by it divided by the choice's length in characters (lm-eval's
acc_norm), `acc_bytes` by its length in UTF-8 bytes. Ties go to the first choice, as np.argmax.
The choices of a document share its context, which runs once (`choice_loglikelihoods`).

Generation is greedy unless the task samples, stops at the task's stop strings, and keeps the last
(context - max_gen_toks) tokens of a longer prompt (lm-eval's rule, counted as truncated). The
answer is the task's regex's first match (its first group when it has one); exact_match compares it
with the reference after `normalize`. Chain of thought (--cot) shows exemplars with their reasoning
and takes the last match of cot_regex, or zero-shot appends "Let's think step by step.", then asks
again with the reasoning and "Therefore, the answer is" (Kojima et al. 2022). BLEU and chrF are
sacrebleu's corpus scores. Standard errors: of a mean, the sample standard deviation over sqrt(n)
(lm-eval's); of BLEU / chrF, sacrebleu's bootstrap.
"""

from __future__ import annotations

import math
import os
import re
import string
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gptlab.errors import InputError
from gptlab.evals.tasks import Doc, Task, chat_messages, exemplars, plain_context
from gptlab.model import GPT, IGNORE_INDEX, CacheStep, KVCache, branched_positions_and_mask, target_logprobs
from gptlab.tokenizer import AnyTokenizer


def encode_pair(tokenizer: AnyTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's rule (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())  # str.rstrip(): newlines and tabs move too (lm-eval 0.4.13)
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float  # the continuation's summed log-probability, in nats
    greedy: bool  # every continuation token was the argmax at its position
    truncated: bool  # the context lost tokens at its start to fit the model


def encode_requests(tokenizer: AnyTokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of text requests, each by `encode_pair`."""
    return [encode_pair(tokenizer, context, continuation) for context, continuation in requests]


def _fit(i: int, ctx: list[int], cont: list[int], block: int, eot_id: int | None) -> tuple[list[int], bool]:
    """The ids one request runs (left-truncated to block + 1) and whether it lost context."""
    if not cont:
        raise InputError(f"request {i}: the continuation encodes to no tokens")
    if len(cont) > block:
        raise InputError(f"request {i}: the continuation has {len(cont)} tokens, more than the model's context ({block})")
    ids = ctx + cont
    if not ctx:  # nothing to condition the first token on: lm-eval starts such requests with the end-of-text token
        if eot_id is None:
            raise InputError(f"request {i}: an empty context needs the tokenizer's <|endoftext|> to start from")
        ids = [eot_id, *ids]
    return ids[-(block + 1) :], len(ids) > block + 1


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, tokenizer: AnyTokenizer, requests: Sequence[tuple[str, str]] | Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
) -> list[LogLikelihood]:  # fmt: skip
    """Score (context, continuation) requests, as text or as encoded ids, batched longest first;
    results in the requests' order."""
    if requests and isinstance(requests[0][0], str):
        requests = encode_requests(tokenizer, requests)  # type: ignore[arg-type]
    block = model.config.block_size
    encoded = []
    for i, (ctx, cont) in enumerate(requests):
        ids, truncated = _fit(i, list(ctx), list(cont), block, tokenizer.eot_id)  # type: ignore[arg-type]
        encoded.append((ids, len(cont), truncated))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
    device = next(model.parameters()).device
    out: list[LogLikelihood | None] = [None] * len(encoded)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i][0]) for i in rows) - 1
            x = torch.zeros(len(rows), width, dtype=torch.long)
            y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for b, i in enumerate(rows):
                ids, n_cont, _ = encoded[i]
                t = torch.tensor(ids)
                x[b, : len(ids) - 1] = t[:-1]
                y[b, len(ids) - 1 - n_cont : len(ids) - 1] = t[-n_cont:]  # position p predicts token p + 1
            scored = y != IGNORE_INDEX  # (B, T)
            logits = model(x.to(device), logits_at=scored.to(device))[0].float()  # (N, V), row-major over scored
            targets = y[scored].to(device)  # (N,)
            counts = scored.sum(dim=1).tolist()
            for i, lp, ok in zip(rows, *_score(logits, targets, counts), strict=True):
                out[i] = LogLikelihood(lp, ok, encoded[i][2])
    assert all(r is not None for r in out), "every request was in a batch"
    return out  # type: ignore[return-value]


def _score(logits: Tensor, targets: Tensor, counts: list[int]) -> tuple[list[float], list[bool]]:
    """Summed log-prob and all-greedy flag of each run of `counts` consecutive targets."""
    logp = target_logprobs(logits, targets).cpu().double()  # (N,)
    hit = (logits.argmax(dim=-1) == targets).cpu()  # (N,)
    return [float(lp.sum()) for lp in logp.split(counts)], [bool(h.all()) for h in hit.split(counts)]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# Tokens every document's context must share before the shared part is run once for all of them.
MIN_SHARED_PREFIX = 4


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module, tokenizer: AnyTokenizer, docs: Sequence[tuple[list[int], Sequence[list[int]]]], batch_size: int = 16,
) -> list[list[LogLikelihood]]:  # fmt: skip
    """Per document (context ids, [continuation ids per choice]): each choice's LogLikelihood, the
    context run once.

    A document is one row: the context, then each continuation but its last token as a branch
    that sees the context and itself only, numbered from where the context ends
    (model.branched_positions_and_mask). The last context position predicts every choice's
    first token, so each choice gets the log-probs it would get alone after the context, at
    the cost of one context plus the choices instead of one context per choice. The tokens
    that every document's context begins with (a description and fixed few-shot exemplars:
    lm-eval's first_n) run once too, into a KV cache each batch's rows continue, as prefix
    caching in serving engines does. A document that would lose context to truncation goes
    through `loglikelihoods`, request by request, which truncates each as lm-eval does. Rows
    are batched longest first.
    """
    block = model.config.block_size
    out: list[list[LogLikelihood] | None] = [None] * len(docs)
    rows = []  # (doc index, ids, branch ids, [(positions predicting, targets) per choice], context length)
    single = []
    for d, (ctx, conts) in enumerate(docs):
        fitted = [_fit(d, list(ctx), list(c), block, tokenizer.eot_id) for c in conts]
        if any(truncated for _, truncated in fitted) or not conts:
            single.append(d)
            continue
        head = fitted[0][0][: len(fitted[0][0]) - len(conts[0])]  # the context, with <|endoftext|> when it was empty
        ids, branches, scored = list(head), [0] * len(head), []
        for j, cont in enumerate(conts, 1):
            first = len(ids)
            ids += cont[:-1]
            branches += [j] * (len(cont) - 1)
            scored.append(([len(head) - 1, *range(first, len(ids))], list(cont)))
        rows.append((d, ids, branches, scored, len(head)))
    rows.sort(key=lambda r: -len(r[1]))
    with _eval_mode(model):
        prefix = _prefix_cache(model, [r[1][: r[4]] for r in rows])
        for start in range(0, len(rows), batch_size):
            group = rows[start : start + batch_size]
            logits, index = _branched_logits(model, group, prefix)
            picks, targets, counts = [], [], []
            for b, (_, _, _, scored, _) in enumerate(group):
                for positions, cont in scored:
                    picks += index[b, positions].tolist()
                    targets += cont
                    counts.append(len(cont))
            logps, greedy = _score(logits[torch.tensor(picks, device=logits.device)], torch.tensor(targets, device=logits.device), counts)
            k = 0
            for d, _, _, scored, _ in group:
                out[d] = [LogLikelihood(logps[k + j], greedy[k + j], False) for j in range(len(scored))]
                k += len(scored)
    if single:
        flat = [(list(docs[d][0]), list(c)) for d in single for c in docs[d][1]]
        results = iter(loglikelihoods(model, tokenizer, flat, batch_size))
        for d in single:
            out[d] = [next(results) for _ in docs[d][1]]
    assert all(r is not None for r in out), "every document was scored"
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class _Prefix:
    cache: KVCache  # one row: the keys and values of the shared tokens
    length: int


def _prefix_cache(model: nn.Module, contexts: list[list[int]]) -> _Prefix | None:
    """The tokens all contexts begin with (each keeping one of its own, whose logits are read), run once."""
    if len(contexts) < 2 or not isinstance(model, GPT):
        return None
    n = min(len(os.path.commonprefix(contexts)), min(len(c) for c in contexts) - 1)  # commonprefix works on any sequences
    if n < MIN_SHARED_PREFIX:
        return None
    param = next(model.parameters())
    cache = KVCache(model.config, 1, n, param.dtype, param.device)
    model.forward_cached(torch.tensor([contexts[0][:n]], device=param.device), CacheStep(cache, n, None, n), last=torch.tensor([n - 1], device=param.device))
    return _Prefix(cache, n)


def _branched_logits(model: nn.Module, group: list, prefix: _Prefix | None) -> tuple[Tensor, Tensor]:
    """For rows of (doc, ids, branches, scored, context length): logits (N, V) at the positions the rows
    score, and index (B, L), the logits row of each row's position (-1 where none was asked). Rows
    continue the cached prefix when there is one and they fit a KV cache (the model's context);
    otherwise they run whole."""
    device = next(model.parameters()).device
    L = max(len(r[1]) for r in group)
    n = prefix.length if prefix is not None and L <= model.config.block_size else 0
    x = torch.zeros(len(group), L - n, dtype=torch.long)
    branch = torch.zeros_like(x)
    segments = torch.zeros_like(x)
    at = torch.zeros_like(x, dtype=torch.bool)
    for b, (_, ids, branches, scored, _) in enumerate(group):
        m = len(ids) - n
        x[b, :m] = torch.tensor(ids[n:])
        branch[b, :m] = torch.tensor(branches[n:])
        segments[b, m:] = 1  # padding: a segment of its own, never seen by the document
        for positions, _ in scored:
            at[b, [p - n for p in positions]] = True
    x, branch, segments = x.to(device), branch.to(device), segments.to(device)
    if n:
        positions, mask = branched_positions_and_mask(segments, branch)  # (B, T), (B, 1, T, T)
        cache = KVCache(model.config, len(group), L, prefix.cache.k.dtype, device)
        cache.k[:, :, :, :n] = prefix.cache.k  # (n_layer, 1, nh, n, hs) broadcast to every row
        cache.v[:, :, :, :n] = prefix.cache.v
        logits = model.forward_cached(x, CacheStep.after_prefix(cache, n, positions, mask), logits_at=at.to(device))
    else:
        logits = model(x, segments=segments, branches=branch, logits_at=at.to(device))[0]
    index = torch.full((len(group), L), -1, dtype=torch.long)
    index[:, n:][at] = torch.arange(int(at.sum()))
    return logits.float(), index


def choice_metrics(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm (log-likelihood per character of the choice) and acc_bytes (per UTF-8 byte) of one document."""
    if len(logprobs) != len(choices) or not choices:
        raise InputError(f"{len(logprobs)} log-likelihoods for {len(choices)} choices")
    if not 0 <= gold < len(choices):
        raise InputError(f"the gold index {gold} is out of range for {len(choices)} choices")

    def first_best(scores: Sequence[float]) -> int:
        return max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of equal maxima

    chars = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    nbytes = [lp / max(len(c.encode()), 1) for lp, c in zip(logprobs, choices, strict=True)]
    return {
        "acc": float(first_best(logprobs) == gold),
        "acc_norm": float(first_best(chars) == gold),
        "acc_bytes": float(first_best(nbytes) == gold),
    }


# ----------------------------------------------------------------------------- answers


def extract_answer(text: str, pattern: str | None, last: bool = False) -> str:
    """The answer in a generation: the first (or last) match of `pattern`, its first group when it has
    one; no pattern is the whole text; no match is "" (counted wrong, never a crash)."""
    if pattern is None:
        return text
    matches = list(re.finditer(pattern, text))
    if not matches:
        return ""
    m = matches[-1] if last else matches[0]
    return m.group(1) if m.re.groups else m.group(0)


def normalize(text: str, ignore_case: bool = False, ignore_punctuation: bool = False) -> str:
    """What exact_match compares: outer whitespace stripped and inner runs of whitespace made one
    space; optionally lower case and without ASCII punctuation (lm-eval's exact_match options)."""
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample standard deviation (n - 1) over sqrt(n), as lm-eval's mean_stderr."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str]) -> dict[str, tuple[float, float | None]]:
    """Corpus BLEU and chrF by sacrebleu with its defaults, each with the standard error of sacrebleu's
    bootstrap resampling (1000 resamples, its fixed seed: the 95% interval's half-width / 1.96)."""
    from sacrebleu.metrics import BLEU, CHRF

    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(width)]  # one stream per reference slot
    out = {}
    for name in metrics:
        scorer = BLEU() if name == "bleu" else CHRF()
        score = scorer.corpus_score(list(hypotheses), streams, n_bootstrap=1000 if len(hypotheses) > 1 else 1)
        ci = getattr(score, "_ci", None)
        out[name] = (float(score.score), float(ci) / 1.96 if ci is not None and len(hypotheses) > 1 else None)
    return out


# ----------------------------------------------------------------------------- running a task


@dataclass
class TaskResult:
    task: str
    output_type: str
    metrics: dict[str, tuple[float, float | None]]  # name -> (value, standard error)
    shots: int
    docs: int
    truncated: int  # documents whose prompt lost tokens at its start to fit the context
    seconds: float
    samples: list[dict[str, Any]]

    def to_json(self, with_samples: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "samples"}
        out["metrics"] = {k: {"value": v, "stderr": e} for k, (v, e) in self.metrics.items()}
        if with_samples:
            out["samples"] = self.samples
        return out


@dataclass(frozen=True)
class Prompter:
    """How documents become prompts: plain text (lm-eval's) or a chat conversation (`chat`, a ChatTemplate)."""

    tokenizer: AnyTokenizer
    chat: Any = None  # gptlab.chat.ChatTemplate

    def context(self, task: Task, doc: Doc, shots: Sequence[Doc], cot: bool) -> str | list[dict[str, str]]:
        if self.chat is None:
            return plain_context(task, doc, shots, cot)
        return chat_messages(task, doc, shots, cot)

    def ids(self, context: str | list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode(context) if isinstance(context, str) else self.chat.generation_prompt(context)

    def show(self, context: str | list[dict[str, str]]) -> str:
        return context if isinstance(context, str) else self.tokenizer.decode(self.ids(context))


def build_prompts(task: Task, prompter: Prompter, shots: int, seed: int, limit: int | None, cot: bool) -> tuple[list[Doc], list[str | list[dict[str, str]]]]:
    """The documents to evaluate (the first `limit` of the test split) and each one's prompt."""
    docs = task.docs(task.test_split)[:limit]
    pool = task.docs(task.fewshot_split) if shots and task.fewshot_split else []
    same = task.fewshot_split == task.test_split
    contexts = []
    for i, doc in enumerate(docs):
        chosen = exemplars(task, i, doc, pool, shots, seed, same) if shots else []
        context = prompter.context(task, doc, chosen, cot)
        if cot and not shots:
            trigger = task.cot_trigger
            if isinstance(context, str):
                context = f"{context} {trigger}"
            else:
                context[-1]["content"] += f"\n{trigger}"
        contexts.append(context)
    return docs, contexts


def run_task(
    model: nn.Module, tokenizer: AnyTokenizer, task: Task, *, shots: int | None = None, seed: int = 0, limit: int | None = None,
    cot: bool = False, chat: Any = None, batch_size: int = 16, progress: bool = True, engine: Any = None,
) -> TaskResult:  # fmt: skip
    """Evaluate `model` on `task` (the first `limit` test documents; `shots` exemplars, default the
    task's num_fewshot) and return its metrics with standard errors, and one sample per document."""
    shots = 0 if task.output_type == "loglikelihood_rolling" else task.num_fewshot if shots is None else shots  # a text is scored whole
    if cot and task.output_type != "generate_until":
        raise InputError(f"{task.source}: --cot applies to generation tasks, and {task.name} is {task.output_type}")
    if cot and shots and task.cot_target is None:
        raise InputError(f"{task.source}: few-shot --cot needs cot_target (an exemplar's reasoning and answer); zero-shot --cot needs none")
    if shots and task.fewshot_split is None:
        raise InputError(f"{task.source}: {shots} shots asked for, but the task has no fewshot_split")
    prompter = Prompter(tokenizer, chat)
    start = time.perf_counter()
    if task.output_type == "loglikelihood_rolling":
        docs = task.docs(task.test_split)[:limit]
        result = _run_rolling(model, tokenizer, task, docs, batch_size, progress)
    else:
        docs, contexts = build_prompts(task, prompter, shots, seed, limit, cot)
        bar = _bar(len(docs), task.name, progress)
        try:
            if task.output_type == "multiple_choice":
                result = _run_choice(model, prompter, task, docs, contexts, batch_size, bar)
            else:
                result = _run_generate(model, prompter, task, docs, contexts, cot, shots, seed, batch_size, bar, engine)
        finally:
            bar.close()
    metrics, samples, truncated = result
    return TaskResult(task.name, task.output_type, metrics, shots, len(docs), truncated, time.perf_counter() - start, samples)


def _bar(total: int, name: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="doc", disable=not progress, leave=False)


def _run_choice(model: nn.Module, prompter: Prompter, task: Task, docs: list[Doc], contexts: list, batch_size: int, bar: Any) -> tuple:
    requests, golds, all_choices = [], [], []
    for doc, context in zip(docs, contexts, strict=True):
        choices = task.choices(doc)
        golds.append(task.gold(doc, choices))
        all_choices.append(choices)
        if isinstance(context, str):  # lm-eval: the continuation is target_delimiter + choice, encoded as a pair
            pairs = [encode_pair(prompter.tokenizer, context, task.target_delimiter + c) for c in choices]
            requests.append((pairs[0][0], [p[1] for p in pairs]))
        else:  # a chat prompt ends in the open assistant turn: the choice is the reply's text
            requests.append((prompter.ids(context), [prompter.tokenizer.encode_ordinary(c) for c in choices]))
    results: list[list[LogLikelihood]] = []
    # chunks of whole batches, so the bar moves while the rows stay sorted by length within each chunk
    chunk = batch_size * 8
    for s in range(0, len(requests), chunk):
        results += choice_loglikelihoods(model, prompter.tokenizer, requests[s : s + chunk], batch_size)
        bar.update(len(requests[s : s + chunk]))
    per_doc, samples, truncated = [], [], 0
    for i, (doc, choices, gold, res) in enumerate(zip(docs, all_choices, golds, results, strict=True)):
        scores = choice_metrics([r.logprob for r in res], choices, gold)
        per_doc.append(scores)
        truncated += any(r.truncated for r in res)
        samples.append({"doc": i, "where": doc.where, "choices": choices, "gold": gold,
                        "loglikelihoods": [r.logprob for r in res], "greedy": [r.greedy for r in res], **scores})  # fmt: skip
    metrics = {m: (sum(d[m] for d in per_doc) / len(per_doc), mean_stderr([d[m] for d in per_doc])) for m in task.metrics}
    return metrics, samples, truncated


def _run_generate(
    model: nn.Module, prompter: Prompter, task: Task, docs: list[Doc], contexts: list, cot: bool, shots: int, seed: int, batch_size: int, bar: Any, engine: Any,
) -> tuple:  # fmt: skip
    from gptlab.config import SampleConfig
    from gptlab.generate import Engine, measured_kernels

    engine = engine or Engine(model, prompter.tokenizer, **measured_kernels(next(model.parameters()).device, batch_size))
    block = model.config.block_size
    if task.max_gen_toks >= block:
        raise InputError(f"{task.source}: generation_kwargs.max_gen_toks ({task.max_gen_toks}) leaves no room for a prompt in the model's context ({block})")
    stops = task.stop_strings
    cfg = SampleConfig(max_new_tokens=task.max_gen_toks, temperature=task.temperature, stop=stops,
                       stop_token_ids=(prompter.chat.end_id,) if prompter.chat is not None else ())  # fmt: skip
    prompts = [prompter.ids(c) for c in contexts]
    # lm-eval's rule: a prompt keeps its last (context - max_gen_toks) tokens, so the answer has room
    room = max(block - task.max_gen_toks, 1)
    truncated = sum(len(p) > room for p in prompts)
    prompts = [p[-room:] for p in prompts]
    outputs = replies = _generate(engine, prompts, cfg, batch_size, bar, seed=2 * seed)
    if cot and not shots:  # Kojima et al.'s second stage: the reasoning, then the answer trigger, then a short answer
        answer_cfg = cfg.replace(max_new_tokens=min(task.max_gen_toks, 16))
        second = [(p + prompter.tokenizer.encode_ordinary(r + " " + task.cot_answer_trigger))[-room:] for p, r in zip(prompts, replies, strict=True)]
        answers = _generate(engine, second, answer_cfg, batch_size, None, seed=2 * seed + 1)
        outputs = [f"{r} {task.cot_answer_trigger}{a}" for r, a in zip(replies, answers, strict=True)]
        extracted = [extract_answer(a, task.answer_regex) for a in answers]
    elif cot:
        extracted = [extract_answer(o, task.cot_regex or task.answer_regex, last=True) for o in outputs]
    else:
        extracted = [extract_answer(o, task.answer_regex) for o in outputs]
    refs = [task.references(d) for d in docs]
    matches = [float(any(normalize(e, task.ignore_case, task.ignore_punctuation) == normalize(r, task.ignore_case, task.ignore_punctuation) for r in rs))
               for e, rs in zip(extracted, refs, strict=True)]  # fmt: skip
    metrics = {}
    if "exact_match" in task.metrics:
        metrics["exact_match"] = (sum(matches) / len(matches), mean_stderr(matches))
    corpus = [m for m in task.metrics if m in ("bleu", "chrf")]
    if corpus:
        metrics.update(corpus_scores([o.strip() for o in outputs], refs, corpus))
    samples = [{"doc": i, "where": d.where, "output": o, "answer": e, "references": rs, "exact_match": m}
               for i, (d, o, e, rs, m) in enumerate(zip(docs, outputs, extracted, refs, matches, strict=True))]  # fmt: skip
    return {m: metrics[m] for m in task.metrics}, samples, truncated


def _generate(engine: Any, prompts: list[list[int]], cfg: Any, batch_size: int, bar: Any, seed: int) -> list[str]:
    """Replies in prompt order, batched by length; a sampled run seeds each request by `seed` and its index,
    so a document's reply does not depend on the batch it ran in."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        cfgs = [cfg.replace(seed=seed * 1_000_003 + i) if cfg.temperature > 0 else cfg for i in rows]
        for i, done in zip(rows, engine.generate([prompts[i] for i in rows], cfgs), strict=True):
            out[i] = done.text
        if bar is not None:
            bar.update(len(rows))
    return out


def _run_rolling(model: nn.Module, tokenizer: AnyTokenizer, task: Task, docs: list[Doc], batch_size: int, progress: bool) -> tuple:
    """lm-eval's loglikelihood_rolling: each document scored whole by rolling windows (`evaluate.rolling_windows`:
    the first token after <|endoftext|>, windows of the full context, each later one moving on by
    `stride` tokens, default the context: no overlap), pooled over documents by words and bytes."""
    from gptlab.evaluate import evaluate_text

    total_nll = words = nbytes = 0.0
    samples = []
    bar = _bar(len(docs), task.name, progress)
    for i, doc in enumerate(docs):
        text = task.text(doc)
        r = evaluate_text(model, tokenizer, text, stride=task.stride, batch_size=batch_size)
        nll = float(r["loss"]) * int(r["tokens"])
        total_nll += nll
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode("utf-8"))
        samples.append({"doc": i, "where": doc.where, "nll": nll, "tokens": r["tokens"], "windows": r["windows"], "stride": r["stride"]})
        bar.update(1)
    bar.close()
    metrics = {
        "word_perplexity": (math.exp(total_nll / words), None),
        "byte_perplexity": (math.exp(total_nll / nbytes), None),
        "bits_per_byte": (total_nll / nbytes / math.log(2), None),
    }
    return {m: metrics[m] for m in task.metrics}, samples, 0


# ----------------------------------------------------------------------------- the report card


def report_card(results: Sequence[TaskResult], title: str = "") -> str:
    """A Markdown table: one row per task and metric."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | metric | value | ± stderr | shots | docs | truncated | seconds | docs/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for name, (value, err) in r.metrics.items():
            pct = name in ("acc", "acc_norm", "acc_bytes", "exact_match")
            shown = f"{100 * value:.1f}%" if pct else f"{value:.4g}"
            stderr = "" if err is None else (f"{100 * err:.1f}" if pct else f"{err:.3g}")
            lines.append(f"| {r.task} | {name} | {shown} | {stderr} | {r.shots} | {r.docs} | {r.truncated} | {r.seconds:.1f} | {r.docs / max(r.seconds, 1e-9):.1f} |")
    return "\n".join(lines) + "\n"
