"""The demo: write a store of two synthetic models, stream CCAs over it, print a table, save a plot.

The activations are generated chunk by chunk (seeded per chunk), so the demo itself never holds
a whole layer: two "models" see the same latent image features through different random
filters and independent noise; ``conv2`` is (N, 16, 16, 64) post-ReLU, ``pool2`` its 2×2 max pool
(N, 8, 8, 64).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .measures import cca
from .store import write_activations

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


@dataclass
class PeakMemory:
    """Peak resident memory (MiB) of this process within a ``with`` block (Linux: reset per block)."""

    mib: float = float("nan")

    @contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        status = Path("/proc/self/status")
        resettable = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            resettable = True
        except OSError:
            pass
        yield self
        if resettable and status.exists():
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
            self.mib = int(line.split()[1]) / 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024


def run_demo(out: str | Path = "chunkcca-demo", *, datapoints: int = 2000, chunk: int = 250, seed: int = 0,
             precision: str = "float32", progress: bool = True, scheduler: str | None = None) -> dict[str, xr.Dataset]:
    """Write the demo store under ``out``, run the comparisons, print a table and save the plot."""
    from .cli import format_table, save_figure
    from .plot import plot_rho

    out = Path(out)
    store_path = out / "demo.zarr"
    print(f"writing {datapoints} datapoints x 2 models x (conv2 16x16x64, pool2 8x8x64) to {store_path}")
    tree = write_activations(store_path, demo_layers(datapoints, chunk=chunk, seed=seed), chunks=chunk,
                             overwrite=True, progress=progress)
    runs = [
        ("conv2 vs conv2", "model0/conv2", "model1/conv2", "flatten", 1),
        ("conv2 vs conv2", "model0/conv2", "model1/conv2", "flatten", 2),
        ("pool2 vs pool2", "model0/pool2", "model1/pool2", "flatten", 1),
        ("conv2 vs pool2", "model0/conv2", "model1/pool2", "avgpool", 1),
    ]
    if datapoints <= CHANNELS:
        runs = runs[:-1]
        print(f"(avgpool comparison skipped: {datapoints} datapoints give too few rows for {CHANNELS} channels)")
    results: dict[str, xr.Dataset] = {}
    table = [("comparison", "spatial", "stride", "rows", "mean rho", "seconds", "peak MiB")]
    for label, layer_a, layer_b, spatial, stride in runs:
        peak = PeakMemory()
        with peak.measure():
            start = time.perf_counter()
            result = cca(tree[layer_a], tree[layer_b], spatial=spatial, stride=stride, precision=precision,
                         progress=progress, scheduler=scheduler)
            seconds = time.perf_counter() - start
        results[f"{label}, {spatial}, stride {stride}"] = result
        table.append((label, spatial, str(stride), str(int(result["rows"])), f"{float(result['rho_mean']):.4f}",
                      f"{seconds:.2f}", f"{peak.mib:.0f}"))
    print(format_table(table))
    save_figure(lambda: plot_rho(results, title=f"chunkcca demo: {datapoints} datapoints, two models").figure,
                out / "cca_coefficients.png", dpi=120)
    return results
