"""Cost of one divmerge training step against one plain fine-tuning step, and memory against T.

Two measurements, printed as markdown tables and written to ``<out_dir>/step_cost.md`` (+ CSVs):

1. **Step cost** (one process, layer-wise coefficients, T experts, ``batch_size`` examples per task of
   exactly ``seq_len`` tokens): the median wall time of

   * ``plain``: one fine-tuning step of the base model with a classification head on the same T x B
     examples (forward + cross-entropy + backward + AdamW over every weight; dropout off, so the network
     computes exactly what the merged backbone computes), with torch's default AdamW and, as a stricter
     reference, ``AdamW(foreach=True)`` (several times faster on CPU), ``plain(foreach)``;
   * ``divmerge``: the training step's code (``divmerge.engine.Merger.step_loss``, ``per_task`` backbone
     passes): ``merged_params()`` + per task forward, JS to the cached teacher and backward to the merged
     tensors + the merge's backward + Adam on the coefficients (teachers precomputed once, as the teacher
     cache does);
   * ``joint``: the same with ``backbone_pass="joint"`` (all tasks in one concatenated backbone pass);
   * ``naive``: the divmerge step, but every expert's forward runs inside the step (per task, a one-hot
     ``merged_params`` and ``task_logits`` under ``no_grad``): what a step costs without the teacher cache.

   plus a phase breakdown (manual timers) of both steps at the largest T, and a ``torch.profiler`` listing
   of the divmerge step's most expensive operators.

2. **Memory vs T** (a fresh subprocess per configuration, so measurements never contaminate each other):
   RSS after imports, the peak while loading (``VmHWM`` right after the experts are loaded and the merged
   model is built), RSS after loading, and the overall peak (``ru_maxrss``) after the steps; for fp32 and
   bf16 task-vector storage, and a plain fine-tuning process for reference. The per-expert increment of
   the peak is printed next to the size of one task vector.

Experts beyond the real ones (T = 7, 8 for the 6-task demo) are synthesised in memory: expert j reuses
the task vector of real expert ``j mod k`` plus Gaussian noise (``noise`` x that tensor's std, per tensor),
with that expert's head and inputs; see ``benchmarks.common.experts.synthesize_experts``.

Run ``python -m benchmarks.step_cost --help``. Timings on a loaded machine are noisy: read medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from benchmarks.common.cli import run_flags, worker_flags
from benchmarks.common.experts import SYNTH_SEP, load_synthetic_experts
from benchmarks.common.measure import MB, peak_rss_mb, rss_mb, run_worker_process
from benchmarks.common.results import format_table, write_csv
from benchmarks.common.steps import (
    Batches,
    interleaved_times,
    make_batches,
    make_divmerge_step,
    teacher_logprobs,
    time_steps,
)
from divmerge.core.expert_set import ExpertSet
from divmerge.core.merged_model import MergedModel
from divmerge.engine import DEFAULT_LR
from divmerge.errors import DivMergeError
from divmerge.experts.sources import resolve_source
from divmerge.families.classification import BackbonePass, step_loss
from divmerge.objectives import js_divergence

PROG = "step_cost"
DEMO_BASE = "zoo:minilm"
DEFAULT_TASKS = ("rt", "sms_spam", "trec", "bbc", "tweet_sent", "imdb")

MEMORY_LEGEND = (
    "rss_import: after imports; load_peak: VmHWM once experts are loaded and the MergedModel built (the "
    "loader's transient peak); rss_after_load: resident then; peak: VmHWM after the steps (overall); "
    "over_plain: peak - the plain step's peak at the same T (the plain step's activations grow with the "
    "T x batch_size rows too); task_vector: one expert's task vector at the storage dtype; d_<x>: increase "
    "of <x> per added expert."
)


# --------------------------------------------------------------------------- experts and data
def load_tokenizer(base: str) -> Any:
    """The base model's tokenizer, or None where its directory has none (random token ids are used)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_source(base))
    except (OSError, ValueError):
        return None


def concat_batches(batches: Batches) -> dict[str, Tensor]:
    """All tasks' rows in one batch (the plain step's input): (T x B, L) each."""
    return {k: torch.cat([b[k] for b in batches.values()]) for k in ("input_ids", "attention_mask")}


def vocab_size_of(experts: ExpertSet) -> int:
    """The vocabulary size of the experts' backbone."""
    return int(experts.skeletons[0].config.vocab_size)


