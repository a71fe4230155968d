"""Make the golden fixtures for ``chunkcca.compat`` from the published google/svcca code.

The inputs are generated here from fixed seeds; the outputs are what google/svcca's
``cca_core.get_cca_similarity`` (commit 1f3fbf19) returns for them. Only numbers are
committed (``svcca_golden/*.npz``); the reference code itself is never part of chunkcca.

Usage::

    python tests/data/make_svcca_golden.py --reference /path/to/google-svcca-checkout \
        [--shared-data ../shared/data]

The conv-layer cases (average pool, the tutorial's interp2d interpolation, per-frequency DFT)
need ``scipy.interpolate.interp2d``, which SciPy removed in 1.14: run the script with
SciPy 1.13 and NumPy < 2 to write them (they are skipped otherwise).

Each ``<case>.npz`` holds ``in_acts1``/``in_acts2`` (the inputs, in the layout given to
the reference, or activations of shape (datapoint, height, width, channel) for the
flatten cases), ``param_*`` scalars and ``out_<key>`` for every key the reference returned
(``out_mean`` and ``out_sum`` as length-2 arrays).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import pickle
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent / "svcca_golden"


def _fc_gauss(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two fully connected layers (12 and 9 neurons, 800 datapoints) sharing 5 latents."""
    latent = rng.standard_normal((5, 800))
    acts1 = rng.standard_normal((12, 5)) @ latent + 0.5 * rng.standard_normal((12, 800))
    acts2 = rng.standard_normal((9, 5)) @ latent + 0.8 * rng.standard_normal((9, 800))
    return acts1, acts2


