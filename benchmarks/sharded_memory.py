"""Per-rank memory and step time of sharded storage over N processes, whole vs per-block merge.

For each N (``--ranks``, default 1, 2, 4) and each merge mode, N fresh processes form a gloo process
group on this machine (CPU), as N ranks of ``ModelParallelStrategy`` would: each loads the expert set with
``load_experts`` (the real SmolLM2-135M demo experts by default) and builds the merged model (layer-wise
coefficients) keeping only its 1/N share of the base and task vectors. With ``--loading sharded`` (the
default, what ``train.py`` does under ``ModelParallelStrategy``) the ranks load at the same time and each
reads only its columns of the safetensors files (``divmerge.experts.sharded_loading``); with ``--loading
whole`` each rank loads every expert whole and then shards (``MergedModel.shard``), one rank after
another. The ranks then run data-parallel training steps as ``DivMergeModule`` does: the global batch
(``--batch_size`` prompts per task) split over the ranks, ``per_task`` accumulation, the LM head on the
last ``--answer`` positions, JS against fixed random teachers, Adam.

Each rank reports, and the table shows the largest over ranks:

- ``stored_mb``: the base and task-vector bytes this rank keeps; it must fall as (1 + T) / N;
- ``load_peak_mb``: its peak resident set while loading, above the interpreter and libraries: about its
  share (plus one tensor's rows being read) when sharded, (2 + T) x model when whole;
- ``rss_mb``: its resident set once sharded (storage + interpreter and libraries: ~0.5 GB);
- ``step_peak_mb``: the peak resident set during the steps above ``rss_mb``: the transient merged
  tensors and their gradient (the whole model's, or about one block's in the per-block mode), the
  activations of ``batch_size / N`` prompts, and the collectives' buffers;
- ``step_s``: the median step (ranks in lock step; on 2 cores, N > 2 processes share them).

``merged_mb`` is the model's merged float32 size and ``block_mb`` one block's, for comparison with
``step_peak_mb``. The table is printed and written to ``<out_dir>/sharded_memory.md`` (and ``.json``).
Run ``python -m benchmarks.sharded_memory --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.common.cli import lm_flags, run_flags, worker_flags
from benchmarks.common.experts import expert_sources
from benchmarks.common.lm_step import sizes, step_closure
from benchmarks.common.measure import (
    MB,
    module_command,
    module_env,
    peak_rss_mb,
    release_memory,
    reset_peak,
    rss_mb,
)
from benchmarks.common.results import format_table, write_results
from divmerge.core.merged_model import MergedModel
from divmerge.families import load_experts

COLUMNS = (
    "ranks",
    "mode",
    "stored_mb",
    "x_stored",
    "load_peak_mb",
    "rss_mb",
    "step_peak_mb",
    "merged_mb",
    "block_mb",
    "step_s",
)
LEGEND = (
    "Largest over the ranks. stored_mb: base + task vectors this rank keeps; x_stored: stored_mb over "
    "one rank's; load_peak_mb: peak resident set while loading, above the interpreter's; rss_mb: "
    "resident once sharded; step_peak_mb: peak resident set during the steps above "
    "rss_mb (transient merged tensors and gradient + activations of batch_size / N prompts + collective "
    "buffers); merged_mb: all merged float32 tensors; block_mb: the largest block's; step_s: median step. "
    "MB = 10^6 bytes."
)


def run_rank(config: Mapping[str, Any]) -> dict[str, Any]:
    """One rank: load (sharded, or whole in turn), step; returns this rank's measurements."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    torch.set_num_threads(int(config["threads"]))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    release_memory()
    before = rss_mb()
    if config["loading"] == "sharded":  # every rank at once, each reading only its columns of the files
        reset_peak()
        experts = load_experts(config["base"], config["experts"], mesh=mesh)
        merged = MergedModel(experts, "layer", merge_mode=config["mode"])
        load_peak = peak_rss_mb() - before
        del experts
    else:  # whole: one rank at a time (this machine holds one whole expert set at a time)
        merged, load_peak = None, 0.0
        for turn in range(world):
            if turn == rank:
                reset_peak()
                merged = MergedModel(
                    load_experts(config["base"], config["experts"]),
                    "layer",
                    merge_mode=config["mode"],
                )
                merged.shard(mesh)
                load_peak = peak_rss_mb() - before
            dist.barrier()
    release_memory()
    assert merged is not None
    step = step_closure(merged, {**config, "batch_size": max(1, int(config["batch_size"]) // world)})
    loaded = rss_mb()
    reset_peak()
    times = []
    for i in range(int(config["warmup"]) + int(config["steps"])):
        dist.barrier()
        start = time.perf_counter()
        step()
        if i >= int(config["warmup"]):
            times.append(time.perf_counter() - start)
    peak = peak_rss_mb() - loaded
    coef = merged.coefficients.weight.detach().clone()  # (T, G): the same on every rank, or a bug
    gathered = [torch.zeros_like(coef) for _ in range(world)]
    dist.all_gather(gathered, coef)
    dist.destroy_process_group()
    local, total = merged.stored_bytes()
    info = sizes(merged)
    return {
        "rank": rank,
        "stored_mb": local / MB,
        "total_mb": total / MB,
        "rss_mb": loaded,
        "load_peak_mb": load_peak,
        "step_peak_mb": peak,
        "merged_mb": info["merged_mb"],
        "block_mb": info["block_mb"],
        "step_s": statistics.median(times),
        "coef_spread": max(float((g - coef).abs().max()) for g in gathered),
    }


def free_port() -> int:
    """A free TCP port on this machine for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(config: Mapping[str, Any], world: int, timeout: float | None = None) -> list[dict[str, Any]]:
    """Run ``world`` rank processes of :func:`run_rank`; their results, by rank."""
    env = {
        **module_env(),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
    }
    cmd = module_command("benchmarks.sharded_memory", "--worker", json.dumps(dict(config)))
    procs = [
        subprocess.Popen(
            cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in range(world)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(err.strip().splitlines()[-5:])
            raise RuntimeError(f"rank failed (exit {proc.returncode}) at N = {world}: {tail}")
        results.append(json.loads(lines[-1]))
    return results


def summarise(world: int, mode: str, ranks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One table row: the largest of each measurement over the ranks."""
    row: dict[str, Any] = {"ranks": world, "mode": mode}
    keys = ("stored_mb", "load_peak_mb", "rss_mb", "step_peak_mb", "merged_mb", "block_mb", "step_s")
    for key in (*keys, "coef_spread"):
        row[key] = max(float(r[key]) for r in ranks)
    row["total_mb"] = ranks[0]["total_mb"]
    return row


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="sharded_memory",
        description=__doc__.split("\n\n")[0],
        parents=[
            run_flags(base="zoo:smollm2", batch_size=4, seq_len=64, steps=2, warmup=1, unit="prompt"),
            worker_flags(1, "torch threads per rank"),
            lm_flags(),
        ],
    )
    p.add_argument("--ranks", default="1,2,4", help="comma-separated numbers of processes")
    p.add_argument("--modes", default="whole,per_block", help="comma-separated merge modes")
    p.add_argument(
        "--backbone_pass",
        choices=("per_task", "joint"),
        default="per_task",
        help="per_task: one task's forward+backward at a time; joint: every task in one forward",
    )
    p.add_argument(
        "--precision",
        choices=("32-true", "bf16-mixed"),
        default="32-true",
        help="the forward's precision (bf16-mixed: per-block merged matrices and their gather in bf16)",
    )
    p.add_argument(
        "--loading",
        choices=("sharded", "whole"),
        default="sharded",
        help="sharded: every rank reads only its columns of the files, all at once (what train.py does "
        "under ModelParallelStrategy); whole: each rank loads every expert whole, one rank at a time",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every (N, mode) in fresh processes; print and save the table."""
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_rank(json.loads(args.worker))))
        return 0
    experts = expert_sources(args.experts)  # demo experts are built here, once, not in the ranks
    keys = ("base", "batch_size", "seq_len", "answer", "steps", "warmup", "threads", "loading")
    keys += ("precision", "backbone_pass")
    common = {k: getattr(args, k) for k in keys} | {"experts": experts}
    rows = []
    for world in (int(n) for n in args.ranks.split(",")):
        for mode in args.modes.split(","):
            row = summarise(world, mode, measure({**common, "mode": mode}, world))
            print(json.dumps(row), flush=True)
            rows.append(row)
    one = {r["mode"]: r["stored_mb"] for r in rows if r["ranks"] == min(x["ranks"] for x in rows)}
    for row in rows:
        row["x_stored"] = row["stored_mb"] / one[row["mode"]]
    header = (
        f"# Sharded storage over N CPU processes (gloo; {args.loading} loading; base {args.base}, "
        f"T = {len(experts)}, global "
        f"batch {args.batch_size} x {args.seq_len} tokens per task, loss on the last {args.answer} "
        f"positions, {args.precision}, backbone_pass {args.backbone_pass}, {args.threads} threads per "
        f"rank, {os.cpu_count()} cores)\n\n"
    )
    text = header + format_table(rows, COLUMNS) + "\n\n" + LEGEND + "\n"
    print(text)
    write_results(args.out_dir, "sharded_memory", text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
