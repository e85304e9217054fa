"""Evaluation reports: per-task accuracy of expert, reference merge and learned merge, and ANP.

ANP (average normalised performance) = mean over tasks of merged accuracy / expert accuracy, as in
DivMerge (arXiv 2509.02108) and "What Matters for Model Merging at Scale?" (arXiv 2410.03617).
Held-out tasks (no expert merged) are reported apart: merged accuracy / base-backbone accuracy with the
same head, averaged over held-out tasks. A task whose expert scores 0 on it has no normalised score: it
is left out of ANP and the table says so in one line below it (never a ``nan`` in the ANP row).

Where each row's 0/1 correctness was kept (``TaskResult.rows``), every ANP carries a 95% bootstrap
interval over the test rows (``anp_interval``, ``divmerge.intervals``): in the table's ANP rows as
``0.9596 [0.9478, 0.9702]`` and in the JSON report as ``anp_ci``.
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from divmerge.disk import write_atomic
from divmerge.intervals import Interval, mean_ratio_interval


@dataclass(frozen=True)
class TaskResult:
    """Accuracies of one task on one split (``expert`` is base + head for a held-out task).

    ``rows``, where kept: ``expert`` / ``merged`` / ``reference`` -> each test row's 0/1 correctness
    (N,), in row order: what the bootstrap intervals resample. Not part of the JSON report.
    """

    task: str
    examples: int
    expert: float
    merged: float
    reference: float | None = None
    held_out: bool = False
    rows: Mapping[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def normalised(self) -> float:
        """Merged accuracy divided by the expert's; NaN when the expert scores 0 (see ``zero_experts``)."""
        return self.merged / self.expert if self.expert > 0 else math.nan


def zero_experts(results: list[TaskResult]) -> list[str]:
    """Names of the tasks whose expert (or, held out, base + head) scores 0: left out of ANP.

    Args:
        results: Per-task results.

    Returns:
        Task names, in order.
    """
    return [r.task for r in results if r.expert <= 0]


def zero_expert_note(results: list[TaskResult]) -> str | None:
    """One line naming the tasks left out of ANP because their expert scores 0, and what to check.

    Args:
        results: Per-task results.

    Returns:
        The line, or None when every expert scores above 0.
    """
    names = zero_experts(results)
    if not names:
        return None
    listed = ", ".join(repr(n) for n in names)
    return (
        f"Note: the expert of {listed} scores 0 on its own task, so merged/expert is undefined and the "
        "task is left out of ANP: check that the expert answers in the task's label words or answer format "
        "(label_names, answer_column, prompt_template) and that it was fine-tuned for this task."
    )


def anp(results: list[TaskResult], reference: bool = False, held_out: bool = False) -> float:
    """Average normalised performance over the held-in (or held-out) tasks.

    Args:
        results: Per-task results.
        reference: Score the reference merge instead of the learned one.
        held_out: Average over held-out tasks (normalised by base + head) instead of held-in ones.

    Returns:
        Mean of (merged or reference) / expert accuracy over the tasks whose expert scores above 0;
        NaN without such tasks, or when a task has no (reference) score.
    """
    ratios = []
    for r in results:
        if r.held_out != held_out or r.expert <= 0:
            continue
        value = r.reference if reference else r.merged
        if value is None:
            return math.nan
        ratios.append(value / r.expert)
    return sum(ratios) / len(ratios) if ratios else math.nan


def anp_interval(
    results: list[TaskResult], reference: bool = False, held_out: bool = False, **options: float
) -> Interval | None:
    """Bootstrap interval of ``anp(results, reference, held_out)`` over the test rows, stratified by task.

    Resamples each task's rows on their own, the expert's and the merge's correctness as pairs, and
    recomputes the mean of merged / expert over the same tasks as ``anp`` (``divmerge.intervals``).

    Args:
        results: Per-task results, with ``rows`` kept.
        reference: The reference merge's ANP instead of the learned one's.
        held_out: The held-out tasks' ANP (normalised by base + head) instead of the held-in one.
        **options: ``level``, ``resamples``, ``seed`` of ``divmerge.intervals.mean_ratio_interval``.

    Returns:
        The interval; None when some task's rows were not kept, or without tasks in ANP.
    """
    name = "reference" if reference else "merged"
    chosen = [r for r in results if r.held_out == held_out and r.expert > 0]
    if not chosen or any(r.rows is None or name not in r.rows for r in chosen):
        return None
    expert = {r.task: r.rows["expert"] for r in chosen}
    return mean_ratio_interval(expert, [{r.task: r.rows[name] for r in chosen}], **options)


