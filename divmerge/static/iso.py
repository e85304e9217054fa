"""Iso-C and Iso-CTS: isotropic merging (Marczak et al., ICML 2025, arXiv 2502.04959).

Follows the authors' code (github.com/danielm1405/iso-merging, ``src/utils/iso.py``): per matrix, Iso-C
flattens the spectrum of the summed task matrix to its mean singular value; Iso-CTS keeps the top
components of the sum (the common subspace), fills the rest of the rank with each task's top components
orthogonal to it, orthogonalises the concatenated singular vectors (polar factors) and flattens the
spectrum the same way. Every other tensor is the mean of the task vectors; the result is scaled by alpha
(here ``lambda_``).
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

ISO_LAMBDA = 1.0  # Marczak et al.: alpha = 1 (the authors' code tunes it on validation data in (0, 3]).
ISO_COMMON_FRACTION = 0.8  # Marczak et al.: the common subspace takes 80% of the rank (code's default).

ISO_REFERENCE = (
    "Marczak et al., 'No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces', ICML 2025."
)


def check_common_fraction(common_fraction: object) -> float:
    """Return ``common_fraction`` as a float, or raise if it is not in (0, 1].

    Args:
        common_fraction: The Iso-CTS option.

    Returns:
        ``float(common_fraction)``.

    Raises:
        DivMergeError: If it is not a number in (0, 1].

    """
    return check_fraction(
        common_fraction,
        "Iso-CTS common_fraction",
        "the fraction of each matrix's rank given to the common subspace; 1 is Iso-C",
        f"common_fraction={ISO_COMMON_FRACTION}",
    )


def subspace_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS's split of the rank: (common size c, per-task size s), c + T * s = rank.

    The authors' rule: c0 = floor(fraction * rank), s = round((rank - c0) / T), c = rank - T * s, so the
    task-specific part divides evenly among the tasks and the common part takes the remainder. Here s is
    also capped at rank // T (the code's rule goes negative for tiny rank and fraction).

    Args:
        rank: min(m, n) of the matrix.
        num_tasks: T.
        common_fraction: Fraction in (0, 1].

    Returns:
        ``(c, s)`` with c >= 0, s >= 0 and c + T * s == rank.

    """
    common = math.floor(common_fraction * rank + 1e-9)
    per_task = min(round((rank - common) / num_tasks), rank // num_tasks)
    return rank - num_tasks * per_task, per_task


def iso_c_delta(tau: Tensor) -> Tensor:
    """Iso-C's merged task matrix before scaling: mean(s) U V^T for the SVD U diag(s) V^T of sum_t tau_t.

    Args:
        tau: Task matrices of one tensor in float32, (T, m, n).

    Returns:
        The merged task matrix, (m, n).

    """
    u, s, vh = nonzero_svd(tau.sum(dim=0))  # (m, q), (q,), (q, n); zero components dropped
    if s.numel() == 0:  # the sum is zero (e.g. a frozen layer)
        return torch.zeros(tau.shape[1:], dtype=tau.dtype, device=tau.device)
    return s.mean() * (u @ vh)  # (m, n)


def iso_cts_delta(tau: Tensor, common_fraction: float) -> Tensor:
    """Iso-CTS's merged task matrix before scaling: common plus task-specific subspaces, isotropic.

    Args:
        tau: Task matrices of one tensor in float32, (T, m, n).
        common_fraction: Fraction of the rank given to the common subspace, in (0, 1].

    Returns:
        The merged task matrix, (m, n).

    """
    num_tasks, m, n = tau.shape
    common, per_task = subspace_sizes(min(m, n), num_tasks, common_fraction)
    u, s, vh = nonzero_svd(tau.sum(dim=0))  # (m, q), (q,), (q, n)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]  # common subspace, (m, c) (c,) (c, n)
    if per_task:
        for t in range(num_tasks):
            residual = tau[t] - us[0] @ (us[0].T @ tau[t])  # (m, n): tau_t without its common part
            scale = float(torch.linalg.matrix_norm(tau[t]))  # zero-tolerance relative to tau_t itself
            u_t, s_t, vh_t = nonzero_svd(residual, scale)  # (m, q_t), (q_t,), (q_t, n)
            us.append(u_t[:, :per_task])
            ss.append(s_t[:per_task])
            vhs.append(vh_t[:per_task])
    s_cat = torch.cat(ss)  # (K,), K <= rank
    if s_cat.numel() == 0:  # every task matrix is zero (e.g. a frozen layer)
        return torch.zeros(m, n, dtype=tau.dtype, device=tau.device)
    u_perp = polar(torch.cat(us, dim=1))  # (m, K), orthonormal columns
    vh_perp = polar(torch.cat(vhs, dim=0))  # (K, n), orthonormal rows
    return s_cat.mean() * (u_perp @ vh_perp)  # (m, n)


def iso_c(
    base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], lambda_: float = ISO_LAMBDA
) -> dict[str, Tensor]:
    """Iso-C: isotropic merging in the common subspace (the spectrum of the summed task matrix, flattened).

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025.

    Per 2-D tensor: SVD of the task-arithmetic sum, sum_t tau_t = U diag(s) V^T; every singular value is
    replaced by their mean s_bar, so merged = theta_0 + lambda * s_bar U V^T: the merged update is
    isotropic (all its nonzero singular values equal lambda * s_bar) in the sum's singular directions.

    Every 2-D tensor is treated as a matrix, token and position embeddings (vocab x hidden) included, as
    in the authors' code (which SVDs every 2-D weight of the encoder, the positional embedding too): an
    embedding is a linear map from one-hot tokens, and rows (tokens) that no task changed stay unchanged
    (their rows of U are zero). Components with a zero singular value are dropped before the spectrum is
    averaged: their singular vectors are arbitrary, so a rank-deficient sum (few tokens changed, one
    low-rank task) is not filled with made-up directions; for full-rank matrices, as in the paper, this
    changes nothing. Tensors that are not 2-D (biases, norms, convolutions) get the mean of the task
    vectors, as in the authors' code, then the same lambda.

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        lambda_: Scaling alpha of the merged task vector (default 1.0; the authors' code picks it on
            validation data from 0.1 .. 3.0).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    Raises:
        DivMergeError: On a bad option value, mismatched tensors, or a non-finite task matrix.

    """
    check_tensors(base, task_vectors)
    lam = check_lambda(lambda_)
    return matrix_merge(base, task_vectors, lam, iso_c_delta)


