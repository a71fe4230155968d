"""Whitening: the pseudo-inverse square roots of covariances that CCA-family measures solve through, and what
their rank counts as rounding.

Each side is whitened through its correlation matrix, so channel units do not matter. ``Rounding`` says what an
eigenvalue must exceed to count as a direction: the rounding of float32 products, and the rounding of the
activations' own values (float32, float16, …), per channel, with channels that vary only within their values' grid
set apart. ``real_cuts`` tells which directions cut as rounding correlate with the other side beyond chance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from .moments import Moments

#: Channels whose standard deviation is at most this fraction of their mean's magnitude (64 float64 rounding
#: units of it) are constant to rounding and pruned; exactly-zero variance is always pruned. A constant channel's
#: variance comes out exactly 0 in every chunking and precision measured (its rows shift to 0); 1e-12 pruned a
#: real channel of mean 1e12 and spread 0.98, 8000 rounding units of its mean.
CONSTANT_RTOL = 64 * float(np.finfo(np.float64).eps)

#: A direction cut as the rounding of the activations' values (``Rounding.cut()``: at or below e² (mean² +
#: variance) per channel, 12 times the largest variance rounding to nearest makes) may be real, and the measures
#: then lose what it shares with the other layer: float16 values of mean 30 and spread 1 lost a direction whose
#: multiple correlation with the other layer was 0.92 (mean ρ 0.46 for the 0.91 of the values as stored).
#: Rounding's own directions are no more correlated with the other layer than chance (a float32 softmax's
#: sum-to-1 direction: 0.028 against q = 6 channels over 5000 rows, though its eigenvalue was at 0.53 of its cut,
#: as the real one's): ``require_resolved`` warns of a cut direction whose squared multiple correlation R² with the
#: other layer's q directions over n rows is above what chance gives once in this many (R² of a direction
#: independent of them is Beta(q / 2, (n − q − 1) / 2)) and at least ``ROUNDING_DOUBT_R2``. Rounding is a fixed
#: function of the inputs, and a layer computed from the rounded one carries it, so over many rows chance alone
#: does not tell: a BatchNorm'd conv layer over inputs with a constant region had its rounding directions at R²
#: 0.13 with the next conv layer (81 times the one-in-a-million level over 51,200 rows), a float32 softmax's at
#: 3e-4 (6 times it over 1e6 rows); keeping them as float64 moved the shape metric from 0.95 to 1.17. Real
#: directions below it (float16 values of mean 30 losing one at R² 0.13: ρ 0.36) cannot be told from those.
ROUNDING_DOUBT = 1e6
ROUNDING_DOUBT_R2 = 0.25


@dataclass(frozen=True)
class Rounding:
    """What the rank of one side counts as rounding, on its correlation matrix: ``products``, the relative
    rounding of float32 products (eps32; 0 for float64's, which ``p · eps64 · largest`` allows for), and
    ``channels``, the variance the rounding of each channel's own values adds in the correlation matrix's units
    (``rounding()``; None: exact values)."""

    products: float = 0.0
    channels: np.ndarray | None = None
    rows: int = 0  # the rows the statistics hold (chance correlations are about 1 / √rows)

    def kept(self, index: np.ndarray) -> Rounding:
        """The Rounding of the channels at ``index`` only (the side's kept channels, in that order)."""
        return self if self.channels is None else replace(self, channels=self.channels[index])

    def cut(self, values: np.ndarray, vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Which directions of a (p, p) matrix with eigenvalues ``values`` (and eigenvectors ``vectors``, columns)
        are kept, above rounding, and which were cut as the values' rounding only (above the products' floor):
        two bool arrays (p,). Independent rounding of each channel's values puts Σᵢ |vᵢₖ|² cᵢ on direction k
        (``channels`` c): a direction made of channels known to 7 digits is not cut for a channel beside them
        known to fewer (a BatchNorm unit of mean 100 and spread 0.01)."""
        largest = max(values.max(initial=0.0), 0.0)
        floor = max(largest * values.shape[-1] * np.finfo(np.float64).eps, 32 * self.products,
                    largest * self.products)
        if self.channels is None or vectors is None:
            return values > floor, np.zeros(values.shape, dtype=bool)
        keep = values > np.maximum(floor, (np.abs(vectors) ** 2).T @ self.channels)
        return keep, ~keep & (values > floor)


def rounding(moments: Moments, side: int, index: tuple[int, ...] = (), spectrum: np.ndarray | None = None
             ) -> Rounding:
    """The ``Rounding`` of one side of ``moments`` (of batch element ``index``). Values of relative rounding e
    (``Moments.value_rounding``) carry errors of variance up to e² (mean² + variance) in each channel: e² (1 +
    mean² / variance) in the correlation matrix's units, 12 times the variance of rounding to nearest (a float32
    LayerNorm output's exact null direction came out at 1e-15 of the largest eigenvalue, under 1.4e-14, and
    chunkings counted it or not). A dft's frequency carries at least e² times its map's power (``spectrum``, per
    channel: ``spectrum_power()``), the positions' own roundings summed. Channels constant to rounding (pruned)
    get 0."""
    products = float(np.finfo(np.float32).eps) if moments.precision == "float32" else 0.0
    eps = moments.value_rounding[side]
    if not eps:
        return Rounding(products, rows=int(moments.n))
    part = moments.side_slices()[side]
    variance = np.diagonal(moments.scatter[index]).real[part] / max(moments.n - 1, 1)
    mean = np.abs(moments.mean[index][part])
    power = variance + mean**2
    if spectrum is not None:  # a dft's frequency: at least its map's power, every position's rounding summed
        power = np.maximum(power, spectrum)
    varying = non_constant(variance, mean)
    channels = np.zeros(variance.shape)
    channels[varying] = eps**2 * power[varying] / variance[varying]
    return Rounding(products, channels, int(moments.n))


def spectrum_power(moments: Moments, side: int) -> np.ndarray | None:
    """Per channel of one side of a dft's Moments of rounded values, the power of its map per position
    (``Moments.map_power_of()``). Each position's value rounds on its own, and that rounding, e² times this in
    all, reaches every frequency: where a channel's spectrum is small beside its mean (a LayerNorm output of
    large offsets), a float32 null direction stood above e² times that frequency's own power and counted as real
    (rank 16 for 15 at every frequency but 0). None for Moments of other rows or of exact values."""
    return moments.map_power_of(side) if moments.value_rounding[side] else None


def _inverse_std(cov: np.ndarray) -> np.ndarray:
    """1 / standard deviation of each channel of a covariance (p, p); 0 for zero-variance channels."""
    variance = np.diagonal(cov).real
    return np.divide(1.0, np.sqrt(variance), out=np.zeros_like(variance), where=variance > 0)


def _scaled(cov: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``D cov D``, D = diag(scale), one side at a time: the outer product of the scales alone leaves float64's
    range for variances beyond it (values of 1e-155: 1/variance is 1e310)."""
    return cov * scale[:, None] * scale[None, :]


