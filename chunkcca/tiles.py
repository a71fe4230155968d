"""Moments kept only for the pairs of layers a sweep compares: the blocks of the scatter it reads, never all of it.

A sweep of layers a₁ … a_m against b₁ … b_k reads, for each pair (a, b), the blocks [a, a], [a, b] and [b, b] of
the scatter of all the layers' channels; the blocks [a, a'] between two layers of one set are never read, and
for two sets of similar width they are about two thirds of the whole. A ``Tiling`` says which blocks are kept:
for each side l (a layer, in the order streamed) its *tile*, the rows of l's channels against the columns of l
itself and of the later sides paired with it (each block is kept once, under the first of its two sides).

``TiledMoments`` holds the row count, the mean of every channel and the tiles, merges exactly (Chan et al., as
``Moments``), and gives the ``Moments`` of one side or of one kept pair (``select()``). For streaming, a partial
travels as one flat float64 array (1, size): the count, the mean (P), then each tile, row-major (``Tiling``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, partial

import numpy as np

from .moments import OUTER_BYTES, Moments, RowCheck, fold_shifted, move_centre, side_slices, squares_failed
from .options import ProductPrecision

#: A run of channels [start, stop) of the concatenated sides.
Span = tuple[int, int]


@dataclass(frozen=True)
class Tiling:
    """Which blocks of the scatter of sides of ``sizes`` channels are kept: ``pairs``, the pairs of sides (i, j)
    compared (in any order; a side's own block is always kept)."""

    sizes: tuple[int, ...]
    pairs: frozenset[tuple[int, int]]

    @classmethod
    def of(cls, sizes: Sequence[int], pairs: Sequence[tuple[int, int]]) -> Tiling:
        return cls(tuple(int(size) for size in sizes), frozenset((min(i, j), max(i, j)) for i, j in pairs))

    @cached_property
    def partners(self) -> tuple[tuple[int, ...], ...]:
        """For each side l, the later sides paired with it, in order."""
        return tuple(tuple(sorted(j for i, j in self.pairs if i == side and j != side))
                     for side in range(len(self.sizes)))

    @cached_property
    def columns(self) -> tuple[tuple[Span, ...], ...]:
        """For each side l, the column spans of its tile: l's own channels, then its partners' (adjacent ones
        joined, so a set of consecutive layers is one span and one product)."""
        slices = side_slices(self.sizes)
        tiles = []
        for side, partners in enumerate(self.partners):
            spans = [(slices[side].start, slices[side].stop)]
            for partner in partners:
                start, stop = slices[partner].start, slices[partner].stop
                if len(spans) > 1 and spans[-1][1] == start:
                    spans[-1] = (spans[-1][0], stop)
                else:
                    spans.append((start, stop))
            tiles.append(tuple(spans))
        return tuple(tiles)

    @cached_property
    def widths(self) -> tuple[int, ...]:
        """Columns of each side's tile."""
        return tuple(sum(stop - start for start, stop in spans) for spans in self.columns)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Where each tile starts in a packed partial (after the count and the mean), and the end."""
        sizes = (size * width for size, width in zip(self.sizes, self.widths))
        return tuple(itertools.accumulate(sizes, initial=1 + self.channels))

    @property
    def channels(self) -> int:
        return sum(self.sizes)

    @property
    def size(self) -> int:
        """Elements of a packed partial."""
        return self.offsets[-1]

    def tiles(self, packed: np.ndarray) -> list[np.ndarray]:
        """Views of the tiles (sizeₗ, widthₗ) of a packed partial (1, size)."""
        return [packed[0, lo:hi].reshape(size, width) for lo, hi, size, width
                in zip(self.offsets, self.offsets[1:], self.sizes, self.widths)]

    def column_index(self, side: int) -> np.ndarray:
        """The channels of side's tile's columns, in order."""
        return np.concatenate([np.arange(start, stop) for start, stop in self.columns[side]])

    def add_outer(self, packed: np.ndarray, vector: np.ndarray, weight: float) -> None:
        """Each tile += weight · v[rows] v[columns]ᵀ, in place (the kept blocks of weight · v vᵀ), a few rows at a
        time (temporaries of at most ``moments.OUTER_BYTES``)."""
        for side, (tile, part) in enumerate(zip(self.tiles(packed), side_slices(self.sizes))):
            rows, columns = vector[part], vector[self.column_index(side)]
            step = max(1, OUTER_BYTES // (columns.size * columns.itemsize))
            for lo in range(0, rows.size, step):
                outer = np.multiply.outer(rows[lo : lo + step], columns)
                outer *= weight  # after the product, so that the diagonal blocks stay exactly symmetric
                tile[lo : lo + step] += outer

    def add_products(self, packed: np.ndarray, block: np.ndarray, widen: Callable[[], np.ndarray]) -> bool:
        """Each tile += the products of the block's rows (rows, P) for its blocks, made in the block's precision
        one span at a time; a tile whose side failed in single precision (its squares under- or overflowed:
        ``moments.squares_failed``) is made from ``widen()`` (the rows in float64), as is a span of another side
        that failed (the cross block of two sides of small values underflows though neither side's own block
        does), or any span whose product did not stay finite. Returns whether any was widened."""
        parts = side_slices(self.sizes)
        failed = [False] * len(parts)
        if block.dtype == np.float32:  # each side's squares in single precision: one pass over the block
            squares = np.einsum("ij,ij->j", block, block)
            failed = [not np.isfinite(squares[part]).all() or squares_failed(squares[part], block[:, part])
                      for part in parts]
        ends = np.cumsum(self.sizes)
        widened = False
        for side, (tile, part) in enumerate(zip(self.tiles(packed), parts)):
            wide = failed[side]
            source, column = (widen() if wide else block), 0
            for start, stop in self.columns[side]:
                first, last = np.searchsorted(ends, (start, stop - 1), "right")  # the sides the span holds
                rows = widen() if not wide and any(failed[first : last + 1]) else source
                with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                    product = rows[:, part].T @ rows[:, start:stop]
                if product.dtype == np.float32 and not np.isfinite(product).all():
                    product = widen()[:, part].T @ widen()[:, start:stop]
                widened |= rows is not block or product.dtype != block.dtype
                tile[:, column : column + stop - start] += product
                column += stop - start
        return widened


def fold_tiled(into: np.ndarray, sides: Sequence[np.ndarray], tiling: Tiling, precision: ProductPrecision, *,
               check: RowCheck | None = None) -> np.ndarray:
    """Merge the rows of each side (rows, pᵢ), real, into the packed tiled partial ``into`` in place, exactly, as
    ``moments.fold_rows`` does for a whole scatter, and return it."""
    if sides[0].shape[-2] == 0:
        return into
    into[0, 0] = fold_shifted(sides, precision, check, partial(tiling.add_products, into),
                              partial(tiling.add_outer, into), into[0, 1 : tiling.channels + 1], float(into[0, 0]))
    return into


def merge_tiled(into: np.ndarray, part: np.ndarray, tiling: Tiling) -> np.ndarray:
    """Merge the packed tiled partial ``part`` into ``into`` in place, exactly (Chan et al.), and return it."""
    n_a, n_b = float(into[0, 0]), float(part[0, 0])
    if n_b == 0:
        return into
    if n_a == 0:
        into[...] = part
        return into
    p = tiling.channels
    into[0, p + 1 :] += part[0, p + 1 :]
    into[0, 0] = move_centre(into[0, 1 : p + 1], n_a, n_b, part[0, 1 : p + 1], partial(tiling.add_outer, into))
    return into


@dataclass(frozen=True)
class TiledMoments:
    """Row count, mean (P,) and the kept blocks of the centred scatter of many sides (see ``Tiling``).

    ``select()`` gives the ``Moments`` of one side or of a kept pair of sides; ``+`` merges exactly.
    """

    n: int
    mean: np.ndarray
    packed: np.ndarray
    tiling: Tiling
    precision: ProductPrecision = "float64"
    #: each side's ``Moments.value_rounding`` (empty: none known)
    value_rounding: tuple[float, ...] = ()

    @classmethod
    def unpack(cls, packed: np.ndarray, tiling: Tiling, precision: ProductPrecision = "float64") -> TiledMoments:
        """The TiledMoments of a packed partial (1, size), which they keep (not a copy: a pass's merged partial
        is used by nothing else, and it is the size of all the kept blocks)."""
        return cls(int(packed[0, 0]), packed[0, 1 : tiling.channels + 1], packed, tiling, precision)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.tiling.sizes

    def side_slices(self) -> list[slice]:
        return side_slices(self.sizes)

    def __repr__(self) -> str:
        return (f"TiledMoments(n={self.n}, sizes={self.sizes}, pairs={len(self.tiling.pairs)}, "
                f"precision={self.precision!r})")

    def select(self, sides: Sequence[int]) -> Moments:
        """The Moments of one side, or of two sides whose pair is kept (a side with itself included)."""
        slices, tiles = self.side_slices(), self.tiling.tiles(self.packed)
        first = min(sides)
        if len(sides) > 2 or any((first, side) not in self.tiling.pairs and side != first for side in sides):
            raise KeyError(f"the pair of sides {tuple(sides)} is not kept; kept: {sorted(self.tiling.pairs)}")
        index = np.concatenate([np.arange(slices[side].start, slices[side].stop) for side in sides])
        scatter = np.empty((index.size, index.size))
        starts = np.cumsum([0, *(self.sizes[side] for side in sides)])
        for (i, side_i), (j, side_j) in itertools.product(enumerate(sides), repeat=2):
            low, high = min(side_i, side_j), max(side_i, side_j)
            columns = np.searchsorted(self.tiling.column_index(low), np.arange(slices[high].start, slices[high].stop))
            block = tiles[low][:, columns]
            scatter[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = block if side_i == low else block.T
        return Moments(self.n, self.mean[index], scatter, tuple(self.sizes[side] for side in sides),
                       precision=self.precision,
                       value_rounding=tuple(self.value_rounding[side] for side in sides) if self.value_rounding else ())

    def __add__(self, other: TiledMoments) -> TiledMoments:
        if not isinstance(other, TiledMoments):
            return NotImplemented
        if other.tiling != self.tiling:
            raise ValueError("cannot merge TiledMoments of different tilings")
        precision = "float32" if "float32" in (self.precision, other.precision) else "float64"
        merged = TiledMoments.unpack(merge_tiled(self.packed.copy(), other.packed, self.tiling), self.tiling, precision)
        rounding = tuple(map(max, self.value_rounding or other.value_rounding, other.value_rounding or
                             self.value_rounding))
        return replace(merged, value_rounding=rounding)

    def __radd__(self, other: object) -> TiledMoments:
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented
