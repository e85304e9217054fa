"""Cache directories built once and atomically: demo experts, GGUF conversions.

A directory is complete when its marker file exists (written last by the builder). It is built in a
temporary sibling renamed into place at the end, so an interrupted build never leaves a half-written
directory at the final path, and two processes building the same one keep whichever finished first.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from divmerge.disk import no_space_is_one_line, written
from divmerge.errors import DivMergeError


def build_once(final: Path, marker: str, what: str, build: Callable[[Path], None]) -> Path:
    """Return ``final``, building it first with ``build`` unless it is already complete.

    Args:
        final: The directory's path in the cache.
        marker: Name of the file that marks it complete; ``build`` writes it last.
        what: What the directory holds, for the error message (e.g. ``"expert"``).
        build: Writes the directory's contents into the (empty) directory it is given.

    Returns:
        ``final``, complete.

    Raises:
        DivMergeError: If ``final`` exists without its marker (a foreign or incomplete directory).
    """
    if (final / marker).is_file():
        return final
    if final.exists():
        raise DivMergeError(
            f"{final} exists but is not a complete {what} (no {marker}): delete it and rerun."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    fix = "free space, or point model.cache_dir (or $DIVMERGE_CACHE) to a disk with room"
    try:
        with no_space_is_one_line(final, written(tmp), fix, at_least=True):
            build(tmp)
        # mkdtemp (and safetensors) create owner-only entries; the cache is meant to be shared.
        for entry in (tmp, *tmp.iterdir()):
            entry.chmod(0o755 if entry.is_dir() else 0o644)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / marker).is_file():
                raise
            # Another process finished the same directory first; keep theirs.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
