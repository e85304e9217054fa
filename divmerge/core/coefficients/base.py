"""The coefficient-space interface: how merged tensors are grouped into columns of the (T, G) table."""

from collections.abc import Sequence
from typing import Protocol


class CoefficientSpace(Protocol):
    """A way to share coefficients between merged tensors.

    A space assigns every merged tensor to a group g; the coefficient table then has one column per
    group, and tensor l is merged as theta_0(l) + sum_t c[t, g(l)] * tau_t(l).
    """

    def groups(self, names: Sequence[str]) -> list[int]:
        """For each merged tensor name (in merge order), the index of its group (table column)."""
        ...

    def labels(self, names: Sequence[str], groups: Sequence[int]) -> list[str]:
        """One human-readable label per group, in column order (for plots and reports)."""
        ...
