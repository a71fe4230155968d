"""spatial="features": each datapoint's whole map is one feature vector, as the CKA papers and libraries take conv
layers; exact full-data linear CKA from Gram blocks of pairs of datapoint chunks, and minibatch CKA, against
in-memory float64 n × n Gram references."""

from __future__ import annotations

import collections

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkcca import cca, cka, compare, similarity

#: The Gram route sums float64 products of n × n blocks: ~1e-14 relative; 1e-11 leaves room for the sums.
TOL = 1e-11


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


@settings(max_examples=12, deadline=None)
@given(chunk_a=st.integers(5, 70), chunk_b=st.integers(5, 70), stride=st.integers(1, 3), seed=st.integers(0, 5),
       memory_limit=st.sampled_from(["1.5GiB", 400_000, 150_000]))
def test_exact_feature_cka_equals_the_gram_reference_in_any_chunking(chunk_a, chunk_b, stride, seed, memory_limit):
    """Under the default memory_limit one band holds every chunk; under 400 kB or 150 kB (enough for any of
    these chunkings) bands hold a few chunks, the last one shorter, and large chunks are cut into pieces to fit."""
    x, y = _maps(seed)
    got = cka(da.from_array(x, chunks=chunk_a), da.from_array(y, chunks=chunk_b), spatial="features", stride=stride,
              memory_limit=memory_limit)
    assert float(got["cka"]) == pytest.approx(_gram_cka(x[::stride], y[::stride]), rel=TOL)
    assert int(got["rows"]) == len(x[::stride])


