"""Causal-LM (generative) experts: loading, the merged model's forward and greedy generation, the teacher.

A causal-LM expert (``AutoModelForCausalLM``) is merged whole: every weight, the LM head included, with
tied input/output embeddings merged once (as one tensor). There is no per-task head. An expert may also
be a peft LoRA adapter (task_type CAUSAL_LM) over the base: its plain LoRA layers stay factored
(``divmerge.lora``, added by forward hooks in :func:`forward`), its other changes are densified
(``divmerge.adapters``). The expert's teacher output is its greedy answer to each prompt plus the
(coarsened) distribution of every answer position (DivMerge, arXiv 2509.02108, Algorithm 1); see
:mod:`divmerge.generative` for the math.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from torchmetrics import Metric, text
from torchmetrics.aggregation import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import ModelOutput

from divmerge import lora
from divmerge.adapters import adapter_task_type, is_adapter, load_adapter
from divmerge.errors import DivMergeError
from divmerge.experts import (
    ExpertSet,
    _load,
    add_adapter_changes,
    append_adapter_rows,
    factors_digest,
    resolve_source,
    stack_lora,
    tensor_digest,
)
from divmerge.functional import MergedModel, accumulate_over_tasks
from divmerge.generative import Decoded, answer_divergence, exact_match, greedy_decode
from divmerge.objectives import Objective

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


def load_causal_lm_experts(
    base: str, experts: Mapping[str, str], held_out: Mapping[str, str] | None = None
) -> ExpertSet:
    """Load a causal-LM base and experts; every weight is merged (tied embeddings once).

    Experts are loaded one at a time, so peak memory is base + task vectors + one expert. A peft LoRA
    adapter expert keeps its plain LoRA factors stacked in ``lora`` (adapter-sized); only its densified
    changes get task-vector rows (``dense_rows``), as for classifiers (``divmerge.experts.load_experts``).

    Args:
        base: Source of the pretrained causal LM the experts were fine-tuned from.
        experts: Task name -> causal-LM expert source (a full fine-tune or a LoRA adapter over ``base``),
            in task order.
        held_out: Must be empty: held-out tasks need a classification head.

    Returns:
        The expert set, with ``generative`` set, an empty ``prefix`` (names are full parameter names)
        and no heads.

    """
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
    base_model = _load(AutoModelForCausalLM, base, "the base model")
    theta0 = {n: p.detach() for n, p in base_model.named_parameters()}  # tied tensors appear once
    names = [n for n, p in theta0.items() if p.is_floating_point()]
    base_vocab = vocab_size(base_model)
    task_names = list(experts)
    paths = {task: resolve_source(source) for task, source in experts.items()}
    full = [t for t, task in enumerate(task_names) if not is_adapter(paths[task])]  # stored rows
    stacked = {n: theta0[n].new_empty((len(full), *theta0[n].shape)) for n in names}
    adapter_rows: dict[str, list[tuple[int, Tensor]]] = {}  # adapters' densified changes: (task, tau)
    lora_parts: dict[str, list[tuple[int, Tensor, Tensor]]] = {}  # module -> (task, A, s * B)
    skeletons, expert_digests = [], []
    digest = hashlib.sha256()
    for t, task in enumerate(task_names):
        if t in full and not is_causal_lm(experts[task]):  # load_adapter checks an adapter's task_type
            raise DivMergeError(
                f"Expert {task!r} is not a causal LM (its config lists {architectures(experts[task])}) but "
                f"the others are: merge experts of one kind (all causal LMs or all classifiers)."
            )
        if t in full:
            model, factors = _load(AutoModelForCausalLM, experts[task], f"expert {task!r}"), {}
        else:
            model, factors = load_adapter(
                task, paths[task], resolve_source(base), base, base_model, "CAUSAL_LM"
            )
        params = _expert_params(task, model, theta0, base_vocab, base_model.config.model_type)
        if t in full:
            for n in names:
                torch.sub(params[n], theta0[n], out=stacked[n][full.index(t)])  # tau_t: (*shape)
        else:
            add_adapter_changes(t, params, {n: theta0[n] for n in names}, factors, adapter_rows, lora_parts)
        one = hashlib.sha256(f"{model.config.model_type}|causal-lm|".encode())
        for n in names:
            one.update(f"{n}:{tensor_digest(params[n])}|".encode())
        one.update(factors_digest(factors).encode())
        expert_digests.append(one.hexdigest())
        digest.update(f"{task}|{one.hexdigest()}|".encode())
        model.requires_grad_(False).to("meta").eval()
        model.tie_weights()  # moving to meta unties; functional_call then needs the shared name once
        skeletons.append(model)
    base_digest = hashlib.sha256()
    for n in names:
        base_digest.update(f"{n}:{tensor_digest(theta0[n])}|".encode())
    digest.update(base_digest.digest())
    dense_rows = append_adapter_rows(stacked, full, adapter_rows) if len(full) < len(task_names) else {}
    return ExpertSet(
        task_names=task_names,
        names=names,
        base={n: theta0[n] for n in names},
        task_vectors=stacked,
        buffers={n: b.detach() for n, b in base_model.named_buffers()},
        heads=[{} for _ in task_names],
        skeletons=skeletons,
        prefix="",
        num_labels=[base_vocab] * len(task_names),
        fingerprint=digest.hexdigest()[:16],
        task_digests=[
            hashlib.sha256(f"{base_digest.hexdigest()}|{d}".encode()).hexdigest()[:16] for d in expert_digests
        ],
        sources={"base": base, **experts},
        dense_rows=dense_rows,
        lora={m: stack_lora(parts) for m, parts in lora_parts.items()},
        generative=True,
    )


def _expert_params(
    task: str, model: PreTrainedModel, theta0: Mapping[str, Tensor], base_vocab: int, base_type: str
) -> dict[str, Tensor]:
    """An expert's parameters, checked against the base: model type, vocabulary, names and shapes."""
    if model.config.model_type != base_type:
        raise DivMergeError(
            f"Expert {task!r} is a {model.config.model_type!r} model but the base is {base_type!r}: every "
            "expert must be fine-tuned from the configured base."
        )
    if vocab_size(model) != base_vocab:
        raise DivMergeError(
            f"Expert {task!r} has a vocabulary of {vocab_size(model)} tokens but the base has {base_vocab}: "
            "experts are merged token by token, so each must keep the base's tokenizer and embedding size; "
            f"resize its embeddings to {base_vocab} (if its extra tokens are unused) or leave it out."
        )
    params = {n: p.detach() for n, p in model.named_parameters()}
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


