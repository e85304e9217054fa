"""The class names an expert declares: its config.json ``id2label``, when it names real classes."""

import re

from transformers import AutoConfig

from divmerge.errors import DivMergeError
from divmerge.experts.sources import resolve_source

_PLACEHOLDER = re.compile(r"LABEL_\d+")


def expert_class_names(source: str) -> tuple[list[str], str] | None:
    """Class names in the expert's class order, read from its config (no weights are loaded).

    Args:
        source: The expert's source (a local directory or a hub id).

    Returns:
        (names, where they come from), or None when the expert has no config, no ``id2label``, gaps in
        its ids, or only transformers' placeholders (``LABEL_0``, ``LABEL_1``...).

    """
    try:
        id2label = AutoConfig.from_pretrained(resolve_source(source)).id2label or {}
    except (DivMergeError, OSError, ValueError, KeyError):  # no config (e.g. an adapter) or a foreign one
        return None
    labels = {int(k): str(v) for k, v in id2label.items()}
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        return None
    names = [labels[i] for i in range(len(labels))]
    if all(_PLACEHOLDER.fullmatch(n) for n in names):
        return None
    return names, f"{source}/config.json (id2label)"
