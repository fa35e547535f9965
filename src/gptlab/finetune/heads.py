"""Task heads: GPT-1's supervised fine-tuning (Radford et al. 2018, "Improving Language
Understanding by Generative Pre-Training", section 3.2, 3.3 and figure 1).

A pretrained GPT is fine-tuned on a labelled task by adding one Linear layer W_y, with no
bias, that reads the final hidden state h_l^m at the last input token:
P(y | x) = softmax(h_l^m W_y) (eq. 3). The paper keeps language modelling as an auxiliary
objective on the same inputs, L3 = L2 + lambda * L1 (eq. 5, lambda = 0.5), which improved
generalisation and sped up convergence (section 3.2), on the larger datasets most (section 5,
table 5).

Structured inputs become token sequences with three added special tokens (section 3.3):
a start token, a delimiter between the parts and an extract token whose hidden state the
head reads. Every task here is one of the paper's four shapes (figure 1, right):

    classify   {"text": str, "label": str | int}
               [start] text [extract]
    entail     {"premise": str, "hypothesis": str, "label": str | int}
               [start] premise [delim] hypothesis [extract]
    similar    {"text_a": str, "text_b": str, "label": str | int}
               [start] a [delim] b [extract]  and  [start] b [delim] a [extract]: the pair has no
               natural order, so both orderings run and their final hidden states are "added
               element-wise before being fed into the linear output layer"
    choice     {"context": str, "choices": [str, ...], "label": index of the right choice}
               [start] context [delim] choice_k [extract] for each k; each gives a scalar score
               through a head with one output, and a softmax over the choices

Labels (classify, entail, similar) are the sorted distinct label values of the training files,
class i the i-th; checkpoints keep them, so predictions print their names. Parts too long for
the context lose their last tokens, the longest part first.

Design: `TaskModel` is a GPT with the head added (`head`, a bias-free Linear, and dropout
before it as in the paper, section 4.1), a subclass rather than a module holding a GPT: the
paper's fine-tuned model is still a language model (L1 stays in the loss), and as a GPT it
takes the training loop, DDP, sampling and evaluation unchanged. Its state dict is the GPT's
plus `head.weight`, so a checkpoint's model.safetensors holds both, and checkpoint.json's
"task_head" entry (task, labels, head dropout) tells `load_checkpoint` to build a TaskModel
to load it into, which also makes a resumed run's model and optimizer state match. The run's
data settings are in its "task" entry, from which `--resume` rebuilds the objective. FSDP is
refused: its checkpoints reassemble a plain GPT (distributed.full_state), without the head.

Hugging Face export (`export_task_hf`). HF's GPT2ForSequenceClassification (and GPT-1's
OpenAIGPTForSequenceClassification) apply a bias-free Linear `score` to every position and
keep the logits of the rightmost token that is not `pad_token_id`. The head here has no bias
and the extract token always ends the input, so with pad_token_id set to the delimiter (which
never ends an input) HF computes the same logits for classify and entail, padded batches too.
For similar, the head being linear and bias-free, W (h_ab + h_ba) = W h_ab + W h_ba: the same
class gives each ordering's logits and their sum is this model's (the config's "gptlab_task"
entry says so). For choice, GPT2DoubleHeadsModel (OpenAIGPTDoubleHeadsModel, the paper's own
model, for post-LN) scores the hidden state at `mc_token_ids` (the extract positions) with a
Linear to one output whose bias is exported as zero, and keeps the language-model head.

Reward models (gptlab.align.reward) are TaskModels too, with a "reward" head: one output read
at the last token of a ChatML conversation (which is always the "\n" after <|im_end|>), no task
tokens. They export as GPT2ForSequenceClassification with num_labels 1 (TRL's reward-model
format) and pad_token_id <|im_start|>, which never ends a rendered conversation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.checkpoint import HEAD_KEY
from gptlab.config import GPTConfig, TrainConfig, _in_range, _Serializable
from gptlab.errors import CheckpointError, ConfigError, DataError, GptlabError, InputError
from gptlab.model import GPT, IGNORE_INDEX, branched_positions_and_mask, cross_entropy, fixed_buffers
from gptlab.tokenizer import AnyTokenizer

TASKS = ("classify", "entail", "similar", "choice")
HEAD_TASKS = (*TASKS, "reward")  # "reward": a reward model's scalar head (gptlab.align.reward), not a finetune-cls task
# the JSONL keys of each task's rows (besides "label")
FIELDS = {"classify": ("text",), "entail": ("premise", "hypothesis"), "similar": ("text_a", "text_b"), "choice": ("context", "choices")}
START, DELIM, EXTRACT = "<|task_start|>", "<|task_delim|>", "<|task_extract|>"  # named apart from any chat format's <|start|>
TASK_TOKENS = (START, DELIM, EXTRACT)
RUN_KEY = "task"  # checkpoint.json entry with the run's TaskConfig (what --resume rebuilds the data from)
HEAD_PREFIX = "head."

Label = str | int


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class HeadSpec(_Serializable):
    """What a TaskModel's head is: the task, its class labels (None for choice) and the dropout before the head."""

    task: str
    labels: tuple[Label, ...] | None = None
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.task not in HEAD_TASKS:
            raise ConfigError(f"task must be one of {', '.join(HEAD_TASKS)}; got {self.task!r}")
        _in_range(self, "dropout", 0.0, 1.0, hi_open=True)
        if self.task in ("choice", "reward"):  # one score per sequence
            if self.labels is not None:
                raise ConfigError(f"a {self.task} head scores each sequence and has no label names, got labels {self.labels!r}")
            return
        if not isinstance(self.labels, (list, tuple)) or len(self.labels) < 2:
            raise ConfigError(f"a {self.task} head needs at least two labels, got {self.labels!r}")
        object.__setattr__(self, "labels", tuple(self.labels))
        if not all(_is_label(v) for v in self.labels) or len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels must be distinct strings or integers, got {self.labels!r}")

    @property
    def n_outputs(self) -> int:
        """The head's width: one logit per class, or one score (per choice, or the reward)."""
        return 1 if self.labels is None else len(self.labels)

    def names(self, n_choices: int = 0) -> list[str]:
        """Printable class names (for choice, the indices of `n_choices` choices)."""
        return [str(v) for v in self.labels] if self.labels is not None else [str(i) for i in range(n_choices)]


