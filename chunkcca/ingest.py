"""Ingestion: activations from .npy / .npz files and google/svcca's pickled arrays into a store.

Loading a pickle runs code chosen by whoever wrote it. chunkcca reads pickles with a restricted unpickler
that admits numpy arrays only (the globals numpy's array pickling needs: ``_reconstruct``, ``ndarray``,
``dtype``, ``scalar``) and refuses anything else with an error naming the file and the global it met.
``.npy`` files are memory-mapped, so a large one is written to the store chunk by chunk.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .store import write_activations

#: The only globals a pickle may name: what numpy needs to rebuild arrays (numpy 1 and 2 module paths).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | {("numpy", "ndarray"), ("numpy", "dtype")}

LAYOUTS = ("datapoints", "neurons")


class ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and nothing else."""

    def __init__(self, file: Any, *, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{self.source}: refusing to load {module}.{name}; chunkcca reads pickles of "
                                     f"numpy arrays only")


def load_pickled_array(path: str | os.PathLike) -> np.ndarray:
    """A numpy array from a (optionally gzip-compressed) pickle, as google/svcca's tutorials ship them."""
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as file:
        value = ArrayOnlyUnpickler(file, source=str(path)).load()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a numpy array")
    return value


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of one file by name: a .npy (memory-mapped) or a pickle gives one (named ""), a .npz its own."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".npy":
        return {"": np.load(path, mmap_mode="r", allow_pickle=False)}
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    return {"": load_pickled_array(path)}


def _as_layer(array: np.ndarray, layout: str, source: str) -> np.ndarray:
    """``array`` datapoint-first (a view: a memory-mapped .npy stays on disk); ``layout="neurons"`` means
    (neurons, datapoints) as google/svcca's. :func:`chunkcca.write_activations` chunks it."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "neurons":
        if array.ndim != 2:
            raise ValueError(f"{source}: layout 'neurons' needs a 2-d (neurons, datapoints) array, got shape "
                             f"{array.shape}")
        return array.T
    return array


def ingest(path: str | os.PathLike, sources: Mapping[str, str | os.PathLike], *, layout: str = "datapoints",
           chunks: int | str = "auto", overwrite: bool = False, progress: bool = False) -> xr.DataTree:
    """Write the arrays of files into a store: layer path → file (.npy, .npz, or a pickled array).

    A .npz gives one layer per array, under ``layer/<array name>``. ``layout="neurons"`` reads 2-d arrays
    as (neurons, datapoints), google/svcca's layout, and transposes them (lazily).
    """
    layers: dict[str, Any] = {}
    for layer, source in sources.items():
        for key, array in load_arrays(source).items():
            layers[f"{layer}/{key}" if key else layer] = _as_layer(array, layout, str(source))
    return write_activations(path, layers, chunks=chunks, overwrite=overwrite, progress=progress)
