"""The demo: write a store of two synthetic models, stream CCAs over it, print a table, save a plot.

The layers come from ``chunkcca.datasets.demo_layers()``, generated chunk by chunk, so the demo
itself never holds a whole layer.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import xarray as xr
from dask.utils import format_bytes

from ._fs import ORDER_ATTR, check_replaceable, check_writable, expanded, zarr_attributes
from .api import cca
from .datasets import CHANNELS, SIZE, demo_layers
from .options import StreamOptions, check_flag, check_int
from .plot import plot_rho
from .report import PeakMemory, format_table, is_chunkcca_plot, save_figure
from .store import write_activations


def _check_room(out: Path, datapoints: int) -> None:
    """Refuse, before writing, a store whose values take more than the free space where ``out`` is made: the demo
    ran until the disk filled, or until the task list of its chunks filled memory and the process was killed
    without a word (``--datapoints 10000000000``). LZ4 stores about 89% of the demo's values."""
    values = datapoints * 2 * (SIZE * SIZE + (SIZE // 2) ** 2) * CHANNELS * 4  # two models' conv2 and pool2, float32
    place = out.absolute()
    while not place.exists():  # the folder it is made in
        place = place.parent
    check_writable(place, f"--out {out}")  # a read-only mount was said to have too little room (0 bytes free)
    free = shutil.disk_usage(place).free
    if values > free:
        raise OSError(f"{datapoints} datapoints make a demo store of up to {format_bytes(values)} (about 160 kiB a "
                      f"datapoint), more than the {format_bytes(free)} free under {place}: choose fewer --datapoints "
                      f"or another --out")


def run_demo(out: str | Path = "chunkcca-demo", *, datapoints: int = 2000, chunk: int = 250, seed: int = 0,
             precision: str = "auto", progress: bool = True, scheduler: str | None = None) -> dict[str, xr.Dataset]:
    """Write the demo store under ``out`` (replacing only a store an earlier demo wrote there), run the
    comparisons, print a table and save the plot."""
    # every option before anything is written (a bad precision failed in the first comparison, after the store)
    datapoints, chunk, seed = check_int("datapoints", datapoints), check_int("chunk", chunk), check_int("seed", seed, 0)
    progress = check_flag("progress", progress)
    StreamOptions.from_kwargs("run_demo", {"precision": precision, "scheduler": scheduler})
    out = Path(expanded(out))
    if out.exists() and not out.is_dir():  # it said "[Errno 17] File exists" after writing nothing
        raise FileExistsError(f"{out} exists and is not a folder: the demo writes its store and plot into a folder; "
                              f"choose another --out")
    if not out.absolute().parent.is_dir():  # a typo in a folder is not a new folder: it made the whole chain
        raise ValueError(f"--out {out}: no folder {out.absolute().parent} to make it in")
    store_path, plot_path = out / "demo.zarr", out / "cca_coefficients.png"
    try:  # before the work, which it followed, naming a remedy of the API's (overwrite=True)
        check_replaceable(plot_path, True, is_chunkcca_plot, "a plot")
    except FileExistsError:
        raise FileExistsError(f"{plot_path} exists and is not a plot the demo drew: the demo replaces only its own; "
                              f"choose another --out") from None
    _check_room(out, datapoints)
    layers = demo_layers(datapoints, chunk=chunk, seed=seed)
    if os.path.lexists(store_path) and zarr_attributes(store_path).get(ORDER_ATTR) != list(layers):
        raise ValueError(f"{store_path} exists and is not a store the demo wrote (its layers are not "
                         f"{', '.join(layers)}): the demo replaces only its own; choose another --out")
    print(f"writing {datapoints} datapoints x 2 models x (conv2 16x16x64, pool2 8x8x64) to {store_path}")
    tree = write_activations(store_path, layers, chunks=chunk, overwrite=True, progress=progress)
    runs = [
        ("conv2 vs conv2", "model0/conv2", "model1/conv2", "flatten", 1),
        ("conv2 vs conv2", "model0/conv2", "model1/conv2", "flatten", 2),
        ("pool2 vs pool2", "model0/pool2", "model1/pool2", "flatten", 1),
        ("conv2 vs pool2", "model0/conv2", "model1/pool2", "avgpool", 1),
    ]
    if datapoints <= 2 * CHANNELS:  # one row a datapoint for the pair's channels together: a singular covariance
        runs = runs[:-1]
        print(f"(avgpool comparison skipped: {datapoints} datapoints give too few rows for the pair's "
              f"{2 * CHANNELS} channels)")
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
                plot_path, overwrite=True, dpi=120)  # its own plot of an earlier run, only
    print(f"plot: {plot_path}")
    return results