@dataclass(frozen=True)
class TaskConfig(_Serializable):
    """What `gptlab finetune-cls` trains on; saved in checkpoint.json so `--resume` rebuilds the same batches."""

    task: str = "classify"
    data: tuple[str, ...] = ()  # JSONL files
    val_data: tuple[str, ...] = ()  # held-out files; default: val_fraction of data
    val_fraction: float = 0.1
    lm_weight: float = 0.5  # lambda of L3 = L2 + lambda * L1 (Radford et al. 2018, eq. 5)
    epochs: float = 3.0
    head_dropout: float = 0.1  # the paper's dropout on the classifier (section 4.1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "val_data", tuple(self.val_data))
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if not self.data or not all(isinstance(d, str) and d for d in self.data):
            raise ConfigError(f"data must name at least one JSONL file, got {self.data!r}")
        _in_range(self, "val_fraction", 0.0, 0.5)
        _in_range(self, "lm_weight", 0.0, 100.0)
        _in_range(self, "epochs", 0.0, 1e6)
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs!r}")
        _in_range(self, "head_dropout", 0.0, 1.0, hi_open=True)


def _is_label(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Example:
    """One row: its texts in the task's field order (for choice: the context, then each choice), and its label."""

    texts: tuple[str, ...]
    label: Label | None
    where: str  # "file:line", for errors


def _row_example(task: str, row: dict[str, Any], where: str, need_label: bool) -> Example:
    keys = FIELDS[task]
    missing = [k for k in (*keys, "label") if k not in row and (k != "label" or need_label)]
    if missing:
        wanted, lacks = (", ".join(repr(k) for k in names) for names in ((*keys, "label"), missing))
        raise DataError(f"{where}: a {task} row needs {wanted}; this one lacks {lacks} (keys: {', '.join(sorted(row)) or 'none'})")
    if task == "choice":
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least two strings, got {json.dumps(choices)[:80]}")
        texts: tuple[Any, ...] = (row["context"], *choices)
    else:
        texts = tuple(row[k] for k in keys)
    for key, value in zip(keys, texts):
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    label = row.get("label")
    if label is not None or need_label:
        if task == "choice":
            if not (isinstance(label, int) and not isinstance(label, bool)) or not 0 <= label < len(texts) - 1:
                raise DataError(f"{where}: a choice row's 'label' must be the index of the right choice, 0..{len(texts) - 2}; got {label!r}")
        elif not _is_label(label):
            raise DataError(f"{where}: 'label' must be a string or an integer, got {json.dumps(label)[:80]}")
    return Example(texts, label, where)


def read_examples(path: str | Path, task: str, need_label: bool = True) -> list[Example]:
    """The rows of a JSONL file as examples of `task`; errors name file:line. Extra keys (an id, say) are ignored."""
    from gptlab.fileio import jsonl_objects

    return [_row_example(task, row, where, need_label) for where, row in jsonl_objects(path)]


def label_set(examples: Sequence[Example]) -> tuple[Label, ...]:
    """The sorted distinct labels of training examples (strings or integers, not both)."""
    first = examples[0]
    for ex in examples:
        if isinstance(ex.label, str) != isinstance(first.label, str):
            raise DataError(f"{ex.where}: label {ex.label!r} is a {type(ex.label).__name__}, but {first.where} has {first.label!r}; use one kind")
    labels = tuple(sorted({ex.label for ex in examples}))  # type: ignore[type-var]
    if len(labels) < 2:
        raise DataError(f"{first.where.rsplit(':', 1)[0]}: every row has the label {first.label!r}; a classifier needs at least two")
    return labels


# ----------------------------------------------------------------------------- input transformations


@dataclass(frozen=True)
class TaskTokens:
    """The ids of the three special tokens in a tokenizer that has them."""

    start: int
    delim: int
    extract: int

    @classmethod
    def of(cls, tokenizer: AnyTokenizer) -> TaskTokens:
        special = tokenizer.special_tokens
        missing = [t for t in TASK_TOKENS if t not in special]
        if missing:
            raise CheckpointError(f"the tokenizer lacks the task tokens {', '.join(missing)}; it is not a task-head run's")
        return cls(special[START], special[DELIM], special[EXTRACT])


def _fit(lengths: list[int], room: int) -> list[int]:
    """How many tokens each part keeps so that they sum to at most `room`: the longest parts are cut first."""
    if sum(lengths) <= room:
        return lengths
    lo, hi = 0, max(lengths)  # the largest cap c with sum(min(l, c)) <= room
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(n, mid) for n in lengths) <= room else (lo, mid - 1)
    kept = [min(n, lo) for n in lengths]
    spare = room - sum(kept)
    for i, n in enumerate(lengths):  # what the cap leaves over goes a token each to the cut parts, in order
        if spare and n > lo:
            kept[i] += 1
            spare -= 1
    return kept


