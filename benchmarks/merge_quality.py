"""Merge quality as the number of tasks grows (DivMerge, arXiv 2509.02108, Table 6).

For every k = min_k .. max_k, subsets of k tasks are merged with every requested method and scored by
ANP (mean over the subset's tasks of merged / expert test accuracy). The claim under test: divergence-
guided merging stays strong as k grows while static merges degrade.

Methods:

- static (no training, ``divmerge.static.static_merge`` with its default options): ``average``,
  ``task_arithmetic`` (lambda 0.3), ``ties`` (density 0.2, lambda 1), ``dare`` (p 0.5, seed 0, then task
  arithmetic with lambda 0.3), ``tsv_m`` (1/T of each task's rank, lambda 1), ``iso_c`` (lambda 1),
  ``iso_cts`` (common fraction 0.8, lambda 1), ``wudi`` (300 Adam steps at lr 1e-5 per matrix, lambda 1);
- learned ``<objective>-<granularity>``: objective ``js`` (DivMerge), ``kl`` or ``entropy`` (AdaMerging),
  granularity ``task``, ``layer`` (AdaMerging's layer-wise), ``block``, ``row`` (one coefficient per output
  row of each matrix) or ``svd`` (one per singular direction of each matrix task vector; ``svd<r>``, e.g.
  ``js-svd8``, keeps rank r); ``<objective>-<granularity>@<static>`` (e.g. ``js-row@tsv_m``) starts
  from that static merge (its default options) and learns coefficients around it from 0. Adam on the
  coefficients (init ``--init``, default 1/k), lr with cosine decay to 0 over ``steps``; each step draws
  ``batch_per_task`` unlabelled inputs of every task of the subset and minimises the summed divergence
  to the cached expert outputs. Every learned method on a subset sees the same input sequence. With
  ``--holdout F`` a fraction F of each task's unlabelled inputs is kept out of training; every
  ``--eval_every`` steps the divergence on them is measured (no labels) and the coefficients with the
  lowest one are kept (selection / early stopping); the CSV reports the train and held-out divergence of
  the kept coefficients and the step they come from;
- diagnostic ``ceiling-<granularity>`` (not in the defaults): the same training, but cross-entropy on
  the labelled *test* inputs themselves. It is not a merge method (it fits the very labels it is
  scored on); its ANP is an optimistic bound on what that granularity's coefficients can reach on this
  test set with the same optimisation budget.

Experts are loaded once per process; teacher outputs (expert log-probabilities on the unlabelled and
test inputs) are computed once per task into the divmerge teacher cache and reused across subsets and
runs. Expert accuracy is the teacher's argmax on the test inputs.

Outputs, under ``--out_dir``: ``merge_quality.csv`` (one row per subset x method, with ``ci_low`` /
``ci_high``: the 95% bootstrap interval of its ANP over the test rows), ``merge_quality.md`` (ANP % by k
and method, each cell with the 95% interval of its mean over subsets, plus the mean over k) and
``merge_quality.png``. Intervals (``divmerge.intervals``): percentile bootstrap, 2,000 resamples, seed 0,
each task's test rows resampled on their own and shared by the expert and every merge scored on them;
only where every task is scored per row (accuracy, exact match; not a corpus-level text metric).

Examples::

    python -m benchmarks.merge_quality --quick                  # the 6-task demo, a few minutes
    python -m benchmarks.merge_quality --workers 2              # the full benchmark (57 min, 2 cores)
    python -m benchmarks.merge_quality --methods ceiling-layer  # what layer-wise coefficients can reach
    python -m benchmarks.merge_quality --dry_run                # plan + time estimate, then stop
    python -m benchmarks.merge_quality --threads 1              # much faster when the cores are shared
    python -m benchmarks.merge_quality --tasks rt,trec,bbc --methods task_arithmetic,js-layer
    python -m benchmarks.merge_quality --base /m/base --experts a=/m/a,b=/m/b,c=/m/c \\
        --data a=/d/a.csv,b=/d/b.csv,c=/d/c.csv --out_dir runs/mq
"""

import argparse
import itertools
import math
import multiprocessing
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Subset

from benchmarks.common.measure import release_memory
from benchmarks.common.results import write_csv
from divmerge.core.coefficients import GRANULARITIES
from divmerge.core.expert_set import ExpertSet
from divmerge.core.merged_model import MergedModel
from divmerge.data import Rows, TaskDataset, TaskSpec
from divmerge.engine import DEFAULT_LR, Merger
from divmerge.errors import DivMergeError
from divmerge.evaluation import TaskResult, anp, anp_interval
from divmerge.intervals import Interval, mean_ratio_interval
from divmerge.lightning.datamodule import MergeDataModule
from divmerge.methods import method_names, parse_method
from divmerge.objectives import OBJECTIVES
from divmerge.static import STATIC_METHODS
from divmerge.zoo import DEMO_TASKS, EXTRA_TASKS, GEN_PREFIX, GENERATIVE_TASKS, MORE_TASKS, default_cache_dir

PROG = "merge_quality"
# wudi runs 300 Adam steps per matrix: on the MiniLM demo, minutes of one CPU thread per merge (about
# 7.6 TFLOP, the token embedding a third of it); the 57 min below were timed before it was added.
STATIC = tuple(STATIC_METHODS)  # every static merge of the registry, at its default options
LEARNED = tuple(f"{o}-{g}" for o in ("js", "kl", "entropy") for g in ("layer", "task"))
DEFAULT_METHODS = STATIC + LEARNED
# Defaults of the options that --quick changes: (full, quick). Full: 57 min on 2 idle cores with
# --workers 2 (k = 2..6 of the 6 demo tasks, 13 subsets, 10 methods). Quick: a smoke test of a few
# minutes; its learned merges take 10 steps. Learning rate 0.05 for both: at k = 6, 80 steps, it gave
# ANP 90.8 against 88.0 with 0.02 (0.1 gave 91.2; README "Why JS layer-wise stops near 91").
SIZES: dict[str, tuple[int, int]] = {
    "subsets_per_k": (3, 2),
    "steps": (80, 10),
    "num_test": (200, 64),
    "num_unlabelled": (128, 64),
}
LR = DEFAULT_LR
GEN_TASKS = ("rt", "sms_spam", "trec", "bbc_headline", "bbc")  # --generative: default tasks, in order
GEN_BASE = "zoo:smollm2"
# --generative: the teacher and evaluation settings of configs/smollm2_demo.yaml
GEN_OPTIONS = {"max_new_tokens": 24, "teacher_top_k": 50}
GEN_METRICS = {"bbc_headline": "CHRFScore"}  # tasks not named here: exact match
GEN_MAX_LENGTH = 128
HELDOUT_BATCH = 32  # inputs per forward when measuring a divergence over a whole (held-out) set
ALL_TASKS = "all"  # --tasks all: every demo task (the 16 classification ones, k = 2..16)
CEILING = "ceiling"  # the labelled test-set fit (diagnostic upper bound), see the module docstring
ROWS_KEY = "_rows"  # a result row's per-task (expert, merged) 0/1 correctness of each test row

