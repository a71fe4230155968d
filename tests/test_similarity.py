"""similarity() and compare(): all layer pairs, or several measures of one pair, in one pass equal the single
computations; each chunk is read once."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import matplotlib
import numpy as np
import pytest
import xarray as xr

import chunkcca
from chunkcca import cca, cka, compare, procrustes, pwcca, shape_metric, similarity, svcca
from chunkcca.plot import plot_similarity

matplotlib.use("Agg")
DIMS = ("datapoint", "height", "width", "channel")


def _layers(seed: int = 0, datapoints: int = 60) -> dict[str, xr.DataArray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((datapoints, 4, 4, 3))
    layers = {}
    for model in (0, 1):
        for name, channels in (("conv1", 5), ("conv2", 4)):
            noise = rng.standard_normal((datapoints, 4, 4, channels))
            data = np.maximum(z @ rng.standard_normal((3, channels)) + noise, 0)
            layers[f"model{model}/{name}"] = xr.DataArray(data, dims=DIMS, name=f"model{model}/{name}")
    return layers


PAIRWISE = {
    "mean_cca": lambda a, b, **kw: float(cca(a, b, precision="float64", **kw)["rho_mean"]),
    "r2_cca": lambda a, b, **kw: float(cca(a, b, precision="float64", **kw)["r2_cca"]),
    "svcca": lambda a, b, **kw: float(svcca(a, b, precision="float64", **kw)["rho_mean"]),
    "pwcca": lambda a, b, **kw: float(pwcca(a, b, precision="float64", **kw)["pwcca"]),
    "cka": lambda a, b, **kw: float(cka(a, b, precision="float64", **kw)["cka"]),
    "cka_debiased": lambda a, b, **kw: float(cka(a, b, debiased=True, precision="float64", **kw)["cka"]),
    "procrustes": lambda a, b, **kw: float(procrustes(a, b, precision="float64", **kw)["procrustes"]),
    "shape": lambda a, b, **kw: float(shape_metric(a, b, alpha=0.5, precision="float64", **kw)["shape_distance"]),
}


@pytest.mark.parametrize("spatial", ["flatten", "avgpool"])
def test_every_pair_equals_the_pairwise_call(spatial):
    layers = _layers()
    set_a = {k: v for k, v in layers.items() if k.startswith("model0")}
    set_b = {k: v.chunk({"datapoint": 13}) for k, v in layers.items() if k.startswith("model1")}
    result = similarity(set_a, set_b, measures=list(PAIRWISE), spatial=spatial, precision="float64", alpha=0.5)
    assert result["cka"].dims == ("layer_a", "layer_b")
    assert list(result["layer_b"].values) == ["model1/conv1", "model1/conv2"]
    for name_a, a in set_a.items():
        for name_b, b in set_b.items():
            for measure, pairwise in PAIRWISE.items():
                got = float(result[measure].sel(layer_a=name_a, layer_b=name_b))
                assert got == pytest.approx(pairwise(a, b, spatial=spatial), abs=1e-9), (measure, name_a, name_b)


def test_each_chunk_of_each_layer_is_read_once(tmp_path):
    reads: list[tuple[str, int]] = []

    def block(layer, index):
        reads.append((layer, index))
        rng = np.random.default_rng([hash(layer) % 1000, index])
        return rng.standard_normal((10, 2, 2, 3))

    def lazy(layer):
        return da.concatenate([da.from_delayed(dask.delayed(block)(layer, i), shape=(10, 2, 2, 3), dtype=float)
                               for i in range(4)])

    layers = {name: lazy(name) for name in ("a1", "a2", "b1")}
    similarity({"a1": layers["a1"], "a2": layers["a2"]}, {"b1": layers["b1"], "a1": layers["a1"]},
               measures=["cka", "mean_cca"])
    assert sorted(reads) == sorted((name, i) for name in ("a1", "a2", "b1") for i in range(4))


def test_datatree_input_and_heatmap(tmp_path):
    tree = chunkcca.write_activations(tmp_path / "s.zarr", _layers(), chunks=25)
    result = similarity(tree["model0"], [tree["model1/conv1"], tree["model1/conv2"]], measures=["cka"])
    assert list(result["layer_a"].values) == ["model0/conv1", "model0/conv2"]
    ax = plot_similarity(result, "cka")
    ax.figure.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    result.to_netcdf(tmp_path / "sweep.nc")  # attrs a netCDF file can hold
    assert xr.open_dataset(tmp_path / "sweep.nc").attrs["measures"] == "cka"


def test_bad_sweeps_are_rejected_before_streaming():
    layers = _layers()
    small = xr.DataArray(np.zeros((60, 2, 2, 3)), dims=DIMS, name="small")
    with pytest.raises(ValueError, match=r"one spatial size for all layers, got 'model0/conv1' 4x4.*'small' 2x2"):
        similarity({"model0/conv1": layers["model0/conv1"]}, {"small": small})
    with pytest.raises(ValueError, match="no measure given; choose one or more from mean_cca"):  # "unknown measure ()"
        compare(np.ones((5, 2)), np.ones((5, 2)), measures=[])
    with pytest.raises(ValueError, match="unknown measure 'cca'; choose from mean_cca, r2_cca"):
        similarity(layers, layers, measures=["cca"])
    with pytest.raises(ValueError, match="similarity supports spatial='flatten' or 'avgpool'"):
        similarity(layers, layers, spatial="dft")
    with pytest.raises(TypeError, match="a_layers must be a mapping"):
        similarity(np.zeros(3), layers)


def test_precision_auto_in_a_sweep_and_one_read_per_chunk():
    """precision='auto' works for sweeps too, and its float64 pilot chunk is not read again by the main pass."""
    reads: list[tuple[str, int]] = []

    def block(layer, index):
        reads.append((layer, index))
        return np.random.default_rng([len(layer), index]).standard_normal((10, 2, 2, 3))

    def lazy(layer):
        return da.concatenate([da.from_delayed(dask.delayed(block)(layer, i), shape=(10, 2, 2, 3), dtype=float)
                               for i in range(4)])

    a, b = lazy("a"), lazy("bb")
    result = chunkcca.cca(a, b, precision="auto")
    assert sorted(reads) == sorted((name, i) for name in ("a", "bb") for i in range(4))
    assert result.attrs["precision"] == "float32" and "first 10 datapoints" in result.attrs["precision_auto"]
    exact = chunkcca.cca(a, b, precision="float64")
    np.testing.assert_allclose(result["rho"], exact["rho"], rtol=0, atol=1e-6)  # float32 products after the pilot
    swept = similarity({"a": a}, {"bb": b}, measures=["mean_cca", "cka"], precision="auto")
    assert swept.attrs["precision"] == "float32" and "precision_auto" in swept.attrs
    assert float(swept["mean_cca"].item()) == pytest.approx(float(exact["rho_mean"]), abs=1e-6)


def test_an_undefined_pair_is_nan_with_a_warning_not_the_end_of_the_sweep():
    rng = np.random.default_rng(5)
    live = xr.DataArray(rng.standard_normal((40, 3)), dims=("datapoint", "channel"), name="live")
    dead = xr.DataArray(np.zeros((40, 2)), dims=("datapoint", "channel"), name="dead")  # a dead ReLU layer
    with pytest.warns(RuntimeWarning, match="cka, mean_cca of 'live' and 'dead' are NaN: layer 'dead' has no"):
        result = similarity({"live": live}, {"live": live, "dead": dead}, measures=["cka", "mean_cca"])
    assert float(result["cka"].sel(layer_a="live", layer_b="live")) == pytest.approx(1.0)
    assert np.isnan(result["cka"].sel(layer_a="live", layer_b="dead").item())
    assert np.isnan(result["mean_cca"].sel(layer_a="live", layer_b="dead").item())


def test_a_sweep_gives_each_pair_s_ranks_as_compare_does():
    """compare() gave rank_a and rank_b (dead units leave canonical correlations of 0 that mean_cca counts) and a
    sweep did not: the same ranks per pair now, -1 where the pair's CCA is undefined, and none without a measure
    taken from the CCA of all channels."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((80, 6))
    half_dead = x.copy()
    half_dead[:, :2] = 0.0  # two dead units: rank 4 of 6
    layers = {name: xr.DataArray(values, dims=("datapoint", "channel"), name=name) for name, values in
              (("half_dead", half_dead), ("dependent", x[:, :3] @ rng.standard_normal((3, 5))),
               ("live", x + rng.standard_normal((80, 6))), ("dead", np.zeros((80, 2))))}
    set_a = {name: layers[name] for name in ("half_dead", "dependent")}
    set_b = {name: layers[name] for name in ("live", "dead")}
    with pytest.warns(RuntimeWarning, match="layer 'dead' has no varying channel"):
        result = similarity(set_a, set_b, measures=["pwcca", "cka"], precision="float64")
    for name_a, a in set_a.items():
        pair = chunkcca.compare(a, layers["live"], measures=["mean_cca"], precision="float64")
        for side in ("a", "b"):
            assert int(result[f"rank_{side}"].sel(layer_a=name_a, layer_b="live")) == int(pair[f"rank_{side}"])
        assert int(result["rank_b"].sel(layer_a=name_a, layer_b="dead")) == -1
    assert result["rank_a"].sel(layer_b="live").values.tolist() == [4, 3]
    for measures in (["cka"], ["svcca"]):  # svcca's value needs no CCA of all channels: none is solved for ranks
        assert "rank_a" not in similarity(set_a, {"live": layers["live"]}, measures=measures)