def iso_cts(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    common_fraction: float = ISO_COMMON_FRACTION,
    lambda_: float = ISO_LAMBDA,
) -> dict[str, Tensor]:
    """Iso-CTS: isotropic merging in common and task-specific subspaces.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025.

    Per 2-D tensor (m, n), rank r = min(m, n): (1) split r into a common size c and a per-task size s
    with c + T * s = r (``subspace_sizes``: c ~ common_fraction * r, s = (r - c) / T); (2) common
    subspace: the top c components of the SVD of sum_t tau_t; (3) task-specific subspaces: for each task,
    the top s components of tau_t - U_c U_c^T tau_t (tau_t with its common part projected out); (4)
    concatenate all singular vectors and replace U and V by their polar factors (orthonormal, orthogonal
    Procrustes); (5) flatten the concatenated spectrum to its mean s_bar: merged = theta_0 + lambda *
    s_bar U_perp V_perp^T. ``common_fraction=1`` leaves no task-specific part: it is Iso-C. With one task
    it is Iso-C too (the residual's top components are the task's remaining ones).

    Embeddings, zero singular values and tensors that are not 2-D are handled as in ``iso_c``: every 2-D
    tensor is a matrix (untouched embedding rows stay unchanged), numerically zero components are dropped
    (from the sum and from each residual) before orthogonalising and averaging, and other tensors get
    the mean of the task vectors, then the same lambda.

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        common_fraction: Fraction of each matrix's rank for the common subspace, in (0, 1] (default 0.8,
            the paper's and the authors' code's).
        lambda_: Scaling alpha of the merged task vector (default 1.0; the authors' code picks it on
            validation data from 0.1 .. 3.0).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    Raises:
        DivMergeError: On a bad option value, mismatched tensors, or a non-finite task matrix.

    """
    check_tensors(base, task_vectors)
    fraction = check_common_fraction(common_fraction)
    lam = check_lambda(lambda_)
    return matrix_merge(base, task_vectors, lam, lambda tau: iso_cts_delta(tau, fraction))
