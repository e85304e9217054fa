"""Merge coefficients: the only trainable tensors in divmerge.

One table ``c`` of shape (T, G): T experts (tasks) by G groups of parameter tensors. The coefficient
space (``granularity``) decides the groups; each space is one file of this package and one line of
``SPACES``:

- ``task``: G = 1, one coefficient per task (task arithmetic with a learned lambda per task).
- ``layer``: G = number of merged parameter tensors, one coefficient per task per tensor
  (AdaMerging's "layer-wise").
- ``block``: one group per transformer block (tensors whose name holds ``.<n>.``), every other tensor
  (embeddings, pooler, final norm) in its own group.
"""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from divmerge.core.coefficients.base import CoefficientSpace
from divmerge.core.coefficients.block import BlockSpace
from divmerge.core.coefficients.layer import LayerSpace
from divmerge.core.coefficients.task import TaskSpace
from divmerge.errors import DivMergeError

SPACES: dict[str, CoefficientSpace] = {"task": TaskSpace(), "layer": LayerSpace(), "block": BlockSpace()}
Granularity = Literal["task", "layer", "block"]  # the keys of SPACES, for --help
GRANULARITIES: tuple[str, ...] = tuple(SPACES)


def get_space(granularity: str) -> CoefficientSpace:
    """The coefficient space registered under ``granularity``, with one clear error for unknown names."""
    if granularity not in SPACES:
        raise DivMergeError(f"Unknown granularity {granularity!r}: use one of {list(GRANULARITIES)}.")
    return SPACES[granularity]


def group_tensors(names: Sequence[str], granularity: Granularity) -> list[int]:
    """Assign every merged tensor to a coefficient group.

    Args:
        names: Names of the merged parameter tensors, in merge order.
        granularity: A key of ``SPACES`` (``task``, ``layer`` or ``block``).

    Returns:
        For each name, the index of its group (column of the coefficient table).

    """
    return get_space(granularity).groups(names)


class MergeCoefficients(nn.Module):
    """A (T, G) table of learnable merge coefficients.

    Args:
        num_tasks: Number of experts T.
        names: Names of the merged tensors (defines the groups).
        granularity: A key of ``SPACES``: ``task``, ``layer`` or ``block``.
        init: Initial value of every coefficient; None means 1/T (DivMerge, Algorithm 1).
        clamp: Optional (low, high) bounds applied in the forward pass; None leaves them unconstrained.

    """

    def __init__(
        self,
        num_tasks: int,
        names: Sequence[str],
        granularity: Granularity = "layer",
        init: float | None = None,
        clamp: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise DivMergeError("Merging needs at least one expert: list them under model.experts.")
        if clamp is not None and not clamp[0] < clamp[1]:
            raise DivMergeError(f"Coefficient clamp {clamp} must be (low, high) with low < high.")
        self.granularity = granularity
        self.clamp = clamp
        self.space = get_space(granularity)
        groups = self.space.groups(names)
        self.group_of = dict(zip(names, groups, strict=True))
        num_groups = max(groups) + 1 if groups else 1
        value = 1.0 / num_tasks if init is None else float(init)
        self.weight = nn.Parameter(torch.full((num_tasks, num_groups), value))  # (T, G)

    def forward(self) -> Tensor:
        """Return the (clamped) coefficient table, shape (T, G)."""
        if self.clamp is None:
            return self.weight
        return self.weight.clamp(*self.clamp)

    def group_labels(self) -> list[str]:
        """One label per group (column): the tensor name, the block, or ``all`` for task-wise."""
        return self.space.labels(list(self.group_of), list(self.group_of.values()))

    def column(self, table: Tensor, name: str) -> Tensor:
        """Coefficients of one tensor across tasks, shape (T,)."""
        return table[:, self.group_of[name]]