def test_a_measure_undefined_for_one_pair_is_nan_there(monkeypatch):
    """E.g. debiased CKA when a side's unbiased HSIC with itself is not positive (few rows)."""
    import dataclasses

    from chunkcca.measures import MEASURES, UndefinedMeasure

    def undefined(pair):
        raise UndefinedMeasure("debiased CKA is undefined here")

    monkeypatch.setitem(MEASURES, "cka_debiased", dataclasses.replace(MEASURES["cka_debiased"], solve=undefined))
    x = {"x": xr.DataArray(np.random.default_rng(6).standard_normal((30, 3)), dims=("datapoint", "channel"))}
    with pytest.warns(RuntimeWarning, match="cka_debiased of 'x' and 'x' is NaN: debiased CKA is undefined here"):
        result = similarity(x, x, measures=["cka_debiased", "cka"])
    assert np.isnan(result["cka_debiased"].item()) and result["cka"].item() == pytest.approx(1.0)


def test_one_name_for_two_layers_keeps_them_apart():
    """Two models' layers may share names (fc1 of model 0 and of model 1): layers are told apart by their data,
    labelled by the names given on each axis, and a layer given on both axes is read once."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((50, 3)), rng.standard_normal((50, 3)) + rng.standard_normal((50, 1))
    result = similarity({"fc1": a, "fc2": b}, {"fc1": b, "fc2": a}, measures=["cka"])
    assert list(result["layer_a"].values) == ["fc1", "fc2"] and list(result["layer_b"].values) == ["fc1", "fc2"]
    assert float(result["cka"].sel(layer_a="fc1", layer_b="fc2")) == pytest.approx(1.0)
    assert float(result["cka"].sel(layer_a="fc1", layer_b="fc1")) == pytest.approx(float(cka(a, b)["cka"]),
                                                                                     rel=1e-12)


def test_the_same_data_under_other_labels_or_mask_is_another_layer():
    """Layers were told apart by their Dask data alone: a shuffled baseline (the data relabelled) or the layer
    without its padding mask was taken for the layer itself, CKA 1.0 against 0.06 and 0.85 pair by pair,
    silently. The same data with the same coordinates is still one layer, read once."""
    rng = np.random.default_rng(5)
    a = xr.DataArray(da.from_array(rng.standard_normal((80, 4)), chunks=20), dims=("datapoint", "channel"),
                     coords={"datapoint": np.arange(80)}, name="fc")
    shuffled = a.assign_coords(datapoint=rng.permutation(80))
    result = similarity({"fc": a}, {"shuffled": shuffled, "same": a.copy()}, measures=["cka"], precision="float64")
    want = float(cka(a, shuffled, precision="float64")["cka"])
    assert float(result["cka"].sel(layer_a="fc", layer_b="shuffled")) == pytest.approx(want, rel=1e-12)
    assert float(result["cka"].sel(layer_a="fc", layer_b="shuffled")) < 0.5
    assert float(result["cka"].sel(layer_a="fc", layer_b="same")) == pytest.approx(1.0, rel=1e-12)
    tokens = rng.standard_normal((40, 6, 3))
    mask = np.arange(6) < rng.integers(1, 7, size=40)[:, None]
    masked = xr.DataArray(da.from_array(tokens, chunks=(10, -1, -1)), dims=("datapoint", "token", "channel"),
                          name="enc").assign_coords(mask=(("datapoint", "token"), da.from_array(mask, chunks=(10, -1))))
    unmasked = masked.drop_vars("mask")
    options = {"spatial": "avgpool", "precision": "float64"}  # each layer pooled over its own real positions
    swept = similarity({"masked": masked}, {"unmasked": unmasked}, measures=["cka"], **options)
    want = float(cka(masked, unmasked, **options)["cka"])
    assert float(swept["cka"].item()) == pytest.approx(want, rel=1e-12) and want < 1 - 1e-6


def test_a_list_of_nodes_naming_one_layer_twice_is_refused(tmp_path):
    """The same layer of two runs' stores, given as a list of nodes, kept only the last (a dict by name): one
    row, the second store's value, silently. Refused, naming the stores; a mapping names them apart."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((50, 3)), rng.standard_normal((50, 2))
    runs = [chunkcca.write_activations(tmp_path / f"run{i}.zarr", {"fc": a + i * b[:, :1]}) for i in (0, 1)]
    other = chunkcca.write_activations(tmp_path / "other.zarr", {"fc2": b})
    with pytest.raises(ValueError, match=rf"a_layers names layer 'fc' 2 times \(from {tmp_path / 'run0.zarr'}, "
                                         rf"{tmp_path / 'run1.zarr'}\); give each its own name with a mapping"):
        similarity([runs[0]["fc"], runs[1]["fc"]], [other["fc2"]], measures=["cka"])
    apart = similarity({"run0/fc": runs[0]["fc"], "run1/fc": runs[1]["fc"]}, [other["fc2"]], measures=["cka"])
    assert [float(apart["cka"].sel(layer_a=f"run{i}/fc").item()) for i in (0, 1)] == pytest.approx(
        [float(cka(a + i * b[:, :1], b)["cka"]) for i in (0, 1)], rel=1e-12)
    with pytest.raises(ValueError, match=r"b_layers names layers by keys that read alike as text \(1, '1'\)"):
        similarity([other["fc2"]], {1: a, "1": a + b[:, :1]}, measures=["cka"])  # one was left out (found by audit)


