"""Causal-LM (generative) experts: loading, the merged model's forward and greedy generation, the teacher.

A causal-LM expert (``AutoModelForCausalLM``) is merged whole: every weight, the LM head included, with
tied input/output embeddings merged once (as one tensor). There is no per-task head. An expert may also
be a peft LoRA adapter (task_type CAUSAL_LM) over the base: its plain LoRA layers stay factored
(``divmerge.core.lora``, added by forward hooks in :func:`forward`), its other changes are densified
(``divmerge.experts.adapters``). The expert's teacher output is its greedy answer to each prompt plus the
(coarsened) distribution of every answer position (DivMerge, arXiv 2509.02108, Algorithm 1); see
:mod:`divmerge.families.generation` for the math.
"""

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor
from torch.func import functional_call
from torchmetrics import Metric, text
from torchmetrics.aggregation import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import ModelOutput

from divmerge.core import lora, per_block
from divmerge.core.merge import accumulate_over_tasks
from divmerge.core.merged_model import MergedModel
from divmerge.data import Rows, TaskSpec
from divmerge.errors import DivMergeError
from divmerge.experts.adapters import adapter_task_type, is_adapter
from divmerge.experts.sources import resolve_source
from divmerge.experts.vocab import Vocabulary, vocabulary
from divmerge.families.base import ModelFamily, Teacher, record_rows
from divmerge.families.generation import (
    Decoded,
    answer_aligned,
    answer_divergence,
    exact_match,
    greedy_decode,
    pad_sequences,
)
from divmerge.objectives import Objective
from divmerge.teachers import join_rows

CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
# exact match, or a torchmetrics.text metric that scores a string against references, higher is better
GenerationMetric = Literal["exact_match", "BLEUScore", "SacreBLEUScore", "CHRFScore"]


def architectures(source: str) -> list[str]:
    """Model classes listed in a model's config (empty when the config cannot be read)."""
    try:
        return list(AutoConfig.from_pretrained(resolve_source(source)).architectures or [])
    except (OSError, ValueError, KeyError, DivMergeError):
        return []


def is_causal_lm(source: str) -> bool:
    """Whether ``source`` (directory or hub id) holds a causal LM or a peft adapter of one.

    A model is judged by its config's architectures, an adapter directory by its task_type (CAUSAL_LM).
    """
    try:
        path = resolve_source(source)
    except DivMergeError:
        return False
    if is_adapter(path):
        return adapter_task_type(path) == "CAUSAL_LM"
    return any(a in CAUSAL_LM_CLASSES for a in architectures(source))


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the model's input embedding matrix."""
    return int(model.get_input_embeddings().weight.shape[0])


def vocab_tensors(model: PreTrainedModel) -> set[str]:
    """Names of the parameters with one row per token: input embeddings, and an untied LM head."""
    matrices = [
        m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
    ]
    return {n for n, p in model.named_parameters() if any(p is m for m in matrices)}


def _expert_params(
    task: str, model: PreTrainedModel, theta0: Mapping[str, Tensor], merged_vocab: int
) -> dict[str, Tensor]:
    """An expert's parameters, checked against the (vocabulary-extended) base: names and shapes.

    An expert with fewer token rows than the merge gets the base's rows for the ones it lacks, so its
    task vector is zero there (see :mod:`divmerge.experts.vocab`).
    """
    rows = vocab_size(model)
    if rows > merged_vocab:  # the vocabulary check reads configs; the weights disagree with them
        raise DivMergeError(
            f"Expert {task!r} has {rows} embedding rows but its config.json says the vocabulary is smaller: "
            "set vocab_size in its config.json to its embedding rows."
        )
    params = {n: p.detach() for n, p in model.named_parameters()}
    for n in vocab_tensors(model) if rows < merged_vocab else ():
        if n in theta0:
            params[n] = torch.cat([params[n], theta0[n][rows:]])  # (V, H)
    differing = sorted(set(params) ^ set(theta0))
    if differing:
        raise DivMergeError(
            f"Expert {task!r} and the base differ in tensor {differing[0]!r} (tied vs untied embeddings, or "
            "another architecture): experts must share the base's architecture."
        )
    for n, p in params.items():
        if p.shape != theta0[n].shape:
            raise DivMergeError(
                f"Expert {task!r} tensor {n!r} has shape {tuple(p.shape)} but the base has "
                f"{tuple(theta0[n].shape)}: experts must share the base's architecture."
            )
    return params


