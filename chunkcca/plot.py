"""Plots of results: canonical correlation coefficient curves and similarity heatmaps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MARKS_PER_CURVE = 10  # markers drawn along each curve (not at every component)


def plot_rho(results: Mapping[str, xr.Dataset] | xr.Dataset, *, ax: Any = None, title: str | None = None) -> Any:
    """Plot ``rho`` against component for one result or a mapping label → result.

    Each curve gets its own colour, line style and marker, so curves that coincide stay visible. Uses
    whatever matplotlib backend is active; for files without a display, call ``matplotlib.use("Agg")``
    first or save with ``Figure.savefig()``.

    Parameters
    ----------
    results
        A result of [`chunkcca.cca()`][chunkcca.cca] or [`chunkcca.svcca()`][chunkcca.svcca], or of
        [`chunkcca.compare()`][chunkcca.compare] (drawn as the curves its measures name: CCA's ``rho`` for
        mean_cca, r2_cca and pwcca, SVCCA's ``svcca_rho`` of the kept directions for svcca, each legend saying
        which), or a mapping legend label → result; each curve must have the one dim ``component`` (select
        one group or frequency of a groupby or dft result first).
    ax
        Axes to draw on (default: a new figure).
    title
        Axes title (default: none).

    Returns
    -------
    The Axes.
    """
    import matplotlib.pyplot as plt

    if isinstance(results, xr.Dataset):
        results = {f"{_layer_name(results, 'layer_a', 'a')} vs {_layer_name(results, 'layer_b', 'b')}"
                   + "".join(f", {selected}" for selected in _selected(results)): results}
    if not isinstance(results, Mapping) or "cca_coef1" in results:  # get_cca_similarity's dict: no labels
        raise TypeError(f"plot_rho draws results of chunkcca.cca() or compare() (xarray Datasets), or a dict of "
                        f"them by label; got {type(results).__name__}"
                        + (" of google/svcca's keys: draw chunkcca.cca(a, b) of the same layers (the same ρ)"
                           if isinstance(results, Mapping) else ""))
    curves = {name: _with_dims(rho, ("component",), f"plot_rho: the {variable} of {label!r}")
              for label, result in results.items() for name, variable, rho in rho_curves(label, result)}
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    first = len(ax.get_lines())  # curves already on ax keep theirs; new ones continue the cycle
    for index, (label, rho) in enumerate(curves.items(), start=first):
        step = max(1, rho.sizes["component"] // MARKS_PER_CURVE)
        ax.plot(rho["component"], rho, lw=2.0, linestyle=LINESTYLES[index % len(LINESTYLES)],
                marker=MARKERS[index % len(MARKERS)], markersize=5, markevery=(index % step, step),
                label=f"{label} (mean {float(rho.mean()):.3f})")
    ax.set_xlabel("CCA component")
    ax.set_ylabel("canonical correlation ρ")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def rho_curves(label: str, result: xr.Dataset) -> list[tuple[str, str, xr.DataArray]]:
    """The canonical correlation curves of ``result`` as (legend, variable, curve with dim ``component``): its
    ``rho``, or for a result of ``compare()`` those its measures name, CCA's of every component (``rho``, for
    mean_cca, r2_cca, pwcca) and SVCCA's of its kept directions (``svcca_rho``), each legend saying which."""
    measures = set(str(result.attrs["measures"]).split(",")) if "measures" in result.attrs else None
    if measures is None:
        curves = [(label, "rho")] if "rho" in result else []
    else:
        curves = [(f"{label}: {legend}", variable) for legend, variable, names in (
            ("CCA", "rho", {"mean_cca", "r2_cca", "pwcca"}), ("SVCCA, kept directions", "svcca_rho", {"svcca"}))
            if measures & names and variable in result]
    if not curves:
        raise ValueError(f"plot_rho draws canonical correlations (rho), which the result {label!r} has not "
                         f"(its variables: {', '.join(map(str, result.data_vars))}): give it a result of cca() or "
                         f"svcca(), or of compare() with mean_cca, r2_cca, pwcca or svcca")
    return [(legend, variable, result[variable].rename({"svcca_component": "component"})
             if variable == "svcca_rho" else result[variable]) for legend, variable in curves]


