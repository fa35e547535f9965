"""Supervised fine-tuning (SFT): conversations in, a model that answers in the chat format out.

The data is read per file in one of three shapes (detected from the file's first row,
and every row must then have it):

    OpenAI chat         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    prompt/completion   {"prompt": str | messages, "completion": str | messages}
    Alpaca              {"instruction": str, "input": str (may be empty or absent), "output": str}

Each row becomes a conversation, rendered by the chat template (gptlab.chat) into ids and
a loss mask: only the assistant's tokens are trained. Over-long rows keep their first
max_len + 1 tokens (the start of the conversation and whatever of the replies fits); a row
whose trained tokens all fall past the cut is skipped. Both are counted in the summary.

Batches pack whole conversations into rows of block_size positions in a shuffled order
(next-fit: a conversation that does not fit the row's rest starts the next row). Each
conversation numbers its positions from 0 and attends only to itself (GPT.forward's
`segments`), so packing changes nothing but speed. With packing off, each row holds one
conversation, padded to the longest in the batch.

`SFTObjective` is what train.train optimises: the loop (schedule, evaluation, checkpoints,
resume, time budget, torchrun) is pretraining's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.chat import ChatTemplate, check_messages
from gptlab.config import (
    GPTConfig,
    TrainConfig,
    _in_range,
    _positive_int,
    _Serializable,
)
from gptlab.errors import ConfigError, DataError, InputError
from gptlab.model import GPT, IGNORE_INDEX
from gptlab.tokenizer import AnyTokenizer

SHAPES = {
    "chat": ("messages",),
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}


@dataclass(frozen=True)
class SFTConfig(_Serializable):
    """What `gptlab sft` trains on; saved in run.json so `--resume` rebuilds the same batches."""

    data: tuple[str, ...] = ()  # JSONL files or builtin:NAME
    val_data: tuple[str, ...] = ()  # held-out files; default: a built-in set's test split, else val_fraction of data
    val_fraction: float = 0.05
    max_len: int | None = None  # input positions per conversation; None: the model's block_size
    packing: bool = True
    epochs: float = 3.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "val_data", tuple(self.val_data))
        if not self.data or not all(isinstance(d, str) and d for d in self.data):
            raise ConfigError(f"data must name at least one JSONL file or builtin:NAME, got {self.data!r}")
        _in_range(self, "val_fraction", 0.0, 0.5)
        if self.max_len is not None:
            _positive_int(self, "max_len")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"packing must be true or false, got {self.packing!r}")
        _in_range(self, "epochs", 0.0, 1e6)
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs!r}")


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]
    where: str  # "file:line", for errors


def _as_messages(value: Any, role: str, where: str, name: str) -> list[dict[str, str]]:
    """A prompt/completion field: a string is one message of `role`; a list is messages already."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return check_messages(value, f"{where}: {name!r}")
    raise InputError(f"{where}: {name!r} must be a string or a list of messages, got {type(value).__name__}")