def _relu_offset(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Post-ReLU float32 layers with a large common offset (mean ~50, spread ~1)."""
    latent = rng.standard_normal((6, 1500))
    acts1 = 50.0 + rng.standard_normal((20, 6)) @ latent + rng.standard_normal((20, 1500))
    acts2 = 50.0 + rng.standard_normal((16, 6)) @ latent + rng.standard_normal((16, 1500))
    return np.maximum(acts1, 0).astype(np.float32), np.maximum(acts2, 0).astype(np.float32)


def _pruned(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Layers with constant (zero-variance) neurons that the reference prunes."""
    acts1, acts2 = _fc_gauss(rng)
    acts1 = acts1[:10, :500].copy()
    acts2 = acts2[:8, :500].copy()
    acts1[3] = 2.0
    acts1[7] = -1.0
    acts2[0] = 0.0
    return acts1, acts2


def _conv(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Conv layers (30, 6, 6, 8) and (30, 6, 6, 6), float32, correlated, post-ReLU."""
    latent = rng.standard_normal((30, 6, 6, 4))
    acts1 = latent @ rng.standard_normal((4, 8)) + rng.standard_normal((30, 6, 6, 8))
    acts2 = latent @ rng.standard_normal((4, 6)) + rng.standard_normal((30, 6, 6, 6))
    return (np.maximum(acts1 + 0.5, 0).astype(np.float32),
            np.maximum(acts2 + 0.5, 0).astype(np.float32))


def _conv_and_pool(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A conv layer (40, 8, 8, 6) and another network's 2x2-max-pooled conv layer (40, 4, 4, 5)."""
    latent = rng.standard_normal((40, 8, 8, 3))
    conv = np.maximum(latent @ rng.standard_normal((3, 6)) + rng.standard_normal((40, 8, 8, 6)) + 0.3, 0)
    other = np.maximum(latent @ rng.standard_normal((3, 5)) + rng.standard_normal((40, 8, 8, 5)) + 0.3, 0)
    pool = other.reshape(40, 4, 2, 4, 2, 5).max(axis=(2, 4))
    return conv.astype(np.float32), pool.astype(np.float32)


def _tutorial_interp(acts1: np.ndarray, pool2: np.ndarray) -> np.ndarray:
    """The conv-layer tutorial's interpolation of pool2 onto acts1's grid, verbatim in effect."""
    from scipy import interpolate

    num_d, h, w, _ = acts1.shape
    num_c = pool2.shape[-1]
    pool2_interp = np.zeros((num_d, h, w, num_c))
    idxs1 = np.linspace(0, pool2.shape[1], pool2.shape[1], endpoint=False)
    idxs2 = np.linspace(0, pool2.shape[2], pool2.shape[2], endpoint=False)
    large_idxs1 = np.linspace(0, pool2.shape[1], acts1.shape[1], endpoint=False)
    large_idxs2 = np.linspace(0, pool2.shape[2], acts1.shape[2], endpoint=False)
    for d in range(num_d):
        for c in range(num_c):
            f_interp = interpolate.interp2d(idxs1, idxs2, pool2[d, :, :, c])
            pool2_interp[d, :, :, c] = f_interp(large_idxs1, large_idxs2)
    return pool2_interp


def _conv_cases(reference: Path, ref) -> None:
    try:
        from scipy.interpolate import interp2d

        interp2d([0, 1], [0, 1], [[0, 0], [0, 0]])
    except (ImportError, NotImplementedError):
        print("skipping conv cases: scipy.interpolate.interp2d needs SciPy < 1.14")
        return
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    # dft_ccas.py itself does not import on Python 3 (a TabError further down); run its fft_resize,
    # which is valid Python 3, from its own source text.
    source = (reference / "dft_ccas.py").read_text()
    namespace: dict = {"np": np}
    exec(source[source.index("def fft_resize"):source.index("def fourier_ccas")], namespace)
    fft_resize = namespace["fft_resize"]
    conv, pool = _conv_and_pool(np.random.default_rng(4))
    avg = ref(conv.mean(axis=(1, 2)).T, pool.mean(axis=(1, 2)).T, epsilon=1e-10)
    _save("conv_avgpool", conv, pool, avg, epsilon=1e-10, threshold=0.98)
    interp = _tutorial_interp(conv, pool)
    flat_conv = conv.reshape(-1, conv.shape[-1])
    flat_interp = interp.reshape(-1, interp.shape[-1])
    result = ref(flat_conv.T[:, ::5], flat_interp.T[:, ::5], epsilon=1e-10)
    result["interpolated"] = interp
    _save("conv_interp_svcca", conv, pool, result, epsilon=1e-10, threshold=0.98, stride=5)
    # fourier_ccas does not run on Python 3 (xrange, mixed tabs, missing keys, DataFrame.append);
    # its intended loop: fft_resize both layers to the shared frequencies, then get_cca_similarity
    # per frequency, with epsilon 0 (the published call passes compute_dirns=False into epsilon) and
    # without coefficients (get_cca_similarity cannot place complex coefficients into its float arrays).
    size = min(conv.shape[1], pool.shape[1])
    fft1 = fft_resize(conv, resize=True, new_size=(size, size))
    fft2 = fft_resize(pool, resize=True, new_size=(size, size))
    coefs = np.zeros((size, size, min(conv.shape[-1], pool.shape[-1])))
    means = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            res = ref(fft1[:, i, j, :].T, fft2[:, i, j, :].T, epsilon=0.0, compute_coefs=False)
            coefs[i, j] = res["cca_coef1"]
            means[i, j] = res["mean"][0]
    _save("conv_dft", conv, pool, {"cca_coef1": coefs, "mean": means}, epsilon=0.0, threshold=0.98)


def _pwcca_cases(reference: Path) -> None:
    """compute_pwcca of the reference; its else branch indexes acts1 with y_idxs, so for the case
    where acts2 has fewer neurons that one line is run with acts2 (the evident intent)."""
    cca_core = importlib.import_module("cca_core")
    source = (reference / "pwcca.py").read_text()
    published: dict = {"np": np, "cca_core": cca_core}
    exec(source, published)
    fixed_source = source.replace('(acts1[sresults["y_idxs"]]', '(acts2[sresults["y_idxs"]]')
    assert fixed_source != source
    fixed: dict = {"np": np, "cca_core": cca_core}
    exec(fixed_source, fixed)
    big, small = _fc_gauss(np.random.default_rng(0))  # 12 and 9 neurons
    for name, acts1, acts2, namespace in (("pwcca_x", small, big, published), ("pwcca_y", big, small, fixed)):
        value, weights, coefs = namespace["compute_pwcca"](acts1, acts2, epsilon=1e-10)
        _save(name, acts1, acts2, {"pwcca": value, "weights": weights, "coefs": coefs}, epsilon=1e-10)
    acts1, acts2 = _relu_offset(np.random.default_rng(1))
    value, weights, coefs = published["compute_pwcca"](acts2, acts1, epsilon=1e-10)
    _save("pwcca_relu", acts2, acts1, {"pwcca": value, "weights": weights, "coefs": coefs}, epsilon=1e-10)


def _load_svcca_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return pickle.load(f)


def _save(name: str, acts1, acts2, result: dict, **params) -> None:
    arrays = {f"param_{k}": np.asarray(v) for k, v in params.items()}
    if acts1 is not None:
        arrays["in_acts1"], arrays["in_acts2"] = acts1, acts2
    for key, value in result.items():
        arrays[f"out_{key}"] = np.asarray(value)
    np.savez_compressed(HERE / f"{name}.npz", **arrays)
    print(f"wrote {name}.npz: {sorted(result)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="folder holding google/svcca's cca_core.py")
    parser.add_argument("--shared-data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    sys.path.insert(0, str(args.reference))
    cca_core = importlib.import_module("cca_core")
    HERE.mkdir(exist_ok=True)

    def ref(a1, a2, **kw):
        return cca_core.get_cca_similarity(a1, a2, verbose=False, **kw)

    acts1, acts2 = _fc_gauss(np.random.default_rng(0))
    _save("fc_gauss", acts1, acts2, ref(acts1, acts2, compute_dirns=True), epsilon=0.0, threshold=0.98)
    _save("fc_gauss_t05", acts1, acts2, ref(acts1, acts2, threshold=0.5), epsilon=0.0, threshold=0.5)
    acts1, acts2 = _relu_offset(np.random.default_rng(1))
    _save("relu_offset", acts1, acts2, ref(acts1, acts2, epsilon=1e-10), epsilon=1e-10, threshold=0.98)
    acts1, acts2 = _pruned(np.random.default_rng(2))
    _save("pruned", acts1, acts2, ref(acts1, acts2, epsilon=1e-6, compute_dirns=True),
          epsilon=1e-6, threshold=0.98)
    conv1, conv2 = _conv(np.random.default_rng(3))
    for stride in (1, 2, 5):
        f1 = conv1.reshape(-1, conv1.shape[-1])
        f2 = conv2.reshape(-1, conv2.shape[-1])
        result = ref(f1.T[:, ::stride], f2.T[:, ::stride], epsilon=1e-10)
        _save(f"conv_flatten_s{stride}", conv1, conv2, result, epsilon=1e-10, threshold=0.98,
              stride=stride)
    _pwcca_cases(args.reference)
    _conv_cases(args.reference, ref)
    svhn = args.shared_data / "svcca" / "SVHN"
    if svhn.is_dir():
        a1 = _load_svcca_pickle(svhn / "model_0_lay06.p").T
        a2 = _load_svcca_pickle(svhn / "model_1_lay06.p").T
        result = ref(a1, a2, epsilon=1e-10)
        keep = {k: result[k] for k in ("cca_coef1", "mean", "sum", "x_idxs", "y_idxs")}
        _save("svhn_fc", None, None, keep, epsilon=1e-10, threshold=0.98)


if __name__ == "__main__":
    main()
