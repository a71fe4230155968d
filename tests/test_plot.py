"""The figures: distinguishable curves, readable heatmap labels, stated colour ranges, titles clear of colour bars."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import to_rgba
from matplotlib.text import Text

from chunkcca.plot import plot_frequency_means, plot_rho, plot_similarity

matplotlib.use("Agg")

LONG_TITLE = "conv2 (model0) vs pool2 (model1), per frequency"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _rho(values: np.ndarray, **attrs: str) -> xr.Dataset:
    """A cca-like result with a ``rho`` curve."""
    rho = xr.DataArray(values, dims="component", coords={"component": np.arange(len(values))})
    return xr.Dataset({"rho": rho}, attrs=attrs)


def _sweep(values: np.ndarray, **attrs) -> xr.Dataset:
    """A similarity-like result with one measure, ``cka``."""
    rows, columns = values.shape
    return xr.Dataset({"cka": (("layer_a", "layer_b"), values)},
                      coords={"layer_a": [f"model0/l{i}" for i in range(rows)],
                              "layer_b": [f"model1/l{j}" for j in range(columns)]},
                      attrs={"measures": "cka", **attrs})


def _frequencies(values: np.ndarray) -> xr.Dataset:
    """A dft-like result with ``rho_freq_mean``, frequencies in FFT order."""
    freq = np.fft.fftfreq(values.shape[0], 1 / values.shape[0]).astype(int)
    return xr.Dataset({"rho_freq_mean": (("freq_h", "freq_w"), values)}, coords={"freq_h": freq, "freq_w": freq})


def _luminance(colour) -> float:
    red, green, blue = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgba(colour)[:3])
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def _contrast(one, other) -> float:
    light, dark = sorted((_luminance(one), _luminance(other)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _titles_clear_of_colorbar(ax, title: str) -> None:
    figure = ax.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    [text] = [t for t in figure.findobj(Text) if t.get_text() == title and t.get_visible()]
    colorbar = figure.axes[-1]
    assert colorbar is not ax and colorbar.get_label() == "<colorbar>"
    title_box = text.get_window_extent(renderer)
    assert not title_box.overlaps(colorbar.get_tightbbox(renderer)), (title_box, colorbar.get_tightbbox(renderer))


def test_identical_rho_curves_differ_in_line_style_or_marker():
    curve = np.linspace(0.99, 0.2, 40)
    ax = plot_rho({"conv2, stride 1": _rho(curve), "conv2, stride 2": _rho(curve.copy())})
    first, second = ax.get_lines()
    assert (first.get_linestyle(), first.get_marker()) != (second.get_linestyle(), second.get_marker())
    assert first.get_linestyle() != second.get_linestyle() and first.get_marker() != second.get_marker()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        f"conv2, stride {s} (mean {curve.mean():.3f})" for s in (1, 2)]


def test_rho_styles_stay_distinct_for_the_demos_four_curves_and_across_calls_on_one_axes():
    curve = np.linspace(0.9, 0.1, 12)
    ax = plot_rho({str(i): _rho(curve) for i in range(4)})
    plot_rho({"fifth": _rho(curve)}, ax=ax)
    styles = [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
    assert len(set(styles)) == 5


def test_rho_names_what_it_draws_when_given_google_svccas_dict():
    """plot_rho(compat.get_cca_similarity(...)) failed with "'numpy.ndarray' object has no attribute 'attrs'"."""
    with pytest.raises(TypeError, match=r"plot_rho draws results of chunkcca.cca\(\) or compare\(\) .* got dict of "
                                        r"google/svcca's keys"):
        plot_rho({"cca_coef1": np.array([0.9, 0.5]), "mean": (0.7, 0.7)})
    with pytest.raises(TypeError, match="got ndarray"):
        plot_rho(np.array([0.9, 0.5]))


def test_rho_takes_a_single_result():
    ax = plot_rho(_rho(np.array([0.9, 0.5, 0.1]), layer_a="conv1", layer_b="conv2"), title="one")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["conv1 vs conv2 (mean 0.500)"]
    assert ax.get_title() == "one"


def test_similarity_labels_contrast_with_their_cells():
    # all values below 0.6: the pale top cell used to get a white label
    ax = plot_similarity(_sweep(np.array([[0.10, 0.20], [0.30, 0.40]])))
    image = ax.images[0]
    for text in ax.texts:
        column, row = text.get_position()
        cell = image.cmap(image.norm(image.get_array()[int(row), int(column)]))
        other = "black" if _luminance(text.get_color()) > 0.5 else "white"
        assert _contrast(text.get_color(), cell) >= _contrast(other, cell), (text.get_text(), cell)
    labels = {text.get_text(): _luminance(text.get_color()) for text in ax.texts}
    assert labels["0.40"] < 0.2 < labels["0.10"]  # dark text on the palest cell, light on the darkest


def test_similarity_states_its_colour_range_and_has_a_title():
    ax = plot_similarity(_sweep(np.array([[0.21, 0.5], [0.7, 0.98]]), spatial="avgpool", stride=2))
    assert ax.images[0].get_clim() == (0.21, 0.98)
    label = ax.figure.axes[-1].get_ylabel()
    assert label.startswith("cka") and "colour range 0.21 to 0.98" in label
    title = ax.figure.get_suptitle() or ax.get_title()
    assert title.startswith("cka: layer_a vs layer_b") and "avgpool" in title and "stride 2" in title
    _titles_clear_of_colorbar(ax, title)


def test_similarity_takes_a_colour_range_and_a_title():
    ax = plot_similarity(_sweep(np.array([[0.21, 0.5], [0.7, 0.98]])), "cka", vmin=0, vmax=1, title="sweep")
    assert ax.images[0].get_clim() == (0, 1)
    assert "colour range 0.00 to 1.00" in ax.figure.axes[-1].get_ylabel()
    assert "sweep" in (ax.figure.get_suptitle(), ax.get_title())
    ax = plot_similarity(_sweep(np.array([[0.5]])), title="")
    assert ax.figure.get_suptitle() == "" and ax.get_title() == ""


def test_a_colour_range_upside_down_is_refused_before_drawing():
    """vmin above vmax failed inside matplotlib, once the figure was made."""
    with pytest.raises(ValueError, match=r"vmin must be at most vmax, got vmin=0.5, vmax=0.2"):
        plot_similarity(_sweep(np.array([[0.21, 0.5]])), vmin=0.5, vmax=0.2)
    with pytest.raises(ValueError, match="vmin must be at most vmax"):
        plot_frequency_means(_frequencies(np.random.default_rng(0).random((4, 4))), vmin=1, vmax=0)
    assert not plt.get_fignums()


def test_one_end_of_the_colour_range_beyond_the_data_or_not_a_number_is_refused():
    """vmin alone above the data failed inside matplotlib naming neither argument, or (annotate=False) drew a
    range neither asked for nor the data's (0.63 to 0.80 for vmin=0.8 on 0.4 to 0.7); vmin=nan drew -0.1 to 0.1
    (found by audit). One end inside the data's range is taken as before."""
    sweep = _sweep(np.array([[0.4, 0.7]]))
    with pytest.raises(ValueError, match=r"vmin=0.8 is above the data's finite values \(0.4 to 0.7\), which set "
                                         r"vmax: give vmax too"):
        plot_similarity(sweep, vmin=0.8, annotate=False)
    with pytest.raises(ValueError, match=r"vmax=0.1 is below the data's finite values \(0.4 to 0.7\), which set "
                                         r"vmin: give vmin too"):
        plot_frequency_means(_frequencies(np.array([[0.4, 0.7], [0.5, 0.6]])), vmax=0.1)
    for bad in ({"vmin": float("nan")}, {"vmax": float("inf")}):
        with pytest.raises(ValueError, match=rf"{next(iter(bad))} must be a finite number"):
            plot_similarity(sweep, **bad)
    assert not plt.get_fignums()
    assert plot_similarity(sweep, vmin=0.5).images[0].get_clim() == (0.5, 0.7)


