"""Checkpoints: weights in safetensors, everything else in JSON or weights-only torch files.

A checkpoint is a directory `RUN_DIR/checkpoints/step_NNNNNNNN/`:

    model.safetensors   parameters (tied weights stored once)
    checkpoint.json     format, step, model config, train config, sha256 of each file, metrics
    tokenizer.json      the tokenizer, so the directory is self-contained
    trainer.pt          optimizer, RNG and data-loader position (tensors and plain containers only;
                        loaded with torch.load(weights_only=True), so loading runs no pickled code)

The directory is built under a temporary name and renamed into place, then the
run's `latest` file is replaced atomically: a crash at any moment leaves either
the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as _load_safetensors_model
from safetensors.torch import save_file as _save_safetensors
from safetensors.torch import save_model as _save_safetensors_model

from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import CheckpointError, ConfigError
from gptlab.fileio import staged_dir, write_atomic
from gptlab.model import GPT
from gptlab.tokenizer import AnyTokenizer, read_tokenizer

FORMAT = "gptlab-checkpoint"
CKPT_SUBDIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_FILE = "trainer.pt"
CORE_META_KEYS = ("format", "version", "step", "model_config", "train_config", "files", "metrics")  # the rest: extra_meta
LORA_KEY = "lora"  # checkpoint.json entry of an adapter checkpoint (see gptlab.finetune.lora)
HEAD_KEY = "task_head"  # checkpoint.json entry of a model with a task head (see gptlab.finetune.heads)
QUANT_KEY = "quantization"  # checkpoint.json entry of a quantized model (see gptlab.compress.quantize)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns; `trainer_state` is None unless asked for."""

    path: Path
    step: int
    model: GPT
    model_config: GPTConfig
    train_config: TrainConfig | None
    tokenizer: AnyTokenizer
    meta: dict[str, Any]
    trainer_state: dict[str, Any] | None = None


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def write_checkpoint_dir(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    model_config: GPTConfig,
    tokenizer: AnyTokenizer,
    train_config: TrainConfig | None = None,
    trainer_state: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint's files into `directory` (empty; the caller publishes it, see fileio.staged_dir).

    With a "lora" entry in extra_meta (a LoRA fine-tuning run), model.safetensors holds only the
    adapter; loading rebuilds the model from the base checkpoint it names.
    """
    lora = (extra_meta or {}).get(LORA_KEY)
    if lora is not None:
        from gptlab.finetune.lora import adapter_tensors  # LoRA builds on this module, so it is imported on use

        _save_safetensors(adapter_tensors(model, lora), str(directory / MODEL_FILE))
    else:
        _save_safetensors_model(model, str(directory / MODEL_FILE))
    (directory / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict()))
    if trainer_state is not None:
        torch.save(trainer_state, directory / TRAINER_FILE)
    files = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    meta = {
        "format": FORMAT,
        "version": 1,
        "step": step,
        "model_config": model_config.to_dict(),
        "train_config": train_config.to_dict() if train_config is not None else None,
        "files": files,
        "metrics": metrics or {},
        **(extra_meta or {}),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives in a run directory."""
    return Path(run_dir) / CKPT_SUBDIR / f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    model_config: GPTConfig,
    tokenizer: AnyTokenizer,
    train_config: TrainConfig | None = None,
    trainer_state: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    keep_last: int | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint for `step` atomically and return its directory; prune to the newest `keep_last`.

    Re-saving a step (e.g. after a resume) replaces the old copy.
    """
    final = checkpoint_path(run_dir, step)
    # copies a killed process left half-written (or set aside) are never read; clear them away
    for stale in itertools.chain(final.parent.glob(".step_*.tmp-*"), final.parent.glob(".step_*.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    with staged_dir(final) as tmp:
        write_checkpoint_dir(tmp, step, model, model_config, tokenizer, train_config, trainer_state, metrics, extra_meta)
    write_atomic(Path(run_dir) / LATEST_FILE, f"{CKPT_SUBDIR}/{final.name}\n".encode())
    if keep_last is not None:
        for old in step_dirs(run_dir)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """Resolve a checkpoint directory, or a run directory to its latest checkpoint (None if it has none yet)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    latest = path / LATEST_FILE
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / META_FILE).is_file():
            return target
    dirs = step_dirs(path)
    return dirs[-1] if dirs else None


