"""SVCCA, PWCCA, CKA, Procrustes and the shape metric against in-memory float64 computations."""

from __future__ import annotations

import tracemalloc
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    canonical_correlations,
    cka_reference,
    procrustes_reference,
    pwcca_reference,
    shape_reference,
    svcca_reference,
    u_centred_gram,
)
from scipy.stats import ortho_group

import chunkcca
from chunkcca import Moments, cca, cka, compare, procrustes, pwcca, shape_metric, svcca, svcca_from_moments
from chunkcca.measures import heldout_cca_from_folds, predictivity_from_folds

#: float64 products: the covariance route vs the QR/Gram references agrees to ~1e-13 on this
#: well-conditioned data; 1e-9 leaves margin. float32 products: 3e-6 as in test_cca.
ATOL = 1e-9


def _pair(seed: int, n: int = 400, p: int = 6, q: int = 4, offset: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    x = z @ rng.standard_normal((3, p)) + rng.standard_normal((n, p)) * np.linspace(0.3, 2, p) + offset
    y = z @ rng.standard_normal((3, q)) + rng.standard_normal((n, q)) + offset
    return x, y


def _chunked(a: np.ndarray, chunk: int) -> da.Array:
    return da.from_array(a, chunks=(chunk, -1))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("keep_by", ["variance", "singular_values"])
def test_svcca_matches_in_memory(keep, keep_by):
    x, y = _pair(0)
    result = svcca(_chunked(x, 37), _chunked(y, 90), keep=keep, keep_by=keep_by, precision="float64")
    want, dims_a, dims_b = svcca_reference(x, y, keep, keep_by)
    assert (int(result["dims_a"]), int(result["dims_b"])) == (dims_a, dims_b)
    np.testing.assert_allclose(result["rho"], want, atol=ATOL)
    assert float(result["rho_mean"]) == pytest.approx(want.mean(), abs=ATOL)


@pytest.mark.parametrize("keep", [1, 3, 5, 50])
def test_svcca_keeps_a_number_of_directions_as_the_tutorials_do(keep):
    """google/svcca's tutorials keep the top 50 singular directions, which a share could not say (the SVHN
    tutorial's 0.6985 was out of reach): ``keep_by="directions"`` keeps the first ``keep`` (all of a side's rank
    where it has fewer), as an SVD of the centred data does; a count that is not a whole number is refused."""
    x, y = _pair(0)
    result = svcca(_chunked(x, 37), y, keep=keep, keep_by="directions", precision="float64")
    want, dims_a, dims_b = svcca_reference(x, y, keep, "directions")
    assert (int(result["dims_a"]), int(result["dims_b"])) == (dims_a, dims_b) == (min(keep, 6), min(keep, 4))
    np.testing.assert_allclose(result["rho"], want, atol=ATOL)
    assert result.attrs["keep"] == keep and "the first" in result["dims_a"].attrs["long_name"]
    for keep_given in ({"keep": 2.5}, {}, {"keep": 1e300}):  # {}: the default share, 0.99
        with pytest.raises(ValueError, match=r"keep with keep_by='directions' is a number of directions, an integer "
                                             r">= 1 \(e.g. keep=50, --keep 50\), got"):
            svcca(x, y, keep_by="directions", **keep_given)


def test_svcca_by_directions_on_channels_of_scales_far_apart_is_exact_or_undefined():
    """Channels on scales 1e-6 to 1e6: the covariance's eigenvalues span 1e24, and its last directions are its
    rounding. keep=6 of 6 channels gave 0.537 for CCA's 0.695 (a direction dropped, the rest rounding); now every
    direction is the channels themselves, exactly CCA. A count reaching into the rounding is undefined, not a
    number; one above it matches principal directions from an SVD of the centred data (found by audit)."""
    from chunkcca.measures import UndefinedMeasure

    rng = np.random.default_rng(18)
    x = rng.standard_normal((300, 6))
    y = x[:, :4] @ rng.standard_normal((4, 5)) + rng.standard_normal((300, 5))
    graded = x * np.logspace(-6, 6, 6)
    every = svcca(graded, y, keep=6, keep_by="directions", precision="float64")
    np.testing.assert_allclose(every["rho"], canonical_correlations(x, y), atol=1e-12)
    assert int(every["dims_a"]) == 6 and every.attrs["keep"] == 6
    with pytest.raises(UndefinedMeasure, match=r"SVCCA is undefined: it keeps 5 principal directions of layer 'a', but "
                                               r"only 4 stand above the rounding of its covariance"):
        svcca(graded, y, keep=5, keep_by="directions", precision="float64")
    milder = x * np.logspace(-2, 2, 6)
    centred = milder - milder.mean(axis=0)
    scores = centred @ np.linalg.svd(centred, full_matrices=False)[2][:5].T  # the top 5 principal directions
    kept = svcca(milder, y, keep=5, keep_by="directions", precision="float64")
    np.testing.assert_allclose(kept["rho"], canonical_correlations(scores, y), atol=1e-10)
    small = (x * 1e-4).astype(np.float32), (y * 1e-4).astype(np.float32)  # rounding relative to the largest
    with warnings.catch_warnings():  # direction, not in units of 1 (every direction was "rounding" here)
        warnings.simplefilter("ignore")
        single = svcca(*small, keep=0.99, precision="float32")
    assert float(single["rho_mean"]) == pytest.approx(float(svcca(*small, keep=0.99, precision="float64")
                                                           ["rho_mean"]), abs=1e-6)


def test_svcca_keep_all_is_cca_and_reports_zero_variance_channels():
    x, y = _pair(1)
    x[:, 2] = 4.0
    full = svcca(x, y, keep=1.0, precision="float64")
    assert int(full["dims_a"]) == 5
    np.testing.assert_allclose(full["rho"], cca(x, y, precision="float64")["rho"][:4], atol=ATOL)


def test_svcca_keep_all_is_cca_whatever_the_channels_units():
    """keep=1 took the top-rank directions by covariance: a float32 softmax pair's rounding direction (variance
    4e-15) outranked a real channel in units of 1e-9 (variance 1e-18), and ρ was [0.966, 0.021] for CCA's
    [0.966, 0.958], silently."""
    rng = np.random.default_rng(0)
    logit, latent = rng.standard_normal(5000), rng.standard_normal(5000)
    share = 1 / (1 + np.exp(-2 * logit))
    a = np.column_stack([share, 1 - share, 1e-9 * latent]).astype(np.float32)
    b = np.column_stack([latent + 0.3 * rng.standard_normal(5000), logit]).astype(np.float32)
    kept, plain = svcca(a, b, keep=1.0, precision="float64"), cca(a, b, precision="float64")
    np.testing.assert_allclose(kept["rho"], plain["rho"], rtol=1e-10)  # the same CCA, solved on another basis
    assert int(kept["dims_a"]) == int(plain["rank_a"]) == 2
    z = rng.standard_normal((4000, 3))  # with a ridge, in the channels' units as cca's (not the basis')
    x, y = 10 * z, z[:, :2] + rng.standard_normal((4000, 2))
    want = cca(x, y, epsilon=1.0, precision="float64")["rho"]
    for keep in (0.999999, 1.0):
        np.testing.assert_allclose(svcca(x, y, keep=keep, epsilon=1.0, precision="float64")["rho"], want, rtol=1e-10)
    # CCA's own rules too: a channel constant to rounding is pruned (svcca kept it: ρ [0.96, 0.70] for CCA's
    # [0.70, 0.00]), and near-duplicate channels are warned of (svcca said nothing, 0.027 off)
    flat = x.copy()
    flat[:, 2] = 1e3 + 1e-12 * z[:, 0]
    np.testing.assert_allclose(svcca(flat, y, keep=1.0, precision="float64")["rho"],
                               cca(flat, y, precision="float64")["rho"][:2], rtol=1e-10)
    doubled = np.column_stack([z[:, 0], z[:, 0], z[:, 1]])  # a ridge makes no direction of a duplicate channel
    ridged = svcca(doubled, y, keep=1.0, epsilon=0.1, precision="float64")
    assert int(ridged["dims_a"]) == 2 and ridged.sizes["component"] == 2
    np.testing.assert_allclose(ridged["rho"], svcca(doubled, y, keep=0.9999999, epsilon=0.1,
                                                    precision="float64")["rho"], rtol=1e-10)
    twin = np.column_stack([z[:, 0], z[:, 0] + 1e-7 * z[:, 1], z[:, 2]])
    with pytest.warns(chunkcca.measures.IllConditionedWarning):
        svcca(twin, y, keep=1.0, precision="float64")
    # a rank-deficient side: the same correlations; SVCCA's mean is over the directions it keeps, CCA's over
    # min(p, q), with ρ = 0 where a side lacks a direction (as docs/measures.md says)
    deficient = np.column_stack([z[:, 0], z[:, 1], z[:, 0] + z[:, 1]])
    wide = np.column_stack([z, rng.standard_normal(4000)])[:, 1:] + rng.standard_normal((4000, 3))
    kept, plain = svcca(deficient, wide, keep=1.0, precision="float64"), cca(deficient, wide, precision="float64")
    assert int(kept["dims_a"]) == 2 and plain.sizes["component"] == 3 and float(plain["rho"][2]) == 0
    np.testing.assert_allclose(kept["rho"], plain["rho"][:2], rtol=1e-10)
    assert float(kept["rho_mean"]) == pytest.approx(float(plain["rho"][:2].mean()), rel=1e-12)
    assert float(plain["rho_mean"]) == pytest.approx(float(plain["rho"].sum()) / 3, rel=1e-12)


def test_svcca_keep_all_keeps_a_direction_of_a_tiny_share_of_the_variance():
    """keep=1.0 keeps every direction with variance: one holding 3e-15 of it (channels of 1e3 beside one of 1e-4
    that carries the correlated signal) was dropped by a 1e-12 tolerance on the shares (mean ρ 0.03 for 0.35)."""
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(2000)
    x = np.c_[rng.standard_normal((2000, 3)) * 1e3, signal * 1e-4]
    y = np.c_[rng.standard_normal((2000, 2)), signal + 0.1 * rng.standard_normal(2000)]
    result = svcca(_chunked(x, 300), y, keep=1.0, precision="float64")
    want, dims_a, dims_b = svcca_reference(x, y, 1.0, "variance")
    assert (int(result["dims_a"]), int(result["dims_b"])) == (dims_a, dims_b) == (4, 3)
    # the 1e-4 channel beside 1e3 ones: condition 1e14 in the covariance, 1e7 in the whitening (seen: 4e-16)
    np.testing.assert_allclose(result["rho"], want, atol=1e-12)
    np.testing.assert_allclose(result["rho"], cca(x, y, precision="float64")["rho"], atol=1e-12)


@pytest.mark.parametrize(("p", "q"), [(4, 6), (6, 4), (5, 5)])
@pytest.mark.parametrize("chunk", [400, 33])
def test_pwcca_matches_in_memory(p, q, chunk):
    x, y = _pair(2, p=p, q=q)
    result = pwcca(_chunked(x, chunk), y, precision="float64")
    value, weights, rho = pwcca_reference(x, y)
    assert result["side"].item() == ("a" if p <= q else "b")
    np.testing.assert_allclose(result["rho"], rho, atol=ATOL)
    np.testing.assert_allclose(result["weights"], weights, atol=ATOL)
    assert float(result["pwcca"]) == pytest.approx(value, abs=ATOL)
    assert not result["tied"].any()


def test_pwcca_float32_products():
    x, y = _pair(3)
    value, _, _ = pwcca_reference(x, y)
    result = pwcca(x.astype(np.float32), y.astype(np.float32), precision="float32")
    assert result.attrs["precision"] == "float32"
    assert float(result["pwcca"]) == pytest.approx(value, abs=3e-6)  # correlations far apart: directions firm


def test_pwcca_under_auto_precision_takes_float64_products(tmp_path):
    """PWCCA's weights rest on the canonical directions, which float32 products move by their rounding over the
    gap between neighbouring correlations: on well-conditioned float32 layers (condition number 129) whose last two
    correlations are 3.4e-4 apart, precision="auto" gave 2.8e-5 off, silently (found by audit), where correlations
    are good to 1e-6. "auto" takes float64 products when PWCCA is among the measures, and says so."""
    rng = np.random.default_rng(12)
    latent = rng.standard_normal((3000, 3))
    x = (latent @ rng.standard_normal((3, 6)) + 0.3 * rng.standard_normal((3000, 6))).astype(np.float32)
    y = (latent @ rng.standard_normal((3, 5)) + 0.3 * rng.standard_normal((3000, 5))).astype(np.float32)
    value, _, _ = pwcca_reference(x.astype(np.float64), y.astype(np.float64))
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"a": x, "b": y}, chunks=250)
    for result in (pwcca(tree["a"], tree["b"]), chunkcca.compare(tree["a"], tree["b"], measures=["cka", "pwcca"]),
                   chunkcca.similarity([tree["a"]], [tree["b"]], measures=["pwcca"], progress=False)):
        assert result.attrs["precision"] == "float64"
        assert result.attrs["precision_auto"].startswith("auto: float64 products, as pwcca's weights rest on")
        assert float(result["pwcca"].squeeze()) == pytest.approx(value, abs=1e-12)
    assert chunkcca.cka(tree["a"], tree["b"]).attrs["precision"] == "float32"  # no directions: float32 kept


