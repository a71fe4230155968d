"""google/svcca's get_cca_similarity, streamed: same call, numpy or Dask input.

Run: python examples/svcca_compat.py
"""

from __future__ import annotations

import argparse

import dask.array as da
import numpy as np

from chunkcca.compat import get_cca_similarity

argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()

# (neurons, datapoints), as google/svcca expects: 50 and 40 neurons over 20,000 datapoints.
rng = np.random.default_rng(0)
latent = rng.standard_normal((10, 20_000))
acts1 = rng.standard_normal((50, 10)) @ latent + rng.standard_normal((50, 20_000))
acts2 = rng.standard_normal((40, 10)) @ latent + rng.standard_normal((40, 20_000))

in_memory = get_cca_similarity(acts1, acts2, epsilon=1e-10, verbose=False)

# The same call on Dask arrays chunked along datapoints: streamed, never gathered.
lazy1 = da.from_array(acts1, chunks=(-1, 4096))
lazy2 = da.from_array(acts2, chunks=(-1, 4096))
streamed = get_cca_similarity(lazy1, lazy2, epsilon=1e-10, verbose=False, compute_dirns=True)

print("top coefficients:", np.round(streamed["cca_coef1"][:12], 3))
print("mean (threshold 0.98):", streamed["mean"][0])
print("max |difference| numpy vs Dask input:", np.abs(streamed["cca_coef1"] - in_memory["cca_coef1"]).max())
print("cca_dirns1 is lazy:", type(streamed["cca_dirns1"]).__name__, streamed["cca_dirns1"].shape)