Batch = dict[str, Tensor]


def valid_methods() -> list[str]:
    """Every method name this benchmark accepts: static merges, ``<objective>-<granularity>``, ceilings.

    ``<objective>-svd<r>`` (rank r) is accepted too, beside the ``svd`` listed here.
    """
    return method_names([CEILING])


def split_start(method: str) -> tuple[str, str | None]:
    """``js-row@tsv_m`` -> (``js-row``, ``tsv_m``): the learned method and the static merge it starts from."""
    parsed = parse_method(method, [CEILING])
    return parsed.learned, parsed.start_from


def parse_learned(method: str) -> tuple[str, str, dict[str, int]]:
    """``js-svd8`` -> (``js``, ``svd``, {rank: 8}); ``js-layer`` -> (``js``, ``layer``, {}) (the registries'
    parser, ``divmerge.methods.parse_method``)."""
    parsed = parse_method(method, [CEILING])
    assert parsed.objective is not None and parsed.granularity is not None, f"{method} is not learned"
    return parsed.objective, parsed.granularity, parsed.space_options


def is_valid_method(method: str) -> bool:
    """Whether ``method`` is in ``valid_methods()``, an ``<objective>-svd<r>`` with r >= 1, or a learned
    one of these followed by ``@<static method>``."""
    try:
        parse_method(method, [CEILING])
    except DivMergeError:
        return False
    return True


def is_static(method: str) -> bool:
    """Whether ``method`` is a static (training-free) merge."""
    return method in STATIC_METHODS


@dataclass(frozen=True)
class Settings:
    """Resolved, validated benchmark options (see ``build_parser`` for each one's meaning)."""

    tasks: list[str]
    base: str
    experts: dict[str, str]
    data: dict[str, str]
    methods: list[str]
    min_k: int
    max_k: int
    subsets_per_k: int
    steps: int
    batch_per_task: int
    lr: float
    init: float | None
    num_test: int
    num_unlabelled: int
    max_length: int
    eval_batch_size: int
    text_column: str
    label_column: str
    seed: int
    threads: int
    workers: int
    cache_dir: str
    out_dir: str
    quick: bool = False
    dry_run: bool = False
    generative: bool = False
    prompt_template: str = "{prompt}"
    chat_template: bool = True
    holdout: float = 0.0
    eval_every: int = 10


@dataclass
class Costs:
    """Measured unit costs used to estimate the total runtime.

    Attributes:
        step: k -> seconds of one learned step with k tasks (measured at the smallest and largest k).
        eval_per_example: Seconds to evaluate one test example.
        static_per_task: Static method -> seconds per task of the subset.

    """

    step: dict[int, float]
    eval_per_example: float
    static_per_task: dict[str, float] = field(default_factory=dict)

    def step_seconds(self, k: int) -> float:
        """Seconds of one learned step with k tasks, linear between the measured ks."""
        (k0, s0), (k1, s1) = min(self.step.items()), max(self.step.items())
        if k1 == k0:
            return s0 * k / k0
        return max(0.0, s0 + (s1 - s0) * (k - k0) / (k1 - k0))


@dataclass
class Prepared:
    """Everything the merges of one benchmark run share: the engine (experts + teachers), data, accuracy."""

    merger: Merger
    dm: MergeDataModule
    test_batches: dict[str, list[Batch]]
    expert_acc: dict[str, float]
    test_rows: dict[str, Rows]


# ------------------------------------------------------------------------------------------ options


def parse_pairs(text: str | None, what: str) -> dict[str, str]:
    """Parse ``name=value,name=value`` into a dict.

    Args:
        text: The option's value, or None.
        what: The option's name, for the error message.

    Returns:
        Name -> value, in the given order (empty for None).

    """
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise DivMergeError(f"--{what} expects name=value pairs separated by commas, got {part!r}.")
        out[name.strip()] = value.strip()
    return out


