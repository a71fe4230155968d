"""TiledMoments: a sweep keeps only the blocks of the scatter its pairs read, and they equal the whole Moments'."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

from chunkcca.moments import Moments
from chunkcca.options import StreamOptions
from chunkcca.passes import stream_layers
from chunkcca.rows import Adapter
from chunkcca.tiles import TiledMoments, Tiling, fold_tiled, merge_tiled

SIZES = (3, 2, 4, 1)
#: Sides 0 and 1 against sides 2 and 3, as similarity pairs two sets of layers.
PAIRS = [(0, 2), (0, 3), (1, 2), (1, 3)]


def _rows(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    latent = rng.standard_normal((n, 2))
    return [latent @ rng.standard_normal((2, size)) + rng.standard_normal((n, size)) + 5 * side
            for side, size in enumerate(SIZES)]


def _moments(rows: list[np.ndarray], sides: list[int]) -> tuple[np.ndarray, np.ndarray]:
    z = np.concatenate([rows[side] for side in sides], axis=1)
    centred = z - z.mean(axis=0)
    return z.mean(axis=0), centred.T @ centred


def test_tiling_keeps_each_pair_once_under_its_first_side():
    tiling = Tiling.of(SIZES, PAIRS)
    assert tiling.partners == ((2, 3), (2, 3), (), ())
    assert tiling.columns[0] == ((0, 3), (5, 10))  # side 0's own channels, then sides 2 and 3 joined in one span
    assert tiling.widths == (3 + 5, 2 + 5, 4, 1)
    whole = 1 + 10 + 10 * 10
    assert tiling.size == 1 + 10 + 3 * 8 + 2 * 7 + 4 * 4 + 1 * 1 < whole


@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=5), seed=st.integers(0, 100))
def test_folded_tiles_give_each_kept_pair_its_moments(chunks, seed):
    """Rows folded in any chunks, the partials merged in any grouping: every kept pair's (and each side's)
    Moments equal the in-memory ones to rounding."""
    rng = np.random.default_rng(seed)
    rows = _rows(rng, sum(chunks))
    tiling = Tiling.of(SIZES, PAIRS)
    edges = np.cumsum([0, *chunks])
    parts = [fold_tiled(np.zeros((1, tiling.size)), [r[lo:hi] for r in rows], tiling, "float64")
             for lo, hi in itertools.pairwise(edges)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merge_tiled(merged, part, tiling)
    tiled = TiledMoments.unpack(merged, tiling)
    assert tiled.n == sum(chunks)
    for sides in ([0, 2], [3, 1], [1, 2], [2], [0], [2, 2]):
        got = tiled.select(sides)
        mean, scatter = _moments(rows, sides)
        assert got.sizes == tuple(SIZES[side] for side in sides)
        np.testing.assert_allclose(got.mean, mean, rtol=0, atol=1e-12 * np.abs(mean).max())
        np.testing.assert_allclose(got.scatter, scatter, rtol=0, atol=1e-10 * np.abs(scatter).max())


def test_adding_tiled_moments_merges_them():
    rng = np.random.default_rng(3)
    rows = _rows(rng, 90)
    tiling = Tiling.of(SIZES, PAIRS)
    first, second = (TiledMoments.unpack(fold_tiled(np.zeros((1, tiling.size)), [r[lo:hi] for r in rows], tiling,
                                                    "float64"), tiling) for lo, hi in ((0, 30), (30, 90)))
    together = sum([first, second])
    _, scatter = _moments(rows, [1, 3])
    np.testing.assert_allclose(together.select([1, 3]).scatter, scatter, rtol=1e-12)
    assert together.precision == "float64" and "pairs=4" in repr(together)


def test_a_pair_not_kept_is_refused():
    tiled = TiledMoments.unpack(np.zeros((1, Tiling.of(SIZES, PAIRS).size)), Tiling.of(SIZES, PAIRS))
    with pytest.raises(KeyError, match=r"the pair of sides \(0, 1\) is not kept"):
        tiled.select([0, 1])


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_a_sweep_streams_only_the_blocks_it_reads(precision):
    """stream_layers with pairs keeps TiledMoments (smaller than whole Moments), whose pairs equal whole
    Moments streamed from the same layers."""
    rng = np.random.default_rng(6)
    rows = _rows(rng, 300)
    layers = [xr.DataArray(da.from_array(r, chunks=(37, -1)), dims=("datapoint", "channel"), name=f"l{i}")
              for i, r in enumerate(rows)]
    adapters = [Adapter("flatten", ())] * len(layers)
    options = StreamOptions(precision=precision)
    tiled = stream_layers(layers, adapters, options, pairs=PAIRS).moments
    whole = stream_layers(layers, adapters, options).moments
    assert isinstance(tiled, TiledMoments) and isinstance(whole, Moments)
    assert tiled.packed.size < whole.scatter.size
    tolerance = 1e-6 if precision == "float32" else 1e-12  # float32 products, summed in another order
    for pair in PAIRS:
        np.testing.assert_allclose(tiled.select(list(pair)).scatter, whole.select(list(pair)).scatter,
                                   rtol=tolerance, atol=tolerance * np.abs(whole.scatter).max())


@pytest.mark.parametrize("scale", [1e-25, 1e18])
def test_tiles_of_values_beyond_single_precision_are_made_in_float64(scale):
    """Values whose float32 products would underflow or overflow: the tiles that failed are made again from the
    rows in float64, and every kept pair equals the float64 Moments to float32's rounding."""
    rng = np.random.default_rng(9)
    rows = [(r * scale).astype(np.float32) for r in _rows(rng, 200)]
    tiling = Tiling.of(SIZES, PAIRS)
    tiled = TiledMoments.unpack(fold_tiled(np.zeros((1, tiling.size)), rows, tiling, "float32"), tiling)
    for pair in PAIRS:
        _, scatter = _moments([r.astype(np.float64) for r in rows], list(pair))
        np.testing.assert_allclose(tiled.select(list(pair)).scatter, scatter, rtol=0,
                                   atol=1e-5 * np.abs(scatter).max())


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_cross_block_of_two_sides_of_small_values_is_made_in_float64(order):
    """Sides of values near 3e-17 and 3e-30: the first's own float32 squares hold, the second's underflow (its own
    tile was made in float64), and so do their cross products (1e-46), in the first side's tile, checked for
    non-finite values only: a sweep's CKA gave 0.368 for 0.624 in one order, silently (found by audit). A span of
    a side whose squares fail is made from the rows in float64, as that side's own tile is."""
    rng = np.random.default_rng(11)
    z = rng.standard_normal((2000, 3))
    values = [(z @ rng.standard_normal((3, 4)) + 0.5 * rng.standard_normal((2000, 4))) * 3e-17,
              (z @ rng.standard_normal((3, 3)) + 0.5 * rng.standard_normal((2000, 3))) * 3e-30]
    rows = [values[side].astype(np.float32) for side in order]
    tiling = Tiling.of([r.shape[1] for r in rows], [(0, 1)])
    tiled = TiledMoments.unpack(fold_tiled(np.zeros((1, tiling.size)), rows, tiling, "float32"), tiling)
    _, scatter = _moments([r.astype(np.float64) for r in rows], [0, 1])
    got = tiled.select([0, 1]).scatter
    p = rows[0].shape[1]
    cross = scatter[:p, p:]
    np.testing.assert_allclose(got[:p, p:], cross, rtol=0, atol=1e-6 * np.abs(cross).max())
