"""CPU threading that survives sharing: OpenMP threads that sleep when idle, counts from the usable CPUs.

OpenMP runtimes (libgomp in torch's wheels, Intel's OpenMP under MKL, FAISS's) spin while they wait for
work by default. When another process holds one of the cores, a spinning team waits for a thread that is
not running: a 2-thread forward of 1.5 ms took 200 ms on a shared node. OMP_WAIT_POLICY=PASSIVE and
KMP_BLOCKTIME=0 make idle threads sleep instead. The runtimes read these variables when they load, so
`embedsvc serve` and `embedsvc index` set them before torch or faiss is imported; a value already in the
environment wins (set OMP_WAIT_POLICY=ACTIVE to get spinning back). Thread counts default to the CPUs this
process may use (its affinity mask, capped by a cgroup CPU quota), not the machine's core count.
This module imports nothing heavy.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# Nice value added to threads that decode images beside a CPU forward: the forward's OpenMP team then waits
# less for a core a decoder holds (serve's decode_nice default; index's reader threads).
DEFAULT_DECODE_NICE = 10


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by the container's CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(n, math.ceil(quota))) if quota else max(1, n)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup allows (cgroup v2 cpu.max, else v1 cfs quota), or None."""
    try:
        max_quota, max_period = (root / "cpu.max").read_text().split()[:2]
        return None if max_quota == "max" else int(max_quota) / int(max_period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def apply_openmp_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Sets the passive wait policy and OMP_NUM_THREADS where unset; returns what it set.
    Effective only before torch or faiss is imported in this process."""
    chosen = dict(WAIT_POLICY, OMP_NUM_THREADS=str(usable_cpus()))
    applied = {key: value for key, value in chosen.items() if key not in environ}
    environ.update(applied)
    return applied


def lower_thread_priority(increment: int) -> None:
    """Raises the calling thread's nice value by `increment` (Linux schedules threads by their own nice
    value). Meant as a ThreadPoolExecutor initializer; a no-op where unsupported."""
    if increment <= 0 or not sys.platform.startswith("linux"):  # elsewhere the id would name a process
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError):
        pass
