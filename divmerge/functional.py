"""The merged model: theta(l) = theta_0(l) + sum_t c[t, g(l)] * tau_t(l), run via functional_call.

Nothing is copied per step but the merged tensors themselves: each is one fused weighted sum over the
stacked task vectors of that tensor (one ``addmv`` over T), and autograd gives the coefficients'
gradients from the same pass (grad c[t] = <grad merged, tau_t>, read from the stored task vectors, so
backward keeps no per-step copy of them whatever their storage dtype).
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.func import functional_call

from divmerge import lora
from divmerge.coefficients import Granularity, MergeCoefficients
from divmerge.experts import ExpertSet
from divmerge.sharding import is_sharded, shard_stacks, sharded_weighted_sum

CHUNK = 1 << 20  # columns per upcast chunk when task vectors are stored below float32
BackbonePass = Literal["per_task", "joint"]


def _column_chunks(flat: Tensor) -> list[slice]:
    """Column slices of a (T, N) matrix: one slice in float32, else chunks that bound the upcast copy."""
    n = flat.shape[1]
    if flat.dtype == torch.float32:
        return [slice(0, n)]
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


class WeightedSum(torch.autograd.Function):
    """merged = base + sum_t coef[t] * tau[t] in float32, with grad coef[t] = <grad merged, tau[t]>.

    Unlike ``tensordot(coef, tau.float())`` under autograd, nothing but ``tau`` itself (a stored, frozen
    tensor: no copy) is kept for backward, so bf16/fp16 task vectors cost their storage size, never a
    float32 copy. Sub-float32 task vectors are upcast in column chunks of ``CHUNK`` (T x CHUNK floats).
    """

    @staticmethod
    def forward(ctx: Any, coef: Tensor, base: Tensor, tau: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(tau)
        ctx.coef_dtype = coef.dtype
        flat = tau.reshape(tau.shape[0], -1)  # (T, N), a view
        coef32 = coef.detach().to(torch.float32)  # (T,)
        base32 = base.reshape(-1).to(torch.float32)  # (N,)
        out = torch.empty_like(base32)  # (N,)
        for cols in _column_chunks(flat):
            torch.addmv(base32[cols], flat[:, cols].to(torch.float32).t(), coef32, out=out[cols])
        return out.to(base.dtype).reshape(base.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # noqa: D102
        (tau,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        flat = tau.reshape(tau.shape[0], -1)  # (T, N)
        grad32 = grad.reshape(-1).to(torch.float32)  # (N,)
        grad_coef = torch.zeros(flat.shape[0], dtype=torch.float32, device=grad.device)  # (T,)
        for cols in _column_chunks(flat):
            grad_coef += flat[:, cols].to(torch.float32) @ grad32[cols]
        return grad_coef.to(ctx.coef_dtype), None, None


def accumulate_over_tasks(
    params: Mapping[str, Tensor], task_losses: Mapping[int, Callable[[Mapping[str, Tensor]], Tensor]]
) -> tuple[Tensor, dict[int, Tensor]]:
    """Run each task's loss + backward in turn on the merged tensors; return a loss that finishes the step.

    Each task's forward and backward run back to back on detached copies (views) of the merged tensors,
    so only one task's activations are alive at a time and the merged tensors' gradients accumulate.
    The returned loss equals the summed task losses; its ``backward()`` sends the accumulated gradients
    through the merge to the coefficients (so a trainer's ``loss.backward()``, DDP's gradient hooks and
    optimizers work unchanged). Peak memory: one task's activations + merged tensors + their gradients.

    Args:
        params: Output of ``MergedModel.merged_params`` (differentiable w.r.t. the coefficients).
        task_losses: Task index -> function of the merged tensors returning that task's scalar loss.

    Returns:
        The step loss (value: sum of task losses) and the detached loss of each task.

    """
    # tensors no coefficient moves (e.g. LoRA A factors, or weights only adapters leave untouched) stay
    # constants, so backward computes no gradient for them
    leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in params.items()}
    values = {}
    for task, loss_fn in task_losses.items():
        loss = loss_fn(leaves)
        loss.backward(inputs=[leaf for leaf in leaves.values() if leaf.requires_grad])
        values[task] = loss.detach()
    total = torch.stack(list(values.values())).sum()
    # surrogate = sum_n <merged_n, grad_n>: its gradient w.r.t. merged_n is grad_n, so its backward runs
    # only the merge (WeightedSum.backward) and leaves each coefficient its full gradient.
    surrogate = torch.zeros((), device=total.device)
    for name, leaf in leaves.items():
        if leaf.grad is not None:  # None: a tensor no task's loss depends on (e.g. an unused pooler)
            surrogate = surrogate + torch.dot(params[name].reshape(-1), leaf.grad.reshape(-1)).float()
    return total + (surrogate - surrogate.detach()), values


class FrozenTensors(nn.Module):
    """A name -> tensor store that follows ``.to()`` / ``.cuda()`` but holds no parameters or buffers.

    So the tensors never enter ``state_dict`` (checkpoints stay kilobytes), never require grad, and
    DDP never broadcasts them.

    Args:
        tensors: The tensors to hold; they are detached.

    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        self._store = {name: t.detach() for name, t in tensors.items()}

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "FrozenTensors":
        self._store = {name: fn(t) for name, t in self._store.items()}
        return super()._apply(fn, recurse)

    def __getitem__(self, name: str) -> Tensor:
        return self._store[name]

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """Iterate over (name, tensor) pairs."""
        return iter(self._store.items())

    def numel(self) -> int:
        """Total number of elements held."""
        return sum(t.numel() for t in self._store.values())


