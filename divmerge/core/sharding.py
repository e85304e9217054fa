"""Task vectors sharded across ranks with DTensor, for Lightning's ``ModelParallelStrategy``.

When base + T task vectors do not fit one device, each of N ranks keeps a 1/N column slice of every
stacked task vector (``DTensor``, placement ``Shard(1)`` of the (T, numel) matrix), like FSDP / ZeRO-3
shard parameters. A merge is then

    merged = theta_0 + all_gather_over_ranks( c @ tau[:, my columns] )

computed by DTensor (a local (1, T) @ (T, numel / N) product, then ``full_tensor``): one all-gather of
ONE model's size per step, never of the T task vectors. Every rank keeps the full base and merged
tensors (1 model each), so per-rank memory is base + merged + grads + activations + T x model / N.

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
    own columns.

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
            tau if is_sharded(tau) else distribute_tensor(tau.reshape(tau.shape[0], -1), mesh, [Shard(1)])
        )
    return out


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


def sharded_weighted_sum(coef: Tensor, base: Tensor, tau: DTensor) -> Tensor:
    """The merge base + sum_t coef[t] * tau[t] from column-sharded task vectors; a collective.

    Every rank of ``tau``'s mesh must call it with the same ``coef`` (the coefficients are replicated).

    Args:
        coef: Coefficients (T,), a plain (replicated) tensor.
        base: theta_0 of this tensor, (*shape), full on every rank.
        tau: Stacked task vectors as a DTensor (T, numel), ``Shard(1)``.

    Returns:
        The full merged tensor (*shape) in base's dtype, differentiable w.r.t. ``coef``.

    """
    mesh = tau.device_mesh
    c = DTensor.from_local(coef.to(torch.float32), mesh, [Replicate()], run_check=False)  # (T,)
    delta = (c.unsqueeze(0) @ tau.to(torch.float32)).full_tensor()  # (1, numel): local cols, all-gathered
    merged = base.to(torch.float32) + delta.reshape(base.shape)  # (*shape)
    return _MeanGrad.apply(merged, mesh).to(base.dtype)
