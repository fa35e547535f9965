"""The chat template: a conversation as token ids, with the loss mask built while rendering.

gptlab uses ChatML (the format of OpenAI's chat models, Qwen and SmolLM), where every
message is

    <|im_start|>{role}\\n{content}<|im_end|>\\n

with `<|im_start|>` and `<|im_end|>` special tokens. A model is fine-tuned to predict
the assistant's content and the `<|im_end|>` that closes it, and nothing else: the
system and user text, the role headers and the newlines are context. Building that
mask while the ids are rendered (rather than searching the rendered ids for markers
afterwards, as TRL's assistant-only loss does through `{% generation %}` blocks) means a
template can never silently train on nothing.

Each piece is tokenized on its own: the header "assistant\\n", the content, the "\\n"
after `<|im_end|>`. So the ids of a conversation rendered for generation (ending in
the open header `<|im_start|>assistant\\n`) are exactly the first ids of the same
conversation rendered with the reply, and the reply's tokens never merge with the
header's. Hugging Face's `apply_chat_template` tokenizes the rendered string between
special tokens in one go; the ids agree with gptlab's except where a message's content
begins with two or more whitespace characters (GPT-2's pre-tokenizer then joins the
header's newline with them). Content is encoded as ordinary text: a user who types
"<|im_start|>" gets those characters, not a turn boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gptlab.errors import InputError
from gptlab.tokenizer import AnyTokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")

# The same template for Hugging Face's apply_chat_template (Jinja). The {% generation %} block
# marks what gptlab trains on, so return_assistant_tokens_mask=True gives gptlab's mask too.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Rendered:
    """Token ids of a conversation and, for each, whether it is a training target."""

    ids: list[int]
    mask: list[bool]  # mask[i]: the model learns to predict ids[i] from ids[:i]

    @property
    def n_targets(self) -> int:
        return sum(self.mask)


def check_messages(messages: Any, where: str = "conversation") -> list[dict[str, str]]:
    """The messages as a list of {"role", "content"} dicts, or an InputError naming what is wrong (prefixed by `where`)."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"{where}: message {k} must be an object with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: message {k} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: message {k} ({role}) needs 'content' as a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def as_prompt(value: Any, where: str) -> list[dict[str, str]]:
    """A prompt given as a string (one user message) or as messages, which must not end with the assistant's turn."""
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else check_messages(value, f"{where}: 'prompt'")
    if messages[-1]["role"] == "assistant":
        raise InputError(f"{where}: the prompt must end with a user (or system) message, not the assistant's")
    return messages


class ChatTemplate:
    """Renders conversations for a tokenizer that has the chat special tokens (see `add_chat_tokens`)."""

    def __init__(self, tokenizer: AnyTokenizer) -> None:
        specials = tokenizer.special_tokens
        missing = [t for t in CHAT_TOKENS if t not in specials]
        if missing:
            raise InputError(f"tokenizer {tokenizer.name!r} lacks the chat token(s) {', '.join(missing)}; this model was not fine-tuned for chat")
        self.tokenizer = tokenizer
        self.start_id = specials[IM_START]
        self.end_id = specials[IM_END]
        self._newline = tokenizer.encode_ordinary("\n")
        self._headers = {role: tokenizer.encode_ordinary(f"{role}\n") for role in ROLES}

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> Rendered:
        """Ids and loss mask of `messages`; with add_generation_prompt, followed by an open assistant turn."""
        ids: list[int] = []
        mask: list[bool] = []

        def put(piece: list[int], target: bool) -> None:
            ids.extend(piece)
            mask.extend([target] * len(piece))

        for message in messages:
            trained = message["role"] == "assistant"
            put([self.start_id, *self._headers[message["role"]]], False)
            put([*self.tokenizer.encode_ordinary(message["content"]), self.end_id], trained)
            put(self._newline, False)
        if add_generation_prompt:
            put([self.start_id, *self._headers["assistant"]], False)
        return Rendered(ids, mask)

    def generation_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The ids a model continues to write the next assistant message; it stops at `end_id`."""
        return self.render(messages, add_generation_prompt=True).ids


def add_chat_tokens(tokenizer: AnyTokenizer) -> tuple[AnyTokenizer, dict[str, int]]:
    """The tokenizer with <|im_start|> and <|im_end|> (given the next free ids when missing), and {text: id} of those added."""
    return tokenizer.with_special_tokens(CHAT_TOKENS)


def fit_history(template: ChatTemplate, messages: list[dict[str, str]], room: int) -> list[dict[str, str]]:
    """The most recent turns of `messages` whose generation prompt takes at most `room` tokens.

    Oldest exchanges go first; a leading system message and the last user message stay.
    An InputError when even those do not fit.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while len(template.generation_prompt(system + turns)) > room:
        if len(turns) <= 1:
            raise InputError(f"the message needs {len(template.generation_prompt(system + turns))} tokens with its template; the model has room for {room}")
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # an exchange starts at a user message
            turns = turns[1:]
    return system + turns


def reply_all(engine: Any, template: ChatTemplate, conversations: Sequence[Sequence[Mapping[str, str]]], cfg: Any, batch_size: int = 64) -> list[str]:
    """The next assistant message of each conversation, generated by `engine` (a gptlab.generate.Engine) in batches.

    `cfg` (a SampleConfig) applies to every reply; each stops at <|im_end|>.
    """
    cfg = cfg.replace(stop_token_ids=(*cfg.stop_token_ids, template.end_id))
    prompts = [template.generation_prompt(c) for c in conversations]
    replies: list[str] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        replies += [done.text for done in engine.generate(chunk, [cfg] * len(chunk))]
    return replies
