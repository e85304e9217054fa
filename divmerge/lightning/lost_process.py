"""One line instead of a traceback when another process of a multi-process run dies or stops answering.

In a run of N processes every collective (gradient all-reduce, metric sync, barrier, sharded gather)
waits for all N. When one process dies (``kill -9``, out of memory, a lost node), the others learn it
in one of three ways, each bounded in time:

- gloo (CPU): the dead process's sockets close, so the next collective fails at once with "Connection
  reset by peer" / "Connection closed by peer";
- a process that is alive but stuck (stopped, or waiting in another collective): the collective fails
  when the process group's timeout runs out (``DDPStrategy(timeout=...)``; torch's default: 30 minutes
  for gloo, 10 for NCCL);
- single-node runs started by ``python train.py`` (Lightning launches the other local ranks): Lightning
  watches its child processes every 5 s and kills the whole run when one of them exits abnormally.

``lost_process_line`` turns the first two into one line naming the process, the phase and what to do.
Checkpoints are written atomically (``SafeCheckpointIO``), so the last complete one survives any of this.
"""

import re
from pathlib import Path

import torch
from lightning.pytorch import Trainer

LOST_PROCESS_EXIT = 1
"""Exit code of a process that stops because another process of its run was lost (bad input is 2)."""


class LostProcessError(Exception):
    """Another process of this run was lost: the message is ``lost_process_line``'s one line."""


_PEER = re.compile(r"Connection (?:reset|closed|refused) by peer")
_LOST = re.compile(
    r"Connection (?:reset|closed|refused) by peer|Broken pipe|Timed out|timed out|Timeout|"
    r"Socket closed|recvBytes|sendBytes|Read error|Write error"
)


def lost_process(err: BaseException) -> bool:
    """Whether ``err`` says that a collective lost another process of the run.

    Args:
        err: An exception raised during a run.

    Returns:
        True for torch.distributed's own errors and for gloo transport errors.
    """
    if isinstance(err, torch.distributed.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("gloo" in text or "c10d" in text) and bool(_LOST.search(text))


def phase(current: str | None, trainer: Trainer) -> str:
    """Where in the run the process was, in words (for the one line).

    Args:
        current: The phase timer's innermost open phase (``PhaseTimer.current``).
        trainer: The run's trainer.

    Returns:
        E.g. ``training (step 12)`` or ``setup (loading the experts, the teacher cache)``.
    """
    if current == "train":
        return f"training (step {trainer.global_step})"
    if current in ("validation", "test"):
        return current
    return "setup (loading the experts, the teacher cache)"


def lost_process_line(err: BaseException, current: str | None, trainer: Trainer, subcommand: str) -> str:
    """The line that replaces ``err``'s traceback.

    Args:
        err: An error for which ``lost_process`` holds.
        current: The phase timer's innermost open phase when it happened.
        trainer: The run's trainer.
        subcommand: ``fit``, ``validate`` or ``test``.

    Returns:
        One line: which process, in which phase, why, what was kept and how to go on.
    """
    found = _PEER.search(str(err)) or _LOST.search(str(err))  # the socket's word first, then any
    why = found.group(0) if found else type(err).__name__
    kept = ""
    if subcommand == "fit":
        dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if any((d / "last.ckpt").is_file() for d in dirs):
            kept = (
                f" The last complete checkpoint ({str(dirs[0] / 'last.ckpt')!r}) is intact: once every "
                "process can run again, resume with `python train.py fit --config ... --ckpt_path last`."
            )
        else:
            kept = " No checkpoint was written yet: once every process can run again, start the fit again."
    return (
        f"Process {trainer.global_rank} of {trainer.world_size} lost another process of this run during "
        f"{phase(current, trainer)} ({why}): it died or stopped answering (see its own log), so this "
        f"process stops too.{kept}"
    )
