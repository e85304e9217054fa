"""Tasks and the DataModule of unlabelled (training) and labelled (evaluation) inputs.

Each task's rows are shuffled once with a seed and cut, in order, into disjoint test / val /
unlabelled parts. Labels are only read for val and test: merging never sees a label.
"""

import hashlib
import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from divmerge.errors import DivMergeError
from divmerge.experts import ZOO_PREFIX, resolve_source

Split = Literal["unlabelled", "val", "test"]
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


def check_task(spec: TaskSpec) -> None:
    """Fail early on a task spec that cannot work (a generative task needs a prompt template)."""
    if spec.kind != "generative":
        return
    if not spec.prompt_template:
        raise DivMergeError(
            f"Task {spec.name!r} is generative but has no prompt_template: set it to a format string over "
            'the data columns, e.g. prompt_template: "Sentence: {sentence}\\nAnswer:".'
        )
    if spec.source.startswith(ZOO_PREFIX):
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
            return reader(path)
        except (ValueError, OSError, pd.errors.ParserError) as err:
            raise DivMergeError(f"Task {spec.name!r}: could not parse {spec.source!r} ({err}).") from err
    import datasets

    try:
        return datasets.load_dataset(spec.source, spec.hub_subset, split=spec.hub_split).to_pandas()
    except Exception as err:  # datasets raises many types for a missing/offline dataset
        raise DivMergeError(
            f"Task {spec.name!r}: {spec.source!r} is neither a local data file nor a hub dataset available "
            f"here ({type(err).__name__}); give a local file path or enable network access."
        ) from err


def _labels(spec: TaskSpec, column: pd.Series) -> tuple[list[int], tuple[str, ...] | None]:
    names = tuple(spec.label_names) if spec.label_names else None
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
    if spec.source.startswith(ZOO_PREFIX):
        from divmerge import zoo

        _, pool = zoo.demo_split(spec.source[len(ZOO_PREFIX) :])
        return Rows(list(pool.texts), list(pool.labels), tuple(pool.label_names))
    table = _read_table(spec)
    if spec.kind == "generative":
        return _generative_rows(spec, table)
    if spec.text_column not in table.columns:
        raise DivMergeError(
            f"Task {spec.name!r}: text column {spec.text_column!r} is not in {spec.source!r} "
            f"(columns: {list(table.columns)}); set text_column."
        )
    table = table[table[spec.text_column].notna()]
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


class MergeDataModule(L.LightningDataModule):
    """Unlabelled inputs of every task for merging; labelled inputs for evaluation.

    Each training batch holds ``batch_size_per_task`` inputs of every task (DivMerge samples 4 x T per
    step from the union of the tasks); shorter tasks cycle.

    Args:
        tasks: The tasks, one per expert.
        tokenizer: Tokenizer source; linked to ``model.base`` by train.py.
        max_length: Tokens per input: longer inputs are truncated (generative prompts on the left, so they
            keep the end their answer follows).
        batch_size_per_task: Unlabelled inputs of each task per training step and device (the global
            batch per task is this times the number of devices).
        eval_batch_size: Batch size for validation/test and for building the teacher cache.
        seed: Seed of the split shuffle and of the per-epoch training order.
        num_workers: DataLoader worker processes.

    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        tokenizer: str = "zoo:minilm",
        max_length: int = 64,
        batch_size_per_task: int = 4,
        eval_batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise DivMergeError("No tasks given: list them under data.tasks.")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise DivMergeError(f"Task names must be unique, got {names}.")
        for spec in tasks:
            check_task(spec)
        self.tasks = list(tasks)
        self.tokenizer_source = tokenizer
        self.max_length = max_length
        self.batch_size_per_task = batch_size_per_task
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self._datasets: dict[tuple[str, str], TaskDataset] = {}
        self._rows: dict[str, dict[str, Rows]] = {}

    @property
    def task_names(self) -> list[str]:
        """Task names in config order."""
        return [t.name for t in self.tasks]

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer."""
        source = resolve_source(self.tokenizer_source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise DivMergeError(
                f"Could not load a tokenizer from {self.tokenizer_source!r} ({err})."
            ) from err
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # causal LMs often have none; padding is masked
        return tokenizer

    def rows(self, task: str) -> dict[str, Rows]:
        """The task's split rows (loaded and split once)."""
        if task not in self._rows:
            spec = self.tasks[self.task_names.index(task)]
            self._rows[task] = split_rows(spec, load_rows(spec), self.seed)
        return self._rows[task]

    def label_names(self, task: str) -> tuple[str, ...] | None:
        """Class names of a task, if known."""
        return self.rows(task)["test"].label_names

    def dataset(self, task: str, split: Split) -> TaskDataset:
        """Tokenised dataset of one task split (built once)."""
        key = (task, split)
        if key not in self._datasets:
            part = self.rows(task)[split]
            self._datasets[key] = TaskDataset(self._encode(task, part.texts), part.labels)
        return self._datasets[key]

    def _encode(self, task: str, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts``, at most ``max_length`` each; a generative prompt keeps its end."""
        if not texts:  # an empty split (num_val: 0): tokenizers fail on an empty list
            return []
        if self.tasks[self.task_names.index(task)].kind == "generative":
            return [ids[-self.max_length :] for ids in self.tokenizer(texts)["input_ids"]]
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def prepare_data(self) -> None:
        """Read every task once on rank 0 so bad data fails before any training starts."""
        for task in self.task_names:
            self.rows(task)

    def setup(self, stage: str) -> None:
        """Tokenise the splits this stage needs."""
        splits = {"fit": ("unlabelled", "val"), "validate": ("val",), "test": ("test",)}.get(stage, SPLITS)
        for task in self.task_names:
            for split in splits:
                self.dataset(task, split)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Pad a list of items into a batch."""
        return DataCollatorWithPadding(self.tokenizer, return_tensors="pt")(items)

    def eval_loader(self, task: str, split: Split) -> DataLoader:
        """Labelled (or, for teachers, unlabelled) loader of one task split, in dataset order."""
        return DataLoader(
            self.dataset(task, split),
            batch_size=self.eval_batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> CombinedLoader:
        """Per step: ``batch_size_per_task`` unlabelled inputs of every task, as {task: batch}."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        loaders = {}
        for i, task in enumerate(self.task_names):
            ds = self.dataset(task, "unlabelled")
            # The order depends only on (seed, epoch), so a resumed run replays it; under DDP rank r takes
            # every world-th index, so the ranks' batches together equal the one-process batch of
            # batch_size_per_task x world inputs. Lightning keeps a DistributedSampler and calls set_epoch.
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed + i)
            loaders[task] = DataLoader(
                ds,
                batch_size=self.batch_size_per_task,
                sampler=sampler,
                collate_fn=self.collate,
                num_workers=self.num_workers,
                drop_last=False,
            )
        return CombinedLoader(loaders, mode="max_size_cycle")

    def eval_tasks(self, split: Split) -> list[str]:
        """Tasks with labelled examples in ``split``; position i is evaluation dataloader_idx i."""
        return [t for t in self.task_names if len(self.dataset(t, split))]

    def val_dataloader(self) -> list[DataLoader]:
        """One labelled loader per task of ``eval_tasks("val")``."""
        return [self.eval_loader(t, "val") for t in self.eval_tasks("val")]

    def test_dataloader(self) -> list[DataLoader]:
        """One labelled loader per task of ``eval_tasks("test")``."""
        return [self.eval_loader(t, "test") for t in self.eval_tasks("test")]
