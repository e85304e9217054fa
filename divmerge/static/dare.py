"""DARE: drop and rescale task-vector entries, then merge (Yu et al., ICML 2024, arXiv 2311.03099).

peft's ``random_pruning`` is deliberately not used: it draws from the global RNG with no generator
argument, so it cannot be seeded per tensor without clobbering the caller's RNG state; ``_dare_drop``
draws from a private generator.
"""

import hashlib
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from divmerge.errors import DivMergeError
from divmerge.static.common import check_lambda, check_tensors, is_real, merged_tensor
from divmerge.static.linear import TA_LAMBDA
from divmerge.static.ties import TIES_DENSITY, TIES_LAMBDA, check_density, ties_delta

DareThen = Literal["task_arithmetic", "ties"]
DARE_THEN: tuple[str, ...] = ("task_arithmetic", "ties")
DARE_P = 0.5  # See `dare`: a middle drop rate; Yu et al.'s p = 0.9 is for large LLMs.

DARE_REFERENCE = (
    "Yu et al., 'Language Models are Super Mario: Absorbing Abilities from Homologous Models as a "
    "Free Lunch', ICML 2024."
)


def check_p(p: object) -> float:
    """Return ``p`` as a float, or raise if it is not in [0, 1).

    Args:
        p: The DARE drop probability.

    Returns:
        ``float(p)``.

    Raises:
        DivMergeError: If ``p`` is not a number in [0, 1).

    """
    if not is_real(p) or not 0.0 <= float(p) < 1.0:
        raise DivMergeError(
            f"DARE drop probability p must be in [0, 1), got {p!r}: pass e.g. p={DARE_P} (p=0 drops nothing)."
        )
    return float(p)


def check_seed(seed: object) -> int:
    """Return ``seed`` as an int, or raise if it is not an integer.

    Args:
        seed: The DARE base seed.

    Returns:
        ``seed``.

    Raises:
        DivMergeError: If ``seed`` is not an int (bools excluded).

    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DivMergeError(f"DARE seed must be an integer, got {seed!r}: pass e.g. seed=0.")
    return seed


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for tensor ``name``: stable across runs, processes and dict orders.

    Args:
        seed: The user's seed.
        name: The tensor name.

    Returns:
        A non-negative int for ``torch.Generator.manual_seed``.

    """
    digest = hashlib.sha256(f"{seed}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _dare_drop(tau: Tensor, p: float, seed: int) -> Tensor:
    """Drop each entry with probability ``p`` and rescale survivors by 1 / (1 - p) (DARE).

    The mask is drawn on the CPU from a private generator (the global RNG is untouched), so it is the
    same whatever device ``tau`` lives on.

    Args:
        tau: Task vectors of one tensor in float32, (T, *shape).
        p: Drop probability in [0, 1).
        seed: Seed of this tensor's generator (see ``tensor_seed``).

    Returns:
        The dropped and rescaled task vectors, (T, *shape); E[result] = tau.

    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(tau.shape, generator=generator) >= p  # (T, *shape) bool, P(keep) = 1 - p
    return torch.where(keep.to(tau.device), tau / (1.0 - p), 0.0)  # (T, *shape)


def dare(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    p: float = DARE_P,
    seed: int = 0,
    then: DareThen = "task_arithmetic",
    lambda_: float | None = None,
    density: float | None = None,
) -> dict[str, Tensor]:
    """DARE: drop each task-vector entry with probability p, rescale survivors by 1/(1-p), then merge.

    Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch", ICML 2024.

    Dropping is independent per entry and per task; E[dropped tau] = tau. The mask of each tensor comes
    from its own generator seeded by ``tensor_seed(seed, name)``, so results depend on ``seed`` and the
    tensor names only, not on dict order or device. The dropped task vectors are then merged by task
    arithmetic or by full TIES (trim with ``density``, elect, disjoint mean); ``then="ties"`` with
    ``density=1`` is the trim-free "dare_ties" of peft and mergekit.

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        p: Drop probability in [0, 1) (default 0.5, a middle value of the 0.1-0.9 range the paper
            explores: its headline p = 0.9 is for large LLMs, and it reports that smaller models tolerate
            less dropping, so tune p on validation data for small encoders).
        seed: Base seed of the per-tensor generators.
        then: ``"task_arithmetic"`` or ``"ties"``: how the dropped task vectors are combined.
        lambda_: Scaling; None means the combiner's default (0.3 for task arithmetic, 1.0 for TIES).
        density: TIES trim density in (0, 1]; only with ``then="ties"``; None means 0.2 (TIES' default,
            so ``p=0`` reproduces ``ties`` with its defaults).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    """
    check_tensors(base, task_vectors)
    p = check_p(p)
    seed = check_seed(seed)
    if then not in DARE_THEN:
        raise DivMergeError(f"DARE then={then!r} is not a combiner: use one of {list(DARE_THEN)}.")
    if then == "task_arithmetic" and density is not None:
        raise DivMergeError(
            "DARE density only applies to the TIES trim: drop it, or pass then='ties' to use it."
        )
    default_lambda = TA_LAMBDA if then == "task_arithmetic" else TIES_LAMBDA
    lam = check_lambda(default_lambda if lambda_ is None else lambda_)
    keep = check_density(density if density is not None else TIES_DENSITY)
    merged = {}
    for name, theta0 in base.items():
        tau = _dare_drop(task_vectors[name].to(torch.float32), p, tensor_seed(seed, name))  # (T, *shape)
        delta = tau.sum(dim=0) if then == "task_arithmetic" else ties_delta(tau, keep)  # (*shape)
        merged[name] = merged_tensor(theta0, delta, lam)
    return merged
