"""Moments: the mergeable second-order statistics every measure is computed from.

A [`Moments`][chunkcca.Moments] holds, for the concatenated channels ``z = [x | y | ...]`` of the
sides being compared, the row count ``n``, the ``mean`` (shape (p,)) and the centred
scatter matrix ``scatter = Σ (z − mean)(z − mean)ᴴ`` (shape (p, p)), in float64, or
complex128 for the per-frequency statistics of the DFT adapter (then Hermitian, with
``numpy.cov``'s convention ``scatter[i, j] = Σ zᵢ conj(zⱼ)``). Optional leading batch dims
hold one set of statistics per spatial frequency, all over the same rows.

Each chunk's rows are multiplied on shifted data (never as raw sums ``Σ zzᵀ − n μμᵀ``, which lose
every digit on post-ReLU data with a large mean) and folded into an accumulated partial in place
(``fold_rows``: the products added straight into its scatter, then the change of centre of Chan et
al. as rank-1 updates); partials merge exactly by the same formula (``merge_into``). Merging is
associative, so chunks may be folded and partials merged in any order and any chunking gives the
same answer to rounding.

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
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import xarray as xr

from ._fs import (
    check_local,
    every_chunk_written,
    expanded,
    fails_checksum,
    group_foreign_files,
    json_digest,
    write_atomically,
    zarr_attributes,
)
from ._stack import user_stacklevel
from .options import PRECISIONS, ProductPrecision, check_flag, check_moments_path, check_output_place, plain

#: Bytes of the reused sub-block buffer of the per-chunk product (at most SUBBLOCK_ROWS rows).
SUBBLOCK_BYTES = 16 * 2**20
#: The same for rows made as they are taken (dft spectra, not ndarrays), whose making holds a few times as much.
MADE_SUBBLOCK_BYTES = 4 * 2**20
SUBBLOCK_ROWS = 8192
#: Rows whose mean is the per-chunk shift (spread over the chunk), and in which channels' grids are judged.
SHIFT_ROWS = 1024
#: Root attribute of saved Moments: a digest of the root attributes loading reads, as written
#: (``attributes_digest``), by which an edit since (a checkpoint's datapoints done, the layers, the values'
#: rounding) is refused. Saves made before it lack it and load as before.
ATTRIBUTES_ATTR = "chunkcca_attributes"


@dataclass(frozen=True, eq=False)  # one object equals itself only: arrays compare element by element
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
        solves count eigenvalues of a correlation matrix at or below ``p · eps64 · largest`` as rounding and,
        for float32 products, also those at or below ``max(32 · eps32, eps32 · largest)``, so float32
        rounding noise is not taken for extra dimensions (see ``value_rounding`` for the values' own).
    layers : tuple of str
        The layer each side's channels came from ("" unknown; all unknown by default), one per side.
    rows_from : str
        How the rows were made from the layers (the spatial adapter and its settings, e.g.
        ``"spatial='flatten', stride=1"``); "" unknown. Moments merge only when both fields agree, an unknown
        value agreeing with any; to merge deliberately, set them equal with ``dataclasses.replace``.
    value_rounding : tuple of float
        The relative rounding of each side's activations (``value_eps``: float32's 2⁻²³ for float32 values, 0 for
        float64 and integers), one per side; all 0 by default. The solves count as rounding a direction the
        values' own rounding could make (a float32 LayerNorm output's exact null direction at 1e-15 of the
        largest eigenvalue), whatever the products' precision. Merged Moments keep the coarser.
    channel_labels : tuple of (ndarray or None)
        Each side's channel labels (a layer's ``channel`` coordinate; None unknown, the default), which the
        results of ``*_from_moments`` carry as ``channel_a`` and ``channel_b``. Moments merge only when known
        labels agree.
    batch_labels : dict of str to ndarray
        The name and labels of each batch dim, in order (a dft's frequencies: ``{"freq_h": [0, 1, -2, -1], …}``,
        cycles per map); empty unknown, the default. ``cca_from_moments`` names and labels its batch dims by
        them. Moments merge only when known labels agree.
    positions : tuple of int
        For a dft's Moments, the positions each side's spectra sum over (its map's size, ``height · width``; 0
        unknown, the default, and for other rows), one per side. Each position's value carries its own rounding,
        which reaches every frequency: the solves cut each frequency's directions at least at the rounding of
        the map's power that the held frequencies show (Parseval: their power over the positions), so that a
        float32 LayerNorm output's null direction is not counted at a frequency where its channels' spectra are
        small beside their means. Moments merge only when known values agree.
    map_power : tuple of (ndarray or None)
        For a dft's Moments taken out of a whole (``moments[i, j]``, ``moments[1:3]``), each side's power of its
        map per position and channel (p_side,) as the whole's frequencies showed it (``map_power_of()``), which
        the part's own frequencies show only in part (without frequency 0, not the map's mean); None unknown,
        the default: then it is what the held frequencies show. Indexing sets it, merges weigh it by rows.
    """

    n: int
    mean: np.ndarray
    scatter: np.ndarray
    sizes: tuple[int, ...] = field(default=())
    norm_moments: np.ndarray | None = None
    norm_products: np.ndarray | None = None
    precision: ProductPrecision = "float64"
    layers: tuple[str, ...] = field(default=())
    rows_from: str = ""
    value_rounding: tuple[float, ...] = field(default=())
    channel_labels: tuple[np.ndarray | None, ...] = field(default=())
    batch_labels: dict[str, np.ndarray] = field(default_factory=dict)
    positions: tuple[int, ...] = field(default=())
    map_power: tuple[np.ndarray | None, ...] = field(default=())

    def __post_init__(self) -> None:
        p = self.mean.shape[-1]
        sizes = tuple(int(s) for s in self.sizes) if self.sizes else (p,)
        object.__setattr__(self, "sizes", sizes)
        if self.scatter.shape != (*self.mean.shape, p):
            raise ValueError(f"scatter has shape {self.scatter.shape}, expected {(*self.mean.shape, p)} "
                             f"for mean of shape {self.mean.shape}")
        if sum(sizes) != p:
            raise ValueError(f"sizes {sizes} do not add up to the {p} channels of mean")
        count = self.n
        integral = isinstance(count, (int, np.integer)) or (isinstance(count, (float, np.floating))
                                                            and float(count).is_integer())
        if isinstance(count, (bool, np.bool_)) or not integral or count < 0:  # a NaN passed "n < 0"
            raise ValueError(f"row count must be an integer >= 0, got {count!r}")
        object.__setattr__(self, "n", int(count))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.norm_moments is None) != (self.norm_products is None):
            raise ValueError("norm_moments and norm_products go together")
        if self.norm_moments is not None and (self.norm_moments.shape != (len(sizes), p)
                                              or self.norm_products.shape != (len(sizes), len(sizes))):
            raise ValueError(f"norm_moments {self.norm_moments.shape} / norm_products {self.norm_products.shape} "
                             f"do not fit {len(sizes)} sides of {p} channels")
        layers = tuple(self.layers) or ("",) * len(sizes)
        if isinstance(self.layers, str) or len(layers) != len(sizes) or not all(isinstance(x, str) for x in layers):
            raise ValueError(f"layers must name each of the {len(sizes)} sides with a str (\"\" unknown), "
                             f"got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        if not isinstance(self.rows_from, str):
            raise ValueError(f"rows_from must be a str (\"\" unknown), got {self.rows_from!r}")
        rounding = tuple(float(x) for x in self.value_rounding) or (0.0,) * len(sizes)
        if len(rounding) != len(sizes) or not all(np.isfinite(x) and 0 <= x < 1 for x in rounding):
            raise ValueError(f"value_rounding must give each of the {len(sizes)} sides a relative rounding in [0, 1), "
                             f"got {self.value_rounding!r}")
        object.__setattr__(self, "value_rounding", rounding)
        labels = tuple(None if x is None else np.asarray(x) for x in self.channel_labels) or (None,) * len(sizes)
        if len(labels) != len(sizes) or any(x is not None and x.shape != (size,) for x, size in zip(labels, sizes)):
            raise ValueError(f"channel_labels must give each of the {len(sizes)} sides its {sizes} labels or None")
        object.__setattr__(self, "channel_labels", labels)
        batch = {str(dim): np.asarray(values) for dim, values in dict(self.batch_labels).items()}
        if batch and tuple(values.shape for values in batch.values()) != tuple((size,) for size in self.batch_shape):
            raise ValueError(f"batch_labels must label each of the batch dims {self.batch_shape} (or none), got "
                             f"{ {dim: values.shape for dim, values in batch.items()} }")
        object.__setattr__(self, "batch_labels", batch)
        positions = tuple(self.positions) or (0,) * len(sizes)
        if len(positions) != len(sizes) or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                                   and x >= 0 for x in positions):
            raise ValueError(f"positions must give each of the {len(sizes)} sides a count of positions (an int >= 0, "
                             f"0 unknown), got {self.positions!r}")
        object.__setattr__(self, "positions", tuple(map(int, positions)))
        power = tuple(None if x is None else np.asarray(x, dtype=np.float64) for x in self.map_power) or (
            (None,) * len(sizes))
        if len(power) != len(sizes) or any(x is not None and (x.shape != (size,) or not (np.isfinite(x) & (x >= 0)
                                                                                           ).all())
                                           for x, size in zip(power, sizes)):
            raise ValueError(f"map_power must give each of the {len(sizes)} sides its {sizes} powers (finite, >= 0) "
                             f"or None")
        object.__setattr__(self, "map_power", power)

    def __repr__(self) -> str:
        batch = f", batch={self.batch_shape}" if self.batch_shape else ""
        kind = ", complex" if np.iscomplexobj(self.scatter) else ""
        norms = ", with row-norm sums" if self.norm_moments is not None else ""
        layers = f", layers={self.layers}" if any(self.layers) else ""
        rows = f", rows_from={self.rows_from!r}" if self.rows_from else ""
        rounding = f", value_rounding={self.value_rounding}" if any(self.value_rounding) else ""
        positions = f", positions={self.positions}" if any(self.positions) else ""
        return (f"Moments(n={self.n}, sizes={self.sizes}{batch}, precision={self.precision!r}{kind}{norms}{layers}"
                f"{rows}{rounding}{positions})")

    @property
    def channels(self) -> int:
        """Total channels p over all sides."""
        return self.mean.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading dims (one set of statistics each), () for plain Moments."""
        return self.mean.shape[:-1]

    def __getitem__(self, index: Any) -> Moments:
        """The statistics of one batch element (e.g. one spatial frequency), or of part of the batch: one integer,
        slice or integer array per leading batch dim (an integer drops its dim and its labels)."""
        entries = index if isinstance(index, tuple) else (index,)
        if len(entries) > len(self.batch_shape) or any(entry is Ellipsis or entry is None for entry in entries):
            raise IndexError(f"Moments of batch {self.batch_shape} take one integer, slice or array per batch dim, "
                             f"at most {len(self.batch_shape)}, got {index!r}")
        entries = (*entries, *(slice(None),) * (len(self.batch_shape) - len(entries)))
        labels = {dim: values[entry] for (dim, values), entry in zip(self.batch_labels.items(), entries)
                  if not isinstance(entry, (int, np.integer))}
        # a dim an integer drops is said in rows_from: parts of other frequencies are not merged
        dropped = [f"{dim}={plain(values[entry])!r}" for (dim, values), entry in zip(self.batch_labels.items(), entries)
                   if isinstance(entry, (int, np.integer))]
        power = tuple(self.map_power_of(side) if self.value_rounding[side] else None  # read for rounded values only
                      for side in range(len(self.sizes)))
        return Moments(self.n, self.mean[entries], self.scatter[entries], self.sizes, precision=self.precision,
                       layers=self.layers, rows_from=", ".join(filter(None, (self.rows_from, *dropped))),
                       value_rounding=self.value_rounding, channel_labels=self.channel_labels, batch_labels=labels,
                       positions=self.positions, map_power=power)  # the whole's: kept

    def map_power_of(self, side: int) -> np.ndarray | None:
        """Per channel of one side of a dft's Moments (``positions`` known), the power of its map per position and
        datapoint: ``map_power`` where kept, else as the held frequencies show it, Σ E|X|² over them, over the
        positions (Parseval: all of it when they are every frequency of the map, less for a map larger than the
        other's). None for Moments of other rows."""
        if self.map_power[side] is not None:
            return self.map_power[side]
        positions = self.positions[side]
        if not (positions and self.batch_shape):
            return None
        part = self.side_slices()[side]
        with np.errstate(over="ignore", invalid="ignore"):
            held = (np.diagonal(self.scatter[..., part, part], axis1=-2, axis2=-1).real / max(self.n - 1, 1)
                    + np.abs(self.mean[..., part]) ** 2)
            power = held.reshape(-1, held.shape[-1]).sum(axis=0) / positions
        return power if np.isfinite(power).all() else None  # values beyond float64's squares: the solve says so

    def power_is_whole(self, side: int) -> bool:
        """Whether ``map_power_of(side)`` is the whole map's power: kept (``map_power``), or shown by frequencies
        that include frequency 0, the map's mean (all of them where their labels are unknown)."""
        if self.map_power[side] is not None:
            return True
        labels = self.batch_labels
        return bool(self.batch_shape) and (not labels or all(bool(np.any(values == 0)) for values in labels.values()))

    def select(self, sides: Sequence[int]) -> Moments:
        """The Moments of some sides only (e.g. one pair of layers out of a sweep), in the given order; ``sides``
        a sequence of side indices (as Python's, negative from the end), else a ValueError naming it (it failed in
        Python's words)."""
        count = len(self.sizes)
        if isinstance(sides, (str, bytes)) or not isinstance(sides, Sequence) or not sides or not all(
                isinstance(side, (int, np.integer)) and not isinstance(side, bool) and -count <= side < count
                for side in sides):
            raise ValueError(f"select takes a non-empty sequence of side indices, from 0 to {count - 1} (these "
                             f"Moments have {count} sides; negative ones count from the end), got {sides!r}")
        slices = self.side_slices()
        index = np.concatenate([np.arange(slices[i].start, slices[i].stop) for i in sides])
        norms = None if self.norm_moments is None else self.norm_moments[np.ix_(list(sides), index)]
        products = None if self.norm_products is None else self.norm_products[np.ix_(list(sides), list(sides))]
        return Moments(self.n, self.mean[..., index], self.scatter[..., index[:, None], index],
                       tuple(self.sizes[i] for i in sides), norms, products, self.precision,
                       tuple(self.layers[i] for i in sides), self.rows_from,
                       tuple(self.value_rounding[i] for i in sides), tuple(self.channel_labels[i] for i in sides),
                       self.batch_labels, tuple(self.positions[i] for i in sides),
                       tuple(self.map_power[i] for i in sides))

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Covariance ``scatter / (n − ddof)``, shape (*batch, p, p)."""
        if self.n - ddof <= 0:
            named = [layer for layer in self.layers if layer]
            of = f" of layers {', '.join(map(repr, named))}" if named else ""
            raise ValueError(f"the Moments{of} hold {self.n} row{'' if self.n == 1 else 's'}: a covariance needs "
                             f"more than {ddof}")
        return self.scatter / (self.n - ddof)

    def side_slices(self) -> list[slice]:
        """The slice of the concatenated channels that belongs to each side."""
        return side_slices(self.sizes)

    def __add__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        self.check_mergeable(other)
        layers, rows_from = self._merged_provenance(other)
        precision = "float32" if "float32" in (self.precision, other.precision) else "float64"
        merged = unpack(merge_into(pack(self), pack(other), self.sizes), self.sizes, precision)
        return replace(merged, layers=layers, rows_from=rows_from,
                       value_rounding=tuple(map(max, self.value_rounding, other.value_rounding)),
                       channel_labels=tuple(theirs if ours is None else ours
                                            for ours, theirs in zip(self.channel_labels, other.channel_labels)),
                       batch_labels=self.batch_labels or other.batch_labels,
                       positions=tuple(ours or theirs for ours, theirs in zip(self.positions, other.positions)),
                       map_power=tuple(self._merged_power(other, side) for side in range(len(self.sizes))))

    def _merged_power(self, other: Moments, side: int) -> np.ndarray | None:
        """One side's ``map_power`` of ``self + other``: where either keeps one, both weighed by their rows (the
        other's as its frequencies show it); None where neither does (the merge's frequencies show it)."""
        if self.map_power[side] is None and other.map_power[side] is None:
            return None
        held = [moments for moments in (self, other) if moments.n]
        if not held or not all(moments.power_is_whole(side) for moments in held):  # a part's own is not: unknown
            return None
        parts = [(moments.n, moments.map_power_of(side)) for moments in held]
        if any(power is None for _, power in parts):
            return None
        return sum(n * power for n, power in parts) / sum(n for n, _ in parts)

    def check_mergeable(self, other: Moments) -> None:
        """A ValueError saying why ``other`` describes other channels, layers, rows or frequencies than these
        Moments (so that their merge, or fitting on one and testing on the other, would be a wrong number)."""
        if other.sizes != self.sizes or other.batch_shape != self.batch_shape:
            def known(moments: Moments) -> str:
                return f", layers {moments.layers}" if any(moments.layers) else ""
            raise ValueError(f"cannot merge Moments of sides {self.sizes} (batch {self.batch_shape}{known(self)}) and "
                             f"{other.sizes} (batch {other.batch_shape}{known(other)})")
        if (self.norm_moments is None) != (other.norm_moments is None):
            raise ValueError("cannot merge Moments with and without row-norm sums; compute both with the same "
                             "row_norms setting")
        self._merged_provenance(other)
        for ours, theirs in zip(self.channel_labels, other.channel_labels):
            if ours is not None and theirs is not None and not np.array_equal(ours, theirs):
                raise ValueError(f"cannot merge Moments of channels labelled otherwise ({ours[:3].tolist()}… and "
                                 f"{theirs[:3].tolist()}…): they describe other channels")
        if self.batch_labels and other.batch_labels and not (
                list(self.batch_labels) == list(other.batch_labels)
                and all(map(np.array_equal, self.batch_labels.values(), other.batch_labels.values()))):
            raise ValueError(f"cannot merge Moments of batch dims labelled otherwise ({list(self.batch_labels)} and "
                             f"{list(other.batch_labels)}): they are statistics of other frequencies")
        if any(ours and theirs and ours != theirs for ours, theirs in zip(self.positions, other.positions)):
            raise ValueError(f"cannot merge Moments of spectra over {self.positions} and {other.positions} positions: "
                             f"they are statistics of maps of other sizes")

    def _merged_provenance(self, other: Moments) -> tuple[tuple[str, ...], str]:
        """The layers and ``rows_from`` of ``self + other``: the known value of each ("" is unknown); raises when
        both are known and differ."""
        if self.rows_from and other.rows_from and self.rows_from != other.rows_from:
            raise ValueError(f"cannot merge Moments whose rows were made differently, {self.rows_from!r} and "
                             f"{other.rows_from!r}: they are statistics of different rows; compute both with the "
                             f"same spatial options, or, if the rows are the same, merge deliberately: "
                             f"m1 + dataclasses.replace(m2, rows_from={self.rows_from!r})")
        if any(a and b and a != b for a, b in zip(self.layers, other.layers)):
            raise ValueError(f"cannot merge Moments of layers {self.layers} and {other.layers}: they describe "
                             f"different layers; if they are the same layers under other names, merge "
                             f"deliberately: m1 + dataclasses.replace(m2, layers={self.layers!r})")
        return tuple(a or b for a, b in zip(self.layers, other.layers)), self.rows_from or other.rows_from

    def __radd__(self, other: object) -> Moments:
        """``0 + m`` is ``m``, so that ``sum(moments)`` merges a list of them."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def save(self, path: str | os.PathLike, *, overwrite: bool = False, attrs: dict | None = None) -> None:
        """Write to a small zarr store at ``path``, atomically (temporary folder, then rename), every chunk;
        ``attrs`` go along, with a digest of the root attributes (``ATTRIBUTES_ATTR``) and of every array's
        metadata (``ARRAYS_ATTR``), which ``load`` checks, and an id of the save (``SAVE_ATTR``), by which a load
        that a save replaced meanwhile reads again. ``overwrite`` replaces
        only saved Moments holding nothing chunkcca did not write (a FileExistsError names what else is there).
        Channel labels a store cannot hold (a MultiIndex's tuples, values of mixed types) are a ValueError."""
        check_flag("overwrite", overwrite)
        path = expanded(path)
        check_moments_path(path, "Moments.save:")
        check_local(path)
        check_output_place(path, "Moments.save:")  # a typo in a folder is no new folder (it made the chain)
        check_savable_labels(self.channel_labels, self.layers)
        if overwrite:
            check_only_moments(Path(path))
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
        for side, labels in enumerate(self.channel_labels):  # text as variable-length strings, which zarr v3 has
            if labels is not None:
                variables[f"channel_labels{side}"] = ((f"channel{side}",), labels.astype(object)
                                                      if labels.dtype.kind == "U" else labels)
        for dim, (name, labels) in zip(batch, self.batch_labels.items()):
            variables[f"labels_{dim}"] = ((dim,), labels, {"name": name})
        for side, power in enumerate(self.map_power):
            if power is not None:
                variables[f"map_power{side}"] = ((f"channel{side}",), power)
        dataset = xr.Dataset(variables, attrs={**(attrs or {}), "chunkcca": "Moments", "precision": self.precision,
                                               "layers": list(self.layers), "rows_from": self.rows_from,
                                               "value_rounding": list(self.value_rounding),
                                               "positions": list(self.positions)})
        from zarr.codecs import Crc32cCodec

        # a CRC32C of each chunk, which zarr checks on every read: a damaged file is an error, never other Moments
        encoding = {name: {"compressors": (Crc32cCodec(),)} for name in variables}

        def write(tmp: Path) -> None:
            with every_chunk_written():  # an array equal to the fill value (labels [0], n = 0): its file too
                dataset.to_zarr(tmp, zarr_format=3, consolidated=False, encoding=encoding)
            _record_attributes_digest(tmp)

        write_atomically(path, write, overwrite=overwrite, replaceable=_is_saved_moments, what="saved Moments")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Moments:
        """Read Moments written by ``save()``."""
        path = expanded(path)
        moments, attrs = read_saved(path)
        done, total = attrs.get("datapoints_done"), attrs.get("datapoints_total")
        if done is not None and (total is None or done < total):  # a checkpoint (checkpoint.save_progress)
            warnings.warn(f"{path} is the checkpoint of a run that "
                          + (f"stopped after {done} of its {total} datapoints" if total is not None else
                             f"had done {done} datapoints when it was saved (saved by an earlier chunkcca, it does "
                             f"not say of how many)")
                          + ": these Moments hold those datapoints only; run the same call with the same "
                            "checkpoint= to finish it", UserWarning, stacklevel=user_stacklevel())
        if "precision" not in attrs:  # saved before Moments recorded it: taken as float32, the default then
            warnings.warn(f"saved Moments at {path} do not record their products' precision (saved by an earlier "
                          f"chunkcca): taken as float32, the default then, so directions within its rounding are "
                          f"cut; if they were made with float64 products, dataclasses.replace(moments, "
                          f"precision='float64')", UserWarning, stacklevel=user_stacklevel())
        if "value_rounding" not in attrs:  # saved before Moments recorded it
            warnings.warn(f"saved Moments at {path} do not record their activations' rounding (saved by an earlier "
                          f"chunkcca): directions within float32 rounding are kept as real; compute them again, or "
                          f"give each side's: dataclasses.replace(moments, value_rounding=(eps_a, eps_b)) with "
                          f"eps = chunkcca.moments.value_eps(dtype of its activations)", UserWarning,
                          stacklevel=user_stacklevel())
        if "positions" not in attrs and moments.batch_shape and any(moments.value_rounding):  # a dft's, saved before
            warnings.warn(f"saved Moments at {path} do not record the positions each side's spectra sum over (saved by "
                          f"an earlier chunkcca): each frequency is cut at its own values' rounding only, which can "
                          f"count a direction their rounding makes as real; compute them again, or give each side's: "
                          f"dataclasses.replace(moments, positions=(positions_a, positions_b)), a map's height × "
                          f"width", UserWarning, stacklevel=user_stacklevel())
        return moments