def _row_messages(shape: str, row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if shape == "chat":
        return check_messages(row["messages"], where)
    if shape == "prompt/completion":
        return _as_messages(row["prompt"], "user", where, "prompt") + _as_messages(row["completion"], "assistant", where, "completion")
    text = {key: row.get(key, "") for key in ("instruction", "input", "output")}
    for key, value in text.items():
        if not isinstance(value, str):
            raise InputError(f"{where}: Alpaca field {key!r} must be a string, got {type(value).__name__}")
    # Alpaca's own prompt puts the input after the instruction; in chat form both are the user's turn
    user = text["instruction"] + (f"\n\n{text['input']}" if text["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": text["output"]}]


def _shape_of(row: dict[str, Any]) -> str | None:
    for shape, keys in SHAPES.items():
        if all(k in row for k in keys):
            return shape
    return None


def read_jsonl_examples(path: str | Path) -> tuple[list[Example], str]:
    """The conversations of a JSONL file and the shape its rows have; errors name file:line."""
    from gptlab.fileio import jsonl_objects

    examples: list[Example] = []
    shape = None
    for where, row in jsonl_objects(path):
        found = _shape_of(row)
        if shape is None:
            if found is None:
                raise DataError(
                    f"{where}: unknown row shape (keys {', '.join(sorted(row)) or 'none'}); expected {{messages}}, "
                    "{prompt, completion} or {instruction, input, output}"
                )
            shape = found
        elif found != shape:
            keys = " and ".join(repr(k) for k in SHAPES[shape])
            raise DataError(f"{where}: the file's rows are {shape} rows (with {keys}) but this one has keys {', '.join(sorted(row))}")
        try:
            messages = _row_messages(shape, row, where)
        except InputError as err:
            raise DataError(str(err)) from None
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to learn from this row")
        examples.append(Example(messages, where))
    return examples, shape  # type: ignore[return-value]


def read_examples(spec: str, split: str = "train") -> tuple[list[Example], str]:
    """The conversations of a JSONL file, or of a built-in set's split ("builtin:NAME"), and their shape."""
    from gptlab.datasets import is_builtin, load_builtin, parse_builtin

    if is_builtin(spec):
        name = parse_builtin(spec)
        rows = load_builtin(name, split)
        return [Example(check_messages(r["messages"], f"{spec}[{split}] row {i}"), f"{spec}[{split}] row {i}") for i, r in enumerate(rows)], "chat"
    return read_jsonl_examples(spec)


# ----------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """Conversations as (ids, target mask) arrays of at most max_len + 1 tokens, with what the cut did."""

    rows: list[tuple[np.ndarray, np.ndarray]]
    sources: list[str]
    truncated: int = 0  # rows cut to max_len + 1 tokens
    skipped: int = 0  # rows the cut left with nothing to train
    shapes: dict[str, str] = field(default_factory=dict)  # spec -> detected shape

    @property
    def targets(self) -> int:
        return int(sum(m[1:].sum() for _, m in self.rows))

    @property
    def positions(self) -> int:
        return sum(len(ids) - 1 for ids, _ in self.rows)


def encode_examples(template: ChatTemplate, examples: list[Example], max_len: int) -> Encoded:
    """Render each conversation; cut those longer than max_len + 1 tokens (max_len predictions)."""
    out = Encoded([], [])
    for ex in examples:
        r = template.render(ex.messages)
        ids = np.asarray(r.ids, dtype=np.int64)
        mask = np.asarray(r.mask, dtype=bool)
        if not mask.any():  # _row_messages guarantees an assistant turn, whose <|im_end|> is a target
            raise DataError(f"{ex.where}: nothing to learn (no assistant tokens)")
        if len(ids) > max_len + 1:
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
            out.truncated += 1
            if not mask[1:].any():
                out.skipped += 1
                continue
        out.rows.append((ids, mask))
        out.sources.append(ex.where)
    return out


def load_encoded(specs: tuple[str, ...], split: str, template: ChatTemplate, max_len: int) -> Encoded:
    examples: list[Example] = []
    shapes = {}
    for spec in specs:
        found, shape = read_examples(spec, split)
        examples += found
        shapes[spec] = shape
    encoded = encode_examples(template, examples, max_len)
    encoded.shapes = shapes
    if not encoded.rows:
        raise DataError(f"{', '.join(specs)}: every conversation is longer than max_len ({max_len}) before its first reply token")
    return encoded


def split_off(encoded: Encoded, fraction: float, seed: int) -> tuple[Encoded, Encoded | None]:
    """(train, val): a seeded `fraction` of the rows held out (finetune.runs.held_out); no val under 10 rows."""
    from gptlab.finetune.runs import held_out

    held = held_out(len(encoded.rows), fraction, seed)
    if held is None:
        return encoded, None

    def part(keep: bool) -> Encoded:
        idx = [i for i in range(len(encoded.rows)) if (i in held) != keep]
        return Encoded([encoded.rows[i] for i in idx], [encoded.sources[i] for i in idx], shapes=encoded.shapes)

    train = part(True)
    train.truncated, train.skipped = encoded.truncated, encoded.skipped
    return train, part(False)


# ----------------------------------------------------------------------------- batches


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) keyed by (seed, epoch); numpy's PCG64 streams are fixed across platforms and versions."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def pack(lengths: list[int], order: np.ndarray, block_size: int) -> list[list[int]]:
    """Rows of conversation indices in `order`, next-fit: each row's lengths sum to at most block_size."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order.tolist():
        if current and used + lengths[i] > block_size:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


class ConversationBatches:
    """An endless stream of (x, y[, segments]) batches of conversations, resumable from (epoch, rows read).

    Epoch e visits the conversations in the permutation keyed by (seed, e) and packs them
    (or not) into rows. As ShardLoader, batch_size is the global batch: every process walks
    the same row sequence and takes its own slice of each batch. With `exact` (held-out
    scoring) there is one epoch: after its last row come rows of padding alone, so batches
    covering the epoch score every conversation exactly once.
    """

    def __init__(
        self, encoded: Encoded, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, packing: bool = True,
        exact: bool = False,
    ) -> None:  # fmt: skip
        if batch_size % world_size:
            raise ConfigError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        longest = max(len(ids) - 1 for ids, _ in encoded.rows)
        if longest > block_size:
            raise ConfigError(f"a conversation has {longest} positions, more than the model's block_size ({block_size}); lower max_len")
        self.encoded = encoded
        self.lengths = [len(ids) - 1 for ids, _ in encoded.rows]  # positions: inputs ids[:-1], targets ids[1:]
        self.block_size, self.batch_size, self.seed, self.packing, self.exact = block_size, batch_size, seed, packing, exact
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.epoch, self.row = 0, 0
        self._rows: list[list[int]] | None = None

    def rows_of_epoch(self, epoch: int) -> list[list[int]]:
        order = _order(len(self.lengths), self.seed, epoch)
        return pack(self.lengths, order, self.block_size) if self.packing else [[i] for i in order.tolist()]

    def rows_per_epoch(self) -> int:
        return len(self.rows_of_epoch(0))

    def next_batch(self) -> tuple[Tensor, ...]:
        groups: list[list[int]] = []
        for _ in range(self.batch_size):
            if self.exact and self.epoch > 0:
                groups.append([])  # a row of padding: nothing scored
                continue
            if self._rows is None:
                self._rows = self.rows_of_epoch(self.epoch)
            groups.append(self._rows[self.row])
            self.row += 1
            if self.row == len(self._rows):
                self.epoch, self.row, self._rows = self.epoch + 1, 0, None
        return self.collate(groups[self.local])

    def collate(self, groups: list[list[int]]) -> tuple[Tensor, ...]:
        """(x, y, segments) of packed rows padded to block_size, or (x, y) of single conversations padded to the longest."""
        width = self.block_size if self.packing else max((self.lengths[g[0]] for g in groups if g), default=1)
        x = torch.zeros(len(groups), width, dtype=torch.long)
        y = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
        seg = torch.zeros(len(groups), width, dtype=torch.long)
        for b, group in enumerate(groups):
            t = 0
            for k, i in enumerate(group):
                ids, mask = self.encoded.rows[i]
                n = len(ids) - 1
                x[b, t : t + n] = torch.from_numpy(ids[:-1])
                y[b, t : t + n] = torch.from_numpy(np.where(mask[1:], ids[1:], IGNORE_INDEX))
                seg[b, t : t + n] = k
                t += n
            seg[b, t:] = len(group)  # the padding is a sequence of its own, attending to nothing real
        return (x, y, seg) if self.packing else (x, y)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.row, self._rows = int(state["epoch"]), int(state["row"]), None


# ----------------------------------------------------------------------------- objective


def score_batch(model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> dict[str, float]:
    """Summed loss, correct argmax predictions and count over the trained tokens of one batch."""
    x, y, *segments = (t.to(device) for t in batch)
    logits = model(x, None, *segments)[0]  # (B, T, V)
    trained = y != IGNORE_INDEX
    picked, targets = logits[trained].float(), y[trained]  # (N, V), (N,)
    return {
        "loss_sum": F.cross_entropy(picked, targets, reduction="sum").item(),
        "correct": (picked.argmax(dim=-1) == targets).sum().item(),
        "tokens": float(trained.sum().item()),
    }


def reply_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Loss, perplexity and per-token accuracy on the trained tokens from summed `score_batch` results."""
    loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": sums["correct"] / max(sums["tokens"], 1.0)}


