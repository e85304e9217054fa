"""LoRA experts merged without densifying their weight updates.

A LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685)
changes a linear layer by the low-rank update delta_t = s_t * B_t A_t, with A_t (r_t, in),
B_t (out, r_t) and scale s_t (lora_alpha / r_t, or its rsLoRA variant). The merged layer is

    y = W x + sum_t c_t * s_t * B_t (A_t x)        W = theta_0 + sum_{full experts f} c_f * tau_f

which never forms a dense (out, in) update: the adapters of all experts at one module are stacked
along the rank, A (R, in) and B (out, R) with R = sum_t r_t and s_t folded into B, and the merge is a
per-rank-column rescaling B * c[task(r)]. Memory stays at adapter size; the coefficients get their
gradients through the same autograd pass (grad c_t = sum over t's rank columns of <grad B_merged, B>).

In the merged tensors (``MergedModel.merged_params``) a LoRA module ``m`` appears as two entries,
``<m>@lora_A`` (R, in) and ``<m>@lora_B`` (out, R, already multiplied by the coefficients), next to its
dense weight; ``attached`` adds their product to the module's output during a ``functional_call``.
"""

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

LORA_A = "@lora_A"
"""Suffix of a LoRA module's stacked A factors in the merged tensors ('@' never occurs in a module path)."""
LORA_B = "@lora_B"
"""Suffix of a LoRA module's stacked, coefficient-scaled B factors in the merged tensors."""


@dataclass
class LoraStack:
    """The LoRA factors of every adapter expert at one module, stacked along the rank.

    Attributes:
        a: A_t stacked over adapter experts: (R, in), R = sum_t r_t.
        b: s_t * B_t stacked over adapter experts: (out, R).
        task: Task index (into the expert set's tasks) of each rank column: (R,), int64.

    The module's ``weight`` tensor names its coefficient column (one per task per tensor, layer-wise).
    """

    a: Tensor
    b: Tensor
    task: Tensor

    def select(self, tasks: list[int]) -> "LoraStack | None":
        """The rank columns of ``tasks`` only, renumbered to their position in ``tasks`` (None if none)."""
        keep = torch.cat([torch.nonzero(self.task == t).flatten() for t in tasks])  # (R',)
        if keep.numel() == 0:
            return None
        renumber = torch.full((max(int(self.task.max()), *tasks) + 1,), -1, dtype=torch.long)
        renumber[torch.tensor(tasks)] = torch.arange(len(tasks))
        return LoraStack(self.a[keep], self.b[:, keep], renumber[self.task[keep]])


def merged_b(b: Tensor, task: Tensor, coef: Tensor) -> Tensor:
    """The coefficient-weighted B factors: column r of ``b`` times c[task(r)].

    Args:
        b: Stacked s_t * B_t: (out, R).
        task: Task index of each rank column: (R,).
        coef: Coefficients of this module's weight, one per task: (T,).

    Returns:
        (out, R) float32, differentiable w.r.t. ``coef``.
    """
    return b.to(torch.float32) * coef.to(torch.float32)[task]  # (out, R) * (R,)


def split(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Separate dense tensors from LoRA factors.

    Args:
        tensors: Merged tensors, possibly with ``<m>@lora_A`` / ``<m>@lora_B`` entries.

    Returns:
        (dense tensors, module name -> (A (R, in), B (out, R))).
    """
    dense = {n: v for n, v in tensors.items() if not n.endswith((LORA_A, LORA_B))}
    factors = {
        n[: -len(LORA_A)]: (v, tensors[n[: -len(LORA_A)] + LORA_B])
        for n, v in tensors.items()
        if n.endswith(LORA_A)
    }
    return dense, factors


@contextlib.contextmanager
def attached(root: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Add each module's low-rank term B (A x) to its output while the context is open.

    Forward hooks on ``root``'s submodules (the meta skeleton used by ``functional_call``); removed on
    exit, so the skeleton is unchanged afterwards.

    Args:
        root: The module whose submodules ``factors`` names (relative to it).
        factors: Module name -> (A (R, in), B (out, R)).
    """

    def hook_for(a: Tensor, b: Tensor) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = args[0]  # (..., in)
            low = F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))  # (..., R) -> (..., out)
            return output + low.to(output.dtype)

        return hook

    handles = [root.get_submodule(m).register_forward_hook(hook_for(a, b)) for m, (a, b) in factors.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def delta(module: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """The dense update B A of one module, laid out like its weight (transposed for a ``Conv1D``).

    Args:
        module: The module the factors act on (only its type is read).
        a: (R, in).
        b: (out, R).

    Returns:
        (out, in), or (in, out) for a ``Conv1D``.
    """
    update = b.to(torch.float32) @ a.to(torch.float32)  # (out, in)
    return update.t() if isinstance(module, Conv1D) else update


def fold(tensors: Mapping[str, Tensor], root: nn.Module) -> dict[str, Tensor]:
    """Dense merged tensors: every LoRA module's B A added to its weight (for export).

    Args:
        tensors: Merged tensors with ``<m>@lora_A`` / ``<m>@lora_B`` entries, named relative to ``root``.
        root: The module the names are relative to (only its submodules' types are read).

    Returns:
        Name -> tensor, with no LoRA entries.
    """
    dense, factors = split(tensors)
    for m, (a, b) in factors.items():
        weight = f"{m}.weight"
        dense[weight] = (dense[weight].to(torch.float32) + delta(root.get_submodule(m), a, b)).to(
            dense[weight].dtype
        )
    return dense


def stack_lora(parts: Sequence[tuple[int, Tensor, Tensor]]) -> LoraStack:
    """Stack (task, A (r_t, in), s_t * B_t (out, r_t)) of several adapters along the rank."""
    return LoraStack(
        a=torch.cat([a for _, a, _ in parts]),  # (R, in)
        b=torch.cat([b for _, _, b in parts], dim=1),  # (out, R)
        task=torch.cat([torch.full((a.shape[0],), t, dtype=torch.long) for t, a, _ in parts]),  # (R,)
    )