class MetadataEdited(ValueError):
    """Saved Moments whose metadata is not that written (``attributes_intact``)."""


def read_saved(path: str | os.PathLike) -> tuple[Moments, dict[str, Any]]:
    """Moments written by ``Moments.save()`` and the attributes saved with them (saves before ``value_rounding``
    lack it: theirs loads as 0, exact; checkpoints have ``datapoints_done`` and ``datapoints_total``). Read again
    when a save replaced them meanwhile (``SAVE_ATTR``; a checkpoint watched while its run saves): its files read
    one by one mixed two saves (``n`` of one, ``scatter`` of the other, silently); an error after
    ``LOAD_ATTEMPTS``."""
    path = Path(path)
    for _ in range(LOAD_ATTEMPTS):
        before = zarr_attributes(path).get(SAVE_ATTR)
        moments, attributes = _read_saved_once(path)
        if zarr_attributes(path).get(SAVE_ATTR) == before:
            return moments, attributes
    raise ValueError(f"saved Moments at {path} were saved again each of {LOAD_ATTEMPTS} times they were read (a "
                     f"checkpoint whose run is saving): load them once it is done")


def _read_saved_once(path: Path) -> tuple[Moments, dict[str, Any]]:
    """``read_saved``'s one reading of the store at ``path``."""
    if not path.exists():
        raise FileNotFoundError(f"no saved Moments at {path}")
    if not (path / "zarr.json").is_file():
        raise ValueError(f"{path} is not a saved chunkcca Moments store (not a zarr store)")
    import zarr

    if zarr_attributes(path).get("chunkcca") != "Moments":
        raise ValueError(f"{path} is not a saved chunkcca Moments store")
    if not attributes_intact(path):  # before xarray decodes what an edit put there
        raise MetadataEdited(f"saved Moments at {path} are damaged: their metadata (the attributes in zarr.json: "
                             f"layers, rounding, a checkpoint's progress; an array's type or attributes) was changed "
                             f"or damaged since they were written; read as it is it could give other numbers: "
                             f"compute them again")
    with xr.open_zarr(path, consolidated=False, chunks=None) as dataset:  # numpy: read here, not on a cluster
        lacking = [name for name in REQUIRED_ARRAYS if name not in dataset.variables]
        if lacking:
            raise ValueError(f"saved Moments at {path} are damaged: they lack the "
                             f"array{'s' if len(lacking) > 1 else ''} {', '.join(map(repr, lacking))}")
        for name, array in zarr.open_group(path, mode="r").arrays():  # zarr reads a lost file as its fill value
            if _saved_array(name) and array.nchunks_initialized < array.nchunks:  # (a user's own array: theirs)
                raise ValueError(f"saved Moments at {path} are damaged: {name!r} lacks "
                                 f"{array.nchunks - array.nchunks_initialized} of its {array.nchunks} chunk files")
        try:
            return Moments(
                n=int(dataset["n"].values),
                mean=dataset["mean"].values,
                scatter=dataset["scatter"].values,
                sizes=tuple(int(s) for s in dataset["sizes"].values),
                norm_moments=dataset["norm_moments"].values if "norm_moments" in dataset else None,
                norm_products=dataset["norm_products"].values if "norm_products" in dataset else None,
                precision=dataset.attrs.get("precision", "float32"),  # saves before it: the default products
                layers=tuple(dataset.attrs.get("layers", ())),  # saves before provenance: unknown
                rows_from=dataset.attrs.get("rows_from", ""),
                value_rounding=tuple(dataset.attrs.get("value_rounding", ())),
                channel_labels=tuple(dataset[f"channel_labels{side}"].values if f"channel_labels{side}" in dataset
                                     else None for side in range(dataset.sizes["side"])),
                batch_labels={dataset[name].attrs["name"]: dataset[name].values for name in sorted(dataset.data_vars)
                              if name.startswith("labels_batch")},
                positions=tuple(dataset.attrs.get("positions", ())),  # saves before it: unknown
                map_power=tuple(dataset[f"map_power{side}"].values if f"map_power{side}" in dataset else None
                                for side in range(dataset.sizes["side"])),
            ), dict(dataset.attrs)
        except ValueError as error:  # a file failing its checksum, or another array's passing its own (zarr:
            # "cannot reshape array of size 22 into shape (2,)"), or arrays that do not fit together
            why = "a file fails its checksum" if fails_checksum(error) else "an array cannot be read as saved"
            raise ValueError(f"saved Moments at {path} are damaged: {why} ({error})") from None


