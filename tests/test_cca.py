"""chunkcca.cca against an in-memory float64 QR-based computation, across chunkings, strides, dtypes."""

from __future__ import annotations

import hashlib
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import correlated_layers
from dask.array import PerformanceWarning
from reference import avgpool_rows, canonical_correlations, flatten_rows

import chunkcca
from chunkcca import Moments, cca, cca_from_moments, compute_moments, pwcca

#: Tolerances on ρ. float64 products: the covariance route squares the condition number of the
#: centred data (about 10 here), so 1e-10 leaves four orders of magnitude of margin over the
#: ~1e-14 seen. float32 products: shifted values rounded to float32 (6e-8 relative) summed in
#: float32 over 8192-row sub-blocks give ~1e-7 typical, 7e-7 worst seen; 3e-6 bounds it.
RTOL = {"float64": 1e-10, "float32": 3e-6}


@pytest.fixture(scope="module")
def conv_pair():
    return correlated_layers(np.random.default_rng(7), 60, (5, 6, 7), (5, 6, 5))


@pytest.mark.parametrize("chunk", [7, 25, 60])
@pytest.mark.parametrize("stride", [1, 2, 5])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_flatten_matches_in_memory(conv_pair, chunk, stride, precision):
    a, b = conv_pair
    result = cca(da.from_array(a, chunks=(chunk, -1, -1, -1)), da.from_array(b, chunks=(chunk // 2 + 1, -1, -1, -1)),
                 stride=stride, precision=precision)
    want = canonical_correlations(flatten_rows(a, stride), flatten_rows(b, stride))
    np.testing.assert_allclose(result["rho"], want, rtol=0, atol=RTOL[precision])
    assert int(result["rows"]) == flatten_rows(a, stride).shape[0]
    assert result.attrs["stride"] == stride and result.attrs["precision"] == precision


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int16, np.uint8])
def test_input_dtypes(dtype):
    a, b = correlated_layers(np.random.default_rng(1), 50, (3, 3, 4), (3, 3, 3), dtype=np.float64)
    a, b = (np.round(x * 20).astype(dtype) if np.dtype(dtype).kind in "iu" else x.astype(dtype) for x in (a, b))
    result = cca(a, b, precision="float64")
    want = canonical_correlations(flatten_rows(a), flatten_rows(b))
    np.testing.assert_allclose(result["rho"], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 3])
def test_avgpool_compares_different_spatial_sizes(stride):
    a, b = correlated_layers(np.random.default_rng(2), 90, (6, 6, 4), (3, 3, 5))
    result = cca(da.from_array(a, chunks=(13, -1, -1, -1)), b, spatial="avgpool", stride=stride, precision="float64")
    want = canonical_correlations(avgpool_rows(a, stride), avgpool_rows(b, stride))
    np.testing.assert_allclose(result["rho"], want, rtol=0, atol=1e-10)
    assert int(result["rows"]) == len(range(0, 90, stride))


