"""The teacher cache: each expert's output distribution on its task's inputs, computed once.

Expert outputs never change during a merge, so they are computed before training, stored on disk
keyed by (expert digest, data digest) and reloaded by later runs; a training step then costs one
forward+backward of the merged model. The expert forward is the merged model with one-hot
coefficients, which reproduces the expert exactly, so experts are never loaded twice.
"""

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from divmerge.errors import DivMergeError

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def cache_path(cache_dir: str | Path, task: str, split: str, expert_digest: str, data_digest: str) -> Path:
    """Where the teacher outputs of one expert on one task split live.

    Args:
        cache_dir: Root cache directory.
        task: Task name.
        split: Split name (``unlabelled``, ``val``, ``test``).
        expert_digest: Digest of base + this expert (``ExpertSet.task_digests``).
        data_digest: Digest of the tokenised inputs (``TaskDataset.digest``).

    Returns:
        The file path.

    """
    return Path(cache_dir) / "teachers" / f"{task}-{split}-v{CACHE_VERSION}-{expert_digest}-{data_digest}.pt"


@torch.no_grad()
def compute_logprobs(
    forward: Callable[[Mapping[str, Tensor]], Tensor], batches: Iterable[Mapping[str, Tensor]], size: int
) -> Tensor:
    """Run an expert over batches and collect log-probabilities in dataset order.

    Args:
        forward: Maps a batch (``input_ids``, ``attention_mask``) to logits (B, C).
        batches: Batches carrying ``idx`` (positions in the dataset).
        size: Dataset length N.

    Returns:
        Log-probabilities, shape (N, C), float32 on CPU.

    """
    out: Tensor | None = None
    seen = 0
    for batch in batches:
        logprobs = torch.log_softmax(forward(batch).float(), dim=-1).cpu()  # (B, C)
        if out is None:
            out = torch.empty(size, logprobs.shape[-1])
        out[batch["idx"].cpu()] = logprobs
        seen += logprobs.shape[0]
    if out is None or seen != size:
        raise DivMergeError(f"Teacher cache saw {seen} of {size} examples; the data loader dropped some.")
    return out


def save_atomic(tensor: Tensor, path: Path) -> None:
    """Write a tensor so that the final path never holds a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(tensor, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_cached(path: Path) -> Tensor | None:
    """Load a cached tensor; None when absent or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt cache file is rebuilt, not fatal
        log.warning("Teacher cache file %s is unreadable; rebuilding it.", path)
        return None


def get_or_compute(path: Path, compute: Callable[[], Tensor]) -> tuple[Tensor, bool]:
    """Return the cached tensor at ``path``, computing and storing it first if needed.

    Args:
        path: Cache file.
        compute: Builds the tensor.

    Returns:
        (tensor, whether it was computed now).

    """
    cached = load_cached(path)
    if cached is not None:
        return cached, False
    tensor = compute()
    save_atomic(tensor, path)
    return tensor, True
