"""Linear merges: weight averaging and task arithmetic.

Averaging: Wortsman et al., model soups, ICML 2022, arXiv 2203.05482. Task arithmetic: Ilharco et al.,
ICLR 2023, arXiv 2212.04089.

``task_arithmetic`` is a plain sum rather than peft's ``task_arithmetic``, which re-stacks its input
list and materialises a weighted (T, *shape) copy.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from divmerge.static.common import check_lambda, check_tensors, merged_tensor

TA_LAMBDA = 0.3  # Ilharco et al. 2023 pick lambda on validation data; 0.3 is their usual optimum.

AVERAGE_REFERENCE = (
    "Wortsman et al., 'Model soups: averaging weights of multiple fine-tuned models improves "
    "accuracy without increasing inference time', ICML 2022."
)
TASK_ARITHMETIC_REFERENCE = "Ilharco et al., 'Editing Models with Task Arithmetic', ICLR 2023."


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
    check_tensors(base, task_vectors)
    return {
        name: merged_tensor(theta0, task_vectors[name].to(torch.float32).mean(dim=0))  # (*shape)
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
    check_tensors(base, task_vectors)
    lam = check_lambda(lambda_)
    return {
        name: merged_tensor(theta0, task_vectors[name].to(torch.float32).sum(dim=0), lam)  # (*shape)
        for name, theta0 in base.items()
    }
