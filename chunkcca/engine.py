"""The Dask engine: one reduction over the datapoint chunks of aligned layers, tree-merged, on any scheduler.

A ``Reduction`` is declared as data, in the shape of flox's ``Aggregation``: a ``chunk``
function from one chunk's rows (per side, after each side's ``Adapter``) to a
partial, an associative ``combine`` of stacked partials, and a ``finalize`` from the merged
partial to the result. ``reduction_graph()`` builds the lazy graph for any reduction (one
partial per datapoint chunk, then a tree reduction with ``split_every``) and ``compute()`` runs
graphs on the active or given scheduler with BLAS on one thread. The Moments
(``moments_reduction()``) and minibatch CKA (``minibatch_reduction()``) are two such
reductions. Memory per task is O(chunk + split_every · partial) whatever the number of datapoints.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask
import dask.array as da
import dask.threaded
import numpy as np
from dask.base import tokenize

from .blas import one_thread, pin_blas
from .minibatch import add_partials, minibatch_partial
from .moments import merge_packed, partial_from_rows, unpack
from .options import ProductPrecision, is_address
from .progress import Progress
from .rows import Adapter


class NonFiniteError(ValueError):
    """Activations hold NaN or Inf where ``nan_policy="raise"``."""


@dataclass(frozen=True)
class Reduction:
    """A reduction over rows, declared as data.

    ``chunk(rows, first_datapoint)`` maps one chunk's rows (a list, one (*batch, rows, channel)
    array per side) to a partial of shape (1, *shape); ``combine`` maps k stacked partials
    (k, *shape) to one (1, *shape), associatively; ``finalize`` maps the merged partial to the
    result. ``nonfinite_shows`` says a row holding NaN or Inf always makes the partial non-finite,
    which spares the search of finite chunks for such rows. ``name`` prefixes the graph's layers.
    """

    name: str
    chunk: Callable[[list[np.ndarray], int], np.ndarray]
    combine: Callable[[np.ndarray], np.ndarray]
    finalize: Callable[[np.ndarray], Any]
    shape: tuple[int, ...]
    dtype: Any
    nonfinite_shows: bool = False
    groups: int = 0


def grouped(reduction: Reduction, groups: int) -> Reduction:
    """``reduction`` kept apart for each of ``groups`` groups of datapoints, in the same pass (as flox's grouped
    reductions): partials gain a leading group dim (1, groups, *shape), each group merged on its own; the result
    is a list of the groups' results. Each datapoint's group code (0 … groups − 1) is given to
    ``reduction_graph()``; a row belongs to its datapoint's group."""
    return Reduction(name=f"{reduction.name}-by-group", chunk=reduction.chunk,
                     combine=partial(_combine_groups, combine=reduction.combine),
                     finalize=partial(_finalize_groups, finalize=reduction.finalize),
                     shape=(groups, *reduction.shape), dtype=reduction.dtype,
                     nonfinite_shows=reduction.nonfinite_shows, groups=groups)


