"""Static (data-free, training-free) merges: weight averaging, task arithmetic, TIES, DARE.

One file per method, and ``registry`` (``STATIC_METHODS``, ``static_merge``, ``check_method``).
"""

from divmerge.static.common import DARE_P, TA_LAMBDA, TIES_DENSITY, TIES_LAMBDA
from divmerge.static.dare import DARE_THEN, DareThen, tensor_seed
from divmerge.static.linear import average, task_arithmetic
from divmerge.static.registry import STATIC_METHODS, StaticMethod, check_method, static_merge
from divmerge.static.ties import CHUNK, ties

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
    "static_merge",
    "task_arithmetic",
    "tensor_seed",
    "ties",
]