class SFTObjective:
    """Next-token loss on the assistant's tokens of conversations (see train.Objective)."""

    def __init__(self, tokenizer: AnyTokenizer, cfg: SFTConfig, train: Encoded, val: Encoded | None, max_len: int) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.train_set, self.val_set = train, val
        self.has_val = val is not None
        self.max_len = max_len

    def check(self, model_config: GPTConfig) -> None:
        if model_config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"the model has {model_config.vocab_size} token rows but the tokenizer {self.tokenizer.vocab_size} ids")
        if self.max_len > model_config.block_size:
            raise ConfigError(f"max_len ({self.max_len}) exceeds the model's block_size ({model_config.block_size})")

    def batches(self, split: str, block_size: int, batch_size: int, seed: int, rank: int, world_size: int) -> ConversationBatches:
        encoded = self.train_set if split == "train" else self.val_set
        if encoded is None:
            raise DataError("no held-out conversations")
        return ConversationBatches(encoded, block_size, batch_size, seed, rank, world_size, self.cfg.packing, exact=split != "train")

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> Tensor:
        """Mean cross-entropy over the micro-batch's trained (assistant) tokens."""
        return model(*(t.to(device, non_blocking=True) for t in batch))[1]

    def weight(self, batch: tuple[Tensor, ...]) -> int:
        """The trained tokens of a batch, which `loss` averages over (train_step weights micro-batches by it)."""
        return int((batch[1] != IGNORE_INDEX).sum())

    def score(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> dict[str, float]:
        return score_batch(model, batch, device)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return reply_metrics(sums)

    def describe(self) -> list[str]:
        t = self.train_set
        lines = [
            f"data: {len(t.rows):,} conversations ({t.targets:,} trained tokens of {t.positions:,}) from "
            + ", ".join(f"{spec} ({shape})" for spec, shape in t.shapes.items()),
            f"batches: {'packed' if self.cfg.packing else 'one conversation per row, padded'}; conversations over "
            f"{self.max_len + 1} tokens keep their first {self.max_len + 1}: {t.truncated} cut, {t.skipped} skipped (no reply token left)",
        ]
        v = self.val_set
        lines.append(f"held out: {len(v.rows):,} conversations ({v.targets:,} trained tokens)" if v is not None else "held out: none (evaluation off)")
        return lines

    def tokens_per_step(self, cfg: TrainConfig, block_size: int) -> int:
        # token positions computed per step: packed rows are block_size wide; padded ones average the mean length
        width = block_size if self.cfg.packing else max(1, self.train_set.positions // len(self.train_set.rows))
        return cfg.batch_size * cfg.grad_accum * width

    def run_info(self) -> dict[str, Any]:
        return {"sft": self.cfg.to_dict()}


# ----------------------------------------------------------------------------- the run

# Fine-tuning moves a trained model a little: a learning rate ~10x under pretraining's, no decay
# toward zero of weights the base learned, and a short warmup (the auto default, a tenth of the run)
FULL_DEFAULTS = {"lr": 5e-5, "min_lr": 5e-6, "weight_decay": 0.0}
# LoRA's few parameters start from zero (B = 0) and take larger steps (Hu et al. 2021 used 2e-4 for GPT-2)
LORA_DEFAULTS = {"lr": 2e-4, "min_lr": 2e-5, "weight_decay": 0.0}


@dataclass
class Start:
    """A fine-tuning run's starting point: the base checkpoint, its model and tokenizer with the chat tokens, and what changed."""

    ckpt: Any  # gptlab.checkpoint.Checkpoint
    model: Any  # gptlab.model.GPT
    tokenizer: AnyTokenizer
    added: dict[str, int]
    lines: list[str]


def start_model(base: str | Path, device: str | torch.device = "cpu") -> Start:
    """The base checkpoint's model and tokenizer with the chat tokens added (rows grown and initialised), and what changed."""
    from gptlab.chat import add_chat_tokens
    from gptlab.checkpoint import load_checkpoint
    from gptlab.model import with_new_tokens

    ckpt = load_checkpoint(base, device=device)
    tokenizer, added = add_chat_tokens(ckpt.tokenizer)
    lines = [f"base: {ckpt.path} (step {ckpt.step}, tokenizer {ckpt.tokenizer.name})"]
    model = ckpt.model
    if type(model) is not GPT:  # a model that extends GPT (a task head's, gptlab.finetune.heads): its language model
        plain = GPT(model.config).to(device)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
        model = plain
        lines.append("the base's task head is left out: chat fine-tuning trains its language model")
    if added:
        rows = model.config.vocab_size
        model = with_new_tokens(model, sorted(added.values()), known=ckpt.tokenizer.vocab_size)
        grown = f"the token table grows from {rows} to {model.config.vocab_size} rows" if model.config.vocab_size != rows else "the token table had room"
        lines.append(
            f"chat tokens: added {', '.join(f'{t} (id {i})' for t, i in added.items())} to the tokenizer; {grown}; "
            "their rows start at the mean embedding"
        )
    return Start(ckpt, model, tokenizer, added, lines)


def build_objective(tokenizer: AnyTokenizer, cfg: SFTConfig, block_size: int, seed: int) -> SFTObjective:
    """Read and encode the training and held-out conversations for a model of `block_size` context."""
    max_len = cfg.max_len or block_size
    if max_len > block_size:
        raise ConfigError(f"max_len ({max_len}) exceeds the model's block_size ({block_size})")
    template = ChatTemplate(tokenizer)
    train = load_encoded(cfg.data, "train", template, max_len)
    if cfg.val_data:
        val: Encoded | None = load_encoded(cfg.val_data, "train", template, max_len)
    elif all(_is_builtin(spec) for spec in cfg.data):
        val = load_encoded(cfg.data, "test", template, max_len)
    else:
        train, val = split_off(train, cfg.val_fraction, seed)
    return SFTObjective(tokenizer, cfg, train, val, max_len)


def _is_builtin(spec: str) -> bool:
    from gptlab.datasets import is_builtin

    return is_builtin(spec)


def attach_lora(model: Any, lora: Any, seed: int, start: Start, train_cfg: TrainConfig) -> tuple[dict[str, Any], str]:
    """Wrap `model` (the started base) with LoRA adapters, in place: checkpoint.json's "lora" entry and a summary line."""
    from gptlab.finetune.lora import adapter_meta, apply_lora, trainable_parameters
    from gptlab.finetune.quant import frozen_base_bytes

    if train_cfg.strategy == "fsdp":
        raise ConfigError("LoRA runs replicate the frozen base in every process: use --strategy ddp (the default)")
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())  # the base in float32 (parameters() yields a tied matrix once)
    wrapped = apply_lora(model, lora, seed)
    trained, _ = trainable_parameters(model)
    base_bytes = frozen_base_bytes(model)
    bits = {None: "", 4: " in NF4 (QLoRA)", 8: " in int8"}[lora.base_bits]
    line = (
        f"LoRA: rank {lora.r}, alpha {lora.alpha:g} on {len(wrapped)} Linear layers ({', '.join(lora.targets)}); {trained:,} parameters train; "
        f"the frozen base{bits} takes {base_bytes / 2**20:,.1f} MiB ({base_bytes / fp32_bytes:.0%} of its {fp32_bytes / 2**20:,.1f} MiB in float32)"
    )
    return adapter_meta(lora, start.ckpt.path, start.ckpt.meta, start.ckpt.tokenizer.vocab_size, start.added), line


def eval_batches_for(objective: SFTObjective, cfg: TrainConfig, block_size: int, cap: int = 100) -> int:
    """Batches that score every held-out conversation exactly once (at most `cap`: then the first ones)."""
    if objective.val_set is None:
        return cfg.eval_batches
    rows = ConversationBatches(objective.val_set, block_size, cfg.batch_size, cfg.seed, packing=objective.cfg.packing).rows_per_epoch()
    return max(1, min(cap, math.ceil(rows / cfg.batch_size)))


def sft(
    base: str | Path | None,
    cfg: SFTConfig | None,
    train_fields: dict[str, Any],
    run_dir: str | Path,
    lora: Any = None,
    resume: bool = False,
    progress: bool = True,
    report: Any = print,
    started: float | None = None,
) -> Any:
    """Fine-tune the checkpoint `base` on conversations; returns train.train's TrainResult.

    `train_fields` are TrainConfig fields the user set; the rest take fine-tuning defaults
    (FULL_DEFAULTS, or LORA_DEFAULTS with a `lora` LoRAConfig: the base is frozen and only the
    adapters train, and checkpoints hold the adapters alone), and max_steps covers cfg.epochs
    passes unless given (or a time budget sets it). With `resume` and a checkpoint in run_dir,
    the run continues with the data and settings saved in it (base, cfg and lora may be None).
    """
    from gptlab.finetune.runs import check_fresh, find_resumed, schedule
    from gptlab.tokenizer import read_tokenizer
    from gptlab.train import train

    run_dir = Path(run_dir)
    resumed = find_resumed(run_dir, "sft", SFTConfig, cfg, "fine-tuning (sft)") if resume else None
    if resumed is not None:
        if lora is not None and resumed.meta.get("lora", {}).get("config") != lora.to_dict():
            raise ConfigError(f"cannot change the LoRA settings when resuming {resumed.path}")
        objective = build_objective(read_tokenizer(resumed.path / "tokenizer.json"), resumed.settings, resumed.block_size, resumed.seed)
        return train(None, None, objective, run_dir, resume=True, progress=progress, resume_overrides=train_fields, report=report, started=started)
    check_fresh(base, cfg, train_fields, "a base checkpoint (--ckpt) and data (--data)")
    start = start_model(base)
    model, lines = start.model, start.lines
    seed = train_fields.get("seed", TrainConfig().seed)
    objective = build_objective(start.tokenizer, cfg, model.config.block_size, seed)
    block = model.config.block_size
    train_cfg = schedule(
        LORA_DEFAULTS if lora is not None else FULL_DEFAULTS, train_fields, cfg.epochs,
        lambda c: ConversationBatches(objective.train_set, block, c.batch_size, c.seed, packing=cfg.packing).rows_per_epoch(),
        lambda c: eval_batches_for(objective, c, block),
    )  # fmt: skip
    meta: dict[str, Any] = {"sft": cfg.to_dict(), "base": {"path": str(start.ckpt.path.resolve()), "step": start.ckpt.step}}
    if lora is not None:
        meta["lora"], line = attach_lora(model, lora, seed, start, train_cfg)
        lines.append(line)
    for line in lines:
        report(line)
    return train(
        model.config, train_cfg, objective, run_dir, progress=progress, report=report, started=started, init_model=model, checkpoint_meta=meta
    )


@torch.no_grad()
def evaluate_conversations(model: nn.Module, encoded: Encoded, packing: bool = True, batch_size: int = 16, dtype: str = "float32") -> dict[str, float]:
    """Exact loss, perplexity and token accuracy over every trained token of `encoded`, each conversation scored once."""
    from gptlab.train import autocast_context

    device = next(model.parameters()).device
    block = model.config.block_size
    batches = ConversationBatches(encoded, block, batch_size, seed=0, packing=packing)
    rows = batches.rows_of_epoch(0)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for s in range(0, len(rows), batch_size):
        with autocast_context(device, dtype):
            scored = score_batch(model, batches.collate(rows[s : s + batch_size]), device)
        for key, value in scored.items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    return reply_metrics(sums)