def task_sequences(task: str, parts: Sequence[list[int]], tokens: TaskTokens, max_len: int) -> tuple[list[list[int]], bool]:
    """The token sequences of one example (figure 1): from the encoded texts in field order, and whether a part was cut.

    Each sequence is [start] part [delim] part ... [extract], at most max_len tokens.
    """
    if task == "choice":
        groups = [[parts[0], choice] for choice in parts[1:]]
    elif task == "similar":
        groups = [[parts[0], parts[1]], [parts[1], parts[0]]]
    else:
        groups = [list(parts)]
    sequences, cut = [], False
    for group in groups:
        room = max_len - len(group) - 1  # start, extract and a delimiter between each two parts
        if room < 0:
            raise ConfigError(f"a context of {max_len} tokens cannot hold the {len(group) + 1} special tokens of a {task} input")
        kept = _fit([len(p) for p in group], room)
        cut |= kept != [len(p) for p in group]
        ids = [tokens.start]
        for k, (part, n) in enumerate(zip(group, kept)):
            ids += ([tokens.delim] if k else []) + part[:n]
        sequences.append(ids + [tokens.extract])
    return sequences, cut


@dataclass
class EncodedSet:
    """Examples as their token sequences (one, two for similar, one per choice) and class indices (-100: none)."""

    examples: list[list[np.ndarray]]
    labels: list[int]
    sources: list[str]
    truncated: int = 0

    @property
    def positions(self) -> int:
        return sum(len(ids) for seqs in self.examples for ids in seqs)


def encode_examples(
    examples: Sequence[Example], task: str, tokenizer: AnyTokenizer, labels: tuple[Label, ...] | None, max_len: int
) -> EncodedSet:
    """Token sequences and class indices of examples; a label the model does not know is a DataError naming its row."""
    tokens = TaskTokens.of(tokenizer)
    index = {v: i for i, v in enumerate(labels)} if labels is not None else None
    out = EncodedSet([], [], [])
    for ex in examples:
        # user text is encoded as text: a "<|endoftext|>" written in it is not the special token
        parts = [tokenizer.encode_ordinary(t) for t in ex.texts]
        sequences, cut = task_sequences(task, parts, tokens, max_len)
        out.truncated += cut
        out.examples.append([np.asarray(s, dtype=np.int64) for s in sequences])
        out.sources.append(ex.where)
        if ex.label is None:
            out.labels.append(IGNORE_INDEX)
        elif index is None:
            out.labels.append(int(ex.label))  # a choice's label is its index
        elif ex.label in index:  # bools and floats never get here, so 1 cannot stand for True or 1.0
            out.labels.append(index[ex.label])
        else:
            known = ", ".join(repr(v) for v in labels[:10]) + (", ..." if len(labels) > 10 else "")  # type: ignore[index]
            raise DataError(f"{ex.where}: label {ex.label!r} does not occur in the training data (labels: {known})")
    return out


