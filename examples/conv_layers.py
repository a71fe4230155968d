"""google/svcca's conv-layer tutorial, step by step, streamed from a store.

The tutorial compares SVHN conv2 (N, 16, 16, 64) and pool2 (N, 8, 8, 64) layers in five ways:
flatten, flatten keeping every second row, average pooling across conv2 and pool2, interpolating
pool2 onto conv2's grid keeping every fifth row, and the DFT. Here each runs chunk by chunk over a
zarr store; by default the demo's synthetic two-model store (`chunkcca demo` writes the same), or
your own with --store.

Run: python examples/conv_layers.py [--out FOLDER] [--datapoints N] [--store PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import chunkcca
from chunkcca.datasets import demo_layers
from chunkcca.plot import plot_frequency_means, plot_rho

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="conv-layers-output", help="folder for the store and figures")
parser.add_argument("--datapoints", type=int, default=1000, help="datapoints of the synthetic store")
parser.add_argument("--store", help="an existing store with layers model0/conv2, model1/conv2, model1/pool2")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

if args.store:
    tree = chunkcca.open_activations(args.store)
else:
    tree = chunkcca.write_activations(out / "conv.zarr", demo_layers(args.datapoints, chunk=125), chunks=125,
                                      overwrite=True)
conv_a, conv_b, pool_b = tree["model0/conv2"], tree["model1/conv2"], tree["model1/pool2"]

steps = [
    ("flatten", "conv2 vs conv2, every row", conv_a, conv_b, {"spatial": "flatten"}),
    ("flatten_stride2", "conv2 vs conv2, every 2nd row", conv_a, conv_b, {"spatial": "flatten", "stride": 2}),
    ("avgpool", "conv2 vs pool2, average pooled", conv_a, pool_b, {"spatial": "avgpool"}),
    ("interp_stride5", "conv2 vs pool2 interpolated, every 5th row", conv_a, pool_b,
     {"spatial": "interp", "stride": 5}),
    ("dft", "conv2 vs pool2, per DFT frequency", conv_a, pool_b, {"spatial": "dft"}),
]
print(f"{'step':>16}  {'rows':>7}  {'mean rho':>8}  {'seconds':>7}")
for name, title, a, b, options in steps:
    start = time.perf_counter()
    result = chunkcca.cca(a, b, epsilon=1e-10, **options)
    seconds = time.perf_counter() - start
    print(f"{name:>16}  {int(result['rows']):>7}  {float(result['rho_mean']):>8.4f}  {seconds:>7.2f}")
    if name == "dft":
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
        plot_frequency_means(result, ax=left, title=title)
        for freq in ((0, 0), (1, 0), (2, 2), (3, 3)):
            rho = result["rho"].sel(freq_h=freq[0], freq_w=freq[1])
            right.plot(rho["component"], rho, lw=2, label=f"frequency {freq}")
        right.set(xlabel="CCA component", ylabel="canonical correlation ρ", ylim=(0, 1.02))
        right.legend(fontsize="small")
        right.grid(True, alpha=0.4)
    else:
        figure = plot_rho({title: result}).figure
    figure.savefig(out / f"conv_{name}.png", dpi=90)
    plt.close(figure)
print(f"figures: {out}/conv_*.png")
