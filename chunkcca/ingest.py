"""Ingestion: activations from .npy / .npz files and google/svcca's pickled arrays into a store.

Loading a pickle runs code chosen by whoever wrote it. chunkcca reads pickles with a restricted unpickler
that admits numpy arrays only (the globals numpy's array pickling needs: ``_reconstruct``, ``ndarray``,
``dtype``, ``scalar``) and refuses anything else with an error naming the file and the global it met.
``.npy`` files are memory-mapped, so a large one is written to the store chunk by chunk. Pickles and .npz
members are loaded whole, but one at a time: [`ingest()`][chunkcca.ingest.ingest] writes layer by layer, so it holds
at most one
loaded file (or .npz member) however many it ingests.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import shutil
import stat
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ._fs import expanded
from ._stack import user_stacklevel
from .layers import (
    DEFAULT_DIMS,
    boolean_mask,
    check_coord_name,
    check_datapoint_coords,
    check_mask_dtype,
    chunk_of,
    labelled_by,
    layer_path,
    memmap_to_dask,
    nothing_to_pad,
    unnamed_layout,
)
from .options import check_mapping
from .rows import pixel_centres
from .store import (
    WriteMode,
    check_new_layers,
    checked_layers,
    move_layer,
    open_activations,
    write_activations,
    write_store,
)

#: The only globals a pickle may name: what numpy needs to rebuild arrays (numpy 1 and 2 module paths), in
#: every pickle protocol: ``_frombuffer`` (protocol 5) and ``_codecs.encode`` (the bytes of protocols 0–2, admitted
#: for latin-1 only, see ``_latin1_bytes()``).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | frozenset((module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")) | {
    ("numpy", "ndarray"), ("numpy", "dtype")}


def _latin1_bytes(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocols 0–2 use it for bytes (``encode(text, "latin1")``), and nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _available_memory() -> int | None:
    """Bytes of memory available to allocate (Linux's MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class _Bounded:
    """A file read through a budget: a read asking for more bytes than remain (a pickle declares the size of
    its data before it) is refused before anything is allocated."""

    def __init__(self, file: Any, budget: int | None, source: str) -> None:
        self.file, self.remaining, self.source = file, budget, source

    def _spend(self, size: int) -> None:
        if self.remaining is None:
            return
        if size > self.remaining:
            raise MemoryError(f"{self.source}: the pickle declares more data than the memory available "
                              f"({self.remaining / 2**30:.1f} GiB left); refusing to expand it")
        self.remaining -= size

    def read(self, size: int = -1) -> bytes:
        if size is not None and size >= 0:
            self._spend(size)
        data = self.file.read(size)
        if size is None or size < 0:
            self._spend(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        self._spend(len(buffer))
        return self.file.readinto(buffer)

    def readline(self, size: int = -1) -> bytes:
        line = self.file.readline(size)
        self._spend(len(line))
        return line


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
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise pickle.UnpicklingError(f"{self.source}: refusing to load {module}.{name}; chunkcca reads pickles of "
                                     f"numpy arrays only")


def load_pickled_array(path: str | os.PathLike) -> np.ndarray:
    """A numpy array from a (optionally gzip-compressed) pickle, as google/svcca's tutorials ship them.

    The pickle is read with an unpickler that admits numpy arrays only: any other global is refused with
    an error naming the file and the global.

    Parameters
    ----------
    path
        The pickle file.

    Returns
    -------
    numpy.ndarray
    """
    path = Path(expanded(path))
    try:
        value = _unpickled(path)
    except (gzip.BadGzipFile, zlib.error, EOFError) as error:  # gzip's own words name no file
        raise ValueError(f"cannot read {path} as a pickled array file: {type(error).__name__}: {error}") from error
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a numpy array")
    return value


class _Prefixed(io.RawIOBase):
    """A stream's ``head`` (bytes already taken from it) and then the rest of it (``rest``)."""

    def __init__(self, head: bytes, rest: Any) -> None:
        super().__init__()
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.head:
            return self.rest.readinto(buffer)
        taken = min(len(buffer), len(self.head))
        buffer[:taken], self.head = self.head[:taken], self.head[taken:]
        return taken


def _unpickled(path: Path) -> Any:
    """The one object pickled in the (optionally gzip-compressed) file at ``path``, read with ``ArrayOnlyUnpickler``
    through the memory budget, and the file read to its end."""
    with open(path, "rb") as raw, contextlib.ExitStack() as opened:
        # the file opened once (a pipe's first bytes were lost to a second open), its first bytes looked at
        # without taking them; a pipe's or device's taken whole (its first write may be one byte, which a look
        # sees alone) and given back before the rest (it was read whole first: /dev/zero to the OOM killer)
        source: Any = raw if stat.S_ISREG(os.fstat(raw.fileno()).st_mode) else io.BufferedReader(
            _Prefixed(raw.read(2), raw))
        compressed = source.peek(2)[:2] == b"\x1f\x8b"
        file = opened.enter_context(gzip.GzipFile(fileobj=source, mode="rb")) if compressed else source
        value = ArrayOnlyUnpickler(_Bounded(file, _available_memory(), str(path)), source=str(path)).load()
        # read to the end: gzip checks its CRC-32 there (a bit flipped in a compressed pickle gave other values,
        # silently, as the unpickler stops at its last opcode), and nothing may follow the array
        if file.read(1):
            raise ValueError(f"{path} holds more after its pickled array (a second pickle, or other bytes): a "
                             f"pickled array file holds one array")
    return value


def _check_file(path: Path) -> None:
    """A FileNotFoundError for a missing ``path``, an IsADirectoryError for a folder (it said "[Errno 21] Is a
    directory")."""
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name a .npy, .npz or pickle file")


def iter_arrays(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """The arrays of one file by name, loaded one at a time as they are asked for: a .npy (memory-mapped) or
    a pickle gives one (named ""), a .npz its own, each member read only when its turn comes."""
    path = Path(path)
    _check_file(path)
    _check_signature(path)
    try:
        if _kind(path) == ".npy":
            yield "", np.load(path, mmap_mode="r", allow_pickle=False)
        elif _kind(path) == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                for key in archive.files:
                    yield key, archive[key]
        else:
            yield "", load_pickled_array(path)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, KeyError, IndexError, TypeError,
            AttributeError, zipfile.BadZipFile, zlib.error) as error:  # numpy's, pickle's and zip's do not name it
        if str(path) in str(error):
            raise
        raise ValueError(f"cannot read {path} as a {_kind(path)} file: {type(error).__name__}: {error}") from error


def _stand_ins(path: Path) -> Iterator[tuple[str, np.ndarray | None]]:
    """The arrays of a file as ``iter_arrays()`` names them, each as a stand-in of its shape and dtype holding no
    values of its own (a .npy memory-mapped, a .npz member a read-only broadcast of one zero, from its header),
    so that every layer is checked before any is written; None where only loading tells its shape (a pickled
    array, a .npz member in header version 3)."""
    if _kind(path) == ".npy":
        yield from iter_arrays(path)  # memory-mapped: reads the header only
        return
    if _kind(path) != ".npz":
        yield "", None
        return
    keys = _array_names(path)
    stand_ins: list[tuple[str, np.ndarray | None]] = []
    try:
        with np.load(path, allow_pickle=False) as archive:  # its directory read once (per member: quadratic)
            for key in keys:
                with archive.zip.open(f"{key}.npy") as member:
                    header = {(1, 0): np.lib.format.read_array_header_1_0,
                              (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(member))
                    shape, _, dtype = header(member) if header else (None, None, None)
                stand_ins.append((key, None if shape is None else np.broadcast_to(np.zeros((), dtype), shape)))
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:  # a shape of -1
        raise ValueError(f"cannot read {path} as a .npz file: {type(error).__name__}: {error}") from error
    yield from stand_ins


def _kind(path: Path) -> str:
    """What a file is read as: ".npy", ".npz" (by its extension, in any case: X.NPY too) or "pickled array"."""
    suffix = path.suffix.lower()
    return suffix if suffix in (".npy", ".npz") else "pickled array"


#: The first bytes of a .npy file (NumPy's format) and of a .npz (a zip archive: its first file's header, or the
#: end of an empty one's directory), each as numpy.load tells them apart.
SIGNATURES = {".npy": (b"\x93NUMPY",), ".npz": (b"PK\x03\x04", b"PK\x05\x06")}


def _check_signature(path: Path, kind: str | None = None) -> None:
    """Refuse a .npy or .npz file (``kind``, default: as its name says) that does not begin as one (numpy took a
    text file for pickled objects and advised allow_pickle=True)."""
    kind = kind or _kind(path)
    signatures = SIGNATURES.get(kind)
    if signatures is None or path.is_dir():
        return
    with open(path, "rb") as file:
        head = file.read(max(map(len, signatures)))
    if not head.startswith(signatures):
        raise ValueError(f"{path} is not a {kind} file: it does not begin as one (written by numpy.save"
                         f"{'z' if kind == '.npz' else ''}); is it text or another format?")


def _array_names(path: str | os.PathLike) -> list[str]:
    """The names ``iter_arrays()`` gives for a file, without loading any array (an .npz's directory only)."""
    path = Path(path)
    _check_file(path)
    _check_signature(path)
    if _kind(path) == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                others = [member for member in archive.zip.namelist() if not member.endswith(".npy")]
                if others:
                    raise ValueError(f"{path} holds {others[0]!r}, which is not a .npy array; an .npz for chunkcca "
                                     f"holds arrays only")
                if not archive.files:  # np.savez() of nothing: it said "ingest needs at least one layer"
                    raise ValueError(f"{path} holds no arrays; an .npz gives one layer per array it holds")
                return list(archive.files)
        except (OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"cannot read {path} as a .npz file: {type(error).__name__}: {error}") from error
    return [""]


#: A 2-d pickle read as (datapoints, neurons) without a layout is warned of below this many rows per column:
#: google/svcca's own pickles come in both layouts (SVHN's fc (1000, 200) datapoints first, 5 rows per column;
#: MNIST's logits (10, 10000) neurons first), and a (512, 200) one of neurons read as datapoints gave CKA 0.06 for
#: 0.93, silently; CCA-family measures want several datapoints per neuron, so fewer is the doubtful reading.
PICKLE_ROWS_PER_COLUMN = 4


def _as_layer(array: np.ndarray, layout: str | None, source: str, *, pickled: bool = False) -> np.ndarray:
    """``array`` datapoint-first, channel-last (a view: a memory-mapped .npy stays on disk); ``layout="neurons"``
    means (neurons, datapoints) as google/svcca's, "channels_first" (datapoint, channel, *positions) as
    PyTorch's, a 2-d array as it is ([`ingest()`][chunkcca.ingest.ingest] has checked ``layout``); None is
    "datapoints" for arrays that do
    not look like
    either. [`chunkcca.write_activations()`][chunkcca.write_activations] chunks it. A ``pickled`` 2-d array
    (google/svcca's format, whose own layout is (neurons, datapoints)) read as (datapoints, neurons) with fewer
    than ``PICKLE_ROWS_PER_COLUMN`` rows per column, where either reading fits, is warned of."""
    if array.size == 0:  # before any reading of its layout (an empty (0, 5) was advised --layout neurons)
        raise ValueError(f"{source}: holds an empty array of shape {array.shape}: no values to write")
    if layout is None and array.ndim == 2 and array.shape[0] < array.shape[1]:
        raise ValueError(f"{source}: a 2-d array of shape {array.shape} has fewer rows than columns, as "
                         f"google/svcca's (neurons, datapoints) layout has: pass --layout neurons (layout='neurons') "
                         f"if its rows are neurons, or --layout datapoints (layout='datapoints') if they are "
                         f"datapoints")
    if layout is None and pickled and array.ndim == 2 and array.shape[0] < PICKLE_ROWS_PER_COLUMN * array.shape[1]:
        warnings.warn(f"{source}: reads shape {array.shape} as {array.shape[0]} datapoints of {array.shape[1]} "
                      f"neurons, but google/svcca's pickles are often (neurons, datapoints), and this shape fits "
                      f"either: pass --layout neurons (layout='neurons') if its rows are neurons, or --layout "
                      f"datapoints (layout='datapoints') to say they are datapoints", RuntimeWarning,
                      stacklevel=user_stacklevel())
    unsure = layout is None and array.ndim in (4, 5) and unnamed_layout(array.shape)
    if unsure in ("channels_first", "unsure"):  # (N, C, H, W) of a square map, or a map that is not square
        positions = ", ".join(DEFAULT_DIMS[array.ndim][1:-1])
        raise ValueError(f"{source}: shape {array.shape} may be channels-first (datapoint, channel, {positions}), "
                         f"PyTorch's ({'equal last two axes' if unsure == 'channels_first' else 'either layout fits'}"
                         f"): pass --layout channels_first (layout='channels_first') if it is, or --layout "
                         f"datapoints (layout='datapoints') if it is (datapoint, {positions}, channel)")
    if layout == "neurons":
        if array.ndim != 2:
            raise ValueError(f"{source}: layout 'neurons' needs a 2-d (neurons, datapoints) array, got shape "
                             f"{array.shape}")
        if array.shape[0] >= array.shape[1]:
            warnings.warn(f"{source}: layout 'neurons' reads shape {array.shape} as {array.shape[0]} neurons of "
                          f"{array.shape[1]} datapoints, no more datapoints than neurons; if its rows are "
                          f"datapoints, pass --layout datapoints (layout='datapoints')", RuntimeWarning,
                          stacklevel=user_stacklevel())
        return array.T
    if layout == "channels_first":
        if array.ndim == 2 and array.shape[0] < array.shape[1]:  # read as it is, unsaid (found by audit)
            warnings.warn(f"{source}: layout 'channels_first' reads shape {array.shape} as it is, {array.shape[0]} "
                          f"datapoints of {array.shape[1]} channels, though fewer rows than columns is google/svcca's "
                          f"(neurons, datapoints) layout; if its rows are neurons, ingest it on its own with --layout "
                          f"neurons (layout='neurons')", RuntimeWarning, stacklevel=user_stacklevel())
        if array.ndim == 2:  # (datapoint, channel) in either layout: a fully connected layer beside conv ones
            return array
        if array.ndim not in (3, 4, 5):
            raise ValueError(f"{source}: layout 'channels_first' needs a (datapoint, channel, *positions) array of "
                             f"0 to 3 positions, got shape {array.shape}")
        if array.ndim in (4, 5) and unnamed_layout(array.shape) == "channels_last":
            warnings.warn(f"{source}: layout 'channels_first' reads shape {array.shape} as {array.shape[1]} "
                          f"channels of {' x '.join(map(str, array.shape[2:]))} positions, though it reads as "
                          f"channels-last ({' x '.join(map(str, array.shape[1:-1]))} positions of "
                          f"{array.shape[-1]} channels, the more regular map); if it is, ingest it in a command of "
                          f"its own without the layout", RuntimeWarning, stacklevel=user_stacklevel())
        return np.moveaxis(array, 1, -1)
    return array


def _dims(ndim: int, layout: str | None) -> tuple[str, ...] | None:
    """The dims of a laid-out array: as ``as_activations`` names unnamed ones, but a channels-first 3-d array is
    a 1-d conv's (datapoint, time, channel)."""
    if layout == "channels_first" and ndim == 3:
        return ("datapoint", "time", "channel")
    return DEFAULT_DIMS.get(ndim)


#: Datapoints of a mask file checked at a time (its values read once, never held whole).
_MASK_BLOCK = 4096


def _mask_file(file: str | os.PathLike, shape: tuple[int, ...]) -> Any:
    """A padding mask from a .npy file, boolean, of the layer's (datapoint, *positions) shape, read from the file
    chunk by chunk (memory-mapped), or a clear error; its values are checked before anything is written."""
    try:
        _check_signature(Path(file), ".npy")
        mask = np.load(file, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the mask {file} as a .npy file: {error}") from error
    if mask.shape != tuple(shape):
        raise ValueError(f"the mask {file} has shape {mask.shape}; its layer needs (datapoint, *positions) {shape}")
    check_mask_dtype(mask.dtype, f"the mask {file}")
    for start in range(0, mask.shape[0], _MASK_BLOCK):  # before anything is written
        block = mask[start : start + _MASK_BLOCK]
        boolean_mask(block, f"the mask {file}, datapoints from {start},")
        empty = np.flatnonzero(~np.asarray(block, dtype=bool).reshape(len(block), -1).any(axis=1))
        if empty.size:  # every measure refuses it, after the store is written
            raise ValueError(f"the mask {file} is False at every position of datapoint {start + int(empty[0])}: it "
                             f"has no real position, which every measure refuses; leave such datapoints out")
    return memmap_to_dask(mask, _MASK_BLOCK).astype(bool)


def _is_file(values: Any) -> bool:
    """Whether a coordinate's ``values`` are given as a file (a path to a .npy file) rather than as values."""
    return isinstance(values, (str, os.PathLike))


def _as_file(values: Any) -> Any:
    """A coordinate's ``values`` given as a file: the path ``expanded``; values as given."""
    return expanded(values) if _is_file(values) else values


def _coord_file(name: str, values: Any) -> Any:
    """A datapoint coordinate's values: read from a .npy file (a path), or as given."""
    if not _is_file(values):
        return values
    try:
        _check_signature(Path(values), ".npy")
        return np.load(values, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read coordinate {name!r} from {values} as a .npy file: {error}") from error


def _datapoint_ids(datapoints: Any) -> np.ndarray:
    """``ingest``'s ``datapoints``: one number or string per datapoint (from a .npy file, or as given); a
    ValueError naming the file otherwise (repeated labels are refused where a layer takes them)."""
    values = np.asarray(_coord_file("datapoints", datapoints))
    finite = values.dtype.kind in "iuUO" or (values.dtype.kind == "f" and bool(np.isfinite(values).all()))
    if values.ndim != 1 or not finite:
        where = f" (from the file {datapoints})" if _is_file(datapoints) else ""
        raise ValueError(f"datapoints must be one finite number or string per datapoint (1-d){where}, got an array "
                         f"of shape {values.shape} and dtype {values.dtype}")
    return values


def _check_count(datapoint_ids: np.ndarray | None, values: Any, name: str) -> None:
    """A ValueError naming layer ``name`` when ``datapoint_ids`` (``ingest``'s ``datapoints``) does not label each
    of its datapoints (axis 0 of ``values``) once."""
    if datapoint_ids is not None and len(datapoint_ids) != values.shape[0]:
        raise ValueError(f"datapoints gives {len(datapoint_ids)} labels, and layer {name!r} has {values.shape[0]} "
                         f"datapoints: give one label per datapoint, in the files' order")


def _named_axes(values: Any, dims: tuple[str, ...] | None, datapoint_ids: np.ndarray | None = None) -> Any:
    """``values`` with its axes named as ``_as_layer()`` laid them out, and its datapoints labelled
    ``datapoint_ids`` if given (an array of another rank is left for
    [`chunkcca.write_activations()`][chunkcca.write_activations] to refuse with its own message)."""
    if dims is None:
        return values
    return xr.DataArray(values, dims=dims, coords={} if datapoint_ids is None else {"datapoint": datapoint_ids})


class _Loaded:
    """An array in memory, seen by Dask only through slicing, until ``release()``.

    ``dask.array.from_array`` copies a numpy array whole (doubling the memory a loaded file takes), and the
    graph that holds it outlives [`chunkcca.write_activations()`][chunkcca.write_activations] in reference cycles
    until the garbage
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
        """Chunked as [`chunkcca.write_activations()`][chunkcca.write_activations] will write it (so it does not
            rechunk)."""
        import dask.array as da

        per_chunk = chunk_of(self.shape, self.dtype.itemsize, chunks)
        return da.from_array(self, chunks=(per_chunk, *self.shape[1:]), name=False, asarray=False,
                             meta=np.empty((0,) * self.ndim, dtype=self.dtype))

    def release(self) -> None:
        self.data = None


def ingest(path: str | os.PathLike, sources: Mapping[str, str | os.PathLike], *, layout: str | None = None,
           masks: Mapping[str, str | os.PathLike] | None = None, mode: WriteMode = "w", chunks: int | str = "auto",
           coords: Mapping[str, Any] | None = None, datapoints: Any = None, overwrite: bool = False,
           progress: bool = False) -> xr.DataTree:
    """Write the arrays of files into a store: layer path → file (.npy, .npz, or a pickled array).

    Parameters
    ----------
    path
        The store to write (a local folder).
    sources
        Layer path → file, in network order. A .npz gives one layer per array, under ``layer/<array name>``.
    layout
        How the files' axes are laid out. None (default) or "datapoints": datapoint first, channel last; with
        None, a 2-d array with fewer rows than columns is refused, as it looks like google/svcca's (neurons,
        datapoints), and so is a 4-d array unless its map is square and channels last ((N, 56, 56, 64)), as
        it may be PyTorch's (N, C, H, W). 3-d arrays are (datapoint, token, channel), 5-d (datapoint, depth,
        height, width, channel). "neurons": 2-d (neurons, datapoints), google/svcca's; "channels_first": PyTorch's
        (datapoint, channel, *positions), e.g. a 1-d conv's (N, C, L) or (N, C, H, W); both transposed lazily.
        With "channels_first" a 2-d array is (datapoint, channel) as it is, warned of with fewer rows than columns.
    masks
        Layer path → a .npy file of its boolean padding mask (datapoint, *positions), True at real positions
        (e.g. the attention mask of padded sequences).
    mode
        "w": a new store (``overwrite`` replaces an existing one); "a": add the layers to the existing store
        at ``path`` without touching its own (a layer path it holds already is an error).
    chunks, overwrite, progress
        As for [`chunkcca.write_activations()`][chunkcca.write_activations].
    coords
        Coordinates on ``datapoint`` for every layer written (for ``groupby=`` and ``folds=``): name → a .npy file
        of one number or string per datapoint (e.g. each input's class), or those values, in the files'
        datapoint order (with ``mode="a"`` and ``datapoints``, checked against the store's by those labels).
    datapoints
        The datapoint labels of every layer written (e.g. each input's index in its dataset): a .npy file of one
        number or string per datapoint, or those values, in the files' datapoint order. The layers then pair with
        others by label, as recorded ones do (``chunkcca.record(datapoints=...)``); without it their labels are
        their positions, marked so, and they pair by position only (beside a layer of other labels, an error).

    Returns
    -------
    xarray.DataTree
        The store, opened lazily.

    The store is the one [`chunkcca.write_activations()`][chunkcca.write_activations] would write from all the arrays
    at once, but it is
    written layer by layer, so at most one pickle or .npz member is in memory at a time (a .npy is
    memory-mapped and streamed chunk by chunk). It is written to a temporary folder and renamed into place.
    Every .npy and .npz layer is checked (layout, dims, dtype, datapoint count, mask, chunk size) from its file's
    header before any layer is written; a pickled array, whose shape only loading tells, as it is loaded.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_mapping("sources", sources, "layer path to file")
    check_mapping("masks", masks, "layer path to mask file")
    check_mapping("coords", coords, "coordinate name to file or values")
    path, sources = expanded(path), {layer: expanded(source) for layer, source in sources.items()}
    masks = {name: expanded(file) for name, file in (masks or {}).items()}
    coords = {name: _as_file(values) for name, values in (coords or {}).items()}
    datapoints = _as_file(datapoints)
    seen: list[str] = []
    for layer, source in sources.items():  # every file exists and no layer comes twice, before writing any
        for key in _array_names(source):
            name = _layer_name(layer, key)
            if name in seen:
                raise ValueError(f"layer {name!r} is given twice ({source} gives it again)")
            seen.append(name)
    if not seen:
        raise ValueError("ingest needs at least one layer")
    masks = {layer_path(name): file for name, file in masks.items()}
    unknown = sorted(set(masks) - set(seen))
    if unknown:
        raise ValueError(f"masks name layer {unknown[0]!r}, which is not among the layers ingested")
    output = Path(path).resolve()
    for source in (*sources.values(), *masks.values()):
        if output == Path(source).resolve() or output in Path(source).resolve().parents:
            raise ValueError(f"{path} is where {source} is read from: write the store elsewhere")
    labels = {}
    for name, values in coords.items():  # each checked alone, so that bad values name their file
        check_coord_name(name)  # before its file is read
        try:
            labels |= check_datapoint_coords({name: _coord_file(name, values)})
        except ValueError as error:
            if not _is_file(values) or not str(error).startswith(f"coords[{name!r}]"):
                raise
            raise ValueError(f"{error} (from the file {values})") from error
    datapoint_ids = None if datapoints is None else _datapoint_ids(datapoints)
    labels = labelled_by(labels, datapoint_ids)
    check_new_layers(path, seen, mode=mode, overwrite=overwrite)
    checked_masks: dict[str, Any] = {}  # layer → its mask, checked once (its values are read to check them)

    def laid_out(name: str, array: np.ndarray, source: str, key: str) -> tuple[Any, dict[str, Any] | None]:
        """Layer ``name`` from ``array`` (``key`` of the file ``source``) with its axes named and datapoints
        labelled, and its mask; or the error naming it."""
        values = _as_layer(array, layout, f"{source} ({key})" if key else source,
                           pickled=_kind(Path(source)) == "pickled array")
        _check_count(datapoint_ids, values, name)
        if name in masks and values.ndim == 2:  # before its values: "False at every position of datapoint 3"
            raise nothing_to_pad(name, ("datapoint", "channel"))
        if name in masks and name not in checked_masks:
            checked_masks[name] = _mask_file(masks[name], values.shape[:-1])
        return (_named_axes(values, _dims(values.ndim, layout), datapoint_ids),
                {name: checked_masks[name]} if name in masks else None)

    checked: set[str] = set()  # layers whose files' headers tell their shapes: all checked before any is written
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"coords\[.*\] is NaN for", category=RuntimeWarning)  # said once
        for layer, source in sources.items():
            for key, stand_in in _stand_ins(Path(source)):
                if stand_in is not None:
                    name = _layer_name(layer, key)
                    named, mask = laid_out(name, stand_in, str(source), key)
                    checked_layers({layer_path(name): named}, masks=mask, chunks=chunks, compressed=True,
                                   coords=labels)
                    checked.add(name)

    def build(tmp: Path, stored: tuple[int, int] | None) -> tuple[list[str], tuple[int, int] | None]:
        parts = tmp.parent / ".parts"  # beside the store being built (in the same temporary folder), not in it
        image: dict[str, tuple[int, int]] = {}  # layer with height and width (images, volumes) → their sizes
        written = 0
        tmp.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as cleanup, warnings.catch_warnings():
            cleanup.callback(shutil.rmtree, parts, ignore_errors=True)
            # each layer's write checks the coordinates again: what they are warned of was said once, above
            warnings.filterwarnings("ignore", message=r"coords\[.*\] is NaN for", category=RuntimeWarning)
            for layer, source in sources.items():
                # No zip/enumerate around iter_arrays: they keep their last item while fetching the next.
                for key, array in iter_arrays(source):
                    name, part = _layer_name(layer, key), parts / str(written)
                    with warnings.catch_warnings():
                        if name in checked:  # its layout was warned of as it was checked
                            warnings.simplefilter("ignore", RuntimeWarning)
                        named, mask = laid_out(name, array, str(source), key)
                    dims = named.dims if isinstance(named, xr.DataArray) else ()
                    if "height" in dims and "width" in dims:  # images and volumes
                        image[name] = (int(named.sizes["height"]), int(named.sizes["width"]))
                    if isinstance(array, np.memmap):  # write_activations streams it from the file
                        write_activations(part, {name: named}, masks=mask, chunks=chunks, coords=labels,
                                          progress=progress)
                    else:
                        loaded = _Loaded(named.data if isinstance(named, xr.DataArray) else named)
                        try:
                            write_activations(part, {name: named.copy(data=loaded.as_dask(chunks))
                                                     if isinstance(named, xr.DataArray) else loaded.as_dask(chunks)},
                                              masks=mask, chunks=chunks, coords=labels, progress=progress)
                        finally:
                            loaded.release()
                    del array, named  # before the next one is loaded
                    move_layer(part, tmp, name)
                    written += 1
        return seen, _place_pixels(tmp, image, stored)

    write_store(path, build, mode=mode, overwrite=overwrite, coords=labels)
    return open_activations(path)


def _layer_name(layer: str, key: str) -> str:
    return f"{layer}/{key}".strip("/") if key else str(layer).strip("/")


def _place_pixels(store: Path, image: dict[str, tuple[int, int]],
                  stored: tuple[int, int] | None) -> tuple[int, int] | None:
    """Set the ``height``/``width`` coordinates of image and volume layers in units of the largest map of all layers (or
    of the store's own image size, when adding to a store), as
    [`chunkcca.write_activations()`][chunkcca.write_activations] does when
    given all layers at once (each layer was written alone, in units of its own map): pixel i of an s-pixel
    map at (i + 0.5) · extent / s. Returns the extent."""
    import zarr

    if not image:
        return stored
    extent = stored or (max(h for h, _ in image.values()), max(w for _, w in image.values()))
    for layer, own in image.items():
        for dim, size, full in zip(("height", "width"), own, extent, strict=True):
            if size != full:
                zarr.open_array(store / layer / dim, mode="r+")[...] = pixel_centres(size, full)
    return extent
