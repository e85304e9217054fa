"""The model-family interface: everything that differs between, say, classifiers and causal LMs.

A family says how its experts load (the :class:`~divmerge.experts.kind.ExpertKind` rules), what an
expert's cached output is (the teacher), how the merged model's divergence to it is computed on a
batch (the task loss), and how an evaluation batch is scored (the metric). The engine
(``divmerge.engine``) holds one family object and never asks which family it is.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from divmerge.core.merged_model import MergedModel
from divmerge.data import Rows, TaskSpec
from divmerge.experts.adapters import AdapterTaskType
from divmerge.objectives import Objective
from divmerge.teachers import join_rows

Teacher = Tensor | dict[str, Tensor]
"""A task split's cached expert outputs: log-probabilities (N, C), or a dict of per-example tensors."""


ROWS = "_rows"
"""Suffix of a task's per-row correctness metrics: ``expert_rows``, ``merged_rows``, ``reference_rows``."""


class RowCorrectness(Metric):
    """Each evaluated row's 0/1 correctness, kept by row index and gathered from every process.

    One byte and one index per row. Under DDP each process scores its share of a split (each row once,
    ``UnrepeatedDistributedSampler``); ``compute`` concatenates every process's rows and orders them by
    index, so the result does not depend on how the rows were shared. Feeds the bootstrap intervals
    (``divmerge.intervals``).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("idx", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, correct: Tensor, idx: Tensor) -> None:
        """Add a batch: ``correct`` (B,) 0/1 scores or bools, ``idx`` (B,) the rows' indices in the split."""
        self.idx.append(idx.detach().to(self.device, torch.int64).reshape(-1))
        self.correct.append((correct.detach().to(self.device).reshape(-1) > 0.5).to(torch.uint8))

    def compute(self) -> Tensor:
        """The rows' correctness (N,) uint8, in row-index order."""
        if isinstance(self.idx, list) and not self.idx:  # never updated (synced states are tensors)
            return torch.zeros(0, dtype=torch.uint8)
        idx, correct = dim_zero_cat(self.idx), dim_zero_cat(self.correct)
        return correct[idx.argsort()].to(torch.uint8).cpu()


def record_rows(metrics: Mapping[str, Metric], name: str, correct: Tensor, idx: Tensor) -> None:
    """Add a batch's per-row correctness of ``name`` (expert, merged, reference) where it is kept.

    Args:
        metrics: A task's metrics; ``<name>_rows`` (a :class:`RowCorrectness`) where rows are kept.
        name: ``expert``, ``merged`` or ``reference``.
        correct: 0/1 per row (B,).
        idx: The rows' indices in the split (B,).
    """
    if name + ROWS in metrics:
        metrics[name + ROWS].update(correct, idx)


