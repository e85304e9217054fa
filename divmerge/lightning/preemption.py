"""Preemption: SIGTERM or SIGUSR1 during training saves ``last.ckpt`` at a step boundary and exits non-zero.

Lightning's own handling (``_SignalConnector``) marks SIGTERM and lets the loops raise
``SIGTERMException``, a ``SystemExit`` without a code, so a preempted fit exited 0 without a checkpoint
of its last steps; SIGUSR1 (what SLURM sends before a time limit with ``--signal=USR1@90``) was only
handled under SLURM auto-requeue, by a checkpoint written inside the signal handler, wherever the step
happened to be. :class:`Preemption` takes both signals over for the training loop only: the handler
just records the signal; at the end of the current step every process agrees to stop (one max-reduce of
the recorded signal numbers, so a signal that reached any rank stops them all at the same step),
``last.ckpt`` is written through the strategy's checkpoint IO (atomic: ``SafeCheckpointIO``) exactly as
``ModelCheckpoint(every_n_train_steps=1)`` would write it, so ``fit --ckpt_path last`` resumes bit-exactly
(the data position comes from Lightning's restored progress, see ``divmerge.lightning.resumable``), and
the run exits with ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1: what a shell reports for a process
killed by that signal), so ``fit && export`` stops and a scheduler that requeues failed jobs requeues it.
Under SLURM with ``SLURMEnvironment(auto_requeue=True)`` (Lightning's default on SLURM), the requeue signal
also requeues the job (``scontrol requeue``), after the checkpoint is on disk.
"""

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("divmerge")

EXIT_BASE = 128
"""A preempted run exits with 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1)."""


class Preempted(SystemExit):
    """Raised on every process at the step where a preempted run stops; its code is 128 + signal."""


def resume_command(ckpt: Path | str) -> str:
    """The command line that resumes this run from ``ckpt``: the same arguments, ``--ckpt_path`` replaced.

    Args:
        ckpt: The checkpoint to resume from.

    Returns:
        ``python train.py fit ... --ckpt_path <ckpt>``.
    """
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"
    return shlex.join(["python", script, *args, "--ckpt_path", str(ckpt)])


def requeue_slurm_job() -> str:
    """Requeue this SLURM job (``scontrol requeue``), as Lightning's auto-requeue does.

    Returns:
        The job id, with ``(requeue failed: code N)`` appended when scontrol fails.
    """
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_-]+", job):
        return f"{job} (not requeued: not a SLURM job id)"
    code = subprocess.call(["scontrol", "requeue", job])
    return job if code == 0 else f"{job} (requeue failed: code {code})"


class Preemption(Callback):
    """SIGTERM and the requeue signal (SIGUSR1): a checkpoint at the step's end, then a non-zero exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def _signals(self, trainer: Trainer) -> list[int]:
        env = trainer._accelerator_connector.cluster_environment
        usr = env.requeue_signal if isinstance(env, SLURMEnvironment) else None
        return list(dict.fromkeys([signal.SIGTERM, usr or signal.SIGUSR1]))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Take the signals over for the training loop (Lightning registered its handlers just before)."""
        self.signum = None
        self._trainer = trainer
        if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
            return
        for signum in self._signals(trainer):
            self._saved[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _: FrameType | None) -> None:
        """Only record the signal (and pass it to launched child processes, as Lightning does)."""
        if self.signum is None:
            launcher = self._trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self.signum = max(self.signum or 0, signum)

    def _restore(self) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._saved = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """At a step boundary: stop every process if any received a signal, after saving ``last.ckpt``."""
        self._check(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A signal during the last validation: training is complete, but the test is not run."""
        self._check(trainer)
        self._restore()

    def _check(self, trainer: Trainer) -> None:
        signum = self.signum or 0
        if trainer.world_size > 1:  # every rank must stop at the same step: any rank's signal counts
            flag = torch.tensor(signum, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if signum:
            self._stop(trainer, signum)

    def _stop(self, trainer: Trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        path = _last_path(trainer)
        trainer.save_checkpoint(path)  # a collective: every rank calls it, rank 0 writes (atomically)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath) == path.parent:
                cb.last_model_path = str(path)
        env = trainer._accelerator_connector.cluster_environment
        requeue = (
            isinstance(env, SLURMEnvironment) and env.auto_requeue and signum == (env.requeue_signal or 0)
        )
        if trainer.is_global_zero:
            where = f"stopped by {name} after step {trainer.global_step} (epoch {trainer.current_epoch + 1})"
            if requeue:
                job = requeue_slurm_job()
                how = f"SLURM job {job} requeued: it resumes with --ckpt_path last (or {path})"
            else:
                how = f"resume with: {resume_command(path)}"
            print(f"divmerge: {where}; saved {path}; {how}", file=sys.stderr, flush=True)
        self._restore()
        raise Preempted(EXIT_BASE + signum)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:  # noqa: D102
        self._restore()


def _last_path(trainer: Trainer) -> Path:
    """``last.ckpt`` in the first checkpoint directory (where ``--ckpt_path last`` looks)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "last.ckpt"
