"""The classification training step as the step-cost benchmarks time it, its inputs and its timers."""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import offline  # noqa: F401  (offline and quiet before transformers loads)
from benchmarks.common.experts import SYNTH_SEP
from divmerge.core.merged_model import MergedModel
from divmerge.engine import DEFAULT_LR, Merger
from divmerge.families.classification import BackbonePass, Classification, task_logits

Batches = dict[int, dict[str, Tensor]]


def task_texts(task: str, count: int) -> list[str] | None:
    """``count`` texts of a demo task (the source task for a synthetic one); None for other tasks.

    A synthetic expert ``<task>~<j>`` gets that task's texts from a different offset.
    """
    from divmerge.zoo import demo as zoo

    source, _, index = task.partition(SYNTH_SEP)
    if source not in zoo.DEMO_TASKS:
        return None
    texts = zoo.load_demo_task(source).texts
    start = (int(index) * count if index else 0) % max(1, len(texts) - count)
    return texts[start : start + count]


def make_batches(
    tokenizer: Any, task_names: Sequence[str], batch_size: int, seq_len: int, vocab_size: int, seed: int = 0
) -> Batches:
    """One batch per task, every row exactly ``seq_len`` tokens.

    Demo tasks use real texts (padded / truncated to ``seq_len``); other tasks, or a missing tokenizer,
    use random token ids with a full attention mask.

    Args:
        tokenizer: The base tokenizer, or None.
        task_names: Task names in expert order.
        batch_size: Examples per task.
        seq_len: Tokens per example.
        vocab_size: Upper bound for random token ids.
        seed: Seed of the random ids.

    Returns:
        Task index -> ``input_ids`` / ``attention_mask``, each (batch_size, seq_len).

    """
    gen = torch.Generator().manual_seed(seed)
    batches: Batches = {}
    for t, task in enumerate(task_names):
        texts = task_texts(task, batch_size) if tokenizer is not None else None
        if texts is not None and len(texts) == batch_size:
            enc = tokenizer(
                texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
            )
            batches[t] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        else:
            ids = torch.randint(1000, vocab_size, (batch_size, seq_len), generator=gen)
            batches[t] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return batches


@torch.no_grad()
def teacher_logprobs(merged: MergedModel, batches: Batches) -> dict[int, Tensor]:
    """Each expert's log-probabilities on its own batch (what the teacher cache stores)."""
    out = {}
    for t, batch in batches.items():
        params = merged.merged_params(merged.one_hot_table(t))
        out[t] = torch.log_softmax(task_logits(merged, t, params, **batch), dim=-1)  # (B, C_t)
    return out


def make_divmerge_step(
    merged: MergedModel,
    batches: Batches,
    teachers: Mapping[int, Tensor] | None,
    lr: float = DEFAULT_LR,
    backbone_pass: BackbonePass = "per_task",
) -> Callable[[], float]:
    """One divmerge step closure (the training step's code); ``teachers=None`` recomputes the experts.

    Args:
        merged: The merged model (its coefficients are trained).
        batches: Task index -> inputs.
        teachers: Cached expert log-probabilities per task, or None for the naive step.
        lr: Adam learning rate.
        backbone_pass: ``per_task`` or ``joint`` (see ``divmerge.families.classification.step_loss``).

    Returns:
        A closure running one step and returning the loss.

    """
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=lr)
    engine = Merger.for_model(merged, Classification(), backbone_pass=backbone_pass)
    rows = {merged.task_names[t]: {**b, "idx": torch.arange(len(b["input_ids"]))} for t, b in batches.items()}

    def step() -> float:
        targets = teachers if teachers is not None else teacher_logprobs(merged, batches)
        engine.teachers = {(merged.task_names[t], "unlabelled"): v for t, v in targets.items()}
        optimizer.zero_grad(set_to_none=True)
        loss, _ = engine.step_loss(rows)  # the training step's own code
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def time_steps(step: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Wall time (``time.perf_counter``) of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def interleaved_times(
    steps: Mapping[str, Callable[[], object]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Wall times of several step functions run in turn, round after round.

    Interleaving makes each round's steps see the same background load, so their ratio stays meaningful
    on a machine whose load changes over time (the medians of separate runs would not).

    Args:
        steps: Name -> step closure.
        rounds: Timed rounds (one call of every closure each).
        warmup: Untimed rounds first.

    Returns:
        Name -> the ``rounds`` times in seconds.

    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times