def plot_frequency_means(result: xr.Dataset | xr.DataArray, *, ax: Any = None, title: str | None = None,
                         vmin: float | None = None, vmax: float | None = None) -> Any:
    """Heatmap of the mean canonical correlation per spatial frequency of a ``spatial="dft"`` result.

    Frequencies are shown in increasing order (zero in the middle); those where CCA is undefined (a layer does
    not vary there: NaN) are light grey. The title goes over the whole figure
    when the plot makes the figure, else over ``ax``; the colour bar stops short of the axes' top, so the
    title does not run into it.

    Parameters
    ----------
    result
        A result of ``cca(..., spatial="dft")`` (with ``rho_freq_mean``, dims ``freq_h`` and ``freq_w`` in
        either order; others are refused), or its ``rho_freq_mean`` alone.
    ax
        Axes to draw on (default: a new figure).
    title
        Title (default: none).
    vmin, vmax
        Colour range (default: the finite data's min and max); the colour bar label states it.

    Returns
    -------
    The Axes.
    """
    import matplotlib.pyplot as plt

    result = _as_dataset(result, "plot_frequency_means draws a result of cca(..., spatial='dft')")
    if "rho_freq_mean" not in result:
        raise ValueError("plot_frequency_means needs a result of cca(..., spatial='dft')")
    means = _with_dims(result["rho_freq_mean"], ("freq_h", "freq_w"), "plot_frequency_means: rho_freq_mean")
    means = means.sortby("freq_h").sortby("freq_w")
    vmin, vmax = _colour_range(means.values, vmin, vmax)
    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(4.8, 4.0), layout="constrained")
    image = ax.imshow(means.values, origin="lower", vmin=vmin, vmax=vmax,
                      cmap=plt.get_cmap("viridis").with_extremes(bad="lightgrey"),
                      extent=(float(means.freq_w[0]) - 0.5, float(means.freq_w[-1]) + 0.5,
                              float(means.freq_h[0]) - 0.5, float(means.freq_h[-1]) + 0.5))
    ax.set_xlabel("frequency along width (cycles per map)")
    ax.set_ylabel("frequency along height")
    _colorbar(ax, image, "mean canonical correlation")
    _title(ax, title, own_figure)
    return ax


