"""The just-in-time, per-block merge: a block's merged tensors exist only while that block runs.

The whole-model merge (``MergedModel.merged_params``) materialises every merged tensor before the forward
and keeps it, and its gradient dL/dW, until the step's backward is done: 2 P floats on top of the stored
base and task vectors. In the per-block mode, every repeated block of the network (the children of each
``nn.ModuleList``: a transformer's layers) merges its own tensors, theta_0 + sum_t c_t tau_t, right before
it runs, inside a non-reentrant activation checkpoint (``torch.utils.checkpoint``): the merged tensors are
freed when the block returns, recomputed with the block in backward, and their gradient is contracted into
the coefficients' at once (grad c[t] += <dL/dW_block, tau_t>, ``WeightedSum.backward``). So neither a
whole merged model nor a whole dL/dW ever exists: one block's worth, plus the tensors outside the blocks
(embeddings, final norm, LM head), which are merged as before. The price is the blocks' recomputation
in backward (about one more forward; the merge itself is T multiply-adds per weight).

In the merged tensors (``MergedModel.step_params``) the mode shows as a ``TABLE`` entry (the coefficient
table, (T, G)) and each block tensor's entry holding its origin (theta_0, or the start merge: no copy),
which keeps ``functional_call(..., strict=True)`` whole; ``attached`` swaps in the real merge.
"""

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from divmerge.core import lora

TABLE = "@table"
"""Key of the coefficient table in per-block merged tensors ('@' never occurs in a module path)."""

MergeBlock = Callable[[Tensor, Sequence[str]], dict[str, Tensor]]
"""(table (T, G), tensor names) -> those of them that are merged (not buffers), merged, by name."""


def block_paths(root: nn.Module) -> list[str]:
    """The repeated blocks of ``root``: the children of every ``nn.ModuleList`` not inside another block."""
    paths: list[str] = []
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in paths):
            paths += [f"{name}.{child}" if name else child for child, _ in module.named_children()]
    return paths


def in_block(name: str, path: str) -> bool:
    """Whether tensor ``name`` (``<module>.<tensor>`` or ``<module>@lora_X``) lies in block ``path``."""
    return name.startswith(path + ".")


@contextlib.contextmanager
def attached(
    root: nn.Module,
    root_path: str,
    tensors: Mapping[str, Tensor],
    merge_block: MergeBlock,
    announce: Callable[[], None] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Make every block of ``root`` merge its own tensors when it runs, while the context is open.

    Without a ``TABLE`` entry (the whole-model merge) this yields ``tensors`` unchanged and patches nothing.

    Args:
        root: The module ``functional_call`` runs (a meta skeleton, or its backbone).
        root_path: ``root``'s path in the merged tensors' naming ("" when they are named from ``root``).
        tensors: Merged tensors named relative to ``root``, with ``TABLE`` in the per-block mode (see the
            module docstring), LoRA factors and buffers included.
        merge_block: Merges the named tensors (in the merged tensors' own naming) with the given table.
        announce: Called once before a per-block forward (``MergedModel.announce``: sharded evaluation
            keeps the ranks' forwards in step).

    Yields:
        The tensors for the call on ``root``: the block tensors' origins stay (``strict`` calls need every
        name), ``TABLE`` and the blocks' LoRA factors go (each block applies its own).

    """
    if TABLE not in tensors:
        yield dict(tensors)
        return
    if announce is not None:
        announce()
    table = tensors[TABLE]
    outer = {k: v for k, v in tensors.items() if k != TABLE}
    full = (lambda n: f"{root_path}.{n}") if root_path else (lambda n: n)
    patched = []
    for path in block_paths(root):
        own = {k: v for k, v in outer.items() if in_block(k, path)}
        if not own:
            continue
        block = root.get_submodule(path)
        block.forward = _runner(block, path, own, table, full, merge_block)
        patched.append(block)
        outer = {k: v for k, v in outer.items() if k not in own or "@" not in k}
    try:
        yield outer
    finally:
        for block in patched:
            del block.forward


def _runner(
    block: nn.Module,
    path: str,
    own: Mapping[str, Tensor],
    table: Tensor,
    full: Callable[[str], str],
    merge_block: MergeBlock,
) -> Callable[..., Any]:
    """The patched forward of one block: its merge and its forward under one activation checkpoint."""
    cut = len(path) + 1
    dense_names = [full(k) for k in own if "@" not in k]  # LoRA factors are merged already

    def run(table: Tensor, *args: Any, **kwargs: Any) -> Any:
        merged = merge_block(table, dense_names)  # this block's tensors only (buffers stay as they are)
        local = {k[cut:]: merged.get(full(k), v) for k, v in own.items()}
        dense, factors = lora.split(local)
        # the class's forward, not this runner (in backward's recomputation the runner is gone already)
        forward = block.__dict__.pop("forward", None)
        try:
            with lora.attached(block, factors):
                return functional_call(block, dense, args=args, kwargs=kwargs, strict=True)
        finally:
            if forward is not None:
                block.forward = forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing to recompute
            return run(table, *args, **kwargs)
        return checkpoint(run, table, *args, use_reentrant=False, **kwargs)

    return forward