def check_savable_labels(labels: Sequence[np.ndarray | None], layers: Sequence[str]) -> None:
    """A ValueError naming the first side whose channel ``labels`` (one array or None per side, of ``layers``) a
    saved Moments store cannot hold: objects other than text or numbers of one type (a MultiIndex's tuples, a mix
    of numbers and text); zarr refused them only once the save was under way."""
    for side, (values, layer) in enumerate(zip(labels, layers)):
        named = f"layer {layer!r}" if layer else f"side {'ab'[side] if len(labels) == 2 else side}"
        if values is not None and values.dtype == "S1":  # xarray reads one-byte strings back as characters of one
            raise ValueError(f"the channel labels of {named} are one-byte strings ({values[:2].tolist()}…), which "
                             f"saved Moments and checkpoints read back as one label; give them as text, "
                             f"layer.assign_coords(channel=layer['channel'].astype(str))")
        if values is None or values.dtype != object:
            continue
        kinds = sorted({type(value).__name__ for value in values.tolist()})
        if len(kinds) == 1 and kinds[0] in ("str", "int", "float", "bool"):
            continue
        raise ValueError(f"the channel labels of {named} are {' and '.join(kinds)} values ({values[:2].tolist()}…), "
                         f"which saved Moments and checkpoints cannot hold (labels of one type: text or numbers); "
                         f"give the layer plain labels, e.g. layer.reset_index('channel') for a MultiIndex, or "
                         f"layer.assign_coords(channel=layer['channel'].astype(str))")


