"""Token, time and volume layers, padding masks: every adapter against in-memory float64 references built from
the rows it should use, in any chunking and stride."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import canonical_correlations, cka_reference

import chunkcca
from chunkcca import cca, cka, similarity

#: float64 products on the same rows: the streamed CCA agrees with the QR reference to ~1e-13.
TOL = 1e-9


def _sequences(seed: int, n: int = 60, tokens: int = 9, p: int = 4, q: int = 5) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, tokens, p)) + 0.5
    y = x[..., :3] @ rng.standard_normal((3, q)) + rng.standard_normal((n, tokens, q))
    lengths = rng.integers(1, tokens + 1, n)
    return x, y, np.arange(tokens)[None, :] < lengths[:, None], lengths


def _layer(values: np.ndarray, mask: np.ndarray | None, chunk: int, name: str, dim: str = "token") -> xr.DataArray:
    dims = ("datapoint", dim, "channel")
    layer = xr.DataArray(da.from_array(values, chunks=(chunk, -1, -1)), dims=dims, name=name)
    return layer if mask is None else layer.assign_coords(mask=(dims[:2], da.from_array(mask, chunks=(chunk, -1))))


@settings(max_examples=15, deadline=None)
@given(chunk_a=st.integers(3, 60), chunk_b=st.integers(3, 60), stride=st.integers(1, 5), seed=st.integers(0, 9))
def test_flatten_under_masks_uses_the_rows_both_layers_have(chunk_a, chunk_b, stride, seed):
    """Rows (datapoint, token) in global order, every stride-th, then those real in both layers (masks differ)."""
    x, y, mask_x, lengths = _sequences(seed)
    mask_y = mask_x.copy()
    mask_y[(np.arange(60) % 7 == 0) & (lengths > 1), 0] = False  # b's mask differs from a's
    got = cca(_layer(x, mask_x, chunk_a, "a"), _layer(y, mask_y, chunk_b, "b"), stride=stride, precision="float64")
    keep = (mask_x & mask_y).reshape(-1)[::stride]
    rows_x, rows_y = x.reshape(-1, 4)[::stride][keep], y.reshape(-1, 5)[::stride][keep]
    assert int(got["rows"]) == keep.sum()
    np.testing.assert_allclose(got["rho"], canonical_correlations(rows_x, rows_y), atol=TOL)
    plain = cca(_layer(x, None, chunk_a, "a"), _layer(y, None, chunk_b, "b"), stride=stride, precision="float64")
    np.testing.assert_allclose(plain["rho"], canonical_correlations(x.reshape(-1, 4)[::stride],
                                                                    y.reshape(-1, 5)[::stride]), atol=TOL)


@pytest.mark.parametrize("chunk", [7, 60])
@pytest.mark.parametrize("stride", [1, 2])
def test_avgpool_first_and_last_under_masks(chunk, stride):
    x, y, mask, lengths = _sequences(1)
    a, b = _layer(x, mask, chunk, "a"), _layer(y, mask, chunk, "b")
    pooled = [(v * mask[..., None]).sum(1) / mask.sum(1)[:, None] for v in (x, y)]
    want = {"avgpool": pooled, "first": [x[:, 0], y[:, 0]],
            "last": [x[np.arange(60), lengths - 1], y[np.arange(60), lengths - 1]]}
    for spatial, (rows_a, rows_b) in want.items():
        got = cca(a, b, spatial=spatial, stride=stride, precision="float64")
        np.testing.assert_allclose(got["rho"], canonical_correlations(rows_a[::stride], rows_b[::stride]), atol=TOL)
        assert got.attrs["spatial"] == spatial
    assert float(cka(a, b, spatial="last", precision="float64")["cka"]) == pytest.approx(
        float(cka(want["last"][0], want["last"][1], precision="float64")["cka"]), rel=1e-12)


@pytest.mark.parametrize("chunk", [7, 60])
def test_first_and_last_follow_left_padding(chunk):
    """Left-padded sequences: "first" took position 0, padding, whatever the mask (rho_mean 0.735, the padding's,
    against 0.119 from the first real tokens), silently; "last" followed the mask."""
    x, y, mask, lengths = _sequences(1)
    x, y, mask = x[:, ::-1], y[:, ::-1], mask[:, ::-1]  # the same sequences, padded on the left
    start = mask.shape[1] - lengths
    a, b = _layer(x, mask, chunk, "a"), _layer(y, mask, chunk, "b")
    rows = np.arange(60)
    for spatial, at in (("first", start), ("last", np.full(60, mask.shape[1] - 1))):
        got = cca(a, b, spatial=spatial, precision="float64")
        np.testing.assert_allclose(got["rho"], canonical_correlations(x[rows, at], y[rows, at]), atol=TOL)


@pytest.mark.filterwarnings("ignore:layer 'b' holds the datapoints of layer 'a' in another order")
def test_a_datapoint_with_no_real_position_is_named():
    x, y, mask, _ = _sequences(2)
    mask[23] = False
    with pytest.raises(ValueError, match=r"^layer 'a': datapoint 23 has no real position"):
        cca(_layer(x, mask, 10, "a"), _layer(y, None, 10, "b"), spatial="avgpool")
    # b stored in another order is read in a's: its datapoint is named by label, not by a position in a's order
    order = np.random.default_rng(4).permutation(len(x))
    labels = np.array([f"s{i}" for i in range(len(x))])
    named_a = _layer(y, None, 10, "a").assign_coords(datapoint=labels)
    named_b = _layer(x[order], mask[order], 10, "b").assign_coords(datapoint=labels[order])
    with pytest.raises(ValueError, match=r"^layer 'b': the datapoint labelled 's23' has no real position"):
        cca(named_a, named_b, spatial="avgpool")


def test_masks_are_checked_before_the_pass(monkeypatch):
    """A datapoint with no real position was named only when the pass reached its chunk, and a flatten sweep whose
    layers' padding differs measured every pair on the positions real in all of them (0.66 for compare()'s 0.66117
    on 160 of 320 rows; 0.55 for 0.9998 with other values in the padding), without a word."""
    from chunkcca import passes

    x, y, mask, _ = _sequences(2)
    mask[23] = False
    streamed = passes.run
    monkeypatch.setattr(passes, "run", lambda *args, **kwargs: pytest.fail("the pass ran"))
    with pytest.raises(ValueError, match=r"^layer 'a': datapoint 23 has no real position"):
        cca(_layer(x, mask, 10, "a"), _layer(y, None, 10, "b"), spatial="avgpool")
    monkeypatch.setattr(passes, "run", streamed)
    x, y, mask, _ = _sequences(3)
    shorter = mask.copy()
    shorter[:, mask.shape[1] // 2 :] = False
    layers = {"a": _layer(x, mask, 16, "a"), "b": _layer(y, mask, 16, "b"), "c": _layer(2 * x, shorter, 16, "c")}
    with pytest.warns(RuntimeWarning, match=r"a flatten sweep keeps the positions real in every layer: 1 of its "
                                            r"pairs, compared alone, keep more \('a' with 'b'\)"):
        chunkcca.similarity({"a": layers["a"]}, {"b": layers["b"], "c": layers["c"]}, measures=["cka"])
    unpadded_pair = {"d": _layer(x, None, 16, "d"), "e": _layer(y, None, 16, "e")}
    with pytest.warns(RuntimeWarning, match=r"1 of its pairs, compared alone, keep more \('d' with 'e'\)"):
        chunkcca.similarity({"c": layers["c"], "d": unpadded_pair["d"]}, {"e": unpadded_pair["e"]},
                            measures=["cka"])  # d and e, unpadded, lose c's padded positions: it was missed
    unpadded = {"d": _layer(x, None, 16, "d"), "e": _layer(y, None, 16, "e")}
    with warnings.catch_warnings():  # every pair keeps what it keeps alone: a's padding (a review found a warning)
        warnings.simplefilter("error")
        chunkcca.similarity({"a": layers["a"], "b": layers["b"]}, unpadded, measures=["cka"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunkcca.similarity({"a": layers["a"]}, {"b": layers["b"]}, measures=["cka"])  # a pair: its own rows
        chunkcca.similarity({"a": layers["a"]}, {"b": layers["b"], "c": layers["c"]}, measures=["cka"],
                            spatial="avgpool")  # each layer under its own padding


def test_masks_are_stored_beside_the_layer_and_used_from_a_store(tmp_path):
    x, y, mask, lengths = _sequences(3)
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"m0/enc": x, "m1/enc": y},
                                      masks={"m0/enc": mask, "m1/enc": mask}, chunks=16)
    assert tree["m0/enc"]["mask"].dtype == bool and list(tree["m0/enc"]["token"].values) == list(range(9))
    got = cca(tree["m0/enc"], tree["m1/enc"], precision="float64")
    np.testing.assert_allclose(got["rho"], canonical_correlations(x[mask], y[mask]), atol=TOL)
    assert got.attrs["rows_omitted"] == 0 and int(got["rows"]) == mask.sum()  # padding is not a NaN omitted
    omitted = cca(tree["m0/enc"], tree["m1/enc"], precision="float64", nan_policy="omit")
    assert omitted.attrs["rows_omitted"] == mask.size - mask.sum()
    sweep = similarity(tree["m0"], tree["m1"], measures=["cka"], spatial="last", precision="float64")
    want = cka(x[np.arange(60), lengths - 1], y[np.arange(60), lengths - 1], precision="float64")
    assert sweep["cka"].item() == pytest.approx(float(want["cka"]), rel=1e-12)
    with pytest.raises(ValueError, match="has no meaning on padded positions"):
        cca(tree["m0/enc"], tree["m1/enc"], spatial="dft")


@pytest.mark.parametrize("chunk", [5, 40])
def test_one_dimensional_dft_per_frequency_matches_numpy_fft(chunk):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 8, 3))
    y = np.roll(x, 1, axis=1) @ rng.standard_normal((3, 3)) + 0.5 * rng.standard_normal((40, 8, 3))
    y = y[:, ::2]  # 4 time steps: the 4 frequencies both share
    got = cca(_layer(x, None, chunk, "a", "time"), _layer(y, None, chunk, "b", "time"), spatial="dft",
              precision="float64")
    spectra = np.fft.fft(x, axis=1), np.fft.fft(y, axis=1)
    assert got["rho"].dims == ("freq_time", "component")
    for i, frequency in enumerate(got["freq_time"].values):
        rows = [spectrum[:, int(frequency) % spectrum.shape[1]] for spectrum in spectra]
        np.testing.assert_allclose(got["rho"][i], canonical_correlations(*rows), atol=TOL)
    moments = chunkcca.compute_moments(_layer(x, None, chunk, "a", "time"), _layer(y, None, chunk, "b", "time"),
                                       spatial="dft", precision="float64")
    solved = chunkcca.cca_from_moments(moments)  # Moments know their frequencies (it was freq_0, unlabelled)
    assert solved["rho"].dims == ("freq_time", "component")
    np.testing.assert_array_equal(solved["freq_time"], got["freq_time"])
    np.testing.assert_allclose(solved["rho"].values, got["rho"].values, atol=TOL)
    assert chunkcca.cca_from_moments(moments, batch_dims=("freq_time",))["rho"].dims == ("freq_time", "component")
    with pytest.raises(ValueError, match="Moments have 1 batch dims, batch_dims names 2"):
        chunkcca.cca_from_moments(moments, batch_dims=("freq_h", "freq_w"))


def test_one_dimensional_interp_matches_numpy_interp():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 8, 3))
    y = rng.standard_normal((30, 4, 2)) + x[:, ::2, :2]
    a = _layer(x, None, 7, "a", "time").assign_coords(time=np.arange(8) + 0.5)
    b = _layer(y, None, 7, "b", "time").assign_coords(time=np.arange(4) * 2 + 1.0)
    got = cca(a, b, spatial="interp", precision="float64")
    fine = np.arange(8) + 0.5
    resampled = np.stack([[np.interp(fine, np.arange(4) * 2 + 1.0, y[d, :, c]) for c in range(2)]
                          for d in range(30)]).transpose(0, 2, 1)
    np.testing.assert_allclose(got["rho"], canonical_correlations(x.reshape(-1, 3), resampled.reshape(-1, 2)),
                               atol=TOL)


def test_interp_places_times_and_durations_of_any_unit_as_the_same_instants():
    """interp made a layer's times float64 as raw counts of its own unit: one in nanoseconds beside one in
    milliseconds was placed 10⁶ times too far (ρ₁ 0.219 for 0.664, silently), and datetimes as nanoseconds since
    1970 (1.7e18) kept only 256 ns of resolution (1.5e-3 off at 1 µs steps; at 100 ns a raw scipy error). They
    are placed in the finer unit, datetimes since the earlier first; times beside numbers are refused."""
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((100, 12, 3))
    x = signal + 0.1 * rng.standard_normal((100, 12, 3))
    y = (signal[:, ::2] + signal[:, 1::2]) / 2 @ rng.standard_normal((3, 4)) + 0.3 * rng.standard_normal((100, 6, 4))
    seconds_a, seconds_b = np.arange(12) * 1.0, np.arange(6) * 2 + 0.5

    def layer(values, times, name):
        return xr.DataArray(values, dims=("datapoint", "time", "channel"), coords={"time": times}, name=name)

    want = cca(layer(x, seconds_a, "a"), layer(y, seconds_b, "b"), spatial="interp", precision="float64")["rho"]
    start = np.datetime64("2024-01-01T00:00:00")
    for unit_a, unit_b, per_second in (("ns", "ms", 1), ("s", "ms", 1), ("ns", "ns", 1e-7)):  # 1e-7: 100 ns steps
        def scaled(seconds, unit, per_second=per_second):
            per_unit = np.timedelta64(1, "s") / np.timedelta64(1, unit)  # e.g. 1000.0 for ms
            return np.round(seconds * per_second * per_unit).astype(f"m8[{unit}]")
        durations = cca(layer(x, scaled(seconds_a, unit_a), "a"), layer(y, scaled(seconds_b, unit_b), "b"),
                        spatial="interp", precision="float64")["rho"]
        times = cca(layer(x, start.astype(f"M8[{unit_a}]") + scaled(seconds_a, unit_a), "a"),
                    layer(y, start.astype(f"M8[{unit_b}]") + scaled(seconds_b, unit_b), "b"),
                    spatial="interp", precision="float64")["rho"]
        np.testing.assert_allclose(durations, want, atol=1e-12, err_msg=f"{unit_a}, {unit_b}")  # the same positions
        np.testing.assert_allclose(times, want, atol=1e-12, err_msg=f"{unit_a}, {unit_b}")  # in another unit
    with pytest.raises(ValueError, match=r"layers 'a' \(timedelta64\[s\]\) and 'b' \(float64\) label their time "
                                         r"positions in different kinds"):
        cca(layer(x, seconds_a.astype("m8[s]"), "a"), layer(y, seconds_b, "b"), spatial="interp")
    import datetime

    dates = [datetime.date(2024, 1, 1) + datetime.timedelta(days=int(day)) for day in range(12)]  # objects
    with pytest.raises(ValueError, match=r"layer 'a' labels its time positions with object values \(e.g. "
                                         r"datetime.date\(2024, 1, 1\)\): interp places positions by numbers"):
        cca(layer(x, np.array(dates, dtype=object), "a"), layer(y, seconds_b, "b"), spatial="interp")
    with pytest.raises(ValueError, match=r"layer 'a': its 'time' coordinates do not increase"):  # NaT
        cca(layer(x, np.r_[seconds_a[:-1], np.nan].astype("m8[s]"), "a"), layer(y, seconds_b.astype("m8[ms]"), "b"),
            spatial="interp")


@pytest.mark.parametrize("stride", [1, 3])
def test_volumes_flatten_and_avgpool(stride):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 3, 4, 2, 3))
    y = x @ rng.standard_normal((3, 4)) + rng.standard_normal((20, 3, 4, 2, 4))
    a, b = da.from_array(x, chunks=6), da.from_array(y, chunks=9)  # 5-d: (datapoint, depth, height, width, channel)
    flat = cca(a, b, stride=stride, precision="float64")
    np.testing.assert_allclose(flat["rho"], canonical_correlations(x.reshape(-1, 3)[::stride],
                                                                   y.reshape(-1, 4)[::stride]), atol=TOL)
    pooled = cca(a, b[:, :2], spatial="avgpool", stride=stride, precision="float64")  # other sizes: fine
    np.testing.assert_allclose(pooled["rho"], canonical_correlations(x.mean(axis=(1, 2, 3))[::stride],
                                                                     y[:, :2].mean(axis=(1, 2, 3))[::stride]),
                               atol=TOL)


def test_layers_of_different_ranks_pair_by_avgpool_only():
    rng = np.random.default_rng(7)
    tokens, image = rng.standard_normal((30, 5, 3)), rng.standard_normal((30, 4, 4, 3))
    pooled = cca(tokens, image, spatial="avgpool", precision="float64")
    np.testing.assert_allclose(pooled["rho"], canonical_correlations(tokens.mean(1), image.mean(axis=(1, 2))),
                               atol=TOL)
    with pytest.raises(ValueError, match=r"spatial='flatten' needs equal positions, but layer 'a' is 5 \(token\) "
                                         r"and layer 'b' is 4x4 \(height, width\); use spatial='avgpool' "
                                         r"\(--spatial avgpool: any positions\)$"):
        cca(tokens, image)  # not interp or dft, which need the same position dims
    with pytest.raises(ValueError, match=r"spatial='interp' pairs layers position dim by position dim, by name, .*"
                                         r"\(--spatial avgpool\)$"):
        cca(tokens, image, spatial="interp")
    steps = xr.DataArray(tokens, dims=("datapoint", "time", "channel"), name="steps")
    with pytest.raises(ValueError, match=r"layer 'a' is 5 \(token\) and layer 'steps' is 5 \(time\); use "
                                         r"spatial='avgpool' \(--spatial avgpool\) or rename one's dim "
                                         r"\(layer.rename\(time='token'\)\)$"):  # concepts.md said token pairs
        cca(tokens, steps, spatial="interp")  # with time: so it does under flatten, not by name
    for spatial in ("interp", "dft"):  # two fc layers: avgpool, advised, averages nothing
        with pytest.raises(ValueError, match=rf"^spatial='{spatial}' works on position dims, and layers 'a' and 'b' "
                                             r"are fully connected \(no positions\): use spatial='flatten'"):
            cca(tokens[:, 0], image[:, 0, 0], spatial=spatial)


def test_minibatch_cka_of_padded_tokens_is_refused_but_pooled_rows_work():
    x, y, mask, _ = _sequences(8)
    a, b = _layer(x, mask, 12, "a"), _layer(y, mask, 12, "b")
    with pytest.raises(ValueError, match="minibatch CKA cuts the rows into minibatches of fixed size"):
        cka(a, b, minibatch=8)
    got = cka(a, b, spatial="last", minibatch=10)
    assert int(got["minibatches"]) == 6


def test_a_zero_one_integer_mask_is_taken_as_record_and_ingest_take_it(tmp_path):
    """A tokenizer's attention_mask is 0/1 integers (torch.int64): write_activations refused it ("must be
    boolean"), while record and ingest took it. Numpy, Dask and DataArray masks of 0/1 are stored as booleans; any
    other value is an error naming the layer, and no store is left."""
    x, y, mask, _ = _sequences(3)
    want = chunkcca.write_activations(tmp_path / "bool.zarr", {"a": x, "b": y}, masks={"a": mask, "b": mask})
    given = {"numpy": mask.astype(np.int64), "dask": da.from_array(mask.astype(np.uint8), chunks=(16, -1)),
             "dataarray": xr.DataArray(mask.astype(np.int32), dims=("datapoint", "token")),
             "float": mask.astype(np.float32), "lists": mask.astype(int).tolist()}
    for kind, integers in given.items():
        tree = chunkcca.write_activations(tmp_path / f"{kind}.zarr", {"a": x, "b": y},
                                          masks={"a": integers, "b": mask})
        assert tree["a"]["mask"].dtype == bool
        np.testing.assert_array_equal(tree["a"]["mask"].values, mask)
        assert float(cka(tree["a"], tree["b"])["cka"]) == float(cka(want["a"], want["b"])["cka"])
    from chunkcca.layers import as_activations
    from chunkcca.store import _as_mask

    xr.DataArray(mask.astype(np.int64), dims=("datapoint", "token"), name="m").to_netcdf(tmp_path / "m.nc")
    with xr.open_dataarray(tmp_path / "m.nc") as lazy:  # a file's integer mask: read block by block, not whole
        made = _as_mask(lazy, as_activations(x, "a", chunks=16))
        assert isinstance(made.data, da.Array) and made.data.chunks[0][0] == 16
        np.testing.assert_array_equal(made.values, mask)
    wrong = mask.astype(np.int64) * 2
    for kind, bad in {"numpy": wrong, "dask": da.from_array(wrong, chunks=(16, -1))}.items():
        with pytest.raises(ValueError, match=r"layer 'a': its mask holds values other than 0/1 or True/False "
                                             r"\(e.g. \[2"):
            chunkcca.write_activations(tmp_path / f"bad_{kind}.zarr", {"a": x}, masks={"a": bad})
        assert not (tmp_path / f"bad_{kind}.zarr").exists()
    layer = xr.DataArray(x, dims=("datapoint", "token", "channel"), name="a").assign_coords(
        mask=(("datapoint", "token"), mask.astype(np.int64)))
    with pytest.raises(ValueError, match=r"layer 'a': its mask must be boolean .* got int64 .*; a tokenizer's 0/1 "
                                         r"attention mask is mask == 1"):  # the measures take booleans only
        cka(layer, y)
    own = chunkcca.write_activations(tmp_path / "own.zarr", {"a": layer, "b": y}, masks={"b": mask})  # it was
    np.testing.assert_array_equal(own["a"]["mask"].values, mask)  # refused, the error naming write_activations
    assert float(cka(own["a"], own["b"])["cka"]) == float(cka(want["a"], want["b"])["cka"])


def test_masks_that_leave_no_row_both_keep_are_said_to_and_nan_is_not_blamed():
    """Masks real at tokens no row shares, or only where the stride does not look, said "every row holds NaN or
    Inf", of finite layers (found by audit)."""
    x, y, _, _ = _sequences(5, n=30, tokens=6)
    first = np.zeros((30, 6), bool)
    first[:, :3] = True
    odd = np.zeros((30, 6), bool)
    odd[:, [1, 3]] = True
    nothing = r"every row of layers 'a', 'b' was left out as padding \(no row the stride keeps is real in every layer\)"
    with pytest.raises(ValueError, match=nothing + "; nothing is left$"):
        cca(_layer(x, first, 10, "a"), _layer(y, ~first, 10, "b"))
    with pytest.raises(ValueError, match=nothing):
        cka(_layer(x, odd, 10, "a"), _layer(y, odd, 10, "b"), stride=2)
    with pytest.raises(ValueError, match=r"left out as padding .* or as holding NaN or Inf; nothing is left$"):
        cka(_layer(x, first, 10, "a"), _layer(y, ~first, 10, "b"), nan_policy="omit")


