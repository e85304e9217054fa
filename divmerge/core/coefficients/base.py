"""The coefficient-space interface: where each merged tensor reads its coefficients in the (T, G) table.

Every space lays the merged tensors out over the G columns of one table ``c`` (T, G). A tensor reads a
slice of K columns: K = 1 is one scalar per task (shared by the tensors a space groups together), K > 1
gives a tensor several coefficients per task (one per row, or per singular direction). The space also
decides how a tensor's task vectors are stored and how they are merged with its (T, K) coefficients.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Size, Tensor

from divmerge.core.merge import WeightedSum

Stored = Tensor | tuple[Tensor, ...]
"""A tensor's task vectors as a space keeps them: the stack (T, *shape), or factors of it."""

_EMBEDDING = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|lm_head|shared)(\.|$)")


def is_embedding(name: str) -> bool:
    """Whether a tensor is a token / position embedding or an LM head (its rows are tokens or positions)."""
    return _EMBEDDING.search(name) is not None


def is_matrix(name: str, shape: Sequence[int]) -> bool:
    """Whether a per-tensor space treats the tensor as a matrix: 2-D and not an embedding."""
    return len(shape) == 2 and not is_embedding(name)


@dataclass(frozen=True)
class Layout:
    """Where each merged tensor reads its coefficients.

    Attributes:
        columns: Tensor name -> its columns of the (T, G) table (width 1: one scalar per task).
        labels: One label per column, G in all (for plots and coefficients.json).
    """

    columns: dict[str, slice]
    labels: list[str]

    @property
    def num_columns(self) -> int:
        """G, the table's number of columns."""
        return len(self.labels)


def matrix_layout(shapes: Mapping[str, Size], width: Callable[[Size], int], label: str) -> Layout:
    """The layout of a per-tensor space: a matrix reads ``width(shape)`` columns, any other tensor one.

    Args:
        shapes: Shape of each merged tensor, in merge order.
        width: Columns of a matrix (``is_matrix``), from its shape.
        label: Format of a matrix column's label, with ``{name}`` and ``{i}`` (other tensors: the name).
    """
    columns, labels = {}, []
    for name, shape in shapes.items():
        k = width(shape) if is_matrix(name, shape) else 1
        columns[name] = slice(len(labels), len(labels) + k)
        labels += [label.format(name=name, i=i) for i in range(k)] if k > 1 else [name]
    return Layout(columns, labels)


class CoefficientSpace(Protocol):
    """A coefficient space: the table's layout, the task vectors' storage and the per-tensor merge.

    Attributes:
        per_tensor: True when a tensor may get several coefficients per task; such spaces need full,
            unsharded task vectors (no LoRA adapters, no sharded mode).
        exact: True when one-hot coefficients reproduce each expert (False: a lossy storage, e.g. a
            truncated SVD; teachers are then computed from the experts themselves).
    """

    per_tensor: bool
    exact: bool

    def layout(self, shapes: Mapping[str, Size]) -> Layout:
        """The columns of every merged tensor (in the mapping's order) and the column labels."""
        ...

    def store(self, name: str, tau: Tensor) -> Stored:
        """How tensor ``name``'s stacked task vectors tau (T, *shape) are kept for merging."""
        ...

    def merge(self, coef: Tensor, base: Tensor, stored: Stored) -> Tensor:
        """theta_0 + the coefficients' combination of the stored task vectors; coef is (T, K)."""
        ...


class ScalarSpace:
    """A space of one scalar per task per group of tensors; subclasses say how tensors are grouped."""

    per_tensor = False
    exact = True

    def groups(self, names: Sequence[str]) -> list[int]:
        """For each tensor name (in merge order), the index of its group (table column)."""
        raise NotImplementedError

    def labels(self, names: Sequence[str], groups: Sequence[int]) -> list[str]:
        """One human-readable label per group, in column order."""
        raise NotImplementedError

    def layout(self, shapes: Mapping[str, Size]) -> Layout:
        """Each tensor reads the one column of its group."""
        names = list(shapes)
        groups = self.groups(names)
        labels = self.labels(names, groups) if names else ["all"]
        return Layout({n: slice(g, g + 1) for n, g in zip(names, groups, strict=True)}, labels)

    def store(self, name: str, tau: Tensor) -> Stored:
        """The stack itself."""
        return tau

    def merge(self, coef: Tensor, base: Tensor, stored: Stored) -> Tensor:
        """theta_0 + sum_t coef[t, 0] * tau_t (``WeightedSum``)."""
        assert isinstance(stored, Tensor)
        return WeightedSum.apply(coef[:, 0], base, stored)
