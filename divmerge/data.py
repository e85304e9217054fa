"""Tasks and the DataModule of unlabelled (training) and labelled (evaluation) inputs.

Each task's rows are shuffled once with a seed and cut, in order, into disjoint test / val /
unlabelled parts. Labels are only read for val and test: merging never sees a label.
"""

import hashlib
import json
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


SIZE_DEFAULTS: dict[str, int] = {"test": 500, "val": 200, "unlabelled": 256}
"""Rows per split when the config gives no size and the data has them (the demo's sizes)."""


@dataclass
class TaskSpec:
    r"""One task: where its inputs come from and how many to use.

    Give either one ``source`` that divmerge shuffles (``seed``) and cuts into disjoint test / val /
    unlabelled parts, or the splits you already have as their own files (``unlabelled``, ``val``,
    ``test``; each optional, and any split without its own file is cut from ``source``).

    Args:
        name: Task name; must match an expert name in ``model.experts``.
        source: Rows to cut into the splits that have no file of their own: ``zoo:<task>`` (offline demo
            task), a local .csv/.tsv/.json/.jsonl/.parquet file, or a Hugging Face hub dataset id.
        unlabelled: The unlabelled inputs the merge learns from, as their own file (labels, if any, are
            never read); with a hub ``source``, a split name of that dataset (e.g. ``train``).
        val: Labelled validation rows as their own file, or a split name of the hub ``source``.
        test: Labelled test rows as their own file (scored whole by default), or a hub split name.
        text_column: Column holding the input text.
        label_column: Column holding the label (read for val/test only); None for unlabelled-only data.
        label_names: Class names in the expert's class order, as a list or a .txt (one per line) / .json
            file; needed when labels are strings. Unset, they come from the expert's config.json
            ``id2label`` when it names real classes (not ``LABEL_0``...).
        hub_split: Split of a hub ``source`` that is cut into the splits without their own.
        hub_subset: Configuration (subset) of a hub dataset that has several, e.g. ``cola`` of
            ``nyu-mll/glue``.
        num_unlabelled: Unlabelled inputs used to learn the merge. Unset: 256, or all of a smaller own
            file, or a share of a small ``source`` (see ``num_test``).
        num_val: Labelled inputs for validation (0: no validation). Unset: 200, or all of a smaller own
            file, or a share of a small ``source``.
        num_test: Labelled inputs for testing (0: no test). Unset: every row of an own test file, else
            500 from ``source``; a ``source`` with fewer than 956 rows is cut 52% / 21% / 27% into
            test / val / unlabelled (the 500 / 200 / 256 proportions). Chosen sizes are printed.
        kind: ``classification`` (the expert's head classifies ``text_column``) or ``generative`` (a
            causal-LM expert answers the prompt made by ``prompt_template``; scored on ``answer_column``).
        prompt_template: Generative tasks: a Python format string over the row's columns, e.g.
            ``"Sentence: {sentence}\nAnswer:"`` (``text_column`` and ``label_column`` are then unused).
        answer_column: Generative tasks: the reference answer, read for val/test only and compared by
            exact match (whitespace stripped); integer values are mapped through ``label_names``.
        chat_template: Generative tasks: send each prompt as one user message through the tokenizer's
            chat template (with the assistant's generation prompt), as instruct models expect; default
            false (the prompt is tokenised as it is).

    """

    name: str
    source: str | None = None
    unlabelled: str | None = None
    val: str | None = None
    test: str | None = None
    text_column: str = "text"
    label_column: str | None = "label"
    label_names: list[str] | str | None = None
    hub_split: str = "train"
    hub_subset: str | None = None
    num_unlabelled: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    kind: Literal["classification", "generative"] = "classification"
    prompt_template: str | None = None
    answer_column: str | None = None
    chat_template: bool = False

    def size(self, split: str) -> int | None:
        """The configured number of rows of ``split`` (None: chosen from the data)."""
        return {"unlabelled": self.num_unlabelled, "val": self.num_val, "test": self.num_test}[split]

    def own(self, split: str) -> str | None:
        """The split's own file (or hub split name), if the config gives one."""
        return {"unlabelled": self.unlabelled, "val": self.val, "test": self.test}[split]

    def cut_splits(self) -> list[str]:
        """Splits cut from ``source`` (no own file, size not 0), in cutting order (test, val, unlabelled)."""
        cut = [s for s in ("test", "val", "unlabelled") if self.own(s) is None and self.size(s) != 0]
        return cut if self.source else []


