"""What every exporter shares: target checks, the atomic directory, base config, tokenizer, info file.

Everything is written into a temporary sibling directory and renamed into place, so an interrupted or
failed export never leaves a half-written directory behind.
"""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from divmerge.disk import no_space_is_one_line, written
from divmerge.errors import DivMergeError, first_line
from divmerge.pids import pid_alive

EXPORT_FILE = "divmerge_export.json"
WEIGHTS_FILE = "model.safetensors"
HEADS_DIR = "heads"
HEAD_FILE = "head.safetensors"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A fresh sibling directory of ``out`` to write into: moved into place on success, removed on error.

    Args:
        out: The final directory (absolute).

    Yields:
        The temporary directory.

    """
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # not mkdtemp: that makes it private (0o700), while an export should follow the umask
    except OSError as err:  # a read-only or foreign parent: PermissionError, read-only file system, ...
        raise DivMergeError(
            f"Cannot create the export directory {str(out)!r} ({err.strerror or first_line(err)}: "
            f"{err.filename or out.parent}): choose a --out_dir where you can write."
        ) from err
    for stale in out.parent.glob(f".{out.name}.tmp-*-*"):  # left by a killed export
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        with no_space_is_one_line(
            out, written(tmp), "free space, or choose --out_dir on a disk with room", True
        ):
            yield tmp
            move_into_place(tmp, out)
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


def check_target(out: Path, overwrite: bool, base_source: str, summary: Mapping[str, Any]) -> None:
    """Refuse a non-empty target without ``overwrite``, and targets whose removal would destroy inputs."""
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DivMergeError(f"--out_dir {str(out)!r} is under {str(blocker)!r}, a file: choose a directory.")
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


def check_task_names(task_names: Sequence[str]) -> None:
    """Task names become directory names under ``heads/``: they must be plain, safe path components."""
    for task in task_names:
        bad = not task or task in (".", "..") or any(c in task for c in ("/", "\\", "\0", os.sep))
        if bad:
            raise DivMergeError(
                f"Task name {task!r} cannot be used as a directory name: rename the expert in the config "
                "(no slashes, not '.' or '..')."
            )


def load_base_config(source: str, base_source: str) -> PretrainedConfig:
    """The base model's config, with a clear error."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise DivMergeError(
            f"Could not load the base config from {base_source!r} ({first_line(err)}): give the base "
            "model's local directory, or a hub id with network access."
        ) from err


def load_tokenizer(source: str, base_source: str) -> Any:
    """The base model's tokenizer, with a clear error."""
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DivMergeError(
            f"Could not load a tokenizer from the base {base_source!r} ({first_line(err)}): the export "
            "ships the base's tokenizer; save one next to the base model (tokenizer.save_pretrained)."
        ) from err


def move_into_place(tmp: Path, out: Path) -> None:
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


def relative_files(root: Path) -> list[str]:
    """Every file under ``root``, relative, with forward slashes."""
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