def _with_known_correlations(rho: np.ndarray, n: int, p: int, q: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x (n, p), y (n, q) whose sample canonical correlations are exactly ``rho`` (then zeros)."""
    rng = np.random.default_rng(seed)
    k = rho.size
    basis, _ = np.linalg.qr(np.column_stack([np.ones(n), rng.standard_normal((n, p + q))]))
    u, w = basis[:, 1 : p + 1], basis[:, p + 1 :]
    x = u @ rng.standard_normal((p, p)) + 3.0
    y_latent = np.column_stack([u[:, :k] * rho + w[:, :k] * np.sqrt(1 - rho**2), w[:, k:q]])
    return x, y_latent @ rng.standard_normal((q, q)) - 1.0


def test_recovers_known_canonical_correlations():
    rho = np.array([0.99, 0.9, 0.5, 0.1])
    x, y = _with_known_correlations(rho, 3000, 6, 5, seed=3)
    result = cca(da.from_array(x, chunks=400), da.from_array(y, chunks=700), precision="float64")
    np.testing.assert_allclose(result["rho"], np.r_[rho, 0.0], atol=1e-10)


def test_coefficients_give_unit_variance_variates_with_correlations_rho(conv_pair):
    a, b = (flatten_rows(x) for x in conv_pair)
    result = cca(a, b, precision="float64")
    va = (a - a.mean(axis=0)) @ result["coef_a"].values
    vb = (b - b.mean(axis=0)) @ result["coef_b"].values
    cross = va.T @ vb / (a.shape[0] - 1)
    np.testing.assert_allclose(va.T @ va / (a.shape[0] - 1), np.eye(va.shape[1]), atol=1e-9)
    np.testing.assert_allclose(np.diag(cross), result["rho"], atol=1e-9)
    np.testing.assert_allclose(cross - np.diag(np.diag(cross)), 0, atol=1e-9)


def test_dft_coefficients_give_the_variates_of_the_documented_formula(conv_pair):
    """Per frequency, (x − mean) · coef (x the complex spectrum at that frequency) are unit-variance variates whose
    cross-covariance is diag(ρ). The coefficients were the conjugates of those (variates x · conj(coef)), so the
    documented formula gave variances 0.97–1 and correlations off ρ (0.694 for 0.705), silently; at frequency
    (0, 0), where they are real, it held."""
    a, b = conv_pair
    result = cca(a, b, spatial="dft", precision="float64")
    spectra = [np.fft.fft2(x.astype(np.float64), axes=(1, 2)) for x in (a, b)]  # both 5 x 6 maps
    checked = 0
    for fh, fw in [(1, 1), (1, 0), (0, 1), (-1, 1)]:
        at = result.sel(freq_h=fh, freq_w=fw)
        variates = []
        for spectrum, coef in zip(spectra, (at["coef_a"], at["coef_b"])):
            x = spectrum[:, fh % spectrum.shape[1], fw % spectrum.shape[2]]
            variates.append((x - x.mean(axis=0)) @ coef.values)
        va, vb = variates
        n = a.shape[0] - 1
        np.testing.assert_allclose(va.conj().T @ va / n, np.eye(va.shape[1]), atol=1e-12)
        cross = va.conj().T @ vb / n
        np.testing.assert_allclose(cross, np.diag(at["rho"].values), atol=1e-12)  # float64 all through
        checked += 1
    assert checked == 4


def test_invariant_to_invertible_linear_maps(conv_pair):
    a, b = (flatten_rows(x) for x in conv_pair)
    rng = np.random.default_rng(4)
    mixed = cca(a @ rng.standard_normal((7, 7)) + 10, b * [1e-3, 1, 5, 1e2, 7], precision="float64")
    np.testing.assert_allclose(mixed["rho"], cca(a, b, precision="float64")["rho"], atol=1e-9)


def test_labelled_layers_align_by_datapoint_label(conv_pair):
    a, b = conv_pair
    dims = ("datapoint", "height", "width", "channel")
    layer_a = xr.DataArray(a, dims=dims, coords={"datapoint": np.arange(60)}, name="net0/conv")
    order = np.random.default_rng(5).permutation(60)
    layer_b = xr.DataArray(b[order], dims=dims, coords={"datapoint": order}, name="net1/conv")
    with pytest.warns(PerformanceWarning, match="holds the datapoints of layer 'net0/conv' in another order"):
        result = cca(layer_a, layer_b.chunk({"datapoint": 11}), precision="float64")
    want = canonical_correlations(flatten_rows(a), flatten_rows(b))
    np.testing.assert_allclose(result["rho"], want, atol=1e-10)
    assert result.attrs["layer_a"] == "net0/conv" and result.attrs["layer_b"] == "net1/conv"


def test_a_reordering_over_memory_limit_is_refused_before_anything_is_read():
    """Reordering a layer by label holds it in memory (Dask's take holds each of its chunks until every fold has its
    piece): a 256 MiB layer in random order peaked at 17 GB, and 0.97 GB reading nothing ahead. Where
    ``REORDER_HOLDS`` times the layers reordered is over half of ``memory_limit`` (the pass plans within it
    besides), the run is refused before any read, naming them; under it, it runs and the warning says what it
    holds."""
    from chunkcca.layers import REORDER_HOLDS

    def never_read(block: np.ndarray) -> np.ndarray:
        raise AssertionError("a block was read")

    rng = np.random.default_rng(0)
    order = rng.permutation(4096)
    unread = da.zeros((4096, 64), chunks=512).map_blocks(never_read, dtype=float)  # 2 MiB
    a = xr.DataArray(unread, dims=("datapoint", "channel"), coords={"datapoint": np.arange(4096)}, name="a")
    b, c = ((a + shift).assign_coords(datapoint=order).rename(name) for shift, name in ((0, "b"), (1, "c")))
    with warnings.catch_warnings():  # refused without the warning that the run holds it (two lines of a command)
        warnings.simplefilter("error", PerformanceWarning)
        with pytest.raises(ValueError, match=rf"layer 'b' holds the datapoints of layer 'a' in another order: pairing "
                                             rf"them by label holds about {REORDER_HOLDS} times its size in memory "
                                             rf"\(6.00 MiB\), over half of memory_limit=10.00 MiB \(the pass plans "
                                             rf"within it besides\); store the layers in one order"):
            chunkcca.cka(a, b, memory_limit="10MiB")
        with pytest.raises(ValueError, match=r"layers 'b', 'c' hold the datapoints of layer 'a' in another order: .* "
                                             r"\(12.00 MiB\), over half of memory_limit=20.00 MiB"):
            chunkcca.similarity({"a": a, "d": (a + 2).rename("d")}, {"b": b, "c": c}, measures=["cka"],
                                memory_limit="20MiB")
    x = rng.standard_normal((4096, 64))
    given = xr.DataArray(x, dims=("datapoint", "channel"), coords={"datapoint": np.arange(4096)}, name="a")
    shuffled = given.isel(datapoint=order).rename("b")
    with pytest.warns(PerformanceWarning, match=r"holds up to about 3 times layer 'b' in memory \(6.00 MiB\)"):
        assert float(chunkcca.cka(given, shuffled, memory_limit="32MiB")["cka"]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.slow
def test_a_layer_in_random_order_holds_a_few_times_its_size_not_every_piece_at_once(tmp_path):
    """Reading a store's chunks ahead of their folds held every piece Dask's take cut from them for later folds:
    536 MiB traced for an 8 MiB layer in random order over 128 chunks (17 GB RSS for 256 MiB), 95 MiB reading
    nothing ahead, which a pass now does when a read feeds folds far apart. What is left is the chunks held and the
    take's bookkeeping (16,000 tasks for 128 chunks); the bound, 24 times the layer (192 MiB), sits between."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16384, 128)).astype(np.float32)
    layer = chunkcca.write_activations(tmp_path / "s.zarr", {"a": x}, chunks=128)["a"]["activations"]
    shuffled = layer.isel(datapoint=rng.permutation(16384)).rename("b")
    tracemalloc.start()
    try:
        with pytest.warns(PerformanceWarning, match="in another order"):
            result = chunkcca.cka(layer, shuffled)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert float(result["cka"]) == pytest.approx(1.0, abs=1e-6)  # float32 products
    assert peak < 24 * x.nbytes, f"{peak / 2**20:.1f} MiB traced for a {x.nbytes / 2**20:.0f} MiB layer"


def test_labels_on_one_side_only_are_an_error_unless_they_are_the_positions(conv_pair, tmp_path):
    """A layer labelled in a shuffled order beside one without labels (a store plain xarray wrote) was paired by
    position, silently (mean ρ 0.11 for 0.84). Labels 0 … N − 1 in order pair as position does."""
    a, b = conv_pair
    dims = ("datapoint", "height", "width", "channel")
    order = np.random.default_rng(5).permutation(60)
    shuffled = xr.DataArray(a[order], dims=dims, coords={"datapoint": order}, name="net0/conv")
    xr.Dataset({"activations": (dims, b)}).chunk(datapoint=20).to_zarr(tmp_path / "plain.zarr", group="net1/conv",
                                                                       zarr_format=3, consolidated=False)
    unlabelled = chunkcca.open_activations(tmp_path / "plain.zarr")["net1/conv"]
    for first, second in ((shuffled, unlabelled), (unlabelled, shuffled), (shuffled, b)):
        with pytest.raises(ValueError, match=r"layer 'net0/conv' labels its datapoints \(e.g. \[\d+, \d+, \d+\]\) and "
                                             r"layer '(net1/conv|b)' does not .* by position would ignore"):
            cca(first, second)
    want = canonical_correlations(flatten_rows(a), flatten_rows(b))
    in_order = shuffled.sortby("datapoint")
    np.testing.assert_allclose(cca(in_order, unlabelled, precision="float64")["rho"], want, atol=1e-10)
    np.testing.assert_allclose(cca(in_order, b, precision="float64")["rho"], want, atol=1e-10)
    # chunkcca's own store of a layer given without labels (here in the shuffled layer's row order) holds its
    # positions as labels, marked so: the shuffled layer was reordered to them, as if they were its labels (mean ρ
    # 0.06 for 0.44, silently). Written again from the store, the mark stays; given labels, it pairs by them.
    written = chunkcca.write_activations(tmp_path / "written.zarr", {"net1/conv": xr.DataArray(b[order], dims=dims)},
                                         chunks=20)["net1/conv"]
    again = chunkcca.write_activations(tmp_path / "again.zarr", {"net1/conv": written})["net1/conv"]
    for plain in (written, again):
        with pytest.raises(ValueError, match=r"layer 'net0/conv' labels its datapoints .* and layer 'net1/conv' "
                                             r"does not .*`chunkcca ingest --datapoints FILE` for files"):
            cca(shuffled, plain)
        rho = cca(shuffled.drop_vars("datapoint"), plain, precision="float64")["rho"]
        np.testing.assert_allclose(rho, want, atol=1e-10)
    given = written["activations"].assign_coords(datapoint=order)
    np.testing.assert_allclose(cca(shuffled, given, precision="float64")["rho"], want, atol=1e-10)
    # a sweep checks each pair it solves: aligned through a first layer labelled 0 … N − 1, the shuffled layer met
    # the unlabelled one unchecked (CKA 0.006 for 0.80, found by review)
    with pytest.raises(ValueError, match=r"layer 'net0/conv' labels its datapoints .* and layer 'net1/conv' does not"):
        chunkcca.similarity({"first": in_order.rename("first"), "net0/conv": shuffled}, {"net1/conv": written},
                            measures=["cka"])
    # a selection of a layer stored without labels is no labelled layer: said so beside an array
    with pytest.raises(ValueError, match=r"layer 'net1/conv' holds the datapoints at positions \[10, 11, 12\], … of "
                                         r"its store \(a selection or reordering of a layer stored without labels\)"):
        cca(written["activations"].isel(datapoint=slice(10, 30)), b[10:30])
    # and written to another store, its positions there are labels (which of the first store's datapoints it
    # holds): beside that store's own positions they were taken for them (CKA 0.013 for 0.574; found by review)
    moved = chunkcca.write_activations(tmp_path / "moved.zarr", {
        "net1/conv": written["activations"].isel(datapoint=np.argsort(order)),  # b's rows in order
        "plain": xr.DataArray(a, dims=dims)})
    assert "chunkcca_positions" not in moved["net1/conv"]["datapoint"].attrs
    with pytest.raises(ValueError, match=r"layer 'net1/conv' labels its datapoints .* and layer 'plain' does not"):
        cca(moved["net1/conv"], moved["plain"])
    # two selections of layers stored without labels that hold other positions: said so, not "labels differ"
    plain = chunkcca.write_activations(tmp_path / "plain2.zarr", {"net0/conv": xr.DataArray(a, dims=dims)})
    with pytest.raises(ValueError, match=r"^datapoint positions differ \(both layers were stored without datapoint "
                                         r"labels, so they pair by their positions in their stores\): 10 of layer "
                                         r"'net0/conv' are not in layer 'net1/conv' \(e.g. \[0, 1, 2, 3, 4\]\)"):
        cca(plain["net0/conv"]["activations"].isel(datapoint=slice(0, 20)),
            written["activations"].isel(datapoint=slice(10, 30)))
    # a sweep aligns each layer to its first by label, checking only the pairs it solves: a layer without labels
    # beside a shuffled one on the same side (never paired with it) was refused (found by review)
    labelled_b = xr.DataArray(b, dims=dims, coords={"datapoint": np.arange(60)})
    swept = chunkcca.similarity({"first": a, "net0/conv": shuffled}, {"net1/conv": labelled_b},
                                measures=["mean_cca"], precision="float64")
    np.testing.assert_allclose(swept["mean_cca"].values.ravel(), [want.mean(), want.mean()], atol=1e-10)
    # the same data labelled 0 … N − 1 is another layer than the positions layer (xarray's equality leaves the mark
    # aside): a sweep took one for the other, and paired the shuffled layer with the positions layer (found by review)
    relabelled = written["activations"].assign_coords(datapoint=np.arange(60))
    with pytest.raises(ValueError, match=r"layer 'net0/conv' labels its datapoints .* and layer 'net1/conv' does not"):
        chunkcca.similarity({"relabelled": relabelled, "net0/conv": shuffled}, {"net1/conv": written},
                            measures=["cka"])


def test_mismatched_datapoints_are_an_error_naming_both_layers(conv_pair):
    a, b = conv_pair
    dims = ("datapoint", "height", "width", "channel")
    layer_a = xr.DataArray(a, dims=dims, coords={"datapoint": np.arange(60)}, name="net0/conv")
    layer_b = xr.DataArray(b, dims=dims, coords={"datapoint": np.arange(1, 61)}, name="net1/conv")
    with pytest.raises(ValueError, match=r"1 of layer 'net0/conv' are not in layer 'net1/conv' \(e.g. \[0\]\)"):
        cca(layer_a, layer_b)
    # a subset names only what is missing (it said "and 0 of layer 'net1/conv' are not in ... (e.g. [])") and
    # how to compare what both hold; layers that share nothing are not told to align
    subset = layer_b.isel(datapoint=slice(0, 50))
    with pytest.raises(ValueError, match=r"datapoint labels differ: 10 of layer 'net0/conv' are not in layer "
                                         r"'net1/conv' \(e.g. \[0, 51, 52, 53, 54\]\); to compare the datapoints both "
                                         r"hold, select them in both: a.sel\(datapoint=shared\) and b.sel.*"
                                         r"intersect1d.*; no "):
        cca(layer_a, subset)
    with pytest.raises(ValueError, match=r"datapoint labels differ: 60 of layer 'net0/conv' .* \(e.g. \[0, 1, 2, 3, 4"
                                         r"\]\) and 60 of layer 'net1/conv' .* \(e.g. \[100, 101, 102, 103, 104\]\); "
                                         r"no datapoint"):
        cca(layer_a, layer_b.assign_coords(datapoint=np.arange(100, 160)))
    shared = np.intersect1d(layer_a.datapoint, subset.datapoint)
    np.testing.assert_allclose(cca(layer_a.sel(datapoint=shared), subset.sel(datapoint=shared),
                                   precision="float64")["rho"],
                               canonical_correlations(flatten_rows(a[1:51]), flatten_rows(b[:50])), atol=1e-10)
    with pytest.raises(ValueError, match="layer 'a' has 60 datapoints but layer 'b' has 59"):
        cca(a, b[:59])
    repeated = layer_b.assign_coords(datapoint=np.r_[np.arange(59), 0])
    with pytest.raises(ValueError, match=r"layer 'net1/conv' has repeated datapoint labels, e.g. \[0\]"):
        cca(layer_a, repeated)
    channels = layer_b.assign_coords(channel=["relu", "gelu", "relu", "tanh", "gelu"][: b.shape[-1]])
    with pytest.raises(ValueError, match=r"layer 'net1/conv' has repeated channel labels, e.g. \['relu'(, 'gelu')?\]; "
                                         r"give each channel its own label, or drop them"):
        cca(layer_a, channels)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stride": 0}, "stride must be an integer >= 1, got 0"),
        ({"stride": 1.5}, "stride must be an integer >= 1, got 1.5"),
        ({"epsilon": -1e-3}, "epsilon must be a finite number >= 0, got -0.001"),
        ({"epsilon": float("nan")}, "epsilon must be a finite number >= 0"),
        ({"spatial": "pool"},
         "spatial must be one of 'flatten', 'avgpool', 'interp', 'dft', 'first', 'last', 'features', got 'pool'"),
        ({"spatial": "interp", "method": "spline"}, "method must be one of 'linear', 'nearest', 'cubic', got 'spline'"),
        ({"spatial": "interp", "grid": "pixels"}, "grid must be one of 'coords', 'svcca', got 'pixels'"),
        ({"precision": "float16"}, "precision must be one of 'float32', 'float64', 'auto', got 'float16'"),
    ],
)
def test_bad_options_are_rejected_before_streaming(conv_pair, options, message):
    def never(*args):
        raise AssertionError("streaming started")

    a = da.map_blocks(never, da.zeros((60, 5, 6, 7), chunks=30), dtype=float)
    with pytest.raises(ValueError, match=message):
        cca(a, conv_pair[1], **options)