@dataclass(frozen=True)
class Rows:
    """Texts with optional class-id labels (classification) or reference answers (generative)."""

    texts: list[str]
    labels: list[int] | None
    label_names: tuple[str, ...] | None
    answers: list[str] | None = None


DataScheme = Callable[[str, str], "Rows | pd.DataFrame"]
"""(name after the scheme, task kind) -> the task's labelled pool: ready ``Rows`` (e.g. ``zoo:rt``, the
demo's rotten-tomatoes rows), or a table read like a data file (columns, ``prompt_template``...)."""
_DATA_SCHEMES: dict[str, DataScheme] = {}


def register_data_scheme(prefix: str, reader: DataScheme) -> None:
    """Make task sources ``<prefix><name>`` read through ``reader`` (e.g. ``zoo:`` for the demo tasks).

    Args:
        prefix: The scheme with its colon, e.g. ``"zoo:"``.
        reader: (name, task kind) -> the task's rows, or a table read like a data file.
    """
    _DATA_SCHEMES[prefix] = reader


def _scheme_of(source: str) -> str | None:
    """The registered scheme ``source`` starts with, if any."""
    return next((prefix for prefix in _DATA_SCHEMES if source.startswith(prefix)), None)


def check_task(spec: TaskSpec) -> None:
    """Fail early on a spec that cannot work (no data, negative sizes, a generative task without template)."""
    if spec.source is None and spec.unlabelled is None:
        raise DivMergeError(
            f"Task {spec.name!r} has no data: give source (one file divmerge cuts into test / val / "
            "unlabelled) or unlabelled (a file of inputs, with val and test files if you have them)."
        )
    for split in SPLITS:
        size, low = spec.size(split), 1 if split == "unlabelled" else 0
        if size is not None and size < low:
            raise DivMergeError(f"Task {spec.name!r}: num_{split} is {size}: it must be at least {low}.")
    scheme = _scheme_of(spec.source) if spec.source else None
    if scheme and any(spec.own(s) and not _is_local(spec.own(s)) for s in SPLITS):
        raise DivMergeError(
            f"Task {spec.name!r}: demo task {spec.source!r} has no named splits: give val/test/unlabelled "
            "as files, or drop them to cut the demo task's rows."
        )
    if spec.kind != "generative":
        if spec.chat_template:
            raise DivMergeError(
                f"Task {spec.name!r}: chat_template applies to generative tasks (kind: generative) only: "
                "remove it, or make the task generative."
            )
        return
    if not spec.prompt_template:
        raise DivMergeError(
            f"Task {spec.name!r} is generative but has no prompt_template: set it to a format string over "
            'the data columns, e.g. prompt_template: "Sentence: {sentence}\\nAnswer:".'
        )


def _is_local(where: str | None) -> bool:
    """Whether ``where`` names a local data file (by its suffix, or because it exists)."""
    if not where:
        return False
    path = Path(where).expanduser()
    return path.suffix.lower() in _READERS or path.exists()


def _no_labels_fix(split: str) -> str:
    if split == "source":
        return "set it, give val/test files, or set num_val: 0 and num_test: 0 to merge without evaluating"
    return f"set it, or remove {split}: to skip that split"


