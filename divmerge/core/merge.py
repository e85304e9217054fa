"""The fused merge: theta = theta_0 + sum_t c_t tau_t per tensor, and per-task gradient accumulation.

Nothing is copied per step but the merged tensors themselves: each is one fused weighted sum over the
stacked task vectors of that tensor (one ``addmv`` over T), and autograd gives the coefficients'
gradients from the same pass (grad c[t] = <grad merged, tau_t>, read from the stored task vectors, so
backward keeps no per-step copy of them whatever their storage dtype).
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

CHUNK = 1 << 20  # columns per upcast chunk when task vectors are stored below float32


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

    Under ``torch.no_grad()`` (a held-out divergence) only the losses are computed, nothing backward.

    Args:
        params: Output of ``MergedModel.merged_params`` (differentiable w.r.t. the coefficients).
        task_losses: Task index -> function of the merged tensors returning that task's scalar loss.

    Returns:
        The step loss (value: sum of task losses) and the detached loss of each task.

    """
    if not torch.is_grad_enabled():
        values = {task: loss_fn(params).detach() for task, loss_fn in task_losses.items()}
        return torch.stack(list(values.values())).sum(), values
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


def _map(fn: Callable[[Tensor], Tensor], value: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """``fn`` of a tensor, or of each tensor of a tuple (factors kept together under one name)."""
    return tuple(fn(t) for t in value) if isinstance(value, tuple) else fn(value)


class FrozenTensors(nn.Module):
    """A name -> tensor (or tuple of factors) store that follows ``.to()`` but holds no parameters or buffers.

    So the tensors never enter ``state_dict`` (checkpoints stay kilobytes), never require grad, and
    DDP never broadcasts them.

    Args:
        tensors: The tensors to hold; they are detached.

    """

    def __init__(self, tensors: Mapping[str, Tensor | tuple[Tensor, ...]]) -> None:
        super().__init__()
        self._store = {name: _map(Tensor.detach, t) for name, t in tensors.items()}

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "FrozenTensors":
        self._store = {name: _map(fn, t) for name, t in self._store.items()}
        return super()._apply(fn, recurse)

    def __getitem__(self, name: str) -> Any:
        return self._store[name]

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Iterate over (name, tensor) pairs."""
        return iter(self._store.items())

    def numel(self) -> int:
        """Total number of elements held."""
        return sum(x.numel() for t in self._store.values() for x in (t if isinstance(t, tuple) else (t,)))
