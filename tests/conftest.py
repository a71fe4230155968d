from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

#: Real activations recorded by others (google/svcca's tutorials): the folder CHUNKCCA_TEST_DATA names, else
#: ../shared/data beside the checkout; absent in a user's clone, where the tests that need it are skipped.
SHARED_DATA = Path(os.environ.get("CHUNKCCA_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
GOLDEN = Path(__file__).parent / "data" / "svcca_golden"
#: The dims of a conv layer.
DIMS = ("datapoint", "height", "width", "channel")


def correlated_layers(rng: np.random.Generator, datapoints: int, shape_a: tuple[int, ...], shape_b: tuple[int, ...],
                      latent: int = 4, offset: float = 0.5, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Two post-ReLU layers (datapoint, *shape) sharing ``latent`` features per spatial position."""
    spatial = shape_a[:-1]
    z = rng.standard_normal((datapoints, *spatial, latent))
    a = z @ rng.standard_normal((latent, shape_a[-1])) + rng.standard_normal((datapoints, *shape_a))
    zb = z if shape_b[:-1] == spatial else rng.standard_normal((datapoints, *shape_b[:-1], latent))
    b = zb @ rng.standard_normal((latent, shape_b[-1])) + rng.standard_normal((datapoints, *shape_b))
    return np.maximum(a + offset, 0).astype(dtype), np.maximum(b + offset, 0).astype(dtype)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
