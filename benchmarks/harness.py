"""What every benchmark child shares: the thread limit of its environment and its own peak RSS."""

from __future__ import annotations

import os
import resource
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def thread_env(threads: str, **extra: str) -> dict[str, str]:
    """This process's environment with every thread pool limited to ``threads``.

    Everything else is left as the user has it, OpenMP's wait policy included: an earlier
    version set ``OMP_WAIT_POLICY=PASSIVE`` (sleeping instead of spinning threads, kinder to
    a shared machine), which made torch's many short parallel regions wait for their threads
    to wake and cost medreg up to a fifth of its deformable wall time on a quiet machine.
    Export ``OMP_WAIT_POLICY=PASSIVE`` yourself to measure that way.
    """
    env = dict(os.environ)
    for key in THREAD_VARIABLES:
        env[key] = threads
    env.update(extra)
    return env


def peak_rss_mb() -> float:
    """This process's own peak RSS (MB), ``VmHWM`` of ``/proc/self/status``.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is only the fallback: Linux keeps it across ``execve``,
    so a child forked from a large driver would report the driver's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
