"""Export a merged classifier: the merged backbone as a plain Hugging Face model, plus each task's own head.

Layout of an export directory::

    config.json, model.safetensors, tokenizer files   the merged backbone (``AutoModel.from_pretrained``)
    heads/<task>/head.safetensors, heads/<task>/config.json   each expert's unmerged head and its config
    divmerge_export.json                                tasks, backbone info, summary, file list
    README.md                                           model card

Everything is written into a temporary sibling directory and renamed into place, so an interrupted or
failed export never leaves a half-written directory behind. ``load_task_model`` rebuilds one task's
sequence-classification model (merged backbone + that task's head) with plain transformers.
"""

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import cached_file

from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError, first_line
from divmerge.experts.sources import resolve_source
from divmerge.export.common import (
    CARD_FILE,
    EXPORT_FILE,
    FORMAT_VERSION,
    HEAD_FILE,
    HEADS_DIR,
    SAFETENSORS_METADATA,
    WEIGHTS_FILE,
    atomic_dir,
    check_target,
    check_task_names,
    load_base_config,
    load_tokenizer,
    read_export_info,
    relative_files,
)
from divmerge.export.model_card import jsonable, model_card
from divmerge.quiet import quiet


def export_merged(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    base_source: str,
    out_dir: str | Path,
    summary: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write the merged backbone, every task's head, a model card and metadata to ``out_dir``.

    Args:
        merged: The merged model (its heads, skeletons, buffers and backbone prefix are used).
        params: Merged backbone tensors named ``<prefix>.<name>``, e.g. ``merged.merged_params(table)``.
            Backbone tensors it lacks are copied unchanged from the base checkpoint.
        base_source: Source of the base model (see ``resolve_source``): config and tokenizer come from it.
        out_dir: Target directory; created atomically.
        summary: Method, objective, granularity, ``coefficients`` (task -> stats, see
            ``coefficient_stats``), ``experts`` (task -> source), ...: goes into the model card and
            ``divmerge_export.json``.
        overwrite: Replace ``out_dir`` if it exists and is not empty (the old one is removed only once the
            new one is complete).

    Returns:
        The export directory.

    """
    out = Path(out_dir).expanduser().absolute()
    check_target(out, overwrite, base_source, summary)
    check_task_names(merged.task_names)
    source = resolve_source(base_source)
    config = load_base_config(source, base_source)
    tokenizer = load_tokenizer(source, base_source)
    with atomic_dir(out) as tmp:
        _write_export(tmp, merged, params, source, config, tokenizer, base_source, summary, out)
    return out


def load_task_model(export_dir: str | Path, task: str) -> PreTrainedModel:
    """Load one task's model from an export: the merged backbone with that task's own head.

    Args:
        export_dir: A directory written by ``export_merged``.
        task: The task (expert) name.

    Returns:
        The expert's sequence-classification class (its config: ``num_labels``, ``id2label``...) with
        the merged backbone and the task's head, in eval mode.

    """
    root = Path(export_dir).expanduser()
    info = read_export_info(root)
    tasks = info["tasks"]
    if task not in tasks:
        raise DivMergeError(f"The export at {str(root)!r} has no task {task!r}: choose one of {list(tasks)}.")
    entry = tasks[task]
    config = AutoConfig.from_pretrained(root / entry["dir"])
    dtype = getattr(torch, info["backbone"]["dtype"])
    with quiet():  # the head is reported missing from the backbone checkpoint: expected
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            root, config=config, dtype=dtype, output_loading_info=True
        )
    head = load_file(root / entry["head"])
    not_loaded = sorted(set(loading["missing_keys"]) - set(head))
    if not_loaded:
        raise DivMergeError(
            f"The export at {str(root)!r} lacks tensor {not_loaded[0]!r} of task {task!r}: export the "
            "model again."
        )
    result = model.load_state_dict(head, strict=False)
    if result.unexpected_keys:
        raise DivMergeError(
            f"Head tensor {result.unexpected_keys[0]!r} of task {task!r} does not fit "
            f"{type(model).__name__}: export the model again."
        )
    return model.eval()


def _write_export(
    tmp: Path,
    merged: MergedModel,
    params: Mapping[str, Tensor],
    source: str,
    config: PretrainedConfig,
    tokenizer: Any,
    base_source: str,
    summary: Mapping[str, Any],
    out: Path,
) -> None:
    """Write every file of the export into ``tmp``."""
    backbone_info = _write_backbone(tmp, merged, params, source, config)
    tokenizer.save_pretrained(tmp)
    dtype = getattr(torch, backbone_info["dtype"])
    tasks = {}
    for t, task in enumerate(merged.task_names):
        tasks[task] = _write_head(
            tmp, task, dict(merged.heads[t].items()), merged._skeletons[t].config, dtype
        )
    (tmp / CARD_FILE).write_text(
        model_card(out, base_source, backbone_info, tasks, summary), encoding="utf-8"
    )
    info = {
        "format": "divmerge-export",
        "version": FORMAT_VERSION,
        "base_source": base_source,
        "task_names": list(merged.task_names),
        "backbone": backbone_info,
        "tasks": tasks,
        "summary": jsonable(summary),
    }
    info["files"] = sorted([*relative_files(tmp), EXPORT_FILE])
    (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _write_backbone(
    tmp: Path, merged: MergedModel, params: Mapping[str, Tensor], source: str, config: PretrainedConfig
) -> dict[str, Any]:
    """Save the merged backbone (``model.safetensors`` + ``config.json``) and describe it."""
    skeleton = _meta_backbone(config)
    expected = _state_names(skeleton)  # name -> meta tensor, in state-dict order
    given = _strip_prefix(merged.dense_params(params), merged.prefix, expected)  # LoRA folded in
    prefix_len = len(merged.prefix) + 1
    buffers = {n[prefix_len:]: b for n, b in merged.buffers_.items()}
    missing = [n for n in expected if n not in given and n not in buffers]
    from_base = _read_base_tensors(source, missing, merged.prefix)
    state: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, meta in expected.items():
        tensor = given.get(name, buffers.get(name, from_base.get(name)))
        if tuple(tensor.shape) != tuple(meta.shape):
            raise DivMergeError(
                f"Merged tensor {merged.prefix}.{name} has shape {tuple(tensor.shape)} but the base model "
                f"expects {tuple(meta.shape)}: merge with experts fine-tuned from this base."
            )
        state[name] = _saveable(tensor, storages)
    dtype = _main_dtype(state)
    save_file(state, tmp / WEIGHTS_FILE, metadata=SAFETENSORS_METADATA)
    del state
    config = copy.deepcopy(config)
    config.architectures = [type(skeleton).__name__]
    config.dtype = dtype
    config.save_pretrained(tmp)
    return {
        "weights": WEIGHTS_FILE,
        "architecture": type(skeleton).__name__,
        "model_type": config.model_type,
        "prefix": merged.prefix,
        "dtype": str(dtype).removeprefix("torch."),
        "num_tensors": len(expected),
        "merged": sorted(given),
        "from_base": sorted(from_base),
    }


def _meta_backbone(config: PretrainedConfig) -> PreTrainedModel:
    """The base ``AutoModel`` on the meta device: names and shapes only, no memory."""
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _state_names(model: PreTrainedModel) -> dict[str, Tensor]:
    """State-dict names -> tensors, keeping one name per tied (shared) tensor."""
    names: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        names[name] = tensor
    return names


def _strip_prefix(params: Mapping[str, Tensor], prefix: str, expected: Mapping[str, Tensor]) -> dict:
    """``<prefix>.<name>`` -> ``<name>``, checking every name belongs to the backbone."""
    stripped = {}
    for name, tensor in params.items():
        short = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None
        if short is None or short not in expected:
            raise DivMergeError(
                f"Merged tensor {name!r} is not a tensor of the base model's backbone ({prefix}.*): pass "
                "the output of MergedModel.merged_params."
            )
        stripped[short] = tensor
    return stripped


def _saveable(tensor: Tensor, storages: set[int]) -> Tensor:
    """Detached, contiguous, on CPU; cloned only if it shares storage with a tensor already taken."""
    tensor = tensor.detach().to("cpu").contiguous()
    pointer = tensor.untyped_storage().data_ptr()
    if pointer in storages:
        return tensor.clone()
    storages.add(pointer)
    return tensor


def _main_dtype(state: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype of most floating-point elements (float32 if there are none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _read_base_tensors(source: str, names: Sequence[str], prefix: str) -> dict[str, Tensor]:
    """Base backbone tensors that were not merged, read lazily from the base checkpoint.

    Tensors are read one by one from safetensors files; only if some cannot be found that way (a
    ``.bin`` checkpoint, renamed keys) is the base model loaded whole.
    """
    if not names:
        return {}
    found: dict[str, Tensor] = {}
    for file in _safetensors_files(source):
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            for name in names:
                key = next((k for k in (name, f"{prefix}.{name}") if k in keys), None)
                if name not in found and key is not None:
                    found[name] = handle.get_tensor(key)
    rest = [n for n in names if n not in found]
    if rest:
        found |= _load_base_whole(source, rest)
    return found


def _safetensors_files(source: str) -> list[Path]:
    """The base checkpoint's safetensors files (single or sharded); empty if there are none."""
    options = {
        "_raise_exceptions_for_missing_entries": False,
        "_raise_exceptions_for_connection_errors": False,
    }
    try:
        single = cached_file(source, WEIGHTS_FILE, **options)
        if single:
            return [Path(single)]
        index = cached_file(source, "model.safetensors.index.json", **options)
        if not index:
            return []
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        files = [cached_file(source, shard, **options) for shard in shards]
    except (OSError, ValueError, KeyError):
        return []
    return [Path(f) for f in files if f]


def _load_base_whole(source: str, names: Sequence[str]) -> dict[str, Tensor]:
    """Load the base model once and take ``names`` from it (the fallback of ``_read_base_tensors``)."""
    try:
        with quiet():
            model = AutoModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise DivMergeError(
            f"Could not read the base model from {source!r} ({first_line(err)}): the export copies its "
            "unmerged tensors; give the base model's local directory."
        ) from err
    state = model.state_dict()
    lacking = [n for n in names if n not in state]
    if lacking:
        raise DivMergeError(f"The base model at {source!r} has no tensor {lacking[0]!r}: check model.base.")
    return {n: state[n].detach().clone() for n in names}


def _write_head(
    tmp: Path, task: str, head: Mapping[str, Tensor], config: PretrainedConfig, dtype: torch.dtype
) -> dict[str, Any]:
    """Save one task's head tensors and its expert's config under ``heads/<task>/``; describe them."""
    folder = tmp / HEADS_DIR / task
    folder.mkdir(parents=True)
    storages: set[int] = set()
    save_file(
        {n: _saveable(t, storages) for n, t in head.items()},
        folder / HEAD_FILE,
        metadata=SAFETENSORS_METADATA,
    )
    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(folder)
    relative = f"{HEADS_DIR}/{task}"
    return {
        "dir": relative,
        "head": f"{relative}/{HEAD_FILE}",
        "config": f"{relative}/config.json",
        "architecture": (config.architectures or [None])[0],
        "num_labels": int(config.num_labels),
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "tensors": sorted(head),
    }