def test_a_mask_is_placed_by_its_labels_and_a_layers_own_is_not_replaced(tmp_path):
    """A mask DataArray given as masks= lines up with the layer by its positions' labels as by its datapoints'
    (it was taken by place, padding counted as real), and one labelling other positions is refused; masks= for a
    layer that carries its own mask is refused (it replaced it, silently). Found by audit."""
    x, _, mask, _ = _sequences(4, n=20, tokens=5)
    dims = ("datapoint", "token", "channel")
    layer = xr.DataArray(x, dims=dims, coords={"token": [0, 1, 2, 3, 4]}, name="a")
    reversed_ = xr.DataArray(mask[:, ::-1], dims=dims[:2], coords={"token": [4, 3, 2, 1, 0]})
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"a": layer}, masks={"a": reversed_})
    np.testing.assert_array_equal(tree["a"]["mask"].values, mask)
    elsewhere = reversed_.assign_coords(token=[10, 11, 12, 13, 14])
    with pytest.raises(ValueError, match=r"layer 'a': its mask labels its token positions otherwise \(5 of"):
        chunkcca.write_activations(tmp_path / "t.zarr", {"a": layer}, masks={"a": elsewhere})
    carrying = layer.assign_coords(mask=(dims[:2], mask))
    with pytest.raises(ValueError, match=r"layer 'a' carries a 'mask' coordinate and masks= gives it another"):
        chunkcca.write_activations(tmp_path / "u.zarr", {"a": carrying}, masks={"a": np.ones_like(mask)})
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "u.zarr").exists()


