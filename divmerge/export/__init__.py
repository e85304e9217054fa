"""Export a merged model: a Hugging Face directory per model family, a LoRA adapter, or GGUF (``FORMATS``).

Adding a family's exporter is one file plus one entry in ``EXPORTERS`` (keyed by the family's name,
``ExpertSet.family``); adding an output format (``export --format``) is one file plus one entry in
``FORMATS``.
"""

from divmerge.export.causal_lm import export_causal_lm
from divmerge.export.classifier import export_merged, load_task_model
from divmerge.export.common import atomic_dir, check_target, read_export_info
from divmerge.export.formats import EXPORTERS, FORMATS, ExportFormat, ExportRequest
from divmerge.export.gguf_file import export_gguf
from divmerge.export.lora_adapter import export_lora
from divmerge.export.model_card import coefficient_stats

__all__ = [
    "EXPORTERS",
    "FORMATS",
    "ExportFormat",
    "ExportRequest",
    "atomic_dir",
    "check_target",
    "coefficient_stats",
    "export_causal_lm",
    "export_gguf",
    "export_lora",
    "export_merged",
    "load_task_model",
    "read_export_info",
]
