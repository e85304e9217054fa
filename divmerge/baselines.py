"""Static (data-free, training-free) merge baselines: weight averaging, task arithmetic, TIES, DARE.

Every method maps ``base`` (theta_0, name -> (*shape)) and ``task_vectors`` (tau stacked over the T
experts, name -> (T, *shape)), i.e. exactly ``ExpertSet.base`` and ``ExpertSet.task_vectors``, to the
merged tensors theta_0 + merged_tau (name -> (*shape), base's dtype and device). Work is done one tensor
at a time, so the only temporaries are a few copies of a single (T, *shape) tensor.

The sign election and disjoint mean of TIES reuse ``peft.utils.merge_utils``. Two of its helpers are
deliberately not used:

- ``magnitude_based_pruning`` keeps ``int(density * numel)`` entries: floating-point error floors
  (``int(0.29 * 100) == 28``) and tensors with fewer than ``1 / density`` entries are zeroed entirely.
  ``_trim_thresholds`` below rounds to the nearest count and keeps at least one entry.
- ``random_pruning`` draws from the global RNG with no generator argument, so it cannot be seeded per
  tensor without clobbering the caller's RNG state; ``_dare_drop`` draws from a private generator.

``task_arithmetic`` is a plain sum rather than peft's ``task_arithmetic``, which re-stacks its input
list and materialises a weighted (T, *shape) copy.

Use ``static_merge(method, base, task_vectors, **options)``; ``STATIC_METHODS`` lists the methods.
"""

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Literal

import torch
from torch import Tensor

from divmerge.errors import DivMergeError

DareThen = Literal["task_arithmetic", "ties"]
DARE_THEN: tuple[str, ...] = ("task_arithmetic", "ties")

CHUNK = 1 << 18  # entries per column block of TIES' per-entry steps (T x CHUNK floats a temporary)
TA_LAMBDA = 0.3  # Ilharco et al. 2023 pick lambda on validation data; 0.3 is their usual optimum.
TIES_LAMBDA = 1.0  # Yadav et al. 2023: lambda = 1 is the recommended setting with the disjoint mean.
TIES_DENSITY = 0.2  # Yadav et al. 2023: keep the top-20% magnitudes of each task vector.
DARE_P = 0.5  # See `dare`: a middle drop rate; Yu et al.'s p = 0.9 is for large LLMs.


@dataclass(frozen=True)
class StaticMethod:
    """A registered static merge method.

    Attributes:
        name: Registry key (``static_merge``'s ``method``).
        fn: ``fn(base, task_vectors, **options) -> merged``.
        reference: Paper citation.
        options: Names of the keyword options ``fn`` accepts.

    """

    name: str
    fn: Callable[..., dict[str, Tensor]]
    reference: str
    options: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- checks


def _check_tensors(base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]) -> None:
    """Check that base and task vectors name the same tensors with shapes (*shape) and (T, *shape)."""
    missing = sorted(set(base) ^ set(task_vectors))
    if missing:
        where = "task_vectors" if missing[0] in base else "base"
        raise DivMergeError(
            f"Tensor {missing[0]!r} is missing from {where}: base and task_vectors must have the same keys "
            "(pass ExpertSet.base and ExpertSet.task_vectors together)."
        )
    num_tasks = None
    for name, theta0 in base.items():
        tau = task_vectors[name]
        if not (theta0.is_floating_point() and tau.is_floating_point()):
            raise DivMergeError(
                f"Tensor {name!r} is not floating point: merge only float tensors (as ExpertSet.names does)."
            )
        if tau.dim() != theta0.dim() + 1 or tau.shape[1:] != theta0.shape:
            raise DivMergeError(
                f"Task vector {name!r} has shape {tuple(tau.shape)} but its base has {tuple(theta0.shape)}: "
                "task vectors must be stacked over experts as (T, *base_shape)."
            )
        if num_tasks is None:
            num_tasks = tau.shape[0]
        if tau.shape[0] != num_tasks or num_tasks < 1:
            raise DivMergeError(
                f"Task vector {name!r} stacks {tau.shape[0]} experts but others stack {num_tasks}: every "
                "tensor needs the same number T >= 1 of experts on dim 0."
            )


def _is_real(value: object) -> bool:
    """True for int/float-like numbers (bools excluded)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_lambda(lambda_: object) -> float:
    """Return ``lambda_`` as a float, or raise if it is not a finite number."""
    if not _is_real(lambda_) or not math.isfinite(float(lambda_)):
        raise DivMergeError(f"lambda_ must be a finite number, got {lambda_!r}: pass e.g. lambda_=0.3.")
    return float(lambda_)


def _check_density(density: object) -> float:
    """Return ``density`` as a float, or raise if it is not in (0, 1]."""
    if not _is_real(density) or not 0.0 < float(density) <= 1.0:
        raise DivMergeError(
            f"TIES density must be in (0, 1] (the fraction of each task vector kept), got {density!r}: "
            f"pass e.g. density={TIES_DENSITY}."
        )
    return float(density)


def _check_p(p: object) -> float:
    """Return ``p`` as a float, or raise if it is not in [0, 1)."""
    if not _is_real(p) or not 0.0 <= float(p) < 1.0:
        raise DivMergeError(
            f"DARE drop probability p must be in [0, 1), got {p!r}: pass e.g. p={DARE_P} (p=0 drops nothing)."
        )
    return float(p)


def _check_seed(seed: object) -> int:
    """Return ``seed`` as an int, or raise if it is not an integer."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DivMergeError(f"DARE seed must be an integer, got {seed!r}: pass e.g. seed=0.")
    return seed


