"""Expert sets the benchmarks measure: real experts extended by synthetic ones, synthetic full and LoRA
experts written to disk, and the generative demo experts by source."""

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import offline  # noqa: F401  (offline and quiet before transformers loads)
from divmerge.core.expert_set import ExpertSet
from divmerge.experts.sources import resolve_source
from divmerge.families import load_experts
from divmerge.zoo import resolve_model

SYNTH_SEP = "~"  # synthetic expert names: "<source task>~<index>"
TASKS = ("rt", "sms_spam", "trec", "bbc_headline")  # the generative demo experts the memory benchmarks load


def synthesize_experts(experts: ExpertSet, num_tasks: int, noise: float = 0.1, seed: int = 0) -> ExpertSet:
    """Extend an expert set to ``num_tasks`` experts by reusing real task vectors with noise.

    Synthetic expert j (j >= k real ones) gets tau_{j mod k} + noise * std(tau_{j mod k}) * N(0, 1) for
    every tensor, and the head, skeleton and number of labels of expert ``j mod k``; its name is
    ``<source task>~<j>``. The stacked task vectors are rebuilt one tensor at a time and the old stack
    of that tensor is released from ``experts`` immediately, so the transient overhead is one tensor's
    stack, not a second copy of all task vectors. ``experts`` must not be used afterwards.

    Args:
        experts: The real experts (consumed).
        num_tasks: Wanted number of experts; at least ``experts.num_tasks``.
        noise: Noise scale relative to each source tensor's standard deviation.
        seed: Seed of the noise.

    Returns:
        An expert set with ``num_tasks`` experts (``experts`` itself if no expert is missing).

    """
    k = experts.num_tasks
    if num_tasks <= k:
        return experts
    gen = torch.Generator().manual_seed(seed)
    sources = [j % k for j in range(k, num_tasks)]
    stacked = {}
    for name in list(experts.task_vectors):
        old = experts.task_vectors.pop(name)  # (k, *shape); released at the end of this iteration
        new = old.new_empty((num_tasks, *old.shape[1:]))  # (T, *shape)
        new[:k] = old
        for j, src in enumerate(sources, start=k):
            tau = old[src]
            scale = noise * float(tau.float().std()) if tau.numel() > 1 else 0.0
            new[j] = tau + scale * torch.randn(tau.shape, generator=gen, dtype=tau.dtype)
        stacked[name] = new
        del old
    names = [
        *experts.task_names,
        *(f"{experts.task_names[s]}{SYNTH_SEP}{j}" for j, s in enumerate(sources, k)),
    ]

    def extend(values: list[Any]) -> list[Any]:  # per-task lists: real experts, synthetic ones, then others
        return [*values[:k], *(values[s] for s in sources), *values[k:]]

    digests = extend(experts.task_digests)
    digests[k:num_tasks] = [
        hashlib.sha256(f"{experts.task_digests[s]}|{j}".encode()).hexdigest()[:16]
        for j, s in enumerate(sources, k)
    ]
    return dataclasses.replace(
        experts,
        task_names=names,
        task_vectors=stacked,
        heads=extend(experts.heads),
        skeletons=extend(experts.skeletons),
        num_labels=extend(experts.num_labels),
        task_digests=digests,
        fingerprint=hashlib.sha256(f"{experts.fingerprint}|synthetic|{num_tasks}".encode()).hexdigest()[:16],
    )


def load_synthetic_experts(
    base: str,
    experts: Mapping[str, str],
    num_tasks: int,
    noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> ExpertSet:
    """Load the first ``num_tasks`` experts, synthesising the ones beyond ``len(experts)``.

    Args:
        base: Source of the base model (``zoo:minilm`` or a directory).
        experts: Task name -> expert source, in order.
        num_tasks: Number of experts T wanted.
        noise: Relative noise of synthetic experts (see :func:`synthesize_experts`).
        seed: Seed of that noise.
        dtype: Storage dtype of the task vectors (None: the base's), as ``load_experts``.

    Returns:
        The expert set with ``num_tasks`` experts.

    """
    real = dict(list(experts.items())[:num_tasks])
    return synthesize_experts(load_experts(base, real, task_vector_dtype=dtype), num_tasks, noise, seed)


def write_experts(
    base: str, out: Path, count: int, rank: int, targets: Sequence[str]
) -> dict[str, list[str]]:
    """Write ``count`` synthetic full experts and ``count`` LoRA adapters over ``base`` under ``out``.

    Returns:
        ``{"full": [dirs], "lora": [dirs]}``.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    path = resolve_source(base)
    dirs: dict[str, list[str]] = {"full": [], "lora": []}
    for i in range(count):
        torch.manual_seed(i)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        with torch.no_grad():
            for p in model.base_model.parameters():
                if p.is_floating_point() and p.numel() > 1:
                    p.add_(1e-3 * p.std() * torch.randn_like(p))
        model.save_pretrained(out / f"full{i}")
        dirs["full"].append(str(out / f"full{i}"))
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, target_modules=list(targets)
        )
        adapter = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.01)
        adapter.save_pretrained(out / f"lora{i}")
        dirs["lora"].append(str(out / f"lora{i}"))
    return dirs


def expert_sources(text: str) -> dict[str, str]:
    """Comma-separated expert sources -> ``expert<i>``: source; zoo SmolLM2 experts are built (cached)."""
    sources = [s for s in text.split(",") if s]
    return {
        f"expert{i}": resolve_model(s[len("zoo:") :], build=True) if s.startswith("zoo:smollm2/") else s
        for i, s in enumerate(sources)
    }