def _combine_groups(partials: np.ndarray, *, combine: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """k stacked grouped partials (k, groups, *shape) → (1, groups, *shape), each group merged alone."""
    return np.stack([combine(partials[:, group]) for group in range(partials.shape[1])], axis=1)


def _finalize_groups(merged: np.ndarray, *, finalize: Callable[[np.ndarray], Any]) -> list[Any]:
    return [finalize(merged[:, group]) for group in range(merged.shape[1])]


def _moments_chunk(rows: list[np.ndarray], first_datapoint: int, *, precision: ProductPrecision,
                   row_norms: bool) -> np.ndarray:
    return partial_from_rows(rows, precision, row_norms=row_norms)


def moments_reduction(adapters: Sequence[Adapter], widths: Sequence[int], *, precision: ProductPrecision,
                      row_norms: bool = False) -> Reduction:
    """The ``Moments`` of the rows of sides of ``widths`` channels, concatenated.

    ``row_norms`` adds the row-norm sums (real rows only) that the debiased CKA needs.
    """
    p = sum(widths)
    is_complex = any(adapter.is_complex for adapter in adapters)
    row_norms = row_norms and not is_complex
    return Reduction(
        name="moments",
        chunk=partial(_moments_chunk, precision=precision, row_norms=row_norms),
        combine=partial(merge_packed, sizes=tuple(widths)),
        finalize=partial(unpack, sizes=tuple(widths), precision=precision),
        shape=(*adapters[0].batch_shape, p + 2 + (2 * len(widths) if row_norms else 0), p),
        dtype=np.complex128 if is_complex else np.float64,
        nonfinite_shows=True)


def minibatch_reduction(adapters: Sequence[Adapter], size: int) -> Reduction:
    """Sums of minibatch HSICs over minibatches of ``size`` rows (see ``chunkcca.minibatch``)."""
    return Reduction(
        name="minibatch-cka",
        chunk=partial(minibatch_partial, size=size, rows_before=adapters[0].row_count),
        combine=add_partials, finalize=_only_partial, shape=(5,), dtype=np.float64)


def _only_partial(merged: np.ndarray) -> np.ndarray:
    return merged[0]


def _sums_chunk(rows: list[np.ndarray], first_datapoint: int) -> np.ndarray:
    """[Σ rows of each side …, row count] of one chunk, (1, p + 1)."""
    return np.concatenate([*(side.sum(axis=0, dtype=np.float64) for side in rows), [rows[0].shape[0]]])[None]


def _means(merged: np.ndarray, *, widths: tuple[int, ...]) -> list[np.ndarray]:
    edges = np.cumsum((0, *widths))
    return [merged[0, lo:hi] / merged[0, -1] for lo, hi in itertools.pairwise(edges)]


def means_reduction(widths: Sequence[int]) -> Reduction:
    """Each side's mean row (its column means), for centring the Gram matrices of ``gram_graph``."""
    return Reduction(name="means", chunk=_sums_chunk, combine=add_partials,
                     finalize=partial(_means, widths=tuple(widths)), shape=(sum(widths) + 1,), dtype=np.float64,
                     nonfinite_shows=True)


def _gram_pair(first_i: int, first_j: int, blocks_i: list[np.ndarray], blocks_j: list[np.ndarray], *,
               adapters: Sequence[Adapter], means: Sequence[np.ndarray], weight: float) -> np.ndarray:
    """``weight`` · ⟨K̃ₗ, K̃ₘ⟩ for every pair of sides l, m, with K̃ₗ = X̃ₗ,ᵢ X̃ₗ,ⱼᵀ the centred Gram block of
    datapoint chunks i and j of side l: (L, L). The means pass has refused NaN and Inf already."""
    pin_blas()
    grams = []
    for block_i, block_j, adapter, mean in zip(blocks_i, blocks_j, adapters, means):
        rows_i = adapter.block_rows(block_i, first_i).astype(np.float64) - mean
        rows_j = rows_i if block_j is block_i else adapter.block_rows(block_j, first_j).astype(np.float64) - mean
        grams.append(rows_i @ rows_j.T)
    flat = np.stack([gram.ravel() for gram in grams])
    return weight * (flat @ flat.T)


def gram_graph(sides: Sequence[da.Array], adapters: Sequence[Adapter], means: Sequence[np.ndarray], *,
               split_every: int) -> Any:
    """The lazy (L, L) sums ``Σ ⟨K̃ₗ, K̃ₘ⟩`` over every pair of datapoint chunks (each unordered pair once, the
    off-diagonal ones twice): tr(K̃ₗ K̃ₘ) of the centred n × n Gram matrices K̃ₗ = X̃ₗ X̃ₗᵀ, exactly, whatever the
    features' width. Memory per task O(chunk² · L + chunk · features); chunk i is read once per chunk j."""
    chunks = sides[0].chunks[0]
    sides = [side.rechunk({0: chunks, **{axis: -1 for axis in range(1, side.ndim)}}) for side in sides]
    firsts = np.cumsum((0, *chunks))[:-1]
    task = partial(_gram_pair, adapters=tuple(adapters), means=tuple(means))
    pairs = [dask.delayed(task)(int(firsts[i]), int(firsts[j]), [side.blocks[i] for side in sides],
                                [side.blocks[j] for side in sides], weight=1.0 if i == j else 2.0)
             for i in range(len(chunks)) for j in range(i, len(chunks))]
    while len(pairs) > 1:  # a tree of sums, split_every at a time
        pairs = [dask.delayed(sum)(pairs[k : k + split_every]) for k in range(0, len(pairs), split_every)]
    return pairs[0]


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


def _side_masks(masks: list[np.ndarray | None], adapters: Sequence[Adapter], names: Sequence[str],
                first_datapoint: int) -> list[np.ndarray | None]:
    """The mask each side's adapter applies: its own (avgpool, last), or where every side is real (flatten).
    A datapoint with no real position in a layer is an error naming it."""
    for mask, name in zip(masks, names):
        if mask is not None:
            empty = np.flatnonzero(~mask.reshape(mask.shape[0], -1).any(axis=1))
            if empty.size:
                raise ValueError(f"layer {name!r}: datapoint {first_datapoint + int(empty[0])} has no real position "
                                 f"(its mask is False everywhere); leave such datapoints out")
    given = [mask for mask in masks if mask is not None]
    if not given or all(adapter.mask_rule == "own" for adapter in adapters):
        return masks
    together = np.logical_and.reduce(given)  # flatten: the sides share their positions
    return [together if adapter.mask_rule == "pair" else mask for mask, adapter in zip(masks, adapters)]


def _chunk_task(first: np.ndarray, *blocks: Any, adapters: Sequence[Adapter], reduction: Reduction,
                nan_policy: str, names: Sequence[str], masked: Sequence[bool]) -> np.ndarray:
    """One datapoint chunk of every side → rows per side (finite; under the padding masks of the sides that are
    ``masked``, whose mask blocks follow the sides') → ``reduction.chunk(rows, first_datapoint)``; for a
    grouped reduction the first block is the datapoints' group codes and each group's rows are reduced alone."""
    pin_blas()
    first_datapoint = int(first[0]) if first.size else 0
    blocks = tuple(_only_block(block) for block in blocks)
    codes, blocks = (blocks[0], blocks[1:]) if reduction.groups else (None, blocks)
    given = iter(blocks[len(adapters):])
    blocks = blocks[: len(adapters)]
    masks = _side_masks([next(given) if has else None for has in masked], adapters, names, first_datapoint)
    check = partial(finite_rows, nan_policy=nan_policy, names=names, first_datapoint=first_datapoint,
                    datapoints=blocks[0].shape[0])
    # arithmetic on NaN or Inf rows is expected while they are found and reported (or left out) below
    with np.errstate(invalid="ignore"):
        rows = [adapter.block_rows(block, first_datapoint, mask)
                for block, adapter, mask in zip(blocks, adapters, masks)]
        if codes is None:
            return _reduce_finite(rows, first_datapoint, reduction, check)
        row_codes = codes[adapters[0].block_datapoints(blocks[0].shape[0], first_datapoint, masks[0])]
        return np.stack([_reduce_finite([side[..., row_codes == group, :] for side in rows], first_datapoint,
                                        reduction, check)[0] for group in range(reduction.groups)])[None]


def _reduce_finite(rows: list[np.ndarray], first_datapoint: int, reduction: Reduction,
                   check: Callable[[list[np.ndarray]], list[np.ndarray]]) -> np.ndarray:
    """``reduction.chunk`` of the rows, with rows holding NaN or Inf reported or left out (``check``)."""
    if not reduction.nonfinite_shows:
        return reduction.chunk(check(rows), first_datapoint)
    result = reduction.chunk(rows, first_datapoint)
    if np.isfinite(result).all():
        return result
    finite = check(rows)
    return result if finite is rows else reduction.chunk(finite, first_datapoint)


def _keep(partial_: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return partial_


def _combine(partials: np.ndarray, axis: Any = None, keepdims: bool = True, *,
             merge: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return merge(partials)


def reduction_graph(sides: Sequence[da.Array], adapters: Sequence[Adapter], reduction: Reduction, *,
                    split_every: int, nan_policy: str = "raise", names: Sequence[str] = (),
                    offset: int = 0, codes: da.Array | None = None,
                    masks: Sequence[da.Array | None] = ()) -> da.Array:
    """The lazy merged partial (1, *reduction.shape) of the rows of ``sides``, one partial per datapoint chunk.

    ``sides`` are Dask arrays sharing axis 0 (datapoint), each (datapoint, [height, width,]
    channel), with one adapter each; Dask aligns their datapoint chunks. Rows with NaN or Inf
    raise an error naming the layer (from ``names``) and chunk, or are left out, as ``nan_policy``
    says. ``offset`` is the global index of the first datapoint of ``sides`` (for
    the stride pattern when streaming a slice). Each side's datapoint chunk reaches the chunk
    function as one block, without the copy Dask makes when it joins blocks (sides chunked along
    other dims are rechunked whole along them). The graph's layers are named
    ``chunkcca-<reduction>-chunk`` and ``chunkcca-<reduction>-merge``. A ``grouped()`` reduction takes
    ``codes``: each datapoint's group (datapoint,). ``masks``: per side, its padding mask (datapoint,
    *positions) or None. Nothing is computed here.
    """
    names = tuple(names) or tuple(f"side {i}" for i in range(len(sides)))
    first = da.arange(offset, offset + sides[0].shape[0], chunks=(sides[0].chunks[0],))
    args: list[Any] = [first, ("datapoint",)]
    if reduction.groups:
        if codes is None:
            raise ValueError("a grouped reduction needs the datapoints' group codes")
        args += [codes.rechunk((sides[0].chunks[0],)), ("datapoint",)]
    for i, side in enumerate(sides):
        side = side.rechunk({axis: -1 for axis in range(1, side.ndim)})  # a no-op when already whole
        args += [side, ("datapoint", *tuple(f"side{i}_axis{k}" for k in range(1, side.ndim)))]
    masks = list(masks) or [None] * len(sides)
    for i, (side, mask) in enumerate(zip(sides, masks)):
        if mask is not None:
            mask = mask.rechunk((side.chunks[0], *((-1,) * (mask.ndim - 1))))
            args += [mask, ("datapoint", *tuple(f"side{i}_axis{k}" for k in range(1, mask.ndim)))]
    out_axes = {f"out{i}": size for i, size in enumerate(reduction.shape)}
    meta = np.empty((0,) * (1 + len(reduction.shape)), dtype=reduction.dtype)
    partials = da.blockwise(
        _chunk_task, ("datapoint", *out_axes), *args, new_axes=out_axes, adjust_chunks={"datapoint": 1},
        concatenate=False, dtype=reduction.dtype, meta=meta, token=f"chunkcca-{reduction.name}-chunk",
        adapters=tuple(adapters), reduction=reduction, nan_policy=nan_policy, names=names,
        masked=tuple(mask is not None for mask in masks))
    combine = partial(_combine, merge=reduction.combine)
    return da.reduction(partials, _keep, combine, combine=combine, axis=0, keepdims=True, dtype=reduction.dtype,
                        split_every=split_every, concatenate=True, meta=meta,
                        name=f"chunkcca-{reduction.name}-merge-{tokenize(partials.name, split_every)}")


def compute(*graphs: Any, scheduler: Any = None, progress: str | None = None) -> tuple[Any, ...]:
    """Compute Dask graphs with BLAS pinned to one thread, on the active or given scheduler.

    ``scheduler`` is anything ``dask.compute()`` takes ("threads", "processes",
    "synchronous", a ``distributed.Client``; an address is connected to by ``connected()`` first); by
    default the active one (a
    ``distributed.Client`` if one is current, else the local threaded scheduler). With
    ``progress`` (a label saying what is computed) a progress bar is shown on stderr: a labelled Dask bar
    locally (``chunkcca.progress.Progress``), distributed's after the label on a cluster.
    """
    client = _active_client(scheduler)
    with one_thread():
        if client is not None:
            from .cluster import prepare_workers

            prepare_workers(client)
            futures = client.compute(list(graphs))
            if progress:
                _cluster_progress(futures, client, progress)
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
            with Progress(progress):  # on stderr: stdout stays for results (e.g. the CLI's --json)
                return dask.compute(*graphs, **options)
        return dask.compute(*graphs, **options)


def run(sides: Sequence[da.Array], adapters: Sequence[Adapter], reduction: Reduction, *, split_every: int,
        scheduler: Any = None, progress: str | None = None, nan_policy: str = "raise", names: Sequence[str] = (),
        offset: int = 0, codes: da.Array | None = None, masks: Sequence[da.Array | None] = ()) -> Any:
    """Build, compute and finalize one reduction (see ``reduction_graph()`` and ``compute()``)."""
    graph = reduction_graph(sides, adapters, reduction, split_every=split_every, nan_policy=nan_policy,
                            names=names, offset=offset, codes=codes, masks=masks)
    (merged,) = compute(graph, scheduler=scheduler, progress=progress)
    return reduction.finalize(merged)


@contextlib.contextmanager
def connected(scheduler: Any, *, timeout: float = 10.0) -> Iterator[Any]:
    """A ``distributed.Client`` connected for the block when ``scheduler`` is an address (an OSError naming it
    after ``timeout`` seconds if it does not answer), else ``scheduler``."""
    if not is_address(scheduler):
        yield scheduler
        return
    from distributed import Client

    try:
        client = Client(scheduler, set_as_default=False, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise OSError(f"no Dask scheduler answered at {scheduler} within {timeout:g} s (connect_timeout): "
                      f"{type(error).__name__}: {error}") from error
    with client:
        yield client


def _cluster_progress(futures: list[Any], client: Any, label: str) -> None:
    """distributed's progress bar for ``futures`` of ``client``, which need not be the default client, after
    ``label``.

    In a terminal the bar (on stderr) blocks until the futures finish; in a notebook it is a widget, shown here.
    """
    from distributed import progress as distributed_progress

    print(f"{label} on {client.scheduler.address}", file=sys.stderr)
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


def common_boundaries(sides: Sequence[da.Array]) -> list[int]:
    """Datapoint offsets where every side's chunks start or end (0 and the length included): the places a
    run can be cut into parts without splitting any side's chunk (which would read it twice)."""
    ends = [set(np.cumsum((0, *side.chunks[0])).tolist()) for side in sides]
    return sorted(set.intersection(*ends))
