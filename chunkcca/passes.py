"""The passes over aligned layers: plain, auto-precision pilot, checkpointed groups; the memory budget.

``stream_layers()`` streams any number of aligned, validated layers (one side each) into one
``Moments`` in one pass over their chunks, whichever pass the options ask
for; ``minibatch_pass()`` runs another declared reduction (minibatch CKA) the same way and
``gram_pass()`` the Gram blocks of whole maps. Failures to read a store name the layers and stores at fault.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial, reduce
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.array import PerformanceWarning
from dask.utils import format_bytes

from ._fs import check_folder_replaceable, check_writable
from ._stack import user_stacklevel
from .checkpoint import CheckpointError, holds_row_norms, resume, save_progress
from .engine import (
    DatapointError,
    FeatureStats,
    NoRealPositionError,
    Reduction,
    Stored,
    as_declared,
    checkpoint_boundaries,
    common_boundaries,
    compute,
    connected,
    gram_band_graph,
    grouped,
    held_store_bytes,
    means_reduction,
    minibatch_layers_graph,
    minibatch_reduction,
    minibatch_window,
    moments_reduction,
    pass_bytes,
    reads_ahead,
    run,
    scheduler_threads,
)
from .layers import zarr_reads
from .minibatch import aligned_chunks, aligned_unit, whole_datapoints_size
from .moments import Moments, RowCheck, check_savable_labels, pack, value_eps
from .options import (
    MASK,
    VALUE_ROUNDING_ATTR,
    ProductPrecision,
    StreamOptions,
    check_dask_settings,
    held_and_limit,
)
from .rows import Adapter, by_gram
from .store import check_complete, check_unchanged, read_failure
from .tiles import TiledMoments, Tiling, fold_tiled, merge_tiled

#: precision="auto" keeps float32 products while every side's correlation matrix in the pilot has a
#: condition number at most this: float32 products were measured to move correlations by up to ~1e-6 at
#: condition numbers near 1e3 and by 1e-5 to 7e-5 near 1e4; a correlation resting on the weakest direction can
#: move by more just under it (1.3e-5 at 985: docs/concepts.md).
AUTO_CONDITION = 1e3
#: The pilot (the first datapoints) of precision="auto" holds at least this many rows per channel of the widest
#: layer (``_pilot_end``). Fewer make a correlation matrix ill-conditioned by sampling alone: at 4 rows per channel,
#: white noise has a condition number near 9, ((1 + 1/2) / (1 − 1/2))² (Marchenko–Pastur); at 1 or fewer, the
#: matrix is singular. A run with too few rows for it takes float64 throughout, without a pilot.
PILOT_ROWS_PER_CHANNEL = 4
#: After a float32 pass, precision="auto" judges a groupby group's conditioning when it holds at least this many
#: rows per channel of the widest layer: white noise at 2 rows per channel has a condition number near 34,
#: ((1 + 1/√2) / (1 − 1/√2))², far below ``AUTO_CONDITION``, so what it finds above is the data's, not sampling's
#: (nearer one row per channel sampling alone passes 1e3).
GROUP_ROWS_PER_CHANNEL = 2


@dataclass(frozen=True)
class Streamed:
    """Aligned layers, their adapters, their Moments, and what the streaming decided.

    ``moments.precision`` is the precision every product was actually computed in (the coarser of
    the passes' for ``precision="auto"``); ``precision_note`` says how "auto" chose.
    """

    layers: tuple[xr.DataArray, ...]
    adapters: tuple[Adapter, ...]
    moments: Moments | TiledMoments
    rows_omitted: int
    rows_given: int  # the rows the stride keeps, before padding and omitted rows are left out
    precision_note: str | None = None
    groups: tuple[Moments | TiledMoments, ...] | None = None


#: Packages whose frames in a traceback mark an error as one of reading a store.
READERS = ("zarr", "numcodecs", "fsspec", "s3fs", "gcsfs", "xarray.backends", "google_crc32c")


def _raised_while_reading(error: BaseException) -> bool:
    """Whether ``error`` was raised by the code that reads stores (zarr, its codecs, fsspec), here or on a
    worker (distributed re-raises a worker's error with its traceback)."""
    traceback = error.__traceback__
    while traceback is not None:
        module = traceback.tb_frame.f_globals.get("__name__", "")
        if module.split(".")[0] in READERS or module.startswith(READERS):
            return True
        traceback = traceback.tb_next
    return False


def _read_at_fault(error: BaseException) -> str | None:
    """Which array and datapoints a failed read was of, from the zarr array and selection in the frames of
    ``error``'s traceback (``"array 'model1/conv2/activations', datapoints 250 to 299"``); None where they are
    not there (another reader, a worker's error whose frames were not kept)."""
    import zarr

    traceback, found = error.__traceback__, None
    while traceback is not None:
        frame = traceback.tb_frame.f_locals
        array, selection = frame.get("self"), frame.get("selection")
        if isinstance(array, zarr.Array) and isinstance(selection, tuple) and selection:
            found = array, selection[0]
        traceback = traceback.tb_next
    if found is None:
        return None
    array, rows = found
    where = f"array {array.path!r}"
    if isinstance(rows, slice) and rows.step in (None, 1):
        start, stop, _ = rows.indices(array.shape[0])
        where += f", datapoints {start} to {stop - 1}"
    return where


@contextmanager
def reading(layers: Sequence[xr.DataArray]) -> Iterator[None]:
    """Re-raise a failure to read store-backed layers (a corrupt chunk, a vanished file) naming the layers
    and their stores, and an error at a datapoint (NaN/Inf, no real position) naming it by its label among the
    aligned ``layers``' datapoints; any other error (a checkpoint, a lost scheduler, a solve) passes through as it
    is, naming its own cause."""
    try:
        yield
    except DatapointError as error:  # named by its label: a position in the first layer's order finds it in no other
        at_fault = next((layer for layer in layers if str(layer.name) == error.layer), None)
        labels = None if at_fault is None else at_fault.indexes.get("datapoint")  # in the pass's order, as aligned
        raise error.labelled(labels).with_traceback(error.__traceback__) from None
    except CheckpointError:
        raise
    except Exception as error:
        sources = sorted({str(layer.encoding["store"]) for layer in layers if "store" in layer.encoding})
        if not sources or not _raised_while_reading(error):
            raise
        names = ", ".join(repr(str(layer.name)) for layer in layers)
        at_fault = _read_at_fault(error)  # the layers' one array, and its chunk, whose read failed
        raise OSError(f"reading layers {names} from {', '.join(sources)} failed"
                      f"{' (' + at_fault + ')' if at_fault else ''}: {read_failure(error)}") from error


@contextmanager
def _pass(layers: Sequence[xr.DataArray], options: StreamOptions) -> Iterator[Any]:
    """Around a pass over ``layers``: before it, a warning for chunks too small to stream well and the check that
    every chunk file is there and in its place; during it, the scheduler of ``options`` (yielded; an address is one
    connection) and read failures named by layer; after it, the check that no file changed meanwhile."""
    check_dask_settings(options.scheduler)
    _warn_small_chunks(layers)
    check_complete(layers)
    with connected(options.scheduler, timeout=options.connect_timeout) as scheduler, reading(layers):
        yield scheduler
    check_unchanged(layers)


#: What a pass says that is neither progress nor a warning (a run resumed from its checkpoint), at INFO level.
NOTICES = logging.getLogger("chunkcca")


#: The most chains a pass is planned for (more threads than this fold in this many chains).
MOST_CHAINS = 64


def fit_chains(reduction: Reduction, sides: Sequence[da.Array], adapters: Sequence[Adapter], options: StreamOptions,
               names: Sequence[str], stored: Sequence[Stored]) -> int:
    """The chains (each an accumulator and its chunk in work) that ``options.memory_limit`` affords, at
    least 1, or a clear error before anything is read (``engine.pass_bytes()`` says what a pass holds, ``stored``
    where the sides' chunks come from)."""
    limit = int(options.memory_limit)
    one = pass_bytes(sides, adapters, reduction, 1, stored=stored)
    if one > limit:
        partial = reduction.partial_bytes
        frequencies = reduction.shape[1 if reduction.groups else 0 : -2]
        what = "complex " if np.dtype(reduction.dtype).kind == "c" else ""
        whole = reduction.product == reduction.width**2
        statistics = (f"{reduction.width}^2 {what}statistics" if whole
                      else f"the statistics kept of {reduction.width} channels")
        per = f" at each of {int(np.prod(frequencies))} spatial frequencies" if frequencies and whole else ""
        per += f" for each of {reduction.groups} groups" if reduction.groups else ""
        # statistics per frequency (dft); other modes' do not shrink with other rows
        fewer_rows = (", or use spatial='avgpool' or 'interp' (--spatial: one set of statistics, not one per "
                      "frequency)" if frequencies else "")
        held, most = held_and_limit(one, limit)
        raise ValueError(
            f"comparing {' and '.join(map(repr, names))}: {statistics}{per} = {format_bytes(partial)} per partial; "
            f"reading one chunk at a time holds {reduction.partials_held} of them with the chunks and rows in work "
            f"({held}), over memory_limit={most}; raise memory_limit (--memory-limit), "
            f"compare fewer channels, read smaller chunks{fewer_rows}")
    return affordable_chains(reduction, sides, adapters, limit, stored)


def affordable_chains(reduction: Reduction, sides: Sequence[da.Array], adapters: Sequence[Adapter],
                      limit: int, stored: Sequence[Stored]) -> int:
    """The most chains (up to ``MOST_CHAINS``) whose pass holds at most ``limit`` bytes; 1 if even one is over.
    ``stored`` as for ``pass_bytes()``."""
    chains = 1
    while chains < MOST_CHAINS and pass_bytes(sides, adapters, reduction, chains + 1, stored=stored) <= limit:
        chains += 1
    return chains


#: A pass reads ahead only where one chain holds at most this share of memory_limit: heavier passes (dft, sweeps)
#: spend their time in products, and there each thread more keeps its own malloc arena of fold temporaries
#: (dft of 2000 x 16x16x64 per side: peak 816 MiB reading two chunks ahead against 532 MiB without).
READ_AHEAD_SHARE = 1 / 16


def _ahead(reduction: Reduction, sides: Sequence[da.Array], adapters: Sequence[Adapter], options: StreamOptions,
           chains: int, scheduler: Any, stored: Sequence[Stored]) -> int:
    """Chunks each of ``chains`` chains reads ahead of the one it folds: as many as the scheduler takes
    (``engine.reads_ahead()``) and ``options.memory_limit`` affords, for a pass whose chain costs little."""
    if pass_bytes(sides, adapters, reduction, 1, stored=stored) > options.memory_limit * READ_AHEAD_SHARE:
        return 0
    return next((ahead for ahead in range(reads_ahead(scheduler), 0, -1)
                 if pass_bytes(sides, adapters, reduction, chains, ahead, stored) <= options.memory_limit), 0)


#: What a read of a chunk from a store allocates beside the array it returns, in that chunk's bytes: its stored
#: bytes and the decoded copy zarr makes before copying it out (traced: an 8 MiB LZ4 chunk's read, 22.9 MiB).
READ_BUFFERS = 2


#: ``stored_of`` by Dask array name (a token of its graph and chunks) and dims: plans call it in loops, and a graph
#: without ``original-`` sources is walked task by task.
_STORED: dict[tuple[str, tuple[str, ...]], Stored] = {}


def stored_of(layer: xr.DataArray) -> Stored:
    """Where the chunks of ``layer`` come from: the zarr arrays its graph reads (``layers.zarr_arrays``: opened by
    chunkcca or xarray, kept through selections and casts), or memory. A task reads the store chunks (shards, in
    a sharded store) its chunk lies in at once, up to zarr's ``async.concurrency`` together, each beside its
    ``READ_BUFFERS``; of several arrays (layers concatenated), the costliest read counts. Where the graph does not
    say in which chunks the array is read (an optimized graph), as many as zarr reads at once."""
    key = (str(layer.data.name), tuple(str(dim) for dim in layer.dims))
    if key not in _STORED:
        if len(_STORED) >= 256:
            _STORED.clear()
        _STORED[key] = _stored(layer)
    return _STORED[key]


def _stored(layer: xr.DataArray) -> Stored:
    import zarr

    concurrency = max(1, int(zarr.config.get("async.concurrency") or 1))
    read = 0
    for array, chunks in zarr_reads(layer.data):
        unit = tuple(array.shards or array.chunks)
        touched = concurrency if chunks is None else _units_under(chunks, unit)  # unknown: as many as zarr reads
        read = max(read, READ_BUFFERS * int(np.prod(unit)) * array.dtype.itemsize * min(touched, concurrency))
    return Stored(layer.data.chunks, read)


def _units_under(chunks: tuple[tuple[int, ...], ...], unit: tuple[int, ...]) -> int:
    """The most store chunks of ``unit`` shape one of Dask ``chunks`` (along the array's axes, from its first
    element) lies in."""
    touched = 1
    for axis, step in zip(chunks, unit):
        ends = np.cumsum(axis)
        touched *= int(((ends - 1) // step - (ends - np.asarray(axis)) // step + 1).max())
    return touched


def _tiled_fold(accumulated: np.ndarray | None, rows: list[np.ndarray], first_datapoint: int, check: RowCheck, *,
                tiling: Tiling, precision: ProductPrecision) -> np.ndarray:
    into = np.zeros((1, tiling.size)) if accumulated is None else accumulated
    return fold_tiled(into, rows, tiling, precision, check=check)


def tiled_reduction(tiling: Tiling, *, precision: ProductPrecision) -> Reduction:
    """The ``TiledMoments`` of real rows of sides of ``tiling.sizes`` channels: only the blocks of the scatter
    that the pairs ``tiling.pairs`` read, each chunk's products added straight into them."""
    largest = max(size * width for size, width in zip(tiling.sizes, tiling.widths))
    return Reduction(
        name="tiled-moments", fold=partial(_tiled_fold, tiling=tiling, precision=precision),
        merge=partial(merge_tiled, tiling=tiling), finalize=partial(TiledMoments.unpack, tiling=tiling,
                                                                    precision=precision),
        shape=(tiling.size,), dtype=np.float64, partials_held=1, width=tiling.channels, product=largest)


def stream_layers(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], options: StreamOptions, *,
                  row_norms: bool = False, codes: da.Array | None = None, group_sizes: Sequence[int] = (),
                  pairs: Sequence[tuple[int, int]] | None = None, whitens: bool = True) -> Streamed:
    """Stream aligned, validated layers (one side each) into one Moments, in one pass over their chunks.

    Checks the memory budget first. With ``options.checkpoint`` the running Moments are saved there
    every ``options.checkpoint_every`` chunks and a run of the same layers and options resumes from
    them (``chunkcca.checkpoint``). ``precision="auto"`` computes float64 Moments of the first
    datapoints (the pilot, ``_pilot_end``), keeps float32 products for the rest unless a side's correlation
    matrix there has a condition number above ``AUTO_CONDITION``, and merges the two. A ValueError if no finite row
    is left. With ``codes`` (each datapoint's group, 0 … len(``group_sizes``) − 1, which hold that many datapoints
    each; or (datapoint, 2) with each datapoint's index among its group's, which the stride then takes each group
    apart: ``engine._fold_task``) the Moments of each group are kept apart in the same pass (``Streamed.groups``;
    ``Streamed.moments`` is their merge), and the memory budget is checked for all of them. With ``pairs`` (of
    indices into ``layers``), only the blocks of the scatter those pairs read are kept (``TiledMoments``, whose
    ``select()`` gives a pair's Moments), unless row-norm sums, complex rows or a checkpoint ask for whole Moments.
    ``whitens``: some measure to be taken inverts a covariance (``measures.Measure.whitens``), so float32
    products are checked against the whole run's conditioning (and each ``groupby`` group's): "auto" reads again
    in float64, explicit float32 warns.
    """
    names = tuple(str(layer.name) for layer in layers)
    widths = [layer.sizes["channel"] for layer in layers]
    row_norms = row_norms or (options.checkpoint is not None and holds_row_norms(options.checkpoint))
    complex_rows = (any(adapter.is_complex for adapter in adapters)  # dft's rows
                    or any(np.iscomplexobj(layer.data) for layer in layers))  # compat's complex activations
    tiling = None
    if pairs is not None and not row_norms and options.checkpoint is None and not complex_rows:
        tiling = Tiling.of(widths, pairs)

    def reduction_of(product: ProductPrecision) -> Reduction:
        reduction = (moments_reduction(adapters, widths, precision=product, row_norms=row_norms,
                                       complex_rows=complex_rows) if tiling is None
                     else tiled_reduction(tiling, precision=product))
        return grouped(reduction, len(group_sizes)) if codes is not None else reduction

    data = [layer.data for layer in layers]
    budget = reduction_of("float64")  # what the budget is checked for: the widest products
    stored = [stored_of(layer) for layer in layers]
    chains = fit_chains(budget, data, adapters, options, names, stored)
    masks = _masks(layers)
    datapoints = layers[0].sizes["datapoint"]
    reading_what = f"reading {', '.join(map(repr, names))}"
    with _pass(layers, options) as scheduler:
        chains = min(chains, scheduler_threads(scheduler))
        ahead = _ahead(budget, data, adapters, options, chains, scheduler, stored)
        _check_masks(masks, adapters, names, scheduler, data, pairs,
                     codes[:, 1] if codes is not None and codes.ndim == 2 else None)

        def moments_of(start: int, stop: int, product: ProductPrecision, step: str = "",
                       after: list[Parts] | None = None) -> Parts:
            """The Parts of datapoints ``start`` to ``stop``; ``after``: [an earlier pass's Parts], which the first
            chain folds into, taken out of the list as they are packed so that they are not held beside it."""
            label = f"{reading_what}{step} ({product} products)" if options.progress else None
            begin = _packed(after, codes is not None) if after else None
            result = run([d[start:stop] for d in data], adapters, reduction_of(product), chains=chains, ahead=ahead,
                         scheduler=scheduler, progress=label, nan_policy=options.nan_policy, names=names,
                         offset=start, codes=None if codes is None else codes[start:stop],
                         masks=[None if mask is None else mask[start:stop] for mask in masks],
                         start=begin)
            return tuple(result) if codes is not None else (result,)

        parts, note = _one_pass(layers, adapters, options, row_norms, moments_of, whitens)
    stats = _merged(parts)
    if stats.n == 0:  # the rows each side's padding leaves do not meet (or the stride keeps none of them)
        why = " or as ".join([*(["padding (no row the stride keeps is real in every layer)"] if any(
            mask is not None for mask in masks) else []), *(["holding NaN or Inf"] if options.nan_policy == "omit"
                                                             else [])])
        raise ValueError(f"every row of layers {', '.join(map(repr, names))} was left out"
                         f"{f' as {why}' if why else ''}; nothing is left")
    wanted, why = (_whole_run_precision(parts, names, datapoints, options) if whitens
                   and options.precision == "float32" else ("", ""))
    if wanted == "float64":
        warnings.warn(f"precision='float32' on ill-conditioned or rank-deficient layers ({why}): float32 "
                      f"products cannot tell directions weaker than about 4e-6 of the strongest from rounding, so "
                      f"they are dropped, and move correlations by 1e-3 and more near there; precision='float64' "
                      f"keeps them (as does 'auto', the measures' and the command's default)", RuntimeWarning,
                      stacklevel=user_stacklevel())
    given = (sum(map(adapters[0].row_count, group_sizes)) if codes is not None and codes.ndim == 2
             else adapters[0].row_count(datapoints))
    # rows left out: none but padding under nan_policy="raise"; under "omit", non-finite rows and padding alike
    omitted = given - stats.n if options.nan_policy == "omit" else 0
    rounded = partial(replace, value_rounding=tuple(map(layer_rounding, layers)))
    return Streamed(tuple(layers), tuple(adapters), rounded(stats), omitted, given, note,
                    tuple(map(rounded, parts)) if codes is not None else None)


def layer_rounding(layer: xr.DataArray) -> float:
    """The relative rounding of a layer's values (``Moments.value_rounding``): its dtype's (``value_eps``), or
    coarser where its activations say so (``VALUE_ROUNDING_ATTR``: a bfloat16 model's outputs stored as float32).
    float64 values are taken as exact, as said (``.astype("float64")``), whatever the attribute."""
    own, told = value_eps(layer.dtype), layer.attrs.get(VALUE_ROUNDING_ATTR)
    return max(own, float(told)) if own and told is not None else own


def pair_provenance(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter]) -> dict[str, Any]:
    """What a pair's Moments record of where they come from (``Moments`` fields): the layers' names (as results'
    ``layer_a`` and ``layer_b``), how the rows were made (``rows_from``: the adapter's attrs and the sides whose
    padding masks select rows, e.g. ``"spatial='flatten', stride=2, mask='a'"``), the channel labels, the
    values' rounding, and the frequencies of dft's batch dims and the positions each side's spectra sum over."""
    made = dict(adapters[0].attrs)
    masked = ",".join(side for side, layer in zip("ab", layers) if MASK in layer.coords)
    if masked:
        made["mask"] = masked
    return {"layers": tuple(str(layer.name) for layer in layers),
            "rows_from": ", ".join(f"{key}={value!r}" for key, value in made.items()),
            "channel_labels": tuple(layer["channel"].values for layer in layers),
            "value_rounding": tuple(map(layer_rounding, layers)),
            "batch_labels": adapters[0].batch_coords,
            "positions": tuple(adapter.spectrum_positions for adapter in adapters)}


def _check_masks(masks: Sequence[da.Array | None], adapters: Sequence[Adapter], names: Sequence[str],
                 scheduler: Any, data: Sequence[da.Array], pairs: Sequence[tuple[int, int]] | None = None,
                 strided_at: da.Array | None = None) -> None:
    """Before the pass, from the padding masks alone (a small pass over them): a datapoint with no real position
    in a layer, unless the stride skips it (at its index, or at ``strided_at``, its index among its group's for
    ``groupby``), is an error naming it (found when the pass reached its chunk), and a
    flatten sweep whose rows (the positions real in every layer) are fewer than some pair of its ``pairs``
    compared alone keeps is warned of. Masks computed from the activations (``(layer != 0).any("channel")``) are
    left to the pass, which finds the first and reads the activations once (and so gives no such warning)."""
    if all(mask is None for mask in masks):
        return
    read = {name for array in data for name in array.__dask_graph__().layers}
    if any(read & set(mask.__dask_graph__().layers) for mask in masks if mask is not None):
        return
    masks = [None if mask is None else mask.map_blocks(_declared_mask, layer=name, dtype=bool)  # as the pass checks
             for mask, name in zip(masks, names)]
    given = [(mask, name) for mask, name in zip(masks, names) if mask is not None]
    unused = [~adapter.strided(da.arange(mask.shape[0], chunks=mask.chunks[0]) if strided_at is None  # skipped by
                               else strided_at.rechunk({0: mask.chunks[0]}))  # the stride: no row to give
              for mask, adapter in zip(masks, adapters) if mask is not None]
    real = [mask.any(axis=tuple(range(1, mask.ndim))) | skipped for (mask, _), skipped in zip(given, unused)]
    checks: list[Any] = [(each.all(), da.argmin(each)) for each in real]
    swept = sorted({(min(i, j), max(i, j)) for i, j in pairs or () if i != j})  # a layer with itself: trivial
    paired = len(masks) > 2 and adapters[0].mask_rule == "pair" and bool(swept)
    if paired:
        together = reduce(da.logical_and, [mask for mask, _ in given])

        def fewer(i: int, j: int) -> Any:  # whether the pair alone keeps more positions (no mask: all of them)
            own = [masks[k] for k in (i, j) if masks[k] is not None]
            return (reduce(da.logical_and, own) != together).any() if own else ~together.all()
        checks.append([fewer(i, j) for i, j in swept])
    found = compute(*checks, threads=scheduler_threads(scheduler), scheduler=scheduler)
    for (every, first), (_, name) in zip(found[: len(given)], given):
        if not every:
            raise NoRealPositionError.of(name, int(first))
    if paired and any(found[-1]):
        losing = [f"{names[i]!r} with {names[j]!r}" for (i, j), differs in zip(swept, found[-1]) if differs]
        warnings.warn(f"a flatten sweep keeps the positions real in every layer: {len(losing)} of its pairs, "
                      f"compared alone, keep more ({', '.join(losing[:3])}{', …' if len(losing) > 3 else ''}), and "
                      f"are measured on those positions here; compare such pairs alone, or sweep layers of one "
                      f"padding", RuntimeWarning, stacklevel=user_stacklevel())


def _declared_mask(block: Any, layer: str, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """A block of ``layer``'s padding mask, if it has the shape and dtype its Dask array declares for it
    (``engine.as_declared``)."""
    assert block_info is not None  # map_blocks gives it
    declared = block_info[None]
    return as_declared(block, tuple(declared["chunk-shape"]), np.dtype(bool), layer,
                       int(declared["array-location"][0][0]), "its padding mask")


def _masks(layers: Sequence[xr.DataArray]) -> list[da.Array | None]:
    """Each layer's padding mask (a Dask array (datapoint, *positions)), or None."""
    return [da.asarray(layer.coords[MASK].data) if MASK in layer.coords else None for layer in layers]


#: The Moments of each group of a pass (one for an ungrouped pass).
Parts = tuple[Moments | TiledMoments, ...]
#: Computes the Parts of the datapoints start … stop − 1 with the given products (and a progress label step).
MomentsOf = Callable[..., Parts]


def _merged(parts: Parts) -> Moments | TiledMoments:
    """The Moments of all groups together (exact: Chan's merge)."""
    return sum(parts[1:], parts[0])


def _packed(after: list[Parts], grouped: bool) -> np.ndarray:
    """The Parts of an earlier pass, taken out of ``after`` (its one item), as the packed partial a reduction folds
    into: (1, *shape), or (1, groups, *shape); each group's Moments let go as it is packed, so that one at most is
    held twice (a copy of each, then their stack, beside them held three times the groups' Moments, over
    ``memory_limit``: found by audit)."""
    parts: list[Moments | TiledMoments | None] = list(after.pop())

    def taken(index: int) -> np.ndarray:
        part, parts[index] = parts[index], None
        return part.packed if isinstance(part, TiledMoments) else pack(part)

    first = taken(0)
    if not grouped:
        return first
    stacked = np.empty((1, len(parts), *first.shape[1:]), dtype=first.dtype)  # pages taken as groups are written
    stacked[0, 0] = first[0]
    del first
    for index in range(1, len(parts)):
        stacked[0, index] = taken(index)[0]
    return stacked


def _one_pass(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], options: StreamOptions, row_norms: bool,
              moments_of: MomentsOf, whitens: bool = True) -> tuple[Parts, str | None]:
    """The pass the options ask for: checkpointed groups, the auto-precision pilot and the rest, or plain."""
    datapoints = layers[0].sizes["datapoint"]
    if options.checkpoint is not None:
        stats = _checkpointed(layers, adapters, options, row_norms, moments_of)
        auto = options.precision == "auto"
        return stats, "auto: float64 products, as a checkpointed run resumes with the products it began with" \
            if auto else None
    if options.precision != "auto":
        return moments_of(0, datapoints, options.precision), None
    first, widest, width = _pilot_end(layers, adapters)
    needed = PILOT_ROWS_PER_CHANNEL * width
    if first is None:
        return moments_of(0, datapoints, "float64"), (
            f"auto: float64 products, as the run's {adapters[0].row_count(datapoints)} rows are fewer than "
            f"{PILOT_ROWS_PER_CHANNEL} per channel of layer {widest!r} ({width} channels), too few to show its "
            f"conditioning")
    pilot = moments_of(0, first, "float64",
                       step="" if first == datapoints else f", pass 1 of 2: the first {first} datapoints")
    merged = _merged(pilot)
    names = tuple(str(layer.name) for layer in layers)
    choice, reason = _choose_precision(merged, names, f"the first {first} datapoints")
    if merged.n < needed:  # padding or omitted rows took some out
        reason += (f"; only {merged.n} of its rows are real (padding and omitted rows are left out), "
                   f"fewer than the {needed} that show layer {widest!r}'s conditioning")
    if first == datapoints:
        return pilot, f"auto: float64 products, as the pilot is the whole run ({choice} for the rest); {reason}"
    # the pilot's statistics are the first chain's accumulator in the rest of the run: not held beside it
    held = [pilot]
    del pilot, merged
    parts = moments_of(first, datapoints, choice, step=", pass 2 of 2: the rest", after=held)
    if choice == "float64" or not whitens:
        return parts, f"auto: {choice} products; {reason}"
    # the pilot may not show the whole run's conditioning (datapoints stored sorted by class), nor a group's
    whole, whole_reason = _whole_run_precision(parts, names, datapoints, options)
    if whole == "float32":
        return parts, f"auto: float32 products; {reason}; {whole_reason}"
    del parts
    return moments_of(0, datapoints, "float64", step=", pass 3: all again, in float64"), (
        f"auto: float64 products, in a third pass over all the datapoints: {reason}, but {whole_reason}")


def _checkpointed(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], options: StreamOptions,
                  row_norms: bool, moments_of: MomentsOf) -> Parts:
    """Stream ``options.checkpoint_every`` datapoint chunks at a time, saving the running Moments after each
    group; a checkpoint of the same run is resumed after the datapoints it covers."""
    boundaries = checkpoint_boundaries([layer.data for layer in layers])  # the largest layer's chunk ends
    precision: ProductPrecision = "float64" if options.precision == "auto" else options.precision
    run_options = {"spatial": adapters[0].kind, "stride": adapters[0].stride, "precision": precision,
                   "nan_policy": options.nan_policy, "row_norms": row_norms}
    provenance = pair_provenance(layers, adapters)  # the checkpoint marked as the run's result will be
    check_savable_labels(provenance["channel_labels"], provenance["layers"])  # before anything is read
    total, done, fingerprint = resume(options.checkpoint, layers, adapters, run_options, boundaries)
    if done != boundaries[-1]:  # a run left to do saves there, replacing the checkpoint it resumes (found only
        check_writable(os.path.dirname(os.path.abspath(options.checkpoint)), f"checkpoint {options.checkpoint}")
        check_folder_replaceable(options.checkpoint)  # at the first save, a group of chunks read in vain)
    if done:  # a resumed or finished run said nothing of it
        said = (f"resuming from the checkpoint {options.checkpoint}: {done} of {boundaries[-1]} datapoints done"
                + (", nothing left to read" if done == boundaries[-1] else ""))
        if options.progress:  # with the progress lines
            print(said, file=sys.stderr)
        else:  # where the program shows chunkcca's log (the command does)
            NOTICES.info(said)
    edges = boundaries[boundaries.index(done) :: options.checkpoint_every]
    if edges[-1] != boundaries[-1]:
        edges.append(boundaries[-1])
    for start, stop in itertools.pairwise(edges):
        (part,) = moments_of(start, stop, precision, step=f", datapoints {start} to {stop - 1} of {edges[-1]}")
        total = part if total is None else total + part
        # loaded by Moments.load, it names its layers and rows
        save_progress(replace(total, **provenance), options.checkpoint, stop, boundaries[-1], fingerprint)
    assert total is not None  # as_activations refuses empty layers, so a fresh run streams at least one chunk
    return (total,)


def minibatch_pass(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], options: StreamOptions) -> np.ndarray:
    """[Σ HSIC(Kₗ, Kₘ) of every pair, row-major (L²), minibatches, rows left over] over consecutive minibatches
    of ``options.minibatch`` rows of aligned layers (see ``chunkcca.minibatch``), in one pass over chunks of whole
    minibatches, near the first layer's chunk and halved while ``options.memory_limit`` cannot hold one task.

    Where that holds less (wide layers of one row per datapoint: avgpool, first, last, features), a task reads
    one layer's chunk and makes its Gram matrices, and one per chunk takes every pair's HSIC
    (``engine.minibatch_layers_graph``), as many such tasks at once as fit (``minibatch_layer_bytes``); else
    (narrow layers, whose Gram matrices of a chunk would outweigh it, or rows of many positions a datapoint)
    a chunk of every layer is folded at a time (``engine.minibatch_reduction``), in as many chains as fit. A
    clear error, before anything is read, if a chunk of one minibatch does not fit."""
    size = options.minibatch
    assert size is not None  # a minibatch CKA's options
    widths = [int(np.prod(layer.shape[1:])) if by_gram(options.spatial) else layer.sizes["channel"]
              for layer in layers]  # a row: a datapoint's whole map, or its channels
    reduction = minibatch_reduction(adapters, size, max(widths))
    names = tuple(str(layer.name) for layer in layers)
    limit, stored = int(options.memory_limit), [stored_of(layer) for layer in layers]

    def holds(chunks: tuple[int, ...], tasks: int, a_layer_at_a_time: bool) -> int:
        if a_layer_at_a_time:
            batches = -(-adapters[0].row_count(max(chunks)) // size)  # at most, in a chunk
            return minibatch_layer_bytes(layers, widths, chunks, size, batches, tasks)
        return pass_bytes([layer.data.rechunk({0: chunks}) for layer in layers], adapters, reduction, tasks,
                          stored=stored)

    chunk, previous = max(layers[0].data.chunks[0]), None
    while True:
        chunks = aligned_chunks(layers[0].sizes["datapoint"], chunk, size=size,
                                rows_per_datapoint=adapters[0].rows_per_datapoint, stride=options.stride)
        # a layer at a time where that holds less (wide layers), else a chunk of every layer at a time
        every_layer = holds(chunks, 1, False)
        one_layer = holds(chunks, 1, True) if adapters[0].rows_per_datapoint == 1 else every_layer
        by_layer, one = one_layer < every_layer, min(one_layer, every_layer)
        if one <= limit:
            break
        if chunks == previous:  # one minibatch a chunk
            what = "one layer's chunk" if by_layer else "a chunk of every layer"
            rows = adapters[0].rows_per_datapoint
            fitting = whole_datapoints_size(size, rows, options.stride)
            unit = aligned_unit(size, rows, options.stride)
            aligned = "" if fitting in (None, size) else (
                f", which end with a datapoint of {rows} rows only every {unit} datapoints; minibatches of {fitting} "
                f"rows would take a chunk of one minibatch's datapoints")
            held, most = held_and_limit(one, limit)
            raise ValueError(f"minibatch CKA of {', '.join(map(repr, names))}: {what} of {max(chunks)} datapoints "
                             f"(whole minibatches of {size} rows{aligned}) read at a time, with the store chunks it "
                             f"lies in, holds {held}, over memory_limit={most}; raise "
                             f"memory_limit (--memory-limit), compare fewer layers, or take smaller minibatches")
        chunk, previous = max(chunks) // 2, chunks
    label = f"reading {', '.join(map(repr, names))} ({reduction.name})" if options.progress else None
    with _pass(layers, options) as scheduler:
        if by_layer:
            tasks = max(t for t in range(1, scheduler_threads(scheduler) + 1) if holds(chunks, t, True) <= limit)
            graph = minibatch_layers_graph([layer.data for layer in layers], _masks(layers), adapters, chunks,
                                           size=size, names=names, tasks=tasks, split_every=options.split_every)
            (result,) = compute(graph, scheduler=scheduler, threads=tasks, progress=label)
        else:
            sides = [layer.data.rechunk({0: chunks}) for layer in layers]
            result = run(sides, adapters, reduction, scheduler=scheduler, progress=label,
                         chains=affordable_chains(reduction, sides, adapters, limit, stored=stored),
                         nan_policy="refuse", names=names, masks=_masks(layers))
    return result


def minibatch_layer_bytes(layers: Sequence[xr.DataArray], widths: Sequence[int], chunks: Sequence[int], size: int,
                          batches: int, tasks: int) -> int:
    """Bytes ``engine.minibatch_layers_graph`` over datapoint ``chunks`` (one row each, ``widths`` wide, at most
    ``batches`` minibatches of ``size`` rows a chunk) holds at most with ``tasks`` tasks at once. Each task:
    the store chunks its layer's chunk lies in, that chunk (cut or joined from them) and its rows, the buffers
    of its read (``Stored.read``), one minibatch in float64, its Gram matrix and product. Between tasks: per
    layer stored in other chunks, the two store chunks that straddle its chunks' ends; the Gram matrices of the
    chunks in work and waiting for their HSIC (``window`` + 1 chunks of every layer's)."""
    largest, gram = max(chunks), size * size * 8
    window = minibatch_window(tasks, len(layers))
    per_task = max(held_store_bytes(layer.data, layer.data.chunks, chunks, largest, 1) + stored_of(layer).read
                   + 2 * largest * int(np.prod(layer.shape[1:])) * layer.dtype.itemsize + size * width * 8
                   for layer, width in zip(layers, widths)) + 2 * gram
    straddling = store_bytes(layers, chunks, 1)
    grams = (window + 1) * len(layers) * batches * gram
    return tasks * per_task + straddling + grams


#: A layer is read in chunks too small to stream well when it has more chunks than this of less than
#: SMALL_CHUNK_BYTES each: 10,000 one-datapoint chunks ran 16x slower than well-sized ones (per-task overhead).
MANY_CHUNKS = 256
SMALL_CHUNK_BYTES = 2**20


def _warn_small_chunks(layers: Sequence[xr.DataArray]) -> None:
    """Warn, naming the layer, when it is read in many small chunks (slow: every chunk is a task)."""
    for layer in layers:
        chunks = layer.data.numblocks[0]
        per_chunk = layer.nbytes / max(chunks, 1)
        if chunks > MANY_CHUNKS and per_chunk < SMALL_CHUNK_BYTES:
            warnings.warn(f"layer {str(layer.name)!r} is read in {chunks} chunks of {format_bytes(per_chunk)}: each "
                          f"chunk is a task, and chunks this small stream many times slower than chunks of 16-64 "
                          f"MiB; write it with chunks='auto' (or rechunk an in-memory array)", PerformanceWarning,
                          stacklevel=user_stacklevel())


#: A side's Gram blocks are made in float32 (precision "auto" or "float32") when its F features' centred values
#: fit float32's products. Overflow: no centred value exceeds the span s of all its values (max − min), so
#: F · s² ≤ FLOAT32_LARGEST_SUM bounds every product and partial sum of its blocks below float32's largest
#: (about 2**128). Underflow: one of its columns spans at least w (``FeatureStats.widest``, a lower bound) and
#: so has a centred value of at least w / 2, which makes the largest Gram entry at least w² / 4; with w ≥
#: FLOAT32_SMALLEST_RANGE that is ≥ 2**-92, and what underflows float32 changes an entry by at most F · 2**-149.
#: Summed over the n² entries of a Gram matrix against its norm (at least that largest entry), CKA moves by at
#: most about n · F · 2**-57: under 1e-6 for n · F up to 1e11 (and rounding that lands so systematically on
#: subnormals is not seen in data). Else float64.
FLOAT32_SMALLEST_RANGE = 2.0**-45
FLOAT32_LARGEST_SUM = 2.0**120
#: What float64 holds: the inner products of Gram matrices sum n² products of entries of at most F · s², so a
#: layer with n · F · s² above FLOAT64_LARGEST_SUM (their square, 2**1000, near float64's largest) would overflow
#: them (CKA 0); one that varies but whose widest column spans w < FLOAT64_SMALLEST_RANGE (its largest entries
#: under w² / 4) would underflow them (a wrong value, or a false "no variance"). Either is refused, naming the
#: layer.
FLOAT64_LARGEST_SUM = 2.0**500
FLOAT64_SMALLEST_RANGE = 2.0**-200


@dataclass(frozen=True)
class GramSums:
    """What the Gram pass gives: tr(K̃ₗ K̃ₘ) for every pair of layers (L, L); the precision of the Gram blocks
    ("float32" if any layer's were); for ``precision="auto"``, how it chose (else None)."""

    sums: np.ndarray
    precision: ProductPrecision
    precision_note: str | None


def gram_pass(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], options: StreamOptions) -> GramSums:
    """tr(K̃ₗ K̃ₘ) for every pair of aligned layers (one side each), K̃ the centred Gram matrix of their rows
    (spatial="features": each datapoint's whole map): one pass for the features' means and ranges, then one per
    band of datapoint chunks (``gram_plan``), each over the pairs of a chunk of the band and a chunk at or after
    it, each layer's blocks in the precision ``gram_precisions`` gives it."""
    names = tuple(str(layer.name) for layer in layers)
    widths = [int(np.prod(layer.shape[1:])) for layer in layers]
    data = [layer.data for layer in layers]
    label = f"reading {', '.join(map(repr, names))}" if options.progress else None
    single = 8 if options.precision == "float64" else 4  # a layer's range may yet ask for float64
    with _pass(layers, options) as scheduler:
        threads, limit = scheduler_threads(scheduler), int(options.memory_limit)
        plan = gram_plan(layers, limit, threads, [single] * len(layers))  # refuses before reading, in the
        # precision asked for (a layer that must stay float64 can make the plan refuse after the means pass)
        stats = run(data, adapters, means_reduction(widths), chains=plan.tasks, scheduler=scheduler,
                    progress=None if label is None else f"{label} (means)", nan_policy="refuse", names=names)
        dtypes, precision, note = gram_precisions(stats, widths, names, options.precision)
        if any(dtype.itemsize != single for dtype in dtypes):  # known only now: the values' ranges ask for it
            wide = ", ".join(repr(name) for name, dtype in zip(names, dtypes) if dtype.itemsize == 8)
            try:
                plan = gram_plan(layers, limit, threads, [dtype.itemsize for dtype in dtypes])
            except ValueError as error:
                raise ValueError(f"the values of {wide}, read by the means pass, need float64 rows (their float32 "
                                 f"products would overflow or underflow), and so: {error}") from None
        bands = range(0, len(plan.chunks), plan.band)
        sums = np.zeros((len(layers), len(layers)))
        for number, start in enumerate(bands, 1):
            step = f"Gram blocks, band {number} of {len(bands)}" if len(bands) > 1 else "Gram blocks"
            graph = gram_band_graph(data, adapters, stats.means, dtypes, plan.chunks,
                                    range(start, min(start + plan.band, len(plan.chunks))),
                                    split_every=options.split_every, threads=plan.tasks, names=names)
            (part,) = compute(graph, scheduler=scheduler, threads=plan.tasks,
                              progress=None if label is None else f"{label} ({step})")
            sums += part
    return GramSums(sums, precision, note)


