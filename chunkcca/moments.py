"""Moments: the mergeable second-order statistics every measure is computed from.

A [`Moments`][chunkcca.Moments] holds, for the concatenated channels ``z = [x | y | ...]`` of the
sides being compared, the row count ``n``, the ``mean`` (shape (p,)) and the centred
scatter matrix ``scatter = Σ (z − mean)(z − mean)ᴴ`` (shape (p, p)), in float64, or
complex128 for the per-frequency statistics of the DFT adapter (then Hermitian, with
``numpy.cov``'s convention ``scatter[i, j] = Σ zᵢ conj(zⱼ)``). Optional leading batch dims
hold one set of statistics per spatial frequency, all over the same rows.

Partials are computed per chunk on shifted data (never as raw sums ``Σ zzᵀ − n μμᵀ``,
which lose every digit on post-ReLU data with a large mean) and merged exactly with the
parallel formula of Chan et al. Merging is associative, so Dask may tree-reduce the
partials in any order and any chunking gives the same answer to rounding.

Real Moments also carry fourth-order row-norm sums per side l (centred rows x̃, side block x̃_l):
``norm_moments[l] = Σ ‖x̃_l‖² x̃`` (L, p) and ``norm_products[l, m] = Σ ‖x̃_l‖² ‖x̃_m‖²`` (L, L).
They cost O(rows · p) per chunk, merge exactly through the same change of centre, and make the
full-data debiased CKA exact.

For streaming, a partial travels as one array of shape (1, *batch, p + 2 [+ 2L], p): row 0
holds ``n`` in its first element, row 1 the mean, rows 2 … p + 1 the scatter, then the L rows
of ``norm_moments`` and L rows whose first L entries are ``norm_products`` (see ``pack()``).
A float64 count is exact up to 2**53 rows.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from ._fs import write_atomically
from .options import PRECISIONS, ProductPrecision

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
    norm_moments : ndarray (L, p) or None
        ``Σ ‖x̃_l‖² x̃`` per side l = 0 … L − 1 (real Moments only).
    norm_products : ndarray (L, L) or None
        ``Σ ‖x̃_l‖² ‖x̃_m‖²`` per pair of sides (real Moments only).
    precision : {"float64", "float32"}
        dtype of the products the statistics were computed with (the coarser of merged ones). The
        solves count eigenvalues below ``p · eps(precision) · largest`` as rounding, so float32
        rounding noise is not taken for extra dimensions.
    """

    n: int
    mean: np.ndarray
    scatter: np.ndarray
    sizes: tuple[int, ...] = field(default=())
    norm_moments: np.ndarray | None = None
    norm_products: np.ndarray | None = None
    precision: ProductPrecision = "float64"

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
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.norm_moments is None) != (self.norm_products is None):
            raise ValueError("norm_moments and norm_products go together")
        if self.norm_moments is not None and (self.norm_moments.shape != (len(sizes), p)
                                              or self.norm_products.shape != (len(sizes), len(sizes))):
            raise ValueError(f"norm_moments {self.norm_moments.shape} / norm_products {self.norm_products.shape} "
                             f"do not fit {len(sizes)} sides of {p} channels")

    def __repr__(self) -> str:
        batch = f", batch={self.batch_shape}" if self.batch_shape else ""
        kind = ", complex" if np.iscomplexobj(self.scatter) else ""
        norms = ", with row-norm sums" if self.norm_moments is not None else ""
        return f"Moments(n={self.n}, sizes={self.sizes}{batch}, precision={self.precision!r}{kind}{norms})"

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
        return Moments(self.n, self.mean[index], self.scatter[index], self.sizes, precision=self.precision)

    def select(self, sides: Sequence[int]) -> Moments:
        """The Moments of some sides only (e.g. one pair of layers out of a sweep), in the given order."""
        slices = self.side_slices()
        index = np.concatenate([np.arange(slices[i].start, slices[i].stop) for i in sides])
        norms = None if self.norm_moments is None else self.norm_moments[np.ix_(list(sides), index)]
        products = None if self.norm_products is None else self.norm_products[np.ix_(list(sides), list(sides))]
        return Moments(self.n, self.mean[..., index], self.scatter[..., index[:, None], index],
                       tuple(self.sizes[i] for i in sides), norms, products, self.precision)

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Covariance ``scatter / (n − ddof)``, shape (*batch, p, p)."""
        if self.n - ddof <= 0:
            raise ValueError(f"covariance needs more than {ddof} rows, have {self.n}")
        return self.scatter / (self.n - ddof)

    def side_slices(self) -> list[slice]:
        """The slice of the concatenated channels that belongs to each side."""
        return side_slices(self.sizes)

    def __add__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        if other.sizes != self.sizes or other.batch_shape != self.batch_shape:
            raise ValueError(f"cannot merge Moments of sides {self.sizes} (batch {self.batch_shape}) and "
                             f"{other.sizes} (batch {other.batch_shape})")
        if (self.norm_moments is None) != (other.norm_moments is None):
            raise ValueError("cannot merge Moments with and without row-norm sums; compute both with the same "
                             "row_norms setting")
        precision = "float32" if "float32" in (self.precision, other.precision) else "float64"
        return unpack(merge_packed(np.concatenate([pack(self), pack(other)]), self.sizes), self.sizes, precision)

    def __radd__(self, other: object) -> Moments:
        """``0 + m`` is ``m``, so that ``sum(moments)`` merges a list of them."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def save(self, path: str | os.PathLike, *, overwrite: bool = False, attrs: dict | None = None) -> None:
        """Write to a small zarr store at ``path``, atomically (temporary folder, then rename); ``attrs`` go along."""
        batch = tuple(f"batch{i}" for i in range(len(self.batch_shape)))
        variables = {
            "n": ((), np.int64(self.n)),
            "mean": ((*batch, "channel"), self.mean),
            "scatter": ((*batch, "channel", "channel_t"), self.scatter),
            "sizes": (("side",), np.asarray(self.sizes, dtype=np.int64)),
        }
        if self.norm_moments is not None:
            variables["norm_moments"] = (("side", "channel"), self.norm_moments)
            variables["norm_products"] = (("side", "side_t"), self.norm_products)
        dataset = xr.Dataset(variables, attrs={**(attrs or {}), "chunkcca": "Moments", "precision": self.precision})
        write_atomically(path, lambda tmp: dataset.to_zarr(tmp, zarr_format=3, consolidated=False),
                         overwrite=overwrite, replaceable=_is_saved_moments, what="saved Moments")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Moments:
        """Read Moments written by ``save()``."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no saved Moments at {path}")
        with xr.open_zarr(path, consolidated=False, chunks=None) as dataset:  # numpy: read here, not on a cluster
            if dataset.attrs.get("chunkcca") != "Moments":
                raise ValueError(f"{path} is not a saved chunkcca Moments store")
            return cls(
                n=int(dataset["n"].values),
                mean=dataset["mean"].values,
                scatter=dataset["scatter"].values,
                sizes=tuple(int(s) for s in dataset["sizes"].values),
                norm_moments=dataset["norm_moments"].values if "norm_moments" in dataset else None,
                norm_products=dataset["norm_products"].values if "norm_products" in dataset else None,
                precision=dataset.attrs.get("precision", "float64"),
            )


def _is_saved_moments(path: Path) -> bool:
    """Whether ``path`` holds Moments written by :meth:`Moments.save` (a zarr group so marked)."""
    try:
        metadata = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return metadata.get("attributes", {}).get("chunkcca") == "Moments"


def side_slices(sizes: Sequence[int]) -> list[slice]:
    """The slice of the concatenated channels that belongs to each side of ``sizes`` channels."""
    edges = itertools.accumulate((int(size) for size in sizes), initial=0)
    return [slice(lo, hi) for lo, hi in itertools.pairwise(edges)]


def _side_traces(matrix: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """Trace of each side's diagonal block of ``matrix`` (p, p): (L,)."""
    return np.array([np.trace(matrix[part, part]) for part in slices])