class Inverse(NamedTuple):
    """A pseudo-inverse square root (p, p) of a covariance and what it kept: the numerical ``rank``, the
    ``condition`` number of what it inverts (largest / smallest kept eigenvalue; 1 when none is kept) and the
    directions cut as the values' rounding only (``Rounding.cut()``), each scaled to unit variance: ``cut``
    (p, k), whose correlations with the other side tell whether they may be real (``_real_cut()``)."""

    root: np.ndarray
    rank: int
    condition: float
    cut: np.ndarray


def correlation_rank(cov: np.ndarray, floor: Rounding) -> int:
    """Numerical rank of a covariance, counted on its correlation matrix (see ``inverse_sqrt()``)."""
    correlation = _scaled(cov, _inverse_std(cov))
    values, vectors = np.linalg.eigh(_set_apart(correlation, _within_rounding(correlation, floor)))
    return int(floor.cut(values, vectors)[0].sum())


#: ``Rounding.channels`` at or above which a channel is set apart as its values' rounding (``_within_rounding``): a
#: unit that takes two neighbouring values of its grid (steps u ≤ e · |mean|) has a variance of at most u² / 4, so
#: its ``channels`` (e² (1 + mean² / variance)) is at least 4. Lower, channels of real signal went (float16 of mean
#: 100 and spread 0.09 is at 1.2, its rounding 4% of its variance: sixteen sharing a factor were all set apart).
WITHIN_ROUNDING = 4.0


class Apart(NamedTuple):
    """Directions set apart as their values' rounding (``_within_rounding``): ``channels`` (b,), the indices of the
    channels within their values' grid, and ``directions`` (b, m), orthonormal in those channels' coordinates: the
    identity (m = b) when no direction they share rises above their rounding, else the b − m directions that do
    are kept."""

    channels: np.ndarray
    directions: np.ndarray


