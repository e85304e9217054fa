"""Divergence objectives between an expert's and the merged model's output distributions.

Pure functions on log-probabilities / logits, numerically stable in log space, returning one value
per example (the caller averages). Registry ``OBJECTIVES`` maps config names to functions.

References:
    DivMerge: Touayouch, Fosse, Damnati, Lecorvé, "DivMerge: A divergence-based model merging method
    for multi-tasking", arXiv 2509.02108 (EACL 2026) — Jensen-Shannon objective (default).
    AdaMerging: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024 —
    entropy objective.

"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from divmerge.errors import DivMergeError

LN2 = math.log(2.0)

Objective = Callable[[Tensor, Tensor], Tensor]


def _kl_from_log(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim from log-probabilities; terms with p = 0 contribute 0."""
    p = log_p.exp()
    # (B, C) -> (B,); where p == 0 the product is 0 even if log_q is -inf.
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def js_divergence(teacher_logprobs: Tensor, student_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence between expert and merged distributions (DivMerge, arXiv 2509.02108).

    JS(P, Q) = 1/2 KL(P || M) + 1/2 KL(Q || M) with M = (P + Q) / 2; symmetric and bounded by ln 2.

    Args:
        teacher_logprobs: Expert log-probabilities, shape (B, C).
        student_logits: Merged-model logits, shape (B, C).

    Returns:
        Per-example divergence in nats, shape (B,).

    """
    log_p = torch.log_softmax(teacher_logprobs.float(), dim=-1)  # renormalise: (B, C)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)  # (B, C)
    log_m = torch.logaddexp(log_p, log_q) - LN2  # log((p + q) / 2): (B, C)
    return 0.5 * (_kl_from_log(log_p, log_m) + _kl_from_log(log_q, log_m))


def kl_divergence(teacher_logprobs: Tensor, student_logits: Tensor) -> Tensor:
    """Forward KL(expert || merged), the distillation divergence (DivMerge's KL variant).

    Args:
        teacher_logprobs: Expert log-probabilities, shape (B, C).
        student_logits: Merged-model logits, shape (B, C).

    Returns:
        Per-example divergence in nats, shape (B,).

    """
    log_p = torch.log_softmax(teacher_logprobs.float(), dim=-1)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    return _kl_from_log(log_p, log_q)


def entropy(teacher_logprobs: Tensor, student_logits: Tensor) -> Tensor:
    """Shannon entropy of the merged model's prediction (AdaMerging, Yang et al., ICLR 2024).

    The expert is ignored: AdaMerging uses entropy as an unsupervised surrogate loss.

    Args:
        teacher_logprobs: Unused; kept so every objective has one signature.
        student_logits: Merged-model logits, shape (B, C).

    Returns:
        Per-example entropy in nats, shape (B,).

    """
    del teacher_logprobs
    log_q = torch.log_softmax(student_logits.float(), dim=-1)  # (B, C)
    return -(log_q.exp() * log_q).sum(-1)


OBJECTIVES: dict[str, Objective] = {"js": js_divergence, "kl": kl_divergence, "entropy": entropy}


def get_objective(name: str) -> Objective:
    """Look up an objective by its config name.

    Args:
        name: One of ``OBJECTIVES``' keys.

    Returns:
        The objective function.

    """
    if name not in OBJECTIVES:
        raise DivMergeError(f"Unknown objective {name!r}: use one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]