def _generative_rows(spec: TaskSpec, table: pd.DataFrame, where: str, labelled: bool, split: str) -> Rows:
    """Prompts from ``prompt_template`` and, where evaluated, reference answers from ``answer_column``."""
    assert spec.prompt_template is not None
    parsed = string.Formatter().parse(spec.prompt_template)
    fields = {f.split(".")[0].split("[")[0] for _, f, _, _ in parsed if f}
    missing = sorted(fields - set(table.columns))
    if missing:
        raise DivMergeError(
            f"Task {spec.name!r}: prompt_template uses columns {missing} that {where!r} lacks "
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
        if labelled:
            raise DivMergeError(
                f"Task {spec.name!r}: answer_column {spec.answer_column!r} is not in {where!r} "
                f"(columns: {list(table.columns)}); {_no_labels_fix(split)}."
            )
        return Rows(texts, None, None)
    column = table[spec.answer_column]
    empty = column.isna() | column.astype(str).str.strip().eq("")
    if labelled and empty.any():
        raise DivMergeError(
            f"Task {spec.name!r}: answer_column {spec.answer_column!r} is empty in {int(empty.sum())} of "
            f"{len(column)} rows of {where!r} (first: row {int(empty.to_numpy().argmax())}): an answer "
            "cannot be scored against nothing; fill those answers or drop those rows."
        )
    names = _label_names(spec)
    if not (names and pd.api.types.is_integer_dtype(column)):
        return Rows(texts, None, None, column.astype(str).tolist())
    ids = column.astype(int).tolist()
    bad = sorted({i for i in ids if not 0 <= i < len(names)})
    if bad:
        raise DivMergeError(
            f"Task {spec.name!r}: answer_column {spec.answer_column!r} holds {bad[:5]}, which are not "
            f"positions in label_names {list(names)} (hidden test labels are often -1: use a split "
            "with labels)."
        )
    return Rows(texts, None, None, [names[i] for i in ids])


def _read_table(spec: TaskSpec, where: str, hub_split: str) -> pd.DataFrame:
    """A local file (by suffix) or split ``hub_split`` of hub dataset ``where``, as a table."""
    path = Path(where).expanduser()
    if _is_local(where):
        if path.exists() and not path.is_file():
            raise DivMergeError(
                f"Task {spec.name!r}: data file {where!r} is not a regular file (a directory, pipe or "
                f"device): give the path of a file, one of {sorted(_READERS)}."
            )
        if not path.is_file():
            raise DivMergeError(f"Task {spec.name!r}: data file {where!r} does not exist; fix its path.")
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
            raise DivMergeError(f"Task {spec.name!r}: could not parse {where!r} ({err}){hint}.") from err
        if path.suffix.lower() == ".csv" and len(table.columns) == 1 and "\t" in str(table.columns[0]):
            raise DivMergeError(
                f"Task {spec.name!r}: {where!r} reads as one column {str(table.columns[0])!r}: it "
                "looks tab-separated; name it .tsv."
            )
        return table
    import datasets

    check_available(where, "dataset", f"task {spec.name!r}: dataset")
    try:
        return datasets.load_dataset(where, spec.hub_subset, split=hub_split).to_pandas()
    except Exception as err:  # datasets raises many types for a missing/offline dataset or split
        raise DivMergeError(
            f"Task {spec.name!r}: {where!r} (split {hub_split!r}) is neither a local data file nor a hub "
            f"dataset available here ({type(err).__name__}); give a local file path or enable network "
            "access."
        ) from err


ClassNames = Callable[[], tuple[list[str], str] | None]
"""() -> (class names, where they come from), e.g. the expert's id2label; None when it has none."""


def _label_names(spec: TaskSpec) -> tuple[str, ...] | None:
    """``label_names`` as given inline, or read from a .txt (one per line) or .json (a list) file."""
    names = _read_label_names(spec) or ()
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DivMergeError(
            f"Task {spec.name!r}: label_names names {twice[:3]} more than once: each class needs its own "
            "name, in the expert's class order."
        )
    return names or None


def _read_label_names(spec: TaskSpec) -> tuple[str, ...] | None:
    if spec.label_names is None or isinstance(spec.label_names, list):
        return tuple(str(n) for n in spec.label_names) if spec.label_names else None
    path = Path(spec.label_names).expanduser()
    if not path.is_file():
        raise DivMergeError(
            f"Task {spec.name!r}: label_names {spec.label_names!r} is not a file: give a list of class names "
            "or a .txt file (one name per line) or .json file (a list)."
        )
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DivMergeError(
                f"Task {spec.name!r}: label_names file {str(path)!r} is not JSON ({err})."
            ) from err
        if not isinstance(names, list):
            raise DivMergeError(f"Task {spec.name!r}: label_names file {str(path)!r} must hold a JSON list.")
    else:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return tuple(str(n) for n in names)


def _labels(
    spec: TaskSpec, column: pd.Series, class_names: ClassNames | None
) -> tuple[list[int], tuple[str, ...] | None]:
    names = _label_names(spec)
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
        found = class_names() if class_names is not None else None
        if found is None:
            raise DivMergeError(
                f"Task {spec.name!r}: labels in {spec.label_column!r} are not integers and the expert's "
                "config.json names no classes (id2label): set label_names to the class names in the "
                "expert's class order (a list, or a file with one name per line)."
            )
        names = tuple(found[0])
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in column if str(v) not in index})
    if unknown:
        raise DivMergeError(f"Task {spec.name!r}: labels {unknown[:5]} are not in label_names {list(names)}.")
    return [index[str(v)] for v in column], names


