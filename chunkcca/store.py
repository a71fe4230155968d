"""Activation stores: validate layers, write them to zarr (v3) and open them lazily as a DataTree.

A store is a zarr hierarchy; each layer is a node (e.g. ``model0/conv2``) holding the variable
``activations`` with dims (datapoint, height, width, channel), or (datapoint, channel) for a
fully connected layer. Coordinates: ``datapoint`` (an id per input example), ``channel``, and
``height``/``width`` as pixel-centre positions in input-image units. Only ``datapoint`` is
chunked, so each chunk holds whole spatial maps.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from ._fs import (
    FINDER_FILES,
    ORDER_ATTR,
    array_foreign,
    check_local,
    check_outside_stores,
    check_replaceable,
    check_writable,
    every_chunk_written,
    exclusive,
    expanded,
    fails_checksum,
    filesystem,
    group_foreign_files,
    is_stale,
    is_url,
    leftovers,
    naming_target,
    owner_record,
    path_under,
    store_holding,
    temporary_beside,
    write_atomically,
    zarr_attributes,
)
from ._stack import user_stacklevel
from .integrity import (
    APPENDING_ATTR,
    CHUNKS_ATTR,
    DATAPOINTS_ATTR,
    DECODING_ATTR,
    LOST_CHUNKS,
    METADATA_ATTR,
    ChunkPlaces,
    Listing,
    check_chunks,
    check_label_places,
    check_metadata,
    check_places,
    check_shards,
    check_store_files,
    checksummed,
    chunk_checksums,
    chunk_reader,
    chunk_records,
    datapoint_kinds,
    decoded_by,
    file_sizes,
    lost_chunks,
    metadata_digests,
    parsed_metadata,
)
from .layers import (
    VARIABLE,
    as_activations,
    boolean_mask,
    check_chunk_bytes,
    check_datapoint_coords,
    check_layer_paths,
    check_value_rounding,
    chunk_of,
    differing_labels,
    holding_pair,
    holds_positions,
    labelled_as,
    layer_path,
    layer_paths,
    mask_as_opened,
    merged_datapoint_coords,
    nothing_to_pad,
    with_datapoint_coords,
    zarr_arrays,
)
from .options import (
    MASK,
    NETCDF_LARGEST_INT,
    POSITIONS_ATTR,
    check_choice,
    check_flag,
    check_mapping,
    check_output_place,
    check_storage_options,
    check_zarr_settings,
    netcdf_int_error,
)
from .progress import Progress
from .rows import pixel_centres

#: Root attributes of a store: the input image size (height, width) its layers' pixel centres are measured in,
#: and its generation (new each time the store is written whole), by which a reader sees a replacement.
IMAGE_ATTR = "chunkcca_image_size"
GENERATION_ATTR = "chunkcca_generation"
#: The lock file beside a store (``.<store name>.append-lock``) that serialises the last step of appends to it.
APPEND_LOCK = ".{name}.append-lock"
WriteMode = Literal["w", "a"]
#: Builds a store's layers in a fresh folder, given the image size the existing store measures pixel
#: centres in (None for a new store); returns the layer paths it wrote, in order, and the image size it used.
Build = Callable[[Path, "tuple[int, int] | None"], "tuple[list[str], tuple[int, int] | None]"]

COMPRESSIONS: tuple[str | None, ...] = ("lz4", "zstd", None)


def codecs_for(compression: str | None) -> tuple[Any, ...]:
    """zarr v3 bytes codecs: Blosc-LZ4 (fast decode), Blosc-zstd (smaller, slower) or no compression (fastest
    reads), then a CRC32C checksum of each stored chunk, which zarr verifies on every read (a corrupted chunk is
    an error, never a different number)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression is None:
        return (Crc32cCodec(),)
    return (BloscCodec(cname=compression, clevel=5 if compression == "lz4" else 3, shuffle="shuffle"),
            Crc32cCodec())


def default_coords(sizes: Mapping[Hashable, int], image_size: tuple[float, float] | None = None,
                   ) -> dict[Hashable, np.ndarray]:
    """A layer's default coordinates, by dim size: datapoint, channel and position indices (a token's index, a
    time step), and for height and width the pixel centres in input-image units (pixel i of an s-pixel map at
    (i + 0.5) · image / s; the map's own pixels without ``image_size``)."""
    coords: dict[Hashable, np.ndarray] = {}
    for dim, size in sizes.items():
        if dim in ("height", "width"):
            coords[dim] = pixel_centres(size, image_size[("height", "width").index(dim)] if image_size else size)
        else:
            coords[dim] = np.arange(size)
    return coords


def _labelled(array: xr.DataArray, image_size: tuple[float, float]) -> xr.DataArray:
    """Add default coordinates (``default_coords``) where missing; datapoint positions marked as such
    (``POSITIONS_ATTR``), so that the layer pairs by position, not by them."""
    coords: dict[Hashable, Any] = {dim: values for dim, values in default_coords(array.sizes, image_size).items()
                                   if dim not in array.coords}
    if "datapoint" in coords:
        coords["datapoint"] = xr.Variable("datapoint", coords["datapoint"], {POSITIONS_ATTR: True})
    elif holds_positions(array) and not np.array_equal(array["datapoint"].values, np.arange(array.sizes["datapoint"])):
        # a selection or reordering of a layer another store holds without labels: its positions there are not
        # this store's, but which of those datapoints it holds (paired with this store's positions, they were
        # taken for them: CKA 0.013 for 0.574)
        coords["datapoint"] = xr.Variable("datapoint", array["datapoint"].values)
    for name, coord in array.coords.items():
        if coord.dtype.kind == "U":  # fixed-width unicode has no stable zarr v3 spec; vlen strings do
            coords[name] = coord.astype(object)
    return array.assign_coords(coords)


def _check_one_label_type(array: xr.DataArray, layer: str) -> None:
    """Each text-or-object coordinate of ``array`` holds labels of one kind (text, bytes or numbers), as a zarr
    array holds one type: mixed ones failed in xarray's words ("unable to infer dtype on variable None")."""
    for name, coord in array.coords.items():
        if coord.dtype != object:
            continue
        kinds = {_label_kind(value) for value in coord.values.ravel().tolist()}
        if len(kinds) > 1:
            raise TypeError(f"layer {layer!r}: its {str(name)!r} labels mix {' and '.join(sorted(kinds))}, which a "
                            f"store cannot hold in one array; make them one kind, e.g. all text "
                            f"(layer.assign_coords({name!s}=layer[{str(name)!r}].astype(str)))")