def pad_sequences(seqs: Sequence[Tensor], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Stack 1-D token sequences into a padded batch.

    Args:
        seqs: Token ids per example, each (L_i,).
        pad_id: Padding id.
        left: Pad on the left (for generation) instead of the right.

    Returns:
        ``input_ids`` and ``attention_mask``, each (B, max L_i).

    """
    length = max(len(s) for s in seqs)
    ids = torch.stack(
        [F.pad(s, (length - len(s), 0) if left else (0, length - len(s)), value=pad_id) for s in seqs]
    )
    mask = torch.stack(
        [F.pad(torch.ones_like(s), (length - len(s), 0) if left else (0, length - len(s))) for s in seqs]
    )
    return ids, mask  # (B, L), (B, L)


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
    dense, factors = lora.split(dict(params) | dict(merged.buffers_.items()))
    skeleton = merged.skeleton(0)
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
    params = merged.merged_params(merged.one_hot_table(task).to(device))
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

    Args:
        merged: The merged model.
        params: Merged tensors (differentiable w.r.t. the coefficients).
        objective: Divergence between expert log-probabilities and merged logits, per row.
        prompts: Prompt token ids per example, each (m_i,).
        teacher: The batch's rows of the teacher cache (``tokens``, ``lengths``, ``logprobs``, ``ids``).
        pad_id: Padding id.

    Returns:
        Scalar: the mean over examples of the divergence averaged over their answer positions.

    """
    device = next(iter(params.values())).device
    lengths = teacher["lengths"]
    # The last answer token is only predicted, never fed: its logits come from the position before it.
    answers = [
        a[: n - 1].to(device, torch.long) for a, n in zip(teacher["tokens"], lengths.tolist(), strict=True)
    ]
    seqs = [torch.cat([p.to(device), a]) for p, a in zip(prompts, answers, strict=True)]
    ids, mask = pad_sequences(seqs, pad_id)  # (B, L)
    logits = forward(merged, params, ids, mask).logits  # (B, L, V)
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids_k = teacher.get("ids")
    return answer_divergence(
        objective,
        logits,
        prompt_lengths,
        lengths.to(device),
        teacher["logprobs"].to(device),
        None if ids_k is None else ids_k.to(device).long(),
    )


def step_loss(
    merged: MergedModel,
    objective: Objective,
    batches: Mapping[int, Mapping[str, Tensor]],
    teachers: Mapping[int, Mapping[str, Tensor]],
    pad_id: int,
) -> tuple[Tensor, dict[int, Tensor]]:
    """The training loss sum_t teacher_forced_loss_t, one task's forward+backward at a time.

    Gradients accumulate on the merged tensors (``functional.accumulate_over_tasks``), so activation
    memory is one task's batch whatever the number of tasks.

    Args:
        merged: The merged model.
        objective: Divergence between expert log-probabilities and merged logits, per row.
        batches: Task index -> collated prompts (``input_ids``, ``attention_mask``, each (B_t, L_t)).
        teachers: Task index -> the batch's rows of that task's teacher cache.
        pad_id: Padding id.

    Returns:
        The loss to call ``backward()`` on (value: the summed task losses) and each task's detached loss.

    """
    return accumulate_over_tasks(
        merged.merged_params(),
        {
            t: (
                lambda p, t=t: teacher_forced_loss(
                    merged, p, objective, prompts_of(batches[t]), teachers[t], pad_id
                )
            )
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
