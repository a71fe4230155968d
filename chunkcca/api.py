"""The public functions: layers in, one streamed pass, labelled ``xarray`` results out.

Every function checks its options once, at the door ([`StreamOptions`][chunkcca.options.StreamOptions],
[`SolveOptions`][chunkcca.options.SolveOptions]), aligns and plans the layers (nothing is read), streams
them once (``chunkcca.passes``) and solves the measures declared in
[`chunkcca.measures.MEASURES`][chunkcca.measures.MEASURES] on the Moments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ._stack import user_stacklevel
from .layers import (
    VARIABLE,
    align_layers,
    aligned_to,
    as_activations,
    check_pairing,
    check_position_dims,
    check_position_labels,
    check_reordered,
    check_value_rounding,
    holds_positions,
    layer_paths,
    named,
    node_name,
)
from .measures import (
    MEASURES,
    ROWS_ATTRS,
    SMALLEST_VARIANCE,
    IllConditionedWarning,
    Needs,
    NonFiniteStatistics,
    PairSolves,
    UndefinedMeasure,
    check_measures,
    cka_ratio,
    is_result_name,
    jackknife,
    side_without_variance,
    with_layers,
)
from .moments import Moments
from .options import MASK, SOLVE_NAMES, SolveOptions, StreamOptions, check_flag, group_codes, plain
from .passes import GramSums, Streamed, gram_pass, minibatch_pass, pair_provenance, stream_layers
from .rows import Adapter, by_gram, is_batched, plan_adapters, plan_sweep_adapters
from .store import read_coordinate
from .tiles import TiledMoments


def _prepare_pair(a: Any, b: Any, options: StreamOptions) -> tuple[xr.DataArray, xr.DataArray, tuple[Adapter, Adapter]]:
    """Validate, name and align two layers (a reordering over half of ``memory_limit`` refused) and plan their
    adapters; nothing is read."""
    layer_a, layer_b = named(a, "a", options.dims), named(b, "b", options.dims)
    if layer_a.name == layer_b.name and not _same_layer(layer_a, layer_b):  # one name, two layers: told apart
        layer_a, layer_b = _told_apart(layer_a, "as a", [layer_b]), _told_apart(layer_b, "as b", [layer_a])
    layer_a, layer_b, reordered = align_layers(layer_a, layer_b)
    check_position_dims(layer_a, layer_b, options.spatial)
    check_reordered(str(layer_a.name), [layer_b] if reordered else [], int(options.memory_limit))
    check_position_labels(layer_a, layer_b, options.spatial)
    return layer_a, layer_b, plan_adapters(layer_a, layer_b, options)


def _told_apart(layer: xr.DataArray, role: str, namesakes: Sequence[xr.DataArray]) -> xr.DataArray:
    """``layer`` renamed apart from its ``namesakes`` (other layers of its name), in its messages and results: by
    its store where theirs differ ("conv2 (m1.zarr)": two models recorded apart), else by ``role`` ("conv2 (as
    b)"). It was "b (conv2)", read as a layer of that name ("layer 'b (conv2)'")."""
    return layer.rename(f"{layer.name} ({_store_tag(layer, namesakes) or role})")


def _store_tag(layer: xr.DataArray, namesakes: Sequence[xr.DataArray]) -> str | None:
    """What tells ``layer`` apart from its ``namesakes`` by its store: the store's folder ("m1.zarr"), or its
    whole path where theirs share the folder's name; None when they are of its store, or it has none."""
    store = layer.encoding.get("store")
    theirs = [str(other.encoding.get("store")) for other in namesakes]
    if store is None or str(store) in theirs:
        return None
    folder = PurePosixPath(str(store)).name
    return str(store) if any(PurePosixPath(other).name == folder for other in theirs) else folder


