"""spatial="features": each datapoint's whole map is one feature vector, as the CKA papers and libraries take conv
layers; exact full-data linear CKA from Gram blocks of pairs of datapoint chunks, and minibatch CKA, against
in-memory float64 n × n Gram references."""

from __future__ import annotations

import collections
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkcca import cca, cka, compare, compute_moments, similarity

#: The Gram route sums float64 products of n × n blocks: ~1e-14 relative; 1e-11 leaves room for the sums.
TOL = 1e-11
#: float32 Gram blocks (precision "auto" or "float32"): each centred value and product is rounded to 2**-24
#: (6e-8) relative and the errors average out in the float64 inner products: measured 4e-11 to 2e-8 absolute on
#: maps of 4096 to 65536 features, up to 2e-7 with a few features thousands of times larger than the rest (the
#: product's error follows its largest terms); 1e-6 absolute leaves room. CKA lies in [0, 1], so the bound is
#: absolute: a small CKA is not held to a relative one.
TOL32 = 1e-6


def _tol(result: xr.Dataset) -> dict[str, float]:
    """``pytest.approx``'s tolerance for a feature CKA result, by the precision its attrs say its Gram blocks
    were made in."""
    return {"rel": TOL} if result.attrs["precision"] == "float64" else {"abs": TOL32}


def _close(actual: Any, desired: Any, result: xr.Dataset) -> None:
    """``np.testing.assert_allclose`` with ``_tol(result)``."""
    tol = _tol(result)
    np.testing.assert_allclose(actual, desired, rtol=tol.get("rel", 0.0), atol=tol.get("abs", 0.0))


@pytest.fixture(autouse=True)
def _two_threads():
    """The memory limits below are sized for two tasks at once, whatever the machine's cores (tests that
    trace a run's memory set their own)."""
    with dask.config.set(num_workers=2):
        yield


def _maps(seed: int, n: int = 70) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4, 4, 3)) + 1.0
    y = np.tanh(x[..., :2] @ rng.standard_normal((2, 5))) + rng.standard_normal((n, 4, 4, 5))
    return x, y


def _gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of the rows x.reshape(n, -1), y.reshape(n, -1) from the centred n × n Gram matrices."""
    n = len(x)
    centre = np.eye(n) - 1 / n
    k = centre @ x.reshape(n, -1) @ x.reshape(n, -1).T @ centre
    l_ = centre @ y.reshape(n, -1) @ y.reshape(n, -1).T @ centre
    return float((k * l_).sum() / np.sqrt((k * k).sum() * (l_ * l_).sum()))


def _minibatch_gram_cka(x: np.ndarray, y: np.ndarray, size: int) -> float:
    """Minibatch CKA (Nguyen et al. 2021) with the unbiased HSIC of each minibatch's n × n Gram matrices."""
    def hsic(k: np.ndarray, l_: np.ndarray) -> float:
        m = len(k)
        k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
        return float(np.trace(k @ l_) + k.sum() * l_.sum() / ((m - 1) * (m - 2))
                     - 2 * k.sum(0) @ l_.sum(0) / (m - 2)) / (m * (m - 3))

    sums = np.zeros(3)
    for start in range(0, len(x) - size + 1, size):
        rows_x, rows_y = (v[start : start + size].reshape(size, -1) for v in (x, y))
        k, l_ = rows_x @ rows_x.T, rows_y @ rows_y.T
        sums += (hsic(k, l_), hsic(k, k), hsic(l_, l_))
    return float(sums[0] / np.sqrt(sums[1] * sums[2]))


@settings(max_examples=16, deadline=None)
@given(chunk_a=st.integers(5, 70), chunk_b=st.integers(5, 70), stride=st.integers(1, 3), seed=st.integers(0, 5),
       memory_limit=st.sampled_from(["1.5GiB", 400_000, 150_000]),
       precision=st.sampled_from(["float64", "float32", "auto"]))
def test_exact_feature_cka_equals_the_gram_reference_in_any_chunking(chunk_a, chunk_b, stride, seed, memory_limit,
                                                                     precision):
    """Under the default memory_limit one band holds every chunk; under 400 kB or 150 kB (enough for any of
    these chunkings) bands hold a few chunks, the last one shorter, and large chunks are cut into pieces to fit.
    "auto" makes these blocks in float32, as "float32" does."""
    x, y = _maps(seed)
    got = cka(da.from_array(x, chunks=chunk_a), da.from_array(y, chunks=chunk_b), spatial="features", stride=stride,
              memory_limit=memory_limit, precision=precision)
    assert got.attrs["precision"] == ("float64" if precision == "float64" else "float32")
    assert ("precision_auto" in got.attrs) == (precision == "auto")
    assert float(got["cka"]) == pytest.approx(_gram_cka(x[::stride], y[::stride]), **_tol(got))
    assert int(got["rows"]) == len(x[::stride])


def test_feature_cka_takes_float32_gram_blocks_where_each_layers_range_allows():
    """precision="auto" (the default) and "float32" make a layer's Gram blocks in float32 unless the range of its
    values would overflow (F · range² over 2**120) or underflow float32 products; those layers take float64, as
    "auto" says, and every value is the reference's (a huge layer in float32 would give NaN)."""
    x, y = _maps(9)
    layers = {"x": x, "y": y, "tiny": y * 1e-30, "huge": y * 1e25}
    reference = _gram_cka(x, y)
    auto = similarity({"x": x}, layers, spatial="features", measures=["cka"])
    assert auto.attrs["precision"] == "float32"
    assert auto.attrs["precision_auto"].endswith("float64 for 'tiny' (no column seen spanning more than 8.29e-30), "
                                                 "'huge' (values spanning 8.88e+25), whose float32 products would "
                                                 "overflow or underflow")
    _close(auto["cka"].sel(layer_a="x").values, [1.0, reference, reference, reference], auto)
    explicit = similarity({"x": x}, layers, spatial="features", measures=["cka"], precision="float32")
    assert "precision_auto" not in explicit.attrs
    np.testing.assert_allclose(explicit["cka"].values, auto["cka"].values, rtol=0)
    exact = similarity({"x": x}, layers, spatial="features", measures=["cka"], precision="float64")
    assert exact.attrs["precision"] == "float64" and "precision_auto" not in exact.attrs
    np.testing.assert_allclose(exact["cka"].sel(layer_a="x").values, [1.0, reference, reference, reference],
                               rtol=TOL)


