"""NaN and infinity in weights: found at load, named in one line, never merged.

One NaN in one expert tensor poisons every merge: theta_0 + sum_t c_t tau_t is NaN wherever any tau_t
is, even where c_t = 0 (0 x NaN = NaN), so the teachers (one-hot merges) and the learned merge all turn
NaN. The loaders check every tensor they read with :func:`nonfinite`: a sum over the tensor (NaN and
+-inf propagate into a sum; +inf - inf is NaN), which allocates nothing the size of the tensor; only a
tensor whose sum is not finite is looked at element-wise, to tell NaN from inf from a finite overflow.
"""

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from divmerge.errors import DivMergeError


@torch.no_grad()
def nonfinite_kind(tensor: Tensor) -> str | None:
    """``"NaN"``, ``"inf"`` or ``"NaN and inf"`` when ``tensor`` holds such values; None when it is finite.

    Args:
        tensor: Any tensor; integer, boolean, meta and empty tensors are finite.
    """
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
        return None
    if bool(torch.isfinite(tensor.sum())):  # one pass, a 0-d result
        return None
    nan, inf = bool(tensor.isnan().any()), bool(tensor.isinf().any())  # only for a suspect tensor
    return " and ".join(kind for kind, found in (("NaN", nan), ("inf", inf)) if found) or None


def nonfinite(tensors: Iterable[tuple[str, Tensor]]) -> tuple[str, str] | None:
    """The first (name, kind) of ``tensors`` holding NaN or inf (:func:`nonfinite_kind`); None: all finite."""
    for name, tensor in tensors:
        kind = nonfinite_kind(tensor)
        if kind is not None:
            return name, kind
    return None


def nonfinite_message(what: str, name: str, kind: str) -> str:
    """The line that refuses ``what`` (e.g. ``"Expert 'trec'"``) for non-finite values in tensor ``name``."""
    return (
        f"{what} has non-finite values ({kind}) in {name!r}: its weights are corrupt (a fine-tune that "
        "diverged, or a broken save or conversion), and one NaN makes the whole merge NaN; fix or re-save "
        "that model, or leave it out of the merge."
    )


def check_finite(what: str, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Refuse ``what`` in one line when one of its ``tensors`` holds NaN or inf.

    Args:
        what: How to name the model, capitalised (``"Expert 'trec'"``, ``"The base model 'x'"``).
        tensors: (name, tensor) pairs, e.g. ``model.named_parameters()``.

    Raises:
        DivMergeError: Naming the first non-finite tensor.
    """
    found = nonfinite(tensors)
    if found is not None:
        raise DivMergeError(nonfinite_message(what, *found))


def factor_tensors(factors: Mapping[str, tuple[Tensor, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """An adapter's LoRA factors (module -> (A, s * B)) as (name, tensor) pairs, named as peft saves them."""
    for module, (a, b) in factors.items():
        yield f"{module}.lora_A.weight", a
        yield f"{module}.lora_B.weight", b
