"""Export a merged model as plain Hugging Face files: one exporter per model family.

Adding a family's exporter is one file plus one entry in ``EXPORTERS`` (keyed by the family's name,
``ExpertSet.family``).
"""

from collections.abc import Callable

from divmerge.export.causal_lm import export_causal_lm
from divmerge.export.classifier import export_merged, load_task_model
from divmerge.export.common import atomic_dir, check_target, read_export_info
from divmerge.export.model_card import coefficient_stats

EXPORTERS: dict[str, Callable] = {"classification": export_merged, "causal_lm": export_causal_lm}

__all__ = [
    "EXPORTERS",
    "atomic_dir",
    "check_target",
    "coefficient_stats",
    "export_causal_lm",
    "export_merged",
    "load_task_model",
    "read_export_info",
]
