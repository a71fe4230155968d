"""Bad inputs answered clearly, nothing lost, properties proven (issue: reliability)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import correlated_layers
from hypothesis import given
from hypothesis import strategies as st
from reference import canonical_correlations, cka_reference, flatten_rows

import chunkcca
from chunkcca import Moments, cca, cka, similarity
from chunkcca.moments import merge_packed, pack, unpack

DIMS = ("datapoint", "height", "width", "channel")


def _with_nan(seed: int = 0) -> tuple[np.ndarray, xr.DataArray]:
    a, b = correlated_layers(np.random.default_rng(seed), 40, (3, 3, 4), (3, 3, 3), dtype=np.float64)
    b = b.copy()
    b[17, 1, 2, 0] = np.nan
    b[30, 0, 0, 2] = np.inf
    return a, xr.DataArray(b, dims=DIMS, name="model1/conv")


def test_nan_raises_naming_layer_and_chunk():
    a, b = _with_nan()
    # chunks 10-19 and 30-39 both hold one; whichever a thread reaches first is reported
    with pytest.raises(ValueError, match=r"layer 'model1/conv' holds NaN or Inf in the chunk of datapoints "
                                         r"(10 to 19|30 to 39); pass nan_policy='omit'"):
        cca(da.from_array(a, chunks=(10, -1, -1, -1)), b.chunk({"datapoint": 10}))


def test_nan_omit_drops_rows_from_both_sides_and_counts_them():
    a, b = _with_nan()
    result = cca(da.from_array(a, chunks=(7, -1, -1, -1)), b, nan_policy="omit", precision="float64")
    rows_a, rows_b = flatten_rows(a), flatten_rows(b.values)
    keep = np.isfinite(rows_b).all(axis=1)
    assert result.attrs["rows_omitted"] == 2 and int(result["rows"]) == keep.sum()
    np.testing.assert_allclose(result["rho"], canonical_correlations(rows_a[keep], rows_b[keep]), atol=1e-9)
    swept = similarity({"a": a}, {"b": b}, measures=["cka"], nan_policy="omit", precision="float64")
    assert swept.attrs["rows_omitted"] == 2
    assert float(swept["cka"].item()) == pytest.approx(cka_reference(rows_a[keep], rows_b[keep], False), abs=1e-9)


def test_nan_policy_is_validated():
    a, b = _with_nan()
    with pytest.raises(ValueError, match="nan_policy must be one of 'raise', 'omit', got 'drop'"):
        cca(a, b, nan_policy="drop")
    with pytest.raises(ValueError, match="minibatch CKA cannot omit rows"):
        cka(a, b, minibatch=8, nan_policy="omit")


def test_all_rows_non_finite():
    a = np.full((10, 3), np.nan)
    with pytest.raises(ValueError, match="every row of layers 'a', 'b' holds NaN or Inf"):
        cca(a, np.ones((10, 2)), nan_policy="omit")


@given(seed=st.integers(0, 1000), chunk=st.integers(1, 30))
def test_independent_of_datapoint_order(seed, chunk):
    """Permuting the datapoints of both layers (and chunking them anyhow) changes nothing."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((30, 4)) + 2, rng.standard_normal((30, 3))
    b[:, 0] += a[:, 1]
    order = rng.permutation(30)
    base = cca(a, b, precision="float64")
    shuffled = cca(da.from_array(a[order], chunks=chunk), b[order], precision="float64")
    np.testing.assert_allclose(shuffled["rho"], base["rho"], atol=1e-10)


def test_counts_are_exact_past_two_to_the_31():
    """Row counts travel as float64 (exact to 2**53) and come back as Python ints."""
    big = 2**31 + 12345
    rng = np.random.default_rng(0)
    parts = [Moments(n=big + i, mean=rng.standard_normal(3), scatter=np.eye(3) * (i + 1)) for i in range(3)]
    merged = unpack(merge_packed(np.concatenate([pack(m) for m in parts])))
    assert merged.n == 3 * big + 3
    assert isinstance(merged.n, int)
    assert (parts[0] + parts[1]).n == 2 * big + 1


def test_channels_first_input_is_named_and_dims_fix_it():
    a, b = correlated_layers(np.random.default_rng(1), 30, (6, 6, 5), (6, 6, 4), dtype=np.float64)
    nchw = np.moveaxis(a, 3, 1)  # (30, 5, 6, 6)
    with pytest.raises(ValueError, match=r"layer 'a' looks channels-first: shape \(30, 5, 6, 6\).*dims="):
        cca(nchw, b)
    nchw_b = np.moveaxis(b, 3, 1)
    named = cca(nchw, nchw_b, dims=("datapoint", "channel", "height", "width"), precision="float64")
    np.testing.assert_allclose(named["rho"], cca(a, b, precision="float64")["rho"], atol=1e-12)
    renamed = xr.DataArray(a, dims=("n", "y", "x", "c"))
    mapped = cca(renamed, b, dims={"n": "datapoint", "y": "height", "x": "width", "c": "channel"}, precision="float64")
    np.testing.assert_allclose(mapped["rho"], named["rho"], atol=1e-12)
    with pytest.raises(ValueError, match="dims names 3 axes but layer 'a' has 4"):
        cca(nchw, nchw_b, dims=("datapoint", "channel", "height"))


def test_corrupt_chunk_names_store_and_layer(tmp_path):
    a, b = correlated_layers(np.random.default_rng(2), 40, (3, 3, 4), (3, 3, 3))
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"m0/conv": a, "m1/conv": b}, chunks=10)
    chunk = next((tmp_path / "s.zarr" / "m1" / "conv" / "activations").rglob("c/2/*/*/*"))
    chunk.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(OSError, match=r"reading layers 'm0/conv', 'm1/conv' from .*s.zarr failed"):
        cca(tree["m0/conv"], tree["m1/conv"])
