"""Row adapters (flatten, avgpool, interp, dft): single blocks give the global row pattern in any chunking, and
streamed measures under each adapter match in-memory float64 computations and google/svcca golden values."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import GOLDEN, correlated_layers
from dask.utils import parse_bytes
from hypothesis import given
from hypothesis import strategies as st
from reference import avgpool_rows, canonical_correlations, dft_correlations, flatten_rows, interpolate_layer

import chunkcca
from chunkcca import cca, compute_moments, similarity
from chunkcca.options import StreamOptions
from chunkcca.rows import Adapter, interpolation_matrix, plan_adapters, shared_frequencies


@given(datapoints=st.integers(1, 30), height=st.integers(1, 5), width=st.integers(1, 5),
       stride=st.integers(1, 9), cuts=st.lists(st.integers(1, 29), max_size=5),
       spatial=st.sampled_from(["flatten", "avgpool"]))
def test_blocks_reassemble_the_global_strided_rows(datapoints, height, width, stride, cuts, spatial):
    acts = np.arange(datapoints * height * width * 2, dtype=np.float64).reshape(datapoints, height, width, 2)
    adapter = Adapter(spatial, (height, width), stride)
    edges = sorted({0, datapoints, *[c for c in cuts if c < datapoints]})
    got = np.concatenate([adapter.block_rows(acts[a:b], a) for a, b in itertools.pairwise(edges)])
    want = flatten_rows(acts, stride) if spatial == "flatten" else avgpool_rows(acts, stride)
    np.testing.assert_array_equal(got, want)
    assert got.shape[0] == adapter.row_count(datapoints)


def test_flatten_is_a_view_and_keeps_every_other_pixel_column():
    acts = np.arange(1 * 2 * 4 * 1, dtype=np.float32).reshape(1, 2, 4, 1)
    rows = Adapter("flatten", (2, 4), 2).block_rows(acts, 0)
    assert np.shares_memory(rows, acts)
    np.testing.assert_array_equal(rows[:, 0], [0, 2, 4, 6])


def test_fully_connected_rows_are_datapoints():
    acts = np.arange(12.0).reshape(6, 2)
    adapter = Adapter("flatten", (1, 1), 2)
    np.testing.assert_array_equal(adapter.block_rows(acts[3:], 3), acts[4::2])
    assert Adapter("flatten", (1, 1), 4).row_count(6) == 2


def test_dft_rows_are_per_frequency_datapoints():
    acts = np.random.default_rng(0).standard_normal((5, 4, 6, 3))
    adapter = Adapter("dft", (4, 6), 2, frequencies=(np.arange(4), np.arange(6)))
    rows = adapter.block_rows(acts[2:], 2)
    spectrum = np.fft.fft2(acts, axes=(1, 2))
    assert rows.shape == (4, 6, 2, 3)
    np.testing.assert_allclose(np.asarray(rows)[1, 3], spectrum[[2, 4], 1, 3], atol=1e-12)
    # rows are transformed as they are taken, a slice (or any index) of rows at a time
    np.testing.assert_allclose(rows[..., 1:, :], np.moveaxis(spectrum[[4]], 0, -2), atol=1e-12)
    picked = rows[..., np.array([True, False])]  # a mask or index array picks rows, still made as taken
    assert picked.shape == (4, 6, 1, 3) and not isinstance(picked, np.ndarray)
    np.testing.assert_allclose(np.asarray(picked), np.moveaxis(spectrum[[2]], 0, -2), atol=1e-12)
    with pytest.raises(IndexError, match="rows"):
        rows[1, 3]


def test_shared_frequencies_follow_fft_resize():
    """google/svcca's fft_resize keeps -m/2 <= f < m/2 of each size, m the smaller one."""
    big, small = shared_frequencies(8, 4)
    np.testing.assert_array_equal(small, [0, 1, 2, 3])
    np.testing.assert_array_equal(big, [0, 1, 6, 7])  # frequencies 0, 1, -2, -1 of an 8-point FFT
    np.testing.assert_array_equal(np.fft.fftfreq(8, 1 / 8)[big], np.fft.fftfreq(4, 1 / 4))


@pytest.mark.parametrize(("size_a", "size_b"), [(49, 2), (98, 49), (103, 7), (5, 5)])
def test_shared_frequencies_of_sizes_whose_fftfreq_is_inexact(size_a, size_b):
    """fftfreq(n, 1/n) is not exactly integral for n = 49, 98, 103, …; the indices are f mod n regardless."""
    small = min(size_a, size_b)
    wanted = np.rint(np.fft.fftfreq(small, 1 / small)).astype(int)
    for size, indices in zip((size_a, size_b), shared_frequencies(size_a, size_b)):
        np.testing.assert_array_equal(np.rint(np.fft.fftfreq(size, 1 / size)[indices]), wanted)


def test_dft_rows_are_the_complex128_spectrum_of_float32_and_float64_blocks():
    acts = np.random.default_rng(3).standard_normal((5, 4, 6, 3))
    adapter = Adapter("dft", (4, 6), frequencies=(np.array([0, 1, 3]), np.arange(6)))
    rows = adapter.rows(acts)
    assert rows.dtype == np.complex128 and rows.shape == (3, 6, 5, 3) and rows.flags.c_contiguous
    spectrum = np.fft.fft2(acts, axes=(1, 2))
    np.testing.assert_array_equal(rows, np.moveaxis(spectrum[:, [0, 1, 3]], 0, 2))
    single = acts.astype(np.float32)
    np.testing.assert_array_equal(adapter.rows(single), adapter.rows(single.astype(np.float64)))


