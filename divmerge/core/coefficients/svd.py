"""SVD coefficients: one learned scale per task per singular direction of each task-vector matrix.

Each matrix task vector is kept as its truncated SVD tau_t(l) ~ U_t S_t V_t^T (rank r) and merged as

    theta(l) = theta_0(l) + sum_t U_t diag(c[t, l, :] * s_t) V_t^T

so the learned coefficients choose how much of each task's singular components to keep, the space of
AdaRank (Lee et al., "AdaRank: Adaptive Rank Pruning for Enhanced Model Merging", arXiv 2503.22178), which
learns a mask over them, and of the task singular vectors of TSV-M (Gargiulo et al., CVPR 2025, arXiv
2412.00081). Storing U_t S_t (R, r) and V_t^T (r, N) instead of tau_t (R, N) also shrinks the task vectors
when r (R + N) < R N. 1-D tensors, embedding tables and LM heads are kept whole with one coefficient
per task, as layer-wise.
"""

from collections.abc import Mapping

import torch
from torch import Size, Tensor

from divmerge.core.coefficients.base import Layout, Stored, is_matrix, matrix_layout
from divmerge.core.merge import WeightedSum
from divmerge.errors import DivMergeError


class SvdSpace:
    """Per matrix, one coefficient per task per singular direction of its rank-r task vectors.

    Args:
        rank: Singular directions kept per task and matrix; None keeps all of them (exact: one-hot
            coefficients then reproduce each expert). At least 1 and at most the smallest matrix's
            min(rows, columns).
    """

    per_tensor = True
    exact: bool

    def __init__(self, rank: int | None = None) -> None:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise DivMergeError(
                f"space_options.rank is {rank!r}: give a positive integer, or none for full rank."
            )
        self.rank = rank
        self.exact = rank is None  # a truncated SVD does not reproduce the experts

    def _rank(self, shape: Size) -> int:
        return min(shape) if self.rank is None else self.rank

    def layout(self, shapes: Mapping[str, Size]) -> Layout:
        """A matrix reads r columns (labelled ``<name>@s<i>``); any other tensor one column."""
        matrices = {n: s for n, s in shapes.items() if is_matrix(n, s)}
        if matrices and self.rank is not None:
            name, shape = min(matrices.items(), key=lambda item: min(item[1]))
            if self.rank > min(shape):
                raise DivMergeError(
                    f"space_options.rank is {self.rank}, above the rank {min(shape)} of {name!r} "
                    f"{tuple(shape)}: give a rank from 1 to {min(shape)}, or none for full rank."
                )
        return matrix_layout(shapes, self._rank, "{name}@s{i}")

    def store(self, name: str, tau: Tensor) -> Stored:
        """A matrix's stack as factors (U S (T, R, r), V^T (T, r, N)); other tensors as the stack."""
        if not is_matrix(name, tau.shape[1:]):
            return tau
        r = self._rank(tau.shape[1:])
        u, s, vh = torch.linalg.svd(tau.to(torch.float32), full_matrices=False)  # (T,R,m) (T,m) (T,m,N)
        return (u[..., :r] * s[:, None, :r]).to(tau.dtype), vh[:, :r].contiguous().to(tau.dtype)

    def merge(self, coef: Tensor, base: Tensor, stored: Stored) -> Tensor:
        """theta_0 + sum_t (U_t S_t) diag(c_t) V_t^T for factors; ``WeightedSum`` for a stack."""
        if isinstance(stored, Tensor):
            return WeightedSum.apply(coef[:, 0], base, stored)
        us, vh = stored  # (T, R, r), (T, r, N)
        num_tasks, rows, r = us.shape
        scaled = (us.to(torch.float32) * coef[:, None, :].to(torch.float32)).permute(1, 0, 2)  # (R, T, r)
        delta = scaled.reshape(rows, num_tasks * r) @ vh.to(torch.float32).reshape(
            num_tasks * r, -1
        )  # (R, N)
        return (base.to(torch.float32) + delta).to(base.dtype)
