"""One layer as a labelled, Dask-backed DataArray: dims, dtype, datapoint labels, alignment by label.

A layer has dims (datapoint, height, width, channel), or (datapoint, channel) for a fully connected
layer. Anything a measure takes (numpy and Dask arrays, DataArrays, Datasets and DataTree nodes holding
``activations``) becomes one here, checked and named, without reading it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.array import PerformanceWarning
from dask.utils import format_bytes

from ._fs import ORDER_ATTR
from ._stack import user_stacklevel
from .options import (
    MASK,
    ORDERLESS,
    VALUE_ROUNDING_ATTR,
    VARIABLE,
    check_number,
    held_and_limit,
    holds_positions,
    layer_name,
)

#: At most this many position dims (volumes: depth, height, width).
MAX_POSITIONS = 3
CONV_DIMS: tuple[str, ...] = ("datapoint", "height", "width", "channel")
FC_DIMS: tuple[str, ...] = ("datapoint", "channel")
#: The dims an array without names is given, by its number of axes.
DEFAULT_DIMS: dict[int, tuple[str, ...]] = {2: FC_DIMS, 3: ("datapoint", "token", "channel"), 4: CONV_DIMS,
                                             5: ("datapoint", "depth", "height", "width", "channel")}
#: Position dims in the order rows take them, whatever order a layer gives them in: a layer stored as (datapoint,
#: width, height, channel) makes its rows (and ``stride`` picks them) as one stored (datapoint, height, width,
#: channel) does, so that its partner's order or its place in a sweep does not change which rows are compared.
STANDARD_POSITIONS: tuple[str, ...] = ("time", "token", "depth", "height", "width")
#: Bytes per datapoint chunk that ``chunks="auto"`` aims for.
CHUNK_BYTES = 16 * 2**20
BLOSC_BUFFER_BYTES = 2**31 - 1 - 16  # the most Blosc compresses in one buffer (BLOSC_MAX_BUFFERSIZE)


def check_coord_name(name: Any) -> None:
    """A ValueError unless ``name`` can name a coordinate on datapoint: a non-empty string without '/' or spaces
    that names no dim or variable of a layer."""
    if not isinstance(name, str) or not name or "/" in name or any(char.isspace() for char in name):
        # a store lists a layer's coordinates space-separated (CF's "coordinates" attribute)
        raise ValueError(f"coords: a coordinate's name is a non-empty string without '/' or spaces, got {name!r}")
    if name in ("datapoint", "channel", *STANDARD_POSITIONS, MASK, VARIABLE):
        raise ValueError(f"coords: {name!r} names a dim or variable of a layer; call the coordinate otherwise")


def check_datapoint_coords(coords: Mapping[str, Any] | None) -> dict[str, xr.DataArray]:
    """``coords`` (name → one label per datapoint: each input's class, a split; in the layers' datapoint order, or
    a DataArray on ``datapoint`` labelled as the layers are) as DataArrays of numbers or strings; a ValueError
    naming the coordinate at fault. Their datapoints are checked against each layer by ``coord_values``."""
    checked: dict[str, xr.DataArray] = {}
    for name, values in (coords or {}).items():
        check_coord_name(name)
        if isinstance(values, xr.DataArray) and values.dims != ("datapoint",):
            raise ValueError(f"coords[{name!r}] has dims {tuple(map(str, values.dims))}; give it dims ('datapoint',)")
        array = values if isinstance(values, xr.DataArray) else np.asarray(values)
        if array.dtype.kind == "T":  # numpy's StringDType, as a store's strings are read back
            array = array.astype(object)
        if array.dtype.kind == "O" and all(isinstance(value, str) for value in np.ravel(array)):
            array = array.astype(str)
        if array.ndim != 1 or array.dtype.kind not in "biufU":
            raise ValueError(f"coords[{name!r}] must be one number or string per datapoint (1-d), got "
                             f"{array.ndim}-d {array.dtype} values")
        array = array if isinstance(array, xr.DataArray) else xr.DataArray(array, dims="datapoint")
        missing = int(np.isnan(array.values).sum()) if array.dtype.kind == "f" else 0
        if missing:  # a store may keep them; groupby= and folds= by it refuse them, after it is written
            warnings.warn(f"coords[{name!r}] is NaN for {missing} datapoint{'s' if missing > 1 else ''}: "
                          f"groupby={name!r} and folds={name!r} (--groupby, --folds) refuse NaN labels (no group); "
                          f"give those datapoints a label, or leave them out", RuntimeWarning,
                          stacklevel=user_stacklevel())
        checked[name] = array.drop_vars([key for key in array.coords if key != "datapoint"]).rename(name)
    return checked


def coord_values(coords: Mapping[str, xr.DataArray], labels: Any, layer: str) -> dict[str, np.ndarray]:
    """The values of ``coords`` (``check_datapoint_coords``) for the datapoints of ``layer`` labelled ``labels`` (a
    sequence, in order), taken by label when they carry datapoint labels; a ValueError naming the layer and the
    coordinate that does not fit."""
    labels = xr.Variable("datapoint", np.asarray(labels)).to_index()
    values = {}
    for key, coord in coords.items():
        if coord.sizes["datapoint"] != len(labels):
            raise ValueError(f"coords[{key!r}] has {coord.sizes['datapoint']} labels and layer {layer!r} "
                             f"{len(labels)} datapoints: give one label per datapoint, in order")
        if "datapoint" in coord.coords and not coord.indexes["datapoint"].equals(labels):
            own = coord.indexes["datapoint"]
            if not (own.is_unique and labels.isin(own).all()):
                raise ValueError(f"coords[{key!r}] labels its datapoints otherwise than layer {layer!r} (e.g. "
                                 f"{labels.difference(own)[:5].tolist()} are not among them)")
            coord = coord.sel(datapoint=labels)
        values[key] = coord.values
    return values


def labelled_as(coords: Mapping[str, xr.DataArray], layer: xr.DataArray) -> dict[str, xr.DataArray]:
    """``coords`` given in datapoint order (plain arrays) labelled with the datapoints of ``layer``, the first
    written, so that a layer listing the same datapoints in another order gets each label by datapoint."""
    coord_values(coords, layer["datapoint"].values, str(layer.name))  # their count checked
    return labelled_by(dict(coords), layer["datapoint"].values)


def labelled_by(coords: dict[str, xr.DataArray], labels: np.ndarray | None) -> dict[str, xr.DataArray]:
    """``coords`` (``check_datapoint_coords``) given in the order of the datapoints labelled ``labels`` (plain
    values, as many) labelled with them, so that those added to a store are checked against its layers' by label
    (``store.check_store_coords``): they were matched by position, refusing a model recorded (or layers ingested)
    over the same inputs in another order with its right labels, and taking the store's order's (found by audit).
    Unchanged without ``labels``."""
    if labels is None:
        return coords
    return {key: coord.assign_coords(datapoint=labels) if "datapoint" not in coord.coords
            and coord.sizes["datapoint"] == len(labels) else coord for key, coord in coords.items()}


def differing_labels(one: xr.DataArray, other: xr.DataArray) -> pd.Index:
    """The datapoints that two coordinates on ``datapoint``, each labelled by datapoint, both hold and give other
    values (NaN as NaN; a string never as a number): a store's layers may hold other datapoints, never other
    labels for one."""
    labels, others = one.indexes["datapoint"], other.indexes["datapoint"]
    if labels.equals(others):  # a layer of the same datapoints, in the same order: as they are
        shared, first, second = labels, np.asarray(one.values), np.asarray(other.values)
    else:
        shared = labels.intersection(others)
        first = np.asarray(one.values)[labels.get_indexer(shared)]
        second = np.asarray(other.values)[others.get_indexer(shared)]
    if first.dtype.kind in "USTO" or second.dtype.kind in "USTO":  # compared as Python values: "1" is not 1
        first, second = first.astype(object), second.astype(object)
    differ = np.asarray(first != second) & ~(pd.isna(first) & pd.isna(second))
    return shared[differ]


def merged_datapoint_coords(layers: Mapping[str, xr.DataArray]) -> dict[str, xr.DataArray]:
    """The coordinates on ``datapoint`` that ``layers`` (path → layer) hold, besides their labels and masks, each
    labelled by datapoint and taken together over the layers (a datapoint once; as Python values where the layers'
    dtypes differ, so that no value is rounded: int64 ids past 2⁵³ beside float ones); a ValueError naming two
    layers that give one datapoint other values of one."""
    held: dict[str, list[tuple[str, xr.DataArray]]] = {}  # coordinate → each layer holding it, with its values
    for path, layer in layers.items():
        for name, coord in layer.coords.items():
            if coord.dims != ("datapoint",) or name == "datapoint":
                continue
            own = xr.DataArray(np.asarray(coord.values), dims="datapoint", name=str(name),
                               coords={"datapoint": layer["datapoint"].values})
            for holder, values in held.get(str(name), []):  # each alone: a merge would promote their dtypes
                differ = differing_labels(values, own)
                if len(differ):
                    raise ValueError(f"layers {holder!r} and {path!r} give datapoints {differ[:5].tolist()} other "
                                     f"values of {name!r}: the layers of a store share their datapoints' labels")
            held.setdefault(str(name), []).append((path, own))
    merged = {}
    for name, holders in held.items():
        values = [own for _, own in holders]
        if len({own.dtype for own in values}) > 1:
            values = [own.astype(object) for own in values]
        whole = xr.concat(values, "datapoint") if len(values) > 1 else values[0]
        merged[name] = whole.isel(datapoint=~whole.indexes["datapoint"].duplicated())
    return merged


def with_datapoint_coords(layer: xr.DataArray, coords: Mapping[str, xr.DataArray]) -> xr.DataArray:
    """``layer`` with ``coords`` (``check_datapoint_coords``) on its datapoints (``coord_values``); a ValueError
    when the layer holds another coordinate of one's name."""
    name = str(layer.name)
    values = coord_values(coords, layer["datapoint"].values, name)
    for key, own in values.items():
        if key in layer.dims:
            raise ValueError(f"coords: {key!r} names a dim of layer {name!r}; call the coordinate otherwise")
        if key in layer.coords and not np.array_equal(np.asarray(layer.coords[key].values), own):
            raise ValueError(f"layer {name!r} has a coordinate {key!r} of its own, and coords gives other values")
    return layer.assign_coords({key: ("datapoint", own) for key, own in values.items()})


