"""Activation stores: validate layers, write them to zarr (v3) and open them lazily as a DataTree.

A store is a zarr hierarchy; each layer is a node (e.g. ``model0/conv2``) holding the variable
``activations`` with dims (datapoint, height, width, channel), or (datapoint, channel) for a
fully connected layer. Coordinates: ``datapoint`` (an id per input example), ``channel``, and
``height``/``width`` as pixel-centre positions in input-image units. Only ``datapoint`` is
chunked, so each chunk holds whole spatial maps.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from .moments import is_url, write_atomically

VARIABLE = "activations"
CONV_DIMS: tuple[str, ...] = ("datapoint", "height", "width", "channel")
FC_DIMS: tuple[str, ...] = ("datapoint", "channel")
#: Bytes per datapoint chunk that ``chunks="auto"`` aims for.
CHUNK_BYTES = 16 * 2**20


def _size_zarr_thread_pool() -> None:
    """Give zarr's decoding thread pool one thread per core, unless the user configured it.

    zarr's default (cores + 4 threads) oversubscribes CPU-bound Blosc decoding, and every extra thread
    grows glibc's malloc arenas: streaming a 16 GiB store peaked at 570 MiB with the default against
    420 MiB with one thread per core, at the same speed (docs/performance.md).
    """
    import zarr

    if zarr.config.get("threading.max_workers", None) is None:
        zarr.config.set({"threading.max_workers": os.cpu_count() or 2})


_size_zarr_thread_pool()


COMPRESSIONS: tuple[str | None, ...] = ("lz4", "zstd", None)


def codecs_for(compression: str | None) -> tuple[Any, ...]:
    """zarr v3 compressors: Blosc-LZ4 (fast decode), Blosc-zstd (smaller, slower) or none (fastest reads)."""
    from zarr.codecs import BloscCodec

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression is None:
        return ()
    return (BloscCodec(cname=compression, clevel=5 if compression == "lz4" else 3, shuffle="shuffle"),)


def datapoints_per_chunk(shape: tuple[int, ...], itemsize: int, chunks: int | str = "auto") -> int:
    """Datapoints per chunk: ``chunks`` itself, or for "auto" as many as fit :data:`CHUNK_BYTES`."""
    if chunks == "auto":
        per_datapoint = int(np.prod(shape[1:])) * itemsize
        return int(max(1, CHUNK_BYTES // max(per_datapoint, 1)))  # Dask clips it to the array's length
    if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise ValueError(f"chunks must be a positive number of datapoints or 'auto', got {chunks!r}")
    return int(chunks)


def as_activations(layer: Any, name: str | None = None, *, chunks: int | str = "auto",
                   allow_complex: bool = False, dims: Sequence[str] | Mapping[Hashable, str] | None = None,
                   ) -> xr.DataArray:
    """One layer as a Dask-backed DataArray with dims (datapoint, [height, width,] channel).

    ``layer`` is a numpy or Dask array (axis 0 = datapoint, last axis = channel), a DataArray
    with those dim names (in any order), a Dataset or DataTree node holding ``activations``.
    ``dims`` names the axes of an array explicitly (e.g. ``("datapoint", "channel", "height",
    "width")`` for channels-first data) or maps a DataArray's dim names to these. A 4-d array
    without ``dims`` whose last two axes are equal and differ from axis 1 looks channels-first
    and is refused. ``name`` names the layer in error messages (default: the node path or
    DataArray name). Complex values are refused unless ``allow_complex``. Raises a ValueError
    or TypeError naming the layer and the fault. Nothing is computed.
    """
    if isinstance(layer, xr.DataTree):
        name = name or layer.path.lstrip("/") or "/"
        layer = layer.to_dataset()
    if isinstance(layer, xr.Dataset):
        if VARIABLE not in layer:
            raise ValueError(f"layer {name!r} has no variable {VARIABLE!r} (has {sorted(map(str, layer))})")
        layer = layer[VARIABLE]
    if isinstance(layer, xr.DataArray):
        if layer.name in (None, VARIABLE) and layer.encoding.get("layer"):  # a store's: named by its node path
            name = name or layer.encoding["layer"]
        name = name or (str(layer.name) if layer.name is not None else "activations")
        if isinstance(dims, Mapping):
            layer = layer.rename({old: new for old, new in dims.items() if old in layer.dims})
        array = _order_dims(layer, name)
    else:
        if not hasattr(layer, "shape") or not hasattr(layer, "dtype"):
            raise TypeError(f"layer {name!r}: expected a numpy/Dask array or xarray object, got {type(layer).__name__}")
        name = name or "activations"
        if dims is not None and not isinstance(dims, Mapping):
            if len(dims) != layer.ndim:
                raise ValueError(f"dims names {len(dims)} axes but layer {name!r} has {layer.ndim}")
            array = _order_dims(xr.DataArray(layer, dims=tuple(dims), name=name), name)
        else:
            if layer.ndim not in (2, 4):
                raise ValueError(
                    f"layer {name!r} has {layer.ndim} dims (shape {tuple(layer.shape)}); expected "
                    f"(datapoint, height, width, channel) or (datapoint, channel)")
            if layer.ndim == 4 and layer.shape[2] == layer.shape[3] != layer.shape[1]:
                raise ValueError(
                    f"layer {name!r} looks channels-first: shape {tuple(layer.shape)} has equal last two axes; "
                    f"chunkcca expects (datapoint, height, width, channel). Name the axes with "
                    f"dims=('datapoint', 'channel', 'height', 'width'), or with "
                    f"dims=('datapoint', 'height', 'width', 'channel') if it is channels-last")
            array = xr.DataArray(layer, dims=CONV_DIMS if layer.ndim == 4 else FC_DIMS, name=name)
    _check_values(array, name, allow_complex)
    labels = array.indexes.get("datapoint")
    if labels is not None and not labels.is_unique:
        repeated = labels[labels.duplicated()].unique()[:5].tolist()
        raise ValueError(f"layer {name!r} has repeated datapoint labels, e.g. {repeated}")
    if array.chunks is None:  # numpy, or a lazily indexed backend array: chunk it without reading it
        preferred = array.encoding.get("preferred_chunks", {}).get("datapoint")
        per_chunk = preferred if chunks == "auto" and preferred else datapoints_per_chunk(
            array.shape, array.dtype.itemsize, chunks)
        if isinstance(array.variable._data, np.memmap):  # numpy, maybe in a DataArray (not a lazy backend array)
            array = array.copy(data=_memmap_to_dask(array.variable._data, per_chunk))
        else:
            array = array.chunk({dim: per_chunk if dim == "datapoint" else -1 for dim in array.dims})
    return array.rename(name)


class _FileSlices:
    """A memory-mapped array seen only through slicing: ``dask.array.from_array`` copies (reads) whole
    array-likes that have a ``copy`` method, and hashes them for a name; this one is read chunk by chunk."""

    def __init__(self, data: np.memmap) -> None:
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self.data[key])


def _memmap_to_dask(data: np.memmap, per_chunk: int) -> da.Array:
    """A memory-mapped array as Dask chunks read from its file on demand, named by file, offset and layout."""
    from dask.base import tokenize

    source = Path(str(data.filename))
    mapping = data
    while isinstance(mapping.base, np.ndarray):  # up to the array over the whole mapping
        mapping = mapping.base
    start = data.__array_interface__["data"][0] - mapping.__array_interface__["data"][0]  # of a view, e.g. m[100:]
    token = tokenize(str(source), source.stat().st_mtime_ns, data.offset, start, data.shape, data.strides,
                     str(data.dtype))
    return da.from_array(_FileSlices(data), chunks=(per_chunk, *data.shape[1:]), name=f"memmap-{token}",
                         meta=np.empty((0,) * data.ndim, dtype=data.dtype))


def _order_dims(array: xr.DataArray, name: str) -> xr.DataArray:
    for dims in (CONV_DIMS, FC_DIMS):
        if set(array.dims) == set(dims):
            return array.transpose(*dims)
    raise ValueError(
        f"layer {name!r} has dims {tuple(map(str, array.dims))}; expected {CONV_DIMS} or {FC_DIMS} "
        f"(rename yours with DataArray.rename)")


def _check_values(array: xr.DataArray, name: str, allow_complex: bool = False) -> None:
    dtype = array.dtype
    complex_refused = np.issubdtype(dtype, np.complexfloating) and not allow_complex
    if dtype.kind == "b" or not np.issubdtype(dtype, np.number) or complex_refused:
        raise TypeError(f"layer {name!r} has dtype {dtype}; expected real numbers (float or integer)")
    empty = [str(dim) for dim, size in array.sizes.items() if size == 0]
    if empty:
        raise ValueError(f"layer {name!r} is empty: dim {', '.join(empty)} has size 0 (shape {array.shape})")


def pixel_centres(size: int, extent: float) -> np.ndarray:
    """Centres of the pixels of a ``size``-pixel map spanning ``extent`` (input-image units): (i + 0.5)·extent/size."""
    return (np.arange(size) + 0.5) * (extent / size)


def _labelled(array: xr.DataArray, image_size: tuple[float, float]) -> xr.DataArray:
    """Add default coordinates where missing: datapoint and channel indices, pixel centres."""
    coords: dict[Hashable, Any] = {}
    for dim in ("datapoint", "channel"):
        if dim not in array.coords:
            coords[dim] = np.arange(array.sizes[dim])
    for dim, extent in zip(("height", "width"), image_size):
        if dim in array.dims and dim not in array.coords:
            coords[dim] = pixel_centres(array.sizes[dim], extent)
    for name, coord in array.coords.items():
        if coord.dtype.kind == "U":  # fixed-width unicode has no stable zarr v3 spec; vlen strings do
            coords[name] = coord.astype(object)
    return array.assign_coords(coords)


def write_activations(path: str | os.PathLike, layers: Mapping[str, Any], *, chunks: int | str = "auto",
                      image_size: int | tuple[int, int] | None = None, overwrite: bool = False,
                      compression: str | None = "lz4", progress: bool = False) -> xr.DataTree:
    """Write layers to a zarr (v3) store at ``path`` and return it opened with :func:`open_activations`.

    Parameters
    ----------
    layers
        Layer path (e.g. ``"model0/conv2"``) → numpy array, Dask array or DataArray of dims
        (datapoint, height, width, channel) or (datapoint, channel). Dask inputs are written
        chunk by chunk, never materialised.
    chunks
        Datapoints per zarr chunk, or "auto" for about 16 MiB per chunk. Only datapoint is chunked.
    image_size
        Height and width of the input images, for the ``height``/``width`` pixel-centre
        coordinates of layers that have none: pixel i of an s-pixel map sits at
        (i + 0.5)·image_size/s. Default: the largest height/width among ``layers``.
    compression
        "lz4" (default: Blosc-LZ4 with byte shuffle, which decodes fast), "zstd" (smaller files,
        slower reads) or None (no compression: the fastest reads when decoding is the bottleneck).
    overwrite
        Replace an existing store. The new store is written to a temporary folder beside
        ``path`` and renamed into place, so an interrupted write never leaves a partial store.
    """
    if not layers:
        raise ValueError("write_activations needs at least one layer")
    compressors = codecs_for(compression)
    arrays = {str(key).strip("/"): as_activations(value, str(key).strip("/"), chunks=chunks)
              for key, value in layers.items()}
    if image_size is None:
        spatial = [(a.sizes.get("height", 1), a.sizes.get("width", 1)) for a in arrays.values()]
        image_size = (max(s[0] for s in spatial), max(s[1] for s in spatial))
    elif isinstance(image_size, (int, np.integer)):
        image_size = (int(image_size), int(image_size))
    datasets: dict[str, xr.Dataset] = {}
    encoding: dict[str, dict[str, Any]] = {}
    for key, array in arrays.items():
        array = _labelled(array, image_size)
        per_chunk = datapoints_per_chunk(array.shape, array.dtype.itemsize, chunks)
        array = array.chunk({dim: (per_chunk if dim == "datapoint" else -1) for dim in array.dims})
        datasets[key] = xr.Dataset({VARIABLE: array.rename(None)})
        encoding["/" + key] = {VARIABLE: {"chunks": array.data.chunksize, "compressors": compressors}}
    tree = xr.DataTree.from_dict(datasets)

    def write(tmp: Path) -> None:
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):
                tree.to_zarr(tmp, encoding=encoding, zarr_format=3, consolidated=False)
        else:
            tree.to_zarr(tmp, encoding=encoding, zarr_format=3, consolidated=False)

    write_atomically(path, write, overwrite=overwrite)
    return open_activations(path)


def open_activations(path: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> xr.DataTree:
    """Open a store read-only as a lazy, Dask-backed DataTree chunked along datapoint only.

    ``path`` is a local path or an fsspec URL (``"s3://bucket/acts.zarr"``, ``"file:///shared/acts.zarr"``;
    the protocol's fsspec package must be installed), with ``storage_options`` for its filesystem
    (credentials, endpoint). Every node holding ``activations`` is checked for dims and dtype;
    nothing is read but metadata.
    """
    location = str(path) if is_url(str(path)) else os.path.abspath(path)  # one Dask name for any spelling
    if is_url(location):
        filesystem, root = store_filesystem(location, storage_options)
        if not filesystem.exists(f"{root}/zarr.json"):
            raise FileNotFoundError(f"no activation store at {location}")
    elif storage_options:
        raise ValueError(f"storage_options apply to fsspec URLs only, not to the local path {location}")
    elif not Path(location).exists():
        raise FileNotFoundError(f"no activation store at {location}")
    try:
        tree = xr.open_datatree(location, engine="zarr", chunks={}, consolidated=False,
                                storage_options=dict(storage_options) if storage_options else None)
    except Exception as error:
        raise ValueError(f"cannot open {location} as a zarr activation store: {error}") from error
    found = layer_paths(tree)
    if not found:
        raise ValueError(f"{location} holds no layer (no node with a variable {VARIABLE!r})")
    for layer in found:
        as_activations(tree[layer], layer)
        # where the layer's files are: named by read errors (pairs.reading), hashed by checkpoints (store_signature)
        tree[layer][VARIABLE].encoding.update(store=location, layer=layer,
                                              storage_options=dict(storage_options or {}))
    return tree


#: File details that change when a file is rewritten: local size and mtime, object stores' ETags and versions.
SIGNATURE_FIELDS = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "updated", "generation",
                    "md5Hash", "version_id")


def store_signature(array: xr.DataArray) -> str | None:
    """A hash of the names (within the layer), sizes and modification times (or ETags) of the files that hold
    a store-backed layer as opened by :func:`open_activations`; None for other arrays (and for arrays computed
    from one, which lose the store in their encoding). It changes when the store is rewritten or edited, not
    when it is read, moved, mounted elsewhere or has its permissions changed. Reads one listing of the layer's
    folder, no data."""
    encoding = array.encoding
    if "store" not in encoding or "layer" not in encoding:
        return None
    filesystem, root = store_filesystem(encoding["store"], encoding.get("storage_options"))
    folder = f"{root}/{encoding['layer']}/{VARIABLE}".rstrip("/")
    files = filesystem.find(folder, detail=True)
    listing = sorted((name.removeprefix(folder), [info.get(key) for key in SIGNATURE_FIELDS])
                     for name, info in files.items())
    return hashlib.sha1(json.dumps(listing, default=str).encode()).hexdigest()


def store_filesystem(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and root path of a store given as a local path or a URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(location), **dict(storage_options or {}))


def layer_paths(tree: xr.DataTree) -> list[str]:
    """Paths (without the leading '/'), sorted, of the nodes of ``tree`` that hold activations."""
    return sorted(node.path.strip("/") for node in tree.subtree if VARIABLE in node.data_vars)