def test_flatten_of_different_spatial_sizes_names_both_and_suggests_avgpool():
    a = xr.DataArray(np.zeros((4, 16, 16, 2)), dims=("datapoint", "height", "width", "channel"), name="conv2")
    b = xr.DataArray(np.zeros((4, 8, 8, 2)), dims=("datapoint", "height", "width", "channel"), name="pool2")
    message = (r"layer 'conv2' is 16x16 \(height, width\) and layer 'pool2' is 8x8 \(height, width\); use "
               r"spatial='avgpool' \(--spatial avgpool: any positions\), or 'interp' or 'dft'")
    with pytest.raises(ValueError, match=message):
        cca(a, b)


def test_zero_variance_channels_are_pruned_and_reported(conv_pair):
    a, b = (flatten_rows(x) for x in conv_pair)
    a = a.copy()
    a[:, 2] = 3.25
    result = cca(a, b, precision="float32")
    assert result["pruned_a"].values.tolist() == [False, False, True, False, False, False, False]
    assert not result["pruned_b"].any()
    assert int(result["rank_a"]) == 6
    np.testing.assert_allclose(result["rho"], canonical_correlations(np.delete(a, 2, axis=1), b), atol=RTOL["float32"])
    np.testing.assert_array_equal(result["coef_a"].sel(channel_a=2), 0)


