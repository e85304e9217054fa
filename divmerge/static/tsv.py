"""TSV-M: Task Singular Vectors Merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Follows the authors' code (github.com/AntoAndGar/task_singular_vectors, ``TSVM_utils``): per matrix,
each task's top 1/T singular components, concatenated, left and right singular vectors orthogonalised
by their polar factors (SVD P S Q^T -> P Q^T), the matrix rebuilt with the kept singular values; every
other tensor is the mean of the task vectors; the result is scaled by alpha (here ``lambda_``).
"""

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from divmerge.static.common import (
    check_fraction,
    check_lambda,
    check_tensors,
    matrix_merge,
    nonzero_svd,
    polar,
)

TSV_LAMBDA = 1.0  # Gargiulo et al.: alpha = 1 (the authors' code tunes it on validation data in (0, 3]).
TSV_RANK_FRACTION = None  # None: 1/T of each matrix's rank per task, the paper's (and code's) choice.

TSV_REFERENCE = (
    "Gargiulo et al., 'Task Singular Vectors: Reducing Task Interference in Model Merging', CVPR 2025."
)


def check_rank_fraction(rank_fraction: object) -> float | None:
    """Return ``rank_fraction`` (None or a float in (0, 1]), or raise.

    Args:
        rank_fraction: The TSV-M option.

    Returns:
        None (1/T), or ``float(rank_fraction)``.

    Raises:
        DivMergeError: If it is neither None nor a number in (0, 1].

    """
    if rank_fraction is None:
        return None
    return check_fraction(
        rank_fraction,
        "TSV-M rank_fraction",
        "the fraction of each task's singular components kept; None means 1/T",
        "rank_fraction=0.25, or leave it unset for 1/T",
    )


def kept_per_task(rank: int, num_tasks: int, rank_fraction: float | None) -> int:
    """Singular components kept per task: floor(fraction * rank) (1/T by default), at least one.

    Args:
        rank: min(m, n) of the matrix.
        num_tasks: T.
        rank_fraction: None (1/T) or a fraction in (0, 1].

    Returns:
        k in [1, rank].

    """
    if rank_fraction is None:
        return max(1, rank // num_tasks)
    return min(rank, max(1, math.floor(rank_fraction * rank + 1e-9)))


def tsv_delta(tau: Tensor, rank_fraction: float | None) -> Tensor:
    """TSV-M's merged task matrix before scaling: U_perp diag(s) V_perp^T of the tasks' top components.

    Args:
        tau: Task matrices of one tensor in float32, (T, m, n).
        rank_fraction: Fraction of each task's rank kept; None means 1/T.

    Returns:
        The merged task matrix, (m, n).

    """
    num_tasks, m, n = tau.shape
    k = kept_per_task(min(m, n), num_tasks, rank_fraction)
    us, ss, vhs = [], [], []
    for t in range(num_tasks):
        u, s, vh = nonzero_svd(tau[t])  # (m, q), (q,), (q, n); zero components dropped
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    s_cat = torch.cat(ss)  # (K,), K <= T * k
    if s_cat.numel() == 0:  # every task matrix is zero (e.g. a frozen layer)
        return torch.zeros(m, n, dtype=tau.dtype, device=tau.device)
    u_perp = polar(torch.cat(us, dim=1))  # (m, K): orthonormal columns when K <= m
    vh_perp = polar(torch.cat(vhs, dim=0))  # (K, n): orthonormal rows when K <= n
    return (u_perp * s_cat) @ vh_perp  # (m, n)


def tsv_m(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    rank_fraction: float | None = TSV_RANK_FRACTION,
    lambda_: float = TSV_LAMBDA,
) -> dict[str, Tensor]:
    """TSV-M: merge each matrix in the decorrelated span of the tasks' top singular vectors.

    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.

    Per 2-D tensor (m, n), rank r = min(m, n): (1) SVD of each task matrix tau_t = U_t S_t V_t^T, keeping
    its top k = floor(rank_fraction * r) components (default r // T, at least 1; components with a zero
    singular value are dropped, their vectors being arbitrary); (2) concatenate U = [U_1k .. U_Tk] (m, K),
    s = [s_1k .. s_Tk] (K,), V = [V_1k .. V_Tk] (n, K); (3) decorrelate: replace U and V by their polar
    factors (the nearest matrices with orthonormal columns, P Q^T of their SVDs P S Q^T: orthogonal
    Procrustes); (4) merged = theta_0 + lambda * U_perp diag(s) V_perp^T. With K <= min(m, n) (the default)
    this is an SVD: the merged update's singular values are exactly the kept s. A larger ``rank_fraction``
    (the code's lossless variant uses 1) makes K > r: the polar factors then have orthonormal rows only.

    Every 2-D tensor is treated as a matrix, token and position embeddings (vocab x hidden) included, as
    in the authors' code (which SVDs every 2-D weight of the encoder, the positional embedding too): an
    embedding is a linear map from one-hot tokens, and rows (tokens) that no task changed stay unchanged,
    since the kept U rows of those tokens are zero and polar factors keep zero rows zero. Its cost is T + 2
    thin SVDs of a (vocab, hidden) matrix. Tensors that are not 2-D (biases, norms, convolutions) get the
    mean of the task vectors, as in the authors' code, then the same lambda.

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        rank_fraction: Fraction of each task matrix's rank kept, in (0, 1] (default None: 1/T, the
            paper's choice, which fills exactly the rank of the merged matrix).
        lambda_: Scaling alpha of the merged task vector (default 1.0, the paper's; the authors' code can
            also pick it on validation data from 0.1 .. 3.0).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    Raises:
        DivMergeError: On a bad option value, mismatched tensors, or a non-finite task matrix.

    """
    check_tensors(base, task_vectors)
    fraction = check_rank_fraction(rank_fraction)
    lam = check_lambda(lambda_)
    return matrix_merge(base, task_vectors, lam, lambda tau: tsv_delta(tau, fraction))