def test_pwcca_reports_ties():
    x, _ = _pair(4)
    result = pwcca(x, x @ np.random.default_rng(0).standard_normal((6, 6)), precision="float64")
    assert result["tied"].all(), "an invertible map of the same data: every correlation is 1"
    np.testing.assert_allclose(result["rho"], 1.0, atol=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_cka_matches_gram_computation(debiased, offset):
    x, y = _pair(5, n=300, offset=offset)
    result = cka(_chunked(x, 41), _chunked(y, 77), debiased=debiased, precision="float64")
    assert float(result["cka"]) == pytest.approx(cka_reference(x, y, debiased), abs=ATOL)
    assert result.attrs["debiased"] == int(debiased)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("scale", [1e76, 1e60, 1e-60, 1e-100])
def test_cka_of_values_at_the_ends_of_float64s_range(scale, debiased):
    """CKA is scale-invariant, but ‖Maa‖²_F overflowed at values of 1e76 (CKA 0.0, silently) and underflowed at
    1e-100 (an error blaming the debiased estimator for the biased one). Each side is now divided by its total
    variance before the squares: the same value as at unit scale, to rounding (1e-12). The debiased estimator
    needs the values' fourth powers (Σ‖u‖⁴, summed while streaming), which leave float64's range beyond about
    1e±75: an error saying so, not a NaN."""
    x, y = _pair(5, n=300)
    if debiased and abs(np.log10(scale)) > 75:
        with pytest.raises(ValueError, match="debiased CKA needs fourth powers of the values in float64, which "
                                             f"{'over' if scale > 1 else 'under'}flowed"):
            cka(x * scale, y, debiased=True, precision="float64")
        return
    got = float(cka(x * scale, y, debiased=debiased, precision="float64")["cka"])
    assert got == pytest.approx(cka_reference(x, y, debiased), abs=1e-12)


@pytest.mark.parametrize("exponent", [-77.0, -80.0, -80.6, -81.0, -81.4])
def test_debiased_cka_of_values_whose_fourth_powers_fall_below_float64s_normal_range(exponent):
    """Values of 1e-80.6 to 1e-81.4 have fourth powers below float64's normal range, each row's rounded by up to
    2⁻¹⁰⁷⁵: debiased CKA was 3.4e-7 to 4.6e-3 off, silently, refused only from 1e-81.6 where the sums reached 0
    (found by audit). The sums are now refused where their terms' rounding could reach 2⁻⁵² of the scale they are
    divided by; above that, the value at unit scale to rounding."""
    x, y = _pair(5, n=200)
    want = cka_reference(x, y, True)
    if exponent < -78:
        for call in (lambda: cka(x * 10**exponent, y, debiased=True, precision="float64"),
                     lambda: compare(x * 10**exponent, y, measures=["cka_debiased"], precision="float64")):
            with pytest.raises(ValueError, match="debiased CKA needs fourth powers of the values in float64, which "
                                                 "underflowed"):
                call()
        return
    got = float(cka(x * 10**exponent, y, debiased=True, precision="float64")["cka"])
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-155, 1e150])
@pytest.mark.parametrize("precision", ["float64", "auto"])
def test_whitening_measures_of_values_whose_variances_are_at_float64s_ends(scale, precision):
    """Values of 1e-155 have variances of 1e-310, whose inverse (1e310) is past float64's range: the correlation
    matrix, made as Σ ∘ (d dᵀ), was NaN and every whitening measure raised LinAlgError ("Eigenvalues did not
    converge"). It is now made one side at a time (D Σ D): the same values as at unit scale, to 1e-10 (the
    subnormal variances keep about 13 digits). Values whose squares overflow float64 (1e153) are an error saying
    so, not a LinAlgError."""
    x, y = _pair(5, n=300)
    for measure in ("mean_cca", "svcca", "shape", "procrustes"):
        call = SYMMETRIC[measure]
        assert call(x * scale, y) == pytest.approx(call(x, y), abs=1e-10), measure
    assert float(pwcca(x * scale, y, precision=precision)["pwcca"]) == pytest.approx(
        float(pwcca(x, y, precision=precision)["pwcca"]), abs=1e-10)
    with pytest.raises(ValueError, match="the statistics hold NaN or Inf"):
        cca(x * 1e153, y, precision=precision)


