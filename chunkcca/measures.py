"""Measures from Moments, and the public entry points that stream two layers into them.

Each measure is a small float64 (complex128 for the DFT adapter) solve on a
:class:`~chunkcca.moments.Moments`, costing O((p + q)³) per frequency whatever the number
of datapoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from .moments import Moments, Precision
from .pairs import MEMORY_LIMIT, stream_pair
from .spatial import Adapter, frequency_labels
from .stream import SPLIT_EVERY

#: Channels whose variance is at most this fraction of their side's largest are pruned.
ZERO_VARIANCE_RTOL = 1e-12


def inverse_sqrt(cov: np.ndarray) -> tuple[np.ndarray, int]:
    """Hermitian pseudo-inverse square root of a covariance (p, p) and its numerical rank.

    Eigenvalues at most ``p · eps · max eigenvalue`` count as zero (as ``numpy.linalg.pinv``).
    """
    values, vectors = np.linalg.eigh(cov)
    tol = max(values.max(initial=0.0), 0.0) * cov.shape[0] * np.finfo(np.float64).eps
    keep = values > tol
    scale = np.zeros_like(values)
    scale[keep] = 1.0 / np.sqrt(values[keep])
    return (vectors * scale) @ vectors.conj().T, int(keep.sum())


def _nonzero_variance(variance: np.ndarray) -> np.ndarray:
    return variance > ZERO_VARIANCE_RTOL * max(variance.max(initial=0.0), 0.0)


def _solve_cca(cov: np.ndarray, sizes: tuple[int, ...], epsilon: float) -> dict[str, np.ndarray]:
    """CCA of one covariance (p + q, p + q), real or Hermitian: rho, coefficients, pruned, ranks."""
    p, q = sizes
    variance = np.diagonal(cov).real
    kept_a, kept_b = _nonzero_variance(variance[:p]), _nonzero_variance(variance[p:])
    index_a, index_b = np.flatnonzero(kept_a), np.flatnonzero(kept_b) + p
    n_components = min(p, q)
    rho = np.zeros(n_components)
    coef_a = np.zeros((p, n_components), dtype=cov.dtype)
    coef_b = np.zeros((q, n_components), dtype=cov.dtype)
    rank_a = rank_b = 0
    if index_a.size and index_b.size:
        whiten_a, rank_a = inverse_sqrt(cov[np.ix_(index_a, index_a)] + epsilon * np.eye(index_a.size))
        whiten_b, rank_b = inverse_sqrt(cov[np.ix_(index_b, index_b)] + epsilon * np.eye(index_b.size))
        u, s, vh = np.linalg.svd(whiten_a @ cov[np.ix_(index_a, index_b)] @ whiten_b)
        k = s.size
        rho[:k] = s
        coef_a[index_a, :k] = whiten_a @ u[:, :k]
        coef_b[index_b - p, :k] = whiten_b @ vh.conj().T[:, :k]
    return {"rho": rho, "coef_a": coef_a, "coef_b": coef_b, "pruned_a": ~kept_a, "pruned_b": ~kept_b,
            "rank_a": np.int64(rank_a), "rank_b": np.int64(rank_b)}


def cca_from_moments(moments: Moments, *, epsilon: float = 0.0,
                     batch_dims: tuple[str, ...] = ("freq_h", "freq_w")) -> xr.Dataset:
    """Canonical correlation analysis of the two sides of ``moments``.

    Each side's covariance Σ (zero-variance channels pruned) gets ``epsilon`` added to its
    diagonal and is whitened with its pseudo-inverse square root W; the SVD
    ``Wₐ Σₐᵦ Wᵦ = U diag(ρ) Vᴴ`` gives the canonical correlations ρ (descending) and the
    neuron coefficients ``coef_a = Wₐ U``, ``coef_b = Wᵦ V``: canonical variate k of side a is
    ``(x − mean_a) · coef_a[:, k]``, with unit variance when epsilon is 0.

    Returns a Dataset with ``rho`` (component), ``coef_a`` (channel_a, component), ``coef_b``
    (channel_b, component), ``pruned_a``/``pruned_b`` (zero-variance channels, coefficient 0),
    ``rank_a``/``rank_b``, ``rows`` and ``rho_mean``. component has min(p, q) entries;
    directions beyond a side's rank have ρ = 0. Batched Moments (one set per frequency) get
    one solve per batch element, along ``batch_dims``, and ``rho_mean`` averages over all of them.
    """
    if len(moments.sizes) != 2:
        raise ValueError(f"CCA compares two sides; these Moments have {len(moments.sizes)}")
    if not np.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    cov = moments.covariance()
    if not np.all(np.isfinite(cov)):
        raise ValueError("the statistics hold NaN or Inf: the activations contain non-finite values")
    batch = moments.batch_shape
    dims = batch_dims[: len(batch)]
    if len(dims) != len(batch):
        raise ValueError(f"Moments have {len(batch)} batch dims; name them with batch_dims")
    with threadpool_limits(limits=1, user_api="blas"):
        solved = [_solve_cca(cov[index], moments.sizes, float(epsilon)) for index in np.ndindex(*batch)]
    stacked = {key: np.stack([s[key] for s in solved]).reshape((*batch, *np.shape(solved[0][key])))
               for key in solved[0]}
    rho = stacked["rho"]
    result = xr.Dataset(
        {
            "rho": ((*dims, "component"), rho, {"long_name": "canonical correlation"}),
            "coef_a": ((*dims, "channel_a", "component"), stacked["coef_a"],
                       {"long_name": "neuron coefficients of side a"}),
            "coef_b": ((*dims, "channel_b", "component"), stacked["coef_b"],
                       {"long_name": "neuron coefficients of side b"}),
            "pruned_a": ((*dims, "channel_a"), stacked["pruned_a"], {"long_name": "zero-variance channel, left out"}),
            "pruned_b": ((*dims, "channel_b"), stacked["pruned_b"], {"long_name": "zero-variance channel, left out"}),
            "rank_a": (dims, stacked["rank_a"]),
            "rank_b": (dims, stacked["rank_b"]),
            "rows": ((), np.int64(moments.n), {"long_name": "rows the statistics were computed from"}),
            "rho_mean": ((), rho.mean() if rho.size else np.nan, {"long_name": "mean canonical correlation"}),
        },
        coords={"component": np.arange(rho.shape[-1])},
        attrs={"measure": "cca", "epsilon": float(epsilon)},
    )
    if batch:
        result["rho_freq_mean"] = (dims, rho.mean(axis=-1), {"long_name": "mean canonical correlation per frequency"})
    return result


def _channel_labels(layer: xr.DataArray) -> np.ndarray:
    return layer["channel"].values if "channel" in layer.coords else np.arange(layer.sizes["channel"])


def label_result(result: xr.Dataset, layer_a: xr.DataArray, layer_b: xr.DataArray,
                 adapters: tuple[Adapter, Adapter], **options: Any) -> xr.Dataset:
    """Put the layers' channel labels, the frequencies and the options used on a result."""
    coords: dict[str, Any] = {"channel_a": _channel_labels(layer_a), "channel_b": _channel_labels(layer_b)}
    if adapters[0].kind == "dft":
        coords["freq_h"] = frequency_labels(adapters[0].shape[0], adapters[1].shape[0])
        coords["freq_w"] = frequency_labels(adapters[0].shape[1], adapters[1].shape[1])
    result = result.assign_coords({k: v for k, v in coords.items() if k in result.dims})
    result.attrs.update(layer_a=str(layer_a.name), layer_b=str(layer_b.name),
                        **{k: v for k, v in options.items() if v is not None})
    return result


