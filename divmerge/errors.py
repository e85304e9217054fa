"""The one exception type divmerge raises for bad input, and the one way to quote another error."""


class DivMergeError(Exception):
    """Bad input from the user: the message names the problem and the fix.

    ``train.py`` prints it as one line and exits non-zero instead of a traceback.
    """


def first_line(err: BaseException) -> str:
    """The first line of an error (and its second when the first ends in a colon, a heading).

    Args:
        err: Any exception, typically from transformers, peft or safetensors.

    Returns:
        One line to quote inside a DivMergeError message; the type name when the message is empty.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


class RunStoppedError(DivMergeError):
    """A run stopped mid-way on something it met while running (e.g. a loss that turned NaN).

    One line and exit code 2 like any ``DivMergeError``, but what the run wrote is kept: its last
    checkpoint is what the user resumes from or inspects (bad-input failures remove a fresh run's
    directories, ``divmerge.lightning.run_dir.guarded``).
    """