@pytest.mark.parametrize("spatial", ["flatten", "avgpool", "interp", "dft"])
def test_position_dims_in_another_order_pair_by_name(spatial):
    """A square map given as (datapoint, width, height, channel) was flattened in its own axis order: each
    position paired with its transpose (flatten rho_mean 0.125 instead of 1, CKA 0.009 instead of 0.49)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((120, 4, 4, 3))
    y = np.einsum("nhwc,cd->nhwd", x, rng.standard_normal((3, 2))) + rng.standard_normal((120, 4, 4, 2))
    a = xr.DataArray(x, dims=DIMS, name="a")
    b = xr.DataArray(y, dims=DIMS, name="b")
    swapped = b.transpose("datapoint", "width", "height", "channel")
    want = cca(a, b, spatial=spatial, precision="float64")["rho"]
    np.testing.assert_allclose(cca(a, swapped, spatial=spatial, precision="float64")["rho"], want, atol=1e-12)
    if spatial == "flatten":
        np.testing.assert_allclose(want, canonical_correlations(flatten_rows(x), flatten_rows(y)), atol=1e-10)


def test_rows_take_height_before_width_whatever_order_a_layer_gives():
    """With a stride the rows kept depend on their order, which followed the first layer's order of its position
    dims: a layer given as (datapoint, width, height, channel) made cca(a, b) 0.4886 and cca(b, a) 0.4553, and a
    sweep's value of a pair changed with the layers beside it. Rows now take height before width (and depth
    before both) in any layer; two orders of other names are refused, naming both, where the rows depend on them."""
    import chunkcca

    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4, 6, 4))
    y = x[..., :2] @ rng.standard_normal((2, 3)) + rng.standard_normal((30, 4, 6, 3)) * np.linspace(0.2, 3, 6)[:, None]
    a = xr.DataArray(x, dims=DIMS, name="a")
    b = xr.DataArray(y, dims=DIMS, name="b").transpose("datapoint", "width", "height", "channel")
    want = canonical_correlations(flatten_rows(x, 2), flatten_rows(y, 2))
    for first, second in ((a, b), (b, a)):
        np.testing.assert_allclose(cca(first, second, stride=2, precision="float64")["rho"], want, atol=1e-10)
    for order in ({"a": a, "b2": b}, {"b2": b, "a": a}):
        swept = chunkcca.similarity(order, {"b": b}, measures=["mean_cca"], stride=2, precision="float64")
        assert float(swept["mean_cca"].sel(layer_a="a", layer_b="b")) == pytest.approx(want.mean(), abs=1e-10)
    xy, yx = (xr.DataArray(x, dims=("datapoint", *order, "channel"), name=name)
              for order, name in ((("x", "y"), "xy"), (("y", "x"), "yx")))
    with pytest.raises(ValueError, match=r"layers 'xy' and 'yx' hold position dims \('x', 'y'\) and \('y', 'x'\): "
                                         r"rows are taken in C order"):
        cca(xy, yx.transpose("datapoint", "y", "x", "channel"))
    with pytest.raises(ValueError, match=r"layers 'xy' and 'yx' hold position dims"):  # in a pair a sweep solves
        chunkcca.similarity({"xy": xy}, {"yx": yx.transpose("datapoint", "y", "x", "channel")}, measures=["cka"])
    # where a datapoint's rows do not depend on its positions' order (avgpool, features) either order is taken: it
    # was refused, "rows are taken in C order"
    other = xr.DataArray(y, dims=("datapoint", "x", "y", "channel"), name="other")
    turned = other.transpose("datapoint", "y", "x", "channel")
    for spatial in ("avgpool", "features"):
        want = float(chunkcca.cka(xy, other, spatial=spatial, precision="float64")["cka"])
        assert float(chunkcca.cka(xy, turned, spatial=spatial, precision="float64")["cka"]) == pytest.approx(
            want, abs=1e-12)
        swept = chunkcca.similarity({"xy": xy}, {"turned": turned}, measures=["cka"], spatial=spatial,
                                    precision="float64")
        assert float(swept["cka"].squeeze()) == pytest.approx(want, abs=1e-12)
    assert float(cca(xy, turned, spatial="avgpool", precision="float64")["rho_mean"]) == pytest.approx(
        float(cca(xy, other, spatial="avgpool", precision="float64")["rho_mean"]), abs=1e-12)
    # on one side, never paired with each other, both are measured against a layer of no positions (a sweep refused
    # them, checking each layer's dims against its first layer's; found by review)
    fc = xr.DataArray(x[:, 0, 0], dims=("datapoint", "channel"), name="fc")
    swept = chunkcca.similarity({"xy": xy, "yx": yx}, {"fc": fc}, measures=["cka"], spatial="avgpool",
                                precision="float64")
    for name, layer in (("xy", xy), ("yx", yx)):
        alone = float(chunkcca.cka(layer, fc, spatial="avgpool", precision="float64")["cka"])
        assert float(swept["cka"].sel(layer_a=name, layer_b="fc")) == pytest.approx(alone, abs=1e-12)


def test_flatten_refuses_position_dims_named_otherwise_on_each_side():
    """(datapoint, x, y, channel) against (datapoint, height, width, channel) paired x with height by position, a
    guess (x is as often the width); flatten now refuses other names for maps of more than one position dim, in
    pairs and sweeps. One position dim pairs by order (token with time), and avgpool ignores the names."""
    import chunkcca

    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3, 3, 2))
    y = x @ rng.standard_normal((2, 2)) + rng.standard_normal((40, 3, 3, 2))
    a = xr.DataArray(x, dims=("datapoint", "x", "y", "channel"), name="a")
    b = xr.DataArray(y, dims=DIMS, name="b")
    message = (r"spatial='flatten' pairs position dims by name, and the layers name theirs differently: 'a' "
               r"\('x', 'y'\), 'b' \('height', 'width'\); give them one set of names")
    with pytest.raises(ValueError, match=message):
        cca(a, b)
    with pytest.raises(ValueError, match=message):
        chunkcca.similarity({"a": a}, {"b": b})
    np.testing.assert_allclose(cca(a, b, spatial="avgpool", precision="float64")["rho"],
                               canonical_correlations(avgpool_rows(x), avgpool_rows(y)), atol=1e-10)
    tokens = xr.DataArray(x[:, 0], dims=("datapoint", "token", "channel"), name="tokens")
    steps = xr.DataArray(y[:, 0], dims=("datapoint", "time", "channel"), name="steps")
    np.testing.assert_allclose(cca(tokens, steps, precision="float64")["rho"],
                               canonical_correlations(x[:, 0].reshape(-1, 2), y[:, 0].reshape(-1, 2)), atol=1e-10)


@pytest.mark.parametrize("spatial", ["flatten", "avgpool", "dft"])
def test_position_coordinates_that_decrease_are_refused(spatial):
    """Positions pair by their order: a partner flipped with its labels (``b.isel(height=slice(None, None, -1))``,
    the same data by label) paired each pixel with its mirror image, ρ̄ 0.07 against 0.65, silently. A position
    coordinate that does not increase is now refused, naming the layer, the dim and ``sortby``; coordinates
    that increase in other units (two stores written with other image sizes) still pair by order."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4, 4, 3))
    y = x @ rng.standard_normal((3, 3)) + rng.standard_normal((30, 4, 4, 3))
    centres = {"height": np.arange(4) + 0.5, "width": np.arange(4) + 0.5}
    a = xr.DataArray(x, dims=DIMS, coords=centres, name="a")
    b = xr.DataArray(y, dims=DIMS, coords=centres, name="b")
    flipped = b.isel(height=slice(None, None, -1))
    with pytest.raises(ValueError, match=r"layer 'b': its 'height' coordinates do not increase; layers pair "
                                         r"positions by their order, so put them in increasing order first "
                                         r"\(layer.sortby\('height'\)\)"):
        cca(a, flipped, spatial=spatial)
    want = cca(a, b, spatial=spatial, precision="float64")["rho"]
    np.testing.assert_allclose(cca(a, flipped.sortby("height"), spatial=spatial, precision="float64")["rho"], want,
                               atol=1e-12)
    other_units = b.assign_coords(height=4 * centres["height"] + 100, width=4 * centres["width"])
    np.testing.assert_allclose(cca(a, other_units, spatial=spatial, precision="float64")["rho"], want, atol=1e-12)
    unsigned = b.assign_coords(height=np.arange(4, dtype=np.uint32)).isel(height=slice(None, None, -1))
    with pytest.raises(ValueError, match="layer 'b': its 'height' coordinates do not increase"):  # np.diff wraps
        cca(a, unsigned, spatial=spatial)
    # an Inf position increases, and interp's nearest left it out, silently (found by audit)
    infinite = b.assign_coords(height=[0.5, 1.5, 2.5, np.inf])
    for method in ("nearest", "linear"):
        with pytest.raises(ValueError, match=r"layer 'b': its 'height' coordinates hold NaN or Inf \(e.g. inf\); "
                                             r"positions are finite numbers"):
            cca(a, infinite, spatial="interp", method=method)