def _counted_layer(name: str, reads: list, chunks: int = 5, size: int = 40) -> da.Array:
    """A (chunks · size, 3, 3, c) lazy layer whose every chunk read is logged in ``reads``."""
    channels = {"a": 4, "b": 3}[name]

    def block(index: int) -> np.ndarray:
        reads.append((name, index))
        rng = np.random.default_rng([len(name), index])
        latent = rng.standard_normal((size, 3, 3, 2))
        mix = np.random.default_rng(len(name) + 7).standard_normal((2, channels))
        return latent @ mix + 0.5 * rng.standard_normal((size, 3, 3, channels)) + 1.0

    return da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(size, 3, 3, channels), dtype=float)
                           for i in range(chunks)])


@pytest.mark.parametrize("spatial", ["flatten", "avgpool"])
def test_compare_equals_each_measure_alone_from_one_read_of_each_chunk(spatial):
    """compare(measures=[...]) gives what the single-measure functions give (1e-12: the same float64 solves on
    the same Moments, merged in the same order) and reads every chunk once."""
    from chunkcca import cca, cka, compare, procrustes, pwcca, shape_metric, svcca

    reads: list = []
    a, b = _counted_layer("a", reads), _counted_layer("b", reads)
    measures = ["mean_cca", "r2_cca", "svcca", "pwcca", "cka", "cka_debiased", "procrustes", "shape"]
    result = compare(a, b, measures=measures, spatial=spatial, precision="float64", keep=0.9, alpha=0.5)
    assert sorted(reads) == sorted((name, i) for name in "ab" for i in range(5))
    options = {"spatial": spatial, "precision": "float64"}
    alone = {"mean_cca": float(cca(a, b, **options)["rho_mean"]), "r2_cca": float(cca(a, b, **options)["r2_cca"]),
             "svcca": float(svcca(a, b, keep=0.9, **options)["rho_mean"]),
             "pwcca": float(pwcca(a, b, **options)["pwcca"]), "cka": float(cka(a, b, **options)["cka"]),
             "cka_debiased": float(cka(a, b, debiased=True, **options)["cka"]),
             "procrustes": float(procrustes(a, b, **options)["procrustes"]),
             "shape": float(shape_metric(a, b, alpha=0.5, **options)["shape_distance"])}
    for measure, value in alone.items():
        assert float(result[measure]) == pytest.approx(value, rel=1e-12, abs=1e-12), measure
    np.testing.assert_allclose(result["rho"], cca(a, b, **options)["rho"], rtol=1e-12)
    assert int(result["svcca_dims_a"]) == int(svcca(a, b, keep=0.9, **options)["dims_a"])
    assert result.attrs["measures"] == ",".join(measures)
    assert result.attrs["keep"] == 0.9 and result.attrs["alpha"] == 0.5 and result.attrs["spatial"] == spatial
    only_cka = similarity({"a": a}, {"b": b}, measures=["cka"], **options)
    assert not {"keep", "alpha", "ridge", "epsilon", "confidence"} & set(only_cka.attrs)  # none read: none recorded


