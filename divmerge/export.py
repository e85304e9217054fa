"""Export a merged model: the merged backbone as a plain Hugging Face model, plus each task's own head.

Layout of an export directory::

    config.json, model.safetensors, tokenizer files   the merged backbone (``AutoModel.from_pretrained``)
    heads/<task>/head.safetensors, heads/<task>/config.json   each expert's unmerged head and its config
    divmerge_export.json                                tasks, backbone info, summary, file list
    README.md                                           model card

Everything is written into a temporary sibling directory and renamed into place, so an interrupted or
failed export never leaves a half-written directory behind. ``load_task_model`` rebuilds one task's
sequence-classification model (merged backbone + that task's head) with plain transformers.
"""

import contextlib
import copy
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
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
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from divmerge.errors import DivMergeError
from divmerge.experts import resolve_source
from divmerge.functional import MergedModel

EXPORT_FILE = "divmerge_export.json"
WEIGHTS_FILE = "model.safetensors"
HEADS_DIR = "heads"
HEAD_FILE = "head.safetensors"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def coefficient_stats(table: Tensor, task_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-task summary of a coefficient table, for the export summary and model card.

    Args:
        table: Coefficients, shape (T, G).
        task_names: The T task names, in table order.

    Returns:
        Task name -> ``{"mean", "min", "max", "std"}`` over that task's G coefficients.

    """
    table = table.detach().to(torch.float64).cpu()
    stats = {}
    for t, task in enumerate(task_names):
        row = table[t]  # (G,)
        std = row.std(unbiased=False).item() if row.numel() > 1 else 0.0
        stats[task] = {
            "mean": row.mean().item(),
            "min": row.min().item(),
            "max": row.max().item(),
            "std": std,
        }
    return stats


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
    _check_task_names(merged.task_names)
    source = resolve_source(base_source)
    config = _load_base_config(source, base_source)
    tokenizer = _load_tokenizer(source, base_source)
    with atomic_dir(out) as tmp:
        _write_export(tmp, merged, params, source, config, tokenizer, base_source, summary, out)
    return out


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A fresh sibling directory of ``out`` to write into: moved into place on success, removed on error.

    Args:
        out: The final directory (absolute).

    Yields:
        The temporary directory.

    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: that makes it private (0o700), while an export should follow the umask
    try:
        yield tmp
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_export_info(export_dir: str | Path) -> dict[str, Any]:
    """Read an export's ``divmerge_export.json``.

    Args:
        export_dir: A directory written by ``export_merged``.

    Returns:
        The parsed metadata.

    """
    path = Path(export_dir).expanduser() / EXPORT_FILE
    if not path.is_file():
        raise DivMergeError(
            f"{str(export_dir)!r} is not a divmerge export (no {EXPORT_FILE}): point to a directory "
            "written by divmerge.export.export_merged."
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DivMergeError(f"{str(path)!r} is unreadable ({err}): export the model again.") from err
    if not isinstance(info, dict) or info.get("version") != FORMAT_VERSION or "tasks" not in info:
        raise DivMergeError(
            f"{str(path)!r} is not a divmerge export of format version {FORMAT_VERSION}: export the "
            "model again with this version of divmerge."
        )
    return info


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
    with _quiet_transformers():  # the head is reported missing from the backbone checkpoint: expected
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


# --------------------------------------------------------------------------------------------- checks


def check_target(out: Path, overwrite: bool, base_source: str, summary: Mapping[str, Any]) -> None:
    """Refuse a non-empty target without ``overwrite``, and targets whose removal would destroy inputs."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DivMergeError(f"{str(out)!r} exists and is not a directory: choose another directory.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise DivMergeError(
            f"Export directory {str(out)!r} exists and is not empty: pass --overwrite or choose another "
            "directory."
        )
    real = out.resolve()
    protected = [Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve()]
    if any(real == p or p.is_relative_to(real) for p in protected):
        raise DivMergeError(
            f"Refusing to overwrite {str(out)!r}: it holds the home or working directory; choose a "
            "dedicated export directory."
        )
    for source in _local_sources(base_source, summary):
        if source.is_relative_to(real):
            raise DivMergeError(
                f"Refusing to overwrite {str(out)!r}: it contains the input model {str(source)!r}; choose "
                "another export directory."
            )


def _local_sources(base_source: str, summary: Mapping[str, Any]) -> list[Path]:
    """Resolved local paths among the base source and the summary's expert sources."""
    sources = [base_source]
    experts = summary.get("experts")
    if isinstance(experts, Mapping):
        sources += [s for s in experts.values() if isinstance(s, str)]
    paths = []
    for source in sources:
        path = Path(source).expanduser()
        if path.exists():
            paths.append(path.resolve())
    return paths


def _check_task_names(task_names: Sequence[str]) -> None:
    """Task names become directory names under ``heads/``: they must be plain, safe path components."""
    for task in task_names:
        bad = not task or task in (".", "..") or any(c in task for c in ("/", "\\", "\0", os.sep))
        if bad:
            raise DivMergeError(
                f"Task name {task!r} cannot be used as a directory name: rename the expert in the config "
                "(no slashes, not '.' or '..')."
            )


def _load_base_config(source: str, base_source: str) -> PretrainedConfig:
    """The base model's config, with a clear error."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise DivMergeError(
            f"Could not load the base config from {base_source!r} ({_first_line(err)}): give the base "
            "model's local directory, or a hub id with network access."
        ) from err


def _load_tokenizer(source: str, base_source: str) -> Any:
    """The base model's tokenizer, with a clear error."""
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DivMergeError(
            f"Could not load a tokenizer from the base {base_source!r} ({_first_line(err)}): the export "
            "ships the base's tokenizer; save one next to the base model (tokenizer.save_pretrained)."
        ) from err


def _first_line(err: BaseException) -> str:
    """First line of an exception message, or its type name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------- writing


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
        _model_card(out, base_source, backbone_info, tasks, summary), encoding="utf-8"
    )
    info = {
        "format": "divmerge-export",
        "version": FORMAT_VERSION,
        "base_source": base_source,
        "task_names": list(merged.task_names),
        "backbone": backbone_info,
        "tasks": tasks,
        "summary": _jsonable(summary),
    }
    info["files"] = sorted([*_relative_files(tmp), EXPORT_FILE])
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
    save_file(state, tmp / WEIGHTS_FILE, metadata=_SAFETENSORS_METADATA)
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
        with _quiet_transformers():
            model = AutoModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise DivMergeError(
            f"Could not read the base model from {source!r} ({_first_line(err)}): the export copies its "
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
        metadata=_SAFETENSORS_METADATA,
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


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is removed only after that succeeds."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _relative_files(root: Path) -> list[str]:
    """Every file under ``root``, relative, with forward slashes."""
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------- model card


def _model_card(
    out: Path,
    base_source: str,
    backbone: Mapping[str, Any],
    tasks: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
) -> str:
    """The README.md model card."""
    method = str(summary.get("method", "unspecified"))
    sections = [
        "---\nlibrary_name: transformers\ntags:\n- divmerge\n- model-merging\n- merge\n---\n",
        f"# Merged model ({_md(method)}, {len(tasks)} experts)\n\n"
        f"A {backbone['model_type']} backbone merged by divmerge from {len(tasks)} fine-tuned experts, "
        "with each expert's own (unmerged) classification head.\n",
        _card_experts(tasks, summary),
        _card_method(method, base_source, backbone, summary),
        _card_coefficients(tasks, summary),
        _card_details(summary),
        _card_usage(out, next(iter(tasks), "<task>")),
    ]
    return "\n".join(s for s in sections if s)


def _card_experts(tasks: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """Experts table: task, source, labels, head directory."""
    experts = summary.get("experts")
    experts = experts if isinstance(experts, Mapping) else {}
    rows = ["## Experts\n", "| Task | Source | Labels | Head |", "|---|---|---|---|"]
    for task, entry in tasks.items():
        labels = ", ".join(str(v) for v in entry["id2label"].values())
        source = experts.get(task, "(not given)")
        rows.append(
            f"| {_md(task)} | {_md(source)} | {entry['num_labels']} ({_md(labels)}) | `{entry['dir']}/` |"
        )
    return "\n".join(rows) + "\n"


def _card_method(method: str, base_source: str, backbone: Mapping[str, Any], summary: Mapping) -> str:
    """Method section: method, objective, granularity, base model, merged tensors."""
    lines = ["## Method\n", f"- Method: {_md(method)}"]
    for key in ("objective", "granularity"):
        if key in summary:
            lines.append(f"- {key.capitalize()}: {_md(summary[key])}")
    lines.append(f"- Base model: {_md(base_source)}")
    lines.append(
        f"- Backbone: `{backbone['architecture']}` ({backbone['dtype']}), {len(backbone['merged'])} merged "
        f"tensors, {len(backbone['from_base'])} copied unchanged from the base"
    )
    return "\n".join(lines) + "\n"


def _card_coefficients(tasks: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """Coefficient statistics per task, if the summary has them."""
    stats = summary.get("coefficients")
    if not isinstance(stats, Mapping) or not stats:
        return "## Coefficients\n\nNo coefficient summary was given.\n"
    keys: list[str] = []
    for entry in stats.values():
        if isinstance(entry, Mapping):
            keys += [k for k in entry if k not in keys]
    if not keys:
        return f"## Coefficients\n\n{_md(stats)}\n"
    rows = ["## Coefficients\n", "| Task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for task in [*tasks, *(t for t in stats if t not in tasks)]:
        entry = stats.get(task)
        if isinstance(entry, Mapping):
            rows.append(f"| {_md(task)} | " + " | ".join(_number(entry.get(k)) for k in keys) + " |")
    return "\n".join(rows) + "\n"


def _card_details(summary: Mapping[str, Any]) -> str:
    """Every other summary entry, one line each."""
    shown = {"method", "objective", "granularity", "coefficients", "experts"}
    lines = [f"- {_md(k)}: {_md(_compact(v))}" for k, v in summary.items() if k not in shown]
    return "## Details\n\n" + "\n".join(lines) + "\n" if lines else ""


def _card_usage(out: Path, task: str) -> str:
    """How to load the backbone and a task model."""
    path = f"path/to/{out.name}"
    return (
        "## How to load\n\n"
        "The backbone is a plain Hugging Face model:\n\n"
        "```python\n"
        "from transformers import AutoModel, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")\n'
        f'backbone = AutoModel.from_pretrained("{path}")\n'
        "```\n\n"
        "A task's classifier (merged backbone + that expert's head), with divmerge installed:\n\n"
        "```python\n"
        "from divmerge.export import load_task_model\n\n"
        f'model = load_task_model("{path}", "{task}")  # AutoModelForSequenceClassification, eval mode\n'
        "```\n\n"
        f"`{EXPORT_FILE}` lists the tasks, the backbone's tensors, the merge summary and every file.\n"
    )


def _md(value: Any) -> str:
    """A value as one line of Markdown table text."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> str:
    """Format a statistic for the card."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return _md("" if value is None else value)


def _compact(value: Any) -> str:
    """A JSON-ish single-line rendering of a summary value."""
    value = _jsonable(value)
    return value if isinstance(value, str) else json.dumps(value)


def _jsonable(value: Any) -> Any:
    """Convert a summary value to JSON-serializable data (tensors, paths, tuples, numpy scalars...)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        with contextlib.suppress(Exception):
            return _jsonable(value.item())
    return str(value)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars for a moment, restoring them after."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