def test_masks_of_each_layer_its_own_under_avgpool_and_last_and_nan_padding_is_left_out():
    """avgpool and last read each layer's own mask (sizes and masks differ); padding may hold NaN."""
    x, y, mask_x, lengths = _sequences(9)
    y, mask_y = y[:, :6], mask_x[:, :6].copy()
    mask_y[:, 0] = True
    x = np.where(mask_x[..., None], x, np.nan)  # padding written as NaN by some recorders
    a = _layer(x, mask_x, 11, "a")
    b = xr.DataArray(y, dims=("datapoint", "token", "channel"), name="b").assign_coords(
        mask=(("datapoint", "token"), mask_y))  # a numpy mask coordinate
    pooled_x = np.nanmean(x, axis=1)
    pooled_y = (y * mask_y[..., None]).sum(1) / mask_y.sum(1)[:, None]
    got = cca(a, b, spatial="avgpool", precision="float64")
    np.testing.assert_allclose(got["rho"], canonical_correlations(pooled_x, pooled_y), atol=TOL)
    last_y = np.array([y[d, np.flatnonzero(mask_y[d])[-1]] for d in range(60)])
    got = cca(a, b, spatial="last", precision="float64")
    np.testing.assert_allclose(got["rho"], canonical_correlations(x[np.arange(60), lengths - 1], last_y), atol=TOL)


