"""Wall time per phase of a run (start-up, setup, teacher cache, training, validation, test)."""

import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch import Callback

TEACHER_PHASE = "teacher cache"


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
    (data, experts; the module's own ``phase_seconds``, e.g. the teacher cache, are reported apart and
    taken out of it), ``train`` (excluding validation), ``validation`` and ``test``. A phase that runs
    several times (the setup of fit and of the test after fit) is summed.

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
        age = process_age()
        if age is not None and not self.seconds:
            self.seconds["start-up"] = age
        self._begin("setup")

    def _setup_done(self, pl_module: L.LightningModule) -> None:
        self._end("setup")
        for phase, seconds in getattr(pl_module, "phase_seconds", {}).items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
            self.seconds["setup"] -= seconds
        getattr(pl_module, "phase_seconds", {}).clear()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._setup_done(pl_module)
        self._validation_before_fit = self.seconds.get("validation", 0.0)
        self._begin("train")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._end("train")
        validation = self.seconds.get("validation", 0.0) - self._validation_before_fit
        self.seconds["train"] = self.seconds.get("train", 0.0) - validation

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.state.fn != "fit":
            self._setup_done(pl_module)
        self._begin("validation")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._end("validation")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._setup_done(pl_module)
        self._begin("test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._end("test")

    def table(self) -> str:
        """A markdown table: phase, seconds, share of the total; the total last."""
        total = sum(self.seconds.values())
        lines = ["| phase | wall s | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in self.seconds.items() if total > 0]
        lines.append(f"| total | {total:.1f} | |")
        return "\n".join(lines)
