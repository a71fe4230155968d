"""Synthetic layers: the demo's two models, generated chunk by chunk as lazy Dask arrays.

Two "models" see the same latent image features through different random filters and independent
noise; ``conv2`` is (N, 16, 16, 64) post-ReLU, ``pool2`` its 2×2 max pool (N, 8, 8, 64). Each chunk
is seeded by its first datapoint, so the layers never need to be held whole and any chunking of the
same size gives the same values.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

LATENT = 48
CHANNELS = 64
SIZE = 16


def _demo_conv2(first: int, count: int, model: int, seed: int) -> np.ndarray:
    """conv2 activations (count, 16, 16, 64) float32 of ``model`` for datapoints first … first+count."""
    latent = np.random.default_rng([seed, first]).standard_normal((count, SIZE, SIZE, LATENT), dtype=np.float32)
    filters = np.random.default_rng([seed, 10_000 + model]).standard_normal((LATENT, CHANNELS), dtype=np.float32)
    noise = np.random.default_rng([seed, first, 1 + model]).standard_normal(
        (count, SIZE, SIZE, CHANNELS), dtype=np.float32)
    return np.maximum(latent @ filters / np.sqrt(LATENT) + 0.7 * noise + 0.3, 0)


def _max_pool(conv2: np.ndarray) -> np.ndarray:
    """2x2 max pooling of (count, 16, 16, 64) activations → (count, 8, 8, 64)."""
    return conv2.reshape(len(conv2), SIZE // 2, 2, SIZE // 2, 2, CHANNELS).max(axis=(2, 4))


def demo_layers(datapoints: int, *, chunk: int, seed: int = 0) -> dict[str, da.Array]:
    """The demo's four layers as lazy Dask arrays chunked by ``chunk`` datapoints (pool2 from conv2's tasks)."""
    layers = {}
    for model in (0, 1):
        blocks = [
            da.from_delayed(dask.delayed(_demo_conv2)(first, min(chunk, datapoints - first), model, seed),
                            shape=(min(chunk, datapoints - first), SIZE, SIZE, CHANNELS), dtype=np.float32)
            for first in range(0, datapoints, chunk)
        ]
        conv2 = da.concatenate(blocks)
        layers[f"model{model}/conv2"] = conv2
        layers[f"model{model}/pool2"] = conv2.map_blocks(
            _max_pool, chunks=(conv2.chunks[0], (SIZE // 2,), (SIZE // 2,), (CHANNELS,)), dtype=np.float32)
    return layers
