"""Memory probes every benchmark shares: resident set, peak resident set, and a peak reset (Linux /proc)."""

import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MB = 1e6  # reported megabytes are 10^6 bytes
ROOT = Path(__file__).resolve().parents[2]  # the repository


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return 0.0


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    return status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process image so far, MB.

    ``VmHWM`` (the high-water mark of this process's memory map), falling back to ``ru_maxrss`` only
    where ``/proc`` is missing: Linux carries ``ru_maxrss`` over from the parent across fork + exec, so a
    subprocess started by a big parent would report the parent's peak.
    """
    return status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc ``malloc_trim``), if it can."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def module_command(module: str, *args: str) -> list[str]:
    """``python -m <module> <args>``: how a benchmark starts a fresh process of itself."""
    return [sys.executable, "-m", module, *args]


def module_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the repository root first on ``PYTHONPATH``, so that
    ``python -m benchmarks.<name>`` starts from any working directory."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_worker_process(module: str, config: Mapping[str, Any], timeout: float | None = None) -> dict:
    """Run ``python -m <module> --worker <config as JSON>`` in a fresh process (so peaks never mix).

    Args:
        module: The benchmark's module (``benchmarks.<name>``); its ``--worker`` mode prints its result
            as one JSON line.
        config: The worker's configuration; must be JSON-serialisable.
        timeout: Seconds before the subprocess is killed (None: no limit).

    Returns:
        The worker's last printed JSON object.

    Raises:
        RuntimeError: If the subprocess fails; the message carries the end of its stderr.
    """
    cmd = module_command(module, "--worker", json.dumps(dict(config)))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=module_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"worker failed (exit {proc.returncode}) for {dict(config)}: {tail}")
    return json.loads(lines[-1])