def _check_rows(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], whitens: bool = True, *,
                least_rows: int = 2, channels: int | None = None) -> None:
    """Before streaming: refuse fewer rows than the measures need (``least_rows``: 2, 4 for debiased CKA, 0 for
    Moments to keep, which one row may make; ``needs()`` says it); warn, for measures that invert a
    covariance (``whitens``), when the rows are no more than the channels of a pair (``paired_channels``: a
    singular covariance, which a ridge can still make sense of), naming the largest stride that gives more where
    a stride took them below. ``channels``: of the widest pair solved (``paired_channels``; default, of two layers)."""
    datapoints = layers[0].sizes["datapoint"]
    rows = adapters[0].row_count(datapoints)
    channels = _paired_channels(layers) if channels is None else channels
    names = ", ".join(repr(str(x.name)) for x in layers)
    stride, total = adapters[0].stride, dataclasses.replace(adapters[0], stride=1).row_count(datapoints)
    if stride > 1 and rows < least_rows <= total:
        raise ValueError(f"stride {stride} leaves {rows} of the {total} rows of layers {names}: {needs(least_rows)}; "
                         f"use a smaller stride")
    if total < least_rows:  # one datapoint of fc layers: the solve said "covariance needs more than 1 rows"
        raise ValueError(f"layers {names} give {total} row{'' if total == 1 else 's'}: {needs(least_rows)}")
    if rows > channels or not whitens:
        return
    fewer = ""
    if stride > 1:
        largest = -(-total // channels) - 1
        fewer = (f"; stride {stride} leaves {rows} of their {total} rows: "
                 + (f"a stride of at most {largest} gives more" if largest >= 1 else f"even stride 1 gives {total}"))
    warnings.warn(f"only {rows} row{'' if rows == 1 else 's'} for {channels} channels of a pair (layers {names})"
                  f"{fewer}: {SINGULAR}", RuntimeWarning, stacklevel=user_stacklevel())


#: What too few rows for a pair's channels mean, and what to do.
SINGULAR = ("the covariance is singular: correlations are meaningless unless a ridge (epsilon > 0) regularises it, "
            "and then they depend on its size; or keep fewer dimensions with svcca(keep=...)")


@dataclasses.dataclass(frozen=True)
class Groups:
    """Which group (or fold) each datapoint is in: ``codes`` (datapoint,) 0 … len(labels) − 1 (a pass takes them
    by ``_pass_codes``), the groups' ``labels``, the ``dim`` the results gain, and whether they are ``folds``
    (measured on the rest) rather than groups of ``groupby`` (which may be named "fold" too)."""

    codes: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray  # datapoints per group, in label order
    dim: str
    folds: bool = False


def _groups(layers: Sequence[xr.DataArray], options: StreamOptions) -> Groups | None:
    """The groups ``options.groupby`` or ``options.folds`` asks for, from the coordinate of the first of the aligned
    ``layers`` that holds it (every other layer holding it must agree) or the datapoints' order; None for
    neither. Reads the coordinate, not the data."""
    layer = layers[0]
    if isinstance(options.folds, int):
        datapoints = layer.sizes["datapoint"]
        if options.folds > datapoints:
            raise ValueError(f"folds={options.folds} (--folds {options.folds}) is more than the {datapoints} "
                             f"datapoints")
        sizes = [len(part) for part in np.array_split(np.arange(datapoints), options.folds)]
        codes = np.repeat(np.arange(options.folds), sizes)
        return Groups(codes, np.arange(options.folds), np.asarray(sizes), "fold",
                      folds=True)
    name = options.groupby if options.groupby is not None else options.folds
    if name is None:
        return None
    option = "groupby" if options.groupby is not None else "folds"
    asked = f"{option}={name!r} (--{option} {name})"  # in the API's words and the command's
    if name == "datapoint":
        unit, remedy = (("group", "name a coordinate on datapoint that labels groups of them (e.g. a class label)")
                        if option == "groupby" else
                        ("fold", "give folds=K (--folds K), or a coordinate naming each datapoint's fold"))
        raise ValueError(f"{asked}: the datapoint labels would make each datapoint a {unit} of its own; {remedy}")
    if option == "groupby" and is_result_name(name):  # the groups' dim would be taken for the result's own
        raise ValueError(f"{asked}: results name a dim or variable {name!r} of their own, which the groups' dim "
                         f"would be taken for; rename the coordinate first (layer.rename({{{name!r}: 'group'}}))")
    layer = next((held for held in layers if name in held.coords and held.coords[name].dims == ("datapoint",)),
                 layer)
    if name not in layer.coords or layer.coords[name].dims != ("datapoint",):
        found = [str(c) for c, coord in layer.coords.items() if coord.dims == ("datapoint",) and c != "datapoint"]
        raise ValueError(f"{asked}: layer {str(layer.name)!r} has no coordinate {name!r} on datapoint "
                         f"(it has {', '.join(found) or 'none but the datapoint labels'})")
    values = read_coordinate(layer, name)
    for other in layers:  # xarray's equality: NaN labels equal NaN
        if (other is not layer and name in other.coords and other.coords[name].dims == ("datapoint",)
                and not read_coordinate(other, name).equals(values)):
            raise ValueError(f"{asked}: layers {str(layer.name)!r} and {str(other.name)!r} label their "
                             f"datapoints differently in {name!r}; give them the same labels")
    labels, codes = group_codes(values.values, option, name, str(layer.name))
    if option == "folds" and len(labels) < 2:
        raise ValueError(f"{asked} gives {len(labels)} fold; folds need at least 2")
    return Groups(codes, labels, np.bincount(codes, minlength=len(labels)),
                  name if option == "groupby" else "fold", folds=option == "folds")


def _pass_codes(groups: Groups | None, adapter: Adapter, chunks: tuple[int, ...]) -> da.Array | None:
    """The group codes a pass takes, in datapoint ``chunks``: each datapoint's group; for ``groupby`` with a stride
    that does not divide a
    datapoint's rows, (datapoint, 2) with its index among its group's datapoints too, so that each group's rows
    are strided as the group's alone would be (``engine._fold_task``): the whole run's stride gave groups of
    datapoints in turn other positions. Where the stride divides a datapoint's rows, both keep the same rows."""
    if groups is None:
        return None
    if groups.folds or adapter.rows_per_datapoint % adapter.stride == 0:
        return da.from_array(groups.codes, chunks=(chunks,))
    ranks = np.empty_like(groups.codes)
    order = np.argsort(groups.codes, kind="stable")
    ranks[order] = np.arange(groups.codes.size) - np.repeat(np.cumsum(groups.sizes) - groups.sizes, groups.sizes)
    return da.from_array(np.stack([groups.codes, ranks], axis=1), chunks=(chunks, 2))


def _check_group_rows(groups: Groups | None, layers: Sequence[xr.DataArray], adapter: Adapter,
                      options: StreamOptions, wanted: Needs) -> None:
    """Before the pass: every group of ``groupby`` can give the rows the measures need (``wanted.least_rows``: those
    the stride keeps of its datapoints, before padding; a fold's rest at most ceil(rows per datapoint / stride) per
    datapoint), and every fold the 2 rows a held-out measure tests on, else a ValueError naming the first that
    cannot (a group per value of a continuous coordinate, a fold of one row, failed after the whole pass)."""
    least_rows = wanted.least_rows
    if groups is None or not least_rows:
        return
    per_datapoint = -(-adapter.rows_per_datapoint // adapter.stride)  # at most
    if groups.folds:  # measured on the rest: each fold's leave-out
        rest = groups.sizes.sum() - groups.sizes
        short = np.flatnonzero(rest * per_datapoint < least_rows)
        if short.size:
            left = int(rest[short[0]])
            raise ValueError(f"folds: without fold {plain(groups.labels[short[0]])!r} the rest holds {left} "
                             f"datapoint{'' if left == 1 else 's'}, fewer rows than the jackknife's "
                             f"leave-outs need ({needs(least_rows)}); use fewer folds or more datapoints")
        left_out = _drops_padding(adapter, layers) or options.nan_policy == "omit"  # rows left out may empty a
        if wanted.held_out and not left_out:  # fold, which is then left out (a warning)
            _check_fold_rows(groups, adapter, options, wanted.held_out)
        return
    small = np.flatnonzero([adapter.row_count(size) < least_rows for size in groups.sizes])  # each strided apart
    if small.size:
        label, size = plain(groups.labels[small[0]]), int(groups.sizes[small[0]])
        remedy = ("group by a coordinate whose values label groups of datapoints (e.g. a class label)"
                  if small.size == len(groups.labels) else "leave their datapoints out (layer.isel(datapoint=...))")
        raise ValueError(f"groupby={options.groupby!r} (--groupby {options.groupby}): {small.size} of the "
                         f"{len(groups.labels)} groups give fewer rows than the measures need ({needs(least_rows)}; "
                         f"the first, {groups.dim}={label!r}, holds {size} datapoint{'' if size == 1 else 's'}); "
                         f"{remedy}")


def _check_fold_rows(groups: Groups, adapter: Adapter, options: StreamOptions, held_out: Sequence[str]) -> None:
    """Before the pass, where no row is left out (padding, nan_policy="omit"): a ValueError naming the first fold
    whose own rows (those the whole run's stride keeps of its datapoints) are 1, fewer than the 2 that the
    ``held_out`` measures test each fold on (a fold the stride leaves no row is left out after the pass, with a
    warning: ``_without_emptied_folds``)."""
    strided = np.diff(adapter.row_count(np.arange(len(groups.codes) + 1)))  # each datapoint's rows, as strided
    rows = np.bincount(groups.codes, weights=strided, minlength=len(groups.labels))
    short = np.flatnonzero(rows == 1)
    if short.size:
        label = plain(groups.labels[short[0]])
        asked = f"folds={options.folds!r} (--folds {options.folds})"
        remedy = "use fewer folds" if isinstance(options.folds, int) else "fold by a coordinate of larger folds"
        raise ValueError(f"{asked}: fold {label!r} holds 1 row (of "
                         f"{int(groups.sizes[short[0]])} datapoint{'' if groups.sizes[short[0]] == 1 else 's'}), and "
                         f"{' and '.join(held_out)} test{'s' if len(held_out) == 1 else ''} on each fold, which needs "
                         f"at least 2; {remedy}")


def _drops_padding(adapter: Adapter, layers: Sequence[xr.DataArray]) -> bool:
    """Whether the pass leaves padded positions' rows out: a layer has a padding mask and ``adapter`` makes rows of
    positions (flatten, interp; avgpool, first and last keep a row per datapoint)."""
    return adapter.mask_rule == "pair" and any(MASK in layer.coords for layer in layers)


def needs(least_rows: int) -> str:
    """What the measures of a run need of its rows, said: 2 for every measure, 4 for debiased CKA."""
    return ("every measure needs at least 2" if least_rows <= 2 else
            f"debiased CKA (the unbiased HSIC) needs at least {least_rows}")


#: How precision="auto" chose for a run with PWCCA (``measures.Measure.directions``).
DIRECTIONS_NOTE = ("auto: float64 products, as pwcca's weights rest on the canonical directions, which float32 "
                   "products move by their rounding over the gap between neighbouring correlations")


def _stream_pair(a: Any, b: Any, options: StreamOptions, wanted: Needs) -> tuple[Streamed, Groups | None]:
    """Two layers → one pass → their Moments, and each group's when ``options`` groups the datapoints, with what
    the measures need (``wanted``)."""
    layer_a, layer_b, adapters = _prepare_pair(a, b, options)
    streamed, groups = _stream_grouped((layer_a, layer_b), adapters, options, wanted)
    return _with_provenance(streamed), groups


def _stream_grouped(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], options: StreamOptions,
                    wanted: Needs, pairs: Sequence[tuple[int, int]] | None = None) -> tuple[Streamed, Groups | None]:
    """Aligned layers, their rows checked for what the measures need (``wanted``: ``_check_rows``,
    ``_check_group_rows``), in one pass → their Moments (``stream_layers``; only ``pairs``' blocks if given), and
    each group's or fold's when ``options`` groups the datapoints: folds that nan_policy="omit" emptied left out,
    groups too small for a covariance warned of."""
    channels = _paired_channels(layers, pairs)
    _check_rows(layers, adapters, wanted.whitens, least_rows=wanted.least_rows, channels=channels)
    groups = _groups(layers, options)
    _check_group_rows(groups, layers, adapters[0], options, wanted)
    exact = wanted.directions and options.precision == "auto"  # PWCCA's weights: float64 products
    products = dataclasses.replace(options, precision="float64") if exact else options
    streamed = stream_layers(layers, adapters, products, row_norms=wanted.row_norms,
                             codes=_pass_codes(groups, adapters[0], layers[0].data.chunks[0]),
                             group_sizes=() if groups is None else groups.sizes, pairs=pairs, whitens=wanted.whitens)
    if exact:
        streamed = dataclasses.replace(streamed, precision_note=DIRECTIONS_NOTE)
    _check_rows_kept(streamed, options, wanted.whitens, least_rows=wanted.least_rows, channels=channels)
    streamed, groups = _without_emptied_folds(streamed, groups)
    _warn_small_groups(streamed, groups, wanted.whitens, channels)
    return streamed, groups


def _check_rows_kept(streamed: Streamed, options: StreamOptions, whitens: bool, *, least_rows: int,
                     channels: int) -> None:
    """After the pass, ``_check_rows`` again on the rows the Moments hold where padding or nan_policy="omit" left
    some out (counted only then): fewer than ``least_rows`` is an error; no more than the channels of a pair,
    where the rows before were more, a warning for measures that invert a covariance."""
    layers = streamed.layers
    rows, kept = streamed.rows_given, streamed.moments.n
    if kept == rows:
        return
    names = ", ".join(repr(str(layer.name)) for layer in layers)
    why = " or as ".join([*(["padding"] if _drops_padding(streamed.adapters[0], layers) else []),
                       *(["holding NaN or Inf (nan_policy='omit')"] if options.nan_policy == "omit" else [])])
    left = f"{rows - kept} of the {rows} rows of layers {names} were left out" + (f" as {why}" if why else "")
    if kept < least_rows:
        raise ValueError(f"{left}: {kept} {'is' if kept == 1 else 'are'} left, and {needs(least_rows)}")
    if whitens and kept <= channels < rows:
        warnings.warn(f"only {kept} row{'' if kept == 1 else 's'} for {channels} channels of a pair: {left}; "
                      f"{SINGULAR}", RuntimeWarning, stacklevel=user_stacklevel())


def _with_provenance(streamed: Streamed) -> Streamed:
    """``streamed`` with its Moments, and each group's, marked with where they come from (``pair_provenance``),
    so that Moments of other layers or rows refuse to merge."""
    mark = functools.partial(dataclasses.replace, **pair_provenance(streamed.layers, streamed.adapters))
    groups = None if streamed.groups is None else tuple(map(mark, streamed.groups))
    return dataclasses.replace(streamed, moments=mark(streamed.moments), groups=groups)


def _without_emptied_folds(streamed: Streamed, groups: Groups | None) -> tuple[Streamed, Groups | None]:
    """``streamed`` and ``groups`` without the folds whose every row nan_policy="omit" left out, with a warning
    naming them: an empty fold would count in the jackknife's K (its leave-out is the full data) and leave a
    held-out measure nothing to test on. Fewer than 2 folds left is an error."""
    if groups is None or not groups.folds or streamed.groups is None:
        return streamed, groups
    kept = np.array([index for index, part in enumerate(streamed.groups) if part.n > 0], dtype=np.int64)
    if kept.size == len(groups.labels):
        return streamed, groups
    emptied = ", ".join(repr(label) for label in np.delete(groups.labels, kept).tolist()[:5])
    stride = streamed.adapters[0].stride
    why = " or ".join([*([f"stride {stride} keeps none of their rows"] if stride > 1 else []),
                       *(["nan_policy='omit' left them out"] if streamed.moments.n < streamed.adapters[0].row_count(
                           streamed.layers[0].sizes["datapoint"]) else [])]) or "no row is left"
    several = len(groups.labels) - kept.size > 1
    lost = f"fold{'s' if several else ''} {emptied} keep{'' if several else 's'} no row ({why})"
    if kept.size < 2:
        raise ValueError(f"{lost}: {kept.size} of the {len(groups.labels)} folds keep rows; folds need at least 2")
    warnings.warn(f"{lost}; the jackknife and held-out measures use the other {kept.size} folds", RuntimeWarning,
                  stacklevel=user_stacklevel())
    # the codes keep the pass's numbering: no pass follows
    return (dataclasses.replace(streamed, groups=tuple(streamed.groups[index] for index in kept)),
            dataclasses.replace(groups, labels=groups.labels[kept], sizes=groups.sizes[kept]))


def _paired_channels(layers: Sequence[xr.DataArray], pairs: Sequence[tuple[int, int]] | None = None) -> int:
    """The channels of the widest pair solved together, p + q: CCA of n ≤ p + q rows has canonical correlations
    of exactly 1 whatever the data (40 rows of two independent 32-channel layers gave mean ρ 0.86). ``pairs``
    (indices into ``layers``) are a sweep's; without them, the two widest layers. (A sweep took its two widest
    layers, of one set and never paired: "only 60 rows for 75 channels of a pair" where the widest pair had 43.)"""
    if pairs is not None:
        return max(layers[a].sizes["channel"] + layers[b].sizes["channel"] for a, b in pairs)
    widest = sorted((layer.sizes["channel"] for layer in layers), reverse=True)
    return sum(widest[:2])


def _warn_small_groups(streamed: Streamed, groups: Groups | None, whitens: bool, channels: int) -> None:
    """Warn, as ``_check_rows`` does for a whole run, when a group (of ``groupby``; folds are measured on the
    rest) has no more rows than the ``channels`` of the widest pair: its covariance is singular."""
    if groups is None or streamed.groups is None:
        return
    if groups.folds:
        _warn_small_folds(streamed, groups, whitens, channels)
        return
    if not whitens:
        return
    small = [(label, part.n) for label, part in zip(groups.labels.tolist(), streamed.groups) if part.n <= channels]
    if small:
        warnings.warn(f"{len(small)} group{'s' if len(small) > 1 else ''} of {groups.dim} ha"
                      f"{'ve' if len(small) > 1 else 's'} no more rows than the {channels} channels of a pair of "
                      f"layers: {_rows_of(small)}; in each, {SINGULAR}", RuntimeWarning, stacklevel=user_stacklevel())


def _warn_small_folds(streamed: Streamed, groups: Groups, whitens: bool, channels: int) -> None:
    """Warn when a fold holds fewer than half the rows of the median fold: its held-out correlations, measured on
    its own rows, are the noisiest (those of two rows are ±1) and weigh as much as any fold's in the mean; and,
    for measures that invert a covariance (``whitens``), when a fold's leave-out (the rest, which the jackknife
    solves) has no more rows than the channels of a pair: its covariance is singular."""
    rows = [part.n for part in streamed.groups]
    total = sum(rows)
    tight = [(label, total - n) for label, n in zip(groups.labels.tolist(), rows) if total - n <= channels]
    if whitens and tight:
        warnings.warn(f"{len(tight)} of the {len(rows)} folds leave no more rows than the {channels} channels of a "
                      f"pair when left out: without {_rows_of(tight)}; those leave-outs' covariances are singular "
                      f"(canonical correlations of 1 whatever the data), so the jackknife errors of measures that "
                      f"invert one are meaningless unless a ridge (epsilon > 0) regularises them, and then depend "
                      f"on its size: use fewer folds", RuntimeWarning,
                      stacklevel=user_stacklevel())
    half = float(np.median(rows)) / 2
    small = [(label, n) for label, n in zip(groups.labels.tolist(), rows) if n < half]
    if small:
        warnings.warn(f"{len(small)} fold{'s' if len(small) > 1 else ''} ha{'ve' if len(small) > 1 else 's'} "
                      f"fewer than half the rows of the median fold ({float(np.median(rows)):g}): {_rows_of(small)}; "
                      f"held-out values are measured on each fold's rows and averaged over folds unweighted, so a "
                      f"small fold's noise weighs as much as a large one's", RuntimeWarning,
                      stacklevel=user_stacklevel())


def _rows_of(groups: Sequence[tuple[Any, int]]) -> str:
    """Groups (label, rows) as a warning lists them: the first five, ``'cat' (3), 'dog' (2) …``."""
    return ", ".join(f"{label!r} ({rows})" for label, rows in groups[:5]) + (" …" if len(groups) > 5 else "")


def _by_group(results: Sequence[xr.Dataset], groups: Groups) -> xr.Dataset:
    """Per-group results along a dim named after the grouping, labelled by the group values."""
    # outer: a group's SVCCA may keep fewer components than another's (NaN beyond them)
    return xr.concat(list(results), dim=xr.DataArray(groups.labels, dims=groups.dim, name=groups.dim),
                     combine_attrs="override", join="outer")


def _streaming_attrs(streamed: Streamed) -> dict[str, Any]:
    """What a result records of its streaming: the layers, the rows' adapter, precision, rows used and omitted."""
    attrs = {"layer_a": str(streamed.layers[0].name), "layer_b": str(streamed.layers[-1].name),
             **streamed.adapters[0].attrs, "precision": streamed.moments.precision,
             "precision_auto": streamed.precision_note, "rows": int(streamed.moments.n),
             "rows_omitted": int(streamed.rows_omitted)}
    return {key: value for key, value in attrs.items() if value is not None}


def _label(result: xr.Dataset, streamed: Streamed) -> xr.Dataset:
    """Put the streaming's attrs on a pair's result (the channel labels and frequencies come with its Moments,
    ``_with_provenance``), which say how the rows were made as ``spatial`` and ``stride`` (not the ``rows_from``
    of a result solved from Moments, ``measures._rows_attrs``)."""
    result.attrs.pop("rows_from", None)
    result.attrs.update(_streaming_attrs(streamed))
    return result


def _measure(name: str, a: Any, b: Any, solve: SolveOptions, options: Mapping[str, Any], where: str) -> xr.Dataset:
    """Stream two layers for one registered measure and return its labelled result."""
    stream = StreamOptions.from_kwargs(where, options)
    check_measures([name], batched=is_batched(stream.spatial), where=f"{where}()")
    if by_gram(stream.spatial):
        _check_gram([name], f"{where}()")
        return _gram_cka(a, b, stream)
    if stream.folds is not None:
        raise TypeError(f"{where}() takes groupby, not folds: folds give error bars and held-out measures in "
                        f"chunkcca.compare and chunkcca.similarity, and their Moments in compute_moments")
    streamed, groups = _stream_pair(a, b, stream, Needs.of([name], solve=solve))
    with _sides_named(streamed):
        if groups is None:
            return _label(PairSolves(streamed.moments, solve).result(name), streamed)
        return _label(_by_group([_in_group(functools.partial(PairSolves(part, solve).result, name), label, groups)
                                 for part, label in zip(streamed.groups, groups.labels)], groups), streamed)


def _check_gram(names: Sequence[str], where: str) -> None:
    """spatial="features" gives linear CKA from Gram matrices only (the rows are too wide for a covariance)."""
    others = [name for name in names if name != "cka"]
    if others:
        why = ("is not computed from Gram blocks (only the biased estimator is)" if others[0] == "cka_debiased" else
               "needs covariances, and spatial='features' makes each datapoint's whole map one row, too wide for them")
        raise ValueError(f"{where}: {others[0]} {why}; with 'features' measure linear CKA (cka), exactly "
                         f"from Gram matrices or with minibatch=N (--minibatch N)")


def _gram_cka(a: Any, b: Any, options: StreamOptions) -> xr.Dataset:
    """Exact full-data linear CKA of two layers' per-datapoint feature vectors, from Gram blocks."""
    layer_a, layer_b, adapters = _prepare_pair(a, b, options)
    _check_rows((layer_a, layer_b), adapters, whitens=False)
    gram = gram_pass((layer_a, layer_b), adapters, options)
    sums = gram.sums
    if sums[0, 0] <= 0 or sums[1, 1] <= 0:
        dead = layer_a.name if sums[0, 0] <= 0 else layer_b.name
        raise UndefinedMeasure(f"CKA is undefined: layer {str(dead)!r} has no variance (every feature constant)")
    rows = adapters[0].row_count(layer_a.sizes["datapoint"])
    return with_layers(xr.Dataset(
        {"cka": ((), cka_ratio(sums[0, 1], sums[0, 0], sums[1, 1]),
                 {"long_name": "linear CKA of whole per-datapoint maps (exact, from Gram blocks)"}),
         "rows": ((), np.int64(rows), ROWS_ATTRS)},
        attrs={"measure": "cka", **adapters[0].attrs, **_gram_attrs(gram), "rows": int(rows)}),
        {"layer_a": str(layer_a.name), "layer_b": str(layer_b.name)})


def _gram_attrs(gram: GramSums) -> dict[str, str]:
    """The precision of a Gram pass's blocks and, for precision="auto", why."""
    return {"precision": gram.precision,
            **({} if gram.precision_note is None else {"precision_auto": gram.precision_note})}


def _in_group(solve: Callable[[], xr.Dataset], label: Any, groups: Groups) -> xr.Dataset:
    """``solve()`` for one group; an undefined measure (or a group too small to solve) says which group."""
    try:
        return solve()
    except ValueError as error:  # UndefinedMeasure included: the same type, with the group named
        raise type(error)(f"{error}{_group_named(label, groups)}") from error


def _group_named(label: Any, groups: Groups) -> str:
    """`` in the group digit=3``: what a message of one group's solve ends with."""
    return f" in the group {groups.dim}={plain(label)!r}"


@contextlib.contextmanager
def _sides_named(streamed: Streamed) -> Iterator[None]:
    """An undefined measure's or non-finite statistics' "side a"/"side b" named by the layers they are."""
    try:
        yield
    except (UndefinedMeasure, NonFiniteStatistics) as error:
        message = str(error)
        for side, layer in zip(("side a", "side b"), streamed.layers):
            message = message.replace(side, f"layer {str(layer.name)!r}")
        raise type(error)(message) from error


def compute_moments(a: Any, b: Any, *, row_norms: bool = False, **options: Any) -> Moments | dict[Any, Moments]:
    """The [`Moments`][chunkcca.Moments] of two layers' rows, in one streamed pass.

    Parameters
    ----------
    a, b
        Two layers, as for [`cca()`][chunkcca.cca].
    row_norms
        Add the row-norm sums that [`chunkcca.cka_from_moments()`][chunkcca.cka_from_moments] needs with
        ``debiased=True``.
    **options
        Streaming options ([`StreamOptions`][chunkcca.options.StreamOptions]). With ``checkpoint`` the running
        Moments are saved as the run goes and a later call resumes after the chunks done.

    Returns
    -------
    Moments or dict
        With ``groupby`` or ``folds``: a dict group label (fold number) → that group's Moments, in label
        order, whose merge ``sum(...)`` (or ``m1 + m2 + …``) is the full data's. Each can be saved, merged and
        solved later, e.g. with ``chunkcca.measures.heldout_cca_from_folds(list(d.values()))``. Otherwise one
        Moments, which can be saved, merged with the Moments of more datapoints (``m1 + m2``) and solved with
        [`chunkcca.cca_from_moments()`][chunkcca.cca_from_moments] and the other ``*_from_moments``. For
        ``spatial="dft"`` it
        has batch dims (freq_h, freq_w) and complex statistics.
    """
    stream = StreamOptions.from_kwargs("compute_moments", options)
    check_flag("row_norms", row_norms)
    if by_gram(stream.spatial):
        raise ValueError("compute_moments(): spatial='features' makes each datapoint's whole map one row, too wide "
                         "for Moments (a covariance); measure linear CKA with cka(..., spatial='features') or "
                         "similarity(..., measures=['cka'], spatial='features')")
    streamed, groups = _stream_pair(a, b, stream, Needs(row_norms=row_norms, least_rows=0))
    if groups is None:
        return streamed.moments
    return dict(zip(groups.labels.tolist(), streamed.groups))


def cca(a: Any, b: Any, *, epsilon: float = 0.0, **options: Any) -> xr.Dataset:
    """Canonical correlations between two layers, streamed chunk by chunk.

    Parameters
    ----------
    a, b
        Layers of dims (datapoint, height, width, channel) or (datapoint, channel): DataArrays
        (aligned by their ``datapoint`` labels; a label on one side only is an error), DataTree
        nodes or Datasets holding ``activations``, or numpy/Dask arrays (aligned by position).
    epsilon
        Added to the diagonal of each side's covariance before whitening.
    **options
        Streaming options ([`StreamOptions`][chunkcca.options.StreamOptions]): ``spatial`` ("flatten",
        "avgpool", "first", "last", "interp" or "dft": a CCA per spatial frequency), ``stride``,
        ``precision``, ``method`` and ``grid`` (with "interp" only), ``nan_policy``, ``memory_limit``,
        ``scheduler``, ``progress``, ``dims``, ``checkpoint``, ``checkpoint_every`` (with ``checkpoint``
        only), ``connect_timeout``, ``groupby``. An option given without the mode that reads it is a TypeError.

    Returns
    -------
    xarray.Dataset
        ``rho`` ([freq_h, freq_w,] component, descending), ``coef_a`` (channel_a, component),
        ``coef_b`` (channel_b, component), ``pruned_a``/``pruned_b``, ``rank_a``/``rank_b``,
        ``rows`` (for dft: the rows at each frequency, i.e. datapoints), ``rho_mean`` and ``r2_cca``
        (and ``rho_freq_mean`` for dft). attrs record the measure and its ``epsilon``, the layers, how the rows
        were made (``spatial``, ``stride``; ``method`` and ``grid`` for interp), the dtype of the products and why
        (``precision``, ``precision_auto``), ``rows`` and ``rows_omitted``; not ``nan_policy`` (rows it omits
        are counted in ``rows_omitted``) nor the options of how the pass runs (``memory_limit``,
        ``scheduler``, ``checkpoint``, …).
    """
    return _measure("mean_cca", a, b, SolveOptions(epsilon=epsilon), options, "cca")


def svcca(a: Any, b: Any, *, keep: float = 0.99, keep_by: str = "variance", epsilon: float = 0.0,
          **options: Any) -> xr.Dataset:
    """SVCCA between two layers, streamed.

    Parameters
    ----------
    a, b
        Two layers, as for [`cca()`][chunkcca.cca].
    keep, keep_by, epsilon
        As for [`svcca_from_moments()`][chunkcca.svcca_from_moments].
    **options
        Streaming options ([`StreamOptions`][chunkcca.options.StreamOptions]), as for [`cca()`][chunkcca.cca].

    Returns
    -------
    xarray.Dataset
        As [`svcca_from_moments()`][chunkcca.svcca_from_moments], with the channel labels and attrs as
        [`cca()`][chunkcca.cca]'s (with ``keep``, ``keep_by`` and ``epsilon``).
    """
    return _measure("svcca", a, b, SolveOptions(keep=keep, keep_by=keep_by, epsilon=epsilon), options, "svcca")


def pwcca(a: Any, b: Any, *, epsilon: float = 0.0, **options: Any) -> xr.Dataset:
    """PWCCA (Morcos et al. 2018) between two layers, streamed.

    Parameters
    ----------
    a, b
        Two layers, as for [`cca()`][chunkcca.cca].
    epsilon
        Ridge of the CCA, >= 0.
    **options
        Streaming options ([`StreamOptions`][chunkcca.options.StreamOptions]), as for [`cca()`][chunkcca.cca].

    Returns
    -------
    xarray.Dataset
        As [`pwcca_from_moments()`][chunkcca.pwcca_from_moments], with attrs as [`cca()`][chunkcca.cca]'s.
    """
    return _measure("pwcca", a, b, SolveOptions(epsilon=epsilon), options, "pwcca")


def procrustes(a: Any, b: Any, **options: Any) -> xr.Dataset:
    """Orthogonal Procrustes distance between two layers, streamed.

    Parameters
    ----------
    a, b
        Two layers, as for [`cca()`][chunkcca.cca].
    **options
        Streaming options ([`StreamOptions`][chunkcca.options.StreamOptions]), as for [`cca()`][chunkcca.cca].

    Returns
    -------
    xarray.Dataset
        As [`procrustes_from_moments()`][chunkcca.procrustes_from_moments], with attrs as
        [`cca()`][chunkcca.cca]'s (no solve option).
    """
    return _measure("procrustes", a, b, SolveOptions(), options, "procrustes")


def shape_metric(a: Any, b: Any, *, alpha: float = 1.0, **options: Any) -> xr.Dataset:
    """Williams et al.'s angular shape metric between two layers, streamed.

    Parameters
    ----------
    a, b
        Two layers, as for [`cca()`][chunkcca.cca].
    alpha
        Partial whitening in [0, 1]: 0 CCA-like, 1 Procrustes-like.
    **options
        Streaming options ([`StreamOptions`][chunkcca.options.StreamOptions]), as for [`cca()`][chunkcca.cca].

    Returns
    -------
    xarray.Dataset
        As [`shape_metric_from_moments()`][chunkcca.shape_metric_from_moments], with attrs as
        [`cca()`][chunkcca.cca]'s (with ``alpha``).
    """
    return _measure("shape", a, b, SolveOptions(alpha=alpha), options, "shape_metric")


def cka(a: Any, b: Any, *, debiased: bool = False, minibatch: int | None = None, **options: Any) -> xr.Dataset:
    """Linear CKA between two layers, streamed.

    Parameters
    ----------
    a, b
        Two layers, as for [`cca()`][chunkcca.cca].
    debiased
        The exact full-data debiased estimator (unbiased HSIC) instead of the biased one.
    minibatch
        The minibatch CKA of Nguyen, Raghu & Kornblith 2021 over consecutive minibatches of this many rows
        (>= 4): the unbiased HSIC terms summed over the minibatches, then one ratio (not the mean of each
        minibatch's CKA); memory O(minibatch²), not O(channels²), for layers too wide for a covariance; unbiased per
        minibatch, so ``debiased`` does not apply, nor do ``precision``, checkpoints, ``groupby`` and
        ``folds``. Tasks read chunks of whole minibatches (a layer's, or both layers', whichever holds
        less); ``memory_limit`` sets their size and how many run at once, and a run over it with one task of
        one minibatch is refused before reading.
    **options
        Streaming options ([`StreamOptions`][chunkcca.options.StreamOptions]), as for [`cca()`][chunkcca.cca].

    Returns
    -------
    xarray.Dataset
        As [`cka_from_moments()`][chunkcca.cka_from_moments] (``cka``, ``rows``); with ``minibatch``, also
        ``minibatches`` and ``rows_left_out`` (rows after the last whole minibatch). attrs as
        [`cca()`][chunkcca.cca]'s (with ``debiased``, except with spatial="features", whose exact CKA is the
        biased one, and no ``rows_omitted`` there); with
        ``minibatch``, the layers, ``spatial``, ``stride``, ``minibatch`` and ``rows`` only.
    """
    if check_flag("debiased", debiased) and minibatch is None:
        return _measure("cka_debiased", a, b, SolveOptions(), options, "cka")
    if minibatch is None:
        return _measure("cka", a, b, SolveOptions(), options, "cka")
    stream = StreamOptions.from_kwargs("cka", {**options, "minibatch": minibatch})
    if debiased:
        raise ValueError("minibatch CKA is already built from unbiased HSIC; pass debiased=False")
    return _minibatch_cka(a, b, stream)


def _minibatch_cka(a: Any, b: Any, options: StreamOptions) -> xr.Dataset:
    """Minibatch linear CKA of two layers over minibatches of ``options.minibatch`` rows (see
    ``chunkcca.minibatch``)."""
    layer_a, layer_b, adapters = _prepare_pair(a, b, options)
    hsic, batches, left_over, rows = _minibatch_sums([layer_a, layer_b], adapters, options)
    size = options.minibatch
    if hsic[0, 0] <= 0 or hsic[1, 1] <= 0:
        raise ValueError(f"minibatch CKA is undefined for layer "
                         f"{str(layer_a.name if hsic[0, 0] <= 0 else layer_b.name)!r}: {NO_MINIBATCH_VARIANCE}")
    return with_layers(xr.Dataset(
        {"cka": ((), cka_ratio(hsic[0, 1], hsic[0, 0], hsic[1, 1]),
                 {"long_name": f"minibatch linear CKA ({size} rows)"}),
         "minibatches": ((), np.int64(batches)),
         "rows_left_out": ((), np.int64(left_over), {"long_name": "rows after the last whole minibatch"}),
         "rows": ((), np.int64(rows), {"long_name": "rows in whole minibatches, which CKA is computed from"})},
        attrs={"measure": "cka", "minibatch": int(size), **adapters[0].attrs, "rows": int(rows)},
    ), {"layer_a": str(layer_a.name), "layer_b": str(layer_b.name)})


#: What to do about a layer whose minibatch Gram products underflow float64 (values of about 1e-80 and below).
TINY_GRAM_ADVICE = ("multiply the layer by a large factor (CKA does not change with a layer's scale), or measure the "
                    "full-data CKA (no minibatch)")
#: Why a minibatch CKA is undefined for a layer whose HSIC with itself is 0.
NO_MINIBATCH_VARIANCE = ("it has no variance within minibatches (a dead layer), or values so small that the "
                         f"products of its Gram matrices underflow float64 (about 1e-80 and below: then "
                         f"{TINY_GRAM_ADVICE})")


def _minibatch_sums(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter],
                    options: StreamOptions) -> tuple[np.ndarray, int, int, int]:
    """Over consecutive minibatches of ``options.minibatch`` rows of aligned ``layers``, the summed unbiased HSIC
    of every pair of their linear Gram matrices (L, L), the minibatches, the rows after the last whole one (left
    out) and the rows in whole minibatches (those CKA is computed from): one pass (see ``chunkcca.minibatch``)."""
    size = options.minibatch
    assert size is not None  # _minibatch_cka and _minibatch_similarity are called with it
    padded = [str(layer.name) for layer in layers if MASK in layer.coords]
    if padded and adapters[0].mask_rule == "pair":
        raise ValueError(f"minibatch CKA cuts the rows into minibatches of fixed size, which the padding of layer "
                         f"{padded[0]!r} would shift; use spatial='avgpool', 'first' or 'last' (--spatial), or the "
                         f"full-data CKA (without minibatch)")
    datapoints = layers[0].sizes["datapoint"]
    rows = adapters[0].row_count(datapoints)
    if rows < size:
        raise ValueError(f"layers {', '.join(repr(str(layer.name)) for layer in layers)} give {rows} rows, fewer "
                         f"than one minibatch of {size}")
    sums = minibatch_pass(layers, adapters, options)
    if not np.all(np.isfinite(sums)):  # NaN and Inf in the values are refused while streaming: an overflow
        raise ValueError(f"minibatch CKA of layers {', '.join(repr(str(layer.name)) for layer in layers)}: the sums "
                         f"of products of their minibatches' Gram matrices overflow float64 (values too large); "
                         f"divide the layers by a large factor (CKA does not change with a layer's scale)")
    sides, batches = len(layers), int(sums[-2])
    hsic = sums[: sides * sides].reshape(sides, sides)
    # each minibatch's HSIC of a layer with itself rounds by about 2**-1075 where its Gram products are subnormal
    tiny = np.flatnonzero((np.diag(hsic) > 0) & (np.diag(hsic) < batches * SMALLEST_VARIANCE))
    if tiny.size:
        raise ValueError(f"minibatch CKA of layer {str(layers[tiny[0]].name)!r}: its values are too small for float64 "
                         f"products of its minibatches' Gram matrices (their HSIC, {hsic[tiny[0], tiny[0]]:.3g}, keeps "
                         f"fewer than 11 digits below {batches * SMALLEST_VARIANCE:.2g}); {TINY_GRAM_ADVICE}")
    return hsic, batches, int(sums[-1]), rows - int(sums[-1])