def test_rank_deficiency_is_reported_not_hidden():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((500, 3))
    a = np.column_stack([x, x[:, 0] + x[:, 1]])
    b = x @ rng.standard_normal((3, 4)) + 0.1 * rng.standard_normal((500, 4))
    result = cca(a, b, precision="float64")
    assert int(result["rank_a"]) == 3 and int(result["rank_b"]) == 4
    assert np.all(np.isfinite(result["rho"]))
    assert float(result["rho"][3]) < 1e-6
    np.testing.assert_allclose(result["rho"][:3], canonical_correlations(x, b)[:3], atol=1e-9)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_directions_beyond_the_rank_are_neither_correlations_nor_weights(precision):
    """A linear layer of 8 channels and rank 4: 4 canonical directions, whatever the product precision
    (float32 rounding must not pass for extra dimensions); PWCCA weights only those (a rank-revealing
    QR reference)."""
    from reference import pwcca_reference

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 4))
    a = x @ rng.standard_normal((4, 8)) + 3
    b = x @ rng.standard_normal((4, 8)) + 2 * rng.standard_normal((400, 8))
    tolerance = 1e-9 if precision == "float64" else RTOL["float32"]
    with warnings.catch_warnings():  # float32 warns that it cannot tell the missing directions from rounding
        warnings.simplefilter("ignore")
        result = cca(a, b, precision=precision)
        got = pwcca(a, b, precision=precision)
    assert int(result["rank_a"]) == 4 and int(result["rank_b"]) == 8
    np.testing.assert_array_equal(result["rho"][4:], 0)
    np.testing.assert_array_equal(result["coef_a"][:, 4:], 0)
    np.testing.assert_allclose(result["rho"][:4], canonical_correlations(a, b)[:4], atol=tolerance)
    want, weights, _ = pwcca_reference(a, b)
    np.testing.assert_allclose(got["weights"][:4], weights, atol=tolerance)
    np.testing.assert_array_equal(got["weights"][4:], 0)
    assert float(got["pwcca"]) == pytest.approx(want, abs=tolerance)


