"""Task vectors sharded across ranks with DTensor, for Lightning's ``ModelParallelStrategy``.

When base + T task vectors do not fit one device, each of N ranks keeps a 1/N column slice of every
stacked task vector (``DTensor``, placement ``Shard(1)`` of the (T, numel) matrix) and the same slice of
the merge's origin (theta_0, or the start merge: ``Shard(0)`` of the flat tensor), like FSDP / ZeRO-3
shard parameters. A merge is then

    merged = all_gather_over_ranks( theta_0[my columns] + c @ tau[:, my columns] )

computed by DTensor (a local (1, T) @ (T, numel / N) product and sum, then ``full_tensor``): one
all-gather of the merged tensor, never of the T task vectors. Stored per rank: (1 + T) x model / N. The
whole-model merge then holds the full merged tensors and their gradient (2 models) on every rank; the
per-block merge (``divmerge.core.per_block``) only one block's at a time, so per-rank memory is
(1 + T) x model / N + 2 blocks + activations.

Ranks see different data (data parallel), so the merged tensors' gradients differ per rank; they are
averaged across ranks right where they enter the merge (``_MeanGrad``), and DTensor's backward sums the
per-shard partial products <grad merged[cols], tau_t[cols]> into the full coefficient gradient, the
same on every rank: the coefficients then step identically without DDP.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from divmerge.errors import DivMergeError


def is_sharded(tensor: Tensor) -> bool:
    """Whether a stored task-vector stack is a sharded ``DTensor``."""
    return isinstance(tensor, DTensor)


def shard_stacks(stacks: dict[str, Tensor], mesh: DeviceMesh) -> dict[str, Tensor]:
    """Shard each stacked task vector (T, *shape) over ``mesh`` by columns of its (T, numel) view.

    Every rank must pass the same tensors (as after loading the experts on each rank); each keeps only its
    own columns, cut locally (no communication: ranks may shard at different times).

    Args:
        stacks: Name -> stacked task vectors (T, *shape); already sharded ones are kept.
        mesh: A 1-D device mesh (the data-parallel ranks).

    Returns:
        Name -> DTensor (T, numel) with placement ``Shard(1)``.

    """
    if mesh.ndim != 1:
        raise DivMergeError(f"Task vectors are sharded over a 1-D device mesh, got {mesh.ndim} dimensions.")
    out = {}
    for name, tau in stacks.items():
        out[name] = (
            tau
            if is_sharded(tau)
            else distribute_tensor(tau.reshape(tau.shape[0], -1), mesh, [Shard(1)], src_data_rank=None)
        )
    return out


def shard_flat(tensors: dict[str, Tensor], mesh: DeviceMesh) -> dict[str, Tensor]:
    """Shard each tensor's flat view over ``mesh``, in the same column chunks as ``shard_stacks``.

    Args:
        tensors: Name -> tensor (*shape), the same on every rank; already sharded ones are kept.
        mesh: A 1-D device mesh (the data-parallel ranks).

    Returns:
        Name -> DTensor (numel,) with placement ``Shard(0)``.

    """
    return {
        n: t if is_sharded(t) else distribute_tensor(t.reshape(-1), mesh, [Shard(0)], src_data_rank=None)
        for n, t in tensors.items()
    }


class _MeanGrad(torch.autograd.Function):
    """Identity forward; backward averages the gradient over the mesh's ranks (all-reduce)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mesh: DeviceMesh) -> Tensor:
        ctx.mesh = mesh
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.mesh.get_group())
        return grad / ctx.mesh.size(), None


def sharded_weighted_sum(coef: Tensor, base: DTensor, tau: DTensor, shape: torch.Size) -> Tensor:
    """The merge base + sum_t coef[t] * tau[t] from column-sharded origin and task vectors; a collective.

    Every rank of ``tau``'s mesh must call it with the same ``coef`` (the coefficients are replicated).

    Args:
        coef: Coefficients (T,), a plain (replicated) tensor.
        base: The origin of this tensor (theta_0 or the start) as a DTensor (numel,), ``Shard(0)``.
        tau: Stacked task vectors as a DTensor (T, numel), ``Shard(1)``.
        shape: The merged tensor's shape.

    Returns:
        The full merged tensor (*shape) in base's dtype, differentiable w.r.t. ``coef``.

    """
    mesh = tau.device_mesh
    c = DTensor.from_local(coef.to(torch.float32), mesh, [Replicate()], run_check=False)  # (T,)
    local = c.unsqueeze(0) @ tau.to(torch.float32) + base.to(torch.float32).unsqueeze(0)  # (1, numel)
    merged = local.full_tensor().reshape(shape)  # local columns merged, then all-gathered: (*shape)
    return _MeanGrad.apply(merged, mesh).to(base.dtype)