def _solve_options(measures: Sequence[str], given: Mapping[str, Any], where: str, *,
                   folds: bool = False) -> SolveOptions:
    """The solve options of ``given`` (keywords the caller set), each read by some measure of ``measures`` (or,
    with ``folds``, the jackknife's ``confidence``)."""
    unused = sorted(set(given) - _read_options(measures, folds))
    if unused:
        raise TypeError(f"{where}(): {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not read by "
                        f"{', '.join(measures)}")
    return SolveOptions(**given)


def _read_options(measures: Sequence[str], folds: bool) -> set[str]:
    """The solve options some measure of ``measures`` reads (with ``folds``, also the jackknife's ``confidence``)."""
    return {option for name in measures for option in MEASURES[name].options} | ({"confidence"} if folds else set())


def _solve_attrs(solve: SolveOptions, measures: Sequence[str], folds: bool) -> dict[str, Any]:
    """The solve options a result records: those its measures read."""
    read = _read_options(measures, folds)
    return {key: value for key, value in vars(solve).items() if key in read}


def _fold_attrs(stream: StreamOptions, groups: Groups | None) -> dict[str, Any]:
    """What a result measured on folds records of them: ``folds``, their number K, and ``folds_by``, the
    coordinate that made them when one was given."""
    if groups is None or not groups.folds:
        return {}
    return {"folds": len(groups.labels), **({"folds_by": stream.folds} if isinstance(stream.folds, str) else {})}


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments split into solve options and streaming options."""
    solve = {key: options.pop(key) for key in SOLVE_NAMES if key in options}
    return solve, options


def compare(a: Any, b: Any, *, measures: Sequence[str] | str = ("mean_cca",), **options: Any) -> xr.Dataset:
    """Several measures of one pair of layers from one streamed pass.

    Parameters
    ----------
    a, b
        Two layers, as for [`cca()`][chunkcca.cca].
    measures
        Names from [`chunkcca.measures.MEASURES`][chunkcca.measures.MEASURES]: "mean_cca", "r2_cca", "svcca", "pwcca",
        "cka", "cka_debiased", "procrustes", "shape", and with ``folds`` "heldout_cca" and "predictivity".
        With ``spatial="dft"``: "mean_cca", "r2_cca". With ``spatial="features"``: "cka".
    **options
        The solve options the measures read ([`SolveOptions`][chunkcca.options.SolveOptions]: ``epsilon``,
        ``keep``, ``keep_by``, ``alpha``, ``ridge`` (predictivity; several give a ``ridge`` dim) and, with
        ``folds``, ``confidence``; one no measure reads is a TypeError) and the streaming options
        ([`StreamOptions`][chunkcca.options.StreamOptions]), ``groupby`` and ``folds`` among them; one given
        without the mode that reads it (``method`` without ``spatial="interp"``) is a TypeError too.

    Returns
    -------
    xarray.Dataset
        One scalar variable per measure, named as the measure (the mean over frequencies for
        dft); ``rho`` (the canonical correlations, [freq_h, freq_w,] component) and each side's rank
        ``rank_a``, ``rank_b`` when a CCA-family measure is asked (components beyond the smaller rank have
        ρ = 0, and mean_cca and r2_cca count them); each measure's details, a component dim named after the measure
        (``svcca_dims_a``, ``svcca_dims_b``, ``svcca_rho`` (svcca_component), ``heldout_rho``
        (heldout_cca_component), ``predictivity_per_channel`` (channel_b)); with ``folds``, ``<measure>_se``
        and ``<measure>_ci`` (bound); with ``groupby``, a dim named after the coordinate; ``rows``.
        attrs: ``measures`` (comma-separated), the solve options they read (with folds ``confidence``,
        ``folds``, their number, and ``folds_by``, the coordinate that made them if one did), and the layers and
        streaming as [`cca()`][chunkcca.cca] records them.
    """
    solve_given, stream_given = _split_options(dict(options))
    stream = StreamOptions.from_kwargs("compare", stream_given)
    names = _checked_measures(measures, stream)
    solve = _solve_options(names, solve_given, "compare", folds=stream.folds is not None)
    if by_gram(stream.spatial):
        _check_gram(names, "compare()")
        result = _gram_cka(a, b, stream)
        result.attrs["measures"] = "cka"
        return result
    streamed, groups = _stream_pair(a, b, stream, Needs.of(names, solve=solve))
    with _sides_named(streamed):
        if groups is not None and not groups.folds:
            result = _by_group([_compared(PairSolves(part, solve), names, label, groups)
                                for part, label in zip(streamed.groups, groups.labels)], groups)
        else:
            folds = None if groups is None else dict(zip(groups.labels.tolist(), streamed.groups))  # by name
            result = _compared(PairSolves(streamed.moments, solve, folds), names)
    result.attrs = {"measures": ",".join(names), **_solve_attrs(solve, names, stream.folds is not None),
                    **_fold_attrs(stream, groups)}
    return _label(result, streamed)


def _checked_measures(measures: Any, stream: StreamOptions, *, batched: bool = True) -> tuple[str, ...]:
    """The measures, checked against the adapter (per frequency? unless ``batched`` is False: a sweep refuses
    such adapters itself) and the folds (held-out measures need them)."""
    names = check_measures(measures, batched=batched and is_batched(stream.spatial))
    needing = Needs.of(names).held_out
    if needing and stream.folds is None:
        raise ValueError(f"{needing[0]} is measured on held-out folds: pass folds=K (--folds K), K >= 2")
    return names


def _compared(pair: PairSolves, names: Sequence[str], label: Any = None, groups: Groups | None = None) -> xr.Dataset:
    """One scalar per measure (with its details, and the jackknife's ``_se``/``_ci`` when ``pair`` has folds),
    ``rho`` for CCA-family measures, and ``rows``."""
    variables: dict[str, Any] = {}
    for name in names:
        measure = MEASURES[name]
        result = pair.result(name) if groups is None else _in_group(functools.partial(pair.result, name), label, groups)
        variables[name] = result[measure.value].assign_attrs(measure.attrs)
        for detail in measure.details:
            variables[measure.detail_name(detail)] = result[detail].rename(
                {dim: f"{name}_{dim}" for dim in result[detail].dims if dim == "component"})
        if pair.folds is not None:
            leave_outs = pair.leave_outs(name)  # of the folds that count (a held-out measure's defined ones)
            se, interval = jackknife(result[measure.value].values, leave_outs, pair.options.confidence)
            dims = result[measure.value].dims
            variables[f"{name}_se"] = (dims, se, {"long_name": f"jackknife standard error of {name}"})
            freedom = f"{len(leave_outs) - 1} degree{'' if len(leave_outs) == 2 else 's'} of freedom"
            variables[f"{name}_ci"] = ((*dims, "bound"), interval,
                                       {"long_name": f"{pair.options.confidence:g} interval of {name} "
                                                     f"(Student t, {freedom})"})
    if any(MEASURES[name].canonical for name in names):
        variables["rho"] = pair.cca["rho"]
        # components beyond min(rank_a, rank_b) have ρ = 0 and count in mean_cca and r2_cca
        variables["rank_a"], variables["rank_b"] = pair.cca["rank_a"], pair.cca["rank_b"]
        if "rho_freq_mean" in pair.cca:
            variables["rho_freq_mean"] = pair.cca["rho_freq_mean"]
    variables["rows"] = xr.DataArray(np.int64(pair.moments.n), attrs=ROWS_ATTRS)
    coords = {"bound": ["lower", "upper"]} if pair.folds is not None else {}
    return xr.Dataset(variables, coords=coords)


def as_layer_set(layers: Any, role: str) -> dict[str, Any]:
    """A set of layers: a mapping name → layer, a DataTree (every node holding activations) or a list of nodes."""
    if isinstance(layers, xr.DataTree):  # named as the measures name them: a node cut from a store by its path there
        return {node_name(layers.root[path]): layers.root[path] for path in layer_paths(layers)}
    if isinstance(layers, Mapping):
        named = {str(name): layer for name, layer in layers.items()}
        if len(named) < len(layers):  # keys alike as text (1 and "1"): one of them was left out, silently
            texts = [str(name) for name in layers]
            alike = [name for name in layers if texts.count(str(name)) > 1]
            raise ValueError(f"{role} names layers by keys that read alike as text ({', '.join(map(repr, alike))}): "
                             f"a layer's name is text; give each its own")
        return named
    if isinstance(layers, (list, tuple)) and all(isinstance(node, xr.DataTree) for node in layers):
        named_nodes = [(node_name(node), node) for node in layers]
        names = [name for name, _ in named_nodes]
        repeated = next((name for name in names if names.count(name) > 1), None)
        if repeated is not None:  # a dict of them kept the last alone, silently
            where = [str(node[VARIABLE].encoding.get("store", "memory")) if VARIABLE in node.data_vars else "memory"
                     for name, node in named_nodes if name == repeated]
            raise ValueError(f"{role} names layer {repeated!r} {names.count(repeated)} times (from "
                             f"{', '.join(where)}); give each its own name with a mapping, e.g. "
                             f"{{'run0/{repeated}': node, ...}}")
        return dict(named_nodes)
    raise TypeError(f"{role} must be a mapping of name to layer, a DataTree or a list of DataTree nodes, "
                    f"got {type(layers).__name__}")


def similarity(a_layers: Any, b_layers: Any, *, measures: Sequence[str] | str = ("mean_cca", "cka"),
               minibatch: int | None = None, **options: Any) -> xr.Dataset:
    """Every measure for every pair (layer_a, layer_b) of two sets of layers, in one streamed pass.

    Parameters
    ----------
    a_layers, b_layers
        Mappings of name → layer (anything [`cca()`][chunkcca.cca] takes), DataTrees (every node with
        activations) or lists of DataTree nodes. A layer in both sets is read once.
    measures
        Names from [`chunkcca.measures.MEASURES`][chunkcca.measures.MEASURES], as for [`compare()`][chunkcca.compare].
    minibatch
        With ``measures=["cka"]``: the minibatch CKA of every pair over consecutive minibatches of this many
        rows, in one pass over all layers, as for [`cka()`][chunkcca.cka] (a task reads whole minibatches of
        one layer, or of every layer, whichever holds less, within ``memory_limit``); ``precision``,
        checkpoints, ``groupby`` and ``folds`` do not apply. The result then also has ``minibatches`` and
        ``rows_left_out``.
    **options
        Solve options (``epsilon``, ``keep``, ``keep_by``, ``alpha``; with ``folds``, one ``ridge`` and
        ``confidence``) and streaming options as for [`compare()`][chunkcca.compare]. ``spatial`` is
        "flatten" (all layers need one spatial size),
        "avgpool", "first" or "last" (any sizes), or "features" (``measures=["cka"]`` only: exact CKA of whole
        maps, from Gram blocks); interp and dft pair layers individually: use [`compare()`][chunkcca.compare]
        per pair. With
        ``nan_policy="omit"`` a row is left out of every pair when any layer holds NaN or Inf in it.

    Returns
    -------
    xarray.Dataset
        One variable per measure with dims (layer_a, layer_b), plus ``rows``; with mean_cca, r2_cca or pwcca,
        each pair's ``rank_a`` and ``rank_b`` as [`compare()`][chunkcca.compare] gives them (-1 where its CCA
        is undefined): canonical correlations beyond the smaller are 0 and count in mean_cca and r2_cca; with
        ``folds``, each measure's ``<measure>_se`` and ``<measure>_ci`` (bound). A pair a measure is undefined
        for (e.g. a layer without variance) is NaN, with a warning. attrs as [`compare()`][chunkcca.compare]'s,
        without ``layer_a`` and ``layer_b``.
    """
    solve_given, stream_given = _split_options(dict(options))
    stream = StreamOptions.from_kwargs("similarity", {**stream_given, "minibatch": minibatch})
    names = _checked_measures(measures, stream, batched=False)
    if stream.minibatch is not None and names != ("cka",):
        raise ValueError(f"minibatch applies to measures=['cka'] only, got {list(names)}: the others need the "
                         f"layers' covariances")
    solve = _solve_options(names, solve_given, "similarity", folds=stream.folds is not None)
    if len(solve.ridges) > 1:
        raise ValueError("similarity (the command's sweep) takes one ridge; compare one pair with several (a ridge "
                         "dim)")
    set_a, set_b = as_layer_set(a_layers, "a_layers"), as_layer_set(b_layers, "b_layers")
    if not set_a or not set_b:
        raise ValueError("similarity needs at least one layer on each side")
    distinct: list[xr.DataArray] = []  # a layer given twice is streamed once
    sides: dict[str, list[int]] = {"a": [], "b": []}  # each set's layers, as indices into distinct
    tags: dict[str, str] = {}  # a store's tag (``_store_tag``), once a layer of it was told apart by it
    for role, layer_set in (("a", set_a), ("b", set_b)):
        for name, layer in layer_set.items():
            array = check_value_rounding(as_activations(layer, name, dims=stream.dims))
            index = next((i for i, other in enumerate(distinct) if _same_layer(array, other)), len(distinct))
            if index == len(distinct):
                namesakes = [other for other in distinct if other.name == array.name]
                if namesakes:  # one name, two layers
                    tag = _store_tag(array, namesakes)
                    if tag is not None:
                        tags[str(array.encoding["store"])] = tag
                    array = array.rename(f"{array.name} ({tag or f'in {role}_layers'})")
                distinct.append(array)
            sides[role].append(index)
    # every layer of a store told apart is named with it, in messages ("'bconv' 4x4" was the other store's)
    distinct = [_tagged(layer, tags) for layer in distinct]
    for index_a, index_b in itertools.product(sides["a"], sides["b"]):  # each pair solved as compare() would take it
        check_pairing(distinct[index_a], distinct[index_b])  # (aligned through the first, a pair met unchecked)
        check_position_dims(distinct[index_a], distinct[index_b], stream.spatial)
    first, *_ = distinct  # its datapoint order: folds and minibatches follow it, as in compare(first, …)
    aligned, reordered = [], []
    for layer in distinct:  # by label, each pair solved checked above (not the first with each: a pair not solved)
        in_order, moved = aligned_to(first, layer)
        aligned.append(in_order)
        reordered += [in_order] if moved else []
    check_reordered(str(first.name), reordered, int(stream.memory_limit))
    for index_a, index_b in itertools.product(sides["a"], sides["b"]):  # the pairs solved, in any mode with order
        check_position_labels(aligned[index_a], aligned[index_b], stream.spatial)
    adapters = plan_sweep_adapters(aligned, stream)
    if stream.minibatch is not None or by_gram(stream.spatial):  # (a covariance pass checks its rows itself; a
        _check_rows(aligned, adapters, whitens=False)  # measure that needs more, debiased CKA, is NaN with a warning)
    rows = adapters[0].row_count(first.sizes["datapoint"])
    if stream.minibatch is not None:
        return _minibatch_similarity(aligned, adapters, stream, sides, set_a, set_b)
    if by_gram(stream.spatial):
        _check_gram(names, "similarity()")
        gram = gram_pass(aligned, adapters, stream)
        values = _cka_of_pairs(gram.sums, aligned, sides, "its whole maps do not vary")
        return xr.Dataset({"cka": (("layer_a", "layer_b"), values,
                                   {"long_name": "linear CKA of whole per-datapoint maps (exact)"}),
                           "rows": ((), np.int64(rows), ROWS_ATTRS)},
                          coords=_pair_coords(set_a, set_b), attrs={"measures": "cka", "spatial": stream.spatial,
                                                                    "stride": stream.stride, **_gram_attrs(gram),
                                                                    "rows": int(rows)})
    streamed, groups = _stream_grouped(aligned, adapters, stream, Needs.of(names, sweep=True, solve=solve),
                                       pairs=[(a, b) for a in sides["a"] for b in sides["b"]])
    labels = [str(layer.name) for layer in aligned]
    coords = _pair_coords(set_a, set_b)
    if groups is not None and not groups.folds:
        result = _by_group([_in_group(functools.partial(_pairwise, part, labels, sides, names, solve, coords,
                                                        where=_group_named(label, groups)), label, groups)
                            for part, label in zip(streamed.groups, groups.labels)], groups)
    else:
        folds = None if groups is None else dict(zip(groups.labels.tolist(), streamed.groups))  # by name
        result = _pairwise(streamed.moments, labels, sides, names, solve, coords, folds)
    attrs = {"measures": ",".join(names), **_solve_attrs(solve, names, stream.folds is not None),
             **_fold_attrs(stream, groups), **_streaming_attrs(streamed)}
    for key in ("layer_a", "layer_b"):
        attrs.pop(key)
    result.attrs = attrs  # measures as a string: netCDF attributes take no lists
    return result


def _minibatch_similarity(aligned: Sequence[xr.DataArray], adapters: Sequence[Adapter], stream: StreamOptions,
                          sides: dict[str, list[int]], set_a: Mapping[str, Any],
                          set_b: Mapping[str, Any]) -> xr.Dataset:
    """Minibatch linear CKA of every pair (layer_a, layer_b) from one pass over all layers; NaN, with a warning,
    for a pair with a layer that has no variance within minibatches."""
    hsic, batches, left_over, rows = _minibatch_sums(aligned, adapters, stream)
    size = stream.minibatch
    values = _cka_of_pairs(hsic, aligned, sides, NO_MINIBATCH_VARIANCE, "minibatch CKA")
    return xr.Dataset(
        {"cka": (("layer_a", "layer_b"), values, {"long_name": f"minibatch linear CKA ({size} rows)"}),
         "minibatches": ((), np.int64(batches)),
         "rows_left_out": ((), np.int64(left_over), {"long_name": "rows after the last whole minibatch"}),
         "rows": ((), np.int64(rows), {"long_name": "rows in whole minibatches, which CKA is computed from"})},
        coords=_pair_coords(set_a, set_b), attrs={"measures": "cka", "minibatch": int(size), **adapters[0].attrs,
                                                   "rows": int(rows)})


def _cka_of_pairs(sums: np.ndarray, layers: Sequence[xr.DataArray], sides: dict[str, list[int]], why: str,
                  what: str = "CKA") -> np.ndarray:
    """(layer_a, layer_b) linear CKA sums[a, b] / sqrt(sums[a, a] · sums[b, b]) from the (L, L) sums of every pair
    of ``layers`` (tr(K̃L̃), or summed HSICs); NaN, with a warning saying ``why``, for a layer whose own sum is
    not positive."""
    own = np.diag(sums)
    for index in np.flatnonzero(own <= 0):
        warnings.warn(f"{what} of layer {str(layers[index].name)!r} is NaN: {why}", RuntimeWarning,
                      stacklevel=user_stacklevel())
    scale = np.sqrt(np.clip(own, 0, None))
    values = np.divide(sums, np.outer(scale, scale), out=np.full_like(sums, np.nan),
                       where=(scale[:, None] > 0) & (scale[None, :] > 0))
    return np.minimum(values[np.ix_(sides["a"], sides["b"])], 1.0)  # past 1 by rounding only (Cauchy-Schwarz)


def _tagged(layer: xr.DataArray, tags: Mapping[str, str]) -> xr.DataArray:
    """``layer`` named with its store's tag where ``tags`` holds one for its store and its name does not end in it."""
    tag = tags.get(str(layer.encoding.get("store")))
    return layer if tag is None or str(layer.name).endswith(f" ({tag})") else layer.rename(f"{layer.name} ({tag})")