def plain_model(base: str, num_labels: int = 2) -> nn.Module:
    """The base model with a fresh classification head, every weight trainable, dropout off."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_source(base), num_labels=num_labels, dtype=torch.float32
    )
    return model.eval().requires_grad_(True)


# --------------------------------------------------------------------------- steps and timers
def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]`` (times of the same interleaved round)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def make_plain_step(
    model: nn.Module, batch: Mapping[str, Tensor], lr: float = 2e-5, foreach: bool | None = None
) -> Callable[[], float]:
    """One fine-tuning step closure: forward + cross-entropy + backward + AdamW over all weights.

    Args:
        model: A sequence-classification model.
        batch: ``input_ids`` / ``attention_mask``, each (N, L).
        lr: AdamW learning rate.
        foreach: AdamW's ``foreach``; None is torch's default (on CPU the per-tensor loop, several times
            slower than ``foreach=True`` for a model of this size).

    Returns:
        A closure running one step and returning the loss.

    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, foreach=foreach)
    num_labels = int(model.config.num_labels)
    labels = torch.randint(0, num_labels, (batch["input_ids"].shape[0],), generator=torch.Generator())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def plain_step_time(
    model: nn.Module, batches: Batches, steps: int = 5, warmup: int = 2, lr: float = 2e-5
) -> float:
    """Median seconds of a plain fine-tuning step on all tasks' rows at once.

    Args:
        model: A sequence-classification model (see :func:`plain_model`).
        batches: Task index -> inputs; concatenated into one batch.
        steps: Timed steps.
        warmup: Untimed steps first.
        lr: AdamW learning rate.

    Returns:
        The median step time in seconds.

    """
    return statistics.median(time_steps(make_plain_step(model, concat_batches(batches), lr), steps, warmup))


def divmerge_step_time(
    merged: MergedModel,
    batches: Batches,
    teachers: Mapping[int, Tensor],
    steps: int = 5,
    warmup: int = 2,
    backbone_pass: BackbonePass = "per_task",
) -> float:
    """Median seconds of a divmerge step with cached teachers.

    Args:
        merged: The merged model.
        batches: Task index -> inputs.
        teachers: Cached expert log-probabilities (see :func:`teacher_logprobs`).
        steps: Timed steps.
        warmup: Untimed steps first.
        backbone_pass: ``per_task`` or ``joint``.

    Returns:
        The median step time in seconds.

    """
    return statistics.median(
        time_steps(make_divmerge_step(merged, batches, teachers, backbone_pass=backbone_pass), steps, warmup)
    )


def naive_step_time(merged: MergedModel, batches: Batches, steps: int = 5, warmup: int = 2) -> float:
    """Median seconds of a divmerge step that runs every expert's forward inside the step (no cache).

    Args:
        merged: The merged model.
        batches: Task index -> inputs.
        steps: Timed steps.
        warmup: Untimed steps first.

    Returns:
        The median step time in seconds.

    """
    return statistics.median(time_steps(make_divmerge_step(merged, batches, None), steps, warmup))


PhaseStep = Callable[[], dict[str, float]]


def _timed(acc: dict[str, float], key: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    acc[key] = time.perf_counter() - start
    return out


def make_plain_phase_step(
    model: nn.Module, batches: Batches, lr: float = 2e-5, foreach: bool | None = None
) -> PhaseStep:
    """A plain step closure that returns its phases' seconds: forward, loss, backward, optimizer."""
    batch = concat_batches(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, foreach=foreach)
    labels = torch.randint(0, int(model.config.num_labels), (batch["input_ids"].shape[0],))

    def step() -> dict[str, float]:
        acc: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        logits = _timed(acc, "forward", lambda: model(**batch).logits)
        loss = _timed(acc, "loss", lambda: nn.functional.cross_entropy(logits, labels))
        _timed(acc, "backward", loss.backward)
        _timed(acc, "optimizer", optimizer.step)
        return acc

    return step


def make_divmerge_phase_step(
    merged: MergedModel, batches: Batches, teachers: Mapping[int, Tensor], lr: float = DEFAULT_LR
) -> PhaseStep:
    """A divmerge step closure (per-task passes) that returns its phases' seconds.

    Phases: ``merge`` (``merged_params``), ``tasks fwd+bwd`` (every task's forward, loss and backward to
    the merged tensors, in turn), ``merge_backward`` (the final ``loss.backward()``: the merged tensors'
    gradients through the merge to the coefficients, the part a plain step does not have), ``optimizer``.
    """
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=lr)

    def step() -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        marks = [time.perf_counter()]
        params = merged.merged_params()
        marks.append(time.perf_counter())
        loss, _ = step_loss(
            merged, params, batches, lambda t, student: js_divergence(teachers[t], student).mean()
        )
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        names = ("merge", "tasks fwd+bwd", "merge_backward", "optimizer")
        return {k: marks[i + 1] - marks[i] for i, k in enumerate(names)}

    return step


