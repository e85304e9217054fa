"""Tasks and the DataModule of unlabelled (training) and labelled (evaluation) inputs.

Each task's rows are shuffled once with a seed and cut, in order, into disjoint test / val /
unlabelled parts. Labels are only read for val and test: merging never sees a label.
"""

import hashlib
import logging
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch.utils.data import Dataset

from divmerge.errors import DivMergeError
from divmerge.hub import check_available

Split = Literal["unlabelled", "val", "test"]
log = logging.getLogger(__name__)
SPLITS: tuple[str, ...] = ("unlabelled", "val", "test")
_READERS = {
    ".csv": pd.read_csv,
    ".tsv": lambda p: pd.read_csv(p, sep="\t"),
    ".json": pd.read_json,
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".parquet": pd.read_parquet,
}


@dataclass
class TaskSpec:
    r"""One task: where its inputs come from and how many to use.

    Args:
        name: Task name; must match an expert name in ``model.experts``.
        source: ``zoo:<task>`` (offline demo task), a local .csv/.tsv/.json/.jsonl/.parquet file, or a
            Hugging Face hub dataset id.
        text_column: Column holding the input text.
        label_column: Column holding the label (only read for val/test); None for unlabelled-only data.
        label_names: Class names in the expert's class order; needed when labels are strings.
        hub_split: Split to read when ``source`` is a hub dataset.
        hub_subset: Configuration (subset) of a hub dataset that has several, e.g. ``cola`` of
            ``nyu-mll/glue``.
        num_unlabelled: Unlabelled inputs used to learn the merge.
        num_val: Labelled inputs for validation.
        num_test: Labelled inputs for testing.
        kind: ``classification`` (the expert's head classifies ``text_column``) or ``generative`` (a
            causal-LM expert answers the prompt made by ``prompt_template``; scored on ``answer_column``).
        prompt_template: Generative tasks: a Python format string over the row's columns, e.g.
            ``"Sentence: {sentence}\nAnswer:"`` (``text_column`` and ``label_column`` are then unused).
        answer_column: Generative tasks: the reference answer, read for val/test only and compared by
            exact match (whitespace stripped); integer values are mapped through ``label_names``.

    """

    name: str
    source: str
    text_column: str = "text"
    label_column: str | None = "label"
    label_names: list[str] | None = None
    hub_split: str = "train"
    hub_subset: str | None = None
    num_unlabelled: int = 256
    num_val: int = 200
    num_test: int = 500
    kind: Literal["classification", "generative"] = "classification"
    prompt_template: str | None = None
    answer_column: str | None = None


@dataclass(frozen=True)
class Rows:
    """Texts with optional class-id labels (classification) or reference answers (generative)."""

    texts: list[str]
    labels: list[int] | None
    label_names: tuple[str, ...] | None
    answers: list[str] | None = None


DataScheme = Callable[[str], Rows]
"""name after the scheme -> the task's labelled pool (e.g. ``zoo:rt``, the demo's rotten-tomatoes rows)."""
_DATA_SCHEMES: dict[str, DataScheme] = {}


def register_data_scheme(prefix: str, reader: DataScheme) -> None:
    """Make task sources ``<prefix><name>`` read through ``reader`` (e.g. ``zoo:`` for the demo tasks).

    Args:
        prefix: The scheme with its colon, e.g. ``"zoo:"``.
        reader: name -> the task's rows.
    """
    _DATA_SCHEMES[prefix] = reader


def _scheme_of(source: str) -> str | None:
    """The registered scheme ``source`` starts with, if any."""
    return next((prefix for prefix in _DATA_SCHEMES if source.startswith(prefix)), None)


def check_task(spec: TaskSpec) -> None:
    """Fail early on a task spec that cannot work (a generative task needs a prompt template)."""
    if spec.kind != "generative":
        return
    if not spec.prompt_template:
        raise DivMergeError(
            f"Task {spec.name!r} is generative but has no prompt_template: set it to a format string over "
            'the data columns, e.g. prompt_template: "Sentence: {sentence}\\nAnswer:".'
        )
    if _scheme_of(spec.source):
        raise DivMergeError(
            f"Task {spec.name!r}: demo tasks ({spec.source!r}) are classification tasks; give a generative "
            "task a data file or hub dataset."
        )