def gram_precisions(stats: FeatureStats, widths: Sequence[int], names: Sequence[str],
                    precision: str) -> tuple[list[np.dtype], ProductPrecision, str | None]:
    """Each layer's Gram block dtype, the pass's precision and, for ``precision="auto"``, why.

    "float64" makes every block in float64. "float32" and "auto" make a layer's blocks in float32 where the
    ranges of its values (``stats.spans``, ``stats.widest``) fit float32 products for its ``widths`` features
    (``FLOAT32_SMALLEST_RANGE``, ``FLOAT32_LARGEST_SUM``), else in float64: linear CKA inverts nothing, so
    unlike the covariance measures it needs no check of conditioning; float32 blocks (float32 sums of at most
    ``engine.FLOAT32_GEMM_FEATURES`` features, added in float64) keep it within 1e-6. A layer whose values
    float64 products cannot hold either is refused (``FLOAT64_LARGEST_SUM``, ``FLOAT64_SMALLEST_RANGE``).
    """
    for name, span, widest, width in zip(names, stats.spans, stats.widest, widths):
        overflows = span > np.sqrt(FLOAT64_LARGEST_SUM / (width * max(stats.rows, 1)))
        if overflows or 0 < widest < FLOAT64_SMALLEST_RANGE:  # every column constant (0): no variance, said after
            raise ValueError(f"exact CKA of whole maps (spatial='features'): layer {name!r}'s values span {span:.3g} "
                             f"(its widest column at least {widest:.3g}), beyond what float64 Gram products of its "
                             f"{width} features over {stats.rows} rows hold; rescale it")
    if precision == "float64":
        return [np.dtype(np.float64)] * len(widths), "float64", None
    causes = [_not_float32(span, widest, width) for span, widest, width in zip(stats.spans, stats.widest, widths)]
    dtypes = [np.dtype(np.float64 if cause else np.float32) for cause in causes]
    single = any(cause is None for cause in causes)
    if precision != "auto":
        return dtypes, "float32" if single else "float64", None
    wide = ", ".join(f"{name!r} ({cause})" for name, cause in zip(names, causes) if cause)
    if not single:
        note = f"spatial='features': float64 Gram blocks, as float32 products of {wide} would overflow or underflow"
    else:
        note = ("spatial='features': float32 Gram blocks (summed in float64), as linear CKA inverts nothing"
                + (f"; float64 for {wide}, whose float32 products would overflow or underflow" if wide else ""))
    return dtypes, "float32" if single else "float64", note