@pytest.mark.parametrize("scale", [1e-158, 1e-162])
@pytest.mark.parametrize("channels", ["all", "one"])
def test_values_whose_squares_are_too_small_for_float64_are_refused(scale, channels):
    """Values of 1e-158 have variances of 1e-316, which keep 7 digits in float64 (1e-161: ρ̄ off by 1e-5), and
    of 1e-162 none (the channel was pruned as constant: ρ̄ 0.41 against 0.72), silently. They are refused, naming
    the layer and channel; 1e-155 keeps 13 digits and is measured (above)."""
    x, y = _pair(5, n=300)
    factor = np.full(x.shape[1], scale) if channels == "all" else np.r_[1.0, scale, np.ones(x.shape[1] - 2)]
    layer = xr.DataArray(x * factor, dims=("datapoint", "channel"), name="tiny")
    for measure in ("mean_cca", "cka", "pwcca", "predictivity"):
        with pytest.raises(ValueError, match=rf"layer 'tiny' has a channel \({0 if channels == 'all' else 1}\) whose "
                                             r"values or spread are below 6e-157, too small for float64 squares"):
            compare(layer, y, measures=[measure], precision="float64",
                    **({"folds": 3, "ridge": 0} if measure == "predictivity" else {}))


def test_cka_of_a_stride_leaving_fewer_rows_than_channels_is_measured():
    """CKA inverts nothing: a stride leaving no more rows than channels was refused for it (and with epsilon for
    the others); it is the CKA of the strided rows."""
    x, y = _pair(9, n=400, p=30, q=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = float(cka(x, y, stride=16, precision="float64")["cka"])  # 25 rows, 30 channels
    assert got == pytest.approx(cka_reference(x[::16], y[::16], False), abs=1e-12)


def test_one_datapoint_is_refused_naming_the_layers():
    """One datapoint of fc layers gave "covariance needs more than 1 rows, have 1", naming no layer, after a
    warning and the pass."""
    x, y = _pair(9, n=1)
    for measure in (cca, cka, procrustes):
        with pytest.raises(ValueError, match=r"^layers 'a', 'b' give 1 row: every measure needs at least 2$"):
            measure(x, y)
    one = chunkcca.compute_moments(x, y)  # Moments are kept to merge: one row is a start
    x2, y2 = _pair(9, n=20)
    assert (one + chunkcca.compute_moments(x2, y2)).n == 21
    assert chunkcca.compute_moments(x2[:2], y2[:2], stride=2).n == 1  # as one datapoint (the rules disagreed)
    with pytest.raises(ValueError, match=r"^the Moments of layers 'a', 'b' hold 1 row: a covariance needs more "
                                         r"than 1$"):  # solved alone, they name their layers too
        chunkcca.cca_from_moments(one)


def test_debiased_cka_float32_on_offset_data():
    x, y = _pair(6, n=2000, offset=50.0)
    got = float(cka(x.astype(np.float32), y.astype(np.float32), debiased=True)["cka"])
    assert got == pytest.approx(cka_reference(x.astype(np.float32), y.astype(np.float32), True), abs=3e-6)


@pytest.mark.parametrize("scale", [1e-16, 1e13])
def test_debiased_cka_with_float32_products_of_values_small_or_large(scale):
    """Σ ‖u‖² uᵀ, third powers of the values, was kept in float32 with only the squares checked: values of 1e-16
    underflowed (debiased CKA off by 2.4e-5 under "auto", silently), and of 1e13 overflowed (refused, blaming
    float64, which holds them) (found by audit). Each side's norms are scaled near 1 first: to float32's
    rounding of the sums (3e-8 at unit scale on these data), 1e-7 here."""
    rng = np.random.default_rng(4)
    latent = rng.standard_normal((200, 4))
    a = (latent @ rng.standard_normal((4, 10)) + 0.5 * rng.standard_normal((200, 10)) + 3) * scale
    b = latent @ rng.standard_normal((4, 8)) + 0.5 * rng.standard_normal((200, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cka(da.from_array(a, chunks=100), da.from_array(b, chunks=100), debiased=True, precision="float32")
    assert result.attrs["precision"] == "float32"
    assert float(result["cka"]) == pytest.approx(cka_reference(a, b, True), abs=1e-7)


def test_debiased_cka_with_float32_products_of_a_row_whose_norm_float32_cannot_hold():
    """A row whose squared norm (1.2e39) is past float32's range while no channel's sum of squares is: the row
    norms, made in float32, overflowed and debiased CKA was refused, blaming float64 (found by review). Such
    norms are made again in float64; float32's rounding of the sums remains (1.3e-8 seen)."""
    rng = np.random.default_rng(3)
    latent = rng.standard_normal((6000, 4))

    def side(channels: int) -> np.ndarray:
        values = latent @ rng.standard_normal((4, channels)) + rng.standard_normal((6000, channels))
        return values / values.std(axis=0)

    x, y = 1e17 * side(300), side(20)
    x[4000] *= 20
    x, y = x.astype(np.float32), y.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cka(da.from_array(x, chunks=(3000, -1)), da.from_array(y, chunks=(3000, -1)), debiased=True,
                     precision="float32")
    assert float(result["cka"]) == pytest.approx(cka_reference(x.astype(np.float64), y.astype(np.float64), True),
                                                 abs=1e-7)


def _minibatch_reference(x: np.ndarray, y: np.ndarray, size: int) -> float:
    batches = x.shape[0] // size
    hsic = np.zeros(3)
    for b in range(batches):
        k, l_ = (u_centred_gram(a[b * size : (b + 1) * size]) for a in (x, y))
        hsic += [np.sum(k * l_), np.sum(k * k), np.sum(l_ * l_)]
    return float(hsic[0] / np.sqrt(hsic[1] * hsic[2]))


@pytest.mark.parametrize(("size", "chunk"), [(50, 400), (64, 37), (100, 10)])
def test_minibatch_cka_matches_reference_for_any_chunking(size, chunk):
    x, y = _pair(7, n=400)
    result = cka(_chunked(x, chunk), _chunked(y, 50), minibatch=size)
    assert float(result["cka"]) == pytest.approx(_minibatch_reference(x, y, size), abs=ATOL)
    assert int(result["minibatches"]) == 400 // size
    assert int(result["rows_left_out"]) == 400 % size


@pytest.mark.parametrize("spatial", ["flatten", "features"])
def test_minibatch_cka_does_not_depend_on_an_offset(spatial):
    """The unbiased HSIC is the same for rows shifted by any common offset; raw Gram matrices of rows of mean 1e4
    and spread 1 cancelled (CKA 1.33 against 0.39, silently). The reference is the offset-free data."""
    x, y = _pair(7, n=400, offset=0.0)
    shifted = cka(_chunked(x + 1e4, 37), _chunked(y - 2e4, 50), minibatch=50, spatial=spatial)
    assert float(shifted["cka"]) == pytest.approx(_minibatch_reference(x, y, 50), abs=ATOL)


def test_minibatch_cka_of_values_whose_gram_products_overflow_is_refused():
    """Values of 1e100 gave a NaN minibatch CKA with numpy's overflow warnings (exact CKA refuses such layers)."""
    x, y = _pair(7, n=400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's own overflow warnings on the way
        with pytest.raises(ValueError, match=r"minibatch CKA of layers .*: the sums of products of their "
                                             r"minibatches' Gram matrices overflow float64"):
            cka(x * 1e100, y, minibatch=50)
        with pytest.raises(ValueError, match="overflow float64"):
            chunkcca.similarity({"x": x * 1e100}, {"y": y}, measures=["cka"], minibatch=50)


def test_minibatch_cka_of_values_whose_gram_products_lose_digits_is_refused():
    """Values of 1e-80 (Gram entries of 1e-160, whose squares are subnormal) gave a minibatch CKA off by 1.5e-5,
    of 1e-81 off by 9%, silently; smaller ones were called constant. 1e-78 keeps 13 digits and is measured."""
    x, y = _pair(7, n=400)
    want = _minibatch_reference(x, y, 50)
    assert float(cka(x * 1e-78, y, minibatch=50)["cka"]) == pytest.approx(want, rel=1e-11)
    for scale in (1e-79, 1e-80, 1e-81):
        with pytest.raises(ValueError, match=r"minibatch CKA of layer 'a': its values are too small for float64 "
                                             r"products of its minibatches' Gram matrices .*multiply the layer"):
            cka(x * scale, y, minibatch=50)
    with pytest.raises(ValueError, match=r"layer 'x': its values are too small"):
        chunkcca.similarity({"x": x * 1e-80}, {"y": y}, measures=["cka"], minibatch=50)
    with pytest.raises(ValueError, match=r"undefined for layer 'a': it has no variance within minibatches \(a dead "
                                         r"layer\), or values so small that the products of its Gram matrices "
                                         r"underflow float64"):
        cka(x * 1e-90, y, minibatch=50)


def test_minibatch_cka_on_conv_rows_with_stride():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((30, 3, 5, 4))
    y = x[..., :3] + rng.standard_normal((30, 3, 5, 3))
    rows_x, rows_y = x.reshape(-1, 4)[::2], y.reshape(-1, 3)[::2]
    for chunk in (30, 7):
        result = cka(da.from_array(x, chunks=(chunk, -1, -1, -1)), y, minibatch=16, stride=2)
        assert float(result["cka"]) == pytest.approx(_minibatch_reference(rows_x, rows_y, 16), abs=ATOL)


def test_minibatch_needs_four_rows_and_excludes_debiased():
    x, y = _pair(9)
    with pytest.raises(ValueError, match="minibatch must be an integer >= 4"):
        cka(x, y, minibatch=3)
    with pytest.raises(ValueError, match="already built from unbiased HSIC"):
        cka(x, y, minibatch=10, debiased=True)


@pytest.mark.parametrize(("p", "q"), [(5, 5), (6, 3)])
def test_procrustes_matches_scipy(p, q):
    x, y = _pair(10, p=p, q=q)
    result = procrustes(_chunked(x, 64), y, precision="float64")
    assert float(result["procrustes"]) == pytest.approx(procrustes_reference(x, y), abs=ATOL)


@pytest.mark.parametrize("scale", [1e80, 1e-150])
def test_procrustes_does_not_depend_on_the_layers_scale(scale):
    """The distance of unit-norm sides is the same at any scale float64 holds: tr Σaa · tr Σbb overflowed at 1e80
    (d = √2, similarity 0) and underflowed at 1e-150 (d = 0, similarity inf), with numpy's warning only."""
    x, y = _pair(10, p=6, q=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = procrustes(_chunked(x * scale, 64), y * scale, precision="float64")
    assert float(result["procrustes"]) == pytest.approx(procrustes_reference(x, y), abs=ATOL)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_shape_metric_matches_in_memory(alpha):
    x, y = _pair(11)
    result = shape_metric(_chunked(x, 51), y, alpha=alpha, precision="float64")
    assert float(result["shape_distance"]) == pytest.approx(shape_reference(x, y, alpha), abs=ATOL)


def test_a_tiny_alpha_on_dependent_channels_is_warned_of_as_alpha_0_is():
    """alpha > 0 was taken as the user's regularisation and never warned of: at alpha 1e-12 on a layer with a
    duplicated channel, the matrix inverted has a condition number near 1e12 and the distance was 9e-6 off,
    silently (found by audit). Its condition number is checked as alpha = 0's correlation matrix is."""
    from chunkcca.measures import IllConditionedWarning

    rng = np.random.default_rng(22)
    x = rng.standard_normal((200, 5))
    x = np.column_stack([x, x[:, 0], x[:, 1] - x[:, 2]])
    y = x[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((200, 4))
    with pytest.warns(IllConditionedWarning, match=r"layer 'a' has a partially whitened covariance .* of condition "
                                                   r"number about 1e1[1-3] .*; a larger alpha bounds it"):
        shape_metric(xr.DataArray(x, dims=("datapoint", "channel"), name="a"), y, alpha=1e-12, precision="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        result = shape_metric(x, y, alpha=1e-4, precision="float64")
    assert float(result["shape_distance"]) == pytest.approx(shape_reference(x, y, 1e-4), abs=1e-10)


def test_cka_of_a_layer_against_its_rotation_is_at_most_one():
    """CKA is at most 1 (Cauchy-Schwarz); rounding gave 1.0000000000000004 for a layer against its rotation, in
    about half of random rotations (found by audit). Each CKA (exact, debiased, of whole maps, minibatch, a
    sweep's) is at most 1, as canonical correlations are."""
    rng = np.random.default_rng(17)
    for _ in range(10):
        x = rng.standard_normal((60, 5)) * [1, 2, 3, 4, 5] + 10
        y = x @ np.linalg.qr(rng.standard_normal((5, 5)))[0]
        got = compare(x, y, measures=["cka", "cka_debiased"], precision="float64")
        sweep = chunkcca.similarity({"x": x}, {"y": y}, measures=["cka"], precision="float64")
        values = [float(got["cka"]), float(got["cka_debiased"]), float(sweep["cka"].item()),
                  float(cka(x, y, minibatch=20)["cka"])]
        assert max(values) <= 1.0 and min(values) == pytest.approx(1.0, abs=1e-12)


def test_dead_channels_change_neither_the_shape_metric_nor_predictivity():
    """Partial whitening and predictivity's ridge are scaled by the mean variance of a layer's channels: dead
    (constant) units counted in it moved the shape metric at α = 0.5 from 0.629 to 0.665 (six dead beside six
    live) and predictivity at ridge 1 from 0.808 to 0.831 (60 beside 20), silently. The mean is of the
    channels that vary, as CCA and PWCCA prune the others."""
    from chunkcca import compute_moments
    from chunkcca.measures import predictivity_from_folds

    rng = np.random.default_rng(8)
    x = rng.standard_normal((1000, 6)) @ rng.standard_normal((6, 6))
    y = x @ rng.standard_normal((6, 6)) * 0.5 + rng.standard_normal((1000, 6))
    dead_x, dead_y = (np.hstack([v, np.full((1000, 6), 3.0)]) for v in (x, y))
    for alpha in (0.0, 0.5, 1.0):
        live = float(shape_metric(x, y, alpha=alpha, precision="float64")["shape_distance"])
        assert float(shape_metric(dead_x, dead_y, alpha=alpha, precision="float64")["shape_distance"]) == \
            pytest.approx(live, abs=ATOL)
        assert live == pytest.approx(shape_reference(x, y, alpha), abs=ATOL)
    # float32 units saturated at 1.0 but for one-ulp dips vary within their values' rounding only: dead too
    saturated = np.ones((1000, 6), np.float32)
    saturated[rng.random((1000, 6)) < 0.01] = np.nextafter(np.float32(1), np.float32(0))
    live32 = shape_metric(x.astype(np.float32), y.astype(np.float32), alpha=0.5, precision="float64")
    with_saturated = shape_metric(np.hstack([x.astype(np.float32), saturated]),
                                  np.hstack([y.astype(np.float32), saturated]), alpha=0.5, precision="float64")
    assert float(with_saturated["shape_distance"]) == pytest.approx(float(live32["shape_distance"]), abs=1e-6)
    # a layer all of whose channels vary within their rounding keeps a scale: its ridge still acts
    z = rng.standard_normal((1000, 4))
    coarse = (3e5 + 0.02 * z).astype(np.float32)
    target = z @ rng.standard_normal((4, 3)) + rng.standard_normal((1000, 3))
    folds = list(compute_moments(coarse, target, folds=4, precision="float64").values())
    ridged = [float(predictivity_from_folds(folds, ridge=ridge)["predictivity"]) for ridge in (0.0, 100.0)]
    assert ridged[1] < ridged[0] - 1e-4
    for ridge in (0.1, 1.0):
        values = [predictivity_from_folds(list(compute_moments(a, y, folds=4, precision="float64").values()),
                                          ridge=ridge)["predictivity"] for a in (x, dead_x)]
        np.testing.assert_allclose(values[1], values[0], atol=1e-12)


def test_saturated_units_beside_white_channels_are_left_out_not_the_whole_layer():
    """float32 units saturated at 1.0 but for one-ulp dips vary within their values' rounding only. Beside channels
    of near-equal variance (white, so their correlation matrix's eigenvalues are near-degenerate) their unit variance
    mixed into every eigen-direction, whose rounding then passed its eigenvalue: every direction was cut and CCA,
    PWCCA and SVCCA said the layer "varies only within the rounding". They are set apart: the measures equal those
    of the other channels alone; a layer of saturated units only is still undefined."""
    from chunkcca.measures import UndefinedMeasure

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((4000, 4))
    x = (rng.standard_normal((4000, 6)) + 0.3 * latent[:, :1]).astype(np.float32)
    saturated = np.ones((4000, 2), np.float32)
    saturated[rng.random((4000, 2)) < 0.01] = np.nextafter(np.float32(1), np.float32(0))
    y = (latent[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((4000, 4))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for measure, key in ((cca, "rho_mean"), (pwcca, "pwcca"), (svcca, "rho_mean")):
            alone = float(measure(x, y, precision="float64")[key])
            beside = measure(_chunked(np.hstack([x, saturated]), 500), y, precision="float64")
            assert float(beside[key]) == pytest.approx(alone, abs=1e-12)
        assert int(cca(np.hstack([x, saturated]), y, precision="float64")["rank_a"]) == 6
    with pytest.raises(UndefinedMeasure, match="layer 'a' varies only within the rounding of its float32 values"):
        cca(saturated, y, precision="float64")
    # channels of real signal are not set apart: float16 of mean 100 and spread 0.09 (rounding 4% of the variance),
    # sixteen sharing a factor with y, keep that direction (all were set apart, "varies only within the rounding")
    # and at spread 0.03 each is within its rounding (two or three values of float16's steps of 1/16), but the
    # factor they share rises above it: they are judged direction by direction, as before, not set apart
    for spread in (0.09, 0.03):
        shared = (100 + spread * (0.9 * latent[:, :1] + 0.44 * rng.standard_normal((4000, 16)))).astype(np.float16)
        kept = cca(shared, y, precision="float64")
        exact = float(cca(shared.astype(np.float64), y, precision="float64")["rho"][0])  # values taken as exact
        assert int(kept["rank_a"]) >= 1 and float(kept["rho"][0]) == pytest.approx(exact, abs=0.02)


def test_saturated_units_beside_channels_sharing_a_factor_within_their_rounding_are_set_apart():
    """Sixteen float16 channels of mean 100 and spread 0.03 (each within its values' grid) share a factor that rises
    above their rounding. Beside them, two saturated units were not set apart at all (the set within rounding held
    a real direction, so none of it was), mixed into the white channels' directions again and cut them: rank 1 for
    7, mean ρ 0.214 for 0.331, PWCCA 0.856 for 0.413, silently. Now the set's shared direction is kept and the rest
    of it set apart: the measures equal those without the saturated units, to 1e-5 (measured 1e-6: their chance
    correlations with the shared factor, about 1 / √n, tilt the kept direction)."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((4000, 4))
    x = (rng.standard_normal((4000, 6)) + 0.3 * latent[:, :1]).astype(np.float16)
    saturated = np.ones((4000, 2), np.float16)
    saturated[rng.random((4000, 2)) < 0.01] = np.nextafter(np.float16(1), np.float16(0))
    shared = (100 + 0.03 * (0.9 * latent[:, 1:2] + 0.44 * rng.standard_normal((4000, 16)))).astype(np.float16)
    y = (latent[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((4000, 4))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for measure, key in ((cca, "rho_mean"), (pwcca, "pwcca"), (svcca, "rho_mean")):
            without = float(measure(np.hstack([x, shared]), y, precision="float64")[key])
            beside = measure(_chunked(np.hstack([x, saturated, shared]), 700), y, precision="float64")
            assert float(beside[key]) == pytest.approx(without, abs=1e-5)
        assert int(cca(np.hstack([x, saturated, shared]), y, precision="float64")["rank_a"]) == 7
        # duplicates of three of them: their set-apart directions without variance are no directions (they were
        # cut as rounding, 1/√0 wide, and warned of as correlating with the other layer: "may be real")
        doubled = cca(np.hstack([x, saturated, shared, shared[:, :3]]), y, precision="float64")
        assert int(doubled["rank_a"]) == 7 and np.isfinite(doubled["rho"]).all()


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_directions_set_apart_are_projected_out_exactly(dtype):
    """``whitening._set_apart`` is P C P, P = I − E Eᴴ projecting out the directions E set apart (given in their
    channels' coordinates), against the product of the full matrices; whole channels set apart are exact zeros."""
    from chunkcca.whitening import Apart, _set_apart

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((50, 9)) + (1j * rng.standard_normal((50, 9)) if dtype == np.complex128 else 0)
    correlation = rows.conj().T @ rows / 50
    channels = np.array([1, 4, 5, 8])
    basis = np.linalg.qr(rng.standard_normal((4, 4)) + (1j * rng.standard_normal((4, 4)) if dtype == np.complex128
                                                        else 0))[0][:, :3]
    embedded = np.zeros((9, 3), dtype=dtype)
    embedded[channels] = basis
    projector = np.eye(9) - embedded @ embedded.conj().T
    expected = projector @ correlation @ projector
    np.testing.assert_allclose(_set_apart(correlation, Apart(channels, basis)), expected, rtol=0, atol=1e-14)
    whole = _set_apart(correlation, Apart(channels, np.eye(4, dtype=dtype)))
    assert (whole[channels] == 0).all() and (whole[:, channels] == 0).all()
    others = np.setdiff1d(np.arange(9), channels)
    assert (whole[np.ix_(others, others)] == correlation[np.ix_(others, others)]).all()


def test_shape_metric_limits_are_cca_and_procrustes():
    x, y = _pair(12, p=5, q=5)
    rho = canonical_correlations(x, y)
    whitened = float(shape_metric(x, y, alpha=0.0, precision="float64")["shape_distance"])
    assert np.cos(whitened) == pytest.approx(rho.sum() / 5, abs=ATOL)
    similarity = float(procrustes(x, y, precision="float64")["similarity"])
    assert np.cos(float(shape_metric(x, y, alpha=1.0, precision="float64")["shape_distance"])) == pytest.approx(
        similarity, abs=ATOL)


def test_kornblith_demo_golden():
    """Golden values of Kornblith et al.'s published CKA demo (google-research representation_similarity/Demo.ipynb,
    commit 10bf941a) on its own seeded inputs, computed by its published functions (they print 0.55761 and
    0.51346). numpy's legacy RandomState stream is frozen, so the inputs are made again here. (The demo's
    mean squared CCA, 0.54312, is of uncentred features, so it is not compared with r2_cca.)"""
    rng = np.random.RandomState(1337)
    x = rng.randn(100, 10)
    y = rng.randn(100, 10) + x
    assert float(cka(x, y, precision="float64")["cka"]) == pytest.approx(0.5576132566117586, abs=1e-12)
    assert float(cka(x, y, debiased=True, precision="float64")["cka"]) == pytest.approx(0.513456489505526, abs=1e-12)


# Properties: symmetry and invariances (hypothesis draws the transforms and scales).

SYMMETRIC = {
    "cka": lambda a, b: float(cka(a, b, precision="float64")["cka"]),
    "cka_debiased": lambda a, b: float(cka(a, b, debiased=True, precision="float64")["cka"]),
    "procrustes": lambda a, b: float(procrustes(a, b, precision="float64")["procrustes"]),
    "shape": lambda a, b: float(shape_metric(a, b, alpha=0.5, precision="float64")["shape_distance"]),
    "mean_cca": lambda a, b: float(cca(a, b, precision="float64")["rho_mean"]),
    "svcca": lambda a, b: float(svcca(a, b, precision="float64")["rho_mean"]),
}


@pytest.mark.parametrize("measure", sorted(SYMMETRIC))
def test_symmetric_measures_are_symmetric(measure):
    x, y = _pair(13, p=5, q=5)
    assert SYMMETRIC[measure](x, y) == pytest.approx(SYMMETRIC[measure](y, x), abs=1e-10)


@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), measure=st.sampled_from(["cka", "cka_debiased",
                                                                                        "procrustes", "shape"]))
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(seed, scale, measure):
    x, y = _pair(seed % 50, n=120, p=5, q=4)
    rotation = ortho_group.rvs(5, random_state=seed)
    before, after = SYMMETRIC[measure](x, y), SYMMETRIC[measure](scale * x @ rotation + 3.0, y)
    assert after == pytest.approx(before, abs=1e-9)


@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_cca_invariant_to_invertible_linear_maps(seed, scale):
    x, y = _pair(seed % 50, n=120, p=4, q=4)
    mixing = np.random.default_rng(seed).standard_normal((4, 4)) + 3 * np.eye(4)
    before = cca(x, y, precision="float64")["rho"].values
    after = cca(scale * x @ mixing - 7.0, y, precision="float64")["rho"].values
    np.testing.assert_allclose(after, before, atol=1e-8)


def test_constant_side_is_reported_not_nan():
    x, y = _pair(14)
    """One rule for a side without variance: every measure is undefined, and says which layer."""
    from chunkcca import compare, pwcca

    for call, message in ((lambda: cka(np.ones_like(x), y), "CKA is undefined: layer 'a' has no variance"),
                          (lambda: procrustes(np.ones_like(x), y), "Procrustes distance is undefined: layer 'a'"),
                          (lambda: shape_metric(x, np.zeros_like(y)), "shape metric is undefined: layer 'b'"),
                          (lambda: cca(x, np.zeros_like(y)), "CCA is undefined: layer 'b' has no variance"),
                          (lambda: svcca(np.ones_like(x), y), "SVCCA is undefined: layer 'a'"),
                          (lambda: pwcca(np.ones_like(x), y), "CCA is undefined: layer 'a'"),
                          (lambda: compare(x, 5 + 0 * y, measures=["cka", "mean_cca"]),
                           "CKA is undefined: layer 'b' has no variance")):
        with pytest.raises(ValueError, match=message):
            call()


def test_a_side_constant_to_rounding_is_undefined_for_every_measure():
    """Varying by 3e-15 of 1e3 (14 rounding units, below the 64 of ``CONSTANT_RTOL``): CCA pruned every channel
    and gave rho_mean 0.0 (rank 0) while the variance check, judging the scatter (n − 1 = 399 times the
    variances), let it through."""
    from chunkcca import pwcca

    x, y = _pair(16)
    constant = 1e3 + 3e-12 * np.random.default_rng(16).standard_normal(x.shape)
    for call in (cca, svcca, pwcca, cka, procrustes):
        with pytest.raises(ValueError, match="is undefined: layer 'a' has no variance"):
            call(constant, y, precision="float64")


def test_directions_cut_as_the_values_rounding_are_warned_of_when_they_may_be_real_and_none_left_is_undefined():
    """Rounding's cut (e² (mean² + variance) per channel, 12 times what rounding to nearest makes) took real
    directions: float16 values of mean 30 lost one correlated 0.92 with the other layer (mean ρ 0.46 for 0.91 on
    the values as stored), silently; float32 values of mean 3e5 and spread 0.02 lost all (rank 0: ρ̄ 0.0, SVCCA
    NaN). Rounding's own directions (a float32 softmax's sum to 1, a LayerNorm's with a bias) correlate with
    the other layer no more than chance and are cut without a word."""
    from chunkcca import pwcca
    from chunkcca.measures import RoundingWarning, UndefinedMeasure

    rng = np.random.default_rng(3)
    z, noise = rng.standard_normal((4000, 3)), rng.standard_normal((4000, 3))
    a = np.column_stack([z[:, 0], z[:, 1], z[:, 0] + 0.03 * z[:, 2] + 0.005 * noise[:, 0]]) + 30
    b = np.column_stack([z[:, 0] + 0.5 * noise[:, 1], z[:, 2] + 0.3 * noise[:, 2]]) + 30
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    wide = np.column_stack([b, rng.standard_normal((4000, 300)) + 30]).astype(np.float16)  # q = 302 of n = 4000
    for call in (cca, pwcca, lambda x, y, **o: compare(x, y, measures=["mean_cca"], **o),
                 lambda x, y, **o: cca(x, wide, **o), lambda x, y, **o: svcca(x, y, keep=0.9999, **o),
                 lambda x, y, **o: shape_metric(x, y, alpha=0, **o)):
        with pytest.warns(RoundingWarning, match=r"layer 'a': 1 direction of its correlation matrix was left out "
                                                 r"as within the rounding of its float16 values .* may be real"):
            call(a16, b16, precision="float64")
    with pytest.warns(RoundingWarning, match=r"layer 'a': 1 direction .* may be real and SVCCA lacks it"):
        svcca(a16, b16, keep=1, precision="float64")  # solved as CCA, told as SVCCA
    with warnings.catch_warnings(record=True) as said:  # compare's rho is that CCA too: one solve, one warning
        warnings.simplefilter("always")
        compare(a16, b16, measures=["svcca"], keep=1, precision="float64")
    assert [str(record.message).count("SVCCA lacks it") for record in said] == [1]
    # as float64 the values are taken as exact: the direction is kept, as in-memory float64 CCA finds it
    exact = cca(a16.astype(np.float64), b16.astype(np.float64), precision="float64")
    np.testing.assert_allclose(exact["rho"], canonical_correlations(a16.astype(float), b16.astype(float)),
                               rtol=1e-12)
    assert int(exact["rank_a"]) == 3 and float(exact["rho_mean"]) > 0.9
    noisier = (b + np.column_stack([np.zeros(4000), 0.95 * noise[:, 2]])).astype(np.float16)  # R² about 0.46
    with pytest.warns(RoundingWarning, match=r"layer 'a': 1 direction .* may be real"):
        cca(a16, noisier, precision="float64")

    def quiet(x: np.ndarray, y: np.ndarray, **options) -> xr.Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RoundingWarning)
            return cca(x, y, **options)

    assert int(quiet((a - 25).astype(np.float16), (b - 25).astype(np.float16), precision="float64")["rank_a"]) == 3
    with warnings.catch_warnings():  # keep=0.99 leaves the direction out anyway: the rank took nothing
        warnings.simplefilter("error", RoundingWarning)
        svcca(a16, b16, precision="float64")
    for seed in range(3):  # a float32 softmax: its sum-to-1 direction is rounding's, cut without a warning
        generator = np.random.default_rng(seed)
        logits = (4 * generator.standard_normal((5000, 10))).astype(np.float32)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        other = (logits @ generator.standard_normal((10, 6)) + generator.standard_normal((5000, 6))).astype(np.float32)
        assert int(quiet(probabilities, other)["rank_a"]) == 9
    hidden = (rng.standard_normal((5000, 64)) @ rng.standard_normal((64, 64))).astype(np.float32)
    centred = hidden - hidden.mean(axis=1, keepdims=True)
    normed = (centred / np.sqrt((centred**2).mean(axis=1, keepdims=True) + 1e-5) * 1.5 + 2).astype(np.float32)
    quiet(normed, hidden[:, :8])  # a LayerNorm with a bias: its null direction is not the other layer's

    x, y = _pair(1, n=200)
    far = [(3e5 + 1e-2 * side).astype(np.float32) for side in (x, y)]
    for call in (cca, svcca, pwcca, lambda x, y, **o: shape_metric(x, y, alpha=0, **o)):
        # both layers vary within their rounding; which is named first depends on how many of a layer's channels
        # are set apart as their values' grid (WITHIN_ROUNDING) and how many cut direction by direction
        with pytest.raises(UndefinedMeasure, match=r"is undefined: layer '[ab]' varies only within the rounding of "
                                                   r"its float32 values"):
            call(*far, precision="float64")
    with pytest.raises(UndefinedMeasure, match=r"^SVCCA is undefined: layer '[ab]' varies only"):
        svcca(*far, keep=1.0, precision="float64")
    with pytest.warns(RuntimeWarning, match="mean_cca of 'a' and 'b' is NaN: CCA is undefined: layer '[ab]' varies"):
        similarity = chunkcca.similarity({"a": far[0]}, {"b": far[1]}, measures=["mean_cca"], precision="float64")
    assert np.isnan(similarity["mean_cca"]).all()  # a sweep makes the pair NaN, with a warning


def test_values_rounded_more_coarsely_than_their_dtype_are_cut_at_the_rounding_their_layer_declares():
    """A bfloat16 model's outputs are stored as float32 (exactly; numpy has no bfloat16): its LayerNorm layers'
    null directions, at bfloat16's rounding, were taken as real (ranks 16 and 16 for 8 and 15, mean ρ 0.445 for
    0.418), silently. A layer whose activations carry ``VALUE_ROUNDING_ATTR`` (``record`` sets it) is cut at
    that rounding; as float64 its values are taken as exact, as said."""
    from chunkcca.options import VALUE_ROUNDING_ATTR

    def bfloat16(x: np.ndarray) -> np.ndarray:  # round to nearest even, as torch's .bfloat16() does
        bits = np.asarray(x, np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)

    def layer_norm(h: np.ndarray) -> np.ndarray:
        centred = h - h.mean(axis=1, keepdims=True)
        return centred / np.sqrt((centred**2).mean(axis=1, keepdims=True) + 1e-5)

    rng = np.random.default_rng(0)
    a = layer_norm(rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 16)))
    b = layer_norm(np.tanh(a @ rng.standard_normal((16, 16))))
    exact = cca(a, b, precision="float64")
    assert (int(exact["rank_a"]), int(exact["rank_b"])) == (8, 15)

    def layer(x: np.ndarray, **attrs) -> xr.DataArray:
        return xr.DataArray(bfloat16(x), dims=("datapoint", "channel"), attrs=attrs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", chunkcca.measures.IllConditionedWarning)
        told = cca(layer(a, **{VALUE_ROUNDING_ATTR: 2.0**-7}), layer(b, **{VALUE_ROUNDING_ATTR: 2.0**-7}),
                   precision="float64")
        untold = cca(layer(a), layer(b), precision="float64")
        as_exact = cca(layer(a, **{VALUE_ROUNDING_ATTR: 2.0**-7}).astype(np.float64), layer(b), precision="float64")
    assert (int(told["rank_a"]), int(told["rank_b"])) == (8, 15)
    np.testing.assert_allclose(told["rho"], exact["rho"], atol=1e-4)  # bfloat16's rounding moves them 5e-5
    assert (int(untold["rank_a"]), int(untold["rank_b"])) == (16, 16)  # float32's rounding: every direction
    assert int(as_exact["rank_a"]) == 16


@pytest.mark.parametrize("rounding", ["0.0078125", -0.1, 2.0, float("nan"), True, [0.0078125]])
def test_a_malformed_value_rounding_attribute_is_refused_naming_the_layer_before_the_pass(rounding, tmp_path):
    """``chunkcca_value_rounding`` of NaN or -0.1 was ignored (max with float32's own), silently; 'abc' or a list
    stopped after the pass in float(), naming no layer. It is checked where a layer is measured or written, before
    any read (not at open, where it would close the whole store)."""
    from chunkcca.options import VALUE_ROUNDING_ATTR

    rng = np.random.default_rng(0)
    ones = da.ones((100, 4), dtype=np.float32, chunks=50).map_blocks(_never_read, dtype=np.float32)
    layer = xr.DataArray(ones, dims=("datapoint", "channel"), name="l1", attrs={VALUE_ROUNDING_ATTR: rounding})
    message = f"layer 'l1' has attribute {VALUE_ROUNDING_ATTR} = .*: it gives the relative rounding of its values"
    with pytest.raises(ValueError, match=message + r", a number in \[0, 1\)"):
        cca(layer, rng.standard_normal((100, 3)))
    with pytest.raises(ValueError, match=message):
        chunkcca.similarity({"l1": layer}, {"b": rng.standard_normal((100, 3))}, measures=["cka"])
    with pytest.raises(ValueError, match=message):  # nor written into a store
        chunkcca.write_activations(tmp_path / "s.zarr", {"l1": layer})


def _never_read(block: np.ndarray) -> np.ndarray:
    raise AssertionError("a block was read")


def test_rounding_directions_a_next_layer_carries_are_not_warned_of():
    """A BatchNorm'd float32 conv layer over inputs with a constant region: the next conv layer, computed from the
    rounded values, carries their rounding, so its directions correlated with it at R² 0.13, far beyond chance
    over 51,200 rows; the warning said they may be real, and its advice (as float64) moved the shape metric from
    0.95 to 1.17. A cut direction must also hold R² ≥ 0.5 (the float16 case's real one: 0.85)."""
    torch = pytest.importorskip("torch")
    from chunkcca.measures import RoundingWarning

    torch.manual_seed(0)
    with torch.no_grad():
        images = torch.rand(200, 3, 16, 16)
        images[:, :, :4, :] = 0.0
        conv, norm = torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64)
        norm.weight.copy_(0.3 + 0.2 * torch.rand(64))
        norm.bias.copy_(3 + torch.randn(64))
        norm(conv(images))  # training mode: running statistics from one batch
        norm.eval()
        first = norm(conv(images))
        second = torch.nn.Conv2d(64, 32, 3, padding=1)(torch.relu(first))
    a, b = (layer.permute(0, 2, 3, 1).reshape(-1, layer.shape[1]).numpy() for layer in (first, second))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoundingWarning)
        for call in (cca, lambda x, y, **o: svcca(x, y, keep=1.0, **o),
                     lambda x, y, **o: shape_metric(x, y, alpha=0, **o)):
            assert int(call(a, b, precision="float64")["rank_a"]) == 27


def test_measures_reject_dft_and_bad_parameters():
    x, y = _pair(15)
    with pytest.raises(ValueError, match=r"cka\(\) does not work per spatial frequency \(spatial='dft'\); with "
                                         r"spatial='dft' choose from mean_cca, r2_cca"):
        cka(x, y, spatial="dft")
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\], got 1.5: a share of the variance; to keep a "
                                         r"number of directions, pass keep_by='directions'"):
        svcca(x, y, keep=1.5)
    with pytest.raises(TypeError, match=r"measures must be a measure's name or a list of them, got NoneType"):
        compare(x, y, measures=None)
    assert set(compare(x, y, measures=np.array(["mean_cca", "cka"]))) >= {"mean_cca", "cka"}  # any iterable
    with pytest.raises(ValueError, match="keep_by must be one of 'variance', 'singular_values', 'directions', got "
                                         "'energy'"):
        svcca(x, y, keep_by="energy")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        shape_metric(x, y, alpha=2)
    with pytest.raises(TypeError, match="cka\\(\\) got unexpected keyword argument 'strid'"):
        cka(x, y, strid=2)


def test_epsilon_and_interp_options_reach_every_measure():
    """svcca and pwcca solve with the epsilon given (not only validate it), and every result records its options."""
    from chunkcca import compute_moments, pwcca, pwcca_from_moments, svcca, svcca_from_moments

    rng = np.random.default_rng(11)
    x = rng.standard_normal((300, 6))
    y = x[:, :4] + rng.standard_normal((300, 4))
    moments = compute_moments(x, y, precision="float64")
    for streamed, from_moments, key in ((svcca, svcca_from_moments, "rho_mean"), (pwcca, pwcca_from_moments, "pwcca")):
        plain, ridge = streamed(x, y, precision="float64"), streamed(x, y, epsilon=50.0, precision="float64")
        assert ridge.attrs["epsilon"] == 50.0
        assert float(ridge[key]) < float(plain[key]) - 0.05
        assert float(ridge[key]) == pytest.approx(float(from_moments(moments, epsilon=50.0)[key]), abs=1e-12)
    conv = rng.standard_normal((40, 4, 4, 3))
    pooled = conv.reshape(40, 2, 2, 2, 2, 3).mean(axis=(2, 4))
    result = svcca(conv, pooled, spatial="interp", method="nearest", precision="float64")
    assert result.attrs["method"] == "nearest" and result.attrs["grid"] == "coords"
    spectra = compute_moments(conv, pooled, spatial="dft", precision="float64")
    with pytest.raises(ValueError, match="pwcca compares two sides of real, unbatched Moments"):
        pwcca_from_moments(spectra)
    # one frequency (m[i, j]) is unbatched but complex: CKA took its real part (0.519 for 0.522), silently
    for solve in (chunkcca.cka_from_moments, svcca_from_moments, pwcca_from_moments,
                  chunkcca.shape_metric_from_moments, chunkcca.procrustes_from_moments):
        with pytest.raises(ValueError, match=r"compares two sides of real, unbatched Moments \(got sides \(3, 3\), "
                                             r"batch \(\), complex\)"):
            solve(spectra[1, 1])
    assert float(chunkcca.cca_from_moments(spectra[1, 1])["rho_mean"]) == pytest.approx(
        float(chunkcca.cca_from_moments(spectra)["rho_freq_mean"][1, 1]), abs=1e-12)
    # pwcca's solved= is of these Moments and this epsilon (a result at epsilon 0 was labelled 0.5: 0.73 for 0.54)
    with pytest.raises(ValueError, match=r"solved must be cca_from_moments\(\) of these Moments with epsilon=0.5"):
        pwcca_from_moments(moments, epsilon=0.5, solved=chunkcca.cca_from_moments(moments))
    with pytest.raises(ValueError, match="solved must be"):
        pwcca_from_moments(moments, solved="x")
    assert float(pwcca_from_moments(moments, epsilon=0.5, solved=chunkcca.cca_from_moments(moments, epsilon=0.5))[
        "pwcca"]) == pytest.approx(float(pwcca_from_moments(moments, epsilon=0.5)["pwcca"]), abs=1e-15)


def test_minibatch_cka_refuses_checkpoints_by_name():
    x = np.random.default_rng(0).standard_normal((100, 3))
    with pytest.raises(TypeError, match="checkpoint does not apply to minibatch CKA"):
        cka(x, x[:, :2], minibatch=20, checkpoint="run.moments")


def test_minibatch_memory_is_per_minibatch():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4000, 16))
    y = x[:, :8] + rng.standard_normal((4000, 8))
    tracemalloc.start()
    result = cka(da.from_array(x, chunks=4000), y, minibatch=500, scheduler="synchronous")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert int(result["minibatches"]) == 8
    assert peak < 6 * 500 * 500 * 8 + 2 * x.nbytes, f"peak {peak / 2**20:.0f} MiB"  # a few 500 x 500 Grams


