"""Plain progress lines for runs whose output goes to a file (``nohup ... > log``), with an ETA.

A progress bar redraws one terminal line; written to a file it shows nothing useful until the run ends.
When stdout is not a terminal, divmerge turns the bar off and prints a line every ``every_s`` seconds
(and at each epoch's end) instead, and flushes the loggers (``metrics.csv``) at the same moments.
"""

import sys
import time

import lightning as L
from lightning.pytorch import Callback

PLAIN_EVERY_S = 30.0
"""Seconds between progress lines when stdout is not a terminal (and at each epoch's end)."""


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``.

    Args:
        seconds: A non-negative duration.
    """
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PlainProgress(Callback):
    """Print ``step i/N | epoch e/E | loss | steps/s | ETA`` lines and flush the loggers regularly.

    The ETA divides the steps left by the training rate so far (validation excluded), on the machine as
    loaded now: it moves when other work starts or stops on the same machine.

    An epoch without validation (e.g. fine-tuning an expert) gets its line at the epoch's end instead.

    Args:
        every_s: Seconds between two progress lines (the first comes after ``every_s`` too).
        label: Named after ``divmerge:`` on each line (e.g. ``expert 'rt'``); None names nothing.
    """

    def __init__(self, every_s: float = 30.0, label: str | None = None) -> None:
        self.every_s = every_s
        self.label = label
        self._validated = False
        self._train_s = 0.0
        self._since = 0.0
        self._last_print = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._first_step = trainer.global_step  # > 0 when resuming
        self._last_print = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._since = time.perf_counter()
        self._validated = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if not self._validated:  # no validation ran this epoch: its line comes now
            now = time.perf_counter()
            self._train_s += now - self._since
            self._since = now
            self._report(trainer, now)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:  # noqa: D102
        now = time.perf_counter()
        if now - self._last_print >= self.every_s:
            self._report(trainer, now)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.state.fn == "fit" and self._since:
            self._train_s += time.perf_counter() - self._since
            self._since = 0.0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validated = True
            self._report(trainer, time.perf_counter(), epoch_end=True)
            self._since = time.perf_counter()

    def _report(self, trainer: L.Trainer, now: float, epoch_end: bool = False) -> None:
        self._last_print = now
        for logger in trainer.loggers:
            logger.save()
        if not trainer.is_global_zero:
            return
        trained = self._train_s + (now - self._since if self._since else 0.0)
        done, total = trainer.global_step, trainer.estimated_stepping_batches
        rate = (done - self._first_step) / trained if trained > 0 else 0.0
        parts = [self.label] if self.label else []
        parts += [f"step {done}/{int(total)}", f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        metrics = trainer.callback_metrics
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if epoch_end and "val/anp" in metrics:
            parts.append(f"val ANP {float(metrics['val/anp']):.4f}")
        if rate > 0:
            parts.append(f"{rate:.2f} steps/s")
            parts.append(f"ETA {duration(max(0.0, total - done) / rate)}")
        print("divmerge: " + " | ".join(parts), file=sys.stdout, flush=True)
