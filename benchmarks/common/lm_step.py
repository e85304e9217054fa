"""The causal-LM training step the memory benchmarks run (per-block, sharded, GPU), and what a merged
model stores and materialises."""

from collections.abc import Mapping
from typing import Any

import torch

from benchmarks.common import offline  # noqa: F401  (offline and quiet before transformers loads)
from benchmarks.common.measure import MB
from divmerge.core import per_block
from divmerge.core.merge import accumulate_over_tasks
from divmerge.core.merged_model import MergedModel
from divmerge.families import causal_lm
from divmerge.objectives import js_divergence

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""Lightning precision -> the autocast dtype of the forward (None: float32 throughout)."""


def step_closure(merged: MergedModel, config: Mapping[str, Any]) -> Any:
    """One training step of ``merged`` on fixed random prompts and teachers (see the module docstring).

    ``config`` may name a ``device`` (default: where the merged model is), a Lightning ``precision``
    (``AUTOCAST``'s keys; default 32-true) for the forward (the merge itself stays float32) and a
    ``backbone_pass`` (``per_task``, default, or ``joint``: every task's prompts in one forward).
    """
    g = torch.Generator().manual_seed(0)
    device = torch.device(config.get("device", "cpu"))
    dtype = AUTOCAST[config.get("precision", "32-true")]
    vocab = int(merged.skeleton(0).config.vocab_size)
    batch, length, answer = int(config["batch_size"]), int(config["seq_len"]), int(config["answer"])
    tasks = range(len(merged.task_names))
    ids = {t: torch.randint(0, vocab, (batch, length), generator=g).to(device) for t in tasks}  # (B, L)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    teachers = {  # (B * A, V)
        t: torch.log_softmax(torch.randn(batch * answer, vocab, generator=g), -1).to(device) for t in tasks
    }
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=1e-3)

    def task_loss(t: int, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = causal_lm.forward(
                merged, params, ids[t], mask, logits_to_keep=answer
            ).logits  # (B, A, V)
        return js_divergence(teachers[t], logits.float().reshape(-1, vocab)).mean()

    def joint_loss(params: Mapping[str, torch.Tensor]) -> torch.Tensor:  # every task in one forward
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = causal_lm.forward(
                merged,
                params,
                torch.cat([ids[t] for t in tasks]),
                mask.repeat(len(tasks), 1),
                logits_to_keep=answer,
            ).logits  # (T * B, A, V)
        rows = logits.float().reshape(len(tasks), -1, vocab)  # (T, B * A, V)
        return sum(js_divergence(teachers[t], rows[t]).mean() for t in tasks)

    def step() -> None:
        if config.get("backbone_pass", "per_task") == "joint":
            loss = joint_loss(merged.step_params())
        else:
            loss, _ = accumulate_over_tasks(
                merged.step_params(), {t: (lambda p, t=t: task_loss(t, p)) for t in tasks}
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def sizes(merged: MergedModel) -> dict[str, float]:
    """Stored, merged and largest-block bytes of ``merged``, MB."""
    stores = (merged.base, merged.task_vectors)
    stored = sum(t.numel() * t.element_size() for store in stores for _, t in store.items())
    numel = {merged.full_name(n): merged.base[n].numel() for n in merged.names}
    blocks: dict[str, int] = {}
    for path in per_block.block_paths(merged.skeleton(0)):
        blocks[path] = sum(v for n, v in numel.items() if per_block.in_block(n, path))
    return {
        "storage_mb": stored / MB,
        "merged_mb": 4 * sum(numel.values()) / MB,
        "block_mb": 4 * max(blocks.values(), default=0) / MB,
    }
