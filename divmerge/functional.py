"""The merged model: theta(l) = theta_0(l) + sum_t c[t, g(l)] * tau_t(l), run via functional_call.

Nothing is copied per step but the merged tensors themselves: each is one fused weighted sum over the
stacked task vectors of that tensor (``tensordot`` over T), and autograd gives the coefficients'
gradients from the same pass.
"""

from collections.abc import Callable, Iterator, Mapping

import torch
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

    """

    def __init__(
        self,
        experts: ExpertSet,
        granularity: Granularity = "layer",
        init: float | None = None,
        clamp: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.task_names = list(experts.task_names)
        self.names = list(experts.names)
        self.prefix = experts.prefix
        self.coefficients = MergeCoefficients(len(self.task_names), self.names, granularity, init, clamp)
        self.base = FrozenTensors(experts.base)
        self.task_vectors = FrozenTensors(experts.task_vectors)
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

    def task_logits(self, task: int, params: Mapping[str, Tensor], **inputs: Tensor) -> Tensor:
        """Logits of the merged backbone with task ``task``'s own head.

        Args:
            task: Task index t.
            params: Output of ``merged_params``.
            **inputs: Model inputs (``input_ids``, ``attention_mask``, ...), each (B, L).

        Returns:
            Logits, shape (B, C_t).

        """
        tensors = {**params, **dict(self.buffers_.items()), **dict(self.heads[task].items())}
        out = functional_call(self._skeletons[task], tensors, args=(), kwargs=inputs, strict=True)
        return out.logits

    def one_hot_table(self, task: int) -> Tensor:
        """Coefficients that select expert ``task`` alone (1 for it, 0 for the others)."""
        table = torch.zeros_like(self.coefficients.weight)
        table[task] = 1.0
        return table

    def constant_table(self, value: float) -> Tensor:
        """Coefficients equal to ``value`` everywhere (task arithmetic with lambda = value)."""
        return torch.full_like(self.coefficients.weight, value)