def _label_kind(value: Any) -> str:
    """What a label is, as a store holds it: "text", "bytes", "numbers" or its type's name."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, bytes):
        return "bytes"
    return "numbers" if isinstance(value, (int, float, complex, np.number)) else type(value).__name__


def checked_layers(layers: Mapping[str, Any], *, masks: Mapping[str, Any] | None, chunks: int | str,
                   compressed: bool, coords: Mapping[str, Any] | None) -> dict[str, xr.DataArray]:
    """Layer path (``check_new_layers``) → the layer as ``write_activations`` writes it: (datapoint, *positions,
    channel), labelled with ``coords``, its mask attached; or the error naming the layer at fault (dims, dtype,
    chunk size, labels, mask), before anything is written. Reads no activations."""
    for path_, value in layers.items():
        others = sorted(map(str, set(value.data_vars) - {VARIABLE, MASK})) if isinstance(
            value, (xr.Dataset, xr.DataTree)) else []
        if others:  # a store holds a layer's activations, its mask and its labels: the rest would vanish unsaid
            warnings.warn(f"layer {path_!r}: {', '.join(map(repr, others))} {'is' if len(others) == 1 else 'are'} "
                          f"not written (a store holds each layer's {VARIABLE!r}, its {MASK!r} and coordinates); "
                          f"give a label per datapoint as coords=, or save other data apart", UserWarning,
                          stacklevel=user_stacklevel())
    own_masks = {path_: xr.DataArray(value.coords[MASK].variable) for path_, value in layers.items()
                 if isinstance(value, xr.DataArray) and MASK in value.coords}  # by place: 0/1 numbers taken too
    arrays = {path_: check_value_rounding(as_activations(value.drop_vars(MASK) if path_ in own_masks else value, path_,
                                                         chunks=chunks, guess_layout=False))  # no guess
              for path_, value in layers.items()}
    wide = next((path_ for path_, array in arrays.items() if array.dtype.itemsize > 8 and array.dtype.kind == "f"),
                None)
    if wide is not None:  # zarr said "No Zarr data type found that matches dtype('float128')", naming no layer
        raise TypeError(f"layer {wide!r} has dtype {arrays[wide].dtype} (long double), which a zarr store cannot hold: "
                        f"cast it to float64 first (layer.astype('float64'))")
    for path_, array in arrays.items():  # each chunk one codec buffer, before anything is written
        check_chunk_bytes(path_, array.shape, array.dtype.itemsize,
                          chunk_of(array.shape, array.dtype.itemsize, chunks), compressed)
    labels = labelled_as(check_datapoint_coords(coords), next(iter(arrays.values())))
    arrays = {path_: with_datapoint_coords(array, labels) for path_, array in arrays.items()}
    for path_, array in arrays.items():
        _check_one_label_type(array, path_)
    given_masks = dict(own_masks)
    for name, mask in (masks or {}).items():
        key = layer_path(name)
        if key not in arrays:
            raise ValueError(f"masks names layer {name!r}, which is not among the layers written")
        if key in own_masks:  # the one given as masks= replaced the layer's own, silently
            raise ValueError(f"layer {key!r} carries a {MASK!r} coordinate and masks= gives it another: give one "
                             f"(layer.drop_vars('mask') to write the one in masks=)")
        given_masks[key] = mask
    for key, mask in given_masks.items():
        arrays[key] = as_activations(arrays[key].assign_coords({MASK: _as_mask(mask, arrays[key], key in own_masks)}),
                                     key)
    return arrays


def write_activations(path: str | os.PathLike, layers: Mapping[str, Any], *, mode: WriteMode = "w",
                      masks: Mapping[str, Any] | None = None, chunks: int | str = "auto",
                      image_size: int | tuple[int, int] | None = None, overwrite: bool = False,
                      compression: str | None = "lz4", coords: Mapping[str, Any] | None = None,
                      progress: bool = False) -> xr.DataTree:
    """Write layers to a zarr (v3) store at ``path`` and return it opened with
        [`open_activations()`][chunkcca.open_activations].

    Parameters
    ----------
    path
        A local folder (the folders on the way to it are made, as ``xarray.Dataset.to_zarr`` makes them, and
        removed again if the write fails).
    layers
        Layer path (e.g. ``"model0/conv2"``) → numpy array, Dask array or DataArray of dims
        (datapoint, *positions, channel): (datapoint, channel), (datapoint, token, channel),
        (datapoint, height, width, channel), …, or a Dataset or DataTree node holding ``activations`` (and
        ``mask``; another variable is not written, with a warning naming it). Dask inputs are written chunk by
        chunk, never materialised. The store remembers their order (network order). A DataArray's ``datapoint``
        labels are written with it; a layer without them gets its positions 0, 1, …, marked as such, and pairs
        with others by position only, as an array does.
    masks
        Layer path → boolean padding mask (datapoint, *positions), True at real positions (e.g. an
        attention mask; 0/1 numbers, as tokenizers give it, are taken as False/True), stored as the variable
        ``mask`` beside the layer's ``activations`` and used by every measure given the layer. A DataArray layer
        with a ``mask`` coordinate carries its own.
    mode
        "w" (default): a new store (see ``overwrite``); "a": add the layers to the existing store at
        ``path``, after its own, without touching them (a layer path it already holds is an error, as is a
        store of one layer at its root, which would hold them). A store with consolidated metadata (plain
        xarray's default) loses it, as it would list the members without the new layers: readers list the
        store, as they do chunkcca's.
    chunks
        Datapoints per zarr chunk, or "auto" for about 16 MiB per chunk. Only datapoint is chunked. A chunk
        compressed holds at most 2 GiB (Blosc's buffer): more is refused, naming the layer.
    image_size
        Height and width of the input images, for the ``height``/``width`` pixel-centre
        coordinates of layers that have none: pixel i of an s-pixel map sits at
        (i + 0.5)·image_size/s. Default: the store's own when adding to one, else the largest
        height/width among ``layers``.
    overwrite
        Replace an existing store (mode "w"). The new store is written to a temporary folder beside
        ``path`` and renamed into place, so an interrupted write never leaves a partial store.
    compression
        "lz4" (default: Blosc-LZ4 with byte shuffle, which decodes fast), "zstd" (smaller files,
        slower reads) or None (no compression: the fastest reads when decoding is the bottleneck).
    coords
        Coordinates on ``datapoint`` put on every layer written: name → one label per datapoint (numbers or
        strings, e.g. each input's class), in the first layer's datapoint order (the others take theirs by
        datapoint label) or as a DataArray on ``datapoint`` labelled as the layers are. ``groupby=`` and
        ``folds=`` (``--groupby``, ``--folds`` on the command line) take them by name. A DataArray layer's own
        coordinates on ``datapoint`` are written too. The layers written, and with ``mode="a"`` the store's, must
        give a datapoint they hold one label of each coordinate (layers of other datapoints are checked on those
        they share).
    progress
        Show a progress bar (on stderr).

    Returns
    -------
    xarray.DataTree
        The store, opened lazily.
    """
    check_mapping("layers", layers, "layer path to array")
    check_mapping("masks", masks, "layer path to mask")
    check_mapping("coords", coords, "coordinate name to one value per datapoint")
    if not layers:
        raise ValueError("write_activations needs at least one layer")
    path = expanded(path)
    image_size = _image_size(image_size)
    check_flag("progress", progress)
    compressors = codecs_for(compression)
    paths = check_new_layers(path, list(layers), mode=mode, overwrite=overwrite)
    arrays = checked_layers(dict(zip(paths, layers.values())), masks=masks, chunks=chunks,
                            compressed=compression is not None, coords=coords)

    def build(tmp: Path, stored: tuple[int, int] | None) -> tuple[list[str], tuple[int, int] | None]:
        # the image's size: given, the store's, or its largest map (none: no layer has height and width yet; a
        # store of fully connected layers recorded 1 x 1, and conv layers added later got centres of 1/32)
        spatial = [(a.sizes["height"], a.sizes["width"]) for a in arrays.values() if {"height", "width"} <= set(a.dims)]
        size = image_size or stored or ((max(s[0] for s in spatial), max(s[1] for s in spatial)) if spatial else None)
        datasets: dict[str, xr.Dataset] = {}
        encoding: dict[str, dict[str, Any]] = {}
        for key, array in arrays.items():
            array = _labelled(array, size)
            per_chunk = chunk_of(array.shape, array.dtype.itemsize, chunks)
            array = array.chunk({dim: (per_chunk if dim == "datapoint" else -1) for dim in array.dims})
            # coordinates are labels, one per datapoint or channel: written as they are, not as Dask arrays
            array = array.assign_coords({name: coord.compute() for name, coord in array.coords.items()
                                         if coord.chunks is not None and name != MASK})
            mask = array.coords.get(MASK)
            variables = {VARIABLE: array.drop_vars(MASK, errors="ignore").rename(None)}
            encoding["/" + key] = {VARIABLE: {"chunks": array.data.chunksize, "compressors": compressors},
                                   **{str(name): {"compressors": compressors} for name in array.coords
                                      if name != MASK}}  # labels are checksummed as the values are
            if mask is not None:
                variables[MASK] = mask.variable.chunk({dim: per_chunk if dim == "datapoint" else -1
                                                       for dim in mask.dims})
                encoding["/" + key][MASK] = {"chunks": (min(per_chunk, mask.shape[0]), *mask.shape[1:]),
                                             "compressors": compressors}
            datasets[key] = xr.Dataset(variables)
        tree = xr.DataTree.from_dict(datasets)
        with Progress(f"writing {', '.join(arrays)}") if progress else contextlib.nullcontext(), every_chunk_written():
            tree.to_zarr(tmp, encoding=encoding, zarr_format=3, consolidated=False)
        return list(arrays), None if size is None else (int(size[0]), int(size[1]))

    # the layers' own coordinates on datapoint too, as coords= gives them, checked against each other and the store's
    write_store(path, build, mode=mode, overwrite=overwrite, coords=merged_datapoint_coords(arrays))
    return open_activations(path)


def check_store_coords(path: str | os.PathLike, coords: Mapping[str, xr.DataArray]) -> None:
    """Before layers are added to the store at ``path`` with ``coords`` (``check_datapoint_coords``; labelled by
    datapoint, or plain values for layers written without labels, whose datapoints are their positions,
    ``default_coords``): a ValueError if one of its layers holds a coordinate of one's name with other labels for
    a datapoint both hold (groupby would refuse the pair only when it is measured). Layers of other datapoints (a
    run cut short) are checked on those they share. Reads the coordinates of its layers, no activations."""
    if not coords:
        return
    tree = open_activations(path)
    for key, given in coords.items():
        plain = "datapoint" not in given.coords
        if plain:  # plain values label the datapoints of a layer written without labels, its default: positions
            given = given.assign_coords(datapoint=np.arange(given.sizes["datapoint"]))
        compared: list[pd.Index] = []  # the datapoints of the layers compared: one of each set is read
        for holder in layer_paths(tree):
            held = tree[holder][VARIABLE].coords.get(key)
            if held is None or held.dims != ("datapoint",):  # another layer's dim or scalar of that name
                continue
            labels = held.indexes["datapoint"]
            if any(labels.equals(seen) for seen in compared):  # the datapoints of a layer compared: the store's
                continue  # layers agree (each checked as it was added); reading each took 15-35 ms at 300k
            compared.append(labels)
            differ = differing_labels(held, given)
            if len(differ):
                raise ValueError(f"coords[{key!r}]: layer {holder!r} of {path} holds {key!r} with other labels for "
                                 f"datapoints {differ[:5].tolist()}; the layers of a store share their datapoints' "
                                 f"labels" + (f" (the {given.sizes['datapoint']} given without datapoint labels "
                                              f"label datapoints 0 to {given.sizes['datapoint'] - 1}, as the layer "
                                              f"written with them: for others, label them by datapoint)"
                                              if plain else ""))


def _image_size(image_size: Any) -> tuple[float, float] | None:
    """``image_size`` as (height, width): one positive number for both, or two; else a ValueError naming it, before
    anything is written (0 gave every centre 0, and the store, written whole, then failed to open)."""
    if image_size is None:
        return None
    if isinstance(image_size, np.ndarray) and image_size.ndim == 0:  # np.array(8)
        image_size = image_size.item()
    sizes = [image_size] * 2 if isinstance(image_size, (int, float, np.integer, np.floating)) else image_size
    if (isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__") or len(sizes) != 2
            or not all(isinstance(size, (int, float, np.integer, np.floating)) and not isinstance(size, bool)
                       and np.isfinite(size) and size > 0 for size in sizes)):
        raise ValueError(f"image_size must be a positive number or two, (height, width), of the input images, got "
                         f"{image_size!r}")
    return tuple(int(size) if float(size).is_integer() else float(size) for size in sizes)


def _as_mask(mask: Any, layer: xr.DataArray, own: bool = False) -> xr.Variable:
    """A padding mask for ``layer`` (``own``: its mask coordinate): dims (datapoint, *positions), named as the
    layer's, boolean."""
    dims = ("datapoint", *layer.dims[1:-1])
    name = str(layer.name)
    if len(dims) == 1:  # every measure then refused it: "datapoint 0 has no real position"
        remedy = "drop its mask coordinate (layer.drop_vars('mask'))" if own else "leave its mask out"
        raise nothing_to_pad(name, layer.dims, remedy)
    if isinstance(mask, xr.DataArray):
        if set(mask.dims) != set(dims):
            raise ValueError(f"layer {name!r}: its mask must have dims {dims}, got {tuple(map(str, mask.dims))}")
        for dim in dims:  # xarray said "conflicting sizes for dimension 'token'", naming no layer
            if mask.sizes[dim] != layer.sizes[dim]:
                counted = "datapoints" if dim == "datapoint" else f"{dim} positions"
                raise ValueError(f"layer {name!r}: its mask has {mask.sizes[dim]} {counted}, the layer "
                                 f"{layer.sizes[dim]}")
        for dim in (dim for dim in dims if dim in mask.indexes and dim not in layer.indexes):
            if not mask.indexes[dim].equals(pd.RangeIndex(layer.sizes[dim])):  # was by position, its labels unsaid
                counted = "datapoints" if dim == "datapoint" else f"{dim} positions"
                raise ValueError(f"layer {name!r} has no {dim} labels and its mask labels its {counted} otherwise "
                                 f"than 0, 1, … in order ({mask.indexes[dim][:3].tolist()}, …): which of the layer's "
                                 f"{counted} each mask row is cannot be told; label the layer's {dim} (a DataArray "
                                 f"with coords={{{dim!r}: ...}}), or give the mask in the layer's order without "
                                 f"them (mask.drop_vars({dim!r}))")
        for dim in (dim for dim in dims if dim in mask.indexes and dim in layer.indexes):  # by label, as layers
            labels, own = layer.indexes[dim], mask.indexes[dim]  # are aligned: a mask in another order was taken
            if not own.equals(labels):  # by position, silently
                missing = labels.difference(own)
                if len(missing) or not own.is_unique:
                    counted = "datapoints" if dim == "datapoint" else f"{dim} positions"
                    raise ValueError(f"layer {name!r}: its mask labels its {counted} otherwise ({len(missing)} of "
                                     f"the layer's are not in it, e.g. {missing[:5].tolist()})")
                mask = mask.sel({dim: labels})
        variable = mask.transpose(*dims).variable
        if variable.dtype == bool:
            return variable
        variable = variable.chunk({"datapoint": layer.data.chunks[0]})  # a lazy file's: read block by block
        return variable.copy(data=boolean_mask(variable.data, f"layer {name!r}: its mask"))
    if not isinstance(mask, (np.ndarray, da.Array)):  # nested lists, a torch tensor (a tokenizer's attention_mask)
        mask = np.asarray(mask)
    if mask.shape != tuple(layer.shape[:-1]):
        raise ValueError(f"layer {str(layer.name)!r}: its mask must have the shape (datapoint, *positions) "
                         f"{tuple(layer.shape[:-1])}, got {mask.shape}")
    return xr.Variable(dims, boolean_mask(mask, f"layer {name!r}: its mask"))


def _existing_order(path: str | os.PathLike) -> tuple[list[str], tuple[int, int] | None, str | None]:
    """The layers of the store at ``path``, in order, the image size it records (None if it records none) and its
    generation (``GENERATION_ATTR``: new each time the store is written whole; None for stores from before)."""
    tree = open_activations(path)
    stored = tree.attrs.get(IMAGE_ATTR)
    return (layer_paths(tree), (int(stored[0]), int(stored[1])) if stored is not None else None,
            tree.attrs.get(GENERATION_ATTR))


def check_new_layers(path: str | os.PathLike, names: Sequence[str], *, mode: str, overwrite: bool) -> list[str]:
    """Before any work: ``mode`` is "w" or "a" and ``names`` are layer paths the store can take
    ([`check_layer_paths`][chunkcca.layers.check_layer_paths]); with "w", ``path`` is free or (``overwrite``)
    an activation store; with "a", it is a store holding none of ``names``. Returns the normalised paths."""
    check_choice("mode", mode, ("w", "a"))
    check_flag("overwrite", overwrite)
    check_local(path)
    for folder in (Path(path).absolute().parent, *((Path(path),) if mode == "a" else ())):  # built beside it
        if folder.is_dir():
            check_writable(folder, f"the store {path}")
    if mode == "w":
        if overwrite and written_by_chunkcca(Path(path)) and (foreign := foreign_files(Path(path))):
            raise FileExistsError(f"{path} holds what chunkcca did not write or list ({', '.join(foreign)}"
                                  f"{' …' if len(foreign) == 3 else ''}: yours, or a layer an interrupted append "
                                  f"left); overwrite=True replaces only what chunkcca wrote: move them out of it, or "
                                  f"choose another path")
        check_replaceable(Path(path), overwrite, is_activation_store, "an activation store")
        return check_layer_paths(names)
    if overwrite:
        raise ValueError("mode='a' adds layers to a store and overwrite=True replaces it: pass one of them")
    check_outside_stores(path, "the store appended to")
    clear_unfinished_append(path)
    order, _, _ = _existing_order(path)
    paths = check_layer_paths(names, existing=order, where=str(path))
    _check_free(Path(path), paths)
    for layer in paths:  # the group each new layer is moved into (a read-only one failed midway, the store then
        parts = layer.split("/")[:-1]  # holding the layers moved before it, unlisted)
        while parts and not Path(path, *parts).is_dir():
            parts.pop()
        check_writable(Path(path, *parts), f"the store {path}")
    return paths


def _append_lock(store: Path) -> Path:
    """The lock file beside ``store`` that serialises appends to it (and a replacement with them): beside the store
    itself, also for a path through a symbolic link, so that one store has one lock however it is spelled."""
    store = store.resolve()
    return store.parent / APPEND_LOCK.format(name=store.name)


def write_store(path: str | os.PathLike, build: Build, *, mode: WriteMode = "w", overwrite: bool = False,
                coords: Mapping[str, xr.DataArray] | None = None) -> None:
    """Write a store's layers with ``build`` and record their order, never leaving a partial store.

    ``mode="w"``: the store is built in a temporary folder beside ``path`` and renamed into place
    (replacing an existing one only with ``overwrite``, and not while an append moves layers into it).
    ``mode="a"``: the new layers are built in a temporary store beside ``path``, checked against the layers
    ``path`` holds, and each moved into it by one rename of its folder (so each arrives whole or not at all); the
    list of layers is updated last. The store's root records the append while it moves them
    (``APPENDING_ATTR``): a store an append was killed in does not open, and the next append first removes what
    it left; an error or a Ctrl-C removes it at once.
    The layers already there are not touched. Appends to one store from several processes at once are
    serialised at that last step (a lock file ``.<store name>.append-lock`` beside the store while it is
    held), each re-reading the list, so none loses another's place in it. The new layers' datapoint ``coords``
    (``check_datapoint_coords``) are checked against the store's (``check_store_coords``) before ``build``, once
    the store's generation is read: a store replaced after it is found at that step, never appended to unchecked.
    """
    check_choice("mode", mode, ("w", "a"))
    check_zarr_settings()
    if mode == "w":
        def write(tmp: Path) -> None:
            names, image = build(tmp, None)
            _set_root_attrs(tmp, names, image, generation=uuid.uuid4().hex)
            open_activations(tmp)  # a store that would not open never replaces a good one

        # an append moving its layers in holds the lock: a replacement waits for it to finish
        write_atomically(path, write, overwrite=overwrite, replaceable=is_activation_store, what="an activation store",
                         lock=_append_lock(Path(path)))
        return
    first_order, stored, generation = _existing_order(path)
    check_store_coords(path, coords or {})
    # the store itself, also through a symbolic link: the new layers are built beside it, on its file system
    # (beside a link on another file system, the moves in failed after all the work)
    store = Path(path).resolve()
    with naming_target(store, "layers into the activation store"), temporary_beside(store) as tmp:
        names, image = build(tmp / "data", stored)
        _set_root_attrs(tmp / "data", names, image)
        open_activations(tmp / "data")
        with exclusive(_append_lock(store)):
            order, now_stored, now_generation = _existing_order(path)  # another append may have finished meanwhile
            if now_generation != generation:  # checked against (labels, image size) another store than this one
                raise ValueError(f"{path} was replaced (written whole) while these layers were written for it; add "
                                 f"them again")
            check_layer_paths(names, existing=order, where=str(path))
            if order != first_order:  # layers another append added meanwhile: their labels too (two at odds landed)
                check_store_coords(path, coords or {})
            if stored is None and now_stored is not None and image is not None and tuple(image) != now_stored:
                raise ValueError(f"{path}: another append set the store's image size to {now_stored} while these "
                                 f"layers were written for {tuple(image)}; add them again")
            _mark_appending(store, names)
            try:
                for name in names:
                    move_layer(tmp / "data", store, name)
                _set_root_attrs(store, [*order, *names], now_stored or image, kept=order)
            except BaseException:  # an error or a Ctrl-C: the store as it was (a killed process: the next append)
                _remove_unfinished_append(store)
                raise


def is_activation_store(path: Path) -> bool:
    """Whether ``path`` is a folder holding a zarr group that chunkcca wrote (its root records the layers' order)
    and nothing else: no file but zarr metadata outside its arrays' chunk folders (a user's notes or results
    inside it would go with it)."""
    return (written_by_chunkcca(path) and not path.is_symlink() and store_holding(path) is None
            and not foreign_files(path))


def written_by_chunkcca(path: Path) -> bool:
    """Whether ``path`` holds a zarr group whose root records the layers' order, as chunkcca's stores do."""
    try:
        metadata = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return metadata.get("node_type") == "group" and ORDER_ATTR in metadata.get("attributes", {})


def foreign_files(path: Path, most: int = 3) -> list[str]:
    """Up to ``most`` things in the chunkcca store at ``path`` that it did not write, as paths within it: anything
    but the groups on the way to the layers its root lists, each layer's arrays (activations, mask, labels) and,
    in each array, its metadata and the chunk files its grid names (a user's zarr group or array put inside it,
    notes, files among the chunks)."""
    attributes = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    layers, arrays = attributes.get(ORDER_ATTR, []), attributes.get(METADATA_ATTR, {})  # each layer's, as written
    layers = [*layers, *attributes.get(APPENDING_ATTR, {}).get("layers", [])]  # and an unfinished append's
    groups = {"/".join(layer.split("/")[:depth]) for layer in layers for depth in range(len(layer.split("/")))}
    found: list[str] = []
    for folder, subfolders, files in os.walk(path):
        here = Path(folder).relative_to(path).as_posix()
        here = "" if here == "." else here
        ours = {"zarr.json", ROOT_METADATA_TMP} if here == "" else {"zarr.json"}
        if here in layers:  # a layer's arrays: each checked whole, not walked
            ours |= {name for name in subfolders if name in arrays.get(here, subfolders)
                     and not array_foreign(Path(folder, name), path, found)}
            subfolders[:] = []
        else:
            subfolders[:] = [name for name in subfolders if f"{here}/{name}".lstrip("/") in groups | set(layers)]
        found += [Path(folder, name).relative_to(path).as_posix()
                  for name in sorted({*files, *os.listdir(folder)} - ours - set(subfolders))
                  if not (name in files and name.startswith(FINDER_FILES))]
        if len(found) >= most:
            break
    return found[:most]


def result_foreign_files(path: Path, most: int = 3) -> list[str]:
    """Up to ``most`` things in the zarr result at ``path`` (``save_result``) that it did not write, as paths
    within it: anything but its metadata and the arrays its consolidated metadata lists (``group_foreign_files``)."""
    listed = json.loads((path / "zarr.json").read_text()).get("consolidated_metadata", {}).get("metadata", {})
    return group_foreign_files(path, listed.__contains__, most)


def _set_root_attrs(store: Path, order: Sequence[str], image: tuple[int, int] | None, *,
                    generation: str | None = None, kept: Sequence[str] = ()) -> None:
    """Record the layers' order, the image size, (for a new store) its generation, and for each layer but those
    ``kept`` (an append's store's own, which keep theirs as written) its arrays' metadata digests
    (``METADATA_ATTR``) and chunk checksums (``CHUNKS_ATTR``) in the store's root metadata, replacing the file in
    one step. One listing of the store serves both. Consolidated metadata (a store plain xarray or
    ``zarr.consolidate_metadata`` wrote) would list the members without the layers added: it is dropped, and
    readers list the store, as they do chunkcca's own."""
    metadata_path = store / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    attributes = metadata.setdefault("attributes", {})
    attributes[ORDER_ATTR] = list(order)
    recorded = attributes.get(METADATA_ATTR, {})  # (a root moved in from a part ingest wrote holds that part's)
    fs, root = filesystem(store)
    listing = Listing.of(fs, root)
    new = [layer for layer in order if layer not in kept or layer not in recorded]  # (a store from before records)
    unrecorded = metadata_digests(listing, new)
    attributes[METADATA_ATTR] = {layer: unrecorded[layer] if layer in new else recorded[layer] for layer in order}
    decoding = {**attributes.get(DECODING_ATTR, {}), **decoded_by(listing, new)}  # (kept layers: theirs, if any)
    attributes[DECODING_ATTR] = {layer: decoding[layer] for layer in order if layer in decoding}
    chunks = attributes.get(CHUNKS_ATTR, {})  # of a store written before they were recorded: the new layers only
    for layer in new:
        chunks[layer] = {}
        for variable in _layer_arrays(listing, layer):  # activations, mask and labels
            array, present = listing.arrays[f"{layer}/{variable}"], listing.sizes(f"{layer}/{variable}")
            lost = list(lost_chunks(array, set(present)).values())
            if lost:  # chunk_checksums gave a bare KeyError
                raise OSError(f"layer {layer!r}{'' if variable == VARIABLE else f' (its {variable})'}: {len(lost)} of "
                              f"its chunk files are not where they were written (e.g. {lost[0]}): the Dask workers "
                              f"that wrote them see another filesystem at this path; write to a path every worker "
                              f"shares, or compute the layers in this process first")
            checksums = chunk_checksums(fs, f"{root}/{layer}/{variable}", array, present)
            if checksums is not None:
                chunks[layer][variable] = base64.b64encode(checksums.tobytes()).decode()
    attributes[CHUNKS_ATTR] = {layer: chunks[layer] for layer in order if layer in chunks}
    kinds = {**datapoint_kinds(listing, order), **attributes.get(DATAPOINTS_ATTR, {})}  # kept layers: as written
    attributes[DATAPOINTS_ATTR] = {layer: kinds[layer] for layer in order if layer in kinds}
    if generation is not None:
        attributes[GENERATION_ATTR] = generation
    if image is not None:
        attributes[IMAGE_ATTR] = [int(image[0]), int(image[1])]
    attributes.pop(APPENDING_ATTR, None)
    metadata.pop("consolidated_metadata", None)  # a listing of the members (xarray's default) left without new layers
    _replace_root_metadata(store, metadata)


def _layer_arrays(listing: Listing, layer: str) -> list[str]:
    """The names of the arrays of ``layer`` in ``listing``: its activations, its mask and its labels."""
    return sorted(folder.rpartition("/")[2] for folder in listing.arrays if folder.rpartition("/")[0] == layer)


#: The file a store's new root metadata is written to before it replaces ``zarr.json``: chunkcca's own, where a
#: write that failed (no space) or was killed left it.
ROOT_METADATA_TMP = ".zarr.json.tmp"


def _replace_root_metadata(store: Path, metadata: dict[str, Any]) -> None:
    """Replace the root metadata file of ``store`` with ``metadata``, in one step; a failed write leaves nothing."""
    fresh = store / ROOT_METADATA_TMP
    try:
        fresh.write_text(json.dumps(metadata, indent=2))
        os.replace(fresh, store / "zarr.json")
    except BaseException:
        fresh.unlink(missing_ok=True)
        raise


def _check_free(store: Path, names: Sequence[str]) -> None:
    """A FileExistsError for a folder at the path of a new layer ``names`` in ``store`` (not a layer the store
    lists: a user's, or one another append is moving in)."""
    for name in names:
        if (store / name).exists():
            raise FileExistsError(f"{store / name} exists, though {store} lists no layer {name!r} (yours, or a layer "
                                  f"another append is moving in): move it out of the store, or name the new layer "
                                  f"otherwise")


def _mark_appending(store: Path, names: Sequence[str]) -> None:
    """Record in the root of ``store`` that this process's append is moving ``names`` in (``APPENDING_ATTR``), with
    the groups it will make for them, once no folder is at their paths (``_check_free``)."""
    _check_free(store, names)
    groups = sorted({parent.as_posix() for name in names for parent in PurePosixPath(name).parents
                     if parent.as_posix() != "." and not (store / parent).exists()})
    metadata = json.loads((store / "zarr.json").read_text())
    metadata.setdefault("attributes", {})[APPENDING_ATTR] = {"layers": list(names), "groups": groups,
                                                             "owner": owner_record()}
    _replace_root_metadata(store, metadata)


def clear_unfinished_append(path: str | os.PathLike) -> None:
    """Remove what an append to the store at ``path`` killed midway left (``_remove_unfinished_append``): one whose
    process, on this machine, is gone (``_fs.is_stale``); a live one's layers are left to it."""
    store = Path(path)
    if not (store / "zarr.json").is_file():
        return
    with exclusive(_append_lock(store)):
        appending = zarr_attributes(store).get(APPENDING_ATTR)
        if appending is not None and is_stale(appending.get("owner", {})):
            _remove_unfinished_append(store)


def _remove_unfinished_append(store: Path) -> None:
    """Remove what an unfinished append to ``store`` left (``APPENDING_ATTR``: its layers' folders and the groups it
    made for them, nothing else) and its record: the store is again as before it began. The caller holds the
    store's append lock."""
    import shutil

    try:
        metadata = json.loads((store / "zarr.json").read_text())
    except (OSError, ValueError):
        return  # no store here to clear (opening it says why)
    attributes = metadata.get("attributes", {})
    left = attributes.get(APPENDING_ATTR)
    if left is None:
        return
    listed = set(attributes.get(ORDER_ATTR, []))
    for name in left["layers"]:
        if name not in listed and (store / name).exists():
            shutil.rmtree(store / name)
    for group in sorted(left["groups"], key=lambda group: -group.count("/")):  # the deepest first
        folder = store / group
        if folder.is_dir() and {entry.name for entry in folder.iterdir()} <= {"zarr.json"}:
            (folder / "zarr.json").unlink(missing_ok=True)
            folder.rmdir()
    del attributes[APPENDING_ATTR]
    _replace_root_metadata(store, metadata)


def move_layer(part: Path, store: Path, layer: str) -> None:
    """Move one layer's node from ``part`` (a store) into ``store``, with the group metadata of the root and the
    layer's parents where ``store`` has none yet.

    A zarr v3 store on disk keeps each node in a folder of its path, its metadata in the folder's
    ``zarr.json``, so a node moves with its folder.
    """
    node = PurePosixPath(layer)
    for group in reversed(node.parents):  # the root (".") first
        (store / group).mkdir(exist_ok=True)
        if not (store / group / "zarr.json").exists():
            os.replace(part / group / "zarr.json", store / group / "zarr.json")
    os.replace(part / node, store / node)  # the layer's folder, whole, in one rename


#: Names of zarr metadata files, which a reader may look for and not find; every other key is a chunk.
METADATA_FILES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


#: Per process, each opening of a store (location, generation, opening) read through a ``WholeStore``: its chunk
#: records by array folder, as its root holds them at the first read in this process (``CHUNKS_ATTR``, base64),
#: each replaced by the folder's ``ChunkPlaces`` once a chunk of it is read (None: unusable, left to the checks
#: before reading). Checked and read once per process however many copies of the wrapper the tasks unpickle; the
#: ``OPENINGS_KEPT`` read last are kept (an opening read again after it reads its records again: a store's records
#: are 4 bytes a chunk file).
_OPENINGS: dict[tuple[str, str | None, str | None], dict[str, str | ChunkPlaces | None]] = {}
OPENINGS_KEPT = 8
#: Each opening's local store root as last read (``WholeStore._root_version``), to read its records again only
#: where it changed (``WholeStore._check_other_arrays``).
_ROOTS: dict[tuple[str, str | None, str | None], tuple[int, int, int]] = {}


class WholeStore(WrapperStore):
    """A read-only zarr store whose missing chunk is an error, where zarr reads it as the fill value: a Dask worker
    that cannot see the store's files (another machine's disk, a memory filesystem of the client's process) or a
    file lost after the store was opened never gives fill values. With the ``generation`` it was opened at
    (``GENERATION_ATTR``), each process that reads a chunk through it (a Dask worker, once) first checks that
    the store it sees at that location is the same: a worker seeing another copy (a stale local one, a cache)
    mixed its chunks into the result. With an ``opening`` (an id of one ``open_activations`` call), each chunk
    file read whole is checked to hold its own chunk's bytes as the store records them, not another's copied over
    it while the store is read; the records are read in each process, not carried in the tasks (a sweep's graph
    grew by every layer's copy of them). Named and tokenized by its location (and, for a local store, its folder's
    modification time, as xarray names a store opened by path)."""

    def __init__(self, store: Any, location: str, token: tuple[Any, ...] = (), generation: str | None = None,
                 opening: str | None = None) -> None:
        super().__init__(store)
        self.location, self.token, self.generation, self.opening = location, token, generation, opening

    @classmethod
    def at(cls, location: str, storage_options: Mapping[str, Any] | None = None, generation: str | None = None,
           opening: str | None = None) -> WholeStore:
        """The store at a local path or fsspec URL, read-only."""
        if is_url(location):  # the options name the endpoint and account: two of them are two stores
            options = json.dumps(dict(storage_options or {}), sort_keys=True, default=str)
            return cls(FsspecStore.from_url(location, storage_options=dict(storage_options or {}), read_only=True),
                       location, (hashlib.sha1(options.encode()).hexdigest(),), generation, opening)
        return cls(LocalStore(location, read_only=True), location, (os.path.getmtime(location),), generation, opening)

    def _with_store(self, store: Any) -> WholeStore:
        return type(self)(store, self.location, self.token, self.generation, self.opening)

    async def _opened(self, prototype: Any) -> dict[str, str | ChunkPlaces | None]:
        """This opening's chunk records (``_OPENINGS``), after an OSError if the store this process sees at the
        location is not the one opened (another ``GENERATION_ATTR``); read once per process and opening, none for
        a store without a generation or opening."""
        key = (self.location, self.generation, self.opening)
        if key in _OPENINGS:
            _OPENINGS[key] = _OPENINGS.pop(key)  # read last: kept longest
            return _OPENINGS[key]
        if self.generation is None and self.opening is None:
            return {}
        version = self._root_version()  # before the read: a change after it is read again
        recorded = await self._root(prototype)
        if recorded is None:  # no store there at all: the chunk read next is missing, and ``_present`` says so
            return {}
        records: dict[str, str | ChunkPlaces | None] = {} if self.opening is None else dict(recorded)
        _OPENINGS[key] = records
        if version is not None:
            _ROOTS[key] = version
        while len(_OPENINGS) > OPENINGS_KEPT:
            oldest = next(iter(_OPENINGS))
            del _OPENINGS[oldest]
            _ROOTS.pop(oldest, None)
        return records

    def _root_version(self) -> tuple[int, int, int] | None:
        """A local store root's identity, size and modification time (a write replaces it by a rename: another
        file), which tell a change without reading it (2000 chunks edited in place, each read reading the root
        again: 6.8-7.2 s against 5.5-6.0 s); None for other stores, or where there is no root."""
        if not isinstance(self._store, LocalStore):
            return None
        try:
            status = os.stat(Path(self._store.root) / "zarr.json")
        except OSError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns

    async def _root(self, prototype: Any) -> dict[str, str] | None:
        """The store root's chunk records by array folder (``CHUNKS_ATTR``, base64; an entry of another form left
        out, as the checks before reading name it), after an OSError if the store this process sees at the
        location is not the one opened; None where there is no root."""
        raw = await self._store.get("zarr.json", prototype)
        if raw is None:
            return None
        attributes = json.loads(raw.to_bytes()).get("attributes", {})
        seen = attributes.get(GENERATION_ATTR)
        if self.generation is not None and seen != self.generation:
            raise OSError(f"{self.location} as this process reads it is another store than the one opened (written "
                          f"at another time: generation {seen} for {self.generation}): a Dask worker sees another "
                          f"copy at this path (a stale local copy, a cache), or the store was replaced; put one copy "
                          f"where every worker reads it, and open it again")
        layers = attributes.get(CHUNKS_ATTR)
        return {f"{layer}/{array}": recorded
                      for layer, arrays in (layers.items() if isinstance(layers, dict) else ())
                      if isinstance(arrays, dict) for array, recorded in arrays.items() if isinstance(recorded, str)}

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.location, *self.token)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if PurePosixPath(key).name in METADATA_FILES:
            return await self._store.get(key, prototype, byte_range)
        records = await self._opened(prototype)
        value = self._present(key, await self._store.get(key, prototype, byte_range))
        if byte_range is None and records:  # a whole chunk file: its last 4 bytes are its CRC32C
            await self._check_place(key, value.as_numpy_array()[-4:].tobytes(), records, prototype)
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        key_ranges = list(key_ranges)
        await self._opened(prototype)
        values = await self._store.get_partial_values(prototype, key_ranges)
        return [self._present(key, value) for (key, _), value in zip(key_ranges, values)]

    async def _check_place(self, key: str, tail: bytes, records: dict[str, str | ChunkPlaces | None],
                           prototype: Any) -> None:
        """An OSError when the chunk file ``key`` (ending in ``tail``) holds another chunk's bytes as written
        (``records``: this opening's, whose folder's entry becomes its ``ChunkPlaces`` at its first chunk)."""
        parts = key.split("/")
        for cut in range(len(parts) - 1, 0, -1):  # the array's folder: the longest one of the store's it is in
            folder = "/".join(parts[:cut])
            if folder not in records:
                continue
            places = records[folder]
            if isinstance(places, str):
                records[folder] = places = await self._places(folder, places, prototype)
            if places is not None and not places.check("/".join(parts[cut:]), tail, f"{key} of {self.location}"):
                await self._check_other_arrays(folder, key, tail, records, prototype)
            return

    async def _check_other_arrays(self, folder: str, key: str, tail: bytes,
                                  records: dict[str, str | ChunkPlaces | None], prototype: Any) -> None:
        """An OSError when the chunk file ``key`` of the array in ``folder``, whose checksum ``tail`` was written
        for none of its chunks, holds the bytes written for a chunk of another array of the store (a layer's chunk
        copied over another layer's of its shape while the store is read: it gave that layer's values): of the
        arrays whose records this process holds, then of those the store's root records now, where it changed
        since it was read (a layer appended after the store was opened was read as an edit; found by audit). A
        store replaced since is the OSError that names it so."""
        known = [name for name in records if name != folder]
        await self._check_among(known, key, tail, records, prototype)
        checked = {folder, *known}  # not what another read added meanwhile: compared below
        opening = (self.location, self.generation, self.opening)
        version = self._root_version()
        if version is None or version != _ROOTS.get(opening):  # a local root read again only where it changed
            for name, recorded in (await self._root(prototype) or {}).items():
                records.setdefault(name, recorded)
            if version is not None:
                _ROOTS[opening] = version
        # another read may have added the appended layers' records meanwhile: those this one has not compared
        await self._check_among([name for name in records if name not in checked], key, tail, records, prototype)

    async def _check_among(self, names: list[str], key: str, tail: bytes,
                           records: dict[str, str | ChunkPlaces | None], prototype: Any) -> None:
        """An OSError when ``tail`` is the checksum written for a chunk of one of the arrays ``names``."""
        for other in names:
            places = records[other]
            if isinstance(places, str):
                records[other] = places = await self._places(other, places, prototype)
            if places is not None and (theirs := places.written_for(tail)) is not None:
                raise OSError(f"chunk file {key} of {self.location} holds the bytes written for {theirs} of "
                              f"{other} (copied over it since the store was written): read, they would give another "
                              f"layer's values; the store is damaged: write it again")

    async def _places(self, folder: str, recorded: str, prototype: Any) -> ChunkPlaces | None:
        """The ``ChunkPlaces`` of the array in ``folder`` from its metadata and its ``recorded`` checksums; None
        where either is unusable (the checks before reading name a damaged record or metadata)."""
        raw = await self._store.get(f"{folder}/zarr.json", prototype)
        try:
            return ChunkPlaces(json.loads(raw.to_bytes()), base64.b64decode(recorded, validate=True))
        except (AttributeError, TypeError, ValueError):  # no metadata, not JSON, not base64 (binascii.Error)
            return None

    def _present(self, key: str, value: Any) -> Any:
        """``value`` read at ``key``; for a chunk (or shard) file that is missing, a FileNotFoundError naming it."""
        if value is None and PurePosixPath(key).name not in METADATA_FILES:
            raise FileNotFoundError(f"chunk file {key} of {self.location} is missing where it was read: by a Dask "
                                    f"worker that cannot see the store's files (put the store where every worker "
                                    f"reads it: a shared disk or an object store), or lost after the store was "
                                    f"opened (write the layer again); chunkcca never reads it as a fill value")
        return value


def open_activations(path: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> xr.DataTree:
    """Open a store read-only as a lazy, Dask-backed DataTree chunked along datapoint only.

    Every node holding ``activations`` is checked for dims and dtype; nothing is read but metadata.

    Parameters
    ----------
    path
        A local path (``~`` is the home folder, as in xarray) or an fsspec URL (``"s3://bucket/acts.zarr"``,
        ``"file:///shared/acts.zarr"``; the protocol's fsspec package must be installed).
    storage_options
        Options of a URL's filesystem (credentials, endpoint).

    Returns
    -------
    xarray.DataTree
        One node per layer (e.g. ``tree["model0/conv2"]``), each holding ``activations``; pass nodes to
        the measures, or groups to [`similarity()`][chunkcca.similarity].
    """
    if not isinstance(path, (str, os.PathLike)):  # a DataTree got "expected str, bytes or os.PathLike" from abspath
        raise TypeError(f"a store is given by its path or URL (str or os.PathLike), got {type(path).__name__}"
                        + ("; an opened store's layers are already at hand" if isinstance(path, xr.DataTree) else ""))
    path = expanded(path)
    location = path if is_url(path) else os.path.abspath(path)  # one Dask name for any spelling
    check_storage_options(location, storage_options)
    check_zarr_settings()
    holder = None if is_url(location) else store_holding(location)
    if holder is not None:  # opened alone, a group of a store is not checked against the store's list of layers
        part = Path(location).relative_to(holder).as_posix()
        if not os.path.exists(location):
            raise FileNotFoundError(f"{location}: the activation store {holder} holds no {part!r}")
        raise ValueError(f"{location} is inside the activation store {holder}: open the store itself and take "
                         f"{part!r} from it (a store opens only whole, so that every layer it lists is checked)")
    try:
        fs, root = filesystem(location, storage_options)
    except (OSError, ValueError) as error:  # e.g. zip:///x.zip, whose archive is none: "Is a directory: <cwd>"
        kind = next(kind for kind in (FileNotFoundError, ValueError, OSError) if isinstance(error, kind))
        raise kind(f"cannot open the store {location}: {type(error).__name__}: {error}") from error
    if not fs.exists(f"{root}/zarr.json"):
        if fs.exists(f"{root}/.zgroup") or fs.exists(f"{root}/.zattrs"):
            raise ValueError(f"{location} is a zarr v2 store; chunkcca reads zarr v3 activation stores: write its "
                             f"layers again with chunkcca.write_activations (or chunkcca ingest)")
        if is_url(location) or not Path(location).exists():
            raise FileNotFoundError(f"no activation store at {location}{_unfinished_write(location)}")
        raise ValueError(f"{location} is not an activation store: a zarr v3 store is a folder with a zarr.json, and "
                         f"this is {_kind_of_path(Path(location))}")
    try:
        root_metadata = parsed_metadata(fs.cat(f"{root}/zarr.json"), "zarr.json")
    except ValueError as error:
        raise ValueError(f"cannot open {location} as a zarr activation store: {error}") from error
    attributes = root_metadata.get("attributes", {})
    generation = attributes.get(GENERATION_ATTR)
    with replaced_meanwhile(location, storage_options, generation):  # another process replacing it: said so
        try:
            listing = Listing.of(fs, root)
        except ValueError as error:  # a damaged metadata file, named
            raise ValueError(f"cannot open {location} as a zarr activation store: {error}") from error
        if "." in listing.arrays:  # its root, an array, was taken for a label array that lost a chunk: "damaged"
            raise ValueError(f"{location} is a zarr array, not an activation store (a zarr group of layers): write "
                             f"it as a layer with chunkcca.write_activations (or chunkcca ingest)")
        check_metadata(listing, attributes, location)  # before xarray reads labels by it
        _check_no_layer_holds_another(listing, location)
        _check_consolidated_layers(root_metadata, listing, location)
        try:
            with warnings.catch_warnings():  # a folder without zarr.json: a layer's is named below (check_store_files),
                # and another (a user's own, "plots") is not the store's: zarr's warning was a second line beside ours
                warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component of a Zarr")
                tree = xr.open_datatree(WholeStore.at(location, storage_options, generation, uuid.uuid4().hex),
                                        engine="zarr", chunks={}, consolidated=False)
        except Exception as error:
            check_store_files(location, listing, (), ())  # a label's chunk file lost (xarray reads labels): named
            why = _unreadable_label(listing, location, storage_options)
            if why is None:  # each label's chunk files read: one holding another's bytes (``ChunkPlaces``), named
                check_label_places(fs, root, listing, chunk_records(attributes, location), location)
            raise ValueError(f"cannot open {location} as a zarr activation store: {why or error}") from error
        appending = attributes.get(APPENDING_ATTR, {}).get("layers", [])
        in_flight = set(appending) - set(attributes.get(ORDER_ATTR, []))
        if in_flight:  # layers an append is moving in (or was, when it was killed): not the store's yet
            tree = tree.filter(lambda node: node.path.strip("/") not in in_flight)
        found = layer_paths(tree)
        listed = tree.attrs.get(ORDER_ATTR) or ()
        if not found:
            if listed:  # the layers it lists, lost, are named as such
                check_store_files(location, listing, listed, found)
            written_as = {RESULT: "a result chunkcca saved (save_result, sweep --out): open it with xarray.open_zarr",
                          "Moments": "Moments chunkcca saved: load them with chunkcca.Moments.load"}
            what = written_as.get(tree.attrs.get(RESULT_ATTR), "")
            raise ValueError(f"{location} holds no layer (no node with a variable {VARIABLE!r})"
                             + (f"; it is {what}" if what else ""))
        check_store_files(location, listing, listed, found)
        check_shards(fs, root, listing, location)
        check_label_places(fs, root, listing, chunk_records(attributes, location), location)
    # layers the store does not list (written by xarray, or before chunkcca recorded its order) sorted: zarr lists
    # groups in no fixed order
    found = [layer for layer in found if layer in listed] + sorted(layer for layer in found if layer not in listed)
    _in_order(tree, found)
    order = {layer: i for i, layer in enumerate(found)}  # network order, which a node's copies keep (isel, sel)
    for layer in found:
        if MASK in tree[layer].data_vars:  # a coordinate, so that tree[layer]["activations"] carries its padding
            tree[layer].dataset = tree[layer].to_dataset(inherit=False).set_coords(MASK)
        as_activations(tree[layer], layer, unique_channels=False)  # refused where measured, not in the way here
        # where the layer's files are: named by read errors, hashed by checkpoints (checkpoint.store_signature)
        # and which Dask array reads them as they are: a layer computed from it may keep this encoding (roll, copy)
        tree[layer][VARIABLE].encoding.update(store=location, layer=layer, order=order[layer],
                                              generation=tree.attrs.get(GENERATION_ATTR),
                                              storage_options=dict(storage_options or {}),
                                              dask_name=tree[layer][VARIABLE].data.name)
        if MASK in tree[layer].coords:  # which Dask array reads its own mask (checkpoint.store_signature)
            tree[layer][VARIABLE].encoding["mask_dask_name"] = tree[layer][MASK].data.name
    return tree


def _check_consolidated_layers(root_metadata: Mapping[str, Any], listing: Listing, location: str) -> None:
    """Refuse a store whose consolidated metadata (xarray's and zarr's default; chunkcca lists the store instead)
    names a layer's activations that the store no longer holds: the layer was left out, unsaid (a sweep lost it)."""
    consolidated = (root_metadata.get("consolidated_metadata") or {}).get("metadata") or {}
    lost = sorted(str(PurePosixPath(path).parent) for path, node in consolidated.items()
                  if PurePosixPath(path).name == VARIABLE and isinstance(node, Mapping)
                  and node.get("node_type") == "array" and path.strip("/") not in listing.arrays)
    if lost:
        raise OSError(f"{location} lists layer{'s' if len(lost) > 1 else ''} {', '.join(map(repr, lost))} in its "
                      f"consolidated metadata but holds no {VARIABLE!r} for {'them' if len(lost) > 1 else 'it'}: the "
                      f"store is damaged; if {'they were' if len(lost) > 1 else 'it was'} removed on purpose, "
                      f"consolidate its metadata again (zarr.consolidate_metadata({location!r}))")


def _check_no_layer_holds_another(listing: Listing, location: str) -> None:
    """Refuse a store (written by other tools: chunkcca's writers refuse it) where a layer's group holds another
    layer: xarray gave the inner one the outer one's datapoint labels where it had none of its own (paired by them,
    silently), and failed where it had others ("group '/child' is not aligned with its parents:")."""
    nested = holding_pair(str(PurePosixPath(path).parent) for path in listing.arrays
                          if PurePosixPath(path).name == VARIABLE)
    if nested is not None:
        outer, inner = nested
        holder = "its root ('/'), a layer," if outer == "." else f"layer {outer!r}"
        raise ValueError(f"{location}: {holder} holds layer {inner!r} in its group; a layer cannot hold "
                         f"another (xarray would give {inner!r} the datapoint labels of the layer holding it): "
                         f"write them side by side, e.g. as {(outer.strip('.') or 'root') + '/out'!r} and "
                         f"{inner!r}")


def _kind_of_path(path: Path) -> str:
    """What is at an existing ``path`` that is no store, in words (/dev/null was called "a folder")."""
    return "a folder without one" if path.is_dir() else "a file" if path.is_file() else "neither a file nor a folder"


def _unreadable_label(listing: Listing, location: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """Which label array (a coordinate: not activations, not a mask) of the store ``listing`` lists cannot be
    read, and why (a chunk failing its checksum); None if all can. Labels are small: each is read whole."""
    import zarr

    store = WholeStore.at(location, storage_options)
    for folder in sorted(listing.arrays):
        if PurePosixPath(folder).name in (VARIABLE, MASK):
            continue
        try:
            zarr.open_array(store, path=folder, mode="r")[...]
        except Exception as error:
            return f"its label array {folder} cannot be read: {read_failure(error)}"
    return None


def _unfinished_write(location: str) -> str:
    """What to say of a store not there whose write left its temporary folders beside it (``_fs.leftovers``):
    killed (their writer gone) or maybe still under way; "" when none did."""
    left = [] if is_url(location) else leftovers(location)
    if not left:
        return ""
    folders = ", ".join(str(folder) for folder, _ in left)
    if all(stale for _, stale in left):
        return (f": a write of it was killed before it ended, leaving {folders}; write the store again (which "
                f"removes {'them' if len(left) > 1 else 'it'})")
    return f": a write of it has not ended (under way, or killed), leaving {folders}"


def read_coordinate(layer: xr.DataArray, name: str) -> xr.Variable:
    """The coordinate ``name`` of ``layer``, read (a store's labels other than the indexed ones are read when
    used); an OSError naming both where a chunk of it fails its checksum (zarr's message named neither)."""
    try:
        return layer.coords[name].variable.compute()
    except Exception as error:
        if not fails_checksum(error):
            raise
        where = f" of {layer.encoding['store']}" if "store" in layer.encoding else ""
        raise OSError(f"the coordinate {name!r} of layer {str(layer.name)!r}{where} cannot be read: "
                      f"{read_failure(error)}") from error


def read_failure(error: BaseException) -> str:
    """What a failed read of a chunk ran into, in one phrase: a chunk failing its checksum is said to be damage
    (zarr's "Stored and computed checksum do not match. Stored: b'…'" said nothing of that), another error as it
    is."""
    if fails_checksum(error):
        return ("its chunk file fails its CRC32C checksum (its bytes changed since they were written): the store is "
                "damaged; write it again")
    return f"{type(error).__name__}: {error}"


def _in_order(tree: xr.DataTree, layers: Sequence[str]) -> None:
    """Put each group's children in the order ``layers`` (paths, network order) first reaches them, so that a walk
    of the tree meets its layers in that order: a tree xarray makes anew from it (``map_over_datasets``), which
    keeps no encoding, keeps it (``layers.layer_paths``)."""
    rank = {layer: i for i, layer in enumerate(layers)}

    def first(node: xr.DataTree) -> int:
        return min((rank.get(below.path.strip("/"), len(rank)) for below in node.subtree), default=len(rank))

    for child in tree.children.values():
        _in_order(child, layers)
    if len(tree.children) > 1:
        tree.children = dict(sorted(tree.children.items(), key=lambda item: first(item[1])))


def describe_store(path: str | os.PathLike, *,
                   storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The layers of a store, as ``chunkcca info`` prints them; reads metadata, a file listing and each chunk
    file's checksum (its last 4 bytes; whole, the first ``integrity.CHECKED_EDITS`` of an array edited since it was
    written): a chunk file lost, cut short, overwritten or moved is an error, as before a run (``check_complete``),
    and one edited a warning. Damage inside a file that leaves its last 4 bytes is found when a run reads it.

    Parameters
    ----------
    path, storage_options
        As for [`open_activations()`][chunkcca.open_activations].

    Returns
    -------
    list of dict
        Per layer, in network order: ``layer``, ``shape``, ``dims``, ``datapoints_per_chunk``, ``chunks``,
        ``dtype``, ``bytes``, ``bytes_on_disk``, ``coords`` (the names of its coordinates on datapoint other than
        the datapoint labels, e.g. a class label, which ``groupby=`` and ``folds=`` take), ``mask`` (whether it
        has a padding mask: its padded positions are left out of every measure), ``labelled`` (whether its
        datapoints carry labels, False for a layer stored without them, which pairs by position only) and
        ``checksummed`` (whether its chunks carry a CRC32C checksum, as chunkcca writes them: False for a layer
        written by other tools with their defaults, whose chunks damaged on disk may decode to other values).
    """
    tree = open_activations(path, storage_options=storage_options)
    layers = [tree[layer][VARIABLE] for layer in layer_paths(tree)]
    with replaced_meanwhile(layers[0].encoding["store"], storage_options, tree.attrs.get(GENERATION_ATTR)):
        check_complete(layers)
    fs, root = filesystem(layers[0].encoding["store"], storage_options)
    rows = []
    for layer in layer_paths(tree):
        array = tree[layer][VARIABLE]
        rows.append({"layer": layer, "shape": list(array.shape), "dims": list(map(str, array.dims)),
                     "datapoints_per_chunk": int(array.data.chunks[0][0]), "chunks": int(array.data.numblocks[0]),
                     "dtype": str(array.dtype), "bytes": int(array.nbytes),
                     "bytes_on_disk": sum(file_sizes(fs, path_under(root, layer)).values()),  # fsspec's du, faster
                     "coords": sorted(str(name) for name, coord in array.coords.items()
                                      if coord.dims == ("datapoint",) and name != "datapoint"),
                     "mask": MASK in array.coords, "labelled": not holds_positions(array),
                     "checksummed": checksummed(parsed_metadata(fs.cat(path_under(root, layer, VARIABLE, "zarr.json")),
                                                                f"{layer}/{VARIABLE}/zarr.json"))})
    check_unchanged(layers)  # sizes of another store's files are not this one's
    return rows


def check_result_path(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse, before any work, a place that ``save_result(result, path, overwrite=overwrite)`` would refuse.

    Run it before a long computation whose result is to be saved at ``path``; ``save_result`` checks again when it
    writes (the place may change meanwhile).

    Parameters
    ----------
    path
        Where the result is to be saved: a local ``.nc`` (netCDF) or ``.zarr`` path (the extension in any case).
    overwrite
        As for ``save_result``: whether an existing result that ``save_result`` wrote is to be replaced.

    Raises
    ------
    ValueError
        ``path`` is not a local ``.nc`` or ``.zarr`` path, its folder is missing or cannot be written to, or it
        lies inside an activation store.
    FileExistsError
        ``path`` exists and ``overwrite`` is False; or it is not a result ``save_result`` wrote; or it is a zarr
        result holding anything chunkcca did not write (a user's notes or plots put inside it, also inside its
        arrays: they would go with it).
    """
    check_flag("overwrite", overwrite)
    path = expanded(path)
    suffix = Path(path).suffix.lower()  # in any case, as plots and ingest's files
    if suffix not in (".nc", ".zarr"):
        raise ValueError(f"{path}: name a netCDF file (.nc) or a zarr store (.zarr)")
    check_local(path)
    check_output_place(path, "the result's path")
    what = "a zarr result" if suffix == ".zarr" else "a netCDF result"
    check_replaceable(Path(path), overwrite, is_saved_result, what)
    if suffix == ".zarr" and overwrite and Path(path).exists() \
            and (foreign := result_foreign_files(Path(path))):
        raise FileExistsError(f"{path} holds what chunkcca did not write ({', '.join(foreign)}"
                              f"{' …' if len(foreign) == 3 else ''}); an overwrite replaces only a result that "
                              f"chunkcca saved: move them out of it, or choose another path")


def save_result(result: xr.Dataset | xr.DataArray, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a result to a local netCDF file or zarr store, atomically.

    A temporary file beside ``path`` is renamed into place, so an interrupted write leaves any older file
    whole. Reopen it with ``xarray.open_dataset(path)`` (.nc) or ``xarray.open_zarr(path)`` (.zarr, written with
    consolidated metadata).

    Parameters
    ----------
    result
        A result of chunkcca (or any Dataset whose attrs netCDF can hold), or one variable of it (a DataArray,
        ``sweep["cka"]``): saved as a Dataset of that variable alone, by its name ("value" if it has none).
    path
        A local ``.nc`` (netCDF) or ``.zarr`` path (the extension in any case).
    overwrite
        Replace an existing result that ``save_result`` wrote (its attrs say ``chunkcca="result"``); never
        another file or store, nor a zarr result holding anything else (a FileExistsError).
    """
    if isinstance(result, xr.DataArray):  # one variable of a result (sweep["cka"]), as the plots take it
        result = result.to_dataset(name=result.name if result.name is not None else "value", promote_attrs=True)
    if not isinstance(result, xr.Dataset):
        raise TypeError(f"save_result() saves a result (an xarray Dataset, or a DataArray of one); got "
                        f"{type(result).__name__}")
    path = expanded(path)
    check_result_path(path, overwrite=overwrite)
    suffix = Path(path).suffix.lower()
    # the encoding a result read from a file keeps is that file's (netCDF's text as 'S1' characters, which zarr v3
    # wrote as null-terminated bytes without a stable spec): each format writes the values its own way
    result = result.drop_encoding()
    nested = next(((str(name), variable) for name, variable in result.variables.items() if variable.dtype == object
                   and any(isinstance(value, (tuple, list)) for value in variable.values.ravel().tolist())), None)
    if nested is not None:  # a MultiIndex's labels (channel_a of a layer's): numpy's "setting an array element …"
        name, variable = nested
        held = (f"{path}: {name!r} holds tuples ({variable.values.ravel()[:2].tolist()}…), which netCDF and zarr "
                f"cannot hold")
        if isinstance(result.xindexes.get(name), xr.indexes.PandasMultiIndex):  # result.stack(pair=...)
            raise ValueError(f"{held}: it is a MultiIndex of the result; save its levels as coordinates of their "
                             f"own (result.reset_index({name!r}))")
        raise ValueError(f"{held}, e.g. the labels of a layer's channel MultiIndex: give the layer plain labels or "
                         f"none (layer.reset_index('channel')), or drop them from the result "
                         f"(result.drop_vars({name!r}))")
    result = result.assign_attrs({RESULT_ATTR: RESULT})
    if suffix == ".zarr":
        # fixed-width unicode (pwcca's side, layer names) has no stable zarr v3 spec; vlen strings do
        texts = {name: variable.astype(object) for name, variable in result.variables.items()
                 if variable.dtype.kind == "U"}
        result = result.assign(texts) if texts else result
        write_atomically(path, partial(_to_consolidated_zarr, result), overwrite=overwrite,
                         replaceable=is_saved_result, what="a zarr result")
    else:  # .nc
        wide = next((str(name) for name, variable in result.variables.items() if variable.dtype.kind in "iu"
                     and variable.size and not -NETCDF_LARGEST_INT - 1 <= int(variable.min()) <= int(variable.max())
                     <= NETCDF_LARGEST_INT), None)
        if wide is not None:  # netCDF3 (scipy's writer) holds 32-bit integers: it failed in numpy's words on datetimes
            raise netcdf_int_error(str(path), f"{wide!r} holds {int(abs(result[wide]).max())}")
        complex_values = [str(name) for name, variable in result.variables.items() if variable.dtype.kind == "c"]
        if complex_values:  # netCDF3, which xarray writes without a netCDF4 library, has no complex type
            raise ValueError(f"{path}: netCDF files cannot hold the complex values of {', '.join(complex_values)} "
                             f"(spatial='dft' coefficients); save to a zarr store (.zarr), which can")
        write_atomically(path, lambda tmp: result.to_netcdf(tmp), overwrite=overwrite,
                         replaceable=is_saved_result, what="a netCDF result")


def _to_consolidated_zarr(result: xr.Dataset, path: Path) -> None:
    """Write a (small) result as a zarr v3 store with consolidated metadata, so that ``xarray.open_zarr(path)``
    opens it without its warning that there is none (zarr-python's own extension, marked must_understand=false:
    other readers read the arrays' metadata themselves)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        result.to_zarr(path, zarr_format=3, consolidated=True)


#: The attribute ``save_result`` marks its files with, and its value: what ``overwrite=True`` may replace.
RESULT_ATTR, RESULT = "chunkcca", "result"


def is_saved_result(path: Path) -> bool:
    """Whether ``path`` holds a result ``save_result`` wrote: a zarr group or netCDF file whose attrs say so (not
    saved Moments, an activation store or another dataset). Reads metadata only."""
    try:
        if path.suffix.lower() == ".zarr":
            return zarr_attributes(path).get(RESULT_ATTR) == RESULT
        if not (path.is_file() and _is_netcdf(path)):
            return False
        with xr.open_dataset(path, cache=False) as dataset:
            return dataset.attrs.get(RESULT_ATTR) == RESULT
    except Exception:  # unreadable: not ours
        return False


def _is_netcdf(path: Path) -> bool:
    """Whether ``path`` is a netCDF file (classic or HDF5-based), by its first bytes."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
    except OSError:
        return False
    return head[:3] == b"CDF" or head == b"\x89HDF\r\n\x1a\n"


def check_complete(layers: Sequence[xr.DataArray]) -> None:
    """Before reading: every chunk file of each store-backed layer is there, or, for a layer computed from one
    (``layer.astype(...)``, arithmetic, selections lose the store in their encoding), of every zarr array its
    graph reads. zarr reads a missing chunk as its fill value, which would be a wrong number; here it is an error
    naming the layer (and, for a store's layer, its datapoints). A chunk file moved to another chunk's place is
    an error too (``CHUNKS_ATTR``). One listing of each array's folder and a small read per chunk file, no data."""
    for layer in layers:
        encoding = layer.encoding
        sources = [layer.data]  # Dask arrays whose zarr arrays are checked through their graphs
        if MASK in layer.coords and not mask_as_opened(layer):
            sources.append(layer.coords[MASK].data)  # a mask given in place of the store's, or to a layer without
        if "store" in encoding and "layer" in encoding:
            sources = sources[1:]  # its folder is listed: not again through its graph
            fs, root = filesystem(encoding["store"], encoding.get("storage_options"))
            places = chunk_records(json.loads(fs.cat(f"{root}/zarr.json")).get("attributes", {}), encoding["store"])
            stored_mask = MASK in layer.coords and "mask_dask_name" in encoding  # the store has one: list it
            for variable in (VARIABLE, MASK) if stored_mask else (VARIABLE,):
                folder = path_under(root, encoding["layer"], variable)
                metadata = json.loads(fs.cat(f"{folder}/zarr.json"))
                sizes = file_sizes(fs, folder)
                what = f"layer {encoding['layer']!r}" + ("" if variable == VARIABLE else f"'s {variable}")
                check_chunks(metadata, set(sizes), what, encoding["store"])
                recorded = places.get(encoding["layer"], {}).get(variable)
                checksums = None if recorded is None else chunk_checksums(fs, folder, metadata, sizes)
                if checksums is not None:
                    check_places(checksums, recorded, metadata, what, encoding["store"],
                                 chunk_reader(fs, folder, metadata))
        for array in (array for data in sources if hasattr(data, "__dask_graph__") for array in zarr_arrays(data)):
            if array.nchunks_initialized < array.nchunks:
                raise OSError(f"layer {str(layer.name)!r} reads {array.store_path}, which lacks "
                              f"{array.nchunks - array.nchunks_initialized} of its {array.nchunks} chunk files: "
                              f"{LOST_CHUNKS}")


def store_generation(location: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The generation a store's root metadata records (new at each whole write), None for a store with none."""
    fs, root = filesystem(location, storage_options)
    return json.loads(fs.cat(f"{root}/zarr.json")).get("attributes", {}).get(GENERATION_ATTR)


@contextlib.contextmanager
def replaced_meanwhile(location: str, storage_options: Mapping[str, Any] | None,
                       generation: str | None) -> Iterator[None]:
    """An OSError or ValueError raised while the store at ``location``, of ``generation``, is opened or checked is
    said to come from its replacement, when another process wrote it again meanwhile (a chunk file gone or of
    other bytes was called damage, "write it again")."""
    try:
        yield
    except (OSError, ValueError) as error:
        if generation is not None and _replaced(location, storage_options, generation):
            raise OSError(f"{location} was replaced (written again, by another process) while it was opened; open it "
                          f"again") from error
        raise


def _replaced(location: str, storage_options: Mapping[str, Any] | None, generation: str) -> bool:
    """Whether the store at ``location`` is no longer of ``generation`` (written again, or gone)."""
    try:
        return store_generation(location, storage_options) != generation
    except (OSError, ValueError):
        return True


def check_unchanged(layers: Sequence[xr.DataArray]) -> None:
    """After reading: no store-backed layer's store was replaced since it was opened (a read that overlapped a
    replacement would mix old and new chunks); an error saying so, never a mixed result."""
    for location, generation, options in {(layer.encoding["store"], layer.encoding.get("generation"),
                                           json.dumps(layer.encoding.get("storage_options") or {}))
                                          for layer in layers if layer.encoding.get("generation")}:
        if _replaced(location, json.loads(options), generation):
            raise OSError(f"{location} was replaced while it was read, so the chunks read may mix the old store "
                          f"and the new one; open it again and run again")


def leftover_writes(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The temporary folders beside a local store that interrupted writes of it left.

    Parameters
    ----------
    path
        The store.

    Returns
    -------
    list of dict
        Per folder: ``path``, ``bytes`` and ``stale`` (its writer, a process of this machine, is gone: the next
        write of the store removes it; a folder whose writer is unknown is left for you to judge).
    """
    path = expanded(path)
    if is_url(path):
        return []
    return [{"path": str(folder), "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
             "stale": stale} for folder, stale in leftovers(path)]