def phase_medians(steps: Mapping[str, PhaseStep], rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """Run phase-step closures in turn (interleaved), round after round; median seconds per phase.

    Returns:
        Step name -> phase -> median seconds over the ``rounds`` timed rounds.

    """
    acc: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            phases = step()
            if i >= warmup:
                acc[name].append(phases)
    return {name: {k: statistics.median(p[k] for p in runs) for k in runs[0]} for name, runs in acc.items()}


def plain_phase_times(
    model: nn.Module, batches: Batches, steps: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per phase (forward, loss, backward, optimizer) of the plain step."""
    return phase_medians({"plain": make_plain_phase_step(model, batches)}, steps, warmup)["plain"]


def divmerge_phase_times(
    merged: MergedModel, batches: Batches, teachers: Mapping[int, Tensor], steps: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per phase of the divmerge step (see :func:`make_divmerge_phase_step`)."""
    return phase_medians({"d": make_divmerge_phase_step(merged, batches, teachers)}, steps, warmup)["d"]


def profile_divmerge_step(
    merged: MergedModel, batches: Batches, teachers: Mapping[int, Tensor], top: int = 12
) -> str:
    """``torch.profiler`` table of one divmerge step's operators, by self CPU time (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_divmerge_step(merged, batches, teachers)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# --------------------------------------------------------------------------- subprocess measurements
def run_worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """Load, build and step one configuration in this process; report times and memory.

    Config keys: ``kind`` (``divmerge`` or ``plain``), ``base``, ``experts`` (task -> source, the real
    ones), ``num_tasks``, ``dtype`` (task-vector storage: ``float32`` / ``bfloat16``), ``steps``,
    ``warmup``, ``batch_size``, ``seq_len``, ``noise``, ``seed``, ``threads`` (None: torch's default),
    ``backbone_pass`` (``per_task`` or ``joint``).

    Returns:
        The config's numbers: ``rss_import_mb``, ``load_peak_mb`` (peak up to the end of loading),
        ``rss_after_load_mb``, ``peak_mb`` (overall), ``step_s``, and for divmerge
        ``task_vector_mb`` (one task vector at the storage dtype) and ``synthetic`` (synthesised experts).

    """
    torch.manual_seed(int(config.get("seed", 0)))
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    num_tasks = int(config["num_tasks"])
    batch_size, seq_len = int(config.get("batch_size", 16)), int(config.get("seq_len", 64))
    steps, warmup = int(config.get("steps", 3)), int(config.get("warmup", 1))
    out: dict[str, Any] = {"rss_import_mb": rss_mb()}
    tokenizer = load_tokenizer(config["base"])
    if config.get("kind", "divmerge") == "plain":
        model = plain_model(config["base"])
        out |= {"load_peak_mb": peak_rss_mb(), "rss_after_load_mb": rss_mb()}
        vocab = int(model.config.vocab_size)
        names = [*config["experts"]][:num_tasks]
        names += [f"{names[j % len(names)]}{SYNTH_SEP}{j}" for j in range(len(names), num_tasks)]
        batches = make_batches(tokenizer, names, batch_size, seq_len, vocab)
        times = time_steps(make_plain_step(model, concat_batches(batches)), steps, warmup)
    else:
        dtype = getattr(torch, config.get("dtype", "float32"))
        experts = load_synthetic_experts(
            config["base"],
            config["experts"],
            num_tasks,
            float(config.get("noise", 0.1)),
            int(config.get("seed", 0)),
            dtype,
        )
        names, vocab = list(experts.task_names), vocab_size_of(experts)
        merged = MergedModel(experts, "layer", task_vector_dtype=dtype)
        del experts  # as DivMergeModule.build: only the merged model keeps the (possibly cast) task vectors
        gc.collect()
        out |= {"load_peak_mb": peak_rss_mb(), "rss_after_load_mb": rss_mb()}
        tv_bytes = sum(t.numel() * t.element_size() for _, t in merged.task_vectors.items())
        out |= {"task_vector_mb": tv_bytes / num_tasks / MB, "synthetic": sum(SYNTH_SEP in n for n in names)}
        batches = make_batches(tokenizer, names, batch_size, seq_len, vocab)
        teachers = teacher_logprobs(merged, batches)
        backbone_pass = config.get("backbone_pass", "per_task")
        times = time_steps(
            make_divmerge_step(merged, batches, teachers, backbone_pass=backbone_pass), steps, warmup
        )
    out |= {"step_s": statistics.median(times), "peak_mb": peak_rss_mb()}
    return out


def measure_in_subprocess(config: Mapping[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """Run :func:`run_worker` in a fresh Python process (so peaks never mix) and return its result.

    Args:
        config: See :func:`run_worker`; must be JSON-serialisable.
        timeout: Seconds before the subprocess is killed.

    Returns:
        The worker's result dict (memory in MB, time in seconds).

    Raises:
        RuntimeError: If the subprocess fails; the message carries the end of its stderr.

    """
    return run_worker_process("benchmarks.step_cost", config, timeout)


MEMORY_CONFIGS = (("float32", "per_task"), ("bfloat16", "per_task"), ("float32", "joint"))
INCREMENT_KEYS = ("rss_after_load_mb", "load_peak_mb", "peak_mb", "over_plain_mb")


def add_increments(rows: list[dict[str, Any]], keys: Sequence[str] = INCREMENT_KEYS) -> None:
    """Per configuration (dtype, pass), each key's increase per added expert since the previous T.

    Args:
        rows: Memory rows with ``dtype``, ``T`` (and optionally ``pass``) and the keys, in increasing T
            per configuration; updated in place with ``d_<key>``.
        keys: The MB figures to difference (missing ones are skipped).

    """
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        config = (row["dtype"], row.get("pass", ""))
        prev = last.get(config)
        if prev is not None:
            for key in keys:
                if key in row and key in prev:
                    row[f"d_{key}"] = (row[key] - prev[key]) / (row["T"] - prev["T"])
        last[config] = row


# --------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``step_cost: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    """Print ``step_cost: error: <message>`` on one line to stderr and exit with status 2."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[
            run_flags(base=DEMO_BASE, batch_size=16, seq_len=64, steps=5, warmup=2),
            worker_flags(
                None,
                "torch.set_num_threads for every measurement (default: torch's default). 1 avoids the "
                "OpenMP stalls that inflate op-heavy phases when other processes compete for the cores",
            ),
        ],
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="T in (2, 4), 2 timed steps, 1 warm-up, memory for T in (2, 4) only: a few minutes",
    )
    p.add_argument(
        "--tasks",
        type=str,
        nargs="+",
        default=list(DEFAULT_TASKS),
        help="demo tasks whose experts (zoo:<task>) are used, in order",
    )
    p.add_argument(
        "--T",
        metavar="T",
        dest="ts",
        type=int,
        nargs="+",
        default=[2, 4, 6],
        help="numbers of experts for the step-cost table",
    )
    p.add_argument("--max_T", type=int, default=8, help="memory table covers T = 2..max_T")
    p.add_argument(
        "--mem_steps", type=int, default=2, help="timed steps per memory subprocess (after 1 warm-up)"
    )
    p.add_argument("--noise", type=float, default=0.1, help="relative noise of synthetic experts")
    p.add_argument("--no_profile", action="store_true", help="skip the torch.profiler listing")
    p.add_argument("--skip_memory", action="store_true", help="skip the memory subprocesses")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Validate arguments; exits with a one-line error on bad input."""
    from divmerge.zoo import demo as zoo

    unknown = [t for t in args.tasks if t not in zoo.DEMO_TASKS]
    if unknown:
        fail(f"unknown task {unknown[0]!r}: use demo tasks from {', '.join(zoo.DEMO_TASKS)}")
    if len(set(args.tasks)) != len(args.tasks):
        fail("--tasks lists a task twice")
    if args.max_T < 2:
        fail(f"--max_T must be at least 2 (got {args.max_T})")
    bad = [t for t in args.ts if not 1 <= t <= args.max_T]
    if bad:
        fail(f"T={bad[0]} is outside 1..max_T={args.max_T}: raise --max_T or lower --T")
    for name in ("steps", "batch_size", "seq_len", "mem_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads must be at least 1 (got {args.threads})")
    if args.warmup < 0:
        fail(f"--warmup must be >= 0 (got {args.warmup})")


def step_cost_rows(
    base: str,
    experts: Mapping[str, str],
    ts: Sequence[int],
    steps: int,
    warmup: int,
    batch_size: int = 16,
    seq_len: int = 64,
    noise: float = 0.1,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The step-cost table (one row per T) and the state needed for the breakdown at the largest T.

    Args:
        base: Base model source.
        experts: Task -> expert source (real experts; more are synthesised where T exceeds them).
        ts: Numbers of experts.
        steps: Timed steps per measurement.
        warmup: Untimed warm-up steps.
        batch_size: Examples per task.
        seq_len: Tokens per example.
        noise: Relative noise of synthetic experts.
        log: Progress printer.

    Returns:
        (rows, last): ``last`` holds ``merged``, ``batches``, ``teachers``, ``plain`` of the largest T.

    """
    all_experts = load_synthetic_experts(base, experts, max(ts), noise)
    tokenizer = load_tokenizer(base)
    model = plain_model(base)
    rows, last = [], {}
    for n in sorted(ts):
        sub = all_experts.subset(all_experts.task_names[:n]) if all_experts.num_tasks > n else all_experts
        merged = MergedModel(sub, "layer")
        batches = make_batches(tokenizer, sub.task_names, batch_size, seq_len, vocab_size_of(sub))
        teachers = teacher_logprobs(merged, batches)
        closures = {
            "plain": make_plain_step(model, concat_batches(batches)),
            "plain_foreach": make_plain_step(model, concat_batches(batches), foreach=True),
            "divmerge": make_divmerge_step(merged, batches, teachers),
            "joint": make_divmerge_step(merged, batches, teachers, backbone_pass="joint"),
            "naive": make_divmerge_step(merged, batches, None),
        }
        times = interleaved_times(closures, steps, warmup)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "T": n,
            "rows/step": n * batch_size,
            "plain s": med["plain"],
            "divmerge s": med["divmerge"],
            "ratio": paired_ratio(times["divmerge"], times["plain"]),
            "joint s": med["joint"],
            "ratio(joint)": paired_ratio(times["joint"], times["plain"]),
            "naive s": med["naive"],
            "naive ratio": paired_ratio(times["naive"], times["plain"]),
            "plain(foreach) s": med["plain_foreach"],
            "ratio(foreach)": paired_ratio(times["divmerge"], times["plain_foreach"]),
        }
        log(format_table([row], list(row)).splitlines()[-1])
        rows.append(row)
        last = {"merged": merged, "batches": batches, "teachers": teachers, "plain": model, "T": n}
    return rows, last


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables and write ``step_cost.md`` + CSVs under ``--out_dir``.

    Returns:
        0 on success (bad input exits with status 2).

    """
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.ts = [t for t in (2, 4) if t <= args.max_T]
        args.steps, args.warmup, args.mem_steps = 2, 1, 1
    check_args(args)
    experts = {t: f"zoo:{t}" for t in args.tasks}
    try:
        for source in [args.base, *experts.values()]:
            resolve_source(source)
    except DivMergeError as err:
        fail(str(err))
    try:
        return _run(args, experts)
    except DivMergeError as err:
        fail(str(err))


def _run(args: argparse.Namespace, experts: dict[str, str]) -> int:
    """The benchmark body (arguments already checked)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        "# divmerge step cost",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{args.batch_size} examples x {args.seq_len} tokens per task; layer-wise coefficients; "
        f"median of {args.steps} steps after {args.warmup} warm-up; real experts: {', '.join(args.tasks)}; "
        f"more are synthesised (real task vector + {args.noise} x std noise); 1-min load average at "
        f"start {os.getloadavg()[0]:.1f} (timings from a loaded machine are noisy).",
    ]
    print(sections[1], flush=True)

    print("\n## Step cost (divmerge / plain fine-tuning step)", flush=True)
    rows, last = step_cost_rows(
        args.base, experts, args.ts, args.steps, args.warmup, args.batch_size, args.seq_len, args.noise
    )
    columns = list(rows[0])
    cost = format_table(rows, columns)
    sections += ["## Step cost (divmerge / plain fine-tuning step)", cost]
    write_csv(args.out_dir / "step_cost_time.csv", rows)

    n = last["T"]
    both = phase_medians(
        {
            "plain": make_plain_phase_step(last["plain"], last["batches"]),
            "plain_foreach": make_plain_phase_step(last["plain"], last["batches"], foreach=True),
            "divmerge": make_divmerge_phase_step(last["merged"], last["batches"], last["teachers"]),
        },
        args.steps,
        1,
    )
    cols = {"plain s": "plain", "plain(foreach) s": "plain_foreach", "divmerge s": "divmerge"}
    phase_rows = [
        {"phase": k, **{c: both[name].get(k) for c, name in cols.items()}}
        for k in ("merge", "forward", "loss", "backward", "tasks fwd+bwd", "merge_backward", "optimizer")
    ]
    phase_rows.append({"phase": "total", **{c: sum(both[name].values()) for c, name in cols.items()}})
    phases = format_table(phase_rows, ["phase", *cols])
    title = f"## Where the time goes (T={n}, manual timers, median)"
    print(f"\n{title}\n{phases}", flush=True)
    sections += [title, phases]
    if not args.no_profile:
        listing = profile_divmerge_step(last["merged"], last["batches"], last["teachers"])
        title = f"## torch.profiler: one divmerge step at T={n}, top operators by self CPU time"
        print(f"\n{title}\n```\n{listing}\n```", flush=True)
        sections += [title, f"```\n{listing}\n```"]
    del last
    gc.collect()

    if not args.skip_memory:
        ts = [2, 4] if args.quick else list(range(2, args.max_T + 1))
        mem_rows, plain_rows = memory_rows(args, experts, ts)
        mem_cols = [
            "dtype",
            "pass",
            "T",
            "synthetic",
            "step_s",
            "rss_import_mb",
            "load_peak_mb",
            "rss_after_load_mb",
            "peak_mb",
            "over_plain_mb",
            "task_vector_mb",
            *(f"d_{k}" for k in INCREMENT_KEYS),
        ]
        mem = format_table(mem_rows, mem_cols)
        plain = format_table(
            plain_rows, ["T", "rows/step", "step_s", "rss_import_mb", "rss_after_load_mb", "peak_mb"]
        )
        title = "## Memory vs T (fresh subprocess per row; MB = 10^6 bytes)"
        ref = "Plain fine-tuning step (same rows), for reference:"
        print(f"\n{title}\n{MEMORY_LEGEND}\n\n{mem}\n\n{ref}\n{plain}", flush=True)
        sections += [title, MEMORY_LEGEND, mem, ref, plain]
        write_csv(args.out_dir / "step_cost_memory.csv", mem_rows + plain_rows)

    sections.append(f"1-min load average at end: {os.getloadavg()[0]:.1f}.")
    (args.out_dir / "step_cost.md").write_text("\n\n".join(sections) + "\n")
    print(f"\nwrote {args.out_dir / 'step_cost.md'}")
    return 0