class MergedModel(nn.Module):
    """Base model + learnable combination of task vectors, evaluated functionally per task.

    Args:
        experts: The loaded expert set (base, stacked task vectors, heads, skeletons).
        granularity: Coefficient granularity: ``task``, ``layer`` or ``block``.
        init: Initial coefficient value; None means 1/T.
        clamp: Optional (low, high) bounds on the coefficients.
        task_vector_dtype: Storage dtype of the task vectors (bf16/fp16 halve their memory); the merge
            itself is computed in float32 with float32 coefficients. LoRA factors keep their dtype.

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
    ) -> None:
        super().__init__()
        self.task_names = list(experts.task_names)
        self.all_tasks = experts.all_tasks  # heads/skeletons index: merged tasks, then held-out ones
        self.names = list(experts.names)
        self.prefix = experts.prefix
        self.coefficients = MergeCoefficients(len(self.task_names), self.names, granularity, init, clamp)
        self.base = FrozenTensors(experts.base)
        self.task_vectors = FrozenTensors(
            {n: t.to(task_vector_dtype) for n, t in experts.task_vectors.items()}
        )
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
            table: Coefficients (T, G) to merge with; None uses the learned ones.

        Returns:
            Name -> merged tensor (and the LoRA modules' ``@lora_A`` / ``@lora_B`` factors, see the class
            docstring); differentiable w.r.t. the coefficients.

        """
        table = self.coefficients() if table is None else table
        merged = {}
        with torch.autocast(device_type=table.device.type, enabled=False):  # merge in full precision
            for name in self.names:
                coef = self.coefficients.column(table, name)  # (T,)
                rows = self.dense_rows.get(name)  # None: all T tasks
                if rows == []:  # only adapters' low-rank updates (or nothing) change this tensor
                    merged[self.full_name(name)] = self.base[name]
                    continue
                tau = self.task_vectors[name]  # (rows, *shape), or a column-sharded DTensor (rows, numel)
                merge = sharded_weighted_sum if is_sharded(tau) else WeightedSum.apply
                merged[self.full_name(name)] = merge(
                    coef if rows is None else coef[rows], self.base[name], tau
                )
            for m, b in self.lora_b.items():
                coef = self.coefficients.column(table, f"{m}.weight")  # (T,)
                merged[self.full_name(m) + lora.LORA_A] = self.lora_a[m]  # (R, in)
                b_merged = lora.merged_b(b, self.lora_task[m], coef)  # (out, R)
                merged[self.full_name(m) + lora.LORA_B] = b_merged
        return merged

    def shard(self, mesh: DeviceMesh) -> None:
        """Keep only this rank's column slice of every stacked task vector (see ``divmerge.sharding``).

        From then on ``merged_params`` is a collective: every rank of ``mesh`` must call it alike.

        Args:
            mesh: The 1-D mesh of ranks to shard over (Lightning's data-parallel mesh).

        """
        self.task_vectors = FrozenTensors(shard_stacks(dict(self.task_vectors.items()), mesh))

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
            tau = self.task_vectors[name]  # (len(rows), *shape)
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

    def forward_tasks(
        self, params: Mapping[str, Tensor], batches: Mapping[int, Mapping[str, Tensor]]
    ) -> dict[int, Tensor]:
        """Logits of the merged model for several tasks' batches in ONE backbone pass.

        The batches are right-padded to a common length and concatenated; the merged backbone runs once
        on the union (so a step costs one forward+backward however many tasks there are), then each
        task's own head runs on its slice: the expert's forward is called with its backbone submodule
        answering from the precomputed outputs, so any Hugging Face head works unchanged.

        Args:
            params: Output of ``merged_params``.
            batches: Task index (into ``all_tasks``) -> inputs (``input_ids`` and ``attention_mask``,
                each (B_t, L_t)).

        Returns:
            Task index -> logits (B_t, C_t).

        """
        tasks = list(batches)
        length = max(b["input_ids"].shape[1] for b in batches.values())
        pad_id = self._skeletons[tasks[0]].config.pad_token_id or 0
        ids = torch.cat(
            [
                F.pad(batches[t]["input_ids"], (0, length - batches[t]["input_ids"].shape[1]), value=pad_id)
                for t in tasks
            ]
        )
        mask = torch.cat(
            [
                F.pad(batches[t]["attention_mask"], (0, length - batches[t]["attention_mask"].shape[1]))
                for t in tasks
            ]
        )  # (sum B_t, L)
        backbone = self._skeletons[tasks[0]].get_submodule(self.prefix)
        cut = len(self.prefix) + 1
        tensors = {n[cut:]: v for n, v in params.items()} | {n[cut:]: v for n, v in self.buffers_.items()}
        dense, factors = lora.split(tensors)
        with lora.attached(backbone, factors):
            hidden = functional_call(
                backbone, dense, args=(), kwargs={"input_ids": ids, "attention_mask": mask}, strict=True
            )
        logits, start = {}, 0
        for t in tasks:
            stop = start + batches[t]["input_ids"].shape[0]
            part = type(hidden)(**{k: v[start:stop] for k, v in hidden.items()})  # this task's rows
            logits[t] = self._head_logits(t, part, ids[start:stop], mask[start:stop])
            start = stop
        return logits

    def _head_logits(self, task: int, backbone_out: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Run expert ``task``'s forward with its backbone replaced by precomputed outputs."""
        skeleton = self._skeletons[task]
        backbone = skeleton.get_submodule(self.prefix)
        backbone.forward = lambda *args, **kwargs: backbone_out
        try:
            out = functional_call(
                skeleton,
                dict(self.heads[task].items()),
                args=(),
                kwargs={"input_ids": input_ids, "attention_mask": attention_mask},
                strict=False,
            )
        finally:
            del backbone.forward
        return out.logits

    def step_loss(
        self,
        params: Mapping[str, Tensor],
        batches: Mapping[int, Mapping[str, Tensor]],
        task_loss: Callable[[int, Tensor], Tensor],
        backbone_pass: BackbonePass = "per_task",
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """The training loss sum_t task_loss(t, logits_t) over several tasks' batches.

        Args:
            params: Output of ``merged_params``.
            batches: Task index -> inputs (``input_ids``, ``attention_mask``, each (B_t, L_t)).
            task_loss: (task index, merged logits (B_t, C_t)) -> scalar loss of that task.
            backbone_pass: ``per_task`` runs one task's forward+backward at a time, accumulating the
                merged tensors' gradients (see :func:`accumulate_over_tasks`): activation memory of one
                task's batch, so memory grows by one task vector per expert, not by one activation set.
                ``joint`` runs all tasks in one concatenated backbone pass (``forward_tasks``): larger
                matmuls (faster where they are not already saturated, e.g. big GPUs) but activation
                memory grows with T; its backward then happens in the caller's ``loss.backward()``.

        Returns:
            The loss to call ``backward()`` on (value: the summed task losses) and each task's detached
            loss.

        """
        if backbone_pass == "joint":
            logits = self.forward_tasks(params, batches)
            losses = {t: task_loss(t, logits[t]) for t in batches}
            return torch.stack(list(losses.values())).sum(), {t: v.detach() for t, v in losses.items()}
        if backbone_pass != "per_task":
            raise ValueError(f"backbone_pass must be 'per_task' or 'joint', not {backbone_pass!r}")
        return accumulate_over_tasks(
            params,
            {t: (lambda p, t=t: task_loss(t, self.task_logits(t, p, **batches[t]))) for t in batches},
        )

    def task_logits(self, task: int, params: Mapping[str, Tensor], **inputs: Tensor) -> Tensor:
        """Logits of the merged backbone with task ``task``'s own head.

        Args:
            task: Task index t.
            params: Output of ``merged_params``.
            **inputs: ``input_ids`` and ``attention_mask``, each (B, L).

        Returns:
            Logits, shape (B, C_t).

        """
        return self.forward_tasks(params, {task: inputs})[task]

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