def test_last_under_a_two_dimensional_mask_takes_the_last_real_position_in_row_major_order():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((40, 3, 4, 3))
    y = x @ rng.standard_normal((3, 2)) + rng.standard_normal((40, 3, 4, 2))
    mask = rng.random((40, 3, 4)) < 0.6
    mask[:, 0, 0] = True
    dims = ("datapoint", "height", "width")
    a = xr.DataArray(x, dims=(*dims, "channel")).assign_coords(mask=(dims, mask))
    b = xr.DataArray(y, dims=(*dims, "channel")).assign_coords(mask=(dims, mask))
    last = [np.flatnonzero(m.reshape(-1))[-1] for m in mask]
    want = [v.reshape(40, 12, -1)[np.arange(40), last] for v in (x, y)]
    got = cca(a, b, spatial="last", precision="float64")
    np.testing.assert_allclose(got["rho"], canonical_correlations(*want), atol=TOL)


def test_precision_auto_says_when_padding_leaves_its_pilot_too_few_real_rows():
    """Flattened tokens: the pilot is sized by rows before padding (10 datapoints × 9 tokens = 90 ≥ 4 × 5); with
    one real token each only 10 rows are real, too few to show the conditioning surely, and the note says so."""
    x, y, _, _ = _sequences(4)
    mask = np.zeros(x.shape[:2], dtype=bool)
    mask[:, 0] = True
    mask[30:] = True  # the rest of the run is fully real
    result = cca(_layer(x, mask, 10, "a"), _layer(y, mask, 10, "b"), precision="auto")
    assert ("only 10 of its rows are real (padding and omitted rows are left out), fewer than the 20 that show "
            "layer 'b''s conditioning") in result.attrs["precision_auto"]
    keep = mask.reshape(-1)
    want = canonical_correlations(x.reshape(-1, 4)[keep], y.reshape(-1, 5)[keep])
    np.testing.assert_allclose(result["rho"], want, atol=1e-6 if result.attrs["precision"] == "float32" else TOL)