def plot_similarity(result: xr.Dataset | xr.DataArray, measure: str | None = None, *, ax: Any = None,
                    annotate: bool = True, title: str | None = None, vmin: float | None = None,
                    vmax: float | None = None) -> Any:
    """Heatmap (layer_a × layer_b) of one measure of [`chunkcca.similarity()`][chunkcca.similarity].

    Cell labels are dark on light cells and light on dark cells; undefined (NaN) pairs read "n/a". Brighter
    is more alike: for a distance (Procrustes, the shape metric) the colour map runs the other way, as its
    colour bar says.

    Parameters
    ----------
    result
        A result of [`chunkcca.similarity()`][chunkcca.similarity] (variables with dims ``layer_a`` and
        ``layer_b``, in either order: cells are placed by the dims' names), or one of its variables
        (``sweep["cka"]``). A measure with other dims (e.g. ``groupby``'s) is refused: select one group first.
    measure
        The variable to draw (default: the first of ``attrs["measures"]``; a variable given alone, itself).
    ax
        Axes to draw on (default: a new figure sized to the layers).
    annotate
        Write each cell's value in it.
    title
        Title, placed as in [`plot_frequency_means()`][chunkcca.plot.plot_frequency_means] (default: the measure, the
        layers and the
        spatial reduction and stride from attrs; ``""`` for none).
    vmin, vmax
        Colour range (default: the finite data's min and max); the colour bar label states it.

    Returns
    -------
    The Axes.
    """
    import matplotlib.pyplot as plt

    result = _as_dataset(result, "plot_similarity draws a result of chunkcca.similarity() (an xarray Dataset) or one "
                                 "of its variables")
    if measure is None:
        layered = [str(name) for name, value in result.data_vars.items() if {"layer_a", "layer_b"} <= set(value.dims)]
        if not layered:
            raise ValueError("plot_similarity needs a result of chunkcca.similarity (variables with dims "
                             "(layer_a, layer_b))")
        asked = str(result.attrs.get("measures", "")).split(",")
        measure = next((name for name in asked if name in layered), layered[0])
    if measure not in result:
        raise ValueError(f"no variable {measure!r} in this result (its variables: "
                         f"{', '.join(sorted(map(str, result.data_vars)))})")
    values = _with_dims(result[measure], ("layer_a", "layer_b"), f"plot_similarity: {measure!r}")
    data = np.asarray(values.values, dtype=float)
    vmin, vmax = _colour_range(data, vmin, vmax)
    if title is None:
        details = [str(result.attrs["spatial"])] if "spatial" in result.attrs else []
        details += [f"stride {result.attrs['stride']}"] if "stride" in result.attrs else []
        details += [f"minibatches of {result.attrs['minibatch']}"] if "minibatch" in result.attrs else []
        title = (f"{measure}: layer_a vs layer_b" + "".join(f", {selected}" for selected in _selected(values))
                 + (f" ({', '.join(details)})" if details else ""))
    own_figure = ax is None
    if own_figure:
        longest_a, longest_b = (max(len(str(name)) for name in values[dim].values) for dim in ("layer_a", "layer_b"))
        # ~0.1 inch a title character, 0.075 a tick label's (layer_a's across, layer_b's at 45°: 0.055 down)
        width = max(1.0 + 0.7 * values.sizes["layer_b"] + 0.075 * longest_a, 4.4, 0.1 * len(title))
        height = max(0.8 + 0.6 * values.sizes["layer_a"] + 0.055 * longest_b, 3.4)
        _, ax = plt.subplots(figsize=(width, height), layout="constrained")
    # brighter is more alike for distances too (Procrustes, shape): their colour map runs the other way
    distance = "distance" in str(values.attrs.get("long_name", ""))
    cmap = plt.get_cmap("magma_r" if distance else "magma").with_extremes(bad="lightgrey")
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(values.sizes["layer_b"]), [str(v) for v in values["layer_b"].values], rotation=45, ha="right")
    ax.set_yticks(range(values.sizes["layer_a"]), [str(v) for v in values["layer_a"].values])
    stores = [str(result.attrs.get(f"store_{side}", "")) for side in "ab"]
    if all(stores) and stores[0] != stores[1]:  # layers of two stores (chunkcca sweep --b-store): which is which
        stores = [f" ({store.rstrip('/').rsplit('/', 1)[-1]})" for store in stores]
    else:
        stores = ["", ""]
    ax.set_xlabel(f"layer_b{stores[1]}")
    ax.set_ylabel(f"layer_a{stores[0]}")
    if annotate:
        finite = data[np.isfinite(data)]
        # two decimals, or two significant digits where they would all read 0.00 (standard errors of 0.004)
        digits = ".2f" if not finite.size or np.abs(finite).max() >= 0.095 else ".2g"
        for (i, j), value in np.ndenumerate(data):
            # where white text contrasts more than black (a NaN cell is light grey, whatever the colour range)
            dark_cell = np.isfinite(value) and _luminance(cmap(image.norm(value))) < 0.18
            ax.text(j, i, f"{value:{digits}}" if np.isfinite(value) else "n/a", ha="center", va="center",
                    color="white" if dark_cell else "black", fontsize="small")
    _colorbar(ax, image, f"{measure} (a distance: brighter is more alike)" if distance else measure)
    _title(ax, title, own_figure)
    return ax


def _selected(result: xr.Dataset | xr.DataArray) -> list[str]:
    """The scalar coordinates ``result`` was selected at beyond its layers (a group: ``sweep.sel(digit=0)``), as
    "name value"."""
    return [f"{name} {coord.item()}" for name, coord in result.coords.items()
            if coord.ndim == 0 and name not in ("layer_a", "layer_b")]


def _layer_name(result: xr.Dataset, key: str, default: str) -> str:
    """The layer of one side of a pair's ``result``: its scalar coordinate ``key``, which xarray keeps right through
    ``concat`` and ``sel`` (the attrs keep the first result's), else its attr, else ``default``."""
    if key in result.coords and result.coords[key].ndim == 0:
        return str(result.coords[key].item())
    return str(result.attrs.get(key, default))


