"""Memory and step time of the whole-model merge against the per-block merge (``model.merge_mode``).

For each mode a fresh subprocess loads the expert set with ``load_experts`` (the real SmolLM2-135M demo
experts by default: ``zoo:smollm2/<task>``, built on first use), builds the merged model (layer-wise
coefficients), resets the peak resident set, and runs training steps as ``DivMergeModule`` does
(``per_task`` accumulation over the T tasks, each task's forward with the LM head on its last
``--answer`` positions only, JS against fixed random teacher distributions, Adam on the coefficients).
It reports:

- ``storage_mb``: what the merged model stores (base + task vectors), the same in both modes;
- ``rss_loaded_mb``: resident set once loaded (storage + the interpreter and libraries);
- ``step_peak_mb``: the peak resident set during the steps, above ``rss_loaded_mb``: the transient
  (merged tensors, their gradient) and the activations;
- ``merged_mb``: the model's merged float32 tensors (what the whole merge materialises, and again as its
  gradient); ``block_mb``: the largest block's (what the per-block merge holds at a time, twice);
- ``step_s``: the median step, both modes timed in one process in alternation (they share the stored
  tensors), and their ratio.

The table is printed and written to ``<out_dir>/per_block_memory.md`` (and ``.json``).
Run ``python -m benchmarks.per_block_memory --help``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from benchmarks.common.cli import lm_flags, run_flags, worker_flags
from benchmarks.common.experts import expert_sources
from benchmarks.common.lm_step import sizes, step_closure
from benchmarks.common.measure import peak_rss_mb, reset_peak, rss_mb, run_worker_process
from benchmarks.common.results import format_table, write_results
from benchmarks.common.steps import interleaved_times
from divmerge.core.merged_model import MergedModel
from divmerge.families import load_experts

COLUMNS = ("mode", "storage_mb", "rss_loaded_mb", "step_peak_mb", "merged_mb", "block_mb", "step_s", "x_step")
LEGEND = (
    "storage_mb: base + task vectors the merged model stores; rss_loaded_mb: resident once loaded; "
    "step_peak_mb: peak resident set during the steps above rss_loaded_mb (transient + activations); "
    "merged_mb: all merged float32 tensors; block_mb: the largest block's; step_s: median step (both modes "
    "in one process, alternating); x_step: step_s over the whole mode's. MB = 10^6 bytes."
)


def run_worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """``memory``: one mode's resident set in this process; ``time``: both modes' steps, alternating."""
    torch.manual_seed(0)
    torch.set_num_threads(int(config["threads"]))
    experts = load_experts(config["base"], config["experts"])
    if config["job"] == "time":
        models = {mode: MergedModel(experts, "layer", merge_mode=mode) for mode in ("whole", "per_block")}
        del experts
        steps = {mode: step_closure(m, config) for mode, m in models.items()}
        times = interleaved_times(steps, int(config["steps"]), int(config["warmup"]))
        return {mode: statistics.median(t) for mode, t in times.items()}
    merged = MergedModel(experts, "layer", merge_mode=config["job"])
    del experts  # as DivMergeModule: only the merged model keeps the expert tensors
    gc.collect()
    step = step_closure(merged, config)
    loaded = rss_mb()
    reset_peak()
    for _ in range(int(config["warmup"]) + 1):
        step()
    return {"rss_loaded_mb": loaded, "step_peak_mb": peak_rss_mb() - loaded, **sizes(merged)}


def measure(config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`run_worker` in a fresh Python process, so peaks never mix."""
    return run_worker_process("benchmarks.per_block_memory", config)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="per_block_memory",
        description=__doc__.split("\n\n")[0],
        parents=[
            run_flags(base="zoo:smollm2", batch_size=4, seq_len=64, steps=3, warmup=1, unit="prompt"),
            worker_flags(2),
            lm_flags(),
        ],
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure each mode's memory in a subprocess, then both modes' step time; print and save the table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    experts = expert_sources(args.experts)  # demo experts are built here, once, not in the workers
    keys = ("base", "batch_size", "seq_len", "answer", "steps", "warmup", "threads")
    common = {k: getattr(args, k) for k in keys} | {"experts": experts}
    times = measure({**common, "job": "time"})
    rows = []
    for mode in ("whole", "per_block"):
        row = {"mode": mode, **measure({**common, "job": mode}), "step_s": times[mode]}
        row["x_step"] = times[mode] / times["whole"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = format_table(rows, COLUMNS)
    header = (
        f"# Whole vs per-block merge (base {args.base}, T = {len(experts)}, {args.batch_size} x "
        f"{args.seq_len} tokens per task, loss on the last {args.answer} positions, "
        f"{args.threads} threads)\n\n"
    )
    text = header + table + "\n\n" + LEGEND + "\n"
    print(text)
    write_results(args.out_dir, "per_block_memory", text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
