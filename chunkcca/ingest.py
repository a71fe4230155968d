"""Ingestion: activations from .npy / .npz files and google/svcca's pickled arrays into a store.

Loading a pickle runs code chosen by whoever wrote it. chunkcca reads pickles with a restricted unpickler
that admits numpy arrays only (the globals numpy's array pickling needs: ``_reconstruct``, ``ndarray``,
``dtype``, ``scalar``) and refuses anything else with an error naming the file and the global it met.
``.npy`` files are memory-mapped, so a large one is written to the store chunk by chunk. Pickles and .npz
members are loaded whole, but one at a time: :func:`ingest` writes layer by layer, so it holds at most one
loaded file (or .npz member) however many it ingests.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import xarray as xr

from ._fs import write_atomically
from .layers import datapoints_per_chunk
from .rows import pixel_centres
from .store import open_activations, write_activations

#: The only globals a pickle may name: what numpy needs to rebuild arrays (numpy 1 and 2 module paths).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | {("numpy", "ndarray"), ("numpy", "dtype")}

#: How a file's axes are laid out: datapoint first and channel last (chunkcca's), google/svcca's 2-d
#: (neurons, datapoints), or PyTorch's channels-first (datapoint, channel, height, width).
LAYOUTS = ("datapoints", "neurons", "channels_first")


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


def iter_arrays(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """The arrays of one file by name, loaded one at a time as they are asked for: a .npy (memory-mapped) or
    a pickle gives one (named ""), a .npz its own, each member read only when its turn comes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        if path.suffix == ".npy":
            yield "", np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                for key in archive.files:
                    yield key, archive[key]
        else:
            yield "", load_pickled_array(path)
    except (ValueError, OSError, EOFError) as error:  # numpy's messages do not name the file
        if str(path) in str(error):
            raise
        raise ValueError(f"cannot read {path} as a {path.suffix or 'pickle'} array file: {error}") from error


def _array_names(path: str | os.PathLike) -> list[str]:
    """The names :func:`iter_arrays` gives for a file, without loading any array (an .npz's directory only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return list(archive.files)
    return [""]


def _as_layer(array: np.ndarray, layout: str, source: str) -> np.ndarray:
    """``array`` datapoint-first, channel-last (a view: a memory-mapped .npy stays on disk); ``layout="neurons"``
    means (neurons, datapoints) as google/svcca's, "channels_first" (datapoint, channel, height, width) as
    PyTorch's (:func:`ingest` has checked ``layout``). :func:`chunkcca.write_activations` chunks it."""
    if layout == "neurons":
        if array.ndim != 2:
            raise ValueError(f"{source}: layout 'neurons' needs a 2-d (neurons, datapoints) array, got shape "
                             f"{array.shape}")
        return array.T
    if layout == "channels_first":
        if array.ndim != 4:
            raise ValueError(f"{source}: layout 'channels_first' needs a 4-d (datapoint, channel, height, width) "
                             f"array, got shape {array.shape}")
        return np.moveaxis(array, 1, -1)
    return array


class _Loaded:
    """An array in memory, seen by Dask only through slicing, until :meth:`release`.

    ``dask.array.from_array`` copies a numpy array whole (doubling the memory a loaded file takes), and the
    graph that holds it outlives :func:`chunkcca.write_activations` in reference cycles until the garbage
    collector runs; through this wrapper Dask reads chunk by chunk without a copy, and ``release`` drops the
    array however long the graph lives.
    """

    def __init__(self, data: np.ndarray) -> None:
        self.data: np.ndarray | None = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        if self.data is None:
            raise RuntimeError("the array was released")
        return self.data[key]

    def as_dask(self, chunks: int | str) -> Any:
        """Chunked as :func:`chunkcca.write_activations` will write it (so it does not rechunk)."""
        import dask.array as da

        per_chunk = datapoints_per_chunk(self.shape, self.dtype.itemsize, chunks)
        return da.from_array(self, chunks=(per_chunk, *self.shape[1:]), name=False, asarray=False,
                             meta=np.empty((0,) * self.ndim, dtype=self.dtype))

    def release(self) -> None:
        self.data = None