def parse_list(text: str | None) -> list[str]:
    """Split a comma-separated option into its non-empty, stripped items."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


class _Formatter(argparse.HelpFormatter):
    """Append ``(default: ...)`` to help texts that do not state their default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.default is False:
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every option is documented in ``--help``."""
    full = {name: sizes[0] for name, sizes in SIZES.items()}
    quick = {name: sizes[1] for name, sizes in SIZES.items()}
    p = argparse.ArgumentParser(
        prog=PROG,
        description="ANP of static and learned merges by number of merged tasks (DivMerge Table 6). "
        "Runs on the offline 6-task demo by default; point --base/--experts/--data at your own.",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke-test sizes {quick} instead of the full defaults {full} (a few minutes on 2 idle "
        "cores once the teacher cache is built; noisy numbers)",
    )
    p.add_argument(
        "--generative",
        action="store_true",
        help=f"merge the generative SmolLM2 demo experts ({GEN_BASE}, zoo:{GEN_PREFIX}<task>) on the "
        f"generative demo tasks (default {','.join(GEN_TASKS)}): prompts through the chat template, answers "
        "scored by exact match (bbc_headline: chrF), as configs/smollm2_demo.yaml",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task names (experts), in order; default: the --experts names, else the "
        f"demo tasks {','.join(DEMO_TASKS)} (more: {','.join((*EXTRA_TASKS, *MORE_TASKS))}); "
        "'all': every demo task (16 classification tasks, k = 2..16)",
    )
    p.add_argument(
        "--base", default=None, help=f"base model (and tokenizer) source; default zoo:minilm ({GEN_BASE})"
    )
    p.add_argument(
        "--experts",
        default=None,
        help="task=expert_source pairs, comma-separated (HF model directories); default zoo:<task>",
    )
    p.add_argument(
        "--data",
        default=None,
        help="task=data_source pairs, comma-separated (csv/tsv/json/jsonl/parquet with a text and an "
        "integer label column); default zoo:<task>",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods: static {list(STATIC_METHODS)} (default options) or learned "
        f"<objective>-<granularity> with objective in {list(OBJECTIVES)} and granularity in "
        f"{list(GRANULARITIES)} (svd<r> for rank r; @<static> to start from that static merge, e.g. "
        f"js-row@tsv_m); diagnostic {CEILING}-<granularity> fits the test labels (an upper bound of "
        "that granularity, not a method)",
    )
    p.add_argument("--min_k", type=int, default=2, help="smallest number of merged tasks (>= 2)")
    p.add_argument("--max_k", type=int, default=None, help="largest number of merged tasks; default all")
    for name, help_text in (
        ("subsets_per_k", "task subsets per k (all of them when there are at most this many)"),
        ("steps", "optimiser steps of each learned merge"),
        ("num_test", "labelled test examples per task"),
        ("num_unlabelled", "unlabelled examples per task that learned merges draw from"),
    ):
        p.add_argument(
            f"--{name}",
            type=int,
            default=None,
            help=f"{help_text}; default {full[name]} ({quick[name]} with --quick)",
        )
    p.add_argument(
        "--batch_per_task",
        type=int,
        default=4,
        help="inputs per task per step of learned merges (unlabelled; test inputs for a ceiling)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak Adam learning rate (cosine decay to 0); default {LR}",
    )
    p.add_argument(
        "--init",
        type=float,
        default=None,
        help="initial value of every learned coefficient; default 1/k (DivMerge, Algorithm 1)",
    )
    p.add_argument(
        "--max_length",
        type=int,
        default=None,
        help=f"tokens per input (prompts keep their end); default 64 ({GEN_MAX_LENGTH} generative)",
    )
    p.add_argument("--eval_batch_size", type=int, default=64, help="batch size of evaluation and teachers")
    p.add_argument(
        "--prompt_template",
        default="{prompt}",
        help="--generative: the prompt as a format string over the data's columns (the zoo's prompt column "
        "by default); references come from the column answer",
    )
    p.add_argument(
        "--plain_prompts",
        action="store_true",
        help="--generative: send prompts as written instead of through the tokenizer's chat template",
    )
    p.add_argument("--text_column", default="text", help="text column of --data files")
    p.add_argument("--label_column", default="label", help="integer label column of --data files")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 keeps torch's default (1 can be several times faster on a busy machine)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that run merges in parallel, each loading the experts once (about 2 GB each on "
        "the demo, on top of this process's own copy); on 2 idle cores, 2 workers of 1 thread ran "
        "merges about 1.3x faster than 1 process of 2 threads once started (README)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, subsets and learned runs")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of each task's unlabelled inputs kept out of learned merges' training; the "
        "coefficients with the lowest divergence on them are kept (no labels); 0 holds none out",
    )
    p.add_argument(
        "--eval_every", type=int, default=10, help="steps between held-out divergence measurements"
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="teacher cache (and demo experts) directory; default $DIVMERGE_CACHE or ~/.cache/divmerge",
    )
    p.add_argument("--out_dir", default="benchmarks/results", help="where the CSV, table and plot go")
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="build the teacher cache, print the plan and the estimated time, then stop",
    )
    return p


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Turn parsed arguments into validated settings; raise DivMergeError on bad input.

    Args:
        args: Output of ``build_parser().parse_args``.

    Returns:
        The settings.

    """
    experts = parse_pairs(args.experts, "experts")
    data = parse_pairs(args.data, "data")
    demo = GENERATIVE_TASKS if args.generative else (*DEMO_TASKS, *EXTRA_TASKS, *MORE_TASKS)
    tasks = parse_list(args.tasks) or list(experts) or list(GEN_TASKS if args.generative else DEMO_TASKS)
    if tasks == [ALL_TASKS]:
        tasks = list(demo)
    if len(set(tasks)) != len(tasks):
        raise DivMergeError(f"--tasks lists a task twice: {tasks}.")
    if experts:
        missing = [t for t in tasks if t not in experts]
        if missing:
            raise DivMergeError(
                f"Tasks {missing} have no expert: there are experts for {list(experts)} only; add "
                "name=path to --experts or drop them from --tasks."
            )
    else:
        unknown = [t for t in tasks if t not in demo]
        if unknown:
            raise DivMergeError(
                f"Tasks {unknown} have no expert: the demo has experts for {list(demo)} only; give "
                "--experts name=path for your own."
            )
    zoo = f"zoo:{GEN_PREFIX}" if args.generative else "zoo:"
    experts = {t: experts.get(t, f"{zoo}{t}") for t in tasks}
    missing = [t for t in tasks if t not in data and not experts[t].startswith("zoo:")]
    if missing:
        raise DivMergeError(f"Tasks {missing} have no data: add name=file to --data.")
    data = {t: data.get(t, f"zoo:{t}") for t in tasks}
    methods = parse_list(args.methods)
    valid = valid_methods()
    unknown = [m for m in methods if not is_valid_method(m)]
    if unknown or not methods:
        raise DivMergeError(f"Unknown method {(unknown or [''])[0]!r}: use one or more of {valid}.")
    if len(set(methods)) != len(methods):
        raise DivMergeError(f"--methods lists a method twice: {methods}.")
    max_k = len(tasks) if args.max_k is None else args.max_k
    if args.min_k < 2 or max_k < 2:
        raise DivMergeError(
            f"k must be at least 2 (a merge needs two experts), got min_k={args.min_k}, max_k={max_k}."
        )
    if max_k > len(tasks):
        raise DivMergeError(
            f"max_k={max_k} asks for more tasks than there are experts ({len(tasks)}: {tasks}): lower "
            "--max_k or add experts."
        )
    if args.min_k > max_k:
        raise DivMergeError(f"min_k={args.min_k} is larger than max_k={max_k}.")
    sizes = {name: getattr(args, name) for name in SIZES}
    sizes = {
        name: SIZES[name][1 if args.quick else 0] if value is None else value for name, value in sizes.items()
    }
    for name, value in [*sizes.items(), ("batch_per_task", args.batch_per_task)]:
        if value < 1:
            raise DivMergeError(f"--{name} must be at least 1, got {value}.")
    if args.workers < 1:
        raise DivMergeError(f"--workers must be at least 1, got {args.workers}.")
    if args.threads < 0:
        raise DivMergeError(f"--threads must be 0 (torch's default) or more, got {args.threads}.")
    max_length = args.max_length or (GEN_MAX_LENGTH if args.generative else 64)
    for name, value in (("max_length", max_length), ("eval_batch_size", args.eval_batch_size)):
        if value < 1:
            raise DivMergeError(f"--{name} must be at least 1, got {value}.")
    lr = LR if args.lr is None else args.lr
    if not (lr > 0 and math.isfinite(lr)):
        raise DivMergeError(f"--lr must be a positive number, got {lr}.")
    if not 0 <= args.holdout < 1:
        raise DivMergeError(f"--holdout must be a fraction in [0, 1), got {args.holdout}.")
    if args.eval_every < 1:
        raise DivMergeError(f"--eval_every must be at least 1, got {args.eval_every}.")
    if args.init is not None and not math.isfinite(args.init):
        raise DivMergeError(f"--init must be a finite number, got {args.init}.")
    return Settings(
        tasks=tasks,
        base=args.base or (GEN_BASE if args.generative else "zoo:minilm"),
        experts=experts,
        data=data,
        methods=methods,
        min_k=args.min_k,
        max_k=max_k,
        batch_per_task=args.batch_per_task,
        lr=lr,
        init=args.init,
        holdout=args.holdout,
        eval_every=args.eval_every,
        max_length=max_length,
        eval_batch_size=args.eval_batch_size,
        text_column=args.text_column,
        label_column=args.label_column,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
        cache_dir=str(Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()),
        out_dir=args.out_dir,
        quick=args.quick,
        dry_run=args.dry_run,
        generative=args.generative,
        prompt_template=args.prompt_template,
        chat_template=not args.plain_prompts,
        **sizes,
    )