def value_eps(dtype: np.dtype) -> float:
    """The relative rounding of activations of ``dtype``, as ``Moments.value_rounding`` records it: the machine
    epsilon of a float (or complex) type coarser than float64; 0 for float64, whose rounding the solves allow
    for anyway, and for integers, which are exact."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.inexact) or np.finfo(dtype).bits >= 64:
        return 0.0
    return float(np.finfo(dtype).eps)


#: The root attribute recording a digest of every saved array's metadata (``arrays_digest``).
ARRAYS_ATTR = "chunkcca_arrays"
#: The root attribute naming each save (a random id): a load that saw it change was mixing two saves.
SAVE_ATTR = "chunkcca_save"
#: The root attributes of saved Moments that loading reads (a checkpoint's too): what ``ATTRIBUTES_ATTR`` covers.
#: Others (a user's notes) may change.
READ_ATTRIBUTES = ("chunkcca", "precision", "layers", "rows_from", "value_rounding", "positions",
                   "datapoints_done", "datapoints_total", "fingerprint", ARRAYS_ATTR, SAVE_ATTR)
#: Times a load that met a save replacing the Moments reads them again.
LOAD_ATTEMPTS = 3
#: The arrays every save holds.
REQUIRED_ARRAYS = ("n", "mean", "scatter", "sizes")


def attributes_digest(attributes: dict[str, Any]) -> str:
    """The digest ``ATTRIBUTES_ATTR`` records of a saved Moments store's root ``attributes`` that loading reads
    (``READ_ATTRIBUTES``)."""
    return json_digest({key: attributes[key] for key in READ_ATTRIBUTES if key in attributes})


def attributes_intact(path: str | os.PathLike) -> bool:
    """Whether the metadata of the saved Moments at ``path`` is that written: the root attributes' digest is the
    one recorded beside them (``ATTRIBUTES_ATTR``), and the arrays' metadata's is (``ARRAYS_ATTR``; an array's
    ``add_offset`` or ``units`` added, which xarray decodes, or its data type changed, gave other statistics);
    True for saves made before each, which record none: a save holding what later saves added (``ARRAYS_ATTR``,
    ``SAVE_ATTR``) without the attributes' digest had it taken out (its ``datapoints_done`` edited then loaded)."""
    attributes = zarr_attributes(Path(path))
    if ATTRIBUTES_ATTR not in attributes:
        return ARRAYS_ATTR not in attributes and SAVE_ATTR not in attributes
    return attributes[ATTRIBUTES_ATTR] == attributes_digest(attributes) \
        and (ARRAYS_ATTR not in attributes or attributes[ARRAYS_ATTR] == arrays_digest(Path(path)))


def arrays_digest(path: Path) -> str:
    """A digest of the metadata (``zarr.json``, as JSON) of every array ``Moments.save`` writes in the saved
    Moments store at ``path``, by name: one lost or edited changes it (a user's own array inside does not)."""
    metadata: dict[str, Any] = {}
    for folder in sorted(path.iterdir()):
        if _saved_array(folder.name) and (folder / "zarr.json").is_file():
            text = (folder / "zarr.json").read_text(errors="replace")
            try:
                metadata[folder.name] = json.loads(text)
            except ValueError:
                metadata[folder.name] = text
    return json_digest(metadata)


def _record_attributes_digest(path: Path) -> None:
    """Record beside the root attributes of the Moments store just written at ``path`` the digest of its arrays'
    metadata, then of those attributes as written (as zarr encoded them: a user's numpy values as JSON)."""
    import zarr

    group = zarr.open_group(path, mode="r+", zarr_format=3)
    group.attrs[SAVE_ATTR] = uuid.uuid4().hex
    group.attrs[ARRAYS_ATTR] = arrays_digest(path)
    group.attrs[ATTRIBUTES_ATTR] = attributes_digest(zarr_attributes(path))


def _is_saved_moments(path: Path) -> bool:
    """Whether ``path`` holds Moments written by :meth:`Moments.save` (a zarr group so marked) and nothing else."""
    return zarr_attributes(path).get("chunkcca") == "Moments" and not group_foreign_files(path, _saved_array)


