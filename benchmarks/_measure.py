"""Memory probes every benchmark shares: resident set, peak resident set, and a peak reset (Linux /proc)."""

import resource
from pathlib import Path

MB = 1e6  # reported megabytes are 10^6 bytes


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