# ------------------------------------------------------------------------------------------ subsets


def choose_subsets(num_tasks: int, k: int, n: int, seed: int) -> list[tuple[int, ...]]:
    """The task subsets of size k to merge: all of them, or a seeded sample of n.

    Args:
        num_tasks: Number of tasks T.
        k: Subset size, 1 <= k <= T.
        n: Subsets wanted (at least 1).
        seed: Sampling seed; the sample depends only on (T, k, n, seed).

    Returns:
        Sorted tuples of task indices, in lexicographic order; all C(T, k) when n >= C(T, k).

    """
    if not 1 <= k <= num_tasks or n < 1:
        raise DivMergeError(f"Cannot choose {n} subsets of {k} of {num_tasks} tasks.")
    total = math.comb(num_tasks, k)
    if n >= total:
        return list(itertools.combinations(range(num_tasks), k))
    rng = random.Random(f"{seed}|{num_tasks}|{k}")
    if total <= 100_000:
        return sorted(rng.sample(list(itertools.combinations(range(num_tasks), k)), n))
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < n:
        chosen.add(tuple(sorted(rng.sample(range(num_tasks), k))))
    return sorted(chosen)


# --------------------------------------------------------------------------------------------- data


def make_datamodule(settings: Settings) -> MergeDataModule:
    """The benchmark's data: per task, disjoint test and unlabelled parts (no validation part)."""
    prompts = {
        "kind": "generative",
        "prompt_template": settings.prompt_template,
        "answer_column": "answer",
        "chat_template": settings.chat_template,
    }
    specs = [
        TaskSpec(
            name=t,
            source=settings.data[t],
            text_column=settings.text_column,
            label_column=settings.label_column,
            num_unlabelled=settings.num_unlabelled,
            num_val=0,
            num_test=settings.num_test,
            **(prompts if settings.generative else {}),
        )
        for t in settings.tasks
    ]
    return MergeDataModule(
        tasks=specs,
        tokenizer=settings.base,
        max_length=settings.max_length,
        batch_size_per_task=settings.batch_per_task,
        eval_batch_size=settings.eval_batch_size,
        seed=settings.seed,
        experts=settings.experts,
    )


