"""Checkpoint IO: atomic writes, safe loads and one clear error for a missing, corrupt or foreign checkpoint.

Checkpoints are shared between people, so a checkpoint is data, never code: every load unpickles with
``weights_only=True`` (tensors, containers and plain values only), whatever the caller asks for.
"""

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from divmerge.errors import DivMergeError
from divmerge.pids import remove_stale, tmp_name


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written file and explains unreadable ones."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write to a temporary sibling (named with this pid and host), then rename over the target."""
        path = Path(path)
        tmp = path.with_name(tmp_name(path.name))
        try:
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
        The ``divmerge`` entry (fingerprint, tasks, granularity, tensor names).

    """
    checkpoint = SafeCheckpointIO().load_checkpoint(path)
    meta = checkpoint.get("divmerge") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        raise DivMergeError(
            f"Checkpoint {str(path)!r} was not written by divmerge: pass a divmerge checkpoint."
        )
    return meta