def load_rows(
    spec: TaskSpec,
    split: str = "source",
    labelled: bool | None = None,
    class_names: ClassNames | None = None,
) -> Rows:
    """Read the rows of ``source`` (or of one split's own file or hub split).

    Args:
        spec: The task.
        split: ``source``, or the split whose own file (or hub split name) to read.
        labelled: Whether labels (answers) must be read; None: for ``source``, when a labelled split is
            cut from it.
        class_names: Where string labels find their class names when ``label_names`` is unset.

    Returns:
        Texts, labels (None when not read) and class names.

    """
    if split == "source":
        assert spec.source is not None
        where, hub_split = spec.source, spec.hub_split
        if labelled is None:
            labelled = any(spec.size(s) != 0 for s in spec.cut_splits() if s != "unlabelled")
    else:
        own = spec.own(split)
        assert own is not None
        local = _is_local(own) or spec.source is None or _is_local(spec.source)
        where, hub_split = (own, spec.hub_split) if local else (spec.source, own)
        labelled = split != "unlabelled" if labelled is None else labelled
    scheme = _scheme_of(where)
    read = _DATA_SCHEMES[scheme](where[len(scheme) :], spec.kind) if scheme else None
    if isinstance(read, Rows):
        return read
    table = read if read is not None else _read_table(spec, where, hub_split)
    label = (
        f"{where!r}" if hub_split == spec.hub_split or _is_local(where) else f"{where!r} split {hub_split!r}"
    )
    if spec.kind == "generative":
        return _generative_rows(spec, table, label, labelled, split)
    if spec.text_column not in table.columns:
        raise DivMergeError(
            f"Task {spec.name!r}: text column {spec.text_column!r} is not in {label} "
            f"(columns: {list(table.columns)}); set text_column."
        )
    empty = int(table[spec.text_column].isna().sum())
    table = table[table[spec.text_column].notna()]
    if empty:
        log.warning(
            "task %r: dropped %d of %d rows with no text in %r.",
            spec.name,
            empty,
            empty + len(table),
            spec.text_column,
        )
    if table.empty:
        raise DivMergeError(f"Task {spec.name!r} has no examples in {label}; point it to data with rows.")
    texts = table[spec.text_column].astype(str).tolist()
    if not labelled or spec.label_column is None or spec.label_column not in table.columns:
        if labelled:
            raise DivMergeError(
                f"Task {spec.name!r}: label column {spec.label_column!r} is not in {label} "
                f"(columns: {list(table.columns)}); {_no_labels_fix(split)}."
            )
        return Rows(texts, None, _label_names(spec) if spec.kind == "classification" else None)
    labels, names = _labels(spec, table[spec.label_column], class_names)
    return Rows(texts, labels, names)


def _take(rows: Rows, idx: list[int], labelled: bool) -> Rows:
    labels = [rows.labels[i] for i in idx] if labelled and rows.labels is not None else None
    answers = [rows.answers[i] for i in idx] if labelled and rows.answers is not None else None
    return Rows([rows.texts[i] for i in idx], labels, rows.label_names, answers)


