"""Row adapters: turn one chunk of a layer into the rows that enter the statistics.

A block is a numpy array of shape (datapoint, height, width, channel) or (datapoint, channel)
(fully connected: height = width = 1). An ``Adapter`` maps it to rows of shape
(*batch, rows, channel), ``rows_per_datapoint`` rows per datapoint in C order of
(datapoint, height, width):

- ``flatten``: every (datapoint, height, width) position is a row (google/svcca's
  ``acts.reshape(-1, C)``); a view of the block, no copy.
- ``avgpool``: the mean over (height, width), one row per datapoint.
- ``interp``: the block resampled onto a target grid (separable linear, nearest or cubic
  interpolation, one small matrix per axis), then flattened.
- ``dft``: the 2-D DFT over (height, width), restricted to the kept frequencies; batch dims
  (freq_h, freq_w), one row per datapoint per frequency.

The adapter's ``stride`` then keeps every ``stride``-th row of the *global* row order, whatever the
chunking: a block whose first datapoint is ``d0`` starts at global row ``d0 · rows_per_datapoint``.
With ``flatten`` that is exactly google/svcca's ``acts.reshape(-1, C)[::stride]``: a
deterministic pattern (every other pixel column when the width is even), not random sampling.

This module is the only one that knows the adapters by name: everything else asks an
``Adapter`` (or ``is_batched()``) what it gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from .options import MASK, METHODS, PER_DATAPOINT, PER_FREQUENCY, SWEEP_SPATIAL, StreamOptions


def by_gram(spatial: str) -> bool:
    """Whether the adapter ``spatial`` gives rows too wide for a covariance (a datapoint's whole map), so that
    measures come from Gram matrices of datapoints instead of Moments."""
    return spatial == "features"


def is_batched(spatial: str) -> bool:
    """Whether the adapter ``spatial`` gives one set of statistics per spatial frequency (batch dims)."""
    return spatial in PER_FREQUENCY


def pixel_centres(size: int, extent: float) -> np.ndarray:
    """Centres of the pixels of a ``size``-pixel map spanning ``extent`` (input-image units): (i + 0.5)·extent/size."""
    return (np.arange(size) + 0.5) * (extent / size)


def spatial_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The position sizes of a layer of shape (datapoint, *positions, channel): () for a fully connected layer."""
    return tuple(int(size) for size in shape[1:-1])


#: Short names of the frequency dims of the usual position dims (older results call them so).
_FREQUENCY_DIMS = {"height": "freq_h", "width": "freq_w"}


def frequency_dim(position: str) -> str:
    """The name of the frequency dim along a position dim: ``freq_h``, ``freq_w``, else ``freq_<dim>``."""
    return _FREQUENCY_DIMS.get(position, f"freq_{position}")


#: What the FFT's rounding can make of a coefficient that is 0, per log2 of the map's positions, relative to the
#: norm of the datapoint's channel over its positions: numpy's FFT of maps uniform along an axis gave at most
#: 1.6 · eps64 · log2(positions) at its other frequencies (sizes 3 to 56 × 56); ten times that is 0.
FFT_RTOL = 16 * float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class Adapter:
    """How one layer's blocks become rows.

    ``kind`` is the spatial adapter, ``shape`` the layer's position sizes (() for a fully connected
    layer) along its position dims ``dims``, ``stride`` the step through the global row order.
    ``resample`` holds an (out, in) interpolation matrix per position dim (``interp``, made with
    ``method`` on ``grid``; None for an axis left as it is); ``frequencies`` the kept DFT indices
    per position dim and ``frequency_labels`` their frequencies in cycles per map (``dft``, whose FFT runs in
    complex128 whatever the products' precision: a common offset rounded with the values in complex64 moved
    ρ by 8e-3 at 1e6).

    A padding mask (datapoint, *positions), True at real positions, selects rows: ``flatten`` keeps
    the rows (after the stride) where the mask it is given is True (both layers' masks, combined
    by the engine: ``mask_rule`` "pair"); ``avgpool`` averages each datapoint's real positions, and ``first``
    and ``last`` take its first and last real positions, each under its own layer's mask (``mask_rule`` "own").
    """

    kind: str
    shape: tuple[int, ...]
    stride: int = 1
    dims: tuple[str, ...] = ()
    resample: tuple[np.ndarray | None, ...] | None = None
    method: str | None = None
    grid: str | None = None
    frequencies: tuple[np.ndarray, ...] | None = None
    frequency_labels: tuple[np.ndarray, ...] | None = None

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Position sizes of the maps whose positions become rows."""
        if self.resample is None:
            return self.shape
        return tuple(size if matrix is None else matrix.shape[0] for size, matrix in zip(self.shape, self.resample))

    @property
    def rows_per_datapoint(self) -> int:
        if self.kind in PER_DATAPOINT:
            return 1
        return int(np.prod(self.out_shape, dtype=np.int64))

    @property
    def mask_rule(self) -> str:
        """How a padding mask selects rows: "pair" (rows where both layers are real), "own" (each layer's own)."""
        return "pair" if self.kind in ("flatten",) else "own"

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Frequencies per position dim for dft, () for the others."""
        if self.frequencies is None:
            return ()
        return tuple(kept.size for kept in self.frequencies)

    @property
    def spectrum_positions(self) -> int:
        """The positions each row's spectrum sums over (dft: the map's size; ``Moments.positions``), 0 for rows of
        other kinds."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.frequencies is not None else 0

    @property
    def batch_coords(self) -> dict[str, np.ndarray]:
        """Labels of the batch dims: ``freq_h``/``freq_w`` (``freq_<dim>``) in cycles per map for dft."""
        if self.frequency_labels is None:
            return {}
        return {frequency_dim(dim): labels for dim, labels in zip(self.dims, self.frequency_labels)}

    @property
    def made_as_taken(self) -> bool:
        """Whether ``block_rows()`` makes rows as they are taken (``SpectrumRows``: dft)."""
        return self.kind == "dft"

    @property
    def is_complex(self) -> bool:
        """Whether the rows are complex (dft)."""
        return self.kind == "dft"

    @property
    def attrs(self) -> dict[str, Any]:
        """What a result records of the rows: the adapter, the stride, and method and grid for interp."""
        interp = {"method": self.method, "grid": self.grid} if self.method is not None else {}
        return {"spatial": self.kind, "stride": int(self.stride), **interp}

    def made_bytes(self, channels: int, datapoints: int, rows_at_once: int) -> int:
        """Bytes of the new arrays ``block_rows()`` makes at most for a chunk of ``datapoints`` datapoints of
        ``channels`` channels whose rows are taken ``rows_at_once`` at a time: for dft, per datapoint
        transformed at once, its block taken and cast, its whole spectrum and the kept frequencies; for interp,
        per datapoint, each resampling step's output and its move; 0 for the others (views, or one row per
        datapoint)."""
        positions = int(np.prod(self.shape, dtype=np.int64))
        if self.kind == "dft":
            kept = int(np.prod(self.batch_shape, dtype=np.int64))
            per = (2 * positions + kept) * channels * np.dtype(np.complex128).itemsize
            return min(datapoints, rows_at_once) * per
        if self.kind == "interp":
            return datapoints * 2 * max(positions, int(np.prod(self.out_shape, dtype=np.int64))) * channels * 8
        return 0

    def row_count(self, datapoints: Any) -> Any:
        """Rows the first ``datapoints`` datapoints give (per frequency for dft) before any mask: ceil(N ·
        rows_per_datapoint / stride); an int, or an array of them for an array of counts."""
        return -(-datapoints * self.rows_per_datapoint // self.stride)

    def strided(self, datapoints: Any) -> Any:
        """Whether each datapoint of ``datapoints`` (global indices, a numpy or Dask array) gives a row the stride
        keeps (the global rows ≡ 0 mod ``stride``): every one when each gives at least ``stride`` rows."""
        starts = datapoints * self.rows_per_datapoint
        return -(-starts // self.stride) * self.stride < starts + self.rows_per_datapoint

    def _selected(self, first_datapoint: int, mask: np.ndarray | None) -> tuple[int, np.ndarray | None]:
        """The first kept row of a block (the stride's pattern over the global rows) and, with a mask that
        selects rows, which of the strided rows it keeps."""
        start = (-first_datapoint * self.rows_per_datapoint) % self.stride
        if mask is None or self.mask_rule != "pair":
            return start, None
        return start, mask.reshape(-1)[start :: self.stride]

    def block_datapoints(self, datapoints: int, first_datapoint: int, mask: np.ndarray | None = None) -> np.ndarray:
        """For the rows ``block_rows`` gives of a block of ``datapoints`` datapoints starting at global datapoint
        ``first_datapoint``: the block-local datapoint each row comes from, shape (rows,)."""
        start, keep = self._selected(first_datapoint, mask)
        index = np.arange(start, datapoints * self.rows_per_datapoint, self.stride) // self.rows_per_datapoint
        return index if keep is None else index[keep]

    def block_rows(self, block: np.ndarray, first_datapoint: int, mask: np.ndarray | None = None) -> np.ndarray:
        """Rows (*batch, rows, channel) of ``block`` whose first datapoint is ``first_datapoint``, keeping
        the global rows ≡ 0 (mod ``stride``) and, under ``mask`` (datapoint, *positions), the real ones. For dft,
        ``SpectrumRows``: each slice of rows is transformed when it is taken."""
        if self.kind == "dft":
            return SpectrumRows(self, block, self.block_datapoints(block.shape[0], first_datapoint, mask))
        rows = self.rows(block, mask if self.mask_rule == "own" else None)
        start, keep = self._selected(first_datapoint, mask)
        rows = rows[..., start :: self.stride, :]
        return rows if keep is None else rows[..., keep, :]

    def rows(self, block: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """All rows (*batch, rows, channel) of ``block`` (datapoint, *positions, channel), before the stride;
        ``mask`` (datapoint, *positions): the layer's own padding mask, for avgpool, first and last."""
        datapoints, channels = block.shape[0], block.shape[-1]
        if self.kind == "flatten":
            return block.reshape(-1, channels)
        per_datapoint = block.reshape(datapoints, -1, channels)
        if self.kind == "avgpool":
            if mask is None:
                return per_datapoint.mean(axis=1, dtype=np.float64)
            real = mask.reshape(datapoints, -1, 1)  # padding may hold anything, NaN included: left out, not scaled
            # (a datapoint without a real position is refused unless the stride skips it: 0 rows, not 0 / 0)
            return np.where(real, per_datapoint, 0).sum(axis=1, dtype=np.float64) / np.maximum(real.sum(axis=1), 1)
        if self.kind == "first":
            if mask is None:
                return per_datapoint[:, 0]
            first = np.argmax(mask.reshape(datapoints, -1), axis=1)  # the first real position (left padding)
            return per_datapoint[np.arange(datapoints), first]
        if self.kind == "features":
            return block.reshape(datapoints, -1)
        if self.kind == "last":
            if mask is None:
                return per_datapoint[:, -1]
            flat = mask.reshape(datapoints, -1)
            last = flat.shape[1] - 1 - np.argmax(flat[:, ::-1], axis=1)
            return per_datapoint[np.arange(datapoints), last]
        if self.kind == "interp":
            return self._resampled(block).reshape(-1, channels)
        if self.kind == "dft":
            return self.spectrum(block)
        raise ValueError(f"unknown spatial adapter {self.kind!r}")

    def _resampled(self, block: np.ndarray) -> np.ndarray:
        """``block`` (datapoint, *positions, channel) resampled along each position dim by ``self.resample``'s
        matrices (target, source). A NaN or Inf reaches only the values whose weights on it are not 0 (NaN there),
        not, through 0 · NaN, every value of its datapoint: nan_policy="omit" then leaves out only those rows."""
        broken = None if np.isfinite(block).all() else ~np.isfinite(block)
        if broken is not None:
            block = np.where(broken, 0.0, block)
        for axis, matrix in enumerate(self.resample or ()):
            if matrix is not None:
                block = np.moveaxis(np.tensordot(matrix, block, axes=(1, axis + 1)), 0, axis + 1)
                if broken is not None:
                    broken = np.moveaxis(np.tensordot(matrix != 0, broken, axes=(1, axis + 1)), 0, axis + 1)
        return block if broken is None else np.where(broken, np.nan, block)

    def spectrum(self, block: np.ndarray) -> np.ndarray:
        """The kept frequencies of each datapoint's map: (*frequencies, datapoint, channel), complex128. Products
        in single precision take these rows less their shift, then rounded (``moments``), so an offset common to
        the values costs no digits."""
        axes = tuple(range(1, block.ndim - 1))
        flat = block.reshape(block.shape[0], -1, block.shape[-1])
        norms = np.sqrt(np.einsum("dpc,dpc->dc", flat, flat, dtype=np.float64))  # (datapoint, channel)
        # complex128 runs faster from a complex128 copy than from float64 (the cast is exact either way)
        spectrum = np.fft.fftn(block.astype(np.complex128, copy=False), axes=axes)
        # one gather, straight into (*frequencies, datapoint, channel) C order
        kept = np.moveaxis(spectrum, 0, -2)[np.ix_(*self.frequencies)]
        del spectrum
        # a coefficient within the FFT's rounding of 0 is 0: a channel uniform along an axis has none at that
        # axis's other frequencies, and its rounding noise, whitened, counted as a direction
        noise = FFT_RTOL * max(1.0, np.log2(flat.shape[1])) * np.where(np.isfinite(norms), norms, 0.0)
        kept[np.abs(kept) <= noise] = 0
        return kept


class SpectrumRows:
    """The dft rows (*frequencies, rows, channel) of a block, transformed a slice of rows at a time as they are
    taken (``rows[..., lo:hi, :]``, any index along rows): a chunk's whole spectrum, several times the chunk,
    is never held at once. ``np.asarray()`` transforms all of them."""

    def __init__(self, adapter: Adapter, block: np.ndarray, datapoints: np.ndarray) -> None:
        self.adapter, self.block, self.datapoints = adapter, block, datapoints
        self.dtype = np.dtype(np.complex128)
        self.shape = (*adapter.batch_shape, datapoints.size, block.shape[-1])
        self.ndim = len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray | SpectrumRows:
        """``rows[..., rows_index, :]`` or ``rows[..., rows_index]``: for a slice, the spectra of those rows; for
        an index array or mask (a group's rows, the finite ones), those rows, still made as they are taken."""
        if not (isinstance(index, tuple) and index[0] is Ellipsis and len(index) in (2, 3)
                and (len(index) == 2 or index[2] == slice(None))):
            raise IndexError(f"SpectrumRows takes rows[..., rows, :], got {index!r}")
        if not isinstance(index[1], slice):
            return SpectrumRows(self.adapter, self.block, self.datapoints[index[1]])
        return self.adapter.spectrum(self.block[self.datapoints[index[1]]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self[..., :, :]
        return rows if dtype is None else rows.astype(dtype)


def plan_adapters(a: xr.DataArray, b: xr.DataArray, options: StreamOptions) -> tuple[Adapter, Adapter]:
    """The adapters of two layers compared with ``options.spatial``; raises naming the layers if they cannot pair.

    """
    spatial, stride = options.spatial, options.stride
    size_a, size_b = spatial_shape(a.shape), spatial_shape(b.shape)
    dims_a, dims_b = tuple(map(str, a.dims[1:-1])), tuple(map(str, b.dims[1:-1]))
    described = {name: f"{'x'.join(map(str, size)) or 'fc'} ({', '.join(dims) or 'no positions'})"
                 for name, size, dims in ((a.name, size_a, dims_a), (b.name, size_b, dims_b))}
    _refuse_masks([a, b], spatial)
    if spatial in ("avgpool", "first", "last", "features"):
        return Adapter(spatial, size_a, stride, dims_a), Adapter(spatial, size_b, stride, dims_b)
    if spatial == "flatten":
        if size_a != size_b:
            masked = any(MASK in layer.coords for layer in (a, b))  # interp and dft refuse padding
            others = (", or 'interp' or 'dft' (the same position dims, of other sizes)" if dims_a == dims_b
                      and dims_a and not masked else ", 'first' or 'last'" if masked else "")
            raise ValueError(
                f"spatial='flatten' needs equal positions, but layer {a.name!r} is {described[a.name]} and layer "
                f"{b.name!r} is {described[b.name]}; use spatial='avgpool' (--spatial avgpool: any positions){others}")
        _check_flatten_names([a, b])
        return Adapter("flatten", size_a, stride, dims_a), Adapter("flatten", size_b, stride, dims_b)
    if not dims_a and not dims_b:  # it advised avgpool, which averages nothing here
        raise ValueError(f"spatial={spatial!r} works on position dims, and layers {a.name!r} and {b.name!r} are fully "
                         f"connected (no positions): use spatial='flatten' (the default: a row per datapoint)")
    if dims_a != dims_b or not dims_a:
        rename = (f" or rename one's dim (layer.rename({dims_b[0]}={dims_a[0]!r}))" if len(dims_a) == len(dims_b) == 1
                  else "")
        raise ValueError(f"spatial={spatial!r} pairs layers position dim by position dim, by name, but layer "
                         f"{a.name!r} is {described[a.name]} and layer {b.name!r} is {described[b.name]}; use "
                         f"spatial='avgpool' (--spatial avgpool){rename}")
    if spatial == "interp":
        method, grid = options.method, options.grid
        matrices = [_resample_axis(dim, a, b, method=method, grid=grid) for dim in dims_a]
        return (Adapter("interp", size_a, stride, dims_a, resample=tuple(m[0] for m in matrices), method=method,
                        grid=grid),
                Adapter("interp", size_b, stride, dims_b, resample=tuple(m[1] for m in matrices), method=method,
                        grid=grid))
    kept = [shared_frequencies(size_a[axis], size_b[axis]) for axis in range(len(dims_a))]
    labels = tuple(frequency_labels(size_a[axis], size_b[axis]) for axis in range(len(dims_a)))
    return (Adapter("dft", size_a, stride, dims_a, frequencies=tuple(k[0] for k in kept), frequency_labels=labels),
            Adapter("dft", size_b, stride, dims_b, frequencies=tuple(k[1] for k in kept), frequency_labels=labels))


def _refuse_masks(layers: Sequence[xr.DataArray], spatial: str) -> None:
    """A padding mask selects rows under flatten, avgpool, first and last only: a masked layer is refused under the
    others ("features" takes each datapoint's whole map, padding included; interp and dft mix positions)."""
    masked = [str(layer.name) for layer in layers if MASK in layer.coords]
    if masked and spatial not in ("flatten", "avgpool", "first", "last"):
        why = ("makes each datapoint's whole map a vector, padding included" if spatial == "features"
               else "has no meaning on padded positions")
        raise ValueError(f"spatial={spatial!r} {why}, and layer {masked[0]!r} has a mask; use spatial='flatten', "
                         f"'avgpool', 'first' or 'last' (--spatial)")


def _check_flatten_names(layers: Sequence[xr.DataArray]) -> None:
    """Flattened layers of more than one position dim pair them by name: other names (x, y against height,
    width) are refused, as which pairs with which is a guess. One position dim pairs by order (token with time)."""
    named = {str(layer.name): tuple(map(str, layer.dims[1:-1])) for layer in layers}
    if len(set(named.values())) > 1 and max(map(len, named.values())) > 1:
        listed = ", ".join(f"{name!r} {dims}" for name, dims in named.items())
        raise ValueError(f"spatial='flatten' pairs position dims by name, and the layers name theirs differently: "
                         f"{listed}; give them one set of names (DataArray.rename, or dims=)")


def plan_sweep_adapters(layers: Sequence[xr.DataArray], options: StreamOptions) -> tuple[Adapter, ...]:
    """One adapter per layer for a sweep, where every layer's rows must not depend on its partner's
    (``SWEEP_SPATIAL``: flatten, with one spatial size for all, avgpool, first, last, features); raises naming the
    layers otherwise."""
    if options.spatial not in SWEEP_SPATIAL:
        raise ValueError(f"similarity supports spatial={' or '.join(map(repr, SWEEP_SPATIAL))}; "
                         f"spatial={options.spatial!r} "
                         f"pairs each two layers on their own: compare pairs with chunkcca.compare or chunkcca.cca")
    _refuse_masks(layers, options.spatial)
    if options.spatial == "flatten":
        sizes = {str(layer.name): tuple(layer.shape[1:-1]) for layer in layers}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{name!r} {'x'.join(map(str, size)) or 'fc'}" for name, size in sizes.items())
            raise ValueError(f"spatial='flatten' needs one spatial size for all layers, got {listed}; use "
                             f"spatial='avgpool' (--spatial avgpool)")
        _check_flatten_names(layers)
    return tuple(Adapter(options.spatial, spatial_shape(layer.shape), options.stride, tuple(map(str, layer.dims[1:-1])))
                 for layer in layers)


def shared_frequencies(size_a: int, size_b: int) -> tuple[np.ndarray, np.ndarray]:
    """DFT indices of the frequencies both sizes share, in the smaller size's FFT order.

    As google/svcca's ``fft_resize``: frequencies f (in cycles per map) with
    ``-m/2 <= f < m/2``, m the smaller size.
    """
    order = frequency_labels(size_a, size_b)
    return order % size_a, order % size_b  # frequency f sits at index f mod n of an n-point DFT


def frequency_labels(size_a: int, size_b: int) -> np.ndarray:
    """Frequencies (cycles per map) of ``shared_frequencies()``, in the same order: numpy's
    ``fftfreq(m) * m`` for the smaller size m, as exact integers."""
    index = np.arange(min(size_a, size_b))
    return np.where(index < (index.size + 1) // 2, index, index - index.size)


def _positions(labels: np.ndarray | None, size: int, grid: str, extent: int) -> np.ndarray:
    """Sample positions of a layer of ``size`` positions: its ``labels`` (as numbers, ``_labels_as_numbers``), or
    svcca's index grid.

    A layer without labels is taken to span ``extent`` (the other layer's input, as its pixel centres
    say, or the finer layer's size when neither is labelled), as ``chunkcca.write_activations()`` places pixel
    centres: (i + 0.5) · extent / size.
    """
    if grid == "svcca":
        return np.linspace(0, size, size, endpoint=False)
    if labels is not None:
        return labels
    return pixel_centres(size, extent)


def _labels_as_numbers(a: xr.DataArray, b: xr.DataArray, dim: str) -> list[np.ndarray | None]:
    """Each layer's ``dim`` labels as float64 numbers in one unit (None where a layer has none): times
    (datetime64) as durations since the earlier first of the two, so that float64 keeps their resolution (as
    nanoseconds since 1970 it rounds them to 256 ns), and times and durations (timedelta64) in the finer of the two
    layers' units, so that one of nanoseconds is placed beside one of milliseconds as the same instants. Times
    beside durations or plain numbers are an error naming the layers and the dim (NaT labels do not increase, so
    ``as_activations`` refuses them)."""
    labels = [np.asarray(layer[dim].values) if dim in layer.coords else None for layer in (a, b)]
    for layer, values in zip((a, b), labels):
        if values is not None and values.dtype.kind not in "iufmM":  # cftime, datetime.date, names
            raise ValueError(f"layer {layer.name!r} labels its {dim} positions with {values.dtype} values (e.g. "
                             f"{values.flat[0]!r}): interp places positions by numbers, times (datetime64) or "
                             f"durations (timedelta64); give its {dim} coordinates as one of them")
    kinds = {values.dtype.kind for values in labels if values is not None}
    if not kinds & {"M", "m"}:
        return [None if values is None else np.asarray(values, dtype=np.float64) for values in labels]
    named = [f"{layer.name!r} ({values.dtype})" for layer, values in zip((a, b), labels) if values is not None]
    if len(kinds) > 1:
        raise ValueError(f"layers {' and '.join(named)} label their {dim} positions in different kinds (times, "
                         f"durations, numbers): interp cannot place one on the other; give both {dim} coordinates "
                         f"of one kind")
    given = [values for values in labels if values is not None]
    common = np.result_type(*given)  # the finer of the two units
    unit = np.datetime_data(common)[0]
    origin = min(values.astype(common).min() for values in given) if kinds == {"M"} else np.timedelta64(0, unit)
    return [None if values is None else (values.astype(common) - origin) / np.timedelta64(1, unit)
            for values in labels]


def _resample_axis(dim: str, a: xr.DataArray, b: xr.DataArray, *, method: str,
                   grid: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(out, in) matrices taking each layer along ``dim`` onto the finer of the two grids (None: as it is).

    With ``grid="svcca"`` the coarser layer's samples sit at 0, 1, … and are read at
    ``linspace(0, small, large, endpoint=False)``, as google/svcca's conv tutorial does.
    """
    size_a, size_b = a.sizes.get(dim, 1), b.sizes.get(dim, 1)
    fine_is_a = size_a >= size_b
    coarse = b if fine_is_a else a
    fine_size, coarse_size = max(size_a, size_b), min(size_a, size_b)
    labelled = [grid == "coords" and dim in layer.coords for layer in (a, b)]
    # positions only numbered 0, 1, … (a store's tokens, time steps, depths), or, off the image's height and width
    # (whose unlabelled maps span one image), not labelled at all: nothing says where each sits in the input
    numbered = [grid == "coords" and (np.array_equal(layer[dim].values, np.arange(layer.sizes[dim])) if known
                                      else dim not in ("height", "width")) for layer, known in zip((a, b), labelled)]
    if all(numbered) and size_a == size_b:  # position i of one is position i of the other
        return None, None
    unplaced = [grid == "coords" and not known and dim not in ("height", "width") for known in labelled]
    if any(unplaced) and not all(numbered) and size_a != size_b:  # a labelled layer says nothing of the other
        plain, placed = (a, b) if unplaced[0] else (b, a)
        raise ValueError(f"layer {plain.name!r} does not label its {dim} positions, beside layer {placed.name!r}, "
                         f"which does, and they have {plain.sizes[dim]} and {placed.sizes[dim]}: interp cannot tell "
                         f"where {plain.name!r}'s positions sit; set its {dim} coordinates to positions in the units "
                         f"of {placed.name!r}'s, or use grid='svcca' (both spanning the same input)")
    if all(numbered):
        raise ValueError(f"layers {a.name!r} and {b.name!r} number their {dim} positions 0, 1, … or do not label "
                         f"them ({size_a} and {size_b} of them): that says nothing of where each sits in the input, "
                         f"so interp cannot place one on the other; set their {dim} coordinates to positions in the "
                         f"input (e.g. sample centres), or use grid='svcca' (both spanning the same input)")
    numbers = _labels_as_numbers(a, b, dim) if grid == "coords" else [None, None]
    # labels agree to their own precision (float32 centres of a 14-pixel input are even to 1e-7 only: they were
    # taken for a crop, and a layer of another input's centres went unrefused)
    rtol = max([1e-9, *(8 * float(np.finfo(layer[dim].dtype).eps) for layer, known in zip((a, b), labelled)
                        if known and layer[dim].dtype.kind == "f")])
    spans = [_pixel_span(values, rtol) if known else None for values, known in zip(numbers, labelled)]
    if None not in spans and not np.isclose(spans[0], spans[1], rtol=rtol, atol=0):
        raise ValueError(f"layer {a.name!r} spans {spans[0]:g} input pixels along {dim} and layer {b.name!r} "
                         f"{spans[1]:g}: their pixel centres are in units of inputs of different sizes (a store "
                         f"written without image_size= takes its largest layer's size), or one is cropped from the "
                         f"input's first pixel (centres alone cannot tell which); write both into one store "
                         f"(chunkcca ingest: one command, or --append to the first store) or with one image_size=, "
                         f"crop the other layer to the same part of the input, or set their {dim} coordinates, or "
                         f"use grid='svcca'")
    extent = fine_size  # what an unlabelled layer spans: one input, in the units of the labelled one's centres
    if sum(labelled) == 1:
        extent = spans[labelled.index(True)]
        if extent is None:
            named, unnamed = (a, b) if labelled[0] else (b, a)
            raise ValueError(f"layer {named.name!r} places its {dim} positions otherwise than as the pixel centres "
                             f"of one input (a crop, an offset) and layer {unnamed.name!r} does not label them, so "
                             f"interp cannot tell where its samples sit; set its {dim} coordinates too, or use "
                             f"grid='svcca'")
    fine_labels, coarse_labels = numbers if fine_is_a else numbers[::-1]
    source = _positions(coarse_labels, coarse_size, grid, extent)
    if grid == "svcca":
        target = np.linspace(0, coarse_size, fine_size, endpoint=False)
    else:
        target = _positions(fine_labels, fine_size, grid, extent)
    matrix = interpolation_matrix(source, target, method, name=str(coarse.name), dim=dim)
    if fine_size == coarse_size and np.allclose(matrix, np.eye(fine_size)):
        matrix = None
    return (None, matrix) if fine_is_a else (matrix, None)


def _pixel_span(centres: Any, rtol: float = 1e-9) -> float | None:
    """The extent whose pixel centres ``centres`` are ((i + 0.5) · extent / size, as ``default_coords`` places
    them, to ``rtol``), or None for other positions (a crop, an offset, uneven steps: then there is nothing to
    compare)."""
    centres = np.asarray(centres, dtype=np.float64)
    if centres.size == 0 or not np.all(np.isfinite(centres)):
        return None
    step = centres[1] - centres[0] if centres.size > 1 else 2 * centres[0]
    even = np.allclose(np.diff(centres), step, rtol=rtol, atol=0) and np.isclose(centres[0], step / 2, rtol=rtol)
    return float(step * centres.size) if even and step > 0 else None


def interpolation_matrix(source: np.ndarray, target: np.ndarray, method: str, *, name: str = "",
                         dim: str = "") -> np.ndarray:
    """Matrix (len(target), len(source)) of 1-d interpolation from ``source`` positions to ``target``.

    Targets outside the source range take the nearest end sample's value (as interp2d's default
    extrapolation). ``nearest`` breaks ties towards the lower position; ``cubic`` is the
    not-a-knot cubic spline through the samples (needs 4 of them).
    """
    from scipy.interpolate import make_interp_spline

    if method not in METHODS:  # a public helper: StreamOptions checks the method of a comparison
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if source.size == 1:
        return np.ones((target.size, 1))
    clamped = np.clip(target, source[0], source[-1])
    if method == "nearest":
        upper = np.clip(np.searchsorted(source, clamped, side="left"), 1, source.size - 1)
        lower = upper - 1
        # a tie within rounding is a tie (pixel centres of 6 on 11 meet at 11/12 each side, 1 ulp apart)
        tie = 8 * np.finfo(float).eps * np.abs(source).max()
        choose_upper = (source[upper] - clamped) < (clamped - source[lower]) - tie
        matrix = np.zeros((target.size, source.size))
        matrix[np.arange(target.size), np.where(choose_upper, upper, lower)] = 1.0
        return matrix
    degree = 1 if method == "linear" else 3
    if source.size <= degree:
        raise ValueError(f"layer {name!r} has {source.size} samples along {dim}; method={method!r} needs "
                         f"at least {degree + 1}")
    return make_interp_spline(source, np.eye(source.size), k=degree)(clamped)