def _same_layer(one: xr.DataArray, other: xr.DataArray) -> bool:
    """Whether two layers are one: the same Dask data with the same dims and coordinates (datapoint labels, padding
    mask, group labels), Dask-backed coordinates compared by their Dask names, so nothing is read. The same data
    under other labels (a shuffled baseline), without its mask, or with labels where it held a store's positions
    (``holds_positions``, an attribute that xarray's equality leaves aside) is another layer."""
    name = getattr(one.data, "name", None)  # a Dask array's (numpy data has none: never one layer by name)
    if name is None or name != getattr(other.data, "name", None) or one.dims != other.dims \
            or set(one.coords) != set(other.coords) or holds_positions(one) != holds_positions(other):
        return False
    for key in one.coords:
        ours, theirs = one.coords[key].variable, other.coords[key].variable
        if isinstance(ours.data, da.Array) or isinstance(theirs.data, da.Array):
            if not (isinstance(ours.data, da.Array) and isinstance(theirs.data, da.Array)
                    and ours.data.name == theirs.data.name and ours.dims == theirs.dims):
                return False
        elif not ours.equals(theirs):
            return False
    return True


def _pair_coords(set_a: Mapping[str, Any], set_b: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"layer_a": np.array(list(set_a), dtype=object), "layer_b": np.array(list(set_b), dtype=object)}


