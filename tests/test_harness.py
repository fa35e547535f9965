"""Log-likelihood requests and multiple-choice metrics against references: lm-eval's pair encoding, each
request's summed log-probability and greedy flag against a plain full forward pass, left truncation, and
acc / acc_norm / acc_bytes worked by hand."""

from __future__ import annotations

import os

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.errors import InputError
from gptlab.evals.harness import choice_loglikelihoods, choice_metrics, encode_pair, loglikelihoods
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=320, block_size=24, n_layer=2, n_head=2, n_embd=32)).eval()


def reference(model: GPT, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """The continuation's summed log-prob and greedy flag from one plain forward over ids[-(block+1):][:-1]."""
    ids = ids[-(model.config.block_size + 1) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].double(), dim=-1)  # (T, V)
    positions = range(len(ids) - 1 - n_cont, len(ids) - 1)
    targets = ids[-n_cont:]
    return sum(logp[p, t].item() for p, t in zip(positions, targets)), all(logp[p].argmax().item() == t for p, t in zip(positions, targets))


def test_pairs_are_encoded_as_lm_eval_encodes_them(tok: Tokenizer) -> None:
    ctx, cont = encode_pair(tok, "Question: the module is ", "json")  # the trailing space moves to the continuation
    assert ctx == tok.encode("Question: the module is") and ctx + cont == tok.encode("Question: the module is json")
    assert tok.decode(cont) == " json"
    ctx, cont = encode_pair(tok, "a list of", " strings")
    assert ctx + cont == tok.encode("a list of strings") and ctx == tok.encode("a list of")


def test_loglikelihoods_equal_a_plain_forward_pass(tok: Tokenizer, model: GPT) -> None:
    requests = [("Return a list of", " the words"), ("The", " module"), ("x" * 3, " y"), ("", "This module provides"),
                ("Return the value of the " * 6, "attribute")]  # fmt: skip
    # a request whose continuation is exactly the model's greedy choice
    for context in ("Return", "The", "This module", "a"):
        ids = tok.encode(context)
        with torch.no_grad():
            best = model(torch.tensor([ids]))[0][0, -1].argmax().item()
        if best < tok.vocab_size and encode_pair(tok, context, tok.decode([best]))[1] == [best]:
            requests.append((context, tok.decode([best])))
            break
    results = loglikelihoods(model, tok, requests, batch_size=3)
    assert len(results) == len(requests)
    for (context, continuation), got in zip(requests, results, strict=True):
        ctx, cont = encode_pair(tok, context, continuation)
        ids = (ctx or [tok.eot_id]) + cont
        want, greedy = reference(model, ids, len(cont))
        assert got.logprob == pytest.approx(want, abs=1e-4) and got.greedy == greedy, (context, continuation)
        assert got.truncated == (len(ids) > model.config.block_size + 1)
    assert results[4].truncated and not results[0].truncated
    assert results[-1].greedy and len(requests) == 6  # the greedy request was found and flagged
    with pytest.raises(InputError, match="encodes to no tokens"):
        loglikelihoods(model, tok, [("a", "")])


def test_choice_metrics_by_hand() -> None:
    # the summed log-likelihood picks " a"; per character " bbbbbbb" (-4 / 8 = -0.5 against -3 / 2 = -1.5)
    assert choice_metrics([-3.0, -4.0], [" a", " bbbbbbb"], gold=1) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    # " é" is 2 characters but 3 bytes: -1.9 / 2 = -0.95 loses to -1.3 / 2 = -0.65, -1.9 / 3 = -0.633 wins
    assert choice_metrics([-1.9, -1.3], [" é", " e"], gold=0) == {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 1.0}
    assert choice_metrics([-1.0, -1.0, -2.0], [" x", " y", " z"], gold=0)["acc"] == 1.0  # a tie goes to the first
    assert choice_metrics([-1.0, -1.0, -2.0], [" x", " y", " z"], gold=1)["acc"] == 0.0
    with pytest.raises(InputError, match="gold index 3 is out of range for 2 choices"):
        choice_metrics([-1.0, -2.0], [" a", " b"], gold=3)


def test_choices_scored_on_one_shared_context_equal_each_request_alone(tok, model):
    # one row per document (context once, each choice a branch) against the plain forward of each request;
    # includes an empty context, one-token choices, a choice that is a prefix of another, and a document
    # long enough to be truncated (which goes request by request)
    docs = [
        ("The quick brown fox", [" jumps", " jumped over", " j", " sleeps all day"]),
        ("", ["Hello there", "Bye"]),
        ("def f(x): return", [" x", " x + 1", " None"]),
        ("word " * 30, [" a", " longer choice here"]),
    ]
    encoded = [(encode_pair(tok, c, conts[0])[0], [encode_pair(tok, c, k)[1] for k in conts]) for c, conts in docs]
    got = choice_loglikelihoods(model, tok, encoded, batch_size=3)
    for (ctx, conts), results in zip(encoded, got):
        for cont, r in zip(conts, results):
            ids = ([tok.eot_id] if not ctx else []) + ctx + cont
            lp, greedy = reference(model, ids, len(cont))
            assert r.logprob == pytest.approx(lp, abs=1e-4) and r.greedy == greedy
            assert r.truncated == (len(ids) > model.config.block_size + 1)
    assert [r.truncated for r in got[3]] == [True, True]


def test_a_prefix_every_context_shares_is_run_once_and_changes_nothing(tok, model, monkeypatch):
    # few-shot contexts with the same exemplars: the shared tokens go through a KV cache once; rows continue it.
    # One document's choices make its row longer than the context, so its batch runs whole rows instead.
    from gptlab.model import GPT

    calls = []
    real = GPT.forward_cached
    monkeypatch.setattr(GPT, "forward_cached", lambda self, idx, step, *a, **k: calls.append(tuple(idx.shape)) or real(self, idx, step, *a, **k))
    shared = "Q: one\nA: two\n\nQ:"
    docs = [(shared + q, conts) for q, conts in [(" three", [" four", " six"]), (" seven", [" eight"]), (" nine ten", [" x", " y z", " w"]),
                                                  (" a", [" ab cd", " ef gh", " ij kl"])]]  # fmt: skip
    encoded = [(encode_pair(tok, c, conts[0])[0], [encode_pair(tok, c, k)[1] for k in conts]) for c, conts in docs]
    n_shared = len(os.path.commonprefix([ctx for ctx, _ in encoded]))
    ctx, conts = encoded[3]
    assert n_shared >= 4 and len(ctx) + sum(len(c) - 1 for c in conts) > model.config.block_size >= len(ctx) + max(map(len, conts)) - 1
    got = choice_loglikelihoods(model, tok, encoded, batch_size=2)
    assert calls[0] == (1, n_shared) and len(calls) == 2  # the prefix once; the batch of long rows ran whole
    for (ctx, conts), results in zip(encoded, got):
        for cont, r in zip(conts, results):
            lp, greedy = reference(model, ctx + cont, len(cont))
            assert r.logprob == pytest.approx(lp, abs=1e-4) and r.greedy == greedy and not r.truncated, (len(ctx), len(cont))
