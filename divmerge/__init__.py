"""divmerge: learn model-merging coefficients by minimising divergence to the experts."""

from divmerge.errors import DivMergeError

__all__ = ["DivMergeError"]
