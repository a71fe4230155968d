"""Minibatch CKA (Nguyen, Raghu & Kornblith 2021): the per-chunk sums, for layers too wide for a covariance.

The rows (after the spatial adapter and stride) are cut into consecutive minibatches of ``size``
rows in their global order; each minibatch gives the unbiased HSIC (Song et al. 2012) of the
linear Gram matrices K = X Xᵀ and L = Y Yᵀ; CKA = Σ HSIC(K, L) / sqrt(Σ HSIC(K, K) Σ HSIC(L, L)).
Memory per task is O(chunk + L · size²) for L layers, whatever the channels, when a task takes a chunk of every
layer (``minibatch_partial``), or O(one layer's chunk + its Gram matrices) when it takes one layer's
(``minibatch_gram`` then ``chunk_hsic`` per chunk; ``passes.minibatch_pass`` takes whichever holds less). Chunks
are realigned so that no minibatch straddles two of them (the result does not depend on the chunking); the
rows after the last whole minibatch are left out and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np


def _hollow(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """A Gram matrix (m, m) with its diagonal zeroed in place, its row sums and its total."""
    np.fill_diagonal(gram, 0)
    rows = gram.sum(axis=1)
    return gram, rows, float(rows.sum())


def _hsic(k: tuple[np.ndarray, np.ndarray, float], l_: tuple[np.ndarray, np.ndarray, float]) -> float:
    """Unbiased HSIC (Song et al. 2012) of two hollowed Gram matrices (see ``_hollow()``), m >= 4."""
    (gram_k, rows_k, total_k), (gram_l, rows_l, total_l) = k, l_
    m = gram_k.shape[0]
    trace = float(np.vdot(gram_k, gram_l))
    return (trace + total_k * total_l / ((m - 1) * (m - 2)) - 2 * float(rows_k @ rows_l) / (m - 2)) / (m * (m - 3))


Hollow = tuple[np.ndarray, np.ndarray, float]


#: Values within this many ulps of their column's float64 mean are taken as equal to it (centred to 0): the
#: mean of a constant column (merged over chunks, or of a minibatch) is a few ulps off its value, and that
#: rounding, squared into Gram matrices, gave a layer without variance a CKA (-8.8e-10 of whole maps, 2e-7 of
#: minibatches) where it has none.
MEAN_ULPS = 8


def within_mean_rounding(centred: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``centred`` (rows, features), rows less their column ``mean``, with each column whose values all lie within
    ``MEAN_ULPS`` of the mean's rounding set to 0, in place (no temporary as large as the rows)."""
    if centred.shape[0]:
        rounding = MEAN_ULPS * np.finfo(np.float64).eps * np.abs(mean)
        centred[:, (centred.max(axis=0) <= rounding) & (centred.min(axis=0) >= -rounding)] = 0
    return centred


def minibatch_gram(rows: np.ndarray, batch: int, size: int) -> Hollow:
    """The hollowed Gram matrix (``_hollow()``) of minibatch ``batch`` of ``rows`` (rows, p), in float64, of its
    rows centred on their mean: the unbiased HSIC is the same for any common offset, and a large one (1e4 against
    a spread of 1) no longer cancels in the Gram matrix (CKA 1.33 against 0.39)."""
    centred = np.array(rows[batch * size : (batch + 1) * size], dtype=np.float64)  # one float64 copy, as budgeted
    mean = centred.mean(axis=0)
    centred -= mean
    return _hollow(within_mean_rounding(centred, mean) @ centred.T)  # a constant column: 0, not its mean's rounding


def check_boundary(first_row: int, size: int, first_datapoint: int) -> None:
    """Refuse a chunk whose first row (global) does not start a minibatch."""
    if first_row % size:
        raise RuntimeError(f"chunk starting at datapoint {first_datapoint} splits a minibatch of {size} rows")


def minibatch_partial(rows: list[np.ndarray], first_datapoint: int, *, size: int,
                      rows_before: Callable[[int], int]) -> np.ndarray:
    """[Σ HSIC(Kₗ, Kₘ) for every pair of the L sides, row-major (L × L, symmetric), minibatches, rows left over]
    of one chunk, (1, L² + 2); ``rows_before(d)`` counts the rows of the datapoints before d (the adapter's
    ``row_count``)."""
    check_boundary(rows_before(first_datapoint), size, first_datapoint)
    count = rows[0].shape[0] // size
    # one minibatch at a time (one side's in float64 at a time): O(L · size²)
    minibatches = ([minibatch_gram(side, batch, size) for side in rows] for batch in range(count))
    return chunk_hsic(minibatches, len(rows), rows[0].shape[0], size)[None]


def chunk_hsic(minibatches: Iterable[Sequence[Hollow]], sides: int, rows: int, size: int) -> np.ndarray:
    """[Σ HSIC(Kₗ, Kₘ) of every pair, row-major (L²), minibatches, rows left over] of a chunk of ``rows`` rows
    from its whole minibatches' hollowed Gram matrices of the L ``sides``, taken one minibatch at a time."""
    hsic = np.zeros((sides, sides))
    for grams in minibatches:
        for left in range(sides):
            for right in range(left, sides):
                hsic[left, right] += _hsic(grams[left], grams[right])
    hsic = np.triu(hsic) + np.triu(hsic, 1).T  # symmetric
    count = rows // size
    return np.concatenate([hsic.ravel(), [count, rows - count * size]])


def whole_datapoints_size(size: int, rows_per_datapoint: int, stride: int) -> int | None:
    """The largest minibatch of at most ``size`` rows whose strided rows divide a datapoint's rows or are a
    multiple of them (None if none is): the smallest chunk ``aligned_chunks`` makes for it is then one
    minibatch's datapoints (for another, lcm(m · stride, rows) / rows datapoints: 257 of 16 × 16 positions for
    m = 257)."""
    return next((m for m in range(size, 0, -1)
                 if (m * stride) % rows_per_datapoint == 0 or rows_per_datapoint % (m * stride) == 0), None)


def aligned_unit(size: int, rows_per_datapoint: int, stride: int) -> int:
    """The fewest datapoints whose strided rows are whole minibatches of ``size`` rows."""
    return size * stride // math.gcd(rows_per_datapoint, size * stride)


def aligned_chunks(datapoints: int, chunk: int, *, size: int, rows_per_datapoint: int, stride: int) -> tuple[int, ...]:
    """Datapoint chunks near ``chunk`` whose boundaries fall on minibatch boundaries of the strided rows."""
    unit = aligned_unit(size, rows_per_datapoint, stride)
    per_chunk = max(1, round(chunk / unit)) * unit
    sizes = [per_chunk] * (datapoints // per_chunk)
    return tuple(sizes + ([datapoints % per_chunk] if datapoints % per_chunk else []))
