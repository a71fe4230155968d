"""Moments: the mergeable second-order statistics every measure is computed from.

A :class:`Moments` holds, for the concatenated channels ``z = [x | y | ...]`` of the
sides being compared, the row count ``n``, the ``mean`` (float64, shape (p,)) and the
centred scatter matrix ``scatter = Σ (z − mean)(z − mean)ᵀ`` (float64, shape (p, p)).

Partials are computed per chunk on shifted data (never as raw sums ``Σ zzᵀ − n μμᵀ``,
which lose every digit on post-ReLU data with a large mean) and merged exactly with the
parallel formula of Chan et al. Merging is associative, so Dask may tree-reduce the
partials in any order and any chunking gives the same answer to rounding.

For streaming, a partial travels as one float64 array of shape (1, p + 2, p): row 0 holds
``n`` in its first element, row 1 the mean and rows 2… the scatter (see :func:`pack`).
A float64 count is exact up to 2**53 rows.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import xarray as xr

Precision = Literal["float32", "float64"]
PRECISIONS: tuple[str, ...] = ("float32", "float64")

#: Rows per sub-block of the per-chunk product: one reused buffer of this many rows.
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
    mean : ndarray, float64, shape (p,)
    scatter : ndarray, float64, shape (p, p)
        ``Σ (z − mean)(z − mean)ᵀ`` over the rows; symmetric.
    sizes : tuple of int
        Channels of each side, in order; ``sum(sizes) == p``.
    """

    n: int
    mean: np.ndarray
    scatter: np.ndarray
    sizes: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        p = self.mean.shape[0]
        sizes = tuple(int(s) for s in self.sizes) if self.sizes else (p,)
        object.__setattr__(self, "sizes", sizes)
        if self.scatter.shape != (p, p):
            raise ValueError(f"scatter has shape {self.scatter.shape}, expected {(p, p)} for mean of {p}")
        if sum(sizes) != p:
            raise ValueError(f"sizes {sizes} do not add up to the {p} channels of mean")
        if self.n < 0:
            raise ValueError(f"row count must be >= 0, got {self.n}")

    @property
    def channels(self) -> int:
        """Total channels p over all sides."""
        return self.mean.shape[0]

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Covariance ``scatter / (n − ddof)``, float64, shape (p, p)."""
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
        if other.sizes != self.sizes:
            raise ValueError(f"cannot merge Moments of sides {self.sizes} and {other.sizes}")
        return unpack(merge_packed(np.concatenate([pack(self), pack(other)])), self.sizes)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write to a small zarr store at ``path``, atomically (temporary folder, then rename)."""
        dataset = xr.Dataset(
            {
                "n": ((), np.int64(self.n)),
                "mean": (("channel",), self.mean),
                "scatter": (("channel", "channel_t"), self.scatter),
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
                mean=np.asarray(dataset["mean"].values, dtype=np.float64),
                scatter=np.asarray(dataset["scatter"].values, dtype=np.float64),
                sizes=tuple(int(s) for s in dataset["sizes"].values),
            )


def write_atomically(path: str | os.PathLike, write, *, overwrite: bool) -> None:
    """Call ``write(tmp_path)`` on a fresh temporary path beside ``path``, then move it into place.

    A write killed midway leaves only a ``.tmp`` folder; an existing ``path`` is replaced
    only after the new one is complete (and only with ``overwrite=True``).
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
            old = tmp / "old"
            os.replace(path, old)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack(moments: Moments) -> np.ndarray:
    """Moments as one float64 array of shape (1, p + 2, p) (row 0: n; row 1: mean; then scatter)."""
    p = moments.channels
    packed = np.zeros((1, p + 2, p), dtype=np.float64)
    packed[0, 0, 0] = moments.n
    packed[0, 1] = moments.mean
    packed[0, 2:] = moments.scatter
    return packed


def unpack(packed: np.ndarray, sizes: Sequence[int] = ()) -> Moments:
    """Inverse of :func:`pack` for an array of shape (1, p + 2, p)."""
    return Moments(n=int(packed[0, 0, 0]), mean=packed[0, 1].copy(), scatter=packed[0, 2:].copy(),
                   sizes=tuple(sizes))


def merge_packed(partials: np.ndarray) -> np.ndarray:
    """Merge k packed partials (k, p + 2, p) into one (1, p + 2, p), exactly.

    The k-way form of Chan et al.'s update: ``mean = Σ nᵢ μᵢ / n`` and
    ``M = Σ Mᵢ + Σ nᵢ (μᵢ − mean)(μᵢ − mean)ᵀ``; empty partials (nᵢ = 0) contribute nothing.
    """
    counts = partials[:, 0, 0]
    total = counts.sum()
    merged = np.zeros((1, *partials.shape[1:]), dtype=np.float64)
    merged[0, 0, 0] = total
    if total == 0:
        return merged
    means = partials[:, 1]
    mean = counts @ means / total
    deviation = np.sqrt(counts)[:, None] * (means - mean)
    merged[0, 1] = mean
    merged[0, 2:] = partials[:, 2:].sum(axis=0) + deviation.T @ deviation
    return merged


def partial_from_rows(sides: Sequence[np.ndarray], precision: Precision = "float32") -> np.ndarray:
    """Packed partial (1, p + 2, p) of the rows of each side, concatenated along channels.

    ``sides`` are arrays of shape (rows, pᵢ) with equal rows. The rows are shifted by the
    mean of the first :data:`SHIFT_ROWS` rows and multiplied in ``precision`` one sub-block
    of :data:`SUBBLOCK_ROWS` rows at a time through a single reused buffer; the products
    and sums accumulate in float64 and are corrected exactly for the shift.
    """
    rows = sides[0].shape[0]
    widths = [side.shape[1] for side in sides]
    p = sum(widths)
    packed = np.zeros((1, p + 2, p), dtype=np.float64)
    if rows == 0:
        return packed
    edges = np.concatenate([[0], np.cumsum(widths)])
    shift = np.concatenate([side[:SHIFT_ROWS].mean(axis=0, dtype=np.float64) for side in sides])
    dtype = np.dtype(precision)
    shift_c = shift.astype(dtype)
    buffer = np.empty((min(rows, SUBBLOCK_ROWS), p), dtype=dtype)
    products = np.zeros((p, p), dtype=np.float64)
    sums = np.zeros(p, dtype=np.float64)
    for start in range(0, rows, SUBBLOCK_ROWS):
        stop = min(start + SUBBLOCK_ROWS, rows)
        block = buffer[: stop - start]
        for side, lo, hi in zip(sides, edges[:-1], edges[1:]):
            np.subtract(side[start:stop], shift_c[lo:hi], out=block[:, lo:hi], casting="unsafe")
        products += block.T @ block
        sums += block.sum(axis=0, dtype=np.float64)
    # The exact shift is shift_c (what was subtracted), not the float64 shift.
    shifted_mean = sums / rows
    packed[0, 0, 0] = rows
    packed[0, 1] = shift_c.astype(np.float64) + shifted_mean
    scatter = products - rows * np.outer(shifted_mean, shifted_mean)
    packed[0, 2:] = (scatter + scatter.T) / 2
    return packed
