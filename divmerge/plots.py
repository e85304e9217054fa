"""Report figures: the learned coefficients as a heatmap and the training divergence curve."""

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from torch import Tensor

from divmerge.disk import write_atomic

FIX = "free space in the log directory, or set the logger's save_dir to a disk with room"


def plot_coefficients(
    table: Tensor, task_names: Sequence[str], group_labels: Sequence[str], path: Path
) -> Path:
    """Heatmap of the coefficient table: tasks (rows) x coefficient groups (columns).

    Args:
        table: Coefficients, shape (T, G).
        task_names: T row labels.
        group_labels: G column labels (tensor or block names).
        path: Output PNG.

    Returns:
        The PNG path.
    """
    values = table.detach().float().cpu().numpy()  # (T, G)
    width = min(24.0, 3.0 + 0.12 * values.shape[1])
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.5 * values.shape[0]))
    bound = max(abs(values.min()), abs(values.max()), 1e-6)
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_yticks(range(len(task_names)), labels=list(task_names))
    step = max(1, len(group_labels) // 40)
    ticks = list(range(0, len(group_labels), step))
    ax.set_xticks(ticks, labels=[group_labels[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_title("learned merge coefficients (task x parameter group)")
    fig.colorbar(image, ax=ax, fraction=0.02)
    png = io.BytesIO()  # rendered first: a full disk then names the size needed
    try:
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")  # grows the canvas to fit long labels
    finally:
        plt.close(fig)
    write_atomic(path, png.getvalue(), FIX)
    return path


def plot_divergence(metrics_csv: Path, path: Path) -> Path | None:
    """Training divergence per task and summed (and the held-out val divergence), against the step.

    Args:
        metrics_csv: The logger's ``metrics.csv``.
        path: Output PNG.

    Returns:
        The PNG path, or None when the file holds no training divergence.
    """
    metrics = pd.read_csv(metrics_csv)
    columns = [c for c in metrics.columns if c.startswith("train/")]
    if not columns or "step" not in metrics.columns:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for column in columns:
        series = metrics[["step", column]].dropna()
        smooth = series[column].rolling(5, min_periods=1).mean()  # single batches are noisy
        width = 2 if column == "train/loss" else 1
        (line,) = ax.plot(series["step"], smooth, label=column.removeprefix("train/"), lw=width)
        ax.plot(series["step"], series[column], color=line.get_color(), alpha=0.2, lw=0.8)
    if "val/divergence" in metrics.columns:  # held-out inputs, summed over tasks like train/loss
        held = metrics[["step", "val/divergence"]].dropna()
        ax.plot(held["step"], held["val/divergence"], "k--o", ms=3, lw=1.5, label="val (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("divergence (nats)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("training divergence (rolling mean of 5 logged steps; raw faint)")
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_atomic(path, png.getvalue(), FIX)
    return path