def datapoints_per_chunk(shape: tuple[int, ...], itemsize: int, chunks: int | str = "auto") -> int:
    """Datapoints per chunk: ``chunks`` itself, or for "auto" as many as fit ``CHUNK_BYTES``."""
    if chunks == "auto":
        per_datapoint = int(np.prod(shape[1:])) * itemsize
        return int(max(1, CHUNK_BYTES // max(per_datapoint, 1)))  # Dask clips it to the array's length
    if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise ValueError(f"chunks must be a positive number of datapoints or 'auto', got {chunks!r}")
    return int(chunks)


def chunk_of(shape: tuple[int, ...], itemsize: int, chunks: int | str = "auto") -> int:
    """``datapoints_per_chunk`` of a whole array of ``shape``, at most its datapoints (2**64 failed in Dask)."""
    return min(datapoints_per_chunk(shape, itemsize, chunks), max(shape[0], 1))


def check_chunk_bytes(layer: str, shape: tuple[int, ...], itemsize: int, per_chunk: int, compressed: bool) -> None:
    """A ValueError naming ``layer`` when a chunk of ``per_chunk`` datapoints of ``shape`` is more than its codec
    takes in one buffer, Blosc's ``BLOSC_BUFFER_BYTES`` (numcodecs said "Codec does not support buffers of >
    2147483647 bytes" at the first chunk's write), or more than an array can hold (zarr: "Maximum allowed
    dimension exceeded"), before anything is written."""
    per_datapoint = max(int(np.prod(shape[1:], dtype=object)) * itemsize, 1)
    largest, what = (BLOSC_BUFFER_BYTES, "Blosc compresses in one buffer") if compressed else (
        np.iinfo(np.intp).max, "an array holds")
    if per_chunk * per_datapoint <= largest:
        return
    size = f"chunks of {per_chunk} datapoints would be {format_bytes(per_chunk * per_datapoint)} each"
    if largest // per_datapoint == 0:  # one datapoint is more than a compressed chunk holds
        raise ValueError(f"layer {layer!r}: {size}, more than {what} ({format_bytes(largest)}), and one datapoint "
                         f"alone is {format_bytes(per_datapoint)}: store it without compression")
    raise ValueError(f"layer {layer!r}: {size}, more than {what} ({format_bytes(largest)}): give at most "
                     f"{largest // per_datapoint} datapoints per chunk ('auto' makes chunks of about "
                     f"{format_bytes(CHUNK_BYTES)})")


def as_activations(layer: Any, name: str | None = None, *, chunks: int | str = "auto",
                   allow_complex: bool = False, dims: Sequence[str] | Mapping[Hashable, str] | None = None,
                   guess_layout: bool = True, unique_channels: bool = True) -> xr.DataArray:
    """One layer as a Dask-backed DataArray with dims (datapoint, *positions, channel), 0 to 3 position dims.

    ``layer`` is a numpy or Dask array (axis 0 = datapoint, last axis = channel), a DataArray
    with dims ``datapoint`` and ``channel`` (in any order; the others are its positions, e.g. ``token``
    or ``time``), a Dataset or DataTree node holding ``activations`` (and, if padded, a boolean ``mask``
    (datapoint, *positions), carried as the coordinate ``mask``; True = a real position). Unnamed arrays
    get: 2-d (datapoint, channel), 3-d (datapoint, token, channel), 4-d (datapoint, height, width,
    channel), 5-d (datapoint, depth, height, width, channel). ``dims`` names the axes of an array
    explicitly (e.g. ``("datapoint", "channel", "height", "width")`` for channels-first data) or maps a
    DataArray's dim names to these. A 4-d array without ``dims`` is refused when it looks channels-first and
    read with a warning when either layout fits (``unnamed_layout()``); refused then too without
    ``guess_layout`` (a store records the guess as its dims). Repeated datapoint labels are refused, and
    repeated channel labels unless not ``unique_channels`` (a store opens whole with such a layer; measuring or
    writing it refuses them).
    ``name`` names the layer in error messages (default: the node path or DataArray name). Complex values are
    refused unless ``allow_complex``. Raises a ValueError or TypeError naming the layer and the fault. Nothing is
    computed.
    """
    if isinstance(layer, xr.DataTree):
        name = name or node_name(layer)
        if VARIABLE not in layer.data_vars:
            below = layer_paths(layer)
            if below:
                raise ValueError(f"{name!r} is a group, not a layer; its layers are {', '.join(below)}: pass one of "
                                 f"them (or the group to similarity, or to chunkcca sweep --a, for every pair)")
        layer = layer.to_dataset()
    if isinstance(layer, xr.Dataset):
        if VARIABLE not in layer:
            raise ValueError(f"layer {name!r} has no variable {VARIABLE!r} (has {sorted(map(str, layer))})")
        mask = layer[MASK] if MASK in layer.data_vars else None
        layer = layer[VARIABLE]
        if mask is not None:
            layer = layer.assign_coords({MASK: mask.variable})
    if isinstance(layer, xr.DataArray):
        if layer.name in (None, VARIABLE) and isinstance(layer.encoding.get("layer"), str):  # a store's: named by
            name = name or layer_name(layer.encoding["layer"])  # its node path
        name = name or (str(layer.name) if layer.name is not None else "activations")
        if isinstance(dims, Mapping):
            layer = layer.rename({old: new for old, new in dims.items() if old in layer.dims})
        elif dims is not None and not {"datapoint", "channel"} <= set(layer.dims):  # a tuple names arrays' axes
            raise ValueError(f"layer {name!r} is a DataArray of dims {tuple(map(str, layer.dims))}: dims= as a tuple "
                             f"names the axes of arrays; give a mapping from its dim names to chunkcca's, e.g. "
                             f"dims={{{str(layer.dims[0])!r}: 'datapoint', ...}}, or rename them with "
                             f"DataArray.rename (an array beside it: xarray.DataArray(array, dims=...))")
        array = _order_dims(layer, name)
    else:
        if not hasattr(layer, "shape") or not hasattr(layer, "dtype"):
            raise TypeError(f"layer {name!r}: expected a numpy/Dask array or xarray object, got {type(layer).__name__}")
        name = name or "activations"
        layer = _torch_as_numpy(layer, name)
        if dims is not None and not isinstance(dims, Mapping):
            if len(dims) != layer.ndim:
                raise ValueError(f"dims names {len(dims)} axes but layer {name!r} has {layer.ndim}")
            _check_dims_named_once(tuple(dims), name)
            array = _order_dims(xr.DataArray(layer, dims=tuple(dims), name=name), name)
        else:
            if layer.ndim not in DEFAULT_DIMS:
                raise ValueError(
                    f"layer {name!r} has {layer.ndim} dims (shape {tuple(layer.shape)}); expected (datapoint, "
                    f"*positions, channel) with at most {MAX_POSITIONS} position dims, e.g. (datapoint, channel), "
                    f"(datapoint, token, channel), (datapoint, height, width, channel)")
            layout = unnamed_layout(layer.shape) if layer.ndim >= 4 else "channels_last"
            positions = DEFAULT_DIMS[layer.ndim][1:-1]
            first, last = (repr(("datapoint", *dims)) for dims in (("channel", *positions), (*positions, "channel")))
            torch = "(N, C, H, W)" if layer.ndim == 4 else "(N, C, D, H, W)"
            name_axes = (f"name its axes: xarray.DataArray(array, dims={first}) if it is, or {last} if not (or "
                         f"dims= to the measures, which names the axes of every array given)")
            if layout == "channels_first":
                raise ValueError(f"layer {name!r} looks channels-first (PyTorch's {torch}): shape "
                                 f"{tuple(layer.shape)} has equal last two axes; {name_axes}")
            if layout == "unsure" and not guess_layout:
                raise ValueError(f"layer {name!r} of shape {tuple(layer.shape)} may be channels-first (PyTorch's "
                                 f"{torch}) or channels-last: either layout fits, and the store would record the "
                                 f"guess as its dims; give an xarray.DataArray(array, dims={last}), or dims={first} "
                                 f"if it is channels-first")
            if layout == "unsure":
                read = ", ".join(f"{dim} {size}" for dim, size in zip(DEFAULT_DIMS[layer.ndim][1:], layer.shape[1:]))
                warnings.warn(f"layer {name!r} of shape {tuple(layer.shape)} is read as (datapoint, {read}), but may "
                              f"be channels-first (PyTorch's {torch}); {name_axes}", UserWarning,
                              stacklevel=user_stacklevel())
            array = xr.DataArray(layer, dims=DEFAULT_DIMS[layer.ndim], name=name)
    if any(np.isnan(size) for sizes in array.chunks or () for size in sizes):  # .chunks reads nothing
        raise ValueError(f"layer {name!r} has chunks of unknown size (a Dask array selected by a mask, e.g. "
                         f"x[x[:, 0] > 0]); call its .compute_chunk_sizes() first")
    sizes = array.chunks[array.dims.index("datapoint")] if array.chunks and "datapoint" in array.dims else ()
    if 0 in sizes and array.sizes["datapoint"]:
        # empty chunks (that .compute_chunk_sizes() leaves where a mask kept nothing) are no rows to fold
        axis = array.dims.index("datapoint")  # the data's chunks only: numpy coordinates stay numpy
        array = array.copy(data=array.data.rechunk({axis: tuple(size for size in sizes if size)}))
    _check_values(array, name, allow_complex)
    _check_mask(array, name)
    for dim in ("datapoint", "channel"):  # labels without an index (drop_indexes) are still the labels
        if dim in array.coords and array.coords[dim].dims == (dim,) and dim not in array.indexes:
            array = array.set_xindex(dim)
    for dim in ("datapoint", "channel") if unique_channels else ("datapoint",):  # results are labelled by them
        labels = array.indexes.get(dim)
        if labels is not None and not labels.is_unique:
            repeated = labels[labels.duplicated()].unique()[:5].tolist()
            positions = dim == "datapoint" and holds_positions(array)  # two unlabelled layers joined (xr.concat)
            raise ValueError(f"layer {name!r} has repeated {dim} labels, e.g. {repeated}"
                             + ("; give each channel its own label, or drop them: layer.drop_vars('channel')"
                                if dim == "channel" else "")
                             + ("; these are not labels but each datapoint's position in a store written without "
                                "labels, so layers of two such stores joined repeat them: drop them to pair by "
                                "position (layer.drop_vars('datapoint')), or write the stores with labels (coords=)"
                                if positions else ""))
    if array.chunks is None:  # numpy, or a lazily indexed backend array: chunk it without reading it
        preferred = array.encoding.get("preferred_chunks", {}).get("datapoint")
        per_chunk = preferred if chunks == "auto" and preferred else chunk_of(array.shape, array.dtype.itemsize,
                                                                              chunks)
        data = array.variable._data
        if isinstance(data, np.memmap) and data.filename is not None:  # numpy's, maybe in a DataArray (not a
            # lazy backend array); a memmap's in-memory copy (m.astype, m.copy()) has no file: an array
            array = array.copy(data=memmap_to_dask(array.variable._data, per_chunk))
        else:
            array = array.chunk({dim: per_chunk if dim == "datapoint" else -1 for dim in array.dims})
    return array.rename(name)


def unnamed_layout(shape: Sequence[int]) -> Literal["channels_first", "channels_last", "unsure"]:
    """How an unnamed 4-d or 5-d shape reads: the layout whose positions are the more regular, square maps (height
    = width) before others and, among those, cubes (a volume's depth = height = width) before others:
    "channels_first" for PyTorch's (N, 64, 56, 56) or (N, 6, 4, 4, 4), "channels_last" for (N, 56, 56, 64) or
    (N, 16, 32, 32, 8), else "unsure" (maps that are not square, (N, 16, 12, 10), or equally regular either way,
    (N, 4, 4, 4)): either layout fits."""
    def regular(positions: Sequence[int]) -> tuple[bool, bool]:
        return positions[-1] == positions[-2], len(set(positions)) == 1

    first, last = regular([int(size) for size in shape[2:]]), regular([int(size) for size in shape[1:-1]])
    if first != last:
        return "channels_first" if first > last else "channels_last"
    return "unsure"


class _FileSlices:
    """A memory-mapped array seen only through slicing: ``dask.array.from_array`` copies (reads) whole
    array-likes that have a ``copy`` method, and hashes them for a name; this one is read chunk by chunk."""

    def __init__(self, data: np.memmap) -> None:
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self.data[key])


def memmap_to_dask(data: np.memmap, per_chunk: int) -> da.Array:
    """A memory-mapped array as Dask chunks read from its mapping on demand, named by file, offset and layout; a
    copy-on-write mapping (mode "c", whose pages edited in memory differ from the file's) also by the mapping
    itself, so that two of one file are never taken for one array (Dask's own name for a memmap is the file's)."""
    from dask.base import tokenize

    source = Path(str(data.filename))
    mapping = data
    while isinstance(mapping.base, np.ndarray):  # up to the array over the whole mapping
        mapping = mapping.base
    start = data.__array_interface__["data"][0] - mapping.__array_interface__["data"][0]  # of a view, e.g. m[100:]
    private = id(mapping.base) if data.mode == "c" else None  # the mmap object, held as long as the Dask array
    token = tokenize(str(source), source.stat().st_mtime_ns, data.offset, start, data.shape, data.strides,
                     str(data.dtype), private)
    return da.from_array(_FileSlices(data), chunks=(per_chunk, *data.shape[1:]), name=f"memmap-{token}",
                         meta=np.empty((0,) * data.ndim, dtype=data.dtype))


def _torch_as_numpy(layer: Any, name: str) -> Any:
    """A PyTorch CPU tensor as the numpy array it shares memory with (detached: one requiring grad failed in
    torch's words); one numpy cannot hold (bfloat16) or off the CPU is refused with the copy to make. Any other
    array as it is."""
    if not type(layer).__module__.startswith("torch") or not hasattr(layer, "detach"):
        return layer
    import torch

    if layer.device.type != "cpu":
        raise TypeError(f"layer {name!r} is a tensor on {layer.device}; chunkcca reads arrays in the computer's "
                        f"memory: pass tensor.cpu() (or record it to a store with chunkcca.record)")
    if layer.dtype == torch.bfloat16:
        raise TypeError(f"layer {name!r} is a bfloat16 tensor, a type numpy lacks: pass tensor.float() (exact, "
                        f"twice its memory), or record it to a store with chunkcca.record, which does the same")
    return layer.detach().numpy()


def _check_dims_named_once(dims: tuple[Hashable, ...], name: str) -> None:
    """Each axis of a layer has a name of its own (xarray takes one named twice for one axis)."""
    twice = next((dim for index, dim in enumerate(dims) if dim in dims[:index]), None)
    if twice is not None:
        raise ValueError(f"layer {name!r}: its dims {tuple(map(str, dims))} name {str(twice)!r} twice; give each "
                         f"axis its own name")


def _order_dims(array: xr.DataArray, name: str) -> xr.DataArray:
    """``array`` transposed to (datapoint, *positions, channel): positions named in ``STANDARD_POSITIONS`` in its
    order (rows are in C order of the positions, which ``stride`` picks from), other names as given."""
    _check_dims_named_once(tuple(array.dims), name)
    positions = [dim for dim in array.dims if dim not in ("datapoint", "channel")]
    if "datapoint" not in array.dims or "channel" not in array.dims or len(positions) > MAX_POSITIONS:
        raise ValueError(
            f"layer {name!r} has dims {tuple(map(str, array.dims))}; expected 'datapoint', 'channel' and at most "
            f"{MAX_POSITIONS} position dims such as 'token', 'time' or 'height', 'width' (rename yours with "
            f"DataArray.rename, or pass dims=)")
    if all(dim in STANDARD_POSITIONS for dim in positions):
        positions.sort(key=STANDARD_POSITIONS.index)
    _check_position_coords(array, positions, name)
    return array.transpose("datapoint", *positions, "channel")


def _check_position_coords(array: xr.DataArray, positions: Sequence[Hashable], name: str) -> None:
    """Numeric coordinates of position dims increase: positions pair by their order, so a layer flipped with its
    labels (``isel(height=slice(None, None, -1))``) would pair each pixel with its mirror image."""
    for dim in positions:
        if dim in array.coords and array[dim].dtype.kind in "iufmM" and array.sizes[dim] > 1:  # numbers, times
            values = array[dim].values
            # an Inf position is placed nowhere (interp's nearest left it out, silently); NaN does not increase
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise ValueError(f"layer {name!r}: its {dim!r} coordinates hold NaN or Inf (e.g. "
                                 f"{values[~np.isfinite(values)][0]}); positions are finite numbers: give it finite "
                                 f"{dim} coordinates, or drop them (layer.drop_vars({str(dim)!r}))")
            if not (values[1:] > values[:-1]).all():  # not np.diff, which wraps around for unsigned integers
                raise ValueError(f"layer {name!r}: its {dim!r} coordinates do not increase; layers pair positions "
                                 f"by their order, so put them in increasing order first "
                                 f"(layer.sortby({str(dim)!r}))")


def positions(layer: xr.DataArray) -> tuple[str, ...]:
    """A layer's position dims (none for a fully connected layer)."""
    return tuple(str(dim) for dim in layer.dims[1:-1])


def nothing_to_pad(name: str, dims: Sequence[Hashable], remedy: str = "leave its mask out") -> ValueError:
    """The error for a padding mask given to a layer of no positions (every measure then refused each of its
    datapoints as having "no real position")."""
    return ValueError(f"layer {name!r} has no positions (dims {tuple(map(str, dims))}), so nothing to pad: a mask "
                      f"marks the real positions of each datapoint; {remedy}")


def _check_mask(array: xr.DataArray, name: str) -> None:
    """A ``mask`` coordinate is boolean with dims (datapoint, *positions) (in that order once transposed), on a
    layer that has positions."""
    if MASK not in array.coords:
        return
    if not positions(array):  # a (datapoint,) mask was written and stored, then every measure refused the layer
        raise nothing_to_pad(name, array.dims, "drop its mask coordinate (layer.drop_vars('mask'))")
    mask = array.coords[MASK]
    if mask.dtype != bool or set(mask.dims) != {"datapoint", *positions(array)}:
        numbers = mask.dtype.kind in "iuf" and set(mask.dims) == {"datapoint", *positions(array)}
        raise ValueError(f"layer {name!r}: its mask must be boolean with dims {('datapoint', *positions(array))}, "
                         f"got {mask.dtype} {tuple(map(str, mask.dims))}"
                         + ("; a tokenizer's 0/1 attention mask is mask == 1 (write_activations, record and "
                            "ingest take 0/1 numbers and store booleans)" if numbers else ""))


def check_mask_dtype(dtype: np.dtype, what: str) -> None:
    """A padding mask's dtype is boolean or numeric, else a ValueError naming ``what``: strings, complex values and
    times are True as booleans ('False' too), so a mask of them read every position as real."""
    if dtype.kind not in "biuf":
        raise ValueError(f"{what} holds {dtype} values; a padding mask is boolean or 0/1 numbers, True (1) at real "
                         f"positions and False (0) at padded ones")


def boolean_mask(values: Any, what: str) -> Any:
    """A padding mask (numpy or Dask) as booleans: booleans as they are; numbers (a tokenizer's 0/1 integers,
    0.0/1.0) when each is 0 or 1, else a ValueError naming ``what``, raised for a Dask mask as each block is
    computed (a write it feeds then leaves nothing); other dtypes refused (``check_mask_dtype``). The one rule of
    ``write_activations``, ``record`` and ``ingest``."""
    check_mask_dtype(values.dtype, what)
    if values.dtype == bool:
        return values

    def checked(block: np.ndarray) -> np.ndarray:
        wrong = ~np.isin(block, (0, 1))
        if wrong.any():
            raise ValueError(f"{what} holds values other than 0/1 or True/False (e.g. {block[wrong][:3].tolist()}); "
                             f"a padding mask is True (1) at real positions and False (0) at padded ones")
        return block.astype(bool)

    return values.map_blocks(checked, dtype=bool) if isinstance(values, da.Array) else checked(np.asarray(values))


def _check_values(array: xr.DataArray, name: str, allow_complex: bool = False) -> None:
    dtype = array.dtype
    complex_refused = np.issubdtype(dtype, np.complexfloating) and not allow_complex
    if dtype.kind in "bmM" or not np.issubdtype(dtype, np.number) or complex_refused:  # timedelta64 is a number
        raise TypeError(f"layer {name!r} has dtype {dtype}; expected real numbers (float or integer)")
    empty = [str(dim) for dim, size in array.sizes.items() if size == 0]
    if empty:
        raise ValueError(f"layer {name!r} is empty: dim {', '.join(empty)} has size 0 (shape {array.shape})")


def node_name(node: xr.DataTree) -> str:
    """A node's path; for a node cut from a store (``tree["model0/conv"].isel(...)``, whose path became '/', or
    a layer of a cut group) the path it was opened at, which its activations keep in their encoding."""
    path = node.path.strip("/")
    opened = node[VARIABLE].encoding.get("layer") if VARIABLE in node.data_vars else None
    if isinstance(opened, str) and (not path or opened == path or opened.endswith(f"/{path}")):
        return layer_name(opened)
    return layer_name(path)


#: A name Dask gives an array (``array-78735f9f…``: a token of 32 hex digits, or a UUID for ``name=False``), which
#: xarray takes for the name of a
#: DataArray made from it without one (and keeps through arithmetic and selections).
DASK_KEY = re.compile(r".+-([0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def named(layer: Any, default: str, dims: Any = None) -> xr.DataArray:
    """``as_activations()`` of ``layer`` to be measured (``check_value_rounding``), named by its node path or
    DataArray name, else ``default``. A DataArray named after a Dask array's key names nothing to the user: it is
    unnamed; so is one named ``activations`` that lost its store's path (``.astype``, ``.where`` drop the encoding
    that holds it)."""
    is_named = isinstance(layer, xr.DataTree) or (
        isinstance(layer, xr.DataArray) and layer.name is not None and not DASK_KEY.fullmatch(str(layer.name))
        and (layer.name != VARIABLE or isinstance(layer.encoding.get("layer"), str)))
    return check_value_rounding(as_activations(layer, None if is_named else default, dims=dims))


def check_value_rounding(layer: xr.DataArray) -> xr.DataArray:
    """``layer``, to be measured, if its ``VALUE_ROUNDING_ATTR`` (if any) is a number in [0, 1); else an error
    naming it and the value. Not checked at open, so that one layer's attribute does not close the store."""
    rounding = layer.attrs.get(VALUE_ROUNDING_ATTR)
    if rounding is not None:
        try:
            check_number(VALUE_ROUNDING_ATTR, rounding, 0.0, 1.0, high_open=True)
        except ValueError:
            raise ValueError(f"layer {layer.name!r} has attribute {VALUE_ROUNDING_ATTR} = {rounding!r}: it gives the "
                             f"relative rounding of its values, a number in [0, 1) (bfloat16's is 2**-7 = "
                             f"0.0078125); set it so, or drop it: layer.attrs.pop({VALUE_ROUNDING_ATTR!r})") from None
    return layer


def _unlabelled_beside(labelled: xr.DataArray, labels: pd.Index, plain: xr.DataArray) -> ValueError:
    """The error for layer ``plain``, without labels, beside layer ``labelled``, whose ``labels`` position would
    not pair as they say (``check_pairing``)."""
    if holds_positions(labelled):  # a selection or reordering of a layer stored without labels, beside an array
        return ValueError(
            f"layer {labelled.name!r} holds the datapoints at positions {labels[:3].tolist()}, … of its store (a "
            f"selection or reordering of a layer stored without labels) and layer {plain.name!r} has no labels: "
            f"pairing them by position would ignore which of the store's datapoints it holds; select the same "
            f"datapoints of both, or give both labels (layer.assign_coords(datapoint=...))")
    return ValueError(
        f"layer {labelled.name!r} labels its datapoints (e.g. {labels[:3].tolist()}) and layer {plain.name!r} does "
        f"not (a store written without them, or an array): pairing them by position would ignore the labels; give "
        f"{plain.name!r} its labels (layer.assign_coords(datapoint=...); `chunkcca ingest --datapoints FILE` for "
        f"files), or drop those of {labelled.name!r} (layer.drop_vars('datapoint')) to pair by position")


def check_pairing(a: xr.DataArray, b: xr.DataArray) -> None:
    """Refuse two layers whose pairing cannot be told: one without a datapoint coordinate beside one of another
    count, or of labels other than 0, 1, …, N − 1 in order (which position would pair as they say); one holding the
    positions a store gave it (``holds_positions``) beside one of other labels. A sweep checks each pair it solves
    so: it aligns every layer to its first, through which such a pair met unchecked (CKA 0.006 for 0.80)."""
    labels_a, labels_b = a.indexes.get("datapoint"), b.indexes.get("datapoint")
    positions_a, positions_b = holds_positions(a), holds_positions(b)
    if labels_a is not None and labels_b is not None and not (positions_a and positions_b):
        if positions_a != positions_b and not labels_a.equals(labels_b):  # a store's positions are no labels
            (labelled, labels), plain = ((b, labels_b), a) if positions_a else ((a, labels_a), b)
            raise _unlabelled_beside(labelled, labels, plain)
        return  # labelled: by label
    if a.sizes["datapoint"] != b.sizes["datapoint"]:  # no labels to share datapoints by ("labels differ" said so)
        raise ValueError(f"layer {a.name!r} has {a.sizes['datapoint']} datapoints but layer {b.name!r} has "
                         f"{b.sizes['datapoint']}; both must hold the same datapoints")
    if labels_a is None or labels_b is None:  # an array: by position, where the other's order says as much
        (labelled, labels), plain = ((a, labels_a), b) if labels_a is not None else ((b, labels_b), a)
        if labels is not None and not labels.equals(pd.RangeIndex(len(labels))):
            raise _unlabelled_beside(labelled, labels, plain)


def align_layers(a: xr.DataArray, b: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray, bool]:
    """``a``, ``b`` with its datapoints in ``a``'s order by label (lazily), and whether that reordered them; any
    datapoint label missing on one side is an error.

    Layers without a datapoint coordinate are aligned by position (``check_pairing`` says when that is refused);
    two layers holding the positions a store gave them (``holds_positions``) pair by those positions, as xarray
    would, following a reordering of one.
    """
    check_pairing(a, b)
    if "datapoint" not in a.coords or "datapoint" not in b.coords:
        return a, b, False
    in_order, moved = aligned_to(a, b)
    return a, in_order, moved


def check_position_dims(a: xr.DataArray, b: xr.DataArray, spatial: str) -> None:
    """Refuse position dims of other names in another order on ``a`` and ``b`` (a pair solved) where the rows
    depend on the positions' order (not ``ORDERLESS``): which order makes the rows?"""
    positions = a.dims[1:-1]
    if spatial not in ORDERLESS and b.dims[1:-1] != positions \
            and sorted(map(str, b.dims[1:-1])) == sorted(map(str, positions)):
        # names of STANDARD_POSITIONS are in one order already: which of two orders of others makes the rows?
        raise ValueError(f"layers {a.name!r} and {b.name!r} hold position dims {tuple(map(str, positions))} and "
                         f"{tuple(map(str, b.dims[1:-1]))}: rows are taken in C order of the positions, so give both "
                         f"in one order (layer.transpose('datapoint', {', '.join(map(repr, map(str, positions)))}, "
                         f"'channel'))")


def aligned_to(reference: xr.DataArray, layer: xr.DataArray) -> tuple[xr.DataArray, bool]:
    """``layer`` with its datapoints in the order of ``reference`` (lazily), and whether that reordered them, by
    their labels (or a store's positions; a layer without either by its rows' order 0, 1, …, which a sweep's
    ``check_pairing`` of every pair it solves makes the order of each layer it is solved with). A label missing on
    one side is an error."""
    name_a, name_b = reference.name, layer.name
    labels_a, labels_b = (one.indexes.get("datapoint", pd.RangeIndex(one.sizes["datapoint"]))
                          for one in (reference, layer))
    if labels_a.equals(labels_b):  # labels are unique: as_activations refuses repeats
        return layer, False
    missing_b = labels_a.difference(labels_b)
    missing_a = labels_b.difference(labels_a)
    if len(missing_a) or len(missing_b):
        parts = [f"{len(missing)} of layer {one!r} are not in layer {other!r} (e.g. {missing[:5].tolist()})"
                 for missing, one, other in ((missing_b, name_a, name_b), (missing_a, name_b, name_a)) if len(missing)]
        advice = ("; to compare the datapoints both hold, select them in both: a.sel(datapoint=shared) and "
                  "b.sel(datapoint=shared), with shared = numpy.intersect1d(a.datapoint, b.datapoint)"
                  if len(labels_a) > len(missing_b) else "")
        what = ("datapoint positions differ (both layers were stored without datapoint labels, so they pair by their "
                "positions in their stores)" if holds_positions(reference) and holds_positions(layer)
                else "datapoint labels differ")
        raise ValueError(f"{what}: {' and '.join(parts)}{advice}; no datapoint is dropped silently")
    return layer.isel(datapoint=labels_b.get_indexer(labels_a)), True  # check_reordered() warns of it


#: What a layer reordered by label holds while a pass reads it, as a multiple of its size: Dask's take holds each
#: of its chunks from the first fold that needs a piece of it to the last, and the pieces cut from them (2.5 and
#: 2.7 times measured, for layers of 128 and 256 MiB in random order).
REORDER_HOLDS = 3


def check_reordered(first: str, reordered: Sequence[xr.DataArray], memory_limit: int) -> None:
    """Refuse, before anything is read, reordering layers to the datapoints of layer ``first`` (``align_layers``)
    where what it holds (``REORDER_HOLDS`` times their size) is over half of ``memory_limit``: the pass plans
    within ``memory_limit`` besides, so such a run holds at most 1.5 times it; else a PerformanceWarning for
    each."""
    held = REORDER_HOLDS * sum(layer.nbytes for layer in reordered)
    if reordered and held > memory_limit // 2:
        names = ", ".join(repr(str(layer.name)) for layer in reordered)
        holds, _ = held_and_limit(held, memory_limit // 2)  # in bytes where it reads as half the limit
        limit = f"{memory_limit:,} bytes" if holds.endswith(" bytes") else format_bytes(memory_limit)
        raise ValueError(f"layer{'s' if len(reordered) > 1 else ''} {names} hold{'' if len(reordered) > 1 else 's'} "
                         f"the datapoints of layer {first!r} in another order: pairing them by label holds about "
                         f"{REORDER_HOLDS} times {'their' if len(reordered) > 1 else 'its'} size in memory "
                         f"({holds}), over half of memory_limit={limit} (the pass "
                         f"plans within it besides); store the layers in one order (recorded through a DataLoader "
                         f"that does not shuffle), or raise memory_limit (--memory-limit) where the machine has the "
                         f"memory")
    for layer in reordered:  # after the refusal: a refused run's error is its one line
        warnings.warn(
            f"layer {str(layer.name)!r} holds the datapoints of layer {first!r} in another order; chunkcca reorders "
            f"it lazily, which holds up to about {REORDER_HOLDS} times layer {str(layer.name)!r} in memory "
            f"({format_bytes(REORDER_HOLDS * layer.nbytes)}) while it is read: store both layers in one order for "
            f"large data", PerformanceWarning, stacklevel=user_stacklevel())


def check_position_labels(a: xr.DataArray, b: xr.DataArray, spatial: str) -> None:
    """Where rows depend on the positions' order (not ``ORDERLESS``), positions pair by order; labels that are
    not numbers (an augmentation's or a head's names) are not positions in some unit, so two layers labelling a
    shared position dim otherwise (the same names in another order: each view paired with another) are an error
    naming the dim."""
    if spatial in ORDERLESS:
        return
    for dim in set(a.dims[1:-1]) & set(b.dims[1:-1]):
        if dim not in a.coords or dim not in b.coords or a.sizes[dim] != b.sizes[dim]:
            continue
        labels_a, labels_b = a[dim].values, b[dim].values
        if (_numbers(labels_a) and _numbers(labels_b)) or np.array_equal(labels_a, labels_b):
            continue
        reordered = sorted(map(str, labels_a)) == sorted(map(str, labels_b))
        remedy = f"put them in one order (b.sel({dim}=a[{str(dim)!r}])), or " if reordered else ""
        raise ValueError(f"layers {a.name!r} and {b.name!r} label their {str(dim)!r} positions "
                         f"{'in another order' if reordered else 'otherwise'} ({labels_a[:4].tolist()} against "
                         f"{labels_b[:4].tolist()}), and positions pair by order: {remedy}drop the labels to pair "
                         f"them by order (layer.drop_vars({str(dim)!r}))")


def _numbers(labels: np.ndarray) -> bool:
    """Whether position labels are numbers or times (also held as objects: ``[0, 1, 2]`` of dtype object)."""
    return labels.dtype.kind in "iufmM" or pd.Index(labels).inferred_type in (
        "integer", "floating", "mixed-integer-float", "decimal", "datetime64", "datetime", "timedelta64", "timedelta")


def layer_paths(tree: xr.DataTree) -> list[str]:
    """The layers of a store, or of a group of one, in the order they were written (network order).

    Parameters
    ----------
    tree
        A store opened with [`open_activations()`][chunkcca.open_activations], or a node of one.

    Returns
    -------
    list of str
        Node paths without the leading '/', e.g. ``["model0/conv1", "model0/conv2"]``; ``"/"`` for a layer at the
        root (a plain zarr store of one layer, written with xarray), which ``tree["/"]`` selects. A tree cut from a
        store (``tree["model0"].isel(...)``, whose root no longer lists the order) keeps the order its layers
        had when opened; layers no store lists (a tree built in memory, or made anew by xarray, e.g. with
        ``map_over_datasets``) follow in the tree's own order, depth first: a dict's order for a tree built from
        one, the network order for one made from an opened store (whose children ``open_activations`` puts in that
        order; a store that lists no order opens with its layers sorted).
    """
    if not isinstance(tree, xr.DataTree):  # a path, a layer's DataArray or a dict failed on their attributes
        raise TypeError(f"layer_paths lists the layers of an opened store (an xarray.DataTree from "
                        f"chunkcca.open_activations), got a {type(tree).__name__}"
                        + ("; open it first: chunkcca.layer_paths(chunkcca.open_activations(path))"
                           if isinstance(tree, (str, Path)) else ""))

    def depth_first(node: xr.DataTree) -> Iterator[xr.DataTree]:
        yield node
        for child in node.children.values():
            yield from depth_first(child)

    nodes = {node.path.strip("/"): node for node in depth_first(tree) if VARIABLE in node.data_vars}
    rank = {path: i for i, path in enumerate(tree.root.attrs.get(ORDER_ATTR) or ())}
    walked = {path: i for i, path in enumerate(nodes)}

    def place(path: str) -> tuple[int, int, int]:
        opened = nodes[path][VARIABLE].encoding.get("order")
        return rank.get(path, len(rank)), len(nodes) if opened is None else int(opened), walked[path]
    return [layer_name(path) for path in sorted(nodes, key=place)]


#: Characters a layer path's parts may hold: letters, digits and ``_ - . + =``.
_SAFE_PART = re.compile(r"[A-Za-z0-9_+=\-][A-Za-z0-9_+=.\-]*")


#: The longest part of a layer path, in bytes: each is a folder's name, and filesystems take at most 255.
LONGEST_PART = 255


def layer_path(name: Any) -> str:
    """``name`` as a layer path: parts split by '/', leading and trailing '/' dropped; a ValueError naming it when a
    part is empty, hidden (starts with '.', which chunkcca keeps for its temporary folders), reserved by zarr
    (starts with '__' or is 'zarr.json'), holds other characters than letters, digits and ``_ - . + =``, or is
    longer than a folder's name can be (``LONGEST_PART`` bytes)."""
    path = str(name).strip("/")
    for part in path.split("/"):
        if not _SAFE_PART.fullmatch(part) or part.startswith("__") or part in (VARIABLE, "zarr.json", *CONV_DIMS):
            raise ValueError(f"layer path {name!r}: each part between '/' must be a name of letters, digits and "
                             f"_ - . + = that does not start with '.' or '__' and is not {VARIABLE!r}, 'zarr.json' "
                             f"or a dim name (part {part!r})")
        if len(part.encode()) > LONGEST_PART:  # the write failed on the OS's "File name too long", naming a temp path
            raise ValueError(f"layer path {str(name)[:40]!r}…: each part between '/' is a folder's name, at most "
                             f"{LONGEST_PART} bytes (one part has {len(part.encode())})")
    return path


def check_layer_paths(names: Sequence[str], *, existing: Sequence[str] = (), where: str = "") -> list[str]:
    """Layer paths normalised by ``layer_path()``, refused if one is given twice (``"fc"`` and ``"/fc"`` too), is
    in ``existing`` already, or holds another layer (``"x"`` and ``"x/y"``: a layer is a leaf of the store)."""
    paths = [layer_path(name) for name in names]
    seen: dict[str, Any] = {}
    for name, path in zip(names, paths):
        if path in seen:
            raise ValueError(f"layer path {path!r} is given twice ({seen[path]!r} and {name!r})")
        seen[path] = name
    place = f" in {where}" if where else ""
    if paths and layer_name("") in existing:  # a layer at the store's root (a plain zarr store of one layer)
        raise ValueError(f"{where or 'the store'} is one layer at its root ('/'), which would hold layer "
                         f"{paths[0]!r}: a layer cannot hold another; write its layer and the new ones to a new "
                         f"store, e.g. write_activations(path, {{'first': tree['/'], {paths[0]!r}: ...}})")
    for path in paths:
        if path in existing:
            raise ValueError(f"{where or 'the store'} already holds layer {path}; adding leaves every existing layer "
                             f"as it is: choose another name")
    nested = holding_pair(paths, existing)
    if nested is not None:
        outer, inner = nested
        if outer in existing:  # the store's layer keeps its name: the new one goes beside it
            advice = f"name the new one beside it (e.g. {outer + '_' + inner.rsplit('/', 1)[-1]!r})"
        elif inner in existing:
            advice = f"name the new one so that it holds none (e.g. {outer + '_out'!r})"
        else:
            advice = f"name them side by side (e.g. {outer + '/out'!r} and {inner!r})"
        raise ValueError(f"layer {outer!r} would hold layer {inner!r}{place}: a layer cannot hold another; {advice}")
    return paths


def holding_pair(paths: Iterable[str], others: Iterable[str] = ()) -> tuple[str, str] | None:
    """Two layer paths of which the first holds the second (``"x"`` and ``"x/y"``; ``"."``, the store's root, holds
    every other), one of them among ``paths`` and the other among ``paths`` or ``others``; None if no layer holds
    another. Each path's folders are looked up, so it takes time linear in the paths."""
    new = set(paths)
    every = new | set(others)
    for inner in sorted(every):
        for folder in map(str, PurePosixPath(inner).parents):
            if folder in every and (inner in new or folder in new):
                return folder, inner
    return None


def as_opened(array: xr.DataArray) -> bool:
    """Whether ``array`` is a store's layer as ``open_activations()`` opened it (not computed from one, which may
    keep its encoding: a roll, ``copy(data=...)``, or chunkcca's own reordering or transposing to a partner)."""
    encoding = array.encoding
    return "store" in encoding and "layer" in encoding and getattr(array.data, "name", None) == encoding.get(
        "dask_name")


def mask_as_opened(array: xr.DataArray) -> bool:
    """Whether ``array``'s padding mask is its store's as ``open_activations()`` opened it."""
    opened = array.encoding.get("mask_dask_name")
    return opened is not None and MASK in array.coords and getattr(array.coords[MASK].data, "name", None) == opened


def zarr_arrays(data: Any) -> list[Any]:
    """The zarr arrays a Dask array reads, through xarray's zarr backend or ``dask.array.from_zarr``: the sources
    ``dask.array.from_array`` keeps under ``original-`` names, or, where there are none, wherever its graph holds
    them (inside each task: ``inline_array=True``, an optimized graph), unwrapped from xarray's lazy indexing."""
    return [array for array, _ in zarr_reads(data)]


def zarr_reads(data: Any) -> list[tuple[Any, tuple[tuple[int, ...], ...] | None]]:
    """``zarr_arrays`` with the chunks its tasks read each in (along the array's own axes, from its first element:
    those of the Dask array made from it, which rechunking, selections and casts leave beneath), or None where the
    graph does not say (an optimized graph)."""
    graph = data.__dask_graph__()

    def read_in(array: Any, readers: list[Any]) -> tuple[tuple[int, ...], ...] | None:
        """The chunks of the first of the graph layers ``readers`` that is the Dask array made from ``array``."""
        made = [graph.layers[name].collection_annotations or {} for name in readers]
        return next((tuple(map(tuple, info["chunks"])) for info in made
                     if tuple(info.get("shape", ())) == tuple(array.shape) and "chunks" in info), None)

    reads: dict[int, tuple[Any, tuple[tuple[int, ...], ...] | None]] = {}
    for name, graph_layer in graph.layers.items():  # from_array's sources, read by the layers that need them
        if str(name).startswith("original-"):
            readers = [other for other, needs in graph.dependencies.items() if name in needs]
            for array in _zarr_sources(list(graph_layer.values())):
                reads.setdefault(id(array), (array, read_in(array, readers)))
    if not reads:  # held inside the tasks that read them
        for name, graph_layer in graph.layers.items():
            for array in _zarr_sources(list(graph_layer.values())):
                reads.setdefault(id(array), (array, read_in(array, [name])))
    return list(reads.values())


def _zarr_sources(values: list[Any]) -> list[Any]:
    """The zarr arrays held in ``values`` (graph nodes and what their tasks take), each once."""
    import zarr
    from dask._task_spec import DataNode, Task
    from xarray.backends.zarr import ZarrArrayWrapper
    from xarray.core.indexing import NDArrayMixin

    found: dict[int, Any] = {}
    seen: dict[int, Any] = {}  # each object kept, so that no id is reused by another while walking
    while values:
        item = values.pop()
        if id(item) in seen or isinstance(item, (np.ndarray, str, bytes, int, float)):
            continue
        seen[id(item)] = item
        if isinstance(item, ZarrArrayWrapper):
            item = item.get_array()
        if isinstance(item, zarr.Array):
            found.setdefault(id(item), item)
        elif isinstance(item, (tuple, list)):
            values.extend(item)
        elif isinstance(item, dict):
            values.extend(item.values())
        elif isinstance(item, DataNode):
            values.append(item.value)
        elif isinstance(item, Task):
            values.extend((*item.args, *item.kwargs.values()))
        elif isinstance(item, NDArrayMixin):  # xarray's lazy indexing wraps the backend's array
            values.append(item.array)
    return list(found.values())