def memory_rows(
    args: argparse.Namespace, experts: Mapping[str, str], ts: Sequence[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Memory table rows (fp32 and bf16 per T) and the plain-step reference rows, one subprocess each."""
    common = {
        "base": args.base,
        "experts": dict(experts),
        "steps": args.mem_steps,
        "warmup": 1,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "noise": args.noise,
        "threads": args.threads,
    }
    print("\n## Memory vs T (fresh subprocess per configuration)", flush=True)
    plain_rows, plain_peak = [], {}
    for n in ts:
        res = measure_in_subprocess({**common, "kind": "plain", "num_tasks": n})
        plain_rows.append({"T": n, "rows/step": n * args.batch_size, **res})
        plain_peak[n] = res["peak_mb"]
        print(f"  plain T={n}: peak {res['peak_mb']:.0f} MB, step {res['step_s']:.2f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for dtype, backbone_pass in MEMORY_CONFIGS:
        for n in ts:
            config = {"kind": "divmerge", "num_tasks": n, "dtype": dtype, "backbone_pass": backbone_pass}
            res = measure_in_subprocess({**common, **config})
            over = res["peak_mb"] - plain_peak[n]
            rows.append({"dtype": dtype, "pass": backbone_pass, "T": n, **res, "over_plain_mb": over})
            print(
                f"  {dtype} {backbone_pass} T={n}: peak {res['peak_mb']:.0f} MB, step {res['step_s']:.2f} s",
                flush=True,
            )
    add_increments(rows)
    return rows, plain_rows


if __name__ == "__main__":
    sys.exit(main())
