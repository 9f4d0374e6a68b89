"""Run once in each worker process as it starts (exec/worker.c calls `start_worker`), for
settings that belong to workers and must not touch the master.

BLAS and OpenMP thread pools: numpy's BLAS starts one thread per core in every process, so
N workers each running a matrix routine put N x cores threads on the cores, and a
linear-algebra script runs slower under pydron than plainly. Each worker gets
`blas_threads` threads (config.py; by default cores // workers, at least 1, as loky does):
through threadpoolctl for libraries already loaded (inherited from the master by fork), and
through the usual environment variables for libraries a task loads later. The master keeps
its own settings.
"""
from __future__ import annotations

import os

# Read by OpenMP runtimes, OpenBLAS, MKL, BLIS, Apple Accelerate and numexpr when they load.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

# Set in the master by pydron.enable() before the fork server starts, so every worker
# inherits it; None when the pool was started without enable() (tests of the core).
_blas_threads: int | None = None


def plan(blas_threads: int) -> None:
    """Master side: the BLAS/OpenMP threads each worker started from now on will use."""
    global _blas_threads
    if isinstance(blas_threads, bool) or not isinstance(blas_threads, int) or blas_threads < 1:
        raise ValueError(f"blas_threads must be a positive integer, got {blas_threads!r}")
    _blas_threads = blas_threads


def _resolved_blas_threads(workers: int) -> int:
    if _blas_threads is not None:
        return _blas_threads
    from pydron import config
    try:
        return config.resolve({"workers": workers}).blas_threads
    except config.ConfigError:
        # A bad setting was already reported to the master, or the pool was started
        # without enable(): the default still protects the cores.
        return config.blas_threads_for(workers)


# Substrings of the file names of the libraries threadpoolctl controls (OpenBLAS, MKL, BLIS,
# FlexiBLAS, the OpenMP runtimes of GCC, LLVM and Intel).
_POOL_LIBRARIES = ("blas", "mkl_rt", "libmkl", "libblis", "libgomp", "libomp", "libiomp")


def _thread_pools_loaded() -> bool:
    """Whether a library with a thread pool is mapped into this process: only then is
    threadpoolctl worth importing (~20 ms in a worker without numpy)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            text = maps.read().lower()
    except OSError:
        return True
    return any(name in text for name in _POOL_LIBRARIES)


def reseed_random() -> None:
    """A worker is a fork: it starts with the fork server's numpy global generator, the same
    in every worker, so unseeded draws (np.random.rand()) would repeat across workers. Each
    worker reseeds it from the OS's entropy. Python's random module needs nothing: it reseeds
    itself at every fork (os.register_at_fork, run by PyOS_AfterFork_Child). numpy imported
    later by a task seeds itself from the OS."""
    import sys
    mtrand = sys.modules.get("numpy.random.mtrand")
    if mtrand is not None:
        mtrand.seed()


def start_worker(workers: int) -> int:
    """Worker side, once, before the first task: reseed numpy's global generator, limit
    BLAS/OpenMP threads. Returns the limit applied."""
    try:
        reseed_random()
    except Exception:       # a numpy without the legacy generator: nothing to reseed
        pass
    limit = _resolved_blas_threads(workers)
    for var in THREAD_VARIABLES:
        os.environ[var] = str(limit)
    if not _thread_pools_loaded():      # libraries loaded later read the variables
        return limit
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:     # libraries loaded later still read the variables
        return limit
    threadpool_limits(limits=limit)
    return limit
