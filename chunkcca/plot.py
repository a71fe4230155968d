"""Plots of results: canonical correlation coefficient curves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr


def plot_rho(results: Mapping[str, xr.Dataset] | xr.Dataset, *, ax: Any = None, title: str | None = None) -> Any:
    """Plot ``rho`` against component for one result or a mapping label → result; return the Axes.

    Uses whatever matplotlib backend is active; for files without a display, call
    ``matplotlib.use("Agg")`` first or save with :meth:`Figure.savefig`.
    """
    import matplotlib.pyplot as plt

    if isinstance(results, xr.Dataset):
        results = {results.attrs.get("layer_a", "a") + " vs " + results.attrs.get("layer_b", "b"): results}
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for label, result in results.items():
        rho = result["rho"]
        ax.plot(rho["component"], rho, lw=2.0, label=f"{label} (mean {float(rho.mean()):.3f})")
    ax.set_xlabel("CCA component")
    ax.set_ylabel("canonical correlation ρ")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def plot_frequency_means(result: xr.Dataset, *, ax: Any = None, title: str | None = None) -> Any:
    """Heatmap of the mean canonical correlation per spatial frequency of a ``spatial="dft"`` result.

    Frequencies are shown in increasing order (zero in the middle); returns the Axes.
    """
    import matplotlib.pyplot as plt

    if "rho_freq_mean" not in result:
        raise ValueError("plot_frequency_means needs a result of cca(..., spatial='dft')")
    means = result["rho_freq_mean"].sortby("freq_h").sortby("freq_w")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.8, 4.0), layout="constrained")
    image = ax.imshow(means.values, origin="lower", vmin=0, vmax=1, cmap="viridis",
                      extent=(float(means.freq_w[0]) - 0.5, float(means.freq_w[-1]) + 0.5,
                              float(means.freq_h[0]) - 0.5, float(means.freq_h[-1]) + 0.5))
    ax.set_xlabel("frequency along width (cycles per map)")
    ax.set_ylabel("frequency along height")
    ax.figure.colorbar(image, ax=ax, label="mean canonical correlation")
    if title:
        ax.set_title(title)
    return ax


def plot_similarity(result: xr.Dataset, measure: str | None = None, *, ax: Any = None, annotate: bool = True) -> Any:
    """Heatmap (layer_a × layer_b) of one measure of :func:`chunkcca.similarity` (default: the first one asked
    for); returns the Axes."""
    import matplotlib.pyplot as plt

    if measure is None:
        layered = [str(name) for name, value in result.data_vars.items() if value.dims == ("layer_a", "layer_b")]
        if not layered:
            raise ValueError("plot_similarity needs a result of chunkcca.similarity (variables with dims "
                             "(layer_a, layer_b))")
        asked = str(result.attrs.get("measures", "")).split(",")
        measure = next((name for name in asked if name in layered), layered[0])
    if measure not in result:
        raise ValueError(f"no measure {measure!r} in this result (has {sorted(map(str, result.data_vars))})")
    values = result[measure]
    if ax is None:
        size = (1.2 + 0.7 * values.sizes["layer_b"], 1.0 + 0.6 * values.sizes["layer_a"])
        _, ax = plt.subplots(figsize=(max(size[0], 4.0), max(size[1], 3.0)), layout="constrained")
    image = ax.imshow(values.values, cmap="magma", aspect="auto")
    ax.set_xticks(range(values.sizes["layer_b"]), [str(v) for v in values["layer_b"].values], rotation=45, ha="right")
    ax.set_yticks(range(values.sizes["layer_a"]), [str(v) for v in values["layer_a"].values])
    if annotate:
        for (i, j), value in np.ndenumerate(values.values):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                    fontsize="small")
    ax.figure.colorbar(image, ax=ax, label=measure)
    return ax
