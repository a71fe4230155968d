"""Independent in-memory float64 computations that the streamed results are checked against.

Written for the tests only, with plain numpy: whole arrays in memory, QR-based CCA
(no covariance matrices), the row selection of google/svcca's conv-layer tutorial.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def flatten_rows(acts: np.ndarray, stride: int = 1) -> np.ndarray:
    """google/svcca's rows for a conv layer: ``acts.reshape(-1, C)[::stride]`` in float64."""
    return np.asarray(acts, dtype=np.float64).reshape(-1, acts.shape[-1])[::stride]


def avgpool_rows(acts: np.ndarray, stride: int = 1) -> np.ndarray:
    """Mean over every axis between datapoint and channel, then every stride-th datapoint."""
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim == 4:
        acts = acts.mean(axis=(1, 2))
    return acts[::stride]


def orthonormal_basis(a: np.ndarray) -> np.ndarray:
    """Orthonormal basis (n, rank) of the centred columns of a (constant columns dropped), by pivoted QR."""
    a = np.asarray(a)
    a = a.astype(np.result_type(a, np.float64))
    centred = a - a.mean(axis=0)
    centred = centred[:, centred.std(axis=0) > 0]
    q, r, _ = scipy.linalg.qr(centred, mode="economic", pivoting=True)
    keep = np.abs(np.diag(r)) > np.abs(np.diag(r)).max(initial=0) * a.shape[0] * np.finfo(float).eps
    return q[:, keep]


def canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations of the rows of x (n, p) and y (n, q), descending, min(p, q) of them.

    QR of each centred side (constant columns dropped), then the singular values of QxᴴQy:
    no covariance is formed, so this is as accurate as float64 allows. Complex rows work too.
    """
    rho = np.linalg.svd(orthonormal_basis(x).conj().T @ orthonormal_basis(y), compute_uv=False)
    out = np.zeros(min(x.shape[1], y.shape[1]))
    out[: rho.size] = rho[: out.size]
    return out


def scatter(rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Row count, mean and centred scatter matrix of rows (n, p), two-pass in float64."""
    rows = np.asarray(rows, dtype=np.float64)
    mean = rows.mean(axis=0)
    centred = rows - mean
    return rows.shape[0], mean, centred.T @ centred


def interpolate_layer(layer: np.ndarray, source: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray],
                      method: str) -> np.ndarray:
    """A whole layer (datapoint, h, w, c) resampled at target (height, width) positions, in float64.

    scipy's RegularGridInterpolator on every map at once for linear and nearest; for cubic, scipy's
    not-a-knot spline fitted along height, then along width (RegularGridInterpolator's cubic solves
    its N-d spline iteratively, to ~1e-7 only). Targets outside the source range are clamped to it
    (the nearest sample's value along each axis).
    """
    from scipy.interpolate import RegularGridInterpolator, make_interp_spline

    if method == "cubic":
        clamped = [np.clip(t, s[0], s[-1]) for s, t in zip(source, target)]
        along_height = make_interp_spline(source[0], np.asarray(layer, dtype=np.float64), k=3, axis=1)(clamped[0])
        return make_interp_spline(source[1], along_height, k=3, axis=2)(clamped[1])
    values = np.moveaxis(np.asarray(layer, dtype=np.float64), 0, 2)  # (h, w, datapoint, channel)
    interpolator = RegularGridInterpolator(source, values, method=method)
    grid_h, grid_w = np.meshgrid(np.clip(target[0], source[0][0], source[0][-1]),
                                 np.clip(target[1], source[1][0], source[1][-1]), indexing="ij")
    resampled = interpolator(np.column_stack([grid_h.ravel(), grid_w.ravel()]))  # (H*W, datapoint, channel)
    return np.moveaxis(resampled.reshape(target[0].size, target[1].size, *values.shape[2:]), 2, 0)


def dft_correlations(a: np.ndarray, b: np.ndarray, stride: int = 1) -> np.ndarray:
    """Canonical correlations per shared spatial frequency (freq_h, freq_w, component), in complex128.

    The whole layers' 2-D FFTs; the frequencies f with -m/2 <= f < m/2 of the smaller size m
    along each axis, in that size's FFT order; every stride-th datapoint.
    """
    spectra = [np.fft.fft2(np.asarray(x, dtype=np.float64), axes=(1, 2)) for x in (a, b)]
    kept = []
    for axis in (1, 2):
        m = min(a.shape[axis], b.shape[axis])
        order = np.fft.fftfreq(m, 1 / m)
        kept.append([[int(np.flatnonzero(np.fft.fftfreq(x.shape[axis], 1 / x.shape[axis]) == f)[0]) for f in order]
                     for x in (a, b)])
    heights, widths = len(kept[0][0]), len(kept[1][0])
    out = np.zeros((heights, widths, min(a.shape[-1], b.shape[-1])))
    for i in range(heights):
        for j in range(widths):
            rows = [s[::stride, kept[0][k][i], kept[1][k][j], :] for k, s in enumerate(spectra)]
            out[i, j] = canonical_correlations(*rows)
    return out