def ingest(path: str | os.PathLike, sources: Mapping[str, str | os.PathLike], *, layout: str = "datapoints",
           chunks: int | str = "auto", overwrite: bool = False, progress: bool = False) -> xr.DataTree:
    """Write the arrays of files into a store: layer path → file (.npy, .npz, or a pickled array).

    A .npz gives one layer per array, under ``layer/<array name>``. ``layout="neurons"`` reads 2-d arrays
    as (neurons, datapoints), google/svcca's layout, and ``layout="channels_first"`` 4-d arrays as
    (datapoint, channel, height, width), PyTorch's; both are transposed lazily.

    The store is the one :func:`chunkcca.write_activations` would write from all the arrays at once, but it is
    written layer by layer, so at most one pickle or .npz member is in memory at a time (a .npy is
    memory-mapped and streamed chunk by chunk). It is written to a temporary folder and renamed into place.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    seen: set[str] = set()
    for layer, source in sources.items():  # every file exists and no layer comes twice, before writing any
        for key in _array_names(source):
            name = _layer_name(layer, key)
            if name in seen:
                raise ValueError(f"layer {name!r} is given twice ({source} gives it again)")
            seen.add(name)
    if not seen:
        raise ValueError("ingest needs at least one layer")

    def write(tmp: Path) -> None:
        parts = tmp / ".parts"
        image: dict[str, tuple[int, int]] = {}  # 4-d layer → its height and width
        written = 0
        try:
            for layer, source in sources.items():
                # No zip/enumerate around iter_arrays: they keep their last item while fetching the next.
                for key, array in iter_arrays(source):
                    name, part = _layer_name(layer, key), parts / str(written)
                    values = _as_layer(array, layout, str(source))
                    if values.ndim == 4:
                        image[name] = (int(values.shape[1]), int(values.shape[2]))
                    if isinstance(values, np.memmap):  # write_activations streams it from the file
                        write_activations(part, {name: values}, chunks=chunks, progress=progress)
                    else:
                        loaded = _Loaded(values)
                        try:
                            write_activations(part, {name: loaded.as_dask(chunks)}, chunks=chunks,
                                              progress=progress)
                        finally:
                            loaded.release()
                    del array, values  # before the next one is loaded
                    _move_layer(part, tmp, name)
                    written += 1
        finally:
            shutil.rmtree(parts, ignore_errors=True)
        _place_pixels(tmp, image)

    write_atomically(path, write, overwrite=overwrite)
    return open_activations(path)


def _layer_name(layer: str, key: str) -> str:
    return f"{layer}/{key}".strip("/") if key else str(layer).strip("/")


def _move_layer(part: Path, store: Path, layer: str) -> None:
    """Move one layer's node from ``part`` (a store :func:`chunkcca.write_activations` wrote) into ``store``,
    with the group metadata of the root and the layer's parents where ``store`` has none yet.

    A zarr v3 store on disk keeps each node in a folder of its path, its metadata in the folder's
    ``zarr.json``, so a node moves with its folder.
    """
    node = PurePosixPath(layer)
    for group in [*reversed(node.parents), node]:
        (store / group).mkdir(parents=True, exist_ok=True)
        if not (store / group / "zarr.json").exists():
            os.replace(part / group / "zarr.json", store / group / "zarr.json")
    for child in (part / node).iterdir():
        if child.name != "zarr.json":
            os.replace(child, store / node / child.name)


def _place_pixels(store: Path, image: dict[str, tuple[int, int]]) -> None:
    """Set the ``height``/``width`` coordinates of 4-d layers in units of the largest map of all layers, as
    :func:`chunkcca.write_activations` does when given all layers at once (each layer was written alone, in
    units of its own map): pixel i of an s-pixel map at (i + 0.5) · extent / s."""
    import zarr

    if not image:
        return
    extent = (max(h for h, _ in image.values()), max(w for _, w in image.values()))
    for layer, own in image.items():
        for dim, size, full in zip(("height", "width"), own, extent, strict=True):
            if size != full:
                zarr.open_array(store / layer / dim, mode="r+")[...] = pixel_centres(size, full)
