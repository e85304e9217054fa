"""Bootstrap confidence intervals of ANP over test rows.

ANP is a mean over tasks of a ratio of two accuracies measured on the same rows (merged / expert).
Its sampling error comes from the finite test rows, so the interval resamples rows: the
nonparametric bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 6 and 13)
with the percentile interval. Each task's rows are resampled on their own (a stratified bootstrap:
every resample keeps each task's row count), and one resample of a task's rows is shared by every
score of those rows (paired: the expert and the merge are scored on the same rows, so their ratio
is resampled as a pair). The statistic recomputes each task's ratio and their mean on every resample.

The resampling itself is ``scipy.stats.bootstrap``: each task is one sample of row indices, and the
vectorised statistic reads the 0/1 correctness of the resampled rows.
"""

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import DegenerateDataWarning, bootstrap

LEVEL = 0.95
RESAMPLES = 2000  # Efron & Tibshirani (ch. 13) suggest 1,000-2,000 for percentile intervals
SEED = 0
METHOD = "percentile"


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval and how it was computed (JSON-ready via ``as_dict``)."""

    low: float
    high: float
    level: float = LEVEL
    resamples: int = RESAMPLES
    seed: int = SEED
    method: str = METHOD

    def as_dict(self) -> dict[str, float | int | str]:
        """The fields as a plain dict."""
        return asdict(self)


def mean_ratio_interval(
    expert: Mapping[str, ArrayLike],
    scored: Sequence[Mapping[str, ArrayLike]],
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval | None:
    """Percentile bootstrap interval of ANP (or of a mean of ANPs) over test rows, stratified by task.

    On each resample, every task's rows are drawn with replacement (as many as it has); each merge's
    ANP is the mean over its tasks of (its accuracy / the expert's accuracy) on those rows, a task whose
    expert gets none of the drawn rows right being left out as ``evaluation.anp`` leaves out a zero
    expert; the statistic is the mean of the merges' ANPs (one merge: its ANP).

    Args:
        expert: Task -> the expert's 0/1 correctness on each test row (n_t,).
        scored: One mapping per merge: task -> its 0/1 correctness on the same rows, same order (n_t,).
            Several merges (e.g. one per task subset) share the resample of the tasks they have in common.
        level: Confidence level.
        resamples: Number of bootstrap resamples.
        seed: Seed of the resampling (the interval is a function of the rows and the seed).

    Returns:
        The interval, or None without rows to resample (no merge, a task without rows). A resample
        on which every task is left out has no ANP: it is left out of the percentiles (None if all are).
    """
    tasks = list(dict.fromkeys(t for merge in scored for t in merge))
    if not tasks or any(t not in expert for t in tasks):
        return None
    right = {t: np.asarray(expert[t]).astype(np.uint8) for t in tasks}  # (n_t,) one byte a row
    merges = [{t: np.asarray(v).astype(np.uint8) for t, v in merge.items()} for merge in scored]
    if any(right[t].size == 0 or v.shape != right[t].shape for m in merges for t, v in m.items()):
        return None

    def statistic(*rows: np.ndarray, axis: int = -1) -> np.ndarray:
        # rows[i]: resampled row indices of task i, (..., n_t); the result has shape (...)
        drawn = dict(zip(tasks, rows, strict=True))
        base = {t: right[t][drawn[t]].mean(axis=-1) for t in tasks}  # (...)
        anps = []
        for merge in merges:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = np.stack(
                    [
                        np.where(base[t] > 0, v[drawn[t]].mean(axis=-1) / base[t], np.nan)
                        for t, v in merge.items()
                    ]
                )  # (tasks of the merge, ...)
            anps.append(_nanmean(ratios))
        return _nanmean(np.stack(anps))

    with warnings.catch_warnings():  # NaN resamples (ANP undefined) are handled below
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(
            [np.arange(right[t].size) for t in tasks],
            statistic,
            n_resamples=resamples,
            batch=max(1, min(resamples, 2_000_000 // sum(right[t].size for t in tasks))),  # 16 MB of indices
            vectorized=True,
            paired=False,
            confidence_level=level,
            method=METHOD,
            rng=np.random.default_rng(seed),
        )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):  # some resamples drew no row any expert gets right: ANP undefined
        defined = result.bootstrap_distribution[~np.isnan(result.bootstrap_distribution)]
        if defined.size == 0:
            return None
        alpha = 100 * (1 - level) / 2  # the same percentiles, over the resamples where ANP is defined
        low, high = (float(v) for v in np.percentile(defined, [alpha, 100 - alpha]))
    return Interval(low, high, level, resamples, seed)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN where every value is NaN (without numpy's warning)."""
    count = (~np.isnan(values)).sum(axis=0)
    total = np.nansum(values, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