def _not_float32(span: float, widest: float, width: int) -> str | None:
    """Why float32 products cannot hold a layer of ``width`` features whose values span ``span`` and whose widest
    column spans at least ``widest`` (``FeatureStats``), or None if they can (a constant layer too: its blocks
    are zeros in any precision)."""
    if span > np.sqrt(FLOAT32_LARGEST_SUM / width):
        return f"values spanning {span:.3g}"
    if 0 < span and widest < FLOAT32_SMALLEST_RANGE:
        return f"no column seen spanning more than {widest:.3g}"
    return None


@dataclass(frozen=True)
class GramPlan:
    """How the Gram pass runs: its datapoint chunks, how many of them a band holds, and its tasks at once;
    ``products``: the cost of its Gram products against float64 ones (0.5 for float32 rows throughout)."""

    chunks: tuple[int, ...]
    band: int
    tasks: int
    products: float = 1.0


#: Reading, decoding and centring a chunk of r datapoints of every layer takes about READ_COST_ROWS / r times as
#: long as its Gram products with one chunk of a band: 0.8 at r = 64 on the whole-network benchmark, whose
#: features pass took 102.7 s in bands of 3 chunks and 113.7 s in bands of 2 (docs/performance.md).
READ_COST_ROWS = 50
#: Gram products of pieces of r datapoints take about 1 + GEMM_ROWS / r times as long as those of large ones
#: (float64 (r × F) by (F × 64) here: 27.7 GFLOP/s at r = 64, 29.9 at 640; at r = 1 a dot product, memory-bound).
#: Both constants were measured with float64 products; float32 ones (59–61 GFLOP/s against 29–31) take half the
#: time, which ``GramPlan.products`` weighs.
GEMM_ROWS = 8


