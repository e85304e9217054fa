"""Task vectors sharded across ranks with DTensor, for Lightning's ``ModelParallelStrategy``.

When base + T task vectors do not fit one device, each of N ranks keeps a 1/N column slice of every
stacked task vector (``DTensor``, placement ``Shard(1)`` of the (T, numel) matrix) and the same slice of
the merge's origin (theta_0, or the start merge: ``Shard(0)`` of the flat tensor), like FSDP / ZeRO-3
shard parameters. A merge is then

    merged = all_gather_over_ranks( theta_0[my columns] + c @ tau[:, my columns] )

a local weighted sum over this rank's columns (``WeightedSum``), then one all-gather of the merged
tensor, never of the T task vectors; the per-block merge gathers all the tensors of a block in one
collective per dtype (``gather_columns``: one, or two under autocast, whose linear weights are bf16).
Stored per rank: (1 + T) x model / N. The whole-model merge then holds the full merged tensors and
their gradient (2 models) on every rank; the per-block merge (``divmerge.core.per_block``) only one
block's at a time.

Ranks see different data (data parallel), so the merged tensors' gradients differ per rank; in backward
they are summed across ranks and each rank keeps its own columns (one reduce-scatter per gather), from
which it finds its partial coefficient gradient <grad merged[cols], tau_t[cols]>; the coefficient table
sums those partials over ranks and divides by N (``mean_grad``, one small all-reduce per step): the
ranks' mean gradient, as data parallelism averages, the same on every rank, so the coefficients step
identically without DDP. A use of the table that is whole on every rank (LoRA factors) contributes its
own rank's gradient, which the same sum and division average.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from divmerge.core.merge import WeightedSum
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
            else distribute_tensor(tau.flatten(1), mesh, [Shard(1)], src_data_rank=None)  # (T, numel)
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
    """Identity forward; backward sums the gradient over the mesh's ranks and divides by their number."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def mean_grad(table: Tensor, mesh: DeviceMesh) -> Tensor:
    """``table`` whose gradient is summed over the ranks of ``mesh`` and divided by N in backward.

    Each rank's merge computes its columns only (of the ranks' summed merged-tensor gradient), so the
    coefficient gradient it finds, <grad merged[my columns], tau_t[my columns]>, is partial; summed over
    ranks and divided by N it is the ranks' mean gradient, the same on every rank. Apply it once to the
    coefficient table of a step (one small all-reduce).
    """
    return _MeanGrad.apply(table, mesh.get_group()) if table.requires_grad else table


