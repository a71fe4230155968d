"""Dask plumbing: one Moments partial per datapoint chunk, tree-reduced, computed on any scheduler.

The engine (:func:`rows_reduction`) has the shape of a flox reduction: a chunk function on
the rows a spatial adapter gives, an associative merge used to combine and aggregate, and a
finalize step. The Moments are one such reduction (:func:`chunkcca.moments.partial_from_rows`,
:func:`chunkcca.moments.merge_packed`, :func:`chunkcca.moments.unpack`); minibatch CKA is
another. Memory per task is O(chunk + partial) whatever the number of datapoints.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import dask
import dask.array as da
import dask.threaded
import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_limits

from .moments import Moments, Precision, merge_packed, partial_from_rows, unpack
from .spatial import Adapter, block_rows, spatial_shape

#: Partials merged per task in the tree reduction.
SPLIT_EVERY = 8


NAN_POLICIES: tuple[str, ...] = ("raise", "omit")


class NonFiniteError(ValueError):
    """Activations hold NaN or Inf where ``nan_policy="raise"``."""


def finite_rows(rows: list[np.ndarray], *, nan_policy: str, names: Sequence[str], first_datapoint: int,
                datapoints: int) -> list[np.ndarray]:
    """Check one chunk's rows for NaN/Inf: raise naming the layer and datapoints, or omit those rows from every side.

    A row is omitted when any side's row (at any frequency, for dft) holds a non-finite value.
    """
    finite = [np.isfinite(side).all(axis=tuple(i for i in range(side.ndim) if i != side.ndim - 2)) for side in rows]
    if all(mask.all() for mask in finite):
        return rows
    if nan_policy == "raise":
        name = next(n for n, mask in zip(names, finite) if not mask.all())
        raise NonFiniteError(f"layer {name!r} holds NaN or Inf in the chunk of datapoints {first_datapoint} to "
                         f"{first_datapoint + datapoints - 1}; pass nan_policy='omit' to leave such rows out")
    keep = np.logical_and.reduce(finite)
    return [side[..., keep, :] for side in rows]


def _only_block(nested: Any) -> np.ndarray:
    """The one block Dask passes (in nested lists, one level per contracted axis) with ``concatenate=False``."""
    while isinstance(nested, list):
        (nested,) = nested
    return nested


def _chunk_task(first: np.ndarray, *blocks: Any, adapters: Sequence[Adapter], stride: int,
                reduce_rows: Callable[[list[np.ndarray], int], np.ndarray], nan_policy: str | None,
                names: Sequence[str], partial_shows_nonfinite: bool) -> np.ndarray:
    """One datapoint chunk of every side → rows per side (finite) → ``reduce_rows(rows, first_datapoint)``.

    With ``partial_shows_nonfinite`` (NaN and Inf in any row reach the partial, as they reach
    the Moments' sums) the rows are searched only when the partial is not finite, so a finite
    chunk costs no extra pass.
    """
    pin_blas()
    first_datapoint = int(first[0]) if first.size else 0
    blocks = tuple(_only_block(block) for block in blocks)
    # arithmetic on NaN or Inf rows is expected while they are found and reported (or left out) below
    with np.errstate(invalid="ignore") if nan_policy is not None else contextlib.nullcontext():
        rows = [block_rows(block, adapter, first_datapoint, stride) for block, adapter in zip(blocks, adapters)]
        if nan_policy is None:
            return reduce_rows(rows, first_datapoint)
        check = partial(finite_rows, nan_policy=nan_policy, names=names, first_datapoint=first_datapoint,
                        datapoints=blocks[0].shape[0])
        if not partial_shows_nonfinite:
            return reduce_rows(check(rows), first_datapoint)
        result = reduce_rows(rows, first_datapoint)
    if np.isfinite(result).all():
        return result
    finite = check(rows)
    return result if finite is rows else reduce_rows(finite, first_datapoint)


@functools.cache
def _blas_libraries() -> tuple[Any, ...]:
    """This process's BLAS libraries (threadpoolctl controllers), looked up once per process."""
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def pin_blas() -> None:
    """Limit BLAS to one thread in this process, unless it already is.

    Dask runs as many tasks as it has threads, and BLAS threads under them only compete (5-10x
    slower here). A local compute pins BLAS for its duration already; every chunk task calls this
    for the processes of Dask's "processes" scheduler, where the limit then stays, and on a
    cluster each worker calls it in its own thread (:class:`chunkcca.cluster.PinBlas`): OpenBLAS
    ignores a limit set from another thread once its thread pool runs.
    """
    for library in _blas_libraries():
        if library.num_threads != 1:
            library.set_num_threads(1)


def common_boundaries(sides: Sequence[da.Array]) -> list[int]:
    """Datapoint offsets where every side's chunks start or end (0 and the length included): the places a
    run can be cut into parts without splitting any side's chunk (which would read it twice)."""
    ends = [set(np.cumsum((0, *side.chunks[0])).tolist()) for side in sides]
    return sorted(set.intersection(*ends))


def _keep(partial: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return partial


def _combine(partials: np.ndarray, axis: Any = None, keepdims: bool = True, *,
             merge: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return merge(partials)


def rows_reduction(sides: Sequence[da.Array], adapters: Sequence[Adapter], *,
                   reduce_rows: Callable[[list[np.ndarray], int], np.ndarray],
                   merge: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], dtype: Any,
                   stride: int = 1, split_every: int = SPLIT_EVERY, nan_policy: str | None = "raise",
                   names: Sequence[str] = (), offset: int = 0, partial_shows_nonfinite: bool = False) -> da.Array:
    """The engine: a lazy (1, *shape) reduction of the rows of ``sides``, one partial per datapoint chunk.

    ``sides`` are Dask arrays sharing axis 0 (datapoint), each (datapoint, [height, width,]
    channel), with one :class:`~chunkcca.spatial.Adapter` each; Dask aligns their datapoint
    chunks. ``reduce_rows(rows, first_datapoint)`` maps one chunk's rows (per side, after the
    adapter and stride) to a partial (1, *shape); ``merge`` maps k stacked partials (k, *shape)
    to one (1, *shape), associatively; Dask tree-reduces with ``split_every``. Rows with NaN or
    Inf raise an error naming the layer (from ``names``) and chunk, or are left out, as
    ``nan_policy`` says (None: no check); ``partial_shows_nonfinite`` says ``reduce_rows`` gives a
    non-finite partial whenever a row holds NaN or Inf, which spares the search of finite chunks.
    ``offset`` is the global index of the first datapoint of ``sides`` (for the stride pattern
    when streaming a slice). Each side's datapoint chunk reaches ``reduce_rows`` as one block,
    without the copy Dask makes when it joins blocks (sides chunked along other dims are
    rechunked whole along them). Nothing is computed here.
    """
    names = tuple(names) or tuple(f"side {i}" for i in range(len(sides)))
    first = da.arange(offset, offset + sides[0].shape[0], chunks=(sides[0].chunks[0],))
    args: list[Any] = [first, ("datapoint",)]
    for i, side in enumerate(sides):
        side = side.rechunk({axis: -1 for axis in range(1, side.ndim)})  # a no-op when already whole
        args += [side, ("datapoint", *tuple(f"side{i}_axis{k}" for k in range(1, side.ndim)))]
    out_axes = {f"out{i}": size for i, size in enumerate(shape)}
    meta = np.empty((0,) * (1 + len(shape)), dtype=dtype)
    partials = da.blockwise(
        _chunk_task, ("datapoint", *out_axes), *args, new_axes=out_axes, adjust_chunks={"datapoint": 1},
        concatenate=False, dtype=dtype, meta=meta, adapters=tuple(adapters), stride=stride, reduce_rows=reduce_rows,
        nan_policy=nan_policy, names=names, partial_shows_nonfinite=partial_shows_nonfinite,
    )
    combine = partial(_combine, merge=merge)
    return da.reduction(partials, _keep, combine, combine=combine, axis=0, keepdims=True, dtype=dtype,
                        split_every=split_every, concatenate=True, meta=meta)


def _moments_partial(rows: list[np.ndarray], first_datapoint: int, *, precision: Precision,
                     row_norms: bool) -> np.ndarray:
    return partial_from_rows(rows, precision, row_norms=row_norms)


def moments_graph(sides: Sequence[da.Array], adapters: Sequence[Adapter], *, stride: int = 1,
                  precision: Precision = "float32", split_every: int = SPLIT_EVERY, nan_policy: str | None = "raise",
                  names: Sequence[str] = (), row_norms: bool = False, offset: int = 0) -> da.Array:
    """Lazy packed Moments (1, *batch, p + 2 [+ 2L], p) of the rows of ``sides``, concatenated along channels.

    ``row_norms`` adds the row-norm sums (real rows only) that the debiased CKA needs.
    """
    p = sum(side.shape[-1] for side in sides)
    is_complex = any(a.kind == "dft" for a in adapters)
    row_norms = row_norms and not is_complex
    norm_rows = 2 * len(sides) if row_norms else 0
    return rows_reduction(
        sides, adapters, reduce_rows=partial(_moments_partial, precision=precision, row_norms=row_norms),
        merge=partial(merge_packed, sizes=tuple(side.shape[-1] for side in sides)),
        shape=(*adapters[0].batch_shape, p + 2 + norm_rows, p),
        dtype=np.complex128 if is_complex else np.float64, stride=stride, split_every=split_every,
        nan_policy=nan_policy, names=names, offset=offset, partial_shows_nonfinite=True)


def compute(*graphs: Any, scheduler: Any = None, progress: bool = False) -> tuple[Any, ...]:
    """Compute Dask graphs with BLAS pinned to one thread, on the active or given scheduler.

    ``scheduler`` is anything :func:`dask.compute` takes ("threads", "processes",
    "synchronous", a ``distributed.Client``) or the address of a Dask scheduler
    ("tcp://host:8786", connected to for this call); by default the active one (a
    ``distributed.Client`` if one is current, else the local threaded scheduler). With
    ``progress=True`` a progress bar is shown: Dask's local bar, or distributed's on a cluster.
    """
    if is_address(scheduler):
        with connected(scheduler) as client:
            return compute(*graphs, scheduler=client, progress=progress)
    client = _active_client(scheduler)
    with threadpool_limits(limits=1, user_api="blas"):
        if client is not None:
            from .cluster import prepare_workers

            prepare_workers(client)
            futures = client.compute(list(graphs))
            if progress:
                _cluster_progress(futures, client)
            return tuple(client.gather(futures))
        options: dict[str, Any] = {"scheduler": scheduler}
        if scheduler in (None, "threads") and dask.config.get("scheduler", None) in (None, "threads"):
            if "distributed" not in sys.modules:  # then no Client exists, not even a worker's own
                # named by its function, Dask's threaded scheduler runs without importing distributed
                options["scheduler"] = dask.threaded.get
            if dask.config.get("num_workers", None) is None:
                # one thread more than cores lets a chunk's products overlap the next chunk's decoding
                # (measured 0.97-1.02 s against 1.02-1.34 s with one thread per core; docs/performance.md)
                options["num_workers"] = (os.cpu_count() or 1) + 1
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):  # stdout stays for results (e.g. the CLI's --json)
                return dask.compute(*graphs, **options)
        return dask.compute(*graphs, **options)


#: Scheduler names dask.compute takes.
SCHEDULER_NAMES = ("threads", "threading", "sync", "synchronous", "single-threaded", "processes",
                   "multiprocessing", "distributed", "dask.distributed")


def check_scheduler(scheduler: Any) -> None:
    """Refuse a ``scheduler`` that is neither None, a name Dask knows, an address, a Client nor a get function."""
    if scheduler is None or callable(scheduler) or is_address(scheduler) or hasattr(scheduler, "get"):
        return
    if isinstance(scheduler, str) and scheduler.lower() in SCHEDULER_NAMES:
        return
    raise ValueError(f"scheduler must be 'threads', 'synchronous', 'processes', a Dask scheduler address "
                     f"('tcp://host:8786' or 'host:8786') or a distributed.Client, got {scheduler!r}")


def is_address(scheduler: Any) -> bool:
    """Whether ``scheduler`` is the address of a Dask scheduler ("tcp://host:8786", "host:8786")."""
    return isinstance(scheduler, str) and ("://" in scheduler or re.fullmatch(r"[\w.\-\[\]:]+:\d+", scheduler)
                                           is not None)


@contextlib.contextmanager
def connected(scheduler: Any) -> Iterator[Any]:
    """A ``distributed.Client`` connected for the block when ``scheduler`` is an address, else ``scheduler``."""
    if not is_address(scheduler):
        yield scheduler
        return
    from distributed import Client

    with Client(scheduler, set_as_default=False) as client:
        yield client


def _cluster_progress(futures: list[Any], client: Any) -> None:
    """distributed's progress bar for ``futures`` of ``client``, which need not be the default client.

    In a terminal the bar (on stderr) blocks until the futures finish; in a notebook it is a widget, shown here.
    """
    from distributed import progress as distributed_progress

    with contextlib.redirect_stdout(sys.stderr):  # the terminal bar prints to stdout, which stays for results
        bar = distributed_progress(futures, scheduler=client.scheduler.address)
    if bar is not None:  # a Jupyter widget
        from IPython.display import display

        display(bar)


def _active_client(scheduler: Any) -> Any:
    """The ``distributed.Client`` to run on: ``scheduler`` if it is one, else the current one.

    A Client exists only once ``distributed`` is imported, so a local run does not import it
    (the import costs about 0.15 s). Inside a task on a worker, Dask's own choice (``scheduler``
    None) finds the worker's client.
    """
    if "distributed" not in sys.modules:
        return None
    from distributed import Client, default_client

    if isinstance(scheduler, Client):
        return scheduler
    if scheduler is not None:
        return None
    try:
        return default_client()
    except ValueError:
        return None


def stream_moments(sides: Sequence[da.Array], adapters: Sequence[Adapter] | None = None, *, stride: int = 1,
                   precision: Precision = "float32", split_every: int = SPLIT_EVERY,
                   scheduler: Any = None, progress: bool = False, nan_policy: str | None = "raise",
                   names: Sequence[str] = (), row_norms: bool = False, offset: int = 0) -> Moments:
    """Compute the :class:`Moments` of ``sides`` in one pass over their chunks (default adapters: flatten)."""
    if adapters is None:
        adapters = [Adapter("flatten", spatial_shape(side.shape)) for side in sides]
    graph = moments_graph(sides, adapters, stride=stride, precision=precision, split_every=split_every,
                          nan_policy=nan_policy, names=names, row_norms=row_norms, offset=offset)
    (packed,) = compute(graph, scheduler=scheduler, progress=progress)
    return unpack(packed, [side.shape[-1] for side in sides], precision)
