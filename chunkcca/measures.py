"""Measures from Moments, and the public entry points that stream two layers into them.

Each measure is a small float64 solve on a :class:`~chunkcca.moments.Moments`, costing
O((p + q)³) whatever the number of datapoints.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from .moments import PRECISIONS, Moments, Precision
from .spatial import SPATIAL, row_count, spatial_shape
from .store import as_activations
from .stream import SPLIT_EVERY, stream_moments

#: Channels whose variance is at most this fraction of their side's largest are pruned.
ZERO_VARIANCE_RTOL = 1e-12


def inverse_sqrt(cov: np.ndarray) -> tuple[np.ndarray, int]:
    """Symmetric pseudo-inverse square root of a covariance (p, p) and its numerical rank.

    Eigenvalues at most ``p · eps · max eigenvalue`` count as zero (as ``numpy.linalg.pinv``).
    """
    values, vectors = np.linalg.eigh(cov)
    tol = max(values.max(initial=0.0), 0.0) * cov.shape[0] * np.finfo(np.float64).eps
    keep = values > tol
    scale = np.zeros_like(values)
    scale[keep] = 1.0 / np.sqrt(values[keep])
    return (vectors * scale) @ vectors.T, int(keep.sum())


def _nonzero_variance(variance: np.ndarray) -> np.ndarray:
    return variance > ZERO_VARIANCE_RTOL * max(variance.max(initial=0.0), 0.0)


def cca_from_moments(moments: Moments, *, epsilon: float = 0.0) -> xr.Dataset:
    """Canonical correlation analysis of the two sides of ``moments``.

    Each side's covariance Σ (zero-variance channels pruned) gets ``epsilon`` added to its
    diagonal and is whitened with its pseudo-inverse square root W; the SVD
    ``Wₐ Σₐᵦ Wᵦ = U diag(ρ) Vᵀ`` gives the canonical correlations ρ (descending) and the
    neuron coefficients ``coef_a = Wₐ U``, ``coef_b = Wᵦ V``: canonical variate k of side a is
    ``(x − mean_a) · coef_a[:, k]``, with unit variance when epsilon is 0.

    Returns a Dataset with ``rho`` (component), ``coef_a`` (channel_a, component), ``coef_b``
    (channel_b, component), ``pruned_a``/``pruned_b`` (zero-variance channels, coefficient 0),
    ``rank_a``/``rank_b`` and ``rows``. component has min(p, q) entries; directions beyond a
    side's rank have ρ = 0.
    """
    if len(moments.sizes) != 2:
        raise ValueError(f"CCA compares two sides; these Moments have {len(moments.sizes)}")
    if epsilon < 0 or not np.isfinite(epsilon):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    slice_a, slice_b = moments.side_slices()
    cov = moments.covariance()
    if not np.all(np.isfinite(cov)):
        raise ValueError("the statistics hold NaN or Inf: the activations contain non-finite values")
    variance = np.diag(cov)
    kept_a = _nonzero_variance(variance[slice_a])
    kept_b = _nonzero_variance(variance[slice_b])
    index_a = np.flatnonzero(kept_a) + slice_a.start
    index_b = np.flatnonzero(kept_b) + slice_b.start
    p, q = moments.sizes
    n_components = min(p, q)
    rho = np.zeros(n_components)
    coef_a = np.zeros((p, n_components))
    coef_b = np.zeros((q, n_components))
    rank_a = rank_b = 0
    if index_a.size and index_b.size:
        with threadpool_limits(limits=1, user_api="blas"):
            whiten_a, rank_a = inverse_sqrt(cov[np.ix_(index_a, index_a)] + epsilon * np.eye(index_a.size))
            whiten_b, rank_b = inverse_sqrt(cov[np.ix_(index_b, index_b)] + epsilon * np.eye(index_b.size))
            u, s, vt = np.linalg.svd(whiten_a @ cov[np.ix_(index_a, index_b)] @ whiten_b)
        k = s.size
        rho[:k] = s
        coef_a[np.flatnonzero(kept_a), :k] = whiten_a @ u[:, :k]
        coef_b[np.flatnonzero(kept_b), :k] = whiten_b @ vt.T[:, :k]
    return xr.Dataset(
        {
            "rho": ("component", rho, {"long_name": "canonical correlation"}),
            "coef_a": (("channel_a", "component"), coef_a, {"long_name": "neuron coefficients of side a"}),
            "coef_b": (("channel_b", "component"), coef_b, {"long_name": "neuron coefficients of side b"}),
            "pruned_a": ("channel_a", ~kept_a, {"long_name": "zero-variance channel, left out"}),
            "pruned_b": ("channel_b", ~kept_b, {"long_name": "zero-variance channel, left out"}),
            "rank_a": ((), rank_a),
            "rank_b": ((), rank_b),
            "rows": ((), np.int64(moments.n), {"long_name": "rows the statistics were computed from"}),
            "rho_mean": ((), rho.mean() if rho.size else np.nan, {"long_name": "mean canonical correlation"}),
        },
        coords={"component": np.arange(n_components)},
        attrs={"measure": "cca", "epsilon": float(epsilon)},
    )


def check_options(*, spatial: str, stride: int, epsilon: float, precision: str) -> None:
    """Validate the options shared by every streaming measure, naming the argument at fault."""
    if spatial not in SPATIAL:
        raise ValueError(f"spatial must be one of {', '.join(map(repr, SPATIAL))}, got {spatial!r}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    if not isinstance(epsilon, (int, float, np.number)) or not np.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")


def align_layers(a: xr.DataArray, b: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Put ``b``'s datapoints in ``a``'s order by label; any label missing on one side is an error.

    Layers without a datapoint coordinate are aligned by position and must have equal counts.
    """
    name_a, name_b = a.name, b.name
    if "datapoint" not in a.coords or "datapoint" not in b.coords:
        if a.sizes["datapoint"] != b.sizes["datapoint"]:
            raise ValueError(
                f"layer {name_a!r} has {a.sizes['datapoint']} datapoints but layer {name_b!r} has "
                f"{b.sizes['datapoint']}; both must hold the same datapoints")
        return a, b
    labels_a = a.indexes["datapoint"]
    labels_b = b.indexes["datapoint"]
    for name, labels in ((name_a, labels_a), (name_b, labels_b)):
        if not labels.is_unique:
            duplicated = labels[labels.duplicated()].unique()[:5].tolist()
            raise ValueError(f"layer {name!r} has repeated datapoint labels, e.g. {duplicated}")
    if labels_a.equals(labels_b):
        return a, b
    missing_b = labels_a.difference(labels_b)
    missing_a = labels_b.difference(labels_a)
    if len(missing_a) or len(missing_b):
        raise ValueError(
            f"datapoint labels differ: {len(missing_b)} of layer {name_a!r} are not in layer {name_b!r} "
            f"(e.g. {missing_b[:5].tolist()}) and {len(missing_a)} of layer {name_b!r} are not in layer "
            f"{name_a!r} (e.g. {missing_a[:5].tolist()}); no datapoint is dropped silently")
    return a, b.isel(datapoint=labels_b.get_indexer(labels_a))