def test_minibatch_takes_dims_and_refuses_options_it_ignores():
    rng = np.random.default_rng(7)
    nchw = rng.standard_normal((40, 3, 4, 4))
    result = cka(nchw, nchw[:, :2], minibatch=16, dims=("datapoint", "channel", "height", "width"))
    assert int(result["minibatches"]) == 40 * 16 // 16
    with pytest.raises(TypeError, match="precision does not apply to minibatch CKA"):
        cka(nchw, nchw, minibatch=16, precision="float64", dims=("datapoint", "channel", "height", "width"))
    for grouping in ({"folds": 4}, {"groupby": "datapoint"}):  # one pass over all rows: never per group
        with pytest.raises(TypeError, match=f"{next(iter(grouping))} does not apply to minibatch CKA"):
            cka(nchw, nchw, minibatch=16, dims=("datapoint", "channel", "height", "width"), **grouping)


def test_svcca_from_moments_checks_epsilon():
    moments = chunkcca.compute_moments(np.random.default_rng(9).standard_normal((5, 2)),
                                       np.random.default_rng(10).standard_normal((5, 2)), precision="float64")
    assert isinstance(moments, Moments)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        svcca_from_moments(moments, epsilon=-1.0)


def test_results_from_moments_name_their_layers_as_the_streamed_ones():
    import xarray as xr

    x, y = _pair(12, n=120)
    a = xr.DataArray(x, dims=("datapoint", "channel"), name="block1/relu")
    b = xr.DataArray(y, dims=("datapoint", "channel"), name="block2/relu")
    moments = chunkcca.compute_moments(a, b, row_norms=True, precision="float64")
    solvers = [chunkcca.cca_from_moments, chunkcca.svcca_from_moments, chunkcca.pwcca_from_moments,
               chunkcca.cka_from_moments, chunkcca.procrustes_from_moments, chunkcca.shape_metric_from_moments]
    streamed = cca(a, b, precision="float64").attrs
    assert (streamed["layer_a"], streamed["layer_b"]) == ("block1/relu", "block2/relu")
    for solve in solvers:
        attrs = solve(moments).attrs
        assert (attrs["layer_a"], attrs["layer_b"]) == (streamed["layer_a"], streamed["layer_b"]), solve.__name__
    folds = list(chunkcca.compute_moments(a, b, folds=3, precision="float64").values())
    for solve in (heldout_cca_from_folds, predictivity_from_folds):
        assert solve(folds).attrs["layer_a"] == "block1/relu" and solve(folds).attrs["layer_b"] == "block2/relu"
    anonymous = Moments(moments.n, moments.mean, moments.scatter, moments.sizes)
    for solve in solvers[:-2]:
        assert "layer_a" not in solve(anonymous).attrs and "layer_b" not in solve(anonymous).attrs