def test_a_colour_range_of_one_value_is_stated_as_drawn():
    """One value throughout (every pair 1.0): matplotlib drew the bar from 0.9 to 1.1, and the label said "colour
    range 1.00 to 1.00"; then it stated 0.90 to 1.10, and a distance of 0 (identical layers) was drawn mid-colour on
    -0.10 to 0.10. One value is drawn on 0 to 1 (or to the value), stated as drawn (found by audit)."""
    distance = "orthogonal Procrustes distance"
    for value, long_name, drawn in ((1.0, "linear CKA", (0.0, 1.0)), (0.0, distance, (0.0, 1.0)),
                                    (1.3, distance, (0.0, 1.3))):
        sweep = _sweep(np.full((1, 1), value))
        sweep["cka"].attrs["long_name"] = long_name
        ax = plot_similarity(sweep)
        assert ax.figure.axes[-1].get_ylim() == pytest.approx(drawn)
        assert f"colour range {drawn[0]:.2f} to {drawn[1]:.2f}" in ax.figure.axes[-1].get_ylabel()
        bright_end = 0.0 if "distance" in long_name else 1.0  # brighter is more alike
        assert ax.images[0].norm(value) == pytest.approx(bright_end if value in (0.0, 1.0) else 1.0)


def test_a_figure_says_which_group_estimator_and_stores_it_draws():
    """One group of a grouped sweep (``sel(digit=0)``), minibatch CKA and the layers of two stores were drawn with
    the titles, legends and axis labels of the whole sweep, exact CKA and one store; standard errors all read 0.00
    (found by audit)."""
    sweep = _sweep(np.array([[0.3, 0.4]]), spatial="avgpool", stride=1)
    sweep = xr.concat([sweep, sweep + 0.1], dim=xr.DataArray([0, 2], dims="digit", name="digit"),
                      combine_attrs="override")
    ax = plot_similarity(sweep.sel(digit=2))
    assert ax.figure._suptitle.get_text() == "cka: layer_a vs layer_b, digit 2 (avgpool, stride 1)"
    ax = plot_similarity(_sweep(np.array([[0.3]]), minibatch=100, store_a="/runs/run0.zarr", store_b="/runs/run1.zarr"))
    assert ax.figure._suptitle.get_text() == "cka: layer_a vs layer_b (minibatches of 100)"
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("layer_a (run0.zarr)", "layer_b (run1.zarr)")
    ax = plot_similarity(_sweep(np.array([[0.3]]), store_a="/runs/run0.zarr", store_b="/runs/run0.zarr"))
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("layer_a", "layer_b")
    ax = plot_similarity(_sweep(np.array([[0.0038, 0.0049]])))
    assert [text.get_text() for text in ax.texts] == ["0.0038", "0.0049"]
    result = _rho(np.array([0.9, 0.5])).assign_coords(layer_a="conv", layer_b="conv", digit=0)
    assert [t.get_text() for t in plot_rho(result).get_legend().get_texts()] == ["conv vs conv, digit 0 (mean 0.700)"]


