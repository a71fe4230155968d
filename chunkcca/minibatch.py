"""Minibatch CKA (Nguyen, Raghu & Kornblith 2021), streamed: for layers too wide for a covariance.

The rows (after the spatial adapter and stride) are cut into consecutive minibatches of ``size``
rows in their global order; each minibatch gives the unbiased HSIC (Song et al. 2012) of the
linear Gram matrices K = X Xᵀ and L = Y Yᵀ; CKA = Σ HSIC(K, L) / sqrt(Σ HSIC(K, K) Σ HSIC(L, L)).
Memory per task is O(chunk + size²) whatever the channels. Chunks are realigned so that no
minibatch straddles two of them (the result does not depend on the chunking); the rows after the
last whole minibatch are left out and counted.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import xarray as xr

from .pairs import check_options, prepare_layers, reading
from .spatial import Adapter, row_count
from .stream import SPLIT_EVERY, check_scheduler, compute, rows_reduction


def _hollow(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """A Gram matrix (m, m) with its diagonal zeroed in place, its row sums and its total."""
    np.fill_diagonal(gram, 0)
    rows = gram.sum(axis=1)
    return gram, rows, float(rows.sum())


def _hsic(k: tuple[np.ndarray, np.ndarray, float], l_: tuple[np.ndarray, np.ndarray, float]) -> float:
    """Unbiased HSIC (Song et al. 2012) of two hollowed Gram matrices (see :func:`_hollow`), m >= 4."""
    (gram_k, rows_k, total_k), (gram_l, rows_l, total_l) = k, l_
    m = gram_k.shape[0]
    trace = float(np.vdot(gram_k, gram_l))
    return (trace + total_k * total_l / ((m - 1) * (m - 2)) - 2 * float(rows_k @ rows_l) / (m - 2)) / (m * (m - 3))


def _minibatch_partial(rows: list[np.ndarray], first_datapoint: int, *, size: int, rows_per_datapoint: int,
                       stride: int) -> np.ndarray:
    """[Σ HSIC(K, L), Σ HSIC(K, K), Σ HSIC(L, L), minibatches, rows left over] of one chunk."""
    first_row = -(-first_datapoint * rows_per_datapoint // stride)
    if first_row % size:
        raise RuntimeError(f"chunk starting at datapoint {first_datapoint} splits a minibatch of {size} rows")
    count = rows[0].shape[0] // size
    partial_sums = np.zeros((1, 5))
    partial_sums[0, 3] = count
    partial_sums[0, 4] = rows[0].shape[0] - count * size
    for batch in range(count):  # one minibatch at a time: memory O(size²), whatever the chunk
        x, y = (np.asarray(r[batch * size : (batch + 1) * size], dtype=np.float64) for r in rows)
        k, l_ = _hollow(x @ x.T), _hollow(y @ y.T)
        partial_sums[0, :3] += (_hsic(k, l_), _hsic(k, k), _hsic(l_, l_))
    return partial_sums


def _add(partials: np.ndarray) -> np.ndarray:
    return partials.sum(axis=0, keepdims=True)


def aligned_chunks(datapoints: int, chunk: int, *, size: int, rows_per_datapoint: int, stride: int) -> tuple[int, ...]:
    """Datapoint chunks near ``chunk`` whose boundaries fall on minibatch boundaries of the strided rows."""
    unit = size * stride // math.gcd(rows_per_datapoint, size * stride)
    per_chunk = max(1, round(chunk / unit)) * unit
    sizes = [per_chunk] * (datapoints // per_chunk)
    return tuple(sizes + ([datapoints % per_chunk] if datapoints % per_chunk else []))


def minibatch_cka(a: Any, b: Any, *, size: int, spatial: str = "flatten", stride: int = 1, method: str = "linear",
                  grid: str = "coords", split_every: int = SPLIT_EVERY, scheduler: Any = None,
                  progress: bool = False, nan_policy: str = "raise", dims: Any = None) -> xr.Dataset:
    """Minibatch linear CKA of two layers over minibatches of ``size`` rows (see the module docstring)."""
    check_options(spatial=spatial, stride=stride, method=method, grid=grid, nan_policy=nan_policy)
    if nan_policy == "omit":
        raise ValueError("minibatch CKA cannot omit rows (minibatches would shift); use nan_policy='raise'")
    if spatial == "dft":
        raise ValueError("minibatch CKA supports spatial='flatten', 'avgpool' or 'interp'")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 4:
        raise ValueError(f"minibatch must be an integer >= 4 (the unbiased HSIC needs 4 rows), got {size!r}")
    layer_a, layer_b, adapters = prepare_layers(a, b, spatial=spatial, method=method, grid=grid, dims=dims)
    datapoints = layer_a.sizes["datapoint"]
    rows = row_count(adapters[0], datapoints, stride)
    if rows < size:
        raise ValueError(f"layers {layer_a.name!r}, {layer_b.name!r} give {rows} rows, fewer than one minibatch "
                         f"of {size}")
    chunks = aligned_chunks(datapoints, max(layer_a.data.chunks[0]), size=size,
                            rows_per_datapoint=adapters[0].rows_per_datapoint, stride=stride)
    sides = [layer.data.rechunk({0: chunks}) for layer in (layer_a, layer_b)]
    graph = rows_reduction(
        sides, adapters,
        reduce_rows=partial(_minibatch_partial, size=size, rows_per_datapoint=adapters[0].rows_per_datapoint,
                            stride=stride),
        merge=_add, shape=(5,), dtype=np.float64, stride=stride, split_every=split_every,
        names=(str(layer_a.name), str(layer_b.name)))
    check_scheduler(scheduler)
    with reading((layer_a, layer_b)):
        (sums,) = compute(graph, scheduler=scheduler, progress=progress)
    hsic_ab, hsic_aa, hsic_bb, batches, left_over = sums[0]
    if hsic_aa <= 0 or hsic_bb <= 0:
        raise ValueError(f"minibatch CKA is undefined: layer {layer_a.name if hsic_aa <= 0 else layer_b.name!r} "
                         f"has no variance within minibatches")
    return xr.Dataset(
        {"cka": ((), hsic_ab / np.sqrt(hsic_aa * hsic_bb), {"long_name": f"minibatch linear CKA ({size} rows)"}),
         "minibatches": ((), np.int64(batches)),
         "rows_left_out": ((), np.int64(left_over), {"long_name": "rows after the last whole minibatch"}),
         "rows": ((), np.int64(rows))},
        attrs={"measure": "cka", "minibatch": int(size), "layer_a": str(layer_a.name), "layer_b": str(layer_b.name),
               "spatial": spatial, "stride": int(stride)},
    )


__all__ = ["Adapter", "aligned_chunks", "minibatch_cka"]
