"""A model directory's safetensors files read tensor by tensor, or one flat column range at a time.

Sharded loading (:mod:`divmerge.experts.sharded_loading`) reads, of each tensor, only the flat elements
[lo, hi) a rank keeps: the rows that hold them (``safe_open(...).get_slice``, which reads just those bytes
of the memory-mapped file), trimmed to the range. Nothing here runs code from a file: safetensors holds
tensors and a JSON header only.
"""

import json
import math
from collections.abc import KeysView
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from divmerge.errors import DivMergeError, first_line

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def column_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """Flat elements [lo, hi) that ``rank`` of ``world`` keeps of a tensor of ``numel`` elements.

    The same chunks as ``torch.chunk`` and DTensor's ``Shard``: ceil(numel / world) per rank, the last
    ranks shorter or empty.
    """
    size = -(-numel // world)
    return min(numel, rank * size), min(numel, (rank + 1) * size)


class WeightFiles:
    """The safetensors weights of one model directory (``model.safetensors`` or a sharded index).

    Args:
        folder: The model directory.
        what: How to name the model in an error, e.g. ``"expert 'rt'"``.
    """

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder, self.what = Path(folder), what
        index = self.folder / INDEX
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: self.folder / file for name, file in weight_map.items()}
            else:
                with safe_open(self.folder / SINGLE, framework="pt") as f:
                    self.files = dict.fromkeys(f.keys(), self.folder / SINGLE)
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            raise DivMergeError(
                f"Could not read the weights of {what} in {str(self.folder)!r} ({first_line(err)}): a "
                "weights file is missing, truncated or corrupt; save or copy that model again."
            ) from err
        self._open: dict[Path, object] = {}

    @staticmethod
    def present(folder: str | Path) -> bool:
        """Whether ``folder`` holds safetensors weights this class reads."""
        return (Path(folder) / INDEX).is_file() or (Path(folder) / SINGLE).is_file()

    def names(self) -> KeysView[str]:
        """Every tensor name in the files (a set-like view: membership is O(1))."""
        return self.files.keys()

    def _slice(self, name: str):
        path = self.files[name]
        try:
            if path not in self._open:
                self._open[path] = safe_open(path, framework="pt")
            return self._open[path].get_slice(name)  # type: ignore[attr-defined]
        except (OSError, SafetensorError) as err:
            raise DivMergeError(
                f"Could not read tensor {name!r} of {self.what} from {str(path)!r} ({first_line(err)}): the "
                "file is truncated or corrupt; save or copy that model again."
            ) from err

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name``."""
        return tuple(self._slice(name).get_shape())

    def read_columns(self, name: str, lo: int, hi: int) -> Tensor:
        """Flat elements [lo, hi) of tensor ``name``, in float32, (hi - lo,); reads only their rows.

        Args:
            name: The tensor's name in the files.
            lo: First flat index.
            hi: One past the last.

        Returns:
            A new float32 tensor (hi - lo,).
        """
        part = self._slice(name)
        shape = part.get_shape()
        if hi <= lo:
            return torch.empty(0, dtype=torch.float32)
        if len(shape) == 0:
            return part[()].reshape(1).to(torch.float32)[lo:hi].clone()
        row = math.prod(shape[1:])  # elements per index of dim 0
        r0, r1 = lo // row, -(-hi // row)
        rows = part[r0:r1].reshape(-1)  # ((r1 - r0) * row,) in the stored dtype
        return rows[lo - r0 * row : hi - r0 * row].to(torch.float32, copy=True)

    def close(self) -> None:
        """Release the memory-mapped files."""
        self._open.clear()
