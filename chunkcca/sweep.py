"""All layer pairs in one pass: every chunk of every layer is read once.

The layers of both sets are streamed together into one :class:`~chunkcca.moments.Moments` over
all their channels (one side per layer); every pair's measures are then small solves on its
two sides (:meth:`Moments.select`). Memory: (P + 2 + 2L) × P float64 per partial, P the total
channels of the L distinct layers, checked against ``memory_limit`` before streaming.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import xarray as xr

from .measures import (
    UndefinedMeasure,
    cca_from_moments,
    check_alpha,
    check_svcca_options,
    cka_from_moments,
    non_constant,
    procrustes_from_moments,
    pwcca_from_moments,
    shape_metric_from_moments,
    svcca_from_moments,
)
from .moments import Moments, Precision
from .pairs import MEMORY_LIMIT, align_layers, check_options, stream_layers
from .spatial import plan_adapters, row_count
from .store import as_activations, layer_paths
from .stream import SPLIT_EVERY

#: Each measure of a sweep, as a scalar from one pair's Moments, its options and its CCA (solved once per pair).
MEASURES: dict[str, Callable[[Moments, dict[str, float], Callable[[], xr.Dataset]], float]] = {
    "mean_cca": lambda m, o, solved: float(solved()["rho_mean"]),
    "r2_cca": lambda m, o, solved: float(solved()["r2_cca"]),
    "svcca": lambda m, o, solved: float(svcca_from_moments(m, keep=o["keep"], epsilon=o["epsilon"])["rho_mean"]),
    "pwcca": lambda m, o, solved: float(pwcca_from_moments(m, epsilon=o["epsilon"], solved=solved())["pwcca"]),
    "cka": lambda m, o, solved: float(cka_from_moments(m)["cka"]),
    "cka_debiased": lambda m, o, solved: float(cka_from_moments(m, debiased=True)["cka"]),
    "procrustes": lambda m, o, solved: float(procrustes_from_moments(m)["procrustes"]),
    "shape": lambda m, o, solved: float(shape_metric_from_moments(m, alpha=o["alpha"])["shape_distance"]),
}


def as_layer_set(layers: Any, role: str) -> dict[str, Any]:
    """A set of layers: a mapping name → layer, a DataTree (every node holding activations) or a list of nodes."""
    if isinstance(layers, xr.DataTree):
        return {path: layers.root[path] for path in layer_paths(layers)}
    if isinstance(layers, Mapping):
        return {str(name): layer for name, layer in layers.items()}
    if isinstance(layers, (list, tuple)) and all(isinstance(node, xr.DataTree) for node in layers):
        return {node.path.lstrip("/"): node for node in layers}
    raise TypeError(f"{role} must be a mapping of name to layer, a DataTree or a list of DataTree nodes, "
                    f"got {type(layers).__name__}")


def similarity(a_layers: Any, b_layers: Any, *, measures: tuple[str, ...] | list[str] = ("mean_cca", "cka"),
               spatial: str = "flatten", stride: int = 1, epsilon: float = 0.0, keep: float = 0.99,
               alpha: float = 1.0, precision: Precision = "float32", split_every: int = SPLIT_EVERY,
               memory_limit: int | str = MEMORY_LIMIT, scheduler: Any = None, progress: bool = False,
               nan_policy: str = "raise") -> xr.Dataset:
    """Every measure for every pair (layer_a, layer_b) of two sets of layers, in one streamed pass.

    Parameters
    ----------
    a_layers, b_layers
        Mappings of name → layer (anything :func:`chunkcca.cca` takes), DataTrees (every node
        with activations) or lists of DataTree nodes. A layer in both sets is read once.
    measures
        Any of "mean_cca", "r2_cca", "svcca" (with ``keep`` of the variance), "pwcca", "cka",
        "cka_debiased", "procrustes", "shape" (the angular shape distance with partial whitening ``alpha``).
    spatial
        "flatten" (all layers need one spatial size) or "avgpool" (any sizes); interp and dft
        pair layers individually and are offered by the per-pair functions.
    stride, epsilon, precision, split_every, memory_limit, scheduler, progress, nan_policy
        As for :func:`chunkcca.cca`. With ``nan_policy="omit"`` a row is left out of every pair when any
        layer holds NaN or Inf in it (all layers are streamed together).

    Returns
    -------
    xarray.Dataset
        One variable per measure with dims (layer_a, layer_b), plus ``rows``.
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ValueError(f"unknown measure {unknown or measures!r}; choose from {', '.join(MEASURES)}")
    check_options(spatial=spatial, stride=stride, epsilon=epsilon, precision=precision, nan_policy=nan_policy)
    if spatial not in ("flatten", "avgpool"):
        raise ValueError(f"similarity supports spatial='flatten' or 'avgpool'; for {spatial!r} compare pairs with "
                         f"chunkcca.cca")
    check_svcca_options(keep, "variance")
    check_alpha(alpha)
    set_a, set_b = as_layer_set(a_layers, "a_layers"), as_layer_set(b_layers, "b_layers")
    if not set_a or not set_b:
        raise ValueError("similarity needs at least one layer on each side")
    layers = {name: as_activations(layer, name) for name, layer in set_a.items()}
    for name, layer in set_b.items():
        array = as_activations(layer, name)
        if name in layers and layers[name].data.name != array.data.name:
            raise ValueError(f"layer name {name!r} stands for different layers in a_layers and b_layers; "
                             f"give them distinct names")
        layers.setdefault(name, array)
    names = list(layers)
    first = layers[names[0]]
    layers = {name: align_layers(first, layer)[1] for name, layer in layers.items()}
    if spatial == "flatten":
        sizes = {name: layer.shape[1:-1] for name, layer in layers.items()}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{name!r} {'x'.join(map(str, size)) or 'fc'}" for name, size in sizes.items())
            raise ValueError(f"spatial='flatten' needs one spatial size for all layers, got {listed}; use "
                             f"spatial='avgpool'")
    adapters = tuple(plan_adapters(spatial, first, layer)[1] for layer in layers.values())
    rows = row_count(adapters[0], first.sizes["datapoint"], stride)
    if rows < 4:
        raise ValueError(f"the layers give {rows} rows; similarity needs at least 4")
    stats, rows_omitted, precision, note = stream_layers(
        list(layers.values()), adapters, stride=stride, precision=precision, split_every=split_every,
        memory_limit=memory_limit, scheduler=scheduler, progress=progress, nan_policy=nan_policy,
        row_norms="cka_debiased" in measures)
    attrs = {"spatial": spatial, "stride": int(stride), "precision": precision, "precision_auto": note,
             "epsilon": float(epsilon), "keep": float(keep), "alpha": float(alpha), "rows": int(stats.n),
             "rows_omitted": int(rows_omitted)}
    return _pairwise(stats, names, list(set_a), list(set_b), measures,
                     {"epsilon": float(epsilon), "keep": float(keep), "alpha": float(alpha)},
                     attrs={key: value for key, value in attrs.items() if value is not None})


