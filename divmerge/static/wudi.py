"""WUDI merging: the merged task matrix solved by gradient descent on the task vectors alone.

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
Vectors", ICML 2025, arXiv 2503.08099. Follows the authors' code (github.com/nathanielyvo/WUDI-Merging,
``wudi_main.py``: ``get_redundant_task_vector``) and FusionBench's port (``fusion_bench/method/wudi``):
per matrix, Adam (lr 1e-5, no weight decay) for 300 iterations on
sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2 from tau_m = sum_t tau_t; every other tensor is the
mean of the task vectors (FusionBench); the result is added with scale 1 (here ``lambda_``).
"""

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from divmerge.errors import DivMergeError
from divmerge.static.common import check_lambda, check_tensors, is_real, matrix_merge

WUDI_ITERATIONS = 300  # Cheng et al.: 300 Adam iterations per matrix (authors' code and FusionBench).
WUDI_LR = 1e-5  # Cheng et al.: Adam learning rate 1e-5 (ViT code and FusionBench; their RoBERTa code: 2e-5).
WUDI_LAMBDA = 1.0  # Cheng et al.: the merged task vector is added as is (scaling_coef = 1, no rescaling).
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the authors' code uses
ADAM_EPS = 1e-8

WUDI_REFERENCE = (
    "Cheng et al., 'Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via "
    "Task Vectors', ICML 2025."
)


