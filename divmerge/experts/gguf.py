"""GGUF files (llama.cpp's format) as model sources: converted once into a plain Hugging Face directory.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``) by dequantising it to float32,
but the model it returns is flagged as quantised and ``save_pretrained`` refuses it. :func:`convert_gguf`
rebuilds the model from its config, saves weights (safetensors), config and tokenizer (with its chat
template) into ``<cache>/gguf/<name>-<digest>/`` and from then on that directory is the source: later
calls find it and do not read the GGUF file again.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

from divmerge.errors import DivMergeError, first_line
from divmerge.experts.build_once import build_once
from divmerge.quiet import quiet

GGUF_SUFFIX = ".gguf"
"""File suffix of GGUF files."""

GGUF_META_FILE = "divmerge_gguf.json"
"""Written last into every converted directory: where it came from (its presence marks it complete)."""

_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
_FORMAT_VERSION = 1  # bump to invalidate every converted directory when the conversion changes
_CACHE_SUBDIR = "gguf"


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes.

    Args:
        path: Any path.

    Returns:
        True for a GGUF file, False for anything else (a directory, a missing path, another file).
    """
    try:
        with path.open("rb") as f:
            return f.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def _check_file(path: Path) -> Path:
    """Return the resolved GGUF file, or raise one clear error when it is missing or not GGUF."""
    if not path.is_file():
        raise DivMergeError(f"GGUF file {str(path)!r} does not exist: fix the path in the config.")
    if not is_gguf_file(path):
        raise DivMergeError(
            f"{str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF'): point to a .gguf "
            "file (llama.cpp format) or to a Hugging Face model directory."
        )
    return path.resolve()


def gguf_dir(path: Path, cache_dir: Path) -> Path:
    """Return where the conversion of a GGUF file lives (it may not exist yet).

    The name is ``<cache>/gguf/<file name without .gguf>-<digest>``, the digest a short hash of the
    file's absolute path, size and modification time: replacing the file gives a new conversion.

    Args:
        path: The GGUF file.
        cache_dir: The cache directory (``divmerge.experts.sources.default_cache_dir()`` for sources).

    Returns:
        The converted directory's path.
    """
    file = path.resolve()
    stat = file.stat()
    key = f"{_FORMAT_VERSION}|{file}|{stat.st_size}|{stat.st_mtime_ns}"
    short = hashlib.sha256(key.encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", file.name.removesuffix(GGUF_SUFFIX)) or "model"
    return Path(cache_dir).expanduser() / _CACHE_SUBDIR / f"{stem}-{short}"


def _require_gguf_package(file: Path) -> None:
    """Raise one clear error when the ``gguf`` package (transformers reads GGUF files with it) is missing."""
    try:
        importlib.import_module("gguf")
    except ImportError as err:
        raise DivMergeError(
            f"{str(file)!r} is a GGUF file, and reading it needs the Python package 'gguf', which is not "
            "installed: run `pip install gguf`."
        ) from err


def _architecture(file: Path) -> str | None:
    """Return the GGUF file's ``general.architecture`` (e.g. ``"llama"``); None if the file is unreadable."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(file).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    except Exception:  # truncated, corrupt, or no such field: all mean "unreadable" here
        return None


def _load_error(file: Path, err: Exception) -> DivMergeError:
    """Turn transformers' failure to load a GGUF file into one line naming the problem and the fix."""
    import transformers

    if isinstance(err, ImportError):  # transformers' own check: gguf too old for it
        return DivMergeError(
            f"Reading the GGUF file {str(file)!r} failed ({first_line(err)}): run `pip install -U gguf`."
        )
    architecture = None if isinstance(err, (struct.error, EOFError)) else _architecture(file)
    if architecture is None:
        return DivMergeError(
            f"The GGUF file {str(file)!r} is truncated or corrupt ({first_line(err)}): download or copy it "
            "again."
        )
    return DivMergeError(
        f"transformers {transformers.__version__} cannot load the GGUF file {str(file)!r} as a causal LM "
        f"(architecture {architecture!r}: {first_line(err)}): use a GGUF of an architecture transformers "
        "reads (llama, mistral, qwen2, qwen3, gemma, phi3, ...) or the model's Hugging Face directory."
    )


def _load(file: Path) -> tuple[Any, Any]:
    """Load a GGUF file with transformers as (causal LM in float32, tokenizer), errors as DivMergeError."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (
        ImportError,
        struct.error,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        OSError,
        NotImplementedError,
        AttributeError,
    ) as err:
        raise _load_error(file, err) from err
    return model, tokenizer


def _plain_model(model: Any) -> Any:
    """Rebuild the GGUF-loaded model (flagged quantised, unsaveable) as a plain model sharing its weights.

    The skeleton is built on the meta device and takes the loaded tensors as they are (no copy, no
    random init); its non-persistent buffers (e.g. rotary frequencies) stay on meta, so the result is for
    ``save_pretrained`` only, which does not save them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else the saved config.json asks for the GGUF quantiser again
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def _write(file: Path, out: Path) -> None:
    """Convert ``file`` into the (empty) directory ``out``: model, tokenizer, then the meta file."""
    import transformers

    model, tokenizer = _load(file)
    plain = _plain_model(model)
    del model
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = file.stat()
    meta = {
        "format": _FORMAT_VERSION,
        "source": str(file),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "architecture": plain.config.architectures,
        "transformers": transformers.__version__,
    }
    (out / GGUF_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def convert_gguf(path: str | Path, cache_dir: Path, progress: bool = True) -> Path:
    """Return the Hugging Face directory converted from a GGUF file, converting it on first use.

    The conversion is written into a temporary sibling directory renamed into place at the end, so an
    interrupted conversion never leaves a half-written directory at the final path; a later call finds
    the finished directory and returns it without reading the GGUF file.

    Args:
        path: The GGUF file.
        cache_dir: The cache directory (``divmerge.experts.sources.default_cache_dir()`` for sources).
        progress: Announce a conversion on stderr.

    Returns:
        :func:`gguf_dir` of the file: ``model.safetensors``, ``config.json``, the tokenizer (with its chat
        template) and :data:`GGUF_META_FILE`.

    Raises:
        DivMergeError: If the file is missing or not GGUF, the ``gguf`` package is missing, transformers
            cannot load its architecture, or the final path is occupied by something incomplete.
    """
    file = _check_file(Path(path).expanduser())
    final = gguf_dir(file, cache_dir)

    def convert(out: Path) -> None:
        _require_gguf_package(file)
        if progress:
            print(f"divmerge: converting GGUF {file} -> {final} (once)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with quiet(not progress):
            _write(file, out)
        if progress:
            seconds = time.perf_counter() - start
            print(f"divmerge: GGUF converted in {seconds:.0f} s", file=sys.stderr, flush=True)

    return build_once(final, GGUF_META_FILE, "GGUF conversion", convert)