def test_similarity_labels_undefined_pairs():
    ax = plot_similarity(_sweep(np.array([[0.3, np.nan], [0.6, 0.9]])))
    texts = [text.get_text() for text in ax.texts]
    assert "n/a" in texts and "nan" not in texts
    assert ax.images[0].get_clim() == (0.3, 0.9)
    ax.figure.canvas.draw()
    plot_similarity(_sweep(np.full((2, 2), np.nan)))  # nothing defined: no crash


def test_distances_are_drawn_brighter_where_more_alike_as_similarities_are():
    """One colour map for similarities and distances made bright mean alike for CKA and unlike for Procrustes,
    with nothing saying so. A distance's map runs the other way, and its colour bar says it is a distance."""
    sweep = _sweep(np.array([[0.1, 0.9]])).assign(
        procrustes=(("layer_a", "layer_b"), np.array([[0.1, 0.9]]), {"long_name": "orthogonal Procrustes distance"}))
    for measure, alike in (("cka", 1), ("procrustes", 0)):  # the more alike pair: CKA 0.9, distance 0.1
        ax = plot_similarity(sweep, measure)
        cells = [_luminance(ax.images[0].cmap(ax.images[0].norm(value))) for value in (0.1, 0.9)]
        assert cells[alike] > cells[1 - alike]
        assert ("a distance: brighter is more alike" in ax.figure.axes[-1].get_ylabel()) == (measure == "procrustes")


def test_similarity_still_defaults_to_the_first_measure_asked():
    sweep = _sweep(np.array([[0.2, 0.4]])).assign(svcca=(("layer_a", "layer_b"), np.array([[0.3, 0.5]])))
    sweep.attrs["measures"] = "svcca,cka"
    assert plot_similarity(sweep).figure.axes[-1].get_ylabel().startswith("svcca")


def test_a_variable_of_a_result_is_drawn_in_the_cells_of_the_result():
    """``sweep["cka"]`` and ``result["rho_freq_mean"]``, as xarray users select them (plot_similarity failed with
    "'DataArray' object has no attribute 'data_vars'"); the default title has what the variable carries, not the
    result's spatial and stride."""
    sweep = _sweep(np.array([[0.2, 0.4], [0.6, 0.8]]))
    whole, alone = plot_similarity(sweep), plot_similarity(sweep["cka"])
    assert [t.get_text() for t in alone.texts] == [t.get_text() for t in whole.texts] == ["0.20", "0.40", "0.60",
                                                                                         "0.80"]
    assert alone.figure.axes[-1].get_ylabel() == whole.figure.axes[-1].get_ylabel()
    means = _frequencies(np.arange(16.0).reshape(4, 4) / 16)
    np.testing.assert_array_equal(plot_frequency_means(means["rho_freq_mean"]).images[0].get_array(),
                                  plot_frequency_means(means).images[0].get_array())
    for plot in (plot_similarity, plot_frequency_means):
        with pytest.raises(TypeError, match=r"draws a result .*; got ndarray"):
            plot(np.ones((2, 2)))