def test_correlations_rounded_past_one_are_one():
    """Rounding can put a covariance's cross term past the product of the standard deviations."""
    cov = np.array([[1.0, 1.0 + 1e-7], [1.0 + 1e-7, 1.0]])
    result = cca_from_moments(Moments(10, np.zeros(2), cov * 9, sizes=(1, 1)))
    assert float(result["rho"][0]) == 1.0


def test_fewer_rows_than_channels_warns_for_measures_that_invert_a_covariance():
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((6, 8)), rng.standard_normal((6, 3))
    with pytest.warns(RuntimeWarning, match="only 6 rows for 11 channels of a pair"):
        cca(x, y)
    with warnings.catch_warnings():  # CKA and Procrustes invert none: their values stand ("correlations are
        warnings.simplefilter("error")  # meaningless" was said of them too)
        chunkcca.compare(x, y, measures=["cka", "procrustes"])
        chunkcca.compare(x, y, measures=["procrustes", "shape"], alpha=1.0)  # nor the shape metric at alpha 1,
        chunkcca.similarity({"x": x}, {"y": y}, measures=["shape"])  # its default (found by audit)
        chunkcca.shape_metric(x, y)
    with pytest.warns(RuntimeWarning, match="only 6 rows for 11 channels of a pair"):
        chunkcca.shape_metric(x, y, alpha=0.0)


