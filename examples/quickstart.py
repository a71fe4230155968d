"""Quick start: write a store, compare two layers, keep and merge the statistics, plot.

Run: python examples/quickstart.py [output folder]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dask.array as da
import matplotlib
import numpy as np

import chunkcca
from chunkcca.plot import plot_rho

matplotlib.use("Agg")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", default="quickstart-output", help="output folder (default quickstart-output)")
out = Path(parser.parse_args().out)
out.mkdir(parents=True, exist_ok=True)

# Two "models" seeing the same 16 latent features per pixel through different filters, post-ReLU.
rng = np.random.default_rng(0)
latent = rng.standard_normal((600, 8, 8, 16))
conv_a = np.maximum(latent @ rng.standard_normal((16, 32)) + rng.standard_normal((600, 8, 8, 32)), 0)
conv_b = np.maximum(latent @ rng.standard_normal((16, 24)) + rng.standard_normal((600, 8, 8, 24)), 0)
fc_b = da.from_array(conv_b.mean(axis=(1, 2)) @ rng.standard_normal((24, 10)), chunks=100)  # a Dask input

tree = chunkcca.write_activations(out / "acts.zarr", {
    "model0/conv": conv_a.astype("float32"),
    "model1/conv": conv_b.astype("float32"),
    "model1/fc": fc_b,
}, chunks=150, overwrite=True)
print(tree)

# Flatten: every (datapoint, height, width) is a row; stride=2 keeps every other row.
flat = chunkcca.cca(tree["model0/conv"], tree["model1/conv"], stride=2)
print(f"flatten, stride 2: {int(flat['rows'])} rows, mean rho {float(flat['rho_mean']):.4f}")

# Average pool: one row per datapoint, so a conv layer compares with a fully connected one.
pooled = chunkcca.cca(tree["model0/conv"], tree["model1/fc"], spatial="avgpool")
print(f"avgpool vs fc: {int(pooled['rows'])} rows, rho {np.round(pooled['rho'].values[:4], 3)}")

# The statistics are values: compute them for the first 400 datapoints, save, then add the rest.
first = chunkcca.compute_moments(tree["model0/conv"].isel(datapoint=slice(0, 400)),
                                 tree["model1/conv"].isel(datapoint=slice(0, 400)), precision="float64")
first.save(out / "first400.moments", overwrite=True)
rest = chunkcca.compute_moments(tree["model0/conv"].isel(datapoint=slice(400, None)),
                                tree["model1/conv"].isel(datapoint=slice(400, None)), precision="float64")
merged = chunkcca.cca_from_moments(chunkcca.Moments.load(out / "first400.moments") + rest)
whole = chunkcca.cca(tree["model0/conv"], tree["model1/conv"], precision="float64")
print(f"merged vs one pass: max |d rho| = {np.abs(merged['rho'] - whole['rho']).max().item():.1e}")

ax = plot_rho({"flatten, stride 2": flat, "avgpool vs fc": pooled}, title="quickstart")
ax.figure.savefig(out / "quickstart.png", dpi=100)
print(f"plot: {out / 'quickstart.png'}")
