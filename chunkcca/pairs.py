"""Two layers → one pass → Moments: validation at the door, datapoint alignment, memory budget.

Every measure that compares two layers comes through :func:`stream_pair`: options and layers
are checked (naming the layer and the fault) before anything streams.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from dask.array import PerformanceWarning
from dask.utils import format_bytes, parse_bytes

from .checkpoint import CheckpointError, stream_with_checkpoint
from .moments import PRECISIONS, Moments, Precision, is_url
from .spatial import GRIDS, METHODS, SPATIAL, Adapter, plan_adapters, row_count
from .store import as_activations
from .stream import NAN_POLICIES, SPLIT_EVERY, NonFiniteError, check_scheduler, stream_moments

#: Default memory budget for the statistics held at once (matters for spatial="dft").
MEMORY_LIMIT = "4GiB"
#: precision="auto" keeps float32 products while every side's correlation matrix in the first chunk has a
#: condition number at most this: float32 products were measured to move correlations by up to ~1e-6 at
#: condition numbers near 1e3 and by 1e-5 to 7e-5 near 1e4.
AUTO_CONDITION = 1e3


@dataclass(frozen=True)
class Streamed:
    """Two validated layers, their adapters, their Moments, and what the streaming decided."""

    layer_a: xr.DataArray
    layer_b: xr.DataArray
    adapters: tuple[Adapter, Adapter]
    moments: Moments
    rows_omitted: int
    precision: str
    precision_note: str | None = None


def check_options(*, spatial: str, stride: int, epsilon: float = 0.0, precision: str = "float32",
                  method: str = "linear", grid: str = "coords", nan_policy: str = "raise") -> None:
    """Validate the options shared by every streaming measure, naming the argument at fault."""
    if spatial not in SPATIAL:
        raise ValueError(f"spatial must be one of {', '.join(map(repr, SPATIAL))}, got {spatial!r}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    check_epsilon(epsilon)
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be one of {', '.join(map(repr, (*PRECISIONS, 'auto')))}, got {precision!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(map(repr, GRIDS))}, got {grid!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {', '.join(map(repr, NAN_POLICIES))}, got {nan_policy!r}")


def check_epsilon(epsilon: Any) -> None:
    """``epsilon`` (the ridge of the CCA family) is a finite number >= 0, or a ValueError saying so."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.number)) or not np.isfinite(epsilon) \
            or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")


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
    if labels_a.equals(labels_b):  # labels are unique: as_activations refuses repeats
        return a, b
    missing_b = labels_a.difference(labels_b)
    missing_a = labels_b.difference(labels_a)
    if len(missing_a) or len(missing_b):
        raise ValueError(
            f"datapoint labels differ: {len(missing_b)} of layer {name_a!r} are not in layer {name_b!r} "
            f"(e.g. {missing_b[:5].tolist()}) and {len(missing_a)} of layer {name_b!r} are not in layer "
            f"{name_a!r} (e.g. {missing_a[:5].tolist()}); no datapoint is dropped silently")
    warnings.warn(
        f"layer {name_b!r} holds the datapoints of layer {name_a!r} in another order; chunkcca reorders it "
        f"lazily, which reads its chunks several times and may hold much of it in memory: store both layers "
        f"in one order for large data", PerformanceWarning, stacklevel=3)
    return a, b.isel(datapoint=labels_b.get_indexer(labels_a))


def _named(layer: Any, default: str, dims: Any = None) -> xr.DataArray:
    named = isinstance(layer, xr.DataTree) or (isinstance(layer, xr.DataArray) and layer.name is not None)
    return as_activations(layer, None if named else default, dims=dims)


@contextmanager
def reading(layers: Sequence[xr.DataArray]) -> Iterator[None]:
    """Re-raise a failure to read store-backed layers (a corrupt chunk, a vanished file) naming the layers
    and their stores; NaN/Inf and checkpoint errors and errors of in-memory layers pass through unchanged."""
    try:
        yield
    except (NonFiniteError, CheckpointError):
        raise
    except Exception as error:
        sources = sorted({str(layer.encoding["store"]) for layer in layers if "store" in layer.encoding})
        if not sources:
            raise
        names = ", ".join(repr(str(layer.name)) for layer in layers)
        raise OSError(f"reading layers {names} from {', '.join(sources)} failed: "
                      f"{type(error).__name__}: {error}") from error


def prepare_layers(a: Any, b: Any, *, spatial: str, method: str = "linear", grid: str = "coords",
                   precision: str = "float32", dims: Any = None,
                   ) -> tuple[xr.DataArray, xr.DataArray, tuple[Adapter, Adapter]]:
    """Validate and align two layers and plan their spatial adapters; nothing is read."""
    layer_a, layer_b = _named(a, "a", dims), _named(b, "b", dims)
    if layer_a.name == layer_b.name:
        layer_a, layer_b = layer_a.rename(f"a ({layer_a.name})"), layer_b.rename(f"b ({layer_b.name})")
    layer_a, layer_b = align_layers(layer_a, layer_b)
    return layer_a, layer_b, plan_adapters(spatial, layer_a, layer_b, method=method, grid=grid, precision=precision)