def test_the_rows_left_after_omission_and_padding_are_checked_as_the_rows_before():
    """The check of rows against channels counted the rows before the pass: with rows left out by
    nan_policy="omit" or padding, 2 rows of 2 + 2 channels gave mean ρ 0.5 and SVCCA 1.0, 15 rows of 10 + 10
    channels ρ = 1, 1, 1, …, silently. Now the rows the Moments hold are checked again after the pass."""
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((40, 10)), rng.standard_normal((40, 10))
    x[:25, 3] = np.nan
    with pytest.warns(RuntimeWarning, match=r"^only 15 rows for 20 channels of a pair: 25 of the 40 rows of layers "
                                            r"'a', 'b' were left out as holding NaN or Inf \(nan_policy='omit'\); "
                                            r"the covariance is singular"):
        cca(x, y, nan_policy="omit")
    with pytest.warns(RuntimeWarning, match=r"^only 15 rows for 20 channels of a pair: 25 of the 40 rows"):
        chunkcca.similarity({"a": x}, {"b": y}, measures=["mean_cca"], nan_policy="omit")
    x[:39, 3] = np.nan
    with pytest.raises(ValueError, match=r"^39 of the 40 rows of layers 'a', 'b' were left out as holding NaN or "
                                         r"Inf \(nan_policy='omit'\): 1 is left, and every measure needs at least 2"):
        chunkcca.cka(x, y, nan_policy="omit")
    with pytest.warns(RuntimeWarning, match=r"^only 1 row for 20 channels"):  # Moments to merge may hold one row
        assert chunkcca.compute_moments(x, y, nan_policy="omit").n == 1
    x[:, 3] = 0.0
    x[:5, 3] = np.nan  # 35 rows of 20 channels are left: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cca(x, y, nan_policy="omit")
        chunkcca.compare(x, y, measures=["cka", "procrustes"], nan_policy="omit")  # they invert no covariance
    tokens = xr.DataArray(rng.standard_normal((8, 6, 5)), dims=("datapoint", "token", "channel"))
    mask = np.zeros((8, 6), dtype=bool)
    mask[:, :1] = True  # 8 real rows of 48
    padded = tokens.assign_coords(mask=(("datapoint", "token"), mask))
    with pytest.warns(RuntimeWarning, match=r"^only 8 rows for 10 channels of a pair: 40 of the 48 rows of layers "
                                            r"'a', 'b' were left out as padding; "):
        cca(padded.rename("a"), padded.rename("b") + rng.standard_normal(padded.shape))
    with pytest.warns(RuntimeWarning, match=r"left out as padding or as holding NaN or Inf \(nan_policy='omit'\);"):
        cca(padded.rename("a"), padded.rename("b") + 1.0, nan_policy="omit")  # either may have left them out
    with warnings.catch_warnings():  # avgpool keeps a row a datapoint: padding leaves none out
        warnings.simplefilter("error")
        pooled = tokens.assign_coords(mask=(("datapoint", "token"), np.ones((8, 6), dtype=bool)))
        chunkcca.cka(pooled.rename("a"), pooled.rename("b") + 1.0, spatial="avgpool")


def test_an_unnamed_dask_backed_data_array_takes_the_default_name():
    """xarray names a DataArray made from a Dask array after the array's key ('array-78735f9f…'), which errors,
    results and Moments then carried as the layer's name."""
    rng = np.random.default_rng(13)
    a = xr.DataArray(da.from_array(rng.standard_normal((40, 3))), dims=("datapoint", "channel"))
    assert a.name is not None and a.name.startswith("array-")
    b = np.asarray(rng.standard_normal((40, 2)))
    assert (cca(a, b).attrs["layer_a"], chunkcca.compute_moments(a, b).layers) == ("a", ("a", "b"))
    assert cca(a.rename("conv1"), b).attrs["layer_a"] == "conv1"  # a name of the user's own stands
    assert cca((a * 2).chunk({"datapoint": 20}), b).attrs["layer_a"] == "a"  # the key kept through arithmetic
    own = xr.DataArray(da.from_array(rng.standard_normal((40, 3)), name="conv2"), dims=("datapoint", "channel"))
    assert cca(own, b).attrs["layer_a"] == "conv2"  # the Dask array's name the user gave
    for keyed in (da.from_array(rng.standard_normal((40, 3)), name=False),  # a UUID for a key
                  da.from_array(rng.standard_normal((40, 3)), name="xarray-conv(1)-" + "0123456789abcdef" * 2)):
        assert cca(xr.DataArray(keyed, dims=("datapoint", "channel")), b).attrs["layer_a"] == "a"


def test_unlabelled_layers_of_two_stores_joined_are_told_to_drop_their_positions(tmp_path):
    """Layers of two stores written without labels, joined with xr.concat, repeat the positions the stores gave
    them (0, 1, …): refused as repeated labels, which they are not (found by audit); the message says so and how
    to pair them by position."""
    x = np.random.default_rng(32).standard_normal((30, 3))
    halves = [chunkcca.write_activations(tmp_path / f"{name}.zarr", {"fc": x * scale})["fc"]["activations"]
              for name, scale in (("first", 1), ("second", 2))]
    joined = xr.concat(halves, "datapoint")
    with pytest.raises(ValueError, match=r"layer 'fc' has repeated datapoint labels, e.g. \[0, 1, 2, 3, 4\]; these are "
                                         r"not labels but each datapoint's position in a store written without "
                                         r"labels.*layer\.drop_vars\('datapoint'\)"):
        chunkcca.cka(joined, joined)
    by_position = joined.drop_vars("datapoint")
    assert chunkcca.cka(by_position, by_position + 1.0)["cka"] == pytest.approx(1.0, abs=1e-12)
    labelled = xr.DataArray(x, dims=("datapoint", "channel"), coords={"datapoint": np.r_[np.arange(29), 0]})
    with pytest.raises(ValueError, match=r"repeated datapoint labels, e.g. \[0\]$"):  # labels someone gave
        chunkcca.cka(labelled, labelled)