def with_interval(value: float, interval: Interval | None) -> str:
    """``0.9596``, or with its interval ``0.9596 [0.9478, 0.9702]``."""
    text = f"{value:.4f}"
    return text if interval is None else f"{text} [{interval.low:.4f}, {interval.high:.4f}]"


def format_table(results: list[TaskResult], reference_name: str = "task arithmetic") -> str:
    """A markdown table: one row per task, then the ANP row.

    Args:
        results: Per-task results.
        reference_name: Column title of the reference merge.

    Returns:
        The table as text, followed by ``zero_expert_note``'s line when some expert scores 0. Where
        rows were kept, each ANP cell carries its 95% bootstrap interval (``anp_interval``).

    """
    has_ref = all(r.reference is not None for r in results) and results
    head = ["task", "n", "expert"] + ([reference_name] if has_ref else []) + ["merged", "merged/expert"]
    rows = []
    for r in results:
        ref = [f"{r.reference:.4f}"] if has_ref else []
        name = f"{r.task} (held-out)" if r.held_out else r.task
        ratio = f"{r.normalised:.4f}" if r.expert > 0 else "n/a"
        rows.append([name, str(r.examples), f"{r.expert:.4f}", *ref, f"{r.merged:.4f}", ratio])
    for title, held_out in [("ANP", False)] + [("held-out vs base", True)] * any(r.held_out for r in results):
        # held out: normalised against the base backbone with the task's head
        cells = [title, "", "1.0000"]
        if has_ref:
            cells.append(with_interval(anp(results, True, held_out), anp_interval(results, True, held_out)))
        cells.append(with_interval(anp(results, held_out=held_out), anp_interval(results, held_out=held_out)))
        rows.append([*cells, ""])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    note = zero_expert_note(results)
    return "\n".join([line(head), sep, *(line(r) for r in rows), *([note] if note else [])])


def _finite(x: float) -> float | None:
    """``x``, or None for NaN (JSON has no NaN)."""
    return None if math.isnan(x) else x


def write_report(results: list[TaskResult], directory: str | Path, split: str) -> Path:
    """Write ``report_<split>.md`` and ``report_<split>.json`` into ``directory``.

    The JSON holds each ANP (``anp``, ``reference_anp``, ``held_out_anp``) and beside it its bootstrap
    interval (``anp_ci`` ...: low, high, level, resamples, seed, method; null where rows were not kept).

    Args:
        results: Per-task results.
        directory: Output directory (created if needed).
        split: Split name used in the file names.

    Returns:
        The markdown file's path.

    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"split": split}
    for key, reference, held_out in [
        ("anp", False, False),
        ("reference_anp", True, False),
        ("held_out_anp", False, True),
    ]:
        interval = anp_interval(results, reference, held_out)
        payload[key] = _finite(anp(results, reference, held_out))
        payload[f"{key}_ci"] = None if interval is None else interval.as_dict()
    payload["left_out_of_anp"] = zero_experts(results)
    reported = [f.name for f in fields(TaskResult) if f.name != "rows"]
    payload["tasks"] = [
        {name: getattr(r, name) for name in reported} | {"normalised": _finite(r.normalised)} for r in results
    ]
    fix = "free space in the log directory, or set the logger's save_dir to a disk with room"
    write_atomic(directory / f"report_{split}.json", json.dumps(payload, indent=2, allow_nan=False), fix)
    md = write_atomic(directory / f"report_{split}.md", format_table(results) + "\n", fix)
    return md
