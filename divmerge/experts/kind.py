"""What the loaders need to know of a model family: the ``ExpertKind`` protocol.

Both loaders read it: the whole-expert loop (:mod:`divmerge.experts.loading`) and sharded loading
(:mod:`divmerge.experts.sharded_loading`); ``divmerge.families.base.ModelFamily`` implements it.
"""

from collections.abc import Mapping, Sequence
from typing import Protocol

from torch import Tensor
from transformers import PreTrainedModel

from divmerge.experts.adapters import AdapterTaskType


class ExpertKind(Protocol):
    """What the loader loop needs to know of a model family.

    Attributes:
        name: The family's name (recorded in ``ExpertSet.family``).
        base_class: transformers auto class of the base (the part that is merged).
        expert_class: transformers auto class of a full expert.
        adapter_task_type: peft task type of its adapter experts.
        digest_tag: Tag of a merged expert in the fingerprint (kept stable: checkpoints record it).
        complete_experts: Refuse a full expert that lacks some of its weights (e.g. no trained head).
    """

    name: str
    base_class: type
    expert_class: type
    adapter_task_type: AdapterTaskType
    digest_tag: str
    complete_experts: bool

    def check_sources(self, base: str, experts: Mapping[str, str], held_out: Mapping[str, str]) -> None:
        """Refuse sources this family cannot merge, before anything heavy is loaded."""
        ...

    def extend_base(self, base: PreTrainedModel) -> None:
        """Grow the loaded base in place before task vectors are taken (e.g. added vocabulary rows)."""
        ...

    def split(
        self, task: str, model: PreTrainedModel, base: PreTrainedModel, theta0: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(merged tensors by base name, the expert's own unmerged tensors by full name), checked."""
        ...

    def complete(
        self,
        task_names: Sequence[str],
        full: Sequence[int],
        theta0: Mapping[str, Tensor],
        stacked: Mapping[str, Tensor],
    ) -> None:
        """Adjust base and stacked task vectors in place once every expert is loaded."""
        ...

    def prefix(self, model: PreTrainedModel) -> str:
        """Attribute path of the merged part inside an expert ('' when the whole model is merged)."""
        ...

    def num_outputs(self, model: PreTrainedModel) -> int:
        """Size of an expert's output (classes, or vocabulary)."""
        ...

    def to_skeleton(self, model: PreTrainedModel) -> None:
        """Turn a loaded expert into forward code on the meta device, in place."""
        ...

    def sharded_refusal(self) -> str | None:
        """Why these experts cannot be read in column shards (after ``check_sources``); None if they can."""
        ...