def test_results_from_moments_say_how_their_rows_were_made():
    """A result solved from saved Moments says its products' precision and how its rows were made, as the streamed
    result of the same rows does (it carried only the layers: flatten or avgpool, stride 1 or 2, unsaid)."""
    import xarray as xr

    rng = np.random.default_rng(5)
    dims = ("datapoint", "height", "width", "channel")
    a = xr.DataArray(rng.normal(size=(60, 4, 4, 5)).astype("float32"), dims=dims, name="a")
    b = xr.DataArray(rng.normal(size=(60, 4, 4, 3)).astype("float32"), dims=dims, name="b")
    moments = chunkcca.compute_moments(a, b, spatial="avgpool", stride=2, precision="float32")
    streamed = cca(a, b, spatial="avgpool", stride=2, precision="float32").attrs
    assert (streamed["spatial"], streamed["stride"]) == ("avgpool", 2) and "rows_from" not in streamed
    compared = chunkcca.compare(a, b, measures=["cka"], spatial="avgpool", stride=2, precision="float32").attrs
    assert {key: compared[key] for key in ("spatial", "stride", "precision")} == {
        key: streamed[key] for key in ("spatial", "stride", "precision")} and "rows_from" not in compared
    for solve in (chunkcca.cca_from_moments, chunkcca.svcca_from_moments, chunkcca.pwcca_from_moments,
                  chunkcca.cka_from_moments, chunkcca.procrustes_from_moments, chunkcca.shape_metric_from_moments):
        attrs = solve(moments).attrs
        assert attrs["precision"] == streamed["precision"] == "float32", solve.__name__
        assert attrs["rows_from"] == "spatial='avgpool', stride=2", solve.__name__
    folds = list(chunkcca.compute_moments(a, b, spatial="avgpool", folds=3, precision="float64").values())
    attrs = heldout_cca_from_folds(folds).attrs
    assert (attrs["precision"], attrs["rows_from"]) == ("float64", "spatial='avgpool', stride=1")
    unknown = Moments(moments.n, moments.mean, moments.scatter, moments.sizes)
    assert "rows_from" not in chunkcca.cca_from_moments(unknown).attrs


