"""``export --format``: one entry per output format, each a writer and an early check.

A writer takes an ``ExportRequest`` and returns the written path and a short note for the command's
one-line output ("" for none); a check refuses bad input before the experts load. Adding a format is one
writer (a file of its own) plus one entry in ``FORMATS``; format-specific options (``--lora_rank``,
``--gguf_type``) travel in ``ExportRequest.options``.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from divmerge.core.merged_model import MergedModel
from divmerge.export.causal_lm import export_causal_lm
from divmerge.export.classifier import export_merged
from divmerge.export.gguf_file import check_gguf, export_gguf
from divmerge.export.lora_adapter import export_lora

EXPORTERS: dict[str, Callable] = {"classification": export_merged, "causal_lm": export_causal_lm}
"""The Hugging Face (dense) exporter of each model family, keyed by ``ExpertSet.family``."""


@dataclass(frozen=True)
class ExportRequest:
    """Everything an export format's writer may read.

    Attributes:
        family: The experts' model family (``classification``, ``causal_lm``).
        merged: The merged model.
        params: Its merged tensors (``merged_params``: LoRA modules as factors).
        base_source: The base model's source.
        out_dir: Target path.
        summary: Method, experts, coefficient statistics...
        overwrite: Replace a non-empty target.
        options: Format-specific options (``lora_rank``, ``gguf_type``), None where unset.
    """

    family: str
    merged: MergedModel
    params: Mapping[str, Tensor]
    base_source: str
    out_dir: str | Path
    summary: Mapping[str, Any]
    overwrite: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


def _no_check(base_source: str, options: Mapping[str, Any]) -> None:
    """Formats every merge can take need no early check."""


@dataclass(frozen=True)
class ExportFormat:
    """One ``--format``.

    Attributes:
        write: ``write(request) -> (path, note)``.
        check: ``check(base_source, options)``: refuses bad input before the experts are loaded.
    """

    write: Callable[[ExportRequest], tuple[Path, str]]
    check: Callable[[str, Mapping[str, Any]], None] = _no_check


def write_hf(request: ExportRequest) -> tuple[Path, str]:
    """The dense Hugging Face export of the request's family (``EXPORTERS``)."""
    export = EXPORTERS[request.family]  # e.g. causal LMs have no heads
    r = request
    return export(r.merged, r.params, r.base_source, r.out_dir, r.summary, overwrite=r.overwrite), ""


def write_lora(request: ExportRequest) -> tuple[Path, str]:
    """One peft LoRA adapter (``divmerge.export.lora_adapter``), at ``options["lora_rank"]`` if set."""
    r = request
    rank = r.options.get("lora_rank")
    return export_lora(r.merged, r.params, r.base_source, r.out_dir, r.summary, r.overwrite, rank=rank)


def write_gguf(request: ExportRequest) -> tuple[Path, str]:
    """One GGUF file (``options["gguf_type"]``) with an Ollama Modelfile and a model card."""
    r = request
    gguf_type = r.options["gguf_type"]
    out = export_gguf(
        r.merged, r.params, r.base_source, r.out_dir, r.summary, r.overwrite, gguf_type, r.family
    )
    return out, f"GGUF, {gguf_type}"


FORMATS: dict[str, ExportFormat] = {
    "hf": ExportFormat(write_hf),
    "lora": ExportFormat(write_lora),
    "gguf": ExportFormat(write_gguf, lambda base, options: check_gguf(None, base, options["gguf_type"])),
}
"""``--format`` name -> writer and early check; ``hf`` is the default."""