def test_a_layer_derived_from_a_store_takes_the_default_name_not_activations(tmp_path):
    """A store's layer is named by the path its encoding keeps; ``.astype`` and ``.where`` drop the encoding, and
    errors and results then named the layer 'activations', the variable every layer of a store has."""
    rng = np.random.default_rng(31)
    dims = ("datapoint", "height", "width", "channel")
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {
        f"net/conv{i}": xr.DataArray(rng.standard_normal((30, 2, 2, 2 + i)), dims=dims) for i in (1, 2)})
    conv1, conv2 = (tree[f"net/{name}"]["activations"] for name in ("conv1", "conv2"))
    assert cca(conv1, conv2).attrs["layer_a"] == "net/conv1"  # the path, while the encoding holds it
    assert cca(conv1.isel(channel=[0, 1]), conv2).attrs["layer_a"] == "net/conv1"
    derived = conv1.astype("float32")
    assert derived.name == "activations" and "layer" not in derived.encoding
    assert (cca(derived, conv2).attrs["layer_a"], cca(conv2, conv1.where(conv1 > -9)).attrs["layer_b"]) == ("a", "b")
    with pytest.raises(TypeError, match=r"^layer 'a' has dtype complex64"):
        cca(conv1.astype("complex64"), conv2)
    with pytest.raises(ValueError, match="layer 'b' holds NaN or Inf"):
        cca(conv2, conv1.where(conv1 > 0))
    own = xr.DataArray(rng.standard_normal((30, 3)), dims=("datapoint", "channel"), name="activations")
    assert cca(own, conv2.mean(("height", "width"))).attrs["layer_a"] == "a"  # the name every store's layer has


def test_results_of_several_pairs_concatenate_labelled_by_their_layers(tmp_path):
    """A pair's result named its layers in attrs only: xr.concat of cca(a, b1) and cca(a, b2) kept the first's
    layer_b, labelling both 'b1', silently. The layers are scalar coordinates too, as xarray combines them."""
    rng = np.random.default_rng(14)
    layers = {name: xr.DataArray(rng.standard_normal((30, width)), dims=("datapoint", "channel"), name=name)
              for name, width in (("a", 4), ("b1", 3), ("b2", 2))}
    for measure in (cca, chunkcca.cka, chunkcca.procrustes, lambda x, y: chunkcca.compare(x, y, measures=["svcca"]),
                    lambda x, y: chunkcca.cka(x, y, minibatch=10), lambda x, y: chunkcca.cka(x, y, spatial="features")):
        both = xr.concat([measure(layers["a"], layers[name]) for name in ("b1", "b2")], dim="pair",
                         join="outer")  # b1 and b2 have other channels
        assert both["layer_b"].values.tolist() == ["b1", "b2"] and both["layer_a"].item() == "a"
    moments = chunkcca.compute_moments(layers["a"], layers["b1"])
    assert chunkcca.cka_from_moments(moments)["layer_b"].item() == "b1"  # results of Moments too
    chunkcca.save_result(cca(layers["a"], layers["b1"]), tmp_path / "r.nc")
    with xr.open_dataset(tmp_path / "r.nc") as saved:
        assert saved["layer_a"].item() == "a" and saved.attrs["layer_b"] == "b1"


def test_store_layers_stream_and_are_never_modified(tmp_path):
    a, b = correlated_layers(np.random.default_rng(11), 40, (4, 4, 6), (4, 4, 3))
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"m0/conv": a, "m1/conv": b}, chunks=9)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    result = cca(tree["m0/conv"], tree["m1/conv"], stride=2, precision="float64")
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    assert before == after
    np.testing.assert_allclose(result["rho"], canonical_correlations(flatten_rows(a, 2), flatten_rows(b, 2)),
                               atol=1e-10)
    assert result.attrs["layer_a"] == "m0/conv"
    np.testing.assert_array_equal(result["channel_b"], [0, 1, 2])


def test_moments_can_be_saved_merged_and_solved(tmp_path, conv_pair):
    a, b = conv_pair
    first = compute_moments(a[:25], b[:25], precision="float64")
    first.save(tmp_path / "first")
    total = Moments.load(tmp_path / "first") + compute_moments(a[25:], b[25:], precision="float64")
    np.testing.assert_allclose(cca_from_moments(total)["rho"], cca(a, b, precision="float64")["rho"], atol=1e-12)


def test_symmetric_in_its_arguments(conv_pair):
    a, b = conv_pair
    np.testing.assert_allclose(cca(a, b, precision="float64")["rho"][:5],
                               cca(b, a, precision="float64")["rho"], atol=1e-12)


def test_epsilon_regularises_towards_zero_correlation(conv_pair):
    a, b = conv_pair
    plain, ridge = cca(a, b, precision="float64"), cca(a, b, epsilon=10.0, precision="float64")
    assert ridge.attrs["epsilon"] == 10.0
    assert np.all(ridge["rho"].values <= plain["rho"].values + 1e-12)


