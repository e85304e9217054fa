"""The static-merge registry: one entry per method, and the one place method options are validated.

Adding a static method is one file in this package plus one entry in ``STATIC_METHODS``.
Use ``static_merge(method, base, task_vectors, **options)``.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from divmerge.errors import DivMergeError
from divmerge.static.dare import dare
from divmerge.static.linear import average, task_arithmetic
from divmerge.static.ties import ties


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


def check_method(method: str, options: Mapping[str, object]) -> None:
    """Validate a static method's name, option names and option values, without merging.

    Args:
        method: A key of ``STATIC_METHODS``.
        options: The method's options.
    """
    if method not in STATIC_METHODS:
        raise DivMergeError(f"Unknown static merge method {method!r}: use one of {list(STATIC_METHODS)}.")
    spec = STATIC_METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        hint = "; lambda is spelled lambda_" if "lambda" in unknown else ""
        valid = (
            f"use one of its options {list(spec.options)}" if spec.options else "it takes no options at all"
        )
        raise DivMergeError(
            f"Unknown option {unknown[0]!r} for static merge method {method!r} (it takes no option "
            f"{unknown[0]!r}{hint}): {valid}."
        )
    spec.fn({}, {}, **options)  # no tensors: only the option values are checked


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
    check_method(method, options)
    return STATIC_METHODS[method].fn(base, task_vectors, **options)