@pytest.mark.parametrize("spatial", ["flatten", "last"])
def test_position_labels_that_are_not_numbers_must_agree(spatial):
    """Names are no positions in some unit: a layer of views labelled ["a", "b", "c"] beside the same views
    reordered (``isel(aug=[2, 0, 1])``) paired each view with another, CCA 0.09 for 0.996, silently. Where rows
    depend on the positions' order, such labels in another order, or other labels, are refused naming the dim and
    the remedy, for a pair and each pair of a sweep; equal ones, none, numbers held as objects, or a mode that
    averages the positions, pair."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3, 5))
    y = x @ rng.standard_normal((5, 4)) + 0.1 * rng.standard_normal((200, 3, 4))
    views = {"aug": ["a", "b", "c"]}
    a = xr.DataArray(x, dims=("datapoint", "aug", "channel"), coords=views, name="a")
    b = xr.DataArray(y, dims=("datapoint", "aug", "channel"), coords=views, name="b")
    with pytest.raises(ValueError, match=r"layers 'a' and 'b' label their 'aug' positions in another order "
                                         r"\(\['a', 'b', 'c'\] against \['c', 'a', 'b'\]\), and positions pair by "
                                         r"order: put them in one order \(b.sel\(aug=a\['aug'\]\)\)"):
        cca(a, b.isel(aug=[2, 0, 1]), spatial=spatial)
    with pytest.raises(ValueError, match=r"label their 'aug' positions otherwise .* drop the labels"):
        similarity({"a": a}, {"b": b.assign_coords(aug=["x", "y", "z"])}, spatial=spatial)
    unlabelled = a.drop_vars("aug").rename("first")  # the sweep's first layer: each solved pair is checked
    with pytest.raises(ValueError, match=r"layers 'a' and 'b' label their 'aug' positions in another order"):
        similarity({"first": unlabelled, "a": a}, {"b": b.isel(aug=[2, 0, 1])}, spatial=spatial)
    similarity({"a": a, "reordered": a.isel(aug=[2, 0, 1])}, {"b": b.drop_vars("aug")}, spatial=spatial)  # unpaired
    numbered = b.assign_coords(aug=np.array([0, 1, 2], dtype=object))
    cca(a.assign_coords(aug=[0.0, 0.5, 1.0]), numbered, spatial=spatial)  # numbers pair by order, as documented
    averaged = cca(a, b.isel(aug=[2, 0, 1]), spatial="avgpool", precision="float64")["rho"]  # no order to pair
    np.testing.assert_allclose(averaged, cca(a, b, spatial="avgpool", precision="float64")["rho"], atol=1e-12)
    want = cca(a, b, spatial=spatial, precision="float64")["rho"]
    np.testing.assert_allclose(cca(a, b.isel(aug=[2, 0, 1]).sel(aug=a["aug"]), spatial=spatial,
                                   precision="float64")["rho"], want, atol=1e-12)
    np.testing.assert_allclose(cca(a, b.drop_vars("aug"), spatial=spatial, precision="float64")["rho"], want,
                               atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_dft_cca_in_float32_keeps_the_digits_of_values_with_a_common_offset(offset):
    """The FFT ran in complex64 under precision="float32": an offset of 1e6 (a spread of 1) moved rho by 8e-3.
    Now the FFT runs in complex128 and only the shifted rows are rounded."""
    rng = np.random.default_rng(21)
    a, b = rng.standard_normal((300, 4, 4, 5)), rng.standard_normal((300, 4, 4, 6))
    b[..., :2] += a[..., :2]
    got = cca(da.from_array(a + offset, chunks=(70, -1, -1, -1)), b, spatial="dft", precision="float32")["rho"]
    np.testing.assert_allclose(got, dft_correlations(a + offset, b), atol=1e-5)  # float32 products: ~1e-6 here


@pytest.mark.parametrize("method", ["linear", "nearest", "cubic"])
def test_interpolation_matrix_reproduces_polynomials_and_clamps(method):
    source = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    target = np.array([0.5, 1.0, 2.0, 4.5, 8.9, 9.5])
    matrix = interpolation_matrix(source, target, method)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    values = matrix @ (2 * source + 1)
    clamped = np.clip(target, 1, 9)
    if method == "nearest":
        np.testing.assert_allclose(values, 2 * source[[0, 0, 0, 2, 4, 4]] + 1)  # 2.0 is a tie: the lower one
    else:  # linear and cubic splines reproduce straight lines, held flat past the ends
        np.testing.assert_allclose(values, 2 * clamped + 1, atol=1e-12)


def test_interp_brings_the_coarser_layer_onto_the_finer_grid():
    dims = ("datapoint", "height", "width", "channel")
    fine = xr.DataArray(np.zeros((1, 16, 16, 2)), dims=dims, name="conv2",
                        coords={"height": np.arange(16) + 0.5, "width": np.arange(16) + 0.5})
    coarse = xr.DataArray(np.zeros((1, 8, 8, 3)), dims=dims, name="pool2",
                          coords={"height": np.arange(8) * 2 + 1.0, "width": np.arange(8) * 2 + 1.0})
    for first, second in ((fine, coarse), (coarse, fine)):
        adapters = plan_adapters(first, second, StreamOptions(spatial="interp"))
        assert all(a.out_shape == (16, 16) and a.rows_per_datapoint == 256 for a in adapters)
    kept, moved = plan_adapters(fine, coarse, StreamOptions(spatial="interp"))
    assert kept.resample == (None, None)
    ramp = np.broadcast_to((np.arange(8) * 2 + 1.0)[None, :, None, None], (1, 8, 8, 3))
    rows = moved.rows(ramp).reshape(16, 16, 3)
    np.testing.assert_allclose(rows[:, 0, 0], np.clip(np.arange(16) + 0.5, 1, 15))


def test_cubic_needs_four_samples():
    dims = ("datapoint", "height", "width", "channel")
    a = xr.DataArray(np.zeros((1, 8, 8, 1)), dims=dims, name="big")
    b = xr.DataArray(np.zeros((1, 3, 3, 1)), dims=dims, name="small")
    with pytest.raises(ValueError, match="layer 'small' has 3 samples along height; method='cubic' needs at least 4"):
        plan_adapters(a, b, StreamOptions(spatial="interp", method="cubic"))


def test_unknown_adapter_is_named():
    with pytest.raises(ValueError, match="unknown spatial adapter 'fft'"):
        Adapter("fft", (1, 1)).rows(np.zeros((1, 2)))


def test_interp_without_coordinates_uses_the_shared_extent():
    """An 8x8 map and its 4x4 downsampling (no coordinates) line up: nearest interpolation recovers it exactly."""
    rng = np.random.default_rng(0)
    small = rng.standard_normal((30, 4, 4, 3))
    fine = small.repeat(2, axis=1).repeat(2, axis=2) @ rng.standard_normal((3, 3))
    result = cca(fine, small, spatial="interp", method="nearest", precision="float64")
    np.testing.assert_allclose(result["rho"], 1.0, atol=1e-9)


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


@pytest.mark.parametrize("method", ["linear", "nearest"])
@pytest.mark.parametrize("chunk", [60, 7])
def test_interp_omits_only_the_rows_a_nan_reaches(conv_pool, method, chunk):
    """A NaN in one value of the resampled layer left out all 256 rows of its datapoint (0 · NaN spread it
    through the resampling matrices); now only the rows whose weights on it are not 0. The reference takes
    those rows from resampling the NaN's indicator (linear and nearest weights are >= 0)."""
    conv, pool = conv_pool
    broken = pool.copy(data=pool.values.copy())
    broken.values[9, 3, 5, 2] = np.nan
    broken.values[30, 0, 7, 1] = np.inf
    positions = (pool.height.values, pool.width.values), (conv.height.values, conv.width.values)
    reached = interpolate_layer((~np.isfinite(broken.values)).any(axis=-1, keepdims=True) * 1.0, *positions, method)
    moved = interpolate_layer(np.nan_to_num(broken.values, nan=0.0, posinf=0.0), *positions, method)
    kept = flatten_rows(reached, 1)[:, 0] == 0
    want = canonical_correlations(flatten_rows(conv.values, 1)[kept], flatten_rows(moved, 1)[kept])
    result = cca(conv.chunk({"datapoint": chunk}), broken.chunk({"datapoint": chunk}), spatial="interp",
                 method=method, nan_policy="omit", precision="float64")
    assert result.attrs["rows_omitted"] == np.count_nonzero(~kept) < 2 * 16  # not 2 × 256
    np.testing.assert_allclose(result["rho"], want, atol=ATOL["float64"])


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