def test_a_stored_layers_activations_carry_its_padding_mask(tmp_path):
    """The mask was a variable beside ``activations``: ``tree[layer]["activations"]`` (the groupby idiom of
    docs/groups_folds.md) left it behind and counted the padding (CKA 0.0024 against 0.4349 on a tester's
    layers), silently."""
    rng = np.random.default_rng(0)
    x = rng.random((300, 6, 3))
    y = x @ rng.random((3, 2)) + 0.1 * rng.random((300, 6, 2))
    mask = np.ones((300, 6), bool)
    mask[:, 4:] = False
    x[:, 4:] = 100 * rng.random((300, 2, 3))  # junk in the padding
    dims = ("datapoint", "token", "channel")
    layers = {"a": xr.DataArray(x, dims=dims), "b": xr.DataArray(y, dims=dims)}
    tree = chunkcca.write_activations(tmp_path / "s.zarr", layers, masks={"a": mask, "b": mask})
    assert "mask" in tree["a"]["activations"].coords
    whole = chunkcca.cka(tree["a"], tree["b"], precision="float64")
    alone = chunkcca.cka(tree["a"]["activations"], tree["b"]["activations"], precision="float64")
    assert int(alone["rows"]) == int(whole["rows"]) == 1200
    assert float(alone["cka"]) == float(whole["cka"])
    kept = mask.reshape(-1)
    want = cka_reference(x.reshape(-1, 3)[kept], y.reshape(-1, 2)[kept], debiased=False)
    assert float(alone["cka"]) == pytest.approx(want, abs=1e-12)


