"""Groups and folds from one pass: per-group measures, jackknife errors, held-out CCA and predictivity, each
against a brute-force in-memory float64 computation on the same datapoints."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.linalg
import xarray as xr
from reference import canonical_correlations
from scipy.stats import t as student

import chunkcca
from chunkcca import Moments, cca, cka, compare, compute_moments, procrustes, pwcca, shape_metric, similarity, svcca

#: float64 products on the same rows agree with the in-memory computations to ~1e-13; 1e-10 (groups) and 1e-8
#: (fold fits, where directions are fitted and applied) leave room for the conditioning of the solves.
GROUP_TOL, FOLD_TOL = 1e-10, 1e-8


def _labelled(seed: int = 0, n: int = 240, p: int = 5, q: int = 4) -> tuple[xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 2, p)) + 1.0
    y = x[..., :3] @ rng.standard_normal((3, q)) + rng.standard_normal((n, 3, 2, q))
    labels = rng.choice(["cat", "dog", "eel"], n)
    dims = ("datapoint", "height", "width", "channel")
    return (xr.DataArray(x, dims=dims, name="a", coords={"label": ("datapoint", labels)}).chunk({"datapoint": 37}),
            xr.DataArray(y, dims=dims, name="b", coords={"label": ("datapoint", labels)}).chunk({"datapoint": 50}))


@pytest.mark.parametrize(("stride", "spatial"), [(1, "flatten"), (3, "flatten"), (4, "flatten"), (2, "avgpool")])
def test_each_group_equals_the_measure_on_its_datapoints_alone(stride, spatial):
    """With a stride that does not divide a datapoint's rows (6 here; avgpool's 1), each group was given the rows
    the whole run's stride keeps, not its own: groups of datapoints in turn saw other positions (CKA 0.181 for 0.147
    at stride 2 on 3 × 3 maps, rows 150 for 135; found by audit). Each group's rows are strided on their own."""
    a, b = _labelled()
    labels = a["label"].values
    calls = [(cca, "rho_mean", {}), (svcca, "rho_mean", {"keep": 0.9}), (pwcca, "pwcca", {}), (cka, "cka", {}),
             (cka, "cka", {"debiased": True}), (procrustes, "procrustes", {}), (shape_metric, "shape_distance",
                                                                               {"alpha": 0.5})]
    for call, variable, options in calls:
        grouped = call(a, b, groupby="label", stride=stride, spatial=spatial, precision="float64", **options)
        assert list(grouped["label"].values) == ["cat", "dog", "eel"]
        for group in ("cat", "dog", "eel"):
            alone = call(a.values[labels == group], b.values[labels == group], stride=stride, spatial=spatial,
                         precision="float64", **options)
            assert float(grouped[variable].sel(label=group)) == pytest.approx(float(alone[variable]), rel=GROUP_TOL,
                                                                              abs=GROUP_TOL), (call, options)
            if "rows" in alone:
                assert int(grouped["rows"].sel(label=group)) == int(alone["rows"])


def test_groups_strided_apart_under_padding_and_omitted_rows():
    """Each group's rows strided on their own also under a padding mask and nan_policy="omit": values and rows as
    the group's datapoints alone give, in a sweep too, and the rows omitted counted against the rows each group's
    stride keeps (not the whole run's, which would count rows never given as omitted)."""
    rng = np.random.default_rng(3)
    n, tokens = 90, 5
    x = rng.standard_normal((n, tokens, 4))
    y = x[..., :3] @ rng.standard_normal((3, 3)) + rng.standard_normal((n, tokens, 3))
    x[7, 2, 1] = np.nan  # a row nan_policy="omit" leaves out
    lengths = rng.integers(1, tokens + 1, n)
    mask = np.arange(tokens) < lengths[:, None]
    labels = np.arange(n) % 3  # groups in turn: the whole run's stride gave each group other tokens
    dims = ("datapoint", "token", "channel")
    coords = {"label": ("datapoint", labels), "mask": (("datapoint", "token"), mask)}
    a = xr.DataArray(x, dims=dims, name="a", coords=coords).chunk({"datapoint": 17})
    b = xr.DataArray(y, dims=dims, name="b", coords=coords).chunk({"datapoint": 40})
    options = {"stride": 2, "precision": "float64", "nan_policy": "omit"}
    grouped = cka(a, b, groupby="label", **options)
    swept = similarity({"a": a}, {"b": b}, measures=["cka"], groupby="label", **options)
    omitted = 0
    for group in range(3):
        alone = cka(a.isel(datapoint=labels == group), b.isel(datapoint=labels == group), **options)
        assert float(grouped["cka"].sel(label=group)) == pytest.approx(float(alone["cka"]), abs=GROUP_TOL)
        assert float(swept["cka"].sel(label=group).item()) == pytest.approx(float(alone["cka"]), abs=GROUP_TOL)
        assert int(grouped["rows"].sel(label=group)) == int(alone["rows"])
        omitted += alone.attrs["rows_omitted"]
    assert grouped.attrs["rows_omitted"] == omitted > 0
    # a row a datapoint (last), in chunks of one datapoint: chunks none of whose datapoints a group's stride keeps
    ones = {"datapoint": 1}
    grouped = cka(a.chunk(ones), b.chunk(ones), groupby="label", spatial="last", **options)
    for group in range(3):
        alone = cka(a.isel(datapoint=labels == group), b.isel(datapoint=labels == group), spatial="last", **options)
        assert float(grouped["cka"].sel(label=group)) == pytest.approx(float(alone["cka"]), abs=GROUP_TOL)
        assert int(grouped["rows"].sel(label=group)) == int(alone["rows"])
    # errors name the datapoint as the layers number it; a value the group's stride skips is not read as a row
    x[7] = 1.0
    x[40, 4, 1] = x[41, 1, 1] = np.nan  # 40: 14th of group 1, its row 69 skipped; 41: 14th of group 2, row 66 kept
    a = xr.DataArray(x, dims=dims, name="a", coords={"label": ("datapoint", labels)}).chunk({"datapoint": 17})
    with pytest.raises(chunkcca.engine.NonFiniteError, match="layer 'a' holds NaN or Inf at datapoint 41;"):
        cka(a, b.drop_vars("mask"), groupby="label", stride=2)
    empty = np.ones((n, tokens), dtype=bool)
    empty[52] = False  # the 18th of group 1: its rows 85 to 89, two of which the stride keeps
    a = a.fillna(0).assign_coords(mask=(("datapoint", "token"), empty))
    with pytest.raises(ValueError, match="layer 'a': datapoint 52 has no real position"):
        cka(a, b.drop_vars("mask"), groupby="label", stride=2)


@pytest.mark.parametrize("spatial", ["avgpool", "last"])
def test_a_datapoint_without_real_positions_that_its_groups_stride_skips_is_no_error(spatial):
    """The check before the pass took the whole run's stride: a datapoint with no real position that its group's
    stride skips (the second of its group, stride 2) was refused, though the group alone gives a value (found by
    review). One that its group's stride keeps is still refused, naming it."""
    rng = np.random.default_rng(7)
    n, tokens = 30, 4
    x = rng.standard_normal((n, tokens, 2))
    y = rng.standard_normal((n, tokens, 2)) + x
    labels = np.arange(n) % 2  # datapoint 2 is the second of group 0
    mask = np.ones((n, tokens), dtype=bool)
    mask[2] = False  # the whole run's stride 2 keeps datapoint 2; group 0's skips it

    def layers(mask: np.ndarray) -> tuple[xr.DataArray, xr.DataArray]:
        coords = {"label": ("datapoint", labels), "mask": (("datapoint", "token"), mask)}
        dims = ("datapoint", "token", "channel")
        return (xr.DataArray(x, dims=dims, name="a", coords=coords).chunk({"datapoint": 7}),
                xr.DataArray(y, dims=dims, name="b", coords=coords).chunk({"datapoint": 11}))
    a, b = layers(mask)
    grouped = cka(a, b, spatial=spatial, stride=2, groupby="label", precision="float64")
    alone = cka(a.isel(datapoint=labels == 0), b.isel(datapoint=labels == 0), spatial=spatial, stride=2,
                precision="float64")
    assert float(grouped["cka"].sel(label=0)) == pytest.approx(float(alone["cka"]), abs=GROUP_TOL)
    assert int(grouped["rows"].sel(label=0)) == int(alone["rows"]) == 8
    mask[2], mask[4] = True, False  # datapoint 4, the third of group 0: its stride keeps it
    with pytest.raises(ValueError, match="layer 'a': datapoint 4 has no real position"):
        cka(*layers(mask), spatial=spatial, stride=2, groupby="label")