def test_frequency_means_colour_range_follows_the_data():
    values = np.random.default_rng(0).uniform(0.3, 0.5, (6, 6))
    ax = plot_frequency_means(_frequencies(values))
    assert ax.images[0].get_clim() == (values.min(), values.max())
    assert f"colour range {values.min():.2f} to {values.max():.2f}" in ax.figure.axes[-1].get_ylabel()
    ax = plot_frequency_means(_frequencies(values), vmin=0, vmax=1)
    assert ax.images[0].get_clim() == (0, 1)


@pytest.mark.parametrize("given_axes", [False, True])
def test_frequency_means_title_clears_its_colour_bar(given_axes):
    values = np.random.default_rng(1).uniform(0.2, 0.9, (8, 8))
    ax = None
    if given_axes:
        _, (ax, _) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax = plot_frequency_means(_frequencies(values), ax=ax, title=LONG_TITLE)
    _titles_clear_of_colorbar(ax, LONG_TITLE)


def test_similarity_places_cells_by_the_dims_names_in_either_order():
    # a transposed result used to get three x ticks for two columns and its values under the wrong layer pair
    values = np.array([[0.11, 0.12, 0.13], [0.21, 0.22, 0.23]])
    for order in (("layer_b", "layer_a"), ("layer_a", "layer_b")):
        for measure in ("cka", None):
            ax = plot_similarity(_sweep(values).transpose(*order), measure)
            assert [t.get_text() for t in ax.get_xticklabels()] == ["model1/l0", "model1/l1", "model1/l2"]
            assert [t.get_text() for t in ax.get_yticklabels()] == ["model0/l0", "model0/l1"]
            assert (ax.get_xlabel(), ax.get_ylabel()) == ("layer_b", "layer_a")
            np.testing.assert_array_equal(ax.images[0].get_array(), values)
            cells = {tuple(text.get_position()): text.get_text() for text in ax.texts}
            assert cells == {(column, row): f"{values[row, column]:.2f}" for row in range(2) for column in range(3)}


def test_similarity_refuses_a_measure_with_other_dims():
    # per group, (digit, layer_a, layer_b) with 3 layer_b was drawn as an RGB image, then failed labelling cells
    sweep = _sweep(np.zeros((2, 3))).expand_dims(digit=[0, 1])
    for measure in ("cka", None):
        with pytest.raises(ValueError, match=r"plot_similarity: 'cka' has dims \(digit, layer_a, layer_b\); the plot "
                                             r"needs \(layer_a, layer_b\); select one first, e\.g\. "
                                             r"result\.isel\(digit=0\)"):
            plot_similarity(sweep, measure)
    ax = plot_similarity(sweep.isel(digit=1))
    np.testing.assert_array_equal(ax.images[0].get_array(), np.zeros((2, 3)))


@pytest.mark.parametrize("dims", [("digit", "component"), ("component", "digit")])
def test_rho_refuses_more_than_one_curve_per_result(dims):
    # three groups' curves used to be drawn as three unlabelled lines, or as lines across the groups
    rho = xr.DataArray(np.random.default_rng(2).uniform(0, 1, (3, 3)), dims=dims,
                       coords={"component": np.arange(3), "digit": [4, 5, 6]})
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match=r"plot_rho: the rho of 'per digit' has dims \(" + ", ".join(dims) +
                       r"\); the plot needs \(component\); select one first, e\.g\. result\.isel\(digit=0\)"):
        plot_rho({"one": _rho(np.array([0.9, 0.5])), "per digit": xr.Dataset({"rho": rho})}, ax=ax)
    assert not ax.get_lines(), "nothing is drawn"
    ax = plot_rho(xr.Dataset({"rho": rho}).sel(digit=5))
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), rho.sel(digit=5).values)


def test_frequency_means_places_frequencies_by_the_dims_names_in_either_order():
    # a transposed result used to be drawn transposed under the same axis labels and extent
    freq_h, freq_w = [0, 1, -1], [0, 1, -2, -1]
    values = np.arange(12.0).reshape(3, 4)
    result = xr.Dataset({"rho_freq_mean": (("freq_h", "freq_w"), values)}, coords={"freq_h": freq_h, "freq_w": freq_w})
    for order in (("freq_w", "freq_h"), ("freq_h", "freq_w")):
        ax = plot_frequency_means(result.transpose(*order))
        np.testing.assert_array_equal(ax.images[0].get_array(), values[np.argsort(freq_h)][:, np.argsort(freq_w)])
        assert ax.images[0].get_extent() == [-2.5, 1.5, -1.5, 1.5]