def eval_batches(dm: MergeDataModule, task: str, batch_size: int) -> list[Batch]:
    """A task's test examples as padded batches, sorted by length (less padding; same accuracy)."""
    ds = dm.dataset(task, "test")
    items = sorted((ds[i] for i in range(len(ds))), key=lambda item: len(item["input_ids"]))
    return [dm.collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def build_teachers(merger: Merger, dm: MergeDataModule) -> list[str]:
    """Expert log-probabilities on every task's unlabelled and test inputs, through the engine's cache.

    The files are keyed by expert and data digests, so they are shared across subsets, runs and with
    ``train.py`` runs on the same data.

    Args:
        merger: The engine over the whole expert set; its teachers are loaded.
        dm: The data.

    Returns:
        The names of the files built now.

    """
    paths = merger.teacher_paths(dm, ("unlabelled", "test"))
    built = merger.build_teachers(dm, paths, torch.device("cpu"))
    merger.load_teachers(dm, paths)
    return [path.name for _, _, path in built]


# ------------------------------------------------------------------------------------------- merges


def sample_batches(
    unlabelled: Sequence[TaskDataset],
    collate: Callable[[list[dict[str, Any]]], Batch],
    batch_per_task: int,
    generator: torch.Generator,
) -> dict[int, Batch]:
    """Draw ``batch_per_task`` distinct unlabelled inputs of every task (fewer if a task has fewer)."""
    batches = {}
    for t, ds in enumerate(unlabelled):
        pick = torch.randperm(len(ds), generator=generator)[:batch_per_task].tolist()
        batches[t] = collate([ds[i] for i in pick])
    return batches


def cross_entropy(labels: Tensor, logits: Tensor) -> Tensor:
    """Per-example cross-entropy to class labels (B,): the ``CEILING`` objective's "divergence"."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # (B,)


def learned_merge(
    experts: ExpertSet | Merger,
    method: str,
    unlabelled: Sequence[TaskDataset],
    teachers: Sequence[Tensor],
    collate: Callable[[list[dict[str, Any]]], Batch],
    steps: int,
    batch_per_task: int = 4,
    lr: float = LR,
    seed: int = 0,
    init: float | None = None,
    holdout: float = 0.0,
    eval_every: int = 10,
) -> tuple[MergedModel, dict[str, Tensor], dict[str, Any]]:
    """Learn merge coefficients with the engine's training step: divergence to the cached teachers (or,
    for a ceiling, cross-entropy to the labels of the data drawn from).

    Args:
        experts: The (subset) expert set, or an engine over it (left untouched: a copy learns).
        method: ``<objective>-<granularity>``, e.g. ``js-layer``, or ``ceiling-<granularity>``.
        unlabelled: Per subset task, the dataset drawn from: its unlabelled inputs (its labelled test
            inputs for a ceiling).
        teachers: Per subset task, teacher log-probabilities on ``unlabelled`` (N_t, C_t); unused by
            a ceiling.
        collate: Pads a list of dataset items into a batch.
        steps: Adam steps; the learning rate decays from ``lr`` to 0 (cosine).
        batch_per_task: Inputs of every task per step.
        lr: Peak learning rate.
        seed: Seeds torch and the input sampler.
        init: Initial value of every coefficient; None means 1/k (0 with a start, ``@<static>``).
        holdout: Fraction of each task's inputs kept out of training (0: none). The coefficients with
            the lowest divergence on them, measured every ``eval_every`` steps (and at steps 0 and
            ``steps``), are kept.
        eval_every: Steps between held-out measurements.

    Returns:
        (the merged model with learned coefficients, its merged tensors, detached, and the selection
        report: ``coefficients`` (trainable count), ``task_vector_mb`` (their storage, float32),
        ``step_seconds``; with a holdout also
        ``train_divergence`` and ``heldout_divergence`` (mean per task) and ``best_step``).

    """
    objective, granularity, space_options = parse_learned(method)
    torch.manual_seed(seed)
    ceiling = objective == CEILING
    settings = {
        "granularity": granularity,
        "objective": cross_entropy if ceiling else objective,
        "init": init,
        "space_options": space_options,
        "start_from": split_start(method)[1],
    }
    if isinstance(experts, Merger):
        merger = experts.subset(experts.task_names, **settings)
    else:
        merger = Merger.from_expert_set(experts, **settings)
    split = "test" if ceiling else "unlabelled"
    merger.teachers = {
        (task, split): torch.tensor(data.labels) if ceiling else teacher
        for task, data, teacher in itertools.zip_longest(merger.task_names, unlabelled, teachers)
    }
    coefficients = merger.build().coefficients
    optimizer = torch.optim.Adam(coefficients.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    train, held = split_holdout(unlabelled, holdout, seed)
    best: tuple[float, int, Tensor] | None = None
    start = time.perf_counter()
    for step in range(steps + 1):
        if held and (step % eval_every == 0 or step == steps):
            value = mean_divergence(merger, held, collate, split)
            if best is None or value < best[0]:
                best = (value, step, coefficients.weight.detach().clone())
        if step == steps:
            break
        batches = sample_batches(train, collate, batch_per_task, generator)
        loss, _ = merger.step_loss({merger.task_names[t]: b for t, b in batches.items()}, split)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    stored = merger.build().task_vectors
    report: dict[str, Any] = {
        "coefficients": coefficients.weight.numel(),
        "task_vector_mb": stored.numel() * 4 / 1e6,  # float32 storage (the benchmark's dtype)
        "step_seconds": (time.perf_counter() - start) / max(1, steps),
    }
    if best is not None:
        with torch.no_grad():
            coefficients.weight.copy_(best[2])
        report |= {
            "train_divergence": mean_divergence(merger, train, collate, split),
            "heldout_divergence": best[0],
            "best_step": best[1],
        }
    return merger.build(), merger.learned_params(), report


def split_holdout(datasets: Sequence[TaskDataset], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Per task, (training inputs, held-out inputs): a seeded ``fraction`` of each, at least one row.

    Items keep their ``idx`` into the task's teacher cache. With ``fraction`` 0 nothing is held out.
    """
    if fraction <= 0:
        return list(datasets), []
    train, held = [], []
    for ds in datasets:
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = min(len(ds) - 1, max(1, round(fraction * len(ds))))
        held.append(Subset(ds, order[:cut]))
        train.append(Subset(ds, order[cut:]))
    return train, held


def mean_divergence(
    merger: Merger, datasets: Sequence[Any], collate: Callable[[list[dict[str, Any]]], Batch], split: str
) -> float:
    """Mean over the merger's tasks of the mean divergence on all of a task's ``datasets`` inputs."""
    per_task = []
    for task, ds in zip(merger.task_names, datasets, strict=True):
        total = 0.0
        for i in range(0, len(ds), HELDOUT_BATCH):
            items = [ds[j] for j in range(i, min(i + HELDOUT_BATCH, len(ds)))]
            total += float(merger.divergence({task: collate(items)}, split)[task]) * len(items)
        per_task.append(total / len(ds))
    return sum(per_task) / len(per_task)


def evaluate(
    merger: Merger,
    params: Mapping[str, Tensor],
    batches: Mapping[str, Sequence[Batch]],
    rows: Mapping[str, Rows] | None = None,
    correct: dict[str, dict[str, Tensor]] | None = None,
) -> list[float]:
    """Test accuracy of merged tensors on every task of the subset, with the engine's evaluation.

    Args:
        merger: The subset's engine (its test teachers loaded).
        params: Merged backbone tensors (``merged_params`` naming).
        batches: Per subset task, its labelled test batches.
        rows: Per task, its test rows (generative tasks: the reference answers).
        correct: When given, filled with task -> ``expert`` / ``merged`` -> each test row's 0/1
            correctness (tasks scored by a mean of per-row scores: accuracy, exact match).

    Returns:
        Per subset task (in ``merger.task_names`` order), the accuracy (or generation metric).

    """
    scores = merger.evaluate(batches, "test", {"merged": params}, rows, correct)
    return [scores[task]["merged"] for task in merger.task_names]


# ------------------------------------------------------------------------------------------ reports


def anp_intervals(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[int, str], Interval]:
    """95% bootstrap interval of the mean ANP over subsets, per (k, method), where rows were kept.

    Each task's test rows are resampled once per resample and shared by every subset holding the task
    (the subsets of one k overlap): ``divmerge.intervals.mean_ratio_interval`` over the subsets' merges.
    """
    groups: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((int(row["k"]), str(row["method"])), []).append(row)
    out = {}
    for key, group in groups.items():
        if not all(row.get(ROWS_KEY) for row in group):
            continue
        expert = {t: e for row in group for t, (e, _) in row[ROWS_KEY].items()}
        merges = [{t: m for t, (e, m) in row[ROWS_KEY].items() if e.any()} for row in group]  # as anp()
        interval = mean_ratio_interval(expert, merges)
        if interval is not None:
            out[key] = interval
    return out


def anp_by_k(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[int, str], float]:
    """Mean ANP over subsets, per (k, method)."""
    groups: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        groups.setdefault((int(row["k"]), str(row["method"])), []).append(float(row["anp"]))
    return {key: sum(values) / len(values) for key, values in groups.items()}


