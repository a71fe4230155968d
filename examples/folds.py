"""Error bars and held-out CCA: why in-sample CCA of many channels needs a held-out check.

Independent Gaussian layers have no correlation at all, yet their in-sample canonical correlations are far
from 0 when the channels are not few compared with the rows; held-out CCA (directions fitted on the other
folds, correlations on the held-out one) is near 0. One streamed pass per layer pair keeps a Moments per
fold, and the jackknife over folds gives every measure an error bar.

Run: python examples/folds.py [--out folds-output]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

import chunkcca
from chunkcca.report import format_table, save_figure

matplotlib.use("Agg")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="folds-output", help="folder for the figure")
parser.add_argument("--rows", type=int, default=2000, help="datapoints (default 2000)")
out = Path(parser.parse_args().out)
out.mkdir(parents=True, exist_ok=True)
rows = parser.parse_args().rows

rng = np.random.default_rng(0)
table = [("channels p = q", "p / n", "in-sample mean CCA", "held-out mean CCA", "± 95% interval")]
curves: dict[str, list[float]] = {"in-sample": [], "held-out": [], "ratio": []}
for channels in (10, 25, 50, 100, 200, 400):
    x, y = rng.standard_normal((rows, channels)), rng.standard_normal((rows, channels))  # independent
    result = chunkcca.compare(x, y, measures=["mean_cca", "heldout_cca"], folds=5, precision="float64")
    half = float(result["heldout_cca_ci"][1] - result["heldout_cca_ci"][0]) / 2
    table.append((str(channels), f"{channels / rows:.3f}", f"{float(result['mean_cca']):.3f}",
                  f"{float(result['heldout_cca']):.3f}", f"{half:.3f}"))
    curves["ratio"].append(channels / rows)
    curves["in-sample"].append(float(result["mean_cca"]))
    curves["held-out"].append(float(result["heldout_cca"]))
print(f"independent Gaussian layers, {rows} datapoints, 5 folds")
print(format_table(table))


def figure():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6), layout="constrained")
    ax.plot(curves["ratio"], curves["in-sample"], "o-", label="in-sample mean CCA")
    ax.plot(curves["ratio"], curves["held-out"], "s--", label="held-out mean CCA (5 folds)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("channels per datapoint, p / n")
    ax.set_ylabel("mean canonical correlation")
    ax.set_title(f"independent layers, n = {rows}: the truth is 0")
    ax.legend()
    return fig


save_figure(figure, out / "heldout_vs_insample.png", overwrite=True)
