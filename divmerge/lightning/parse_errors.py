"""jsonargparse's parse errors (a usage dump, then several lines) as one ``divmerge: error:`` line.

The command line and config files are parsed by jsonargparse (through LightningCLI), whose errors name
the problem over several indented lines after the whole usage text. :func:`one_line` keeps what the
user needs: which setting or file, what was wrong, and the fix; YAML errors say where, and a tab says
tab (YAML indents with spaces only).
"""

import re
from collections.abc import Sequence
from pathlib import Path

_LITERAL = re.compile(r'Parser key "([^"]+)":\s*Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)', re.S)
_YAML_WHERE = re.compile(r"line (\d+), column (\d+)")
_YAML_PREFIX = "Problems parsing config:"
_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '[^']*':\s*[^\n]*")
MAX_CHARS = 300
"""Longest quoted parser message (a Union's every failed subtype can run to dozens of lines)."""


def config_files(argv: Sequence[str]) -> list[Path]:
    """The files given with ``--config`` / ``-c`` (in order)."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _yaml_error(message: str, files: Sequence[Path]) -> str:
    """A config that is not valid YAML: where, and a tab named as such."""
    lines = [line.strip() for line in message[len(_YAML_PREFIX) :].splitlines() if line.strip()]
    where = _YAML_WHERE.findall(message)
    problem = next((line for line in reversed(lines) if not line.startswith("in ")), "invalid YAML")
    line, column = (int(where[-1][0]), int(where[-1][1])) if where else (0, 0)
    for path in files:
        text = _read(path)
        rows = text.splitlines() if text else []
        if line and line <= len(rows) and "\t" in rows[line - 1]:
            return (
                f"Config {str(path)!r} has a tab on line {line}: YAML indents with spaces only; replace the "
                "tab with spaces."
            )
    name = f"Config {str(files[-1])!r}" if files else "A config"
    at = f" at line {line}, column {column}" if line else ""
    return f"{name} is not valid YAML ({problem}{at}): fix its syntax (a mapping of model:, data:, trainer:)."


def one_line(message: str, argv: Sequence[str]) -> str:
    """Rewrite a jsonargparse error message as one line naming the problem and the fix.

    Args:
        message: The parser's error message (often several lines).
        argv: The command line it parsed (to find the config files).

    Returns:
        One line (no newline), for a ``DivMergeError``.
    """
    files = config_files(argv)
    literal = _LITERAL.search(message)
    if literal:
        key, choices, got = literal.groups()
        return f"{key} is {got.strip()!r}, which is not one of {choices}: fix it in the config or the flag."
    if message.startswith(_YAML_PREFIX):
        return _yaml_error(message, files)
    if message.startswith("Unexpected config"):
        empty = [p for p in files if (_read(p) or "").strip() == ""]
        if empty:
            return (
                f"Config {str(empty[0])!r} is empty: give a YAML mapping of model:, data:, trainer: (see "
                "configs/demo4.yaml)."
            )
    class_path = _CLASS_PATH.search(message)
    if class_path:
        key = _KEY.search(message)
        problem = " ".join(class_path.group(0).split())
        return f"{key.group(1) + ': ' if key else ''}{problem}: check the class_path."
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if len(text) > MAX_CHARS:
        text = text[: MAX_CHARS - 3].rstrip() + "..."
    return f"{text} (run with --help for the accepted options)"