def eos_token_id(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """The tokenizer's end-of-sequence id, which ends every generated answer.

    Args:
        tokenizer: The base model's tokenizer.
        vocab_size: The experts' vocabulary size V (the EOS id must be one of their tokens).

    Returns:
        The EOS token id.

    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DivMergeError(
            f"The tokenizer {tokenizer.name_or_path!r} has no EOS token, so generated answers cannot end: "
            "set eos_token in its tokenizer_config.json (the token the experts emit after an answer)."
        )
    if not 0 <= eos < vocab_size:
        raise DivMergeError(
            f"The tokenizer's EOS token {tokenizer.eos_token!r} has id {eos}, outside the experts' "
            f"{vocab_size}-token vocabulary: use the tokenizer the experts were trained with (set "
            "eos_token in its tokenizer_config.json to the token they emit after an answer)."
        )
    return int(eos)


def chat_prompts(tokenizer: PreTrainedTokenizerBase, task: str, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt sent as one user message through the tokenizer's chat template.

    The template's text (with the assistant's generation prompt, so the model answers next) is tokenised
    without adding special tokens again: the template writes the ones the model was trained with.

    Args:
        tokenizer: The base's tokenizer.
        task: The task's name, for the error message.
        prompts: The formatted prompts.

    Returns:
        Token ids per prompt.

    Raises:
        DivMergeError: If the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DivMergeError(
            f"Task {task!r} sets chat_template: true but the base's tokenizer has no chat template: remove "
            "chat_template (prompts are then used as written) or use the instruct model's tokenizer."
        )
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def prompts_of(batch: Mapping[str, Tensor]) -> list[Tensor]:
    """The unpadded prompts of a collated batch (``input_ids`` and ``attention_mask``, each (B, L))."""
    return [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def forward(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    **kwargs: Any,
) -> ModelOutput:
    """The merged causal LM on a (left- or right-) padded batch; positions follow the attention mask.

    Every causal-LM forward (teacher decoding, generation, the training loss) runs through here, so LoRA
    adapter experts' factors (``@lora_A`` / ``@lora_B`` entries of ``params``) are always applied.

    Args:
        merged: The merged model (its first skeleton gives the forward code; all experts share it).
        params: Merged tensors by full name (``merged.merged_params``).
        input_ids: Token ids (B, L).
        attention_mask: 1 for real tokens, (B, L_past + L) with a KV cache.
        **kwargs: Passed to the model (``past_key_values``, ``use_cache``, ``position_ids``).

    Returns:
        The model output (``logits`` (B, L, V), ``past_key_values``).

    """
    if "position_ids" not in kwargs:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
    kwargs.setdefault("use_cache", False)
    skeleton = merged.skeleton(0)
    tensors = dict(params) | dict(merged.buffers_.items())
    # per_block mode only: each block merges just in time
    with per_block.attached(skeleton, "", tensors, merged.merge_block, merged.announce) as tensors:
        dense, factors = lora.split(tensors)
        with lora.attached(skeleton, factors):  # LoRA adapter experts' low-rank terms, B (A x)
            return functional_call(
                skeleton,
                dense,
                args=(),
                kwargs={"input_ids": input_ids, "attention_mask": attention_mask, **kwargs},
                strict=True,
            )


@torch.no_grad()
def generate(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    prompts: Sequence[Tensor],
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    top_k: int | None = None,
    keep_distributions: bool = False,
) -> Decoded:
    """Greedy answers of the merged model (with a KV cache), stopping each at EOS.

    Args:
        merged: The merged model.
        params: Merged tensors (one-hot coefficients reproduce an expert).
        prompts: Prompt token ids per example, each (L_i,).
        eos_id: End-of-sequence id.
        pad_id: Padding id.
        max_new_tokens: Most tokens generated per answer.
        top_k: Outcomes kept per position with ``keep_distributions`` (None: full vocabulary).
        keep_distributions: Also return each answer position's coarsened distribution.

    Returns:
        The decoded answers.

    """
    device = next(iter(params.values())).device
    ids, mask = (x.to(device) for x in pad_sequences(prompts, pad_id, left=True))  # (B, L)
    cache = None

    def step(previous: Tensor | None) -> Tensor:
        nonlocal mask, cache
        if previous is None:  # the prompts, in one pass
            out = forward(merged, params, ids, mask, use_cache=True)
        else:  # one new token per example, attending to the cached keys and values
            mask = torch.cat([mask, torch.ones_like(previous)], dim=1)  # (B, L + i)
            out = forward(merged, params, previous.to(device), mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        return out.logits[:, -1]  # (B, V)

    return greedy_decode(step, len(prompts), max_new_tokens, eos_id, pad_id, top_k, keep_distributions)


@torch.no_grad()
def build_teacher(
    merged: MergedModel,
    task: int,
    batches: Iterable[Mapping[str, Tensor]],
    size: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    top_k: int | None = None,
    keep_distributions: bool = True,
) -> dict[str, Tensor]:
    """Expert ``task``'s greedy answers on a task split (and their distributions), in dataset order.

    The expert is the merged model with one-hot coefficients, which reproduces it.

    Args:
        merged: The merged model, on the device to run on.
        task: Expert index.
        batches: Collated batches with ``input_ids``, ``attention_mask`` and ``idx``.
        size: Dataset length N.
        eos_id: End-of-sequence id.
        pad_id: Padding id.
        max_new_tokens: Most tokens generated per answer.
        top_k: Outcomes kept per position (None: full vocabulary).
        keep_distributions: Store distributions (training split) or only the answers (evaluation splits).

    Returns:
        ``tokens`` (N, A) int32, ``lengths`` (N,) int64, and with distributions ``logprobs`` (N, A, C)
        float32 plus, for top-k, ``ids`` (N, A, k) int32; A is the longest answer.

    """
    device = merged.base[merged.names[0]].device
    params = merged.eval_params(merged.one_hot_table(task).to(device))  # per block in per_block mode
    parts: list[tuple[Tensor, Decoded]] = []
    seen = 0
    for batch in batches:
        decoded = generate(
            merged, params, prompts_of(batch), eos_id, pad_id, max_new_tokens, top_k, keep_distributions
        )
        parts.append((batch["idx"].cpu(), decoded))
        seen += len(batch["idx"])
    if seen != size:
        raise DivMergeError(f"Teacher cache saw {seen} of {size} examples; the data loader dropped some.")
    width = max(d.tokens.shape[1] for _, d in parts)
    out = {
        "tokens": torch.full((size, width), pad_id, dtype=torch.int32),
        "lengths": torch.zeros(size, dtype=torch.long),
    }
    for idx, d in parts:
        out["tokens"][idx, : d.tokens.shape[1]] = d.tokens.to(torch.int32)
        out["lengths"][idx] = d.lengths
        for key in ("logprobs", "ids"):
            value = getattr(d, key)
            if value is not None:
                if key not in out:
                    out[key] = value.new_zeros((size, width, value.shape[-1]))  # (N, A, C)
                out[key][idx, : value.shape[1]] = value
    return out


def teacher_forced_loss(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    objective: Objective,
    prompts: Sequence[Tensor],
    teacher: Mapping[str, Tensor],
    pad_id: int,
) -> Tensor:
    """The merged model teacher-forced on prompt + the expert's answer, scored on the answer positions.

    One task's batch of ``teacher_forced_losses``.

    Returns:
        Scalar: the mean over examples of the divergence averaged over their answer positions.
    """
    return teacher_forced_losses(merged, params, objective, {0: prompts}, {0: teacher}, pad_id)[0]


def teacher_forced_losses(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    objective: Objective,
    prompts: Mapping[int, Sequence[Tensor]],
    teachers: Mapping[int, Mapping[str, Tensor]],
    pad_id: int,
) -> dict[int, Tensor]:
    """Several tasks' batches teacher-forced in ONE forward of the merged model, scored per task.

    The answers are aligned (:func:`~divmerge.families.generation.answer_aligned`) across all rows, so
    the LM head runs on the answer positions only: over a 49k-token vocabulary it would otherwise cost a
    large share of the step on every prompt position. With one task this is a task's loss
    (``backbone_pass: per_task``); with all, the joint pass (each block merged once per step).

    Args:
        merged: The merged model.
        params: Merged tensors (differentiable w.r.t. the coefficients).
        objective: Divergence between expert log-probabilities and merged logits, per row.
        prompts: Task -> prompt token ids per example, each (m_i,).
        teachers: Task -> the batch's rows of its teacher cache (``tokens``, ``lengths``, ``logprobs``,
            ``ids``).
        pad_id: Padding id.

    Returns:
        Task -> scalar: the mean over its examples of the divergence averaged over their answer positions.

    """
    device = next(iter(params.values())).device
    tasks = list(prompts)
    rows, answers = [], []
    for t in tasks:
        lengths = teachers[t]["lengths"]
        rows += [p.to(device) for p in prompts[t]]
        answers += [a[:n] for a, n in zip(teachers[t]["tokens"], lengths.tolist(), strict=True)]
    ids, mask = answer_aligned(rows, answers, pad_id)  # (sum B_t, P + A - 1)
    width = max(int(teachers[t]["lengths"].max()) for t in tasks)  # A: the last A positions
    logits = forward(merged, params, ids, mask, **logits_window(merged, width)).logits  # (sum B_t, A', V)
    out = {}
    for t, task_logits in zip(tasks, logits[:, -width:].split([len(prompts[t]) for t in tasks]), strict=True):
        ids_k = teachers[t].get("ids")
        out[t] = answer_divergence(
            objective,
            task_logits,  # (B_t, A, V): answer token j at position j
            torch.ones(len(task_logits), dtype=torch.long, device=device),
            teachers[t]["lengths"].to(device),
            teachers[t]["logprobs"].to(device),
            None if ids_k is None else ids_k.to(device).long(),
        )
    return out


def logits_window(merged: MergedModel, width: int) -> dict[str, int]:
    """``logits_to_keep=width`` where the model's forward takes it (the LM head on the answers only)."""
    takes = "logits_to_keep" in inspect.signature(merged.skeleton(0).forward).parameters
    return {"logits_to_keep": width} if takes else {}


