"""google/svcca's first tutorial with its real SVHN activations: fully connected layers of two networks.

The activations (1000 SVHN test images x 200 units of the fc layer, two networks trained from different
seeds) ship with google/svcca's tutorials as gzip-compressed pickles: pass the folder holding
model_0_lay06.p and model_1_lay06.p.

Run: python examples/svhn_fc.py PATH/TO/model_activations/SVHN [--out svhn-output]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import chunkcca
from chunkcca.compat import get_cca_similarity
from chunkcca.ingest import ingest
from chunkcca.plot import plot_rho

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("folder", type=Path, help="folder with model_0_lay06.p and model_1_lay06.p")
parser.add_argument("--out", default="svhn-output")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

# The pickles go into a store (read with an unpickler that admits numpy arrays only).
tree = ingest(out / "svhn.zarr", {f"model{m}/fc": args.folder / f"model_{m}_lay06.p" for m in (0, 1)},
              overwrite=True)
a, b = tree["model0/fc"], tree["model1/fc"]

# As in the tutorial: CCA of the two fc layers (google/svcca's call, and chunkcca's)
svcca_style = get_cca_similarity(a["activations"].data.T, b["activations"].data.T, epsilon=1e-10, verbose=False)
print(f"get_cca_similarity: mean of the top coefficients {svcca_style['mean'][0]:.4f}")

# One streamed pass gives the statistics every measure is solved from (row_norms: for the debiased CKA)
moments = chunkcca.compute_moments(a, b, precision="float64", row_norms=True)
solved = chunkcca.cca_from_moments(moments, epsilon=1e-10)
results = {"CCA": solved}

# SVCCA: keep the top directions explaining 99% of the variance, then CCA; and a baseline against noise
results["SVCCA (99% variance)"] = chunkcca.svcca_from_moments(moments, keep=0.99)
noise = np.random.default_rng(0).standard_normal(b["activations"].shape).astype("float32")
results["SVCCA vs Gaussian noise"] = chunkcca.svcca(a, noise, keep=0.99, precision="float64")
for label, result in results.items():
    print(f"{label}: mean rho {float(result['rho_mean']):.4f}")
top = chunkcca.svcca_from_moments(moments, keep=50, keep_by="directions")  # the tutorial's SVD, top 50 per side
print(f"SVCCA (top 50 directions, as the tutorial): mean rho {float(top['rho_mean']):.4f}")
print(f"PWCCA {float(chunkcca.pwcca_from_moments(moments)['pwcca']):.4f}, "
      f"CKA {float(chunkcca.cka_from_moments(moments)['cka']):.4f}, "
      f"debiased CKA {float(chunkcca.cka_from_moments(moments, debiased=True)['cka']):.4f}")
figure = plot_rho(results, title="SVHN fc layers of two networks").figure
figure.savefig(out / "svhn_fc.png", dpi=100)
plt.close(figure)
print(f"plot: {out / 'svhn_fc.png'}")
