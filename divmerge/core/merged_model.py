"""The merged model: theta(l) = theta_0(l) + sum_t c[t, g(l)] * tau_t(l), family-agnostic.

With a start (``set_start``), the learned coefficients merge around a static merge instead of theta_0:
theta(l) = theta_s(l) + sum_t c[t, g(l)] * tau_t(l).

Holds the frozen base, the stacked task vectors (dense, LoRA factors, or sharded columns), the coefficient
table and the experts' forward code (meta-device skeletons); ``merged_params`` gives the merged tensors
under the experts' naming, for ``torch.func.functional_call`` by a model family (``divmerge.families``).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from transformers.pytorch_utils import Conv1D

from divmerge.core import lora, per_block
from divmerge.core.coefficients import Granularity, MergeCoefficients
from divmerge.core.coefficients.base import CoefficientSpace
from divmerge.core.expert_set import ExpertSet
from divmerge.core.merge import FrozenTensors
from divmerge.core.sharding import (
    LockStep,
    gather_columns,
    is_sharded,
    local_merge,
    mean_grad,
    shard_flat,
    shard_stacks,
    sharded_weighted_sum,
)
from divmerge.errors import DivMergeError

MergeMode = Literal["whole", "per_block"]
MergeModeOption = Literal["auto", "whole", "per_block"]
"""A configured merge mode: ``auto`` is resolved by the engine (``divmerge.engine.choose_merge_mode``)."""


AUTOCAST_STATES: tuple[torch.dtype | None, ...] = (None, torch.bfloat16, torch.float16)
"""Autocast states a forward can run under (no autocast, bf16, fp16), by their index in collectives."""


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The compute dtype of the autocast active on ``device_type`` (None: none active)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def check_merge_mode(merge_mode: str, auto: bool = False) -> MergeMode:
    """``merge_mode`` if it is ``whole`` or ``per_block`` (or ``auto`` where allowed), else one line."""
    allowed = ("auto", "whole", "per_block") if auto else ("whole", "per_block")
    if merge_mode not in allowed:
        names = ", ".join(repr(m) for m in allowed)
        raise DivMergeError(f"model.merge_mode must be one of {names}, not {merge_mode!r}.")
    return merge_mode  # type: ignore[return-value]


def check_shardable(space: CoefficientSpace, granularity: str) -> None:
    """Refuse, in one line, a coefficient space whose storage cannot be sharded by columns."""
    if space.per_tensor:
        raise DivMergeError(
            f"Granularity {granularity!r} does not run sharded: use granularity task, layer or block with "
            "the sharded strategy, or a data-parallel strategy (ddp)."
        )


class MergedModel(nn.Module):
    """Base model + learnable combination of task vectors, evaluated functionally per task.

    Args:
        experts: The loaded expert set (base, stacked task vectors, heads, skeletons).
        granularity: Coefficient space: ``task``, ``layer``, ``block``, ``row`` or ``svd``.
        init: Initial coefficient value; None means 1/T.
        clamp: Optional (low, high) bounds on the coefficients.
        task_vector_dtype: Storage dtype of the task vectors (bf16/fp16 halve their memory); the merge
            itself is computed in float32 with float32 coefficients. LoRA factors keep their dtype.
        space_options: Options of the coefficient space (``svd``: ``rank``).
        merge_mode: ``whole`` merges every tensor before a training step's forward; ``per_block`` merges
            each repeated block's tensors just before the block runs and recomputes them in backward
            (``divmerge.core.per_block``): one block's merged tensors and gradient alive instead of the
            model's, for about one more forward of compute.

    LoRA adapter experts are merged without densifying (``divmerge.lora``): a LoRA module's merged
    tensors are its weight (theta_0 plus the full experts' weighted task vectors) and the stacked factors
    ``<m>@lora_A`` (R, in), ``<m>@lora_B`` (out, R) scaled by that weight's coefficients.
    """

    def __init__(
        self,
        experts: ExpertSet,
        granularity: Granularity = "layer",
        init: float | None = None,
        clamp: tuple[float, float] | None = None,
        task_vector_dtype: torch.dtype = torch.float32,
        space_options: Mapping[str, Any] | None = None,
        merge_mode: MergeMode = "whole",
    ) -> None:
        super().__init__()
        self.merge_mode = check_merge_mode(merge_mode)
        self._block_tensors: set[str] | None = None
        self._linear_weights: set[str] | None = None
        self._lock: LockStep | None = None  # sharded per-block evaluation (``announce`` / ``drain``)
        self._probe_params: dict[str, Tensor] | None = None
        self.task_names = list(experts.task_names)
        self.all_tasks = experts.all_tasks  # heads/skeletons index: merged tasks, then held-out ones
        self.names = list(experts.names)
        self.prefix = experts.prefix
        self.shapes = dict(experts.shapes) or {n: experts.base[n].shape for n in self.names}
        self.coefficients = MergeCoefficients(
            len(self.task_names), self.shapes, granularity, init, clamp, space_options
        )
        space = self.coefficients.space
        if space.per_tensor and (experts.lora or experts.dense_rows):
            raise DivMergeError(
                f"Granularity {granularity!r} needs fully fine-tuned experts, and some are LoRA adapters: "
                "merge adapters with granularity task, layer or block."
            )
        self.task_vectors = FrozenTensors(  # (T, *shape) stacks, or a space's factors of them
            {n: space.store(n, t.to(task_vector_dtype)) for n, t in experts.task_vectors.items()}
        )
        self.base = FrozenTensors(experts.base)
        self.start = FrozenTensors({})  # the learned coefficients' origin where not theta_0 (set_start)
        self.dense_rows = dict(experts.dense_rows)  # name -> task of each stored row, when not all T
        self.lora_a = FrozenTensors({m: s.a for m, s in experts.lora.items()})  # (R, in)
        self.lora_b = FrozenTensors({m: s.b for m, s in experts.lora.items()})  # (out, R)
        self.lora_task = FrozenTensors({m: s.task for m, s in experts.lora.items()})  # (R,)
        self.buffers_ = FrozenTensors({self.full_name(n): b for n, b in experts.buffers.items()})
        self.heads = nn.ModuleList(FrozenTensors(h) for h in experts.heads)
        # Plain list, not a ModuleList: the meta skeletons must not appear in parameters()/state_dict().
        self._skeletons = list(experts.skeletons)

    def full_name(self, name: str) -> str:
        """A merged tensor's name inside an expert: ``<prefix>.<name>`` (just ``name`` without a prefix)."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def skeleton(self, task: int) -> nn.Module:
        """Expert ``task``'s module on the meta device (its forward code, for ``functional_call``)."""
        return self._skeletons[task]

    def merged_params(self, table: Tensor | None = None) -> dict[str, Tensor]:
        """Merged backbone tensors under the expert's naming (``<prefix>.<name>``).

        Args:
            table: Coefficients (T, G) to merge with around theta_0 (one-hot: an expert; zeros: the
                base); None uses the learned ones, around the start when one is set (``set_start``).

        Returns:
            Name -> merged tensor (and the LoRA modules' ``@lora_A`` / ``@lora_B`` factors, see the class
            docstring); differentiable w.r.t. the coefficients.

        """
        origin = self._origin(table)
        table = self._table(table)
        merged = {}
        with torch.autocast(device_type=table.device.type, enabled=False):  # merge in full precision
            for name in self.names:
                merged[self.full_name(name)] = self._merge_one(name, table, origin)
            self._merge_lora(table, merged)
        return merged

    def _table(self, table: Tensor | None) -> Tensor:
        """The coefficients to merge with (None: the learned ones); sharded: gradient summed over ranks."""
        table = self.coefficients() if table is None else table
        return mean_grad(table, self._mesh()) if self.sharded else table

    def _mesh(self) -> DeviceMesh:
        """The mesh the task vectors are sharded over."""
        return next(t for _, t in self.task_vectors.items() if is_sharded(t)).device_mesh

    def _coef(self, name: str, table: Tensor) -> Tensor:
        """The coefficients of tensor ``name``'s stored task-vector rows, (rows, K)."""
        coef = self.coefficients.columns(table, name)  # (T, K)
        rows = self.dense_rows.get(name)  # None: all T tasks
        return coef if rows is None else coef[rows]

    def _origin(self, table: Tensor | None) -> FrozenTensors:
        """What the coefficients merge around: the start for the learned ones when set, else theta_0."""
        return self.start if table is None and len(self.start) else self.base

    def _merge_one(self, name: str, table: Tensor, origin: FrozenTensors) -> Tensor:
        """One merged tensor, origin + sum_t c[t, g(name)] * tau_t(name), (*shape)."""
        if self.dense_rows.get(name) == []:  # only adapters' low-rank updates (or nothing) change it
            return (
                origin[name].full_tensor().reshape(self.shapes[name])
                if is_sharded(origin[name])
                else origin[name]
            )
        coef = self._coef(name, table)  # (rows, K)
        tau = self.task_vectors[name]  # stored by the space, or a sharded DTensor (rows, numel)
        if is_sharded(tau):
            return sharded_weighted_sum(coef[:, 0], origin[name], tau, self.shapes[name])
        return self.coefficients.space.merge(coef, origin[name], tau)

    def _merge_lora(self, table: Tensor, merged: dict[str, Tensor]) -> None:
        """Add every LoRA module's ``@lora_A`` and coefficient-scaled ``@lora_B`` entries to ``merged``.

        Sharded, the factors are whole on every rank: their share of the coefficient gradient is this
        rank's own, which the table's ``mean_grad`` averages over the ranks.
        """
        for m, b in self.lora_b.items():
            coef = self.coefficients.column(table, f"{m}.weight")  # (T,)
            merged[self.full_name(m) + lora.LORA_A] = self.lora_a[m]  # (R, in)
            merged[self.full_name(m) + lora.LORA_B] = lora.merged_b(b, self.lora_task[m], coef)  # (out, R)

    def step_params(self, table: Tensor | None = None) -> dict[str, Tensor]:
        """The merge as a forward reads it, in this model's ``merge_mode``: training steps and evaluation.

        ``whole``: ``merged_params(table)``. ``per_block``: the tensors outside the repeated blocks
        merged, each block tensor's entry holding its origin, and the coefficient table under
        ``per_block.TABLE``, so that the family's forward (``per_block.attached``) merges each block just
        in time: no whole merged model exists, in training or in evaluation (teachers, generation);
        differentiable w.r.t. the coefficients either way.

        Args:
            table: Coefficients (T, G) to merge with around theta_0 (an expert's one-hot, a constant);
                None: the learned ones, around the start when one is set. An explicit table with a start
                set merges whole (a block merges around the learned origin).
        """
        if self.merge_mode == "whole" or (table is not None and len(self.start)):
            return self.merged_params(table)
        origin = self._origin(table)
        table = self._table(table)  # (T, G)
        blocks = self.block_tensors()
        merged: dict[str, Tensor] = {per_block.TABLE: table}
        with torch.autocast(device_type=table.device.type, enabled=False):
            for name in self.names:
                full = self.full_name(name)
                merged[full] = (
                    self._placeholder(name, origin)
                    if full in blocks
                    else self._merge_one(name, table, origin)
                )
            self._merge_lora(table, merged)
        return merged

    def eval_params(self, table: Tensor | None = None) -> dict[str, Tensor]:
        """The merge for evaluation forwards (teachers, generation, scores): ``step_params(table)``.

        In the per-block mode no whole merged model exists, sharded or not. Sharded, each forward with
        these tensors is then a collective: every rank announces its forwards and ends the phase with
        ``drain`` (``divmerge.core.sharding.LockStep``), since ranks evaluate different numbers of
        examples and answers end at different steps.

        Args:
            table: Coefficients (T, G); None: the learned ones.
        """
        params = self.step_params(table)
        if self.sharded and per_block.TABLE in params:
            self._probe_params = params  # what a draining rank's stand-in forwards run with
        return params

    def announce(self) -> None:
        """Before a per-block forward: sharded and without gradients, tell the other ranks (``drain``).

        Training forwards (with gradients) are in step already: every rank runs the same steps.
        """
        if self.sharded and not torch.is_grad_enabled():
            device = self._device()
            self._lock_step().announce(AUTOCAST_STATES.index(autocast_dtype(device.type)), device)

    def drain(self, probe: Callable[[Mapping[str, Tensor]], None]) -> None:
        """End an evaluation phase: stand in for the per-block forwards other ranks still run.

        Every rank calls it (a collective when sharded; nothing otherwise), before any other collective.
        Each stand-in runs under the autocast state its forward announced (a block's gathers depend on
        it, ``merge_block``).

        Args:
            probe: Runs one forward of the merged model with the given ``eval_params`` tensors (any
                input: a forward's collectives do not depend on it).
        """
        if not self.sharded:
            return
        params = self._probe_params
        device = self._device()

        def stand_in(state: int) -> None:
            if params is None:
                raise DivMergeError("A rank ran a per-block evaluation forward that others did not prepare.")
            dtype = AUTOCAST_STATES[state]
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                probe(params)

        try:
            self._lock_step().drain(stand_in, device)
        finally:
            self._probe_params = None

    def _lock_step(self) -> LockStep:
        if self._lock is None:
            self._lock = LockStep(self._mesh().get_group())
        return self._lock

    def _device(self) -> torch.device:
        return next(t for _, t in self.base.items()).device

    def _placeholder(self, name: str, origin: FrozenTensors) -> Tensor:
        """A block tensor's entry in ``step_params``: its origin, or a storage-free stand-in when sharded."""
        if not is_sharded(origin[name]):
            return origin[name]
        return torch.zeros((), dtype=origin[name].dtype, device=origin[name].device).expand(self.shapes[name])

    def merge_block(self, table: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """The merge of some tensors only (one block's, in the per-block mode), around the learned origin.

        Under autocast (bf16-mixed / 16-mixed) the merged linear layers' weights come in its compute
        dtype (``linear_weights``): the merge itself and the coefficient gradient stay float32, and the
        block's merged matrices and their gradient take half the bytes (sharded, so does their gather).
        That is what autocast does to a float32 linear weight at each use anyway; here the cast happens
        once, at the merge. Other tensors (norms' scales, biases: a fraction of a percent of a block)
        stay float32.

        Sharded, each rank merges its columns of the block and the merged block is gathered, one
        collective per dtype (backward reduce-scatters its gradient). Gathering the block's origin and
        task-vector columns instead and merging on every rank (FSDP style) moves 1 + T times the bytes
        and was 2.2-4.1x slower (README, "Sharding": the gathers compared).

        Args:
            table: The coefficients (T, G): the learned ones, or (without a start) any table.
            names: Full tensor names (``<prefix>.<name>``); those that are not merged tensors (buffers)
                are skipped.

        Returns:
            Full name -> merged tensor, differentiable w.r.t. ``table``.
        """
        device = table.device.type
        dtype = autocast_dtype(device)
        origin = self._origin(None)
        short = {self.full_name(n): n for n in self.names}
        wanted = [short[full] for full in names if full in short]

        linear = self.linear_weights()

        def compute(n: str, merged: Tensor) -> Tensor:  # linear layers' weights in the compute dtype
            return merged.to(dtype if dtype is not None and n in linear else origin[n].dtype)

        with torch.autocast(device_type=device, enabled=False):
            if not self.sharded:
                return {self.full_name(n): compute(n, self._merge_one(n, table, origin)) for n in wanted}
            # every tensor's local columns merged (or, where only adapters change it, its origin's),
            # then the block gathered: one collective per dtype
            parts = {
                n: compute(
                    n,
                    origin[n].to_local()
                    if self.dense_rows.get(n) == []
                    else local_merge(self._coef(n, table)[:, 0], origin[n], self.task_vectors[n]),
                )
                for n in wanted
            }
            return {
                self.full_name(n): full.reshape(self.shapes[n]) for n, full in self._gather(parts).items()
            }

    def _gather(self, parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The full flat tensors from this rank's columns of each; one collective per dtype among them.

        Args:
            parts: Tensor name -> this rank's columns of it, (hi - lo,).
        """
        out = {}
        for dtype in sorted({t.dtype for t in parts.values()}, key=str):  # the same order on every rank
            names = [n for n in parts if parts[n].dtype == dtype]
            numels = [self.shapes[n].numel() for n in names]
            out |= dict(
                zip(names, gather_columns([parts[n] for n in names], numels, self._mesh()), strict=True)
            )
        return out

    def linear_weights(self) -> set[str]:
        """Names (unprefixed) of the merged tensors that are a linear layer's weight.

        What autocast runs in its compute dtype (matmuls), unlike norms' scales, biases or other
        parameters (e.g. an SSM's ``A_log``, used in float32).
        """
        if self._linear_weights is None:
            skeleton = self._skeletons[0]
            self._linear_weights = set()
            for n in self.names:
                module, _, leaf = self.full_name(n).rpartition(".")
                owner = skeleton.get_submodule(module)
                if leaf == "weight" and isinstance(owner, (nn.Linear, Conv1D)):
                    self._linear_weights.add(n)
        return self._linear_weights

    def block_tensors(self) -> set[str]:
        """Full names of the merged tensors that lie in a repeated block (``per_block.block_paths``)."""
        if self._block_tensors is None:
            paths = per_block.block_paths(self._skeletons[0])
            self._block_tensors = {
                self.full_name(n)
                for n in self.names
                if any(per_block.in_block(self.full_name(n), p) for p in paths)
            }
        return self._block_tensors

    def set_start(self, start: Mapping[str, Tensor]) -> None:
        """Make the learned coefficients merge around ``start`` (a static merge) instead of theta_0.

        Explicit tables (experts, the base, constant references) still merge around theta_0.

        Args:
            start: Name -> tensor, (*shape), for every merged tensor (``names``, unprefixed).
        """
        missing = [n for n in self.names if n not in start or start[n].shape != self.shapes[n]]
        if missing:
            raise DivMergeError(f"The start merge lacks tensor {missing[0]!r} or has another shape.")
        self.start = FrozenTensors({n: start[n].to(self.base[n].dtype) for n in self.names})

    def shard(self, mesh: DeviceMesh) -> None:
        """Keep only this rank's column slice of every stacked task vector and of the base and start.

        See ``divmerge.core.sharding``. From then on ``merged_params``, ``step_params`` and the per-block
        merge are collectives: every rank of ``mesh`` must call them alike. Explicit tables (an expert's
        one-hot, the base) still merge, through the same shards.

        Args:
            mesh: The 1-D mesh of ranks to shard over (Lightning's data-parallel mesh).

        """
        check_shardable(self.coefficients.space, self.coefficients.granularity)
        self.task_vectors = FrozenTensors(shard_stacks(dict(self.task_vectors.items()), mesh))
        self.base = FrozenTensors(shard_flat(dict(self.base.items()), mesh))
        if len(self.start):
            self.start = FrozenTensors(shard_flat(dict(self.start.items()), mesh))

    def stored_bytes(self) -> tuple[int, int]:
        """Bytes of the base, start and task vectors (LoRA factors included): (this rank's, all ranks')."""
        local = total = 0
        for store in (self.base, self.start, self.task_vectors, self.lora_a, self.lora_b):
            for _, value in store.items():
                for t in value if isinstance(value, tuple) else (value,):
                    total += t.numel() * t.element_size()
                    local += (t.to_local() if is_sharded(t) else t).numel() * t.element_size()
        return local, total

    @property
    def sharded(self) -> bool:
        """Whether the task vectors are sharded across ranks."""
        return any(is_sharded(t) for _, t in self.task_vectors.items())

    def dense_params(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Merged tensors with every LoRA module's low-rank update added to its weight (for export).

        Args:
            params: Output of ``merged_params``.

        Returns:
            Name -> dense merged tensor, named like ``merged_params`` without the LoRA entries.
        """
        return lora.fold(params, self._skeletons[0])

    def dense_task_vectors(self) -> dict[str, Tensor]:
        """Task vectors stacked over all T tasks, (T, *shape), LoRA updates densified (for static merges).

        A tensor every expert stores densely is returned as stored (no copy); others are materialised.
        """
        lora_of = {f"{m}.weight": m for m in self.lora_b}
        out = {}
        for name in self.names:
            tau = self.task_vectors[name]  # (len(rows), *shape), or factors U S (T, R, r), V^T (T, r, N)
            if isinstance(tau, tuple):  # the svd space's rank-r task vectors, made dense
                out[name] = torch.bmm(tau[0], tau[1])  # (T, R, N)
                continue
            rows = self.dense_rows.get(name, list(range(len(self.task_names))))
            if name not in self.dense_rows and name not in lora_of:
                out[name] = tau
                continue
            full = tau.new_zeros((len(self.task_names), *tau.shape[1:]))  # (T, *shape)
            full[rows] = tau
            if name in lora_of:
                m = lora_of[name]
                module = self._skeletons[0].get_submodule(self.full_name(m))
                a, b, task = self.lora_a[m], self.lora_b[m], self.lora_task[m]
                for t in task.unique().tolist():
                    cols = task == t  # (R,) this task's rank columns
                    full[t] += lora.delta(module, a[cols], b[:, cols]).to(full.dtype)  # (*shape)
            out[name] = full
        return out

    def one_hot_table(self, task: int) -> Tensor:
        """Coefficients that select expert ``task`` alone (1 for it, 0 for the others)."""
        table = torch.zeros_like(self.coefficients.weight)
        table[task] = 1.0
        return table

    def base_table(self) -> Tensor:
        """All-zero coefficients: the base backbone (how held-out tasks are normalised)."""
        return torch.zeros_like(self.coefficients.weight)

    def constant_table(self, value: float) -> Tensor:
        """Coefficients equal to ``value`` everywhere (task arithmetic with lambda = value)."""
        return torch.full_like(self.coefficients.weight, value)
