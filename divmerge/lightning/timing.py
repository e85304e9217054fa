"""Wall time per phase of a run (start-up, expert building, setup, teacher cache, train, validation, test)."""

import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch import Callback

from divmerge.phases import drain


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None where that is unavailable."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # from field 3 (state)
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


class PhaseTimer(Callback):
    """Collects wall seconds per phase; ``table()`` formats them.

    Phases: ``start-up`` (process start to the first setup: interpreter, imports, config), ``setup``
    (data, experts), ``train`` (excluding validation), ``validation`` and ``test``. Phases timed inside
    those steps (``divmerge.phases``: building demo experts, the teacher cache) are reported apart and
    taken out of the step they ran in. A phase that runs several times (the setup of fit and of the
    test after fit) is summed. Wall times depend on what else the machine runs at the same time.

    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: dict[str, float] = {}
        self._validation_before_fit = 0.0

    def _begin(self, phase: str) -> None:
        self._open[phase] = time.perf_counter()

    def _end(self, phase: str) -> None:
        if phase in self._open:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - self._open.pop(phase)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        inner = drain()  # e.g. experts built in prepare_data, before this first hook
        age = process_age()
        if age is not None and not self.seconds:
            self.seconds["start-up"] = age - sum(inner.values())
        self._add(inner)
        self._begin("setup")

    def _add(self, inner: dict[str, float], taken_from: str | None = None) -> None:
        for phase, seconds in inner.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
            if taken_from is not None:
                self.seconds[taken_from] -= seconds

    def _setup_done(self) -> None:
        self._end("setup")
        self._add(drain(), taken_from="setup")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._setup_done()
        self._validation_before_fit = self.seconds.get("validation", 0.0)
        self._begin("train")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._end("train")
        validation = self.seconds.get("validation", 0.0) - self._validation_before_fit
        self.seconds["train"] = self.seconds.get("train", 0.0) - validation

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.state.fn != "fit":
            self._setup_done()
        self._begin("validation")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._end("validation")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._setup_done()
        self._begin("test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._end("test")

    def current(self) -> str | None:
        """The innermost phase running now (``setup``, ``train``, ``validation``, ``test``), or None."""
        return next(reversed(self._open), None)

    def table(self) -> str:
        """A markdown table: phase, seconds, share of the total; the total last."""
        total = sum(self.seconds.values())
        lines = ["| phase | wall s | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in self.seconds.items() if total > 0]
        lines.append(f"| total | {total:.1f} | |")
        return "\n".join(lines)
