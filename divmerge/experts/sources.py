"""Where models come from: a config source (directory, hub id, ``scheme:name``) -> something to load.

Schemes such as ``zoo:`` (the offline demo, ``divmerge.zoo``) are registered from above with
:func:`register_scheme`, so this layer knows nothing of them.
"""

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from divmerge.errors import DivMergeError, first_line
from divmerge.experts.adapters import ADAPTER_CONFIG, is_adapter
from divmerge.experts.gguf import GGUF_SUFFIX, convert_gguf, is_gguf_file
from divmerge.hub import check_available

_LOCAL_PREFIXES = ("/", "./", "../", "~")
_SCHEME = re.compile(r"^([a-z][a-z0-9_]*:)(?!//)")
SchemeResolver = Callable[[str, bool], str]
"""(name after the scheme, build) -> a local path or hub id."""
_SCHEMES: dict[str, SchemeResolver] = {}


def register_scheme(prefix: str, resolver: SchemeResolver) -> None:
    """Make sources ``<prefix><name>`` resolve through ``resolver`` (e.g. ``zoo:`` for the demo).

    Args:
        prefix: The scheme with its colon, e.g. ``"zoo:"``.
        resolver: (name, build) -> local path or hub id; ``build`` asks it to create a missing model.
    """
    _SCHEMES[prefix] = resolver


def default_cache_dir() -> Path:
    """Return the cache directory: ``$DIVMERGE_CACHE`` if set, else ``~/.cache/divmerge``.

    Returns:
        The cache directory (not created).

    """
    env = os.environ.get("DIVMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "divmerge"


def resolve_source(source: str, build: bool = False) -> str:
    """Turn a config source into something ``from_pretrained`` loads.

    Args:
        source: A local directory (a model or a peft adapter), a hub id, a GGUF file
            (``/folder/name.gguf``, converted once into ``<cache>/gguf/``, see :mod:`divmerge.experts.gguf`;
            a directory holding exactly one ``.gguf`` file and no ``config.json`` stands for that file), or
            ``<scheme>:<name>`` for a registered scheme (``zoo:minilm``, the packaged demo base;
            ``zoo:smollm2``, the packaged SmolLM2-135M-Instruct GGUF base; ``zoo:<task>``, the demo expert
            for that task; ``zoo:lora/<task>``, its LoRA adapter twin).
        build: For a scheme that builds models (the demo zoo), build a missing one.

    Returns:
        A local path or hub id.

    """
    scheme = _SCHEME.match(source)
    if scheme and scheme.group(1) in _SCHEMES:
        return _SCHEMES[scheme.group(1)](source[scheme.end() :], build)
    if scheme and not Path(source).expanduser().exists():
        raise DivMergeError(
            f"Source {source!r} has the scheme {scheme.group(1)!r}, which nothing registered: use a "
            f"directory or hub id, or one of {sorted(_SCHEMES)} (import divmerge.zoo for zoo:)."
        )
    path = Path(source).expanduser()
    gguf = _gguf_file(path)
    if gguf is not None:
        return str(convert_gguf(gguf, default_cache_dir()))
    if path.exists():
        if not path.is_dir() or not ((path / "config.json").is_file() or is_adapter(path)):
            raise DivMergeError(
                f"{source!r} is not a Hugging Face model or peft adapter directory (no config.json or "
                f"{ADAPTER_CONFIG}): point to the folder written by save_pretrained."
            )
        _refuse_pickled(path, source)
        return str(path)
    if source.startswith(_LOCAL_PREFIXES) or os.sep in source.strip(os.sep).replace("/", "", 1):
        raise DivMergeError(f"Model directory {source!r} does not exist: fix the path in the config.")
    check_available(source, "model", "model")
    return source  # a hub id, cached or reachable


_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_SAFE_ADAPTER, _PICKLED_ADAPTER = "adapter_model.safetensors", "adapter_model.bin"


def _refuse_pickled(path: Path, source: str) -> None:
    """Refuse a directory whose weights exist only as a pickled ``.bin``, without ever opening it.

    Unpickling a received file can run code (and ``torch.load``'s safe mode is no promise for a file
    nobody checked), so divmerge reads weights from safetensors only.
    """
    adapter = is_adapter(path)
    safe, pickled = ((_SAFE_ADAPTER,), (_PICKLED_ADAPTER,)) if adapter else (_SAFE_WEIGHTS, _PICKLED_WEIGHTS)
    found = next((name for name in pickled if (path / name).is_file()), None)
    if found is None or any((path / name).is_file() for name in safe):
        return
    writes = _SAFE_ADAPTER if adapter else "model.safetensors"
    raise DivMergeError(
        f"{source!r} holds its weights only as a pickled {found}, which could run code when loaded, so "
        f"divmerge does not open it: convert it to safetensors (where you trust the file, load it and call "
        f"save_pretrained, which writes {writes}) and point to the converted folder."
    )


def has_weights(path: str | Path) -> bool:
    """Whether a local model or adapter directory holds a weights file (safetensors or pickled)."""
    names = (*_SAFE_WEIGHTS, *_PICKLED_WEIGHTS, _SAFE_ADAPTER, _PICKLED_ADAPTER)
    return any((Path(path) / name).is_file() for name in names)


def load_config(path: str, what: str) -> PretrainedConfig:
    """A model directory's (or cached hub id's) config, with one clear error when it is unreadable.

    Args:
        path: A resolved source (see :func:`resolve_source`).
        what: How to name the model in an error, e.g. ``"the base model"``.

    Returns:
        The config.
    """
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise DivMergeError(
            f"Could not read the config of {what} at {path!r} ({first_line(err)}): its config.json is "
            "damaged or not a transformers config; save or copy that model again."
        ) from err


def _gguf_file(path: Path) -> Path | None:
    """Return the GGUF file a source path stands for, or None.

    That is a ``.gguf`` path (existing or not: :func:`convert_gguf` names the problem), a GGUF file of
    any name, or a directory without ``config.json`` holding exactly one ``.gguf`` file.
    """
    if path.suffix.lower() == GGUF_SUFFIX or is_gguf_file(path):
        return path
    if not path.is_dir() or (path / "config.json").is_file() or is_adapter(path):
        return None
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found[:3]) + (", ..." if len(found) > 3 else "")
        raise DivMergeError(
            f"{str(path)!r} holds {len(found)} GGUF files ({names}): give the path of one of them."
        )
    return found[0] if found else None


