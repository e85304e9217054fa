"""The static-merge registry: one entry per method, and the one place method names and options are checked.

Adding a static method is one file in this package plus one line in ``STATIC_METHODS``.
Use ``static_merge(method, base, task_vectors, **options)``; ``STATIC_METHODS`` lists the methods.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from divmerge.errors import DivMergeError
from divmerge.static.dare import DARE_REFERENCE, dare
from divmerge.static.iso import ISO_REFERENCE, iso_c, iso_cts
from divmerge.static.linear import AVERAGE_REFERENCE, TASK_ARITHMETIC_REFERENCE, average, task_arithmetic
from divmerge.static.ties import TIES_REFERENCE, ties
from divmerge.static.tsv import TSV_REFERENCE, tsv_m
from divmerge.static.wudi import WUDI_REFERENCE, wudi


@dataclass(frozen=True)
class StaticMethod:
    """A registered static merge method.

    ``fn`` validates its option values before it touches a tensor (``fn({}, {}, **options)`` merges
    nothing and checks the options alone), which is how ``check_method`` checks values.

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
        StaticMethod("average", average, AVERAGE_REFERENCE, ()),
        StaticMethod("task_arithmetic", task_arithmetic, TASK_ARITHMETIC_REFERENCE, ("lambda_",)),
        StaticMethod("ties", ties, TIES_REFERENCE, ("density", "lambda_")),
        StaticMethod("dare", dare, DARE_REFERENCE, ("p", "seed", "then", "lambda_", "density")),
        StaticMethod("tsv_m", tsv_m, TSV_REFERENCE, ("rank_fraction", "lambda_")),
        StaticMethod("iso_c", iso_c, ISO_REFERENCE, ("lambda_",)),
        StaticMethod("iso_cts", iso_cts, ISO_REFERENCE, ("common_fraction", "lambda_")),
        StaticMethod("wudi", wudi, WUDI_REFERENCE, ("iterations", "lr", "lambda_")),
    )
}


def _lookup(name: str, options: Mapping[str, object]) -> StaticMethod:
    """The registered method ``name``, after checking that it exists and takes every option named."""
    if name not in STATIC_METHODS:
        raise DivMergeError(f"Unknown static merge method {name!r}: use one of {list(STATIC_METHODS)}.")
    spec = STATIC_METHODS[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        hint = "; lambda is spelled lambda_" if "lambda" in unknown else ""
        valid = (
            f"use one of its options {list(spec.options)}" if spec.options else "it takes no options at all"
        )
        raise DivMergeError(
            f"Unknown option {unknown[0]!r} for static merge method {name!r} (it takes no option "
            f"{unknown[0]!r}{hint}): {valid}."
        )
    return spec


def check_method(name: str, options: Mapping[str, object]) -> None:
    """Validate a static method's name, option names and option values, without merging.

    The checks and messages are ``static_merge``'s, so a config can be checked before any model loads.

    Args:
        name: A key of ``STATIC_METHODS``.
        options: The method's options (see ``STATIC_METHODS[name].options``).

    Raises:
        DivMergeError: On an unknown method, an option the method does not take, or a bad option value.

    """
    _lookup(name, options).fn({}, {}, **options)  # no tensors: only the option values are checked


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

    Raises:
        DivMergeError: As ``check_method``, or on mismatched tensors.

    """
    return _lookup(method, options).fn(base, task_vectors, **options)
