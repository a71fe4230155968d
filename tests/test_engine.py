"""The Dask engine and its passes: NaN/Inf found and named or omitted, auto precision, any chunking or order."""

from __future__ import annotations

import io
import os
import time
import warnings

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import DIMS, correlated_layers
from hypothesis import given
from hypothesis import strategies as st
from reference import canonical_correlations, cka_reference, flatten_rows

from chunkcca import cca, cka, compare, compute_moments, shape_metric_from_moments, similarity, svcca_from_moments


def _with_nan(seed: int = 0) -> tuple[np.ndarray, xr.DataArray]:
    a, b = correlated_layers(np.random.default_rng(seed), 40, (3, 3, 4), (3, 3, 3), dtype=np.float64)
    b = b.copy()
    b[17, 1, 2, 0] = np.nan
    b[30, 0, 0, 2] = np.inf
    return a, xr.DataArray(b, dims=DIMS, name="model1/conv")


def test_nan_raises_naming_layer_and_chunk():
    a, b = _with_nan()
    # chunks 10-19 and 30-39 both hold one; whichever a thread reaches first is reported
    with pytest.raises(ValueError, match=r"^layer 'model1/conv' holds NaN or Inf at datapoint (17|30); pass "
                                         r"nan_policy='omit'"):
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


@pytest.mark.parametrize("spatial", ["flatten", "avgpool", "interp", "dft"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_one_non_finite_value_anywhere_is_found(spatial, precision, value):
    """Finite chunks are not searched (their partial is finite); one bad value still raises, naming its
    datapoint."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((40, 4, 4, 3)) + 3
    b = rng.standard_normal((40, 4, 4, 2) if spatial == "flatten" else (40, 2, 2, 2))
    b[33, 1, 0, 1] = value
    layer_a = xr.DataArray(a, dims=DIMS, name="a").chunk({"datapoint": 10})
    layer_b = xr.DataArray(b, dims=DIMS, name="b").chunk({"datapoint": 10})
    with pytest.raises(ValueError, match=r"^layer 'b' holds NaN or Inf at datapoint 33; "):
        cca(layer_a, layer_b, spatial=spatial, precision=precision)
    if spatial in ("avgpool", "dft"):  # one row per datapoint: omitting it leaves datapoint 33 out
        omitted = cca(layer_a, layer_b, spatial=spatial, precision="float64", nan_policy="omit")
        expected = cca(np.delete(a, 33, axis=0), np.delete(b, 33, axis=0), spatial=spatial, precision="float64")
        assert omitted.attrs["rows_omitted"] == 1
        np.testing.assert_allclose(omitted["rho"], expected["rho"], rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:layer '.' holds the datapoints of layer '.' in another order")
@pytest.mark.parametrize("spatial", ["flatten", "avgpool"])
@pytest.mark.parametrize("grouped", [False, True])
def test_a_non_finite_value_is_named_by_its_datapoint_s_label_whatever_each_layer_s_order(spatial, grouped):
    """Layer b stored in another order than a is read in a's: the error named a's positions ("the chunk of
    datapoints 0 to 9", where b's own rows 0 to 9 were finite), and swapping a and b gave "20 to 29". Now it names
    the datapoint's label, and its exact position where the layers have no labels."""
    rng = np.random.default_rng(3)
    labels = np.array([f"img{i:03d}" for i in range(40)])
    a = xr.DataArray(rng.standard_normal((40, 2, 2, 3)), dims=DIMS, coords={"datapoint": labels}, name="a")
    order = rng.permutation(40)
    b = xr.DataArray(rng.standard_normal((40, 2, 2, 2)), dims=DIMS, coords={"datapoint": labels[order]}, name="b")
    b[21, 1, 0, 1] = np.nan  # b's position 21
    bad = repr(str(labels[order][21]))
    options = {"spatial": spatial, **({"groupby": "half"} if grouped else {})}
    if grouped:
        a = a.assign_coords(half=("datapoint", np.arange(40) % 2))
    for first, second in ((a, b), (b, a)):
        with pytest.raises(ValueError, match=rf"^layer 'b' holds NaN or Inf at the datapoint labelled {bad}; "):
            compare(first.chunk({"datapoint": 10}), second.chunk({"datapoint": 10}), measures=["cka"], **options)
    b_values = b.values
    with pytest.raises(ValueError, match=r"^layer 'b' holds NaN or Inf at datapoint 21; "):
        compare(a.values, b_values, measures=["cka"], spatial=spatial)
    with pytest.raises(ValueError, match=r"^layer 'b' labels its datapoints .* and layer 'a' does not"):
        compare(a.values, b, measures=["cka"], spatial=spatial)  # paired by position, the labels ignored
    if not grouped:  # b and c were each paired by position to the unlabelled a, and so with each other
        c = b.assign_coords(datapoint=labels[rng.permutation(40)]).rename("c")
        with pytest.raises(ValueError, match=r"^layer 'b' labels its datapoints .* and layer 'a' does not"):
            similarity({"a": a.values}, {"b": b.fillna(0.0), "c": c}, measures=["cka"], spatial=spatial)


def test_datapoint_errors_keep_their_message_when_pickled():
    """A worker of a cluster sends an error back pickled: the datapoint's position and label go with it."""
    import pickle

    from chunkcca.engine import NonFiniteError, NoRealPositionError

    for error in (NonFiniteError("layer 'b' holds NaN or Inf at {datapoint}", 21, "b"),
                  NoRealPositionError("layer 'a': {datapoint} has no real position", 3, "a").labelled(
                      np.array(["x"] * 4))):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and again.position == error.position
    assert str(again) == "layer 'a': the datapoint labelled 'x' has no real position"
    pairs = pd.MultiIndex.from_arrays([np.arange(4), np.array(["p", "q", "r", "s"])])
    assert str(NonFiniteError("{datapoint}", 2, "a").labelled(pairs)) == "the datapoint labelled (2, 'r')"


def test_non_finite_value_after_the_shift_rows_is_found():
    """A bad value far past the rows that set a chunk's shift (SHIFT_ROWS) still reaches the partial."""
    from chunkcca.moments import SHIFT_ROWS

    a = np.random.default_rng(6).standard_normal((300, 4, 4, 3))
    rows_per_chunk = 100 * 16
    assert rows_per_chunk > SHIFT_ROWS + 16 * 20
    b = a[..., :2] * 2 + 1
    b[180, 3, 3, 1] = np.inf  # row 1295 of the chunk of datapoints 100 to 199
    with pytest.raises(ValueError, match=r"^layer 'b' holds NaN or Inf at datapoint 180; "):
        cca(xr.DataArray(a, dims=DIMS, name="a").chunk({"datapoint": 100}),
            xr.DataArray(b, dims=DIMS, name="b").chunk({"datapoint": 100}))


def test_minibatch_cka_finds_non_finite_rows_left_out_of_minibatches():
    """Minibatch CKA searches every row: a NaN in the rows after the last whole minibatch raises too."""
    rng = np.random.default_rng(7)
    a = xr.DataArray(rng.standard_normal((40, 3, 3, 4)), dims=DIMS, name="a")
    b = xr.DataArray(rng.standard_normal((40, 3, 3, 2)), dims=DIMS, name="b")
    assert cka(a, b, minibatch=7)["rows_left_out"] == 360 % 7 == 3
    b[39, 2, 2, 0] = np.nan  # the last row: left out of every minibatch
    with pytest.raises(ValueError, match="layer 'b' holds NaN or Inf"):
        cka(a, b, minibatch=7)


def test_float32_overflow_is_computed_again_in_float64():
    """Finite values too large for float32 products once gave an error; their chunk is now done in float64."""
    import warnings

    a = np.random.default_rng(8).standard_normal((50, 3)) * 3e19
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cca(a, a[:, :2] + 1, precision="float32")
    assert float(got["rho"][0]) == pytest.approx(1, abs=1e-9)


def test_nan_policy_is_validated():
    a, b = _with_nan()
    with pytest.raises(ValueError, match="nan_policy must be one of 'raise', 'omit', got 'drop'"):
        cca(a, b, nan_policy="drop")
    with pytest.raises(ValueError, match="minibatch CKA cannot omit rows"):
        cka(a, b, minibatch=8, nan_policy="omit")
    with pytest.raises(ValueError, match=r"minibatch CKA does not work per spatial frequency.*'features'"):
        cka(a, b, minibatch=8, spatial="dft")


def test_all_rows_non_finite():
    a = np.full((10, 3), np.nan)
    with pytest.raises(ValueError, match="every row of layers 'a', 'b' was left out as holding NaN or Inf"):
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


def _ill_conditioned(condition: float, seed: int = 0, n: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Post-ReLU-like x (mean 50, spread ~0.1) whose correlation matrix has the given condition number."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    spread = np.sqrt(np.logspace(0, -np.log10(condition), 6))
    latent = rng.standard_normal((n, 6))
    x = 50.0 + 0.1 * (latent * spread) @ basis
    y = latent[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((n, 4))
    return x, y


@pytest.mark.parametrize("condition", [1e2, 1e4, 1e6])
def test_large_offset_and_ill_conditioning_float64(condition):
    """float64 products: the covariance route squares the data's conditioning (up to 1e6 here) on top of
    eps ~ 1e-16, so 1e-8 bounds the error against the QR reference with room (1e-10 seen at 1e6)."""
    x, y = _ill_conditioned(condition)
    result = cca(da.from_array(x, chunks=3000), y, precision="float64")
    np.testing.assert_allclose(result["rho"], canonical_correlations(x, y), atol=1e-8)


def test_float64_past_the_conditioning_covariances_resolve_warns_naming_the_layer():
    """Past 1e8 (``WHITENING_CONDITION``) covariances no longer give the weakest ρ to 1e-8: at 1e12 float64
    products gave ρ off by 1e-4 against the QR reference, moving with the chunking, silently. Now each measure
    that inverts the matrix warns at the user's call, naming the layer and the option that bounds it; a ridge
    that conditions the matrix, and conditioning the covariances resolve, pass without a warning."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4096, 6))
    x = np.column_stack([z[:, :4], z[:, 0] + 1e-6 * z[:, 4]])  # a near-duplicate channel: condition number 4e12
    y = np.column_stack([z[:, [0, 1, 4]] + 0.5 * rng.standard_normal((4096, 3)), z[:, 5]])  # reads z4, through it
    reference = canonical_correlations(x, y)
    off = []
    for chunks in (64, 4096):
        with pytest.warns(RuntimeWarning, match=r"layer 'a' has a correlation matrix of condition number about "
                                                r"1e1[1-3] \(near-duplicate channels\).*epsilon \(a ridge\) bounds "
                                                r"it") as caught:
            off.append(np.abs(cca(da.from_array(x, chunks=chunks), y, precision="float64")["rho"] - reference).max())
        assert {record.filename for record in caught} == {__file__}
    assert max(off) > 1e-6, "the weakest canonical correlation really is imprecise here"
    a, b = da.from_array(x, chunks=1024), da.from_array(y, chunks=1024)
    for call in (lambda: compare(a, b, measures=["pwcca", "mean_cca"]),
                 lambda: similarity({"a": a}, {"b": b}, measures=["mean_cca"]),
                 lambda: compare(b, a, measures=["heldout_cca"], folds=3)):
        with pytest.warns(RuntimeWarning, match="has a correlation matrix of condition number about 1e1") as caught:
            call()
        assert {record.filename for record in caught} == {__file__}
    with pytest.warns(RuntimeWarning, match="layer 'a' has a correlation matrix.*alpha > 0 bounds it"):
        shape_metric_from_moments(compute_moments(x, y, precision="float64"), alpha=0.0)
    # a sweep says it once per layer (and group), naming it: it said "side a", once for every pair and group
    labelled = {name: xr.DataArray(values, dims=("datapoint", "channel"), coords={"g": ("datapoint", groups)})
                for name, values, groups in (("a", x, np.arange(4096) % 2), ("b", y, np.arange(4096) % 2),
                                             ("c", y[:, ::-1], np.arange(4096) % 2))}
    with pytest.warns(RuntimeWarning) as caught:
        similarity({"a": labelled["a"]}, {"b": labelled["b"], "c": labelled["c"]}, measures=["mean_cca"],
                   groupby="g")
    said = [str(record.message) for record in caught if "correlation matrix" in str(record.message)]
    assert len(said) == 2 and all(message.startswith("layer 'a' has") for message in said)
    assert sorted(message.rsplit(" in the group ", 1)[-1] for message in said) == ["g=0", "g=1"]
    assert {record.filename for record in caught} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cca(a, b, precision="float64", epsilon=1e-4)
        # an alpha that bounds the condition number (1e-9 leaves it at 1e9, and is warned of since)
        shape_metric_from_moments(compute_moments(x, y, precision="float64"), alpha=1e-6)
        compare(a, b, measures=["cka", "procrustes"])  # nothing inverted
        svcca_from_moments(compute_moments(x, y, precision="float64"))  # its kept directions only
        cca(*_ill_conditioned(1e6), precision="float64")


def test_precision_auto_switches_to_float64_when_float32_cannot_hold_and_says_so():
    x, y = _ill_conditioned(1e6)
    result = cca(da.from_array(x, chunks=3000), y, precision="auto")
    assert result.attrs["precision"] == "float64"
    assert "condition number in the first 3000 datapoints is" in result.attrs["precision_auto"]
    assert "layer 'a'" in result.attrs["precision_auto"]
    np.testing.assert_allclose(result["rho"], canonical_correlations(x, y), atol=1e-8)
    with pytest.warns(RuntimeWarning, match="ill-conditioned or rank-deficient layers"):
        float32 = cca(da.from_array(x, chunks=3000), y, precision="float32")
    # 4.5e-6 since float64 rows are shifted in float64 before rounding (1.1e-5 before), 450 times auto's 1e-8
    assert np.abs(float32["rho"] - canonical_correlations(x, y)).max() > 1e-6, "float32 really falls short here"


def _sorted_by_class(seed: int = 17) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Datapoints stored by class (300 each); channels 0 and 5 share a class signal 1000 times their spread, so
    that the whole run's correlation matrix is ill-conditioned (about 3e6) and any one class's is not; y0 reads
    x0 − x5. Returns x, y and the classes."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(10), 300)
    x = rng.standard_normal((3000, 6))
    x[:, [0, 5]] += 1000 * rng.standard_normal(10)[classes, None]
    y = rng.standard_normal((3000, 3))
    y[:, 0] = x[:, 0] - x[:, 5] + 0.5 * rng.standard_normal(3000)
    return x, y, classes


def test_precision_auto_checks_the_whole_run_when_the_pilot_did_not_show_its_conditioning():
    """The pilot (the first class) was well conditioned (1.85); float32 products then lost x0 − x5 at the
    solve (rank 5 of 6) and gave rho_1 0.05 against 0.94. Now the whole run is checked and made again in
    float64."""
    x, y, _ = _sorted_by_class()
    result = cca(da.from_array(x, chunks=100), da.from_array(y, chunks=100))
    assert result.attrs["precision"] == "float64"
    assert "in a third pass over all the datapoints" in result.attrs["precision_auto"]
    assert "condition number in all 3000 datapoints is 3." in result.attrs["precision_auto"]
    np.testing.assert_allclose(result["rho"], canonical_correlations(x, y), atol=1e-8)
    with pytest.warns(RuntimeWarning, match="ill-conditioned or rank-deficient layers"):
        float32 = cca(da.from_array(x, chunks=100), da.from_array(y, chunks=100), precision="float32")
    assert abs(float(float32["rho"][0]) - canonical_correlations(x, y)[0]) > 0.5, "float32 really falls short"


def test_explicit_float32_on_ill_conditioned_layers_warns_at_the_users_call():
    x, y, _ = _sorted_by_class()
    a, b = da.from_array(x, chunks=100), da.from_array(y, chunks=100)
    for call in (lambda: cca(a, b, precision="float32"),
                 lambda: compare(a, b, measures=["cka", "mean_cca"], precision="float32"),
                 lambda: similarity({"a": a}, {"b": b}, measures=["pwcca"], precision="float32")):
        with pytest.warns(RuntimeWarning, match=r"precision='float32' on ill-conditioned or rank-deficient layers "
                                                r"\(the largest correlation-matrix condition number in all 3000 "
                                                r"datapoints is 3\.") as caught:
            call()
        assert {record.filename for record in caught} == {__file__}
    from chunkcca.compat import get_cca_similarity

    with pytest.warns(RuntimeWarning, match=r"precision='float64' keeps them \(as does 'auto', the measures' and "
                                            r"the command's default\)"):  # compat offers no 'auto' (found by audit)
        get_cca_similarity(a.T, b.T, verbose=False, precision="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cca(a, b)  # auto: no warning, float64 where needed
        # CKA and Procrustes invert no covariance: neither a warning nor a third pass in float64
        compare(a, b, measures=["cka", "procrustes"], precision="float32")
        assert "third pass" not in similarity({"a": a}, {"b": b}, measures=["cka"]).attrs["precision_auto"]
        cca(da.from_array(y, chunks=100), da.from_array(x[:, 1:5], chunks=100), precision="float32")


def test_precision_auto_checks_each_group_when_the_whole_run_is_well_conditioned():
    """Within each class x3 ≈ x0 (cond ~1e6); across classes the class offsets keep them apart (cond ~3), in the
    pilot (the classes are mixed) as in the whole run."""
    rng = np.random.default_rng(3)
    classes = rng.permutation(np.repeat(np.arange(4), 1000))
    x = rng.standard_normal((4000, 4))
    x[:, 3] = x[:, 0] + 1e-3 * rng.standard_normal(4000) + 10 * rng.standard_normal(4)[classes]
    y = rng.standard_normal((4000, 2))
    y[:, 0] = 1000 * (x[:, 3] - x[:, 0]) + 0.3 * rng.standard_normal(4000)
    coords = {"label": ("datapoint", classes)}
    a = xr.DataArray(x, dims=("datapoint", "channel"), name="a", coords=coords).chunk({"datapoint": 250})
    b = xr.DataArray(y, dims=("datapoint", "channel"), name="b", coords=coords).chunk({"datapoint": 250})
    result = cca(a, b, groupby="label")
    assert result.attrs["precision"] == "float64", result.attrs["precision_auto"]
    assert "rows of group" in result.attrs["precision_auto"]
    for label in range(4):
        chosen = classes == label
        np.testing.assert_allclose(result["rho"].sel(label=label), canonical_correlations(x[chosen], y[chosen]),
                                   atol=1e-8)
    with pytest.warns(RuntimeWarning, match="ill-conditioned or rank-deficient layers"):
        float32 = cca(a, b, groupby="label", precision="float32")
    first = classes == 0
    assert float(float32["rho"].sel(label=0)[0]) < 0.1 < 0.9 < canonical_correlations(x[first], y[first])[0]


def test_precision_auto_keeps_float32_on_well_conditioned_offset_data():
    x, y = _ill_conditioned(10.0)
    result = cca(da.from_array(x.astype(np.float32), chunks=3000), y.astype(np.float32), precision="auto")
    assert result.attrs["precision"] == "float32"
    assert "auto: float32 products" in result.attrs["precision_auto"]
    want = canonical_correlations(x.astype(np.float32), y.astype(np.float32))
    np.testing.assert_allclose(result["rho"], want, atol=3e-6)


@pytest.mark.parametrize(("offset", "spread", "dtype", "whole", "tolerance"), [
    (1e5, 3.0, np.float32, False, 1e-12),  # float32's steps of 2⁻⁷ at 1e5: 384 steps a spread, products in float64
    (3e4, 20.0, np.int16, True, 1e-12),  # integers: steps of 1, exact float32 sums
    (3e4, 20.0, np.float32, True, 1e-12),  # whole float values
    (128.0, 20.0, np.uint8, True, 1e-12),  # quantized activations
    (0.0, 40.0, np.int32, True, 1e-12),  # exact in sub-blocks of 2621 rows (sums of squares below 2^24)
    (500.0, 2.0, np.float64, "quarter", 1e-12),  # float64 values on a ¼ grid
    (0.0, 3.0, np.float32, False, 1.5e-6),  # continuous: float32's rounding averages out (1.2e-6 seen)
])
@pytest.mark.parametrize("chunk", [1000, 4000])  # 4000: the pilot chunk and one chunk in float32
def test_float32_products_of_values_on_a_coarse_grid_are_exact(offset, spread, dtype, whole, tolerance, chunk):
    """Values on a grid coarse for their spread (integers, quantized levels, float32's own steps at a large offset)
    take few values, and float32 sums of their products are biased (each level's rounding repeats; squares of
    whole numbers are not uniform modulo a power of 2): ρ moved by 4.5e-6 to 2.6e-5, PWCCA by 2.5e-4, silently,
    "auto" keeping float32 (chunks of 8000 rows: shifting them in float64 left 5.5e-6). Shifted by a point of
    their grid, their products are whole numbers of grid steps, summed exactly in float32 (sub-blocks short enough
    for sums below 2^24), or made in float64 where that would take sub-blocks too short: ρ and CKA to rounding."""
    rng = np.random.default_rng(2)
    latent = rng.standard_normal((8000, 6))
    x0 = latent @ rng.standard_normal((6, 12)) + 0.5 * rng.standard_normal((8000, 12))
    y0 = latent @ rng.standard_normal((6, 10)) + 0.5 * rng.standard_normal((8000, 10))
    x, y = (offset + spread * v / v.std(axis=0) for v in (x0, y0))
    x, y = (np.round(v * 4) / 4 if whole == "quarter" else np.round(v) if whole else v for v in (x, y))
    x, y = x.astype(dtype), y.astype(dtype)
    a, b = da.from_array(x, chunks=chunk), da.from_array(y, chunks=chunk)
    result = cca(a, b)
    assert result.attrs["precision"] == "float32"
    np.testing.assert_allclose(result["rho"], canonical_correlations(x, y), atol=tolerance, rtol=0)
    if dtype == np.float32 and offset:
        # the grid judged per channel and on the finite rows: one channel of fine values beside the others, and a
        # NaN row in each chunk's first rows (omitted), hid the coarse ones (ρ moved by 5.3e-6 and 3.9e-6)
        fine = rng.standard_normal((8000, 1)).astype(np.float32)
        holed = np.hstack([x, fine])
        holed[::1000] = np.nan
        kept = np.isfinite(holed).all(axis=1)
        result = cca(da.from_array(holed, chunks=chunk), da.from_array(np.hstack([y, fine]), chunks=chunk),
                     precision="float32", nan_policy="omit")
        np.testing.assert_allclose(result["rho"], canonical_correlations(holed[kept], np.hstack([y, fine])[kept]),
                                   atol=1.5e-6, rtol=0)
    assert float(cka(a, b, precision="float32")["cka"]) == pytest.approx(cka_reference(x, y, debiased=False),
                                                                         abs=max(tolerance, 2e-7))


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_values_on_a_grid_after_padding_or_with_bursts_between_the_rows_sampled_are_exact(dtype):
    """The shift and grids came from each chunk's first 1024 rows: zeros there (padding) left a layer of
    128 ± 20 unshifted and its grid unseen, ρ off by 2e-4 with float32 products (found by review). They now come
    from 1024 rows spread over the chunk, and a sub-block whose grid's squares float32 would round (rows far larger
    than those sampled) is made in float64 (bursts between the sampled rows moved ρ by 2e-5)."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((32768, 6))
    x0 = latent @ rng.standard_normal((6, 12)) + rng.standard_normal((32768, 12))
    y0 = latent @ rng.standard_normal((6, 10)) + rng.standard_normal((32768, 10))
    x, y = (np.round(v / v.std(axis=0) * 20 + 128) for v in (x0, y0))
    padded_x, padded_y = x.copy(), y.copy()
    for start in range(0, 32768, 16384):
        padded_x[start : start + 1024] = padded_y[start : start + 1024] = 0
        for row in range(start + 5, start + 16384, 16):  # the rows sampled are every 16th, from the first
            x[row : row + 4] *= 40
    for a, b in ((padded_x, padded_y), (x, y)):
        a, b = a.astype(dtype), b.astype(dtype)
        result = cca(da.from_array(a, chunks=16384), da.from_array(b, chunks=16384), precision="float32")
        np.testing.assert_allclose(result["rho"], canonical_correlations(a.astype(float), b.astype(float)),
                                   atol=1e-12, rtol=0)



def test_the_rows_a_shift_is_judged_on_do_not_fall_on_one_position_of_every_map():
    """Rows taken at a fixed step (rows // 1024) fell on one position of every map of flatten's rows (8 × 8 maps in
    chunks of 1024 datapoints: all at the corner, 0 in this layer): whole numbers 128 ± 20 were shifted by 0 and
    their grid unseen, ρ off by 4.2e-6 (found by review). They are drawn at random, with a fixed seed."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((4096, 8, 8, 4))

    def layer(channels: int) -> xr.DataArray:
        values = latent @ rng.standard_normal((4, channels)) + rng.standard_normal((4096, 8, 8, channels))
        values = np.round(values / values.std() * 20 + 128)
        values[:, 0, 0, :] = 0
        return xr.DataArray(da.from_array(values.astype(np.float32), chunks=(1024, 8, 8, channels)),
                            dims=("datapoint", "height", "width", "channel"))

    x, y = layer(10), layer(8)
    result = cca(x, y, spatial="flatten", precision="float32")
    want = canonical_correlations(x.values.reshape(-1, 10).astype(float), y.values.reshape(-1, 8).astype(float))
    np.testing.assert_allclose(result["rho"], want, atol=1e-12, rtol=0)

def test_precision_auto_on_one_chunk_reports_the_float64_products_it_made():
    """The pilot chunk is computed in float64; when it is the only chunk, every product was float64."""
    x, y = _ill_conditioned(10.0)
    result = cca(x.astype(np.float32), y.astype(np.float32), precision="auto")
    assert result.attrs["precision"] == "float64"
    assert result.attrs["precision_auto"].startswith("auto: float64 products, as the pilot is the whole run "
                                                     "(float32 for the rest); the largest")
    want = canonical_correlations(x.astype(np.float32), y.astype(np.float32))
    np.testing.assert_allclose(result["rho"], want, atol=1e-10)


def _counted_layer(name: str, chunk_sizes: list[int], channels: int, reads: list[tuple[str, int]]) -> da.Array:
    """A (datapoint, 2, 2, channels) layer of the given chunk sizes whose every chunk read is logged in ``reads``."""
    def block(index: int, size: int) -> np.ndarray:
        reads.append((name, index))
        return np.random.default_rng([len(name), index]).standard_normal((size, 2, 2, channels)) + 3.0

    return da.concatenate([da.from_delayed(dask.delayed(block)(index, size), shape=(size, 2, 2, channels),
                                           dtype=float) for index, size in enumerate(chunk_sizes)])


@pytest.mark.parametrize(("chunks_a", "width_a", "chunks_b", "width_b", "stride", "pilot", "read_twice"), [
    # 24 rows: the first layer's end at 25 would cut the second layer's first chunk; at 30 all chunks end
    ([10, 15, 5, 30], 6, [30, 30], 4, 1, 30, []),
    # the widest layer is the second: 32 rows
    ([10] * 6, 3, [10] * 6, 8, 1, 40, []),
    # every second row: 24 rows from 48 datapoints
    ([10] * 6, 6, [10] * 6, 4, 2, 50, []),
    # 12 rows at 14, where all chunks end only at 84, 70 datapoints on: the second layer's chunk across 14 is
    # read again
    ([7] * 12 + [16], 3, [12] * 8 + [4], 2, 1, 14, [("bb", 1)]),
])
def test_precision_auto_pilot_holds_four_rows_per_channel_of_the_widest_layer(chunks_a, width_a, chunks_b, width_b,
                                                                             stride, pilot, read_twice):
    """avgpool gives one row per datapoint (every ``stride``-th kept). The pilot ends at the first chunk end of
    the first layer that gives 4 rows per channel of the widest layer, or at the next place where all layers'
    chunks end if that is at most the longest chunk further (then every chunk is read once)."""
    reads: list[tuple[str, int]] = []
    a = _counted_layer("a", chunks_a, width_a, reads)
    b = _counted_layer("bb", chunks_b, width_b, reads)
    result = cca(a, b, spatial="avgpool", stride=stride, precision="auto")
    assert result.attrs["precision"] == "float32"
    assert f"condition number in the first {pilot} datapoints is" in result.attrs["precision_auto"]
    want = [("a", i) for i in range(len(chunks_a))] + [("bb", i) for i in range(len(chunks_b))] + read_twice
    assert sorted(reads) == sorted(want)
    exact = cca(a, b, spatial="avgpool", stride=stride, precision="float64")
    np.testing.assert_allclose(result["rho"], exact["rho"], rtol=0, atol=1e-6)  # float32 products after the pilot


def test_precision_auto_without_a_pilot_long_enough_takes_float64_in_one_pass(capsys):
    """A layer of 40 channels needs a pilot of 160 rows; 60 datapoints of one row each never give them, so the
    run takes float64 products in one pass (no pilot pass reading the first chunks twice) and says why."""
    reads: list[tuple[str, int]] = []
    a = xr.DataArray(_counted_layer("a", [20, 20, 20], 40, reads), dims=DIMS, name="wide")
    b = _counted_layer("bb", [60], 3, reads)
    result = cca(a, b, spatial="avgpool", precision="auto", progress=True)
    assert result.attrs["precision"] == "float64"
    assert result.attrs["precision_auto"] == ("auto: float64 products, as the run's 60 rows are fewer than 4 per "
                                              "channel of layer 'wide' (40 channels), too few to show its "
                                              "conditioning")
    assert sorted(reads) == sorted([("a", 0), ("a", 1), ("a", 2), ("bb", 0)])
    assert "pass 1 of 2" not in capsys.readouterr().err
    np.testing.assert_allclose(result["rho"], cca(a, b, spatial="avgpool", precision="float64")["rho"],
                               rtol=0, atol=1e-12)


def test_sides_chunked_along_every_dim_give_the_whole_chunk_moments():
    """Stores chunked along height, width or channel too: each datapoint chunk is joined whole, as one block."""
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((30, 4, 4, 6)) + 1, rng.standard_normal((30, 4, 4, 5))
    split = cca(da.from_array(a, chunks=(7, 2, 3, 4)), da.from_array(b, chunks=(11, 4, 1, 2)), precision="float64")
    np.testing.assert_allclose(split["rho"], canonical_correlations(flatten_rows(a), flatten_rows(b)),
                               rtol=0, atol=1e-10)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_says_what_it_reads_and_writes_one_line_into_logs(capsys):
    """Not a terminal (a log, CI): one line when done, no carriage returns; a terminal: a redrawn, labelled bar."""
    from chunkcca import cca
    from chunkcca.progress import Progress

    x = da.from_array(np.random.default_rng(0).standard_normal((400, 3)), chunks=100)
    named = xr.DataArray(x, dims=("datapoint", "channel"), name="model0/fc")
    cca(named, x[:, :2] + 1, precision="float32", progress=True)
    err = capsys.readouterr().err
    assert err == f"reading 'model0/fc', 'b' (float32 products): done in {err.split('done in ')[1]}"
    assert "\r" not in err and err.count("\n") == 1
    cca(named, x[:, :2] + 1, precision="auto", progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "reading 'model0/fc', 'b', pass 1 of 2", "reading 'model0/fc', 'b', pass 2 of 2"]
    cca(named[:40], x[:40, :2] + 1, precision="auto", progress=True)  # the pilot is the whole run: one pass
    assert capsys.readouterr().err.startswith("reading 'model0/fc', 'b' (float64 products): done in ")
    terminal = _Terminal()
    with Progress("reading 'x'", out=terminal):
        x.sum().compute()
    assert terminal.getvalue().startswith("\rreading 'x': [") and "100% |" in terminal.getvalue()
    # a long label (a sweep's ten layer names) is cut to the terminal: 238-character lines wrapped on 80 columns,
    # and each \r redrew only their last row, filling the screen
    terminal = _Terminal()
    with Progress("reading " + ", ".join(f"'model{i}/conv{i}'" for i in range(20)), out=terminal):
        x.sum().compute()
    redraws = [line for line in terminal.getvalue().split("\r") if line.strip()]
    assert redraws and all(len(line.rstrip("\n")) < 80 for line in redraws)
    assert redraws[-1].startswith("reading 'model0/") and "…: [" in redraws[-1]
    # a pseudo-terminal of no size (script, some CI runners) says 0 columns: the label was cut to "…"
    terminal = _Terminal()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(terminal, "fileno", lambda: 2, raising=False)
        patch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 0)))
        with Progress("reading 'x'", out=terminal):
            x.sum().compute()
    assert terminal.getvalue().startswith("\rreading 'x': [")
    # a failure leaves its error the one line: a log's "failed after" line, a terminal's bar came before it
    def broken(block: np.ndarray) -> np.ndarray:
        raise ValueError("a chunk failed")

    for out in (io.StringIO(), _Terminal()):
        with pytest.raises(ValueError, match="a chunk failed"), Progress("reading 'x'", out=out):
            x.map_blocks(broken, meta=np.empty((0, 0))).sum().compute()
        assert out.getvalue().split("\r")[-1] == "", out.getvalue()  # nothing, or the bar wiped


def test_progress_ends_with_the_computation_and_times_it_alone():
    """Dask's bar slept out its redraw interval after the computation ended: 0.1 s more per pass (a 13 ms cca took
    113 ms with progress=True) and counted in the "done in" time. Here the interval is 30 s: nothing waits for it."""
    from chunkcca.progress import Progress

    x = da.ones(10, chunks=5)
    bar = Progress("reading 'x'", out=io.StringIO())
    bar._dt = 30.0
    started = time.perf_counter()
    with bar:
        x.sum().compute(scheduler="sync")
    assert time.perf_counter() - started < 10 and bar.last_duration < 10


def _made_on_read(array: np.ndarray, chunks: int) -> da.Array:
    """``array`` as a Dask array whose every chunk is a new array when it is read (as a store's chunks are)."""
    return da.from_array(array, chunks=(chunks, *array.shape[1:])).map_blocks(np.copy)


@pytest.mark.parametrize("chunk_b", [50, 500])
def test_chunks_are_read_as_their_chain_comes_to_them(chunk_b, monkeypatch):
    """Memory holds a few chunks, not all: each datapoint chunk is read by the task that folds it (a pool of
    Dask's size) or, on the pool chunkcca sizes, READ_AHEAD folds before, and a chunk that several folds share
    (layers chunked differently) only once the chains are near it. Reading every chunk of b ahead would hold
    its 32 MiB; the fold's arrays and the chunks read ahead are a few MiB. What reading ahead adds is at most
    what the pass says it adds (``pass_bytes``) and two chunks' worth of slack (measured: up to 1.6 chunks more,
    a chunk the scheduler is still releasing and its bookkeeping for more threads)."""
    import os
    import tracemalloc

    from chunkcca import passes
    from chunkcca.options import READ_AHEAD

    rng = np.random.default_rng(8)
    a = rng.standard_normal((4000, 16))
    b = rng.standard_normal((4000, 8, 8, 16))
    want = cka(a, b.mean(axis=(1, 2)), precision="float64")
    layer_a = xr.DataArray(_made_on_read(a, 50), dims=("datapoint", "channel"), name="a")
    layer_b = xr.DataArray(_made_on_read(b, chunk_b), dims=DIMS, name="b")
    cka(layer_a, layer_b, spatial="avgpool", precision="float64")  # what a first run imports is not traced
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # two chains, whatever the machine
    stated: list[tuple[int, int]] = []  # (chunks read ahead, bytes the pass says it holds)
    choose = passes._ahead

    def spy(reduction, sides, adapters, options, chains, scheduler, stored) -> int:
        picked = choose(reduction, sides, adapters, options, chains, scheduler, stored)
        stated.append((picked, passes.pass_bytes(sides, adapters, reduction, chains, picked, stored)))
        return picked

    monkeypatch.setattr(passes, "_ahead", spy)
    peaks = []
    for workers in (2, None):  # a pool of Dask's size reads nothing ahead
        tracemalloc.start()
        try:
            with dask.config.set(num_workers=workers):
                got = cka(layer_a, layer_b, spatial="avgpool", precision="float64")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert peaks[-1] < 16 * 2**20, peaks
        assert float(got["cka"]) == pytest.approx(float(want["cka"]), abs=1e-12)
    (none, holds), (ahead, holds_ahead) = stated
    assert (none, ahead) == (0, READ_AHEAD)
    one_chunk = 50 * (16 + 8 * 8 * 16) * 8
    assert peaks[1] - peaks[0] <= holds_ahead - holds + 2 * one_chunk, (peaks, holds, holds_ahead)


@pytest.fixture(scope="module")
def compressed_store(tmp_path_factory):
    """Two post-ReLU layers in an LZ4 store, in chunks of 8 and 4 MiB (2048 x 8x8x64 and 8x8x32 float32)."""
    import chunkcca

    a, b = correlated_layers(np.random.default_rng(3), 2048, (8, 8, 64), (8, 8, 32))
    tree = chunkcca.write_activations(tmp_path_factory.mktemp("store") / "s.zarr", {"a": a, "b": b}, chunks=512)
    return tree["a"]["activations"], tree["b"]["activations"]


def _traced_peak(run) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


#: Runs whose every pass reads the store. Before the buffers of a read were counted, each traced 54.3–54.5 MiB at
#: limits of 30 and 40 MiB (two chains or tasks planned where one fits); now 23.2–23.3 MiB alone, up to 34.8 MiB
#: while other processes ran on both cores (Dask releases a chunk later): tested at 40 MiB.
READS_FROM_A_STORE = {
    "moments (avgpool)": (lambda a, b, limit: compute_moments(a, b, spatial="avgpool", precision="float64",
                                                               memory_limit=limit)),
    "minibatch, a chunk of every layer at a time": (lambda a, b, limit: cka(a, b, minibatch=256,
                                                                          memory_limit=limit)),
    "minibatch, a layer at a time": (lambda a, b, limit: cka(a, b, spatial="avgpool", minibatch=256,
                                                           memory_limit=limit)),
}


@pytest.mark.parametrize("limit", [40])
@pytest.mark.parametrize("run", list(READS_FROM_A_STORE))
def test_memory_limit_counts_the_buffers_of_a_compressed_chunk_while_it_is_read(compressed_store, run, limit):
    """A read from a compressed store holds the chunk's stored bytes and zarr's decoded copy beside the array it
    returns (``passes.READ_BUFFERS``): every pass's budget counts them. Bound: the limit itself."""
    a, b = compressed_store
    READS_FROM_A_STORE[run](a[:600], b[:600], "1GiB")  # what a first run imports is not traced
    limit_bytes = limit * 2**20
    peak = _traced_peak(lambda: READS_FROM_A_STORE[run](a, b, limit_bytes))
    assert peak <= limit_bytes, f"{peak / 2**20:.1f} MiB traced at memory_limit={limit} MiB"


def test_a_task_reading_several_store_chunks_counts_the_buffers_of_each(compressed_store):
    """A layer opened with xarray in chunks of 1024 or 2048 datapoints over store chunks of 512: each task reads
    2 or 4 store chunks at once (zarr's concurrency), each beside its buffers. Counted once per task, such runs
    traced 93.5 MiB at a limit of 90 MiB and 108.6 at 70; now within the limit, or refused before reading where
    one task's reads do not fit."""
    path = compressed_store[0].encoding["store"]

    def opened(name: str, datapoints: int) -> xr.DataArray:
        return xr.open_zarr(f"{path}/{name}", chunks={"datapoint": datapoints}, zarr_format=3,
                            consolidated=False)["activations"].rename(name)

    a, b = opened("a", 1024), opened("b", 1024)
    compute_moments(a[:600], b[:600], spatial="avgpool", precision="float64")  # what a first run imports: untraced
    peak = _traced_peak(lambda: compute_moments(a, b, spatial="avgpool", precision="float64", memory_limit="90MiB"))
    assert peak <= 90 * 2**20, f"{peak / 2**20:.1f} MiB traced at memory_limit=90 MiB"
    with pytest.raises(ValueError, match=r"over memory_limit=70\.00 MiB"):
        compute_moments(opened("a", 2048), opened("b", 2048), spatial="avgpool", memory_limit="70MiB")


@pytest.mark.filterwarnings("ignore:The specified chunks separate the stored chunks:UserWarning")  # xarray's, meant
def test_the_buffers_of_a_read_are_counted_for_each_store_chunk_a_task_reads(tmp_path):
    """``passes.stored_of``: twice each store chunk (each shard, sharded) one task reads, up to zarr's
    ``async.concurrency`` of them; found in the graph however the array is held (inline in each task it counted
    nothing); of layers concatenated, the costliest read (the smallest store chunk's count with the largest
    chunk's bytes counted ten times it)."""
    import zarr

    import chunkcca
    from chunkcca.passes import READ_BUFFERS, stored_of

    x = np.ones((2000, 256), dtype=np.float32)
    dims = ("datapoint", "channel")
    layer = chunkcca.write_activations(tmp_path / "s.zarr", {"a": x}, chunks=500)["a"]["activations"]
    chunk = 500 * 256 * 4
    assert stored_of(layer).read == stored_of(layer.isel(datapoint=slice(25, 1500))).read == READ_BUFFERS * chunk
    assert stored_of(xr.DataArray(da.from_array(x, chunks=500), dims=dims)).read == 0  # in memory
    tall = zarr.create_array(tmp_path / "tall.zarr", shape=(2000, 256), chunks=(2000, 16), dtype="f4")
    tall[:] = x  # a task of (500, 256) reads 16 store chunks of (2000, 16): at most 10 at once
    concurrency = zarr.config.get("async.concurrency")
    assert stored_of(xr.DataArray(da.from_zarr(tall, chunks=(500, 256)), dims=dims)).read == \
        READ_BUFFERS * 2000 * 16 * 4 * min(16, concurrency)
    inline = xr.DataArray(da.from_zarr(tall, inline_array=True), dims=dims)
    assert stored_of(inline).read == READ_BUFFERS * 2000 * 16 * 4
    sharded = zarr.create_array(tmp_path / "sharded.zarr", shape=(8000, 256), chunks=(250, 256), shards=(8000, 256),
                                dtype="f4")
    assert stored_of(xr.DataArray(da.from_zarr(sharded, chunks=(8000, 256)), dims=dims)).read == \
        READ_BUFFERS * 8000 * 256 * 4
    fine = chunkcca.write_activations(tmp_path / "t.zarr", {"a": x}, chunks=5)["a"]["activations"]
    assert stored_of(xr.concat([layer, fine], dim="datapoint")).read == READ_BUFFERS * chunk
    # opened in chunks of other lengths: the reads are the opening's, whatever the layer is rechunked to after
    # (250 counted 1 store chunk a task where 4 were read at once); rows 0 to 1099 lie in 3 store chunks of 500
    def opened(datapoints: int) -> xr.DataArray:
        return xr.open_zarr(tmp_path / "s.zarr" / "a", chunks={"datapoint": datapoints}, zarr_format=3,
                            consolidated=False)["activations"]

    assert stored_of(opened(1100).chunk(datapoint=250)).read == READ_BUFFERS * chunk * 3
    small = chunkcca.write_activations(tmp_path / "u.zarr", {"a": x}, chunks=250)["a"]["activations"]
    assert stored_of(xr.open_zarr(tmp_path / "u.zarr" / "a", chunks={"datapoint": 1000}, zarr_format=3,
                                  consolidated=False)["activations"].chunk(datapoint=250)).read == \
        READ_BUFFERS * 250 * 256 * 4 * 4
    assert stored_of(small).read == READ_BUFFERS * 250 * 256 * 4
    # dims renamed since the store was written (as_activations(dims=...)): counted in the chunks it was opened in
    # (it was counted as many as zarr reads at once: ten times); zarr's dimension names may be None
    renamed = layer.rename({"datapoint": "sample", "channel": "feature"}).rename(
        {"sample": "datapoint", "feature": "channel"}).transpose("channel", "datapoint")
    assert stored_of(renamed.rename({"channel": "c", "datapoint": "d"})).read == READ_BUFFERS * chunk
    unnamed = zarr.create_array(tmp_path / "unnamed.zarr", shape=(2000, 256), chunks=(500, 256), dtype="f4",
                                dimension_names=(None, None))
    assert stored_of(xr.DataArray(da.from_zarr(unnamed), dims=dims)).read == READ_BUFFERS * chunk
    # a graph holding a pandas MultiIndex (whose .array raises) is walked past it
    index = pd.MultiIndex.from_arrays([[1, 2], [3, 4]])
    with_index = da.from_zarr(unnamed, inline_array=True).map_blocks(lambda block, index=None: block, index=index)
    assert stored_of(xr.DataArray(with_index, dims=dims)).read == READ_BUFFERS * chunk


def test_the_gram_pass_counts_the_buffers_of_a_compressed_chunk_while_it_is_read(compressed_store):
    """Exact feature CKA reads a store chunk whole however finely it cuts it: at 40 MiB these 12 MiB chunk pairs,
    their reads' buffers (24 MiB) and one datapoint's centred rows do not fit, and the run is refused before
    reading (it ran, tracing 57.4 MiB); at 60 MiB it stays within (47.5 MiB)."""
    a, b = compressed_store
    with pytest.raises(ValueError, match=r"over memory_limit=40\.00 MiB"):
        cka(a, b, spatial="features", memory_limit="40MiB")
    cka(a[:600], b[:600], spatial="features")  # what a first run imports is not traced
    peak = _traced_peak(lambda: cka(a, b, spatial="features", memory_limit="60MiB"))
    assert peak <= 60 * 2**20, f"{peak / 2**20:.1f} MiB traced at memory_limit=60 MiB"


def test_the_pilot_pass_statistics_are_not_held_beside_the_rest_of_the_run(compressed_store):
    """precision="auto" reads its first datapoints in float64, then the rest into the same statistics: the pilot's
    Moments (9.2 MiB of complex statistics per frequency here, spatial="dft") were held beside the second pass,
    whose first chain folds into a packed copy of them: 59.9 MiB traced at a limit of 57 MiB, one chain planned
    at 49 MiB; now 50.8 (the rest: Dask's and zarr's bookkeeping, traced too)."""
    import tracemalloc

    from chunkcca import passes

    a, b = compressed_store
    compute_moments(a[:600], b[:600], spatial="dft")  # what a first run imports is not traced
    peaks_at_the_check = []  # after the passes, the whole run's conditioning is checked (a solve, not a pass)
    check = passes._whole_run_precision

    def peak_then_check(*args, **kwargs):
        peaks_at_the_check.append(tracemalloc.get_traced_memory()[1])
        return check(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passes, "_whole_run_precision", peak_then_check)
        _traced_peak(lambda: compute_moments(a, b, spatial="dft", memory_limit="57MiB"))
    assert len(peaks_at_the_check) == 1 and peaks_at_the_check[0] <= 57 * 2**20, peaks_at_the_check


def _read_and_folded(layers: list[xr.DataArray], **options) -> tuple[list[tuple[str, int]], xr.Dataset]:
    """cca of ``layers`` with what happened in order: ("read", chunk) as a chunk of the first layer is read,
    ("fold", chunk) as a chain has folded it."""
    import threading

    from dask.callbacks import Callback

    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def read(block: np.ndarray, block_info=None) -> np.ndarray:
        with lock:
            events.append(("read", block_info[0]["chunk-location"][0]))
        return block.copy()

    def folded(key, result, dsk, state, worker_id) -> None:
        if isinstance(key, tuple) and key[0].startswith("chunkcca-moments-chunk-") and key[0].count("-") == 3:
            with lock:
                events.append(("fold", key[1]))

    first = layers[0].copy(data=layers[0].data.map_blocks(read, dtype=layers[0].dtype))
    with Callback(posttask=folded):
        result = cca(first, *layers[1:], **options)
    return events, result


def test_chains_read_ahead_of_their_folds_and_no_further(monkeypatch):
    """On the pool chunkcca sizes each chain reads the next READ_AHEAD chunks while it folds: chunk k is read
    once fold k − chains·(1 + READ_AHEAD) is done (and a chain's first chunks once its first is read), never
    sooner; reads do run ahead of their chain's fold; the result is that of a run that reads nothing ahead."""
    import os

    from chunkcca.options import READ_AHEAD

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    rng = np.random.default_rng(12)
    a, b = correlated_layers(rng, 1200, (4, 4, 24), (4, 4, 20), dtype=np.float64)
    layers = [xr.DataArray(x, dims=DIMS, name=name).chunk({"datapoint": 50}) for x, name in ((a, "a"), (b, "b"))]
    events, got = _read_and_folded(layers, precision="float64")
    depth = 2 * (1 + READ_AHEAD)
    for place, (what, chunk) in enumerate(events):
        done = {index for kind, index in events[:place] if kind == "fold"}
        if what == "read" and chunk >= depth:
            assert chunk - depth in done, (chunk, sorted(done))
    for far in (2, depth - 2):  # reads that ran before the fold one chunk, and READ_AHEAD chunks, before theirs
        ahead = [chunk for place, (what, chunk) in enumerate(events) if what == "read" and chunk >= far
                 and chunk - far not in {index for kind, index in events[:place] if kind == "fold"}]
        assert ahead, (far, events)
    with dask.config.set(num_workers=2):  # a pool of Dask's size: each chunk read by its fold
        events, want = _read_and_folded(layers, precision="float64")
    assert not [chunk for place, (what, chunk) in enumerate(events) if what == "read" and chunk >= 2
                and chunk - 2 not in {index for kind, index in events[:place] if kind == "fold"}]
    np.testing.assert_allclose(got["rho"], want["rho"], rtol=0, atol=1e-13)


def test_heavy_passes_and_tight_budgets_read_nothing_ahead(monkeypatch):
    """Reading ahead costs a chunk per chain and chunk read ahead: a pass whose chain holds more than
    READ_AHEAD_SHARE of memory_limit, or whose budget cannot hold the chunks ahead beside its chains, reads none
    ahead (one chain's bytes as the refusal of a smaller budget states them)."""
    import os
    import re

    from dask.utils import parse_bytes

    from chunkcca import passes
    from chunkcca.options import READ_AHEAD

    cores = [2]
    monkeypatch.setattr(os, "cpu_count", lambda: cores[0])
    chosen: list[int] = []
    choose = passes._ahead
    monkeypatch.setattr(passes, "_ahead", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    rng = np.random.default_rng(13)
    a, b = correlated_layers(rng, 1200, (4, 4, 24), (4, 4, 20), dtype=np.float64)
    layers = [xr.DataArray(x, dims=DIMS, name=name).chunk({"datapoint": 200}) for x, name in ((a, "a"), (b, "b"))]
    with pytest.raises(ValueError, match="over memory_limit") as refused:
        cca(*layers, precision="float64", memory_limit=1)
    one = parse_bytes(re.search(r"in work \(([^)]+)\)", str(refused.value)).group(1).replace(" ", ""))
    chunk = 200 * 4 * 4 * (24 + 20) * 8
    # light; a chain over 1/16 of the budget; light, but 16 chains (one per core) and no chunk more; room for
    # one chunk ahead in each of 16 chains, not two (arrays in memory: no read buffers)
    for cores[0], limit in ((2, 64 * one), (2, 8 * one), (16, 16.5 * one), (16, 16 * (one + 1.5 * chunk))):
        cca(*layers, precision="float64", memory_limit=int(limit))
    assert chosen == [READ_AHEAD, 0, 0, 1]


def test_only_the_pool_chunkcca_sizes_reads_ahead():
    """A cluster reads each chunk on the worker that folds it; the synchronous and processes schedulers and a
    pool that Dask's settings give read nothing ahead."""
    from concurrent.futures import ThreadPoolExecutor

    from chunkcca.engine import reads_ahead
    from chunkcca.options import READ_AHEAD

    assert reads_ahead() == reads_ahead("threads") == READ_AHEAD
    assert reads_ahead("synchronous") == reads_ahead("processes") == 0
    with dask.config.set(num_workers=3):
        assert reads_ahead() == 0
    with ThreadPoolExecutor(2) as pool, dask.config.set(pool=pool):
        assert reads_ahead() == 0
    with dask.config.set(scheduler="synchronous"):
        assert reads_ahead() == 0


@pytest.mark.slow
def test_wide_solves_use_every_core():
    """Dense solves of WIDE_SOLVE channels or more run BLAS on every core, smaller ones on one thread (in a fresh
    process: BLAS's thread count is the process's, which other tests' Dask threads set too)."""
    import subprocess
    import sys

    script = """
import os
import numpy, scipy.linalg  # the BLAS the solves run on, loaded as the measures load it
from threadpoolctl import threadpool_info
from chunkcca.blas import WIDE_SOLVE, solve_threads
def threads():
    return {library["num_threads"] for library in threadpool_info() if library["user_api"] == "blas"}
with solve_threads(WIDE_SOLVE):
    wide = threads()
with solve_threads(WIDE_SOLVE - 1):
    small = threads()
print(wide == {os.cpu_count()}, small == {1})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]


def test_precision_auto_judges_neither_folds_nor_groups_too_small_to_tell():
    """40 rows a fold and 32 channels: a fold alone is ill-conditioned by sampling (3.6e4), and every datapoint was
    read again in float64, though fold measures solve the rest of the run; groups under 2 rows per channel
    likewise (35 rows for 32 channels: sampling alone gives condition numbers near 2e3)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4000, 32))
    y = x[:, :8] @ rng.standard_normal((8, 6)) + rng.standard_normal((4000, 6))
    a, b = da.from_array(x, chunks=500), da.from_array(y, chunks=500)
    folds = compare(a, b, measures=["mean_cca", "heldout_cca"], folds=100)
    assert folds.attrs["precision"] == "float32" and "third pass" not in folds.attrs["precision_auto"]
    labels = ("datapoint", np.arange(4000) % 114)  # 35 or 36 rows a group, under 2 x 32
    grouped = cca(xr.DataArray(x, dims=("datapoint", "channel"), name="a", coords={"label": labels}).chunk(500),
                  xr.DataArray(y, dims=("datapoint", "channel"), name="b", coords={"label": labels}).chunk(500),
                  groupby="label")
    assert grouped.attrs["precision"] == "float32", grouped.attrs["precision_auto"]
    assert "in each group's with enough rows to tell" in grouped.attrs["precision_auto"]


def test_warnings_from_every_entry_point_name_the_users_line(tmp_path):
    """The few-rows warning, the reordering warning and the NaN CKA warnings named a line inside chunkcca (fixed
    stack levels counted from one entry point: cca's few-rows warning pointed at api.py, similarity's reordering
    warning at api.py too); now each names the user's call, whichever function it came through."""
    from chunkcca.compat import compute_pwcca
    from chunkcca.ingest import ingest

    rng = np.random.default_rng(0)
    few, base = rng.standard_normal((12, 8)), rng.standard_normal((3, 300))
    noise = rng.standard_normal((6, 300))
    layer = xr.DataArray(rng.standard_normal((64, 4, 4, 3)), dims=DIMS, coords={"datapoint": np.arange(64)})
    reordered = layer.isel(datapoint=slice(None, None, -1)).chunk({"datapoint": 16})
    dead = xr.zeros_like(layer)
    calls = {
        "few rows, cca": (lambda: cca(few, few[:, ::-1]), "only 12 rows for 16 channels"),
        "few rows, similarity": (lambda: similarity({"a": few}, {"b": few[:, ::-1]}, measures=["mean_cca"]),
                                 "only 12 rows for 16 channels"),
        "reordered, cca": (lambda: cca(layer, reordered), "in another order"),
        "reordered, similarity": (lambda: similarity({"a": layer}, {"b": reordered}, measures=["cka"]),
                                  "in another order"),
        "dead, features": (lambda: similarity({"a": layer}, {"b": dead}, measures=["cka"], spatial="features"),
                           "CKA of layer 'b' is NaN"),
        "dead, minibatch": (lambda: similarity({"a": layer}, {"b": dead}, measures=["cka"], spatial="features",
                                               minibatch=16), "minibatch CKA of layer 'b' is NaN"),
        "compat pwcca": (lambda: compute_pwcca(np.vstack([base, base]), np.vstack([base, base]) + noise),
                         "depend on earlier ones"),
    }
    np.save(tmp_path / "square.npy", rng.standard_normal((8, 8)))
    calls["ingest, neurons"] = (lambda: ingest(tmp_path / "store", {"a": tmp_path / "square.npy"}, layout="neurons"),
                                "no more datapoints than neurons")
    for what, (call, message) in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        named = [record.filename for record in caught if message in str(record.message)]
        assert named, f"{what}: no warning saying {message!r}"
        assert set(named) == {__file__}, f"{what}: the warning names {named}"


def test_a_store_backed_pass_reads_ahead_and_a_reordered_layer_does_not(tmp_path, monkeypatch):
    """A pass reads nothing ahead where a read feeds folds far apart (a layer reordered by label); the array
    object every read of a store takes is data, not such a read: counted as one, it turned reading ahead off
    for every store of more than six chunks. Finding those reads walks each task once (shared tasks walked once
    per fold took 65 s for 4000 chunks of ``x - x.mean(0)`` before the pass began)."""
    import chunkcca
    from chunkcca import engine

    kept: list[int] = []
    real = engine._kept_ahead
    monkeypatch.setattr(engine, "_kept_ahead", lambda *args: kept.append(real(*args)) or kept[-1])
    rng = np.random.default_rng(0)
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((4000, 8)),
                                                             "b": rng.standard_normal((4000, 8))}, chunks=100)
    cka(tree["a"], tree["b"])
    assert kept and min(kept) > 0, kept
    kept.clear()
    with pytest.warns(da.PerformanceWarning, match="in another order"):
        cka(tree["a"], tree["b"]["activations"].isel(datapoint=rng.permutation(4000)))
    assert kept[-1] == 0, kept
    x = da.ones((40000, 4), chunks=10)
    centred = x - x.mean(0)
    dsk = engine.convert_legacy_graph(dict(centred.__dask_graph__()))
    folds = list(dask.core.flatten(centred.__dask_keys__()))
    spans = engine._fold_spans(dsk, folds, set(folds))
    assert max(last - first for first, last in spans.values()) == len(folds) - 1  # the mean feeds every fold


@pytest.mark.slow
def test_local_schedulers_run_without_importing_distributed():
    """Dask's lookup of a scheduler by name imports distributed (0.15 s a process, and its imports inside a caller's
    memory trace: a minibatch memory test saw 20 to 99 MiB of them); a local one runs by its function."""
    import subprocess
    import sys

    code = ("import sys, dask, numpy as np, chunkcca\n"
            "x = np.random.default_rng(0).standard_normal((40, 3))\n"
            "for scheduler in (None, 'threads', 'synchronous', 'sync', 'single-threaded'):\n"
            "    chunkcca.cca(x, x[:, :2], scheduler=scheduler)\n"
            "    chunkcca.cka(x, x[:, :2], minibatch=10, scheduler=scheduler)\n"
            "with dask.config.set(scheduler='synchronous'):\n"
            "    chunkcca.cca(x, x[:, :2])\n"
            "assert 'distributed' not in sys.modules, 'distributed was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_a_memory_limit_just_too_small_says_by_how_much():
    """A limit 1664 bytes under what a run holds was refused as "holds … (48.00 MiB), over memory_limit=48.00 MiB",
    the two alike (found by audit): where Dask's words read alike, both are given in bytes."""
    from chunkcca.options import held_and_limit

    assert held_and_limit(48 * 2**20 + 1664, 48 * 2**20) == ("50,333,312 bytes", "50,331,648 bytes")
    assert held_and_limit(50 * 2**20, 48 * 2**20) == ("50.00 MiB", "48.00 MiB")
    x = da.random.RandomState(0).normal(size=(4000, 64), chunks=(1000, 64))
    low, high = 1, 2**30  # the least limit the run fits: refused just under it, in bytes

    def fits(limit: int) -> bool:
        try:
            compute_moments(x, x[:, :32] + 1, memory_limit=limit, precision="float64")
            return True
        except ValueError as error:
            assert "over memory_limit" in str(error)
            return False

    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    with pytest.raises(ValueError, match=rf"over memory_limit={low:,} bytes; raise memory_limit"):
        compute_moments(x, x[:, :32] + 1, memory_limit=low, precision="float64")
    # pairing a layer held in another order by label holds 3 times its size, checked against half the limit
    rng = np.random.default_rng(0)
    a = xr.DataArray(rng.standard_normal((2000, 16)), dims=("datapoint", "channel"), name="a",
                     coords={"datapoint": np.arange(2000)})
    b = xr.DataArray(da.from_array(rng.standard_normal((2000, 8)), chunks=(500, 8)), dims=("datapoint", "channel"),
                     name="b", coords={"datapoint": rng.permutation(2000)})
    with pytest.raises(ValueError, match=r"in memory \(384,000 bytes\), over half of memory_limit=767,998 bytes "):
        cca(a, b, memory_limit=2 * 384000 - 2)
