"""Shared pieces of the static merges: input and number checks, theta_0 + lambda * delta, SVD helpers.

Every method maps ``base`` (theta_0, name -> (*shape)) and ``task_vectors`` (tau stacked over the T
experts, name -> (T, *shape)), i.e. exactly ``ExpertSet.base`` and ``ExpertSet.task_vectors``, to the
merged tensors theta_0 + merged_tau (name -> (*shape), base's dtype and device). Work is done one tensor
at a time, so the only temporaries are a few copies of a single (T, *shape) tensor.

A method validates its option values before it touches a tensor, so that ``fn({}, {}, **options)``
checks the options alone (``divmerge.static.registry.check_method`` relies on it). Option checkers used
by one method only live in that method's file. ``matrix_merge``, ``nonzero_svd`` and ``polar`` serve the
SVD merges (``tsv``, ``iso``).
"""

import math
from collections.abc import Callable, Mapping
from numbers import Real

import torch
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


def check_fraction(value: object, option: str, meaning: str, example: str) -> float:
    """Return ``value`` as a float, or raise if it is not a number in (0, 1].

    Args:
        value: The option value.
        option: The option's name, quoted in the message.
        meaning: What the fraction is, quoted in the message.
        example: A valid setting to suggest, e.g. ``"common_fraction=0.8"``.

    Returns:
        ``float(value)``.

    Raises:
        DivMergeError: If ``value`` is not a number in (0, 1].

    """
    if not is_real(value) or not 0.0 < float(value) <= 1.0:
        raise DivMergeError(f"{option} must be in (0, 1] ({meaning}), got {value!r}: pass e.g. {example}.")
    return float(value)


def check_finite(name: str, tau: Tensor) -> None:
    """Refuse a task vector with NaN or infinite entries (an SVD of it fails or returns garbage).

    Args:
        name: The tensor's name, quoted in the message.
        tau: Its task vectors, (T, *shape).

    Raises:
        DivMergeError: If some entry is not finite.

    """
    if not bool(torch.isfinite(tau).all()):
        raise DivMergeError(
            f"Task vector {name!r} has NaN or infinite entries: SVD-based merges need finite task vectors "
            "(check that expert's checkpoint)."
        )


def robust_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in ``x``'s dtype, redone in float64 when LAPACK fails to converge.

    Args:
        x: A floating-point matrix, (m, n).

    Returns:
        ``(u, s, vh)``, (m, r), (r,), (r, n), r = min(m, n), in ``x``'s dtype.

    """
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)  # (m, r), (r,), (r, n)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def nonzero_svd(x: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a matrix without its numerically zero components.

    A component is kept when its singular value exceeds ``max(m, n) * eps * scale`` (``scale`` defaults to
    the largest singular value: ``torch.linalg.matrix_rank``'s rule). Singular vectors of zero singular
    values are arbitrary (any orthonormal completion), so the SVD merges drop them rather than spread
    weight along made-up directions (e.g. onto embedding rows no expert changed).

    Args:
        x: A float32 matrix, (m, n).
        scale: Magnitude the tolerance is relative to; None means the largest singular value of ``x``.

    LAPACK's float32 SVD can fail to converge on the ill-conditioned matrices these merges build
    (concatenated, nearly parallel singular vectors with many repeated singular values: seen with
    Iso-CTS on MiniLM's 30522 x 384 embedding); the SVD is then redone in float64 and rounded back.

    Returns:
        ``(u, s, vh)``, (m, q), (q,), (q, n), with q <= min(m, n) the numerical rank and ``s`` descending.

    """
    u, s, vh = robust_svd(x)  # (m, r), (r,), (r, n)
    if scale is None:
        scale = float(s[0]) if s.numel() else 0.0
    keep = int((s > max(x.shape) * torch.finfo(x.dtype).eps * scale).sum())  # s is sorted descending
    return u[:, :keep], s[:keep], vh[:keep]


def polar(x: Tensor) -> Tensor:
    """The orthogonal polar factor P Q^T of x = P S Q^T: the closest matrix to x with orthonormal columns.

    It solves the orthogonal Procrustes problem min ||x - W||_F over W with W^T W = I (orthonormal rows
    instead when x is wider than tall), so a set of nearly orthogonal singular vectors becomes exactly
    orthogonal while each vector moves as little as possible. Used on the concatenated left and right
    singular vectors in TSV-M and Iso-CTS. For a rank-deficient x (e.g. two experts sharing a direction)
    only its nonzero components are used (the partial isometry with x's range), not an arbitrary
    completion: so P Q^T never points where no column of x does.

    Args:
        x: A float32 matrix, (m, K).

    Returns:
        The polar factor, (m, K).

    """
    p, _, qh = nonzero_svd(x)  # (m, q), (q,), (q, K), q = rank of x
    return p @ qh  # (m, K)


def matrix_merge(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    lam: float,
    matrix_delta: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """theta_0 + lam * delta: ``matrix_delta(tau)`` for 2-D tensors, the mean of the task vectors otherwise.

    The frame of the SVD merges (TSV-M, Iso-C, Iso-CTS), whose papers' code averages every tensor that
    is not a matrix (biases, norms, convolutions).

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        lam: Scaling of the merged task vector.
        matrix_delta: Merged task matrix (m, n) from the float32 task matrices (T, m, n).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    Raises:
        DivMergeError: If a task matrix has NaN or infinite entries.

    """
    merged = {}
    for name, theta0 in base.items():
        tau = task_vectors[name].to(torch.float32)  # (T, *shape)
        if tau.dim() == 3:
            check_finite(name, tau)
            delta = matrix_delta(tau)  # (m, n)
        else:
            delta = tau.mean(dim=0)  # (*shape)
        merged[name] = merged_tensor(theta0, delta, lam)
    return merged
