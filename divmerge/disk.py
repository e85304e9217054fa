"""A full disk or an exceeded quota while writing: one line naming the path, the space needed and free.

Every place divmerge writes a file users keep (checkpoints, the teacher cache, reports and plots, exports,
converted GGUF bases and built experts) writes it through :func:`no_space_is_one_line` (or
:func:`atomic_file`, which adds write-then-rename), so ``ENOSPC``/``EDQUOT`` becomes a
:class:`NoSpaceError` (a ``DivMergeError``: one line, exit 2) and never leaves a partial file. Libraries
that hide the ``OSError`` are handled too: ``torch.save`` turns it into a ``RuntimeError`` without an errno
(:func:`torch_save` keeps it), safetensors into a ``SafetensorError`` that quotes ``os error 28``.
"""

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from divmerge.errors import DivMergeError

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_SPACE_TEXT = (*(os.strerror(code) for code in NO_SPACE), *(f"os error {code})" for code in NO_SPACE))


class NoSpaceError(DivMergeError):
    """The disk or the quota filled while writing (not bad input: a run's earlier outputs are kept)."""


def size_text(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 kB``, ``12.3 MB``, ``4.0 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _free(path: Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing ancestor)."""
    for parent in (path, *path.parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


def find_no_space(err: BaseException | None) -> BaseException | None:
    """The ENOSPC/EDQUOT error in ``err``'s cause/context chain (an OSError or a library's wrapper)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, NoSpaceError):
            return err
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return err
        if not isinstance(err, OSError) and any(text in str(err) for text in _NO_SPACE_TEXT):
            return err  # safetensors: "I/O error: No space left on device (os error 28)"
        err = err.__cause__ or err.__context__
    return None


def no_space_message(
    path: Path | str,
    err: BaseException,
    needed: int | None = None,
    at_least: bool = False,
    fix: str = "free space there or write elsewhere",
    clean: bool = True,
) -> str:
    """The one line for a full disk: what, how much is needed, how much is free, the fix.

    Args:
        path: The file or directory being written.
        err: The ENOSPC/EDQUOT error.
        needed: Bytes the write needs (None: unknown).
        at_least: ``needed`` is only what was written before the disk filled.
        fix: What the user can do, e.g. ``point model.cache_dir to a disk with room``.
        clean: The writer left nothing partial (said in the message).

    Returns:
        The message.
    """
    path = Path(path)
    quota = (isinstance(err, OSError) and err.errno == errno.EDQUOT) or os.strerror(errno.EDQUOT) in str(err)
    what = "Disk quota exceeded" if quota else "No space left on device"
    parts = []
    if needed is not None:
        parts.append(f"it needs {'more than ' if at_least else ''}{size_text(needed)}")
    free = _free(path)
    if free is not None:
        parts.append(f"{size_text(free)} free there")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"{what} writing {str(path)!r}{detail}: {fix}{'; nothing partial was left' if clean else ''}."


def one_line(err: BaseException) -> str | None:
    """The one line for an exception caused by a full disk anywhere in its chain; None for other errors.

    Args:
        err: Any exception (e.g. a library's error raised while handling divmerge's own).

    Returns:
        The NoSpaceError's message, or a line built from the OSError's file name; None if not a full disk.
    """
    found = find_no_space(err)
    if found is None:
        return None
    if isinstance(found, NoSpaceError):
        return str(found)
    name = getattr(found, "filename", None) or _path_in_traceback(found)
    return no_space_message(name or "a file", found, fix="free space there or write elsewhere", clean=False)


_PATH_NAMES = ("path", "filepath", "filename", "file", "fname", "urlpath")


def _path_in_traceback(err: BaseException) -> str | None:
    """The file a library was writing when it met the full disk: a path-like local of its innermost frames.

    Libraries (Lightning's loggers through fsspec, PyYAML) raise the OSError of a ``write`` or ``close``
    without a file name; the file object (``self.path``) or the caller's ``path`` argument names it.
    """
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        names = [frame.f_locals.get(name) for name in _PATH_NAMES]
        names.append(getattr(frame.f_locals.get("self"), "path", None))
        for value in names:
            if isinstance(value, (str, os.PathLike)) and str(value) and os.sep in str(value):
                return str(value)
    return None


@contextlib.contextmanager
def no_space_is_one_line(
    path: Path | str,
    needed: int | Callable[[], int | None] | None = None,
    fix: str = "free space there or write elsewhere",
    at_least: bool = False,
) -> Iterator[None]:
    """Turn a full disk (or quota) inside the block into a one-line :class:`NoSpaceError`.

    Args:
        path: What the block writes (named in the message).
        needed: Bytes it needs, or a function computing them (called only on failure).
        fix: The fix to name.
        at_least: ``needed`` is a lower bound (what was written before the disk filled).

    Yields:
        Nothing.

    Raises:
        NoSpaceError: The block failed for lack of space.
    """
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as err:
        found = find_no_space(err)
        if found is None:
            raise
        size = needed() if callable(needed) else needed
        raise NoSpaceError(no_space_message(path, found, size, at_least, fix)) from err


@contextlib.contextmanager
def atomic_file(
    path: Path | str, fix: str = "free space there or write elsewhere", needed: int | None = None
) -> Iterator[Path]:
    """A temporary sibling to write ``path`` into: renamed over it on success, removed on any failure.

    Args:
        path: The final file; the temporary name keeps its suffix (matplotlib picks the format by it).
        fix: The fix named when the disk is full.
        needed: Bytes to be written, when known (else the message gives what was written before failing).

    Yields:
        The temporary path to write.

    Raises:
        NoSpaceError: The disk or quota filled (the old ``path``, if any, is untouched).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        size = (lambda: _size(tmp)) if needed is None else needed
        with no_space_is_one_line(path, size, fix, at_least=needed is None):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(
    path: Path | str, data: bytes | str, fix: str = "free space there or write elsewhere"
) -> Path:
    """Write ``data`` to ``path`` atomically; a full disk is one line with the exact size needed.

    Args:
        path: The file.
        data: Its contents (text is written as UTF-8).
        fix: The fix named when the disk is full.

    Returns:
        ``path``.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path, fix, needed=len(raw)) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


def _size(path: Path) -> int | None:
    """Bytes under ``path`` (a file, or a directory's files); None if unreadable."""
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size
    except OSError:
        return None


def written(path: Path | str) -> Callable[[], int | None]:
    """A ``needed`` for :func:`no_space_is_one_line`: what is under ``path`` when the disk filled."""
    return lambda: _size(Path(path))


class _Recording:
    """A binary file wrapper that keeps the OSError of a failed write (torch.save hides it)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save(obj, path)``, but a full disk raises its ``OSError`` (errno set), not a bare RuntimeError.

    Args:
        obj: What to save.
        path: The file to write.
    """
    with open(path, "wb") as fh:
        recording = _Recording(fh)
        try:
            torch.save(obj, recording)
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise
