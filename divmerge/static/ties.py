"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

The sign election and disjoint mean reuse ``peft.utils.merge_utils``. peft's
``magnitude_based_pruning`` is deliberately not used: it keeps ``int(density * numel)`` entries, so
floating-point error floors (``int(0.29 * 100) == 28``) and tensors with fewer than ``1 / density``
entries are zeroed entirely. ``_trim_thresholds`` below rounds to the nearest count and keeps at least
one entry.
"""

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from divmerge.errors import DivMergeError
from divmerge.static.common import check_lambda, check_tensors, is_real, merged_tensor

CHUNK = 1 << 18  # entries per column block of TIES' per-entry steps (T x CHUNK floats a temporary)
TIES_LAMBDA = 1.0  # Yadav et al. 2023: lambda = 1 is the recommended setting with the disjoint mean.
TIES_DENSITY = 0.2  # Yadav et al. 2023: keep the top-20% magnitudes of each task vector.

TIES_REFERENCE = "Yadav et al., 'TIES-Merging: Resolving Interference When Merging Models', NeurIPS 2023."


def check_density(density: object) -> float:
    """Return ``density`` as a float, or raise if it is not in (0, 1].

    Args:
        density: The TIES trim density (also DARE's, with ``then="ties"``).

    Returns:
        ``float(density)``.

    Raises:
        DivMergeError: If ``density`` is not a number in (0, 1].

    """
    if not is_real(density) or not 0.0 < float(density) <= 1.0:
        raise DivMergeError(
            f"TIES density must be in (0, 1] (the fraction of each task vector kept), got {density!r}: "
            f"pass e.g. density={TIES_DENSITY}."
        )
    return float(density)


def _trim_thresholds(flat: Tensor, density: float) -> Tensor | None:
    """Per-task magnitude threshold of the TIES trim: the k-th largest |tau_t| entry; None keeps all.

    k = ``max(1, round(density * numel))`` per task, over all entries of the tensor; entries tied with the
    k-th largest magnitude are all kept. A selection, one task row at a time, rather than ``topk`` over
    (T, n): no index tensor and one row's temporary copy.

    Args:
        flat: Task vectors of one tensor, (T, n).
        density: Fraction kept, in (0, 1].

    Returns:
        Thresholds (T, 1), or None when every entry is kept.

    """
    n = flat.shape[1]
    k = min(n, max(1, math.floor(density * n + 0.5)))
    if k >= n:
        return None
    return torch.stack([_kth_largest_magnitude(row, k) for row in flat]).unsqueeze(1)  # (T, 1)


def _kth_largest_magnitude(row: Tensor, k: int) -> Tensor:
    """The k-th largest |entry| of a 1-D tensor, as a 0-d tensor.

    On CPU an in-place ``numpy`` partition of one |row| copy (O(n), no index array: ``kthvalue`` also
    builds an int64 index of the row, which for the demo's embedding is 94 MB); elsewhere ``kthvalue``.
    """
    n = row.numel()
    if row.device.type != "cpu":
        return torch.kthvalue(row.abs(), n - k + 1).values
    magnitudes = row.abs().numpy()  # (n,) our own copy
    magnitudes.partition(n - k)  # the (n - k)-th smallest lands at n - k
    return torch.tensor(magnitudes[n - k], dtype=row.dtype)


def ties_delta(tau: Tensor, density: float) -> Tensor:
    """Trim, elect sign by total mass, disjoint mean: TIES' merged task vector before scaling.

    Past the per-task thresholds everything is per entry, so it runs in column chunks of ``CHUNK``
    entries: temporaries stay a few (T, CHUNK) blocks however large the tensor.

    Args:
        tau: Task vectors of one tensor in float32, (T, *shape).
        density: Fraction of each task vector kept by the trim, in (0, 1].

    Returns:
        The merged task vector, (*shape).

    """
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge  # slow import: lazy

    flat = tau.reshape(tau.shape[0], -1)  # (T, n)
    thresholds = _trim_thresholds(flat, density)  # (T, 1) or None
    out = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)  # (n,)
    for start in range(0, flat.shape[1], CHUNK):
        part = flat[:, start : start + CHUNK]  # (T, c)
        if thresholds is not None:
            part = part * (part.abs() >= thresholds)  # trim
        # peft: sign == elected sign, elected = sign(sum_t trimmed) with 0 -> +1; zeros never agree.
        agree = calculate_majority_sign_mask(part, method="total")  # (T, c) bool
        out[start : start + CHUNK] = disjoint_merge(part, agree)  # sum of agreeing / max(1, #agreeing)
    return out.reshape(tau.shape[1:])  # (*shape)


def ties(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    density: float = TIES_DENSITY,
    lambda_: float = TIES_LAMBDA,
) -> dict[str, Tensor]:
    """TIES-Merging: trim, elect sign, disjoint merge, then theta_0 + lambda * merged.

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.

    Per tensor: (1) trim: keep the top ``density`` fraction of magnitudes of each tau_t
    (``max(1, round(density * numel))`` entries, per task), zero the rest; (2) elect: the sign of
    sum_t trimmed_t per entry (a zero sum elects +); (3) disjoint merge: mean over the tasks whose trimmed
    entry is non-zero and has the elected sign (0 where none). The paper trims over the whole flattened
    model; here, like peft, each tensor is trimmed on its own.

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        density: Fraction kept by the trim, in (0, 1] (default 0.2, the paper's k = 20%). 1 keeps all.
        lambda_: Scaling of the merged task vector (default 1.0, the paper's recommended value).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    """
    check_tensors(base, task_vectors)
    density = check_density(density)
    lam = check_lambda(lambda_)
    return {
        name: merged_tensor(theta0, ties_delta(task_vectors[name].to(torch.float32), density), lam)
        for name, theta0 in base.items()
    }
