"""What chunkcca sets up on a ``distributed`` cluster; imported only when a Client runs the work."""

from __future__ import annotations

import warnings
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .blas import pin_blas


class PinBlas(WorkerPlugin):
    """Limit BLAS to one thread on every worker, present and future, as distributed's nanny does by default.

    Set in the worker's own event-loop thread: OpenBLAS ignores a limit set from a task's thread
    once its thread pool runs.
    """

    name = "chunkcca-pin-blas"
    idempotent = True  # registered once per cluster: later registrations change nothing

    def setup(self, worker: Any) -> None:
        pin_blas()


def prepare_workers(client: Any) -> None:
    """Register ``PinBlas`` on ``client``'s cluster once; a failure only warns (it is an optimisation)."""
    try:
        client.register_plugin(PinBlas(), name=PinBlas.name)
    except Exception as error:  # a worker refusing the plugin must not fail the comparison
        warnings.warn(f"could not limit BLAS to one thread on the workers ({type(error).__name__}: {error}); "
                      f"start them with a nanny, or set OPENBLAS_NUM_THREADS=1 for them", RuntimeWarning,
                      stacklevel=3)