def test_the_gram_pass_reads_each_chunk_once_per_band_that_reaches_it():
    """A band of the Gram pass holds as many chunks as memory_limit affords beside the tasks at work (one, on the
    synchronous scheduler: a chunk as read, one layer's centred rows); a chunk is read once by the means pass and
    once by each band starting at or before it. Here bands of 3 chunks over 8: chunk j is read 2 + j // 3 times."""
    reads: collections.Counter = collections.Counter()
    rng = np.random.default_rng(4)
    data = {name: rng.standard_normal((128, 2, 2, width)) + 1 for name, width in (("a", 8), ("bb", 4))}

    def block(name: str, index: int) -> np.ndarray:
        reads[(name, index)] += 1
        return data[name][16 * index : 16 * index + 16]

    a, b = (da.concatenate([da.from_delayed(dask.delayed(block)(name, index), shape=(16, 2, 2, values.shape[-1]),
                                            dtype=float) for index in range(8)]) for name, values in data.items())
    centred = 16 * (32 + 16) * 8  # one chunk of both layers as centred float64 rows
    at_work = 16 * (32 + 16) * 8 + 16 * 32 * 8  # a task: a chunk of both as read (float64), one layer centred
    grams = 2 * 2 * 16 * 16 * 8  # and per chunk of the band its 16 × 16 Gram blocks of both layers, stacked
    got = cka(a, b, spatial="features", memory_limit=at_work + 3 * (centred + grams), scheduler="synchronous")
    assert dict(reads) == {(name, index): 2 + index // 3 for name in data for index in range(8)}
    assert float(got["cka"]) == pytest.approx(_gram_cka(data["a"], data["bb"]), rel=TOL)


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
    assert float(got["cka"]) == pytest.approx(_gram_cka(data["a"], data["bb"]), rel=TOL)


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
    assert float(got["cka"]) == pytest.approx(_gram_cka(x, y), rel=TOL)


@pytest.mark.parametrize("case", ["plain", "coarse b", "a in one chunk"])
def test_memory_limit_bounds_the_gram_pass(case):
    """The arrays an exact feature CKA run allocates (traced by tracemalloc: chunks read, centred rows of the
    band, Gram blocks, store chunks shared by several tasks) stay within a memory_limit that affords bands of
    two chunks, with 8 threads: both layers in chunks of 40 datapoints; b in chunks of 200, each read whole and
    cut into five pieces; or a in one chunk of 600, which the pass cuts into pieces to fit. The result is the
    in-memory Gram reference's."""
    import tracemalloc

    import xarray as xr

    from chunkcca.passes import cut, gram_bytes, gram_plan

    rng = np.random.default_rng(8)
    x = rng.standard_normal((600, 6, 6, 12)).astype(np.float32)
    y = (x[..., :10] + rng.standard_normal((600, 6, 6, 10)).astype(np.float32)).astype(np.float32)
    chunk_a, chunk_b = {"plain": (40, 40), "coarse b": (40, 200), "a in one chunk": (600, 40)}[case]
    a, b = (xr.DataArray(da.from_array(values, chunks=chunk).map_blocks(np.copy), dims=("datapoint", "height",
                         "width", "channel"), name=name)  # each chunk a new array when read
            for values, chunk, name in ((x, chunk_a, "a"), (y, chunk_b, "b")))
    planned = cut(a.data.chunks[0], 75) if case == "a in one chunk" else a.data.chunks[0]
    fixed, per_chunk = gram_bytes([a, b], planned, 8)
    limit = fixed + 2 * per_chunk
    chunks, band = gram_plan([a, b], limit, 8)
    assert (chunks, band) == (planned, 2)
    with dask.config.set(num_workers=8):
        cka(a, b, spatial="features", memory_limit=limit)  # once untraced: what it first imports is not the run's
    tracemalloc.start()
    try:
        with dask.config.set(num_workers=8):
            got = cka(a, b, spatial="features", memory_limit=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"peak {peak} over memory_limit {limit}"
    assert float(got["cka"]) == pytest.approx(_gram_cka(x.astype(np.float64), y.astype(np.float64)), rel=1e-9)


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
                                         r"datapoint .* store chunks they lie in \(51.25 kiB\).* over "
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
    np.testing.assert_allclose(sweep["cka"].values, want, rtol=TOL)
    assert int(sweep["rows"]) == x.shape[0]  # one row per datapoint: its whole map
    assert float(compare(x, y, spatial="features", measures=["cka"])["cka"]) == pytest.approx(want[0][0], rel=TOL)


def test_exact_feature_cka_of_a_dead_layer_is_nan_with_a_warning():
    x, _ = _maps(7)
    with pytest.warns(RuntimeWarning, match="CKA of layer 'dead' is NaN: its whole maps do not vary"):
        sweep = similarity({"x": x}, {"x": x, "dead": np.zeros_like(x)}, spatial="features", measures=["cka"])
    assert sweep["cka"].sel(layer_a="x", layer_b="x").item() == pytest.approx(1.0, rel=TOL)
    assert np.isnan(sweep["cka"].sel(layer_a="x", layer_b="dead").item())


def test_covariance_measures_refuse_features_and_say_why():
    x, y = _maps(3)
    with pytest.raises(ValueError, match="mean_cca needs covariances, and spatial='features' makes each datapoint's "
                                         "whole map one row"):
        cca(x, y, spatial="features")
    with pytest.raises(ValueError, match="pwcca needs covariances"):
        compare(x, y, spatial="features", measures=["cka", "pwcca"])


@pytest.mark.parametrize("chains", [1, 2])
def test_memory_limit_bounds_minibatch_cka(chains):
    """The arrays a minibatch CKA run allocates (traced: chunks joined from the store's smaller chunks, the
    float64 minibatch, its Gram matrices) stay within memory_limit set to what the run says one chain needs (its
    refusal of a smaller limit states it), or twice that, with 8 threads; the result is an unbounded run's."""
    import re
    import tracemalloc

    from dask.utils import parse_bytes

    rng = np.random.default_rng(9)
    x = rng.standard_normal((600, 6, 6, 12)).astype(np.float32)
    y = (x[..., :10] + rng.standard_normal((600, 6, 6, 10))).astype(np.float32)
    a, b = (da.from_array(values, chunks=(40, 6, 6, -1)).map_blocks(np.copy) for values in (x, y))  # 100s joined
    with pytest.raises(ValueError, match=r"the minibatch-cka pass over 'a', 'b': reading 100 datapoints of every "
                                         r"layer at a time, with the store chunks they lie in, holds (.*), over "
                                         r"memory_limit=1 B; raise memory_limit") as refused:
        cka(a, b, spatial="features", minibatch=100, memory_limit=1)
    one = parse_bytes(re.search(r"holds ([^,]+), over", str(refused.value)).group(1).replace(" ", ""))
    limit = int(chains * one * 1.01)  # its rounding in the message
    want = cka(a, b, spatial="features", minibatch=100, memory_limit="1GiB")
    tracemalloc.start()
    try:
        with dask.config.set(num_workers=8):
            got = cka(a, b, spatial="features", minibatch=100, memory_limit=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"peak {peak} over memory_limit {limit}"
    assert float(got["cka"]) == pytest.approx(float(want["cka"]), rel=1e-12)
    assert float(got["cka"]) == pytest.approx(_minibatch_gram_cka(x.astype(float), y.astype(float), 100), rel=1e-10)


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
    with pytest.raises(ValueError, match=r"minibatch applies to measures=\['cka'\] only, got \['mean_cca', 'cka'\]"):
        similarity(layers_a, layers_b, minibatch=20)
    with pytest.raises(TypeError, match="precision do not apply to minibatch CKA"):
        similarity(layers_a, layers_b, measures=["cka"], minibatch=20, precision="float64")
    dead = {"dead": np.zeros_like(y)}
    with pytest.warns(RuntimeWarning, match="minibatch CKA of layer 'dead' is NaN: it has no variance"):
        partial = similarity(layers_a, dead, measures=["cka"], minibatch=20)
    assert np.isnan(partial["cka"].values).all()