def _as_dataset(result: Any, what: str) -> xr.Dataset:
    """A result to draw as a Dataset: a Dataset as it is, a DataArray (one variable of a result, ``sweep["cka"]``)
    as a Dataset of it alone, by its name ("value" unnamed) and with its attrs; else a TypeError saying ``what``
    the plot draws."""
    if isinstance(result, xr.DataArray):
        return result.to_dataset(name=result.name if result.name is not None else "value", promote_attrs=True)
    if not isinstance(result, xr.Dataset):
        raise TypeError(f"{what}; got {type(result).__name__}")
    return result


def _with_dims(values: xr.DataArray, dims: tuple[str, ...], what: str) -> xr.DataArray:
    """``values`` transposed to ``dims`` by name, whatever order its dims come in; a ValueError if it has other
    dims (e.g. a groupby dim: one plot draws one group) or lacks some."""
    if set(values.dims) != set(dims):
        got = ", ".join(map(str, values.dims))
        others = [str(dim) for dim in values.dims if dim not in dims]
        hint = f"; select one first, e.g. result.isel({', '.join(f'{dim}=0' for dim in others)})" \
            if others and set(dims) <= set(values.dims) else ""
        raise ValueError(f"{what} has dims ({got}); the plot needs ({', '.join(dims)}){hint}")
    return values.transpose(*dims)


def _colour_range(data: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """``vmin``/``vmax``, each defaulting to the finite data's min/max (0/1 if no value is finite; 0 to 1 and the
    value if all are one value)."""
    for name, value in (("vmin", vmin), ("vmax", vmax)):
        if value is not None and not np.isfinite(float(value)):  # NaN drew -0.1 to 0.1 in silence
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    finite = np.asarray(data, dtype=float)
    finite = finite[np.isfinite(finite)]
    data_low = float(finite.min()) if finite.size else 0.0
    data_high = float(finite.max()) if finite.size else 1.0
    low, high = (data_low if vmin is None else float(vmin)), (data_high if vmax is None else float(vmax))
    if low == high and vmin is None and vmax is None:  # one value (one pair): matplotlib drew it mid-colour on
        low, high = min(0.0, low), max(1.0, high)  # value ± 0.1 (a distance of 0 on -0.1 to 0.1); 0 to 1 holds it
    if not low <= high:  # matplotlib refused it once the figure was made, or drew a range nobody asked for
        if vmin is not None and vmax is not None:
            raise ValueError(f"vmin must be at most vmax, got vmin={vmin!r}, vmax={vmax!r}")
        given, value, side, other = (("vmin", vmin, "above", "vmax") if vmin is not None else
                                     ("vmax", vmax, "below", "vmin"))
        raise ValueError(f"{given}={value!r} is {side} the data's finite values ({data_low:g} to {data_high:g}), "
                         f"which set {other}: give {other} too")
    return low, high


def _colorbar(ax: Any, image: Any, name: str) -> Any:
    """A colour bar right of ``ax``, a little shorter than it and flush with its bottom, so the axes' title
    (above the axes' top) never overlaps the bar or its top tick label; labelled ``name`` and the colour range it
    draws, e.g. ``(colour range 0.21 to 0.98)`` (matplotlib widens a range of one value, 1 to 1, to 0.9 to 1.1)."""
    bar = ax.figure.colorbar(image, ax=ax, shrink=0.85, anchor=(0.0, 0.0))
    bar.set_label(f"{name}\n(colour range {image.norm.vmin:.2f} to {image.norm.vmax:.2f})")
    return bar


def _title(ax: Any, title: str | None, own_figure: bool) -> None:
    """Title a heatmap: over the whole figure (axes and colour bar) if the plot made the figure, else over ``ax``."""
    if title and own_figure:
        ax.figure.suptitle(title)
    elif title:
        ax.set_title(title)


def _luminance(rgba: tuple[float, ...]) -> float:
    """Relative luminance (WCAG, 0 black to 1 white) of an sRGB colour."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