def load_pretrained(loader: type, source: str, what: str, complete: bool = False) -> PreTrainedModel:
    """Load a model in float32 with one clear error instead of transformers' tracebacks.

    Args:
        loader: A transformers auto class (``AutoModel``, ``AutoModelForCausalLM``, ...).
        source: Its source (see :func:`resolve_source`).
        what: How to name it in an error, e.g. ``"expert 'rt'"``.
        complete: Refuse a checkpoint that lacks some of the model's weights (transformers would
            initialise them at random, e.g. the classifier of a base model given as an expert).

    Returns:
        The loaded model.
    """
    path = resolve_source(source)
    try:
        model, info = loader.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except SafetensorError as err:
        raise DivMergeError(
            f"Could not load {what} from {source!r}: a weights file is truncated or corrupt "
            f"({first_line(err)}); save or copy that model again."
        ) from err
    except (OSError, ValueError, KeyError) as err:
        resolved = Path(path).expanduser()
        if resolved.is_dir() and not has_weights(resolved):
            raise DivMergeError(
                f"Could not load {what} from {source!r}: the folder has a config but no weights file "
                "(model.safetensors); copy the weights into it, or save that model again."
            ) from err
        if resolved.is_dir():
            raise DivMergeError(
                f"Could not load {what} from {source!r} ({first_line(err)}): save or copy that model again."
            ) from err
        raise DivMergeError(
            f"Could not load {what} from {source!r} ({first_line(err)}): give a local model directory, or a "
            "hub id with network access."
        ) from err
    missing = sorted(info.get("missing_keys") or [])
    if complete and missing:
        raise missing_weights(what, source, missing)
    return model


def missing_weights(what: str, source: str, missing: list[str]) -> DivMergeError:
    """The one-line error for an expert whose weights files lack some of its model's tensors."""
    return DivMergeError(
        f"{what.capitalize()} at {source!r} lacks trained weights {missing[:3]}: transformers would "
        "initialise them at random (was the base model, or a model of another task, given as this "
        "expert?); point to the fine-tuned model."
    )
