"""Export formats: one writer per output format, each taking an ``ExportRequest``.

A writer returns the written path and a short note for the command's one-line output ("" for none).
Adding a format is one writer plus one entry in ``divmerge.export.FORMATS``; format-specific options
(``--lora_rank``...) travel in ``ExportRequest.options``.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from divmerge.core.merged_model import MergedModel
from divmerge.export.causal_lm import export_causal_lm
from divmerge.export.classifier import export_merged
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
        options: Format-specific options (e.g. ``lora_rank``), None where unset.
    """

    family: str
    merged: MergedModel
    params: Mapping[str, Tensor]
    base_source: str
    out_dir: str | Path
    summary: Mapping[str, Any]
    overwrite: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


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
