"""Shared pieces of the static merges: input and option checks, and theta_0 + lambda * delta.

Every method maps ``base`` (theta_0, name -> (*shape)) and ``task_vectors`` (tau stacked over the T
experts, name -> (T, *shape)), i.e. exactly ``ExpertSet.base`` and ``ExpertSet.task_vectors``, to the
merged tensors theta_0 + merged_tau (name -> (*shape), base's dtype and device). Work is done one tensor
at a time, so the only temporaries are a few copies of a single (T, *shape) tensor.
"""

import math
from collections.abc import Mapping
from numbers import Real

from torch import Tensor

from divmerge.errors import DivMergeError

TA_LAMBDA = 0.3  # Ilharco et al. 2023 pick lambda on validation data; 0.3 is their usual optimum.
TIES_LAMBDA = 1.0  # Yadav et al. 2023: lambda = 1 is the recommended setting with the disjoint mean.
TIES_DENSITY = 0.2  # Yadav et al. 2023: keep the top-20% magnitudes of each task vector.
DARE_P = 0.5  # See `divmerge.static.dare`: a middle drop rate; Yu et al.'s p = 0.9 is for large LLMs.


def check_tensors(base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]) -> None:
    """Check that base and task vectors name the same tensors with shapes (*shape) and (T, *shape)."""
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
    """True for int/float-like numbers (bools excluded)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_lambda(lambda_: object) -> float:
    """Return ``lambda_`` as a float, or raise if it is not a finite number."""
    if not is_real(lambda_) or not math.isfinite(float(lambda_)):
        raise DivMergeError(f"lambda_ must be a finite number, got {lambda_!r}: pass e.g. lambda_=0.3.")
    return float(lambda_)


def check_density(density: object) -> float:
    """Return ``density`` as a float, or raise if it is not in (0, 1]."""
    if not is_real(density) or not 0.0 < float(density) <= 1.0:
        raise DivMergeError(
            f"TIES density must be in (0, 1] (the fraction of each task vector kept), got {density!r}: "
            f"pass e.g. density={TIES_DENSITY}."
        )
    return float(density)


def check_p(p: object) -> float:
    """Return ``p`` as a float, or raise if it is not in [0, 1)."""
    if not is_real(p) or not 0.0 <= float(p) < 1.0:
        raise DivMergeError(
            f"DARE drop probability p must be in [0, 1), got {p!r}: pass e.g. p={DARE_P} (p=0 drops nothing)."
        )
    return float(p)


def check_seed(seed: object) -> int:
    """Return ``seed`` as an int, or raise if it is not an integer."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DivMergeError(f"DARE seed must be an integer, got {seed!r}: pass e.g. seed=0.")
    return seed


def merged_tensor(theta0: Tensor, delta: Tensor, lam: float = 1.0) -> Tensor:
    """theta_0 + lam * delta in float32, returned in theta_0's dtype; ``delta`` (float32) is consumed.

    In place on ``delta``, so a merge's temporaries stay one tensor's size (no ``lam * delta`` and sum
    copies of the largest tensor, the embedding).
    """
    return delta.mul_(lam).add_(theta0).to(theta0.dtype)  # (*shape)