def fit_split_every(adapters: tuple[Adapter, ...], channels: int, *, split_every: int,
                    memory_limit: int | str, names: tuple[str, ...], row_norms: bool = False) -> int:
    """The tree fan-in that keeps the partials held at once within ``memory_limit``, or a clear error.

    A partial holds (p + 2)·p values per batch element (per frequency for dft), complex for dft;
    a merge task holds ``split_every`` of them plus its output.
    """
    limit = parse_bytes(memory_limit) if isinstance(memory_limit, str) else int(memory_limit)
    batch = int(np.prod(adapters[0].batch_shape, dtype=np.int64))
    itemsize = 16 if adapters[0].kind == "dft" else 8
    norm_rows = 2 * len(adapters) if row_norms and adapters[0].kind != "dft" else 0
    partial = batch * (channels + 2 + norm_rows) * channels * itemsize
    fan_in = min(split_every, max(2, limit // max(partial, 1) - 1))
    if partial * (fan_in + 1) > limit:
        what = (f"spatial='dft' keeps {batch} frequencies x {channels}^2 complex statistics"
                if adapters[0].kind == "dft" else f"{channels}^2 statistics")
        raise ValueError(
            f"comparing {' and '.join(map(repr, names))}: {what} = {format_bytes(partial)} per partial, and a "
            f"merge holds 3 of them ({format_bytes(3 * partial)}), over memory_limit={format_bytes(limit)}; "
            f"raise memory_limit, compare fewer channels, or use spatial='avgpool' or 'interp'")
    return fan_in


def stream_pair(a: Any, b: Any, *, spatial: str = "flatten", stride: int = 1, epsilon: float = 0.0,
                precision: Precision = "float32", method: str = "linear", grid: str = "coords",
                split_every: int = SPLIT_EVERY, memory_limit: int | str = MEMORY_LIMIT, scheduler: Any = None,
                progress: bool = False, nan_policy: str = "raise", dims: Any = None, row_norms: bool = False,
                checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 16) -> Streamed:
    """Validate, align and stream two layers into Moments (see :class:`Streamed` and :func:`stream_layers`)."""
    check_options(spatial=spatial, stride=stride, epsilon=epsilon, precision=precision, method=method, grid=grid,
                  nan_policy=nan_policy)
    layer_a, layer_b, adapters = prepare_layers(a, b, spatial=spatial, method=method, grid=grid,
                                                precision=precision, dims=dims)
    stats, rows_omitted, precision, note = stream_layers(
        (layer_a, layer_b), adapters, stride=stride, precision=precision, split_every=split_every,
        memory_limit=memory_limit, scheduler=scheduler, progress=progress, nan_policy=nan_policy,
        row_norms=row_norms, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    return Streamed(layer_a, layer_b, adapters, stats, rows_omitted, precision, note)


def stream_layers(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], *, stride: int = 1,
                  precision: Precision = "float32", split_every: int = SPLIT_EVERY,
                  memory_limit: int | str = MEMORY_LIMIT, scheduler: Any = None, progress: bool = False,
                  nan_policy: str = "raise", row_norms: bool = False, checkpoint: str | os.PathLike | None = None,
                  checkpoint_every: int = 16) -> tuple[Moments, int, str, str | None]:
    """Stream aligned, validated layers (one side each) into one Moments, in one pass over their chunks.

    Checks the memory budget first and warns when there are no more rows than a layer's channels.
    With ``checkpoint`` the running Moments are saved there every ``checkpoint_every`` chunks and a
    run of the same layers and options resumes from them (:mod:`chunkcca.checkpoint`).
    ``precision="auto"`` computes float64 Moments of the first datapoint chunk, keeps float32 products
    for the rest unless a side's correlation matrix there has a condition number above
    :data:`AUTO_CONDITION`, and merges the two. Returns (Moments, rows omitted, precision, note on
    the choice or None); a ValueError if no finite row is left.
    """
    if checkpoint is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
        if precision == "auto":
            raise ValueError("checkpointed runs need a fixed precision ('float32' or 'float64'), not 'auto'")
        if is_url(str(checkpoint)):
            raise ValueError(f"checkpoint {checkpoint}: checkpoints are written to local paths only")
    check_scheduler(scheduler)
    names = tuple(str(layer.name) for layer in layers)
    channels = [layer.sizes["channel"] for layer in layers]
    fan_in = fit_split_every(tuple(adapters), sum(channels), split_every=split_every, memory_limit=memory_limit,
                             names=names, row_norms=row_norms)
    datapoints = layers[0].sizes["datapoint"]
    rows = row_count(adapters[0], datapoints, stride)
    if rows <= max(channels):
        warnings.warn(
            f"only {rows} rows for {max(channels)} channels (layers {', '.join(map(repr, names))}): "
            f"the covariance is singular and correlations are meaningless; regularise with epsilon > 0 "
            f"or keep fewer dimensions with svcca(keep=...)", RuntimeWarning, stacklevel=4)
    data = [layer.data for layer in layers]
    options = dict(stride=stride, scheduler=scheduler, nan_policy=nan_policy, names=names, row_norms=row_norms)
    note = None
    with reading(layers):
        if precision == "auto":
            first = data[0].chunks[0][0]  # the first layer's first chunk (another's may then be read twice)
            pilot = stream_moments([d[:first] for d in data], adapters, precision="float64", **options)
            precision, note = _choose_precision(pilot, names, first)
            rest = stream_moments([d[first:] for d in data], adapters, precision=precision, split_every=fan_in,
                                  progress=progress, offset=first, **options) if first < datapoints else None
            stats = pilot if rest is None else pilot + rest
        elif checkpoint is not None:
            stats = stream_with_checkpoint(layers, adapters, checkpoint, every=checkpoint_every, precision=precision,
                                           split_every=fan_in, progress=progress, **options)
        else:
            stats = stream_moments(data, adapters, precision=precision, split_every=fan_in, progress=progress,
                                   **options)
    if stats.n == 0:
        raise ValueError(f"every row of layers {', '.join(map(repr, names))} holds NaN or Inf; nothing is left")
    return stats, rows - stats.n, precision, note


def _choose_precision(pilot: Moments, names: Sequence[str], datapoints: int) -> tuple[str, str]:
    """float32 or float64 products for ``precision="auto"``, from the pilot chunk's correlation matrices."""
    worst, worst_name = 0.0, ""
    for name, part in zip(names, pilot.side_slices()):
        scatter = pilot.scatter[..., part, part]
        kept = np.diagonal(scatter, axis1=-2, axis2=-1).real > 0
        condition = np.inf if pilot.n <= int(kept.sum(axis=-1).max()) else _condition(scatter, kept)
        if condition > worst:
            worst, worst_name = condition, name
    choice = "float64" if worst > AUTO_CONDITION else "float32"
    return choice, (f"auto: {choice} products; the largest correlation-matrix condition number in the first chunk "
                    f"({datapoints} datapoints) is {worst:.3g}, of layer {worst_name!r} (threshold {AUTO_CONDITION:g})")


def _condition(scatter: np.ndarray, kept: np.ndarray) -> float:
    """Largest condition number of the correlation matrices of the kept (non-constant) channels."""
    worst = 0.0
    for index in np.ndindex(*scatter.shape[:-2]):
        keep = np.flatnonzero(kept[index])
        block = scatter[index][np.ix_(keep, keep)]
        scale = np.sqrt(np.diagonal(block).real)
        worst = max(worst, float(np.linalg.cond(block / np.outer(scale, scale))))
    return worst


def compute_moments(a: Any, b: Any, *, spatial: str = "flatten", stride: int = 1, precision: Precision = "float32",
                    method: str = "linear", grid: str = "coords", split_every: int = SPLIT_EVERY,
                    memory_limit: int | str = MEMORY_LIMIT, scheduler: Any = None,
                    progress: bool = False, nan_policy: str = "raise", dims: Any = None,
                    row_norms: bool = False, checkpoint: str | os.PathLike | None = None,
                    checkpoint_every: int = 16) -> Moments:
    """The :class:`~chunkcca.moments.Moments` of two layers' rows, in one streamed pass.

    Arguments as for :func:`chunkcca.cca`. The result can be saved, merged with the Moments of
    more datapoints (``m1 + m2``) and solved with :func:`chunkcca.cca_from_moments`. For
    ``spatial="dft"`` it has batch dims (freq_h, freq_w) and complex statistics. ``row_norms=True``
    adds the row-norm sums that :func:`chunkcca.cka_from_moments` needs with ``debiased=True``.

    ``checkpoint``: a path where the running Moments are saved (atomically) after every
    ``checkpoint_every`` chunks of datapoints; calling again with the same path, layers and options
    after an interruption resumes without reading the finished chunks again (see
    :mod:`chunkcca.checkpoint`).
    """
    return stream_pair(a, b, spatial=spatial, stride=stride, precision=precision, method=method, grid=grid,
                       split_every=split_every, memory_limit=memory_limit, scheduler=scheduler,
                       progress=progress, nan_policy=nan_policy, dims=dims, row_norms=row_norms,
                       checkpoint=checkpoint, checkpoint_every=checkpoint_every).moments
