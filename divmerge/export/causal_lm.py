"""Export a merge of causal-LM experts as one plain Hugging Face causal LM.

Every weight of a causal-LM merge is merged (there are no per-task heads), so the export is the merged
model itself: ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``
load it, ``divmerge_export.json`` records the merge and ``README.md`` is a short model card. Like
``divmerge.export``, the directory is written beside the target and renamed into place, so a failed
export never leaves a half-written directory.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.experts.sources import resolve_source
from divmerge.experts.vocab import tokenizer_source
from divmerge.export.common import (
    CARD_FILE,
    EXPORT_FILE,
    FORMAT_VERSION,
    atomic_dir,
    check_target,
    load_base_config,
    load_tokenizer,
    relative_files,
)
from divmerge.export.model_card import jsonable


def export_causal_lm(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    base_source: str,
    out_dir: str | Path,
    summary: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write the merged causal LM, the base's tokenizer, a model card and metadata to ``out_dir``.

    Args:
        merged: The merged model of causal-LM experts.
        params: Every merged tensor by full name, e.g. ``merged.merged_params(table)``.
        base_source: Source of the base model: its config and tokenizer are exported with the weights.
        out_dir: Target directory; created atomically.
        summary: Method, ``experts`` (task -> source), coefficient statistics, ...: recorded in
            ``divmerge_export.json`` and the model card.
        overwrite: Replace a non-empty ``out_dir`` (the old one is removed only once the new one is done).

    Returns:
        The export directory.

    """
    out = Path(out_dir).expanduser().absolute()
    check_target(out, overwrite, base_source, summary)
    source = resolve_source(base_source)
    config = load_base_config(source, base_source)
    tokenizer = load_tokenizer(tokenizer_source(base_source, summary.get("experts", {})), base_source)
    dense = merged.dense_params(params)  # LoRA adapter experts' low-rank updates folded into the weights
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in dense.items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is embedding)
    if name in state and state[name].shape[0] != embedding.shape[0]:  # experts added tokens
        config.vocab_size = state[name].shape[0]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # the tied output embeddings take the (once merged) input embeddings
    missing = sorted(n for n, p in model.named_parameters() if p.is_meta)
    if missing:
        raise DivMergeError(
            f"The merged model lacks tensor {missing[0]!r} of the base architecture: pass the output of "
            "MergedModel.merged_params for experts fine-tuned from this base."
        )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD_FILE).write_text(_card(out, base_source, merged.task_names, summary), encoding="utf-8")
        info = {
            "format": "divmerge-export",
            "version": FORMAT_VERSION,
            "kind": "causal_lm",
            "base_source": base_source,
            "task_names": list(merged.task_names),
            "tasks": {},  # no per-task heads: the merged model answers every task
            "summary": jsonable(summary),
        }
        info["files"] = sorted([*relative_files(tmp), EXPORT_FILE])
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def _card(out: Path, base_source: str, tasks: list[str], summary: Mapping[str, Any]) -> str:
    """A short model card: what was merged and how to load it."""
    experts = summary.get("experts", {})
    lines = [f"- `{task}`: `{experts.get(task, '')}`" for task in tasks]
    return (
        f"# {out.name}\n\n"
        f"A {summary.get('method', 'merge')} of {len(tasks)} causal-LM experts fine-tuned from "
        f"`{base_source}`, made with divmerge (DivMerge, arXiv 2509.02108).\n\n"
        "## Experts\n\n" + "\n".join(lines) + "\n\n"
        "## How to load\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/{out.name}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("path/to/{out.name}")\n'
        "```\n\n"
        f"`{EXPORT_FILE}` records the merge summary and every file.\n"
    )
