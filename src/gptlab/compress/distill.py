"""Knowledge distillation: a student learns a teacher's next-token distributions as well as the data's tokens.

Hinton et al. (2015): the teacher's probabilities carry more than the one correct token (which
wrong answers are nearly right), and softening both distributions with a temperature tau > 1
brings the small probabilities into the loss. Per target position,

    loss = alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau)) + (1 - alpha) * CE(s, y)

with t and s the teacher's and the student's logits and y the data's next token; tau^2 keeps the
soft term's gradients on the scale of the hard one's as tau changes (the soft gradients shrink
as 1 / tau^2). Both are means over the target positions. alpha = 0 is plain next-token training.

`Distillation` is an Objective of gptlab.train: the normal loop runs it, so resume, crash
safety, torchrun, progress and metrics come with it. The teacher stays in eval mode and runs
under no_grad; it must share the student's tokenizer (the KL compares distributions over the
same ids), and only the tokenizer's ids enter the KL (padded rows of either head do not).
Validation reports the student's plain next-token loss (and bits per byte), so a distilled run
compares with an ordinary one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gptlab.checkpoint import HEAD_KEY, Checkpoint, find_checkpoint, load_checkpoint, read_checkpoint_meta
from gptlab.config import GPTConfig, TrainConfig, _in_range, _Serializable
from gptlab.data import TokenData, load_data
from gptlab.errors import CheckpointError, ConfigError
from gptlab.tokenizer import same_encoding
from gptlab.train import LanguageModeling, TrainResult, train

DISTILL_KEY = "distill"  # checkpoint.json entry of a distillation run


@dataclass(frozen=True)
class DistillConfig(_Serializable):
    temperature: float = 2.0  # tau: both distributions are softened by it
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha goes to the data's tokens

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not 0 < self.temperature < float("inf"):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        _in_range(self, "alpha", 0.0, 1.0)


class _SoftAndHard(torch.autograd.Function):
    """(KL(softmax(t / tau) || softmax(s / tau)) over the first `vocab` ids, cross-entropy of s against y), each a mean over
    the rows of s (N, V_s), t (N, V_t), y (N,); a gradient for s only.

    Written out rather than left to autograd, as model.target_logprobs is: autograd would keep
    five (N, V) float32 buffers alive (the upcast logits, both log-softmaxes, the teacher's
    probabilities, their product) and write as many in backward, each as large as the logits
    and each paid for in page faults on CPU. Here rows go through in cache-sized chunks, in
    float32 whatever the logits' dtype, and backward writes the closed form
        d KL / d s = (softmax(s / tau) - softmax(t / tau)) / tau,   d CE / d s = softmax(s) - onehot(y)
    (per row, divided by N) straight into one buffer.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, y: Tensor, tau: float, vocab: int, chunk_elems: int) -> tuple[Tensor, Tensor]:
        N, V = s.shape
        rows = max(1, chunk_elems // V)
        kl = torch.zeros((), dtype=torch.float64)
        ce = torch.zeros((), dtype=torch.float64)
        for i in range(0, N, rows):
            ss, tt, yy = s[i : i + rows], t[i : i + rows, :vocab], y[i : i + rows, None]  # (r, V_s), (r, vocab), (r, 1)
            log_p_t = torch.log_softmax(tt.float() / tau, dim=-1)  # (r, vocab)
            log_p_s = torch.log_softmax(ss[:, :vocab].float() / tau, dim=-1)
            kl += (log_p_t.exp() * (log_p_t - log_p_s)).sum().double()
            ce -= torch.log_softmax(ss, dim=-1, dtype=torch.float32).gather(1, yy).sum().double()
        ctx.save_for_backward(s, t, y)
        ctx.tau, ctx.vocab, ctx.rows = tau, vocab, rows
        return (kl / N).float().to(s.device), (ce / N).float().to(s.device)

    @staticmethod
    def backward(ctx: Any, g_kl: Tensor, g_ce: Tensor) -> tuple[Tensor | None, ...]:
        s, t, y = ctx.saved_tensors
        tau, vocab, rows = ctx.tau, ctx.vocab, ctx.rows
        N = s.size(0)
        grad = torch.empty_like(s)
        minus_one = torch.full((rows, 1), -1.0, device=s.device)
        for i in range(0, N, rows):
            ss, tt, yy = s[i : i + rows], t[i : i + rows, :vocab], y[i : i + rows, None]
            g = torch.softmax(ss, dim=-1, dtype=torch.float32)  # (r, V_s)
            g.scatter_add_(1, yy, minus_one[: g.size(0)])  # softmax(s) - onehot(y)
            g.mul_(g_ce / N)
            soft = torch.softmax(ss[:, :vocab].float() / tau, dim=-1) - torch.softmax(tt.float() / tau, dim=-1)  # (r, vocab)
            g[:, :vocab].add_(soft.mul_(g_kl / (tau * N)))
            grad[i : i + rows] = g
        return grad, None, None, None, None, None


def distillation_loss(
    student: Tensor, teacher: Tensor, targets: Tensor, cfg: DistillConfig, vocab: int, chunk_elems: int = 1 << 20
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kl, ce) for logits (B, T, V_s) and (B, T, V_t) and targets (B, T) (-100 ignored); the KL over ids < vocab."""
    keep = targets != -100  # (B, T)
    if bool(keep.all()):  # pretraining batches: every position scored, and views instead of copies
        s, t, y = student.flatten(0, -2), teacher.flatten(0, -2), targets.flatten()  # (N, V_s), (N, V_t), (N,)
    else:
        s, t, y = student[keep], teacher[keep], targets[keep]
    kl, ce = _SoftAndHard.apply(s, t.detach(), y, cfg.temperature, vocab, chunk_elems)
    return cfg.alpha * cfg.temperature**2 * kl + (1 - cfg.alpha) * ce, kl, ce


class Distillation(LanguageModeling):
    """Next-token training on a prepared data directory, with a teacher's soft targets (see the module docstring)."""

    def __init__(self, data: TokenData, teacher: Checkpoint, cfg: DistillConfig) -> None:
        super().__init__(data)
        if HEAD_KEY in teacher.meta:
            raise CheckpointError(f"{teacher.path} is a task model (a classification head); a teacher must be a language model")
        if not same_encoding(self.tokenizer, teacher.tokenizer):
            raise ConfigError(f"the teacher {teacher.path} has another tokenizer ({teacher.tokenizer.name!r}, {teacher.tokenizer.vocab_size} ids) than "
                              f"the data in {data.path} ({self.tokenizer.name!r}, {self.tokenizer.vocab_size} ids): distillation compares "
                              f"distributions over the same ids")  # fmt: skip
        self.teacher, self.cfg, self.teacher_path = teacher.model.eval().requires_grad_(False), cfg, str(teacher.path)
        self.vocab = self.tokenizer.vocab_size

    def check(self, model_config: GPTConfig) -> None:
        super().check(model_config)
        if self.teacher.config.block_size < model_config.block_size:
            raise ConfigError(f"the teacher {self.teacher_path} reads {self.teacher.config.block_size} positions, fewer than the student's block_size ({model_config.block_size})")

    def _losses(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher = self.teacher(x)[0]  # (B, T, V_t)
        return distillation_loss(model(x)[0], teacher, y, self.cfg, self.vocab)

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> Tensor:
        return self._losses(model, batch, device)[0]

    def score(self, model: nn.Module, batch: tuple[Tensor, ...], device: torch.device) -> dict[str, float]:
        _, kl, ce = self._losses(model, batch, device)
        return {"loss": ce.item(), "kl": kl.item(), "batches": 1.0}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {**super().metrics(sums), "kl": sums["kl"] / sums["batches"]}

    def describe(self) -> list[str]:
        c = self.teacher.config
        return [*super().describe(), f"teacher: {self.teacher_path} ({c.n_layer} layers x {c.n_embd}); temperature {self.cfg.temperature:g}, alpha {self.cfg.alpha:g}"]

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), DISTILL_KEY: {"teacher": self.teacher_path, **self.cfg.to_dict()}}


