"""One home per model family, and the registry that picks one for a set of experts.

Adding a family is one file (a :class:`~divmerge.families.base.ModelFamily` subclass) plus one entry in
``FAMILIES``. Detection asks the families in order; the last entry claims whatever no other family does.
"""

from collections.abc import Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh

from divmerge.core.expert_set import ExpertSet
from divmerge.experts.loading import load_expert_set
from divmerge.families.base import ModelFamily
from divmerge.families.causal_lm import CausalLM
from divmerge.families.classification import Classification

FAMILIES: dict[str, type[ModelFamily]] = {"causal_lm": CausalLM, "classification": Classification}


def detect_family(experts: Mapping[str, str]) -> type[ModelFamily]:
    """The family of an expert set: the first in ``FAMILIES`` that claims any of its experts.

    Args:
        experts: Task name -> expert source.

    Returns:
        The family class (a mixed set goes to the family that claims one of them, which then refuses
        the others with a clear message).
    """
    for family in FAMILIES.values():
        if any(family.detect(source) for source in experts.values()):
            return family
    return Classification


def load_experts(
    base: str,
    experts: Mapping[str, str],
    held_out: Mapping[str, str] | None = None,
    task_vector_dtype: torch.dtype | None = None,
    family: ModelFamily | None = None,
    mesh: DeviceMesh | None = None,
) -> ExpertSet:
    """Load base and experts with the loader loop, under the experts' own (or the given) family.

    Args:
        base: Source of the pretrained base model.
        experts: Task name -> expert source (a full fine-tune or a LoRA adapter), in task order.
        held_out: Task name -> classifier whose head scores a held-out task (classification only).
        task_vector_dtype: Storage dtype of the stacked task vectors (None: the base's).
        family: The family to load with; None detects it from the experts.
        mesh: Ranks that shard the base and task vectors: each reads only its share where it can
            (``divmerge.experts.loading.load_expert_set``); a collective then.

    Returns:
        The expert set (``family`` records the family's name).
    """
    family = family or detect_family(experts)()
    return load_expert_set(family, base, experts, held_out, task_vector_dtype, mesh)