def test_a_mask_given_to_a_stored_layer_without_one_is_used_and_its_own_chunks_checked(tmp_path):
    """A store's layer keeps its encoding through ``assign_coords``; the check that every chunk file is there
    looked for the store's mask folder, which a store without masks lacks (FileNotFoundError, found by audit)."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((120, 6, 3)), rng.standard_normal((120, 6, 2))
    y[..., 0] += x[..., 0]
    mask = np.arange(6)[None, :] < rng.integers(1, 7, 120)[:, None]
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"a": x, "b": y}, chunks=50)
    dims = ("datapoint", "token")
    for values in (mask, da.from_array(mask, chunks=(40, -1))):
        a = tree["a"]["activations"].assign_coords(mask=(dims, values))
        got = cka(a, tree["b"]["activations"], precision="float64")
        assert int(got["rows"]) == mask.sum()
        assert float(got["cka"]) == pytest.approx(cka_reference(x[mask], y[mask], debiased=False), abs=1e-12)
        half = cka(a[:60], tree["b"]["activations"][:60], precision="float64")  # a selection keeps the encoding too
        want = cka_reference(x[:60][mask[:60]], y[:60][mask[:60]], debiased=False)
        assert float(half["cka"]) == pytest.approx(want, abs=1e-12)
    da.from_array(mask, chunks=(40, -1)).to_zarr(str(tmp_path / "mask.zarr"))  # a user's own zarr array
    (tmp_path / "mask.zarr" / "c" / "1" / "0").unlink()
    lost = tree["a"]["activations"].assign_coords(mask=(dims, da.from_zarr(str(tmp_path / "mask.zarr"))))
    with pytest.raises(OSError, match="lacks 1 of its 3 chunk files"):
        cka(lost, tree["b"]["activations"])


def test_whole_maps_of_masked_layers_are_refused_in_pairs_and_sweeps():
    """spatial='features' takes each datapoint's whole map, padding included: cka() and compare() refused a
    masked layer, but similarity() took its padding (CKA 0.99999746 with padding of ±1e3, against 0.619 with
    the padding zeroed), minibatch too. Every entry point now refuses it, naming the layer."""
    x, y, mask, _ = _sequences(3)
    a, b = _layer(x, mask, 7, "a"), _layer(y, mask, 7, "b")
    message = "spatial='features' makes each datapoint's whole map a vector, padding included, and layer 'a' has a mask"
    calls = {"cka": lambda: cka(a, b, spatial="features"),
             "compare": lambda: chunkcca.compare(a, b, measures=["cka"], spatial="features"),
             "similarity": lambda: similarity({"a": a}, {"b": b}, measures=["cka"], spatial="features"),
             "minibatch": lambda: similarity({"a": a}, {"b": b}, measures=["cka"], spatial="features", minibatch=8)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=message):
            call()
            pytest.fail(f"{name} took the padding")


def test_first_and_last_take_a_layer_without_positions_as_it_is():
    """A pair refused an fc layer under first and last, which a sweep took as it is (as avgpool does): both take
    it as it is, beside the other layer's first or last position."""
    rng = np.random.default_rng(0)
    conv, fc = rng.standard_normal((20, 4, 4, 3)), rng.standard_normal((20, 3))
    for spatial, at in (("first", 0), ("last", -1)):
        want = canonical_correlations(conv[:, at, at], fc)
        np.testing.assert_allclose(cca(conv, fc, spatial=spatial, precision="float64")["rho"], want, atol=TOL)
        swept = similarity({"conv": conv}, {"fc": fc}, measures=["mean_cca"], spatial=spatial, precision="float64")
        assert float(swept["mean_cca"].squeeze()) == pytest.approx(want.mean(), abs=TOL)
    np.testing.assert_allclose(cca(fc, fc[:, ::-1], spatial="first", precision="float64")["rho"],
                               canonical_correlations(fc, fc[:, ::-1]), atol=TOL)


