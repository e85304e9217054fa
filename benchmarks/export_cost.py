"""Wall time and peak memory of ``python train.py export``: static TIES, and a learned merge's export.

Each export runs in a fresh ``train.py export`` process (interpreter start-up included, as in
mergekit's figure), timed from the parent; its peak RSS comes from ``os.wait4`` (that child alone).
Inside the process, the RSS right after the experts are loaded is recorded too, so the table shows what
the export itself adds beyond the loaded experts, next to the size of one merged backbone.

Rows:

- ``ties``: TIES (density 0.2, lambda 1) of the experts in ``--config`` (default: the six demo experts),
  written as a Hugging Face directory: the job ``mergekit-yaml`` does for a TIES config. Reference:
  mergekit 0.1.5 on the same six experts, 20.9 s and 1.66 GB peak RSS (issue 5).
- ``learned``: the export of a learned merge from ``--ckpt_path`` (skipped when it is not given).

Run ``python -m benchmarks.export_cost --help``; results go to ``<out_dir>/export_cost.md``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common.measure import MB, ROOT, module_command, peak_rss_mb, reset_peak, rss_mb
from benchmarks.common.results import RESULTS_DIR, write_results

MERGEKIT = {"wall_s": 20.9, "peak_mb": 1660.0}  # mergekit 0.1.5, TIES of the 6 demo experts (issue 5)


def worker(argv: list[str]) -> dict[str, Any]:
    """Run ``train.py export`` in this process, noting RSS once the experts are loaded.

    Args:
        argv: The ``export`` arguments (after ``export``).

    Returns:
        ``rss_after_load_mb``, ``load_peak_mb``, ``backbone_mb`` (one merged backbone's bytes),
        ``export_peak_mb`` (the peak after loading: merge + write, where ``hwm_reset``) and ``peak_mb``
        (the whole process).

    """
    import transformers

    import train
    from divmerge.lightning.export_command import parse_export_args, run_export

    marks: dict[str, Any] = {}

    def build_module(cli_args: list[str]) -> Any:
        module = train.make_cli(cli_args, run=False).model
        build = module.build

        def build_and_mark() -> Any:
            merged = build()
            marks.setdefault("rss_after_load_mb", rss_mb())
            marks.setdefault("load_peak_mb", peak_rss_mb())
            marks.setdefault(
                "backbone_mb", sum(t.numel() * t.element_size() for _, t in merged.base.items()) / MB
            )
            marks.setdefault("hwm_reset", reset_peak())  # from here VmHWM is the export phase's own peak
            return merged

        module.build = build_and_mark
        return module

    transformers.logging.set_verbosity_error()
    options, overrides = parse_export_args(argv, train.DEMO_CONFIG)
    run_export(options, build_module, overrides)
    export_peak = peak_rss_mb()
    return {**marks, "export_peak_mb": export_peak, "peak_mb": max(export_peak, marks["load_peak_mb"])}


def measure(export_args: list[str], threads: int | None) -> dict[str, Any]:
    """Time one export in a fresh process; its peak RSS from ``os.wait4``.

    Args:
        export_args: Arguments after ``train.py export``.
        threads: OMP_NUM_THREADS for the child (None: inherit).

    Returns:
        The worker's marks plus ``wall_s`` and ``child_maxrss_mb``.

    Raises:
        RuntimeError: If the export fails (with the end of its stderr).

    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    worker = module_command("benchmarks.export_cost", "--worker", json.dumps(export_args))
    # A small launcher forks the worker: Linux carries a forking process's peak RSS into its child's
    # ru_maxrss, so forking straight from a big caller (a test session) would overstate the worker's.
    cmd = [sys.executable, "-c", _LAUNCHER, *worker]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        code = subprocess.run(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, check=False).returncode
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        printed = out.read().splitlines()
        lines = [ln for ln in printed if ln.startswith("{")]
        maxrss = [int(ln.split()[1]) for ln in printed if ln.startswith(_MAXRSS)]
        if code != 0 or not lines or not maxrss:
            tail = " | ".join(err.read().strip().splitlines()[-3:])
            raise RuntimeError(f"export {export_args} failed (exit {code}): {tail}")
    return {**json.loads(lines[-1]), "wall_s": wall, "child_maxrss_mb": maxrss[-1] * 1024 / MB}


_MAXRSS = "WORKER_MAXRSS_KB"
_LAUNCHER = f"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print("{_MAXRSS}", usage.ru_maxrss, flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the measured exports and the mergekit reference."""
    head = (
        "| job | wall s (start-up included) | peak RSS MB | loading's peak MB | RSS with experts loaded MB | "
        "merge + write peak beyond the loaded experts MB | one backbone MB |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        beyond = r["export_peak_mb"] - r["rss_after_load_mb"]
        lines.append(
            f"| {r['job']} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} | {r['load_peak_mb']:.0f} | "
            f"{r['rss_after_load_mb']:.0f} | {beyond:.0f} ({beyond / r['backbone_mb']:.2f} backbones) | "
            f"{r['backbone_mb']:.0f} |"
        )
    lines.append(
        f"| mergekit 0.1.5 TIES (issue 5) | {MERGEKIT['wall_s']} | {MERGEKIT['peak_mb']:.0f} |  |  |  |  |"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the exports, print the table and write ``export_cost.md``."""
    p = argparse.ArgumentParser(prog="export_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo6.yaml"), help="run config (experts)")
    p.add_argument("--ckpt_path", default=None, help="checkpoint of a learned merge of --learned_config")
    p.add_argument("--learned_config", default=str(ROOT / "configs" / "demo4.yaml"), help="its config")
    p.add_argument("--repeats", type=int, default=3, help="runs per job (the median wall time is reported)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the export processes")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR, help="where the table goes")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    jobs = {f"ties ({Path(args.config).stem} experts)": ["--config", args.config, "--model.method", "ties"]}
    if args.ckpt_path:
        name = f"learned ({Path(args.learned_config).stem} checkpoint)"
        jobs[name] = ["--config", args.learned_config, "--ckpt_path", args.ckpt_path]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="export_cost-"))
    try:
        for job, job_args in jobs.items():
            runs = []
            for i in range(args.repeats):
                out_dir = tmp / f"{len(rows)}-{i}"
                runs.append(measure(["--out_dir", str(out_dir), *job_args], args.threads))
                shutil.rmtree(out_dir, ignore_errors=True)
                print(
                    f"{job} run {i + 1}: {runs[-1]['wall_s']:.1f} s, peak {runs[-1]['peak_mb']:.0f} MB",
                    flush=True,
                )
            runs.sort(key=lambda r: r["wall_s"])
            rows.append({"job": job, **runs[len(runs) // 2]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = format_rows(rows)
    load = os.getloadavg()[0]
    note = (
        f"Median of {args.repeats} runs; OMP_NUM_THREADS={args.threads or 'default'}; {os.cpu_count()} CPUs; "
        f"1-min load average at the end {load:.1f}. Peak RSS = VmHWM of the export process."
    )
    print(f"\n{table}\n\n{note}")
    write_results(args.out_dir, "export_cost", f"# Export cost\n\n{table}\n\n{note}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