def test_folds_under_flatten_with_other_paddings_on_each_side():
    """Folds took each row's fold from the first side's own mask, not the positions real on both sides that
    flatten keeps: layers padded differently failed with an IndexError (a regression found by review)."""
    rng = np.random.default_rng(2)
    n, tokens = 20, 4
    x = rng.standard_normal((n, tokens, 2))
    y = rng.standard_normal((n, tokens, 2)) + x
    mask_b = np.ones((n, tokens), dtype=bool)
    mask_b[3, 3] = False  # b pads a position a keeps
    dims = ("datapoint", "token", "channel")
    a = xr.DataArray(x, dims=dims, name="a").chunk({"datapoint": 20})
    b = xr.DataArray(y, dims=dims, name="b", coords={"mask": (("datapoint", "token"), mask_b)}).chunk({"datapoint": 20})
    folded = compare(a, b, measures=["cka"], folds=2, precision="float64")
    assert float(folded["cka"]) == pytest.approx(float(cka(a, b, precision="float64")["cka"]), abs=1e-12)
    kept = mask_b.reshape(-1)
    rows_x, rows_y = x.reshape(-1, 2)[kept], y.reshape(-1, 2)[kept]
    half = kept.reshape(n, tokens)[: n // 2].sum()  # the first fold's rows: its datapoints' real positions
    leave_outs = []
    for rest in (slice(half, None), slice(0, half)):
        u, v = rows_x[rest] - rows_x[rest].mean(0), rows_y[rest] - rows_y[rest].mean(0)
        leave_outs.append(np.linalg.norm(u.T @ v) ** 2 / (np.linalg.norm(u.T @ u) * np.linalg.norm(v.T @ v)))
    assert float(folded["cka_se"]) == pytest.approx(np.sqrt(0.5 * np.sum((np.array(leave_outs)
                                                                           - np.mean(leave_outs)) ** 2)), abs=1e-12)


def test_the_group_coordinate_may_be_on_either_layer():
    """Labels on side a alone were taken, on side b alone refused (the first layer's coordinates were read): the
    labels name datapoints, which the layers share, so either side's serve, and the values are the same."""
    a, b = _labelled()
    want = cca(a, b, groupby="label", precision="float64")["rho_mean"]
    for pair in ((a, b.drop_vars("label")), (a.drop_vars("label"), b)):
        xr.testing.assert_allclose(cca(*pair, groupby="label", precision="float64")["rho_mean"], want, rtol=1e-12)
    with pytest.raises(ValueError, match=r"groupby='label' \(--groupby label\): layer 'a' has no coordinate 'label' on "
                                         r"datapoint"):
        cca(a.drop_vars("label"), b.drop_vars("label"), groupby="label")
    with pytest.raises(ValueError, match=r"groupby='datapoint' \(--groupby datapoint\): the datapoint labels would "
                                         r"make each datapoint a group of its own"):  # said "it has none but datapoint"
        cca(a, b, groupby="datapoint")
    with pytest.raises(ValueError, match=r"folds='datapoint' .* each datapoint a fold of its own; give folds=K"):
        compare(a, b, folds="datapoint")


def test_groups_in_compare_similarity_and_compute_moments():
    a, b = _labelled(1)
    labels = a["label"].values
    moments = compute_moments(a, b, groupby="label", precision="float64")
    assert list(moments) == ["cat", "dog", "eel"] and sum(moments.values()).n == a.sizes["datapoint"] * 6
    result = compare(a, b, measures=["cka", "mean_cca"], groupby="label", precision="float64")
    sweep = similarity({"a": a}, {"b": b}, measures=["cka"], groupby="label", precision="float64")
    for group in ("cat", "dog", "eel"):
        want = float(cka(a.values[labels == group], b.values[labels == group], precision="float64")["cka"])
        assert float(result["cka"].sel(label=group)) == pytest.approx(want, rel=GROUP_TOL)
        assert float(sweep["cka"].sel(label=group).item()) == pytest.approx(want, rel=GROUP_TOL)
        assert float(chunkcca.cka_from_moments(moments[group])["cka"]) == pytest.approx(want, rel=GROUP_TOL)


def _folds(n: int, k: int) -> list[np.ndarray]:
    return np.array_split(np.arange(n), k)


def _cca_directions(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical directions of in-memory rows (brute force: covariances, inverse square roots, an SVD)."""
    cx, cy, cxy = np.cov(x.T), np.cov(y.T), (x - x.mean(0)).T @ (y - y.mean(0)) / (len(x) - 1)
    wx, wy = (np.real(scipy.linalg.inv(scipy.linalg.sqrtm(c))) for c in (cx, cy))
    u, _, vt = np.linalg.svd(wx @ cxy @ wy)
    k = min(x.shape[1], y.shape[1])
    return wx @ u[:, :k], wy @ vt.T[:, :k]


def test_heldout_cca_predictivity_and_jackknife_equal_brute_force_over_the_same_folds():
    rng = np.random.default_rng(4)
    n, k = 300, 4
    x = rng.standard_normal((n, 6)) + 2.0
    y = x[:, :3] @ rng.standard_normal((3, 5)) + rng.standard_normal((n, 5))
    result = compare(da.from_array(x, chunks=41), da.from_array(y, chunks=64), folds=k, precision="float64",
                     measures=["mean_cca", "cka", "heldout_cca", "predictivity"], ridge=0.05, confidence=0.9)
    held, predicted, leave_out = [], [], {"mean_cca": [], "cka": []}
    for test in _folds(n, k):
        train = np.setdiff1d(np.arange(n), test)
        wa, wb = _cca_directions(x[train], y[train])
        held.append([np.corrcoef(x[test] @ wa[:, c], y[test] @ wb[:, c])[0, 1] for c in range(wa.shape[1])])
        cov = np.cov(np.hstack([x[train], y[train]]).T)
        c_aa, c_ab = cov[:6, :6], cov[:6, 6:]
        weights = np.linalg.solve(c_aa + 0.05 * np.mean(np.diag(c_aa)) * np.eye(6), c_ab)
        prediction = (x[test] - x[train].mean(0)) @ weights
        predicted.append([np.corrcoef(prediction[:, j], y[test][:, j])[0, 1] for j in range(5)])
        leave_out["mean_cca"].append(canonical_correlations(x[train], y[train]).mean())
        gram_x, gram_y = (m - m.mean(0) for m in (x[train], y[train]))
        leave_out["cka"].append(np.linalg.norm(gram_x.T @ gram_y) ** 2 / (np.linalg.norm(gram_x.T @ gram_x)
                                                                       * np.linalg.norm(gram_y.T @ gram_y)))
    np.testing.assert_allclose(result["heldout_rho"], np.mean(held, axis=0), atol=FOLD_TOL)
    assert float(result["heldout_cca"]) == pytest.approx(np.mean(held), abs=FOLD_TOL)
    np.testing.assert_allclose(result["predictivity_per_channel"], np.mean(predicted, axis=0), atol=FOLD_TOL)
    assert float(result["predictivity"]) == pytest.approx(np.median(np.mean(predicted, axis=0)), abs=FOLD_TOL)
    assert result.attrs["folds"] == k and "folds_by" not in result.attrs  # K is recorded, and saved with it
    t = student.ppf(0.95, k - 1)
    for measure, values in leave_out.items():
        values = np.asarray(values)
        se = np.sqrt((k - 1) / k * ((values - values.mean()) ** 2).sum())
        assert float(result[f"{measure}_se"]) == pytest.approx(se, rel=FOLD_TOL)
        np.testing.assert_allclose(result[f"{measure}_ci"], float(result[measure]) + np.array([-t, t]) * se,
                                   rtol=FOLD_TOL)
    per_fold = np.mean(held, axis=1)
    loo = (per_fold.sum() - per_fold) / (k - 1)
    assert float(result["heldout_cca_se"]) == pytest.approx(np.sqrt((k - 1) / k * ((loo - loo.mean()) ** 2).sum()),
                                                            rel=FOLD_TOL)
    # predictivity is a median over channels of means over folds: each leave-out the median of the others' means
    predicted = np.asarray(predicted)
    loo = np.median([(predicted.sum(0) - predicted[i]) / (k - 1) for i in range(k)], axis=1)
    assert float(result["predictivity_se"]) == pytest.approx(np.sqrt((k - 1) / k * ((loo - loo.mean()) ** 2).sum()),
                                                             rel=FOLD_TOL)


def test_a_correlation_undefined_in_a_held_out_fold_is_left_out_not_counted_as_zero():
    """Layer b constant in fold 0 (dead units): its held-out correlations there are 0/0, which were counted as 0
    and averaged in (heldout_cca 0.393 against 0.590 over the folds where it is defined), silently. They are
    NaN in that fold now, left out of the means over folds (and of the jackknife's), with a warning; the
    values equal brute force over the other folds."""
    rng = np.random.default_rng(0)
    n, k = 30, 3
    x = rng.standard_normal((n, 4))
    y = x[:, :3] + rng.standard_normal((n, 3))
    y[:10] = 0
    with pytest.warns(RuntimeWarning, match=r"heldout_cca: 3 held-out correlations are undefined \(a canonical "
                                            r"variate does not vary in the held-out fold 0\)"), \
            pytest.warns(RuntimeWarning, match=r"predictivity: 3 held-out correlations are undefined \(a channel of "
                                               r"b, or its prediction, does not vary in the held-out fold 0\)"):
        result = compare(x, y, folds=k, precision="float64", measures=["heldout_cca", "predictivity"], ridge=0.05)
    held, predicted = [], []
    for test in _folds(n, k)[1:]:
        train = np.setdiff1d(np.arange(n), test)
        wa, wb = _cca_directions(x[train], y[train])
        held.append([np.corrcoef(x[test] @ wa[:, c], y[test] @ wb[:, c])[0, 1] for c in range(wa.shape[1])])
        cov = np.cov(np.hstack([x[train], y[train]]).T)
        weights = np.linalg.solve(cov[:4, :4] + 0.05 * np.mean(np.diag(cov[:4, :4])) * np.eye(4), cov[:4, 4:])
        prediction = (x[test] - x[train].mean(0)) @ weights
        predicted.append([np.corrcoef(prediction[:, j], y[test][:, j])[0, 1] for j in range(3)])
    np.testing.assert_allclose(result["heldout_rho"], np.mean(held, axis=0), atol=FOLD_TOL)
    assert float(result["heldout_cca"]) == pytest.approx(np.mean(held), abs=FOLD_TOL)
    np.testing.assert_allclose(result["predictivity_per_channel"], np.mean(predicted, axis=0), atol=FOLD_TOL)
    assert np.isfinite(result["heldout_cca_se"]) and np.isfinite(result["predictivity_se"])


def test_components_beyond_a_fit_s_rank_count_as_zero_not_undefined():
    """A dead unit on the narrower side makes every fit one direction short: that component's coefficients are 0
    (as its ρ), so its held-out correlation is 0, not undefined; made NaN, it made heldout_cca NaN (0.567
    before), with a warning that blamed every fold."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4))
    y = x[:, :3] @ rng.standard_normal((3, 3)) + rng.standard_normal((300, 3))
    y[:, 2] = 0.0  # b, the narrower side, has 2 live channels: the fits have 2 directions of 3 components
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compare(x, y, folds=3, measures=["heldout_cca"], precision="float64")
    held = []
    for test in _folds(300, 3):
        train = np.setdiff1d(np.arange(300), test)
        wa, wb = _cca_directions(x[train], y[train][:, :2])
        held.append([np.corrcoef(x[test] @ wa[:, c], y[test][:, :2] @ wb[:, c])[0, 1] for c in range(2)] + [0.0])
    np.testing.assert_allclose(result["heldout_rho"], np.mean(held, axis=0), atol=FOLD_TOL)
    assert float(result["heldout_cca"]) == pytest.approx(np.mean(held), abs=FOLD_TOL)
    assert np.isfinite(result["heldout_cca_se"])


def test_held_out_cca_warns_when_its_fits_have_no_more_rows_than_channels():
    """16 rows, 12 + 5 channels, 2 folds: each fit has 8 rows, every in-sample correlation is 1 and the directions
    are not unique, so heldout_cca moved with the channels' scale, order and chunking (0.278, 0.327, 0.324),
    silently. It warns now, naming the remedy; epsilon > 0 makes the fit unique."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 12))
    y = x[:, :5] + rng.standard_normal((16, 5))
    with pytest.warns(RuntimeWarning, match=r"heldout_cca: without fold 0 the fit has 8 rows for 17 channels.*pass "
                                            r"epsilon > 0"):
        compare(x, y, folds=2, measures=["heldout_cca"], precision="float64")
    values = [float(compare(a, y, folds=2, measures=["heldout_cca"], epsilon=0.1, precision="float64")
                    ["heldout_cca"]) for a in (x, x[:, ::-1])]  # the channels in another order: the same fit
    assert values[0] == pytest.approx(values[1], abs=1e-10)


def test_a_jackknife_replicate_that_is_undefined_says_so():
    """b varies in fold 0 only: CKA of all the data is defined, CKA without fold 0 is not. compare raised "CKA is
    undefined: layer 'b' has no variance" as if the data had none, and similarity warned that cka was NaN
    while returning it; both now name the jackknife and the fold."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 3))
    y[10:] = 0
    with pytest.raises(ValueError, match=r"the jackknife of cka needs it with each fold left out in turn, and "
                                         r"without fold 0 it is undefined: CKA is undefined"):
        compare(x, y, measures=["cka"], folds=3)
    with pytest.warns(RuntimeWarning, match=r"cka_se and cka_ci of 'x' and 'y' are NaN: the jackknife of cka"):
        swept = similarity({"x": x}, {"y": y}, measures=["cka"], folds=3)
    assert np.isfinite(swept["cka"]).all() and np.isnan(swept["cka_se"]).all()
    # heldout_cca fitted without fold 0 said "layer 'b' has no variance", naming no fold, though b varies
    with pytest.raises(ValueError, match=r"heldout_cca cannot be fitted without fold 0 \(on the other folds' rows\): "
                                         r"CCA is undefined: layer 'b' has no variance"):
        compare(x, y, measures=["heldout_cca"], folds=3)


@pytest.mark.parametrize("k", [2, 3, 5, 8, 64])
def test_each_folds_training_moments_take_o_k_log_k_merges(k, monkeypatch):
    """Every fold's training Moments (all folds but it) merged K − 1 folds each, K² merges in all: --folds 500
    of a 1000 x 200 pair did not end in 90 s. Halves are now merged once and handed down: the same Moments (to
    rounding, against numpy on the rows left in) in at most K log2 K merges."""
    from chunkcca.measures import _leave_outs
    from chunkcca.moments import partial_from_rows, unpack

    rng = np.random.default_rng(k)
    rows = rng.standard_normal((10 * k, 3)) + 5
    folds = [unpack(partial_from_rows([rows[i::k, :1], rows[i::k, 1:]], "float64"), (1, 2)) for i in range(k)]
    merges = []
    add = Moments.__add__
    monkeypatch.setattr(Moments, "__add__", lambda self, other: merges.append(1) or add(self, other))
    trained = list(_leave_outs(folds))
    assert len(merges) <= k * max(1, np.log2(k))
    for fold, moments in enumerate(trained):
        kept = np.concatenate([rows[i::k] for i in range(k) if i != fold])
        assert moments.n == len(kept)
        np.testing.assert_allclose(moments.mean, kept.mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(moments.covariance(), np.cov(kept, rowvar=False), rtol=1e-12)


def test_groups_of_a_coordinate_named_fold_are_groups_not_folds():
    """groupby="fold" (a user's coordinate of that name) was taken for folds: each measure got a jackknife over
    the groups instead of one value per group. Each group's value now equals the measure on its own rows."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 4))
    y = x @ rng.standard_normal((4, 3)) + rng.standard_normal((90, 3))
    labels = np.repeat([0, 1, 2], 30)
    a = xr.DataArray(x, dims=("datapoint", "channel"), coords={"fold": ("datapoint", labels)})
    result = compare(a, y, groupby="fold", measures=["mean_cca"], precision="float64")
    swept = similarity({"a": a}, {"b": y}, groupby="fold", measures=["mean_cca"], precision="float64")
    assert "mean_cca_se" not in result and "mean_cca_se" not in swept and "folds" not in result.attrs
    for group in range(3):
        rows = labels == group
        want = canonical_correlations(x[rows], y[rows]).mean()
        assert float(result["mean_cca"].sel(fold=group)) == pytest.approx(want, abs=1e-12)
        assert float(swept["mean_cca"].sel(fold=group, layer_a="a", layer_b="b")) == pytest.approx(want, abs=1e-12)


def test_folds_by_coordinate_and_several_ridges():
    a, b = _labelled(2, n=120, p=3, q=3)
    by_label = compare(a, b, measures=["predictivity"], folds="label", ridge=[0.0, 0.1, 10.0], precision="float64")
    assert by_label["predictivity"].dims == ("ridge",) and by_label["predictivity_ci"].dims == ("ridge", "bound")
    assert list(compute_moments(a, b, folds="label")) == ["cat", "dog", "eel"]
    assert by_label["predictivity"].sel(ridge=10.0) <= by_label["predictivity"].sel(ridge=0.0) + 0.05


def test_a_fold_much_smaller_than_the_others_is_warned_of():
    """A 2-datapoint fold (its held-out correlations are ±1) moved heldout_cca from 0.62 to 0.55 silently: folds
    are averaged unweighted."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, 3))
    x, y = z @ rng.standard_normal((3, 6)) + rng.standard_normal((300, 6)), z + rng.standard_normal((300, 3))
    folds = np.repeat([0, 1, 2], [180, 118, 2])
    a, b = (xr.DataArray(v, dims=("datapoint", "channel"), coords={"fold": ("datapoint", folds)}) for v in (x, y))
    with pytest.warns(RuntimeWarning, match=r"1 fold has fewer than half the rows of the median fold \(118\): 2 \(2\)"):
        compare(a, b, measures=["heldout_cca"], folds="fold", precision="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(x, y, measures=["heldout_cca"], folds=3, precision="float64")  # folds of equal size


def test_a_fold_whose_every_row_is_omitted_leaves_the_jackknife_and_the_held_out_folds():
    """nan_policy="omit" emptying fold 1 of 4: the jackknife counted it (K = 4, its leave-out the full data; SE
    0.0210 against 0.0195 over the 3 folds that keep rows) and heldout_cca refused it; now both use the other
    folds, with a warning naming the emptied one, and record K = 3. Fewer than 2 folds left is an error."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 6))
    y = x @ rng.standard_normal((6, 5)) + rng.standard_normal((80, 5))
    x[20:40, 0] = np.nan
    kept = [np.arange(0, 20), np.arange(40, 60), np.arange(60, 80)]
    leave_outs = np.array([canonical_correlations(np.delete(x, fold, 0)[~np.isnan(np.delete(x, fold, 0)[:, 0])],
                                                  np.delete(y, fold, 0)[~np.isnan(np.delete(x, fold, 0)[:, 0])]).mean()
                           for fold in kept])
    se = np.sqrt(2 / 3 * ((leave_outs - leave_outs.mean()) ** 2).sum())
    held = []
    for test in kept:
        train = np.setdiff1d(np.concatenate(kept), test)
        wa, wb = _cca_directions(x[train], y[train])
        held.append(np.mean([np.corrcoef(x[test] @ wa[:, c], y[test] @ wb[:, c])[0, 1] for c in range(5)]))
    message = (r"fold 1 keeps no row \(nan_policy='omit' left them out\); the jackknife and held-out measures use "
               r"the other 3")
    with pytest.warns(RuntimeWarning, match=message):
        result = compare(da.from_array(x, chunks=30), y, measures=["mean_cca", "heldout_cca"], folds=4,
                         nan_policy="omit", precision="float64")
    assert float(result["mean_cca_se"]) == pytest.approx(se, rel=FOLD_TOL) and result.attrs["folds"] == 3
    assert float(result["heldout_cca"]) == pytest.approx(np.mean(held), abs=FOLD_TOL)
    flat = y.copy()
    flat[:60] = 1.0  # b varies in fold 3 alone: fitted without it, undefined (it said "without fold 2", review)
    with pytest.warns(RuntimeWarning, match=message), pytest.raises(ValueError, match=r"without fold 3 \(on the"):
        compare(x, flat, measures=["heldout_cca"], folds=4, nan_policy="omit", precision="float64")
    with pytest.warns(RuntimeWarning, match=message):
        sweep = similarity({"x": x}, {"y": y}, measures=["mean_cca"], folds=4, nan_policy="omit", precision="float64")
    assert float(sweep["mean_cca_se"].item()) == pytest.approx(se, rel=FOLD_TOL) and sweep.attrs["folds"] == 3
    assert "2 degrees of freedom" in sweep["mean_cca_ci"].attrs["long_name"]
    x[40:, 0] = np.nan
    with pytest.raises(ValueError, match=r"folds 1, 2, 3 keep no row \(nan_policy='omit' left them out\): 1 of the "
                                         r"4 folds keep rows; folds need at least 2"):
        compare(x, y, measures=["mean_cca"], folds=4, nan_policy="omit")


def test_a_sweep_pair_undefined_in_a_group_is_nan_there_with_a_warning_naming_the_group():
    """similarity's warning for a layer constant within groups 1 and 2 named neither group (twice the same line)
    and pointed into chunkcca, not at the user's call; compare makes it an error naming the group."""
    rng = np.random.default_rng(0)
    x, z = rng.standard_normal((90, 4)), rng.standard_normal((90, 3))
    z[30:] = 1.0
    grp = ("datapoint", np.repeat([0, 1, 2], 30))
    a, b = (xr.DataArray(v, dims=("datapoint", "channel"), coords={"grp": grp}) for v in (x, z))
    with pytest.warns(RuntimeWarning) as caught:
        result = similarity({"x": a}, {"z": b}, measures=["cka"], groupby="grp")
    assert [str(w.message) for w in caught] == [f"cka of 'x' and 'z' are NaN: layer 'z' has no varying channel in the "
                                                f"group grp={g}" for g in (1, 2)]
    assert {w.filename for w in caught} == {__file__}
    assert float(result["cka"].sel(grp=0).item()) == pytest.approx(float(cka(x[:30], z[:30])["cka"]), rel=GROUP_TOL)
    assert np.isnan(result["cka"].sel(grp=[1, 2])).all()
    with pytest.raises(ValueError, match=r"in the group grp=1"):
        compare(a, b, measures=["cka"], groupby="grp")


def test_a_group_emptied_by_omission_is_said_to_hold_no_rows_not_a_dead_layer():
    """Every row of group 1 holding a NaN, nan_policy="omit" left it none: the sweep warned that layer 'a' has
    no varying channel there, sending one looking for dead units; it now says the group holds 0 rows, once for
    all pairs."""
    rng = np.random.default_rng(0)
    x, z = rng.standard_normal((60, 3)), rng.standard_normal((60, 2))
    grp = ("datapoint", np.arange(60) % 3)
    x[grp[1] == 1, 0] = np.nan
    a, b = (xr.DataArray(v, dims=("datapoint", "channel"), coords={"grp": grp}) for v in (x, z))
    with pytest.warns(RuntimeWarning) as caught:
        result = similarity({"a": a}, {"b": b, "b2": b * 2}, measures=["cka", "mean_cca"], groupby="grp",
                            nan_policy="omit")
    said = [str(w.message) for w in caught if "NaN" in str(w.message)]
    assert said == ["cka, mean_cca of every pair are NaN: the layers hold 0 rows in the group grp=1, and a measure "
                    "needs at least 2"]
    assert np.isnan(result["cka"].sel(grp=1)).all() and not np.isnan(result["cka"].sel(grp=[0, 2])).any()


def test_groups_with_no_more_rows_than_the_pairs_channels_are_warned_of():
    """40 rows a group of two independent 32-channel layers gave mean ρ 0.86 in every group (25 of 32 ρ exactly
    1), silently: the warning compared the rows with the widest layer's 32 channels, not the pair's 64."""
    rng = np.random.default_rng(0)
    label = ("datapoint", np.arange(400) % 10)
    a, b = (xr.DataArray(rng.standard_normal((400, 32)), dims=("datapoint", "channel"), coords={"label": label})
            for _ in range(2))
    with pytest.warns(RuntimeWarning, match=r"10 groups of label have no more rows than the 64 channels of a pair "
                                            r"of layers: 0 \(40\).*; in each, the covariance is singular: "
                                            r"correlations are meaningless unless a ridge \(epsilon > 0\)"):
        grouped = compare(a, b, measures=["mean_cca"], groupby="label", precision="float64")
    assert float(grouped["mean_cca"].min()) > 0.8  # what the warning is about: ρ of 1 whatever the data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(compare(a, b, measures=["mean_cca"], precision="float64")["mean_cca"]) < 0.3  # 400 rows


def test_independent_data_in_sample_cca_is_high_held_out_near_zero():
    """p/n = 0.1: the in-sample mean canonical correlation of independent noise is far from 0; held out, ~0."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1000, 100)), rng.standard_normal((1000, 100))
    result = compare(x, y, measures=["mean_cca", "heldout_cca"], folds=5, precision="float64")
    assert float(result["mean_cca"]) > 0.25
    assert abs(float(result["heldout_cca"])) < 0.03


def test_each_chunk_is_read_once_with_groups_and_folds():
    reads: list = []

    def block(index: int) -> np.ndarray:
        reads.append(index)
        return np.random.default_rng(index).standard_normal((25, 4))

    layer = da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(25, 4), dtype=float) for i in range(6)])
    compare(layer, layer[:, :3] + 1, measures=["cka", "heldout_cca"], folds=4, precision="float64")
    assert sorted(reads) == list(range(6))


def test_the_auto_pilot_of_many_groups_holds_no_more_than_one_pass():
    """Under precision="auto" the pilot's Moments of every group were packed one by one and then stacked beside
    them: three sets of the groups' Moments at once, 73.8 MiB traced against 58.5 for float32 on 20 groups of a
    400-channel pair (the page says one set and their sum; found by audit). Now as float32 (58.6)."""
    import tracemalloc

    n, groups = 8000, 20
    a, b = (xr.DataArray(da.random.RandomState(seed).normal(size=(n, 200), chunks=(1000, 200)),
                         dims=("datapoint", "channel"), name=name, coords={"datapoint": np.arange(n)})
            for seed, name in ((0, "a"), (1, "b")))
    a = a.assign_coords(g=("datapoint", np.arange(n) % groups))
    compute_moments(a[:1000], b[:1000], precision="float32")  # what a first run imports is not traced
    peaks = {}
    for precision in ("float32", "auto"):
        tracemalloc.start()
        try:
            compute_moments(a, b, groupby="g", precision=precision, memory_limit="80MiB")
            peaks[precision] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    one = 402 * 400 * 8  # one group's Moments: the peaks differ by less than one
    assert peaks["auto"] <= peaks["float32"] + one, {key: value / 2**20 for key, value in peaks.items()}


def test_the_memory_of_every_group_is_checked_before_streaming():
    x = np.zeros((100, 40))
    x[:, 0] = np.arange(100)
    one = (80 + 2) * 80 * 8
    with pytest.raises(ValueError, match=r"80\^2 statistics for each of 10 groups = .* over memory_limit"):
        compare(x, x + 1, measures=["cka"], folds=10, memory_limit=3 * one * 5)
    with pytest.raises(ValueError, match="heldout_cca is measured on held-out folds: pass folds=K"):
        compare(x, x + 1, measures=["heldout_cca"])
    with pytest.raises(ValueError, match=r"groupby='kind' \(--groupby kind\): layer 'a' has no coordinate 'kind'"):
        cca(x, x + 1, groupby="kind")
    with pytest.raises(TypeError, match=r"cca\(\) takes groupby, not folds"):
        cca(x, x + 1, folds=3)
    kinds = xr.DataArray(x, dims=("datapoint", "channel")).assign_coords(kind=("datapoint", ["p"] * 99 + ["q"]))
    with pytest.raises(ValueError, match=r"1 of the 2 groups give fewer rows than the measures need \(every measure "
                                         r"needs at least 2; the first, kind='q', holds 1 datapoint\); leave their "
                                         r"datapoints out"):
        cca(kinds, kinds + np.arange(40), groupby="kind")


def test_unridged_predictivity_does_not_depend_on_a_channels_units():
    """Least squares is unchanged by the units of a's channels; lstsq's relative cutoff dropped a channel in units
    of 1e-9 (its variance 1e-18 of the others') at ridge=0, and the predictions lost it. Compared with brute force
    over the same folds, in float64 (tolerance: the solves' rounding on 300 rows)."""
    rng = np.random.default_rng(11)
    n, k = 300, 3
    x = rng.standard_normal((n, 4))
    y = x @ rng.standard_normal((4, 3)) + 0.3 * rng.standard_normal((n, 3))
    small = x * np.array([1.0, 1e-9, 1.0, 1.0])
    result = compare(small, y, folds=k, measures=["predictivity"], ridge=[0, 0.01], precision="float64")
    plain = compare(x, y, folds=k, measures=["predictivity"], ridge=0, precision="float64")
    np.testing.assert_allclose(result["predictivity_per_channel"].sel(ridge=0), plain["predictivity_per_channel"],
                               rtol=1e-9)
    dead = compare(np.hstack([small, np.zeros((n, 1))]), y, folds=k, measures=["predictivity"], ridge=0,
                   precision="float64")  # a dead channel beside it (it made the scaled solve fall back: 0.79)
    np.testing.assert_allclose(dead["predictivity_per_channel"], plain["predictivity_per_channel"], rtol=1e-9)
    for ridge in (0, 0.01):  # a ridge > 0 is relative to the mean variance, so the tiny channel is all but cut
        predicted = []
        for test in _folds(n, k):
            train = np.setdiff1d(np.arange(n), test)
            c_aa = np.cov(small[train], rowvar=False)
            c_ab = np.cov(small[train], y[train], rowvar=False)[:4, 4:]
            weights = np.linalg.solve(c_aa + ridge * np.mean(np.diag(c_aa)) * np.eye(4), c_ab)
            prediction = (small[test] - small[train].mean(0)) @ weights
            predicted.append([np.corrcoef(prediction[:, j], y[test][:, j])[0, 1] for j in range(3)])
        np.testing.assert_allclose(result["predictivity_per_channel"].sel(ridge=ridge), np.mean(predicted, axis=0),
                                   rtol=1e-8)


def test_unridged_predictivity_of_a_layer_with_a_repeated_channel_is_that_without_it():
    """ridge=0 and a singular training covariance: the least-norm solution predicts as the layer without the
    repeated channel does (the same span), where a plain solve raised LinAlgError."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((90, 3))
    y = x[:, :2] + rng.standard_normal((90, 2))
    repeated = compare(np.hstack([x, x[:, :1]]), y, folds=3, measures=["predictivity"], ridge=0, precision="float64")
    plain = compare(x, y, folds=3, measures=["predictivity"], ridge=0, precision="float64")
    np.testing.assert_allclose(repeated["predictivity_per_channel"], plain["predictivity_per_channel"], atol=1e-10)


@pytest.mark.parametrize("ridge", [-0.5, float("nan"), [0.1, -2.0], []])
def test_predictivity_from_folds_refuses_a_ridge_compare_refuses(ridge):
    """predictivity_from_folds took any ridge: a NaN gave the unridged solution and a negative one a result,
    silently, where compare(ridge=...) refuses both."""
    from chunkcca.measures import predictivity_from_folds

    rng = np.random.default_rng(3)
    x = rng.standard_normal((90, 3))
    folds = list(compute_moments(x, x[:, :2] + rng.standard_normal((90, 2)), folds=3).values())
    with pytest.raises(ValueError, match="ridge"):
        compare(x, x[:, :2], folds=3, measures=["predictivity"], ridge=ridge)
    with pytest.raises(ValueError, match="ridge"):
        predictivity_from_folds(folds, ridge=ridge)


def test_two_folds_of_other_channels_layers_or_rows_are_refused_as_more_are():
    """With K = 2 the folds were never merged, so nothing compared them: a fold whose channels came in another
    order gave heldout_cca 0.149 for 0.587 and predictivity -0.046 for 0.858, silently (K >= 3 refused it)."""
    from chunkcca.measures import heldout_cca_from_folds, predictivity_from_folds

    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 4))
    y = x[:, :3] @ rng.standard_normal((3, 3)) + 0.5 * rng.standard_normal((200, 3))
    a, b = (xr.DataArray(v, dims=("datapoint", "channel"), coords={"channel": np.arange(v.shape[1])}, name=name)
            for v, name in ((x, "a"), (y, "b")))
    first = compute_moments(a[:100], b[:100], precision="float64")
    permuted = compute_moments(a[100:, ::-1], b[100:], precision="float64")  # a's channels in reverse, labelled so
    other = compute_moments(a[100:], b[100:].rename("c"), precision="float64")
    same = compute_moments(a[100:], b[100:], precision="float64")
    for solve in (heldout_cca_from_folds, predictivity_from_folds):
        for fold, why in ((permuted, "channels labelled otherwise"), (other, "layers")):
            with pytest.raises(ValueError, match=rf"fold 1 is not of the same layers and rows as fold 0: .*{why}"):
                solve([first, fold])
            with pytest.raises(ValueError, match=why):
                solve([first, same, fold])  # as K >= 3 refused it
        solve([first, same])
    spectra = list(compute_moments(np.random.default_rng(1).standard_normal((40, 4, 4, 2)),
                                   np.random.default_rng(2).standard_normal((40, 4, 4, 3)), spatial="dft",
                                   folds=2).values())
    for solve in (heldout_cca_from_folds, predictivity_from_folds):  # dft's failed inside numpy's einsum
        with pytest.raises(ValueError, match=r"compares two sides of real, unbatched Moments .* batch \(4, 4\)"):
            solve(spectra)
    with pytest.raises(TypeError, match=r"cca solves Moments, got a dict \(compute_moments gives one per group or "
                                        r"fold: pass one of its Moments, or their sum\)"):  # an AttributeError
        chunkcca.cca_from_moments(compute_moments(a, b, folds=2))


def test_debiased_cka_of_fewer_than_4_rows_is_nan_in_a_sweep_as_documented():
    """A group of 3 rows ended the whole sweep ("debiased CKA needs at least 4 rows, have 3"), and so did the
    jackknife of 2 folds of 3 rows; the docs give the pair NaN there, with a warning."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((43, 3))
    y = x[:, :2] + rng.standard_normal((43, 2))
    grp = ("datapoint", np.array(["big"] * 40 + ["small"] * 3))
    a, b = (xr.DataArray(v, dims=("datapoint", "channel"), coords={"grp": grp}) for v in (x, y))
    with pytest.warns(RuntimeWarning, match=r"cka_debiased of .* is NaN: debiased CKA needs at least 4 rows, have 3 "
                                            r"in the group grp='small'"):
        swept = similarity({"a": a}, {"b": b}, measures=["cka", "cka_debiased"], groupby="grp", precision="float64")
    assert np.isnan(float(swept["cka_debiased"].sel(grp="small").item()))
    assert float(swept["cka_debiased"].sel(grp="big").item()) == pytest.approx(
        float(cka(x[:40], y[:40], debiased=True, precision="float64")["cka"]), rel=1e-10)
    assert not np.isnan(float(swept["cka"].sel(grp="small").item()))
    with pytest.warns(RuntimeWarning, match=r"cka_debiased_se and cka_debiased_ci of .* are NaN: .*without fold 0 it "
                                            r"is undefined: debiased CKA needs at least 4 rows, have 3"):
        folded = similarity({"a": x[:6]}, {"b": y[:6]}, measures=["cka_debiased"], folds=2, precision="float64")
    assert not np.isnan(float(folded["cka_debiased"].item())) and np.isnan(float(folded["cka_debiased_se"].item()))


def test_a_group_with_no_more_rows_than_channels_is_named_in_a_warning():
    """A group of 3 rows and 5 channels gave svcca and pwcca 1.0 silently, while the same rows ungrouped warn."""
    rng = np.random.default_rng(9)
    labels = np.array(["cat"] * 100 + ["dog"] * 100 + ["eel"] * 3)
    coords = {"label": ("datapoint", labels)}
    a = xr.DataArray(rng.standard_normal((203, 5)), dims=("datapoint", "channel"), name="a", coords=coords)
    b = xr.DataArray(rng.standard_normal((203, 4)), dims=("datapoint", "channel"), name="b", coords=coords)
    message = r"1 group of label has no more rows than the 9 channels of a pair of layers: 'eel' \(3\)"
    for call in (lambda: compare(a, b, groupby="label", measures=["svcca", "pwcca"]),
                 lambda: cca(a, b, groupby="label"),
                 lambda: similarity({"a": a}, {"b": b}, groupby="label", measures=["cka", "pwcca"])):
        with pytest.warns(RuntimeWarning, match=message) as caught:
            call()
        assert {record.filename for record in caught} == {__file__}  # the user's call, and no xarray warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(a, b, folds=2, measures=["cka"])  # folds are measured on the rest
        similarity({"a": a}, {"b": b}, groupby="label", measures=["cka"])  # CKA inverts no covariance
        cca(a.isel(datapoint=slice(0, 200)), b.isel(datapoint=slice(0, 200)), groupby="label")


def test_layers_that_label_their_groups_differently_are_refused():
    """groupby took side a's labels silently: swapping the layers changed the result ([0.54 0.43 0.48] against
    [0.61 0.51 0.37])."""
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((90, 3)), rng.standard_normal((90, 2))
    a = xr.DataArray(x, dims=("datapoint", "channel"), name="a", coords={"g": ("datapoint", np.arange(90) % 3)})
    b = xr.DataArray(y, dims=("datapoint", "channel"), name="b", coords={"g": ("datapoint", np.arange(90) // 30)})
    message = r"groupby='g' \(--groupby g\): layers '(a|b)' and '(a|b)' label their datapoints differently in 'g'"
    for call in (lambda: cca(a, b, groupby="g"), lambda: cca(b, a, groupby="g"),
                 lambda: similarity({"a": a}, {"b": b}, measures=["cka"], groupby="g")):
        with pytest.raises(ValueError, match=message):
            call()
    assert cca(a, b.drop_vars("g"), groupby="g")["rho"].sizes["g"] == 3  # one side labelled: its labels
    assert cca(a, b.drop_vars("g").assign_coords(g=5), groupby="g")["rho"].sizes["g"] == 3  # not a datapoint label


def test_a_nan_group_label_is_refused():
    """A NaN label became a group of its own ("more than 1 rows" in group nan), or a fold of its own; so did NaT."""
    rng = np.random.default_rng(12)
    labels = np.where(np.arange(120) < 110, np.arange(120) % 2, np.nan)
    a = xr.DataArray(rng.standard_normal((120, 3)), dims=("datapoint", "channel"), name="a",
                     coords={"g": ("datapoint", labels)})
    b = a.rename("b")[:, :2]
    with pytest.raises(ValueError, match=r"groupby='g' \(--groupby g\): the coordinate 'g' of layer 'a' is NaN for 10 "
                                         r"datapoints"):
        cca(a, b, groupby="g")
    with pytest.raises(ValueError, match=r"folds='g' \(--folds g\): the coordinate 'g' of layer 'a' is NaN for 10"):
        compare(a, b, measures=["cka"], folds="g")
    # NaT, a time's NaN, was a group and a fold of its own
    days = np.where(np.arange(120) < 110, np.datetime64("2020-01-01") + np.arange(120) % 2, np.datetime64("NaT"))
    timed = a.assign_coords(g=("datapoint", days.astype("M8[ns]")))
    with pytest.raises(ValueError, match=r"groupby='g' \(--groupby g\): the coordinate 'g' of layer 'a' is NaT for 10 "
                                         r"datapoints"):
        cca(timed, b.drop_vars("g"), groupby="g")
    with pytest.raises(ValueError, match=r"folds='g' \(--folds g\): the coordinate 'g' of layer 'a' is NaT for 10"):
        compare(timed, b.drop_vars("g"), measures=["cka"], folds="g")
    # the same numbers held as Python objects: NaN sorted among them split a label into two groups and made each
    # NaN a group of its own, silently (found by audit)
    held = a.assign_coords(g=("datapoint", labels.astype(object)))
    with pytest.raises(ValueError, match=r"groupby='g' \(--groupby g\): the coordinate 'g' of layer 'a' is missing "
                                         r"\(NaN, NaT or None\) for 10 datapoints"):
        cca(held, b.drop_vars("g"), groupby="g")
    with pytest.raises(ValueError, match=r"folds='g' \(--folds g\): the coordinate 'g' of layer 'a' is missing "
                                         r"\(NaN, NaT or None\) for 10"):
        compare(held, b.drop_vars("g"), measures=["cka"], folds="g")


def test_each_groups_moments_record_the_layers_and_rows():
    a, b = _labelled(2)
    grouped = compute_moments(a, b, groupby="label", stride=3, precision="float64")
    assert {(m.layers, m.rows_from) for m in grouped.values()} == {(("a", "b"), "spatial='flatten', stride=3")}
    assert sum(grouped.values()).layers == ("a", "b")
    other = compute_moments(a, b.rename("c"), groupby="label", stride=3, precision="float64")
    with pytest.raises(ValueError, match=r"cannot merge Moments of layers \('a', 'b'\) and \('a', 'c'\)"):
        grouped["cat"] + other["dog"]


def test_a_measure_undefined_in_one_group_is_an_error_naming_the_group():
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1], [37, 3])
    a, b = (xr.DataArray(rng.standard_normal((40, p)), dims=("datapoint", "channel"),
                         coords={"g": ("datapoint", groups)}) for p in (3, 2))
    with pytest.raises(ValueError, match=r"1 of the 2 groups give fewer rows than the measures need \(debiased CKA "
                                         r"\(the unbiased HSIC\) needs at least 4; the first, g=1, holds 3"):
        compare(a, b, measures=["cka", "cka_debiased"], groupby="g")  # before the pass (it came after)
    message = r"debiased CKA needs at least 4 rows, have 3 in the group g=1"
    with pytest.warns(RuntimeWarning, match=message):  # a sweep named no group; it is NaN there, as documented
        swept = similarity({"a": a}, {"b": b}, measures=["cka_debiased"], groupby="g")
    assert np.isnan(swept["cka_debiased"].sel(g=1).item()) and not np.isnan(swept["cka_debiased"].sel(g=0).item())


def test_groups_too_small_for_a_measure_are_refused_before_the_pass(monkeypatch):
    """groupby a continuous coordinate (a group per datapoint) failed only after the whole pass ("hold 1 row"):
    the groups' datapoints are known from the coordinate, so a group that cannot give 2 rows is named first.
    Under flatten one datapoint of 2 x 2 positions gives its 4 rows, and Moments may hold a row."""
    rng = np.random.default_rng(0)
    coords = {"t": ("datapoint", np.linspace(0, 1, 40))}
    a = xr.DataArray(rng.standard_normal((40, 3)), dims=("datapoint", "channel"), coords=coords, name="a")
    b = a.copy(data=rng.standard_normal((40, 3))).rename("b")
    streamed = chunkcca.api.stream_layers
    monkeypatch.setattr(chunkcca.api, "stream_layers", lambda *args, **kwargs: pytest.fail("streamed"))
    for call in (lambda: chunkcca.cca(a, b, groupby="t"), lambda: chunkcca.similarity({"a": a}, {"b": b}, groupby="t")):
        with pytest.raises(ValueError, match=r"^groupby='t' \(--groupby t\): 40 of the 40 groups give fewer rows than "
                                             r"the measures need \(every measure needs at least 2; the first, t=0.0, "
                                             r"holds 1 datapoint\)"):
            call()
    pairs = {"t": ("datapoint", np.repeat(np.arange(20), 2))}  # groups of 2 rows: 4 for debiased CKA
    two, other = a.assign_coords(pairs), b.assign_coords(pairs)
    for call in (lambda: chunkcca.cka(two, other, groupby="t", debiased=True),
                 lambda: chunkcca.compare(two, other, measures=["cka_debiased"], groupby="t")):
        with pytest.raises(ValueError, match=r"20 of the 20 groups give fewer rows than the measures need \(debiased "
                                             r"CKA \(the unbiased HSIC\) needs at least 4; the first, t=0, holds 2"):
            call()
    with pytest.raises(ValueError, match=r"^layers 'a', 'b' give 3 rows: debiased CKA \(the unbiased HSIC\) needs at "
                                         r"least 4$"):
        chunkcca.cka(a[:3], b[:3], debiased=True)
    with pytest.raises(ValueError, match=r"^folds: without fold 0 the rest holds 2 datapoints, fewer rows than the "
                                         r"jackknife's leave-outs need \(debiased CKA"):
        chunkcca.compare(a[:5], b[:5], measures=["cka_debiased"], folds=2)  # it came after the pass
    monkeypatch.setattr(chunkcca.api, "stream_layers", streamed)
    assert len(chunkcca.compute_moments(a, b, groupby="t")) == 40
    maps = xr.DataArray(rng.standard_normal((40, 2, 2, 3)), dims=("datapoint", "height", "width", "channel"),
                        coords=coords, name="maps")
    assert chunkcca.cka(maps, maps.copy().rename("other"), groupby="t").sizes["t"] == 40


def test_auto_precision_judges_each_folds_leave_out():
    """Three folds, two of them ill-conditioned together (a's channels nearly collinear there, condition ~1e7):
    the pilot and the whole run are well conditioned, so "auto" kept float32 products, and the leave-out of the
    well-conditioned fold, which the jackknife and held-out fits solve, gave mean_cca_se 0.19 for 0.11."""
    rng = np.random.default_rng(40)

    def fold(n: int, collinear: bool) -> tuple[np.ndarray, np.ndarray]:
        if collinear:
            a = rng.standard_normal((n, 1)) @ np.ones((1, 6)) + 1e-3 * rng.standard_normal((n, 6)) + 5.0
            return a, (a - 5.0) @ rng.standard_normal((6, 4)) * 100 + rng.standard_normal((n, 4))
        a = 10 * rng.standard_normal((n, 6))
        return a, a[:, :4] @ rng.standard_normal((4, 4)) + 10 * rng.standard_normal((n, 4))

    parts = [fold(3000, False), fold(400, True), fold(400, True)]
    labels = ("datapoint", np.repeat([0, 1, 2], [3000, 400, 400]))
    a, b = (xr.DataArray(da.from_array(np.concatenate([part[side] for part in parts]), chunks=500),
                         dims=("datapoint", "channel"), coords={"fold": labels}) for side in (0, 1))
    measures = ["mean_cca", "heldout_cca"]
    auto = compare(a, b, measures=measures, folds="fold")
    exact = compare(a, b, measures=measures, folds="fold", precision="float64")
    assert auto.attrs["precision"] == "float64" and "without fold 0" in auto.attrs["precision_auto"]
    for name in ("mean_cca_se", "heldout_cca", "heldout_cca_se"):
        assert float(auto[name]) == pytest.approx(float(exact[name]), rel=1e-9), name


def test_a_fold_with_no_held_out_value_is_not_counted_in_the_jackknife():
    """Layer a constant within fold 0 of 3: its held-out value is undefined and the mean is of the other two,
    but the jackknife still counted it (its leave-out the full value) with K − 1 = 2 degrees of freedom: an
    interval 39% as wide as the two folds give."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((150, 3))
    a = z @ rng.standard_normal((3, 3)) + rng.standard_normal((150, 3))
    b = z @ rng.standard_normal((3, 3)) + rng.standard_normal((150, 3))
    a[:50] = 1.0
    with pytest.warns(RuntimeWarning, match="a fold with none defined is not counted in the jackknife"):
        got = compare(a, b, measures=["heldout_cca"], folds=3, precision="float64")
        per_fold = got["heldout_cca_per_fold"].values if "heldout_cca_per_fold" in got else None
        moments = list(compute_moments(a, b, folds=3, precision="float64").values())
        defined = chunkcca.measures.heldout_cca_from_folds(moments)["heldout_cca_per_fold"].values
    assert per_fold is None or np.isnan(per_fold[0])
    defined = defined[~np.isnan(defined)]
    se = defined.std(ddof=1) / np.sqrt(len(defined))  # the jackknife of a mean is its standard error
    half = student.ppf(0.975, len(defined) - 1) * se
    assert float(got["heldout_cca_se"]) == pytest.approx(se, rel=1e-10)
    np.testing.assert_allclose(got["heldout_cca_ci"].values, [defined.mean() - half, defined.mean() + half],
                               rtol=1e-10)
    assert "1 degree of freedom" in got["heldout_cca_ci"].attrs["long_name"]


def test_a_fold_of_one_row_is_refused_before_the_pass_when_a_held_out_measure_tests_on_it(monkeypatch):
    """heldout_cca and predictivity test on each fold: a fold of one row (of one datapoint, or one row a datapoint
    under a stride) was refused only after the whole pass; a fold the stride leaves no row is still left out."""
    rng = np.random.default_rng(8)
    maps = [xr.DataArray(rng.standard_normal((60, 4, 4, 3)), dims=("datapoint", "height", "width", "channel"),
                         name=name) for name in ("a", "b")]
    fc = [layer.isel(height=0, width=0) for layer in maps]
    streamed = chunkcca.api.stream_layers
    monkeypatch.setattr(chunkcca.api, "stream_layers", lambda *args, **kwargs: pytest.fail("streamed"))
    for call, said in ((lambda: compare(*fc, measures=["cka", "predictivity"], folds=40), "fold 20 holds 1 row "
                        r"\(of 1 datapoint\), and predictivity tests on each fold"),
                       (lambda: compare(*maps, measures=["heldout_cca"], folds=40, stride=16), "fold 20 holds 1 row "
                        r"\(of 1 datapoint\), and heldout_cca tests on each fold"),
                       (lambda: chunkcca.similarity({"a": fc[0]}, {"b": fc[1]}, folds=40,
                                                    measures=["heldout_cca", "predictivity"]),
                        "fold 20 holds 1 row .* and heldout_cca and "
                        "predictivity test on each fold")):
        with pytest.raises(ValueError, match=rf"^folds=40 \(--folds 40\): {said}, which needs at least 2; use fewer "
                                             r"folds$"):
            call()
    monkeypatch.setattr(chunkcca.api, "stream_layers", streamed)
    assert compare(*fc, measures=["predictivity"], folds=30).attrs["folds"] == 30  # 2 rows a fold
    assert compare(*fc, measures=["cka"], folds=40).attrs["folds"] == 40  # the jackknife leaves each one out
    labels = np.repeat([0, 1, 2], 20)
    labels[[1, 2]] = 9  # stride 3 keeps none of datapoints 1 and 2: that fold is left out, as before
    by_label = [layer.assign_coords(part=("datapoint", labels)) for layer in fc]
    with pytest.warns(RuntimeWarning, match=r"fold 9 keeps no row \(stride 3 keeps none of their rows\)"):
        assert compare(*by_label, measures=["heldout_cca"], folds="part", stride=3).attrs["folds"] == 3
    labels[[1, 2]] = [1, 9]  # fold 9: one datapoint, all NaN: left out as nan_policy="omit" empties it, as before
    by_label = [layer.assign_coords(part=("datapoint", labels)) for layer in fc]
    by_label[0] = by_label[0].where(by_label[0].datapoint != 2)
    with pytest.warns(RuntimeWarning, match=r"fold 9 keeps no row \(nan_policy='omit' left them out\)"):
        assert compare(*by_label, measures=["heldout_cca"], folds="part", nan_policy="omit").attrs["folds"] == 3


def test_folds_emptied_by_a_stride_and_leave_outs_of_too_few_rows_are_told_as_such():
    """Folds a stride emptied were blamed on nan_policy='omit' (not given); and 60 rows of 25 + 25 channels in 5
    folds left 48 rows in every leave-out (canonical correlations of 1: leave-outs 0.65 against 0.58 in all),
    with no word, where heldout_cca warned of exactly this."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal((40, 3))  # stride 10: datapoints 0, 10, 20, 30
    with pytest.warns(RuntimeWarning, match=r"folds 1, 3, 5, 7 keep no row \(stride 10 keeps none of their rows\); "
                                            r"the jackknife and held-out measures use the other 4 folds"):
        result = compare(x, y, measures=["cka"], folds=8, stride=10, precision="float64")
    assert result.attrs["folds"] == 4
    wide = rng.standard_normal((60, 25)), rng.standard_normal((60, 25))
    with pytest.warns(RuntimeWarning, match=r"5 of the 5 folds leave no more rows than the 50 channels of a pair "
                                            r"when left out: without 0 \(48\)"):
        compare(*wide, measures=["mean_cca"], folds=5, precision="float64")
    with warnings.catch_warnings():  # CKA inverts no covariance
        warnings.simplefilter("error")
        compare(*wide, measures=["cka"], folds=5, precision="float64")


def test_groups_and_folds_labelled_by_a_stores_strings_are_named_when_too_small(tmp_path):
    """String labels opened from a store are Python str, which has no .item(): a group or fold too small raised
    AttributeError in place of the error naming it (found by audit)."""
    rng = np.random.default_rng(61)
    tree = chunkcca.write_activations(
        tmp_path / "s.zarr", {name: rng.standard_normal((10, 3)) for name in ("a", "b")}, chunks=5,
        coords={"g": np.array(["x"] + ["y"] * 9), "f": np.array(["p", "q"] * 4 + ["r", "s"])})
    a, b = tree["a"], tree["b"]
    with pytest.raises(ValueError, match=r"groupby='g' .*1 of the 2 groups give fewer rows than the measures need .*"
                                         r"the first, g='x', holds 1 datapoint"):
        cka(a, b, groupby="g", spatial="avgpool")
    with pytest.raises(ValueError, match=r"folds='f' \(--folds f\): fold 'r' holds 1 row"):
        compare(a, b, measures=["heldout_cca"], folds="f")
    few = chunkcca.write_activations(tmp_path / "few.zarr", {name: rng.standard_normal((5, 3)) for name in ("a", "b")},
                                     coords={"f": np.array(["p", "q", "p", "q", "p"])})
    with pytest.raises(ValueError, match=r"^folds: without fold 'p' the rest holds 2 datapoints"):
        compare(few["a"], few["b"], measures=["cka_debiased"], folds="f")


def test_held_out_measures_undefined_in_every_fold_are_nan_with_their_errors(tmp_path):
    """A layer constant within each fold (varying between them): every held-out correlation is undefined.
    predictivity then failed building its result (the all-NaN leave-outs kept the channel axis its summary takes
    off), and heldout_cca reported NaN ± a standard error of 0.0 (found by audit). Both are NaN, errors too."""
    rng = np.random.default_rng(62)
    fold = np.repeat([0, 1, 2], 40)
    constant = np.outer(fold + rng.standard_normal(3)[fold], [1.0, 2.0])
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"b": rng.standard_normal((120, 3)), "e": constant},
                                      chunks=40, coords={"g": fold})
    for ridge in (0.01, [0.1, 1.0]):
        with pytest.warns(RuntimeWarning, match="undefined"):
            result = compare(tree["e"], tree["b"], measures=["heldout_cca", "predictivity"], folds="g", ridge=ridge)
        for name in ("heldout_cca", "predictivity"):
            for variable in (name, f"{name}_se", f"{name}_ci"):
                assert np.isnan(result[variable].values).all(), variable
        assert result["predictivity_se"].shape == np.shape(ridge)
    with pytest.warns(RuntimeWarning, match="undefined"):
        swept = similarity({"e": tree["e"]}, {"b": tree["b"]}, measures=["heldout_cca", "predictivity"], folds="g")
    assert np.isnan(swept["heldout_cca_se"].values).all() and np.isnan(swept["predictivity_se"].values).all()


def test_the_jackknife_of_an_undefined_value_is_undefined():
    from chunkcca.measures import jackknife

    spread, interval = jackknife(np.array([np.nan, 0.5]), np.array([[0.0, 0.4], [0.0, 0.6], [0.0, 0.5]]), 0.95)
    assert np.isnan(spread[0]) and np.isnan(interval[0]).all()
    assert spread[1] == pytest.approx(np.sqrt(2 / 3 * 0.02)) and interval[1, 0] < 0.5 < interval[1, 1]


def test_a_group_coordinate_named_like_a_part_of_the_result_is_refused_before_reading():
    """groupby='layer_a' labelled the groups as layers (the sweep's layer 'conv1' gone, silently); 'rows' and
    'component' failed in xarray's words after the whole pass (found by audit). Every name a result gives a dim,
    coordinate or variable is one ``is_result_name`` knows, so none can be taken for a group's."""
    from chunkcca.measures import MEASURES, is_result_name

    rng = np.random.default_rng(5)
    labels = np.where(np.arange(60) % 2 == 0, "even", "odd")

    def layer(channels: int, name: str, extra: str = "cls") -> xr.DataArray:
        return xr.DataArray(rng.standard_normal((60, 4, 4, channels)), dims=("datapoint", "height", "width", "channel"),
                            coords={extra: ("datapoint", labels)}, name=name)

    a, b = layer(3, "conv1"), layer(2, "fc")
    held_out = ("heldout_cca", "predictivity")
    results = [f(a, b, spatial="avgpool", groupby="cls") for f in (cca, svcca, pwcca, cka, procrustes, shape_metric)]
    results += [cca(a, b, spatial="dft", groupby="cls"), cka(a, b, spatial="features"),
                cka(a, b, minibatch=40), cka(a, b, spatial="avgpool", debiased=True, groupby="cls"),
                compare(a, b, measures=list(MEASURES), spatial="avgpool", folds=3, progress=False),
                compare(a, b, measures=[m for m in MEASURES if m not in held_out], spatial="avgpool", groupby="cls",
                        progress=False),
                similarity({"a": a}, {"b": b}, measures=list(MEASURES), spatial="avgpool", folds=3, progress=False),
                similarity({"a": a}, {"b": b}, measures=["cka"], minibatch=40, progress=False)]
    names = {str(name) for result in results for name in (*result.dims, *result.variables)} - {"cls"}
    assert {name for name in names if not is_result_name(name)} == set()

    reads: list[int] = []
    for name in ("layer_a", "rows", "component", "cka_se", "freq_h"):
        x, y = (layer(3, "x", name), layer(2, "y", name))
        counted = da.from_array(x.values, chunks=(20, 4, 4, 3)).map_blocks(
            lambda block: reads.append(1) or block, meta=np.empty((0, 0, 0, 0)))
        x = x.copy(data=counted)
        with pytest.raises(ValueError, match=rf"groupby='{name}' \(--groupby {name}\): results name a dim or "
                                             rf"variable '{name}' of their own, .* rename the coordinate first "
                                             rf"\(layer.rename\(\{{'{name}': 'group'\}}\)\)"):
            similarity({"x": x}, {"y": y}, measures=["cka"], groupby=name, progress=False)
        with pytest.raises(ValueError, match="results name a dim or variable"):
            compare(x, y, measures=["cka", "mean_cca"], groupby=name, progress=False)
        assert reads == []


def test_the_folds_leave_outs_hold_no_reference_cycle():
    """The leave-outs came from a nested generator calling itself, a reference cycle holding every fold's Moments
    until the cyclic garbage collector ran: a sweep with folds held each pair's folds beside the next pair's
    (281–306 MiB for 175 in an audit's sweep of 12 layers). Nothing is left for the collector now."""
    import gc

    import chunkcca

    rng = np.random.default_rng(0)
    layers = {name: rng.standard_normal((90, width)) for name, width in (("a", 5), ("b", 4), ("c", 3))}
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        chunkcca.similarity({"a": layers["a"]}, {"b": layers["b"], "c": layers["c"]}, measures=["mean_cca", "cka"],
                            folds=3, precision="float64")
        gc.collect()
        held = [found for found in gc.garbage if isinstance(found, chunkcca.Moments)
                or (isinstance(found, list) and any(isinstance(item, chunkcca.Moments) for item in found))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert held == []
