"""Static (data-free, training-free) merges: weight averaging, task arithmetic, TIES, DARE.

One file per method (``linear``: averaging and task arithmetic, ``ties``, ``dare``), their shared checks
(``common``), and ``registry`` (``STATIC_METHODS``, ``static_merge``, ``check_method``).
"""

from divmerge.static.dare import DARE_P, DARE_THEN, DareThen, dare, tensor_seed
from divmerge.static.linear import TA_LAMBDA, average, task_arithmetic
from divmerge.static.registry import STATIC_METHODS, StaticMethod, check_method, static_merge
from divmerge.static.ties import CHUNK, TIES_DENSITY, TIES_LAMBDA, ties

__all__ = [
    "CHUNK",
    "DARE_P",
    "DARE_THEN",
    "STATIC_METHODS",
    "TA_LAMBDA",
    "TIES_DENSITY",
    "TIES_LAMBDA",
    "DareThen",
    "StaticMethod",
    "average",
    "check_method",
    "dare",
    "static_merge",
    "task_arithmetic",
    "tensor_seed",
    "ties",
]