def read_checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    """checkpoint.json of a checkpoint directory (cheap: loads no weights)."""
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt / META_FILE}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / META_FILE}: not a gptlab checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def _verify(ckpt: Path, meta: dict[str, Any], names: list[str]) -> None:
    for name in names:
        path = ckpt / name
        expected = meta.get("files", {}).get(name)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint")
        if expected is not None and _sha256(path) != expected:
            raise CheckpointError(f"{path}: corrupted (sha256 does not match the one recorded at save time)")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", with_trainer_state: bool = False, merge_lora: bool = True) -> Checkpoint:
    """Load a checkpoint (or a run directory's latest). Verifies checksums; never executes pickled code.

    An adapter checkpoint (a LoRA run's) is rebuilt from its base; with merge_lora (the default:
    what sampling, evaluation and export want) the adapters are folded into plain Linear
    weights, otherwise the model keeps its LoRA layers (to resume training them). A quantized
    checkpoint (`gptlab quantize`) comes back with its QuantLinears, ready for inference.
    """
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: run directory has no checkpoint yet")
    meta = read_checkpoint_meta(ckpt)
    names = [MODEL_FILE, TOKENIZER_FILE] + ([TRAINER_FILE] if with_trainer_state else [])
    _verify(ckpt, meta, names)
    try:
        model_config = GPTConfig.from_dict(meta["model_config"])
        train_config = TrainConfig.from_dict(meta["train_config"]) if meta.get("train_config") else None
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{ckpt / META_FILE}: invalid config ({err})") from None
    if LORA_KEY in meta:
        from gptlab.finetune.lora import load_adapter_checkpoint, merge_lora as merge  # LoRA builds on this module

        model = load_adapter_checkpoint(ckpt / MODEL_FILE, meta[LORA_KEY], model_config, device)
        if merge_lora:
            merge(model)
    else:
        if HEAD_KEY in meta:
            from gptlab.finetune.heads import task_model_for  # task heads build on this module, so it is imported on use

            model = task_model_for(model_config, meta[HEAD_KEY], ckpt / META_FILE)
        else:
            model = GPT(model_config)
        if QUANT_KEY in meta:
            from gptlab.compress.quantize import QuantConfig, quantize_model  # quantization builds on this module

            try:
                quantize_model(model, QuantConfig.from_dict(meta[QUANT_KEY]), empty=True)
            except (TypeError, ConfigError) as err:
                raise CheckpointError(f"{ckpt / META_FILE}: invalid quantization entry ({err})") from None
        try:
            missing, unexpected = _load_safetensors_model(model, str(ckpt / MODEL_FILE), strict=False, device=str(device))
        except (SafetensorError, RuntimeError, OSError) as err:
            raise CheckpointError(f"{ckpt / MODEL_FILE}: cannot load weights ({err})") from None
        if missing or unexpected:
            raise CheckpointError(f"{ckpt / MODEL_FILE}: weights do not match the config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.to(device)
    tokenizer = read_tokenizer(ckpt / TOKENIZER_FILE)
    trainer_state = None
    if with_trainer_state:
        try:
            trainer_state = torch.load(ckpt / TRAINER_FILE, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"{ckpt / TRAINER_FILE}: cannot load ({err})") from None
    return Checkpoint(
        path=ckpt,
        step=int(meta["step"]),
        model=model,
        model_config=model_config,
        train_config=train_config,
        tokenizer=tokenizer,
        meta=meta,
        trainer_state=trainer_state,
    )
