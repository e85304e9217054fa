"""Checkpoint IO: atomic writes, safe loads and one clear error for a missing, corrupt or foreign checkpoint.

Checkpoints are shared between people, so a checkpoint is data, never code: every load unpickles with
``weights_only=True`` (tensors, containers and plain values only), whatever the caller asks for.
"""

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

from divmerge.disk import no_space_is_one_line
from divmerge.errors import DivMergeError
from divmerge.lightning.nonfinite import nonfinite_task
from divmerge.pids import remove_stale, tmp_name

CHECKPOINT_FORMAT = 1
"""The layout of divmerge's checkpoints, recorded in each as ``checkpoint[FORMAT_KEY]``.

1: the coefficients under ``state_dict``, optimizer and loop state as Lightning writes them, and the
``divmerge`` entry (fingerprint, tasks, granularity, space options, start, tensor names). Checkpoints
written before the version was recorded have no ``FORMAT_KEY`` and this same layout: they are format 1.
A change of layout bumps this number and adds a step to ``MIGRATIONS`` that turns the previous format
into the new one; a checkpoint of a newer format than this divmerge knows is refused.
"""
FORMAT_KEY = "divmerge_format"
MIGRATIONS: dict[int, Callable[[dict[str, Any]], None]] = {}
"""Format n -> a function turning a format-n checkpoint into format n + 1, in place (none yet)."""


def _named(path: Any) -> str:
    return f"Checkpoint {str(path)!r}" if path else "The checkpoint"


def check_format(checkpoint: dict[str, Any], path: Any) -> None:
    """Bring a divmerge checkpoint to this divmerge's format in place: older formats migrated, newer refused.

    Args:
        checkpoint: The loaded checkpoint dictionary (updated in place).
        path: Its file (for messages; None when unknown).
    """
    version = checkpoint.get(FORMAT_KEY, 1)  # unrecorded: written before the field, in format 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DivMergeError(
            f"{_named(path)} records an unknown divmerge checkpoint format {version!r}: it is "
            "corrupt or was edited; pass an intact .ckpt written by divmerge, or start a fresh run without "
            "--ckpt_path."
        )
    if version > CHECKPOINT_FORMAT:
        raise DivMergeError(
            f"{_named(path)} was written by a newer divmerge (checkpoint format {version}; this "
            f"divmerge reads formats up to {CHECKPOINT_FORMAT}): upgrade divmerge to use it."
        )
    for step in range(version, CHECKPOINT_FORMAT):
        MIGRATIONS[step](checkpoint)
    checkpoint[FORMAT_KEY] = CHECKPOINT_FORMAT


def check_finite_coefficients(checkpoint: dict[str, Any], path: Any) -> None:
    """Refuse a checkpoint whose coefficients hold NaN or inf (a merge that diverged) in one line."""
    tasks = list((checkpoint.get("divmerge") or {}).get("tasks") or [])
    for name, value in (checkpoint.get("state_dict") or {}).items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        by_task = value.dim() == 2 and value.shape[0] == len(tasks)  # a (T, G) table: name the task
        found = nonfinite_task(value, tasks) if by_task else nonfinite_task(value.reshape(1, -1), [name])
        if found is not None:
            where = f"for task {found[0]!r}" if by_task else f"in {name!r}"
            raise DivMergeError(
                f"{_named(path)} holds {found[1]} coefficients ({where}): it records a merge that "
                "diverged, which is never evaluated or exported; pass an earlier checkpoint of that run, or "
                "train again with a lower model.lr (or model.clamp)."
            )


FIX = (
    "free space, or give the ModelCheckpoint callback a dirpath on a disk with room (the previous "
    "checkpoint is intact)"
)


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written file and explains unreadable ones."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write to a pid-and-host-named temporary sibling, then rename it; a full disk is one line."""
        path = Path(path)
        tmp = path.with_name(tmp_name(path.name))
        try:
            with no_space_is_one_line(path, lambda: _serialized_size(checkpoint), FIX):
                super().save_checkpoint(checkpoint, tmp, storage_options)
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint as data only, turning IO/unpickling failures into a DivMergeError.

        Args:
            path: The checkpoint file.
            map_location: Where to put its tensors (default: where they were saved).
            weights_only: Ignored: a checkpoint is always loaded with ``weights_only=True``, so a crafted
                file cannot run code.

        Returns:
            The checkpoint dictionary.
        """
        if Path(path).is_dir():
            raise DivMergeError(
                f"Checkpoint {str(path)!r} is a directory: pass the .ckpt file inside it (e.g. last.ckpt)."
            )
        if not Path(path).is_file():
            raise DivMergeError(f"Checkpoint {str(path)!r} does not exist: check --ckpt_path.")
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; random or cut bytes are not one
            raise DivMergeError(
                f"Checkpoint {str(path)!r} is not a checkpoint (not a torch.save archive: corrupt, truncated "
                "or another kind of file): pass an intact .ckpt written by divmerge, or start a fresh run "
                "without --ckpt_path."
            )
        try:
            if map_location is None:
                return super().load_checkpoint(path, weights_only=True)
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported global" not in str(err):  # not a class or function: damaged, not crafted
                raise DivMergeError(
                    f"Checkpoint {str(path)!r} is corrupt or not a checkpoint (UnpicklingError): pass an "
                    "intact .ckpt written by divmerge, or start a fresh run without --ckpt_path."
                ) from err
            raise DivMergeError(
                f"Checkpoint {str(path)!r} holds Python objects beyond tensors and plain data, which could "
                "run code when loaded, so divmerge refuses it: pass a .ckpt written by divmerge (only data), "
                "or start a fresh run without --ckpt_path."
            ) from err
        except Exception as err:
            raise DivMergeError(
                f"Checkpoint {str(path)!r} is corrupt or not a checkpoint ({type(err).__name__}): pass an "
                "intact .ckpt written by divmerge, or start a fresh run without --ckpt_path."
            ) from err


def _serialized_size(checkpoint: dict[str, Any]) -> int:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer().nbytes


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the half-written checkpoints a killed run left in its checkpoint directory.

    Call it holding the directory's lock (``run_dir.guarded``): the temporaries of dead processes of this
    host go, and so do untagged ``.<name>.ckpt.tmp`` files of earlier divmerge versions, which no live run
    can be writing while the lock is held.

    Args:
        directory: The checkpoint directory.

    Returns:
        The files removed.
    """
    removed = remove_stale(directory)
    if directory.is_dir():
        for legacy in directory.glob(".*.ckpt.tmp"):
            legacy.unlink(missing_ok=True)
            removed.append(legacy)
    return removed


def check_checkpoint(path: Any) -> dict[str, Any]:
    """Read a checkpoint's divmerge metadata, with one clear error when it is unusable.

    Args:
        path: The checkpoint file.

    Returns:
        The ``divmerge`` entry (fingerprint, tasks, granularity, tensor names), once the checkpoint's
        format is known (``check_format``) and its coefficients are finite.

    """
    checkpoint = SafeCheckpointIO().load_checkpoint(path)
    meta = checkpoint.get("divmerge") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        raise DivMergeError(
            f"Checkpoint {str(path)!r} was not written by divmerge: pass a divmerge checkpoint."
        )
    check_format(checkpoint, path)
    check_finite_coefficients(checkpoint, path)
    return meta