def anp_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None) -> str:
    """Markdown table of ANP (%, 1 decimal): one row per k, then the mean over k; one column per method.

    A cell whose rows kept their per-row correctness (``merge_and_score``'s ``_rows``) carries its 95%
    bootstrap interval over the test rows, ``95.2 [93.9, 96.4]`` (``anp_intervals``); the mean over k
    has none.

    Args:
        rows: Result rows with ``k``, ``tasks``, ``method`` and ``anp`` (a fraction).
        methods: Column order; default the order of first appearance.

    Returns:
        The table.

    """
    methods = list(methods) if methods is not None else list(dict.fromkeys(str(r["method"]) for r in rows))
    means = anp_by_k(rows)
    intervals = anp_intervals(rows)
    ks = sorted({int(r["k"]) for r in rows})
    subsets = {k: len({r["tasks"] for r in rows if int(r["k"]) == k}) for k in ks}

    def with_interval(k: int, method: str) -> str:
        text = cell([means[k, method]] if (k, method) in means else [])
        if (k, method) not in intervals:
            return text
        return f"{text} [{100 * intervals[k, method].low:.1f}, {100 * intervals[k, method].high:.1f}]"

    def cell(values: Sequence[float]) -> str:
        values = [v for v in values if not math.isnan(v)]
        return f"{100 * sum(values) / len(values):.1f}" if values else "-"

    lines = [
        "| k | subsets | " + " | ".join(methods) + " |",
        "|---|---|" + "|".join("---:" for _ in methods) + "|",
    ]
    for k in ks:
        values = [with_interval(k, m) for m in methods]
        lines.append(f"| {k} | {subsets[k]} | " + " | ".join(values) + " |")
    mean = [cell([means[k, m] for k in ks if (k, m) in means]) for m in methods]
    lines.append("| mean |  | " + " | ".join(mean) + " |")
    return "\n".join(lines)


def plot_anp(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], path: Path) -> Path:
    """Line plot of mean ANP (%) against the number of merged tasks; learned solid, static dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = anp_by_k(rows)
    ks = sorted({int(r["k"]) for r in rows})
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for method in methods:
        xs = [k for k in ks if (k, method) in means]
        ax.plot(
            xs,
            [100 * means[k, method] for k in xs],
            linestyle="--" if is_static(method) else "-",
            marker="o",
            label=method,
        )
    ax.set_xlabel("number of merged tasks k")
    ax.set_ylabel("ANP (%)")
    ax.set_xticks(ks)
    ax.set_title("Merge quality vs number of tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: lines stay visible
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ running


def calibrate(settings: Settings, prep: Prepared) -> Costs:
    """Time one learned step at the smallest and largest k, one eval batch and each static method."""
    learned = [m for m in settings.methods if not is_static(m)]
    steps: dict[int, float] = {}
    if learned:
        for k in sorted({settings.min_k, settings.max_k}):
            tasks = settings.tasks[:k]
            data = training_data(prep, learned[0], tasks)
            teachers = [prep.merger.teachers[t, "unlabelled"] for t in tasks]
            sub = prep.merger.subset(tasks)
            for _ in range(2):  # the first step warms up
                start = time.perf_counter()
                learned_merge(sub, learned[0], data, teachers, prep.dm.collate, 1, settings.batch_per_task)

                steps[k] = time.perf_counter() - start
    sub = prep.merger.subset(settings.tasks[: settings.min_k], granularity="task")
    params = sub.learned_params()
    longest = {settings.tasks[0]: [prep.test_batches[settings.tasks[0]][-1]]}  # a conservative estimate
    evaluate(sub.subset(settings.tasks[:1]), params, longest, prep.test_rows)
    start = time.perf_counter()
    evaluate(sub.subset(settings.tasks[:1]), params, longest, prep.test_rows)
    costs = Costs(
        steps or {2: 0.0}, (time.perf_counter() - start) / len(longest[settings.tasks[0]][0]["input_ids"])
    )
    for method in (m for m in settings.methods if is_static(m)):
        start = time.perf_counter()
        sub.static_params(method)
        costs.static_per_task[method] = (time.perf_counter() - start) / settings.min_k
    return costs


def estimate_seconds(
    settings: Settings, subsets: Mapping[int, Sequence[tuple[int, ...]]], costs: Costs
) -> float:
    """Estimated seconds of the merges and evaluations of the whole benchmark."""
    total = 0.0
    for k, chosen in subsets.items():
        for _ in chosen:
            for method in settings.methods:
                if is_static(method):
                    total += costs.static_per_task.get(method, 0.0) * k
                else:
                    total += settings.steps * costs.step_seconds(k)
                total += costs.eval_per_example * settings.num_test * k
    return total


def ci_text(row: Mapping[str, Any]) -> str:
    """`` [93.9, 96.4]``: a result row's 95% interval in %, or '' without one."""
    if row.get("ci_low", "") == "":
        return ""
    return f" [{100 * float(row['ci_low']):.1f}, {100 * float(row['ci_high']):.1f}]"