@pytest.mark.parametrize("precision", ["float32", "float64", "auto"])
def test_dft_of_channels_uniform_along_an_axis_counts_no_rounding_noise(precision):
    """A channel uniform along an axis (a per-input scale broadcast over the map) has no content at that axis's
    other frequencies; the FFT's rounding left about 1e-15 there on odd sizes, which the correlation matrix
    scaled up to a direction: rank 13 in place of 3 and mean ρ 0.72 against 0.71, silently."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((80, 5, 7, 3))
    uniform = np.concatenate([np.broadcast_to(rng.standard_normal((80, 1, 1, 4)), (80, 5, 7, 4)),  # every axis
                              np.broadcast_to(rng.standard_normal((80, 5, 1, 3)), (80, 5, 7, 3)),  # along width
                              np.broadcast_to(rng.standard_normal((80, 1, 7, 3)), (80, 5, 7, 3))], axis=-1)
    b = np.concatenate([a + rng.standard_normal(a.shape), uniform], axis=-1)
    result = cca(da.from_array(a, chunks=(30, 5, 7, 3)), b, spatial="dft", precision=precision)
    np.testing.assert_allclose(result["rho"], dft_correlations(a, b), atol=ATOL[precision.replace("auto", "float32")])
    assert int(result["rank_b"].sel(freq_h=1, freq_w=2)) == 3  # only b's first 3 channels vary there
    assert int(result["rank_b"].sel(freq_h=0, freq_w=0)) == 13


def _offset_layernorm(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A LayerNorm output over channels (exactly one null direction: the channels sum to a constant) with offsets
    of 100 times its spread, in float64."""
    z = rng.standard_normal(shape)
    return (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True) + rng.normal(0, 100, shape[-1])