#: The arrays ``Moments.save`` writes.
SAVED_ARRAYS = re.compile(r"n|mean|scatter|sizes|norm_moments|norm_products|channel_labels\d+|labels_batch\d+"
                          r"|map_power\d+")


def _saved_array(name: str) -> bool:
    return SAVED_ARRAYS.fullmatch(name) is not None


def check_only_moments(path: Path, what: str = "an overwrite") -> None:
    """Before ``what`` replaces saved Moments (or a checkpoint) at ``path``: a FileExistsError naming what in it
    chunkcca did not write (a user's notes or plots put inside it would go with it)."""
    if path.is_dir() and zarr_attributes(path).get("chunkcca") == "Moments" \
            and (foreign := group_foreign_files(path, _saved_array)):
        raise FileExistsError(f"{path} holds what chunkcca did not write ({', '.join(foreign)}"
                              f"{' …' if len(foreign) == 3 else ''}); {what} replaces only Moments that "
                              f"chunkcca saved: move them out of it, or choose another path")


def side_slices(sizes: Sequence[int]) -> list[slice]:
    """The slice of the concatenated channels that belongs to each side of ``sizes`` channels."""
    edges = itertools.accumulate((int(size) for size in sizes), initial=0)
    return [slice(lo, hi) for lo, hi in itertools.pairwise(edges)]


