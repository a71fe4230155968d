"""BLAS on one thread: Dask supplies the parallelism.

On this project's 2-core reference machine OpenBLAS with 2 threads under 2 Dask threads made the
per-chunk products 5–10× slower and small ``eigh``/``pinv`` calls 50–100× slower (DESIGN.md §9).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy  # noqa: F401  (the BLAS libraries chunkcca's maths runs on, loaded before _blas_libraries looks:
import scipy.linalg  # noqa: F401  a worker that unpickles a task loads only the modules it names)
from threadpoolctl import ThreadpoolController, threadpool_limits


@functools.cache
def _blas_libraries() -> tuple[Any, ...]:
    """This process's BLAS libraries (threadpoolctl controllers), looked up once per process."""
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def pin_blas() -> None:
    """Limit BLAS to one thread in this process, unless it already is.

    A local compute pins BLAS for its duration already (``one_thread()``); every chunk task calls
    this for the processes of Dask's "processes" scheduler, where the limit then stays, and on a
    cluster each worker calls it in its own thread (``chunkcca.cluster.PinBlas``): OpenBLAS
    ignores a limit set from another thread once its thread pool runs.
    """
    for library in _blas_libraries():
        if library.num_threads != 1:
            library.set_num_threads(1)


def one_thread() -> threadpool_limits:
    """A context in which BLAS runs on one thread, restored afterwards."""
    return threadpool_limits(limits=1, user_api="blas")


#: Order of the dense solves (eigh, SVD) from which BLAS runs on every core: below it, more threads made
#: small calls 50-100x slower; at 8192 channels one thread took 92 s for a CCA (docs/performance.md).
WIDE_SOLVE = 1024


def solve_threads(order: int) -> threadpool_limits:
    """A context for a dense solve of matrices of ``order`` rows: BLAS on one thread for small ones, on every
    core from ``WIDE_SOLVE`` (restored afterwards)."""
    return threadpool_limits(limits=1 if order < WIDE_SOLVE else os.cpu_count() or 1, user_api="blas")