def prepare_layers(a: Any, b: Any, *, spatial: str, stride: int) -> tuple[xr.DataArray, xr.DataArray, int]:
    """Validate and align two layers for streaming; return them and the rows they will give."""
    layer_a = as_activations(a, "a" if not _has_name(a) else None)
    layer_b = as_activations(b, "b" if not _has_name(b) else None)
    if layer_a.name == layer_b.name:
        layer_a, layer_b = layer_a.rename(f"a ({layer_a.name})"), layer_b.rename(f"b ({layer_b.name})")
    layer_a, layer_b = align_layers(layer_a, layer_b)
    if spatial == "flatten":
        size_a, size_b = spatial_shape(layer_a.shape), spatial_shape(layer_b.shape)
        if size_a != size_b:
            raise ValueError(
                f"spatial='flatten' needs equal spatial sizes, but layer {layer_a.name!r} is "
                f"{size_a[0]}x{size_a[1]} and layer {layer_b.name!r} is {size_b[0]}x{size_b[1]}; "
                f"use spatial='avgpool' to compare layers of different spatial sizes")
    rows = row_count(spatial, layer_a.shape, stride)
    return layer_a, layer_b, rows


def _has_name(layer: Any) -> bool:
    return isinstance(layer, xr.DataTree) or (isinstance(layer, xr.DataArray) and layer.name is not None)


