"""Wall seconds of phases that run inside other steps (building experts, the teacher cache).

The run's phase table (``divmerge.lightning.timing``) drains them and reports them apart from the step
they ran in, so that fine-tuning demo experts is not counted as start-up.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager

EXPERT_PHASE = "expert building"
TEACHER_PHASE = "teacher cache"
_SECONDS: dict[str, float] = {}


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``phase``.

    Args:
        phase: Phase name, e.g. :data:`EXPERT_PHASE`.
    """
    started = time.perf_counter()
    try:
        yield
    finally:
        _SECONDS[phase] = _SECONDS.get(phase, 0.0) + time.perf_counter() - started


def drain() -> dict[str, float]:
    """The seconds recorded since the last call, per phase (and forget them)."""
    out = dict(_SECONDS)
    _SECONDS.clear()
    return out