def test_compare_per_frequency_and_its_refusals():
    from chunkcca import cca, compare

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((30, 4, 4, 3)), rng.standard_normal((30, 4, 4, 2))
    result = compare(a, b, measures=["mean_cca"], spatial="dft", precision="float64")
    want = cca(a, b, spatial="dft", precision="float64")
    assert float(result["mean_cca"]) == pytest.approx(float(want["rho_mean"]), rel=1e-12)
    assert result["rho"].dims == ("freq_h", "freq_w", "component") and "rho_freq_mean" in result
    with pytest.raises(ValueError, match="cka does not work per spatial frequency"):
        compare(a, b, measures=["mean_cca", "cka"], spatial="dft")
    with pytest.raises(TypeError, match=r"compare\(\): keep is not read by cka"):
        compare(a, b, measures=["cka"], keep=0.5)
    with pytest.raises(ValueError, match="name a measure twice"):
        compare(a, b, measures=["cka", "cka"])
    with pytest.raises(TypeError, match=r"compare\(\) got unexpected keyword argument 'sptial'"):
        compare(a, b, sptial="dft")


def test_plot_similarity_defaults_to_the_first_measure_asked(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chunkcca.plot import plot_similarity

    layers = _layers()
    result = similarity(layers, layers, measures=["cka", "mean_cca"], spatial="avgpool")
    result.to_netcdf(tmp_path / "s.nc")
    for saved in (result, xr.open_dataset(tmp_path / "s.nc")):
        ax = plot_similarity(saved)
        assert ax.figure.axes[-1].get_ylabel().startswith("cka")
        plt.close(ax.figure)
    with pytest.raises(ValueError, match=r"needs a result of chunkcca\.similarity"):
        plot_similarity(xr.Dataset({"x": ((), 1.0)}))


def test_similarity_needs_as_many_rows_as_its_measures_do_as_compare():
    """similarity refused fewer than 4 rows for every measure (compare takes 2; debiased CKA, which needs 4, is
    NaN in a sweep, as in a group of a sweep), and a spatial="features" pair of one row blamed its values' range
    ("rescale it") for what was too few rows."""
    layers = _layers(datapoints=3)
    a, b = layers["model0/conv1"], layers["model1/conv2"]
    swept = similarity({"a": a}, {"b": b}, measures=["cka", "mean_cca", "procrustes"], spatial="avgpool")
    paired = compare(a, b, measures=["cka", "mean_cca", "procrustes"], spatial="avgpool")
    for name in ("cka", "mean_cca", "procrustes"):  # float64 both, the same sums: within rounding (3 rows)
        np.testing.assert_allclose(float(swept[name][0, 0]), float(paired[name]), rtol=1e-12, atol=1e-12)
    assert int(swept["rows"]) == 3
    with pytest.warns(RuntimeWarning, match="cka_debiased of 'a' and 'b' is NaN: debiased CKA needs at least 4 rows"):
        swept = similarity({"a": a}, {"b": b}, measures=["cka", "cka_debiased"], spatial="avgpool")  # as in a group
    assert np.isnan(float(swept["cka_debiased"][0, 0]))
    assert float(swept["cka"][0, 0]) == pytest.approx(float(paired["cka"]), rel=1e-12)
    one = {"a": a[:1]}, {"b": b[:1]}
    for measure_options in ({"measures": ["cka"], "spatial": "features"}, {"measures": ["cka"], "spatial": "avgpool"}):
        with pytest.raises(ValueError, match="give 1 row: every measure needs at least 2"):
            similarity(*one, **measure_options)
    with pytest.raises(ValueError, match="give 1 row: every measure needs at least 2"):
        cka(a[:1], b[:1], spatial="features")


def test_every_similarity_result_says_its_rows_in_its_attrs():
    """The sweep's covariance result had attrs["rows"]; its features and minibatch results had not."""
    layers = _layers(datapoints=12)
    a, b = {"a": layers["model0/conv1"]}, {"b": layers["model1/conv2"]}
    for options in ({"spatial": "features"}, {"spatial": "avgpool", "minibatch": 4}, {"spatial": "avgpool"},
                    {"spatial": "flatten"}):
        result = similarity(a, b, measures=["cka"], **options)
        assert result.attrs["rows"] == int(result["rows"]), options
    assert similarity(a, b, measures=["cka"], spatial="flatten").attrs["rows"] == 12 * 16


def test_two_models_layers_of_one_name_are_told_apart_by_their_stores(tmp_path):
    """Two recordings' 'conv' were named 'a (conv)' and 'b (conv)' ("datapoint labels differ: 100 of layer 'a
    (conv)' are not in layer 'b (conv)'"), in a sweep 'conv (b_layers)': read as layers of those names."""
    rng = np.random.default_rng(0)
    stores = [tmp_path / "m0.zarr", tmp_path / "m1.zarr", tmp_path / "other" / "m1.zarr"]
    for store, datapoints in zip(stores, (30, 20, 30)):
        chunkcca.write_activations(store, {"conv": rng.standard_normal((datapoints, 4))})
    conv0, conv1, conv2 = (chunkcca.open_activations(store)["conv"] for store in stores)
    with pytest.raises(ValueError, match=r"layer 'conv \(m0.zarr\)' has 30 datapoints but layer 'conv \(m1.zarr\)' "
                                         r"has 20"):
        cka(conv0, conv1)
    with pytest.raises(ValueError, match=r"layer 'conv' has 30 datapoints but layer 'conv \(m1.zarr\)' has 20"):
        similarity({"conv": conv0}, {"conv": conv1}, measures=["cka"])
    folder_named = cka(conv1, conv2.isel(datapoint=slice(0, 20)))  # one folder name: the whole paths
    assert (folder_named.attrs["layer_a"], folder_named.attrs["layer_b"]) == (
        f"conv ({stores[1]})", f"conv ({stores[2]})")
    doubled = (conv0["activations"] * 2).rename("conv")  # no store of its own
    assert cka(conv0, doubled).attrs["layer_b"] == "conv (as b)"


def test_every_layer_of_a_store_told_apart_is_named_with_it(tmp_path):
    """In a sweep over two recordings only the namesake was named with its store ("got 'conv' 3x3, 'pool' 2x2,
    'conv (m1.zarr)' 3x3": m1's 'pool' read as m0's). Every layer of a store told apart now carries it, in
    messages only: the result's labels are the sets' keys."""
    rng = np.random.default_rng(0)
    stores = [tmp_path / "m0.zarr", tmp_path / "m1.zarr"]
    for store in stores:
        chunkcca.write_activations(store, {"conv": rng.standard_normal((30, 3, 3, 4)),
                                           "pool": rng.standard_normal((30, 2, 2, 4))})
    (conv0, pool0), (conv1, pool1) = ([chunkcca.open_activations(store)[name] for name in ("conv", "pool")]
                                      for store in stores)
    with pytest.raises(ValueError, match=r"got 'conv' 3x3, 'pool \(m1.zarr\)' 2x2, 'conv \(m1.zarr\)' 3x3;"):
        similarity({"conv": conv0}, {"pool": pool1, "conv": conv1}, spatial="flatten")
    with pytest.raises(ValueError, match=r"got 'conv' 3x3, 'pool' 2x2, 'conv \(m1.zarr\)' 3x3;"):
        similarity({"conv": conv0, "pool": pool0}, {"conv": conv1}, spatial="flatten")
    result = similarity({"conv": conv0}, {"pool": pool1, "conv": conv1}, spatial="avgpool", measures=["cka"])
    assert list(result.layer_b.values) == ["pool", "conv"]


def test_a_sweep_warns_of_too_few_rows_for_the_widest_pair_it_solves():
    """A sweep counted its two widest layers as a pair, two of one set never solved together: 60 rows of a1 (40
    channels) and a2 (35) against b (3) warned "only 60 rows for 75 channels of a pair" where the widest pair has
    43 (and with groupby, groups of 30 rows against "40 channels" where pairs have 23). Found by audit."""
    rng = np.random.default_rng(0)
    a1, a2, b = (xr.DataArray(rng.standard_normal((60, p)), dims=("datapoint", "channel")) for p in (40, 35, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        similarity({"a1": a1, "a2": a2}, {"b": b}, measures=["mean_cca"], precision="float64")
        grouped = {name: layer.assign_coords(g=("datapoint", np.repeat([0, 1], 30))) for name, layer in
                   (("a1", a1[:, :20]), ("a2", a2[:, :20]), ("b", b))}
        similarity({"a1": grouped["a1"], "a2": grouped["a2"]}, {"b": grouped["b"]}, measures=["mean_cca"],
                   groupby="g", precision="float64")
    with pytest.warns(RuntimeWarning, match="only 40 rows for 43 channels of a pair"):
        similarity({"a1": a1[:40], "a2": a2[:40]}, {"b": b[:40]}, measures=["mean_cca"], precision="float64")


def test_a_layer_against_itself_keeps_its_name_as_in_a_sweep():
    """A layer measured against itself was named 'a (m0/conv1)' and 'b (m0/conv1)' in its result (a sweep keeps
    the names): results of a row of pairs did not concat into a grid, nor select by the layer's name. Two layers of
    one name that are not one (two models' 'conv2') are still told apart."""
    layers = _layers()
    layer = layers["model0/conv1"]
    row = xr.concat([cka(layer, layers[name]) for name in ("model0/conv1", "model0/conv2")], "layer_b")
    assert row["layer_b"].values.tolist() == ["model0/conv1", "model0/conv2"]
    assert float(row["cka"].sel(layer_b="model0/conv1")) == pytest.approx(1.0, abs=1e-12)
    assert compare(layer, layer, measures=["cka"]).attrs["layer_a"] == "model0/conv1"
    other = layers["model1/conv1"].rename("model0/conv1")  # another layer of the same name
    assert cka(layer, other).attrs["layer_b"] == "model0/conv1 (as b)"
