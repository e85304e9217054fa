"""The merged model: theta(l) = theta_0(l) + sum_t c[t, g(l)] * tau_t(l), run via functional_call.

Nothing is copied per step but the merged tensors themselves: each is one fused weighted sum over the
stacked task vectors of that tensor (``tensordot`` over T), and autograd gives the coefficients'
gradients from the same pass.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from divmerge.coefficients import Granularity, MergeCoefficients
from divmerge.experts import ExpertSet


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
            itself is computed in float32 with float32 coefficients.
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
        self.buffers_ = FrozenTensors({f"{self.prefix}.{n}": b for n, b in experts.buffers.items()})
        self.heads = nn.ModuleList(FrozenTensors(h) for h in experts.heads)
        # Plain list, not a ModuleList: the meta skeletons must not appear in parameters()/state_dict().
        self._skeletons = list(experts.skeletons)

    def merged_params(self, table: Tensor | None = None) -> dict[str, Tensor]:
        """Merged backbone tensors under the expert's naming (``<prefix>.<name>``).

        Args:
            table: Coefficients (T, G) to merge with; None uses the learned ones.

        Returns:
            Name -> merged tensor; differentiable w.r.t. the coefficients.

        """
        table = self.coefficients() if table is None else table
        merged = {}
        device_type = table.device.type
        with torch.autocast(device_type=device_type, enabled=False):  # merge in full precision
            for name in self.names:
                tau = self.task_vectors[name]  # (T, *shape)
                coef = self.coefficients.column(table, name).to(torch.float32)  # (T,)
                delta = torch.tensordot(coef, tau.to(torch.float32), dims=1)  # (*shape)
                merged[f"{self.prefix}.{name}"] = self.base[name] + delta.to(self.base[name].dtype)
        return merged

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
        hidden = functional_call(
            backbone, tensors, args=(), kwargs={"input_ids": ids, "attention_mask": mask}, strict=True
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