class _GatherColumns(torch.autograd.Function):
    """All-gather the column shards of several tensors in one collective; backward reduce-scatters.

    In backward the ranks' gradients of the full tensors are summed and each rank keeps its columns.
    """

    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, numels: list[int], *parts: Tensor) -> tuple[Tensor, ...]:
        world = dist.get_world_size(group)
        chunks = [-(-m // world) for m in numels]  # each tensor's columns per rank (the last ranks shorter)
        width = sum(chunks)
        offsets = [sum(chunks[:i]) for i in range(len(chunks))]
        if len(parts) == 1 and len(parts[0]) == width:  # one tensor, a full chunk: send it as it is
            send = parts[0].contiguous()
        else:  # this rank's columns of every tensor, each padded to its chunk
            send = parts[0].new_zeros(width)
            for part, start in zip(parts, offsets, strict=True):
                send[start : start + len(part)] = part
        received = send.new_empty(world * width)  # (world * width,): rank r's send at [r * width, ...)
        dist.all_gather_single(received, send, group=group)
        ctx.group, ctx.numels, ctx.chunks, ctx.offsets = group, numels, chunks, offsets
        ctx.lengths = [len(p) for p in parts]
        if len(parts) == 1:  # one tensor: the gathered buffer is its flat order already (a view)
            return (received[: numels[0]],)
        rows = received.view(world, width)
        return tuple(
            rows[:, start : start + chunk].reshape(-1)[:m]
            for m, chunk, start in zip(numels, chunks, offsets, strict=True)
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        world = dist.get_world_size(ctx.group)
        width = sum(ctx.chunks)
        like = next(g for g in grads if g is not None)
        # rank r's columns of every gradient, at row r; summed over ranks in float32 (bf16 merges too)
        send = like.new_zeros((world, width), dtype=torch.float32)
        if len(grads) == 1:  # one tensor: rank-major columns are its flat order
            send.view(-1)[: ctx.numels[0]] = like.reshape(-1)
        else:
            for grad, m, chunk, start in zip(grads, ctx.numels, ctx.chunks, ctx.offsets, strict=True):
                if grad is not None:
                    padded = send.new_zeros(world * chunk)
                    padded[:m] = grad.reshape(-1)
                    send[:, start : start + chunk] = padded.view(world, chunk)
        mine = send.new_empty(width)
        dist.reduce_scatter_single(mine, send.reshape(-1), group=ctx.group)  # summed over ranks
        mine = mine.to(like.dtype)
        return (
            None,
            None,
            *(mine[s : s + n] for s, n in zip(ctx.offsets, ctx.lengths, strict=True)),
        )


def gather_columns(parts: list[Tensor], numels: list[int], mesh: DeviceMesh) -> tuple[Tensor, ...]:
    """The full flat tensors from every rank's columns of them; a collective (one all-gather for all).

    Args:
        parts: This rank's columns of each tensor, (hi - lo,) as ``column_range`` gives them, one dtype.
        numels: Each tensor's number of elements.
        mesh: The 1-D mesh the columns are sharded over.

    Returns:
        Each full tensor, flat (numel,); in backward the ranks' gradients are summed and each rank
        keeps its own columns (``mean_grad`` on the coefficient table makes the sum a mean).
    """
    return _GatherColumns.apply(mesh.get_group(), list(numels), *parts)


def local_merge(coef: Tensor, base: DTensor, tau: DTensor) -> Tensor:
    """This rank's columns of base + sum_t coef[t] * tau[t], (hi - lo,) float32, via ``WeightedSum``.

    Args:
        coef: Coefficients (T,) (averaged over ranks in backward by ``mean_grad`` on the table).
        base: The origin, a DTensor (numel,) ``Shard(0)``.
        tau: Stacked task vectors, a DTensor (T, numel) ``Shard(1)``.
    """
    return WeightedSum.apply(coef, base.to_local().to(torch.float32), tau.to_local())


def sharded_weighted_sum(coef: Tensor, base: DTensor, tau: DTensor, shape: torch.Size) -> Tensor:
    """The merge base + sum_t coef[t] * tau[t] from column-sharded origin and task vectors; a collective.

    Every rank of ``tau``'s mesh must call it with the same ``coef``, taken from a table passed through
    ``mean_grad`` (so the coefficient gradient is complete on every rank).

    Args:
        coef: Coefficients (T,), a plain (replicated) tensor.
        base: The origin of this tensor (theta_0 or the start) as a DTensor (numel,), ``Shard(0)``.
        tau: Stacked task vectors as a DTensor (T, numel), ``Shard(1)``.
        shape: The merged tensor's shape.

    Returns:
        The full merged tensor (*shape) in base's dtype, differentiable w.r.t. ``coef``.

    """
    (full,) = gather_columns([local_merge(coef, base, tau)], [shape.numel()], tau.device_mesh)
    return full.reshape(shape).to(base.dtype)


class LockStep:
    """Keeps the ranks' evaluation forwards in step when each forward is a collective.

    Sharded and per block, every forward of the merged model gathers each block's columns from every
    rank, so all ranks must run the same number of forwards, with the same gathers. Evaluation does not:
    ranks hold different numbers of examples, and greedy answers end at different steps. So before each
    such forward a rank announces it (a two-element all-reduce: one forward, and its autocast state,
    which decides the gathers' dtypes), and a rank whose work is done drains: it joins the
    announcements with zeros and runs a stand-in forward (``probe``), under the announced autocast
    state, for every one that some rank still makes, until none does. Every announcement then meets one
    forward with the same gathers on every rank.

    Args:
        group: The process group the forwards' collectives run over.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.draining = False

    def announce(self, state: int, device: torch.device) -> None:
        """Before one of this rank's own forwards (not the drain's stand-ins).

        Args:
            state: The forward's autocast state as a small integer (0: none), the same on every rank.
            device: Where the collective's tensor lives (the process group's device).
        """
        if not self.draining:
            dist.all_reduce(torch.tensor([1, state], device=device), group=self.group)

    def drain(self, probe: Callable[[int], None], device: torch.device) -> None:
        """Run ``probe(state)`` for each forward other ranks still announce; returns when all are done.

        Every rank calls it at the end of an evaluation phase, before any other collective.
        """
        self.draining = True
        try:
            while True:
                flag = torch.zeros(2, dtype=torch.int64, device=device)  # (forwards, summed states)
                dist.all_reduce(flag, group=self.group)
                count, states = (int(v) for v in flag.tolist())
                if not count:
                    return
                probe(states // count)  # every announcing rank forwards under the same state
        finally:
            self.draining = False
