"""Block-wise coefficients: one per task per transformer block.

Tensors whose name holds ``.<n>.`` belong to block n; every other tensor (embeddings, pooler, final
norm) forms a group of its own.
"""

import re
from collections.abc import Sequence

from divmerge.core.coefficients.base import ScalarSpace

_BLOCK = re.compile(r"\.(\d+)\.")


def _key(name: str) -> tuple[str, str]:
    """(group key, label) of a tensor name."""
    match = _BLOCK.search(name)
    return (f"block{match.group(1)}", f"block {match.group(1)}") if match else (name, name)


class BlockSpace(ScalarSpace):
    """One group per transformer block, plus one per tensor outside the blocks."""

    def groups(self, names: Sequence[str]) -> list[int]:
        """Tensors of one block share a group; groups are numbered in order of first appearance."""
        keys: dict[str, int] = {}
        return [keys.setdefault(_key(name)[0], len(keys)) for name in names]

    def labels(self, names: Sequence[str], groups: Sequence[int]) -> list[str]:
        """``block <n>`` for a block's column, the tensor name for the others."""
        labels: dict[int, str] = {}
        for name, group in zip(names, groups, strict=True):
            labels.setdefault(group, _key(name)[1])
        return [labels[g] for g in sorted(labels)]
