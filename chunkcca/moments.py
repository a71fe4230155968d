"""Moments: the mergeable second-order statistics every measure is computed from.

A :class:`Moments` holds, for the concatenated channels ``z = [x | y | ...]`` of the
sides being compared, the row count ``n``, the ``mean`` (shape (p,)) and the centred
scatter matrix ``scatter = Σ (z − mean)(z − mean)ᴴ`` (shape (p, p)), in float64, or
complex128 for the per-frequency statistics of the DFT adapter (then Hermitian, with
``numpy.cov``'s convention ``scatter[i, j] = Σ zᵢ conj(zⱼ)``). Optional leading batch dims
hold one set of statistics per spatial frequency, all over the same rows.

Partials are computed per chunk on shifted data (never as raw sums ``Σ zzᵀ − n μμᵀ``,
which lose every digit on post-ReLU data with a large mean) and merged exactly with the
parallel formula of Chan et al. Merging is associative, so Dask may tree-reduce the
partials in any order and any chunking gives the same answer to rounding.

For streaming, a partial travels as one array of shape (1, *batch, p + 2, p): row 0 holds
``n`` in its first element, row 1 the mean and rows 2… the scatter (see :func:`pack`).
A float64 count is exact up to 2**53 rows.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import xarray as xr

Precision = Literal["float32", "float64"]
PRECISIONS: tuple[str, ...] = ("float32", "float64")

#: Bytes of the reused sub-block buffer of the per-chunk product (at most SUBBLOCK_ROWS rows).
SUBBLOCK_BYTES = 16 * 2**20
SUBBLOCK_ROWS = 8192
#: Rows whose mean is the per-chunk shift.
SHIFT_ROWS = 1024


@dataclass(frozen=True)
class Moments:
    """Row count, mean and centred scatter of the concatenated channels of one or more sides.

    Attributes
    ----------
    n : int
        Number of rows.
    mean : ndarray, float64 or complex128, shape (*batch, p)
    scatter : ndarray, same dtype, shape (*batch, p, p)
        ``Σ (z − mean)(z − mean)ᴴ`` over the rows; symmetric (Hermitian).
    sizes : tuple of int
        Channels of each side, in order; ``sum(sizes) == p``.
    """

    n: int
    mean: np.ndarray
    scatter: np.ndarray
    sizes: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        p = self.mean.shape[-1]
        sizes = tuple(int(s) for s in self.sizes) if self.sizes else (p,)
        object.__setattr__(self, "sizes", sizes)
        if self.scatter.shape != (*self.mean.shape, p):
            raise ValueError(f"scatter has shape {self.scatter.shape}, expected {(*self.mean.shape, p)} "
                             f"for mean of shape {self.mean.shape}")
        if sum(sizes) != p:
            raise ValueError(f"sizes {sizes} do not add up to the {p} channels of mean")
        if self.n < 0:
            raise ValueError(f"row count must be >= 0, got {self.n}")

    @property
    def channels(self) -> int:
        """Total channels p over all sides."""
        return self.mean.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading dims (one set of statistics each), () for plain Moments."""
        return self.mean.shape[:-1]

    def __getitem__(self, index: tuple[int, ...] | int) -> Moments:
        """The statistics of one batch element (e.g. one spatial frequency)."""
        return Moments(self.n, self.mean[index], self.scatter[index], self.sizes)

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Covariance ``scatter / (n − ddof)``, shape (*batch, p, p)."""
        if self.n - ddof <= 0:
            raise ValueError(f"covariance needs more than {ddof} rows, have {self.n}")
        return self.scatter / (self.n - ddof)

    def side_slices(self) -> list[slice]:
        """The slice of the concatenated channels that belongs to each side."""
        edges = np.concatenate([[0], np.cumsum(self.sizes)])
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]

    def __add__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        if other.sizes != self.sizes or other.batch_shape != self.batch_shape:
            raise ValueError(f"cannot merge Moments of sides {self.sizes} (batch {self.batch_shape}) and "
                             f"{other.sizes} (batch {other.batch_shape})")
        return unpack(merge_packed(np.concatenate([pack(self), pack(other)])), self.sizes)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write to a small zarr store at ``path``, atomically (temporary folder, then rename)."""
        batch = tuple(f"batch{i}" for i in range(len(self.batch_shape)))
        dataset = xr.Dataset(
            {
                "n": ((), np.int64(self.n)),
                "mean": ((*batch, "channel"), self.mean),
                "scatter": ((*batch, "channel", "channel_t"), self.scatter),
                "sizes": (("side",), np.asarray(self.sizes, dtype=np.int64)),
            },
            attrs={"chunkcca": "Moments"},
        )
        write_atomically(path, lambda tmp: dataset.to_zarr(tmp, zarr_format=3, consolidated=False),
                         overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Moments:
        """Read Moments written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no saved Moments at {path}")
        with xr.open_zarr(path, consolidated=False) as dataset:
            if dataset.attrs.get("chunkcca") != "Moments":
                raise ValueError(f"{path} is not a saved chunkcca Moments store")
            return cls(
                n=int(dataset["n"].values),
                mean=dataset["mean"].values,
                scatter=dataset["scatter"].values,
                sizes=tuple(int(s) for s in dataset["sizes"].values),
            )


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool) -> None:
    """Call ``write(tmp_path)`` on a fresh temporary path beside ``path``, then move it into place.

    A write killed midway leaves only a hidden ``.tmp`` folder; an existing ``path`` is
    replaced only after the new one is complete (and only with ``overwrite=True``).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        target = tmp / "data"
        write(target)
        if path.exists():
            os.replace(path, tmp / "old")
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack(moments: Moments) -> np.ndarray:
    """Moments as one array of shape (1, *batch, p + 2, p) (row 0: n; row 1: mean; then scatter)."""
    p = moments.channels
    packed = np.zeros((1, *moments.batch_shape, p + 2, p), dtype=moments.scatter.dtype)
    packed[0, ..., 0, 0] = moments.n
    packed[0, ..., 1, :] = moments.mean
    packed[0, ..., 2:, :] = moments.scatter
    return packed


def unpack(packed: np.ndarray, sizes: Sequence[int] = ()) -> Moments:
    """Inverse of :func:`pack` for an array of shape (1, *batch, p + 2, p)."""
    count = packed[(0,) + (0,) * (packed.ndim - 1)].real
    return Moments(n=int(count), mean=packed[0, ..., 1, :].copy(), scatter=packed[0, ..., 2:, :].copy(),
                   sizes=tuple(sizes))


def merge_packed(partials: np.ndarray) -> np.ndarray:
    """Merge k packed partials (k, *batch, p + 2, p) into one (1, *batch, p + 2, p), exactly.

    The k-way form of Chan et al.'s update: ``mean = Σ nᵢ μᵢ / n`` and
    ``M = Σ Mᵢ + Σ nᵢ (μᵢ − mean)(μᵢ − mean)ᴴ``; empty partials (nᵢ = 0) contribute nothing.
    """
    counts = partials[:, ..., 0, 0].real  # (k, *batch), equal across the batch
    total = counts.sum(axis=0)
    merged = np.zeros((1, *partials.shape[1:]), dtype=partials.dtype)
    merged[0, ..., 0, 0] = total
    if not np.any(total):
        return merged
    means = partials[:, ..., 1, :]
    mean = (counts[..., None] * means).sum(axis=0) / total[..., None]
    deviation = np.moveaxis(np.sqrt(counts)[..., None] * (means - mean), 0, -1)  # (*batch, p, k)
    merged[0, ..., 1, :] = mean
    merged[0, ..., 2:, :] = partials[:, ..., 2:, :].sum(axis=0) + deviation @ np.swapaxes(deviation, -1, -2).conj()
    return merged


def partial_from_rows(sides: Sequence[np.ndarray], precision: Precision = "float32") -> np.ndarray:
    """Packed partial (1, *batch, p + 2, p) of the rows of each side, concatenated along channels.

    ``sides`` are arrays of shape (*batch, rows, pᵢ) with equal batch shape and rows, real or
    complex. The rows are shifted by the mean of the first :data:`SHIFT_ROWS` rows and
    multiplied in ``precision`` (complex64/complex128 for complex rows) one sub-block at a time
    through a single reused buffer; products and sums accumulate in float64 (complex128) and
    are corrected exactly for the shift.
    """
    batch, rows = sides[0].shape[:-2], sides[0].shape[-2]
    widths = [side.shape[-1] for side in sides]
    p = sum(widths)
    is_complex = any(np.iscomplexobj(side) for side in sides)
    dtype = np.result_type(precision, np.complex64) if is_complex else np.dtype(precision)
    accumulate = np.dtype(np.complex128 if is_complex else np.float64)
    packed = np.zeros((1, *batch, p + 2, p), dtype=accumulate)
    if rows == 0:
        return packed
    edges = np.concatenate([[0], np.cumsum(widths)])
    shift = np.concatenate([side[..., :SHIFT_ROWS, :].mean(axis=-2, dtype=accumulate) for side in sides], axis=-1)
    shift_c = shift.astype(dtype)[..., None, :]
    per_block = max(1, min(SUBBLOCK_ROWS, rows, SUBBLOCK_BYTES // (max(1, int(np.prod(batch))) * p * dtype.itemsize)))
    buffer = np.empty((*batch, per_block, p), dtype=dtype)
    products = np.zeros((*batch, p, p), dtype=accumulate)
    sums = np.zeros((*batch, p), dtype=accumulate)
    for start in range(0, rows, per_block):
        stop = min(start + per_block, rows)
        block = buffer[..., : stop - start, :]
        for side, lo, hi in zip(sides, edges[:-1], edges[1:]):
            np.subtract(side[..., start:stop, :], shift_c[..., lo:hi], out=block[..., lo:hi], casting="unsafe")
        products += np.swapaxes(block, -1, -2) @ (block.conj() if is_complex else block)
        sums += block.sum(axis=-2, dtype=accumulate)
    # The exact shift is shift_c (what was subtracted), not the float64 shift.
    shifted_mean = sums / rows
    scatter = products - rows * shifted_mean[..., :, None] * shifted_mean[..., None, :].conj()
    packed[0, ..., 0, 0] = rows
    packed[0, ..., 1, :] = shift_c[..., 0, :].astype(accumulate) + shifted_mean
    packed[0, ..., 2:, :] = (scatter + np.swapaxes(scatter, -1, -2).conj()) / 2
    return packed
