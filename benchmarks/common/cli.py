"""The flags the measurement benchmarks share, declared once as parent parsers (argparse ``parents=``).

Each script passes its own defaults, so ``--help`` and the results of every script stay its own.
"""

import argparse
from pathlib import Path

from benchmarks.common.experts import TASKS
from benchmarks.common.results import RESULTS_DIR


def run_flags(
    *,
    base: str,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    unit: str = "example",
    out_dir: Path = RESULTS_DIR,
) -> argparse.ArgumentParser:
    """The parent parser of a measured run: ``--base``, ``--batch_size``, ``--seq_len``, ``--steps``,
    ``--warmup`` and ``--out_dir``.

    Args:
        base: Default base model source.
        batch_size: Default inputs per task per step.
        seq_len: Default tokens per input.
        steps: Default timed steps.
        warmup: Default untimed warm-up steps.
        unit: What one input is called in the help (``example``, ``prompt``).
        out_dir: Default results folder.

    Returns:
        A parser without ``-h``, for ``parents=``.

    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--base", default=base, help="base model source (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=batch_size, help=f"{unit}s per task per step")
    p.add_argument("--seq_len", type=int, default=seq_len, help=f"tokens per {unit}")
    p.add_argument("--steps", type=int, default=steps, help="timed steps after the warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed warm-up steps")
    p.add_argument("--out_dir", type=Path, default=out_dir, help="where the results go")
    return p


def worker_flags(
    threads: int | None, threads_help: str = "torch threads per subprocess"
) -> argparse.ArgumentParser:
    """The parent parser of a benchmark that measures in fresh processes: ``--threads`` and the hidden
    ``--worker <config as JSON>`` (the mode a measuring subprocess runs in).

    Args:
        threads: Default ``--threads`` (None: torch's default).
        threads_help: Its help text.

    Returns:
        A parser without ``-h``, for ``parents=``.

    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def lm_flags() -> argparse.ArgumentParser:
    """The parent parser of the causal-LM memory benchmarks: ``--experts`` (the generative demo experts by
    default) and ``--answer``.

    Returns:
        A parser without ``-h``, for ``parents=``.

    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--experts",
        default=",".join(f"zoo:smollm2/{t}" for t in TASKS),
        help="comma-separated expert sources (default: the four generative demo experts)",
    )
    p.add_argument("--answer", type=int, default=8, help="positions whose logits the loss reads")
    return p