def test_dft_cuts_the_rounding_every_position_adds_at_every_frequency(tmp_path):
    """A float32 LayerNorm output with offsets of 100 times its spread: its channels' spectra are small beside
    their means everywhere but at frequency 0, and each frequency's floor, e² times that frequency's own power,
    sat under the rounding the 64 positions' values add to it (e² times the map's power): the null direction
    was counted at every frequency but 0 (rank 12 for 11; ρ 1e-3 from the exact values'). Each frequency is now
    cut at least at the map's power that the frequencies show (Parseval, over each side's own positions,
    ``Moments.positions``), for a map as large as the other's, larger (cropped) or smaller, in any chunking.
    The reference is the exact float64 values' correlations, the null direction taken out; float32 values of
    mean 100 carry 6e-6 of their unit spread, which moved ρ by 2e-7 here (1e-6 allowed)."""
    rng = np.random.default_rng(4)
    a = _offset_layernorm(rng, (400, 8, 8, 12))
    small = _offset_layernorm(rng, (400, 4, 4, 12))
    basis = np.linalg.qr(np.hstack([np.ones((12, 1)), rng.standard_normal((12, 11))]))[0][:, 1:]  # ⟂ the null one
    pairs = {"same size": (a, a[..., :6] @ rng.standard_normal((6, 5)) + rng.standard_normal((400, 8, 8, 5))),
             "a larger": (a, a.reshape(400, 4, 2, 4, 2, 12).mean((2, 4))[..., :6] @ rng.standard_normal((6, 5))
                          + rng.standard_normal((400, 4, 4, 5))),
             "a smaller": (small, np.repeat(np.repeat(small, 2, 1), 2, 2)[..., :6] @ rng.standard_normal((6, 5))
                           + rng.standard_normal((400, 8, 8, 5)))}
    for name, (exact, b) in pairs.items():
        want = dft_correlations(exact @ basis, b)
        for chunks in (50, 400):
            result = cca(da.from_array(exact.astype(np.float32), chunks=(chunks, -1, -1, -1)), b, spatial="dft",
                         precision="float64")
            assert (result["rank_a"] == 11).all(), (name, chunks)
            np.testing.assert_allclose(result["rho"], want, atol=1e-6, err_msg=f"{name}, chunks of {chunks}")
    moments = compute_moments(a.astype(np.float32), pairs["a larger"][1], spatial="dft")
    assert moments.positions == (64, 16) and moments[1, 2].positions == (64, 16)
    assert moments.select([1]).positions == (16,) and (moments + moments).positions == (64, 16)
    moments.save(tmp_path / "m")
    assert chunkcca.Moments.load(tmp_path / "m").positions == (64, 16)
    whole = chunkcca.cca_from_moments(moments)
    # a frequency taken out of the whole keeps the whole's map power (Moments.map_power): it was cut at its own
    # frequencies' power alone, which leaves out the map's mean, and only warned (rank 12 for 11 at a float16 one)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chunkcca.measures.RoundingWarning)
        for part, at in ((moments[1, 2], {"freq_h": 1, "freq_w": 2}), (moments[1:3, 1:3], {}),
                         (moments[1:3, 1:3][1, 0], {"freq_h": 2, "freq_w": 1}), (moments[:2, :3], {})):
            solved = chunkcca.cca_from_moments(part)
            assert (solved["rank_a"] == 11).all()
            if at:
                np.testing.assert_allclose(solved["rho"], whole["rho"].isel(at), rtol=0, atol=1e-12)
        kept = moments[1, 2]
        np.testing.assert_array_equal(kept.map_power[0], moments.map_power_of(0))
        kept.save(tmp_path / "part")
        loaded = chunkcca.Moments.load(tmp_path / "part")
        np.testing.assert_array_equal(loaded.map_power[0], kept.map_power[0])
        assert kept.select([0]).map_power[0] is kept.map_power[0]
        np.testing.assert_allclose((kept + kept).map_power[0], kept.map_power[0], rtol=1e-15)
        assert (moments + moments).map_power == (None, None)  # the whole's frequencies show it
    unkept = dataclasses.replace(moments[1:2, 2:3], map_power=())  # made otherwise (saved by an earlier chunkcca)
    for made in (unkept, moments[1:2, 2:3] + unkept):  # merged with a part that keeps it: not kept either (the
        # part's own power, without the map's mean, was weighed in as the whole's: rank 12 for 11, unsaid)
        with pytest.warns(chunkcca.measures.RoundingWarning, match=r"layer 'a': these dft Moments hold frequencies "
                                                                   r"without frequency 0 and do not keep"):
            chunkcca.cca_from_moments(made)
    with pytest.raises(ValueError, match=r"cannot merge Moments whose rows were made differently, .*freq_h=1, "
                                         r"freq_w=-2.* and .*freq_h=-2, freq_w=1"):  # one frequency and another
        moments[1, 2] + moments[2, 1]
    exact = compute_moments(a * 1e152, pairs["a larger"][1], spatial="dft")  # float64: no map power to keep
    assert exact[1, 2].map_power == (None, None)  # (its squares overflowed, and indexing failed on them)
    with pytest.raises(ValueError, match=r"cannot merge Moments of spectra over \(64, 16\) and \(16, 16\) positions"):
        moments + dataclasses.replace(moments, positions=(16, 16))
    assert (moments + dataclasses.replace(moments, positions=())).positions == (64, 16)  # unknown agrees
    assert compute_moments(a, a).positions == (0, 0)  # rows of other kinds: none recorded
    metadata = json.loads((tmp_path / "m" / "zarr.json").read_text())
    for key in ("positions", chunkcca.moments.ATTRIBUTES_ATTR, chunkcca.moments.ARRAYS_ATTR,
                chunkcca.moments.SAVE_ATTR):  # as a save made before Moments recorded them
        metadata["attributes"].pop(key)
    (tmp_path / "m" / "zarr.json").write_text(json.dumps(metadata))
    with pytest.warns(UserWarning, match=r"do not record the positions each side's spectra sum over .* "
                                         r"dataclasses.replace\(moments, positions=\(positions_a, positions_b\)\)"):
        old = chunkcca.Moments.load(tmp_path / "m")
    with pytest.warns(RuntimeWarning, match="layer 'a' has a correlation matrix of condition number"):  # its noise
        assert old.positions == (0, 0) and int(chunkcca.cca_from_moments(old)["rank_a"].max()) == 12
    assert (chunkcca.cca_from_moments(dataclasses.replace(old, positions=(64, 16)))["rank_a"] == 11).all()