def stream_pair(a: Any, b: Any, *, spatial: str = "flatten", stride: int = 1, epsilon: float = 0.0,
                precision: Precision = "float32", split_every: int = SPLIT_EVERY, scheduler: Any = None,
                progress: bool = False) -> tuple[xr.DataArray, xr.DataArray, Moments]:
    """Validate, align and stream two layers; return both layers (lazy) and their Moments."""
    check_options(spatial=spatial, stride=stride, epsilon=epsilon, precision=precision)
    layer_a, layer_b, rows = prepare_layers(a, b, spatial=spatial, stride=stride)
    widest = max(layer_a.sizes["channel"], layer_b.sizes["channel"])
    if rows <= widest:
        warnings.warn(
            f"only {rows} rows for {widest} channels (layers {layer_a.name!r}, {layer_b.name!r}): "
            f"the covariance is singular and correlations are meaningless without epsilon > 0 "
            f"or fewer dimensions", RuntimeWarning, stacklevel=3)
    stats = stream_moments([layer_a.data, layer_b.data], spatial=spatial, stride=stride,
                             precision=precision, split_every=split_every, scheduler=scheduler,
                             progress=progress)
    for layer, part in zip((layer_a, layer_b), stats.side_slices()):
        if not (np.all(np.isfinite(stats.mean[part])) and np.all(np.isfinite(stats.scatter[part, part]))):
            raise ValueError(f"layer {layer.name!r} contains NaN or Inf values")
    return layer_a, layer_b, stats


def compute_moments(a: Any, b: Any, *, spatial: str = "flatten", stride: int = 1, precision: Precision = "float32",
            split_every: int = SPLIT_EVERY, scheduler: Any = None, progress: bool = False) -> Moments:
    """The :class:`~chunkcca.moments.Moments` of two layers' rows, in one streamed pass.

    Arguments as for :func:`cca`. The result can be saved, merged with the Moments of more
    datapoints (``m1 + m2``) and solved with :func:`cca_from_moments`.
    """
    return stream_pair(a, b, spatial=spatial, stride=stride, precision=precision, split_every=split_every,
                       scheduler=scheduler, progress=progress)[2]


def _channel_labels(layer: xr.DataArray) -> np.ndarray:
    return layer["channel"].values if "channel" in layer.coords else np.arange(layer.sizes["channel"])


def cca(a: Any, b: Any, *, spatial: str = "flatten", stride: int = 1, epsilon: float = 0.0,
        precision: Precision = "float32", split_every: int = SPLIT_EVERY, scheduler: Any = None,
        progress: bool = False) -> xr.Dataset:
    """Canonical correlations between two layers, streamed chunk by chunk.

    Parameters
    ----------
    a, b
        Layers of dims (datapoint, height, width, channel) or (datapoint, channel): DataArrays
        (aligned by their ``datapoint`` labels; a label on one side only is an error), DataTree
        nodes or Datasets holding ``activations``, or numpy/Dask arrays (aligned by position).
    spatial
        How spatial positions become rows: "flatten" (every (datapoint, height, width) is a
        row; needs equal spatial sizes) or "avgpool" (the mean over height and width; one row
        per datapoint).
    stride
        Keep every ``stride``-th row of the global row order (google/svcca's ``[:, ::stride]``),
        whatever the chunking.
    epsilon
        Added to the diagonal of each side's covariance before whitening.
    precision
        dtype of the per-chunk products ("float32" is 2–3× faster, correlations good to about
        1e-6; "float64"); accumulation and merging are always float64.
    split_every, scheduler, progress
        Tree-reduction fan-in; the Dask scheduler (default: the active one, a
        ``distributed.Client`` if current); show a progress bar.

    Returns
    -------
    xarray.Dataset
        ``rho`` (component, descending), ``coef_a`` (channel_a, component), ``coef_b``
        (channel_b, component), ``pruned_a``/``pruned_b``, ``rank_a``/``rank_b``, ``rows``
        and ``rho_mean``; attrs record the layers and every option.
    """
    layer_a, layer_b, stats = stream_pair(a, b, spatial=spatial, stride=stride, epsilon=epsilon,
                                          precision=precision, split_every=split_every,
                                          scheduler=scheduler, progress=progress)
    result = cca_from_moments(stats, epsilon=epsilon)
    result = result.assign_coords(channel_a=_channel_labels(layer_a), channel_b=_channel_labels(layer_b))
    result.attrs.update(layer_a=str(layer_a.name), layer_b=str(layer_b.name), spatial=spatial,
                        stride=int(stride), precision=precision, rows=int(stats.n))
    return result
