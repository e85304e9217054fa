"""Export a merged model: plain Hugging Face files (one exporter per model family) or a LoRA adapter.

Adding a family's exporter is one file plus one entry in ``EXPORTERS`` (keyed by the family's name,
``ExpertSet.family``); adding an output format is one writer plus one entry in ``FORMATS``.
"""

from collections.abc import Callable

from divmerge.export.causal_lm import export_causal_lm
from divmerge.export.classifier import export_merged, load_task_model
from divmerge.export.common import atomic_dir, check_target, read_export_info
from divmerge.export.formats import EXPORTERS, ExportRequest, write_hf, write_lora
from divmerge.export.lora_adapter import export_lora
from divmerge.export.model_card import coefficient_stats

FORMATS: dict[str, Callable[[ExportRequest], tuple]] = {"hf": write_hf, "lora": write_lora}
"""Output format (``export --format``) -> writer: returns (the written path, a note for the output line)."""

__all__ = [
    "EXPORTERS",
    "FORMATS",
    "ExportRequest",
    "atomic_dir",
    "check_target",
    "coefficient_stats",
    "export_causal_lm",
    "export_lora",
    "export_merged",
    "load_task_model",
    "read_export_info",
]