def test_dft_frequencies_where_a_layer_does_not_vary_are_undefined_not_zero():
    """A map upsampled by repeating its pixels (a decoder's nearest upsampling) has nothing at its highest
    frequencies: ρ = 0 there was averaged into rho_mean (0.522 for the 0.682 of the frequencies where both
    vary) and drawn as "uncorrelated", silently. Such frequencies are NaN, left out of the means, and warned of,
    naming the layer and a frequency."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((500, 4, 4, 6))
    a = np.maximum(np.repeat(np.repeat(z, 2, 1), 2, 2) @ rng.standard_normal((6, 8))
                   + 0.5 * rng.standard_normal((500, 8, 8, 8)), 0)
    b = np.repeat(np.repeat(np.maximum(z @ rng.standard_normal((6, 5)), 0), 2, 1), 2, 2)
    layers = (xr.DataArray(a, dims=DIMS, name="a"), xr.DataArray(b, dims=DIMS, name="b"))
    with pytest.warns(RuntimeWarning, match=r"CCA is undefined at 15 of 64 frequencies, where 'b' does not vary, or "
                                            r"only within the rounding of its values \(the first: freq_h=0, "
                                            r"freq_w=-4; .*rho is NaN there"):
        result = cca(*layers, spatial="dft", precision="float64")
    undefined = np.isnan(result["rho_freq_mean"])
    assert int(undefined.sum()) == 15 and bool((result["rank_b"].values[undefined.values] == 0).all())
    want = dft_correlations(a, b)[~undefined.values]  # the frequencies where both vary
    np.testing.assert_allclose(result["rho"].values[~undefined.values], want, atol=ATOL["float64"])
    assert float(result["rho_mean"]) == pytest.approx(want.mean(), abs=1e-12)
    assert float(result["r2_cca"]) == pytest.approx((want**2).mean(), abs=1e-12)
    # a fixed float32 pattern there (a transposed convolution's checkerboard) varies only within its rounding
    checkerboard = 1e4 * (-1.0) ** (np.arange(8)[:, None] + np.arange(8)[None, :])
    patterned = (b + checkerboard[None, :, :, None] + 1e-4 * rng.standard_normal(b.shape)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match=r"CCA is undefined at \d+ of 64 frequencies, where 'b' does not vary, "
                                            r"or only within the rounding of its values"):
        rounded = cca(layers[0], xr.DataArray(patterned, dims=DIMS, name="b"), spatial="dft", precision="float64")
    assert bool(np.isnan(rounded["rho_freq_mean"].sel(freq_h=-4, freq_w=-4)))  # it gave 0.0, counted in the mean


def test_dft_matches_reference_golden():
    """Golden: the reference's fft_resize (complex64) and get_cca_similarity per frequency."""
    golden = np.load(GOLDEN / "conv_dft.npz")
    result = cca(golden["in_acts1"], golden["in_acts2"], spatial="dft", precision="float64")
    np.testing.assert_allclose(result["rho"], golden["out_cca_coef1"], rtol=0, atol=1e-6)


def test_dft_refuses_what_would_not_fit_the_memory_limit(conv_pool):
    conv, pool = conv_pool
    partial = 64 * 11 * 9 * 16  # frequencies x (p + q + 2) x (p + q) complex128
    with pytest.raises(ValueError, match=r"'net0/conv2' and 'net1/pool2': 9\^2 complex statistics at each of 64 "
                                         r"spatial frequencies = 99.00 kiB per partial.* over memory_limit"):
        cca(conv, pool, spatial="dft", memory_limit=3 * partial)  # the partials alone, without the chunk's work
    with pytest.raises(ValueError, match=r"read smaller chunks$"):  # it advised avgpool to avgpool's refusal
        cca(conv, pool, spatial="avgpool", memory_limit=1)
    with pytest.raises(ValueError, match=r"or use spatial='avgpool' or 'interp' \(--spatial: one set of statistics"):
        cca(conv, pool, spatial="dft", memory_limit=1)
    result = cca(conv, pool, spatial="dft", memory_limit="16MiB", precision="float64")
    assert result["rho"].shape == (8, 8, 4)


