"""Independent in-memory float64 computations that the streamed results are checked against.

Written for the tests only, with plain numpy: whole arrays in memory, QR-based CCA
(no covariance matrices), the row selection of google/svcca's conv-layer tutorial.
"""

from __future__ import annotations

import numpy as np


def flatten_rows(acts: np.ndarray, stride: int = 1) -> np.ndarray:
    """google/svcca's rows for a conv layer: ``acts.reshape(-1, C)[::stride]`` in float64."""
    return np.asarray(acts, dtype=np.float64).reshape(-1, acts.shape[-1])[::stride]


def avgpool_rows(acts: np.ndarray, stride: int = 1) -> np.ndarray:
    """Mean over every axis between datapoint and channel, then every stride-th datapoint."""
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim == 4:
        acts = acts.mean(axis=(1, 2))
    return acts[::stride]


def canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations of the rows of x (n, p) and y (n, q), descending, min(p, q) of them.

    QR of each centred side (constant columns dropped), then the singular values of QxᵀQy:
    no covariance is formed, so this is as accurate as float64 allows.
    """
    def basis(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        centred = a - a.mean(axis=0)
        centred = centred[:, centred.std(axis=0) > 0]
        q, r = np.linalg.qr(centred)
        keep = np.abs(np.diag(r)) > np.abs(np.diag(r)).max() * a.shape[0] * np.finfo(float).eps
        return q[:, keep]

    rho = np.linalg.svd(basis(x).T @ basis(y), compute_uv=False)
    out = np.zeros(min(x.shape[1], y.shape[1]))
    out[: rho.size] = rho[: out.size]
    return out


def scatter(rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Row count, mean and centred scatter matrix of rows (n, p), two-pass in float64."""
    rows = np.asarray(rows, dtype=np.float64)
    mean = rows.mean(axis=0)
    centred = rows - mean
    return rows.shape[0], mean, centred.T @ centred