def step_loss(
    merged: MergedModel,
    objective: Objective,
    batches: Mapping[int, Mapping[str, Tensor]],
    teachers: Mapping[int, Mapping[str, Tensor]],
    pad_id: int,
    params: Mapping[str, Tensor] | None = None,
    backbone_pass: str = "per_task",
) -> tuple[Tensor, dict[int, Tensor]]:
    """The training loss sum_t teacher_forced_loss_t.

    ``per_task``: one task's forward+backward at a time; gradients accumulate on the merged tensors
    (``divmerge.core.merge.accumulate_over_tasks``), so activation memory is one task's batch whatever
    the number of tasks. ``joint``: all tasks' rows in one forward, whose backward is the caller's: a
    per-block merge (and, sharded, its gathers) then runs once per step instead of once per task, for
    T tasks' activations (only each block's input under the per-block mode's checkpointing).

    Args:
        merged: The merged model.
        objective: Divergence between expert log-probabilities and merged logits, per row.
        batches: Task index -> collated prompts (``input_ids``, ``attention_mask``, each (B_t, L_t)).
        teachers: Task index -> the batch's rows of that task's teacher cache.
        pad_id: Padding id.
        params: The merged tensors (None: ``merged.step_params()``, differentiable).
        backbone_pass: ``per_task`` or ``joint``.

    Returns:
        The loss to call ``backward()`` on (value: the summed task losses) and each task's detached loss.

    """
    params = merged.step_params() if params is None else params
    prompts = {t: prompts_of(b) for t, b in batches.items()}
    if backbone_pass == "joint":
        losses = teacher_forced_losses(merged, params, objective, prompts, teachers, pad_id)
        return torch.stack(list(losses.values())).sum(), {t: v.detach() for t, v in losses.items()}
    return accumulate_over_tasks(
        params,
        {
            t: (lambda p, t=t: teacher_forced_loss(merged, p, objective, prompts[t], teachers[t], pad_id))
            for t in batches
        },
    )