def pack(moments: Moments) -> np.ndarray:
    """Moments as one array (1, *batch, p + 2 [+ 2L], p): n, mean, scatter [, norm_moments, norm_products]."""
    p = moments.channels
    sides = 0 if moments.norm_moments is None else len(moments.sizes)
    packed = np.zeros((1, *moments.batch_shape, p + 2 + 2 * sides, p), dtype=moments.scatter.dtype)
    packed[0, ..., 0, 0] = moments.n
    packed[0, ..., 1, :] = moments.mean
    packed[0, ..., 2 : p + 2, :] = moments.scatter
    if sides:
        packed[0, p + 2 : p + 2 + sides] = moments.norm_moments
        packed[0, p + 2 + sides :, :sides] = moments.norm_products
    return packed


def unpack(packed: np.ndarray, sizes: Sequence[int] = (), precision: str = "float64") -> Moments:
    """Inverse of ``pack()`` for an array of shape (1, *batch, p + 2 [+ 2L], p), computed in ``precision``."""
    p = packed.shape[-1]
    sides = (packed.shape[-2] - p - 2) // 2
    count = packed[(0,) + (0,) * (packed.ndim - 1)].real
    norms = products = None
    if sides:
        norms = packed[0, p + 2 : p + 2 + sides].copy()
        products = packed[0, p + 2 + sides :, :sides].copy()
    return Moments(n=int(count), mean=packed[0, ..., 1, :].copy(), scatter=packed[0, ..., 2 : p + 2, :].copy(),
                   sizes=tuple(sizes) or ((p,) if sides <= 1 else ()), norm_moments=norms, norm_products=products,
                   precision=precision)


