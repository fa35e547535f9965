import math

import pytest
import torch

from gptlab.config import GPTConfig, SampleConfig
from gptlab.errors import ConfigError, InputError
from gptlab.generate import generate, sample_next, top_k_filter, top_p_filter
from gptlab.model import GPT

NEG = float("-inf")


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[NEG, 4.0, NEG, 3.0]]))
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.8) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept(0.81) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # the top token always survives


def test_sampling_matches_the_hand_computed_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0])
    cfg = SampleConfig(temperature=0.5, top_k=3, top_p=0.95)
    # by hand: T=0.5 -> logits*2; top-3 keeps ids 1,2,3 with weights e^2, e^4, e^6;
    # their probabilities are 0.0159, 0.1173, 0.8668; top-p 0.95 keeps the smallest set reaching
    # 0.95, ids 3 and 2 (0.984), and renormalises them
    w = torch.tensor([0.0, 0.0, math.e**4, math.e**6, 0.0])
    expected = w / w.sum()
    g = torch.Generator().manual_seed(0)
    n = 40_000
    draws = sample_next(logits.expand(n, -1), cfg, g)
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[0] == 0 and freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, expected.double(), atol=0.01)


def test_greedy_is_argmax_and_temperature_zero():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next(logits, SampleConfig(temperature=0)).tolist() == [1, 0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=2, n_embd=32)).eval()


def test_greedy_generation_equals_step_by_step_argmax(model):
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, SampleConfig(max_new_tokens=40, temperature=0))
    ref = prompt
    with torch.no_grad():
        for _ in range(40):  # past block_size the context slides
            logits, _ = model(ref[:, -24:])
            ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_seeded_sampling_repeats_and_seeds_differ(model):
    prompt = torch.tensor([[1, 2, 3]])
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0, top_k=50, seed=123)
    a, b = generate(model, prompt, cfg), generate(model, prompt, cfg)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, prompt, cfg.replace(seed=124)))


def test_stop_token_ends_generation(model):
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(model, prompt, SampleConfig(max_new_tokens=10, temperature=0))
    stop = int(greedy[0, 5])
    out = generate(model, prompt, SampleConfig(max_new_tokens=10, temperature=0), stop_id=stop)
    assert out[0, -1] == stop and out.size(1) == 3 + (greedy[0, 3:] == stop).nonzero()[0].item() + 1


def test_bad_prompts_and_configs(model):
    with pytest.raises(InputError, match="block_size"):
        generate(model, torch.zeros(1, 25, dtype=torch.long), SampleConfig(max_new_tokens=1))
    with pytest.raises(InputError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), SampleConfig(max_new_tokens=1))
    with pytest.raises(ConfigError, match="top_p"):
        SampleConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SampleConfig(temperature=-1.0)


def test_padded_vocabulary_rows_are_never_sampled(model):
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(model, prompt, SampleConfig(max_new_tokens=200, temperature=5.0, seed=0), vocab_size=10)
    assert int(out[0, 3:].max()) < 10
