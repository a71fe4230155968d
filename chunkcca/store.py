"""Activation stores: validate layers, write them to zarr (v3) and open them lazily as a DataTree.

A store is a zarr hierarchy; each layer is a node (e.g. ``model0/conv2``) holding the variable
``activations`` with dims (datapoint, height, width, channel), or (datapoint, channel) for a
fully connected layer. Coordinates: ``datapoint`` (an id per input example), ``channel``, and
``height``/``width`` as pixel-centre positions in input-image units. Only ``datapoint`` is
chunked, so each chunk holds whole spatial maps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ._fs import filesystem, is_url, write_atomically
from .layers import VARIABLE, as_activations, datapoints_per_chunk
from .rows import pixel_centres

COMPRESSIONS: tuple[str | None, ...] = ("lz4", "zstd", None)


def codecs_for(compression: str | None) -> tuple[Any, ...]:
    """zarr v3 compressors: Blosc-LZ4 (fast decode), Blosc-zstd (smaller, slower) or none (fastest reads)."""
    from zarr.codecs import BloscCodec

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression is None:
        return ()
    return (BloscCodec(cname=compression, clevel=5 if compression == "lz4" else 3, shuffle="shuffle"),)


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
        fs, root = filesystem(location, storage_options)
        if not fs.exists(f"{root}/zarr.json"):
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
        # where the layer's files are: named by read errors, hashed by checkpoints (checkpoint.store_signature)
        tree[layer][VARIABLE].encoding.update(store=location, layer=layer,
                                              storage_options=dict(storage_options or {}))
    return tree


def layer_paths(tree: xr.DataTree) -> list[str]:
    """Paths (without the leading '/'), sorted, of the nodes of ``tree`` that hold activations."""
    return sorted(node.path.strip("/") for node in tree.subtree if VARIABLE in node.data_vars)


def describe_store(path: str | os.PathLike, *,
                   storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The layers of a store: for each, its path, shape, dims, datapoints per chunk, chunks, dtype, bytes and
    bytes on disk (what ``chunkcca info`` prints). Reads metadata and a listing of files, no data."""
    tree = open_activations(path, storage_options=storage_options)
    fs, root = filesystem(tree[layer_paths(tree)[0]][VARIABLE].encoding["store"], storage_options)
    rows = []
    for layer in layer_paths(tree):
        array = tree[layer][VARIABLE]
        rows.append({"layer": layer, "shape": list(array.shape), "dims": list(map(str, array.dims)),
                     "datapoints_per_chunk": int(array.data.chunks[0][0]), "chunks": int(array.data.numblocks[0]),
                     "dtype": str(array.dtype), "bytes": int(array.nbytes),
                     "bytes_on_disk": int(fs.du(f"{root}/{layer}"))})
    return rows


def save_result(result: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a result to a local netCDF file (``.nc``) or zarr store (``.zarr``), atomically: a temporary file
    beside ``path`` renamed into place, so an interrupted write leaves any older file whole."""
    suffix = Path(path).suffix
    if suffix == ".zarr":
        write_atomically(path, lambda tmp: result.to_zarr(tmp, zarr_format=3, consolidated=False),
                         overwrite=overwrite)
    elif suffix == ".nc":
        write_atomically(path, lambda tmp: result.to_netcdf(tmp), overwrite=overwrite)
    else:
        raise ValueError(f"{path}: name a netCDF file (.nc) or a zarr store (.zarr)")