def _without_variance(pair: Moments, names: tuple[str, str]) -> str | None:
    """The name of a side of ``pair`` none of whose channels varies (a dead layer), or None."""
    variance = np.diagonal(pair.scatter).real
    for name, part in zip(names, pair.side_slices()):
        if not non_constant(variance[part], np.abs(pair.mean[part])).any():
            return name
    return None


def _pairwise(stats: Moments, names: list[str], names_a: list[str], names_b: list[str], measures: Any,
              options: dict[str, float], attrs: dict[str, Any]) -> xr.Dataset:
    values = {measure: np.full((len(names_a), len(names_b)), np.nan) for measure in measures}
    for i, name_a in enumerate(names_a):
        for j, name_b in enumerate(names_b):
            pair = stats.select([names.index(name_a), names.index(name_b)])
            dead = _without_variance(pair, (name_a, name_b))
            if dead:  # every measure is undefined: NaN throughout, one warning
                warnings.warn(f"{', '.join(measures)} of {name_a!r} and {name_b!r} are NaN: layer {dead!r} has no "
                              f"varying channel", RuntimeWarning, stacklevel=3)
                continue
            solved = functools.cache(lambda pair=pair: cca_from_moments(pair, epsilon=options["epsilon"]))
            for measure in measures:
                try:
                    values[measure][i, j] = MEASURES[measure](pair, options, solved)
                except UndefinedMeasure as reason:  # one dead layer must not sink the whole sweep
                    warnings.warn(f"{measure} of {name_a!r} and {name_b!r} is NaN: {reason}", RuntimeWarning,
                                  stacklevel=3)
    return xr.Dataset(
        {measure: (("layer_a", "layer_b"), value) for measure, value in values.items()}
        | {"rows": ((), np.int64(stats.n))},
        coords={"layer_a": np.array(names_a, dtype=object), "layer_b": np.array(names_b, dtype=object)},
        attrs={"measures": ",".join(measures), **attrs},  # a string: netCDF attributes take no lists
    )