def cut_sizes(spec: TaskSpec, num_rows: int) -> dict[str, int]:
    """Rows of each split cut from ``source``: the configured sizes, the rest chosen from the data.

    Unset sizes take :data:`SIZE_DEFAULTS` when the rows left over allow it, else shares of the
    rows left over in the same proportions (the unlabelled split taking the remainder).

    Args:
        spec: The task.
        num_rows: Rows in ``source``.

    Returns:
        Split -> rows, for ``spec.cut_splits()``.

    """
    cut = spec.cut_splits()
    sizes = {s: spec.size(s) for s in cut if spec.size(s) is not None}
    unset = [s for s in cut if s not in sizes]
    left = num_rows - sum(sizes.values())
    want = {s: SIZE_DEFAULTS[s] for s in unset}
    if sum(want.values()) <= left:
        sizes.update(want)
    elif unset:
        total = sum(want.values())
        shares = {s: left * want[s] // total for s in unset}
        if "unlabelled" in shares:
            shares["unlabelled"] = left - sum(v for s, v in shares.items() if s != "unlabelled")
        sizes.update(shares)
    return {s: sizes[s] for s in cut}


def split_rows(spec: TaskSpec, rows: Rows, seed: int) -> dict[str, Rows]:
    """Cut ``source``'s rows into the disjoint splits without files of their own, after one seeded shuffle.

    Args:
        spec: The task (its ``num_*`` sizes; unset ones are chosen by :func:`cut_sizes`).
        rows: All rows of ``source``.
        seed: Shuffle seed.

    Returns:
        Split name -> rows, for ``spec.cut_splits()`` (test first, then val, then unlabelled).

    """
    n = len(rows.texts)
    if n == 0:
        raise DivMergeError(
            f"Task {spec.name!r} has no examples in {spec.source!r}; point it to data with rows."
        )
    sizes = cut_sizes(spec, n)
    wanted = sum(sizes.values())
    if wanted > n or sizes.get("unlabelled", 1) < 1:
        asked = " + ".join(f"{s} {v}" for s, v in sizes.items())
        raise DivMergeError(
            f"Task {spec.name!r} has {n} examples in {spec.source!r} but {asked} = {wanted} are asked for; "
            f"lower {', '.join('num_' + s for s in sizes)}, or give some splits their own files."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    parts, start = {}, 0
    for split, size in sizes.items():
        parts[split] = _take(rows, order[start : start + size], split != "unlabelled")
        start += size
    return parts


def _own_split(spec: TaskSpec, split: str, seed: int, class_names: ClassNames | None) -> tuple[Rows, str]:
    """A split's own file: all of it, or a seeded sample of ``num_<split>`` rows; and how it was sized."""
    rows = load_rows(spec, split, class_names=class_names)
    n, size = len(rows.texts), spec.size(split)
    if size is not None and size > n:
        raise DivMergeError(
            f"Task {spec.name!r}: num_{split} is {size} but {spec.own(split)!r} has {n} rows; lower it or "
            "leave it unset to use them all."
        )
    if size is None:
        size = n if split == "test" else min(n, SIZE_DEFAULTS[split])
    if size == n:  # the whole file, in file order: scores match the user's own measurement
        return _take(rows, list(range(n)), split != "unlabelled"), f"all {n}"
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _take(rows, order[:size], split != "unlabelled"), f"{size} of {n}"


def load_splits(spec: TaskSpec, seed: int, class_names: ClassNames | None = None) -> dict[str, Rows]:
    """Every split of a task: own files where given, the rest cut from ``source``; sizes chosen are logged.

    Args:
        spec: The task.
        seed: Seed of the shuffles (cutting ``source``, sampling a file larger than its ``num_<split>``).
        class_names: Where string labels find their class names when ``label_names`` is unset.

    Returns:
        ``unlabelled`` / ``val`` / ``test`` -> rows (an empty split has no rows).

    """
    check_task(spec)
    parts: dict[str, Rows] = {}
    notes = []
    for split in SPLITS:
        if spec.own(split) is not None:
            parts[split], how = _own_split(spec, split, seed, class_names)
            notes.append(f"{split} {how} rows of {spec.own(split)}")
    if spec.source is not None and spec.cut_splits():
        cut = split_rows(spec, load_rows(spec, class_names=class_names), seed)
        parts.update(cut)
        notes.append(
            " / ".join(f"{s} {len(r.texts)}" for s, r in cut.items()) + f" rows cut from {spec.source}"
        )
    names = next((r.label_names for r in parts.values() if r.label_names), None)
    from_expert = spec.label_names is None and class_names is not None and not _scheme_of(spec.source or "")
    if names and (isinstance(spec.label_names, str) or from_expert):
        found = class_names() if from_expert and class_names is not None else None
        origin = found[1] if found and tuple(found[0]) == names else spec.label_names
        if origin:
            log.info("task %r: class names from %s (%d classes).", spec.name, origin, len(names))
    for split in SPLITS:
        parts.setdefault(split, Rows([], [] if split != "unlabelled" else None, names))
    if any(spec.size(s) is None for s in SPLITS if spec.own(s) is not None or s in spec.cut_splits()):
        log.info(
            "task %r: %s (set num_test / num_val / num_unlabelled to choose).", spec.name, "; ".join(notes)
        )
    return {s: parts[s] for s in SPLITS}


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
