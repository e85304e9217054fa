"""``export --format``: one entry per output format, each a writer and an early check.

Adding a format is one writer (a file of its own) plus one entry in ``FORMATS``. Every writer has the
same signature and reads its own options from the parsed ``export`` arguments (e.g. ``--gguf_type``).
"""

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from divmerge.core.merged_model import MergedModel
from divmerge.export.causal_lm import export_causal_lm
from divmerge.export.classifier import export_merged
from divmerge.export.gguf_file import check_gguf, export_gguf

EXPORTERS: dict[str, Callable] = {"classification": export_merged, "causal_lm": export_causal_lm}
"""The Hugging Face export of each model family (keyed by ``ExpertSet.family``)."""


def _no_check(base_source: str, options: argparse.Namespace) -> None:
    """Formats every merge can take need no early check."""


@dataclass(frozen=True)
class ExportFormat:
    """One ``--format``.

    Attributes:
        write: ``write(family, merged, params, base_source, out_dir, summary, overwrite, options)`` ->
            the export's path; ``family`` is the expert family's name (``ExpertSet.family``).
        check: ``check(base_source, options)``: refuses bad input before the experts are loaded.
    """

    write: Callable[..., Path]
    check: Callable[[str, argparse.Namespace], None] = _no_check


def write_hf(
    family: str,
    merged: MergedModel,
    params: Mapping[str, Tensor],
    base_source: str,
    out_dir: str | Path,
    summary: Mapping[str, Any],
    overwrite: bool,
    options: argparse.Namespace,
) -> Path:
    """The Hugging Face directory of the family's exporter (``EXPORTERS``)."""
    return EXPORTERS[family](merged, params, base_source, out_dir, summary, overwrite=overwrite)


def write_gguf(
    family: str,
    merged: MergedModel,
    params: Mapping[str, Tensor],
    base_source: str,
    out_dir: str | Path,
    summary: Mapping[str, Any],
    overwrite: bool,
    options: argparse.Namespace,
) -> Path:
    """One GGUF file (``--gguf_type``) with an Ollama Modelfile and a model card."""
    return export_gguf(merged, params, base_source, out_dir, summary, overwrite, options.gguf_type, family)


FORMATS: dict[str, ExportFormat] = {
    "hf": ExportFormat(write_hf),
    "gguf": ExportFormat(write_gguf, lambda base, options: check_gguf(None, base, options.gguf_type)),
}
"""``--format`` name -> writer and early check; ``hf`` is the default."""