def check_iterations(iterations: object) -> int:
    """Return ``iterations`` as an int, or raise if it is not a positive integer.

    Args:
        iterations: The WUDI option.

    Returns:
        ``int(iterations)``.

    Raises:
        DivMergeError: If it is not an integer >= 1.

    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise DivMergeError(
            f"WUDI iterations must be an integer >= 1 (Adam steps per matrix), got {iterations!r}: "
            f"pass e.g. iterations={WUDI_ITERATIONS}."
        )
    return iterations


def check_lr(lr: object) -> float:
    """Return ``lr`` as a float, or raise if it is not a finite positive number.

    Args:
        lr: The WUDI option.

    Returns:
        ``float(lr)``.

    Raises:
        DivMergeError: If it is not a finite number > 0.

    """
    if not is_real(lr) or not math.isfinite(float(lr)) or float(lr) <= 0:
        raise DivMergeError(
            f"WUDI lr must be a finite number > 0 (Adam's learning rate, in weight units), got {lr!r}: "
            f"pass e.g. lr={WUDI_LR}."
        )
    return float(lr)


def wudi_delta(tau: Tensor, iterations: int = WUDI_ITERATIONS, lr: float = WUDI_LR) -> Tensor:
    """WUDI's merged task matrix before scaling: Adam on the interference loss from the sum.

    The loss L(M) = sum_t w_t ||(M - tau_t) tau_t^T||_F^2, w_t = 1 / ||tau_t||_F^2, is quadratic: with
    M = S + D (S = sum_t tau_t, the start), its gradient is G0 + 2 D A, where
    G0 = 2 sum_t w_t (S - tau_t) tau_t^T tau_t (m, n) and A = sum_t w_t tau_t^T tau_t (n, n) are fixed.
    Both are computed once, so an iteration costs one (m, n) x (n, n) product instead of the authors'
    T products (m, n) x (n, m) and their backward pass; when 2 T m < n, A is used in its factored form
    C^T C (C = [sqrt(w_t) tau_t], (T m, n)), which is cheaper. Iterating on D from 0 (rather than on M)
    keeps exact zeros exact: where the start already has no interference (one task; task matrices with
    disjoint input coordinates) the gradient is exactly 0 and Adam leaves M at S, rather than
    normalising rounding noise into steps of size lr. Adam's update is ``torch.optim.Adam``'s (betas
    0.9, 0.999, eps 1e-8), written out. Rows that every task leaves at zero (embedding rows of unseen
    tokens) have zero gradient and stay zero, so only the others are optimised. A zero task matrix adds
    no term (its weight 1 / 0 is taken as 0; the authors' code gives NaN).

    Args:
        tau: Task matrices of one tensor in float32, (T, m, n).
        iterations: Adam steps.
        lr: Adam's learning rate.

    Returns:
        The merged task matrix, (m, n).

    """
    with torch.no_grad():
        num_tasks, m, n = tau.shape
        rows = tau.ne(0).any(dim=2).any(dim=0).nonzero().squeeze(1)  # (r,): rows some task changed
        out = torch.zeros(m, n, dtype=tau.dtype, device=tau.device)
        if rows.numel() == 0:
            return out
        tau = tau[:, rows] if rows.numel() < m else tau  # (T, r, n)
        norms2 = tau.square().sum(dim=(1, 2))  # (T,): ||tau_t||_F^2
        weights = torch.where(norms2 > 0, 1.0 / norms2, torch.zeros_like(norms2))  # (T,)
        start = tau.sum(dim=0)  # (r, n): the paper's start S, task arithmetic with lambda 1
        factored = 2 * num_tasks * tau.shape[1] < n
        grad0 = torch.zeros_like(start)  # (r, n): G0 / 2
        hessian = None if factored else tau.new_zeros(n, n)  # (n, n): A
        for t in range(num_tasks):
            if factored:
                grad0.add_(((start - tau[t]) @ tau[t].T) @ tau[t], alpha=float(weights[t]))  # (r, n)
            else:
                gram = tau[t].T @ tau[t]  # (n, n): tau_t^T tau_t
                grad0.add_((start - tau[t]) @ gram, alpha=float(weights[t]))  # (r, n)
                hessian.add_(gram, alpha=float(weights[t]))
        factor = (tau * weights.sqrt()[:, None, None]).reshape(-1, n) if factored else None  # (T r, n): C
        delta = torch.zeros_like(start)  # (r, n): D = M - S
        exp_avg, exp_avg_sq = torch.zeros_like(start), torch.zeros_like(start)  # (r, n) each
        beta1, beta2 = ADAM_BETAS
        for step in range(1, iterations + 1):
            grad = (delta @ factor.T) @ factor if factored else delta @ hessian  # (r, n): D A
            grad.add_(grad0).mul_(2.0)  # (r, n): dL/dM = G0 + 2 D A
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(ADAM_EPS)  # (r, n)
            delta.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        out[rows] = start.add_(delta)  # (r, n): M = S + D
        return out


def wudi(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    iterations: int = WUDI_ITERATIONS,
    lr: float = WUDI_LR,
    lambda_: float = WUDI_LAMBDA,
) -> dict[str, Tensor]:
    """WUDI merging: per matrix, the task vector whose interference on every task's inputs is least.

    Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via
    Task Vectors", ICML 2025, arXiv 2503.08099.

    A linear layer's task matrix tau_t (out, in) is, after fine-tuning with small steps, close to a
    combination of the inputs it saw: its rows span the task's input subspace. The interference of a
    merged matrix tau_m on task t's inputs x is (tau_m - tau_t) x; with the rows of tau_t standing in for
    x, WUDI minimises sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2 by Adam (lr 1e-5, 300 steps)
    from tau_m = sum_t tau_t (task arithmetic with lambda 1), and uses the result with scale 1:
    merged = theta_0 + lambda * tau_m. This is exactly the authors' loss, normalisation, start, optimiser
    and defaults; the gradient is computed in closed form (see ``wudi_delta``), not by autograd.

    Deviations, and why: (1) which tensors. The authors' ViT code optimises only attention and MLP
    weights (the other tensors keep their pretrained values), FusionBench every 2-D tensor and the mean
    for the rest; here, as FusionBench and this package's SVD merges, every 2-D tensor is a matrix (one
    layout for all: rows are outputs, as ``nn.Linear``; a GPT-2 ``Conv1D`` or an embedding, stored
    (in, out), is optimised as stored, as FusionBench does) and every other tensor (biases, norms,
    convolutions) gets the mean of the task vectors, then lambda. Embedding rows that no task changed
    stay unchanged (their gradient is zero). (2) A zero task matrix (a frozen layer) adds no loss term
    instead of a division by zero.

    Adam moves each entry by about ``lr`` per step whatever the gradient's size (its step is
    normalised), so the defaults assume task vectors of fine-tuning size (the demo zoo's MiniLM experts:
    mean |tau| ~1.5e-3): after 300 steps an entry has moved by about 3e-3 at most from the sum. With
    much larger task vectors the result stays near the sum (task arithmetic with lambda 1); raise ``lr``
    or ``iterations`` there.

    Cost: per matrix (m, n), T Gram products once, then ``iterations`` products (m, n) x (n, n) (or
    two thinner ones when 2 T m < n); memory about 8 (m, n) copies plus an (n, n) matrix. Deterministic.

    Args:
        base: theta_0 per tensor, (*shape).
        task_vectors: tau per tensor, stacked over experts, (T, *shape).
        iterations: Adam steps per matrix, >= 1 (default 300, the paper's).
        lr: Adam's learning rate, > 0 (default 1e-5: the authors' ViT code and FusionBench; the
            authors' RoBERTa code uses 2e-5).
        lambda_: Scaling of the merged task vector (default 1.0: the paper adds it without rescaling).

    Returns:
        Merged tensors, (*shape), in base's dtype.

    Raises:
        DivMergeError: On a bad option value, mismatched tensors, or a non-finite task matrix.

    """
    steps = check_iterations(iterations)
    rate = check_lr(lr)
    lam = check_lambda(lambda_)
    check_tensors(base, task_vectors)
    return matrix_merge(base, task_vectors, lam, lambda tau: wudi_delta(tau, steps, rate))