def distill(
    teacher: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str], student: GPTConfig | None, train_config: TrainConfig | None,
    settings: dict[str, float] | None = None, *, resume: bool = False, stop_at: int | None = None, progress: bool = True,
    resume_overrides: dict[str, Any] | None = None, report: Callable[[str], None] | None = None, started: float | None = None,
) -> TrainResult:  # fmt: skip
    """Train a student (`student`: its config; None when resuming) on `data` with `teacher`'s soft targets, into the run `out`.

    `settings` holds DistillConfig fields (temperature, alpha): a new run fills the rest with the
    defaults; a resumed run keeps the teacher and settings it was started with (they are in its
    checkpoints) and refuses different ones, since changing them mid-run breaks exact resume.
    """
    settings = dict(settings or {})
    last = find_checkpoint(out) if resume and Path(out).is_dir() else None
    if last is not None:
        saved = read_checkpoint_meta(last).get(DISTILL_KEY)
        if not isinstance(saved, dict):
            raise CheckpointError(f"{last} is not a distillation run's checkpoint; resume it with the command that started it")
        if Path(find_checkpoint(teacher) or teacher).resolve() != Path(saved["teacher"]).resolve():
            raise ConfigError(f"{out} was distilled from {saved['teacher']}, not {teacher}: a resumed run keeps its teacher")
        for key, value in settings.items():
            if value != saved[key]:
                raise ConfigError(f"{out} was distilled with {key} {saved[key]:g}, not {value:g}: a resumed run keeps its settings")
        settings = {k: saved[k] for k in DistillConfig.__dataclass_fields__}
    objective = Distillation(load_data(data), load_checkpoint(teacher), DistillConfig(**settings))
    return train(
        None if last else student, None if last else train_config, objective, out, resume=resume, stop_at=stop_at, progress=progress,
        resume_overrides=resume_overrides, report=report, started=started, checkpoint_meta={DISTILL_KEY: objective.run_info()[DISTILL_KEY]},
    )  # fmt: skip


def student_config(teacher: GPTConfig, changes: dict[str, Any]) -> GPTConfig:
    """The student's shape: the teacher's with `changes`; with none, half its layers (as DistilBERT, Sanh et al. 2019)."""
    return teacher.replace(**(changes or {"n_layer": max(1, teacher.n_layer // 2)}))
