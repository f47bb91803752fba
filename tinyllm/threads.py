"""BLAS threads for the numpy backend, set through threadpoolctl (OpenBLAS, MKL or BLIS alike).

Why not the BLAS default (one thread per core): OpenBLAS threads spin while they wait for
work, so when another process holds a core, every matmul waits for the thread that lost its
core. Measured on this project's 2-core machine (BENCHMARKS.md, "BLAS threads"), SmolLM2 decode
fell about tenfold beside one busy process. The default therefore leaves out the cores that
other processes are using right now (runnable tasks in /proc/loadavg), and never goes below 1.
`--threads N` / LLM(threads=N) overrides it.
"""

from __future__ import annotations

import os

from .errors import TinyLLMError

_limiter = None  # the threadpoolctl limiter in force (kept so the limit stays set)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Other processes' runnable tasks at this moment (Linux; 0 where unknown)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)  # minus this process, which is running to read it


def default_threads() -> int:
    return max(1, available_cores() - busy_cores())


def set_threads(threads: int | None) -> int:
    """Limit BLAS to `threads` (None: default_threads()) for the rest of the process;
    returns the number in force."""
    global _limiter
    if threads is not None and (
        not isinstance(threads, int) or isinstance(threads, bool) or threads < 1
    ):
        raise TinyLLMError(f"threads={threads!r} must be an integer >= 1")
    n = threads or default_threads()
    from threadpoolctl import threadpool_limits

    if _limiter is not None:
        _limiter.restore_original_limits()
    _limiter = threadpool_limits(limits=n, user_api="blas")
    return n


def blas_threads() -> list[int]:
    """The thread count of every BLAS library loaded (for checks and `--verbose`)."""
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
