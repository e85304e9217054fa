"""Peak memory of T LoRA adapter experts against T full fine-tuned experts on the demo model.

One fresh subprocess per configuration (2 and T full experts, 2 and T LoRA adapters, a mixed set of T/2
each)
loads the expert set from disk with ``load_experts``, builds the merged model (layer-wise coefficients)
and runs training steps (``per_task`` passes, JS to precomputed teachers, Adam on the coefficients). It
reports the peak resident set (``VmHWM``) once loading is done and after the steps, the resident set
after loading, the bytes the merged model stores for the experts (dense task vectors + LoRA factors),
and the median step time. The table is printed and written to ``<out_dir>/lora_memory.md``.

The experts are synthesised, not trained (memory does not depend on the values): a full expert is the
base with Gaussian noise (1e-3 x each tensor's std) on every backbone weight and a fresh 2-class head; a
LoRA expert is a peft SEQ_CLS adapter of rank ``--rank`` on ``--targets`` with random A and B (B drawn
instead of peft's zero init) and a fresh head. They are written to ``--work_dir`` and loaded exactly as
user experts are.

Run ``python -m benchmarks.lora_memory --help``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common.cli import run_flags, worker_flags
from benchmarks.common.experts import write_experts
from benchmarks.common.measure import MB, peak_rss_mb, rss_mb, run_worker_process
from benchmarks.common.results import format_table, write_results
from benchmarks.common.steps import make_batches, make_divmerge_step, teacher_logprobs, time_steps
from divmerge.core.merged_model import MergedModel
from divmerge.families import load_experts

COLUMNS = (
    "experts",
    "full",
    "lora",
    "stored_mb",
    "rss_import_mb",
    "load_peak_mb",
    "rss_after_load_mb",
    "peak_mb",
    "step_s",
    "d_peak_mb",
)
LEGEND = (
    "stored_mb: what the merged model keeps for the experts (dense task vectors + LoRA factors); "
    "rss_import_mb: resident after imports; load_peak_mb: VmHWM once the experts are loaded and the merged "
    "model built (the loader's transient peak); rss_after_load_mb: resident then; peak_mb: VmHWM after the "
    "steps; step_s: median training step; d_peak_mb: increase of peak_mb per added expert of that kind "
    "since the 2-expert row. MB = 10^6 bytes."
)


def run_worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """Load one expert set, build the merged model, step it; report memory and time.

    Config keys: ``base``, ``experts`` (task -> directory), ``batch_size``, ``seq_len``, ``steps``,
    ``warmup``, ``threads``.

    Returns:
        ``rss_import_mb``, ``load_peak_mb``, ``rss_after_load_mb``, ``stored_mb``, ``step_s``, ``peak_mb``.
    """
    torch.manual_seed(0)
    torch.set_num_threads(int(config["threads"]))
    out: dict[str, Any] = {"rss_import_mb": rss_mb()}
    experts = load_experts(config["base"], config["experts"])
    names, vocab = list(experts.task_names), int(experts.skeletons[0].config.vocab_size)
    merged = MergedModel(experts, "layer")
    del experts  # as DivMergeModule.build: only the merged model keeps the expert tensors
    gc.collect()
    stores = (merged.task_vectors, merged.lora_a, merged.lora_b, merged.lora_task)
    stored = sum(t.numel() * t.element_size() for store in stores for _, t in store.items())
    out |= {"load_peak_mb": peak_rss_mb(), "rss_after_load_mb": rss_mb(), "stored_mb": stored / MB}
    batches = make_batches(None, names, int(config["batch_size"]), int(config["seq_len"]), vocab)
    teachers = teacher_logprobs(merged, batches)
    times = time_steps(
        make_divmerge_step(merged, batches, teachers), int(config["steps"]), int(config["warmup"])
    )
    return out | {"step_s": statistics.median(times), "peak_mb": peak_rss_mb()}


def measure(config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`run_worker` in a fresh Python process, so peaks never mix."""
    return run_worker_process("benchmarks.lora_memory", config)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="lora_memory",
        description=__doc__.split("\n\n")[0],
        parents=[run_flags(base="zoo:minilm", batch_size=8, seq_len=64, steps=2, warmup=1), worker_flags(1)],
    )
    p.add_argument("--num_experts", type=int, default=8, help="experts T per configuration")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--targets", nargs="+", default=["query", "value"], help="LoRA target modules")
    p.add_argument(
        "--work_dir", type=Path, default=None, help="where the experts are written (default: a temp dir)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the experts, measure each configuration in a subprocess, print and save the table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_experts < 2 or args.rank < 1:
        parser.error("--num_experts must be at least 2 and --rank at least 1")
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    n = args.num_experts
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        dirs = write_experts(args.base, Path(work), n, args.rank, args.targets)
        common = {
            k: getattr(args, k) for k in ("base", "batch_size", "seq_len", "steps", "warmup", "threads")
        }
        sets = [("full", 2, 0), ("full", n, 0), ("lora", 0, 2), ("lora", 0, n), ("mixed", n // 2, n - n // 2)]
        rows: list[dict[str, Any]] = []
        for label, full, lora in sets:
            experts = {f"full{i}": dirs["full"][i] for i in range(full)}
            experts |= {f"lora{i}": dirs["lora"][i] for i in range(lora)}
            row = {"experts": label, "full": full, "lora": lora, **measure({**common, "experts": experts})}
            first = next((r for r in rows if r["experts"] == label), None)
            if first is not None and full + lora > first["full"] + first["lora"]:
                added = full + lora - first["full"] - first["lora"]
                row["d_peak_mb"] = (row["peak_mb"] - first["peak_mb"]) / added
            print(json.dumps(row), flush=True)
            rows.append(row)
    table = format_table(rows, COLUMNS)
    header = (
        f"# LoRA vs full experts: memory (base {args.base}, T = {n}, LoRA r = {args.rank} on "
        f"{'/'.join(args.targets)}; synthetic experts: full = base + noise, LoRA = random A and B)\n\n"
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs; {args.batch_size} "
        f"examples x {args.seq_len} tokens per task per step, layer-wise coefficients, per-task passes; "
        f"median of {args.steps} steps after {args.warmup} warm-up; one fresh subprocess per row.\n\n"
    )
    text = f"{header}{table}\n\n{LEGEND}\n"
    print(f"\n{text}")
    write_results(args.out_dir, "lora_memory", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
