"""Drop-in replacements for google/svcca's functions, streamed.

``get_cca_similarity`` takes the same arguments in the same order, the same
(neurons, datapoints) layout and returns the same dict keys with the same meaning as
``cca_core.get_cca_similarity`` of google/svcca, but accepts numpy or Dask arrays and
streams them chunk by chunk: the covariance comes from [`Moments`][chunkcca.Moments],
then the reference's own small solve is repeated on it (max-abs rescaling, pruning of
neurons whose rescaled variance is below ``epsilon``, ``+ epsilon·I``, ``pinv``, an ``eigh``
square root, SVD), so results agree to rounding, and mostly signs of directions too: a direction is unique
only up to sign, and LAPACK chooses it from the matrix's rounding, which differs from the reference's
``np.cov`` (where a side has a constant or dependent neuron, exact zeros stand for its rounding; on other data
too, in some matrices: 1 in 200 to 400 random cases measured); the correlations agree whatever the signs.

Where the reference fails, this module does the evident intended thing:

- every neuron pruned (or a side with zero variance): the reference raises a ValueError
  while unpacking; here the reference's intended zero result (``create_zero_dict``) is returned;
- ``compute_dirns=True`` with ``compute_coefs=False``: the reference raises ``KeyError: 'full_coef_x'``;
  here the directions are computed (the coefficient keys stay out of the result);
- tiny negative eigenvalues of the pseudo-inverse (rounding) are taken as 0 in the square
  root rather than giving NaN;
- ``threshold=0``: the reference averages an empty list (NaN); here ``mean`` is the top coefficient;
- complex input with ``compute_coefs=True``: the reference cannot place complex coefficients
  into its float arrays (TypeError); here the ``full_*`` arrays are complex;
- canonical correlations above 1 by rounding of the pinv square root (up to 1 + 1e-4 measured, where the
  exact value is 1: a side with as many neurons as datapoints) are set to 1 (the reference returns them);
  above 1 + ``RHO_TOLERANCE`` (1e-3) the solve broke down (the reference gave 2066.9 on collinear neurons at
  ``epsilon=1e-10``), and a ValueError says so.

``compute_pwcca`` returns what google/svcca's ``pwcca.compute_pwcca`` returns, its own weighting
included, computed exactly from the streamed statistics; where its else branch indexes ``acts1``
with ``y_idxs`` (a crash or a wrong result when ``acts2`` has fewer neurons), ``acts2`` is used.

``fourier_ccas`` gives what google/svcca's ``dft_ccas.fourier_ccas`` intends; the published
function does not run on Python 3 at all (see its docstring for each difference).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ._stack import user_stacklevel
from .api import compute_moments
from .engine import NonFiniteError
from .layers import as_activations, unnamed_layout
from .measures import NONFINITE_STATISTICS, WHITENING_CONDITION, IllConditionedWarning
from .moments import Moments
from .options import (
    MEMORY_LIMIT,
    PRECISIONS,
    ProductPrecision,
    StreamOptions,
    check_choice,
    check_epsilon,
    check_number,
)
from .passes import stream_layers
from .rows import plan_adapters


def _as_layer(acts: Any, name: str, axes: tuple[str, ...] = ("channel", "datapoint"),
              layout: str = "(neurons, datapoints)") -> xr.DataArray:
    """Input of google/svcca's ``layout`` (``axes``, by default (neurons, datapoints)) → a validated layer
    (datapoint, …, channel) named ``name``, chunked by datapoint. As google/svcca's, the axes are taken by
    position, a DataArray's too (its dims' names are not read), and no other layout is guessed."""
    if isinstance(acts, xr.DataArray):  # its dims by position, lazily (a file's array is not read here)
        acts = acts.drop_vars(list(acts.coords)).rename(None)
        acts = acts.rename(dict(zip(acts.dims, (f"_axis{i}" for i in range(acts.ndim)))))
        acts = acts.rename(dict(zip(acts.dims, axes))) if acts.ndim == len(axes) else acts
    if not hasattr(acts, "ndim") or acts.ndim != len(axes):
        got = (f"shape {tuple(acts.shape)}" if hasattr(acts, "shape")
               else f"a {type(acts).__name__}; give a numpy or Dask array (np.asarray)")
        raise ValueError(f"{name} must be a {len(axes)}-d array {layout}, got {got}")
    return as_activations(acts, name, dims=axes, allow_complex=True)


def _check_threshold(threshold: Any) -> None:
    """google/svcca's ``threshold``: a number in [0, 1] (None or text: a ValueError naming it)."""
    check_number("threshold", threshold, 0.0, 1.0)