# --------------------------------------------------------------------------------------------- helpers


def _merged(theta0: Tensor, delta: Tensor, lam: float = 1.0) -> Tensor:
    """theta_0 + lam * delta in float32, returned in theta_0's dtype; ``delta`` (float32) is consumed.

    In place on ``delta``, so a merge's temporaries stay one tensor's size (no ``lam * delta`` and sum
    copies of the largest tensor, the embedding).
    """
    return delta.mul_(lam).add_(theta0).to(theta0.dtype)  # (*shape)


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


def _ties_delta(tau: Tensor, density: float) -> Tensor:
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


# --------------------------------------------------------------------------------------------- methods


def average(base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weight averaging: theta_0 + mean_t tau_t, i.e. the uniform average of the experts' weights.

    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
    without increasing inference time", ICML 2022.

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    """
    _check_tensors(base, task_vectors)
    return {
        name: _merged(theta0, task_vectors[name].to(torch.float32).mean(dim=0))  # (*shape)
        for name, theta0 in base.items()
    }


def task_arithmetic(
    base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], lambda_: float = TA_LAMBDA
) -> dict[str, Tensor]:
    """Task arithmetic: theta_0 + lambda * sum_t tau_t.

    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        lambda_: Scaling coefficient lambda (default 0.3, the value the paper usually selects on
            validation data; ``lambda_ = 1/T`` is ``average``).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    """
    _check_tensors(base, task_vectors)
    lam = _check_lambda(lambda_)
    return {
        name: _merged(theta0, task_vectors[name].to(torch.float32).sum(dim=0), lam)  # (*shape)
        for name, theta0 in base.items()
    }


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
    _check_tensors(base, task_vectors)
    density = _check_density(density)
    lam = _check_lambda(lambda_)
    return {
        name: _merged(theta0, _ties_delta(task_vectors[name].to(torch.float32), density), lam)
        for name, theta0 in base.items()
    }


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
    _check_tensors(base, task_vectors)
    p = _check_p(p)
    seed = _check_seed(seed)
    if then not in DARE_THEN:
        raise DivMergeError(f"DARE then={then!r} is not a combiner: use one of {list(DARE_THEN)}.")
    if then == "task_arithmetic" and density is not None:
        raise DivMergeError(
            "DARE density only applies to the TIES trim: drop it, or pass then='ties' to use it."
        )
    default_lambda = TA_LAMBDA if then == "task_arithmetic" else TIES_LAMBDA
    lam = _check_lambda(default_lambda if lambda_ is None else lambda_)
    keep = _check_density(density if density is not None else TIES_DENSITY)
    merged = {}
    for name, theta0 in base.items():
        tau = _dare_drop(task_vectors[name].to(torch.float32), p, tensor_seed(seed, name))  # (T, *shape)
        delta = tau.sum(dim=0) if then == "task_arithmetic" else _ties_delta(tau, keep)  # (*shape)
        merged[name] = _merged(theta0, delta, lam)
    return merged


# -------------------------------------------------------------------------------------------- registry

STATIC_METHODS: dict[str, StaticMethod] = {
    m.name: m
    for m in (
        StaticMethod(
            "average",
            average,
            "Wortsman et al., 'Model soups: averaging weights of multiple fine-tuned models improves "
            "accuracy without increasing inference time', ICML 2022.",
            (),
        ),
        StaticMethod(
            "task_arithmetic",
            task_arithmetic,
            "Ilharco et al., 'Editing Models with Task Arithmetic', ICLR 2023.",
            ("lambda_",),
        ),
        StaticMethod(
            "ties",
            ties,
            "Yadav et al., 'TIES-Merging: Resolving Interference When Merging Models', NeurIPS 2023.",
            ("density", "lambda_"),
        ),
        StaticMethod(
            "dare",
            dare,
            "Yu et al., 'Language Models are Super Mario: Absorbing Abilities from Homologous Models as a "
            "Free Lunch', ICML 2024.",
            ("p", "seed", "then", "lambda_", "density"),
        ),
    )
}


def static_merge(
    method: str, base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], **options: object
) -> dict[str, Tensor]:
    """Validate the method name and options, then merge.

    Args:
        method: A key of ``STATIC_METHODS``.
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        **options: The method's options (see ``STATIC_METHODS[method].options``).

    Returns:
        Merged tensors (theta_0 + merged task vector), same names and shapes as ``base``.

    """
    if method not in STATIC_METHODS:
        raise DivMergeError(f"Unknown static merge method {method!r}: use one of {list(STATIC_METHODS)}.")
    spec = STATIC_METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        hint = " (lambda is spelled lambda_)" if "lambda" in unknown else ""
        valid = f"its options are {list(spec.options)}" if spec.options else "it takes no options"
        raise DivMergeError(
            f"Unknown option {unknown[0]!r} for static merge method {method!r}{hint}: {valid}."
        )
    return spec.fn(base, task_vectors, **options)
