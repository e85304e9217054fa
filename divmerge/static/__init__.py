"""Static (data-free) merges: averaging, task arithmetic, TIES, DARE, TSV-M, Iso-C/CTS, WUDI.

One file per method (``linear``: averaging and task arithmetic, ``ties``, ``dare``, ``tsv``: TSV-M,
``iso``: Iso-C and Iso-CTS, ``wudi``: WUDI, solved by Adam on the task vectors alone), their shared
checks and SVD helpers (``common``), and ``registry`` (``STATIC_METHODS``, ``static_merge``,
``check_method``).
"""

from divmerge.static.dare import DARE_P, DARE_THEN, DareThen, dare, tensor_seed
from divmerge.static.iso import ISO_COMMON_FRACTION, ISO_LAMBDA, iso_c, iso_cts
from divmerge.static.linear import TA_LAMBDA, average, task_arithmetic
from divmerge.static.registry import STATIC_METHODS, StaticMethod, check_method, static_merge
from divmerge.static.ties import CHUNK, TIES_DENSITY, TIES_LAMBDA, ties
from divmerge.static.tsv import TSV_LAMBDA, TSV_RANK_FRACTION, tsv_m
from divmerge.static.wudi import WUDI_ITERATIONS, WUDI_LAMBDA, WUDI_LR, wudi

__all__ = [
    "CHUNK",
    "DARE_P",
    "DARE_THEN",
    "ISO_COMMON_FRACTION",
    "ISO_LAMBDA",
    "STATIC_METHODS",
    "TA_LAMBDA",
    "TIES_DENSITY",
    "TIES_LAMBDA",
    "TSV_LAMBDA",
    "TSV_RANK_FRACTION",
    "WUDI_ITERATIONS",
    "WUDI_LAMBDA",
    "WUDI_LR",
    "DareThen",
    "StaticMethod",
    "average",
    "check_method",
    "dare",
    "iso_c",
    "iso_cts",
    "static_merge",
    "task_arithmetic",
    "tensor_seed",
    "ties",
    "tsv_m",
    "wudi",
]
