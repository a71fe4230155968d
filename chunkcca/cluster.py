"""What chunkcca sets up on a ``distributed`` cluster; imported only when a Client runs the work."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .stream import pin_blas


class PinBlas(WorkerPlugin):
    """Limit BLAS to one thread on every worker, present and future, as distributed's nanny does by default.

    Set in the worker's own event-loop thread: OpenBLAS ignores a limit set from a task's thread
    once its thread pool runs.
    """

    name = "chunkcca-pin-blas"

    def setup(self, worker: Any) -> None:
        pin_blas()


def prepare_workers(client: Any) -> None:
    """Register :class:`PinBlas` on ``client``'s cluster (replacing an earlier registration)."""
    client.register_plugin(PinBlas(), name=PinBlas.name)
