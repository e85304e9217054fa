"""The model card (README.md) of an export: experts, method, coefficients, details and usage."""

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divmerge.export.common import EXPORT_FILE


def coefficient_stats(table: Tensor, task_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-task summary of a coefficient table, for the export summary and model card.

    Args:
        table: Coefficients, shape (T, G).
        task_names: The T task names, in table order.

    Returns:
        Task name -> ``{"mean", "min", "max", "std"}`` over that task's G coefficients.

    """
    table = table.detach().to(torch.float64).cpu()
    stats = {}
    for t, task in enumerate(task_names):
        row = table[t]  # (G,)
        std = row.std(unbiased=False).item() if row.numel() > 1 else 0.0
        stats[task] = {
            "mean": row.mean().item(),
            "min": row.min().item(),
            "max": row.max().item(),
            "std": std,
        }
    return stats


def model_card(
    out: Path,
    base_source: str,
    backbone: Mapping[str, Any],
    tasks: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
) -> str:
    """The README.md model card."""
    method = str(summary.get("method", "unspecified"))
    sections = [
        "---\nlibrary_name: transformers\ntags:\n- divmerge\n- model-merging\n- merge\n---\n",
        f"# Merged model ({md(method)}, {len(tasks)} experts)\n\n"
        f"A {backbone['model_type']} backbone merged by divmerge from {len(tasks)} fine-tuned experts, "
        "with each expert's own (unmerged) classification head.\n",
        _card_experts(tasks, summary),
        _card_method(method, base_source, backbone, summary),
        _card_coefficients(tasks, summary),
        _card_details(summary),
        _card_usage(out, next(iter(tasks), "<task>")),
    ]
    return "\n".join(s for s in sections if s)


def _card_experts(tasks: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """Experts table: task, source, labels, head directory."""
    experts = summary.get("experts")
    experts = experts if isinstance(experts, Mapping) else {}
    rows = ["## Experts\n", "| Task | Source | Labels | Head |", "|---|---|---|---|"]
    for task, entry in tasks.items():
        labels = ", ".join(str(v) for v in entry["id2label"].values())
        source = experts.get(task, "(not given)")
        rows.append(
            f"| {md(task)} | {md(source)} | {entry['num_labels']} ({md(labels)}) | `{entry['dir']}/` |"
        )
    return "\n".join(rows) + "\n"


def _card_method(method: str, base_source: str, backbone: Mapping[str, Any], summary: Mapping) -> str:
    """Method section: method, objective, granularity, base model, merged tensors."""
    lines = ["## Method\n", f"- Method: {md(method)}"]
    for key in ("objective", "granularity"):
        if key in summary:
            lines.append(f"- {key.capitalize()}: {md(summary[key])}")
    lines.append(f"- Base model: {md(base_source)}")
    lines.append(
        f"- Backbone: `{backbone['architecture']}` ({backbone['dtype']}), {len(backbone['merged'])} merged "
        f"tensors, {len(backbone['from_base'])} copied unchanged from the base"
    )
    return "\n".join(lines) + "\n"


def _card_coefficients(tasks: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """Coefficient statistics per task, if the summary has them."""
    stats = summary.get("coefficients")
    if not isinstance(stats, Mapping) or not stats:
        return "## Coefficients\n\nNo coefficient summary was given.\n"
    keys: list[str] = []
    for entry in stats.values():
        if isinstance(entry, Mapping):
            keys += [k for k in entry if k not in keys]
    if not keys:
        return f"## Coefficients\n\n{md(stats)}\n"
    rows = ["## Coefficients\n", "| Task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for task in [*tasks, *(t for t in stats if t not in tasks)]:
        entry = stats.get(task)
        if isinstance(entry, Mapping):
            rows.append(f"| {md(task)} | " + " | ".join(_number(entry.get(k)) for k in keys) + " |")
    return "\n".join(rows) + "\n"


def _card_details(summary: Mapping[str, Any]) -> str:
    """Every other summary entry, one line each."""
    shown = {"method", "objective", "granularity", "coefficients", "experts"}
    lines = [f"- {md(k)}: {md(_compact(v))}" for k, v in summary.items() if k not in shown]
    return "## Details\n\n" + "\n".join(lines) + "\n" if lines else ""


def _card_usage(out: Path, task: str) -> str:
    """How to load the backbone and a task model."""
    path = f"path/to/{out.name}"
    return (
        "## How to load\n\n"
        "The backbone is a plain Hugging Face model:\n\n"
        "```python\n"
        "from transformers import AutoModel, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")\n'
        f'backbone = AutoModel.from_pretrained("{path}")\n'
        "```\n\n"
        "A task's classifier (merged backbone + that expert's head), with divmerge installed:\n\n"
        "```python\n"
        "from divmerge.export import load_task_model\n\n"
        f'model = load_task_model("{path}", "{task}")  # AutoModelForSequenceClassification, eval mode\n'
        "```\n\n"
        f"`{EXPORT_FILE}` lists the tasks, the backbone's tensors, the merge summary and every file.\n"
    )


def md(value: Any) -> str:
    """A value as one line of Markdown table text."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> str:
    """Format a statistic for the card."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return md("" if value is None else value)


def _compact(value: Any) -> str:
    """A JSON-ish single-line rendering of a summary value."""
    value = jsonable(value)
    return value if isinstance(value, str) else json.dumps(value)


def jsonable(value: Any) -> Any:
    """Convert a summary value to JSON-serializable data (tensors, paths, tuples, numpy scalars...)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        with contextlib.suppress(Exception):
            return jsonable(value.item())
    return str(value)
