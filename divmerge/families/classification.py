"""Sequence-classification experts: a shared backbone is merged, each task keeps its own head.

An expert is a Hugging Face sequence-classification model fine-tuned from the base. Its backbone
(``model.base_model``, e.g. ``bert.*``) is merged; everything else (the classification head) stays the
expert's own, unmerged. The teacher is each expert's log-probabilities over its classes; the task loss
is the divergence between those and the merged backbone + that task's head (DivMerge, arXiv
2509.02108); the metric is accuracy.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from divmerge.core import lora, per_block
from divmerge.core.merge import accumulate_over_tasks
from divmerge.core.merged_model import MergedModel
from divmerge.data import Rows, TaskSpec
from divmerge.errors import DivMergeError
from divmerge.families.base import ModelFamily, Teacher, record_rows
from divmerge.objectives import Objective
from divmerge.teachers import compute_logprobs

BackbonePass = Literal["per_task", "joint"]


class Classification(ModelFamily):
    """Sequence classifiers (``AutoModelForSequenceClassification``) fine-tuned from one base."""

    name: ClassVar[str] = "classification"
    task_kind: ClassVar[str] = "classification"
    base_class: ClassVar[type] = AutoModel
    expert_class: ClassVar[type] = AutoModelForSequenceClassification
    adapter_task_type = "SEQ_CLS"
    divergence_splits: ClassVar[tuple[str, ...]] = ("unlabelled", "val", "test")
    digest_tag: ClassVar[str] = "merged"
    complete_experts: ClassVar[bool] = True  # a missing head would be random

    @staticmethod
    def detect(source: str) -> bool:
        """Every expert that no other family claims is treated as a classifier."""
        return True

    def check_tasks(self, specs: Sequence[TaskSpec], backbone_pass: str) -> None:
        """Classification tasks only."""
        wrong = [spec.name for spec in specs if spec.kind != self.task_kind]
        if wrong:
            raise DivMergeError(
                f"Tasks {wrong} are generative but the experts are classifiers: give generative tasks "
                "causal-LM experts, or remove `kind: generative`."
            )

    def split(
        self, task: str, model: PreTrainedModel, base: PreTrainedModel, theta0: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(backbone tensors, head tensors) of an expert, its vocabulary and backbone checked."""
        _check_vocabulary(task, model, base)
        return _split_expert(task, model, theta0)

    def prefix(self, model: PreTrainedModel) -> str:
        """The backbone's attribute name (``bert`` for BERT)."""
        return model.base_model_prefix

    def num_outputs(self, model: PreTrainedModel) -> int:
        """The expert's number of classes."""
        return int(model.config.num_labels)

    def teacher(
        self,
        merged: MergedModel,
        task: int,
        table: Tensor,
        batches: Iterable[Mapping[str, Tensor]],
        size: int,
        split: str,
    ) -> Teacher:
        """The expert's log-probabilities (N, C_t): the merged model with ``table`` (one-hot) and its head."""
        device = table.device
        params = merged.eval_params(table)  # per block in the per_block mode

        def forward(batch: Mapping[str, Tensor]) -> Tensor:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            return task_logits(merged, task, params, **inputs)

        return compute_logprobs(forward, batches, size)

    def step_loss(
        self,
        merged: MergedModel,
        objective: Objective,
        batches: Mapping[int, Mapping[str, Tensor]],
        teachers: Mapping[int, Teacher],
        backbone_pass: str,
        params: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Sum over tasks of the mean divergence between cached expert and merged log-probabilities."""

        def task_loss(t: int, student: Tensor) -> Tensor:  # student: (B_t, C_t)
            return objective(teachers[t].to(student.device), student).mean()

        inputs = {t: {k: b[k] for k in ("input_ids", "attention_mask")} for t, b in batches.items()}
        params = merged.step_params() if params is None else params
        return step_loss(merged, params, inputs, task_loss, backbone_pass)

    def probe(self, merged: MergedModel, params: Mapping[str, Tensor]) -> None:
        """The first task's logits on a one-token input (see ``ModelFamily.probe``)."""
        ids = torch.zeros((1, 1), dtype=torch.long, device=next(iter(params.values())).device)
        task_logits(merged, 0, params, input_ids=ids, attention_mask=torch.ones_like(ids))

    def new_metric(self, task: str, num_outputs: int) -> Metric:
        """Micro-averaged accuracy over ``num_outputs`` classes."""
        return MulticlassAccuracy(num_classes=num_outputs, average="micro")

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
        """Accuracy of the expert (cached argmax) and of each merge in ``params`` (merged, reference)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        predicted = {"expert": teacher.argmax(-1).to(labels.device)}
        for name, tensors in params.items():  # "merged", and "reference" where computed
            predicted[name] = task_logits(merged, task, tensors, **inputs).argmax(-1)
        for name, predictions in predicted.items():
            metrics[name].update(predictions, labels)
            record_rows(metrics, name, predictions == labels, batch["idx"])


def forward_tasks(
    merged: MergedModel, params: Mapping[str, Tensor], batches: Mapping[int, Mapping[str, Tensor]]
) -> dict[int, Tensor]:
    """Logits of the merged model for several tasks' batches in ONE backbone pass.

    The batches are right-padded to a common length and concatenated; the merged backbone runs once
    on the union (so a step costs one forward+backward however many tasks there are), then each
    task's own head runs on its slice: the expert's forward is called with its backbone submodule
    answering from the precomputed outputs, so any Hugging Face head works unchanged.

    Args:
        merged: The merged model.
        params: Output of ``merged_params``.
        batches: Task index (into ``all_tasks``) -> inputs (``input_ids`` and ``attention_mask``,
            each (B_t, L_t)).

    Returns:
        Task index -> logits (B_t, C_t).

    """
    tasks = list(batches)
    length = max(b["input_ids"].shape[1] for b in batches.values())
    pad_id = merged.skeleton(tasks[0]).config.pad_token_id or 0
    ids = torch.cat(
        [
            F.pad(batches[t]["input_ids"], (0, length - batches[t]["input_ids"].shape[1]), value=pad_id)
            for t in tasks
        ]
    )
    mask = torch.cat(
        [
            F.pad(batches[t]["attention_mask"], (0, length - batches[t]["attention_mask"].shape[1]))
            for t in tasks
        ]
    )  # (sum B_t, L)
    backbone = merged.skeleton(tasks[0]).get_submodule(merged.prefix)
    cut = len(merged.prefix) + 1
    tensors = {n if n == per_block.TABLE else n[cut:]: v for n, v in params.items()} | {
        n[cut:]: v for n, v in merged.buffers_.items()
    }
    with per_block.attached(backbone, merged.prefix, tensors, merged.merge_block, merged.announce) as tensors:
        dense, factors = lora.split(tensors)
        with lora.attached(backbone, factors):
            hidden = functional_call(
                backbone, dense, args=(), kwargs={"input_ids": ids, "attention_mask": mask}, strict=True
            )
    logits, start = {}, 0
    for t in tasks:
        stop = start + batches[t]["input_ids"].shape[0]
        part = type(hidden)(**{k: v[start:stop] for k, v in hidden.items()})  # this task's rows
        logits[t] = head_logits(merged, t, part, ids[start:stop], mask[start:stop])
        start = stop
    return logits


def head_logits(
    merged: MergedModel, task: int, backbone_out: Any, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """Run expert ``task``'s forward with its backbone replaced by precomputed outputs."""
    skeleton = merged.skeleton(task)
    backbone = skeleton.get_submodule(merged.prefix)
    backbone.forward = lambda *args, **kwargs: backbone_out
    try:
        out = functional_call(
            skeleton,
            dict(merged.heads[task].items()),
            args=(),
            kwargs={"input_ids": input_ids, "attention_mask": attention_mask},
            strict=False,
        )
    finally:
        del backbone.forward
    return out.logits


def step_loss(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    batches: Mapping[int, Mapping[str, Tensor]],
    task_loss: Callable[[int, Tensor], Tensor],
    backbone_pass: BackbonePass = "per_task",
) -> tuple[Tensor, dict[int, Tensor]]:
    """The training loss sum_t task_loss(t, logits_t) over several tasks' batches.

    Args:
        merged: The merged model.
        params: Output of ``merged_params``.
        batches: Task index -> inputs (``input_ids``, ``attention_mask``, each (B_t, L_t)).
        task_loss: (task index, merged logits (B_t, C_t)) -> scalar loss of that task.
        backbone_pass: ``per_task`` runs one task's forward+backward at a time, accumulating the
            merged tensors' gradients (see :func:`accumulate_over_tasks`): activation memory of one
            task's batch, so memory grows by one task vector per expert, not by one activation set.
            ``joint`` runs all tasks in one concatenated backbone pass (``forward_tasks``): larger
            matmuls (faster where they are not already saturated, e.g. big GPUs) but activation
            memory grows with T; its backward then happens in the caller's ``loss.backward()``.

    Returns:
        The loss to call ``backward()`` on (value: the summed task losses) and each task's detached
        loss.

    """
    if backbone_pass == "joint":
        logits = forward_tasks(merged, params, batches)
        losses = {t: task_loss(t, logits[t]) for t in batches}
        return torch.stack(list(losses.values())).sum(), {t: v.detach() for t, v in losses.items()}
    if backbone_pass != "per_task":
        raise ValueError(f"backbone_pass must be 'per_task' or 'joint', not {backbone_pass!r}")
    return accumulate_over_tasks(
        params,
        {t: (lambda p, t=t: task_loss(t, task_logits(merged, t, p, **batches[t]))) for t in batches},
    )


def task_logits(merged: MergedModel, task: int, params: Mapping[str, Tensor], **inputs: Tensor) -> Tensor:
    """Logits of the merged backbone with task ``task``'s own head.

    Args:
        merged: The merged model.
        task: Task index t.
        params: Output of ``merged_params``.
        **inputs: ``input_ids`` and ``attention_mask``, each (B, L).

    Returns:
        Logits, shape (B, C_t).

    """
    return forward_tasks(merged, params, {task: inputs})[task]


def _split_expert(
    task: str, model: PreTrainedModel, base: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an expert's parameters into (backbone, head) and check the backbone matches the base."""
    prefix = model.base_model_prefix
    backbone, head = {}, {}
    for name, param in model.named_parameters():
        if name.startswith(prefix + "."):
            short = name[len(prefix) + 1 :]
            if short not in base:
                raise DivMergeError(
                    f"Expert {task!r} has tensor {name!r} that the base model lacks: the expert was not "
                    "fine-tuned from this base; use the base it was trained from."
                )
            if tuple(param.shape) != tuple(base[short].shape):
                raise DivMergeError(
                    f"Expert {task!r} tensor {name!r} has shape {tuple(param.shape)} but the base has "
                    f"{tuple(base[short].shape)}: experts must share the base's architecture "
                    "(same config, vocabulary and sizes)."
                )
            backbone[short] = param.detach()
        else:
            head[name] = param.detach()
    return backbone, head


def _check_vocabulary(task: str, model: PreTrainedModel, base: PreTrainedModel) -> None:
    """Refuse an expert whose token embeddings were resized away from the base vocabulary."""
    embeddings = model.get_input_embeddings().weight
    ours, theirs = embeddings.shape[0], base.get_input_embeddings().weight.shape[0]
    if ours != theirs:
        name = next(n for n, p in model.named_parameters() if p is embeddings)
        raise DivMergeError(
            f"Expert {task!r} has a vocabulary of {ours} tokens ({name}) but the base has {theirs}: its "
            "tokenizer differs from the base's (e.g. tokens were added and the embeddings resized when "
            "fine-tuning), so its tensors do not line up; use experts fine-tuned with the base's tokenizer, "
            "or configure as model.base the base resized to that same vocabulary (all experts must share it)."
        )
