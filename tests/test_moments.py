"""Moments: per-chunk partials, the exact merge, chunking invariance, save/load."""

from __future__ import annotations

import dataclasses
import itertools

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st
from reference import flatten_rows, scatter

import chunkcca
from chunkcca import Moments
from chunkcca.engine import moments_reduction, run
from chunkcca.moments import merge_into, pack, partial_from_rows, unpack
from chunkcca.rows import Adapter


def _moments_of(rows: np.ndarray, sizes=None) -> Moments:
    n, mean, m = scatter(rows)
    return Moments(n=n, mean=mean, scatter=m, sizes=sizes or (rows.shape[1],))


def assert_moments_close(got: Moments, want: Moments, rtol: float) -> None:
    """Means and scatter agree to ``rtol`` of the data's scale (largest |mean|, largest variance)."""
    assert got.n == want.n
    assert got.sizes == want.sizes
    scale_mean = max(np.abs(want.mean).max(), np.sqrt(np.diag(want.scatter).max() / max(want.n, 1)))
    np.testing.assert_allclose(got.mean, want.mean, rtol=0, atol=rtol * scale_mean)
    np.testing.assert_allclose(got.scatter, want.scatter, rtol=0, atol=rtol * np.abs(want.scatter).max())


def test_partial_matches_two_pass_float64(rng):
    rows = rng.standard_normal((5000, 7)) * [1, 2, 3, 4, 5, 6, 7] + 100.0
    got = unpack(partial_from_rows([rows[:, :3], rows[:, 3:]], "float64"), (3, 4))
    assert_moments_close(got, _moments_of(rows, (3, 4)), rtol=1e-13)


def test_partial_large_offset_keeps_precision(rng):
    """Post-ReLU-like data with mean 50 and spread 0.1: raw sums would lose ~8 digits; shifting keeps them.

    float32 products: each shifted value is rounded to float32 (rel. 6e-8 of its ~0.1 size) and
    products accumulate over 8192-row sub-blocks, so 1e-6 of the scatter scale is a safe bound.
    """
    rows = (50.0 + 0.1 * rng.standard_normal((20000, 6))).astype(np.float32)
    want = _moments_of(rows)
    assert_moments_close(unpack(partial_from_rows([rows], "float64")), want, rtol=1e-12)
    assert_moments_close(unpack(partial_from_rows([rows], "float32")), want, rtol=1e-6)


def _merge_all(parts: list[np.ndarray], sizes: tuple[int, ...] = ()) -> np.ndarray:
    """Packed partials merged in turn into a copy of the first (merge_into, in place)."""
    merged = parts[0].copy()
    for part in parts[1:]:
        merge_into(merged, part, sizes)
    return merged


def test_partial_of_no_rows_is_neutral(rng):
    rows = rng.standard_normal((10, 3))
    empty = partial_from_rows([rows[:0]], "float64")
    assert empty[0, 0, 0] == 0
    merged = _merge_all([empty, partial_from_rows([rows], "float64"), empty])
    assert_moments_close(unpack(merged), _moments_of(rows), rtol=1e-14)