def collate(groups: Sequence[list[np.ndarray]], labels: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, y, extract, labels) for a batch of examples, right-padded.

    x (B, S, T) ids, y (B, S, T) next-token targets (-100 past each sequence's last token),
    extract (B, S) the extract token's position in each sequence (-1 where an example has
    fewer sequences than S: fewer choices), labels (B,) class indices (-100: not scored).
    """
    B = len(groups)
    S = max(len(g) for g in groups)
    T = max(len(ids) for g in groups for ids in g)
    x = torch.zeros(B, S, T, dtype=torch.long)
    y = torch.full((B, S, T), IGNORE_INDEX, dtype=torch.long)
    extract = torch.full((B, S), -1, dtype=torch.long)
    for b, group in enumerate(groups):
        for s, ids in enumerate(group):
            n = len(ids)
            x[b, s, :n] = torch.from_numpy(ids)
            y[b, s, : n - 1] = torch.from_numpy(ids[1:])
            extract[b, s] = n - 1
    return x, y, extract, torch.tensor(list(labels), dtype=torch.long)


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) keyed by (seed, epoch); numpy's PCG64 streams are fixed across platforms and versions."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class ExampleBatches:
    """An endless stream of collated batches, resumable from (epoch, position).

    Epoch e visits the examples in the permutation keyed by (seed, e). batch_size is the
    global batch: every process walks the same sequence and takes its slice of each batch.
    With `exact` (held-out data) an epoch ends with its last batch filled by rows that are
    not scored, instead of running into the next epoch, so ceil(n / batch_size) batches
    score every example exactly once.
    """

    def __init__(self, data: EncodedSet, task: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, exact: bool = False) -> None:
        if batch_size % world_size:
            raise ConfigError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        n = len(data.examples)
        self.epoch_len = -(-n // batch_size) * batch_size if exact else n
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        # a filler row has the task's sequence count, one token each, and no label
        self.filler = [np.zeros(1, dtype=np.int64)] * (2 if task == "similar" else 1)
        self.epoch, self.row = 0, 0
        self._order: np.ndarray | None = None

    def next_batch(self) -> tuple[Tensor, ...]:
        picked: list[int | None] = []
        for _ in range(self.batch_size):
            if self._order is None:
                self._order = _order(len(self.data.examples), self.seed, self.epoch)
            picked.append(int(self._order[self.row]) if self.row < len(self._order) else None)
            self.row += 1
            if self.row == self.epoch_len:
                self.epoch, self.row, self._order = self.epoch + 1, 0, None
        mine = picked[self.local]
        groups = [self.data.examples[i] if i is not None else self.filler for i in mine]
        return collate(groups, [self.data.labels[i] if i is not None else IGNORE_INDEX for i in mine])

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.row, self._order = int(state["epoch"]), int(state["row"]), None


# ----------------------------------------------------------------------------- the model


class TaskModel(GPT):
    """A GPT with a task head: a bias-free Linear on the final hidden state at each extract token.

    `forward(idx, targets, segments)` is the GPT's language model (sampling, evaluation).
    `forward(idx, targets, extract=extract)` with idx (B, S, T) is the task: it returns the
    head's logits, (B, n_labels), (B, S) scores over choices or (B,) rewards, and the language-model loss
    on the same tokens when targets are given. `forward(idx, segments=, branches=, extract=)` with
    idx (B, T) scores several replies after one shared prompt in a row (a reward head only: see
    _branched_rewards). The task goes through forward so that DDP and torch.compile see it.
    """

    def __init__(self, config: GPTConfig, spec: HeadSpec) -> None:
        super().__init__(config)
        self.spec = spec
        self.head_drop = nn.Dropout(spec.dropout)
        self.head = nn.Linear(config.n_embd, spec.n_outputs, bias=False)  # W_y of eq. 3; without a bias, as HF's `score` too
        nn.init.normal_(self.head.weight, mean=0.0, std=config.init_std)

    @classmethod
    def from_gpt(cls, gpt: GPT, spec: HeadSpec, seed: int) -> TaskModel:
        """`gpt`'s parameters (shared, not copied) with a new head drawn from a generator seeded by `seed`."""
        with torch.device("meta"):  # no random initialisation of weights that are replaced next
            model = cls(gpt.config, spec)
        state = {k: v for k, v in gpt.state_dict(keep_vars=True).items() if not k.startswith(HEAD_PREFIX)}  # a TaskModel base drops its head
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # the Parameters themselves: a tied head stays tied
        assert not unexpected and missing == [HEAD_PREFIX + "weight"], (missing, unexpected)
        for name in fixed_buffers(gpt.config):  # non-persistent buffers, so not in the state dict: gpt's own
            setattr(model, name, getattr(gpt, name))
        device = gpt.transformer.wte.weight.device
        model.head = nn.Linear(gpt.config.n_embd, spec.n_outputs, bias=False, device=device)
        nn.init.normal_(model.head.weight, mean=0.0, std=gpt.config.init_std, generator=torch.Generator(device).manual_seed(seed))
        model.train(gpt.training)
        return model

    def forward(  # type: ignore[override]
        self, idx: Tensor, targets: Tensor | None = None, segments: Tensor | None = None, logits_at: Tensor | None = None,
        extract: Tensor | None = None, branches: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        if branches is not None:
            return self._branched_rewards(idx, segments, branches, extract), None
        if extract is None:
            return super().forward(idx, targets, segments, logits_at)
        if segments is not None:
            raise InputError("task inputs are one sequence per row: pass segments (language model) or extract (task), not both")
        if idx.dim() != 3 or tuple(extract.shape) != tuple(idx.shape[:2]):
            raise InputError(f"task inputs are ids (B, S, T) with extract positions (B, S); got {tuple(idx.shape)} and {tuple(extract.shape)}")
        B, S, T = idx.shape
        if self.spec.task in ("classify", "entail", "reward") and S != 1:
            raise InputError(f"a {self.spec.task} example is one sequence, got {S}")
        if self.spec.task == "similar" and S != 2:
            raise InputError(f"a similar example is its two orderings, got {S} sequences")
        flat = idx.reshape(B * S, T)  # (N, T)
        flat_targets = None if targets is None else targets.reshape(B * S, T)  # (N, T)
        self._check_input(flat, flat_targets)
        h = self._trunk(flat, torch.arange(T, device=idx.device), None)  # (N, T, C)
        lm_loss = None
        if flat_targets is not None:  # L1 on the same tokens (eq. 5); padding and each last token have no target
            lm_loss = cross_entropy(self.lm_head(h).view(B * S * T, -1), flat_targets.reshape(B * S * T))
        rows = torch.arange(B * S, device=idx.device)
        feats = h[rows, extract.reshape(B * S).clamp(min=0)].view(B, S, -1)  # (B, S, C): the extract token's hidden state
        return self._task_logits(feats, extract), lm_loss

    def _branched_rewards(self, idx: Tensor, segments: Tensor | None, branches: Tensor | None, extract: Tensor | None) -> Tensor:
        """Rewards (B, K) read at extract (B, K) in rows (B, T) of prompts each followed by the replies to score,
        the prompt's tokens once (see model.branched_positions_and_mask); extract < 0 reads nothing (reward 0)."""
        if self.spec.task != "reward":
            raise InputError(f"branched rows score replies with a reward head, not a {self.spec.task} one")
        shapes = [tuple(t.shape) if t is not None else None for t in (idx, segments, branches, extract)]
        if idx.dim() != 2 or shapes[1] != shapes[0] or shapes[2] != shapes[0] or extract is None or extract.dim() != 2 or extract.size(0) != idx.size(0):
            raise InputError(f"branched rows are ids, segments and branches (B, T) with extract positions (B, K); got shapes {shapes}")
        positions, mask = branched_positions_and_mask(segments, branches)  # (B, T), (B, 1, T, T)
        self._check_input(idx, None, positions)
        h = self._trunk(idx, positions, None, mask)  # (B, T, C)
        rows = torch.arange(idx.size(0), device=idx.device)[:, None]  # (B, 1)
        feats = h[rows, extract.clamp(min=0)]  # (B, K, C): the hidden state at each reply's last token
        return self.head(self.head_drop(feats)).squeeze(-1).masked_fill(extract < 0, 0.0)  # (B, K)

    def _task_logits(self, feats: Tensor, extract: Tensor) -> Tensor:
        """The head on the extract tokens' hidden states feats (B, S, C)."""
        if self.spec.task == "choice":
            scores = self.head(self.head_drop(feats)).squeeze(-1)  # (B, S): one score per choice
            return scores.masked_fill(extract < 0, float("-inf"))  # an example's missing choices get no probability
        if self.spec.task == "similar":
            return self.head(self.head_drop(feats.sum(dim=1)))  # (B, n_labels): both orderings added element-wise
        if self.spec.task == "reward":
            return self.head(self.head_drop(feats[:, 0])).squeeze(-1)  # (B,): one scalar reward per conversation
        return self.head(self.head_drop(feats[:, 0]))  # (B, n_labels)


def head_spec(head_meta: Any, where: Path) -> HeadSpec:
    """The HeadSpec of a checkpoint.json "task_head" entry; CheckpointError when it is malformed."""
    try:
        return HeadSpec.from_dict(head_meta)
    except (ConfigError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{where}: invalid {HEAD_KEY!r} entry ({err})") from None


def task_model_for(model_config: GPTConfig, head_meta: Any, where: Path) -> TaskModel:
    """The (randomly initialised) TaskModel that a checkpoint with this checkpoint.json "task_head" entry loads into."""
    return TaskModel(model_config, head_spec(head_meta, where))


# ----------------------------------------------------------------------------- objective


class TaskObjective:
    """Classification cross-entropy plus lambda times the language-model loss on the same inputs (see train.Objective)."""

    def __init__(self, tokenizer: AnyTokenizer, cfg: TaskConfig, labels: tuple[Label, ...] | None, train: EncodedSet, val: EncodedSet | None) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.labels = labels
        self.train_set, self.val_set = train, val
        self.has_val = val is not None

    def check(self, model_config: GPTConfig) -> None:
        if model_config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"the model has {model_config.vocab_size} token rows but the tokenizer {self.tokenizer.vocab_size} ids")
        longest = max(len(ids) for seqs in self.train_set.examples for ids in seqs)
        if longest > model_config.block_size:
            raise ConfigError(f"an input has {longest} tokens, more than the model's block_size ({model_config.block_size})")

    def batches(self, split: str, block_size: int, batch_size: int, seed: int, rank: int, world_size: int) -> ExampleBatches:
        data = self.train_set if split == "train" else self.val_set
        if data is None:
            raise DataError("no held-out examples")
        return ExampleBatches(data, self.cfg.task, batch_size, seed, rank, world_size, exact=split != "train")

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> Tensor:
        """L3 = L2 + lambda L1 (Radford et al. 2018, eq. 5), both means over the micro-batch."""
        x, y, extract, labels = (t.to(device, non_blocking=True) for t in batch)
        # the LM loss is computed even at lambda = 0: under DDP every parameter must take part in the backward pass
        logits, lm_loss = model(x, y, extract=extract)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX) + self.cfg.lm_weight * lm_loss

    def score(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> dict[str, float]:
        x, _, extract, labels = (t.to(device) for t in batch)
        logits = model(x, extract=extract)[0].float()  # (B, n_out)
        scored = labels != IGNORE_INDEX
        logits, labels = logits[scored], labels[scored]
        return {
            "loss_sum": F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0,
            "correct": (logits.argmax(dim=-1) == labels).sum().item(),
            "examples": float(len(labels)),
        }

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["examples"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}

    def describe(self) -> list[str]:
        t, cfg = self.train_set, self.cfg
        classes = "a score per choice"
        if self.labels is not None:
            classes = f"{len(self.labels)} labels ({', '.join(map(str, self.labels[:8]))}{', ...' if len(self.labels) > 8 else ''})"
        lines = [
            f"task: {cfg.task}, {classes}; loss: cross-entropy + {cfg.lm_weight:g} x language-model loss (Radford et al. 2018, eq. 5)",
            f"data: {len(t.examples):,} examples ({t.positions:,} tokens) from {', '.join(cfg.data)}; {t.truncated} cut to the context",
        ]
        v = self.val_set
        lines.append(f"held out: {len(v.examples):,} examples" if v is not None else "held out: none (evaluation off)")
        return lines

    def tokens_per_step(self, cfg: TrainConfig, block_size: int) -> int:
        per_example = max(1, self.train_set.positions // len(self.train_set.examples))  # an example's sequences, unpadded
        return cfg.batch_size * cfg.grad_accum * per_example

    def run_info(self) -> dict[str, Any]:
        return {RUN_KEY: self.cfg.to_dict()}


def _split_off(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example] | None]:
    """(train, val): a seeded `fraction` of the rows held out (finetune.runs.held_out); no val under 10 rows."""
    from gptlab.finetune.runs import held_out

    held = held_out(len(examples), fraction, seed)
    if held is None:
        return examples, None
    return [ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held]


def build_objective(tokenizer: AnyTokenizer, cfg: TaskConfig, block_size: int, seed: int, labels: tuple[Label, ...] | None = None) -> TaskObjective:
    """Read and encode the training and held-out examples; `labels` (a resumed run's) must be the training data's."""
    rows = [ex for spec in cfg.data for ex in read_examples(spec, cfg.task)]
    found = label_set(rows) if cfg.task != "choice" else None
    if labels is not None and found != tuple(labels):
        raise ConfigError(f"the labels of {', '.join(cfg.data)} changed since the run started: {list(found or ())} now, {list(labels)} then")
    if cfg.val_data:
        train_rows, val_rows = rows, [ex for spec in cfg.val_data for ex in read_examples(spec, cfg.task)]
    else:
        train_rows, val_rows = _split_off(rows, cfg.val_fraction, seed)
    train = encode_examples(train_rows, cfg.task, tokenizer, found, block_size)
    val = encode_examples(val_rows, cfg.task, tokenizer, found, block_size) if val_rows else None
    return TaskObjective(tokenizer, cfg, found, train, val)


# ----------------------------------------------------------------------------- the run

# Radford et al. 2018, section 4.1 (fine-tuning details): lr 6.25e-5 decayed linearly to 0 with a warmup
# over 0.2% of training, batch 32, 3 epochs, dropout 0.1 on the classifier, lambda 0.5, and (kept from
# pretraining) weight decay w = 0.01 on all but biases and gains. Here the decay is the loop's cosine to 0,
# the warmup its auto default (a tenth of the steps, at most 100), the batch 8 (--batch-size 32 for the
# paper's); weight decay keeps the paper's 0.01 (sft uses 0: at this lr either changes the weights little).
DEFAULTS = {"lr": 6.25e-5, "min_lr": 0.0, "weight_decay": 0.01, "batch_size": 8}


def eval_batches_for(objective: TaskObjective, cfg: TrainConfig, cap: int = 100) -> int:
    """Batches that score every held-out example once (at most `cap`)."""
    if objective.val_set is None:
        return cfg.eval_batches
    return max(1, min(cap, math.ceil(len(objective.val_set.examples) / cfg.batch_size)))


def finetune_task(
    base: str | Path | None,
    cfg: TaskConfig | None,
    train_fields: dict[str, Any],
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    report: Any = print,
    started: float | None = None,
) -> Any:
    """Fine-tune the checkpoint `base` with a task head on labelled examples; returns train.train's TrainResult.

    `train_fields` are TrainConfig fields the user set; the rest take DEFAULTS, and max_steps
    covers cfg.epochs passes unless given (or a time budget sets it). With `resume` and a
    checkpoint in run_dir, the run continues with the data and settings saved in it (base and
    cfg may be None).
    """
    from gptlab.checkpoint import load_checkpoint
    from gptlab.finetune.runs import check_fresh, find_resumed, schedule
    from gptlab.model import with_new_tokens
    from gptlab.tokenizer import read_tokenizer
    from gptlab.train import train

    run_dir = Path(run_dir)
    if train_fields.get("strategy") == "fsdp":
        # FSDP's checkpoints reassemble a plain GPT (distributed.full_state), which would drop the head
        raise ConfigError("task-head runs cannot use --strategy fsdp (its checkpoints hold a plain GPT, without the head): use ddp, the default")
    resumed = find_resumed(run_dir, RUN_KEY, TaskConfig, cfg, "task-head") if resume else None
    if resumed is not None:
        if HEAD_KEY not in resumed.meta:
            raise ConfigError(f"{resumed.path} is not a task-head checkpoint (no {HEAD_KEY!r} entry in checkpoint.json)")
        spec = head_spec(resumed.meta[HEAD_KEY], resumed.path / "checkpoint.json")
        objective = build_objective(read_tokenizer(resumed.path / "tokenizer.json"), resumed.settings, resumed.block_size, resumed.seed, labels=spec.labels)
        return train(None, None, objective, run_dir, resume=True, progress=progress, resume_overrides=train_fields, report=report, started=started)
    check_fresh(base, cfg, train_fields, "a base checkpoint (--ckpt), data (--data) and a task (--task)")
    ckpt = load_checkpoint(base)
    tokenizer, added = ckpt.tokenizer.with_special_tokens(TASK_TOKENS)
    model = ckpt.model
    lines = [f"base: {ckpt.path} (step {ckpt.step}, tokenizer {ckpt.tokenizer.name})"]
    if added:
        rows = model.config.vocab_size
        model = with_new_tokens(model, sorted(added.values()), known=ckpt.tokenizer.vocab_size)
        grown = f"the token table grows from {rows} to {model.config.vocab_size} rows" if model.config.vocab_size != rows else "the token table had room"
        listed = ", ".join(f"{t} (id {i})" for t, i in added.items())
        lines.append(f"task tokens: added {listed} to the tokenizer; {grown}; their rows start at the mean embedding")
    seed = train_fields.get("seed", TrainConfig().seed)
    objective = build_objective(tokenizer, cfg, model.config.block_size, seed)
    spec = HeadSpec(cfg.task, objective.labels, cfg.head_dropout)
    model = TaskModel.from_gpt(model, spec, seed)
    lines.append(f"head: Linear({model.config.n_embd} -> {spec.n_outputs}, no bias) on the hidden state at {EXTRACT}, dropout {spec.dropout:g} before it")
    train_cfg = schedule(DEFAULTS, train_fields, cfg.epochs, lambda c: len(objective.train_set.examples), lambda c: eval_batches_for(objective, c))
    meta = {HEAD_KEY: spec.to_dict(), RUN_KEY: cfg.to_dict(), "base": {"path": str(ckpt.path.resolve()), "step": ckpt.step}}
    for line in lines:
        report(line)
    return train(model.config, train_cfg, objective, run_dir, progress=progress, report=report, started=started, init_model=model, checkpoint_meta=meta)


# ----------------------------------------------------------------------------- prediction


class Classifier:
    """A task-head checkpoint, ready to predict (eval mode)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from gptlab.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, device=device)
        if not isinstance(ckpt.model, TaskModel):
            raise CheckpointError(f"{ckpt.path} has no task head (train one with gptlab finetune-cls)")
        if ckpt.model.spec.task == "reward":
            raise CheckpointError(f"{ckpt.path} is a reward model: score conversations with gptlab reward score")
        self.path = ckpt.path
        self.model: TaskModel = ckpt.model.eval()
        self.spec = self.model.spec
        self.tokenizer = ckpt.tokenizer
        self.device = torch.device(device)

    def example(self, text: str, text_b: str | None = None, choices: Sequence[str] | None = None) -> Example:
        """An unlabelled example from command-line texts: text (classify); text and text_b (entail, similar); text and choices (choice)."""
        task = self.spec.task
        if task == "choice":
            ok, texts = text_b is None and choices is not None and len(choices) >= 2, (text, *(choices or ()))
            wants = "--text (the context) and --choices with at least two choices"
        elif task == "classify":
            ok, texts, wants = text_b is None and choices is None, (text,), "--text alone"
        else:
            ok, texts = text_b is not None and choices is None, (text, text_b or "")
            wants = f"--text ({FIELDS[task][0]}) and --text-b ({FIELDS[task][1]})"
        if not ok:
            raise InputError(f"a {task} model takes {wants}")
        return Example(texts, None, "--text")

    @torch.no_grad()
    def probabilities(self, examples: Sequence[Example], batch_size: int = 32) -> tuple[list[Tensor], EncodedSet]:
        """Each example's class (or choice) probabilities, and the encoded examples (their labels as class indices)."""
        data = encode_examples(examples, self.spec.task, self.tokenizer, self.spec.labels, self.model.config.block_size)
        out: list[Tensor] = []
        for s in range(0, len(data.examples), batch_size):
            x, _, extract, _ = collate(data.examples[s : s + batch_size], data.labels[s : s + batch_size])
            logits = self.model(x.to(self.device), extract=extract.to(self.device))[0].float()  # (B, n_out)
            for b, probs in enumerate(torch.softmax(logits, dim=-1).cpu()):
                out.append(probs[: len(data.examples[s + b])] if self.spec.task == "choice" else probs)  # only the example's own choices
        return out, data


# ----------------------------------------------------------------------------- Hugging Face


def export_task_hf(ckpt: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> tuple[Path, str]:
    """Write a task-head checkpoint as a HF model directory; returns it and the transformers class that loads it.

    classify, entail, similar: GPT2ForSequenceClassification (OpenAIGPTForSequenceClassification
    for a post-LN GPT-1 model), pad_token_id the delimiter, id2label the labels; a similar
    model's logits are the sum of the logits of both orderings. choice: GPT2DoubleHeadsModel
    (OpenAIGPTDoubleHeadsModel), its mc_logits the choice scores with mc_token_ids the extract
    positions. reward: GPT2ForSequenceClassification with one label, pad_token_id <|im_start|>,
    and the chat template. See the module docstring for why these compute what gptlab computes.
    """
    from safetensors.torch import save_file

    from gptlab.chat import IM_END, IM_START, ChatTemplate
    from gptlab.checkpoint import load_checkpoint
    from gptlab.hf import GPT1, GPT2, _add_chat_template, check_out_dir, config_to_hf, hf_expressible, state_dict_to_hf, writing
    from gptlab.tokenizer import EOT

    out = Path(out)
    check_out_dir(out, force)
    loaded = load_checkpoint(ckpt)
    model = loaded.model
    if not isinstance(model, TaskModel):
        raise CheckpointError(f"{loaded.path} has no task head; gptlab.hf.export_hf writes it")
    spec, tok = model.spec, loaded.tokenizer
    reward = spec.task == "reward"
    # HF pools the rightmost token that is not the pad: pad with a token that never ends an input
    pad, pad_id = (IM_START, ChatTemplate(tok).start_id) if reward else (DELIM, TaskTokens.of(tok).delim)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    sd, cfg = hf_expressible(state, loaded.model_config)
    hf_sd = state_dict_to_hf(sd, cfg)
    hf_config = config_to_hf(cfg, eos_token_id=tok.special_tokens.get(EOT))
    if hf_config["model_type"] not in (GPT2, GPT1):
        raise ConfigError(f"task models export as HF GPT-2/GPT-1 head classes only, and this one is {hf_config['model_type']}-shaped")
    prefix = "GPT2" if hf_config["model_type"] == GPT2 else "OpenAIGPT"
    head = model.head.weight.detach()  # (n_out, C)
    task_tokens = {"start": IM_START, "end": IM_END} if reward else {"start": START, "delim": DELIM, "extract": EXTRACT}
    task_note: dict[str, Any] = {"task": spec.task, "tokens": task_tokens}
    if spec.task == "choice":
        arch = f"{prefix}DoubleHeadsModel"
        hf_sd["multiple_choice_head.summary.weight"] = head  # (1, C)
        hf_sd["multiple_choice_head.summary.bias"] = head.new_zeros(1)
        if cfg.tie_weights:
            del hf_sd["lm_head.weight"]  # HF re-ties it on load; safetensors cannot store one tensor twice
        hf_config |= {"summary_type": "cls_index", "summary_use_proj": True, "summary_proj_to_labels": True, "summary_activation": None,
                      "summary_first_dropout": spec.dropout, "summary_last_dropout": 0.0}  # fmt: skip
        task_note["input"] = f"{START} context {DELIM} choice {EXTRACT} per choice; mc_token_ids: each {EXTRACT}'s position"
    else:
        arch = f"{prefix}ForSequenceClassification"
        del hf_sd["lm_head.weight"]  # the class has no language-model head
        hf_sd["score.weight"] = head  # (n_labels, C)
        names = ["reward"] if reward else spec.names()
        hf_config |= {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}, "pad_token_id": pad_id}
        if reward:
            task_note["input"] = "the conversation (prompt and reply) rendered by the chat template; the score is its last token's"
        else:
            task_note["input"] = f"{START} {f' {DELIM} '.join(FIELDS[spec.task])} {EXTRACT}"
        if spec.task == "similar":
            task_note["combine"] = "run both orderings (text_a, text_b) and (text_b, text_a) and add their logits"
    hf_config |= {"architectures": [arch], "torch_dtype": "float32", "gptlab_task": task_note}
    with writing(out) as tmp:
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        try:
            tok.to_hf_files(tmp, model_max_length=cfg.block_size)
        except GptlabError as err:
            raise CheckpointError(f"cannot export the tokenizer: {err}") from None
        _set_pad_token(tmp / "tokenizer_config.json", pad)
        if reward:
            _add_chat_template(tmp / "tokenizer_config.json")
    return out, arch


def _set_pad_token(config_path: Path, token: str) -> None:
    """Make the HF tokenizer pad with `token`, the id the exported config pools past."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["pad_token"] = token
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