def _side_traces(matrix: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """Trace of each side's diagonal block of ``matrix`` (p, p): (L,)."""
    return np.array([np.trace(matrix[part, part]) for part in slices])


class PackedParts(NamedTuple):
    """Views into a packed partial (1, *batch, p + 2 [+ 2L], p) (see the module's docstring)."""

    mean: np.ndarray  # (*batch, p)
    scatter: np.ndarray  # (*batch, p, p)
    norm_moments: np.ndarray | None  # (L, p), or None without row-norm sums
    norm_products: np.ndarray | None  # (L, L)

    def norm_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """The row-norm sums (norm_moments, norm_products) of a partial that has them."""
        if self.norm_moments is None or self.norm_products is None:
            raise ValueError("this packed partial has no row-norm sums")
        return self.norm_moments, self.norm_products


def packed_shape(batch: tuple[int, ...], p: int, norm_sides: int = 0) -> tuple[int, ...]:
    """The shape (1, *batch, p + 2 + 2L, p) of a packed partial of ``p`` channels with the row-norm sums of
    ``norm_sides`` = L sides (0: none)."""
    return (1, *batch, p + 2 + 2 * norm_sides, p)


def packed_parts(packed: np.ndarray) -> PackedParts:
    """The mean, scatter and row-norm sums of a packed partial, as views (writing them writes it)."""
    p = packed.shape[-1]
    sides = (packed.shape[-2] - p - 2) // 2
    return PackedParts(packed[0, ..., 1, :], packed[0, ..., 2 : p + 2, :],
                       packed[0, p + 2 : p + 2 + sides] if sides else None,
                       packed[0, p + 2 + sides :, :sides] if sides else None)


def packed_count(packed: np.ndarray) -> float:
    """The row count n of a packed partial."""
    return float(packed[(0,) * packed.ndim].real)


def set_count(packed: np.ndarray, count: float) -> None:
    """Write the row count n of a packed partial (in every batch element's first entry)."""
    packed[0, ..., 0, 0] = count


def pack(moments: Moments) -> np.ndarray:
    """Moments as one packed partial (1, *batch, p + 2 [+ 2L], p): n, mean, scatter [, norm_moments,
    norm_products]."""
    sides = 0 if moments.norm_moments is None else len(moments.sizes)
    packed = np.zeros(packed_shape(moments.batch_shape, moments.channels, sides), dtype=moments.scatter.dtype)
    set_count(packed, moments.n)
    parts = packed_parts(packed)
    parts.mean[...], parts.scatter[...] = moments.mean, moments.scatter
    if sides:
        norms, products = parts.norm_sums()
        norms[...], products[...] = moments.norm_moments, moments.norm_products
    return packed


def unpack(packed: np.ndarray, sizes: Sequence[int] = (), precision: str = "float64") -> Moments:
    """Inverse of ``pack()`` for a packed partial (1, *batch, p + 2 [+ 2L], p), computed in ``precision``."""
    parts = packed_parts(packed)
    scatter = parts.scatter.copy()
    if np.iscomplexobj(scatter):
        _make_hermitian(scatter)
    p, norms = packed.shape[-1], parts.norm_moments
    return Moments(n=int(packed_count(packed)), mean=parts.mean.copy(), scatter=scatter,
                   sizes=tuple(sizes) or ((p,) if norms is None or len(norms) == 1 else ()),
                   norm_moments=None if norms is None else norms.copy(),
                   norm_products=None if parts.norm_products is None else parts.norm_products.copy(),
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


#: Bytes of the temporaries of one step of ``add_outer()``.
OUTER_BYTES = 8 * 2**20


def add_outer(target: np.ndarray, vector: np.ndarray, weight: float) -> None:
    """``target += weight · v vᴴ`` in place, per batch element: target (*batch, p, p), vector (*batch, p), with
    temporaries of at most ``OUTER_BYTES`` (a few rows of one batch element's outer product at a time)."""
    p = vector.shape[-1]
    step = max(1, OUTER_BYTES // max(1, p * target.itemsize))
    for index in np.ndindex(*vector.shape[:-1]):
        matrix, v = target[index], vector[index]
        right = v.conj()
        for lo in range(0, p, step):
            outer = np.multiply.outer(v[lo : lo + step], right)
            outer *= weight  # after the product, so that the update stays exactly symmetric
            matrix[lo : lo + step] += outer


def move_centre(mean: np.ndarray, n_a: float, n_b: float, mean_b: np.ndarray,
                add_outer: Callable[[np.ndarray, float], None]) -> float:
    """Chan et al.'s change of centre, once the scatter of n_b rows about ``mean_b`` was added to one of n_a rows
    about ``mean``: ``add_outer(v, w)`` adds w · v vᴴ where the scatter is kept, here (n_a n_b / n) δδᴴ with
    δ = mean_b − mean, and ``mean`` moves in place to the merged mean. Returns n = n_a + n_b."""
    n = n_a + n_b
    if n_a:
        delta = mean_b - mean
        add_outer(delta, n_a * n_b / n)
        mean += delta * (n_b / n)
    else:
        mean[...] = mean_b
    return n


def merge_into(into: np.ndarray, part: np.ndarray, sizes: Sequence[int] = ()) -> np.ndarray:
    """Merge the packed partial ``part`` into the packed partial ``into`` (both (1, *batch, p + 2 [+ 2L], p)) in
    place, exactly, and return ``into``.

    Chan et al.'s update: with δ = μ_b − μ_a, ``M = M_a + M_b + (n_a n_b / n) δδᴴ`` and
    ``μ = μ_a + δ n_b / n``; row-norm sums are moved to the merged mean with ``shift_norms()`` and added.
    Temporaries are O(batch · p) (and O(p · L) for row-norm sums), never a second p × p matrix.
    """
    p = into.shape[-1]
    n_a, n_b = packed_count(into), packed_count(part)
    if n_b == 0:
        return into
    if n_a == 0:
        into[...] = part
        return into
    n = n_a + n_b
    ours, theirs = packed_parts(into), packed_parts(part)
    if ours.norm_moments is not None:  # real Moments, no batch: both sides' row-norm sums to the merged mean
        sizes = tuple(sizes) or (p,)
        slices = side_slices(sizes)
        mean = ours.mean + (theirs.mean - ours.mean) * (n_b / n)
        shifted = [shift_norms(count, np.zeros(p), parts.scatter, _side_traces(parts.scatter, slices),
                               *parts.norm_sums(), mean - parts.mean, sizes)
                   for count, parts in ((n_a, ours), (n_b, theirs))]  # before M_a changes
        norms, products = ours.norm_sums()
        norms[...], products[...] = shifted[0][0] + shifted[1][0], shifted[0][1] + shifted[1][1]
    ours.scatter[...] += theirs.scatter
    set_count(into, move_centre(ours.mean, n_a, n_b, theirs.mean, partial(add_outer, ours.scatter)))
    return into


#: Bytes of one sub-block's products held at once in the product precision: batched (per-frequency) products
#: are made a few frequencies at a time (a single matrix larger than this is made whole).
PRODUCT_BYTES = 8 * 2**20

#: Checks one sub-block's rows (a list, one (*batch, rows, pᵢ) array per side, and the index of its first row among
#: the chunk's) when they hold NaN or Inf: raises naming the layer, or returns them without the rows at fault.
RowCheck = Callable[[list[np.ndarray], int], list[np.ndarray]]


def _flat(array: np.ndarray) -> np.ndarray:
    """A view of (*batch, m, n) as (B, m, n)."""
    flat = array.reshape(int(np.prod(array.shape[:-2], dtype=np.int64)), *array.shape[-2:])
    assert flat.size == 0 or np.may_share_memory(flat, array), "batched products are added in place"
    return flat


#: Adds one sub-block's products where they are kept: ``add(block, widen)``, block (*batch, rows, p) in the
#: product precision, ``widen()`` the same rows in float64 (complex128), for products that ``single_failed``;
#: returns whether it widened any.
AddProducts = Callable[[np.ndarray, Callable[[], np.ndarray]], bool]


def _add_products(products: np.ndarray, block: np.ndarray, widen: Callable[[], np.ndarray]) -> bool:
    """``products += Bᵀ B̄`` per batch element, multiplied in the block's precision a few batch elements at a time
    (``PRODUCT_BYTES``), a group whose single-precision products failed made again from ``widen()``: products
    (*batch, p, p) float64/complex128, block (*batch, rows, p). A real block's Bᵀ B runs as one symmetric rank-k
    update (SYRK), exactly symmetric. Returns whether a group was widened."""
    flat_products, flat_block = _flat(products), _flat(block)
    p = block.shape[-1]
    group = max(1, PRODUCT_BYTES // (p * p * block.itemsize))
    temp = np.empty((min(group, flat_block.shape[0]), p, p), dtype=block.dtype)
    widened = False
    for lo in range(0, flat_block.shape[0], group):
        part = flat_block[lo : lo + group]
        out = temp[: part.shape[0]]
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            np.matmul(np.swapaxes(part, -1, -2), part.conj() if np.iscomplexobj(part) else part, out=out)
        if single_failed(out, part):
            wide = _flat(widen())[lo : lo + group]
            flat_products[lo : lo + group] += np.swapaxes(wide, -1, -2) @ (wide.conj() if np.iscomplexobj(wide)
                                                                          else wide)
            widened = True
        else:
            flat_products[lo : lo + group] += out
    return widened


#: float32 products of values whose squares average below this per row have lost digits to underflow (float32's
#: smallest normal number is 2**-126): they are made again in float64, as are products that overflowed.
SINGLE_UNDERFLOW = 2.0**-110


def single_failed(products: np.ndarray, block: np.ndarray) -> bool:
    """Whether single-precision products (…, p, p) of the rows ``block`` (…, rows, p) over- or underflowed: not
    finite, or a channel's squares (the diagonal) averaging below ``SINGLE_UNDERFLOW``, or 0 while its values
    are not all 0. False for products in float64 (complex128). O(p²) on products made, and one pass over the
    block when a channel's squares are 0 (a dead channel: ~9% of a fold with half the channels dead, p = 256)."""
    if products.dtype not in (np.float32, np.complex64):
        return False
    if not np.isfinite(products).all():
        return True
    return squares_failed(np.diagonal(products, axis1=-2, axis2=-1).real, block)


def squares_failed(squares: np.ndarray, block: np.ndarray) -> bool:
    """Whether the single-precision sums of squares (…, p) of the channels of the rows ``block`` (…, rows, p)
    underflowed: a channel's averaging below ``SINGLE_UNDERFLOW``, or 0 while its values are not all 0."""
    squares = squares / max(block.shape[-2], 1)
    if ((squares > 0) & (squares < SINGLE_UNDERFLOW)).any():
        return True
    zero = squares == 0  # (…, p): a dead channel, or values whose squares underflowed to 0
    # which columns hold a value other than 0: one buffered pass over the block, no copy of it
    return bool(zero.any()) and bool((np.logical_or.reduce(block, axis=-2) & zero).any())


@lru_cache(maxsize=16)
def sampled_rows(rows: int) -> np.ndarray:
    """``SHIFT_ROWS`` of ``rows`` rows (all of them, if fewer), drawn at random with a fixed seed, in order (kept
    for the chunks of a size; read-only)."""
    sampled = np.arange(rows) if rows <= SHIFT_ROWS else np.sort(
        np.random.default_rng(0).choice(rows, SHIFT_ROWS, replace=False))
    sampled.flags.writeable = False
    return sampled


class _Shifted:
    """The rows of each side, shifted by ``shift`` and concatenated along channels, one sub-block of at most
    ``per_block`` rows at a time through one reused buffer of the product precision."""

    def __init__(self, sides: Sequence[np.ndarray], precision: ProductPrecision) -> None:
        batch, self.rows = sides[0].shape[:-2], sides[0].shape[-2]
        self.sides, self.slices = sides, side_slices([side.shape[-1] for side in sides])
        p = self.slices[-1].stop
        self.is_complex = any(np.iscomplexobj(side) for side in sides)
        self.dtype = np.dtype(np.result_type(precision, np.complex64) if self.is_complex else precision)
        self.wide = np.dtype(np.complex128 if self.is_complex else np.float64)
        budget = SUBBLOCK_BYTES if all(isinstance(side, np.ndarray) for side in sides) else MADE_SUBBLOCK_BYTES
        # wide rows: at least p / 2 rows a sub-block, so adding each sub-block's p × p products to the float64
        # sums costs a few percent of making them (measured 0.58 of the float32 SYRK rate at p = 8192 with 512)
        fewest = p // 2 if not batch else 1
        self.per_block = max(1, min(SUBBLOCK_ROWS, self.rows,
                                    max(fewest, budget // (max(1, int(np.prod(batch))) * p * self.dtype.itemsize))))
        self.buffer = np.empty((*batch, self.per_block, p), dtype=self.dtype)
        self.ones = np.ones(self.per_block, dtype=self.dtype)
        # dft rows are transformed as they are taken: the first sub-block is taken once, for the shift too
        self.first = [side[..., : self.per_block, :] for side in sides]
        # the shift and grids from SHIFT_ROWS rows drawn from the whole chunk where its rows are at hand (its first
        # rows may be padding, or unlike the rest: zeros there left a layer of 128 ± 20 unshifted, ρ off by 2e-4),
        # at random, with a fixed seed: rows at a fixed step fell on one position of every map (flatten's rows)
        sampled = sampled_rows(self.rows)
        leading = [side[..., sampled, :] if isinstance(side, np.ndarray) else first[..., :SHIFT_ROWS, :]
                   for side, first in zip(sides, self.first)]
        shift = np.concatenate([side.mean(axis=-2, dtype=self.wide) for side in leading], axis=-1)
        if not np.isfinite(shift).all():  # the mean of the finite rows among them (rows with NaN or Inf go to check)
            finite = np.logical_and.reduce([np.isfinite(side).all(axis=tuple(i for i in range(side.ndim)
                                                                              if i != side.ndim - 2))
                                            for side in leading])
            shift = np.concatenate([side[..., finite, :].mean(axis=-2, dtype=self.wide) if finite.any()
                                    else np.zeros(side.shape[:-2] + side.shape[-1:], self.wide)
                                    for side in leading], axis=-1)
        # what is subtracted, exactly: in the rows' own precision where it is finer than the products' (float64
        # rows, float32 products), so that a constant channel shifts to 0 and a common offset costs no digits;
        # else in the products' (float32 rows: the subtraction stays in float32). Channels whose values lie on a
        # coarse grid (``coarse_grid``: integers, quantized levels, float32's own steps at a large offset) are
        # shifted by a point of their grid, in float64: each value then shifts to a multiple of the grid, exact in
        # float32, where a shift off the grid rounded each level the same way (ρ off by 1e-5)
        finest = np.result_type(*(side.dtype for side in sides), self.dtype)
        #: whether the products are made in float64 (complex128) whatever the precision: values on a grid too
        #: fine for exact float32 sums and too coarse for their rounding to average out
        self.widened = False
        #: the channels on a coarse grid and the sums of their squares a sub-block's float32 products hold
        #: exactly (2²⁴ grid steps²): a sub-block beyond them (rows far larger than the first) is made in float64
        self.coarse: np.ndarray | None = None
        self.exact_squares: np.ndarray | None = None
        grid = None
        if self.dtype == np.float32:
            mean, spread = finite_spread(leading)
            grid = coarse_grid(leading, mean, spread)
        if grid is not None and grid.any():
            shift = np.where(grid > 0, np.round(shift / np.where(grid > 0, grid, 1.0)) * grid, shift)
            finest = np.dtype(self.wide) if finest.itemsize <= self.dtype.itemsize else finest
            exact = exact_rows(mean, spread, shift, grid)
            if exact >= max(EXACT_ROWS_LEAST, fewest):
                self.per_block = min(self.per_block, exact)
                self.first = [side[..., : self.per_block, :] for side in self.first]  # the rest taken again
                self.coarse = np.flatnonzero(grid.reshape(-1, grid.shape[-1]).any(axis=0))
                coarse = grid[..., self.coarse]  # a batch element's channel off its grid: not checked
                self.exact_squares = np.where(coarse > 0, 2.0**24 * coarse**2, np.inf)
            else:
                self.widened = True
        self.shift = shift.astype(finest if finest.itemsize > self.dtype.itemsize else self.dtype)[..., None, :]
        #: whether the rows are cast to a narrower type for the products (float64 rows, float32 products)
        self.narrowed = finest.itemsize > self.dtype.itemsize

    def taken(self, start: int) -> list[np.ndarray]:
        """Each side's rows start … start + per_block − 1."""
        stop = min(start + self.per_block, self.rows)
        if start == 0:
            first, self.first = self.first, []  # not held past its turn
            return first
        return [side[..., start:stop, :] for side in self.sides]

    def flushed(self, block: np.ndarray, block_sums: np.ndarray, taken: list[np.ndarray]) -> bool:
        """Whether casting the taken rows to the product precision made a varying column all 0 in ``block`` (its
        values, shifted, below float32's smallest, 1.4e-45), which the products cannot tell from a dead channel.
        Only columns whose ``block_sums`` are 0 are looked at, in the block and in the rows taken."""
        if not self.narrowed:
            return False
        candidates = block_sums == 0  # (*batch, p): a column all 0 sums to 0
        if not candidates.any():
            return False
        for side, part in zip(taken, self.slices):
            columns = candidates[..., part]
            if not columns.any():
                continue
            if side.ndim == 2:  # only those columns
                index = np.flatnonzero(columns)
                zero = ~np.logical_or.reduce(block[:, part][:, index], axis=0)
                varies = np.logical_or.reduce(side[:, index] != self.shift[0, part][index], axis=0)
            else:
                zero = ~np.logical_or.reduce(block[..., part], axis=-2) & columns
                varies = np.logical_or.reduce(side != self.shift[..., part], axis=-2)
            if (zero & varies).any():
                return True
        return False

    def beyond_exact(self, block: np.ndarray) -> bool:
        """Whether a float32 ``block``'s channels on a coarse grid hold squares whose sums float32 would round (a
        sub-block's rows larger than the chunk's first rows promised): one pass over those channels."""
        if self.coarse is None or block.dtype != self.dtype:
            return False
        columns = block[..., self.coarse]
        return bool((np.einsum("...ij,...ij->...j", columns, columns) >= self.exact_squares).any())

    def summed(self, taken: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The taken rows shifted (``block()``, in float64 if ``widened``) and their sums (*batch, p): in the product
        precision a GEMV, as shifted values are small."""
        block = self.block(taken, wide=self.widened)
        return block, block.sum(axis=-2) if self.widened else self.ones[: block.shape[-2]] @ block

    def block(self, taken: list[np.ndarray], wide: bool = False) -> np.ndarray:
        """The taken rows shifted into the buffer (a new float64/complex128 array if ``wide``): (*batch, rows, p)."""
        rows = taken[0].shape[-2]
        block = np.empty((*self.buffer.shape[:-2], rows, self.buffer.shape[-1]), self.wide) if wide \
            else self.buffer[..., :rows, :]
        for side, part in zip(taken, self.slices):
            np.subtract(side, self.shift[..., part], out=block[..., part], casting="unsafe")
        return block


#: Values lie on a coarse grid when every one is a multiple of 2^-``SHIFT_BITS`` of their channel's spread (or of a
#: coarser step): float32 values 1e5 + 3·N(0, 1), on float32's steps of 2⁻⁷ there, integers 3e4 + 20·N(0, 1),
#: uint8 activations and float64 values on a ¼ grid. Shifted off their grid, float32 sums of such values' products
#: moved ρ by 4.5e-6 to 2.6e-5 (the same rounding, level after level); shifted by a point of it they are exact
#: (``exact_rows``), or made in float64.
SHIFT_BITS = 12
#: Rows a channel's grid is first looked for in: continuous values are found off it in these.
GRID_HEAD_ROWS = 32


def finite_spread(leading: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's mean and spread (standard deviation) over the finite values of the ``leading`` rows (each
    side's, (*batch, rows, pᵢ)), in float64: (*batch, p) each, the sides' channels concatenated."""
    means, spreads = [], []
    for side in leading:
        values = np.asarray(side, dtype=np.float64)  # exactly: float32, float16 and integers (to 2⁵³) alike
        finite = np.isfinite(values)
        # by hand, not nanstd, whose warning for a channel with no finite value would need warnings.catch_warnings,
        # which is not thread-safe: in a fold's thread it dropped the user's warnings raised meanwhile
        counted = np.maximum(finite.sum(axis=-2), 1)
        means.append(np.where(finite, values, 0).sum(axis=-2) / counted)
        spreads.append(np.sqrt((np.where(finite, values - means[-1][..., None, :], 0.0) ** 2).sum(axis=-2) / counted))
    return np.concatenate(means, axis=-1), np.concatenate(spreads, axis=-1)


def coarse_grid(leading: Sequence[np.ndarray], mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Each channel's grid in the ``leading`` rows (each side's, (*batch, rows, pᵢ); rows with NaN or Inf left out),
    of ``spread`` (``finite_spread``; ``mean`` gives the shape): the largest power of 2 all its values are
    multiples of, where that is at least 2^-``SHIFT_BITS`` of its spread (rounded down to a power of 2), else 0
    (a float channel constant there: its grid is not seen); 1 for every channel of an integer dtype whose spread
    is below 2^(``SHIFT_BITS`` + 1). (*batch, p) float64."""
    least = np.exp2(np.floor(np.log2(np.where(spread > 0, spread, 1.0))) - SHIFT_BITS)
    grids, start = [], 0
    for side in leading:
        part = slice(start, start + side.shape[-1])
        start = part.stop
        if np.issubdtype(side.dtype, np.integer):
            grids.append(np.where(least[..., part] <= 1, 1.0, 0.0))
            continue
        values = np.asarray(side, dtype=np.float64)
        head = values[..., :GRID_HEAD_ROWS, :] / least[..., None, part]  # exact: a power of 2
        # continuous values are found off the grid in the first rows; constant channels have none to find
        candidates = ((head == np.round(head)) | ~np.isfinite(head)).all(axis=-2) & (spread[..., part] > 0)
        grid = np.zeros(candidates.shape)
        if candidates.any():
            grid[candidates] = _largest_divisor(np.moveaxis(values, -2, -1)[candidates])
        grids.append(np.where((grid >= least[..., part]) & np.isfinite(grid), grid, 0.0))
    return np.concatenate(grids, axis=-1).reshape(mean.shape)


def _largest_divisor(channels: np.ndarray) -> np.ndarray:
    """The largest power of 2 every finite value of each row of ``channels`` (channels, rows) is a multiple of
    (inf for a row of zeros): each value's 53-bit significand's lowest set bit, at its exponent."""
    fraction, exponent = np.frexp(np.where(np.isfinite(channels), channels, 0.0))
    significand = (fraction * 2.0**53).astype(np.int64)
    lowest = np.ldexp((significand & -significand).astype(np.float64), exponent - 53)
    return np.where(significand != 0, lowest, np.inf).min(axis=-1)  # 0 is a multiple of every step


#: A sub-block of values on a coarse grid holds at least these rows (fewer: products in float64), so that the
#: per-sub-block work (adding p × p products into float64, a few numpy calls) stays a small part of the products.
EXACT_ROWS_LEAST = 2048


def exact_rows(mean: np.ndarray, spread: np.ndarray, shift: np.ndarray, grid: np.ndarray) -> int:
    """The rows a sub-block may hold for float32 sums of the products of the channels on a ``grid`` (> 0), shifted
    by ``shift`` (a point of it), to be exact: whole numbers of grid steps below 2^24 (a sum of squares is the
    largest of a block's sums, the others bounded by them), from the sampled rows' mean square about the shift
    (spread² + (mean − shift)², ``finite_spread``), 4 × for rows beyond them. Biased where rounded: squares of
    whole numbers are not uniform modulo a power of 2."""
    on = grid > 0
    squares = (spread**2 + (mean - shift) ** 2) / np.where(on, grid, 1.0) ** 2
    largest = float(np.where(on, squares, 0.0).max())
    return int(2.0**24 // max(4 * largest, 1.0))


def _widened(made: list[np.ndarray], shifted: _Shifted, taken: list[np.ndarray]) -> np.ndarray:
    """The taken rows shifted in float64 (complex128), made once (kept in ``made``)."""
    if not made:
        made.append(shifted.block(taken, wide=True))
    return made[0]


def accumulate(add_products: AddProducts, sides: Sequence[np.ndarray], precision: ProductPrecision,
               *, check: RowCheck | None,
               row_norms: bool = False) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """Give the rows u = z − shift (each side's rows z, concatenated) to ``add_products`` one sub-block at a time
    (*batch, rows, p), which adds their products where they are kept (``Σ u uᴴ`` into a scatter, or some of its
    blocks); returns the shift (*batch, p), ``Σ u`` (*batch, p), the rows counted and, with ``row_norms``,
    ``Σ ‖u_l‖² uᵀ`` (L, p) and ``Σ ‖u_l‖² ‖u_m‖²`` (L, L) about the shift.

    A sub-block whose sums are not finite goes to ``check`` (which raises or leaves the rows at fault out); one
    whose single-precision sums overflowed is taken in float64, and products that failed in single precision
    (``single_failed``) are made again from it.
    """
    shifted = _Shifted(sides, precision)
    n_sides = len(sides) if row_norms and not shifted.is_complex else 0
    sums = np.zeros(shifted.shift.shape[:-2] + shifted.shift.shape[-1:], dtype=shifted.wide)
    norm_moments, norm_products = np.zeros((n_sides, shifted.buffer.shape[-1])), np.zeros((n_sides, n_sides))
    counted = 0
    for start in range(0, shifted.rows, shifted.per_block):
        taken = shifted.taken(start)
        with np.errstate(over="ignore", invalid="ignore"):
            block, block_sums = shifted.summed(taken)
            if check is not None and not np.isfinite(block_sums).all():
                taken = check(taken, start)
                block, block_sums = shifted.summed(taken)
            if not np.isfinite(block_sums).all() or shifted.flushed(block, block_sums, taken) \
                    or shifted.beyond_exact(block):  # finite rows whose single-precision sums overflowed, whose
                # values the cast flushed to 0, or whose grid's products float32 would round
                block = shifted.block(taken, wide=True)
                block_sums = block.sum(axis=-2)
        if block.shape[-2] == 0:  # every row of the sub-block left out
            continue
        wide: list[np.ndarray] = []
        if add_products(block, partial(_widened, wide, shifted, taken)):
            block = wide[0]  # the sums (and row norms), as the products, of the rows in float64
            block_sums = block.sum(axis=-2)
        sums += block_sums
        counted += block.shape[-2]
        if n_sides:
            norms = np.stack([np.einsum("ij,ij->i", block[:, part], block[:, part]).astype(np.float64)
                              for part in shifted.slices], axis=1)  # (rows, L)
            if not np.isfinite(norms).all():  # a row's squared norm past float32's range, its channels' sums not
                norms = np.stack([np.einsum("ij,ij->i", block[:, part], block[:, part], dtype=np.float64)
                                  for part in shifted.slices], axis=1)
            # Σ ‖u_l‖² uᵀ holds third powers, which float32 over- or underflows where the squares do not (values
            # of 1e13, 1e-16): each side's norms are scaled by a power of 2 that brings its largest near 1, so the
            # terms are of the values' own size, whose squares float32 holds (``single_failed``)
            largest = norms.max(axis=0)
            scales = np.exp2(-np.round(np.log2(np.where((largest > 0) & (largest < np.inf), largest, 1.0))))
            norm_moments += ((norms * scales).T.astype(block.dtype) @ block).astype(np.float64) / scales[:, None]
            norm_products += norms.T @ norms
    return shifted.shift[..., 0, :].astype(shifted.wide), sums, counted, norm_moments, norm_products


def fold_rows(into: np.ndarray, sides: Sequence[np.ndarray], precision: ProductPrecision = "float32", *,
              check: RowCheck | None = None) -> np.ndarray:
    """Merge the rows of each side (concatenated along channels) into the packed partial ``into``
    (1, *batch, p + 2, p, no row-norm sums) in place, exactly, and return it.

    The rows' products (``Σ u uᴴ``, u the rows shifted by the mean of ``SHIFT_ROWS`` of them) are added straight into
    its scatter, one sub-block at a time (no second p × p matrix is made); then the change of centre:
    ``M = M_a + Σ u uᴴ − n_b ū ūᴴ + (n_a n_b / n) δδᴴ``, δ = (shift + ū) − μ_a (Chan et al.). ``check`` as for
    ``accumulate()``.
    """
    if sides[0].shape[-2] == 0:
        return into
    parts = packed_parts(into)
    set_count(into, fold_shifted(sides, precision, check, partial(_add_products, parts.scatter),
                                 partial(add_outer, parts.scatter), parts.mean, packed_count(into)))
    return into


def fold_shifted(sides: Sequence[np.ndarray], precision: ProductPrecision, check: RowCheck | None,
                 add_products: AddProducts, add_outer_to: Callable[[np.ndarray, float], None], mean: np.ndarray,
                 n_before: float) -> float:
    """Fold the rows of ``sides`` into statistics of ``n_before`` rows whose scatter ``add_products`` (a sub-block's
    ``Σ u uᴴ``) and ``add_outer_to`` (``w · v vᴴ``) add to, wherever it is kept, and whose ``mean`` moves in place:
    the shifted rows' products (``accumulate``), their own scatter about their mean, then Chan et al.'s change of
    centre (``move_centre``). Returns the rows now counted."""
    shift, sums, count, _, _ = accumulate(add_products, sides, precision, check=check)
    if count == 0:
        return n_before
    shifted_mean = sums / count
    add_outer_to(shifted_mean, -count)  # the rows' own scatter, about their mean
    return move_centre(mean, n_before, count, shift + shifted_mean, add_outer_to)


def partial_from_rows(sides: Sequence[np.ndarray], precision: ProductPrecision = "float32", *,
                      row_norms: bool = False, check: RowCheck | None = None) -> np.ndarray:
    """Packed partial (1, *batch, p + 2 [+ 2L], p) of the rows of each side, concatenated along channels.

    ``sides`` are arrays of shape (*batch, rows, pᵢ) with equal batch shape and rows, real or complex (or, for
    dft, ``rows.SpectrumRows``, whose slices are transformed as they are taken: each sub-block is taken once).
    The rows are shifted by the mean of the first ``SHIFT_ROWS`` rows (of the first sub-block) and multiplied in
    ``precision`` (complex64/complex128 for complex rows) one sub-block at a time through a single reused
    buffer; products and sums accumulate in float64 (complex128) and are corrected exactly for the shift. With
    ``row_norms`` real rows also give the row-norm sums (L = len(sides)) that the debiased CKA needs.
    """
    batch, p = sides[0].shape[:-2], sum(side.shape[-1] for side in sides)
    is_complex = any(np.iscomplexobj(side) for side in sides)
    n_sides = len(sides) if row_norms and not is_complex else 0
    packed = np.zeros(packed_shape(batch, p, n_sides), dtype=np.complex128 if is_complex else np.float64)
    if sides[0].shape[-2] == 0:
        return packed
    if not n_sides:
        return fold_rows(packed, sides, precision, check=check)
    parts = packed_parts(packed)
    products = parts.scatter
    shift, sums, count, norm_moments, norm_products = accumulate(partial(_add_products, products), sides, precision,
                                                                 check=check, row_norms=True)
    if count == 0:
        return packed
    shifted_mean = sums / count
    # Σ ‖u_l‖² over the shifted rows u is the trace of side l's block of Σ u uᵀ
    widths = [side.shape[-1] for side in sides]
    moved, squares = shift_norms(count, sums, products, _side_traces(products, side_slices(widths)), norm_moments,
                                 norm_products, shifted_mean, widths)
    packed_norms, packed_products = parts.norm_sums()
    packed_norms[...], packed_products[...] = moved, squares
    add_outer(products, shifted_mean, -count)
    set_count(packed, move_centre(parts.mean, 0.0, count, shift + shifted_mean, partial(add_outer, products)))
    return packed


def _make_hermitian(scatter: np.ndarray) -> None:
    """Each (p, p) matrix of a complex scatter (*batch, p, p) made exactly Hermitian in place: its lower triangle
    kept and mirrored, its diagonal made real (Bᵀ B̄ runs as a general product, not exactly Hermitian)."""
    p = scatter.shape[-1]
    upper, diagonal = np.triu_indices(p, 1), np.arange(p)
    for index in np.ndindex(*scatter.shape[:-2]):
        matrix = scatter[index]
        matrix[upper] = matrix.T[upper].conj()
        matrix[diagonal, diagonal] = matrix[diagonal, diagonal].real