class ModelFamily(ABC):
    """One model family: loading rules, teacher, task loss and metric.

    Class attributes (the loading rules read by ``divmerge.experts.loading.load_expert_set``):
        name: Registry name, recorded in ``ExpertSet.family`` and used to pick an exporter.
        task_kind: The ``TaskSpec.kind`` of the tasks this family serves.
        base_class / expert_class: transformers auto classes of the base and of a full expert.
        adapter_task_type: peft task type of its adapter experts.
        digest_tag: Tag of a merged expert in the fingerprint (stable: checkpoints record it).
        complete_experts: Refuse a full expert that lacks some of its weights (e.g. no trained head).
        divergence_splits: Splits whose cached teachers hold output distributions, so the training
            divergence can be measured on them (``val``: the held-out, label-free selection signal).
    """

    name: ClassVar[str]
    task_kind: ClassVar[str]
    base_class: ClassVar[type]
    expert_class: ClassVar[type]
    adapter_task_type: ClassVar[AdapterTaskType]
    digest_tag: ClassVar[str]
    complete_experts: ClassVar[bool] = False
    divergence_splits: ClassVar[tuple[str, ...]] = ("unlabelled",)

    tokenizer: PreTrainedTokenizerBase | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ModelFamily":
        """Build the family from the run's family settings (``max_new_tokens``, ...); default: none used."""
        return cls()

    # ------------------------------------------------------------------ detection and loading
    @staticmethod
    @abstractmethod
    def detect(source: str) -> bool:
        """Whether an expert source (directory, hub id, adapter) belongs to this family."""

    def check_sources(self, base: str, experts: Mapping[str, str], held_out: Mapping[str, str]) -> None:  # noqa: B027 (optional hook)
        """Refuse sources this family cannot merge, before anything heavy is loaded (default: none)."""

    def extend_base(self, base: PreTrainedModel) -> None:  # noqa: B027 (optional hook)
        """Grow the loaded base in place before task vectors are taken (default: nothing)."""

    def complete(  # noqa: B027 (optional hook)
        self,
        task_names: Sequence[str],
        full: Sequence[int],
        theta0: Mapping[str, Tensor],
        stacked: Mapping[str, Tensor],
    ) -> None:
        """Adjust base and stacked task vectors in place once every expert is loaded (default: nothing).

        Args:
            task_names: The merged tasks.
            full: Task index of each row of the stacks.
            theta0: The base's merged tensors.
            stacked: Name -> task vectors (len(full), *shape).
        """

    @abstractmethod
    def split(
        self, task: str, model: PreTrainedModel, base: PreTrainedModel, theta0: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(merged tensors by base name, the expert's own unmerged tensors by full name), checked."""

    @abstractmethod
    def prefix(self, model: PreTrainedModel) -> str:
        """Attribute path of the merged part inside an expert ('' when the whole model is merged)."""

    @abstractmethod
    def num_outputs(self, model: PreTrainedModel) -> int:
        """Size of an expert's output (classes, or vocabulary)."""

    def to_skeleton(self, model: PreTrainedModel) -> None:
        """Turn a loaded expert into forward code on the meta device, in place."""
        model.requires_grad_(False).to("meta").eval()

    def sharded_refusal(self) -> str | None:
        """Why these experts cannot be read in column shards (default: the family reads them whole)."""
        return f"the {self.name} family reads its experts whole"

    # ------------------------------------------------------------------ data
    def check_tasks(self, specs: Sequence[TaskSpec], backbone_pass: str) -> None:  # noqa: B027 (optional hook)
        """Refuse tasks (or settings) this family cannot serve, before any teacher is built.

        Args:
            specs: The data's task specs.
            backbone_pass: ``per_task`` or ``joint`` (see the engine).
        """

    def bind(self, tokenizer: PreTrainedTokenizerBase, num_outputs: int) -> None:
        """Give the family the base tokenizer (read by families that decode text)."""
        self.tokenizer = tokenizer

    def teacher_key(self, split: str) -> str:
        """Settings the cached teacher of ``split`` depends on beyond data and experts ('' if none)."""
        return ""

    # ------------------------------------------------------------------ teacher, loss, metric
    @abstractmethod
    def teacher(
        self,
        merged: MergedModel,
        task: int,
        table: Tensor,
        batches: Iterable[Mapping[str, Tensor]],
        size: int,
        split: str,
    ) -> Teacher:
        """Expert outputs on one task split, in dataset order.

        Args:
            merged: The merged model, on the device to run on.
            task: Index into ``merged.all_tasks``.
            table: Coefficients (T, G) that reproduce the expert (one-hot; all-zero for a held-out task).
            batches: Collated evaluation batches (``input_ids``, ``attention_mask``, ``idx``).
            size: Number of examples N.
            split: ``unlabelled``, ``val`` or ``test``.
        """

    @abstractmethod
    def probe(self, merged: MergedModel, params: Mapping[str, Tensor]) -> None:
        """One forward of the merged model with ``params`` on a one-token input, output unused.

        A draining rank's stand-in for another rank's evaluation forward (``MergedModel.drain``): what
        matters is that it runs every block, as any forward does.
        """

    def join_teachers(self, parts: Sequence[Teacher]) -> Teacher:
        """The teacher of a split from the teachers of its consecutive row ranges (ranks' shares)."""
        return join_rows(parts)

    @staticmethod
    def teacher_rows(teacher: Teacher, idx: Tensor) -> Teacher:
        """The rows ``idx`` (B,) of a cached teacher."""
        if isinstance(teacher, Tensor):
            return teacher[idx]
        return {k: v[idx] for k, v in teacher.items()}

    @abstractmethod
    def step_loss(
        self,
        merged: MergedModel,
        objective: Objective,
        batches: Mapping[int, Mapping[str, Tensor]],
        teachers: Mapping[int, Teacher],
        backbone_pass: str,
        params: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """The training loss sum_t D(expert_t || merged) over several tasks' batches.

        Args:
            merged: The merged model.
            objective: Divergence between expert log-probabilities and merged logits, per row.
            batches: Task index -> collated inputs (``input_ids``, ``attention_mask``, each (B_t, L_t)).
            teachers: Task index -> the batch's rows of that task's teacher cache.
            backbone_pass: ``per_task`` or ``joint``.
            params: The merged tensors to score (an evaluation's ``eval_params``, without gradients);
                None: ``merged.step_params()``, differentiable w.r.t. the coefficients.

        Returns:
            The loss to call ``backward()`` on (value: the summed task losses) and each task's detached loss.
        """

    @abstractmethod
    def new_metric(self, task: str, num_outputs: int) -> Metric:
        """A fresh evaluation metric for ``task``, whose expert has ``num_outputs`` outputs."""

    def scores_rows(self, task: str) -> bool:
        """Whether ``task``'s metric is a mean of per-row 0/1 scores (so ``eval_update`` records them)."""
        return True

    @abstractmethod
    def eval_update(
        self,
        merged: MergedModel,
        task: int,
        metrics: Mapping[str, Metric],
        batch: Mapping[str, Tensor],
        params: Mapping[str, Mapping[str, Tensor]],
        teacher: Teacher,
        rows: Rows,
    ) -> None:
        """Score one evaluation batch.

        Args:
            merged: The merged model.
            task: Index into ``merged.all_tasks``.
            metrics: ``merged`` / ``expert`` / ``reference`` metrics of the task, and where kept their
                ``<name>_rows`` per-row correctness (fed with ``record_rows``).
            batch: Collated batch (``input_ids``, ``attention_mask``, ``idx``; ``labels`` when labelled).
            params: Name (``merged``, ``reference``) -> merged tensors to score; may be empty (expert only).
            teacher: The batch's rows of the task split's teacher cache (the expert's outputs).
            rows: The task split's rows (references of generated answers).
        """