def gram_plan(layers: Sequence[xr.DataArray], memory_limit: int, threads: int, itemsizes: Sequence[int]) -> GramPlan:
    """The Gram pass's plan within ``memory_limit`` (``gram_bytes``, each layer's centred rows held in
    ``itemsizes`` bytes a value): for each number of tasks at once up to ``threads``, the largest band that fits
    (``_fitted_band``); of these, the one with the least estimated time, (products · (1 + GEMM_ROWS / chunk) +
    READ_COST_ROWS / (chunk · band)) / tasks (the products, slower for small pieces and half as costly in
    float32, and each chunk read once per band, shared by the tasks), the most tasks on a tie. A clear error,
    before anything is read, if one task does not fit one datapoint a piece."""
    plans = [plan for tasks in range(threads, 0, -1) if (plan := _fitted_band(layers, memory_limit, tasks, itemsizes))]
    if not plans:
        names = " and ".join(repr(str(layer.name)) for layer in layers)
        pieces = cut(layers[0].data.chunks[0], 1)
        fixed, per_chunk = gram_bytes(layers, pieces, 1, itemsizes)
        stores = store_bytes(layers, pieces, 1)
        kinds = " and ".join(sorted({f"float{8 * size}" for size in itemsizes}))
        held, most = held_and_limit(fixed + per_chunk, memory_limit)
        raise ValueError(f"exact CKA of whole maps (spatial='features') of {names}: one datapoint of every layer "
                         f"as centred {kinds} rows, with the store chunks it lies in ({format_bytes(stores)}), "
                         f"holds {held}, over memory_limit={most}; "
                         f"raise memory_limit (--memory-limit), compare fewer layers, store them in smaller "
                         f"chunks, or use minibatch CKA (cka(..., minibatch=m))")
    return min(plans, key=_estimated_time)