def _centred(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a - a.mean(axis=0)


def svcca_reference(x: np.ndarray, y: np.ndarray, keep: float, keep_by: str) -> tuple[np.ndarray, int, int]:
    """SVCCA from SVDs of the centred data: the fewest right singular directions holding ``keep`` of
    the squared singular values ("variance") or of the singular values (or the first ``keep``, "directions"),
    then QR-based CCA."""
    reduced = []
    for side in (x, y):
        _, s, vt = np.linalg.svd(_centred(side), full_matrices=False)
        weights = s**2 if keep_by == "variance" else s
        if keep_by == "directions":  # the tutorials' "top k" singular directions
            k = min(int(keep), int((s > s[0] * max(side.shape) * np.finfo(float).eps).sum()))
        elif keep >= 1:  # every direction with variance: the rank
            k = int((s > s[0] * max(side.shape) * np.finfo(float).eps).sum())
        else:
            k = int(np.argmax(np.cumsum(weights) / weights.sum() >= keep - 1e-12)) + 1
        reduced.append(_centred(side) @ vt[:k].T)
    return canonical_correlations(*reduced), reduced[0].shape[1], reduced[1].shape[1]


def pwcca_reference(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Morcos et al.'s PWCCA from rank-revealing QR bases: canonical variates H of the side with fewer
    neurons (min(rank_x, rank_y) of them), αᵢ = Σⱼ |⟨Hᵢ, x̃ⱼ⟩| (normalised), PWCCA = Σ αᵢ ρᵢ."""
    small, large = (x, y) if x.shape[1] <= y.shape[1] else (y, x)
    q_small, q_large = orthonormal_basis(small), orthonormal_basis(large)
    u, rho, _ = np.linalg.svd(q_small.T @ q_large, full_matrices=False)
    variates = q_small @ u[:, : rho.size]
    weights = np.abs(variates.T @ _centred(small)).sum(axis=1)
    weights /= weights.sum()
    return float(weights @ rho), weights, rho


def u_centred_gram(features: np.ndarray) -> np.ndarray:
    """The linear Gram matrix, U-centred (zero diagonal) as in Kornblith et al.'s center_gram(unbiased=True)."""
    gram = np.asarray(features, dtype=np.float64) @ np.asarray(features, dtype=np.float64).T
    n = gram.shape[0]
    np.fill_diagonal(gram, 0)
    means = gram.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    np.fill_diagonal(gram, 0)
    return gram


def cka_reference(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """Linear CKA from n × n Gram matrices: centred (biased) or U-centred (debiased)."""
    if debiased:
        k, l_ = u_centred_gram(x), u_centred_gram(y)
    else:
        k, l_ = _centred(x) @ _centred(x).T, _centred(y) @ _centred(y).T
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def procrustes_reference(x: np.ndarray, y: np.ndarray) -> float:
    """min over orthogonal R of ‖X̂ − Ŷ R‖_F, X̂, Ŷ centred with unit Frobenius norm (zero-padded to equal width)."""
    from scipy.linalg import orthogonal_procrustes

    width = max(x.shape[1], y.shape[1])
    xs, ys = (np.pad(_centred(a), ((0, 0), (0, width - a.shape[1]))) for a in (x, y))
    xs, ys = xs / np.linalg.norm(xs), ys / np.linalg.norm(ys)
    rotation, _ = orthogonal_procrustes(ys, xs)
    return float(np.linalg.norm(xs - ys @ rotation))


def shape_reference(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """Williams et al.'s angular distance on the data: X̃ ((1−α)Σ + α v̄ I)^(−1/2), v̄ the mean variance of the
    channels that vary, then the arccos of the normalised nuclear norm of the cross product."""
    mapped = []
    for side in (x, y):
        centred = _centred(side)
        cov = centred.T @ centred / (centred.shape[0] - 1)
        varying = np.diag(cov)[np.diag(cov) > 0]
        values, vectors = np.linalg.eigh((1 - alpha) * cov + alpha * varying.mean() * np.eye(len(cov)))
        mapped.append(centred @ vectors @ np.diag(values**-0.5) @ vectors.T)
    nuclear = np.linalg.norm(mapped[0].T @ mapped[1], ord="nuc")
    return float(np.arccos(min(1.0, nuclear / (np.linalg.norm(mapped[0]) * np.linalg.norm(mapped[1])))))