def _matrix_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix through ``eigh``."""
    values, vectors = np.linalg.eigh(matrix)
    return np.dot(vectors, np.dot(np.diag(np.sqrt(np.clip(values, 0, None))), np.conj(vectors).T))


def _check_switches(**switches: Any) -> None:
    """google/svcca's on/off arguments, which it reads with ``if``: True/False, 0/1 (``verbose=0`` as its
    tutorials pass it) or None (off); anything else ("no", which ``if`` takes as on) is a TypeError naming the
    argument."""
    for name, value in switches.items():
        if not (value is None or isinstance(value, (bool, np.bool_))
                or (isinstance(value, (int, np.integer)) and value in (0, 1))):
            raise TypeError(f"{name} must be True or False (or 1 or 0, or None for off), got {value!r}")


def _check(epsilon: Any, precision: Any) -> None:
    """Before any work: ``epsilon`` and a precision of ``PRECISIONS`` (google/svcca's functions have no "auto")."""
    check_epsilon(epsilon)
    check_choice("precision", precision, PRECISIONS)


def _options(epsilon: Any, precision: Any, scheduler: Any, memory_limit: Any, progress: bool = False) -> StreamOptions:
    """A compat function's streaming options, checked (``_check``) before any work."""
    _check(epsilon, precision)
    return StreamOptions(precision=precision, scheduler=scheduler, progress=progress, memory_limit=memory_limit)


@contextmanager
def _finite_only() -> Iterator[None]:
    """NaN or Inf in the activations an error, as in google/svcca, whose functions take no ``nan_policy``."""
    try:
        yield
    except NonFiniteError as error:
        raise NonFiniteError(f"{error.layer} holds NaN or Inf at {{datapoint}}: the google/svcca-compatible functions "
                             f"take finite values (chunkcca.cca(..., nan_policy='omit') and the other measures leave "
                             f"such datapoints out)", error.position, error.layer, error.label) from None


def _stream_neurons_first(acts1: Any, acts2: Any, options: StreamOptions) -> Moments:
    """Validate google/svcca-layout inputs (neurons, datapoints) and stream their Moments."""
    if getattr(acts1, "ndim", None) == 2 and acts1.shape[0] >= acts1.shape[1]:  # the reference asserts acts1 only
        raise ValueError(f"acts1 has shape {tuple(acts1.shape)}: input must be (neurons, datapoints) "
                         f"with fewer neurons than datapoints")
    layers = (_as_layer(acts1, "acts1"), _as_layer(acts2, "acts2"))
    if layers[0].shape[0] != layers[1].shape[0]:
        raise ValueError(f"acts1 has {layers[0].shape[0]} datapoints but acts2 has {layers[1].shape[0]}; "
                         f"they must match")
    with _finite_only():
        return stream_layers(layers, plan_adapters(*layers, options), options).moments


def _threshold_index(rho: np.ndarray, threshold: float) -> int:
    """Smallest n >= 1 whose top-n coefficients hold ``threshold`` of their sum (all if none), each partial sum
    summed as the reference's ``sum_threshold`` sums it (``np.sum(rho[:n])``, pairwise: a running sum differs in
    its last bit, which moved ``mean`` by one coefficient at a threshold within rounding of a partial sum)."""
    total = np.sum(rho)
    if total <= 0:
        return rho.size
    return next((n for n in range(1, rho.size) if np.sum(rho[:n]) / total >= threshold), rho.size)


def _zero_result(compute_dirns: bool, datapoints: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "mean": (np.asarray(0), np.asarray(0)),
        "sum": (np.asarray(0), np.asarray(0)),
        "cca_coef1": np.asarray(0),
        "cca_coef2": np.asarray(0),
        "idx1": 0,
        "idx2": 0,
    }
    if compute_dirns:
        result["cca_dirns1"] = np.zeros((1, datapoints))
        result["cca_dirns2"] = np.zeros((1, datapoints))
    return result


def _mean_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype numpy.mean gives for ``dtype`` (float64 for integers)."""
    return np.dtype(dtype) if np.issubdtype(dtype, np.inexact) else np.dtype(np.float64)


def _as_mean(means: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Neuron means in the dtype numpy.mean gives for activations of ``dtype``: real for a real side, whose means
    are complex (imaginary part 0) when the other side is complex."""
    target = _mean_dtype(dtype)
    return (means if np.issubdtype(target, np.complexfloating) else means.real).astype(target)


def get_cca_similarity(acts1: Any, acts2: Any, epsilon: float = 0.0, threshold: float = 0.98,
                       compute_coefs: bool = True, compute_dirns: bool = False, verbose: bool = True,
                       *, precision: ProductPrecision = "float64", scheduler: Any = None,
                       memory_limit: int | str = MEMORY_LIMIT) -> dict[str, Any]:
    """google/svcca's ``get_cca_similarity``, streamed.

    Parameters
    ----------
    acts1, acts2
        numpy or Dask arrays (neurons1, datapoints), (neurons2, datapoints); fewer neurons
        than datapoints.
    epsilon, threshold, compute_coefs, compute_dirns, verbose
        As in the reference. ``verbose`` prints the steps and a progress bar while streaming.
    precision
        dtype of the per-chunk products; "float64" (default) matches the reference's
        ``np.cov`` to rounding, "float32" is faster.
    scheduler
        Dask scheduler (default: the active one).
    memory_limit
        Budget for what the pass holds at once (default "1.5GiB"): (p + q + 2) · (p + q) float64 values per
        chain of folds (one per core locally), p and q the neurons, with the chunks in work; checked before
        streaming.

    Returns
    -------
    dict
        The reference's keys: ``coef_x``, ``invsqrt_xx``, ``full_coef_x``, ``full_invsqrt_xx``
        (and ``_y``), ``neuron_means1``/``2`` (neurons, 1) in the input dtype,
        ``cca_coef1``/``2``, ``x_idxs``/``y_idxs``, ``mean`` and ``sum`` tuples, and
        ``cca_dirns1``/``2`` (neurons, datapoints) with ``compute_dirns`` (a lazy Dask array
        for Dask input).
    """
    _check_threshold(threshold)
    _check_switches(compute_coefs=compute_coefs, compute_dirns=compute_dirns, verbose=verbose)
    # verbose=0 or 1 as the reference takes it (``if verbose``)
    options = _options(epsilon, precision, scheduler, memory_limit, progress=bool(verbose))
    if verbose:
        print("streaming covariance")
    stats = _stream_neurons_first(acts1, acts2, options)
    solved = _solve(stats, epsilon, threshold, verbose)
    if solved is None:
        return _zero_result(compute_dirns, stats.n)
    neuron_means1, neuron_means2 = (_as_mean(solved.pop(key), acts.dtype)
                                    for key, acts in (("neuron_means1", acts1), ("neuron_means2", acts2)))
    result: dict[str, Any] = {}
    if compute_coefs:
        result.update({key: solved[key] for key in COEF_KEYS}, neuron_means1=neuron_means1,
                      neuron_means2=neuron_means2)
    result.update({key: solved[key] for key in SUMMARY_KEYS})
    if compute_dirns:
        result["cca_dirns1"] = _directions(acts1, solved["full_coef_x"] @ solved["full_invsqrt_xx"], neuron_means1)
        result["cca_dirns2"] = _directions(acts2, solved["full_coef_y"] @ solved["full_invsqrt_yy"], neuron_means2)
    return result


COEF_KEYS = ("coef_x", "invsqrt_xx", "full_coef_x", "full_invsqrt_xx",
             "coef_y", "invsqrt_yy", "full_coef_y", "full_invsqrt_yy")
SUMMARY_KEYS = ("cca_coef1", "cca_coef2", "x_idxs", "y_idxs", "mean", "sum")


#: Canonical correlations above 1 by at most this are the rounding of the reference's pinv square root, and are
#: set to 1: with epsilon=1e-10 or 1e-6 and a side of as many neurons as datapoints (exactly 1) both the reference
#: and chunkcca gave up to 1 + 1e-4 (1e-6 raised for most seeds). Above it the solve broke down (2066.9 on
#: collinear neurons at epsilon=1e-10).
RHO_TOLERANCE = 1e-3


def _solve(stats: Moments, epsilon: float, threshold: float, verbose: bool = False) -> dict[str, Any] | None:
    """The reference's rescaling, pruning and solve on the covariance of ``stats``, step for step.

    Same matrices, so the same singular vectors and signs. Returns every key of the reference
    (neuron means as (neurons, 1) float64/complex128), or None where it gives its zero result.
    """
    numx = stats.sizes[0]
    cov = stats.covariance(ddof=1)
    if not np.isfinite(cov).all():  # values near 1e154 or more: it gave the zero result with a RuntimeWarning
        raise ValueError(NONFINITE_STATISTICS + "; the measures do not change with a layer's scale: divide it by a "
                         "large factor")
    sigma_xx, sigma_xy = cov[:numx, :numx].copy(), cov[:numx, numx:].copy()
    sigma_yy = cov[numx:, numx:].copy()
    xmax, ymax = np.max(np.abs(sigma_xx)), np.max(np.abs(sigma_yy))
    if xmax == 0 or ymax == 0:
        return None
    sigma_xx /= xmax
    sigma_yy /= ymax
    sigma_xy /= np.sqrt(xmax * ymax)
    x_idxs = np.abs(np.diagonal(sigma_xx)) >= epsilon
    y_idxs = np.abs(np.diagonal(sigma_yy)) >= epsilon
    if not x_idxs.any() or not y_idxs.any():
        return None
    sigma_xx = sigma_xx[np.ix_(x_idxs, x_idxs)] + epsilon * np.eye(x_idxs.sum())
    sigma_yy = sigma_yy[np.ix_(y_idxs, y_idxs)] + epsilon * np.eye(y_idxs.sum())
    sigma_xy = sigma_xy[np.ix_(x_idxs, y_idxs)]
    if verbose:
        print("adding eps to diagonal and taking inverse")
    _warn_ill_conditioned(sigma_xx, sigma_yy, stats.layers, stats.n)
    invsqrt_xx = _matrix_sqrt(np.linalg.pinv(sigma_xx))
    invsqrt_yy = _matrix_sqrt(np.linalg.pinv(sigma_yy))
    if verbose:
        print("taking final svd")
    u, s, v = np.linalg.svd(np.dot(invsqrt_xx, np.dot(sigma_xy, invsqrt_yy)))
    s = np.abs(s)
    if s.size and s[0] > 1 + RHO_TOLERANCE:
        raise ValueError(f"canonical correlation {s[0]:.6g} > 1 at epsilon={epsilon:g}: a side's covariance is "
                         f"singular to rounding (duplicate or collinear neurons) and epsilon too small to regularise "
                         f"it, so the reference's pinv square root gives numbers without meaning; raise epsilon, or "
                         f"use chunkcca.cca, which counts the rank")
    s = np.minimum(s, 1.0)  # rounding above 1 (RHO_TOLERANCE)
    idx = _threshold_index(s, threshold)
    return {
        "coef_x": u.T, "invsqrt_xx": invsqrt_xx,
        "full_coef_x": _scatter_block(u.T, x_idxs), "full_invsqrt_xx": _scatter_block(invsqrt_xx, x_idxs),
        "coef_y": v, "invsqrt_yy": invsqrt_yy,
        "full_coef_y": _scatter_block(v, y_idxs), "full_invsqrt_yy": _scatter_block(invsqrt_yy, y_idxs),
        "neuron_means1": stats.mean[:numx].reshape(-1, 1), "neuron_means2": stats.mean[numx:].reshape(-1, 1),
        "cca_coef1": s, "cca_coef2": s, "x_idxs": x_idxs, "y_idxs": y_idxs,
        "mean": (np.mean(s[:idx]), np.mean(s[:idx])), "sum": (np.sum(s), np.sum(s)),
    }


#: The relative cut of ``np.linalg.pinv`` (its ``rcond``): directions below it are dropped, the rest inverted.
PINV_CUT = 1e-15
#: Of a side with more neurons than datapoints less one, whose covariance is singular and made invertible by
#: epsilon alone, the condition number past which its correlations are warned of: they rest on rounding amplified
#: about as its square (120 neurons on 100 datapoints, found by audit: 1e-8 off at 3e5, epsilon 1e-5; 4e-6 at 3e6;
#: 7e-4 at 3e7, where the reference's route is 3.5e-4 off).
SINGULAR_CONDITION = 1e5


def _warn_ill_conditioned(sigma_xx: np.ndarray, sigma_yy: np.ndarray, layers: tuple[str, ...], rows: int) -> None:
    """Warn (``IllConditionedWarning``) of a side whose covariance, as the reference's pinv inverts it (directions
    below ``PINV_CUT`` of the largest dropped), has a condition number above ``WHITENING_CONDITION``: its pinv
    square root, and the correlations resting on its weakest directions, are then known to about that number x
    1e-16 only (3e-4 off at 1e14, where the reference's own route is as far off or fails; ``chunkcca.cca``, which
    whitens through the correlation matrix, is exact there). A side of more neurons than ``rows`` less one has a
    singular covariance, which only epsilon makes invertible: warned of above ``SINGULAR_CONDITION``."""
    for side, sigma in enumerate((sigma_xx, sigma_yy)):
        values = np.linalg.eigvalsh(sigma)
        inverted = values[values > PINV_CUT * values[-1]]
        condition = values[-1] / inverted[0] if inverted.size else 1.0
        name = f"acts{side + 1}" + (f" (layer {layers[side]!r})" if len(layers) > side and layers[side] else "")
        if sigma.shape[0] > rows - 1 and condition > SINGULAR_CONDITION:
            warnings.warn(f"{name}: its {sigma.shape[0]} neurons outnumber the {rows} datapoints less one, so its "
                          f"covariance is singular and epsilon alone makes it invertible, with a condition number of "
                          f"about 1e{round(np.log10(condition))}: the canonical correlations rest on rounding "
                          f"amplified about as its square (7e-4 off at 3e7; the reference's route is as far off); "
                          f"a larger epsilon bounds it, and chunkcca.cca counts the rank", IllConditionedWarning,
                          stacklevel=user_stacklevel())
        elif condition > WHITENING_CONDITION:
            warnings.warn(f"{name}: its covariance, as the reference's pinv inverts it, has a condition number of "
                          f"about 1e{round(np.log10(condition))} (neurons on scales far apart, or near-duplicates): "
                          f"its square root, and the canonical correlations resting on its weakest directions, are "
                          f"known to about that number x 1e-16 only; chunkcca.cca gives them exactly whatever the "
                          f"neurons' scales, and epsilon > 0 bounds it", IllConditionedWarning,
                          stacklevel=user_stacklevel())


def _scatter_block(block: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``block`` (k, k) placed at the kept rows and columns of a zero (n, n) matrix, as np.place does."""
    full = np.zeros((kept.size, kept.size), dtype=block.dtype)
    full[np.ix_(kept, kept)] = block
    return full


def compute_pwcca(acts1: Any, acts2: Any, epsilon: float = 0.0, *, precision: ProductPrecision = "float64",
                  scheduler: Any = None, memory_limit: int | str = MEMORY_LIMIT) -> tuple[Any, np.ndarray, np.ndarray]:
    """google/svcca's ``compute_pwcca``, streamed: ``(pwcca, weights, coefs)`` as the reference returns them.

    The reference forms "directions" ``D = coef · (acts − μ) + μ`` on the side with fewer kept
    neurons (``coef`` from its SVD, μ its neuron means in the input dtype), orthonormalises them
    with a QR (``D = P R``) and weights direction i by ``Σⱼ |Pᵢᵀ actsⱼ|``. All of it follows
    from the statistics: ``D = C X̃ + w 1ᵀ`` with ``X̃`` the centred activations (``X̃ 1 = 0``, scatter
    ``M``) and ``w = C (μ_true − μ) + μ``, so ``Dᵀ = [1/√n, Q_A] S`` with ``S = [√n wᵀ; F]``, ``FᵀF = C M Cᵀ``
    and ``Q_A`` orthonormal, orthogonal to ``1``; the QR of the small ``S`` (in column order) gives the
    reference's ``P`` up to signs, which the absolute value removes, and ``Pᵀ actsᵀ`` is ``Q_Sᵀ [√n μᵀ; Q_Aᵀ X̃ᵀ]``,
    the means apart from the spread, as the reference's QR keeps them (through ``DᵀD`` they were squared: means
    1e7 times the spread lost directions to rounding). The
    result depends on the SVD's signs exactly as the reference's does, and they mostly agree as the same matrix
    is decomposed; but a direction is unique only up to sign and LAPACK picks it from the matrix's rounding,
    which differs from the reference's (about 1e-15) and with the chunking: then a sign flips and the weights
    move, the reference's own too when its datapoints are reordered. At ``epsilon=0`` with a constant (dead)
    neuron, or with more neurons on the two sides than datapoints (many ρ of 1), often (by up to 0.14 in a test
    of 30 seeds with a dead ReLU unit; at ``epsilon=1e-10`` they agreed to 1e-14); on ordinary data in 1 of 200
    to 400 random cases measured (1e-3 and 0.02 in two). The reference's weighting is not defined there:
    [`chunkcca.pwcca`][chunkcca.pwcca], whose weights come from the canonical variates, does not depend on
    signs. With every neuron pruned the reference fails; here the
    result is ``(0.0, empty weights, 0)``.

    Parameters
    ----------
    acts1, acts2, epsilon
        As for [`get_cca_similarity()`][chunkcca.compat.get_cca_similarity]; real values only.
    precision, scheduler, memory_limit
        As for [`get_cca_similarity()`][chunkcca.compat.get_cca_similarity].

    Returns
    -------
    tuple
        ``(pwcca, weights, coefs)``: the weighted mean canonical correlation, the weight of each
        canonical direction, and the canonical correlations.
    """
    for name, acts in (("acts1", acts1), ("acts2", acts2)):
        if np.iscomplexobj(np.empty(0, dtype=getattr(acts, "dtype", float))):
            raise TypeError(f"{name} has dtype {acts.dtype}; compute_pwcca takes real activations")

    stats = _stream_neurons_first(acts1, acts2, _options(epsilon, precision, scheduler, memory_limit))
    solved = _solve(stats, epsilon, 0.98)
    if solved is None:
        return np.float64(0.0), np.zeros(0), np.asarray(0)
    use_x = solved["x_idxs"].sum() <= solved["y_idxs"].sum()
    side, acts = (0, acts1) if use_x else (1, acts2)
    kept = solved["x_idxs" if use_x else "y_idxs"]
    coef = solved["coef_x" if use_x else "coef_y"]
    index = np.flatnonzero(kept) + stats.side_slices()[side].start
    scatter = stats.scatter[np.ix_(index, index)]
    true_mean = stats.mean[index]
    used_mean = true_mean.astype(_mean_dtype(acts.dtype)).astype(np.float64)
    shift = coef @ (true_mean - used_mean) + used_mean
    n = stats.n
    # D = C X̃ + w 1ᵀ, and C X̃ 1 = 0: Dᵀ = [1/√n, Q_A] S with S = [√n wᵀ; F], FᵀF = C M Cᵀ, so the QR of D is
    # that of the small S, the neuron means in a row of their own (DᵀD, the means squared, lost 16 of 30 directions
    # to rounding at means 1e7 times the spread; found by audit)
    centred = coef @ scatter @ coef.T
    values, vectors = np.linalg.eigh((centred + centred.T) / 2)
    spanned = values > max(values[-1], 0.0) * values.size * np.finfo(np.float64).eps
    roots, vectors = np.sqrt(values[spanned]), vectors[:, spanned]
    stacked = np.vstack([np.sqrt(n) * shift[None, :], roots[:, None] * vectors.T])
    kept, basis = _orthonormal_in_order(stacked)
    if kept.size < stacked.shape[1]:
        warnings.warn(f"compute_pwcca: {stacked.shape[1] - kept.size} of the {stacked.shape[1]} directions of "
                      f"{'acts1' if use_x else 'acts2'} depend on earlier ones (duplicate or collinear neurons); the "
                      f"reference's QR gives them rounding noise as weights, here they weigh 0", RuntimeWarning,
                      stacklevel=user_stacklevel())
    # [1/√n, Q_A]ᵀ actsᵀ = [√n μᵀ; Q_Aᵀ X̃ᵀ], Q_Aᵀ X̃ᵀ = Λ^(-1/2) Vᵀ C M: each part at its own scale
    within = (vectors.T @ (coef @ scatter)) / roots[:, None]
    projections = basis.T @ np.vstack([np.sqrt(n) * true_mean[None, :], within])
    weights = np.zeros(stacked.shape[1])
    weights[kept] = np.abs(projections).sum(axis=1)
    weights = weights / np.sum(weights)
    coefs = solved["cca_coef1"]
    return np.sum(weights * coefs), weights, coefs


def _orthonormal_in_order(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The columns a QR in order keeps (each one's residual after the earlier kept ones above rounding: k · eps ·
    the largest column's norm) and an orthonormal basis of them (rows × kept), each basis vector the kept column's
    residual, as the QR's Q column is up to sign. Gram–Schmidt twice over, for orthogonality to rounding."""
    tolerance = columns.shape[1] * np.finfo(np.float64).eps * float(np.linalg.norm(columns, axis=0).max(initial=0.0))
    kept: list[int] = []
    basis = np.zeros((columns.shape[0], 0))
    for index in range(columns.shape[1]):
        residual = columns[:, index].astype(np.float64)
        for _ in range(2):
            residual = residual - basis @ (basis.T @ residual)
        norm = float(np.linalg.norm(residual))
        if norm > tolerance:
            basis = np.column_stack([basis, residual / norm])
            kept.append(index)
    return np.asarray(kept, dtype=int), basis


def _directions(acts: Any, transform: np.ndarray, means: np.ndarray) -> Any:
    """``transform · (acts − means) + means`` (neurons, datapoints): lazy for Dask input (a Dask-backed DataArray's
    too: it was computed in memory).

    The directions are as large as the input; for numpy input they are computed in memory,
    like the input itself.
    """
    if isinstance(acts, xr.DataArray) and isinstance(acts.data, da.Array):
        acts = acts.data
    if isinstance(acts, da.Array):
        return da.dot(transform, acts - means) + means
    return np.dot(transform, acts - means) + means


def fourier_ccas(conv_acts1: Any, conv_acts2: Any, return_coefs: bool = False, compute_dirns: bool = False,
                 verbose: bool = False, *, epsilon: float = 0.0, threshold: float = 0.98,
                 precision: ProductPrecision = "float64", scheduler: Any = None,
                 memory_limit: int | str = MEMORY_LIMIT) -> Any:
    """google/svcca's ``dft_ccas.fourier_ccas``, as it is meant to work, streamed.

    Both layers (datapoint, height, width, channel), numpy or Dask, are DFT'd over (height,
    width) chunk by chunk; the frequencies both share are kept (``fft_resize``'s rule) and
    [`get_cca_similarity()`][chunkcca.compat.get_cca_similarity]'s solve runs at each of them on the streamed complex
    covariance.

    Differences from the published function, which does not run on Python 3 (``xrange``, mixed
    tabs and spaces, ``DataFrame.append``):

    - it passes ``compute_dirns`` positionally into ``epsilon``; here ``epsilon`` is its own
      keyword (default 0, which is what the published call gives with ``compute_dirns=False``);
    - it reads keys ``neuron_coeffs1``/``2`` that ``get_cca_similarity`` never returns and
      inverse-DFTs them over a neurons × neurons matrix, which has no spatial meaning; here
      ``return_coefs`` returns the per-frequency complex coefficients as they are;
    - ``compute_dirns=True`` would inverse-DFT (neurons, datapoints) directions over those two
      axes, which has no meaning either: it raises a ValueError here (use
      ``chunkcca.cca(spatial="dft")`` for per-frequency coefficients);
    - it computes the FFT in complex64 whatever the input; here in complex128 (float32 input too: more exact);
    - layers need not be square.

    Parameters
    ----------
    conv_acts1, conv_acts2
        Layers (datapoint, height, width, channel), numpy or Dask.
    return_coefs
        Add the per-frequency complex coefficient keys of
        [`get_cca_similarity()`][chunkcca.compat.get_cca_similarity].
    compute_dirns
        Refused (see above).
    verbose
        Print the steps and a progress bar.
    epsilon, threshold, precision, scheduler, memory_limit
        As for [`get_cca_similarity()`][chunkcca.compat.get_cca_similarity].

    Returns
    -------
    pandas.DataFrame
        One row per frequency, in the reference's order (``location`` = (i, j) indices into the kept
        frequencies, frequencies in FFT order), with the columns ``cca_coef1``, ``cca_coef2``,
        ``x_idxs``, ``y_idxs``, ``mean``, ``sum`` (plus the coefficient keys with ``return_coefs``).
    """
    import pandas as pd

    _check_switches(return_coefs=return_coefs, compute_dirns=compute_dirns, verbose=verbose)
    if compute_dirns:
        raise ValueError("fourier_ccas does not offer compute_dirns: the reference's inverse DFT of "
                         "(neurons, datapoints) directions has no spatial meaning; use chunkcca.cca(spatial='dft')")
    _check_threshold(threshold)
    conv = ("datapoint", "height", "width", "channel")
    layer_a, layer_b = (_as_layer(acts, name, conv, "(datapoints, height, width, channels)")
                        for acts, name in ((conv_acts1, "conv_acts1"), (conv_acts2, "conv_acts2")))
    for layer in (layer_a, layer_b):  # taken by position, as the reference does: PyTorch's (N, C, H, W) gave
        if unnamed_layout(layer.shape) == "channels_first":  # other numbers silently (ρ̄ 0.42 for 0.81)
            warnings.warn(f"{layer.name} of shape {layer.shape} is read as (datapoints, height, width, channels), "
                          f"as google/svcca's fourier_ccas reads it, but looks channels-first (PyTorch's (N, C, H, W): "
                          f"its last two axes are a square map, its middle two not); if it is, pass it with its "
                          f"axes moved to (N, H, W, C) (numpy's acts.transpose(0, 2, 3, 1)); if it is (N, H, W, C), "
                          f"this warning can be filtered out", UserWarning, stacklevel=user_stacklevel())
    _check(epsilon, precision)
    if verbose:
        print("streaming per-frequency covariances")
    # by position, as the reference reads arrays (no datapoint labels), named for errors
    unlabelled = [xr.DataArray(layer.data, dims=layer.dims, name=name)
                  for layer, name in ((layer_a, "conv_acts1"), (layer_b, "conv_acts2"))]
    with _finite_only():
        stats = compute_moments(*unlabelled, spatial="dft", precision=precision, scheduler=scheduler,
                                memory_limit=memory_limit, progress=bool(verbose))
    records = []
    for location in np.ndindex(*stats.batch_shape):
        solved = _solve(stats[location], epsilon, threshold)
        if solved is None:
            record = _zero_result(False, stats.n)
        else:
            keys = SUMMARY_KEYS + ((*COEF_KEYS, "neuron_means1", "neuron_means2") if return_coefs else ())
            record = {key: solved[key] for key in keys}
        record["location"] = location
        records.append(record)
    return pd.DataFrame.from_records(records)
