"""Shared pieces of the static merges: the input check, number checks, and theta_0 + lambda * delta.

Every method maps ``base`` (theta_0, name -> (*shape)) and ``task_vectors`` (tau stacked over the T
experts, name -> (T, *shape)), i.e. exactly ``ExpertSet.base`` and ``ExpertSet.task_vectors``, to the
merged tensors theta_0 + merged_tau (name -> (*shape), base's dtype and device). Work is done one tensor
at a time, so the only temporaries are a few copies of a single (T, *shape) tensor.

A method validates its option values before it touches a tensor, so that ``fn({}, {}, **options)``
checks the options alone (``divmerge.static.registry.check_method`` relies on it). Option checkers used
by one method only live in that method's file.
"""

import math
from collections.abc import Mapping
from numbers import Real

from torch import Tensor

from divmerge.errors import DivMergeError


def check_tensors(base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]) -> None:
    """Check that base and task vectors name the same tensors with shapes (*shape) and (T, *shape).

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).

    Raises:
        DivMergeError: On different names, a non-float tensor, a shape mismatch or a differing T.

    """
    missing = sorted(set(base) ^ set(task_vectors))
    if missing:
        where = "task_vectors" if missing[0] in base else "base"
        raise DivMergeError(
            f"Tensor {missing[0]!r} is missing from {where}: base and task_vectors must have the same keys "
            "(pass ExpertSet.base and ExpertSet.task_vectors together)."
        )
    num_tasks = None
    for name, theta0 in base.items():
        tau = task_vectors[name]
        if not (theta0.is_floating_point() and tau.is_floating_point()):
            raise DivMergeError(
                f"Tensor {name!r} is not floating point: merge only float tensors (as ExpertSet.names does)."
            )
        if tau.dim() != theta0.dim() + 1 or tau.shape[1:] != theta0.shape:
            raise DivMergeError(
                f"Task vector {name!r} has shape {tuple(tau.shape)} but its base has {tuple(theta0.shape)}: "
                "task vectors must be stacked over experts as (T, *base_shape)."
            )
        if num_tasks is None:
            num_tasks = tau.shape[0]
        if tau.shape[0] != num_tasks or num_tasks < 1:
            raise DivMergeError(
                f"Task vector {name!r} stacks {tau.shape[0]} experts but others stack {num_tasks}: every "
                "tensor needs the same number T >= 1 of experts on dim 0."
            )


def is_real(value: object) -> bool:
    """True for int/float-like numbers (bools excluded).

    Args:
        value: Any option value.

    Returns:
        Whether ``value`` is a real number other than a bool.

    """
    return isinstance(value, Real) and not isinstance(value, bool)


def check_lambda(lambda_: object) -> float:
    """Return ``lambda_`` as a float, or raise if it is not a finite number.

    Args:
        lambda_: The scaling option of task arithmetic, TIES or DARE.

    Returns:
        ``float(lambda_)``.

    Raises:
        DivMergeError: If ``lambda_`` is not a finite number.

    """
    if not is_real(lambda_) or not math.isfinite(float(lambda_)):
        raise DivMergeError(f"lambda_ must be a finite number, got {lambda_!r}: pass e.g. lambda_=0.3.")
    return float(lambda_)


def merged_tensor(theta0: Tensor, delta: Tensor, lam: float = 1.0) -> Tensor:
    """theta_0 + lam * delta in float32, returned in theta_0's dtype; ``delta`` (float32) is consumed.

    In place on ``delta``, so a merge's temporaries stay one tensor's size (no ``lam * delta`` and sum
    copies of the largest tensor, the embedding).

    Args:
        theta0: The base tensor, (*shape).
        delta: The merged task vector in float32, (*shape); overwritten.
        lam: Scaling of ``delta``.

    Returns:
        The merged tensor, (*shape), in theta0's dtype.

    """
    return delta.mul_(lam).add_(theta0).to(theta0.dtype)  # (*shape)
