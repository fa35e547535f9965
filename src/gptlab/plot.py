"""`gptlab plot RUN_DIR`: training curves from metrics.jsonl as PNG files."""

from __future__ import annotations

import json
from pathlib import Path

from gptlab.errors import DataError
from gptlab.fileio import check_writable
from gptlab.train import METRICS_FILE


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no metrics file (is {run_dir} a training run directory?)")
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # a running trainer may be half-way through writing its last line
                break
            raise DataError(f"{path}:{n}: not a JSON line") from None
    if not records:
        raise DataError(f"{path}: empty, nothing to plot yet")
    return records


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png (train and validation loss) and lr.png; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    check_writable(out, "plot directory")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{Path(run_dir).name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    written.append(out / "loss.png")

    if lrs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(*zip(*lrs), linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{Path(run_dir).name}: learning rate")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "lr.png", dpi=120)
        plt.close(fig)
        written.append(out / "lr.png")
    return written
