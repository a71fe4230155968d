"""The measures: solves on Moments, and the one registry that declares each measure as data.

Each solver is a small float64 (complex128 for the DFT adapter) computation on a
[`Moments`][chunkcca.Moments], costing O((p + q)³) per frequency whatever the number of
datapoints. [`MEASURES`][chunkcca.measures.MEASURES] declares every measure once (its solver, the options it reads, the
scalar it reports, the statistics it needs, whether it works per spatial frequency); the public
functions, [`chunkcca.compare()`][chunkcca.compare], [`chunkcca.similarity()`][chunkcca.similarity] and the command
line all read it. A result's attrs name the layers (``layer_a``, ``layer_b``) and how its rows were made
(``rows_from``) when its Moments know them, and the products' ``precision``.
A new measure is a solver here and one ``Measure`` entry in [`MEASURES`][chunkcca.measures.MEASURES].
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from ._stack import user_stacklevel
from .blas import solve_threads
from .moments import Moments
from .options import SolveOptions, check_epsilon, check_flag
from .whitening import (
    ROUNDING_DOUBT,
    Rounding,
    correlation_rank,
    mean_variance,
    non_constant,
    partial_whitener,
    real_cuts,
    rounding,
    spectrum_power,
    whitener,
)

#: Above this condition number of the correlation matrix a measure inverts (one side's, its directions as kept),
#: covariances resolve the weakest directions to worse than 1e-8, whatever the products' precision: measured
#: against an in-memory QR reference, the weakest canonical correlation moved by 2e-10 at 4e6, 2e-7 at 4e8, 4e-6
#: at 4e10, 6e-4 at 4e12 and 1e-2 at 4e14 (a channel repeated with 1e-7 of noise: ρ 0.0067), with the chunking.
#: ``_warn_ill_conditioned`` says so.
WHITENING_CONDITION = 1e8


#: Why finite-looking statistics can hold NaN or Inf (nan_policy=None, or values beyond float32's range).
NONFINITE_STATISTICS = ("the statistics hold NaN or Inf: the activations hold values too large for the products' "
                        "precision, or the Moments were built from non-finite values")


def _warn_partial_spectrum(moments: Moments) -> None:
    """A ``RoundingWarning`` for dft Moments without frequency 0 that do not keep their map's power
    (``Moments.map_power``: indexing sets it; Moments made by hand, or taken out of a whole and saved by an
    earlier chunkcca, lack it): the map's power their frequencies show leaves out its mean, so a direction the
    rounding of a side's values makes may be counted as real there (rank 12 for 11 and ρ off by 1e-2 at a
    frequency of a float16 LayerNorm output)."""
    for side, (positions, eps) in enumerate(zip(moments.positions, moments.value_rounding)):
        if positions and eps and not moments.power_is_whole(side):
            name = f"layer {moments.layers[side]!r}" if moments.layers[side] else f"side {'ab'[side]}"
            warnings.warn(f"{name}: these dft Moments hold frequencies without frequency 0 and do not keep their "
                          f"map's power (map_power, which indexing sets), so they show only part of it: its values' "
                          f"rounding is allowed for at that part only, and a direction the rounding makes may count "
                          f"as real; take them out of the whole Moments again (moments[i, j]), or solve the whole "
                          f"and select the frequency from the result (cca_from_moments(moments).isel(...))",
                          RoundingWarning, stacklevel=user_stacklevel())


def _solve_cca(cov: np.ndarray, sizes: tuple[int, ...], epsilon: float, mean: np.ndarray | None = None,
               floors: tuple[Rounding, Rounding] = (Rounding(), Rounding())) -> dict[str, np.ndarray]:
    """CCA of one covariance (p + q, p + q), real or Hermitian: rho, coefficients, pruned, ranks, and the condition
    numbers of the correlation matrices it inverts (``condition_a``, ``condition_b``).

    Each side is whitened through its correlation matrix (``D (Σ + εI) D``, D the inverse standard
    deviations), so the result does not depend on the channels' units; with ``coef = D R^(−1/2) U``
    the canonical variates have unit variance. There are min(rank_a, rank_b) canonical directions;
    the components beyond them get ρ = 0 and zero coefficients (rounding, not directions).
    """
    p, q = sizes
    variance = np.diagonal(cov).real
    mean = np.zeros(p + q) if mean is None else mean
    kept_a, kept_b = non_constant(variance[:p], mean[:p]), non_constant(variance[p:], mean[p:])
    index_a, index_b = np.flatnonzero(kept_a), np.flatnonzero(kept_b) + p
    n_components = min(p, q)
    rho = np.zeros(n_components)
    coef_a = np.zeros((p, n_components), dtype=cov.dtype)
    coef_b = np.zeros((q, n_components), dtype=cov.dtype)
    rank_a = rank_b = doubts_a = doubts_b = 0
    condition_a = condition_b = 1.0
    if index_a.size and index_b.size:
        kept = floors[0].kept(index_a), floors[1].kept(index_b - p)
        inverses = (whitener(cov[np.ix_(index_a, index_a)], epsilon, kept[0]),
                    whitener(cov[np.ix_(index_b, index_b)], epsilon, kept[1]))
        (whiten_a, rank_a, condition_a, _), (whiten_b, rank_b, condition_b, _) = inverses
        cross = cov[np.ix_(index_a, index_b)]
        doubts_a, doubts_b = real_cuts(cross, inverses, kept)
        u, s, vh = np.linalg.svd(whiten_a.conj().T @ cross @ whiten_b)
        k = min(rank_a, rank_b)
        rho[:k] = np.minimum(s[:k], 1.0)  # a correlation; rounding (float32, few rows) can pass 1
        coef_a[index_a, :k] = whiten_a @ u[:, :k]
        coef_b[index_b - p, :k] = whiten_b @ vh.conj().T[:, :k]
    # complex rows' scatter is Σ u uᴴ = Xᵀ X̄, whose directions w give the variates X w̄: their conjugates are
    # returned, so that (x − mean) · coef is the variate for complex rows (dft) as for real ones
    return {"rho": rho, "coef_a": coef_a.conj(), "coef_b": coef_b.conj(), "pruned_a": ~kept_a, "pruned_b": ~kept_b,
            "rank_a": np.int64(rank_a), "rank_b": np.int64(rank_b), "condition_a": condition_a,
            "condition_b": condition_b, "doubts_a": doubts_a, "doubts_b": doubts_b,
            "solved": bool(index_a.size and index_b.size)}


class IllConditionedWarning(RuntimeWarning):
    """A measure inverted a correlation matrix too ill-conditioned for its weakest directions to be known to 1e-8
    (``WHITENING_CONDITION``)."""


def _warn_ill_conditioned(moments: Moments, conditions: Sequence[float], remedy: str = "epsilon (a ridge)",
                          matrix: str = "a correlation matrix") -> None:
    """Warn, per side, when the ``matrix`` a measure inverted (its worst over frequencies) has a condition number
    above ``WHITENING_CONDITION``: its weakest directions, and the values resting on them, are then known to about
    κ · 1e-16 only. ``remedy``: the option that would bound it."""
    for side, condition in enumerate(conditions):
        if condition > WHITENING_CONDITION:
            warnings.warn(f"{_side_named(moments, side)} has {matrix} of condition number about "
                          f"1e{round(np.log10(condition))} (near-duplicate channels): covariances resolve its weakest "
                          f"directions only to about its condition number x 1e-16, and values resting on them can be "
                          f"off by that much (2e-7 was measured at 4e8, 6e-4 at 4e12); {remedy} bounds it",
                          IllConditionedWarning, stacklevel=user_stacklevel())


def default_batch_dims(count: int) -> tuple[str, ...]:
    """Names of ``count`` batch dims when none are given: ``freq_h``, ``freq_w`` for the 2-d DFT of images,
    else ``freq_0``, ``freq_1``, … (a 1-d or 3-d DFT's frequencies are not height and width)."""
    return ("freq_h", "freq_w") if count == 2 else tuple(f"freq_{i}" for i in range(count))


def _channel_coords(*moments: Moments) -> dict[str, np.ndarray]:
    """``channel_a`` and ``channel_b`` of a result: each side's channel labels, as the first of ``moments`` that
    knows them records them (none when no Moments do)."""
    coords = {}
    for key, side in (("channel_a", 0), ("channel_b", 1)):
        known = [m.channel_labels[side] for m in moments if len(m.channel_labels) > side
                 and m.channel_labels[side] is not None]
        if known:
            coords[key] = known[0]
    return coords


def with_layers(result: xr.Dataset, layers: Mapping[str, str]) -> xr.Dataset:
    """``result`` with ``layers`` (``layer_a``, ``layer_b`` → a layer's name) as attrs and as scalar coordinates,
    so that ``xr.concat`` of results of several pairs labels each by its layers."""
    return result.assign_coords(layers).assign_attrs(layers)


def _with_layers(result: xr.Dataset, *moments: Moments) -> xr.Dataset:
    """``with_layers`` of the layers ``moments`` know (``_layer_attrs``), and what they know of their rows
    (``_rows_attrs``) as attrs."""
    return with_layers(result, _layer_attrs(*moments)).assign_attrs(_rows_attrs(*moments))


def _rows_attrs(*moments: Moments) -> dict[str, str]:
    """``precision`` of a result's products (the coarser over several Moments, e.g. folds) and, when known, how
    its rows were made (``rows_from``, e.g. ``"spatial='avgpool', stride=2"``), which streamed results also say
    as ``spatial`` and ``stride``."""
    attrs = {"precision": "float32" if any(m.precision == "float32" for m in moments) else "float64"}
    known = [m.rows_from for m in moments if m.rows_from]
    if known:
        attrs["rows_from"] = known[0]
    return attrs


def _layer_attrs(*moments: Moments) -> dict[str, str]:
    """``layer_a`` and ``layer_b`` of a result, as the streamed measures name them: the layer of each side of
    ``moments`` (over several, e.g. folds, the first that knows it), each only when known."""
    attrs = {}
    for key, side in (("layer_a", 0), ("layer_b", 1)):
        known = [m.layers[side] for m in moments if len(m.layers) > side and m.layers[side]]
        if known:
            attrs[key] = known[0]
    return attrs


def cca_from_moments(moments: Moments, *, epsilon: float = 0.0,
                     batch_dims: tuple[str, ...] | None = None) -> xr.Dataset:
    """Canonical correlation analysis of the two sides of ``moments``.

    Each side's covariance Σ (constant channels pruned) gets ``epsilon`` added to its diagonal and
    is whitened with its pseudo-inverse square root W (through the correlation matrix, so channel
    units do not matter); the SVD ``Wₐ Σₐᵦ Wᵦ = U diag(ρ) Vᴴ`` gives the canonical correlations ρ
    (descending) and the neuron coefficients ``coef_a = Wₐ U``, ``coef_b = Wᵦ V``: canonical variate k
    of side a is ``(x − mean_a) · coef_a[:, k]``, with unit variance when epsilon is 0.

    Parameters
    ----------
    moments
        Two-sided Moments, e.g. from [`compute_moments()`][chunkcca.compute_moments] or loaded with
        [`Moments.load`][chunkcca.Moments.load]. Batched Moments (one set per spatial frequency, from ``spatial="dft"``)
        get one solve per frequency.
    epsilon
        Ridge added to the diagonal of each side's covariance, >= 0.
    batch_dims
        Names of the batch dims of batched Moments (default: those of their ``batch_labels``, e.g. ``freq_h``,
        ``freq_w``, labelled by frequency; for Moments that do not know them ``freq_h``, ``freq_w`` for two, else
        ``freq_0``, ``freq_1``, …, unlabelled).

    Returns
    -------
    xarray.Dataset
        ``rho`` ([*batch_dims,] component; min(p, q) entries, directions beyond a side's rank have
        ρ = 0), ``coef_a`` (channel_a, component), ``coef_b`` (channel_b, component),
        ``pruned_a``/``pruned_b`` (zero-variance channels, coefficient 0), ``rank_a``/``rank_b``,
        ``rows``, ``rho_mean`` and ``r2_cca`` (over every frequency, for batched Moments, which also get
        ``rho_freq_mean``; a frequency where a side does not vary has no correlation: NaN there, left out of
        the means, with a warning).
    """
    check_epsilon(epsilon)
    cov = _covariance(moments, "cca", batched=True)
    require_variance(moments, "CCA")
    batch = moments.batch_shape
    if isinstance(batch_dims, str) or (batch_dims is not None and not all(isinstance(dim, str) for dim in batch_dims)):
        raise TypeError(f"batch_dims must be a sequence of dim names (str), one per batch dim, got {batch_dims!r}")
    dims = (tuple(moments.batch_labels) or default_batch_dims(len(batch))) if batch_dims is None else tuple(batch_dims)
    if len(dims) != len(batch):
        raise ValueError(f"Moments have {len(batch)} batch dims, batch_dims names {len(dims)}: {dims}")
    # before the solves: a name given twice, or one of the result's own dims, failed in xarray after every frequency
    if batch_dims is not None and (len(set(dims)) < len(dims) or set(dims) & {"component", "channel_a", "channel_b"}):
        raise ValueError(f"batch_dims must name each batch dim once, none 'component', 'channel_a' or 'channel_b' "
                         f"(the result's own dims), got {dims}")
    with solve_threads(moments.channels):
        spectra = spectrum_power(moments, 0), spectrum_power(moments, 1)
        _warn_partial_spectrum(moments)
        solved = [_solve_cca(cov[index], moments.sizes, float(epsilon), np.abs(moments.mean[index]),
                             (rounding(moments, 0, index, spectra[0]), rounding(moments, 1, index, spectra[1])))
                  for index in np.ndindex(*batch)]
    stacked = {key: np.stack([s[key] for s in solved]).reshape((*batch, *np.shape(solved[0][key])))
               for key in solved[0]}
    rho = stacked["rho"]
    solved = stacked.pop("solved")  # where both sides vary: a frequency where one does not leaves the other's rank 0
    require_resolved(moments, "CCA", (np.where(solved, stacked["rank_a"], 1), np.where(solved, stacked["rank_b"], 1)),
                     (stacked["doubts_a"].max(), stacked["doubts_b"].max()))
    # a frequency where a side has nothing (an upsampled map's highest), or nothing beyond its values' rounding
    defined = solved & (stacked["rank_a"] > 0) & (stacked["rank_b"] > 0)
    if not defined.all():  # no correlation there
        rho = np.where(defined[..., None], rho, np.nan)
        _warn_unsolved_frequencies(moments, ~defined, dims, (stacked["rank_a"], stacked["rank_b"]))
    _warn_ill_conditioned(moments, (stacked["condition_a"].max(), stacked["condition_b"].max()))
    result = _with_layers(xr.Dataset(
        {
            "rho": ((*dims, "component"), rho, {"long_name": "canonical correlation"}),
            "coef_a": ((*dims, "channel_a", "component"), stacked["coef_a"],
                       {"long_name": "neuron coefficients of side a"}),
            "coef_b": ((*dims, "channel_b", "component"), stacked["coef_b"],
                       {"long_name": "neuron coefficients of side b"}),
            "pruned_a": ((*dims, "channel_a"), stacked["pruned_a"], {"long_name": "zero-variance channel, left out"}),
            "pruned_b": ((*dims, "channel_b"), stacked["pruned_b"], {"long_name": "zero-variance channel, left out"}),
            "rank_a": (dims, stacked["rank_a"], {"long_name": "rank of side a's covariance, as used"}),
            "rank_b": (dims, stacked["rank_b"], {"long_name": "rank of side b's covariance, as used"}),
            "rows": ((), np.int64(moments.n), ROWS_ATTRS),
            "rho_mean": ((), _of_defined(np.nanmean, rho, None), {"long_name": "mean canonical correlation"}),
            "r2_cca": ((), _of_defined(np.nanmean, rho**2, None),
                       {"long_name": "mean squared canonical correlation (R²_CCA)"}),
        },
        coords={"component": np.arange(rho.shape[-1]), **_channel_coords(moments),
                **dict(zip(dims, moments.batch_labels.values()))},
        attrs={"measure": "cca", "epsilon": float(epsilon)},
    ), moments)
    if batch:
        result["rho_freq_mean"] = (dims, rho.mean(axis=-1), {"long_name": "mean canonical correlation per frequency "
                                                                          "(NaN where a side does not vary)"})
    return result


def _warn_unsolved_frequencies(moments: Moments, undefined: np.ndarray, dims: Sequence[str],
                               ranks: tuple[np.ndarray, np.ndarray]) -> None:
    """Warn that CCA is undefined (NaN, left out of the means) at the frequencies ``undefined`` (batch-shaped),
    where a side does not vary (or only within its values' rounding: rank 0 in ``ranks``), naming the side and
    the first such frequency by its labels."""
    variance = np.diagonal(moments.scatter, axis1=-2, axis2=-1).real / max(moments.n - 1, 1)
    first = tuple(int(i) for i in np.argwhere(undefined)[0])
    parts = moments.side_slices()
    flat = [not non_constant(variance[first][part], np.abs(moments.mean[first][part])).any() for part in parts]
    sides = [side for side in (0, 1) if flat[side]] or [side for side in (0, 1) if ranks[side][first] == 0]
    dead = [moments.layers[side] or f"side {'ab'[side]}" for side in sides]
    labels = [moments.batch_labels[dim][i] if dim in moments.batch_labels else i for dim, i in zip(dims, first)]
    where = ", ".join(f"{dim}={label}" for dim, label in zip(dims, labels))
    warnings.warn(f"CCA is undefined at {int(undefined.sum())} of {undefined.size} frequencies, where "
                  f"{' and '.join(map(repr, dead))} do{'es' if len(dead) == 1 else ''} not vary, or only within "
                  f"the rounding of {'its' if len(dead) == 1 else 'their'} values (the first: {where}; a map "
                  f"upsampled by repeating its pixels has nothing at its highest frequencies): rho is NaN there, "
                  f"left out of rho_mean and r2_cca", RuntimeWarning, stacklevel=user_stacklevel())


class UndefinedMeasure(ValueError):
    """The measure has no value for these statistics (e.g. a side without variance)."""


class NonFiniteStatistics(ValueError):
    """The statistics of a side (``side a``, ``side b``) hold NaN or Inf."""


def require_variance(moments: Moments, measure: str) -> None:
    """The one rule for a side with no variance (every channel constant, to rounding): every measure is undefined,
    an [`UndefinedMeasure`][chunkcca.measures.UndefinedMeasure] naming the side (a sweep makes the pair NaN, with a
    warning). Batched Moments: a side constant at every frequency."""
    dead = side_without_variance(moments)
    if dead is not None:
        raise UndefinedMeasure(f"{measure} is undefined: side {'ab'[dead]} has no variance (every channel constant)")


class RoundingWarning(RuntimeWarning):
    """A whitening measure left out directions of a layer as the rounding of its values (float32, float16) that
    correlate with the other layer beyond chance (``ROUNDING_DOUBT``): they may be real."""


def _side_named(moments: Moments, side: int) -> str:
    """"layer 'x'" for a side of ``moments`` that knows its layer, else "side a" (or b)."""
    return f"layer {moments.layers[side]!r}" if len(moments.layers) > side and moments.layers[side] \
        else f"side {'ab'[side]}"


def require_resolved(moments: Moments, measure: str, ranks: Sequence[Any], doubts: Sequence[int] = (0, 0)) -> None:
    """A side whose every direction lies within the rounding of its values (rank 0 in ``ranks``, per side, at
    every frequency; its channels vary, or ``require_variance`` would have said) makes ``measure`` undefined, an
    ``UndefinedMeasure`` naming it; ``doubts`` (per side, from the solve: directions cut as the values'
    rounding that correlate with the other side beyond chance, ``whitening.real_cuts()``) are warned of
    (``RoundingWarning``)."""
    for side, (rank, doubtful) in enumerate(zip(ranks, doubts)):
        eps = moments.value_rounding[side] if len(moments.value_rounding) > side else 0.0
        resolved = np.any(np.asarray(rank) > 0)
        if not eps or (resolved and not doubtful):  # nothing to say (the usual case): no message made
            continue
        name = _side_named(moments, side)
        part = moments.side_slices()[side]
        spread = np.sqrt(np.diagonal(moments.scatter, axis1=-2, axis2=-1).real[..., part] / max(moments.n - 1, 1))
        ratio = np.max(np.abs(moments.mean[..., part]) / np.where(spread > 0, spread, np.inf))
        values = (f"its {_value_type(eps)} values (relative rounding {eps:.1e}; its channels' means reach "
                  f"{ratio:.2g} times their spread)")
        if not resolved:
            raise UndefinedMeasure(f"{measure} is undefined: {name} varies only within the rounding of {values}; "
                                   f"record it with its mean taken out, or in float64; if its values are exact "
                                   f"(integers), pass it as float64 (.astype('float64')) to take them as they are")
        if doubtful:
            warnings.warn(f"{name}: {doubtful} direction{'s' if doubtful > 1 else ''} of its correlation matrix "
                          f"{'were' if doubtful > 1 else 'was'} left out as within the rounding of {values}, but "
                          f"correlate{'' if doubtful > 1 else 's'} with the other layer beyond chance (once in "
                          f"{ROUNDING_DOUBT:.0e}), so {'they' if doubtful > 1 else 'it'} may be real and {measure} "
                          f"lacks {'them' if doubtful > 1 else 'it'} (the rank as used is in the result); record "
                          f"the layer with its mean taken out, or in float64, or, if its values are exact, pass "
                          f"it as float64 (.astype('float64')) to keep "
                          f"{'them' if doubtful > 1 else 'it'}", RoundingWarning, stacklevel=user_stacklevel())


def _value_type(eps: float) -> str:
    """The name of the float type of relative rounding ``eps`` (float16, float32, bfloat16, …)."""
    known = {float(np.finfo(np.float16).eps): "float16", float(np.finfo(np.float32).eps): "float32",
             2.0**-7: "bfloat16"}
    return known.get(eps, f"{eps:.1e}-rounded")


def side_without_variance(moments: Moments) -> int | None:
    """The index of the first side none of whose channels varies (to rounding; batched: at any frequency), or
    None."""
    # the covariance's variances, as the solves prune them (the scatter's are n − 1 times as large)
    variance = np.diagonal(moments.scatter, axis1=-2, axis2=-1).real / max(moments.n - 1, 1)
    for index, part in enumerate(moments.side_slices()):
        if not non_constant(variance[..., part], np.abs(moments.mean[..., part])).any():
            return index
    return None


def _require_pair(moments: Moments, name: str, *, batched: bool = False) -> None:
    """A ValueError unless ``moments`` have two sides and, unless ``batched``, are real and unbatched (one
    frequency of dft Moments, ``m[i, j]``, is unbatched but complex: only CCA solves those)."""
    complex_rows = np.iscomplexobj(moments.scatter)
    if len(moments.sizes) != 2 or ((moments.batch_shape or complex_rows) and not batched):
        raise ValueError(f"{name} compares two sides of {'' if batched else 'real, unbatched '}Moments (got sides "
                         f"{moments.sizes}, batch {moments.batch_shape}{', complex' if complex_rows else ''})"
                         + ("" if batched else "; spatial='dft' (and its frequencies, m[i, j]) is offered by cca "
                                               "only"))


def _covariance(moments: Moments, name: str, *, batched: bool) -> np.ndarray:
    """The finite covariance of two-sided Moments (batched, i.e. per frequency, only if ``batched``)."""
    if not isinstance(moments, Moments):  # a dict of them said "'dict' object has no attribute 'sizes'"
        given = ("a dict (compute_moments gives one per group or fold: pass one of its Moments, or their sum)"
                 if isinstance(moments, Mapping) else type(moments).__name__)
        raise TypeError(f"{name} solves Moments, got {given}")
    _require_pair(moments, name, batched=batched)
    cov = moments.covariance()
    if not np.all(np.isfinite(cov)):
        advice = " (use precision='float64', --precision float64)" if moments.precision == "float32" else ""
        p = moments.sizes[0]
        sides = [side for side, block in (("side a", cov[..., :p, :p]), ("side b", cov[..., p:, p:]))
                 if not np.all(np.isfinite(block))]
        raise NonFiniteStatistics(f"{' and '.join(sides) or 'sides a and b'}: " + NONFINITE_STATISTICS + advice)
    _check_normal_range(moments, np.diagonal(cov, axis1=-2, axis2=-1).real)
    _check_symmetric(moments, cov)
    return cov


#: How far a scatter's entry may differ from its transpose's, relative to √(Sᵢᵢ Sⱼⱼ), by the precision of its
#: products: chunkcca's own are symmetric to the bit; hand-made ones may carry their products' rounding.
SYMMETRY_TOLERANCE = {"float64": 2.0**-30, "float32": 2.0**-12}


def _check_symmetric(moments: Moments, cov: np.ndarray) -> None:
    """Refuse a covariance (*batch, p, p) not symmetric (Hermitian) beyond rounding: the solves read one triangle
    (a hand-made scatter of one triangle gave ρ̄ 0.0 for 0.80, silently)."""
    spread = np.sqrt(np.abs(np.diagonal(cov, axis1=-2, axis2=-1)))
    scale = spread[..., :, None] * spread[..., None, :]  # roots apart: the product of variances of 1e160 overflowed
    apart = np.abs(cov - np.conj(np.swapaxes(cov, -1, -2)))
    beyond = apart > SYMMETRY_TOLERANCE[moments.precision] * scale
    if beyond.any():
        *_, row, column = (int(i) for i in np.argwhere(beyond)[0])
        row, column = min(row, column), max(row, column)
        relative = apart[..., row, column].max() / max(scale[..., row, column].max(), np.finfo(float).tiny)
        raise ValueError(f"the Moments' scatter is not symmetric: entry ({row}, {column}) differs from ({column}, "
                         f"{row}) by {relative:.2g} of its scale (√(S_ii S_jj)), beyond the rounding of "
                         f"{moments.precision} products; Moments made by hand hold Σ (z − mean)(z − mean)ᴴ whole, "
                         f"both triangles")


#: Below this, a variance (a mean square) keeps fewer than 36 bits (about 11 digits): subnormal float64 numbers
#: keep log2(v / 2**-1074) bits, so variances of values of 1e-155 (1e-310) keep 13 digits, of 1e-161 a few (1e-5
#: of ρ̄), and of 1e-162 none (the channel then looks constant and is pruned).
SMALLEST_VARIANCE = 2.0**-1074 * 2.0**36
#: The attrs of a result's ``rows``.
ROWS_ATTRS = {"long_name": "rows the statistics were computed from"}


def _check_normal_range(moments: Moments, variance: np.ndarray) -> None:
    """Refuse channels whose squares are too small for float64: a variance in (0, SMALLEST_VARIANCE), or none at
    all where the values are not 0 but their squares would be (|mean| < √SMALLEST_VARIANCE): their products lost
    digits, or the channel was taken for constant, silently."""
    mean = np.abs(moments.mean)
    tiny = (variance > 0) & (variance < SMALLEST_VARIANCE)
    tiny |= (variance == 0) & (mean > 0) & (mean < np.sqrt(SMALLEST_VARIANCE))
    if tiny.any():
        channel = int(np.nonzero(tiny.reshape(-1, tiny.shape[-1]).any(axis=0))[0][0])
        side = next(i for i, part in enumerate(moments.side_slices()) if part.start <= channel < part.stop)
        named = moments.layers[side] if len(moments.layers) > side and moments.layers[side] else "ab"[side]
        raise ValueError(f"layer {named!r} has a channel ({channel - moments.side_slices()[side].start}) whose "
                         f"values or spread are below {np.sqrt(SMALLEST_VARIANCE):.1g}, too small for float64 "
                         f"squares (below {SMALLEST_VARIANCE:.2g} they keep fewer than 11 digits): its statistics "
                         f"lose digits or vanish; multiply the layer by a large factor (the measures do not change "
                         f"with a layer's scale)")


def _pair(moments: Moments, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Covariance blocks Σaa, Σab, Σbb of two-sided real Moments."""
    cov = _covariance(moments, name, batched=False)
    p = moments.sizes[0]
    return cov[:p, :p], cov[:p, p:], cov[p:, p:]


def _kept_directions(cov: np.ndarray, keep: float, keep_by: str, floor: Rounding) -> tuple[np.ndarray, int, int, bool]:
    """Principal directions (p, k) of one side, the fewest explaining ``keep`` of the variance or singular values
    (or the first ``keep`` of them, ``keep_by="directions"``), and no more than the side's rank (counted on its
    correlation matrix, so rounding of float32 products is not taken for directions whatever the channels'
    units), that rank, how many directions stand above the rounding of the covariance itself (its largest
    eigenvalue's: directions of channels on scales far apart fall below it, their vectors then rounding), and
    whether the rank limited them (``keep`` < 1: with ``keep`` ≥ 1 of a share SVCCA is CCA,
    ``svcca_from_moments``). Where ``keep`` counts every direction of the side, the basis is its channels
    themselves (the identity, p columns), which spans them exactly whatever their scales."""
    values, vectors = np.linalg.eigh(cov)
    values, vectors = np.clip(values[::-1], 0, None), vectors[:, ::-1]
    weights = values if keep_by != "singular_values" else np.sqrt(values)
    total = weights.sum()
    if total == 0:
        return vectors[:, :0], 0, 0, False
    # a share within the prefix sums' rounding (p ulps) of ``keep`` reaches it
    count = int(keep) if keep_by == "directions" else int(
        np.searchsorted(np.cumsum(weights) / total, keep - len(weights) * np.finfo(float).eps) + 1)
    rank = correlation_rank(cov, floor)
    # the covariance's rounding, relative to its largest eigenvalue (in the channels' units, not a correlation's)
    resolved = int((values > values[0] * max(len(values) * np.finfo(np.float64).eps, floor.products)).sum())
    if count >= len(cov):
        return np.eye(len(cov), dtype=cov.dtype), rank, resolved, count > rank
    return vectors[:, : min(count, rank)], rank, resolved, count > rank


def _svcca_of_all(moments: Moments, keep: float, keep_by: str, epsilon: float,
                  solve_all: Callable[[], xr.Dataset]) -> xr.Dataset:
    """SVCCA keeping every direction up to each side's rank (``keep`` = 1, or a count of every channel of both
    sides): the CCA of the Moments with ``epsilon`` (``solve_all()``), its canonical directions (min(rank_a,
    rank_b) of them, the ranks without the ridge: a ridge makes every channel a direction) as SVCCA's result
    lists them."""
    try:
        solved = solve_all()
        if epsilon > 0:
            with warnings.catch_warnings():  # said by the solve with the ridge
                warnings.simplefilter("ignore")
                unridged = cca_from_moments(moments)
        else:
            unridged = solved
    except UndefinedMeasure as error:  # the measure asked for was SVCCA
        raise UndefinedMeasure(str(error).replace("CCA is undefined", "SVCCA is undefined", 1)) from None
    rank_a, rank_b = int(unridged["rank_a"]), int(unridged["rank_b"])
    directions = solved.isel(component=slice(min(rank_a, rank_b)))
    rho = directions["rho"].values
    return _with_layers(xr.Dataset(
        {"rho": ("component", rho, {"long_name": "canonical correlation of the kept directions"}),
         "coef_a": directions["coef_a"], "coef_b": directions["coef_b"],
         "rank_a": ((), np.int64(rank_a), {"long_name": "rank of side a's kept directions, as used"}),
         "rank_b": ((), np.int64(rank_b), {"long_name": "rank of side b's kept directions, as used"}),
         "dims_a": ((), np.int64(rank_a), {"long_name": _kept_name("a", keep, keep_by)}),
         "dims_b": ((), np.int64(rank_b), {"long_name": _kept_name("b", keep, keep_by)}),
         "rows": ((), np.int64(moments.n), ROWS_ATTRS),
         "rho_mean": ((), rho.mean() if rho.size else np.nan, {"long_name": "SVCCA similarity (mean rho)"})},
        coords={"component": np.arange(rho.size), **_channel_coords(moments)},
        attrs={"measure": "svcca", "keep": keep, "keep_by": keep_by, "epsilon": epsilon},
    ), moments)


def _kept_name(side: str, keep: float, keep_by: str) -> str:
    """The long_name of SVCCA's ``dims_<side>``."""
    if keep_by == "directions":
        return f"principal directions of side {side} kept: the first {keep}, fewer where its rank is lower"
    return f"directions of side {side} holding {keep} of the {keep_by}"


def _told_as_svcca(solve: Callable[[], xr.Dataset]) -> xr.Dataset:
    """``solve()``, a CCA solve standing for SVCCA, its warnings (those before an error too) told as SVCCA's."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return solve()
    finally:
        for record in caught:
            warnings.warn(str(record.message).replace(" CCA lacks", " SVCCA lacks", 1), record.category,
                          stacklevel=user_stacklevel())


def svcca_from_moments(moments: Moments, *, keep: float = 0.99, keep_by: str = "variance",
                       epsilon: float = 0.0) -> xr.Dataset:
    """SVCCA (Raghu et al. 2017): per side the fewest principal directions explaining ``keep``, then CCA.

    Parameters
    ----------
    moments
        Two-sided Moments, e.g. from [`compute_moments()`][chunkcca.compute_moments] or loaded with
        [`Moments.load`][chunkcca.Moments.load].
    keep
        The share, in (0, 1], of each side's variance (or singular values) its kept directions hold; with
        ``keep_by="directions"``, the number of principal directions each side keeps (an integer >= 1; fewer
        where its rank is lower), as the google/svcca tutorials' "top 50".
    keep_by
        "variance" counts eigenvalues of the covariance (variance explained), "singular_values" their
        square roots (the singular values of the centred data, as google/svcca's SVD step), "directions"
        makes ``keep`` a count.
    epsilon
        Ridge of the CCA on the kept directions, >= 0.

    Returns
    -------
    xarray.Dataset
        ``rho`` (component), ``dims_a``/``dims_b`` (directions kept), ``rho_mean``, ``rows``, and
        ``coef_a``/``coef_b`` over the original channels.
    """
    return _svcca(moments, keep, keep_by, epsilon,
                  lambda: _told_as_svcca(functools.partial(cca_from_moments, moments, epsilon=float(epsilon))))


def _svcca(moments: Moments, keep: float, keep_by: str, epsilon: float,
           solve_all: Callable[[], xr.Dataset]) -> xr.Dataset:
    """``svcca_from_moments()``; with ``keep`` = 1 (CCA) ``solve_all`` gives the CCA of the Moments with
    ``epsilon`` (a pair's, ``PairSolves.cca``, where it is computed already, its warnings said), its warnings
    told as SVCCA's."""
    keep = SolveOptions(keep=keep, keep_by=keep_by, epsilon=epsilon).keep  # a count of directions as an int
    cov_aa, cov_ab, cov_bb = _pair(moments, "svcca")
    require_variance(moments, "SVCCA")
    if keep >= 1 and keep_by != "directions":  # every direction up to the rank: CCA, its checks and warnings too
        # (by covariance, a rounding direction of 4e-15 outranked a real one of 1e-18 in a channel of units 1e-9)
        return _svcca_of_all(moments, 1.0, keep_by, float(epsilon), solve_all)
    with solve_threads(moments.channels):
        floors = rounding(moments, 0), rounding(moments, 1)
        (basis_a, rank_a, resolved_a, limited_a), (basis_b, rank_b, resolved_b, limited_b) = (
            _kept_directions(cov, keep, keep_by, floor) for cov, floor in zip((cov_aa, cov_bb), floors))
        doubts = (0, 0)
        if (limited_a or limited_b) and rank_a and rank_b:  # the rank, not keep, took directions: were they real?
            found = real_cuts(cov_ab, (whitener(cov_aa, 0.0, floors[0]), whitener(cov_bb, 0.0, floors[1])), floors)
            doubts = (found[0] if limited_a else 0, found[1] if limited_b else 0)
    require_resolved(moments, "SVCCA", (rank_a, rank_b), doubts)
    whole = (basis_a.shape[1] == len(cov_aa), basis_b.shape[1] == len(cov_bb))  # every direction: the channels
    if all(whole):  # every direction of both sides: CCA, its checks and warnings too
        return _svcca_of_all(moments, keep, keep_by, float(epsilon), solve_all)
    for side, (basis, resolved, values) in enumerate(((basis_a, resolved_a, cov_aa), (basis_b, resolved_b, cov_bb))):
        if not whole[side] and basis.shape[1] > resolved:  # its last directions' vectors are the covariance's rounding
            raise UndefinedMeasure(
                f"SVCCA is undefined: it keeps {basis.shape[1]} principal directions of {_side_named(moments, side)}, "
                f"but only {resolved} stand above the rounding of its covariance (its channels' variances "
                f"{np.diagonal(values).real.min():.3g} to {np.diagonal(values).real.max():.3g}"
                f"{'; float32 products' if moments.precision == 'float32' else ''}), so which {basis.shape[1]} "
                f"they are is rounding; keep fewer, or all (then SVCCA is CCA), or put its channels on comparable "
                f"scales (SVCCA's directions depend on the channels' units)"
                + ("" if moments.precision != "float32" else ", or take float64 products"))
    with solve_threads(moments.channels):
        ka, kb = basis_a.shape[1], basis_b.shape[1]
        ridge_a, ridge_b = (float(epsilon) * np.eye(len(cov)) for cov in (cov_aa, cov_bb))
        # the ridge in the channels' units, as cca's
        reduced = np.block([[basis_a.T @ (cov_aa + ridge_a) @ basis_a, basis_a.T @ cov_ab @ basis_b],
                            [basis_b.T @ cov_ab.T @ basis_a, basis_b.T @ (cov_bb + ridge_b) @ basis_b]])
        # kept directions are uncorrelated (conditioned); a side kept whole is its channels, whitened as cca's
        mean = np.concatenate([moments.mean[:len(cov_aa)] if whole[0] else np.zeros(ka),
                               moments.mean[len(cov_aa):] if whole[1] else np.zeros(kb)])
        solved = _solve_cca(reduced, (ka, kb), 0.0, mean,
                            tuple(floor if kept else Rounding() for floor, kept in zip(floors, whole)))
    rho = solved["rho"]
    return _with_layers(xr.Dataset(
        {
            "rho": ("component", rho, {"long_name": "canonical correlation of the kept directions"}),
            "coef_a": (("channel_a", "component"), basis_a @ solved["coef_a"]),
            "coef_b": (("channel_b", "component"), basis_b @ solved["coef_b"]),
            "rank_a": ((), np.int64(solved["rank_a"]), {"long_name": "rank of side a's kept directions, as used"}),
            "rank_b": ((), np.int64(solved["rank_b"]), {"long_name": "rank of side b's kept directions, as used"}),
            "dims_a": ((), np.int64(ka), {"long_name": _kept_name("a", keep, keep_by)}),
            "dims_b": ((), np.int64(kb), {"long_name": _kept_name("b", keep, keep_by)}),
            "rows": ((), np.int64(moments.n), ROWS_ATTRS),
            "rho_mean": ((), rho.mean() if rho.size else np.nan, {"long_name": "SVCCA similarity (mean rho)"}),
        },
        coords={"component": np.arange(rho.size), **_channel_coords(moments)},
        attrs={"measure": "svcca", "keep": keep, "keep_by": keep_by, "epsilon": float(epsilon)},
    ), moments)


#: Canonical correlations closer than this are reported as tied (their directions are not unique).
TIE_TOLERANCE = 1e-8


def pwcca_from_moments(moments: Moments, *, epsilon: float = 0.0, solved: xr.Dataset | None = None) -> xr.Dataset:
    """Projection-weighted CCA (Morcos et al. 2018), exactly from Moments.

    On the side with fewer (non-constant) channels, canonical variate i is ``hᵢ = x̃ · coefᵢ``; its weight
    ``αᵢ ∝ Σⱼ |⟨hᵢ/‖hᵢ‖, x̃ⱼ⟩|`` over that side's channels j, which is
    ``Σⱼ |(M coefᵢ)ⱼ| / sqrt(coefᵢᵀ M coefᵢ)`` with M the side's scatter.

    Parameters
    ----------
    moments
        Two-sided Moments, e.g. from [`compute_moments()`][chunkcca.compute_moments] or loaded with
        [`Moments.load`][chunkcca.Moments.load].
    epsilon
        Ridge of the CCA, >= 0.
    solved
        [`cca_from_moments()`][chunkcca.cca_from_moments] of these Moments with this ``epsilon``, if already
        computed.

    Returns
    -------
    xarray.Dataset
        ``pwcca`` (``Σ αᵢ ρᵢ``), ``weights`` and ``rho`` (component), ``side`` ("a" or "b"), ``rows``, and
        ``tied``: components whose ρ equals another's within 1e-8, whose directions (and so weights) are
        not unique.
    """
    _covariance(moments, "pwcca", batched=False)
    cca_result = cca_from_moments(moments, epsilon=epsilon) if solved is None else solved
    if solved is not None and not (isinstance(solved, xr.Dataset) and solved.attrs.get("measure") == "cca"
                                   and solved.attrs.get("epsilon") == float(epsilon)
                                   and solved["coef_a"].shape == (moments.sizes[0], min(moments.sizes))
                                   and solved["coef_b"].shape == (moments.sizes[1], min(moments.sizes))):
        raise ValueError(f"solved must be cca_from_moments() of these Moments with epsilon={float(epsilon):g} (its "
                         f"attrs say epsilon "
                         f"{solved.attrs.get('epsilon') if isinstance(solved, xr.Dataset) else type(solved).__name__}"
                         f"; its coefficients must be of {moments.sizes} channels)")
    use_a = int((~cca_result["pruned_a"]).sum()) <= int((~cca_result["pruned_b"]).sum())
    part = moments.side_slices()[0 if use_a else 1]
    coef = cca_result["coef_a" if use_a else "coef_b"].values
    scatter = moments.scatter[part, part]
    projected = scatter @ coef
    norms = np.sqrt(np.clip(np.einsum("ik,ik->k", coef, projected), 0, None))
    weights = np.divide(np.abs(projected).sum(axis=0), norms, out=np.zeros_like(norms), where=norms > 0)
    weights = weights / weights.sum() if weights.sum() > 0 else weights
    rho = cca_result["rho"].values
    gaps = np.diff(rho)
    tied = np.zeros(rho.size, dtype=bool)
    close = np.abs(gaps) <= TIE_TOLERANCE
    tied[:-1] |= close
    tied[1:] |= close
    return _with_layers(xr.Dataset(
        {
            "pwcca": ((), float(weights @ rho), {"long_name": "projection-weighted mean canonical correlation"}),
            "weights": ("component", weights, {"long_name": "projection weight of each canonical variate"}),
            "rho": ("component", rho),
            "tied": ("component", tied, {"long_name": "rho equal to a neighbour's: direction not unique"}),
            "side": ((), "a" if use_a else "b", {"long_name": "side whose canonical variates are weighted"}),
            "rank_a": cca_result["rank_a"],
            "rank_b": cca_result["rank_b"],
            "rows": ((), np.int64(moments.n), ROWS_ATTRS),
        },
        coords={"component": cca_result["component"].values},
        attrs={"measure": "pwcca", "epsilon": float(epsilon)},
    ), moments)


def _debiased_hsic(cross: float, norm_product: float, trace_a: float, trace_b: float, n: int) -> float:
    """Unbiased HSIC (Song et al. 2012) of linear kernels, in feature space (as Kornblith et al.'s code)."""
    return cross - n / (n - 2) * norm_product + trace_a * trace_b / ((n - 1) * (n - 2))


def cka_ratio(cross: float, self_a: float, self_b: float) -> float:
    """CKA from HSICs: ``cross / √(self_a · self_b)``, each root taken apart (their product of values of 1e-50
    underflowed to 0, giving 1; of 1e50 overflowed, giving 0), and at most 1: by Cauchy-Schwarz (the unbiased HSIC
    too is an inner product, of U-centred Grams) past it only by rounding (1 + 4e-16 for a layer against its
    rotation), as a correlation rounded past 1 is 1."""
    return min(cross / (np.sqrt(self_a) * np.sqrt(self_b)), 1.0)


def cka_from_moments(moments: Moments, *, debiased: bool = False) -> xr.Dataset:
    """Linear CKA (Kornblith et al. 2019) from Moments: ``‖Mab‖²_F / (‖Maa‖_F ‖Mbb‖_F)``.

    Parameters
    ----------
    moments
        Two-sided Moments, e.g. from [`compute_moments()`][chunkcca.compute_moments] or loaded with
        [`Moments.load`][chunkcca.Moments.load].
    debiased
        Use the unbiased HSIC estimator on all rows, made exact by the row-norm sums of the Moments
        (``norm_products``: ``compute_moments(..., row_norms=True)``); it needs at least 4 rows.

    Returns
    -------
    xarray.Dataset
        ``cka`` and ``rows``.
    """
    _pair(moments, "cka")
    check_flag("debiased", debiased)
    require_variance(moments, "CKA")
    p = moments.sizes[0]
    scatter, n = moments.scatter, moments.n
    # each side divided by its total variance first: CKA does not change, and the squares stay in float64's range
    # whatever the values' scale (‖Maa‖²_F of values of 1e76 overflowed, of 1e-100 underflowed)
    traces = {"a": float(np.trace(scatter[:p, :p])), "b": float(np.trace(scatter[p:, p:]))}
    scales = {"aa": traces["a"], "ab": np.sqrt(traces["a"]) * np.sqrt(traces["b"]), "bb": traces["b"]}
    blocks = {"aa": scatter[:p, :p], "ab": scatter[:p, p:], "bb": scatter[p:, p:]}
    cross = {key: float(np.sum((block / scales[key]) ** 2)) for key, block in blocks.items()}
    if debiased:
        if moments.norm_products is None:
            raise ValueError("debiased CKA needs Moments with row-norm sums: compute them with "
                             "compute_moments(..., row_norms=True)")
        if n < 4:
            raise UndefinedMeasure(f"debiased CKA needs at least 4 rows, have {n}")
        products = moments.norm_products
        # Σ ‖u_l‖² ‖u_m‖² past float64's range, or with terms below its normal range, each off by up to 2⁻¹⁰⁷⁵
        # (values of 1e-81: debiased CKA 5e-3 off, silently): the n terms' errors within 2⁻⁵² of the scale the
        # sum is divided by, tr_l · tr_m (found by audit)
        logs = np.log2([traces["a"], traces["b"]])
        if not np.isfinite(products).all() or (np.add.outer(logs, logs) < np.log2(n) - 1023).any():
            went = "overflowed" if not np.isfinite(products).all() else "underflowed"
            raise UndefinedMeasure(f"debiased CKA needs fourth powers of the values in float64, which {went} "
                                   f"(total variances {traces['a'] / (n - 1):.3g} and {traces['b'] / (n - 1):.3g}): "
                                   f"rescale the layers, or use the biased estimator")
        hsic = {key: _debiased_hsic(cross[key], products["ab".index(key[0]), "ab".index(key[1])] / scales[key]
                                    / scales[key], 1.0, 1.0, n) for key in blocks}
        if hsic["aa"] <= 0 or hsic["bb"] <= 0:
            raise UndefinedMeasure(f"debiased CKA is undefined here: the unbiased HSIC of a side with itself is not "
                                   f"positive (HSIC(a, a) = {hsic['aa']:.3g}, HSIC(b, b) = {hsic['bb']:.3g}), "
                                   f"which happens with few rows ({n}); use more rows or the biased estimator")
    else:
        hsic = cross
    value = cka_ratio(hsic["ab"], hsic["aa"], hsic["bb"])
    return _with_layers(xr.Dataset(
        {"cka": ((), value, {"long_name": "linear CKA" + (" (debiased)" if debiased else "")}),
         "rows": ((), np.int64(n), ROWS_ATTRS)},
        attrs={"measure": "cka", "debiased": int(debiased)},
    ), moments)


def procrustes_from_moments(moments: Moments) -> xr.Dataset:
    """Orthogonal Procrustes distance of the centred, unit-Frobenius-norm sides (Ding et al. 2021).

    ``d² = 2 − 2 ‖Σab‖_* / sqrt(tr Σaa · tr Σbb)``, the smallest ‖X − Y Q‖²_F over orthogonal Q
    (sides of different widths are zero-padded).

    Parameters
    ----------
    moments
        Two-sided Moments, e.g. from [`compute_moments()`][chunkcca.compute_moments] or loaded with
        [`Moments.load`][chunkcca.Moments.load].

    Returns
    -------
    xarray.Dataset
        ``procrustes`` (the distance d), ``similarity`` (‖Σab‖_* / sqrt(tr Σaa · tr Σbb)) and ``rows``.
    """
    cov_aa, cov_ab, cov_bb = _pair(moments, "procrustes")
    require_variance(moments, "the Procrustes distance")
    # each side's norm apart, as CKA's: tr Σaa · tr Σbb overflowed (layers of 1e80: d = √2) or underflowed (1e-150:
    # d = 0) where the sides' own traces do not
    normalised = cov_ab / np.sqrt(np.trace(cov_aa)) / np.sqrt(np.trace(cov_bb))
    with solve_threads(moments.channels):
        similarity = float(np.linalg.svd(normalised, compute_uv=False).sum())
    return _with_layers(xr.Dataset(
        {"procrustes": ((), float(np.sqrt(max(0.0, 2 - 2 * similarity))), {"long_name": "Procrustes distance"}),
         "similarity": ((), similarity, {"long_name": "nuclear norm of the normalised cross-covariance"}),
         "rows": ((), np.int64(moments.n), ROWS_ATTRS)},
        attrs={"measure": "procrustes"},
    ), moments)


def shape_metric_from_moments(moments: Moments, *, alpha: float = 1.0) -> xr.Dataset:
    """Angular shape metric of Williams et al. 2021 with partial whitening ``alpha``.

    Each side is mapped by ``Tα = ((1 − α) Σ + α v̄ I)^(−1/2)`` (the identity scaled by v̄, the mean
    variance of the channels that vary, so the metric depends neither on the data's scale nor on dead units), then
    ``θ = arccos(‖Ta Σab Tb‖_* / sqrt(tr(Ta Σaa Ta) tr(Tb Σbb Tb)))``.

    Parameters
    ----------
    moments
        Two-sided Moments, e.g. from [`compute_moments()`][chunkcca.compute_moments] or loaded with
        [`Moments.load`][chunkcca.Moments.load].
    alpha
        In [0, 1]: 0 whitens fully (CCA-like), 1 not at all (Procrustes-like).

    Returns
    -------
    xarray.Dataset
        ``shape_distance`` (θ, radians) and ``rows``.
    """
    SolveOptions(alpha=alpha)
    cov_aa, cov_ab, cov_bb = _pair(moments, "shape_metric")
    require_variance(moments, "the shape metric")
    with solve_threads(moments.channels):
        floors = rounding(moments, 0), rounding(moments, 1)
        inverses = tuple(partial_whitener(cov, alpha, floor, np.abs(moments.mean[part]), eps)
                         for cov, floor, part, eps in zip((cov_aa, cov_bb), floors, moments.side_slices(),
                                                          moments.value_rounding))
        (t_a, rank_a, condition_a, _), (t_b, rank_b, condition_b, _) = inverses
        require_resolved(moments, "the shape metric", (rank_a, rank_b), real_cuts(cov_ab, inverses, floors))
        nuclear = np.linalg.svd(t_a.T @ cov_ab @ t_b, compute_uv=False).sum()  # Tᵀ: α = 0's T is not symmetric
        norm = np.sqrt(np.trace(t_a.T @ cov_aa @ t_a) * np.trace(t_b.T @ cov_bb @ t_b))
    if alpha == 0:  # a correlation matrix inverted
        _warn_ill_conditioned(moments, (condition_a, condition_b), "alpha > 0")
    else:  # the regularised covariance, whose condition number a tiny alpha leaves near 1 / alpha (found by audit)
        _warn_ill_conditioned(moments, (condition_a, condition_b), "a larger alpha",
                              "a partially whitened covariance ((1 - alpha) cov + alpha v I)")
    angle = float(np.arccos(np.clip(nuclear / norm, -1.0, 1.0)))
    return _with_layers(xr.Dataset(
        {"shape_distance": ((), angle, {"long_name": "angular shape distance", "units": "radians"}),
         "rank_a": ((), np.int64(rank_a), {"long_name": "rank of side a's (partially) whitened covariance"}),
         "rank_b": ((), np.int64(rank_b), {"long_name": "rank of side b's (partially) whitened covariance"}),
         "rows": ((), np.int64(moments.n), ROWS_ATTRS)},
        attrs={"measure": "shape", "alpha": float(alpha)},
    ), moments)


def _leave_outs(folds: Sequence[Moments]) -> Iterator[Moments]:
    """The Moments of every fold but fold i, for i = 0, 1, … in turn: each fold's training data. Each half of a
    range of folds is merged once and handed down to the other half's, so K folds take O(K log K) merges with
    O(log K) Moments held, not K − 1 merges each (--folds 500 of a 1000 x 200 pair did not end in 90 s)."""
    return _without(folds, 0, len(folds), None)


def _without(folds: Sequence[Moments], start: int, stop: int, rest: Moments | None) -> Iterator[Moments]:
    """``rest`` merged with every fold outside start … stop − 1 but fold i, for i in that range in turn. (A nested
    function calling itself made a reference cycle holding the folds until the cyclic garbage collector ran: a
    sweep with folds held every pair's fold Moments beside the next, 281–306 MiB for 175.)"""
    if stop - start == 1:
        yield rest  # K >= 2: some fold is always left in
        return
    middle = (start + stop) // 2
    for part, other in (((start, middle), (middle, stop)), ((middle, stop), (start, middle))):
        merged = sum(folds[other[0] + 1 : other[1]], folds[other[0]])
        yield from _without(folds, *part, merged if rest is None else rest + merged)


#: Each fold's Moments, in a list (fold i named i) or by name (a dict, as compute_moments(..., folds=...) gives).
Folds = Sequence[Moments] | Mapping[Any, Moments]


def fold_names(folds: Folds) -> tuple[list[Any], list[Moments]]:
    """The folds' names (their labels, or their positions 0, 1, …) and their Moments, in order."""
    if isinstance(folds, Mapping):
        return list(folds), list(folds.values())
    return list(range(len(folds))), list(folds)


def _check_folds(folds: Sequence[Moments], measure: str, names: Sequence[Any]) -> None:
    """Refuse fewer than 2 folds, a fold (named by ``names``) of fewer than 2 rows, or one of other channels,
    layers or rows than the first (``Moments.check_mergeable``: two folds are never merged, so nothing else
    compared them)."""
    if len(folds) < 2:
        raise ValueError(f"{measure} needs folds=K with K >= 2")
    _require_pair(folds[0], measure)  # dft's failed inside numpy's einsum
    for name, fold in zip(names[1:], folds[1:]):
        try:
            folds[0].check_mergeable(fold)
        except ValueError as error:
            raise ValueError(f"{measure}: fold {name!r} is not of the same layers and rows as fold {names[0]!r}: "
                             f"{error}") from None
    small = [i for i, part in enumerate(folds) if part.n < 2]
    if small:
        rows = folds[small[0]].n
        raise ValueError(f"{measure}: fold {names[small[0]]!r} holds {rows} row{'' if rows == 1 else 's'}; every fold "
                         f"needs at least 2")


def _variate_correlations(left: np.ndarray, right: np.ndarray, cov: np.ndarray, p: int) -> np.ndarray:
    """Correlations, under the covariance ``cov`` (p + q, p + q), of the paired projections ``left`` (p, k) of
    side a and ``right`` (q, k) of side b: one per column; NaN (undefined) where a fitted projection has no
    variance, 0 for components beyond the fit's rank (zero coefficients, as their ρ is 0)."""
    cross = np.einsum("ik,ij,jk->k", left, cov[:p, p:], right)
    spread = np.sqrt(np.einsum("ik,ij,jk->k", left, cov[:p, :p], left)
                     * np.einsum("ik,ij,jk->k", right, cov[p:, p:], right))
    fitted = np.any(left != 0, axis=0) & np.any(right != 0, axis=0)
    return np.divide(cross, spread, out=np.where(fitted, np.nan, 0.0), where=spread > 0)


def _warn_undefined(values: np.ndarray, fold_axis: int, measure: str, what: str, names: Sequence[Any]) -> None:
    """Warn how many held-out correlations are NaN (undefined: a fold where a layer, a channel or a variate does
    not vary), naming their folds: the means over folds (``_of_defined``) are of the others, never a 0 averaged
    in."""
    undefined = np.isnan(values)
    if undefined.any():
        folds = [names[i] for i in sorted(set(np.nonzero(undefined)[fold_axis].tolist()))]
        warnings.warn(f"{measure}: {undefined.sum()} held-out correlation{'s are' if undefined.sum() > 1 else ' is'} "
                      f"undefined ({what} does not vary in the held-out fold{'s' if len(folds) > 1 else ''} "
                      f"{', '.join(map(repr, folds))}): each mean over folds is of the others, and a fold with "
                      f"none defined is not counted in the jackknife", RuntimeWarning,
                      stacklevel=user_stacklevel())


def _of_defined(reduce: Callable[..., np.ndarray], values: np.ndarray, axis: int | None) -> np.ndarray:
    """``reduce`` (``np.nanmean``, ``np.nanmedian``) of the defined values along ``axis``; NaN where none is (the
    warning is ``_warn_undefined``'s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all undefined: NaN
        return reduce(values, axis=axis)


def heldout_cca_from_folds(folds: Folds, *, epsilon: float = 0.0) -> xr.Dataset:
    """Held-out CCA: for each fold, canonical directions fitted on the other folds' Moments and the correlation of
    each pair of canonical variates on the held-out fold's.

    In-sample canonical correlations are biased upwards when channels are not few compared with rows (on
    independent data they are far from 0); held-out ones are not.

    Parameters
    ----------
    folds
        The Moments of each fold (``compute_moments(..., folds=K)``), K >= 2, two real sides: a list (the folds
        named 0, 1, …) or a dict by name (the results' ``fold`` coordinate and messages use the names).
    epsilon
        Ridge of the fitted CCA, >= 0.

    Returns
    -------
    xarray.Dataset
        ``heldout_rho`` (component): each component's held-out correlation, averaged over folds;
        ``heldout_cca``: its mean over components; ``heldout_cca_per_fold`` (fold): that mean per fold. A
        correlation undefined in a fold (a variate without variance there, e.g. a layer constant within the
        fold) is NaN in that fold and left out of the means over folds, with a warning.
    """
    check_epsilon(epsilon)
    names, folds = fold_names(folds)
    _check_folds(folds, "heldout_cca", names)
    p = folds[0].sizes[0]
    rows, channels = sum(part.n for part in folds), sum(folds[0].sizes)
    few = [fold for fold, part in enumerate(folds) if rows - part.n <= channels]
    if few and epsilon == 0:
        warnings.warn(f"heldout_cca: without fold {names[few[0]]!r} the fit has {rows - folds[few[0]].n} rows for "
                      f"{channels} channels, so in-sample correlations reach 1 and the fitted directions are not "
                      f"unique: the held-out value then depends on the channels' scales, order and chunking; pass "
                      f"epsilon > 0, or fewer channels or more rows", RuntimeWarning, stacklevel=user_stacklevel())
    per_fold = []
    for fold, train in enumerate(_leave_outs(folds)):
        try:
            fitted = cca_from_moments(train, epsilon=epsilon)
        except UndefinedMeasure as error:  # the layers vary, but not in the rows it is fitted on
            raise UndefinedMeasure(f"heldout_cca cannot be fitted without fold {names[fold]!r} (on the other folds' "
                                   f"rows): "
                                   f"{error}") from None
        per_fold.append(_variate_correlations(fitted["coef_a"].values, fitted["coef_b"].values,
                                              folds[fold].covariance(), p))
    held = np.array(per_fold)  # (fold, component)
    _warn_undefined(held, 0, "heldout_cca", "a canonical variate", names)
    rho = _of_defined(np.nanmean, held, 0)
    return _with_layers(xr.Dataset(
        {"heldout_rho": ("component", rho, {"long_name": "held-out canonical correlation, mean over folds"}),
         "heldout_cca": ((), float(rho.mean()) if rho.size else np.nan, {"long_name": "mean held-out CCA"}),
         "heldout_cca_per_fold": ("fold", _of_defined(np.nanmean, held, 1)),
         "rows": ((), np.int64(sum(part.n for part in folds)), ROWS_ATTRS)},
        coords={"component": np.arange(rho.size), "fold": names},
        attrs={"measure": "heldout_cca", "epsilon": float(epsilon), "folds": len(folds)}), *folds)


def predictivity_from_folds(folds: Folds, *, ridge: float | Sequence[float] = 0.01) -> xr.Dataset:
    """Ridge predictivity a → b: for each fold, ridge regression from a's channels to each of b's, fitted on the
    other folds' Moments, scored on the held-out fold by the Pearson correlation of prediction and truth.

    With C the training folds' covariances, ``B = (C_aa + λ · v̄ · I)⁻¹ C_ab``, v̄ the mean variance of a's
    channels that vary (dead units left out); on a held-out fold of covariance S, channel j scores
    ``(Bᵀ S_ab)_jj / sqrt((Bᵀ S_aa B)_jj · (S_bb)_jj)``.

    Parameters
    ----------
    folds
        The Moments of each fold, K >= 2, two real sides (a predicts b), as for ``heldout_cca_from_folds()``.
    ridge
        λ, relative to the mean variance of a's channels that vary; several values give a ``ridge`` dim.

    Returns
    -------
    xarray.Dataset
        ``predictivity_per_channel`` ([ridge,] channel_b): each channel's correlation, mean over folds;
        ``predictivity`` ([ridge]): its median over b's channels (the summary of neural-predictivity
        benchmarks); ``predictivity_per_fold`` ([ridge,] fold): the median per fold;
        ``predictivity_per_fold_channel`` ([ridge,] fold, channel_b): each fold's correlation per channel.
        With ``ridge=0`` and a singular training covariance of a, the least-squares solution of least norm
        (the limit of ridge → 0).
        A correlation undefined in a fold (the channel, or its prediction, constant there: a dead unit) is
        NaN there and left out of the means over folds and of the medians over channels, with a warning.
    """
    names, folds = fold_names(folds)
    _check_folds(folds, "predictivity", names)
    ridges = SolveOptions(ridge=ridge).ridges
    p = folds[0].sizes[0]
    scores = np.zeros((len(ridges), len(folds), folds[0].sizes[1]))
    for fold, left_in in enumerate(_leave_outs(folds)):
        train = _covariance(left_in, "predictivity", batched=False)
        test = folds[fold].covariance()
        c_aa, c_ab = train[:p, :p], train[:p, p:]
        scale = mean_variance(c_aa, np.abs(left_in.mean[:p]), left_in.value_rounding[0])
        for r, value in enumerate(ridges):
            weights = (np.linalg.lstsq(c_aa + value * scale * np.eye(p), c_ab, rcond=None)[0]
                       if value > 0 else _least_squares(c_aa, c_ab))
            cross = np.einsum("ij,ij->j", weights, test[:p, p:])
            spread = np.sqrt(np.einsum("ij,ik,kj->j", weights, test[:p, :p], weights) * np.diag(test[p:, p:]))
            scores[r, fold] = np.divide(cross, spread, out=np.full_like(cross, np.nan), where=spread > 0)
    _warn_undefined(scores, 1, "predictivity", "a channel of b, or its prediction,", names)
    per_channel = _of_defined(np.nanmean, scores, 1)
    result = _with_layers(xr.Dataset(
        {"predictivity_per_channel": (("ridge", "channel_b"), per_channel,
                                      {"long_name": "held-out Pearson r of ridge predictions, mean over folds"}),
         "predictivity": ("ridge", _of_defined(np.nanmedian, per_channel, -1),
                          {"long_name": "median over channels of the held-out prediction correlation"}),
         "predictivity_per_fold": (("ridge", "fold"), _of_defined(np.nanmedian, scores, -1)),
         "predictivity_per_fold_channel": (("ridge", "fold", "channel_b"), scores),
         "rows": ((), np.int64(sum(part.n for part in folds)), ROWS_ATTRS)},
        coords={"ridge": list(ridges), "fold": names,
                **{key: value for key, value in _channel_coords(*folds).items() if key == "channel_b"}},
        attrs={"measure": "predictivity", "folds": len(folds)}), *folds)
    return result if isinstance(ridge, (list, tuple, np.ndarray)) else result.squeeze("ridge")


def _least_squares(c_aa: np.ndarray, c_ab: np.ndarray) -> np.ndarray:
    """``B`` of ``C_aa B = C_ab`` (p, p) · (p, q): for a non-singular ``C_aa`` solved with each channel scaled to
    unit spread (the same B; lstsq's cutoff, relative to the largest singular value, dropped a channel in units of
    1e-9 unscaled), for a singular one the solution of least norm, the limit of the ridge going to 0."""
    spread = np.sqrt(np.diag(c_aa))
    unit = np.divide(1.0, spread, out=np.ones(len(spread)), where=spread > 0)
    scaled, rank = np.linalg.lstsq(unit[:, None] * c_aa * unit, unit[:, None] * c_ab, rcond=None)[:3:2]
    # a dead (constant) channel is no singularity here: its row and column are 0 and its weight 0 either way
    live = np.count_nonzero(spread > 0)
    return unit[:, None] * scaled if rank == live else np.linalg.lstsq(c_aa, c_ab, rcond=None)[0]


def jackknife(full: Any, leave_outs: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-fold-out jackknife: the standard error ``sqrt((K − 1)/K · Σ (θ₍ᵢ₎ − θ̄)²)`` of a measure θ from
    its K leave-one-out values θ₍ᵢ₎ (first axis), and the interval ``θ ± t · SE`` around the full-data value,
    t the Student quantile of ``(1 + confidence)/2`` with K − 1 degrees of freedom (last axis: lower, upper).
    Where θ is undefined (NaN) so is its error: the leave-outs may agree on a value θ lacks."""
    from scipy.stats import t as student

    leave_outs = np.asarray(leave_outs, dtype=np.float64)
    folds = leave_outs.shape[0]
    spread = np.sqrt((folds - 1) / folds * ((leave_outs - leave_outs.mean(axis=0)) ** 2).sum(axis=0))
    spread = np.where(np.isnan(np.asarray(full, dtype=np.float64)), np.nan, spread)
    half = student.ppf((1 + confidence) / 2, folds - 1) * spread
    return spread, np.stack([np.asarray(full) - half, np.asarray(full) + half], axis=-1)


class PairSolves:
    """The solves of one pair's Moments under one [`SolveOptions`][chunkcca.options.SolveOptions], each done once.

    ``cca`` is shared: mean_cca, r2_cca and pwcca of one pair use one CCA solve. ``folds`` (each fold's
    Moments, whose merge is ``moments``) serve the held-out measures and the jackknife.
    """

    def __init__(self, moments: Moments, options: SolveOptions, folds: Folds | None = None) -> None:
        self.moments, self.options, self.folds = moments, options, folds
        self._results: dict[str, xr.Dataset] = {}

    @functools.cached_property
    def cca(self) -> xr.Dataset:
        return cca_from_moments(self.moments, epsilon=self.options.epsilon)

    def result(self, measure: str) -> xr.Dataset:
        """The full result of ``measure`` (a name in [`MEASURES`][chunkcca.measures.MEASURES]) on this pair."""
        if measure not in self._results:
            self._results[measure] = MEASURES[measure].solve(self)
        return self._results[measure]

    def value(self, measure: str) -> Any:
        """The scalar that ``measure`` reports (per frequency for batched Moments: their mean)."""
        return self.result(measure)[MEASURES[measure].value].values

    def leave_outs(self, measure: str) -> np.ndarray:
        """``measure``'s value with each fold left out in turn (first axis: fold), for the jackknife. A measure of
        held-out folds averages its per-fold values (then, with ``per_fold_summary``, summarises them over units,
        e.g. the median over channels), so its leave-one-out values do the same over the other folds, of the folds
        with a defined value (NaN for all when fewer than 2 have one)."""
        declared = MEASURES[measure]
        if declared.per_fold is not None:
            per_fold = self.result(measure)[declared.per_fold]
            values = np.moveaxis(per_fold.values, per_fold.dims.index("fold"), 0)
            # a fold with no defined value is in no mean over folds: it is not one of the jackknife's K either
            # (its leave-out would be the full value, narrowing the interval)
            values = values[~np.isnan(values).reshape(len(values), -1).all(axis=1)]
            if len(values) < 2:  # no spread to estimate: NaN, summarised as the values would be
                undefined = np.full((2, *values.shape[1:]), np.nan)
                return undefined if declared.per_fold_summary is None else declared.per_fold_summary(undefined)
            defined = ~np.isnan(values)  # the means over folds are of the defined values (_of_defined)
            known = np.where(defined, values, 0.0)
            others = np.divide(known.sum(axis=0) - known, defined.sum(axis=0) - defined,
                               out=np.full(values.shape, np.nan), where=defined.sum(axis=0) - defined > 0)
            return others if declared.per_fold_summary is None else declared.per_fold_summary(others)
        values = []
        for fold, solves in enumerate(self._left_out):
            try:
                values.append(solves.value(measure))
            except UndefinedMeasure as error:
                raise UndefinedMeasure(f"the jackknife of {measure} needs it with each fold left out in turn, and "
                                       f"without fold {fold_names(self.folds)[0][fold]!r} it is undefined: "
                                       f"{error}") from None
        return np.stack(values)

    @functools.cached_property
    def _left_out(self) -> list[PairSolves]:
        """The solves of every fold but one, one per fold, shared by every measure's jackknife (one CCA each)."""
        return [PairSolves(train, self.options) for train in _leave_outs(fold_names(self.folds)[1])]

    def needed_folds(self, measure: str) -> Folds:
        if self.folds is None:
            raise ValueError(f"{measure} needs folds: pass folds=K (--folds K), K >= 2")
        return self.folds


@dataclass(frozen=True)
class Measure:
    """One measure, declared as data.

    Attributes
    ----------
    name
        Its name everywhere: Python, [`chunkcca.compare()`][chunkcca.compare],
        [`chunkcca.similarity()`][chunkcca.similarity], the CLI.
    solve
        The full result (an ``xarray.Dataset``) from a pair's ``PairSolves``.
    value
        The variable of that result holding the scalar the measure reports.
    description
        What the scalar is, in a few words (the ``long_name`` of compare's and similarity's variables).
    options
        The [`SolveOptions`][chunkcca.options.SolveOptions] fields it reads.
    row_norms
        It needs the Moments' row-norm sums (computed only when a measure asks).
    per_frequency
        It works on the per-frequency (batched, complex) Moments of ``spatial="dft"``.
    canonical
        It is a CCA-family measure: [`chunkcca.compare()`][chunkcca.compare] adds the canonical correlations ``rho``.
    details
        Other variables of the result that [`chunkcca.compare()`][chunkcca.compare] reports (see ``detail_name``).
    per_fold
        For a measure of held-out folds (it needs ``folds``): the variable holding its value per fold (first or
        only dim ``fold`` after any ``ridge``), averaged over folds to give the measure.
    per_fold_summary
        With ``per_fold`` values per fold and unit (last axis, e.g. channel): what summarises the fold means
        over units (the median of predictivity).
    whitens
        It inverts (part of) a covariance, so float32 products lose its weak directions on an ill-conditioned layer
        (``precision="auto"`` then takes float64), and no more rows than channels is warned of; CKA and Procrustes
        invert none. A function of the solve options, which decide for some (the shape metric at alpha = 1 inverts
        none).
    directions
        Its value rests on the canonical directions themselves (PWCCA's weights), which float32 products move by
        their rounding over the gap between neighbouring correlations, however well conditioned the layers
        (2.8e-5 on a pair whose last two correlations are 3.4e-4 apart, condition number 129, found by audit):
        ``precision="auto"`` takes float64 products.
    from_cca
        Its value comes from the CCA of all channels (``PairSolves.cca``), whose ranks
        [`chunkcca.similarity()`][chunkcca.similarity] reports (components beyond them are 0 and count in it).
    least_rows
        The rows it needs, checked before the pass (a pair's and each group's): 2, 4 for the unbiased HSIC.
    units
        The units of its value, where it has any (the shape metric's radians).
    """

    name: str
    solve: Callable[[PairSolves], xr.Dataset]
    value: str
    description: str
    options: tuple[str, ...] = ()
    row_norms: bool = False
    per_frequency: bool = False
    canonical: bool = False
    details: tuple[str, ...] = ()
    per_fold: str | None = None
    per_fold_summary: Callable[[np.ndarray], np.ndarray] | None = None
    whitens: Callable[[SolveOptions], bool] = lambda solve: True
    directions: bool = False
    from_cca: bool = False
    least_rows: int = 2
    units: str | None = None

    @property
    def attrs(self) -> dict[str, str]:
        """The attrs of its value in a result: its ``description`` as ``long_name``, and its ``units`` if any."""
        return {"long_name": self.description, **({"units": self.units} if self.units else {})}

    def detail_name(self, detail: str) -> str:
        """The name [`compare()`][chunkcca.compare] gives a detail: ``<measure>_<detail>``, or the detail's own
        when it names the measure already (``heldout_rho``)."""
        return detail if detail.startswith(self.name.split("_")[0] + "_") else f"{self.name}_{detail}"


#: Every measure, by name, in the order they are documented.
MEASURES: dict[str, Measure] = {measure.name: measure for measure in (
    Measure("mean_cca", lambda pair: pair.cca, "rho_mean", "mean canonical correlation", ("epsilon",),
            per_frequency=True, canonical=True, from_cca=True),
    Measure("r2_cca", lambda pair: pair.cca, "r2_cca", "mean squared canonical correlation (R²_CCA)", ("epsilon",),
            per_frequency=True, canonical=True, from_cca=True),
    Measure("svcca", lambda pair: _svcca(pair.moments, pair.options.keep, pair.options.keep_by, pair.options.epsilon,
                                         lambda: _told_as_svcca(lambda: pair.cca)),  # told as SVCCA's if solved here
            "rho_mean", "SVCCA similarity (mean canonical correlation of the kept directions)",
            ("epsilon", "keep", "keep_by"), canonical=True, details=("dims_a", "dims_b", "rho")),
    Measure("pwcca", lambda pair: pwcca_from_moments(pair.moments, epsilon=pair.options.epsilon, solved=pair.cca),
            "pwcca", "projection-weighted mean canonical correlation", ("epsilon",), canonical=True, from_cca=True,
            directions=True),
    Measure("cka", lambda pair: cka_from_moments(pair.moments), "cka", "linear CKA", whitens=lambda solve: False),
    Measure("cka_debiased", lambda pair: cka_from_moments(pair.moments, debiased=True), "cka",
            "linear CKA (debiased)", row_norms=True, whitens=lambda solve: False, least_rows=4),
    Measure("procrustes", lambda pair: procrustes_from_moments(pair.moments), "procrustes",
            "orthogonal Procrustes distance", whitens=lambda solve: False),
    Measure("shape", lambda pair: shape_metric_from_moments(pair.moments, alpha=pair.options.alpha),
            "shape_distance", "angular shape distance", ("alpha",), whitens=lambda solve: solve.alpha < 1,
            units="radians"),
    Measure("heldout_cca", lambda pair: heldout_cca_from_folds(pair.needed_folds("heldout_cca"),
                                                              epsilon=pair.options.epsilon),
            "heldout_cca", "mean held-out canonical correlation", ("epsilon",), details=("heldout_rho",),
            per_fold="heldout_cca_per_fold"),
    Measure("predictivity", lambda pair: predictivity_from_folds(pair.needed_folds("predictivity"),
                                                                ridge=pair.options.ridge),
            "predictivity", "median held-out correlation of ridge predictions a → b", ("ridge",),
            details=("predictivity_per_channel",), per_fold="predictivity_per_fold_channel",
            per_fold_summary=functools.partial(_of_defined, np.nanmedian, axis=-1)),
)}


def is_result_name(name: Any) -> bool:
    """Whether ``name`` is one that chunkcca's results may give a dim, coordinate or variable (a group's coordinate
    named so would be taken for it): the measures' values and details, their jackknife error bars, a DFT's
    frequencies (``freq_<position>``) and the rest; not ``fold``, which only folds give, never beside groups."""
    per_measure = {name for measure in MEASURES.values()
                   for name in (measure.name, measure.value, measure.per_fold, f"{measure.name}_se",
                                f"{measure.name}_ci", f"{measure.name}_component", *measure.details,
                                *map(measure.detail_name, measure.details)) if name is not None}
    others = {"layer_a", "layer_b", "channel_a", "channel_b", "component", "rho", "coef_a", "coef_b", "pruned_a",
              "pruned_b", "rank_a", "rank_b", "rows", "rho_mean", "rho_freq_mean", "weights", "tied", "side",
              "similarity", "bound", "ridge", "predictivity_per_fold", "minibatches", "rows_left_out"}
    return isinstance(name, str) and (name in per_measure | others or name.startswith("freq_"))


@dataclass(frozen=True)
class Needs:
    """What a run's measures need of its pass and its rows, read off their ``Measure`` entries (``of``).

    Attributes
    ----------
    row_norms
        The Moments' row-norm sums (debiased CKA).
    whitens
        A covariance inverted: no more rows than a pair's channels is warned of.
    least_rows
        The rows a solve needs at least (2; 4 for debiased CKA; 0 for Moments only, which one row may make).
    held_out
        The held-out measures asked for, which test on each fold: each needs 2 rows in every fold.
    directions
        A measure rests on the canonical directions (``Measure.directions``): ``precision="auto"`` takes float64
        products.
    """

    row_norms: bool = False
    whitens: bool = True
    least_rows: int = 2
    held_out: tuple[str, ...] = ()
    directions: bool = False

    @classmethod
    def of(cls, names: Sequence[str], *, sweep: bool = False, solve: SolveOptions | None = None) -> Needs:
        """What the measures ``names`` need with the solve options ``solve``; for a ``sweep``, 2 rows (a measure its
        rows cannot give is NaN there, with a warning, beside the others)."""
        measures, solve = [MEASURES[name] for name in names], solve or SolveOptions()
        whitens = any(m.whitens(solve) for m in measures)
        return cls(row_norms=any(m.row_norms for m in measures), whitens=whitens,
                   least_rows=2 if sweep else max(m.least_rows for m in measures),
                   held_out=tuple(m.name for m in measures if m.per_fold is not None),
                   directions=any(m.directions for m in measures))


def check_measures(measures: Any, *, batched: bool = False, where: str | None = None) -> tuple[str, ...]:
    """``measures`` as a tuple of known names, at least one and none twice; with ``batched`` (per-frequency
    Moments) only measures that work per frequency. A ValueError naming the measure (or ``where``, the function
    computing it) at fault."""
    if not isinstance(measures, Iterable):  # None gave "'NoneType' object is not iterable"
        raise TypeError(f"measures must be a measure's name or a list of them, got {type(measures).__name__}; "
                        f"choose from {', '.join(MEASURES)}")
    names = (measures,) if isinstance(measures, str) else tuple(measures)
    if not names:
        raise ValueError(f"no measure given; choose one or more from {', '.join(MEASURES)}")
    unknown = [name for name in names if name not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measure {unknown[0]!r}; choose from {', '.join(MEASURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"measures {names!r} name a measure twice")
    if batched:
        flat = [name for name in names if not MEASURES[name].per_frequency]
        if flat:
            offered = ", ".join(name for name, measure in MEASURES.items() if measure.per_frequency)
            raise ValueError(f"{where or flat[0]} does not work per spatial frequency (spatial='dft'); with "
                             f"spatial='dft' "
                             f"choose from {offered}, or use spatial='flatten', 'avgpool' or 'interp' (--spatial)")
    return names