@pytest.mark.parametrize("chains", [1, 2])
@pytest.mark.parametrize("case", ["float64", "auto", "groups", "coarse b"])
def test_dft_memory_limit_bounds_the_run(chains, case):
    """The arrays a DFT run allocates while streaming (traced by tracemalloc: spectra, partials, accumulators,
    store chunks read and temporaries) stay within memory_limit set to what the run says one chain needs (as its
    refusal of a smaller limit states it), or twice that, with 8 threads: with float64 products, the
    auto-precision pilot (its statistics become the rest's first accumulator), four groups (every group's
    accumulator), or b in chunks five times a's (each read whole and cut for five folds); the result is the one
    of an unbounded run."""
    import re
    import tracemalloc

    import dask

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2400, 8, 8, 12)).astype(np.float32)  # 7 + 6 MiB: reading ahead would show
    labels = np.tile(np.arange(4), 600)
    a = xr.DataArray(x, dims=DIMS, name="a", coords={"label": ("datapoint", labels)})
    b = xr.DataArray(x[..., :10] + 0.5 * rng.standard_normal((2400, 8, 8, 10)).astype(np.float32), dims=DIMS,
                     name="b", coords={"label": ("datapoint", labels)})
    options = {"precision": "auto" if case == "auto" else "float64", "groupby": "label" if case == "groups" else None}
    a, b = (layer.chunk({"datapoint": 300 if case == "coarse b" and layer.name == "b" else 60}) for layer in (a, b))
    a, b = (layer.copy(data=layer.data.map_blocks(np.copy)) for layer in (a, b))  # each chunk a new array when read
    with pytest.raises(ValueError, match="over memory_limit") as refused:
        cca(a, b, spatial="dft", memory_limit=1, **options)
    one = parse_bytes(re.search(r"in work \(([^)]+)\)", str(refused.value)).group(1).replace(" ", ""))
    limit = int(chains * one * 1.01)  # its rounding in the message
    want = cca(a, b, spatial="dft", memory_limit="1GiB", **options)
    tracemalloc.start()
    try:
        with dask.config.set(num_workers=8):
            got = cca(a, b, spatial="dft", memory_limit=limit, **options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"peak {peak} over memory_limit {limit}"
    np.testing.assert_allclose(got["rho"], want["rho"], rtol=0, atol=1e-6 if case == "auto" else 1e-12)


@given(chunk_a=st.integers(1, 24), chunk_b=st.integers(1, 24), stride=st.integers(1, 4),
       spatial=st.sampled_from(["interp", "dft", "avgpool"]))
def test_conv_adapters_independent_of_chunking(chunk_a, chunk_b, stride, spatial):
    """Any chunking of either layer gives the one-chunk Moments, to rounding (float64 products)."""
    rng = np.random.default_rng([chunk_a, chunk_b, stride])
    a, b = rng.standard_normal((24, 6, 6, 3)) + 2, rng.standard_normal((24, 3, 3, 2))
    whole = compute_moments(a, b, spatial=spatial, stride=stride, precision="float64")
    split = compute_moments(da.from_array(a, chunks=(chunk_a, -1, -1, -1)),
                            da.from_array(b, chunks=(chunk_b, -1, -1, -1)), spatial=spatial, stride=stride,
                            precision="float64")
    assert split.n == whole.n
    np.testing.assert_allclose(split.mean, whole.mean, rtol=0, atol=1e-12 * np.abs(whole.mean).max())
    np.testing.assert_allclose(split.scatter, whole.scatter, rtol=0, atol=1e-12 * np.abs(whole.scatter).max())


def test_interp_refuses_layers_whose_pixel_centres_are_of_inputs_of_different_sizes(tmp_path):
    """Written to two stores apart, a conv (8 x 8) and its pool (4 x 4) each took their own size as the image's:
    the pool's centres 0.5 … 3.5 were read as pixels of the conv's 8 x 8 input, silently (a tester's pair:
    rho_mean 0.05, against 0.28 with both in one store)."""
    import chunkcca

    rng = np.random.default_rng(0)
    conv = rng.standard_normal((200, 8, 8, 4))
    pool = conv.reshape(200, 4, 2, 4, 2, 4).mean(axis=(2, 4)) + 0.1 * rng.standard_normal((200, 4, 4, 4))
    pool = xr.DataArray(pool, dims=("datapoint", "height", "width", "channel"))  # a cube: either layout fits
    apart = [chunkcca.write_activations(tmp_path / f"{name}.zarr", {name: value}, chunks=100)[name]
             for name, value in (("conv", conv), ("pool", pool))]
    together = chunkcca.write_activations(tmp_path / "both.zarr", {"conv": conv, "pool": pool}, chunks=100)
    with pytest.raises(ValueError, match=r"layer 'conv' spans 8 input pixels along height and layer 'pool' 4: "
                                         r"their pixel centres are in units of inputs of different sizes"):
        cca(*apart, spatial="interp")
    cropped = together["conv"].isel(height=slice(0, 4))  # centres 0.5 … 3.5: a 4-pixel input's, to look at
    with pytest.raises(ValueError, match=r"spans 4 input pixels along height .* 8: .* or one is cropped from the "
                                         r"input's first pixel .* crop the other layer to the same part"):
        cca(cropped, together["conv"], spatial="interp")
    np.testing.assert_allclose(  # cropped alike, both sit where they were: conv against itself, rho 1
        cca(cropped, together["conv"]["activations"].isel(height=slice(0, 4)).rename("again"), spatial="interp",
            precision="float64")["rho"], 1, atol=1e-9)
    given = [chunkcca.write_activations(tmp_path / f"{name}8.zarr", {name: value}, chunks=100, image_size=8)[name]
             for name, value in (("conv", conv), ("pool", pool))]
    np.testing.assert_allclose(cca(*given, spatial="interp", precision="float64")["rho"],
                               cca(together["conv"], together["pool"], spatial="interp", precision="float64")["rho"],
                               atol=1e-12)


def test_interp_reads_float32_pixel_centres_to_their_precision():
    """float32 centres of a 14-pixel input are even to 1e-7 only: they were taken for a crop, so a 3 x 3 layer on
    a 14-pixel input beside a 7 x 7 one on a 7-pixel input went unrefused (rho_mean 0.628 for 0.883, silently),
    and float32 centres of one input beside an unlabelled layer were refused as a crop. Labels agree to their own
    dtype's precision."""
    rng = np.random.default_rng(20)
    fine = rng.standard_normal((50, 7, 7, 3)).cumsum(1).cumsum(2)  # smooth maps
    coarse = fine[:, 1::2, 1::2][:, :3, :3] + 0.1 * rng.standard_normal((50, 3, 3, 3))

    def labelled(values, extent, dtype, name):
        centres = ((np.arange(values.shape[1]) + 0.5) * extent / values.shape[1]).astype(dtype)
        return xr.DataArray(values, dims=("datapoint", "height", "width", "channel"), name=name,
                            coords={"height": centres, "width": centres})

    for dtype in (np.float64, np.float32):
        with pytest.raises(ValueError, match=r"layer 'fine' spans 7 input pixels along height and layer 'coarse' "
                                             r"14"):
            cca(labelled(fine, 7, dtype, "fine"), labelled(coarse, 14, dtype, "coarse"), spatial="interp")
        want = cca(labelled(fine, 7, np.float64, "fine"), labelled(coarse, 7, np.float64, "coarse"),
                   spatial="interp", precision="float64")["rho"]
        got = cca(labelled(fine, 7, dtype, "fine"), labelled(coarse, 7, dtype, "coarse"), spatial="interp",
                  precision="float64")["rho"]
        np.testing.assert_allclose(got, want, atol=1e-5)  # float32 centres move the weights by ~1e-7
        beside = cca(fine, labelled(coarse, 7, dtype, "coarse"), spatial="interp", precision="float64")["rho"]
        np.testing.assert_allclose(beside, want, atol=1e-5)  # the unlabelled one spans the labelled one's input


def test_interp_places_an_unlabelled_layer_on_the_labelled_ones_input(tmp_path):
    """An 8 x 8 layer from a store (centres 0.5 … 7.5, its own pixels) against an unlabelled 16 x 16 array: the
    unlabelled one was spread over 16 units, so the coarse map covered its first half (rho_mean 0.02 against 0.33
    when both span one image, silently). An unlabelled layer spans the labelled one's input; against positions
    that are not pixel centres of one input (a crop) it is refused."""
    import chunkcca

    rng = np.random.default_rng(26)
    fine = rng.standard_normal((30, 16, 16, 3))
    coarse = (fine[:, ::2, ::2] + fine[:, 1::2, 1::2]) @ rng.standard_normal((3, 4))
    want = cca(fine, coarse, spatial="interp", precision="float64")["rho"]  # both unlabelled: one image each
    stored = chunkcca.write_activations(tmp_path / "coarse.zarr", {"coarse": coarse})["coarse"]
    np.testing.assert_allclose(cca(fine, stored, spatial="interp", precision="float64")["rho"], want, atol=1e-12)
    wide = chunkcca.write_activations(tmp_path / "fine.zarr", {"fine": fine}, image_size=32)["fine"]
    np.testing.assert_allclose(cca(wide, coarse, spatial="interp", precision="float64")["rho"], want, atol=1e-12)
    tokens = rng.standard_normal((40, 10, 3))  # a store numbers tokens 0, 1, …: of equal lengths they pair as they are
    partner = tokens @ rng.standard_normal((3, 2)) + 0.3 * rng.standard_normal((40, 10, 2))
    numbered = chunkcca.write_activations(tmp_path / "tokens.zarr", {"tok": tokens})["tok"]
    np.testing.assert_allclose(cca(numbered, partner, spatial="interp", precision="float64")["rho"],
                               cca(tokens, partner, spatial="interp", precision="float64")["rho"], atol=1e-12)
    cropped = stored["activations"].assign_coords(height=np.arange(8) + 3.0)
    with pytest.raises(ValueError, match=r"layer 'coarse' places its height positions otherwise than as the pixel "
                                         r"centres of one input .* and layer 'a' does not label them"):
        cca(fine, cropped, spatial="interp")


def test_interp_refuses_positions_that_are_only_numbered():
    """record() numbers time steps 0 … L − 1: a 40-step Conv1d output against a 9-step strided one put the coarse
    samples at 0 … 8, so 31 of the 40 fine steps read the last coarse value (rho_mean 0.05 against 0.14 with
    the steps at their centres), silently."""
    rng = np.random.default_rng(8)
    dims = ("datapoint", "time", "channel")
    fine = xr.DataArray(rng.standard_normal((60, 40, 3)), dims=dims, name="fine",
                        coords={"time": np.arange(40)})
    coarse = xr.DataArray(rng.standard_normal((60, 9, 2)), dims=dims, name="coarse", coords={"time": np.arange(9)})
    message = (r"layers 'fine' and 'coarse' number their time positions 0, 1, … or do not label them \(40 and 9 of "
               r"them\)")
    with pytest.raises(ValueError, match=message):
        cca(fine, coarse, spatial="interp")
    # unlabelled, the same layers were placed as if both spanned one input (where stored, numbered, they were
    # refused); off the image's height and width they are refused alike
    with pytest.raises(ValueError, match=message):
        cca(fine.drop_vars("time"), coarse.drop_vars("time"), spatial="interp")
    placed = coarse.assign_coords(time=(np.arange(9) + 0.5) * 40 / 9 - 0.5)  # the steps' centres, in fine steps
    assert cca(fine, placed, spatial="interp")["rho"].size == 2
    assert cca(fine, coarse, spatial="interp", grid="svcca")["rho"].size == 2
    assert cca(fine.drop_vars("time"), coarse.drop_vars("time"), spatial="interp", grid="svcca")["rho"].size == 2


def test_nearest_breaks_exact_ties_towards_the_lower_sample_whatever_the_rounding():
    """Pixel centres of 6 on 11 (and 15 other size pairs up to 16 on 32) meet exactly half-way, but rounding of
    (i + 0.5) · extent / size put some ties 1 ulp nearer the upper sample: whole rows of the resampled map came
    from the other pixel than the documented rule says."""
    from fractions import Fraction

    from chunkcca.rows import interpolation_matrix, pixel_centres

    for coarse in range(2, 17):
        for fine in range(coarse + 1, 33):
            source = [Fraction(2 * i + 1, 2 * coarse) * fine for i in range(coarse)]  # exact, in fine's units
            want = []
            for j in range(fine):
                target = min(max(Fraction(2 * j + 1, 2), source[0]), source[-1])
                distances = [abs(target - centre) for centre in source]
                want.append(distances.index(min(distances)))  # the first (lower) of tied samples
            got = interpolation_matrix(pixel_centres(coarse, fine), pixel_centres(fine, fine), "nearest").argmax(1)
            assert got.tolist() == want, (coarse, fine)


def test_interp_refuses_an_unlabelled_sequence_beside_a_labelled_one():
    """A 5-token layer without coordinates beside a 10-token one labelled in the input's units was placed as if
    it spanned the labelled one's input, a guess the docs say is refused (as for two unlabelled layers)."""
    rng = np.random.default_rng(4)
    dims = ("datapoint", "token", "channel")
    placed = xr.DataArray(rng.standard_normal((40, 10, 3)), dims=dims, name="a",
                          coords={"token": (np.arange(10) + 0.5) * 10})
    plain = xr.DataArray(rng.standard_normal((40, 5, 2)), dims=dims, name="b")
    with pytest.raises(ValueError, match=r"layer 'b' does not label its token positions, beside layer 'a', which "
                                         r"does, and they have 5 and 10: interp cannot tell"):
        cca(placed, plain, spatial="interp")
    assert cca(placed, plain, spatial="interp", grid="svcca")["rho"].size == 2
    same = xr.DataArray(rng.standard_normal((40, 10, 2)), dims=dims, name="c")  # as many: position i is i
    assert cca(placed, same, spatial="interp")["rho"].size == 2