def _within_rounding(correlation: np.ndarray, floor: Rounding) -> Apart | None:
    """The channels that vary about as little as their values' grid allows (``floor.channels`` at least
    ``WITHIN_ROUNDING``, in the ``correlation`` matrix's units: a float32 unit saturated at 1.0 but for one-ulp
    dips), and the directions among them to set apart: every one, unless together they hold directions above their
    rounding (sixteen float16 channels of mean 100 and spread 0.03 sharing a factor), which are kept, and only the
    rest set apart. None when there is nothing to set apart."""
    if floor.channels is None or not (floor.channels >= WITHIN_ROUNDING).any():
        return None
    channels = np.flatnonzero(floor.channels >= WITHIN_ROUNDING)
    values, vectors = np.linalg.eigh(correlation[np.ix_(channels, channels)])
    shared = floor.kept(channels).cut(values, vectors)[0]
    if shared.all():
        return None
    return Apart(channels, vectors[:, ~shared] if shared.any() else np.eye(len(channels), dtype=vectors.dtype))


def _set_apart(correlation: np.ndarray, apart: Apart | None) -> np.ndarray:
    """``correlation`` (p, p) without the directions ``apart`` (``_within_rounding``): ``P C P``, P projecting them
    out (the rows and columns of channels set apart whole are 0). Left in, their unit variance mixed into the
    near-degenerate directions of the other channels (white channels beside them), whose rounding then passed their
    eigenvalues, and every direction was cut (six N(0, 1) channels and two saturated ones: "varies only within the
    rounding"; beside sixteen float16 channels sharing a factor, rank 1 for 7, silently)."""
    if apart is None:
        return correlation
    channels, directions = apart
    correlation = correlation.copy()
    if directions.shape[1] == len(channels):  # every direction of these channels: exactly 0
        correlation[channels, :] = 0
        correlation[:, channels] = 0
        return correlation
    towards = correlation[:, channels] @ directions  # C E (p, m), E the directions in the p channels
    inner = directions.conj().T @ towards[channels]  # Eᴴ C E (m, m)
    correlation[channels, :] -= directions @ towards.conj().T
    correlation[:, channels] -= towards @ directions.conj().T
    correlation[np.ix_(channels, channels)] += directions @ inner @ directions.conj().T
    return correlation


def inverse_sqrt(cov: np.ndarray, floor: Rounding = Rounding()) -> Inverse:
    """Hermitian pseudo-inverse square root of a covariance (p, p), with its numerical rank, the condition number
    of what it inverts and the directions cut as the values' rounding (``Inverse``).

    Eigenvalues at most ``p · eps64 · max`` count as zero (as ``numpy.linalg.pinv``). For a correlation
    matrix from float32 products, ``floor.products`` = eps32 also cuts eigenvalues at most
    ``max(32 · eps32, eps32 · max)``: the rounding those products leave, measured on rank-deficient layers
    at up to about 6 · eps32 absolute, and up to 0.1 · eps32 · max for wide layers of very low rank (the
    largest eigenvalue is then about p). Genuine eigenvalues down to about 1e-5 are kept. ``floor.channels``
    cuts, direction by direction, what the activations' own rounding can make (``rounding()``): about 1.4e-14
    for float32 values of a mean no larger than their spread.
    """
    apart = _within_rounding(cov, floor)
    values, vectors = np.linalg.eigh(_set_apart(cov, apart))
    keep, by_values = floor.cut(values, vectors)
    scale = np.zeros_like(values)
    scale[keep] = 1.0 / np.sqrt(values[keep])
    condition = float(values[keep].max() / values[keep].min()) if keep.any() else 1.0
    cut = vectors[:, by_values] / np.sqrt(values[by_values])
    if apart is not None:  # each direction set apart that varies, cut as its values' rounding
        channels, directions = apart
        spread = np.sum(directions.conj() * (cov[np.ix_(channels, channels)] @ directions), axis=0).real
        varies = spread > max(values.max(initial=0.0), 0.0) * len(values) * np.finfo(np.float64).eps  # a duplicate
        own = np.zeros((len(values), int(varies.sum())), dtype=np.result_type(cov, directions))  # channel's: none
        own[channels] = directions[:, varies] / np.sqrt(spread[varies])
        cut = np.concatenate([cut, own], axis=1)
    return Inverse((vectors * scale) @ vectors.conj().T, int(keep.sum()), condition, cut)


