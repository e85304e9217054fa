"""One GPU, a few minutes: peak GPU memory against the memory model, and step time, per precision and mode.

For each precision (``bf16-mixed``, ``16-mixed``) and merge mode (``whole``, ``per_block``) it builds the
merged model of the real SmolLM2-135M demo experts (T = 4, layer-wise, float32 storage) on the device and
runs training steps as ``python -m benchmarks.per_block_memory`` does (``benchmarks.common.lm_step``),
then reports:

- ``stored_mb``: memory allocated once the merged model is on the device (base + task vectors), and
  ``model_stored_mb``, the memory model's ``stored`` (``benchmarks.memory_model``);
- ``step_peak_mb``: the peak allocated during the steps above ``stored_mb``, and ``model_transient_mb``,
  the model's ``transient`` (the rest of the peak is activations: A);
- ``step_s``: the median step.

``bash benchmarks/gpu_check.sh`` runs it, then two short ``train.py fit`` runs (bf16-mixed and 16-mixed,
per-block) of the SmolLM2 demo. On a machine without a GPU, ``--device cpu`` runs the same table (the
tests do, on tiny models).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common.architectures import ARCHITECTURES, per_rank_bytes
from benchmarks.common.cli import lm_flags, run_flags
from benchmarks.common.experts import expert_sources
from benchmarks.common.lm_step import AUTOCAST, step_closure
from benchmarks.common.measure import MB
from benchmarks.common.results import RESULTS_DIR, format_table, write_results
from divmerge.core.merged_model import MergedModel
from divmerge.families import load_experts

COLUMNS = (
    "precision",
    "mode",
    "stored_mb",
    "model_stored_mb",
    "step_peak_mb",
    "model_transient_mb",
    "step_s",
)


def allocated(device: torch.device) -> tuple[float, float]:
    """(allocated, peak allocated) MB on a CUDA device; (0, 0) elsewhere (no allocator statistics)."""
    if device.type != "cuda":
        return 0.0, 0.0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / MB, torch.cuda.max_memory_allocated(device) / MB


def measure(experts: Any, precision: str, mode: str, config: dict[str, Any]) -> dict[str, Any]:
    """One (precision, mode) row: memory on the device and the median step."""
    device = torch.device(config["device"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before, _ = allocated(device)
    merged = MergedModel(experts, "layer", merge_mode=mode).to(device)
    stored, _ = allocated(device)
    step = step_closure(merged, {**config, "precision": precision})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(int(config["warmup"]) + int(config["steps"])):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= int(config["warmup"]):
            times.append(time.perf_counter() - start)
    _, peak = allocated(device)
    arch = ARCHITECTURES.get(config["architecture"])
    compute = 4 if AUTOCAST[precision] is None else 2  # merged block matrices' bytes
    tasks = len(merged.task_names)
    model = per_rank_bytes(arch, tasks, 1, 4, mode, 0.0, compute_bytes=compute) if arch else None
    del merged, step
    return {
        "precision": precision,
        "mode": mode,
        "stored_mb": stored - before,
        "model_stored_mb": model["stored"] / MB if model else float("nan"),
        "step_peak_mb": peak - stored,
        "model_transient_mb": model["transient"] / MB if model else float("nan"),
        "step_s": statistics.median(times),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="gpu_check",
        description=__doc__.split("\n\n")[0],
        parents=[
            run_flags(
                base="zoo:smollm2",
                batch_size=16,
                seq_len=128,
                steps=5,
                warmup=2,
                unit="prompt",
                out_dir=RESULTS_DIR / "gpu",
            ),
            lm_flags(),
        ],
    )
    p.add_argument(
        "--architecture",
        default="smollm2-135m",
        help=f"memory-model preset of the experts ({', '.join(ARCHITECTURES)}; other: no prediction)",
    )
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--precisions", default="bf16-mixed,16-mixed", help="comma-separated precisions")
    p.add_argument("--modes", default="whole,per_block", help="comma-separated merge modes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every (precision, mode); print and save the table."""
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (run it on a GPU machine, or pass --device cpu)")
        return 2
    experts = load_experts(args.base, expert_sources(args.experts))
    keys = ("device", "architecture", "batch_size", "seq_len", "answer", "steps", "warmup")
    config = {k: getattr(args, k) for k in keys}
    rows = []
    for precision in args.precisions.split(","):
        for mode in args.modes.split(","):
            rows.append(measure(experts, precision, mode, config))
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    header = (
        f"# GPU check on {name} (base {args.base}, T = {len(experts.task_names)}, {args.batch_size} x "
        f"{args.seq_len} tokens per task, loss on the last {args.answer} positions; "
        f"torch {torch.__version__})\n\n"
    )
    text = header + format_table(rows, COLUMNS) + "\n"
    print(text)
    write_results(args.out_dir, "gpu_check", text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
