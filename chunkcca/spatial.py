"""Spatial adapters: turn one chunk of a layer into the rows that enter the statistics.

A block is a numpy array of shape (datapoint, height, width, channel) or (datapoint, channel)
(fully connected: height = width = 1). An :class:`Adapter` maps it to rows of shape
(*batch, rows, channel), ``rows_per_datapoint`` rows per datapoint in C order of
(datapoint, height, width):

- ``flatten``: every (datapoint, height, width) position is a row (google/svcca's
  ``acts.reshape(-1, C)``); a view of the block, no copy.
- ``avgpool``: the mean over (height, width), one row per datapoint.
- ``interp``: the block resampled onto a target grid (separable linear, nearest or cubic
  interpolation, one small matrix per axis), then flattened.
- ``dft``: the 2-D DFT over (height, width), restricted to the kept frequencies; batch dims
  (freq_h, freq_w), one row per datapoint per frequency.

``stride`` then keeps every ``stride``-th row of the *global* row order, whatever the
chunking: a block whose first datapoint is ``d0`` starts at global row ``d0 · rows_per_datapoint``.
With ``flatten`` that is exactly google/svcca's ``acts.reshape(-1, C)[::stride]``: a
deterministic pattern (every other pixel column when the width is even), not random sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from .store import pixel_centres

#: The spatial adapters, by name.
SPATIAL: tuple[str, ...] = ("flatten", "avgpool", "interp", "dft")
METHODS: tuple[str, ...] = ("linear", "nearest", "cubic")
GRIDS: tuple[str, ...] = ("coords", "svcca")


def spatial_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(height, width) of a layer of shape (datapoint, height, width, channel) or (datapoint, channel)."""
    return (int(shape[1]), int(shape[2])) if len(shape) == 4 else (1, 1)


@dataclass(frozen=True)
class Adapter:
    """How one layer's blocks become rows.

    ``resample`` holds the (out, in) interpolation matrices for height and width (``interp``;
    None for an axis left as it is); ``frequencies`` the kept DFT indices along height and
    width and ``spectrum_dtype`` the dtype the FFT runs in (``dft``).
    """

    kind: str
    shape: tuple[int, int]
    resample: tuple[np.ndarray | None, np.ndarray | None] | None = None
    frequencies: tuple[np.ndarray, np.ndarray] | None = None
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
        if self.frequencies is None:
            return ()
        return (self.frequencies[0].size, self.frequencies[1].size)

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
        raise ValueError(f"unknown spatial adapter {self.kind!r}; expected one of {', '.join(SPATIAL)}")


def block_rows(block: np.ndarray, adapter: Adapter, first_datapoint: int, stride: int) -> np.ndarray:
    """Rows (*batch, rows, channel) of ``block`` under ``adapter``, keeping global rows ≡ 0 (mod ``stride``)."""
    rows = adapter.rows(block)
    start = (-first_datapoint * adapter.rows_per_datapoint) % stride
    return rows[..., start::stride, :]


def row_count(adapter: Adapter, datapoints: int, stride: int) -> int:
    """Rows ``datapoints`` give under ``adapter`` and ``stride`` (per frequency for dft): ceil(N·r / stride)."""
    return -(-datapoints * adapter.rows_per_datapoint // stride)


def plan_adapters(spatial: str, a: xr.DataArray, b: xr.DataArray, *, method: str = "linear",
                  grid: str = "coords", precision: str = "float64") -> tuple[Adapter, Adapter]:
    """The adapters of two layers compared with ``spatial``; raises naming the layers if they cannot pair.

    ``precision`` sets the FFT's dtype for dft (complex64 for "float32").
    """
    size_a, size_b = spatial_shape(a.shape), spatial_shape(b.shape)
    if spatial == "flatten":
        if size_a != size_b:
            raise ValueError(
                f"spatial='flatten' needs equal spatial sizes, but layer {a.name!r} is {size_a[0]}x{size_a[1]} "
                f"and layer {b.name!r} is {size_b[0]}x{size_b[1]}; use spatial='avgpool', 'interp' or 'dft' "
                f"to compare layers of different spatial sizes")
        return Adapter("flatten", size_a), Adapter("flatten", size_b)
    if spatial == "avgpool":
        return Adapter("avgpool", size_a), Adapter("avgpool", size_b)
    if spatial == "interp":
        matrices = [_resample_axis(dim, a, b, method=method, grid=grid) for dim in ("height", "width")]
        return (Adapter("interp", size_a, resample=(matrices[0][0], matrices[1][0])),
                Adapter("interp", size_b, resample=(matrices[0][1], matrices[1][1])))
    if spatial == "dft":
        kept = [shared_frequencies(size_a[axis], size_b[axis]) for axis in (0, 1)]
        dtype = "complex64" if precision == "float32" else "complex128"
        return (Adapter("dft", size_a, frequencies=(kept[0][0], kept[1][0]), spectrum_dtype=dtype),
                Adapter("dft", size_b, frequencies=(kept[0][1], kept[1][1]), spectrum_dtype=dtype))
    raise ValueError(f"spatial must be one of {', '.join(map(repr, SPATIAL))}, got {spatial!r}")


def shared_frequencies(size_a: int, size_b: int) -> tuple[np.ndarray, np.ndarray]:
    """DFT indices of the frequencies both sizes share, in the smaller size's FFT order.

    As google/svcca's ``fft_resize``: frequencies f (in cycles per map) with
    ``-m/2 <= f < m/2``, m the smaller size.
    """
    order = frequency_labels(size_a, size_b)
    return order % size_a, order % size_b  # frequency f sits at index f mod n of an n-point DFT


def frequency_labels(size_a: int, size_b: int) -> np.ndarray:
    """Frequencies (cycles per map) of :func:`shared_frequencies`, in the same order: numpy's
    ``fftfreq(m) * m`` for the smaller size m, as exact integers."""
    index = np.arange(min(size_a, size_b))
    return np.where(index < (index.size + 1) // 2, index, index - index.size)


def _positions(layer: xr.DataArray, dim: str, grid: str, extent: int) -> np.ndarray:
    """Sample positions of ``layer`` along ``dim``: its coordinate, or svcca's index grid.

    A layer without the coordinate is taken to span ``extent`` (the finer layer's size), as
    :func:`chunkcca.write_activations` places pixel centres: (i + 0.5) · extent / size.
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

    if method not in METHODS:
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
