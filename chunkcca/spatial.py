"""Spatial adapters: turn one chunk of a layer into the rows that enter the statistics.

A block is a numpy array of shape (datapoint, height, width, channel) or (datapoint, channel)
(fully connected: height = width = 1). An adapter maps it to rows of shape (rows, channel),
``rows_per_datapoint`` rows per datapoint, in C order of (datapoint, height, width).

``stride`` then keeps every ``stride``-th row of the *global* row order, whatever the
chunking: a block whose first datapoint is ``d0`` starts at global row ``d0 · rows_per_datapoint``.
With ``spatial="flatten"`` that is exactly google/svcca's ``acts.reshape(-1, C)[::stride]``:
a deterministic pattern (every other pixel column when the width is even), not random sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The spatial adapters, by name.
SPATIAL: tuple[str, ...] = ("flatten", "avgpool")


def spatial_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(height, width) of a layer of shape (datapoint, height, width, channel) or (datapoint, channel)."""
    return (int(shape[1]), int(shape[2])) if len(shape) == 4 else (1, 1)


def rows_per_datapoint(spatial: str, shape: Sequence[int]) -> int:
    """How many rows each datapoint gives under ``spatial`` before the stride."""
    height, width = spatial_shape(shape)
    return height * width if spatial == "flatten" else 1


def row_count(spatial: str, shape: Sequence[int], stride: int) -> int:
    """Rows a whole layer of ``shape`` gives under ``spatial`` and ``stride``: ceil(N·r / stride)."""
    total = int(shape[0]) * rows_per_datapoint(spatial, shape)
    return -(-total // stride)


def block_rows(block: np.ndarray, spatial: str, first_datapoint: int, stride: int) -> np.ndarray:
    """Rows (rows, channel) of ``block`` under ``spatial``, keeping global rows ≡ 0 (mod ``stride``).

    For ``flatten`` the result is a view of ``block`` (no copy); ``avgpool`` returns the
    float64 mean over (height, width) per datapoint.
    """
    channels = block.shape[-1]
    if spatial == "flatten":
        rows = block.reshape(-1, channels)
    elif spatial == "avgpool":
        rows = block.reshape(block.shape[0], -1, channels).mean(axis=1, dtype=np.float64)
    else:
        raise ValueError(f"unknown spatial adapter {spatial!r}; expected one of {', '.join(SPATIAL)}")
    per_datapoint = rows.shape[0] // max(block.shape[0], 1)
    start = (-first_datapoint * per_datapoint) % stride
    return rows[start::stride]
