"""Spatial adapters on single blocks: the global row pattern survives any chunking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st
from reference import avgpool_rows, flatten_rows

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
    np.testing.assert_allclose(rows[1, 3], spectrum[[2, 4], 1, 3], atol=1e-12)


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


def test_dft_rows_of_float64_blocks_in_complex64_equal_those_of_float32_blocks():
    acts = np.random.default_rng(3).standard_normal((5, 4, 6, 3))
    adapter = Adapter("dft", (4, 6), frequencies=(np.array([0, 1, 3]), np.arange(6)), spectrum_dtype="complex64")
    rows = adapter.rows(acts)
    assert rows.dtype == np.complex64 and rows.shape == (3, 6, 5, 3) and rows.flags.c_contiguous
    np.testing.assert_array_equal(rows, adapter.rows(acts.astype(np.float32)))
    spectrum = np.fft.fft2(acts.astype(np.float32).astype(np.complex64), axes=(1, 2))
    np.testing.assert_array_equal(rows, np.moveaxis(spectrum[:, [0, 1, 3]], 0, 2))


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