def cca(a: Any, b: Any, *, spatial: str = "flatten", stride: int = 1, epsilon: float = 0.0,
        precision: Precision = "float32", method: str = "linear", grid: str = "coords",
        split_every: int = SPLIT_EVERY, memory_limit: int | str = MEMORY_LIMIT, scheduler: Any = None,
        progress: bool = False) -> xr.Dataset:
    """Canonical correlations between two layers, streamed chunk by chunk.

    Parameters
    ----------
    a, b
        Layers of dims (datapoint, height, width, channel) or (datapoint, channel): DataArrays
        (aligned by their ``datapoint`` labels; a label on one side only is an error), DataTree
        nodes or Datasets holding ``activations``, or numpy/Dask arrays (aligned by position).
    spatial
        How spatial positions become rows:

        - "flatten": every (datapoint, height, width) is a row; needs equal spatial sizes.
        - "avgpool": the mean over height and width; one row per datapoint.
        - "interp": the coarser layer is interpolated onto the finer layer's grid (per axis,
          per chunk), then flattened; see ``method`` and ``grid``.
        - "dft": the 2-D DFT over (height, width) per datapoint; frequencies both layers share
          are kept and a CCA is solved per frequency. Memory: frequencies × (p + q)² complex
          values per partial (16 bytes each), checked against ``memory_limit`` before streaming.
    stride
        Keep every ``stride``-th row of the global row order (google/svcca's ``[:, ::stride]``),
        whatever the chunking. For avgpool and dft the rows are datapoints.
    epsilon
        Added to the diagonal of each side's covariance before whitening.
    precision
        dtype of the per-chunk products ("float32" is 2–3× faster, correlations good to about
        1e-6; "float64"); accumulation and merging are always float64 (complex128 for dft).
    method, grid
        For "interp": "linear", "nearest" or "cubic" (tensor-product, per axis); "coords" places
        samples at the layers' ``height``/``width`` coordinates (pixel centres in input-image
        units), "svcca" at google/svcca's tutorial positions (``linspace(0, small, large,
        endpoint=False)`` on sample indices). Targets past the last sample take the nearest one.
    split_every, memory_limit, scheduler, progress
        Tree-reduction fan-in (lowered to fit ``memory_limit``); the Dask scheduler (default: the
        active one, a ``distributed.Client`` if current); show a progress bar.

    Returns
    -------
    xarray.Dataset
        ``rho`` ([freq_h, freq_w,] component, descending), ``coef_a`` (channel_a, component),
        ``coef_b`` (channel_b, component), ``pruned_a``/``pruned_b``, ``rank_a``/``rank_b``,
        ``rows`` (per frequency for dft) and ``rho_mean`` (and ``rho_freq_mean`` for dft); attrs
        record the layers and every option.
    """
    layer_a, layer_b, adapters, stats = stream_pair(
        a, b, spatial=spatial, stride=stride, epsilon=epsilon, precision=precision, method=method, grid=grid,
        split_every=split_every, memory_limit=memory_limit, scheduler=scheduler, progress=progress)
    result = cca_from_moments(stats, epsilon=epsilon)
    return label_result(result, layer_a, layer_b, adapters, spatial=spatial, stride=int(stride),
                        precision=precision, rows=int(stats.n),
                        method=method if spatial == "interp" else None, grid=grid if spatial == "interp" else None)
