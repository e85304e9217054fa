"""What a run writes, guarded: one live run per checkpoint directory, no debris when input is bad.

A run takes ``.divmerge.lock`` in its checkpoint directory (its PID and host); a second live run on
the same directory is refused, a lock left by a dead process is taken over. When a run fails on bad
input (a ``DivMergeError``), the directories it created (log and checkpoint directories) are removed,
so a failed run leaves nothing behind; a killed or crashed run, or one stopped mid-way on what it met
(a ``RunStoppedError``: a loss that turned NaN), keeps its checkpoints, to resume or inspect.
"""

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from divmerge.disk import NoSpaceError
from divmerge.errors import DivMergeError, RunStoppedError
from divmerge.pids import pid_alive

LOCK_FILE = ".divmerge.lock"


def _topmost_new(path: Path) -> Path | None:
    """The highest ancestor of ``path`` (or itself) that does not exist yet; None if ``path`` exists."""
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def guarded(outputs: Sequence[Path], lock_dir: Path | None) -> Iterator[None]:
    """Lock ``lock_dir`` for this run and remove the ``outputs`` it creates if it fails on bad input.

    Args:
        outputs: Directories the run may create (log directory, checkpoint directories).
        lock_dir: Where the run's lock lives (its checkpoint directory); None takes no lock.
    """
    fresh = {top for path in outputs if (top := _topmost_new(path)) is not None}
    lock = None
    try:
        if lock_dir is not None:
            lock = _take(lock_dir)
        yield
    except DivMergeError as err:
        if not isinstance(err, (RunStoppedError, NoSpaceError)):  # a stopped run keeps its checkpoints
            for path in fresh:
                shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        if lock is not None and lock.exists():
            lock.unlink()


def _take(directory: Path) -> Path:
    """Create the lock file in ``directory``, refusing a live run's lock."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, _, host = lock.read_text().partition(" ")
            if host.strip() != socket.gethostname() or (pid.isdigit() and pid_alive(int(pid))):
                raise DivMergeError(
                    f"Another divmerge run (pid {pid} on {host.strip() or '?'}) is using {str(directory)!r}: "
                    f"wait for it to finish, or give this run another checkpoint directory (if that run is "
                    f"gone, delete {str(lock)!r})."
                ) from None
            lock.unlink(missing_ok=True)  # left by a dead process
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        return lock
    raise DivMergeError(f"Could not take the lock {str(lock)!r}: delete it if no run is using it.")
