"""The chat template: ids and loss mask by hand, generation prompt = training prefix, special tokens
and token-table growth, and the exported template against transformers' apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.chat import (
    CHAT_TOKENS,
    HF_CHAT_TEMPLATE,
    IM_END,
    IM_START,
    ChatTemplate,
    add_chat_tokens,
    check_messages,
)
from gptlab.checkpoint import save_checkpoint
from gptlab.config import GPTConfig
from gptlab.errors import InputError
from gptlab.model import GPT, with_new_tokens
from gptlab.tokenizer import Tokenizer, WrappedTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a module for JSON."},
        {"role": "assistant", "content": "json, in the standard library.\nIt has dumps and loads."},
        {"role": "user", "content": "And for paths?"},
        {"role": "assistant", "content": "pathlib"},
    ],
    [{"role": "user", "content": "Say <|im_start|> literally"}, {"role": "assistant", "content": "ünïcödé ✓ 😀 tabs\tand  spaces "}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def chat_tok() -> Tokenizer:
    tok, added = add_chat_tokens(Tokenizer.gpt2())
    assert added == {IM_START: 50257, IM_END: 50258}
    return tok


def test_render_by_hand(chat_tok: Tokenizer) -> None:
    t = ChatTemplate(chat_tok)
    r = t.render(CONVERSATIONS[0])
    enc = chat_tok.encode_ordinary
    s, e = chat_tok.special_tokens[IM_START], chat_tok.special_tokens[IM_END]
    expected = [s, *enc("user\n"), *enc("What is 2 + 2?"), e, *enc("\n"), s, *enc("assistant\n"), *enc("4"), e, *enc("\n")]
    assert r.ids == expected
    # only the reply and its <|im_end|> are targets
    trained = [i for i, m in zip(r.ids, r.mask) if m]
    assert trained == [*enc("4"), e] and r.n_targets == 2
    assert chat_tok.decode(r.ids) == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_generation_prompt_is_the_prefix_of_the_training_render(chat_tok: Tokenizer, conv: list[dict]) -> None:
    t = ChatTemplate(chat_tok)
    for k, message in enumerate(conv):
        if message["role"] != "assistant":
            continue
        prompt = t.generation_prompt(conv[:k])
        full = t.render(conv[: k + 1])
        reply = [*chat_tok.encode_ordinary(message["content"]), t.end_id]
        assert full.ids[: len(prompt)] == prompt
        assert full.ids[len(prompt) : len(prompt) + len(reply)] == reply
        assert full.mask[len(prompt) : len(prompt) + len(reply)] == [True] * len(reply)


def test_content_that_looks_like_a_special_token_stays_text(chat_tok: Tokenizer) -> None:
    r = ChatTemplate(chat_tok).render(CONVERSATIONS[2])
    assert r.ids.count(chat_tok.special_tokens[IM_START]) == 2  # the two turn starts, not the user's text


def test_tokenizer_without_chat_tokens_is_named() -> None:
    with pytest.raises(InputError, match=r"lacks the chat token\(s\) <\|im_start\|>, <\|im_end\|>"):
        ChatTemplate(Tokenizer.gpt2())


@pytest.mark.parametrize(
    "messages, named",
    [
        ([], "non-empty list"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "user", "content": 3}], "needs 'content' as a string"),
        (["hi"], "must be an object"),
    ],
)
def test_bad_messages_are_named(messages, named: str) -> None:
    with pytest.raises(InputError, match=named):
        check_messages(messages, "f.jsonl:3")


def test_adding_special_tokens_to_both_tokenizer_kinds(tmp_path: Path, chat_tok: Tokenizer) -> None:
    again, added = chat_tok.with_special_tokens(CHAT_TOKENS)
    assert again is chat_tok and added == {}
    Tokenizer.gpt2().to_hf_files(tmp_path, 1024)
    wrapped = WrappedTokenizer(json.loads((tmp_path / "tokenizer.json").read_text()), "wrapped")
    grown, added = add_chat_tokens(wrapped)
    assert added == {IM_START: 50257, IM_END: 50258} and grown.vocab_size == 50259
    assert grown.encode("<|im_start|>user\nhi<|im_end|>") == chat_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert grown.encode_ordinary("<|im_end|>") == chat_tok.encode_ordinary("<|im_end|>")


@pytest.mark.parametrize("tie", [True, False])
def test_new_token_rows_start_at_the_mean_and_the_table_grows_when_needed(tie: bool) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_weights=tie))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same = with_new_tokens(model, [60, 61], known=60)  # fits the padding rows: changed in place
    assert same is model and same.config.vocab_size == 64
    assert torch.equal(model.transformer.wte.weight[60], before["transformer.wte.weight"][:60].mean(0))
    grown = with_new_tokens(model, [64, 65], known=62)
    assert grown.config.vocab_size == 128
    wte = grown.transformer.wte.weight
    assert torch.equal(wte[:64], model.transformer.wte.weight) and torch.allclose(wte[64], model.transformer.wte.weight[:62].mean(0))
    if tie:
        assert grown.lm_head.weight is grown.transformer.wte.weight
    else:
        assert torch.allclose(grown.lm_head.weight[65], model.lm_head.weight[:62].mean(0))
    x = torch.randint(0, 64, (2, 8))
    assert torch.allclose(grown(x)[0][..., :64], model(x)[0], atol=1e-6)  # old tokens' logits unchanged
    with pytest.raises(InputError, match="must come after"):
        with_new_tokens(model, [3], known=60)


def test_exported_chat_template_gives_gptlab_ids_and_mask_in_transformers(tmp_path: Path, chat_tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    from gptlab.hf import export_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=64, n_layer=1, n_head=2, n_embd=16))
    ckpt = save_checkpoint(tmp_path / "run", 0, model, model.config, chat_tok)
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == HF_CHAT_TEMPLATE
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [50258, 50256]
    hf = transformers.AutoTokenizer.from_pretrained(out)
    t = ChatTemplate(chat_tok)
    for conv in CONVERSATIONS:
        got = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        r = t.render(conv)
        if conv is CONVERSATIONS[2]:
            # HF turns the user's "<|im_start|>" text into the special token; gptlab keeps it as text (see gptlab.chat)
            assert got["input_ids"] != r.ids
            continue
        assert got["input_ids"] == r.ids
        assert [bool(m) for m in got["assistant_masks"]] == r.mask
        prompt = hf.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt == t.generation_prompt(conv[:-1])