def _pairwise(stats: Moments | TiledMoments, labels: list[str], sides: dict[str, list[int]], measures: Sequence[str],
              solve: SolveOptions, coords: dict[str, np.ndarray],
              folds: Mapping[Any, Moments | TiledMoments] | None = None, *, where: str = "") -> xr.Dataset:
    """Each measure's (layer_a, layer_b) values from the Moments of all layers (one side each, named by
    ``labels``); ``sides`` lists the sides of set a and of set b. With ``folds`` (each fold's Moments of all
    layers, by the fold's name) also each measure's jackknife ``_se`` and ``_ci`` (bound), and the held-out
    measures. ``where`` ends each warning (the group, for a sweep per group)."""
    shape = (len(sides["a"]), len(sides["b"]))
    values = {measure: np.full(shape, np.nan) for measure in measures}
    errors = {measure: np.full(shape, np.nan) for measure in measures}
    intervals = {measure: np.full((*shape, 2), np.nan) for measure in measures}
    ranks = ({side: np.full(shape, -1, dtype=np.int64) for side in "ab"}
             if any(MEASURES[measure].from_cca for measure in measures) else {})
    with warnings.catch_warnings(record=True) as caught:  # each said once, below: not once per pair
        warnings.simplefilter("always")
        if stats.n < 2:  # a group whose rows nan_policy="omit" left out: no layer can vary, none is to blame
            warnings.warn(f"{', '.join(measures)} of every pair are NaN: the layers hold {stats.n} "
                          f"row{'' if stats.n == 1 else 's'}{where}, and a measure needs at least 2", RuntimeWarning,
                          stacklevel=user_stacklevel())
        for i, side_a in enumerate(sides["a"] if stats.n >= 2 else ()):
            for j, side_b in enumerate(sides["b"]):
                name_a, name_b = labels[side_a], labels[side_b]
                moments = dataclasses.replace(stats.select([side_a, side_b]), layers=(name_a, name_b))
                dead = side_without_variance(moments)
                if dead is not None:  # every measure is undefined: NaN throughout, one warning
                    warnings.warn(f"{', '.join(measures)} of {name_a!r} and {name_b!r} are NaN: layer "
                                  f"{(name_a, name_b)[dead]!r} has no varying channel{where}", RuntimeWarning,
                                  stacklevel=user_stacklevel())
                    continue
                pair = PairSolves(moments, solve, None if folds is None else
                                  {name: dataclasses.replace(fold.select([side_a, side_b]), layers=(name_a, name_b))
                                   for name, fold in folds.items()})
                for measure in measures:
                    try:
                        values[measure][i, j] = float(pair.value(measure))
                    except UndefinedMeasure as reason:  # one dead layer must not sink the whole sweep
                        warnings.warn(f"{measure} of {name_a!r} and {name_b!r} is NaN: {reason}{where}",
                                      RuntimeWarning, stacklevel=user_stacklevel())
                        continue
                    if folds is not None:
                        try:
                            errors[measure][i, j], intervals[measure][i, j] = jackknife(
                                values[measure][i, j], pair.leave_outs(measure), solve.confidence)
                        except UndefinedMeasure as reason:
                            warnings.warn(f"{measure}_se and {measure}_ci of {name_a!r} and {name_b!r} are NaN: "
                                          f"{reason}{where}", RuntimeWarning, stacklevel=user_stacklevel())
                for side, rank in ranks.items():  # as compare() gives them, from the CCA the measures used
                    with contextlib.suppress(UndefinedMeasure):  # warned of above: -1
                        rank[i, j] = int(pair.cca[f"rank_{side}"])
    said: set[tuple[type[Warning], str]] = set()
    for record in caught:  # a layer's conditioning, say, once for the sweep (or group), not for each pair
        message = f"{record.message}{where}" if issubclass(record.category, IllConditionedWarning) else \
            str(record.message)
        if (record.category, message) not in said:
            said.add((record.category, message))
            warnings.warn(message, record.category, stacklevel=user_stacklevel())
    variables: dict[str, Any] = {
        measure: (("layer_a", "layer_b"), value, MEASURES[measure].attrs)
        for measure, value in values.items()}
    for side, rank in ranks.items():
        variables[f"rank_{side}"] = (("layer_a", "layer_b"), rank,
                                     {"long_name": f"rank of layer_{side}'s covariance in the pair, as its canonical "
                                                   f"correlations used it (-1: not solved)"})
    if folds is not None:
        for measure in measures:
            variables[f"{measure}_se"] = (("layer_a", "layer_b"), errors[measure],
                                          {"long_name": f"jackknife standard error of {measure}"})
            variables[f"{measure}_ci"] = (("layer_a", "layer_b", "bound"), intervals[measure],
                                          {"long_name": f"{solve.confidence:g} interval of {measure} (Student t, "
                                                        f"{len(folds) - 1} degrees of freedom"
                                                        + (", fewer where a fold's held-out value is undefined)"
                                                           if MEASURES[measure].per_fold else ")")})
        coords = {**coords, "bound": ["lower", "upper"]}
    return xr.Dataset(variables | {"rows": ((), np.int64(stats.n), ROWS_ATTRS)}, coords=coords)