def fmt_seconds(seconds: float) -> str:
    """``75.0`` -> ``1 min 15 s``."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def prepare(settings: Settings, phases: dict[str, float], quiet: bool = False) -> Prepared:
    """Load the experts and data and build (or reuse) the teacher cache, timing each phase.

    Args:
        settings: Validated settings.
        phases: Phase name -> seconds; the phases of this function are added to it.
        quiet: Do not print the teacher-cache line (worker processes).

    Returns:
        The shared inputs of every merge.

    """
    t0 = time.perf_counter()
    metrics = {t: m for t, m in GEN_METRICS.items() if t in settings.tasks}
    options = GEN_OPTIONS | {"generation_metric": metrics} if settings.generative else None
    merger = Merger(settings.base, settings.experts, family_options=options, cache_dir=settings.cache_dir)
    merger.build()
    phases["load experts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dm = make_datamodule(settings)
    merger.check_data(dm)
    for task in settings.tasks:
        dm.dataset(task, "unlabelled")
        dm.dataset(task, "test")
    test_batches = {task: eval_batches(dm, task, settings.eval_batch_size) for task in settings.tasks}
    phases["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    built = build_teachers(merger, dm)
    phases["teacher cache"] = time.perf_counter() - t0
    if not quiet:
        print(
            f"teacher cache ({settings.cache_dir}/teachers): built {len(built)} files, reused "
            f"{2 * len(settings.tasks) - len(built)}, in {fmt_seconds(phases['teacher cache'])}",
            flush=True,
        )
    rows = {task: dm.rows(task)["test"] for task in settings.tasks}
    scores = merger.evaluate(test_batches, "test", {}, rows)
    return Prepared(merger, dm, test_batches, {task: scores[task]["expert"] for task in settings.tasks}, rows)


def training_data(prep: Prepared, method: str, tasks: Sequence[str]) -> list[TaskDataset]:
    """What a learned method trains on, per task: the unlabelled inputs, or for a ceiling the test set."""
    split = "test" if method.startswith(f"{CEILING}-") else "unlabelled"
    return [prep.dm.dataset(t, split) for t in tasks]


def merge_and_score(
    settings: Settings, prep: Prepared, k: int, tasks: Sequence[str], method: str
) -> dict[str, Any]:
    """Merge one task subset with one method and score it on the subset's test data.

    Args:
        settings: Validated settings.
        prep: The shared inputs.
        k: Subset size (for the row).
        tasks: The subset's task names.
        method: A static method or ``<objective>-<granularity>``.

    Returns:
        The result row: k, tasks, method, ANP, per-task accuracies, merge / eval seconds.

    """
    sub = prep.merger.subset(list(tasks))
    start = time.perf_counter()
    report: dict[str, Any] = {}
    if is_static(method):
        params = sub.static_params(method)
    else:
        _, params, report = learned_merge(
            sub,
            method,
            training_data(prep, method, tasks),
            [prep.merger.teachers[t, "unlabelled"] for t in tasks],
            prep.dm.collate,
            settings.steps,
            settings.batch_per_task,
            settings.lr,
            settings.seed,
            settings.init,
            settings.holdout,
            settings.eval_every,
        )
    merge_s = time.perf_counter() - start
    start = time.perf_counter()
    correct: dict[str, dict[str, Tensor]] = {}
    accuracies = evaluate(sub, params, {t: prep.test_batches[t] for t in tasks}, prep.test_rows, correct)
    eval_s = time.perf_counter() - start
    kept = {t: {name: v.numpy() for name, v in correct[t].items()} for t in tasks if t in correct}
    results = [
        TaskResult(t, len(prep.dm.dataset(t, "test")), prep.expert_acc[t], acc, rows=kept.get(t))
        for t, acc in zip(tasks, accuracies, strict=True)
    ]
    interval = anp_interval(results)
    row: dict[str, Any] = {"k": k, "tasks": "+".join(tasks), "method": method, "anp": round(anp(results), 6)}
    row |= {"ci_low": "", "ci_high": ""}  # 95% bootstrap interval over the test rows (if kept)
    if interval is not None:
        row |= {"ci_low": round(interval.low, 6), "ci_high": round(interval.high, 6)}
    row |= {f"acc_{t}": "" for t in settings.tasks}
    row |= {f"acc_{t}": round(acc, 6) for t, acc in zip(tasks, accuracies, strict=True)}
    row |= {
        "merge_seconds": round(merge_s, 3),
        "eval_seconds": round(eval_s, 3),
        "seconds": round(merge_s + eval_s, 3),
    }
    row |= {key: round(value, 6) if isinstance(value, float) else value for key, value in report.items()}
    if len(kept) == len(tasks):  # for anp_table's intervals over subsets; not written to the CSV
        row[ROWS_KEY] = {t: (kept[t]["expert"], kept[t]["merged"]) for t in tasks}
    return row


Job = tuple[int, int, tuple[str, ...], str]  # (index, k, tasks, method)
_WORKER_STATE: tuple[Settings, Prepared] | None = None


def _init_worker(settings: Settings, threads: int) -> None:
    """Worker process start-up: quiet logs, set the thread count, load experts, data and teachers."""
    global _WORKER_STATE
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    _WORKER_STATE = settings, prepare(settings, {}, quiet=True)


def _run_job(job: Job) -> tuple[int, dict[str, Any]]:
    """Run one (subset, method) job in a worker process; returns (job index, row)."""
    assert _WORKER_STATE is not None, "worker not initialised"
    settings, prep = _WORKER_STATE
    index, k, tasks, method = job
    return index, merge_and_score(settings, prep, k, tasks, method)


def worker_threads(settings: Settings) -> int:
    """Torch threads of each worker process: ``--threads``, or this process's share of its threads."""
    return settings.threads or max(1, torch.get_num_threads() // settings.workers)


def run_jobs(settings: Settings, prep: Prepared, jobs: Sequence[Job]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Run every job, in this process or in ``settings.workers`` spawned processes; yields as they finish.

    Workers each load the experts and read the (already built) teacher cache once, then take jobs from
    a shared queue. Each uses ``settings.threads`` torch threads, or this process's thread count
    divided among the workers when that is 0. Every job is seeded on its own, so at equal thread
    counts the rows do not depend on which process ran them. A worker that dies (killed, out of
    memory, failed start-up) stops the run with an error instead of leaving it waiting.
    """
    workers = min(settings.workers, len(jobs))
    if workers <= 1:
        for index, k, tasks, method in jobs:
            yield index, merge_and_score(settings, prep, k, tasks, method)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe after torch's thread pools started
    with ProcessPoolExecutor(workers, context, _init_worker, (settings, worker_threads(settings))) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool as err:
            raise DivMergeError(
                f"A worker process died ({err}); with about 2 GB per worker on the demo, try fewer --workers."
            ) from err
        finally:
            for future in futures:
                future.cancel()


def run(settings: Settings) -> tuple[list[dict[str, Any]], str]:
    """Run the benchmark and write its outputs.

    Args:
        settings: Validated settings.

    Returns:
        (result rows, the markdown report).

    """
    phases: dict[str, float] = {}
    prep = prepare(settings, phases)
    subsets = {
        k: choose_subsets(len(settings.tasks), k, settings.subsets_per_k, settings.seed)
        for k in range(settings.min_k, settings.max_k + 1)
    }
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(settings) if settings.workers > 1 else threads)  # time as they run
    try:
        costs = calibrate(settings, prep)
    finally:
        torch.set_num_threads(threads)
    phases["calibration"] = time.perf_counter() - t0
    jobs: list[Job] = []
    for k, chosen in subsets.items():
        for subset in chosen:
            for method in settings.methods:
                jobs.append((len(jobs), k, tuple(settings.tasks[i] for i in subset), method))
    print(
        f"subsets per k: {', '.join(f'k={k}: {len(s)}' for k, s in subsets.items())}; {len(jobs)} merges "
        f"of {len(settings.methods)} methods; learned: {settings.steps} steps x {settings.batch_per_task} "
        f"inputs/task; {settings.num_test} test / {settings.num_unlabelled} unlabelled examples per task",
        flush=True,
    )
    workers = min(settings.workers, len(jobs))
    estimate = estimate_seconds(settings, subsets, costs) / workers
    where = (
        f" on {workers} worker processes (optimistic: no start-up, perfect scaling)" if workers > 1 else ""
    )
    print(f"estimated time for merges + evaluation{where}: {fmt_seconds(estimate)}", flush=True)
    if settings.dry_run:
        return [], ""

    if workers > 1:  # the workers load their own experts: this process only collects their rows
        prep.merger = None  # type: ignore[assignment]
        release_memory()
    done: dict[int, dict[str, Any]] = {}
    out_dir = Path(settings.out_dir)
    t0 = time.perf_counter()
    for index, row in run_jobs(settings, prep, jobs):
        done[index] = row
        print(
            f"[{len(done)}/{len(jobs)}] k={row['k']} {row['tasks']} {row['method']}: "
            f"ANP {100 * row['anp']:.1f}%{ci_text(row)} ({row['merge_seconds']:.1f} s merge + "
            f"{row['eval_seconds']:.1f} s eval)",
            flush=True,
        )
        csv_rows = [done[i] for i in sorted(done)]
        write_csv(out_dir / "merge_quality.csv", csv_rows, exclude=(ROWS_KEY,))  # survives interruption
    phases["merges + eval"] = time.perf_counter() - t0
    rows = [done[i] for i in sorted(done)]
    summed = {
        "static merges": sum(r["merge_seconds"] for r in rows if is_static(r["method"])),
        "learned merges": sum(r["merge_seconds"] for r in rows if not is_static(r["method"])),
        "eval": sum(r["eval_seconds"] for r in rows),
    }

    t0 = time.perf_counter()
    report = make_report(settings, rows, subsets, prep.expert_acc)
    (out_dir / "merge_quality.md").write_text(report + "\n")
    plot_anp(rows, settings.methods, out_dir / "merge_quality.png")
    phases["outputs"] = time.perf_counter() - t0
    print("\n" + report + "\n")
    print("wall time per phase: " + ", ".join(f"{name} {fmt_seconds(s)}" for name, s in phases.items()))
    print(
        "merges + eval, summed over processes: "
        + ", ".join(f"{n} {fmt_seconds(s)}" for n, s in summed.items())
    )
    print(f"total {fmt_seconds(sum(phases.values()))}; wrote {out_dir}/merge_quality.{{csv,md,png}}")
    return rows, report


def make_report(
    settings: Settings,
    rows: Sequence[Mapping[str, Any]],
    subsets: Mapping[int, Sequence[tuple[int, ...]]],
    expert_acc: Mapping[str, float],
) -> str:
    """The markdown report: the ANP table with what it was measured on."""
    mode = "quick" if settings.quick else "full"
    experts = ", ".join(f"{t} {acc:.3f}" for t, acc in expert_acc.items())
    ceilings = [m for m in settings.methods if m.startswith(f"{CEILING}-")]
    ceiling_note = (
        f" {', '.join(ceilings)}: the same training on the labelled test inputs with cross-entropy (an "
        "optimistic bound, not a merge method)."
        if ceilings
        else ""
    )
    return "\n".join(
        [
            f"## Merge quality vs number of tasks ({mode} mode)",
            "",
            "ANP (%) = mean over a subset's tasks of merged / expert test accuracy, averaged over the "
            "subsets of each k; `mean` averages the k rows. Static merges use their default options; "
            f"learned merges: {settings.steps} Adam steps, lr {settings.lr} cosine, init "
            f"{'1/k' if settings.init is None else settings.init}, "
            f"{settings.batch_per_task} unlabelled inputs per task per step "
            f"({settings.num_unlabelled} per task), seed {settings.seed}.{ceiling_note}",
            "",
            anp_table(rows, settings.methods),
            "",
            *space_table(rows, settings),
            f"Tasks: {', '.join(settings.tasks)}; {settings.num_test} test examples per task; subsets "
            f"per k: {', '.join(f'{k}: {len(s)}' for k, s in subsets.items())}.",
            f"Expert test accuracy: {experts}.",
        ]
    )


def space_table(rows: Sequence[Mapping[str, Any]], settings: Settings) -> list[str]:
    """Per learned method: trainable coefficients at the largest k, step time, held-out selection."""
    learned = [m for m in settings.methods if not is_static(m) and any(r["method"] == m for r in rows)]
    if not learned:
        return []
    holdout = settings.holdout > 0
    k = max(int(r["k"]) for r in rows)
    head = f"| method | coefficients (k = {k}) | task vectors MB (k = {k}) | step ms (mean) |"
    if holdout:
        head += " train divergence | held-out divergence | kept step (mean) |"
    lines = [head, "|---|---:|---:|---:|" + ("---:|---:|---:|" if holdout else "")]
    for method in learned:
        mine = [r for r in rows if r["method"] == method]
        top = max(mine, key=lambda r: int(r["k"]))
        line = (
            f"| {method} | {int(top['coefficients']):,} | {float(top['task_vector_mb']):.1f} |"
            f" {1000 * _mean(mine, 'step_seconds'):.0f} |"
        )
        if holdout:
            line += (
                f" {_mean(mine, 'train_divergence'):.4f} | {_mean(mine, 'heldout_divergence'):.4f} |"
                f" {_mean(mine, 'best_step'):.0f} |"
            )
        lines.append(line)
    note = (
        f"Held-out selection: {settings.holdout:.0%} of each task's unlabelled inputs kept out of training, "
        f"divergence measured every {settings.eval_every} steps; divergences are means per task of the "
        "kept coefficients."
        if holdout
        else "Step ms: one learned step (all k tasks), averaged over the subsets."
    )
    return [*lines, "", note, ""]


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 on bad input (one ``merge_quality: error: ...`` line on stderr).

    """
    args = build_parser().parse_args(argv)
    try:
        settings = resolve_settings(args)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        threads = torch.get_num_threads()
        try:
            if settings.threads:
                torch.set_num_threads(settings.threads)
            run(settings)
        finally:
            torch.set_num_threads(threads)
    except DivMergeError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
