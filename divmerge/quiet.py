"""One context manager that silences library chatter (logs and progress bars) for a moment."""

import contextlib
import logging
from collections.abc import Iterator

from transformers.utils import logging as hf_logging

_LIBRARY_LOGGERS = ("transformers", "lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence transformers' and Lightning's info logs and progress bars while active, restoring them after.

    Args:
        enabled: False makes this a no-op (for a ``--verbose`` switch).
    """
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