@given(
    n=st.integers(1, 60),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_merge_is_exact_for_any_split_and_order(n, cuts, order):
    """Chan's merge of any split of the rows, merged in any order, equals the whole (to rounding)."""
    rows = np.random.default_rng(n).standard_normal((n, 4)) * 3 + 7
    edges = sorted({0, n, *[c for c in cuts if c <= n]})
    parts = [partial_from_rows([rows[a:b]], "float64") for a, b in itertools.pairwise(edges)]
    order.shuffle(parts)
    assert_moments_close(unpack(_merge_all(parts)), _moments_of(rows), rtol=1e-12)
    while len(parts) > 1:  # and as a tree, pairs of pairs, as chains' accumulators meet
        parts = [_merge_all(parts[k : k + 2]) for k in range(0, len(parts), 2)]
    assert_moments_close(unpack(parts[0]), _moments_of(rows), rtol=1e-12)


@given(sizes=st.lists(st.integers(0, 30), min_size=3, max_size=3))
def test_merge_is_associative(sizes):
    rng = np.random.default_rng(sum(sizes))
    a, b, c = (Moments(*_stats(rng.standard_normal((k, 3)) + 5)) for k in sizes)
    left, right = (a + b) + c, a + (b + c)
    assert left.n == right.n == sum(sizes)
    np.testing.assert_allclose(left.mean, right.mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(left.scatter, right.scatter, rtol=1e-12, atol=1e-12)


def _stats(rows):
    if rows.shape[0] == 0:
        return 0, np.zeros(rows.shape[1]), np.zeros((rows.shape[1],) * 2)
    return scatter(rows)


@given(
    datapoints=st.integers(1, 40),
    chunk_a=st.integers(1, 40),
    chunk_b=st.integers(1, 40),
    stride=st.integers(1, 7),
    height=st.integers(1, 4),
    chains=st.integers(1, 4),
)
def test_streamed_moments_independent_of_chunking(datapoints, chunk_a, chunk_b, stride, height, chains):
    """Any chunking of either side, any stride and any number of chains give the in-memory Moments of the
    flattened rows."""
    rng = np.random.default_rng([datapoints, chunk_a, chunk_b, stride, height])
    a = rng.standard_normal((datapoints, height, 3, 2)) + 4
    b = rng.standard_normal((datapoints, height, 3, 3)) - 2
    adapters = [Adapter("flatten", (height, 3), stride)] * 2
    got = run([da.from_array(a, chunks=(chunk_a, -1, -1, -1)), da.from_array(b, chunks=(chunk_b, 1, -1, -1))],
              adapters, moments_reduction(adapters, (2, 3), precision="float64"), chains=chains)
    rows = np.concatenate([flatten_rows(a, stride), flatten_rows(b, stride)], axis=1)
    assert_moments_close(got, _moments_of(rows, (2, 3)), rtol=1e-12)


def test_add_merges_and_checks_sides(rng):
    rows = rng.standard_normal((100, 5))
    first, second = (unpack(partial_from_rows([r[:, :2], r[:, 2:]], "float64"), (2, 3)) for r in (rows[:30], rows[30:]))
    assert_moments_close(first + second, _moments_of(rows, (2, 3)), rtol=1e-13)
    with pytest.raises(ValueError, match="cannot merge Moments of sides"):
        first + unpack(partial_from_rows([rows], "float64"), (5,))
    # sides swapped (b, a against a, b): the layers are named where the Moments know them
    x, y = (xr.DataArray(part, dims=("datapoint", "channel"), name=name)
            for part, name in ((rows[:, :2], "conv1"), (rows[:, 2:], "conv2")))
    with pytest.raises(ValueError, match=r"^cannot merge Moments of sides \(2, 3\) \(batch \(\), layers \('conv1', "
                                         r"'conv2'\)\) and \(3, 2\) \(batch \(\), layers \('conv2', 'conv1'\)\)$"):
        chunkcca.compute_moments(x, y) + chunkcca.compute_moments(y, x)


def test_moments_validates_shapes():
    with pytest.raises(ValueError, match="scatter has shape"):
        Moments(n=3, mean=np.zeros(2), scatter=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="do not add up"):
        Moments(n=3, mean=np.zeros(2), scatter=np.zeros((2, 2)), sizes=(1, 2))
    with pytest.raises(ValueError, match="the Moments hold 1 row: a covariance needs more than 1"):
        Moments(n=1, mean=np.zeros(2), scatter=np.zeros((2, 2))).covariance()



def test_hand_made_moments_of_a_fractional_count_or_a_scatter_not_symmetric_are_refused(rng):
    """Moments made by hand with a fractional or NaN row count were solved (``rows`` 200.5; NaN passed the
    ``n < 0`` check), and a scatter not symmetric was read in part: of a scatter holding its lower triangle only
    (``np.tril``) CCA and CKA were 0.0 for ρ̄ 0.80 and CKA 0.53, of its upper triangle only ρ̄ 0.799, silently
    (found by audit). A count is an integer (an integral float is taken as one); each measure refuses a scatter
    that differs from its transpose beyond the rounding of its products, naming the entry; Moments computed,
    merged and loaded are symmetric to the bit."""
    x = rng.standard_normal((200, 3))
    y = x[:, :2] + 0.8 * rng.standard_normal((200, 2))
    made = chunkcca.compute_moments(x, y, precision="float64")
    assert np.array_equal(made.scatter, made.scatter.T)
    assert Moments(n=200.0, mean=made.mean, scatter=made.scatter, sizes=(3, 2)).n == 200
    for count in (200.5, float("nan"), True, "200"):
        with pytest.raises(ValueError, match=r"row count must be an integer >= 0, got"):
            Moments(n=count, mean=made.mean, scatter=made.scatter, sizes=(3, 2))
    lower = np.tril(made.scatter)
    for bad in (lower, np.triu(made.scatter), made.scatter + 1e-6 * np.triu(made.scatter, 1)):
        hand = Moments(n=200, mean=made.mean, scatter=bad, sizes=(3, 2))
        for measure in (chunkcca.cca_from_moments, chunkcca.cka_from_moments, chunkcca.procrustes_from_moments):
            with pytest.raises(ValueError, match=r"the Moments' scatter is not symmetric: entry \(0, 1\) differs from "
                                                 r"\(1, 0\) by [\d.e-]+ of its scale"):
                measure(hand)
    rounding = made.scatter + 1e-13 * np.triu(made.scatter, 1)  # an asymmetry of the products' rounding: solved
    assert float(chunkcca.cca_from_moments(Moments(n=200, mean=made.mean, scatter=rounding, sizes=(3, 2)))[
        "rho_mean"]) == pytest.approx(float(chunkcca.cca_from_moments(made)["rho_mean"]), abs=1e-12)


def test_pack_round_trip(rng):
    m = _moments_of(rng.standard_normal((9, 4)), (1, 3))
    back = unpack(pack(m), m.sizes)
    assert back.n == m.n and back.sizes == m.sizes
    np.testing.assert_array_equal(back.scatter, m.scatter)


def test_save_load_round_trip_and_incremental_merge(tmp_path, rng):
    rows = rng.standard_normal((200, 4)) + 3
    old = _moments_of(rows[:120], (2, 2))
    old.save(tmp_path / "stats")
    loaded = Moments.load(tmp_path / "stats")
    assert loaded.n == old.n and loaded.sizes == old.sizes
    np.testing.assert_array_equal(loaded.mean, old.mean)
    np.testing.assert_array_equal(loaded.scatter, old.scatter)
    assert_moments_close(loaded + _moments_of(rows[120:], (2, 2)), _moments_of(rows, (2, 2)), rtol=1e-13)


def test_save_is_atomic_and_never_clobbers_by_default(tmp_path, rng):
    first = _moments_of(rng.standard_normal((10, 2)))
    second = _moments_of(rng.standard_normal((20, 2)))
    first.save(tmp_path / "stats")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        second.save(tmp_path / "stats")
    assert Moments.load(tmp_path / "stats").n == 10
    second.save(tmp_path / "stats", overwrite=True)
    assert Moments.load(tmp_path / "stats").n == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats"], "temporary folders must not remain"



def test_save_into_a_folder_that_does_not_exist_is_refused(tmp_path, rng):
    """``Moments.save("typo/run.moments")`` made the whole chain of folders (found by audit); ``save_result`` and
    the command's outputs refuse it: a typo in a folder is no new folder."""
    moments = _moments_of(rng.standard_normal((10, 2)))
    with pytest.raises(ValueError, match=r"Moments.save: .*typo/run.moments: no folder .*typo$"):
        moments.save(tmp_path / "typo" / "run.moments")
    assert not (tmp_path / "typo").exists()


def test_load_rejects_missing_and_foreign(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved Moments"):
        Moments.load(tmp_path / "nothing")
    import xarray as xr

    xr.Dataset({"x": ("a", np.arange(3))}).to_zarr(tmp_path / "other", zarr_format=3, consolidated=False)
    with pytest.raises(ValueError, match="not a saved chunkcca Moments"):
        Moments.load(tmp_path / "other")


def test_saved_moments_whose_attributes_were_edited_are_refused(tmp_path, rng):
    """The root attributes of saved Moments carried no checksum (their arrays carry CRC32C): an edited precision or
    rounding loaded as other Moments, silently. The digest as written of those loading reads is checked; a user's
    attributes may change."""
    import json

    _moments_of(rng.standard_normal((20, 3)), (1, 2)).save(tmp_path / "m", attrs={"note": np.float32(0.5),
                                                                                   "ids": np.arange(3)})
    assert Moments.load(tmp_path / "m").n == 20
    metadata_path = tmp_path / "m" / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["attributes"].update(note="seed 3", mine=[1, 2])  # a user's attributes, which loading does not read
    metadata_path.write_text(json.dumps(metadata))
    assert Moments.load(tmp_path / "m").n == 20
    metadata["attributes"]["precision"] = "float32"
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"saved Moments at .*m are damaged: their metadata \(the attributes in "
                                         r"zarr.json.*\) was changed or damaged since they were written"):
        Moments.load(tmp_path / "m")


def test_saved_moments_of_fill_values_edited_arrays_or_lost_folders_are_not_other_moments(tmp_path, rng):
    """Found by audit: zarr left out chunks equal to the fill value, so a one-channel layer's labels [0] (or n = 0)
    saved without their file and loaded as "damaged", and its checkpoint was refused when the run resumed. An
    array's attributes edited (``add_offset``, ``units``, which xarray decodes) loaded as other statistics, and an
    array's folder lost (a copy cut short) loaded without it or failed in xarray's words."""
    import json
    import shutil

    x = rng.standard_normal((60, 1))
    y = x + rng.standard_normal((60, 1))
    layers = [xr.DataArray(v, dims=("datapoint", "channel"), coords={"channel": [0]}) for v in (x, y)]
    for attempt in range(2):  # a one-channel layer's checkpoint resumes (finished: served from it)
        result = chunkcca.cca(*layers, precision="float64", checkpoint=tmp_path / "ck")
        assert float(result["rho"][0]) == pytest.approx(abs(np.corrcoef(x[:, 0], y[:, 0])[0, 1]), abs=1e-12), attempt
    empty = dataclasses.replace(_moments_of(rng.standard_normal((3, 2)), (1, 1)), n=0)
    empty.save(tmp_path / "empty")
    assert Moments.load(tmp_path / "empty").n == 0
    saved = chunkcca.compute_moments(*layers, precision="float64")
    damaged = r"saved Moments at .* are damaged"
    for array, attributes in (("scatter", {"add_offset": 3.0}), ("n", {"units": "days since 2000-01-01"}),
                              ("scatter", {"scale_factor": [1.0, 1.0]})):
        saved.save(tmp_path / "edited", overwrite=True)
        metadata_path = tmp_path / "edited" / array / "zarr.json"
        metadata = json.loads(metadata_path.read_text())
        metadata["attributes"].update(attributes)
        metadata_path.write_text(json.dumps(metadata))
        with pytest.raises(ValueError, match=damaged):
            Moments.load(tmp_path / "edited")
    for lost in ("channel_labels0", "scatter", "n"):
        saved.save(tmp_path / "cut", overwrite=True)
        shutil.rmtree(tmp_path / "cut" / lost)
        with pytest.raises(ValueError, match=damaged):
            Moments.load(tmp_path / "cut")
    import zarr

    saved.save(tmp_path / "noted")  # a user's own array inside is not the Moments' metadata
    zarr.create_array(str(tmp_path / "noted" / "notes"), shape=(2,), dtype="f8", dimension_names=["note"])[:] = [1, 2]
    zarr.create_array(str(tmp_path / "noted" / "zeros"), shape=(2,), dtype="f8", dimension_names=["note"])  # unwritten
    assert Moments.load(tmp_path / "noted").n == saved.n


def test_moments_saved_again_while_loaded_are_read_again_never_mixed(tmp_path, rng, monkeypatch):
    """A load read the store's files one by one, so one made while a save replaced it (a checkpoint watched while
    its run saves) mixed two saves, ``n`` of one and ``scatter`` of the other, silently (43 of 1559 loads in an
    audit's race). Each save has an id; a load that saw it change reads again, and says so after 3 tries."""
    import chunkcca.moments as module

    first, second = (_moments_of(rng.standard_normal((n, 3)), (1, 2)) for n in (20, 40))
    first.save(tmp_path / "m")
    read_once = module._read_saved_once
    saves = iter([second] + [first, second] * 3)

    def replaced_meanwhile(path):
        read = read_once(path)
        replacement = next(saves, None)
        if replacement is not None and budget["saves"]:
            budget["saves"] -= 1
            replacement.save(tmp_path / "m", overwrite=True)
        return read

    budget = {"saves": 1}
    monkeypatch.setattr(module, "_read_saved_once", replaced_meanwhile)
    loaded = Moments.load(tmp_path / "m")
    assert loaded.n == 40 and np.array_equal(loaded.scatter, second.scatter)
    budget["saves"] = 3
    with pytest.raises(ValueError, match=r"were saved again each of 3 times they were read"):
        Moments.load(tmp_path / "m")


def test_moments_compare_as_objects_and_select_names_a_bad_side(rng):
    """``a == b`` and ``b in [a]`` raised numpy's "truth value of an array … is ambiguous" (the dataclass compared
    the arrays), and ``select([2])`` of two sides failed with IndexError, ``select([])`` in concatenate's words and
    ``select(0)`` with "'int' object is not iterable" (found by audit)."""
    one = _moments_of(rng.standard_normal((20, 3)), (1, 2))
    other = _moments_of(rng.standard_normal((20, 3)), (1, 2))
    assert one == one and one != other and one in [other, one] and len({one, other, one}) == 2
    np.testing.assert_array_equal(one.select([-1]).scatter, one.select([1]).scatter)
    for sides in ([2], [], 0, ["a"], [True]):
        with pytest.raises(ValueError, match=r"select takes a non-empty sequence of side indices, from 0 to 1 "
                                             r"\(these Moments have 2 sides"):
            one.select(sides)


def test_moments_saved_before_their_precision_was_recorded_load_as_float32_products(tmp_path, rng):
    """Saves made before ``precision`` was recorded (the default products then float32) loaded as float64, so
    their solves kept directions within float32's rounding (rank 5 for 3, found by audit): they load as float32,
    with a warning saying how to say otherwise."""
    import json

    _moments_of(rng.standard_normal((20, 3)), (1, 2)).save(tmp_path / "m")
    metadata_path = tmp_path / "m" / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    for key in ("precision", chunkcca.moments.ATTRIBUTES_ATTR, chunkcca.moments.ARRAYS_ATTR,
                chunkcca.moments.SAVE_ATTR):  # as saved then
        del metadata["attributes"][key]
    metadata_path.write_text(json.dumps(metadata))
    with pytest.warns(UserWarning, match=r"do not record their products' precision \(saved by an earlier chunkcca\): "
                                         r"taken as float32"):
        assert Moments.load(tmp_path / "m").precision == "float32"


def _norm_sums(rows: np.ndarray, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Σ ‖x̃_l‖² x̃ (L, p) and Σ ‖x̃_l‖²‖x̃_m‖² (L, L) of the centred rows, directly in float64."""
    centred = rows - rows.mean(axis=0)
    edges = np.cumsum((0, *sizes))
    norms = np.stack([(centred[:, a:b] ** 2).sum(axis=1) for a, b in itertools.pairwise(edges)], axis=1)
    return norms.T @ centred, norms.T @ norms


@given(n=st.integers(1, 50), cuts=st.lists(st.integers(0, 50), max_size=5), order=st.randoms(use_true_random=False),
       offset=st.sampled_from([0.0, 50.0]))
def test_row_norm_sums_merge_exactly(n, cuts, order, offset):
    """The fourth-order sums behind debiased CKA: any split, any order, large offsets, to rounding."""
    rows = np.random.default_rng(n).standard_normal((n, 5)) * [1, 2, 0.1, 3, 1] + offset
    sizes = (2, 3)
    edges = sorted({0, n, *[c for c in cuts if c <= n]})
    parts = [partial_from_rows([rows[a:b, :2], rows[a:b, 2:]], "float64", row_norms=True)
             for a, b in itertools.pairwise(edges)]
    order.shuffle(parts)
    merged = unpack(_merge_all(parts, sizes), sizes)
    want_moments, want_products = _norm_sums(rows, sizes)
    scale = max(np.abs(want_products).max(), 1e-300)
    np.testing.assert_allclose(merged.norm_products, want_products, rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(merged.norm_moments, want_moments, rtol=0,
                               atol=1e-11 * max(np.abs(want_moments).max(), np.sqrt(scale)))


def test_row_norm_sums_with_float32_products(rng):
    rows = (50.0 + 0.1 * rng.standard_normal((30000, 6))).astype(np.float32)
    got = unpack(partial_from_rows([rows[:, :4], rows[:, 4:]], "float32", row_norms=True), (4, 2))
    _, want_products = _norm_sums(rows.astype(np.float64), (4, 2))
    np.testing.assert_allclose(got.norm_products, want_products, rtol=1e-5)


def test_select_sides(rng):
    rows = rng.standard_normal((40, 6)) + 1
    whole = unpack(partial_from_rows([rows[:, :1], rows[:, 1:3], rows[:, 3:]], "float64", row_norms=True), (1, 2, 3))
    pair = whole.select([2, 0])
    direct = unpack(partial_from_rows([rows[:, 3:], rows[:, :1]], "float64", row_norms=True), (3, 1))
    assert pair.sizes == (3, 1)
    for name in ("mean", "scatter", "norm_moments", "norm_products"):
        np.testing.assert_allclose(getattr(pair, name), getattr(direct, name), rtol=1e-12, atol=1e-12, err_msg=name)


def test_row_norm_sums_survive_save_and_must_match_to_merge(tmp_path, rng):
    rows = rng.standard_normal((30, 3))
    with_norms = unpack(partial_from_rows([rows[:, :1], rows[:, 1:]], "float64", row_norms=True), (1, 2))
    with_norms.save(tmp_path / "m")
    loaded = Moments.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.norm_products, with_norms.norm_products)
    np.testing.assert_array_equal(loaded.norm_moments, with_norms.norm_moments)
    without = unpack(partial_from_rows([rows[:, :1], rows[:, 1:]], "float64"), (1, 2))
    with pytest.raises(ValueError, match="with and without row-norm sums"):
        with_norms + without


def test_moments_record_the_precision_of_their_products(tmp_path):
    import chunkcca

    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 5))
    m32 = chunkcca.compute_moments(x[:20], x[:20, :2], precision="float32")
    m64 = chunkcca.compute_moments(x[20:], x[20:, :2], precision="float64")
    assert (m32.precision, m64.precision) == ("float32", "float64")
    assert (m32 + m64).precision == (m64 + m32).precision == "float32"
    assert (m64 + m64).precision == "float64" and m32.select([1]).precision == "float32"
    m32.save(tmp_path / "m")
    assert Moments.load(tmp_path / "m").precision == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        Moments(1, np.zeros(2), np.zeros((2, 2)), precision="float16")


def test_counts_are_exact_past_two_to_the_31():
    """Row counts travel as float64 (exact to 2**53) and come back as Python ints."""
    big = 2**31 + 12345
    rng = np.random.default_rng(0)
    parts = [Moments(n=big + i, mean=rng.standard_normal(3), scatter=np.eye(3) * (i + 1)) for i in range(3)]
    merged = unpack(_merge_all([pack(m) for m in parts]))
    assert merged.n == 3 * big + 3
    assert isinstance(merged.n, int)
    assert (parts[0] + parts[1]).n == 2 * big + 1


def _conv_layers(seed: int = 0, n: int = 40) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Three named conv layers (datapoint, height, width, channel) of 3 channels each, chunked."""
    rng = np.random.default_rng(seed)
    dims = ("datapoint", "height", "width", "channel")
    return tuple(xr.DataArray(rng.standard_normal((n, 4, 4, 3)) + 1, dims=dims, name=name).chunk({"datapoint": 7})
                 for name in ("conv1", "conv2", "conv3"))


def test_compute_moments_record_their_layers_and_rows():
    conv1, conv2, _ = _conv_layers()
    m = chunkcca.compute_moments(conv1, conv2, spatial="avgpool", stride=2, precision="float64")
    assert m.layers == ("conv1", "conv2") and m.rows_from == "spatial='avgpool', stride=2"
    interp = chunkcca.compute_moments(conv1, conv2, spatial="interp", method="nearest", precision="float64")
    assert interp.rows_from == "spatial='interp', stride=1, method='nearest', grid='coords'"
    mask = xr.DataArray(np.ones((40, 4, 4), bool), dims=("datapoint", "height", "width"))
    masked = chunkcca.compute_moments(conv1.assign_coords(mask=mask), conv2, precision="float64")
    assert masked.rows_from == "spatial='flatten', stride=1, mask='a'"
    for part in chunkcca.compute_moments(conv1, conv2, folds=3, precision="float64").values():
        assert part.layers == m.layers and part.rows_from == "spatial='flatten', stride=1"
    assert "layers=('conv1', 'conv2')" in repr(m)


@pytest.mark.parametrize("other, spatial_options, message", [
    ("conv3", {}, r"cannot merge Moments of layers \('conv1', 'conv2'\) and \('conv1', 'conv3'\): they describe "
                  r"different layers; .* m1 \+ dataclasses.replace\(m2, layers=\('conv1', 'conv2'\)\)"),
    ("conv2", {"spatial": "avgpool"}, r"rows were made differently, \"spatial='flatten', stride=1\" and "
                                      r"\"spatial='avgpool', stride=1\".* m1 \+ dataclasses.replace\(m2, rows_from="),
    ("conv2", {"stride": 2}, r"\"spatial='flatten', stride=1\" and \"spatial='flatten', stride=2\""),
    ("conv2", {"spatial": "interp", "method": "nearest"}, r"\"spatial='interp', stride=1, method='nearest'"),
])
def test_moments_of_other_layers_or_rows_refuse_to_merge(other, spatial_options, message):
    """Equal channel counts used to merge them silently into a wrong number."""
    layers = dict(zip(("conv1", "conv2", "conv3"), _conv_layers()))
    first = chunkcca.compute_moments(layers["conv1"][:20], layers["conv2"][:20], precision="float64")
    second = chunkcca.compute_moments(layers["conv1"][20:], layers[other][20:], precision="float64",
                                      **spatial_options)
    with pytest.raises(ValueError, match=message):
        first + second
    with pytest.raises(ValueError, match=message.split(".*")[0]):
        sum([first, second])
    deliberate = first + dataclasses.replace(second, layers=first.layers, rows_from=first.rows_from)
    assert deliberate.n == first.n + second.n and deliberate.layers == first.layers


def test_dft_moments_of_another_stride_refuse_to_merge():
    conv1, conv2, _ = _conv_layers()
    first = chunkcca.compute_moments(conv1[:20], conv2[:20], spatial="dft", precision="float64")
    second = chunkcca.compute_moments(conv1[20:], conv2[20:], spatial="dft", stride=2, precision="float64")
    assert first.batch_shape == second.batch_shape == (4, 4)
    with pytest.raises(ValueError, match="\"spatial='dft', stride=1\" and \"spatial='dft', stride=2\""):
        first + second
    assert first[0, 1].layers == ("conv1", "conv2")
    assert first[0, 1].rows_from == first.rows_from + ", freq_h=0, freq_w=1"  # the frequency an integer drops
    assert first[0:1, 1:2].rows_from == first.rows_from  # a slice keeps the dims and their labels


def test_dft_moments_know_their_frequencies_through_save_load_merge_and_index(tmp_path):
    """``cca_from_moments`` of dft Moments named their dims freq_h, freq_w (freq_0 for a 1-d layer) without labels,
    where ``cca`` labels them by frequency ([0, 1, -2, -1] on 4 positions): ``isel(freq_h=2)`` was frequency −2.
    The Moments carry their frequencies, which a save keeps, a merge checks, and indexing drops with its dims."""
    conv1, conv2, _ = _conv_layers()
    direct = chunkcca.cca(conv1, conv2, spatial="dft", precision="float64")
    first = chunkcca.compute_moments(conv1[:20], conv2[:20], spatial="dft", precision="float64")
    second = chunkcca.compute_moments(conv1[20:], conv2[20:], spatial="dft", precision="float64")
    assert list(first.batch_labels) == ["freq_h", "freq_w"]
    first.save(tmp_path / "first.moments")
    merged = chunkcca.Moments.load(tmp_path / "first.moments") + second
    solved = chunkcca.cca_from_moments(merged)
    assert solved["rho"].dims == direct["rho"].dims == ("freq_h", "freq_w", "component")
    for dim in ("freq_h", "freq_w"):
        np.testing.assert_array_equal(solved[dim], direct[dim])
        np.testing.assert_array_equal(solved[dim], [0, 1, -2, -1])
    np.testing.assert_allclose(solved["rho"], direct["rho"], atol=1e-12)
    assert list(merged[1].batch_labels) == ["freq_w"] and merged[0, 1].batch_labels == {}
    part = merged[1:3, ::2]  # slices keep their dims and take their labels' part (m[0:2] failed, m[:, 0] lost both)
    assert part.batch_shape == (2, 2) and [list(v) for v in part.batch_labels.values()] == [[1, -2], [0, -2]]
    assert list(merged[:, 0].batch_labels) == ["freq_h"]
    np.testing.assert_array_equal(merged[:, 0].scatter, merged.scatter[:, 0])
    with pytest.raises(IndexError, match=r"one integer, slice or array per batch dim, at most 2"):
        merged[0, 1, 2]
    relabelled = dataclasses.replace(second, batch_labels={"freq_h": [0, 1, 2, 3], "freq_w": [0, 1, -2, -1]})
    with pytest.raises(ValueError, match=r"cannot merge Moments of batch dims labelled otherwise"):
        first + relabelled
    unknown = dataclasses.replace(second, batch_labels={})  # as Moments saved before they knew them
    assert list((first + unknown).batch_labels) == ["freq_h", "freq_w"]
    assert chunkcca.cca_from_moments(unknown)["rho"].dims == ("freq_h", "freq_w", "component")
    with pytest.raises(ValueError, match=r"batch_labels must label each of the batch dims \(4, 4\)"):
        dataclasses.replace(second, batch_labels={"freq_h": [0, 1]})


def test_matching_merge_equals_the_one_pass_moments_and_keeps_provenance():
    conv1, conv2, _ = _conv_layers(3)
    options = {"spatial": "avgpool", "precision": "float64"}
    whole = chunkcca.compute_moments(conv1, conv2, row_norms=True, **options)
    merged = (chunkcca.compute_moments(conv1[:13], conv2[:13], row_norms=True, **options)
              + chunkcca.compute_moments(conv1[13:], conv2[13:], row_norms=True, **options))
    assert_moments_close(merged, whole, rtol=1e-13)
    np.testing.assert_allclose(merged.norm_products, whole.norm_products, rtol=1e-12)
    assert (merged.layers, merged.rows_from) == (whole.layers, whole.rows_from) == (("conv1", "conv2"),
                                                                                      "spatial='avgpool', stride=1")


def test_moments_without_provenance_still_merge_and_take_the_known(rng):
    rows = rng.standard_normal((60, 5)) + 2
    first, second = _moments_of(rows[:25], (2, 3)), _moments_of(rows[25:], (2, 3))
    assert first.layers == ("", "") and first.rows_from == ""
    assert_moments_close(first + second, _moments_of(rows, (2, 3)), rtol=1e-13)
    known = dataclasses.replace(second, layers=("", "fc"), rows_from="spatial='flatten', stride=1")
    for merged in (first + known, known + first):
        assert merged.layers == ("", "fc") and merged.rows_from == "spatial='flatten', stride=1"
        assert_moments_close(merged, _moments_of(rows, (2, 3)), rtol=1e-13)
    half = dataclasses.replace(first, layers=("conv", ""))
    assert (half + known).layers == ("conv", "fc")
    with pytest.raises(ValueError, match="layers must name each of the 2 sides"):
        dataclasses.replace(first, layers=("conv",))
    with pytest.raises(ValueError, match="layers must name each of the 2 sides"):
        dataclasses.replace(first, layers="ab")


def test_provenance_survives_select_save_and_load(tmp_path, rng):
    rows = rng.standard_normal((40, 6)) + 1
    whole = dataclasses.replace(
        unpack(partial_from_rows([rows[:, :1], rows[:, 1:3], rows[:, 3:]], "float64", row_norms=True), (1, 2, 3)),
        layers=("l1", "l2", "l3"), rows_from="spatial='avgpool', stride=1")
    pair = whole.select([2, 0])
    assert pair.layers == ("l3", "l1") and pair.rows_from == whole.rows_from
    pair.save(tmp_path / "m")
    loaded = Moments.load(tmp_path / "m")
    assert loaded.layers == ("l3", "l1") and loaded.rows_from == "spatial='avgpool', stride=1"
    with pytest.raises(ValueError, match="cannot merge Moments of layers"):
        loaded + dataclasses.replace(pair, layers=("l3", "l2"))


def test_saves_made_before_provenance_load_as_unknown(tmp_path, rng):
    import json

    rows = rng.standard_normal((30, 3))
    old = _moments_of(rows[:20], (1, 2))
    old.save(tmp_path / "old")
    metadata_path = tmp_path / "old" / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    for key in ("layers", "rows_from", "value_rounding", chunkcca.moments.ATTRIBUTES_ATTR,
                chunkcca.moments.ARRAYS_ATTR, chunkcca.moments.SAVE_ATTR):  # as an earlier save
        metadata["attributes"].pop(key)
    metadata_path.write_text(json.dumps(metadata))
    with pytest.warns(UserWarning, match=r"do not record their activations' rounding .* compute them again, or "
                                         r"give each side's: dataclasses.replace\(moments, value_rounding=\(eps_a, "
                                         r"eps_b\)\) with eps = chunkcca.moments.value_eps") as caught:
        loaded = Moments.load(tmp_path / "old")
    assert caught[0].filename == __file__  # the user's line
    assert loaded.value_rounding == (0.0, 0.0)
    assert loaded.layers == ("", "") and loaded.rows_from == ""
    new = dataclasses.replace(_moments_of(rows[20:], (1, 2)), layers=("a", "b"), rows_from="spatial='flatten', "
                                                                                          "stride=1")
    merged = loaded + new
    assert merged.layers == ("a", "b")
    assert_moments_close(merged, _moments_of(rows, (1, 2)), rtol=1e-13)


def test_moments_carry_channel_labels_into_results_from_moments(tmp_path):
    """cca_from_moments(compute_moments(a, b)) had no channel_a / channel_b labels where cca(a, b) has them, so
    .sel(channel_a="u") failed on the first and worked on the second; predictivity_from_folds likewise. Moments
    now carry each side's labels (saved, selected, merged: other labels refuse to merge)."""
    import dataclasses

    import xarray as xr

    from chunkcca.measures import predictivity_from_folds

    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 3))
    y = x @ rng.standard_normal((3, 2)) + rng.standard_normal((200, 2))
    a = xr.DataArray(x, dims=("datapoint", "channel"), coords={"channel": ["u", "v", "w"]}, name="a")
    b = xr.DataArray(y, dims=("datapoint", "channel"), coords={"channel": [10, 20]}, name="b")
    moments = chunkcca.compute_moments(a, b, precision="float64")
    direct = chunkcca.cca(a, b, precision="float64")
    from_moments = chunkcca.cca_from_moments(moments)
    assert list(from_moments["channel_a"].values) == ["u", "v", "w"] and list(from_moments["channel_b"]) == [10, 20]
    xr.testing.assert_allclose(from_moments["coef_a"].sel(channel_a="v"), direct["coef_a"].sel(channel_a="v"))
    assert list(chunkcca.svcca_from_moments(moments)["channel_a"].values) == ["u", "v", "w"]
    moments.save(tmp_path / "m")
    loaded = chunkcca.Moments.load(tmp_path / "m")
    assert list(loaded.channel_labels[0]) == ["u", "v", "w"] and list(loaded.channel_labels[1]) == [10, 20]
    assert list(loaded.select([1]).channel_labels[0]) == [10, 20]
    folds = list(chunkcca.compute_moments(a, b, folds=3, precision="float64").values())
    assert list(predictivity_from_folds(folds)["channel_b"].values) == [10, 20]
    relabelled = dataclasses.replace(moments, channel_labels=(np.array(["u", "v", "z"]), None))
    with pytest.raises(ValueError, match="cannot merge Moments of channels labelled otherwise"):
        moments + relabelled
    assert list((moments + dataclasses.replace(moments, channel_labels=())).channel_labels[0]) == ["u", "v", "w"]


def _every_saved_array(rng: np.random.Generator) -> list[Moments]:
    """Moments whose saves hold each kind of array ``Moments.save`` writes: labels, row norms, batch, map power."""
    dims = ("datapoint", "height", "width", "channel")
    a = xr.DataArray(rng.standard_normal((20, 4, 4, 2)).astype("float32"), dims=dims,
                     coords={"channel": ["u", "v"]}, name="a")
    b = xr.DataArray(rng.standard_normal((20, 4, 4, 3)).astype("float32"), dims=dims, name="b")
    dft = chunkcca.compute_moments(a, b, spatial="dft")
    return [chunkcca.compute_moments(a, b, row_norms=True), dft, dft[1:3]]


def test_an_overwrite_of_saved_moments_refuses_what_chunkcca_did_not_write(tmp_path, rng):
    """The overwrite checked only the root's mark: a user's notes and plots put inside saved Moments went with
    them. Now refused, naming them, and the folder is left as it was; Moments that hold only what chunkcca wrote
    (every kind of array it writes) are replaced as before."""
    for index, moments in enumerate(_every_saved_array(rng)):
        moments.save(tmp_path / f"m{index}")
        moments.save(tmp_path / f"m{index}", overwrite=True)
    assert Moments.load(tmp_path / "m2").map_power[0] is not None
    path = tmp_path / "m0"
    (path / "NOTES.txt").write_text("my notes")
    (path / "plots").mkdir()
    (path / "plots" / "fig.png").write_bytes(b"png")
    (path / "scatter" / "mine.txt").write_text("inside an array")
    before = sorted((p.relative_to(path).as_posix(), p.read_bytes() if p.is_file() else b"")
                    for p in path.rglob("*"))
    with pytest.raises(FileExistsError, match=r"m0 holds what chunkcca did not write \(NOTES\.txt, plots, "
                                              r"scatter/mine\.txt …\); an overwrite replaces only Moments"):
        _moments_of(rng.standard_normal((10, 2))).save(path, overwrite=True)
    assert sorted((p.relative_to(path).as_posix(), p.read_bytes() if p.is_file() else b"")
                  for p in path.rglob("*")) == before
    import zarr

    zarr.create_array(tmp_path / "m1" / "mine", shape=(2,), dtype="f8")  # a zarr array of the user's
    with pytest.raises(FileExistsError, match=r"m1 holds what chunkcca did not write \(mine\)"):
        _moments_of(rng.standard_normal((10, 2))).save(tmp_path / "m1", overwrite=True)


def test_moments_indexed_at_a_string_batch_label_say_it_in_rows_from():
    """Batch labels held in an object array (strings, as a store gives them back) have no .item(): indexing such
    Moments by an integer raised AttributeError (found beside a group audit)."""
    scatter = np.stack([np.eye(3), 2 * np.eye(3)])
    for labels, said in ((np.array(["u", "v"], dtype=object), "k='v'"), (np.array(["u", "v"]), "k='v'"),
                         (np.array([3, 4]), "k=4")):
        moments = Moments(10, np.zeros((2, 3)), scatter, (2, 1), batch_labels={"k": labels})
        second = moments[1]
        assert second.rows_from == said
        np.testing.assert_array_equal(second.scatter, 2 * np.eye(3))


def test_the_grid_of_continuous_channels_beside_a_dead_one_is_judged_on_a_few_rows(monkeypatch):
    """A dead channel (all 0, whose zeros are multiples of any step) sent every chunk of post-ReLU data through
    the full search of its channels' grid (each value's power-of-2 divisor: 1.4 ms a chunk, the fold 1.26-1.42 x
    slower; found by review); a constant channel has no grid, and continuous values are found off theirs in the
    first rows. Values that are on a grid are still found so."""
    from chunkcca import moments

    calls = []
    frexp = np.frexp
    monkeypatch.setattr(np, "frexp", lambda values: calls.append(1) or frexp(values))
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal((2048, 8)), 0).astype(np.float32)
    relu[:, 3] = 0
    assert not moments.coarse_grid([relu], *moments.finite_spread([relu])).any() and calls == []
    whole = np.round(relu * 20)
    grid = moments.coarse_grid([whole], *moments.finite_spread([whole]))
    assert calls and list(grid) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
