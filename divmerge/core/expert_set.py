"""A base model and T experts reduced to what merging needs: names, base tensors, stacked task vectors.

Task vectors tau_t = theta_t - theta_0 are stacked per tensor, shape (T, *shape), so a merge is one
weighted sum per tensor. The expert modules themselves are kept on the ``meta`` device (no memory):
they only provide the forward code for ``torch.func.functional_call``.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from divmerge.core.lora import LoraStack
from divmerge.errors import DivMergeError


@dataclass
class ExpertSet:
    """A base model and T experts, reduced to what merging needs.

    Attributes:
        task_names: Expert (task) names, in order; index t everywhere below.
        names: Backbone tensor names that are merged (relative to the backbone).
        base: theta_0 per merged tensor.
        task_vectors: tau per merged tensor, stacked over tasks: (T, *shape); when some experts are LoRA
            adapters, only over the tasks ``dense_rows[name]`` (their all-zero rows are not stored).
        buffers: The base backbone's buffers (position ids, ...), shared by every task.
        heads: Per task, the expert's own (unmerged) tensors, by full name.
        skeletons: Per task, the expert's module on the meta device (forward code only).
        prefix: The backbone's attribute name inside an expert (``bert`` for BERT).
        num_labels: Per task, the size of the expert's output.
        fingerprint: Hash of names, shapes and sampled content of base and experts.
        task_digests: Per task, the same hash for base + that expert alone (keys its teacher cache).
        held_out: Held-out tasks: evaluated with their own head on the merged backbone, not merged;
            their heads, skeletons, num_labels and digests follow the experts' in those lists.
        sources: Where base and experts were loaded from.
        dense_rows: The task of each row of ``task_vectors[name]``; empty when every expert is a full
            fine-tune (rows are then the T tasks in order).
        lora: Per backbone module with plain LoRA adapters, their factors stacked along the rank
            (``divmerge.lora``); that module's ``weight`` coefficients scale them.
        family: Name of the model family that loaded the set (``divmerge.families``), e.g.
            ``classification`` or ``causal_lm`` (every weight merged, ``prefix`` empty, no heads,
            ``num_labels`` the vocabulary size).
        shapes: Each merged tensor's shape, where ``base`` and ``task_vectors`` hold flat shards of them
            (sharded loading, ``divmerge.experts.sharded_loading``); empty when they are whole.

    """

    task_names: list[str]
    names: list[str]
    base: dict[str, Tensor]
    task_vectors: dict[str, Tensor]
    buffers: dict[str, Tensor]
    heads: list[dict[str, Tensor]]
    skeletons: list[nn.Module]
    prefix: str
    num_labels: list[int]
    fingerprint: str
    task_digests: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    dense_rows: dict[str, list[int]] = field(default_factory=dict)
    lora: dict[str, LoraStack] = field(default_factory=dict)
    family: str = "classification"
    shapes: dict[str, torch.Size] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        """Number of experts T."""
        return len(self.task_names)

    @property
    def all_tasks(self) -> list[str]:
        """Merged tasks, then held-out tasks: the index order of heads, skeletons and num_labels."""
        return [*self.task_names, *self.held_out]

    def subset(self, tasks: Sequence[str]) -> "ExpertSet":
        """The same base with only ``tasks``' experts (task vectors sliced, in the given order).

        Args:
            tasks: Task names, a subset of ``task_names``.

        Returns:
            A new ExpertSet; the fingerprint covers the subset.
        """
        unknown = [t for t in tasks if t not in self.task_names]
        if unknown or not tasks:
            raise DivMergeError(
                f"Tasks {unknown or list(tasks)} are not a non-empty subset of {self.task_names}."
            )
        idx = [self.task_names.index(t) for t in tasks]
        digest = hashlib.sha256("|".join(self.task_digests[i] for i in idx).encode()).hexdigest()[:16]
        task_vectors, dense_rows = {}, {}
        for n, tau in self.task_vectors.items():
            if n not in self.dense_rows:
                task_vectors[n] = tau[idx]  # (k, *shape)
                continue
            kept = [(i, self.dense_rows[n].index(t)) for i, t in enumerate(idx) if t in self.dense_rows[n]]
            task_vectors[n] = tau[[row for _, row in kept]]  # (k', *shape)
            dense_rows[n] = [i for i, _ in kept]
        lora = {m: kept for m, stack in self.lora.items() if (kept := stack.select(idx)) is not None}
        return ExpertSet(
            task_names=list(tasks),
            names=list(self.names),
            base=self.base,
            task_vectors=task_vectors,
            buffers=self.buffers,
            heads=[self.heads[i] for i in idx],
            skeletons=[self.skeletons[i] for i in idx],
            prefix=self.prefix,
            num_labels=[self.num_labels[i] for i in idx],
            fingerprint=digest,
            task_digests=[self.task_digests[i] for i in idx],
            sources={"base": self.sources.get("base", ""), **{t: self.sources.get(t, "") for t in tasks}},
            dense_rows=dense_rows,
            lora=lora,
            family=self.family,
            shapes=self.shapes,
        )