@pytest.mark.parametrize("seed", range(4))
def test_a_layer_against_itself_is_at_distance_zero_to_the_documented_resolution(seed):
    """measures.md: the distances are resolved to a few 1e-8 near 0 (√(k · 2.2e-16) for k units of rounding in
    the similarity they are a function of: 2.98e-8 at most over 40 random layers), Procrustes' similarity to
    rounding; a layer against itself measured 1.5e-8 in one call and 0 in another."""
    x, _ = _pair(seed, n=300, p=7)
    layer = xr.DataArray(x, dims=("datapoint", "channel"))
    result = procrustes(layer, layer.copy(), precision="float64")
    assert float(result["procrustes"]) <= 3e-8
    assert float(result["similarity"]) == pytest.approx(1.0, abs=1e-14)
    assert float(shape_metric(layer, layer.copy(), alpha=0.3, precision="float64")["shape_distance"]) <= 3e-8
    swept = chunkcca.similarity({"a": layer}, {"b": layer + 0}, measures=["procrustes", "shape"],
                                precision="float64")
    assert float(swept["procrustes"][0, 0]) <= 3e-8 and float(swept["shape"][0, 0]) <= 3e-8


def test_every_entry_point_describes_a_measure_and_its_rows_alike():
    """The shape metric's distance had ``units`` from shape_metric() but not from similarity(), whose result is the
    one saved, and its measure attr was "shape_metric" where the measures are named "shape"; ``rows`` had a
    long_name only from cca() and compare() (found by audit)."""
    x, y = _pair(5, n=120)
    one = shape_metric(x, y)
    assert one.attrs["measure"] == "shape"
    for result in (one, compare(x, y, measures=["shape"]),
                   chunkcca.similarity({"a": x}, {"b": y}, measures=["shape"])):
        variable = result["shape_distance" if "shape_distance" in result else "shape"]
        assert (variable.attrs["long_name"], variable.attrs["units"]) == ("angular shape distance", "radians")
    for result in (cka(x, y), procrustes(x, y), one, svcca(x, y), pwcca(x, y), cca(x, y),
                   chunkcca.similarity({"a": x}, {"b": y}, measures=["cka"])):
        assert result["rows"].attrs["long_name"] == "rows the statistics were computed from", result.attrs
