"""The teacher cache: each expert's output distribution on its task's inputs, computed once.

Expert outputs never change during a merge, so they are computed before training, stored on disk
keyed by (expert digest, data digest) and reloaded by later runs; a training step then costs one
forward+backward of the merged model. The expert forward is the merged model with one-hot
coefficients, which reproduces the expert exactly, so experts are never loaded twice.

Each file holds the outputs and a SHA-256 of their bytes, checked on every read, with the number of
rows expected: a file that was truncated, replaced or edited is rebuilt, never used. Files are
loaded as data only (``weights_only=True``) and written with the user's umask, so a team can share
one cache directory. A file is written under a temporary name holding the writer's pid and host, then
renamed; the temporaries a killed run leaves are removed by the next run that uses the cache.
"""

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from divmerge.disk import no_space_is_one_line, torch_save
from divmerge.errors import DivMergeError
from divmerge.pids import remove_stale, tmp_name

CACHE_FIX = "free space, or point model.cache_dir (or $DIVMERGE_CACHE) to a disk with room"

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: outputs stored with their SHA-256
LEGACY_TMP_AGE_S = 3600.0
"""Age after which an untagged temporary of an earlier divmerge version is taken as a killed run's."""


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


def content_digest(value: Tensor | Mapping[str, Tensor]) -> str:
    """SHA-256 of a tensor's (or a dict of tensors') shape, dtype and bytes."""
    h = hashlib.sha256()
    items = sorted(value.items()) if isinstance(value, Mapping) else [("", value)]
    for key, tensor in items:
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomic(value: Tensor | Mapping[str, Tensor], path: Path) -> None:
    """Write cached outputs with their digest so that the final path never holds a partial file.

    Args:
        value: A tensor, or a dict of tensors.
        path: The cache file; created with the user's umask (shared caches stay readable).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name(path.name))  # pid and host in the name: a killed run's is found stale
    tensors = [value] if isinstance(value, Tensor) else list(value.values())
    needed = sum(t.numel() * t.element_size() for t in tensors)
    try:
        with no_space_is_one_line(path, needed, CACHE_FIX):  # a full disk: one line, no partial file
            torch_save({"outputs": value, "sha256": content_digest(value)}, tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(cache_dir: str | Path) -> None:
    """Delete the temporary files that runs killed while writing a teacher (kill -9) left in the cache.

    Only those of processes of this host that are gone: a live run's file is being written. Untagged
    ``tmp*.tmp`` files of earlier divmerge versions go once older than ``LEGACY_TMP_AGE_S`` (a teacher
    file is written in seconds).

    Args:
        cache_dir: Root cache directory (``teachers/`` under it is cleaned).
    """
    directory = Path(cache_dir) / "teachers"
    removed = remove_stale(directory)
    if directory.is_dir():  # earlier divmerge versions named them tmp*.tmp (mkstemp), with no pid
        for legacy in directory.glob("tmp*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - legacy.stat().st_mtime > LEGACY_TMP_AGE_S:
                    legacy.unlink()
                    removed.append(legacy)
    for path in removed:
        log.info("teacher cache: removed %s, left by a killed run", path.name)


def _rows(value: Tensor | Mapping[str, Tensor]) -> int:
    return len(value) if isinstance(value, Tensor) else len(next(iter(value.values())))


def load_cached(path: Path, rows: int | None = None) -> Tensor | dict[str, Tensor] | None:
    """Load cached outputs; None when absent, unreadable, altered or of the wrong size (then rebuilt).

    Args:
        path: The cache file.
        rows: Number of examples the outputs must cover (None: not checked).

    Returns:
        The outputs, or None.
    """
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        value = stored["outputs"]
        intact = stored["sha256"] == content_digest(value)
    except Exception:  # a corrupt cache file is rebuilt, not fatal
        log.warning("Teacher cache file %s is unreadable; rebuilding it.", path)
        return None
    if not intact:
        log.warning("Teacher cache file %s does not match its digest (altered); rebuilding it.", path)
        return None
    if rows is not None and _rows(value) != rows:
        log.warning(
            "Teacher cache file %s covers %d examples, not %d; rebuilding it.", path, _rows(value), rows
        )
        return None
    return value


def get_or_compute(
    path: Path, compute: Callable[[], Tensor | dict[str, Tensor]], rows: int | None = None
) -> tuple[Tensor | dict[str, Tensor], bool]:
    """Return the cached outputs at ``path``, computing and storing them first if needed.

    Args:
        path: Cache file.
        compute: Builds the outputs.
        rows: Number of examples the outputs must cover (None: not checked).

    Returns:
        (outputs, whether they were computed now).

    """
    cached = load_cached(path, rows)
    if cached is not None:
        return cached, False
    value = compute()
    save_atomic(value, path)
    return value, True


def join_rows(
    parts: Sequence[Tensor | Mapping[str, Tensor]], fill: Mapping[str, int] | None = None
) -> Tensor | dict[str, Tensor]:
    """Teachers of consecutive row ranges joined into one, as if computed in one go.

    Each part's tensors have its rows first; trailing dimensions that vary between parts (the longest
    answer of a share) are padded to the largest, with ``fill[key]`` (default 0).

    Args:
        parts: Teachers of rows [0, n_0), [n_0, n_0 + n_1), ... in order: tensors, or dicts of them.
        fill: Padding value per dict key.

    Returns:
        The joined teacher.
    """
    fill = fill or {}

    def cat(tensors: Sequence[Tensor], value: int) -> Tensor:
        tail = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        out = tensors[0].new_full((sum(len(t) for t in tensors), *tail), value)  # (N, *tail)
        start = 0
        for t in tensors:
            out[(slice(start, start + len(t)), *(slice(0, n) for n in t.shape[1:]))] = t
            start += len(t)
        return out

    if isinstance(parts[0], Tensor):
        return cat(parts, 0)  # type: ignore[arg-type]
    return {k: cat([p[k] for p in parts], fill.get(k, 0)) for k in parts[0]}  # type: ignore[index]
