"""Conv-layer adapters (avgpool, interp, dft) against in-memory float64 computations and google/svcca golden values."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import GOLDEN, correlated_layers
from hypothesis import given
from hypothesis import strategies as st
from reference import canonical_correlations, dft_correlations, flatten_rows, interpolate_layer

from chunkcca import cca, compute_moments
from chunkcca.compat import fourier_ccas
from chunkcca.options import StreamOptions
from chunkcca.rows import plan_adapters

DIMS = ("datapoint", "height", "width", "channel")
#: float64 products agree with the QR reference to ~1e-13 here; 1e-9 leaves room for conditioning.
#: float32 products: 3e-6, as in test_cca.
ATOL = {"float64": 1e-9, "float32": 3e-6}


def _conv_and_pool(seed: int, datapoints: int = 60) -> tuple[xr.DataArray, xr.DataArray]:
    """conv2 (16 x 16 at pixel centres 0.5 … 15.5) and a 2x2-pooled 8 x 8 map of another net (centres 1, 3 … 15)."""
    conv, other = correlated_layers(np.random.default_rng(seed), datapoints, (16, 16, 5), (16, 16, 4))
    pool = other.reshape(datapoints, 8, 2, 8, 2, 4).max(axis=(2, 4))
    centres16, centres8 = np.arange(16) + 0.5, np.arange(8) * 2 + 1.0
    return (xr.DataArray(conv, dims=DIMS, name="net0/conv2", coords={"height": centres16, "width": centres16}),
            xr.DataArray(pool, dims=DIMS, name="net1/pool2", coords={"height": centres8, "width": centres8}))


@pytest.fixture(scope="module")
def conv_pool():
    return _conv_and_pool(0)


@pytest.mark.parametrize("method", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize(("chunk", "stride"), [(60, 1), (7, 3), (25, 5)])
def test_interp_on_coords_matches_in_memory(conv_pool, method, chunk, stride):
    conv, pool = conv_pool
    result = cca(conv.chunk({"datapoint": chunk}), pool.chunk({"datapoint": chunk // 2 + 1}), spatial="interp",
                 method=method, stride=stride, precision="float64")
    moved = interpolate_layer(pool.values, (pool.height.values, pool.width.values),
                              (conv.height.values, conv.width.values), method)
    want = canonical_correlations(flatten_rows(conv.values, stride), flatten_rows(moved, stride))
    np.testing.assert_allclose(result["rho"], want, atol=ATOL["float64"])
    assert int(result["rows"]) == flatten_rows(conv.values, stride).shape[0]
    assert result.attrs["method"] == method and result.attrs["grid"] == "coords"


def test_interp_either_order_and_float32(conv_pool):
    conv, pool = conv_pool
    forward = cca(conv, pool, spatial="interp", stride=2, precision="float64")
    backward = cca(pool, conv, spatial="interp", stride=2, precision="float32")
    np.testing.assert_allclose(backward["rho"], forward["rho"], atol=ATOL["float32"])


def test_interp_svcca_grid_reproduces_the_tutorials_interp2d():
    """Golden: google/svcca's conv tutorial (interp2d, SciPy 1.13) on a (40, 8, 8, 6) conv and (40, 4, 4, 5) pool."""
    golden = np.load(GOLDEN / "conv_interp_svcca.npz")
    conv, pool = golden["in_acts1"], golden["in_acts2"]
    names = [xr.DataArray(x, dims=DIMS, name=n) for x, n in ((conv, "conv"), (pool, "pool"))]
    _, moved = plan_adapters(*names, StreamOptions(spatial="interp", grid="svcca"))
    resampled = moved.rows(pool.astype(np.float64)).reshape(golden["out_interpolated"].shape)
    np.testing.assert_allclose(resampled, golden["out_interpolated"], rtol=0, atol=1e-12)
    for chunk in (40, 9):
        result = cca(da.from_array(conv, chunks=(chunk, -1, -1, -1)), pool, spatial="interp", grid="svcca",
                     stride=5, precision="float64")
        np.testing.assert_allclose(result["rho"], golden["out_cca_coef1"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [40, 6])
def test_avgpool_matches_reference_golden(chunk):
    """Golden: get_cca_similarity(mean over (h, w)) of the reference; its float32 means cost ~2e-7."""
    golden = np.load(GOLDEN / "conv_avgpool.npz")
    conv = da.from_array(golden["in_acts1"], chunks=(chunk, -1, -1, -1))
    result = cca(conv, golden["in_acts2"], spatial="avgpool", precision="float64")
    np.testing.assert_allclose(result["rho"], golden["out_cca_coef1"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize(("chunk", "stride"), [(60, 1), (11, 2)])
def test_dft_matches_in_memory(conv_pool, precision, chunk, stride):
    conv, pool = conv_pool
    result = cca(conv.chunk({"datapoint": chunk}), pool, spatial="dft", stride=stride, precision=precision)
    want = dft_correlations(conv.values, pool.values, stride)
    assert result["rho"].dims == ("freq_h", "freq_w", "component")
    np.testing.assert_allclose(result["rho"], want, atol=ATOL[precision])
    np.testing.assert_array_equal(result["freq_h"], [0, 1, 2, 3, -4, -3, -2, -1])
    np.testing.assert_allclose(result["rho_freq_mean"], want.mean(axis=-1), atol=ATOL[precision])
    assert float(result["rho_mean"]) == pytest.approx(want.mean(), abs=ATOL[precision])
    assert int(result["rows"]) == len(range(0, 60, stride))


def test_dft_of_equal_sizes_keeps_every_frequency():
    a, b = correlated_layers(np.random.default_rng(3), 50, (4, 6, 3), (4, 6, 3))
    result = cca(a, b, spatial="dft", precision="float64")
    assert result["rho"].shape == (4, 6, 3)
    np.testing.assert_allclose(result["rho"], dft_correlations(a, b), atol=ATOL["float64"])
    # real inputs: frequency f and -f are complex conjugates and give the same correlations
    np.testing.assert_allclose(result["rho"].sel(freq_h=1, freq_w=2), result["rho"].sel(freq_h=-1, freq_w=-2),
                               atol=1e-12)


def test_dft_matches_reference_golden():
    """Golden: the reference's fft_resize (complex64) and get_cca_similarity per frequency."""
    golden = np.load(GOLDEN / "conv_dft.npz")
    result = cca(golden["in_acts1"], golden["in_acts2"], spatial="dft", precision="float64")
    np.testing.assert_allclose(result["rho"], golden["out_cca_coef1"], rtol=0, atol=1e-6)


def test_compat_fourier_ccas_matches_reference_golden():
    golden = np.load(GOLDEN / "conv_dft.npz")
    frame = fourier_ccas(da.from_array(golden["in_acts1"], chunks=(13, -1, -1, -1)), golden["in_acts2"])
    assert list(frame["location"]) == [(i, j) for i in range(4) for j in range(4)]
    coefs = np.stack(frame["cca_coef1"]).reshape(golden["out_cca_coef1"].shape)
    np.testing.assert_allclose(coefs, golden["out_cca_coef1"], rtol=0, atol=1e-6)
    means = np.array([m[0] for m in frame["mean"]]).reshape(4, 4)
    np.testing.assert_allclose(means, golden["out_mean"], rtol=0, atol=1e-6)
    with_coefs = fourier_ccas(golden["in_acts1"], golden["in_acts2"], return_coefs=True)
    assert np.iscomplexobj(with_coefs["coef_x"][0]) and with_coefs["full_coef_x"][0].shape == (6, 6)
    with pytest.raises(ValueError, match="does not offer compute_dirns"):
        fourier_ccas(golden["in_acts1"], golden["in_acts2"], compute_dirns=True)


def test_dft_refuses_what_would_not_fit_the_memory_limit(conv_pool):
    conv, pool = conv_pool
    partial = 64 * 11 * 9 * 16  # frequencies x (p + q + 2) x (p + q) complex128
    with pytest.raises(ValueError, match=r"'net0/conv2' and 'net1/pool2': 9\^2 complex statistics at each of 64 "
                                         r"spatial frequencies = 99.00 kiB per partial.* over memory_limit"):
        cca(conv, pool, spatial="dft", memory_limit=3 * partial - 1)
    result = cca(conv, pool, spatial="dft", memory_limit=3 * partial, precision="float64")
    assert result["rho"].shape == (8, 8, 4)


@given(chunk_a=st.integers(1, 24), chunk_b=st.integers(1, 24), stride=st.integers(1, 4),
       spatial=st.sampled_from(["interp", "dft", "avgpool"]))
def test_conv_adapters_independent_of_chunking(chunk_a, chunk_b, stride, spatial):
    """Any chunking of either layer gives the one-chunk Moments, to rounding (float64 products)."""
    rng = np.random.default_rng([chunk_a, chunk_b, stride])
    a, b = rng.standard_normal((24, 6, 6, 3)) + 2, rng.standard_normal((24, 3, 3, 2))
    whole = compute_moments(a, b, spatial=spatial, stride=stride, precision="float64")
    split = compute_moments(da.from_array(a, chunks=(chunk_a, -1, -1, -1)),
                            da.from_array(b, chunks=(chunk_b, -1, -1, -1)), spatial=spatial, stride=stride,
                            precision="float64", split_every=2)
    assert split.n == whole.n
    np.testing.assert_allclose(split.mean, whole.mean, rtol=0, atol=1e-12 * np.abs(whole.mean).max())
    np.testing.assert_allclose(split.scatter, whole.scatter, rtol=0, atol=1e-12 * np.abs(whole.scatter).max())
