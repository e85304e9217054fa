"""Merge coefficients: the only trainable tensors in divmerge.

One table ``c`` of shape (T, G): T experts (tasks) by G columns. The coefficient space (``granularity``)
lays the merged tensors out over the columns, stores their task vectors and merges them; each space is
one file of this package and one line of ``SPACES``:

- ``task``: G = 1, one coefficient per task (task arithmetic with a learned lambda per task).
- ``layer``: one coefficient per task per merged tensor (AdaMerging's "layer-wise").
- ``block``: one group per transformer block (tensors whose name holds ``.<n>.``), every other tensor
  (embeddings, pooler, final norm) in its own group.
- ``row``: one coefficient per task per output row of every weight matrix (DAM-like).
- ``svd``: one per task per singular direction of every matrix task vector, stored at rank ``rank``
  (AdaRank-like).
"""

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Size, Tensor, nn

from divmerge.core.coefficients.base import CoefficientSpace, Layout, Stored
from divmerge.core.coefficients.block import BlockSpace
from divmerge.core.coefficients.layer import LayerSpace
from divmerge.core.coefficients.row import RowSpace
from divmerge.core.coefficients.svd import SvdSpace
from divmerge.core.coefficients.task import TaskSpace
from divmerge.errors import DivMergeError

SPACES: dict[str, Callable[..., CoefficientSpace]] = {
    "task": TaskSpace,
    "layer": LayerSpace,
    "block": BlockSpace,
    "row": RowSpace,
    "svd": SvdSpace,
}
Granularity = Literal["task", "layer", "block", "row", "svd"]  # the keys of SPACES, for --help
GRANULARITIES: tuple[str, ...] = tuple(SPACES)

__all__ = [
    "GRANULARITIES",
    "SPACES",
    "Granularity",
    "Layout",
    "MergeCoefficients",
    "Stored",
    "get_space",
    "parse_space",
]


def parse_space(text: str) -> tuple[str, dict[str, int]]:
    """A space as a method name spells it: ``layer`` -> (``layer``, {}); ``svd8`` -> (``svd``, {rank: 8}).

    A trailing number is the rank of a space that takes one (``rank`` in its signature).

    Args:
        text: A key of ``SPACES``, optionally followed by a rank of at least 1.

    Returns:
        (granularity, space options).

    Raises:
        DivMergeError: For an unknown space, or a rank on a space that takes none, in one line.
    """
    if text in SPACES:
        return text, {}
    found = re.fullmatch(r"([a-z_]+)(\d+)", text)
    if found and found.group(1) in SPACES and int(found.group(2)) >= 1:
        name = found.group(1)
        if "rank" in inspect.signature(SPACES[name]).parameters:
            return name, {"rank": int(found.group(2))}
    raise DivMergeError(
        f"Unknown coefficient space {text!r}: use one of {list(GRANULARITIES)} (svd<r> for rank r >= 1)."
    )


def get_space(granularity: str, options: Mapping[str, Any] | None = None) -> CoefficientSpace:
    """The coefficient space registered under ``granularity``, built with its options.

    Args:
        granularity: A key of ``SPACES``.
        options: The space's options (``svd``: ``rank``); the other spaces take none.

    Returns:
        The space.

    Raises:
        DivMergeError: For an unknown name or options the space does not take, in one line.
    """
    if granularity not in SPACES:
        raise DivMergeError(f"Unknown granularity {granularity!r}: use one of {list(GRANULARITIES)}.")
    try:
        return SPACES[granularity](**dict(options or {}))
    except TypeError:
        raise DivMergeError(
            f"Granularity {granularity!r} does not take space_options {sorted(options or {})}: "
            "svd takes rank; the other spaces take none."
        ) from None


class MergeCoefficients(nn.Module):
    """A (T, G) table of learnable merge coefficients.

    Args:
        num_tasks: Number of experts T.
        shapes: Shape of each merged tensor, in merge order (defines the columns).
        granularity: A key of ``SPACES``: ``task``, ``layer``, ``block``, ``row`` or ``svd``.
        init: Initial value of every coefficient; None means 1/T (DivMerge, Algorithm 1).
        clamp: Optional (low, high) bounds applied in the forward pass; None leaves them unconstrained.
        space_options: Options of the space (``svd``: ``rank``).

    """

    def __init__(
        self,
        num_tasks: int,
        shapes: Mapping[str, Size | tuple[int, ...]],
        granularity: Granularity = "layer",
        init: float | None = None,
        clamp: tuple[float, float] | None = None,
        space_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise DivMergeError("Merging needs at least one expert: list them under model.experts.")
        if clamp is not None and not clamp[0] < clamp[1]:
            raise DivMergeError(f"Coefficient clamp {clamp} must be (low, high) with low < high.")
        self.granularity = granularity
        self.clamp = clamp
        self.space = get_space(granularity, space_options)
        self.layout = self.space.layout({n: Size(s) for n, s in shapes.items()})
        value = 1.0 / num_tasks if init is None else float(init)
        self.weight = nn.Parameter(torch.full((num_tasks, self.layout.num_columns), value))  # (T, G)

    def forward(self) -> Tensor:
        """Return the (clamped) coefficient table, shape (T, G)."""
        if self.clamp is None:
            return self.weight
        return self.weight.clamp(*self.clamp)

    def group_labels(self) -> list[str]:
        """One label per column: the tensor name, the block, ``all`` for task-wise, a row or direction."""
        return list(self.layout.labels)

    def columns(self, table: Tensor, name: str) -> Tensor:
        """Coefficients of one tensor across tasks, shape (T, K)."""
        return table[:, self.layout.columns[name]]

    def column(self, table: Tensor, name: str) -> Tensor:
        """Coefficients of a tensor with one coefficient per task, shape (T,)."""
        cols = self.layout.columns[name]
        if cols.stop - cols.start != 1:
            raise DivMergeError(
                f"Tensor {name!r} has {cols.stop - cols.start} coefficients per task, not one."
            )
        return table[:, cols.start]