def _estimated_time(plan: GramPlan) -> float:
    """The Gram pass's time under ``plan``, relative to its products' alone on one thread in large pieces."""
    rows = max(plan.chunks)
    return (plan.products * (1 + GEMM_ROWS / rows) + READ_COST_ROWS / (rows * plan.band)) / plan.tasks


def _fitted_band(layers: Sequence[xr.DataArray], memory_limit: int, tasks: int,
                 itemsizes: Sequence[int]) -> GramPlan | None:
    """The first layer's chunks, each cut into pieces of at most half, a quarter … of the largest while not even
    one chunk a band fits beside ``tasks`` tasks at work, and as many chunks a band as fit; None if one
    datapoint a piece does not fit."""
    stored = tuple(int(size) for size in layers[0].data.chunks[0])
    features = [int(np.prod(layer.shape[1:])) for layer in layers]
    products = sum(width * item for width, item in zip(features, itemsizes)) / (8 * sum(features))
    size = max(stored)
    while True:
        chunks = stored if size == max(stored) else cut(stored, size)
        fixed, per_chunk = gram_bytes(layers, chunks, tasks, itemsizes)
        if fixed + per_chunk <= memory_limit:
            return GramPlan(chunks, min(len(chunks), int((memory_limit - fixed) // per_chunk)), tasks, products)
        if size == 1:
            return None
        size //= 2


def cut(chunks: Sequence[int], size: int) -> tuple[int, ...]:
    """Each chunk cut into the fewest pieces of nearly equal length at most ``size``."""
    pieces = [(chunk, -(-chunk // size)) for chunk in chunks]
    return tuple(chunk // count + (index < chunk % count) for chunk, count in pieces for index in range(count))


def gram_bytes(layers: Sequence[xr.DataArray], chunks: Sequence[int], tasks: int,
               itemsizes: Sequence[int]) -> tuple[int, int]:
    """Bytes the Gram pass over datapoint ``chunks`` holds at most: (beside the band, per chunk of the band).

    Beside the band: ``tasks`` tasks at work that each hold a chunk of every layer as read (a copy, if cut from
    or joined from store chunks) and the buffers of one read (``Stored.read``), and one layer's centred
    rows at a time (``itemsizes``: bytes a value, per
    layer), and the store chunks they lie in, and the next, of the layers stored in other chunks or chunked
    along other axes (``held_store_bytes``). Per chunk of the band: its centred rows of every layer and, in
    each task, its chunk × chunk Gram blocks of every layer and their float64 stack. Not counted: on a
    cluster, each worker process's own copy of the band.
    """
    largest = max(chunks)
    features = [int(np.prod(layer.shape[1:])) for layer in layers]
    at_work = largest * (sum(width * layer.dtype.itemsize for width, layer in zip(features, layers))
                         + max(width * size for width, size in zip(features, itemsizes)))
    at_work += max(stored_of(layer).read for layer in layers)
    stores = store_bytes(layers, chunks, tasks * largest)
    per_chunk = (largest * sum(width * size for width, size in zip(features, itemsizes))
                 + tasks * 2 * len(layers) * largest * largest * 8)
    return stores + tasks * at_work, per_chunk


def store_bytes(layers: Sequence[xr.DataArray], chunks: Sequence[int], in_work: int) -> int:
    """Bytes of the store chunks of ``layers`` that tasks at work on ``in_work`` datapoints of a pass over
    datapoint ``chunks`` lie in, and the next (``engine.held_store_bytes`` of each)."""
    return sum(held_store_bytes(layer.data, layer.data.chunks, chunks, in_work) for layer in layers)


def _pilot_end(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter]) -> tuple[int | None, str, int]:
    """Where the pilot (the first datapoints) of ``precision="auto"`` ends; the widest layer's name and channels.

    The pilot needs ``PILOT_ROWS_PER_CHANNEL`` rows (before padding and omitted rows are left out) per channel of
    the widest layer. It ends at the first end of a chunk of the first layer that gives them, or at the first
    place after it that gives them where every layer's chunks end together (then no chunk is read twice), if
    that comes before the end of the run and at most the longest chunk of any layer later (what a chunk read
    twice would cost). None if even the whole run has too few rows.
    """
    widths = [layer.sizes["channel"] for layer in layers]
    widest = int(np.argmax(widths))
    rows_needed = PILOT_ROWS_PER_CHANNEL * widths[widest]
    datapoints = layers[0].sizes["datapoint"]
    longest = max(max(layer.data.chunks[0]) for layer in layers)

    def first_enough(ends: Sequence[int]) -> int | None:
        return next((end for end in ends if end > 0 and adapters[0].row_count(end) >= rows_needed), None)

    own = first_enough(np.cumsum(layers[0].data.chunks[0]).tolist())
    common = first_enough(common_boundaries([layer.data for layer in layers]))
    if own is not None and common is not None and common < datapoints and common - own <= longest:
        own = common
    return own, str(layers[widest].name), widths[widest]


def _choose_precision(pilot: Moments | TiledMoments | Sequence[Moments], names: Sequence[str],
                      where: str) -> tuple[ProductPrecision, str]:
    """float32 or float64 products for ``precision="auto"``, from the correlation matrices of Moments (the
    pilot's, the whole run's or a group's: ``where``, e.g. "the first 100 datapoints"; or each side's own, one
    Moments a side), and why."""
    sides = list(pilot) if isinstance(pilot, Sequence) else [pilot.select([side]) for side in range(len(names))]
    worst, worst_name = 0.0, ""
    for own, name in zip(sides, names):
        scatter = own.scatter
        kept = np.diagonal(scatter, axis1=-2, axis2=-1).real > 0
        condition = np.inf if own.n <= int(kept.sum(axis=-1).max()) else _condition(scatter, kept)
        if condition > worst:
            worst, worst_name = condition, name
    choice: ProductPrecision = "float64" if worst > AUTO_CONDITION else "float32"
    return choice, (f"the largest correlation-matrix condition number in {where} "
                    f"is {worst:.3g}, of layer {worst_name!r} (threshold {AUTO_CONDITION:g})")


def _whole_run_precision(parts: Parts, names: Sequence[str], datapoints: int,
                         options: StreamOptions) -> tuple[ProductPrecision, str]:
    """float64 if the correlation matrices of the whole run or of a ``groupby`` group (``parts``) are worse
    conditioned than ``AUTO_CONDITION`` allows, else float32, and why. Valid on float32 products: they move a
    correlation matrix by ~1e-6, far less than the threshold's 1 / 1e3. With folds, what is judged is each
    fold's leave-out, the rest of the run, which the jackknife and the held-out fits solve (three folds of which
    two were ill-conditioned together gave a jackknife error of 0.19 for 0.11 on float32 products). A group or
    leave-out with fewer than ``GROUP_ROWS_PER_CHANNEL`` rows per channel is not judged (sampling alone would make
    it ill-conditioned)."""
    choice, reason = _choose_precision(_merged(parts), names, f"all {datapoints} datapoints")
    if choice == "float64" or len(parts) == 1:
        return choice, reason
    needed = GROUP_ROWS_PER_CHANNEL * max(parts[0].sizes)
    folds = options.folds is not None
    # each side's own statistics: a leave-out merges each layer's block, not a sweep's every pair of them
    own = [[part.select([side]) for side in range(len(names))] for part in parts] if folds else []
    for group, part in enumerate(parts):
        judged = ([_merged([others[side] for index, others in enumerate(own) if index != group])
                   for side in range(len(names))] if folds else part)
        rows = judged[0].n if folds else part.n
        if rows >= needed:
            where = f"the {rows} rows without fold {group}" if folds else f"the {rows} rows of group {group}"
            choice, why = _choose_precision(judged, names, where)
            if choice == "float64":
                return choice, why
    return "float32", reason + f"; and in each {'leave-out' if folds else 'group'}'s with enough rows to tell"


def _condition(scatter: np.ndarray, kept: np.ndarray) -> float:
    """Largest condition number of the correlation matrices of the kept (non-constant) channels."""
    worst = 0.0
    for index in np.ndindex(*scatter.shape[:-2]):
        keep = np.flatnonzero(kept[index])
        if keep.size == 0:  # constant in the pilot: nothing tells float32 is safe
            return np.inf
        block = scatter[index][np.ix_(keep, keep)]
        scale = np.sqrt(np.diagonal(block).real)
        if not (np.isfinite(block).all() and (scale > 0).all()):  # past float64's range: nothing tells float32 is
            return np.inf  # safe (the measure names what is wrong)
        worst = max(worst, float(np.linalg.cond(block / scale[:, None] / scale[None, :])))
    return worst
