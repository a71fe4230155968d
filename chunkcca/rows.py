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

from .options import METHODS, PER_FREQUENCY, SWEEP_SPATIAL, StreamOptions


def is_batched(spatial: str) -> bool:
    """Whether the adapter ``spatial`` gives one set of statistics per spatial frequency (batch dims)."""
    return spatial in PER_FREQUENCY


def pixel_centres(size: int, extent: float) -> np.ndarray:
    """Centres of the pixels of a ``size``-pixel map spanning ``extent`` (input-image units): (i + 0.5)·extent/size."""
    return (np.arange(size) + 0.5) * (extent / size)


def spatial_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(height, width) of a layer of shape (datapoint, height, width, channel) or (datapoint, channel)."""
    return (int(shape[1]), int(shape[2])) if len(shape) == 4 else (1, 1)


@dataclass(frozen=True)
class Adapter:
    """How one layer's blocks become rows.

    ``kind`` is the spatial adapter, ``shape`` the layer's (height, width), ``stride`` the step
    through the global row order. ``resample`` holds the (out, in) interpolation matrices for
    height and width (``interp``, made with ``method`` on ``grid``; None for an axis left as it
    is); ``frequencies`` the kept DFT indices along height and width, ``frequency_labels`` their
    frequencies in cycles per map, and ``spectrum_dtype`` the dtype the FFT runs in (``dft``).
    """

    kind: str
    shape: tuple[int, int]
    stride: int = 1
    resample: tuple[np.ndarray | None, np.ndarray | None] | None = None
    method: str | None = None
    grid: str | None = None
    frequencies: tuple[np.ndarray, np.ndarray] | None = None
    frequency_labels: tuple[np.ndarray, np.ndarray] | None = None
    spectrum_dtype: str = "complex128"

    @property
    def out_shape(self) -> tuple[int, int]:
        """(height, width) of the maps whose positions become rows."""
        if self.resample is None:
            return self.shape
        return tuple(size if matrix is None else matrix.shape[0]  # type: ignore[return-value]
                     for size, matrix in zip(self.shape, self.resample))

    @property
    def rows_per_datapoint(self) -> int:
        if self.kind in ("avgpool", "dft"):
            return 1
        height, width = self.out_shape
        return height * width

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """(freq_h, freq_w) sizes for dft, () for the others."""
        if self.frequencies is None:
            return ()
        return (self.frequencies[0].size, self.frequencies[1].size)

    @property
    def batch_coords(self) -> dict[str, np.ndarray]:
        """Labels of the batch dims: ``freq_h``/``freq_w`` in cycles per map for dft, none for the others."""
        if self.frequency_labels is None:
            return {}
        return {"freq_h": self.frequency_labels[0], "freq_w": self.frequency_labels[1]}

    @property
    def is_complex(self) -> bool:
        """Whether the rows are complex (dft)."""
        return self.kind == "dft"

    @property
    def attrs(self) -> dict[str, Any]:
        """What a result records of the rows: the adapter, the stride, and method and grid for interp."""
        interp = {"method": self.method, "grid": self.grid} if self.method is not None else {}
        return {"spatial": self.kind, "stride": int(self.stride), **interp}

    def row_count(self, datapoints: int) -> int:
        """Rows ``datapoints`` give (per frequency for dft): ceil(N · rows_per_datapoint / stride)."""
        return -(-datapoints * self.rows_per_datapoint // self.stride)

    def block_datapoints(self, datapoints: int, first_datapoint: int) -> np.ndarray:
        """For the rows :meth:`block_rows` gives of a block of ``datapoints`` datapoints starting at global datapoint
        ``first_datapoint``: the block-local datapoint each row comes from, shape (rows,)."""
        start = (-first_datapoint * self.rows_per_datapoint) % self.stride
        return np.arange(start, datapoints * self.rows_per_datapoint, self.stride) // self.rows_per_datapoint

    def block_rows(self, block: np.ndarray, first_datapoint: int) -> np.ndarray:
        """Rows (*batch, rows, channel) of ``block`` whose first datapoint is ``first_datapoint``, keeping
        the global rows ≡ 0 (mod ``stride``)."""
        rows = self.rows(block)
        start = (-first_datapoint * self.rows_per_datapoint) % self.stride
        return rows[..., start :: self.stride, :]

    def rows(self, block: np.ndarray) -> np.ndarray:
        """All rows (*batch, rows, channel) of ``block``, before the stride."""
        channels = block.shape[-1]
        if block.ndim == 2:
            block = block[:, None, None, :]
        if self.kind == "flatten":
            return block.reshape(-1, channels)
        if self.kind == "avgpool":
            return block.reshape(block.shape[0], -1, channels).mean(axis=1, dtype=np.float64)
        if self.kind == "interp":
            along_height, along_width = self.resample
            if along_height is not None:
                block = np.einsum("Hh,dhwc->dHwc", along_height, block, optimize=True)
            if along_width is not None:
                block = np.einsum("Ww,dhwc->dhWc", along_width, block, optimize=True)
            return block.reshape(-1, channels)
        if self.kind == "dft":
            # numpy >= 2 transforms float32 in complex64, faster from the real block than from a complex64
            # copy; complex128 runs faster from a complex128 copy than from float64 (the cast is exact either way)
            single = self.spectrum_dtype == "complex64" and not np.iscomplexobj(block)
            spectrum = np.fft.fft2(block.astype(np.float32 if single else self.spectrum_dtype, copy=False),
                                   axes=(1, 2))
            kept_h, kept_w = self.frequencies
            # one gather, straight into (freq_h, freq_w, datapoint, channel) C order
            return np.moveaxis(spectrum, 0, 2)[np.ix_(kept_h, kept_w)]
        raise ValueError(f"unknown spatial adapter {self.kind!r}")


def plan_adapters(a: xr.DataArray, b: xr.DataArray, options: StreamOptions) -> tuple[Adapter, Adapter]:
    """The adapters of two layers compared with ``options.spatial``; raises naming the layers if they cannot pair.

    ``options.precision`` sets the FFT's dtype for dft (complex64 for "float32").
    """
    spatial, stride = options.spatial, options.stride
    size_a, size_b = spatial_shape(a.shape), spatial_shape(b.shape)
    if spatial == "flatten":
        if size_a != size_b:
            raise ValueError(
                f"spatial='flatten' needs equal spatial sizes, but layer {a.name!r} is {size_a[0]}x{size_a[1]} "
                f"and layer {b.name!r} is {size_b[0]}x{size_b[1]}; use spatial='avgpool', 'interp' or 'dft' "
                f"to compare layers of different spatial sizes")
        return Adapter("flatten", size_a, stride), Adapter("flatten", size_b, stride)
    if spatial == "avgpool":
        return Adapter("avgpool", size_a, stride), Adapter("avgpool", size_b, stride)
    if spatial == "interp":
        method, grid = options.method, options.grid
        matrices = [_resample_axis(dim, a, b, method=method, grid=grid) for dim in ("height", "width")]
        return (Adapter("interp", size_a, stride, resample=(matrices[0][0], matrices[1][0]), method=method, grid=grid),
                Adapter("interp", size_b, stride, resample=(matrices[0][1], matrices[1][1]), method=method, grid=grid))
    kept = [shared_frequencies(size_a[axis], size_b[axis]) for axis in (0, 1)]
    labels = (frequency_labels(size_a[0], size_b[0]), frequency_labels(size_a[1], size_b[1]))
    dtype = "complex64" if options.precision == "float32" else "complex128"
    return (Adapter("dft", size_a, stride, frequencies=(kept[0][0], kept[1][0]), frequency_labels=labels,
                    spectrum_dtype=dtype),
            Adapter("dft", size_b, stride, frequencies=(kept[0][1], kept[1][1]), frequency_labels=labels,
                    spectrum_dtype=dtype))


def plan_sweep_adapters(layers: Sequence[xr.DataArray], options: StreamOptions) -> tuple[Adapter, ...]:
    """One adapter per layer for a sweep, where every layer's rows must not depend on its partner's
    (flatten, with one spatial size for all, or avgpool); raises naming the layers otherwise."""
    if options.spatial not in SWEEP_SPATIAL:
        raise ValueError(f"similarity supports spatial='flatten' or 'avgpool'; spatial={options.spatial!r} "
                         f"pairs each two layers on their own: compare pairs with chunkcca.compare or chunkcca.cca")
    if options.spatial == "flatten":
        sizes = {str(layer.name): tuple(layer.shape[1:-1]) for layer in layers}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{name!r} {'x'.join(map(str, size)) or 'fc'}" for name, size in sizes.items())
            raise ValueError(f"spatial='flatten' needs one spatial size for all layers, got {listed}; use "
                             f"spatial='avgpool'")
    return tuple(Adapter(options.spatial, spatial_shape(layer.shape), options.stride) for layer in layers)


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


def _positions(layer: xr.DataArray, dim: str, grid: str, extent: int) -> np.ndarray:
    """Sample positions of ``layer`` along ``dim``: its coordinate, or svcca's index grid.

    A layer without the coordinate is taken to span ``extent`` (the finer layer's size), as
    ``chunkcca.write_activations()`` places pixel centres: (i + 0.5) · extent / size.
    """
    size = layer.sizes.get(dim, 1)
    if grid == "svcca":
        return np.linspace(0, size, size, endpoint=False)
    if dim in layer.coords:
        return np.asarray(layer[dim].values, dtype=np.float64)
    return pixel_centres(size, extent)


def _resample_axis(dim: str, a: xr.DataArray, b: xr.DataArray, *, method: str,
                   grid: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(out, in) matrices taking each layer along ``dim`` onto the finer of the two grids (None: as it is).

    With ``grid="svcca"`` the coarser layer's samples sit at 0, 1, … and are read at
    ``linspace(0, small, large, endpoint=False)``, as google/svcca's conv tutorial does.
    """
    size_a, size_b = a.sizes.get(dim, 1), b.sizes.get(dim, 1)
    fine_is_a = size_a >= size_b
    fine, coarse = (a, b) if fine_is_a else (b, a)
    fine_size, coarse_size = max(size_a, size_b), min(size_a, size_b)
    source = _positions(coarse, dim, grid, fine_size)
    if grid == "svcca":
        target = np.linspace(0, coarse_size, fine_size, endpoint=False)
    else:
        target = _positions(fine, dim, grid, fine_size)
    for layer, positions in ((coarse, source), (fine, target)):
        if positions.size > 1 and not np.all(np.diff(positions) > 0):
            raise ValueError(f"layer {layer.name!r}: {dim} coordinates must increase to interpolate")
    matrix = interpolation_matrix(source, target, method, name=str(coarse.name), dim=dim)
    if fine_size == coarse_size and np.allclose(matrix, np.eye(fine_size)):
        matrix = None
    return (None, matrix) if fine_is_a else (matrix, None)


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
        choose_upper = (source[upper] - clamped) < (clamped - source[lower])
        matrix = np.zeros((target.size, source.size))
        matrix[np.arange(target.size), np.where(choose_upper, upper, lower)] = 1.0
        return matrix
    degree = 1 if method == "linear" else 3
    if source.size <= degree:
        raise ValueError(f"layer {name!r} has {source.size} samples along {dim}; method={method!r} needs "
                         f"at least {degree + 1}")
    return make_interp_spline(source, np.eye(source.size), k=degree)(clamped)
