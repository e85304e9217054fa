"""Row-wise coefficients: one per task per output row of each weight matrix.

A learned per-row (per output feature) combination of task vectors, the granularity of DAM (Gauthier-
Caron et al., "Merging in a Bottle: Differentiable Adaptive Merging (DAM)", arXiv 2410.08371), which
learns one coefficient per column of every matrix. For a matrix tensor l (2-D, not an embedding) of
shape (R, N):

    theta(l)[r, :] = theta_0(l)[r, :] + sum_t c[t, l, r] * tau_t(l)[r, :]

Row r of an ``nn.Linear`` weight is output feature r. 1-D tensors (biases, norms) and embedding tables
and LM heads (rows are tokens, most of which unlabelled inputs never show) keep one coefficient per task,
as layer-wise.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Size, Tensor

from divmerge.core.coefficients.base import Layout, Stored, matrix_layout
from divmerge.core.merge import WeightedSum

ROW_CHUNK = 1 << 22  # elements of one task's tau upcast at a time when stored below float32


def _row_chunks(tau: Tensor) -> list[slice]:
    """Row slices of a (T, R, N) stack bounding each float32 upcast of one task to ``ROW_CHUNK`` elements."""
    num_rows, per_row = tau.shape[1], tau.shape[2]
    if tau.dtype == torch.float32:
        return [slice(0, num_rows)]
    step = max(1, ROW_CHUNK // max(1, per_row))
    return [slice(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]


class RowWeightedSum(torch.autograd.Function):
    """merged[r] = base[r] + sum_t coef[t, r] * tau[t, r] in float32; grad coef[t, r] = <grad[r], tau[t, r]>.

    Like ``WeightedSum``, only ``tau`` (stored, frozen: no copy) is kept for backward, and each task's
    slice is read in place (one fused multiply-add per task forward, one batched row dot backward).
    """

    @staticmethod
    def forward(ctx: Any, coef: Tensor, base: Tensor, tau: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(tau)
        ctx.coef_dtype = coef.dtype
        stack = tau.reshape(tau.shape[0], tau.shape[1], -1)  # (T, R, N), a view
        coef32 = coef.detach().to(torch.float32)  # (T, R)
        out = base.reshape(base.shape[0], -1).to(torch.float32, copy=True)  # (R, N)
        for rows in _row_chunks(stack):
            for t in range(stack.shape[0]):
                out[rows].addcmul_(stack[t, rows].to(torch.float32), coef32[t, rows, None])
        return out.to(base.dtype).reshape(base.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # noqa: D102
        (tau,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        stack = tau.reshape(tau.shape[0], tau.shape[1], -1)  # (T, R, N)
        grad32 = grad.reshape(grad.shape[0], -1).to(torch.float32)  # (R, N)
        grad_coef = torch.empty(stack.shape[:2], dtype=torch.float32, device=grad.device)  # (T, R)
        for rows in _row_chunks(stack):
            g = grad32[rows].unsqueeze(2)  # (r, N, 1)
            for t in range(stack.shape[0]):
                tau_t = stack[t, rows].to(torch.float32).unsqueeze(1)  # (r, 1, N)
                grad_coef[t, rows] = torch.bmm(tau_t, g).reshape(-1)  # row-wise dot products
        return grad_coef.to(ctx.coef_dtype), None, None


class RowSpace:
    """One coefficient per task per row of every matrix; one per task for the other tensors."""

    per_tensor = True
    exact = True

    def layout(self, shapes: Mapping[str, Size]) -> Layout:
        """A matrix of R rows reads R columns (labelled ``<name>[r]``); any other tensor one column."""
        return matrix_layout(shapes, lambda shape: shape[0], "{name}[{i}]")

    def store(self, name: str, tau: Tensor) -> Stored:
        """The stack itself."""
        return tau

    def merge(self, coef: Tensor, base: Tensor, stored: Stored) -> Tensor:
        """Row-scaled merge for a (T, R) coefficient slice, ``WeightedSum`` for a (T, 1) one."""
        assert isinstance(stored, Tensor)
        if coef.shape[1] == 1:  # not a matrix (or a one-row one: the same sum)
            return WeightedSum.apply(coef[:, 0], base, stored)
        return RowWeightedSum.apply(coef, base, stored)