def test_float32_gram_blocks_judge_each_feature_not_the_layer():
    """A layer whose features vary by 1e-23 beside a constant one: its overall range (about 1) would pass, but
    every product of its centred values underflows float32 (a review's case: 0.26 against 0.46, silently). The
    largest range of one feature keeps it float64; the value is the reference's."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal((200, 64))
    x = np.concatenate([np.ones((200, 1)), 1e-23 * (y[:, :32] + rng.standard_normal((200, 32)))], axis=1)
    got = cka(x, y, spatial="features")
    assert "float64 for 'a' (no column seen spanning more than" in got.attrs["precision_auto"]
    # centred first: the reference's centring matrix would leave 1e-16 of the constant feature, over the rest
    assert float(got["cka"]) == pytest.approx(_gram_cka(x - x.mean(axis=0), y), **_tol(got))  # y's in float32


def test_float32_gram_blocks_stay_within_tol32_when_a_few_features_are_loud():
    """Post-ReLU maps with two features 2500 times the rest (a review measured 1.7e-7 here): float32 Gram blocks
    stay within TOL32 of the float64 reference, absolute."""
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((100, 2048)), 0)
    x[:, :2] *= 2500
    y = np.maximum(x[:, ::-1] * 0.5 + rng.standard_normal((100, 2048)), 0)
    got = cka(x.astype(np.float32), y.astype(np.float32), spatial="features")
    want = _gram_cka(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64))
    assert got.attrs["precision"] == "float32"
    assert float(got["cka"]) == pytest.approx(want, abs=TOL32)


def test_a_layer_kept_in_float64_that_no_longer_fits_is_refused_naming_it():
    """The plan is made before reading in the precision asked for; a layer whose ranges (known after the means
    pass) need float64 rows can make it refuse then, naming the layer."""
    from chunkcca.passes import gram_bytes

    x, y = _maps(4, n=64)
    a, b = (xr.DataArray(da.from_array(v.astype(np.float32), chunks=16), dims=("datapoint", "height", "width",
                                                                                "channel"), name=name)
            for v, name in ((x, "a"), (y * 1e25, "huge")))
    fixed, per_chunk = gram_bytes([a, b], (1,) * 64, 1, [4, 4])  # one datapoint a piece, in float32: it fits
    with pytest.raises(ValueError, match=r"^the values of 'huge', read by the means pass, need float64 rows \(their "
                                         r"float32 products would overflow or underflow\), and so: .* over "
                                         r"memory_limit="):
        cka(a, b, spatial="features", memory_limit=fixed + per_chunk)
    assert float(cka(a, b, spatial="features", precision="float64")["cka"]) == pytest.approx(
        _gram_cka(x.astype(np.float32).astype(float), (y * 1e25).astype(np.float32).astype(float)), rel=TOL)


def test_gram_precisions_at_the_edges_of_the_float32_and_float64_ranges():
    from chunkcca.engine import FeatureStats
    from chunkcca.passes import (
        FLOAT32_LARGEST_SUM,
        FLOAT32_SMALLEST_RANGE,
        FLOAT64_LARGEST_SUM,
        FLOAT64_SMALLEST_RANGE,
        gram_precisions,
    )

    low, high, width = FLOAT32_SMALLEST_RANGE, FLOAT32_LARGEST_SUM, 1024
    top = np.sqrt(high / width)
    # a, b: widest column at and under the float32 floor; c, d: span at and over the float32 ceiling; e: constant
    stats = FeatureStats([], np.array([1.0, 1.0, top, top * 1.01, 0.0]), np.array([low, low / 2, 1.0, 1.0, 0.0]),
                         100)
    dtypes, precision, note = gram_precisions(stats, [width] * 5, list("abcde"), "float32")
    assert [dtype.itemsize for dtype in dtypes] == [4, 8, 4, 8, 4] and precision == "float32" and note is None
    dtypes, precision, note = gram_precisions(stats, [width] * 5, list("abcde"), "auto")
    assert note == ("spatial='features': float32 Gram blocks (summed in float64), as linear CKA inverts nothing; "
                    "float64 for 'b' (no column seen spanning more than 1.42e-14), 'd' (values spanning 3.64e+16), "
                    "whose float32 products would overflow or underflow")
    only_wide = FeatureStats([], stats.spans[[1, 3]], stats.widest[[1, 3]], 100)
    dtypes, precision, note = gram_precisions(only_wide, [width] * 2, ["b", "d"], "auto")
    assert [dtype.itemsize for dtype in dtypes] == [8, 8] and precision == "float64"
    assert note.startswith("spatial='features': float64 Gram blocks, as float32 products of 'b' (no column")
    dtypes, precision, note = gram_precisions(stats, [width] * 5, list("abcde"), "float64")
    assert {dtype.itemsize for dtype in dtypes} == {8} and precision == "float64" and note is None
    for span, widest in ((np.sqrt(FLOAT64_LARGEST_SUM / (width * 100)) * 1.01, 1.0),
                         (1.0, FLOAT64_SMALLEST_RANGE / 2)):  # too large; a column too narrow beside a constant one
        with pytest.raises(ValueError, match=r"layer 'x''s values span .* beyond what float64 Gram products of its "
                                             r"1024 features over 100 rows hold; rescale it"):
            gram_precisions(FeatureStats([], np.array([span]), np.array([widest]), 100), [width], ["x"], "float64")


def test_feature_cka_of_integer_layers_and_of_values_float64_cannot_hold():
    """Integer layers (uint8, int8, int64) give the reference's value (their extremes taken in float64, no
    wrap-around); values around 1e200 are refused naming the layer, not given as 0."""
    x, y = _maps(11)
    for dtype in (np.uint8, np.int8, np.int64):
        xi = np.clip(np.round(x * 40), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
        got = cka(xi, y, spatial="features")
        assert float(got["cka"]) == pytest.approx(_gram_cka(xi.astype(float), y), **_tol(got))
    for scale in (1e200, 1e75, 1e-85):  # a review: CKA 0 from 1e75, a false "no variance" from 1e-85 before
        with pytest.raises(ValueError, match=r"layer 'b''s values span .* rescale it"):
            cka(x, y * scale, spatial="features", precision="float64")
    beside_constant = np.concatenate([np.ones((70, 4, 4, 1)), y * 1e-81], axis=-1)  # span 1, columns of 1e-81
    for precision in ("float64", "auto"):  # a review: 3.5e-4 off, or a false "no variance", before
        with pytest.raises(ValueError, match=r"layer 'b''s values span 1 \(its widest column at least"):
            cka(x, beside_constant, spatial="features", precision=precision)
    for scale in (1e60, 1e-60):  # within float64's reach: the reference's value
        got = cka(x, y * scale, spatial="features", precision="float64")
        assert float(got["cka"]) == pytest.approx(_gram_cka(x, y), rel=1e-9)


@pytest.mark.parametrize("scale", [1e-50, 1e50])
def test_gram_and_minibatch_cka_of_both_layers_scaled_far(scale):
    """Both layers scaled by 1e-50 (or 1e50), within float64's reach: the reference's value; the product of the
    layers' HSICs with themselves (a scale⁸) underflowed (overflowed), and CKA was 1.0 (0.0), silently, for exact
    and minibatch feature CKA, minibatch CKA of rows and ``compare`` (found by audit)."""
    x, y = _maps(11)
    for got, want in [
            (cka(x * scale, y * scale, spatial="features", precision="float64")["cka"], _gram_cka(x, y)),
            (compare(x * scale, y * scale, measures=["cka"], spatial="features", precision="float64")["cka"],
             _gram_cka(x, y)),
            (cka(x * scale, y * scale, spatial="features", minibatch=20)["cka"],
             _minibatch_gram_cka(x, y, 20)),
            (cka(x[:, 0, 0] * scale, y[:, 0, 0] * scale, minibatch=20)["cka"],
             _minibatch_gram_cka(x[:, 0, 0], y[:, 0, 0], 20))]:
        assert float(got) == pytest.approx(want, rel=1e-9)  # float64 products of values scaled back exactly


def test_float32_gram_products_add_their_slices_of_features_in_float64(monkeypatch):
    """Float32 Gram blocks sum at most FLOAT32_GEMM_FEATURES features in float32 (one GEMM each), the slices in
    float64 (262,144 features with four loud ones: 2e-6 off in one float32 GEMM, 1.4e-7 in slices). A block over
    more features than a slice is float64, equal to the float64 product of its float32 rows; over a slice's
    features or fewer, one float32 GEMM. Then a whole run with slices of 7 features over 48."""
    from chunkcca import engine

    monkeypatch.setattr(engine, "FLOAT32_GEMM_FEATURES", 7)
    rng = np.random.default_rng(14)
    rows_i, rows_j = (rng.standard_normal((n, 20)).astype(np.float32) for n in (5, 6))
    block = engine._gram_block(rows_i, rows_j)
    assert block.dtype == np.float64 and block.shape == (5, 6)
    np.testing.assert_allclose(block, rows_i.astype(float) @ rows_j.astype(float).T, rtol=1e-6)
    assert engine._gram_block(rows_i[:, :7], rows_j[:, :7]).dtype == np.float32
    x, y = _maps(12)
    got = cka(da.from_array(x, chunks=20), da.from_array(y, chunks=30), spatial="features")
    assert got.attrs["precision"] == "float32"
    assert float(got["cka"]) == pytest.approx(_gram_cka(x, y), **_tol(got))


def test_float32_gram_blocks_in_chunks_of_one_row():
    """Chunks of one datapoint (or a stride past the chunks) show no column's range within a chunk; the means of
    merged partials do, so ordinary data keeps float32 (a review found it falling back to float64, then refused
    under a limit that fits float32)."""
    x, y = _maps(15, n=40)
    for chunks, stride in ((1, 1), (3, 4)):
        got = cka(da.from_array(x, chunks=chunks), da.from_array(y, chunks=chunks), spatial="features",
                  stride=stride)
        assert got.attrs["precision"] == "float32" and "float64 for" not in got.attrs["precision_auto"]
        assert float(got["cka"]) == pytest.approx(_gram_cka(x[::stride], y[::stride]), **_tol(got))


@pytest.mark.parametrize("precision", ["float64", "auto"])
def test_the_gram_pass_reads_each_chunk_once_per_band_that_reaches_it(precision):
    """A band of the Gram pass holds as many chunks as memory_limit affords beside the tasks at work (one, on the
    synchronous scheduler: a chunk as read, one layer's centred rows); a chunk is read once by the means pass and
    once by each band starting at or before it. Here bands of 3 chunks over 8: chunk j is read 2 + j // 3 times.
    Centred rows take 8 bytes a value in float64, 4 in float32 ("auto" here)."""
    reads: collections.Counter = collections.Counter()
    rng = np.random.default_rng(4)
    data = {name: rng.standard_normal((128, 2, 2, width)) + 1 for name, width in (("a", 8), ("bb", 4))}

    def block(name: str, index: int) -> np.ndarray:
        reads[(name, index)] += 1
        return data[name][16 * index : 16 * index + 16]

    a, b = (da.concatenate([da.from_delayed(dask.delayed(block)(name, index), shape=(16, 2, 2, values.shape[-1]),
                                            dtype=float) for index in range(8)]) for name, values in data.items())
    itemsize = 8 if precision == "float64" else 4
    centred = 16 * (32 + 16) * itemsize  # one chunk of both layers as centred rows
    at_work = 16 * (32 + 16) * 8 + 16 * 32 * itemsize  # a task: a chunk of both as read (float64), one layer centred
    grams = 2 * 2 * 16 * 16 * 8  # and per chunk of the band its 16 × 16 Gram blocks of both layers, stacked
    got = cka(a, b, spatial="features", memory_limit=at_work + 3 * (centred + grams), scheduler="synchronous",
              precision=precision)
    assert dict(reads) == {(name, index): 2 + index // 3 for name in data for index in range(8)}
    assert float(got["cka"]) == pytest.approx(_gram_cka(data["a"], data["bb"]), **_tol(got))


def test_a_layer_stored_more_coarsely_is_read_once_per_band():
    """The second layer's chunks of 32 datapoints are cut into the first layer's 16: each is read once by the means
    pass and once by the Gram pass (one band), not once per piece."""
    reads: collections.Counter = collections.Counter()
    rng = np.random.default_rng(6)
    data = {"a": rng.standard_normal((128, 2, 2, 8)), "bb": rng.standard_normal((128, 2, 2, 4)) + 1}

    def block(name: str, index: int, size: int) -> np.ndarray:
        reads[(name, index)] += 1
        return data[name][size * index : size * index + size]

    a, b = (da.concatenate([da.from_delayed(dask.delayed(block)(name, index, size),
                                            shape=(size, 2, 2, data[name].shape[-1]), dtype=float)
                            for index in range(128 // size)]) for name, size in (("a", 16), ("bb", 32)))
    got = cka(a, b, spatial="features", scheduler="synchronous")
    assert dict(reads) == {**{("a", index): 2 for index in range(8)}, **{("bb", index): 2 for index in range(4)}}
    assert float(got["cka"]) == pytest.approx(_gram_cka(data["a"], data["bb"]), **_tol(got))


def test_the_gram_pass_is_exact_when_dask_fuses_nothing():
    """With Dask's fusion off, the reads of a layer chunked more coarsely than the first are tasks of their own,
    shared by several tasks of a band, and gated (once a crash: the gates assumed (name, index) keys)."""
    x, y = _maps(5)

    def lazy(values: np.ndarray, chunk: int) -> da.Array:
        return da.concatenate([da.from_delayed(dask.delayed(np.copy)(values[start : start + chunk]),
                                               shape=values[start : start + chunk].shape, dtype=float)
                               for start in range(0, len(values), chunk)])

    with dask.config.set({"optimization.fuse.active": False}):
        got = cka(lazy(x, 5), lazy(y, 35), spatial="features", memory_limit=82_000)  # bands of 3 chunks
    assert float(got["cka"]) == pytest.approx(_gram_cka(x, y), **_tol(got))


#: Wide enough maps (4096 and 3072 features) that the arrays, not Dask's bookkeeping, make a traced peak.
WIDE = {"a": (16, 16, 16), "b": (16, 16, 12)}
#: Chunkings of the memory tests (a, b): equal; b stored 5 times as coarsely (each store chunk read whole and cut);
#: a in one chunk (the Gram pass cuts it into pieces); both also chunked along their channels (joined when read),
#: in chunks of 40 datapoints or of 100 (a minibatch chunk).
CHUNKINGS = {"equal": ((40, -1, -1, -1), (40, -1, -1, -1)), "coarse b": ((40, -1, -1, -1), (200, -1, -1, -1)),
             "a in one chunk": ((-1, -1, -1, -1), (40, -1, -1, -1)),
             "by channels": ((40, -1, -1, 4), (40, -1, -1, 3)),
             "100s by channels": ((100, -1, -1, 4), (100, -1, -1, 3))}


def _wide_layers(case: str, n: int = 400) -> tuple[xr.DataArray, xr.DataArray, np.ndarray, np.ndarray]:
    """Two float32 layers of WIDE maps, as lazy DataArrays chunked as CHUNKINGS[case] (each chunk a new array when
    read, as from a store), and their values."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((n, *WIDE["a"]), dtype=np.float32)
    y = (x[..., :12] + rng.standard_normal((n, *WIDE["b"]), dtype=np.float32)).astype(np.float32)
    layers = [xr.DataArray(da.from_array(values, chunks=chunks), dims=("datapoint", "height", "width", "channel"),
                           name=name) for values, chunks, name in zip((x, y), CHUNKINGS[case], "ab")]
    return layers[0], layers[1], x, y


@pytest.mark.parametrize(("threads", "precision"), [(1, "auto"), (2, "auto"), (8, "auto"), (2, "float64")])
@pytest.mark.parametrize("case", ["equal", "coarse b", "a in one chunk", "by channels"])
def test_memory_limit_bounds_the_gram_pass(case, threads, precision):
    """The arrays an exact feature CKA run allocates (traced by tracemalloc: chunks read, centred rows of the
    band, Gram blocks, store chunks shared by several tasks or joined) stay within a memory_limit that affords
    bands of two chunks beside ``threads`` tasks, on that many threads, in every chunking of CHUNKINGS; a first
    layer in one chunk is cut into pieces. Centred rows are float32 ("auto": 4 bytes a value) or float64. The
    result is the in-memory Gram reference's."""
    import tracemalloc

    from chunkcca.passes import cut, gram_bytes, gram_plan

    a, b, x, y = _wide_layers(case)
    itemsizes = [8 if precision == "float64" else 4] * 2
    planned = cut(a.data.chunks[0], 50) if case == "a in one chunk" else a.data.chunks[0]
    fixed, per_chunk = gram_bytes([a, b], planned, threads, itemsizes)
    limit = fixed + 2 * per_chunk
    plan = gram_plan([a, b], limit, threads, itemsizes)
    assert plan.tasks <= threads and len(plan.chunks) > plan.band  # several bands
    assert max(plan.chunks) < 400 if case == "a in one chunk" else plan.chunks == planned
    with dask.config.set(num_workers=threads):
        cka(a, b, spatial="features", memory_limit=limit, precision=precision)  # untraced: first imports
        tracemalloc.start()
        try:
            got = cka(a, b, spatial="features", memory_limit=limit, precision=precision)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak <= limit, f"peak {peak} over memory_limit {limit}"
    assert got.attrs["precision"] == ("float64" if precision == "float64" else "float32")
    assert float(got["cka"]) == pytest.approx(_gram_cka(x.astype(np.float64), y.astype(np.float64)),
                                              **(_tol(got) if precision != "float64" else {"rel": 1e-9}))


def test_memory_limit_bounds_the_means_pass_of_many_wide_layers():
    """Ten layers of 16,384 features in chunks of 4 datapoints, on 8 threads, under a limit that affords bands of
    two chunks beside two tasks: the means pass (as many chains as the plan's tasks, a partial of p + 1 + 3L
    values each) and the Gram pass stay within it. With a chain per thread the means pass went over (fails
    here); a review found it at 3 times the limit with per-column extremes in its partials."""
    import tracemalloc

    from chunkcca.passes import gram_bytes

    rng = np.random.default_rng(13)
    base = rng.standard_normal((32, 16, 16, 64), dtype=np.float32)
    layers = [xr.DataArray(da.from_array(base + np.float32(i), chunks=(4, -1, -1, -1)),
                           dims=("datapoint", "height", "width", "channel"), name=f"l{i}") for i in range(10)]
    fixed, per_chunk = gram_bytes(layers, layers[0].data.chunks[0], 2, [4] * 10)  # fits two tasks, not 8
    limit = fixed + 2 * per_chunk
    sets = ({layer.name: layer for layer in layers[:5]}, {layer.name: layer for layer in layers[5:]})
    with dask.config.set(num_workers=8):
        similarity(*sets, spatial="features", measures=["cka"], memory_limit=limit)  # untraced: first imports
        tracemalloc.start()
        try:
            got = similarity(*sets, spatial="features", measures=["cka"], memory_limit=limit)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak <= limit, f"peak {peak} over memory_limit {limit}"
    np.testing.assert_allclose(got["cka"].values, 1.0, atol=TOL32)  # each layer is base shifted: CKA 1


@pytest.mark.parametrize("threads", [1, 2, 8, 64])
def test_the_gram_plan_fits_the_limit_and_takes_its_fastest_layout(threads):
    """Under a limit that holds everything, the plan keeps the stored chunks, one band, a task per thread. Under
    tighter limits (bands of a few chunks beside two tasks; one chunk beside one task) it fits: its tasks'
    work, the store chunks and its band hold at most the limit; and no other number of tasks at once has a
    smaller estimated time (fewer tasks make room for wider bands and larger pieces, more share the work)."""
    from chunkcca.passes import _estimated_time, _fitted_band, gram_bytes, gram_plan

    a, b, _, _ = _wide_layers("equal")
    stored, sizes = a.data.chunks[0], [4, 8]  # a's centred rows in float32, b's in float64
    plan = gram_plan([a, b], 2**40, threads, sizes)
    assert (plan.chunks, plan.band, plan.tasks) == (stored, len(stored), threads)
    fixed_two, per_chunk_two = gram_bytes([a, b], stored, 2, sizes)
    fixed_one, per_chunk_one = gram_bytes([a, b], stored, 1, sizes)
    for limit in (fixed_two + 3 * per_chunk_two, fixed_one + per_chunk_one):
        plan = gram_plan([a, b], limit, threads, sizes)
        fixed, per_chunk = gram_bytes([a, b], plan.chunks, plan.tasks, sizes)
        assert plan.tasks <= threads and plan.band >= 1 and fixed + plan.band * per_chunk <= limit
        assert sum(plan.chunks) == 400
        others = [other for tasks in range(1, threads + 1) if (other := _fitted_band([a, b], limit, tasks, sizes))]
        assert _estimated_time(plan) == min(map(_estimated_time, others))
        assert plan.products == pytest.approx((4096 * 4 + 3072 * 8) / (8 * (4096 + 3072)))  # by the features
    single, double = (gram_plan([a, b], fixed_one + per_chunk_one, 1, sizes) for sizes in ([4, 4], [8, 8]))
    assert max(single.chunks) * single.band > max(double.chunks) * double.band  # float32 bands hold more


def test_the_gram_pass_refuses_what_one_datapoint_a_piece_would_not_fit():
    """Before anything is read: the layers, the store chunks held (b's two chunks of 35 datapoints, 43.75 kiB,
    and two of a's chunks of 10, cut into pieces of 1) and the limit are named."""
    reads: collections.Counter = collections.Counter()

    def block(index: int) -> np.ndarray:
        reads[index] += 1
        return np.ones((35, 4, 4, 5))

    x, _ = _maps(3)
    y = da.concatenate([da.from_delayed(dask.delayed(block)(index), shape=(35, 4, 4, 5), dtype=float)
                        for index in range(2)])
    with pytest.raises(ValueError, match=r"exact CKA of whole maps \(spatial='features'\) of 'a' and 'b': one "
                                         r"datapoint .* store chunks it lies in \(51.25 kiB\).* over "
                                         r"memory_limit=40.00 kiB; raise memory_limit"):
        cka(da.from_array(x, chunks=10), y, spatial="features", memory_limit="40kiB")
    assert not reads


def test_minibatch_feature_cka_equals_the_minibatch_gram_reference():
    x, y = _maps(1, n=90)
    for chunk in (7, 90):
        got = cka(da.from_array(x, chunks=chunk), y, spatial="features", minibatch=20)
        assert float(got["cka"]) == pytest.approx(_minibatch_gram_cka(x, y, 20), rel=1e-10)


def test_feature_cka_of_every_pair_of_a_sweep_and_in_compare():
    x, y = _maps(2)
    pooled = x[:, ::2, ::2]  # another map size: features pair any shapes
    sweep = similarity({"x": x, "y": y}, {"y": y, "pooled": pooled}, spatial="features", measures=["cka"])
    want = [[_gram_cka(x, y), _gram_cka(x, pooled)], [1.0, _gram_cka(y, pooled)]]
    _close(sweep["cka"].values, want, sweep)
    assert int(sweep["rows"]) == x.shape[0]  # one row per datapoint: its whole map
    compared = compare(x, y, spatial="features", measures=["cka"])
    assert float(compared["cka"]) == pytest.approx(want[0][0], **_tol(compared))


def test_exact_feature_cka_of_a_dead_layer_is_nan_with_a_warning():
    x, _ = _maps(7)
    with pytest.warns(RuntimeWarning, match="CKA of layer 'dead' is NaN: its whole maps do not vary"):
        sweep = similarity({"x": x}, {"x": x, "dead": np.zeros_like(x)}, spatial="features", measures=["cka"])
    assert sweep["cka"].sel(layer_a="x", layer_b="x").item() == pytest.approx(1.0, **_tol(sweep))
    assert np.isnan(sweep["cka"].sel(layer_a="x", layer_b="dead").item())


@pytest.mark.parametrize(("options", "message"), [
    ({"groupby": "label"}, r"spatial='features' \(--spatial features\) takes no groupby or folds"),
    ({"folds": 2}, r"spatial='features' \(--spatial features\) takes no groupby or folds"),
    ({"checkpoint": "run.moments"}, "spatial='features' takes no checkpoint"),
    ({"nan_policy": "omit"}, "spatial='features' cannot omit rows"),
])
def test_features_refuses_what_its_gram_pass_cannot_do_from_every_entry_point(tmp_path, options, message):
    """Checked once, where the options are made (StreamOptions), for a pair, a comparison and a sweep alike (the
    checks were in three places: the API's, and the Gram pass's for rows left out)."""
    x, y = _maps(3)
    labels = {"label": ("datapoint", np.arange(len(x)) % 2)}
    x, y = (xr.DataArray(v, dims=("datapoint", "height", "width", "channel"), coords=labels) for v in (x, y))
    options = {key: str(tmp_path / value) if key == "checkpoint" else value for key, value in options.items()}
    for call in (lambda: cka(x, y, spatial="features", **options),
                 lambda: compare(x, y, spatial="features", measures=["cka"], **options),
                 lambda: similarity({"x": x}, {"y": y}, spatial="features", measures=["cka"], **options)):
        with pytest.raises(ValueError, match=message):
            call()


def test_covariance_measures_refuse_features_and_say_why():
    x, y = _maps(3)
    with pytest.raises(ValueError, match="mean_cca needs covariances, and spatial='features' makes each datapoint's "
                                         "whole map one row"):
        cca(x, y, spatial="features")
    with pytest.raises(ValueError, match="pwcca needs covariances"):
        compare(x, y, spatial="features", measures=["cka", "pwcca"])
    with pytest.raises(ValueError, match=r"cka\(\): cka_debiased is not computed from Gram blocks"):  # it said
        cka(x, y, spatial="features", debiased=True)  # "needs covariances", which debiased CKA does not
    with pytest.raises(ValueError, match="spatial='features' takes no checkpoint"):
        compare(x, y, spatial="features", measures=["cka"], checkpoint="run.moments")
    with pytest.raises(ValueError, match=r"compute_moments\(\): spatial='features' makes each datapoint's whole "
                                         r"map one row, too wide for Moments"):  # was a numpy broadcasting error
        compute_moments(x, y, spatial="features")


def _minibatch_run(layers: list[xr.DataArray], stride: int, memory_limit: Any) -> xr.Dataset:
    """Minibatch CKA of minibatches of 100 rows of whole maps: of the pair for two layers, else of every pair of
    the first two against the rest."""
    options = {"spatial": "features", "minibatch": 100, "stride": stride, "memory_limit": memory_limit}
    if len(layers) == 2:
        return cka(*layers, **options)
    return similarity({layer.name: layer for layer in layers[:2]}, {layer.name: layer for layer in layers[2:]},
                      measures=["cka"], **options)


@pytest.mark.parametrize("tasks", [1, 2])
@pytest.mark.parametrize("case", ["coarse b", "by channels", "100s by channels", "stride", "five layers"])
def test_memory_limit_bounds_minibatch_cka(case, tasks, monkeypatch):
    """The arrays a minibatch CKA run allocates (traced: chunks joined from or cut out of store chunks, the
    float64 minibatch, its Gram matrices, those waiting for their HSIC) stay within memory_limit set to what
    the run says one task needs (its refusal of a smaller limit states it), or twice that, with 8 threads: b
    stored in chunks of 200 (cut), both chunked along their channels too (joined) in chunks of 40 datapoints or
    of 100, a stride of 2, or five wide layers (a layer's chunk at a time: the five layers' chunks at once hold
    more). The result is the in-memory reference's."""
    import re
    import tracemalloc

    from dask.utils import parse_bytes

    from chunkcca import passes

    graphs: list[str] = []  # which way the pass went: a layer's chunk or every layer's chunk a task
    by_layer = passes.minibatch_layers_graph
    monkeypatch.setattr(passes, "minibatch_layers_graph", lambda *args, **kwargs: graphs.append("layer") or
                        by_layer(*args, **kwargs))
    a, b, x, y = _wide_layers(case if case in CHUNKINGS else "equal")
    layers, values = [a, b], [x, y]
    if case == "five layers":
        for name, scale in (("c", 2.0), ("d", -1.0), ("e", 0.5)):
            layers.append(b.copy(data=b.data * scale).rename(name))
            values.append(y * scale)
    stride = 2 if case == "stride" else 1
    with pytest.raises(ValueError, match=r"minibatch CKA of 'a', 'b'.*: (one layer's chunk|a chunk of every layer) "
                                         r"of \d+ datapoints \(whole minibatches of 100 rows\) read at a time, "
                                         r"with the store chunks it lies in, holds (.*), over memory_limit=1 B; "
                                         r"raise memory_limit") as refused:
        _minibatch_run(layers, stride, 1)
    one = parse_bytes(re.search(r"holds ([^,]+), over", str(refused.value)).group(1).replace(" ", ""))
    limit = int(tasks * one * 1.01)  # its rounding in the message
    with dask.config.set(num_workers=8):
        _minibatch_run(layers, stride, limit)  # once untraced: what it first imports is not the run's
        graphs.clear()
        tracemalloc.start()
        try:
            got = _minibatch_run(layers, stride, limit)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak <= limit, f"peak {peak} over memory_limit {limit}"
    assert graphs == (["layer"] if case == "five layers" else [])
    values = [value[::stride].astype(np.float64) for value in values]
    if len(layers) == 2:
        assert float(got["cka"]) == pytest.approx(_minibatch_gram_cka(*values, 100), rel=1e-9)
    else:
        want = [[_minibatch_gram_cka(left, right, 100) for right in values[2:]] for left in values[:2]]
        np.testing.assert_allclose(got["cka"].values, want, rtol=1e-9)


@pytest.mark.parametrize("threads", [1, 3])
def test_minibatch_cka_a_layer_at_a_time_equals_every_layer_at_a_time(threads):
    """The two ways of the minibatch pass (each taken by making the other's budget look unaffordable) give the
    same sums and the in-memory reference's, in chunkings differing per layer, with padding masks (avgpool)."""
    import unittest.mock

    from chunkcca import passes

    rng = np.random.default_rng(11)
    x = rng.standard_normal((240, 6, 6, 40))
    mask = rng.random((240, 6, 6)) < 0.8
    mask[:, 0, 0] = True
    layers = {name: xr.DataArray(x[..., : 40 - 5 * k] * (k + 1) + rng.standard_normal((240, 6, 6, 40 - 5 * k)),
                                 dims=("datapoint", "height", "width", "channel"), name=name,
                                 coords={"mask": (("datapoint", "height", "width"), mask)}
                                 ).chunk({"datapoint": (7, 50, 100)[k % 3]})
              for k, name in enumerate("abcde")}
    first, rest = {n: layers[n] for n in "ab"}, {n: layers[n] for n in "cde"}
    graphs: list[str] = []
    by_layer = passes.minibatch_layers_graph
    results = []
    with dask.config.set(num_workers=threads), unittest.mock.patch.object(
            passes, "minibatch_layers_graph", lambda *args, **kwargs: graphs.append("layer") or by_layer(*args,
                                                                                                        **kwargs)):
        for layer_bytes in (1, 2**62):  # a layer's chunk a task; every layer's chunk a task
            with unittest.mock.patch.object(passes, "minibatch_layer_bytes", lambda *args, b=layer_bytes: b):
                results.append(similarity(first, rest, measures=["cka"], spatial="avgpool", minibatch=30))
    assert graphs == ["layer"]
    np.testing.assert_allclose(results[0]["cka"].values, results[1]["cka"].values, rtol=1e-12)
    rest["d"] = rest["d"].copy(deep=True)
    rest["d"][235, 0, 0, 0] = np.nan  # a real position: its mean is NaN
    with unittest.mock.patch.object(passes, "minibatch_layer_bytes", lambda *args: 1), \
            pytest.raises(ValueError, match=r"^layer 'd' holds NaN or Inf at datapoint 235$"):
        similarity(first, rest, measures=["cka"], spatial="avgpool", minibatch=30)
    pooled = {n: (np.where(mask[..., None], layers[n].values, 0).sum((1, 2)) / mask.sum((1, 2))[:, None])
              for n in "abcde"}
    want = [[_minibatch_gram_cka(pooled[left], pooled[right], 30) for right in "cde"] for left in "ab"]
    np.testing.assert_allclose(results[0]["cka"].values, want, rtol=1e-9)
    assert int(results[0]["minibatches"]) == int(results[1]["minibatches"]) == 8


@pytest.mark.parametrize("work", ["_gram_band", "_layer_minibatches"])
def test_no_more_tasks_work_at_once_than_planned_whatever_the_pool(work, monkeypatch):
    """The Gram pass's tasks and the minibatch pass's layer tasks are independent of one another: on a pool of 8
    threads, a plan of one task at a time (the Gram pass's forced, the minibatch pass's from a limit that
    affords one) still runs one at a time (each waits for the one before it), as its memory budget assumes."""
    import threading
    import time

    from chunkcca import engine, passes

    lock, at_work, most = threading.Lock(), [0], [0]
    original = getattr(engine, work)

    def counted(*args: Any, **kwargs: Any) -> Any:
        with lock:
            at_work[0] += 1
            most[0] = max(most[0], at_work[0])
        time.sleep(0.01)
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                at_work[0] -= 1

    monkeypatch.setattr(engine, work, counted)
    a, b, x, y = _wide_layers("equal", n=200)
    with dask.config.set(num_workers=8):
        if work == "_gram_band":
            monkeypatch.setattr(passes, "gram_plan", lambda layers, limit, threads, sizes: passes.GramPlan(
                layers[0].data.chunks[0], 2, 1))
            got = cka(a, b, spatial="features")
            assert float(got["cka"]) == pytest.approx(_gram_cka(x.astype(float), y.astype(float)), rel=1e-9)
        else:
            layers = [a, b] + [b.copy(data=b.data * k).rename(name) for k, name in ((2.0, "c"), (3.0, "d"))]
            monkeypatch.setattr(passes, "minibatch_layer_bytes", lambda *args: args[-1])  # tasks
            _minibatch_run(layers, 1, 1)  # affords one task, and the layer way (patched to cost 1 a task)
    assert most[0] == 1


@pytest.mark.parametrize("tasks", [2, 8])
def test_minibatch_gram_matrices_held_stay_within_the_window(tasks, monkeypatch):
    """A layer at a time, the Gram matrices of at most window + 1 chunks (window = ⌈tasks / layers⌉ + 1) of
    every layer are alive at once (watched by weak references), whatever the number of chunks: here 48 chunks
    of two layers, two or eight tasks at once on a pool of 8 threads, layer tasks of uneven lengths. Left free,
    the HSIC tasks fall behind and every chunk's Gram matrices pile up; a task's turn token fused into the task
    ``tasks`` later held its result until that one started."""
    import threading
    import time
    import weakref

    from chunkcca import engine, passes

    lock, alive, most = threading.Lock(), [0], [0]
    layer_task = engine._layer_minibatches
    jitter = np.random.default_rng(12)

    def gone() -> None:
        with lock:
            alive[0] -= 1

    def watched(*args: Any, **kwargs: Any) -> Any:
        time.sleep(float(jitter.uniform(0, 0.004)))
        grams, rows = layer_task(*args, **kwargs)
        with lock:
            alive[0] += 1
            most[0] = max(most[0], alive[0])
        weakref.finalize(grams[0][0], gone)  # the chunk's first Gram matrix, freed with the rest
        return grams, rows

    monkeypatch.setattr(engine, "_layer_minibatches", watched)
    monkeypatch.setattr(passes, "minibatch_layer_bytes", lambda *args: args[-1])  # a limit of n affords n tasks
    x, y = _maps(13, n=480)
    with dask.config.set(num_workers=8):
        got = cka(da.from_array(x, chunks=10), da.from_array(y, chunks=10), spatial="features", minibatch=10,
                  memory_limit=tasks)
    assert float(got["cka"]) == pytest.approx(_minibatch_gram_cka(x, y, 10), rel=1e-10)
    window = -(-tasks // 2) + 1
    assert most[0] <= (window + 1) * 2, most[0]


def test_minibatch_cka_a_layer_at_a_time_counts_and_checks_the_rows_left_over(monkeypatch):
    """233 datapoints in minibatches of 30: 7 minibatches and 23 rows left out, as in memory; a NaN in a row left
    out still raises, naming the layer; a chunk that would split a minibatch is refused."""
    from chunkcca import engine, passes
    from chunkcca.options import StreamOptions
    from chunkcca.rows import plan_adapters

    monkeypatch.setattr(passes, "minibatch_layer_bytes", lambda *args: 1)  # a layer at a time
    x, y = _maps(14, n=233)
    got = cka(da.from_array(x, chunks=50), y, spatial="features", minibatch=30)
    assert (int(got["minibatches"]), int(got["rows_left_out"])) == (7, 23)
    assert int(got["rows"]) == got.attrs["rows"] == 210, "rows used, as every result's (233 counted those left out)"
    assert float(got["cka"]) == pytest.approx(_minibatch_gram_cka(x, y, 30), rel=1e-10)
    y[225, 1, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"^layer 'b' holds NaN or Inf at datapoint 225$"):
        cka(da.from_array(x, chunks=50), y, spatial="features", minibatch=30)
    adapter = plan_adapters(xr.DataArray(x, dims=("datapoint", "height", "width", "channel")),
                            xr.DataArray(x, dims=("datapoint", "height", "width", "channel")),
                            StreamOptions(spatial="features"))[0]
    with pytest.raises(RuntimeError, match="chunk starting at datapoint 15 splits a minibatch of 30 rows"):
        engine._layer_minibatches(15, x[15:60], None, adapter=adapter, size=30, name="a")


def test_minibatch_cka_reads_smaller_chunks_to_fit_memory_limit():
    """A first layer stored in one chunk of 400 datapoints: the pass halves its chunks of whole minibatches (400,
    200, 100) until one task fits memory_limit, rather than refusing, and the result is unchanged."""
    a, b, x, y = _wide_layers("a in one chunk")
    with pytest.raises(ValueError, match=r"of 100 datapoints \(whole minibatches of 100 rows\) read at a time, "
                                         r"with the store chunks it lies in, holds (.*), over memory_limit=1 B"
                       ) as refused:
        cka(a, b, spatial="features", minibatch=100, memory_limit=1)
    import re

    from dask.utils import parse_bytes

    one = parse_bytes(re.search(r"holds ([^,]+), over", str(refused.value)).group(1).replace(" ", ""))
    got = cka(a, b, spatial="features", minibatch=100, memory_limit=int(one * 1.01))
    assert float(got["cka"]) == pytest.approx(_minibatch_gram_cka(x.astype(float), y.astype(float), 100), rel=1e-9)
    with pytest.raises(ValueError, match=r"of 100 datapoints \(whole minibatches of 100 rows\)"):
        cka(a, b, spatial="features", minibatch=100, memory_limit=int(one * 0.99))


def test_minibatch_feature_cka_of_every_pair_of_a_sweep_in_one_pass():
    """similarity(minibatch=m) gives, in one pass over all layers, for every pair, what cka(minibatch=m) gives."""
    x, y = _maps(3, n=90)
    pooled = x[:, ::2, ::2]
    layers_a = {"x": da.from_array(x, chunks=7), "y": y}
    layers_b = {"x": layers_a["x"], "pooled": pooled}  # x is read once, for both sets (and pairs (y, x) below it)
    sweep = similarity(layers_a, layers_b, spatial="features", measures=["cka"], minibatch=20)
    for name_a, a in (("x", x), ("y", y)):
        for name_b, b in (("x", x), ("pooled", pooled)):
            want = _minibatch_gram_cka(a, b, 20)
            assert float(sweep["cka"].sel(layer_a=name_a, layer_b=name_b)) == pytest.approx(want, rel=1e-10)
            single = cka(layers_a[name_a], b, spatial="features", minibatch=20)
            assert float(sweep["cka"].sel(layer_a=name_a, layer_b=name_b)) == pytest.approx(float(single["cka"]),
                                                                                             rel=1e-12)
    assert int(sweep["minibatches"]) == 4 and int(sweep["rows_left_out"]) == 10 and sweep.attrs["minibatch"] == 20
    assert int(sweep["rows"]) == 80
    with pytest.raises(ValueError, match=r"minibatch applies to measures=\['cka'\] only, got \['mean_cca', 'cka'\]"):
        similarity(layers_a, layers_b, minibatch=20)
    with pytest.raises(TypeError, match="precision does not apply to minibatch CKA"):
        similarity(layers_a, layers_b, measures=["cka"], minibatch=20, precision="float64")
    dead = {"dead": np.zeros_like(y)}
    with pytest.warns(RuntimeWarning, match="minibatch CKA of layer 'dead' is NaN: it has no variance"):
        partial = similarity(layers_a, dead, measures=["cka"], minibatch=20)
    assert np.isnan(partial["cka"].values).all()


@pytest.mark.parametrize("chunk", [7, 71])
def test_a_layer_whose_maps_are_all_alike_has_no_cka_of_whole_maps_nor_of_minibatches(chunk):
    """Every datapoint's map the same: its float64 mean, merged over chunks, was a few ulps off the values, and
    that rounding squared into the Gram blocks gave CKA -8.8e-10 (or, in one chunk, a refusal to "rescale it");
    rows alike within each minibatch gave a minibatch CKA of 2e-7 (found by audit). Values within the mean's
    rounding are centred to 0: no variance, said so, NaN with a warning in a sweep."""
    from chunkcca.measures import UndefinedMeasure

    rng = np.random.default_rng(9)
    dims = ("datapoint", "height", "width", "channel")
    x = xr.DataArray(da.from_array(rng.standard_normal((71, 2, 2, 3)), chunks=(chunk, -1, -1, -1)), dims=dims)
    alike = np.broadcast_to(np.array([0.1, 0.7, 1.3]) * np.array([[1.1], [0.3]])[:, None, :] + 0.1, (71, 2, 2, 3))
    z = xr.DataArray(da.from_array(alike.copy(), chunks=(chunk, -1, -1, -1)), dims=dims, name="z")
    for precision in ("auto", "float64"):
        with pytest.raises(UndefinedMeasure, match="layer 'z' has no variance"):
            cka(x, z, spatial="features", precision=precision)
    with pytest.warns(RuntimeWarning, match="CKA of layer 'z' is NaN: its whole maps do not vary"):
        assert np.isnan(similarity({"x": x}, {"z": z}, measures=["cka"], spatial="features")["cka"].item())
    rows = np.repeat(rng.standard_normal((10, 3)), 5, axis=0)  # 10 minibatches of 5 rows alike
    with pytest.raises(ValueError, match="no variance within"):
        cka(rows, rng.standard_normal((50, 3)), minibatch=5)


def test_a_flatten_minibatch_refused_for_memory_names_the_size_that_would_fit():
    """With flatten, a task holds whole minibatches that end with whole datapoints: 257 rows of 16 x 16
    positions take 257 datapoints a task, 256 one; the refusal said only "take smaller minibatches" (found by
    audit). It names a size whose minibatches end with datapoints."""
    from chunkcca.minibatch import whole_datapoints_size

    assert [whole_datapoints_size(m, 256, 1) for m in (257, 600, 100, 256)] == [256, 512, 64, 256]
    assert whole_datapoints_size(7, 9, 2) is None and whole_datapoints_size(9, 6, 2) == 9
    rng = np.random.default_rng(0)
    dims = ("datapoint", "height", "width", "channel")
    x, y = (xr.DataArray(da.from_array(rng.standard_normal((68, 16, 16, 8)).astype(np.float32),
                                       chunks=(1, -1, -1, -1)), dims=dims, name=name) for name in "xy")
    with pytest.raises(ValueError, match=r"whole minibatches of 257 rows, which end with a datapoint of 256 rows only "
                                         r"every 257 datapoints; minibatches of 256 rows would take a chunk of one "
                                         r"minibatch's datapoints\) .* over memory_limit=3\.00 MiB"):
        cka(x, y, minibatch=257, memory_limit="3MiB")
    assert np.isfinite(float(cka(x, y, minibatch=256, memory_limit="3MiB")["cka"]))
