"""Layer-wise coefficients: one per task per merged tensor (AdaMerging, Yang et al., ICLR 2024)."""

from collections.abc import Sequence

from divmerge.core.coefficients.base import ScalarSpace


class LayerSpace(ScalarSpace):
    """G = number of merged tensors: each tensor has its own coefficient per task."""

    def groups(self, names: Sequence[str]) -> list[int]:
        """Tensor i in group i."""
        return list(range(len(names)))

    def labels(self, names: Sequence[str], groups: Sequence[int]) -> list[str]:
        """Each column is labelled with its tensor's name."""
        return list(names)