def decode_answers(tokenizer: PreTrainedTokenizerBase, tokens: Tensor, lengths: Tensor) -> list[str]:
    """Generated answers as text: special tokens (EOS) dropped, whitespace stripped.

    Args:
        tokenizer: The base model's tokenizer.
        tokens: Generated ids (B, A).
        lengths: Generated tokens per example (B,).

    Returns:
        One string per example.

    """
    rows = [row[:n].tolist() for row, n in zip(tokens, lengths.tolist(), strict=True)]
    return [answer.strip() for answer in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def generation_metric(name: GenerationMetric) -> Metric:
    """A metric of generated answers against references: exact match, or that torchmetrics.text metric.

    Args:
        name: ``exact_match`` (mean of 0/1 scores) or a torchmetrics.text class name.

    Returns:
        A fresh metric; feed it with :func:`update_generation_metric`.

    """
    return MeanMetric() if name == "exact_match" else getattr(text, name)()


def update_generation_metric(metric: Metric, predictions: Sequence[str], references: Sequence[str]) -> None:
    """Add a batch of generated answers and their references to a ``generation_metric``."""
    if isinstance(metric, MeanMetric):
        metric.update(exact_match(predictions, references))
    else:  # corpus-level text metrics take several references per prediction
        metric.update(list(predictions), [[r] for r in references])


class CausalLM(ModelFamily):
    """Causal LMs (``AutoModelForCausalLM``) that answer prompts by generating text.

    Args:
        max_new_tokens: Most tokens generated per answer (teacher cache and evaluation).
        teacher_top_k: Cache each answer position's distribution as the expert's top-k probabilities plus
            the remaining mass (None: full-vocabulary distributions).
        generation_metric: How generated answers are scored against the references: one metric for every
            task, or a mapping task -> metric (tasks it does not name use ``exact_match``).
    """

    name: ClassVar[str] = "causal_lm"
    task_kind: ClassVar[str] = "generative"
    base_class: ClassVar[type] = AutoModelForCausalLM
    expert_class: ClassVar[type] = AutoModelForCausalLM
    adapter_task_type = "CAUSAL_LM"
    digest_tag: ClassVar[str] = "causal-lm"

    def __init__(
        self,
        max_new_tokens: int = 16,
        teacher_top_k: int | None = None,
        generation_metric: GenerationMetric | Mapping[str, GenerationMetric] = "exact_match",
    ) -> None:
        names = (
            [generation_metric] if isinstance(generation_metric, str) else list(generation_metric.values())
        )
        valid = get_args(GenerationMetric)
        wrong = [n for n in names if n not in valid]
        if wrong:
            raise DivMergeError(
                f"generation_metric {wrong[0]!r} is unknown: use one of {', '.join(valid)} "
                "(or a mapping task -> one of them; tasks not named use exact_match)."
            )
        self.max_new_tokens = max_new_tokens
        self.teacher_top_k = teacher_top_k
        self.generation_metric = generation_metric
        self.eos_id = self.pad_id = 0
        self.vocab: Vocabulary | None = None  # set by check_sources
        self.vocab_names: set[str] = set()  # token-row tensors of the base, set by extend_base

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "CausalLM":
        """Read ``max_new_tokens``, ``teacher_top_k`` and ``generation_metric``."""
        return cls(
            options.get("max_new_tokens", 16),
            options.get("teacher_top_k"),
            options.get("generation_metric", "exact_match"),
        )

    @staticmethod
    def detect(source: str) -> bool:
        """Whether ``source`` holds a causal LM or a peft adapter of one (see :func:`is_causal_lm`)."""
        return is_causal_lm(source)

    def check_sources(self, base: str, experts: Mapping[str, str], held_out: Mapping[str, str]) -> None:
        """No held-out tasks; the base and every full expert must be causal LMs."""
        if held_out:
            raise DivMergeError(
                "Held-out tasks need classification experts (their head scores the task); remove "
                "model.held_out when merging causal-LM experts."
            )
        if not is_causal_lm(base):
            raise DivMergeError(
                f"The experts are causal LMs but the base {base!r} is not (its config lists "
                f"{architectures(base)}): set model.base to the causal LM they were fine-tuned from."
            )
        for task, source in experts.items():
            if not is_adapter(resolve_source(source)) and not is_causal_lm(source):
                raise DivMergeError(
                    f"Expert {task!r} is not a causal LM (its config lists {architectures(source)}) but "
                    f"the others are: merge experts of one kind (all causal LMs or all classifiers)."
                )
        paths = {task: resolve_source(source) for task, source in experts.items()}
        self.vocab = vocabulary(resolve_source(base), paths)
        adapters = [task for task, path in paths.items() if is_adapter(path)]
        if self.vocab.extended and adapters:
            raise DivMergeError(
                f"Expert {adapters[0]!r} is a LoRA adapter but other experts extend the base's vocabulary "
                f"({self.vocab.base_size} -> {self.vocab.size} tokens), which adapter experts cannot merge "
                "with yet: merge its full fine-tune (peft merge_and_unload) instead."
            )

    def split(
        self, task: str, model: PreTrainedModel, base: PreTrainedModel, theta0: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every weight is merged (tied embeddings once); a causal LM has no head of its own."""
        return _expert_params(task, model, theta0, vocab_size(base)), {}

    def extend_base(self, base: PreTrainedModel) -> None:
        """Give the base the merged vocabulary's rows (zero until :meth:`complete` fills them)."""
        if self.vocab is None or not self.vocab.extended:
            return
        base.resize_token_embeddings(self.vocab.size, mean_resizing=False)
        self.vocab_names = vocab_tensors(base)
        with torch.no_grad():
            for n, p in base.named_parameters():
                if n in self.vocab_names:
                    p[self.vocab.base_size :] = 0

    def complete(
        self,
        task_names: Sequence[str],
        full: Sequence[int],
        theta0: Mapping[str, Tensor],
        stacked: Mapping[str, Tensor],
    ) -> None:
        """Fill the added token rows: the base gets the mean of the experts that have the row.

        Each of those experts keeps its difference from that mean (until now the base row was zero, so
        their task vector was their row); the others stay at zero.
        """
        if self.vocab is None or not self.vocab.extended:
            return
        low = self.vocab.base_size
        ends = [self.vocab.sizes[task_names[t]] - low for t in full]  # added rows each stack row has
        count = torch.zeros(self.vocab.size - low)
        for end in ends:
            count[:end] += 1
        for n in self.vocab_names & set(stacked):
            tau = stacked[n]
            added = tau[:, low:]  # (T, V - V0, H): each expert's own rows, zero where it lacks them
            mean = added.float().sum(0) / count.clamp(min=1)[:, None]  # (V - V0, H)
            theta0[n][low:] = mean.to(theta0[n].dtype)
            for i, end in enumerate(ends):
                added[i, :end] -= mean[:end].to(added.dtype)

    def sharded_refusal(self) -> str | None:
        """Every weight is merged, under the base's names: readable in shards unless vocabularies differ."""
        if self.vocab is not None and self.vocab.extended:
            return "some experts extend the base's vocabulary"
        return None

    def prefix(self, model: PreTrainedModel) -> str:
        """The whole model is merged: names are full parameter names."""
        return ""

    def num_outputs(self, model: PreTrainedModel) -> int:
        """The merged vocabulary's size (an expert that added tokens may have more rows than another)."""
        return self.vocab.size if self.vocab is not None and self.vocab.extended else vocab_size(model)

    def to_skeleton(self, model: PreTrainedModel) -> None:
        """Meta device, with tied weights re-tied (moving to meta unties them)."""
        super().to_skeleton(model)
        model.tie_weights()  # functional_call then needs the shared name once

    def check_tasks(self, specs: Sequence[TaskSpec], backbone_pass: str) -> None:
        """Generative tasks only."""
        wrong = [spec.name for spec in specs if spec.kind != self.task_kind]
        if wrong:
            raise DivMergeError(
                f"Tasks {wrong} are classification tasks but the experts are causal LMs: set "
                "`kind: generative` and a prompt_template on each."
            )
        if not isinstance(self.generation_metric, str):
            unknown = sorted(set(self.generation_metric) - {spec.name for spec in specs})
            if unknown:
                raise DivMergeError(
                    f"model.generation_metric names tasks {unknown} that are not data tasks "
                    f"({', '.join(spec.name for spec in specs)}): fix or remove those entries."
                )

    def bind(self, tokenizer: PreTrainedTokenizerBase, num_outputs: int) -> None:
        """Keep the tokenizer and its EOS / padding ids (a tokenizer without EOS is refused here)."""
        super().bind(tokenizer, num_outputs)
        self.eos_id, self.pad_id = eos_token_id(tokenizer, num_outputs), tokenizer.pad_token_id

    def teacher_key(self, split: str) -> str:
        """Generation settings: answers only for evaluation splits, plus the top-k for training."""
        if split != "unlabelled":  # evaluation keeps the answers only
            return f"-g{self.max_new_tokens}answers"
        return f"-g{self.max_new_tokens}k{self.teacher_top_k or 'full'}"

    def teacher(
        self,
        merged: MergedModel,
        task: int,
        table: Tensor,
        batches: Iterable[Mapping[str, Tensor]],
        size: int,
        split: str,
    ) -> Teacher:
        """The expert's greedy answers, with answer distributions for the training split."""
        return build_teacher(
            merged,
            task,
            batches,
            size,
            self.eos_id,
            self.pad_id,
            self.max_new_tokens,
            self.teacher_top_k,
            keep_distributions=split == "unlabelled",
        )

    def join_teachers(self, parts: Sequence[Teacher]) -> Teacher:
        """Shares joined as one build pads them: answer tokens with the pad id, the rest with zeros."""
        return join_rows(parts, {"tokens": self.pad_id})

    def step_loss(
        self,
        merged: MergedModel,
        objective: Objective,
        batches: Mapping[int, Mapping[str, Tensor]],
        teachers: Mapping[int, Teacher],
        backbone_pass: str,
        params: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Teacher-forced divergence on the experts' answers (``step_loss``: per task or joint)."""
        inputs = {t: {k: b[k] for k in ("input_ids", "attention_mask")} for t, b in batches.items()}
        return step_loss(merged, objective, inputs, teachers, self.pad_id, params, backbone_pass)

    def probe(self, merged: MergedModel, params: Mapping[str, Tensor]) -> None:
        """The logits of one padding token (see ``ModelFamily.probe``)."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=next(iter(params.values())).device)
        forward(merged, params, ids, torch.ones_like(ids))

    def new_metric(self, task: str, num_outputs: int) -> Metric:
        """The task's generation metric (``generation_metric``, or its entry for ``task``)."""
        return generation_metric(self.metric_name(task))

    def scores_rows(self, task: str) -> bool:
        """Exact match is a mean of per-answer 0/1 scores; the corpus-level text metrics are not."""
        return self.metric_name(task) == "exact_match"

    def metric_name(self, task: str) -> GenerationMetric:
        """The metric ``task`` is scored with."""
        if isinstance(self.generation_metric, str):
            return self.generation_metric
        return self.generation_metric.get(task, "exact_match")

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
        """Score the expert's (cached) answers and those generated by each merge in ``params``."""
        assert self.tokenizer is not None and rows.answers is not None
        references = [rows.answers[i] for i in batch["idx"].cpu().tolist()]

        def answers(p: Mapping[str, Tensor]) -> list[str]:
            out = generate(merged, p, prompts_of(batch), self.eos_id, self.pad_id, self.max_new_tokens)
            return decode_answers(self.tokenizer, out.tokens, out.lengths)

        generated = {"expert": decode_answers(self.tokenizer, teacher["tokens"], teacher["lengths"])}
        for name, tensors in params.items():  # "merged", and "reference" where computed
            generated[name] = answers(tensors)
        for name, predictions in generated.items():
            update_generation_metric(metrics[name], predictions, references)
            record_rows(
                metrics, name, exact_match(predictions, references), batch["idx"]
            )  # kept: exact match