def _generative_rows(spec: TaskSpec, table: pd.DataFrame) -> Rows:
    """Prompts from ``prompt_template`` and, where evaluated, reference answers from ``answer_column``."""
    assert spec.prompt_template is not None
    parsed = string.Formatter().parse(spec.prompt_template)
    fields = {f.split(".")[0].split("[")[0] for _, f, _, _ in parsed if f}
    missing = sorted(fields - set(table.columns))
    if missing:
        raise DivMergeError(
            f"Task {spec.name!r}: prompt_template uses columns {missing} that {spec.source!r} lacks "
            f"(columns: {list(table.columns)}); fix the template."
        )
    table = table.dropna(subset=sorted(fields))
    try:
        texts = [spec.prompt_template.format(**row) for row in table.to_dict("records")]
    except (ValueError, IndexError, AttributeError) as err:
        raise DivMergeError(
            f"Task {spec.name!r}: prompt_template is not a valid format string ({err})."
        ) from err
    if spec.answer_column is None or spec.answer_column not in table.columns:
        if spec.num_val + spec.num_test > 0:
            raise DivMergeError(
                f"Task {spec.name!r}: answer_column {spec.answer_column!r} is not in {spec.source!r} "
                f"(columns: {list(table.columns)}); set answer_column, or num_val: 0 and num_test: 0 to "
                "merge without evaluating."
            )
        return Rows(texts, None, None)
    column = table[spec.answer_column]
    if not (spec.label_names and pd.api.types.is_integer_dtype(column)):
        return Rows(texts, None, None, column.astype(str).tolist())
    ids = column.astype(int).tolist()
    bad = sorted({i for i in ids if not 0 <= i < len(spec.label_names)})
    if bad:
        raise DivMergeError(
            f"Task {spec.name!r}: answer_column {spec.answer_column!r} holds {bad[:5]}, which are not "
            f"positions in label_names {spec.label_names} (hidden test labels are often -1: use a split "
            "with labels)."
        )
    return Rows(texts, None, None, [spec.label_names[i] for i in ids])


def _read_table(spec: TaskSpec) -> pd.DataFrame:
    path = Path(spec.source).expanduser()
    if path.suffix.lower() in _READERS or path.exists():
        if not path.is_file():
            raise DivMergeError(
                f"Task {spec.name!r}: data file {spec.source!r} does not exist; fix its path."
            )
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DivMergeError(
                f"Task {spec.name!r}: cannot read {path.suffix!r} files; use one of {sorted(_READERS)}."
            )
        try:
            table = reader(path)
        except (ValueError, OSError, pd.errors.ParserError) as err:
            hint = ""
            if path.suffix.lower() == ".json" and "Trailing data" in str(err):
                hint = "; it looks like JSON lines (one object per line): name it .jsonl"
            raise DivMergeError(
                f"Task {spec.name!r}: could not parse {spec.source!r} ({err}){hint}."
            ) from err
        if path.suffix.lower() == ".csv" and len(table.columns) == 1 and "\t" in str(table.columns[0]):
            raise DivMergeError(
                f"Task {spec.name!r}: {spec.source!r} reads as one column {str(table.columns[0])!r}: it "
                "looks tab-separated; name it .tsv."
            )
        return table
    import datasets

    check_available(spec.source, "dataset", f"task {spec.name!r}: dataset")
    try:
        return datasets.load_dataset(spec.source, spec.hub_subset, split=spec.hub_split).to_pandas()
    except Exception as err:  # datasets raises many types for a missing/offline dataset
        raise DivMergeError(
            f"Task {spec.name!r}: {spec.source!r} is neither a local data file nor a hub dataset available "
            f"here ({type(err).__name__}); give a local file path or enable network access."
        ) from err


def _labels(spec: TaskSpec, column: pd.Series) -> tuple[list[int], tuple[str, ...] | None]:
    names = tuple(spec.label_names) if spec.label_names else None
    missing = int(column.isna().sum())
    if missing:
        raise DivMergeError(
            f"Task {spec.name!r}: {missing} of {len(column)} rows have no label in {spec.label_column!r}: "
            "fill them in, or drop those rows from the file."
        )
    if pd.api.types.is_float_dtype(column):
        if not (column == column.round()).all():
            bad = sorted({float(v) for v in column if v != round(v)})[:5]
            raise DivMergeError(
                f"Task {spec.name!r}: labels in {spec.label_column!r} must be class ids 0..C-1 (or class "
                f"names with label_names), got fractional values {bad}."
            )
        column = column.astype(int)
    if pd.api.types.is_integer_dtype(column):
        return column.astype(int).tolist(), names
    if names is None:
        raise DivMergeError(
            f"Task {spec.name!r}: labels in {spec.label_column!r} are not integers; set label_names to the "
            "class names in the expert's class order."
        )
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in column if str(v) not in index})
    if unknown:
        raise DivMergeError(f"Task {spec.name!r}: labels {unknown[:5]} are not in label_names {list(names)}.")
    return [index[str(v)] for v in column], names


