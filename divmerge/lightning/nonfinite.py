"""Non-finite numbers during a run: training stops on them, and no checkpoint or table ever shows them.

- A step whose loss is NaN or inf stops the run in ``training_step``, before backward and the optimizer
  step (so the coefficients are still the last finite ones), naming the step and the task.
- An optimizer step that leaves a coefficient NaN or inf (a finite loss with an overflowing gradient)
  stops the run right after that step, before any checkpoint hook runs.
- Either way the run exits with one line (code 2) and keeps the checkpoints it wrote
  (``RunStoppedError``): the last one holds a finite merge.
- A merge whose coefficients are not finite is never evaluated: validation and test refuse it instead of
  reporting ANP (NaN logits all have argmax 0, so expert and merge "agree" and ANP reads 1.0000).
"""

from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch import Tensor

from divmerge.errors import DivMergeError, RunStoppedError
from divmerge.experts.finite import nonfinite_kind

_FIX = "lower model.lr (or set model.clamp), then train again"


def nonfinite_task(table: Tensor, tasks: Sequence[str]) -> tuple[str, str] | None:
    """(task, kind) of the first row of a coefficient table (T, G) holding NaN or inf; None: all finite."""
    for task, row in zip(tasks, table.detach(), strict=False):
        kind = nonfinite_kind(row)
        if kind is not None:
            return task, kind
    return None


def _kept(module: L.LightningModule) -> str:
    """Which checkpoint the stopped run keeps, in words."""
    callback = module.trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if path:
        return f"the last checkpoint, {str(path)!r}, holds a finite merge (resume from it with --ckpt_path)"
    return "this run had written no checkpoint yet"


def check_step_loss(module: L.LightningModule, loss: Tensor, per_task: Mapping[str, Tensor]) -> None:
    """Stop the run when this step's loss is NaN or inf, before it changes the coefficients.

    Every rank decides alike (one all-reduce of a flag under several processes), so no rank waits for
    another in the gradient's all-reduce.

    Args:
        module: The training module (attached to its trainer).
        loss: The step's loss (0-d).
        per_task: Each task's detached loss (0-d) on this rank.

    Raises:
        RunStoppedError: Naming the step and the (first) task whose loss is not finite.
    """
    finite = bool(torch.isfinite(torch.stack([loss.detach(), *per_task.values()])).all())  # one sync
    if not module.trainer.strategy.reduce_boolean_decision(not finite, all=False):
        return
    step = module.trainer.global_step + 1
    bad = [(task, float(value)) for task, value in per_task.items() if not torch.isfinite(value)]
    what = f"the loss of task {bad[0][0]!r} is {bad[0][1]}" if bad else "the loss is not finite on a rank"
    raise RunStoppedError(
        f"Training step {step}: {what}, so the run stopped before that step changed the coefficients; "
        f"{_kept(module)}: {_FIX}."
    )


def check_coefficients_after_step(module: L.LightningModule, table: Tensor, tasks: Sequence[str]) -> None:
    """Stop the run when the optimizer step just taken left a coefficient NaN or inf (before any checkpoint).

    Call it from ``LightningModule.optimizer_step``, after the step: Lightning counts the step (global_step)
    once that returns, and saves checkpoints later still.

    Args:
        module: The training module (attached to its trainer).
        table: The coefficients (T, G), the same on every rank.
        tasks: Task names, one per row.

    Raises:
        RunStoppedError: Naming the step and the task whose coefficients are not finite.
    """
    found = nonfinite_task(table, tasks)
    if found is None:
        return
    raise RunStoppedError(
        f"Training step {module.trainer.global_step + 1}: the optimizer step made the coefficients of task "
        f"{found[0]!r} {found[1]} (the gradient overflowed), so the run stopped before a checkpoint could "
        f"record them; {_kept(module)}: {_FIX}."
    )


def refuse_nonfinite_merge(
    table: Tensor, tasks: Sequence[str], action: str, error: type[DivMergeError] = DivMergeError
) -> None:
    """Refuse to evaluate, save or export a merge whose coefficients are NaN or inf.

    Args:
        table: The coefficients (T, G).
        tasks: Task names, one per row.
        action: What is refused, e.g. ``"evaluated"``.
        error: The error raised (``RunStoppedError`` mid-run: the checkpoints written so far are kept).

    Raises:
        DivMergeError: Naming the task whose coefficients are not finite.
    """
    found = nonfinite_task(table, tasks)
    if found is not None:
        raise error(
            f"The merge's coefficients for task {found[0]!r} are {found[1]}, so it is not {action} (no "
            "ANP for a non-finite merge): use a checkpoint of a finite merge (an earlier one), or "
            f"{_FIX}."
        )