def test_frequency_means_refuses_other_dims():
    # per group, (digit, freq_h, freq_w) of one digit used to be drawn as a 1 x 4 RGBA image
    result = _frequencies(np.zeros((4, 4))).expand_dims(digit=[3])
    with pytest.raises(ValueError, match=r"rho_freq_mean has dims \(digit, freq_h, freq_w\); the plot needs "
                                         r"\(freq_h, freq_w\); select one first, e\.g\. result\.isel\(digit=0\)"):
        plot_frequency_means(result)


def test_rho_refuses_a_result_without_canonical_correlations_naming_it():
    """A CKA result raised a bare KeyError "No variable named 'rho'"."""
    cka_result = xr.Dataset({"cka": ((), 0.5)}, attrs={"layer_a": "a", "layer_b": "b"})
    with pytest.raises(ValueError, match=r"the result 'a vs b' has not \(its variables: cka\): give it a result of "
                                         r"cca\(\)"):
        plot_rho(cka_result)
    with pytest.raises(ValueError, match=r"no variable 'svcca' in this result \(its variables: cka\)"):
        plot_similarity(xr.Dataset({"cka": (("layer_a", "layer_b"), np.ones((1, 1)))}), "svcca")


def test_rho_draws_the_curves_a_compare_result_was_asked_for():
    """compare(measures=["svcca"]) was drawn as plain CCA's rho (of every component), labelled with its mean as
    if it were SVCCA's."""
    import chunkcca

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 20))
    b = a @ rng.standard_normal((20, 15)) + rng.standard_normal((300, 15))
    result = chunkcca.compare(a, b, measures=["svcca"])
    ax = plot_rho(result)
    [line] = ax.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), result["svcca_rho"].values)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        f"a vs b: SVCCA, kept directions (mean {float(result['svcca']):.3f})"]
    both = chunkcca.compare(a, b, measures=["mean_cca", "svcca"])
    sizes = [line.get_ydata().size for line in plot_rho({"run": both}).get_lines()]
    assert sizes == [15, both.sizes["svcca_component"]]
    with pytest.raises(ValueError, match=r"the result 'a vs b' has not \(its variables: cka, rows\)"):
        plot_rho(chunkcca.compare(a, b, measures=["cka"]))


def test_rho_names_the_layers_its_coordinates_name_after_a_concat():
    """Results concatenated and one selected keep the first result's attrs: the legend named layer_b 'fc2' for
    the pair with 'conv1'. The scalar coordinates, which xarray keeps right, name it."""
    results = [_rho(np.array([0.9, 0.5]), layer_a="fc10", layer_b=name).assign_coords(layer_a="fc10", layer_b=name)
               for name in ("fc2", "conv1")]
    one = xr.concat(results, "layer_b").sel(layer_b="conv1")
    assert one.attrs["layer_b"] == "fc2"  # as xarray leaves them
    assert [t.get_text() for t in plot_rho(one).get_legend().get_texts()] == ["fc10 vs conv1 (mean 0.700)"]


def test_an_undefined_pair_is_labelled_dark_on_its_light_grey_cell_whatever_the_range():
    """One defined value (a 1 x 1 range): every label, "n/a" too, was white, as on the darkest cell."""
    ax = plot_similarity(_sweep(np.array([[1.0, np.nan]])))
    colours = {text.get_text(): _luminance(text.get_color()) for text in ax.texts}
    assert colours["n/a"] < 0.2


def test_long_layer_names_fit_in_the_figure_and_leave_the_cells_readable():
    """Names of 60 characters (a transformer's modules) were cut at the figure's edge ("ction_0") and the heatmap
    shrank to a dot: the figure grows with its longest tick labels."""
    names = [f"model{m}/encoder.layers.11.self_attention.output.dense_projection_{i}" for m in (0, 1) for i in range(3)]
    sweep = _sweep(np.random.default_rng(0).random((3, 3))).assign_coords(layer_a=names[:3], layer_b=names[3:])
    ax = plot_similarity(sweep)
    figure = ax.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        box = label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= figure.bbox.width and box.y1 <= figure.bbox.height
    cells = ax.get_window_extent(renderer)
    assert cells.width / 3 >= 0.5 * figure.dpi and cells.height / 3 >= 0.4 * figure.dpi  # inches a cell
