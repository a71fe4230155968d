"""The Dask engine: one reduction over the datapoint chunks of aligned layers, folded in a few chains, on any scheduler.

A ``Reduction`` is declared as data, in the shape of flox's ``Aggregation``: a ``fold`` of one chunk's rows
(per side, after each side's ``Adapter``) into an accumulated partial, an associative ``merge`` of one partial
into another (both in place where they can), and a ``finalize`` from the merged partial to the result.
``reduction_graph()`` builds the lazy graph for any reduction: the datapoint chunks are dealt in turn to a few
chains (one per thread at most), each chunk read by the task that folds it into its chain's accumulator (or a
few folds before, on the local pool: ``reads_ahead()``), and the chains' accumulators merged at the end.
``compute()`` runs graphs on the active or given scheduler with BLAS on one thread. The Moments
(``moments_reduction()``) and minibatch CKA (``minibatch_reduction()``) are two such reductions. Memory is
O(chains · (accumulator + a few chunks' work)), whatever the number of datapoints.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial
from typing import Any

import dask
import dask.array as da
import dask.threaded
import numpy as np
from dask._task_spec import GraphNode, Task, TaskRef, convert_legacy_graph
from dask.array.core import common_blockdim
from dask.base import named_schedulers, tokenize
from dask.core import flatten, reverse_dict
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from .blas import one_thread, pin_blas
from .minibatch import Hollow, check_boundary, chunk_hsic, minibatch_gram, minibatch_partial, within_mean_rounding
from .moments import (
    MADE_SUBBLOCK_BYTES,
    OUTER_BYTES,
    PRODUCT_BYTES,
    SUBBLOCK_BYTES,
    RowCheck,
    fold_rows,
    merge_into,
    packed_shape,
    partial_from_rows,
    unpack,
)
from .options import CONNECT_TIMEOUT, READ_AHEAD, ProductPrecision, is_address, plain
from .progress import Progress
from .rows import Adapter


class DatapointError(ValueError):
    """An error at one datapoint of a layer, raised in a task, which knows the datapoint's position in the pass's
    order (the first layer's, to which the others are aligned) but not its label. ``message`` holds
    ``{datapoint}``: "datapoint <position>" here, "the datapoint labelled <label>" once ``labelled()`` by the pass
    (``passes.reading``), since a position in the first layer's order does not find the datapoint in another
    layer stored in another order."""

    def __init__(self, message: str, position: int, layer: str, label: str | None = None) -> None:
        self.message, self.position, self.layer, self.label = message, position, layer, label
        where = f"datapoint {position}" if label is None else f"the datapoint labelled {label}"
        super().__init__(message.replace("{datapoint}", where))

    def __reduce__(self) -> tuple[Any, ...]:  # whole when a cluster's worker sends it back
        return type(self), (self.message, self.position, self.layer, self.label)

    def labelled(self, labels: Any) -> DatapointError:
        """The same error naming its datapoint by its label in ``labels`` (the datapoint labels of its ``layer``,
        aligned to the pass's order: a ``pandas.Index``); itself without labels."""
        if labels is None or self.label is not None:
            return self
        value = labels[self.position]  # 'x' and (2, 3), not np.str_('x') and (np.int64(2), np.int64(3))
        value = tuple(map(plain, value)) if isinstance(value, tuple) else plain(value)
        return type(self)(self.message, self.position, self.layer,
                          repr(value) if isinstance(value, str) else str(value))


class NonFiniteError(DatapointError):
    """Activations hold NaN or Inf where ``nan_policy="raise"``."""


def declared(key: Any, array: da.Array, rows: int, name: str, first: int,
             what: str = "its Dask array") -> tuple[Any, ...]:
    """A task (inline in the task that takes it) giving the block at ``key`` of ``array`` (``rows`` datapoints from
    ``first`` on; of layer ``name``'s ``what``: its activations, or its padding mask) if it is a numpy array of the
    shape ``array`` declares for it and of a dtype that casts to ``array``'s within its kind (floats no coarser),
    else raising: a block of another shape (``da.from_delayed`` of a loader's short last batch) was paired with the
    other layers' rows by position, a complex block declared real lost its imaginary part, and a float16 block
    declared float32 was solved at float32's rounding floor."""
    return (as_declared, key, (rows, *array.shape[1:]), array.dtype, name, first, what)


def as_declared(block: Any, shape: tuple[int, ...], dtype: np.dtype, name: str, first: int,
                what: str = "its Dask array") -> np.ndarray:
    """``block`` (of layer ``name``'s ``what``, datapoints ``first`` on) as a numpy array if it is one of ``shape``
    and of a ``dtype`` that casts to ``dtype`` within its kind, floats no coarser than declared (their rounding sets
    the solves' floor), else an error naming them (``declared()``)."""
    where = f"layer {name!r}: the block of {what} for datapoints {first} to {first + shape[0] - 1}"
    if isinstance(block, np.ma.MaskedArray) and not np.ma.is_masked(block):  # nothing masked (a netCDF4 variable)
        block = block.data
    if not isinstance(block, np.ndarray) or isinstance(block, (np.matrix, np.ma.MaskedArray)):
        kind = "a masked array, whose mask would be ignored" if isinstance(block, np.ma.MaskedArray) else (
            f"a {type(block).__module__}.{type(block).__qualname__}")
        raise TypeError(f"{where} is {kind}, where a numpy array is declared: give plain numpy blocks (missing "
                        f"values as NaN, padded positions as a padding mask)")
    if block.shape != shape:
        raise ValueError(f"{where} has shape {block.shape}, where the array declares {shape}: its blocks are not the "
                         f"shapes its chunks say (da.from_delayed given another shape than the block it loads, or "
                         f"map_blocks changing the shape without chunks=); declare each block's true shape")
    if not np.can_cast(block.dtype, dtype, "same_kind"):
        dropped = " (its imaginary part dropped)" if block.dtype.kind == "c" else ""
        raise TypeError(f"{where} has dtype {block.dtype}, where the array declares {dtype}: its values would be cast"
                        f"{dropped}; declare each block's true dtype (map_blocks(..., dtype=), "
                        f"da.from_delayed(..., dtype=))")
    if block.dtype.kind in "fc" and dtype.kind in "fc" and np.finfo(block.dtype).eps > np.finfo(dtype).eps:
        raise TypeError(f"{where} has dtype {block.dtype}, where the array declares {dtype}: its values carry "
                        f"{block.dtype}'s rounding, which would be taken for {dtype}'s (a direction within it counted "
                        f"as real); declare each block's true dtype (map_blocks(..., dtype=), da.from_delayed(..., "
                        f"dtype=)), or cast the blocks themselves (block.astype({str(dtype)!r})) to measure their "
                        f"values as exact")
    return block


class NoRealPositionError(DatapointError):
    """A datapoint's padding mask is False at every position: it has no row to give."""

    @classmethod
    def of(cls, layer: str, position: int) -> NoRealPositionError:
        """The error for the datapoint at ``position`` of ``layer``."""
        return cls(f"layer {layer!r}: {{datapoint}} has no real position (its mask is False everywhere); leave "
                   f"such datapoints out", position, layer)


#: Merges one chunk's rows (a list, one (*batch, rows, channel) array per side) into an accumulated partial
#: (1, *shape) or, given None, makes the first: ``fold(accumulated, rows, first_datapoint, check)``, where
#: ``check`` (see ``finite_rows()``) raises naming the layer or leaves out rows holding NaN or Inf.
Fold = Callable[[np.ndarray | None, list[np.ndarray], int, RowCheck], np.ndarray]


@dataclass(frozen=True)
class Reduction:
    """A reduction over rows, declared as data.

    ``fold`` merges one chunk's rows into its chain's accumulated partial (in place where it can; see ``Fold``);
    ``merge(into, part)`` merges the partial ``part`` into ``into`` (in place where it can) and returns the
    merged partial, associatively; ``finalize`` maps the merged partial to the result. A chain holds
    ``partials_held`` partials at most (its accumulator, and a chunk's partial when it is made apart). For the
    memory budget: the rows are ``width`` channels wide, ``batch`` sets of them (frequencies), a fold makes
    products of at most ``product`` elements at once per batch element and ``made`` bytes of other arrays
    (a minibatch of rows cast to float64). ``name`` prefixes the graph's layers.
    ``chunk_fold()`` makes a fold from a function of one chunk's rows.
    """

    name: str
    fold: Fold
    merge: Callable[[np.ndarray, np.ndarray], np.ndarray]
    finalize: Callable[[np.ndarray], Any]
    shape: tuple[int, ...]
    dtype: Any
    partials_held: int = 2
    width: int = 0
    batch: int = 1
    product: int = 0
    groups: int = 0
    made: int = 0

    @property
    def partial_bytes(self) -> int:
        """Bytes of one partial."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def chunk_fold(chunk: Callable[[list[np.ndarray], int], np.ndarray],
               merge: Callable[[np.ndarray, np.ndarray], np.ndarray], *, nonfinite_shows: bool = False) -> Fold:
    """The fold of a reduction given by ``chunk(rows, first_datapoint)``, one chunk's partial (1, *shape), and
    ``merge``. ``nonfinite_shows`` says a row holding NaN or Inf always makes the partial non-finite, which
    spares the search of finite chunks for such rows."""
    return partial(_fold_chunk, chunk=chunk, merge=merge, nonfinite_shows=nonfinite_shows)


def _fold_chunk(accumulated: np.ndarray | None, rows: list[np.ndarray], first_datapoint: int, check: RowCheck, *,
                chunk: Callable[[list[np.ndarray], int], np.ndarray],
                merge: Callable[[np.ndarray, np.ndarray], np.ndarray], nonfinite_shows: bool) -> np.ndarray:
    if not nonfinite_shows:
        part = chunk(check(rows, 0), first_datapoint)
    else:
        part = chunk(rows, first_datapoint)
        if not np.isfinite(part).all():
            finite = check(rows, 0)
            part = part if finite is rows else chunk(finite, first_datapoint)
    return part if accumulated is None else merge(accumulated, part)


def add_into(into: np.ndarray, part: np.ndarray) -> np.ndarray:
    """The merge of partials that are sums: ``into += part``."""
    into += part
    return into


def grouped(reduction: Reduction, groups: int) -> Reduction:
    """``reduction`` kept apart for each of ``groups`` groups of datapoints, in the same pass (as flox's grouped
    reductions): partials gain a leading group dim (1, groups, *shape), each group merged on its own; the result
    is a list of the groups' results. Each datapoint's group code (0 … groups − 1) is given to
    ``reduction_graph()``; a row belongs to its datapoint's group."""
    return replace(reduction, name=f"{reduction.name}-by-group", merge=partial(_merge_groups, merge=reduction.merge),
                   finalize=partial(_finalize_groups, finalize=reduction.finalize), shape=(groups, *reduction.shape),
                   groups=groups)


def _merge_groups(into: np.ndarray, part: np.ndarray, *,
                  merge: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """A grouped partial (1, groups, *shape) merged into another, each group alone."""
    for group in range(into.shape[1]):
        target = into[:, group]
        _kept_in(target, merge(target, part[:, group]))
    return into


def _kept_in(target: np.ndarray, result: np.ndarray) -> None:
    """``result`` of an in-place-where-it-can merge or fold into ``target`` (a view), kept in ``target``."""
    if result is not target:
        target[...] = result


def _finalize_groups(merged: np.ndarray, *, finalize: Callable[[np.ndarray], Any]) -> list[Any]:
    return [finalize(merged[:, group]) for group in range(merged.shape[1])]


def _moments_fold(accumulated: np.ndarray | None, rows: list[np.ndarray], first_datapoint: int, check: RowCheck,
                  *, precision: ProductPrecision, row_norms: bool, sizes: tuple[int, ...], shape: tuple[int, ...],
                  dtype: Any) -> np.ndarray:
    """Rows folded into the accumulated Moments, their products added straight into its scatter; with row-norm
    sums, a chunk's partial is made apart and merged."""
    if row_norms:
        part = partial_from_rows(rows, precision, row_norms=True, check=check)
        return part if accumulated is None else merge_into(accumulated, part, sizes)
    into = np.zeros((1, *shape), dtype=dtype) if accumulated is None else accumulated
    return fold_rows(into, rows, precision, check=check)


def moments_reduction(adapters: Sequence[Adapter], widths: Sequence[int], *, precision: ProductPrecision,
                      row_norms: bool = False, complex_rows: bool = False) -> Reduction:
    """The ``Moments`` of the rows of sides of ``widths`` channels, concatenated.

    ``row_norms`` adds the row-norm sums (real rows only) that the debiased CKA needs; ``complex_rows``: the rows
    are complex (dft's, or a layer of complex values).
    """
    p = sum(widths)
    row_norms = row_norms and not complex_rows
    shape = packed_shape(adapters[0].batch_shape, p, len(widths) if row_norms else 0)[1:]
    dtype = np.complex128 if complex_rows else np.float64
    return Reduction(
        name="moments",
        fold=partial(_moments_fold, precision=precision, row_norms=row_norms, sizes=tuple(widths), shape=shape,
                     dtype=dtype),
        merge=partial(merge_into, sizes=tuple(widths)),
        finalize=partial(unpack, sizes=tuple(widths), precision=precision),
        shape=shape, dtype=dtype, partials_held=2 if row_norms else 1, width=p,
        batch=int(np.prod(adapters[0].batch_shape, dtype=np.int64)), product=p * p)


def minibatch_reduction(adapters: Sequence[Adapter], size: int, widest: int) -> Reduction:
    """Sums of minibatch HSICs of every pair of the L sides over minibatches of ``size`` rows, then the
    minibatches and the rows left over: (L² + 2,) (see ``chunkcca.minibatch``). ``widest``: the widest side's
    row width, whose minibatch is cast to float64."""
    return Reduction(
        name="minibatch-cka",
        fold=chunk_fold(partial(minibatch_partial, size=size, rows_before=adapters[0].row_count), add_into),
        merge=add_into, finalize=_only_partial, shape=(len(adapters) ** 2 + 2,), dtype=np.float64,
        product=len(adapters) * size * size, made=size * widest * 8)


def _only_partial(merged: np.ndarray) -> np.ndarray:
    return merged[0]


def _sums_chunk(rows: list[np.ndarray], first_datapoint: int) -> np.ndarray:
    """[Σ rows of each side …, row count, then for each side its largest value, −its smallest value and its
    widest column's range in this chunk] of one chunk, (1, p + 1 + 3L); the extremes in float64 (integer
    layers too), −inf for an empty chunk."""
    extremes = []
    for side in rows:
        if side.shape[0] == 0:
            extremes.extend((-np.inf, -np.inf, -np.inf))
            continue
        top, bottom = side.max(axis=0).astype(np.float64), side.min(axis=0).astype(np.float64)
        extremes.extend((top.max(), -bottom.min(), (top - bottom).max()))
    return np.concatenate([*(side.sum(axis=0, dtype=np.float64) for side in rows), [rows[0].shape[0]],
                           extremes])[None]


def _merge_stats(into: np.ndarray, part: np.ndarray, *, widths: tuple[int, ...]) -> np.ndarray:
    """The merge of ``_sums_chunk`` partials: the sums and the count add, the extremes take the larger, and each
    side's widest column range also takes the largest difference of a column's means in the two partials (both
    lie within the column's range). Zeros are no starting partial for these extremes (as ``grouped()``'s
    accumulators start): the first partial is a chunk's."""
    p = sum(widths)
    counts = into[0, p], part[0, p]
    if counts[0] > 0 and counts[1] > 0:
        apart = np.abs(into[0, :p] / counts[0] - part[0, :p] / counts[1])
        edges = np.cumsum((0, *widths))
        widest = into[0, p + 3 : p + 1 + 3 * len(widths) : 3]  # each side's third extreme, a view
        np.maximum(widest, [apart[lo:hi].max() for lo, hi in itertools.pairwise(edges)], out=widest)
    into[..., : p + 1] += part[..., : p + 1]
    np.maximum(into[..., p + 1 :], part[..., p + 1 :], out=into[..., p + 1 :])
    return into


@dataclass(frozen=True)
class FeatureStats:
    """Of each side: its mean row (column means, (featuresₗ,)); ``spans`` (L,), the range of all its values (max −
    min: no centred value is larger); ``widest`` (L,), a lower bound of the largest range of one of its columns
    (the largest within one chunk, or between the column means of two merged partials); and the ``rows``."""

    means: list[np.ndarray]
    spans: np.ndarray
    widest: np.ndarray
    rows: int


def _feature_stats(merged: np.ndarray, *, widths: tuple[int, ...]) -> FeatureStats:
    p = sum(widths)
    edges = np.cumsum((0, *widths))
    means = [merged[0, lo:hi] / merged[0, p] for lo, hi in itertools.pairwise(edges)]
    top, minus_bottom, widest = merged[0, p + 1 :].reshape(len(widths), 3).T
    return FeatureStats(means, top + minus_bottom, widest, int(merged[0, p]))


def means_reduction(widths: Sequence[int]) -> Reduction:
    """Each side's mean row and the ranges of its values (``FeatureStats``), for centring the Gram matrices of
    ``gram_band_graph`` and choosing their precision."""
    merge = partial(_merge_stats, widths=tuple(widths))
    return Reduction(name="means", fold=chunk_fold(_sums_chunk, merge, nonfinite_shows=True), merge=merge,
                     finalize=partial(_feature_stats, widths=tuple(widths)), shape=(sum(widths) + 1 + 3 * len(widths),),
                     dtype=np.float64, width=sum(widths))


def _centred(first: int, blocks: list[np.ndarray], *after: Any, adapters: Sequence[Adapter],
             means: Sequence[np.ndarray], dtypes: Sequence[np.dtype]) -> list[np.ndarray]:
    """The rows of one datapoint chunk of every side less the side's mean, in its Gram precision:
    [(rows, featuresₗ)]. ``after``: what the task waits for (``_in_turn()``), unused."""
    return [_centred_side(first, block, adapter, mean, dtype)
            for block, adapter, mean, dtype in zip(blocks, adapters, means, dtypes)]


def _centred_side(first: int, block: np.ndarray, adapter: Adapter, mean: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One side's rows less its (float64) mean, subtracted in float64 and stored in ``dtype`` (float32 or float64);
    values within the mean's rounding of it are 0 (``within_mean_rounding``)."""
    rows = adapter.block_rows(block, first)
    centred = np.empty(rows.shape, dtype=dtype)  # a new array even when the block is float64
    np.subtract(rows, mean, out=centred, dtype=np.float64, casting="unsafe")  # in float64, a buffer at a time
    return within_mean_rounding(centred, mean)


def _gram_band(band: list[list[np.ndarray]], weights: list[float], first_j: int, blocks_j: list[np.ndarray] | None,
               held_j: list[np.ndarray] | None, *after: Any, adapters: Sequence[Adapter],
               means: Sequence[np.ndarray], dtypes: Sequence[np.dtype]) -> np.ndarray:
    """Σᵢ weightᵢ · ⟨K̃ₗ, K̃ₘ⟩ for every pair of sides l, m, with K̃ₗ = X̃ₗ,ᵢ X̃ₗ,ⱼᵀ the centred Gram block of
    datapoint chunk i of the band (``band``: centred rows per chunk, per side) and chunk j (``held_j``, a chunk
    of the band, or read from ``blocks_j`` and centred here one side at a time): (L, L). Each side's blocks are
    made in its ``dtypes`` (float32 where the ranges of its values keep them finite and clear of underflow, see
    ``passes.gram_precisions``), their inner products in float64. The means pass has refused NaN and Inf."""
    pin_blas()
    grams: list[list[np.ndarray]] = [[] for _ in band]  # per chunk of the band, per side: (rowsᵢ, rowsⱼ)
    for side, (adapter, mean, dtype) in enumerate(zip(adapters, means, dtypes)):
        rows_j = held_j[side] if held_j is not None else _centred_side(first_j, (blocks_j or [])[side], adapter,
                                                                       mean, dtype)
        for gram, rows_i in zip(grams, band):
            gram.append(_gram_block(rows_i[side], rows_j))
        del rows_j  # one layer's centred rows at a time
    sums = np.zeros((len(adapters), len(adapters)))
    for gram, weight in zip(grams, weights):
        flat = np.stack([block.ravel() for block in gram], dtype=np.float64)
        sums += weight * (flat @ flat.T)
    return sums


#: float32 Gram products sum at most this many features in float32 (a GEMM each), and those sums in float64: one
#: float32 GEMM over 262,144 features with a few loud ones was 2e-6 off in CKA, its float32 sums growing.
FLOAT32_GEMM_FEATURES = 16384


def _gram_block(rows_i: np.ndarray, rows_j: np.ndarray) -> np.ndarray:
    """rows_i · rows_jᵀ (rowsᵢ, rowsⱼ): float64 rows in one GEMM; float32 rows in GEMMs over at most
    ``FLOAT32_GEMM_FEATURES`` features each, added in float64 (one GEMM, kept in float32, when they fit)."""
    features = rows_i.shape[1]
    if rows_i.dtype != np.float32 or features <= FLOAT32_GEMM_FEATURES:
        return rows_i @ rows_j.T
    block = np.zeros((rows_i.shape[0], rows_j.shape[0]))
    for start in range(0, features, FLOAT32_GEMM_FEATURES):
        block += rows_i[:, start : start + FLOAT32_GEMM_FEATURES] @ rows_j[:, start : start + FLOAT32_GEMM_FEATURES].T
    return block


def gram_band_graph(sides: Sequence[da.Array], adapters: Sequence[Adapter], means: Sequence[np.ndarray],
                    dtypes: Sequence[np.dtype], chunks: Sequence[int], band: range, *, split_every: int,
                    threads: int, names: Sequence[str]) -> Delayed:
    """The lazy (L, L) sums ``Σ ⟨K̃ₗ, K̃ₘ⟩`` over the pairs of datapoint chunks (i, j) of ``chunks`` (the sides
    are cut to them), i in ``band`` (a range of chunk indices) and j ≥ i, the off-diagonal ones twice: summed
    over the bands that cover all chunks, tr(K̃ₗ K̃ₘ) of the centred n × n Gram matrices K̃ₗ = X̃ₗ X̃ₗᵀ, exactly
    (up to each side's ``dtypes``, float32 or float64), whatever the features' width. The band's chunks are read
    once and held as centred rows; every later chunk is read once, inside the task that multiplies it with the
    whole band. A store chunk that several of these tasks share (a layer stored in other chunks) is read once and
    waits until the task ``threads`` before its first is done (see ``_reads_inside()``)."""
    sides = [_in_chunks(side, chunks) for side in sides]
    block_keys = [list(flatten(side.__dask_keys__())) for side in sides]  # one block per datapoint chunk
    firsts = [int(first) for first in np.cumsum((0, *chunks))[:-1]]
    context = {"adapters": tuple(adapters), "means": tuple(means), "dtypes": tuple(dtypes)}
    token = tokenize([side.name for side in sides], tuple(adapters), [np.asarray(mean) for mean in means],
                     [str(dtype) for dtype in dtypes], band.start, band.stop, split_every, threads)
    held_name, part_name, sum_name = (f"chunkcca-gram-{what}-{token}" for what in ("band", "part", "sum"))
    layer: dict[Any, Any] = {}
    def blocks_of(chunk: int) -> list[Any]:
        return [declared(keys[chunk], side, chunks[chunk], name, firsts[chunk])
                for keys, side, name in zip(block_keys, sides, names)]

    for i in band:
        layer[(held_name, i)] = (partial(_centred, **context), firsts[i], blocks_of(i))
    parts: list[Any] = []
    for j in range(band.start, len(chunks)):
        inside = j - band.start if j < band.stop else None
        within = list(band) if inside is None else list(band)[: inside + 1]
        weights = [2.0] * len(within) if inside is None else [2.0] * inside + [1.0]
        blocks_j = blocks_of(j) if inside is None else None
        layer[(part_name, j)] = (partial(_gram_band, **context), [(held_name, i) for i in within], weights,
                                 firsts[j], blocks_j, None if inside is None else (held_name, j))
        parts.append((part_name, j))
    return _summed_in_turn(layer, [(held_name, i) for i in band] + list(parts), parts, sum_name, sides,
                           width=max(1, threads), split_every=split_every)


def _summed_in_turn(layer: dict[Any, Any], tasks: list[Any], parts: list[Any], sum_name: str,
                    arrays: Sequence[da.Array], *, width: int, split_every: int) -> Delayed:
    """The graph ``layer`` over ``arrays`` as one lazy sum of ``parts`` (a tree, ``split_every`` at a time, to
    the key ``sum_name``), its independent ``tasks`` at most ``width`` at a time (``_in_turn()``), their reads
    inside them (``_reads_inside()``)."""
    kept = [*_in_turn(layer, tasks, width), *parts]  # tokens and parts a task waits for: not its reads
    level = 0
    while len(parts) > split_every:
        starts = range(0, len(parts), split_every)
        layer.update({(sum_name, level, k): (sum, parts[k : k + split_every]) for k in starts})
        parts, level = [(sum_name, level, k) for k in starts], level + 1
    layer[sum_name] = (sum, parts)
    graph = HighLevelGraph.from_collections(sum_name, layer, dependencies=arrays)
    return Delayed(sum_name, _reads_inside(graph, tasks, width, kept=kept))


def _layer_minibatches(first_datapoint: int, block: np.ndarray, mask: np.ndarray | None, *after: Any,
                       adapter: Adapter, size: int, name: str) -> tuple[list[Hollow], int]:
    """One layer's chunk of whole minibatches → the hollowed Gram matrix of each (one minibatch in float64 at a
    time) and its rows; a row holding NaN or Inf (those after the last whole minibatch too) raises, naming the
    layer. ``after``: what the task waits for (``minibatch_layers_graph()``), unused."""
    pin_blas()
    (mask,) = _side_masks([mask], [adapter], [name], first_datapoint)
    with np.errstate(invalid="ignore"):
        rows = adapter.block_rows(block, first_datapoint, mask)
    finite_rows([rows], nan_policy="refuse", names=[name], datapoint_of=lambda row: first_datapoint + int(
        adapter.block_datapoints(block.shape[0], first_datapoint, mask)[row]))
    check_boundary(adapter.row_count(first_datapoint), size, first_datapoint)
    return [minibatch_gram(rows, batch, size) for batch in range(rows.shape[0] // size)], rows.shape[0]


def _minibatch_hsic(layers: list[tuple[list[Hollow], int]], *, size: int) -> np.ndarray:
    """[Σ HSIC(Kₗ, Kₘ) of every pair (L²), minibatches, rows left over] of one chunk from its layers' Gram
    matrices, (L² + 2,)."""
    rows = layers[0][1]
    return chunk_hsic(([grams[batch] for grams, _ in layers] for batch in range(rows // size)), len(layers), rows,
                      size)


def minibatch_window(tasks: int, layers: int) -> int:
    """How many minibatch chunks ``minibatch_layers_graph``'s layer tasks run ahead of the HSICs: those of chunk
    c wait for the HSIC of chunk c − window (``tasks`` tasks at once over ``layers`` layers)."""
    return -(-tasks // layers) + 1


def minibatch_layers_graph(sides: Sequence[da.Array], masks: Sequence[da.Array | None],
                           adapters: Sequence[Adapter], chunks: Sequence[int], *, size: int, names: Sequence[str],
                           tasks: int, split_every: int) -> Delayed:
    """The lazy sums [Σ HSIC(Kₗ, Kₘ) of every pair (L²), minibatches, rows left over] (L² + 2,) over
    minibatches of ``size`` rows, for rows of one per datapoint: one task per layer and datapoint chunk of
    ``chunks`` (whole minibatches) makes that layer's Gram matrices, reading only it, and one per chunk their
    pairs' HSIC, so a task holds one layer's chunk, not every layer's. The layer tasks of chunk c wait for the
    HSIC of chunk c − window (window = ⌈tasks / L⌉ + 1 chunks of Gram matrices held at most); their reads
    are inside them, a store chunk several share gated (``_reads_inside()``)."""
    sides = [_in_chunks(side, chunks) for side in sides]
    masks = [None if mask is None else _in_chunks(mask, chunks) for mask in masks]
    keys = [list(flatten(side.__dask_keys__())) for side in sides]
    mask_keys = [None if mask is None else list(flatten(mask.__dask_keys__())) for mask in masks]
    arrays = [*sides, *(mask for mask in masks if mask is not None)]
    firsts = [int(first) for first in np.cumsum((0, *chunks))[:-1]]
    token = tokenize([array.name for array in arrays], tuple(adapters), tuple(chunks), size, tuple(names), tasks,
                     split_every)
    grams_name, part_name, sum_name = (f"chunkcca-minibatch-{what}-{token}" for what in ("grams", "part", "sum"))
    window = minibatch_window(tasks, len(sides))
    layer: dict[Any, Any] = {}
    layer_tasks: list[Any] = []
    for c, first in enumerate(firsts):
        after = [(part_name, c - window)] if c >= window else []
        for index, (adapter, name) in enumerate(zip(adapters, names)):
            mask = None if mask_keys[index] is None else declared(
                mask_keys[index][c], masks[index], chunks[c], name, first, "its padding mask")
            layer[(grams_name, c, index)] = (partial(_layer_minibatches, adapter=adapter, size=size, name=name),
                                             first, declared(keys[index][c], sides[index], chunks[c], name, first),
                                             mask, *after)
            layer_tasks.append((grams_name, c, index))
        layer[(part_name, c)] = (partial(_minibatch_hsic, size=size),
                                 [(grams_name, c, index) for index in range(len(sides))])
    return _summed_in_turn(layer, layer_tasks, [(part_name, c) for c in range(len(firsts))], sum_name, arrays,
                           width=max(1, tasks), split_every=split_every)


def finite_rows(rows: list[np.ndarray], start: int = 0, *, nan_policy: str, names: Sequence[str],
                datapoint_of: Callable[[int], int]) -> list[np.ndarray]:
    """Check rows of a chunk (from its row ``start`` on) for NaN/Inf: raise naming the layer and the first
    datapoint at fault (``datapoint_of``: a chunk row's datapoint, its position in the pass), or omit those rows
    from every side.

    A row is omitted when any side's row (at any frequency, for dft) holds a non-finite value. ``nan_policy``:
    "raise", "omit", or "refuse" (raise, for passes that cannot leave rows out: minibatches, whole maps).
    """
    finite = [np.isfinite(side).all(axis=tuple(i for i in range(side.ndim) if i != side.ndim - 2)) for side in rows]
    if all(mask.all() for mask in finite):
        return rows
    if nan_policy in ("raise", "refuse"):
        side = next(index for index, mask in enumerate(finite) if not mask.all())
        hint = ("; pass nan_policy='omit' (--nan-policy omit) to leave such rows out" if nan_policy == "raise"
                else "")
        raise NonFiniteError(f"layer {names[side]!r} holds NaN or Inf at {{datapoint}}{hint}",
                             datapoint_of(start + int(np.flatnonzero(~finite[side])[0])), names[side])
    keep = np.logical_and.reduce(finite)
    return [side[..., keep, :] for side in rows]


def _side_masks(masks: list[np.ndarray | None], adapters: Sequence[Adapter], names: Sequence[str],
                first_datapoint: int, datapoints: np.ndarray | None = None,
                strided_at: np.ndarray | None = None) -> list[np.ndarray | None]:
    """The mask each side's adapter applies: its own (avgpool, last), or where every side is real (flatten).
    A datapoint with no real position in a layer is an error naming it (``datapoints``: the block's, as the
    layer numbers them; None: ``first_datapoint`` on), unless the stride skips it (at ``first_datapoint`` on,
    or at ``strided_at``: each datapoint's index among its group's, for groupby)."""
    for mask, name, adapter in zip(masks, names, adapters):
        if mask is not None:
            used = adapter.strided(first_datapoint + np.arange(mask.shape[0]) if strided_at is None else strided_at)
            empty = np.flatnonzero(used & ~mask.reshape(mask.shape[0], -1).any(axis=1))
            if empty.size:
                raise NoRealPositionError.of(name, first_datapoint + int(empty[0]) if datapoints is None
                                             else int(datapoints[empty[0]]))
    given = [mask for mask in masks if mask is not None]
    if not given or all(adapter.mask_rule == "own" for adapter in adapters):
        return masks
    together = np.logical_and.reduce(given)  # flatten: the sides share their positions
    return [together if adapter.mask_rule == "pair" else mask for mask, adapter in zip(masks, adapters)]


def _fold_task(accumulated: np.ndarray | None, first_datapoint: int, *blocks: np.ndarray,
               adapters: Sequence[Adapter], reduction: Reduction, nan_policy: str, names: Sequence[str],
               masked: Sequence[bool]) -> np.ndarray:
    """One datapoint chunk of every side → rows per side (under the padding masks of the sides that are
    ``masked``, whose mask blocks follow the sides') → folded into the chain's accumulator ``accumulated`` (None
    for a chain's first chunk), which is returned. For a grouped reduction the first block is the datapoints'
    group codes and each group's rows are folded into its own accumulator: the rows the stride keeps of the whole
    chunk (codes (datapoint,): folds), or, codes (datapoint, 2) giving each datapoint's index among its group's
    too (groupby), those it keeps of each group's datapoints, as of the group alone: for a row a datapoint
    (avgpool, first, last, dft) the datapoints each group's stride keeps, taken once; else the chunk's rows it
    keeps, by each row's index among its group's rows (``_chunk_rows``)."""
    pin_blas()
    codes, blocks = (blocks[0], blocks[1:]) if reduction.groups else (None, blocks)
    given = iter(blocks[len(adapters):])
    blocks = blocks[: len(adapters)]
    masks = [next(given) if has else None for has in masked]
    rows_of = partial(_chunk_rows, adapters=adapters, names=names, nan_policy=nan_policy)
    # arithmetic on NaN or Inf rows is expected while they are found and reported (or left out)
    with np.errstate(invalid="ignore"):
        if codes is None:
            rows, check_of, _ = rows_of(blocks, masks, first_datapoint)
            return reduction.fold(accumulated, rows, first_datapoint, check_of(None))
        if accumulated is None:  # every group's accumulator at once, each folded into in place
            accumulated = np.zeros((1, *reduction.shape), dtype=reduction.dtype)
        if codes.ndim == 2 and adapters[0].rows_per_datapoint == 1:  # groupby, a row a datapoint: the datapoints
            kept = np.flatnonzero(codes[:, 1] % adapters[0].stride == 0)  # each group's stride keeps, taken once
            if not kept.size:
                return accumulated
            rows, check_of, row_datapoints = _chunk_rows(
                [block[kept] for block in blocks], [None if mask is None else mask[kept] for mask in masks], 0,
                first_datapoint + kept, adapters=[replace(adapter, stride=1) for adapter in adapters], names=names,
                nan_policy=nan_policy)
            codes = codes[kept, 0][row_datapoints()]
        elif codes.ndim == 2:  # groupby, several rows a datapoint: those each group's stride keeps, by their index
            rows, check_of, row_datapoints = rows_of(blocks, masks, first_datapoint, ranks=codes[:, 1])  # in it
            of_rows = row_datapoints()  # -1: a row its group's stride skips, folded into no group
            codes = np.where(of_rows >= 0, codes[of_rows, 0], -1)
        else:  # folds: the chunk's rows, each to its datapoint's fold
            rows, check_of, row_datapoints = rows_of(blocks, masks, first_datapoint)
            codes = codes[row_datapoints()]
        for group in range(reduction.groups):  # each row's group in codes now
            target, chunk_rows = accumulated[:, group], np.flatnonzero(codes == group)
            _kept_in(target, reduction.fold(target, [side[..., chunk_rows, :] for side in rows], first_datapoint,
                                            check_of(chunk_rows)))
        return accumulated


def _chunk_rows(blocks: Sequence[np.ndarray], masks: list[np.ndarray | None], first: int,
                datapoints: np.ndarray | None = None, *, adapters: Sequence[Adapter], names: Sequence[str],
                nan_policy: str, ranks: np.ndarray | None = None
                ) -> tuple[list[np.ndarray], Callable[[np.ndarray | None], RowCheck], Callable[[], np.ndarray]]:
    """The rows of ``blocks`` (one per side) under the padding ``masks``, the stride's pattern taken from ``first``
    (the global index of the first datapoint, or its index among its group's); the check of their finite values
    (``finite_rows``) for the rows ``chunk_rows`` of them (None: all, in order), which names each row's datapoint
    as the layers number them (``datapoints``, the blocks'; None: ``first`` on); and the block-local datapoint
    each row comes from (rows,), made when asked for. With ``ranks`` (each datapoint's index among its group's:
    groupby) the rows are all the chunk's (a view for flatten), and the stride keeps those whose index among
    their group's rows is ≡ 0 (mod stride), as of the group alone, in place of ``first``'s pattern (flatten,
    interp: several rows a datapoint): the others' datapoint is given as −1."""
    masks = _side_masks(masks, adapters, names, first, datapoints, strided_at=ranks)
    if ranks is None:
        rows = [adapter.block_rows(block, first, mask) for block, adapter, mask in zip(blocks, adapters, masks)]
    else:
        rows = [adapter.rows(block, mask if adapter.mask_rule == "own" else None)
                for block, adapter, mask in zip(blocks, adapters, masks)]

    @cache
    def row_datapoints() -> np.ndarray:
        if ranks is None:
            return adapters[0].block_datapoints(blocks[0].shape[0], first, masks[0])
        per = adapters[0].rows_per_datapoint
        kept = ((ranks[:, None] * per + np.arange(per)) % adapters[0].stride == 0).reshape(-1)
        if masks[0] is not None and adapters[0].mask_rule == "pair":  # and real on every side
            kept &= masks[0].reshape(-1)
        return np.where(kept, np.arange(kept.size) // per, -1)

    def check_of(chunk_rows: np.ndarray | None) -> RowCheck:
        def datapoint_of(row: int) -> int:
            index = int(row_datapoints()[row if chunk_rows is None else chunk_rows[row]])
            return first + index if datapoints is None else int(datapoints[index])
        return partial(finite_rows, nan_policy=nan_policy, names=names, datapoint_of=datapoint_of)
    return rows, check_of, row_datapoints


def _merge_chains(accumulators: list[np.ndarray], *, reduction: Reduction) -> np.ndarray:
    """The chains' accumulators merged into the first."""
    merged = accumulators[0]
    for accumulator in accumulators[1:]:
        merged = reduction.merge(merged, accumulator)
    return merged


def aligned(sides: Sequence[da.Array], masks: Sequence[da.Array | None] = (),
            codes: da.Array | None = None) -> tuple[list[da.Array], list[da.Array | None], da.Array | None]:
    """The sides, masks and codes in common datapoint chunks, each whole along its other axes (a no-op for
    arrays already so)."""
    chunks = common_blockdim([side.chunks[0] for side in sides])
    return ([_in_chunks(side, chunks) for side in sides],
            [None if mask is None else _in_chunks(mask, chunks) for mask in masks],
            None if codes is None else _in_chunks(codes, chunks))


def _in_chunks(array: da.Array, chunks: Sequence[int]) -> da.Array:
    """``array`` in datapoint ``chunks``, each whole along its other axes (a no-op for an array already so)."""
    return array.rechunk((tuple(chunks), *((-1,) * (array.ndim - 1))))


def held_store_bytes(array: da.Array, stored: tuple[tuple[int, ...], ...], chunks: Sequence[int], in_work: int,
                     spare: int = 1) -> int:
    """Bytes of the store chunks of ``array`` (``stored``: its chunks along every axis in its store) that tasks
    at work on ``in_work`` datapoints of a pass over datapoint ``chunks`` lie in, and ``spare`` more: each is
    read whole, cut into the pass's pieces or joined into one, and held while the tasks sharing it run. 0 for
    an array stored in the pass's chunks and whole along its other axes (a chunk is then read as it is used)."""
    if tuple(stored[0]) == tuple(chunks) and all(len(axis) == 1 for axis in stored[1:]):
        return 0
    coarse = max(stored[0])
    held = -(-in_work // coarse) + spare
    return min(len(stored[0]), held) * coarse * int(np.prod(array.shape[1:])) * array.dtype.itemsize


@dataclass(frozen=True)
class Stored:
    """Where a side's chunks come from: ``chunks``, its chunks along every axis as it was given (before a pass cuts
    or joins them), and ``read``, the bytes of the buffers one read of such a chunk makes beside it (the stored
    bytes and decoded copies of the store chunks it lies in; 0 for an array in memory, which a read slices)."""

    chunks: tuple[tuple[int, ...], ...]
    read: int = 0


def pass_bytes(sides: Sequence[da.Array], adapters: Sequence[Adapter], reduction: Reduction, chains: int,
               ahead: int = 0, stored: Sequence[Stored] = ()) -> int:
    """Bytes a pass in ``chains`` chains, each reading ``ahead`` chunks ahead, holds at most.

    Each chain holds its ``reduction.partials_held`` partials, the temporaries that fold a chunk into them (one
    sub-block's products in at most float64, the sub-block buffer and its copy, a merge's outer products), the
    largest common chunk of the sides read whole for it (and for a grouped reduction a copy of a group's rows of
    it) and the ``ahead`` read for its next folds (for a side
    chunked more coarsely, the pieces cut from its store chunks), and what the adapters make for one sub-block
    of rows (dft spectra), and the reduction's ``made`` bytes; and the buffers of its reads in flight
    (``Stored.read``): one at a time before the chunk's fold, or ``ahead`` beside it. Shared by the chains: the
    store chunks of sides stored in other chunks than the common ones or chunked along other axes
    (``held_store_bytes()``): those the chains' pieces in work and read ahead lie in, and the next one (two when
    reading ahead, as the chains drift apart). ``stored``: where each side's chunks come from (else its own
    chunks, in memory).
    """
    common = common_blockdim([side.chunks[0] for side in sides])
    largest = max(common)
    shared = chunk = read = 0
    for side, store in zip(sides, stored or [Stored(side.chunks) for side in sides]):
        # pieces are copies, and a grouped fold copies a group's rows apart (or the datapoints groupby's strides
        # keep, for a row a datapoint), one group at a time
        chunk += (1 + ahead + bool(reduction.groups)) * largest * int(np.prod(side.shape[1:])) * side.dtype.itemsize
        # and one more where chains that read ahead drift apart (each gates only its own reads)
        shared += held_store_bytes(side, store.chunks, common, chains * (1 + ahead) * largest, 1 + bool(ahead))
        read = max(read, store.read)  # a task reads one side's chunk
    itemsize = np.dtype(reduction.dtype).itemsize
    row_bytes = reduction.batch * max(reduction.width, 1) * itemsize
    sub_block = MADE_SUBBLOCK_BYTES if any(adapter.made_as_taken for adapter in adapters) else SUBBLOCK_BYTES
    rows_at_once = max(1, min(largest * adapters[0].rows_per_datapoint,
                              max(reduction.width // 2 if reduction.batch == 1 else 1, sub_block // row_bytes)))
    made = sum(adapter.made_bytes(side.shape[-1], largest, rows_at_once) for adapter, side in zip(adapters, sides))
    products = min(reduction.batch * reduction.product, max(PRODUCT_BYTES // itemsize, reduction.product)) * itemsize
    temporaries = products + 2 * rows_at_once * row_bytes + min(OUTER_BYTES, reduction.product * itemsize)
    work = temporaries + made + reduction.made
    # read ahead beside the fold (a pool of chains · ahead threads for the reads), else read before it, then freed
    reading = ahead * read
    return shared + chains * (reduction.partials_held * reduction.partial_bytes + chunk + max(work, read) + reading)


def reduction_graph(sides: Sequence[da.Array], adapters: Sequence[Adapter], reduction: Reduction, *,
                    chains: int, nan_policy: str = "raise", names: Sequence[str] = (),
                    offset: int = 0, codes: da.Array | None = None,
                    masks: Sequence[da.Array | None] = (), start: np.ndarray | None = None,
                    ahead: int = 0) -> Delayed:
    """The lazy merged partial (1, *reduction.shape) of the rows of ``sides``.

    ``sides`` are Dask arrays sharing axis 0 (datapoint), each (datapoint, *positions, channel), with
    one adapter each; they are read in common datapoint chunks (``aligned()``), each side's chunk reaching the
    chunk function as one block. The chunks are dealt in turn to ``chains`` chains: each chunk's partial is
    merged into its chain's accumulator (in place, for Moments) by the task that makes it, and the chains'
    accumulators are merged by one last task, so at most ``chains`` accumulators and ``chains · (1 + ahead)``
    chunks in work are held whatever the number of chunks. Rows with NaN or Inf raise an error naming the
    layer (from ``names``) and the datapoint (``NonFiniteError``), or are left out, as ``nan_policy`` says.
    ``offset`` is the global index of the first datapoint of ``sides`` (for the stride pattern when streaming a
    slice). The graph's layers are named
    ``chunkcca-<reduction>-chunk`` and ``chunkcca-<reduction>-merge``. A ``grouped()`` reduction takes
    ``codes``: each datapoint's group (datapoint,), or (datapoint, 2) with its index among its group's too, whose
    rows the stride then takes as of the group alone (``_fold_task``). ``masks``: per side, its padding mask (datapoint,
    *positions) or None. ``start``: a partial (1, *reduction.shape) the first chain folds into (an earlier
    pass's, so as not to hold it beside this one's), which it then owns. ``ahead``: chunks each chain reads
    ahead of the one it folds (see ``_reads_inside()``). Nothing is computed here.
    """
    names = tuple(names) or tuple(f"side {i}" for i in range(len(sides)))
    if reduction.groups and codes is None:
        raise ValueError("a grouped reduction needs the datapoints' group codes")
    masks = list(masks) or [None] * len(sides)
    sides, masks, codes = aligned(sides, masks, codes)
    inputs = [*([codes] if reduction.groups else []), *sides, *(mask for mask in masks if mask is not None)]
    block_keys = [list(flatten(array.__dask_keys__())) for array in inputs]
    firsts = (offset + np.cumsum((0, *sides[0].chunks[0]))[:-1]).tolist()
    task = partial(_fold_task, adapters=tuple(adapters), reduction=reduction, nan_policy=nan_policy, names=names,
                   masked=tuple(mask is not None for mask in masks))
    token = tokenize([array.name for array in inputs], reduction, tuple(adapters), chains, nan_policy, names, offset,
                     tuple(mask is not None for mask in masks), start, ahead)
    chunk_name, merge_name = f"chunkcca-{reduction.name}-chunk-{token}", f"chunkcca-{reduction.name}-merge-{token}"
    layer: dict[Any, Any] = {}
    chains = max(1, min(chains, len(firsts)))
    last: list[Any] = [None] * chains
    if start is not None:
        last[0] = f"chunkcca-{reduction.name}-start-{token}"
        layer[last[0]] = start
    owners = [*([("codes", "the group codes")] if reduction.groups else []),
              *((name, "its Dask array") for name in names),
              *((name, "its padding mask") for name, mask in zip(names, masks) if mask is not None)]
    for index, first in enumerate(firsts):
        key = (chunk_name, index)
        layer[key] = (task, last[index % chains], first,
                      *(declared(keys[index], array, array.chunks[0][index], name, first, what)
                        for keys, array, (name, what) in zip(block_keys, inputs, owners)))
        last[index % chains] = key
    layer[merge_name] = (partial(_merge_chains, reduction=reduction), last)
    graph = HighLevelGraph.from_collections(merge_name, layer, dependencies=inputs)
    return Delayed(merge_name, _reads_inside(graph, [(chunk_name, index) for index in range(len(firsts))], chains,
                                             ahead))


def _reads_inside(graph: HighLevelGraph, tasks: Sequence[Any], chains: int, ahead: int = 0,
                  kept: Sequence[Any] = ()) -> dict[Any, GraphNode]:
    """The graph with the reads of each of ``tasks`` (the chunks' folds, dealt in turn to ``chains`` chains)
    held back until the chain that folds them is at most ``ahead`` folds from them. Left free, reads are ready
    from the start and a scheduler runs them ahead, holding every chunk read until its chain takes it.

    With ``ahead`` 0 each fold is fused with the tasks that only it uses (the reads of its chunks and what they
    alone need): a chunk is read by the task that folds it, when its chain comes to it. With ``ahead`` n the
    reads stay tasks of their own and a chain's next n chunks are read while it folds: the reads of fold k
    wait for fold k − chains · (1 + n), and a chain's first n reads ahead each for the reads of its chunk
    before (so that they do not compete with the first chunks' reads, and the first folds start soon). A task
    several folds share (a store chunk cut into the common chunks of layers chunked differently) waits likewise
    for the first fold that needs it. Where a read feeds folds far apart, nothing is read ahead (``_kept_ahead``).
    """
    dsk = convert_legacy_graph(dict(graph))
    kept = {*tasks, *kept}  # not reads: neither fused into the tasks nor gated
    ahead = _kept_ahead(dsk, tasks, chains, ahead, kept)
    if not ahead:
        dependents = reverse_dict({key: node.dependencies for key, node in dsk.items()})
        for key in tasks:
            fused, waiting = [dsk[key]], list(dsk[key].dependencies)
            while waiting:
                dependency = waiting.pop()
                if dependency in dsk and dependency not in kept and len(dependents[dependency]) == 1:
                    fused.append(dsk.pop(dependency))
                    waiting.extend(fused[-1].dependencies)
            dsk[key] = GraphNode.fuse(*fused, key=key) if len(fused) > 1 else fused[0]
    first_use = _first_folds(dsk, tasks, kept, range(len(tasks)))  # each task the folds need: its first fold
    depth = chains * (1 + ahead)
    for key, first in first_use.items():
        if first < chains or not isinstance(dsk[key], Task):  # data (a constant) costs nothing to hold
            continue
        if first >= depth:  # the fold ``depth`` before it is done: a token waits for it, not for its accumulator
            before = tasks[first - depth]
            waits = [TaskRef(before)]
            done = _token(before, "done")
        else:  # a chain's first reads ahead wait each for its previous chunk's, so the first folds start soon
            before = tasks[first - chains]
            waits = [TaskRef(read) for read in dsk[before].dependencies if read not in kept and read in dsk]
            done = _token(before, "read")
        if done not in dsk:
            dsk[done] = Task(done, _done, *waits)
        dsk[key] = Task(key, _first, dsk[key], TaskRef(done))  # the read, run inline once the gate is done
    return dsk


def _kept_ahead(dsk: Mapping[Any, GraphNode], tasks: Sequence[Any], chains: int, ahead: int, kept: set[Any]) -> int:
    """``ahead``, or 0 where a read feeds folds far apart (``_fold_spans``: every chunk of a layer reordered by
    label feeds every fold). Such a read is held from its first fold to its last whatever the gates, and reading
    the pieces of later folds ahead held them all at once: 17 GB for a 256 MiB layer in random order, 0.97 GB
    reading nothing ahead."""
    if ahead and any(last - first >= chains * (1 + ahead) for first, last in _fold_spans(dsk, tasks, kept).values()):
        return 0
    return ahead


def _fold_spans(dsk: Mapping[Any, GraphNode], tasks: Sequence[Any], kept: set[Any]) -> dict[Any, tuple[int, int]]:
    """Each task that ``tasks`` (the folds, in order) need and that is not ``kept`` nor data (a store's array
    object, which every read takes): the indices of the first and the last fold that need it."""
    first = _first_folds(dsk, tasks, kept, range(len(tasks)))
    last = _first_folds(dsk, tasks, kept, reversed(range(len(tasks))))
    return {key: (index, last[key]) for key, index in first.items() if isinstance(dsk[key], Task)}


def _first_folds(dsk: Mapping[Any, GraphNode], tasks: Sequence[Any], kept: set[Any],
                 order: Iterable[int]) -> dict[Any, int]:
    """Each node that ``tasks`` (the folds) need and that is not ``kept``: the first fold in ``order`` (indices
    into ``tasks``) that needs it. One walk, visiting each node once."""
    found: dict[Any, int] = {}
    for index in order:
        waiting = [dependency for dependency in dsk[tasks[index]].dependencies if dependency not in kept]
        while waiting:
            dependency = waiting.pop()
            if dependency in dsk and dependency not in found:
                found[dependency] = index
                waiting.extend(d for d in dsk[dependency].dependencies if d not in kept)
    return found


def _token(key: Any, what: str) -> Any:
    """The key of a gate token for task ``key``: ``(f"{name}-{what}", *index)`` for a (name, *index) key, else
    ``f"{key}-{what}"``."""
    if isinstance(key, tuple) and key:
        return (f"{key[0]}-{what}", *key[1:])
    return f"{key}-{what}"


def _done(*done: Any) -> None:
    return None


def _in_turn(layer: dict[Any, Any], tasks: Sequence[Any], width: int) -> list[Any]:
    """Make each of ``tasks`` (task tuples in ``layer`` whose functions take a trailing ``*after``) wait for the
    one ``width`` before it to be done (a token, not its result), so that at most ``width`` run at once
    whatever the size of the pool: chained folds are so by their accumulators, independent tasks are not.
    Returns the tokens' keys (to be kept apart from the tasks, so that no result is held for them)."""
    turns = []
    for index in range(width, len(tasks)):
        turns.append(turn := _token(tasks[index - width], "turn"))
        layer[turn] = (_done, tasks[index - width])
        layer[tasks[index]] = (*layer[tasks[index]], turn)
    return turns


def _first(value: Any, gate: None) -> Any:
    return value


def _local_pool(scheduler: Any) -> bool:
    """Whether the work runs on Dask's local threaded scheduler (no Client, no other scheduler named)."""
    return (_active_client(scheduler) is None and scheduler in (None, "threads")
            and dask.config.get("scheduler", None) in (None, "threads"))


def _sized_pool(scheduler: Any) -> bool:
    """Whether the work runs on the local threaded pool that chunkcca sizes: no pool or ``num_workers`` set in
    Dask's settings."""
    return (_local_pool(scheduler) and dask.config.get("num_workers", None) is None
            and dask.config.get("pool", None) is None)


def scheduler_threads(scheduler: Any = None) -> int:
    """Tasks the active or given scheduler runs at once: a cluster's threads (warned of if none), 1 for the
    synchronous scheduler, else the local pool's workers (Dask's ``num_workers`` setting, or one per core)."""
    client = _active_client(scheduler)
    if client is not None:
        from .cluster import cluster_threads

        return cluster_threads(client)
    name = scheduler if isinstance(scheduler, str) else dask.config.get("scheduler", None)
    if name in ("synchronous", "sync", "single-threaded"):
        return 1
    configured = dask.config.get("num_workers", None)
    if configured:
        return int(configured)
    return os.cpu_count() or 1


def reads_ahead(scheduler: Any = None) -> int:
    """Chunks each chain may read ahead of the one it folds on the active or given scheduler: ``READ_AHEAD`` on
    the local threaded pool that chunkcca sizes, where a read waiting on the disk then leaves no core idle
    (docs/performance.md); none on a cluster, where a chunk is read by the worker that folds it, nor on a pool
    that Dask's ``num_workers`` or ``pool`` settings give."""
    return READ_AHEAD if _sized_pool(scheduler) else 0


def compute(*graphs: Any, threads: int, scheduler: Any = None, progress: str | None = None) -> tuple[Any, ...]:
    """Compute Dask graphs with BLAS pinned to one thread, on the active or given scheduler.

    ``scheduler`` is anything ``dask.compute()`` takes ("threads", "processes",
    "synchronous", a ``distributed.Client``; an address is connected to by ``connected()`` first); by
    default the active one (a
    ``distributed.Client`` if one is current, else the local threaded scheduler). With
    ``progress`` (a label saying what is computed) a progress bar is shown on stderr: a labelled Dask bar
    locally (``chunkcca.progress.Progress``), distributed's after the label on a cluster. ``threads`` sets the
    local pool's workers unless Dask's ``num_workers`` or ``pool`` is set (a chained reduction's chains and the
    reads they run ahead; the Gram pass's tasks at work).
    """
    client = _active_client(scheduler)
    with one_thread():
        if client is not None:
            from .cluster import gathered, prepare_workers, watching_workers

            prepare_workers(client)
            futures = client.compute(list(graphs))
            try:
                with watching_workers(client):
                    if progress:
                        _cluster_progress(futures, client, progress)
                    return tuple(gathered(client, futures))
            except BaseException:  # release them: an erred key kept would re-raise on the same call again
                with contextlib.suppress(Exception):
                    client.cancel(futures)
                raise
        options: dict[str, Any] = {"scheduler": _local_scheduler(scheduler)}
        if _sized_pool(scheduler):
            options["num_workers"] = threads
        if progress:
            with Progress(progress):  # on stderr: stdout stays for results (e.g. the CLI's --json)
                return dask.compute(*graphs, **options)
        return dask.compute(*graphs, **options)


def _local_scheduler(scheduler: Any) -> Any:
    """``scheduler`` as ``dask.compute`` takes it: where ``distributed`` is not imported (then no Client exists, not
    even a worker's own), a local scheduler (the threaded default, or one named, "synchronous", "processes" …, or
    in Dask's settings) by its function, which runs without Dask's lookup importing distributed (0.15 s a
    process, and its imports inside a caller's memory trace)."""
    name = scheduler if scheduler is not None else dask.config.get("scheduler", None)
    if "distributed" in sys.modules or not (name is None or isinstance(name, str)):
        return scheduler
    if name is None:
        return dask.threaded.get
    return named_schedulers.get(name.lower(), scheduler)


def run(sides: Sequence[da.Array], adapters: Sequence[Adapter], reduction: Reduction, *, chains: int | None = None,
        scheduler: Any = None, progress: str | None = None, nan_policy: str = "raise", names: Sequence[str] = (),
        offset: int = 0, codes: da.Array | None = None, masks: Sequence[da.Array | None] = (),
        start: np.ndarray | None = None, ahead: int = 0) -> Any:
    """Build, compute and finalize one reduction (see ``reduction_graph()`` and ``compute()``) in as many chains
    as the scheduler runs tasks at once (locally, one per core), or ``chains`` if fewer (a memory budget), each
    reading ``ahead`` chunks ahead of the one it folds (locally on a pool of a thread per chain and per chunk
    read ahead)."""
    threads = scheduler_threads(scheduler)
    chains = min(chains or threads, threads)
    # on a cluster ``start`` stays with the client, merged after: in the graph it was sent to the scheduler
    # (a dft pilot's 64 MiB, with distributed's "Sending large graph" warning), and it costs the workers nothing
    kept = start if start is not None and _active_client(scheduler) is not None else None
    graph = reduction_graph(sides, adapters, reduction, chains=chains, nan_policy=nan_policy, names=names,
                            offset=offset, codes=codes, masks=masks, start=None if kept is not None else start,
                            ahead=ahead)
    (merged,) = compute(graph, scheduler=scheduler, progress=progress, threads=chains * (1 + ahead))
    return reduction.finalize(merged if kept is None else reduction.merge(kept, merged))


@contextlib.contextmanager
def connected(scheduler: Any, *, timeout: float = CONNECT_TIMEOUT) -> Iterator[Any]:
    """A ``distributed.Client`` connected for the block when ``scheduler`` is an address (an OSError naming it
    after ``timeout`` seconds if it does not answer), else ``scheduler``."""
    if not is_address(scheduler):
        yield scheduler
        return
    from .cluster import close_quietly, connect

    client = connect(scheduler, timeout=timeout)  # one that fails is closed at once, not at exit (20 s, a traceback)
    try:
        yield client
    finally:
        close_quietly(client)


def _cluster_progress(futures: list[Any], client: Any, label: str) -> None:
    """A progress bar for ``futures`` of ``client``, which need not be the default client, labelled ``label`` and
    the scheduler's address: in a terminal or log it blocks until the futures finish (``cluster.ClusterProgress``);
    in a notebook it is distributed's widget, shown here."""
    from distributed.utils import is_kernel

    from .cluster import ClusterProgress

    if not is_kernel():
        ClusterProgress(futures, client, label)
        return
    from distributed import progress as distributed_progress
    from IPython.display import display

    print(f"{label} on {client.scheduler.address}", file=sys.stderr)
    display(distributed_progress(futures, scheduler=client.scheduler.address))


def _active_client(scheduler: Any) -> Any:
    """The ``distributed.Client`` to run on: ``scheduler`` if it is one, else the one Dask itself would compute on
    (``dask.base.get_scheduler``: a scheduler in Dask's settings first, so ``dask.config.set(scheduler="threads")``
    runs locally beside a default Client; inside a task on a worker, the worker's client), else None.

    A Client exists only once ``distributed`` is imported, so a local run does not import it
    (the import costs about 0.15 s).
    """
    if "distributed" not in sys.modules:
        return None
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler
    if scheduler is not None:
        return None
    client = getattr(dask.base.get_scheduler(), "__self__", None)  # a Client's bound ``get``
    return client if isinstance(client, Client) else None


def checkpoint_boundaries(sides: Sequence[da.Array]) -> list[int]:
    """Datapoint offsets a checkpointed run is cut at: the chunk ends of the largest side (in bytes; of two, the
    one with more chunks), which hold every place where all sides' chunks end together (``common_boundaries``):
    its chunks are read once, and a chunk of a smaller side by each part it spans (all of them, for a side of one
    chunk; a side reordered to its partner's datapoints, the largest or not, has its stored chunks read by every
    part). (Common ends alone left layers in chunks of 64 and 100 datapoints none before 1600, and a conv layer
    beside an fc layer of one chunk none at all: such runs were saved only once done.)"""
    largest = max(sides, key=lambda side: (side.nbytes, side.numblocks[0]))
    return np.cumsum((0, *largest.chunks[0])).tolist()


def common_boundaries(sides: Sequence[da.Array]) -> list[int]:
    """Datapoint offsets where every side's chunks start or end (0 and the length included): the places a
    run can be cut into parts without splitting any side's chunk (which would read it twice)."""
    ends = [set(np.cumsum((0, *side.chunks[0])).tolist()) for side in sides]
    return sorted(set.intersection(*ends))
