"""Merge-method names, parsed by the registries that own their parts.

A name is a static merge (a key of ``divmerge.static.STATIC_METHODS``, default options) or a learned
one, ``<objective>-<space>[@<static>]``: an objective of ``divmerge.objectives.OBJECTIVES``, a coefficient
space as ``divmerge.core.coefficients.parse_space`` reads it (``layer``, ``svd8``: rank 8), and optionally
the static merge the coefficients start from (``js-svd8@tsv_m``). The benchmarks and any other caller
ask here instead of parsing names themselves.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from divmerge.core.coefficients import GRANULARITIES, parse_space
from divmerge.errors import DivMergeError
from divmerge.objectives import OBJECTIVES
from divmerge.static import STATIC_METHODS

START_SEP = "@"  # ``<learned>@<static>``: learn coefficients around that static merge


@dataclass(frozen=True)
class MethodName:
    """A parsed merge-method name.

    Attributes:
        name: The name as written.
        static: The static method (a training-free merge), or None for a learned one.
        objective: The learned method's objective, or None for a static one.
        granularity: The learned method's coefficient space, or None for a static one.
        space_options: The space's options (``svd<r>``: ``rank``).
        start_from: The static merge a learned method starts from (``@<static>``), or None.

    """

    name: str
    static: str | None = None
    objective: str | None = None
    granularity: str | None = None
    space_options: dict[str, int] = field(default_factory=dict)
    start_from: str | None = None

    @property
    def learned(self) -> str:
        """The learned part without its start: ``js-svd8@tsv_m`` -> ``js-svd8``."""
        return self.name.partition(START_SEP)[0]


def method_names(objectives: Iterable[str] = ()) -> list[str]:
    """Every static method, then ``<objective>-<space>`` for every objective and space.

    Args:
        objectives: Objective names accepted beside ``OBJECTIVES`` (a caller's own, e.g. a diagnostic).

    Returns:
        The names (``svd<r>`` and ``@<static>`` forms are accepted too but not listed).
    """
    every = [*OBJECTIVES, *objectives]
    return list(STATIC_METHODS) + [f"{o}-{g}" for o in every for g in GRANULARITIES]


def parse_method(name: str, objectives: Sequence[str] = ()) -> MethodName:
    """Parse a method name against the static, objective and coefficient-space registries.

    Args:
        name: ``<static>`` or ``<objective>-<space>[@<static>]`` (e.g. ``ties``, ``js-layer``,
            ``js-svd8@tsv_m``).
        objectives: Objective names accepted beside ``OBJECTIVES``.

    Returns:
        The parsed name.

    Raises:
        DivMergeError: For a name no registry knows, in one line naming the valid ones.
    """
    if name in STATIC_METHODS:
        return MethodName(name, static=name)
    learned, sep, start = name.partition(START_SEP)
    objective, dash, space = learned.rpartition("-")
    if not dash or objective not in (*OBJECTIVES, *objectives) or (sep and start not in STATIC_METHODS):
        raise DivMergeError(
            f"Unknown method {name!r}: use one of {method_names(objectives)} (svd<r> for rank r; "
            f"@<static> to start from that static merge)."
        )
    try:
        granularity, options = parse_space(space)
    except DivMergeError:
        raise DivMergeError(
            f"Unknown method {name!r}: its space {space!r} is not one of {list(GRANULARITIES)} (svd<r> for "
            "rank r >= 1)."
        ) from None
    return MethodName(name, None, objective, granularity, options, start or None)
