"""The one exception type divmerge raises for bad input."""


class DivMergeError(Exception):
    """Bad input from the user: the message names the problem and the fix.

    ``train.py`` prints it as one line and exits non-zero instead of a traceback.
    """