def _side_blocks(sizes: Sequence[int], delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """D (L, p): row l holds delta on side l's channels, zeros elsewhere; c (L,): ‖delta_l‖²."""
    blocks = np.zeros((len(sizes), delta.size))
    for side, part in enumerate(side_slices(sizes)):
        blocks[side, part] = delta[part]
    return blocks, (blocks**2).sum(axis=1)


def shift_norms(n: float, sums: np.ndarray, products: np.ndarray, norm_sums: np.ndarray, norm_moments: np.ndarray,
                norm_products: np.ndarray, delta: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row-norm sums about a centre moved by ``delta`` (rows u → u − delta), exactly.

    In the old frame: ``sums = Σ u`` (p), ``products = Σ u uᵀ`` (p, p), ``norm_sums = Σ r``
    (L), ``norm_moments = Σ r uᵀ`` (L, p), ``norm_products = Σ r rᵀ`` (L, L), with
    ``r_l = ‖u_l‖²``. With D, c from ``_side_blocks()``, ``r' = r − 2 D u + c`` expands to the
    returned ``Σ r' u'ᵀ`` and ``Σ r' r'ᵀ``.
    """
    blocks, c = _side_blocks(sizes, delta)
    d_sums = blocks @ sums
    d_products = blocks @ products
    moments = (norm_moments - np.outer(norm_sums, delta) - 2 * d_products + 2 * np.outer(d_sums, delta)
               + np.outer(c, sums) - n * np.outer(c, delta))
    cross = norm_moments @ blocks.T
    squares = (norm_products - 2 * cross - 2 * cross.T + 4 * d_products @ blocks.T
               + np.outer(norm_sums, c) + np.outer(c, norm_sums) - 2 * np.outer(d_sums, c) - 2 * np.outer(c, d_sums)
               + n * np.outer(c, c))
    return moments, squares


def merge_packed(partials: np.ndarray, sizes: Sequence[int] = ()) -> np.ndarray:
    """Merge k packed partials (k, *batch, p + 2 [+ 2L], p) into one (1, …), exactly.

    The k-way form of Chan et al.'s update: ``mean = Σ nᵢ μᵢ / n`` and
    ``M = Σ Mᵢ + Σ nᵢ (μᵢ − mean)(μᵢ − mean)ᴴ``; row-norm sums are moved to the merged mean
    with ``shift_norms()`` and added. Empty partials (nᵢ = 0) contribute nothing.
    """
    p = partials.shape[-1]
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
    merged[0, ..., 2 : p + 2, :] = (partials[:, ..., 2 : p + 2, :].sum(axis=0)
                                    + deviation @ np.swapaxes(deviation, -1, -2).conj())
    sides = (partials.shape[-2] - p - 2) // 2
    if sides:
        sizes = tuple(sizes) or (p,)
        slices = side_slices(sizes)
        for partial, count in zip(partials, counts):
            if count == 0:
                continue
            scatter = partial[2 : p + 2]
            moved, squares = shift_norms(count, np.zeros(p), scatter, _side_traces(scatter, slices),
                                         partial[p + 2 : p + 2 + sides],
                                         partial[p + 2 + sides :, :sides], mean - partial[1], sizes)
            merged[0, p + 2 : p + 2 + sides] += moved
            merged[0, p + 2 + sides :, :sides] += squares
    return merged


#: float32 products of values whose squares average below this per row have lost digits to underflow (float32's
#: smallest normal number is 2**-126): such a chunk is computed again in float64.
SINGLE_UNDERFLOW = 2.0**-110


def _beyond_single(products: np.ndarray, sums: np.ndarray, rows: int) -> bool:
    """Whether single-precision products of a chunk's shifted rows over- or underflowed: the sums of the values
    are finite but their products are not, or a channel's squares average below :data:`SINGLE_UNDERFLOW` while
    its values are not all zero. O(p): the products are not searched."""
    if np.isfinite(sums).all() and not np.isfinite(products).all():
        return True
    squares = np.diagonal(products, axis1=-2, axis2=-1).real / rows
    return bool((((squares == 0) & (sums != 0)) | ((squares > 0) & (squares < SINGLE_UNDERFLOW))).any())


def partial_from_rows(sides: Sequence[np.ndarray], precision: ProductPrecision = "float32", *,
                      row_norms: bool = False) -> np.ndarray:
    """Packed partial (1, *batch, p + 2 [+ 2L], p) of the rows of each side, concatenated along channels.

    ``sides`` are arrays of shape (*batch, rows, pᵢ) with equal batch shape and rows, real or
    complex. The rows are shifted by the mean of the first ``SHIFT_ROWS`` rows and
    multiplied in ``precision`` (complex64/complex128 for complex rows) one sub-block at a time
    through a single reused buffer; products and sums accumulate in float64 (complex128) and
    are corrected exactly for the shift. With ``row_norms`` real rows also give the row-norm
    sums (L = len(sides)) that the debiased CKA needs.
    """
    batch, rows = sides[0].shape[:-2], sides[0].shape[-2]
    widths = [side.shape[-1] for side in sides]
    p = sum(widths)
    is_complex = any(np.iscomplexobj(side) for side in sides)
    dtype = np.result_type(precision, np.complex64) if is_complex else np.dtype(precision)
    accumulate = np.dtype(np.complex128 if is_complex else np.float64)
    n_sides = len(sides) if row_norms and not is_complex else 0
    packed = np.zeros((1, *batch, p + 2 + 2 * n_sides, p), dtype=accumulate)
    if rows == 0:
        return packed
    slices = side_slices(widths)
    shift = np.concatenate([side[..., :SHIFT_ROWS, :].mean(axis=-2, dtype=accumulate) for side in sides], axis=-1)
    shift_c = shift.astype(dtype)[..., None, :]
    per_block = max(1, min(SUBBLOCK_ROWS, rows, SUBBLOCK_BYTES // (max(1, int(np.prod(batch))) * p * dtype.itemsize)))
    buffer = np.empty((*batch, per_block, p), dtype=dtype)
    ones = np.ones(per_block, dtype=dtype)
    products = np.zeros((*batch, p, p), dtype=accumulate)
    sums = np.zeros((*batch, p), dtype=accumulate)
    norm_moments = np.zeros((n_sides, p))
    norm_products = np.zeros((n_sides, n_sides))
    for start in range(0, rows, per_block):
        stop = min(start + per_block, rows)
        block = buffer[..., : stop - start, :]
        for side, part in zip(sides, slices):
            np.subtract(side[..., start:stop, :], shift_c[..., part], out=block[..., part], casting="unsafe")
        with np.errstate(over="ignore"):  # float32 overflow is found below and the chunk done again in float64
            products += np.swapaxes(block, -1, -2) @ (block.conj() if is_complex else block)
        sums += ones[: stop - start] @ block  # a GEMV: shifted values are small, so float32 sums suffice
        if n_sides:
            norms = np.stack([np.einsum("ij,ij->i", block[:, part], block[:, part]).astype(np.float64)
                              for part in slices], axis=1)  # (rows, L)
            norm_moments += (norms.T.astype(dtype) @ block).astype(np.float64)
            norm_products += norms.T @ norms
    if dtype in (np.float32, np.complex64) and _beyond_single(products, sums, rows):
        return partial_from_rows(sides, "float64", row_norms=row_norms)
    # The exact shift is shift_c (what was subtracted), not the float64 shift.
    shifted_mean = sums / rows
    scatter = products - rows * shifted_mean[..., :, None] * shifted_mean[..., None, :].conj()
    packed[0, ..., 0, 0] = rows
    packed[0, ..., 1, :] = shift_c[..., 0, :].astype(accumulate) + shifted_mean
    packed[0, ..., 2 : p + 2, :] = (scatter + np.swapaxes(scatter, -1, -2).conj()) / 2
    if n_sides:
        # Σ ‖u_l‖² over the shifted rows u is the trace of side l's block of Σ u uᵀ
        moved, squares = shift_norms(rows, sums, products, _side_traces(products, slices), norm_moments,
                                     norm_products, shifted_mean, widths)
        packed[0, p + 2 : p + 2 + n_sides] = moved
        packed[0, p + 2 + n_sides :, :n_sides] = squares
    return packed