def test_no_task_holds_more_than_a_chunk():
    """Every task's output is at most one chunk of the inputs: nothing gathers a whole layer."""
    from dask.callbacks import Callback

    largest = []

    class Sizes(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            largest.append(getattr(result, "nbytes", 0))

    a, b = correlated_layers(np.random.default_rng(12), 400, (4, 4, 8), (4, 4, 6), dtype=np.float64)
    chunk_bytes = 50 * 4 * 4 * 8 * 8
    with Sizes():
        result = cca(da.from_array(a, chunks=(50, -1, -1, -1)), da.from_array(b, chunks=(50, -1, -1, -1)),
                     precision="float64")
    assert int(result["rows"]) == 400 * 16
    assert 0 < max(largest) <= chunk_bytes < a.nbytes / 4


def test_float32_products_keep_genuine_small_directions():
    """Correlation eigenvalues spanning 1.5e-5..15 (channels of very different scales and offsets): float32
    rounding (~1e-7 on this scale) is far below them, so float32 keeps every direction and agrees with
    float64 (a rank threshold of p * eps32 * max, 2e-4 here, cut 26 directions)."""
    rng = np.random.default_rng(4)
    p, n = 128, 20000
    vectors, _ = np.linalg.qr(rng.standard_normal((p, p)))
    values = np.logspace(-6, 0, p)
    values *= p / values.sum()
    white = rng.standard_normal((n, p))
    a = (white @ (vectors * np.sqrt(values)) @ vectors.T) * 10 ** rng.uniform(-2, 1, p) + rng.uniform(0, 5, p)
    b = white @ np.linalg.qr(rng.standard_normal((p, p)))[0] + 0.7 * rng.standard_normal((n, p))
    with pytest.warns(RuntimeWarning, match="rank-deficient layers"):
        single = cca(a, b, precision="float32")
    double = cca(a, b, precision="float64")
    assert int(single["rank_a"]) == int(double["rank_a"]) == p
    np.testing.assert_allclose(single["rho"], double["rho"], atol=1e-3)
    assert float(single["rho_mean"]) == pytest.approx(float(double["rho_mean"]), abs=1e-4)  # 2e-5 seen


def test_float32_svcca_and_shape_do_not_depend_on_channel_units():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((4000, 10))
    a = (z @ rng.standard_normal((10, 20)) + rng.standard_normal((4000, 20))) * np.logspace(-3, 1, 20)
    b = z @ rng.standard_normal((10, 8)) + rng.standard_normal((4000, 8))
    for keep_by in ("variance", "singular_values"):
        single, double = (chunkcca.svcca(a, b, keep=1.0, keep_by=keep_by, precision=precision)
                          for precision in ("float32", "float64"))
        assert int(single["dims_a"]) == int(double["dims_a"]) == 20
        assert float(single["rho_mean"]) == pytest.approx(float(double["rho_mean"]), abs=1e-6)
    for alpha in (0.0, 1e-5):
        single, double = (float(chunkcca.shape_metric(a, b, alpha=alpha, precision=precision)["shape_distance"])
                          for precision in ("float32", "float64"))
        assert single == pytest.approx(double, abs=1e-6)


def test_float32_rounding_of_wide_low_rank_layers_is_not_taken_for_directions():
    """512 channels of rank 2 (scales 1e-3..10): float32 products leave hundreds of eigenvalues of rounding up
    to ~6e-6 on the correlation scale (0.1 eps32 x the largest, which is about p here); an absolute floor
    alone counted 50 of them as directions and PWCCA gave 0.28 instead of 0.99."""
    rng = np.random.default_rng(1000 + 512 + 2)
    scales = rng.permutation(np.logspace(-3, 1, 512))
    latent = rng.standard_normal((1000, 2))
    a = ((latent @ rng.standard_normal((2, 512))) * scales + 3 * scales * rng.uniform(-1, 1, 512)).astype(np.float32)
    b = np.column_stack([latent, rng.standard_normal((1000, 62))]).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="rank-deficient layers"):
        single = pwcca(a, b, precision="float32")
    double = pwcca(a, b, precision="float64")
    with pytest.warns(RuntimeWarning, match="rank-deficient layers"):
        assert int(cca(a, b, precision="float32")["rank_a"]) == 2
    assert float(single["pwcca"]) == pytest.approx(float(double["pwcca"]), abs=1e-6)
    with pytest.warns(RuntimeWarning, match="rank-deficient layers"):
        assert float(chunkcca.svcca(a, b, keep=1.0, precision="float32")["dims_a"]) == 2


@pytest.mark.parametrize("scale", [1e-6, 1e-9, 1e6])
def test_channel_units_do_not_matter(scale):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 4))
    y = x[:, :3] @ rng.standard_normal((3, 3)) + rng.standard_normal((500, 3))
    scaled = x * np.array([scale, 1, 1, 1])
    result = cca(scaled, y, precision="float64")
    assert not result["pruned_a"].any()
    np.testing.assert_allclose(result["rho"], canonical_correlations(x, y), atol=1e-9)


@pytest.mark.parametrize("chunks", [500, 7, 3])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_a_constant_float64_channel_is_pruned_and_a_varying_one_far_from_zero_is_kept(chunks, precision):
    """A constant float64 channel once kept a variance of 7e-11 of its mean under float32 products (its shift
    was rounded to float32), so it was not pruned; a real channel of mean 1e12 and spread 0.98 (8000 rounding
    units of its mean) was pruned as constant by the old 1e-12 rule."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((500, 4))
    y = x[:, :3] @ rng.standard_normal((3, 3)) + 0.5 * rng.standard_normal((500, 3))
    x[:, 0] += 1e12
    x[:, 3] = np.pi * 1e5
    result = cca(da.from_array(x, chunks=chunks), y, precision=precision)
    assert result["pruned_a"].values.tolist() == [False, False, False, True]
    if chunks == 500:  # in smaller chunks the merge of means near 1e12 costs ~2e-6 (docs/concepts.md)
        want = canonical_correlations(x[:, :3] - x[:, :3].mean(axis=0), y)
        np.testing.assert_allclose(result["rho"], want, atol=1e-5 if precision == "float32" else 1e-8)


def test_constant_channels_at_an_offset_are_pruned():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 3)).astype(np.float32)
    x[:, 1] = 50.0
    result = cca(x, rng.standard_normal((300, 2)).astype(np.float32))
    assert result["pruned_a"].values.tolist() == [False, True, False]