def load_rows(spec: TaskSpec) -> Rows:
    """Read a task's rows (the held-out pool for a demo task).

    Args:
        spec: The task.

    Returns:
        Texts, labels (None without a label column) and class names.

    """
    scheme = _scheme_of(spec.source)
    if scheme:
        return _DATA_SCHEMES[scheme](spec.source[len(scheme) :])
    table = _read_table(spec)
    if spec.kind == "generative":
        return _generative_rows(spec, table)
    if spec.text_column not in table.columns:
        raise DivMergeError(
            f"Task {spec.name!r}: text column {spec.text_column!r} is not in {spec.source!r} "
            f"(columns: {list(table.columns)}); set text_column."
        )
    empty = int(table[spec.text_column].isna().sum())
    table = table[table[spec.text_column].notna()]
    if empty:
        log.warning(
            "divmerge: task %r: dropped %d of %d rows with no text in %r.",
            spec.name,
            empty,
            empty + len(table),
            spec.text_column,
        )
    if table.empty:
        raise DivMergeError(
            f"Task {spec.name!r} has no examples in {spec.source!r}; point it to data with rows."
        )
    texts = table[spec.text_column].astype(str).tolist()
    needs_labels = spec.num_val + spec.num_test > 0
    if spec.label_column is None or spec.label_column not in table.columns:
        if needs_labels:
            raise DivMergeError(
                f"Task {spec.name!r}: label column {spec.label_column!r} is not in {spec.source!r} "
                f"(columns: {list(table.columns)}); set label_column, or num_val: 0 and num_test: 0 to "
                "merge without evaluating."
            )
        return Rows(texts, None, tuple(spec.label_names) if spec.label_names else None)
    labels, names = _labels(spec, table[spec.label_column])
    return Rows(texts, labels, names)


def split_rows(spec: TaskSpec, rows: Rows, seed: int) -> dict[str, Rows]:
    """Cut rows into disjoint test / val / unlabelled parts after one seeded shuffle.

    Args:
        spec: The task (its ``num_*`` sizes).
        rows: All rows of the task.
        seed: Shuffle seed.

    Returns:
        Split name -> rows.

    """
    n = len(rows.texts)
    if n == 0:
        raise DivMergeError(
            f"Task {spec.name!r} has no examples in {spec.source!r}; point it to data with rows."
        )
    if spec.num_unlabelled < 1:
        raise DivMergeError(f"Task {spec.name!r}: num_unlabelled must be at least 1.")
    wanted = spec.num_test + spec.num_val + spec.num_unlabelled
    if wanted > n:
        raise DivMergeError(
            f"Task {spec.name!r} has {n} examples but test+val+unlabelled = {wanted}; lower num_test, "
            "num_val or num_unlabelled."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = {"test": (0, spec.num_test)}
    bounds["val"] = (spec.num_test, spec.num_test + spec.num_val)
    bounds["unlabelled"] = (bounds["val"][1], wanted)
    parts = {}
    for split, (lo, hi) in bounds.items():
        idx = order[lo:hi]
        labels = None if rows.labels is None or split == "unlabelled" else [rows.labels[i] for i in idx]
        answers = None if rows.answers is None or split == "unlabelled" else [rows.answers[i] for i in idx]
        parts[split] = Rows([rows.texts[i] for i in idx], labels, rows.label_names, answers)
    return parts


class TaskDataset(Dataset):
    """Tokenised inputs of one task split; items carry their index (to find the cached teacher output).

    Args:
        encodings: Token ids per example.
        labels: Class ids, or None.

    """

    def __init__(self, encodings: list[list[int]], labels: list[int] | None) -> None:
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.encodings[i], "idx": i}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item

    def digest(self) -> str:
        """Hash of the token ids (and labels), to key caches on the exact data."""
        h = hashlib.sha256()
        for ids in self.encodings:
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes() + b"|")
        return h.hexdigest()[:16]