def non_constant(variance: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Channels that vary: variance above zero and above rounding of the mean (scale-free, per channel)."""
    return (variance > 0) & (variance > (CONSTANT_RTOL * np.abs(mean)) ** 2)


def mean_variance(cov: np.ndarray, mean: np.ndarray, eps: float = 0.0) -> float:
    """The mean variance of the channels of a covariance (p, p) that vary (``non_constant``) beyond their values'
    relative rounding ``eps`` (a saturated float32 unit's one-ulp dips; 0 if none vary): the scale of a ridge or
    of partial whitening, which dead (constant) channels would shrink (six dead ReLU units beside six live ones
    moved the shape metric at α = 0.5 from 0.629 to 0.665)."""
    variance = np.diagonal(cov).real
    varying = non_constant(variance, mean)
    beyond = varying & (variance > (eps * mean) ** 2)
    varying = beyond if beyond.any() else varying  # every channel within rounding: the scale of those that vary
    return float(variance[varying].mean()) if varying.any() else 0.0


def whitener(cov: np.ndarray, epsilon: float, floor: Rounding) -> Inverse:
    """(Σ + εI)^(−1/2) through the correlation matrix, so channel units do not matter, with the rank, the condition
    number and the directions cut as the values' rounding (in the covariance's units) of what it inverted.

    ``floor`` (``Rounding``: of float32 products and of the values) applies without a ridge only: with
    ``epsilon > 0`` the user's regularisation decides. Zero-variance channels get zero weight.
    """
    regularised = cov + epsilon * np.eye(cov.shape[0])
    scale = _inverse_std(regularised)
    inverse = inverse_sqrt(_scaled(regularised, scale), floor if epsilon == 0 else Rounding())
    return inverse._replace(root=scale[:, None] * inverse.root, cut=scale[:, None] * inverse.cut)


def _real_cut(correlations: np.ndarray, other_rank: int, rows: int) -> int:
    """How many directions cut as the values' rounding may be real: those whose squared multiple correlation with
    the other side (the squared norm of ``correlations``, (k, the other side's whitened variates)) is at least
    ``ROUNDING_DOUBT_R2`` and chance would pass less than once in ``ROUNDING_DOUBT`` (Beta(q / 2, (n − q − 1) / 2),
    q = ``other_rank``, n = ``rows``)."""
    from scipy.stats import beta

    q = max(other_rank, 1)
    if not correlations.shape[0] or rows <= q + 1:
        return 0
    least = max(ROUNDING_DOUBT_R2, beta.isf(1 / ROUNDING_DOUBT, q / 2, (rows - q - 1) / 2))
    return int((np.linalg.norm(correlations, axis=1) ** 2 > least).sum())


def real_cuts(cross: np.ndarray, whiteners: tuple[Inverse, Inverse],
               floors: tuple[Rounding, Rounding]) -> tuple[int, int]:
    """Per side, the directions its whitener (``Inverse``) cut as its values' rounding that correlate with the other
    side beyond chance (``_real_cut()``); ``cross``: the cross-covariance (a's channels, b's) the whiteners are of."""
    (root_a, rank_a, _, cut_a), (root_b, rank_b, _, cut_b) = whiteners
    return (_real_cut(cut_a.conj().T @ cross @ root_b, rank_b, floors[0].rows),
            _real_cut(cut_b.conj().T @ cross.conj().T @ root_a, rank_a, floors[1].rows))


def partial_whitener(cov: np.ndarray, alpha: float, floor: Rounding, mean: np.ndarray, eps: float) -> Inverse:
    """((1 − α) Σ + α v̄ I)^(−1/2), v̄ the mean variance of the channels that vary (``mean_variance``; ``mean``
    the channels' means, ``eps`` their values' relative rounding), its rank and the condition number of what it
    inverts: α = 0 whitens, α = 1 only rescales (pseudo-inverse if singular).

    At α = 0 any whitener gives the same metric (they differ by a rotation), so it whitens through the
    correlation matrix, where the rank does not depend on channel units (and ``floor`` cuts float32 rounding).
    """
    if alpha == 0:
        return whitener(cov, 0.0, floor)
    regularised = (1 - alpha) * cov + alpha * mean_variance(cov, mean, eps) * np.eye(cov.shape[0])
    return inverse_sqrt(regularised)
