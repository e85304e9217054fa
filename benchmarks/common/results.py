"""The one results writer of the benchmarks: markdown tables, CSV and JSON files under ``--out_dir``."""

import csv
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"  # benchmarks/results: the default --out_dir


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) with ``columns`` in order; missing cells stay empty.

    Floats get 3 decimals below 10, 1 below 1000 and none above.

    Returns:
        The table, one line per row, header and separator first.

    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], exclude: Collection[str] = ()) -> None:
    """Write ``rows`` (dicts) to ``path`` as CSV, creating its folder.

    Args:
        path: The CSV file.
        rows: The rows; the columns are the union of their keys in first-seen order; missing cells stay
            empty.
        exclude: Keys never written (in-memory extras of a row).

    """
    columns = list(dict.fromkeys(key for row in rows for key in row if key not in exclude))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_results(
    out_dir: Path, name: str, text: str, rows: Sequence[Mapping[str, Any]] | None = None
) -> Path:
    """Write a benchmark's report ``<out_dir>/<name>.md`` and, given rows, ``<name>.json``.

    Args:
        out_dir: The results folder (created).
        name: The file stem.
        text: The markdown report, written as is.
        rows: The measured rows, written as an indented JSON list (None: no JSON file).

    Returns:
        The markdown file's path.

    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    path.write_text(text)
    if rows is not None:
        (out_dir / f"{name}.json").write_text(json.dumps(list(rows), indent=1))
    return path
