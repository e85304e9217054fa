"""Whether a process is alive: how locks and temporary files left by killed runs are recognised."""

import os
import re
import socket
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TAGGED = re.compile(r"\.(\d+)@(.+)\.tmp$")


def tmp_name(final: str) -> str:
    """A hidden temporary sibling name for ``final`` that records its writer: ``.<final>.<pid>@<host>.tmp``.

    A process killed before it renamed the file into place leaves it behind; :func:`remove_stale` later
    recognises it as stale by the pid and host in its name.
    """
    return f".{final}.{os.getpid()}@{socket.gethostname()}.tmp"


def is_stale(name: str) -> bool:
    """Whether a name made by :func:`tmp_name` belongs to a process of this host that is gone.

    A temporary of another host is never stale here (its writer may be alive on a shared disk).
    """
    tag = _TAGGED.search(name)
    return tag is not None and tag.group(2) == socket.gethostname() and not pid_alive(int(tag.group(1)))


def remove_stale(directory: Path) -> list[Path]:
    """Delete the temporary files in ``directory`` that killed processes of this host left behind.

    Args:
        directory: A directory written with :func:`tmp_name` temporaries (need not exist).

    Returns:
        The files removed.
    """
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.glob(".*.tmp"):
        if entry.is_file() and is_stale(entry.name):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