def test_padded_layers_of_other_lengths_are_pointed_to_modes_that_take_them():
    """flatten of masked layers of 8 and 5 tokens pointed to 'interp' and 'dft', which then refused the masks."""
    rng = np.random.default_rng(0)
    padded = xr.DataArray(rng.standard_normal((20, 8, 3)), dims=("datapoint", "token", "channel"),
                          coords={"mask": (("datapoint", "token"), np.ones((20, 8), bool))}, name="a")
    shorter = xr.DataArray(rng.standard_normal((20, 5, 3)), dims=("datapoint", "token", "channel"), name="b")
    with pytest.raises(ValueError, match=r"use spatial='avgpool' \(--spatial avgpool: any positions\), 'first' or "
                                         r"'last'$"):
        chunkcca.cca(padded, shorter)


def test_a_mask_computed_from_the_activations_is_left_to_the_pass(monkeypatch):
    """The masks' own pass read a mask computed from the activations ((layer != 0).any("channel")), and so the
    activations, once more: such a mask is checked in the pass, which reads them once."""
    from chunkcca import passes
    from chunkcca.options import StreamOptions
    from chunkcca.rows import plan_adapters

    x, y, mask, _ = _sequences(2)
    layer = _layer(x * mask[..., None], None, 10, "a")
    derived = layer.assign_coords(mask=(layer != 0).any("channel"))
    other = _layer(y, None, 10, "b")
    monkeypatch.setattr(passes, "compute", lambda *args, **kwargs: pytest.fail("the masks were read apart"))
    passes._check_masks([derived.coords["mask"].data, None], plan_adapters(derived, other, StreamOptions()),
                        ["a", "b"], None, [derived.data, other.data])
    with pytest.raises(pytest.fail.Exception, match="the masks were read apart"):  # a stored mask is
        passes._check_masks([da.from_array(mask, chunks=10), None], plan_adapters(derived, other, StreamOptions()),
                            ["a", "b"], None, [derived.data, other.data])


