"""Task-wise coefficients: one per task (task arithmetic with a learned lambda per task)."""

from collections.abc import Sequence

from divmerge.core.coefficients.base import ScalarSpace


class TaskSpace(ScalarSpace):
    """G = 1: every merged tensor shares its task's single coefficient."""

    def groups(self, names: Sequence[str]) -> list[int]:
        """Every tensor in group 0."""
        return [0] * len(names)

    def labels(self, names: Sequence[str], groups: Sequence[int]) -> list[str]:
        """The one column, ``all``."""
        return ["all"]