@pytest.mark.parametrize("spatial", ["avgpool", "first", "last", "flatten"])
@pytest.mark.parametrize("computed", [False, True])  # the mask stored (checked before the pass) or computed
def test_a_datapoint_without_a_real_position_that_the_stride_skips_is_no_error(spatial, computed):
    """Datapoint 23 of no real position, which stride 2 (avgpool, first, last: every second datapoint) or stride
    20 (flatten of 9 tokens: every second or third datapoint) never reads, ended the run ("has no real
    position"). The datapoints the stride reads are checked as before."""
    x, y, mask, _ = _sequences(2)
    mask[23] = False
    stride = 20 if spatial == "flatten" else 2
    if computed:
        a = _layer(np.where(mask[..., None], x, 0), None, 10, "a")
        a = a.assign_coords(mask=(a != 0).any("channel"))
    else:
        a = _layer(x, mask, 10, "a")
    got = cca(a, _layer(y, None, 10, "b"), spatial=spatial, stride=stride, precision="float64")
    if spatial == "flatten":
        keep = (np.arange(60 * 9) % stride == 0) & mask.reshape(-1)
        rows_a, rows_b = x.reshape(-1, 4)[keep], y.reshape(-1, 5)[keep]
    else:
        rows_a = {"avgpool": (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1)[:, None],
                  "first": x[np.arange(60), np.argmax(mask, 1)],
                  "last": x[np.arange(60), 8 - np.argmax(mask[:, ::-1], 1)]}[spatial][::2]
        rows_b = {"avgpool": y.mean(1), "first": y[:, 0], "last": y[:, -1]}[spatial][::2]
    np.testing.assert_allclose(got["rho"], canonical_correlations(rows_a, rows_b), atol=TOL)
    with pytest.raises(ValueError, match=r"^layer 'a': datapoint 23 has no real position"):
        cca(a, _layer(y, None, 10, "b"), spatial=spatial, stride=stride + 1 if spatial == "flatten" else 1)
