"""Every option of chunkcca, its type, default and validator, written once.

Two objects carry the options from the public functions down: [`StreamOptions`][chunkcca.options.StreamOptions] (how
layers are
read, turned into rows and streamed) and [`SolveOptions`][chunkcca.options.SolveOptions] (the ridge and the measure
parameters of
the final solve). Both validate themselves on construction, naming the argument at fault, so nothing
below the public functions checks an option again.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
from dask.utils import format_bytes, parse_bytes

from ._fs import check_outside_stores, check_writable, expanded, is_url

Spatial = Literal["flatten", "avgpool", "interp", "dft", "first", "last", "features"]
Precision = Literal["float32", "float64", "auto"]
#: The dtype the per-chunk products of a Moments were computed in.
ProductPrecision = Literal["float32", "float64"]
Method = Literal["linear", "nearest", "cubic"]
Grid = Literal["coords", "svcca"]
NanPolicy = Literal["raise", "omit"]
KeepBy = Literal["variance", "singular_values", "directions"]

SPATIAL: tuple[str, ...] = get_args(Spatial)
#: The adapters that give one set of statistics per spatial frequency (batch dims) rather than one.
PER_FREQUENCY: tuple[str, ...] = ("dft",)
#: The adapters that give one row per datapoint (the others, one per position).
PER_DATAPOINT: tuple[str, ...] = ("avgpool", "dft", "first", "last", "features")
#: The adapters whose rows of a layer do not depend on the layer it is compared with: those a sweep of every
#: pair in one pass can use.
SWEEP_SPATIAL: tuple[str, ...] = ("flatten", "avgpool", "first", "last", "features")
#: Spatial modes whose rows do not depend on the order of a layer's positions (a mean over them; CKA of whole
#: maps, which a permutation of the features leaves as it is).
ORDERLESS: tuple[str, ...] = ("avgpool", "features")
#: The variable of a layer's node holding its activations.
VARIABLE = "activations"
#: The variable beside a layer's activations (and the coordinate on them) holding its padding mask.
MASK = "mask"


def plain(value: Any) -> Any:
    """A label as Python writes it ('x', 3), not np.str_('x') nor np.int64(3); labels held in an object array (a
    store's strings) are Python objects already, without ``.item()``."""
    return value.item() if isinstance(value, np.generic) else value


def layer_name(path: str) -> str:
    """A layer's name from its node path: without the leading and trailing '/', and "/" for a layer at the root
    (a plain zarr store of one layer, written with xarray), which ``tree["/"]`` selects."""
    return path.strip("/") or "/"


#: An attribute of a stored layer's ``datapoint`` coordinate: its labels are the datapoints' positions as written
#: (0, 1, …), given by no one (an array, a file without labels, ``record`` without ``datapoints=``). Such a layer
#: pairs with others by position, as an array does, never by those labels.
POSITIONS_ATTR = "chunkcca_positions"


def holds_positions(layer: Any) -> bool:
    """Whether the ``datapoint`` coordinate of ``layer`` (a DataArray) holds the positions a store gave a layer
    written without labels (``POSITIONS_ATTR``), not labels anyone gave."""
    return "datapoint" in layer.coords and bool(layer.coords["datapoint"].attrs.get(POSITIONS_ATTR))


#: The attribute of a layer's activations giving the relative rounding of its values where their dtype is finer
#: than the model's (a bfloat16 model's outputs, stored as float32 exactly, carry bfloat16's 2⁻⁷).
VALUE_ROUNDING_ATTR = "chunkcca_value_rounding"
PRECISIONS: tuple[str, ...] = get_args(ProductPrecision)
METHODS: tuple[str, ...] = get_args(Method)
GRIDS: tuple[str, ...] = get_args(Grid)
NAN_POLICIES: tuple[str, ...] = get_args(NanPolicy)
KEEP_BY: tuple[str, ...] = get_args(KeepBy)

#: Gram blocks summed per task of the tree that adds them up (spatial="features").
SPLIT_EVERY = 8
#: Default memory budget of a pass (statistics, chunks in work, temporaries): what a laptop can spare. Two
#: ResNet-18s' 20 conv layers each, swept, fit in one chain (1.2 GB peak) and the jobs with smaller statistics
#: in one per core (docs/performance.md).
MEMORY_LIMIT = "1.5GiB"
#: The largest memory_limit (1 EiB): far beyond any machine, and within numpy's int64 (and exactly a float, so that
#: a size at most this never rounds over it).
MAX_MEMORY_LIMIT = 2**60
#: Chunks each chain reads ahead of the one it folds on the local pool (``engine.reads_ahead()``), so that the
#: disk is busy while the cores multiply: cold streaming of 1 GiB, median 1.35 s against 1.80 s with none
#: (docs/performance.md).
READ_AHEAD = 2
#: Datapoint chunks between two saves of a checkpoint.
CHECKPOINT_EVERY = 16
#: The options only one mode reads, each with the option that sets the mode and the values of it that read it (None:
#: any value but None). Given without its mode, such an option is a TypeError (``StreamOptions.from_kwargs``).
MODAL: dict[str, tuple[str, tuple[Any, ...] | None]] = {
    "method": ("spatial", ("interp",)),
    "grid": ("spatial", ("interp",)),
    "split_every": ("spatial", ("features",)),
    "checkpoint_every": ("checkpoint", None),
}
#: The streaming options minibatch CKA has no use for: it sums float64 Gram matrices of each minibatch in one pass
#: (no products' precision, no Moments to group, fold or checkpoint). Given with ``minibatch``, a TypeError.
NOT_MINIBATCH: tuple[str, ...] = ("groupby", "folds", "checkpoint", "checkpoint_every", "precision")
#: The public functions that take ``minibatch`` (minibatch CKA).
MINIBATCH_FUNCTIONS: tuple[str, ...] = ("cka", "similarity")
#: Predictivity's default ridge, relative to the mean variance of the predicting layer's channels.
RIDGE = 0.01
#: Seconds to wait for a Dask scheduler to answer (``connect_timeout``).
CONNECT_TIMEOUT = 10.0
#: Scheduler names dask.compute takes.
SCHEDULER_NAMES = ("threads", "threading", "sync", "synchronous", "single-threaded", "processes",
                   "multiprocessing", "distributed", "dask.distributed")


#: The largest integer a netCDF3 file (what xarray writes without a netCDF4 library) holds.
NETCDF_LARGEST_INT = int(np.iinfo(np.int32).max)


def netcdf_int_error(target: str, holding: str) -> ValueError:
    """The error for a netCDF ``target`` whose integers ``holding`` says exceed ``NETCDF_LARGEST_INT``."""
    return ValueError(f"{target}: netCDF files as xarray writes them here (netCDF3) hold 32-bit integers, and "
                      f"{holding}; save to a zarr store (.zarr), which can")


def check_output_place(path: str | os.PathLike, what: str, *, written: bool = True) -> None:
    """Refuse, before any work, an output ``path`` (``what``: its option, for the message) whose folder does not
    exist (a typo in a folder is not a new folder) or, if it is to be ``written`` (not a finished checkpoint only
    read), cannot be written to, or that lies inside an activation store."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: no folder {folder}")
    if written:
        check_writable(folder, f"{what} {path}")
    check_outside_stores(path, what)


def check_storage_options(location: str, storage_options: Mapping[str, Any] | None,
                          what: str = "storage_options") -> None:
    """Refuse ``storage_options`` (``what``: its option, for the message) for a store at a local path: they are
    an fsspec filesystem's, for stores given by URL."""
    if storage_options and not is_url(location):
        raise ValueError(f"{what} apply to stores given by URL (fsspec) only, not to the local path {location}")


def check_checkpoint_place(path: str, what: str) -> None:
    """Refuse, before any work, a checkpoint at ``path`` (``what``: its option, for the message) that is a URL, a
    netCDF name, or in a folder that is missing or (for one not there yet) cannot be written to."""
    if is_url(path):
        raise ValueError(f"{what} {path}: checkpoints are written to local paths only")
    check_moments_path(path, what)
    # one there may be finished, only read: a run left to do checks its folder when it resumes
    check_output_place(path, what, written=not os.path.lexists(path))


def check_moments_path(path: str | os.PathLike, what: str) -> None:
    """Refuse a path for saved Moments (a zarr store: a folder) named as a netCDF file (``.nc``), which they are
    not: ``xarray.open_dataset`` of it failed, and the folder was taken for a file."""
    if os.fspath(path).lower().endswith(".nc"):
        raise ValueError(f"{what} {path}: saved Moments are a zarr store (a folder), not a netCDF file; name it "
                         f"otherwise, e.g. {os.fspath(path)[:-3]}.moments")


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """``value`` is one of ``allowed``, or a ValueError naming the argument."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_mapping(name: str, value: Any, what: str) -> None:
    """``value`` is a mapping (``what`` it maps) or None, or a TypeError naming the argument: an array, list or
    text given there failed deep in numpy or pandas ("The truth value of an array … is ambiguous") or as "'list'
    object has no attribute 'items'"."""
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of {what} (a dict), got a {type(value).__name__}")


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool (numpy's too), or a ValueError naming the argument: ``debiased="no"`` and
    ``overwrite="no"`` are truthy, and were taken for True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (bools refused), or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, low: float, high: float = np.inf, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (open at ``low`` with ``low_open``, at ``high`` with
    ``high_open``), or a ValueError naming it and the rule."""
    is_number = not isinstance(value, bool) and isinstance(value, (int, float, np.number))
    if (not is_number or not np.isfinite(value) or value > high or value < low or (low_open and value == low)
            or (high_open and value == high)):
        bounds = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if np.isfinite(high)
                  else f"a finite number {'>' if low_open else '>='} {low:g}")
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return float(value)


def check_epsilon(epsilon: Any) -> float:
    """``epsilon`` (the ridge of the CCA family) is a finite number >= 0, or a ValueError saying so."""
    return check_number("epsilon", epsilon, 0.0)


#: The protocols of a Dask scheduler's address that another process can reach (inproc:// is within one process:
#: a ``LocalCluster(processes=False)``'s ``scheduler_address``, which the API takes as it is).
PROTOCOLS = ("tcp", "tls", "ws", "wss", "ucx")


def is_address(scheduler: Any) -> bool:
    """Whether ``scheduler`` is the address of a Dask scheduler ("tcp://host:8786", "host:8786")."""
    return isinstance(scheduler, str) and ("://" in scheduler or re.fullmatch(r"[\w.\-\[\]:]+:\d+", scheduler)
                                           is not None)


def scheduler_address(text: str, *, in_process: bool = True) -> str:
    """A Dask scheduler's address checked before any work (distributed fails on a malformed one only when
    connecting, with a traceback), a trailing ``/`` dropped: "tcp://host:8786", "host:8786"; an in-process one
    ("inproc://…") as it is, where ``in_process``; else a ValueError."""
    name = text.strip()
    scheme, separator, location = name.partition("://")
    if in_process and separator and scheme.lower() == "inproc":
        return name
    if not separator:
        scheme, location = "tcp", name
    location = location.rstrip("/")
    if not separator and not re.fullmatch(r"\[[0-9A-Fa-f:.]+\]:\d+|[\w.\-]+:\d+", location):
        raise ValueError(f"scheduler must be 'threads', 'synchronous', 'processes' or a Dask scheduler's address "
                         f"(tcp://host:8786), got {text!r}")
    if scheme.lower() not in PROTOCOLS:
        raise ValueError(f"{text!r}: a Dask scheduler's address starts with "
                         f"{', '.join(f'{p}://' for p in PROTOCOLS)} (or is host:port), not {scheme}://")
    host_port = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[\w.\-]+):(\d+)", location)
    if host_port is None or not 0 < int(host_port[2]) < 65536:
        raise ValueError(f"{text!r}: a Dask scheduler's address is {scheme.lower()}://host:port, with a port from 1 "
                         f"to 65535 (e.g. {scheme.lower()}://10.0.0.5:8786)")
    return f"{scheme.lower()}://{location}" if separator else location


def check_dask_settings(scheduler: Any) -> None:
    """Before a run: refuse a scheduler (where ``scheduler`` is None, which takes it) or ``num_workers`` in Dask's
    settings (``DASK_SCHEDULER``, ``DASK_NUM_WORKERS``, a config file) that Dask cannot use, naming the setting:
    they failed in Dask's words, "Expected one of [distributed, …]" or "invalid literal for int()"."""
    import dask.config

    configured = dask.config.get("scheduler", None) if scheduler is None else None
    if isinstance(configured, str) and configured.lower() not in SCHEDULER_NAMES:
        raise ValueError(f"Dask's settings give scheduler={configured!r} (DASK_SCHEDULER or a Dask config file), "
                         f"which is none of Dask's schedulers ({', '.join(SCHEDULER_NAMES)}): unset it, or give "
                         f"scheduler= (--scheduler)")
    workers = dask.config.get("num_workers", None)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                or workers < 1):
        raise ValueError(f"Dask's settings give num_workers={workers!r} (DASK_NUM_WORKERS or a Dask config file), "
                         f"not a number of workers (an integer >= 1): unset it, or set it to one")


def check_zarr_settings() -> None:
    """Before a store is read or written: refuse zarr's thread pool or concurrency settings that zarr cannot use
    (``ZARR_THREADING__MAX_WORKERS``, ``ZARR_ASYNC__CONCURRENCY``), naming them: 0 said a sound store's label array
    could not be read, and a concurrency of 0 hung every read."""
    import zarr

    for key, variable in (("threading.max_workers", "ZARR_THREADING__MAX_WORKERS"),
                          ("async.concurrency", "ZARR_ASYNC__CONCURRENCY")):
        value = zarr.config.get(key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"zarr's settings give {key}={value!r} ({variable} or a zarr config file), not an "
                             f"integer >= 1: unset it, or set it to one")


def check_scheduler(scheduler: Any) -> Any:
    """``scheduler`` as given (an address checked, ``scheduler_address``), or a ValueError if it is neither None,
    a name Dask knows, an address, an open Client nor a get function."""
    if isinstance(scheduler, str):
        return scheduler if scheduler.lower() in SCHEDULER_NAMES else scheduler_address(scheduler)
    if getattr(scheduler, "status", None) in ("closing", "closed"):  # a Client: it failed inside distributed
        raise ValueError("the distributed.Client given as scheduler is closed; give an open one, or its address")
    if scheduler is None or callable(scheduler) or hasattr(scheduler, "get"):
        return scheduler
    raise ValueError(f"scheduler must be 'threads', 'synchronous', 'processes', a Dask scheduler address "
                     f"('tcp://host:8786' or 'host:8786') or a distributed.Client, got {scheduler!r}")


def memory_bytes(memory_limit: Any) -> int:
    """``memory_limit`` ("4GiB", "200MB" or a positive number of bytes, at most ``MAX_MEMORY_LIMIT``) in bytes, or
    a ValueError naming it."""
    is_number = not isinstance(memory_limit, bool) and isinstance(memory_limit, (int, float, np.integer, np.floating))
    text = isinstance(memory_limit, str) and memory_limit.strip() != ""  # dask reads "" as 1 byte
    try:
        limit = parse_bytes(memory_limit) if text else memory_limit if is_number else None
    except ValueError:
        limit = None
    except OverflowError:  # a size beyond floats, such as "1e400"
        limit = math.inf
    if limit is None or not limit >= 1:  # NaN too
        raise ValueError(f"memory_limit must be a positive number of bytes or a size such as '4GiB', "
                         f"got {memory_limit!r}")
    if limit > MAX_MEMORY_LIMIT:
        raise ValueError(f"memory_limit must be at most 2**60 bytes ({MAX_MEMORY_LIMIT}), got {memory_limit!r}")
    return int(limit)


def held_and_limit(held: int, limit: int) -> tuple[str, str]:
    """What a run would hold and ``memory_limit`` in words (Dask's ``format_bytes``), in bytes where those read
    alike: "holds 48.00 MiB, over memory_limit=48.00 MiB" (48 MiB and 1664 bytes) said neither how far."""
    said = format_bytes(held), format_bytes(limit)
    return said if said[0] != said[1] else (f"{held:,} bytes", f"{limit:,} bytes")


def group_codes(values: Any, option: str, name: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """The sorted labels of the coordinate ``name`` that ``option`` ("groupby" or "folds") names, and each
    datapoint's index into them, from the coordinate's ``values`` on ``layer``; a ValueError naming the coordinate
    when its values cannot be sorted (None or NaN among strings) or some are NaN (no group)."""
    values = np.asarray(values).reshape(-1)
    asked = f"{option}={name!r} (--{option} {name})"  # in the API's words and the command's
    try:
        labels, codes = np.unique(values, return_inverse=True)
    except TypeError:
        kinds = sorted({type(value).__name__ for value in values})
        raise ValueError(f"{asked}: the coordinate {name!r} of layer {layer!r} mixes values of types "
                         f"{', '.join(kinds)} (None or NaN among labels?), which cannot be sorted into groups; give "
                         f"every datapoint a label of one type") from None
    # NaN, or NaT (not a time); among Python objects too, where np.unique sorted NaN between the numbers and split
    # one label into two groups, each NaN a group of its own, silently (found by audit)
    missing = np.isnan(values) if labels.dtype.kind in "fcmM" else pd.isna(values) if values.dtype == object else None
    if missing is not None and missing.any():
        kind = {"m": "NaT", "M": "NaT", "f": "NaN", "c": "NaN"}.get(labels.dtype.kind, "missing (NaN, NaT or None)")
        raise ValueError(f"{asked}: the coordinate {name!r} of layer {layer!r} is {kind} for {int(missing.sum())} "
                         f"datapoints, which "
                         f"then belong to no group; give them labels (for the command, in the store), or select the "
                         f"others (layer.isel(datapoint=...))")
    return labels, codes.reshape(-1)


@dataclass(frozen=True)
class StreamOptions:
    """How two (or more) layers are read, turned into rows and streamed into Moments.

    Every public measure takes these as keyword arguments. An option that one mode alone reads (``method``
    and ``grid``: spatial="interp"; ``split_every``: spatial="features" or minibatch CKA; ``checkpoint_every``:
    ``checkpoint``) given to a public function without that mode is a TypeError naming the option and the mode,
    never silently ignored (``from_kwargs``).

    Attributes
    ----------
    spatial : {"flatten", "avgpool", "interp", "dft", "first", "last", "features"}
        How positions (token, time, height and width, …) become rows: "flatten" makes every
        (datapoint, *positions) a row (equal positions needed; under padding masks, the rows where
        both layers are real); "avgpool" averages over the positions (the real ones, under a mask),
        one row per datapoint, and pairs layers of any positions; "first" takes each datapoint's
        first real position (e.g. a CLS token; after left padding, the first unpadded one), "last" its
        last real one; "interp" interpolates the
        coarser layer onto the finer layer's grid along each position dim, then flattens (see
        ``method``, ``grid``); "dft" takes the DFT over the positions and keeps one set of
        statistics per frequency both layers share (CCA only). Memory for dft: frequencies ×
        (p + q)² complex values per partial, checked against ``memory_limit``. "features" makes
        each datapoint's whole activation map (positions × channels) one feature vector, as the
        CKA papers and libraries do for conv layers: linear CKA only, exact from Gram blocks of
        pairs of datapoint chunks, in bands that fit ``memory_limit`` (chunks too large for it are
        cut), or minibatch CKA.
    stride : int
        Keep every ``stride``-th row of the global row order (google/svcca's ``[::stride]``),
        whatever the chunking. For avgpool and dft the rows are datapoints. With ``groupby``, of each group's
        rows on their own, as of the group alone.
    precision : {"auto", "float32", "float64"}
        dtype of the per-chunk products. "auto" (default) computes the first datapoints (at least 4 rows,
        before padding is left out, per channel of the widest layer) in float64 and keeps float32 for the rest
        unless a side's correlation matrix there has a condition number above 1e3 (the choice is in the
        ``precision_auto`` attr; a checkpointed run, one with fewer rows, or one measuring PWCCA, whose weights
        rest on the canonical directions, takes float64); "float32" is
        2–3× faster than "float64", correlations good to about 1e-6 on well-conditioned data, but
        directions of ill-conditioned layers can fall under its rounding. Accumulation and merging are
        always float64. With spatial="features" (exact CKA from Gram blocks), "auto" and "float32" make
        each layer's Gram blocks in float32 (their inner products in float64), about twice as fast and
        with bands of twice the datapoints: linear CKA inverts nothing, so no conditioning check is needed
        (measured up to 2e-7 from float64, absolute); a layer whose values' ranges would overflow or
        underflow float32 products takes float64, as the ``precision_auto`` attr says.
    method, grid
        For "interp" only: "linear" (default), "nearest" or "cubic" (tensor-product, per axis); "coords"
        (default) places samples at the layers' ``height``/``width`` coordinates (pixel centres in input-image
        units), "svcca" at google/svcca's tutorial positions.
    nan_policy : {"raise", "omit"}
        NaN or Inf in the rows used raises an error naming the layer and the datapoint (by its label),
        or ("omit") such rows are left out of every side and counted in the ``rows_omitted`` attr (with
        padding masks, that count includes the padded positions, which are left out either way).
    minibatch : int or None
        The minibatch CKA of Nguyen, Raghu & Kornblith 2021 over consecutive minibatches of this many rows (>= 4)
        rather than the full-data CKA (``cka()`` and ``similarity(measures=["cka"])`` only; None, the default:
        full data). Its rows must not shift, so not with nan_policy="omit", "dft" or a padding mask on
        per-position rows; ``precision``, checkpoints, ``groupby`` and ``folds`` do not apply to it
        (``NOT_MINIBATCH``: given with it to a public function, a TypeError, from ``from_kwargs``).
    split_every : int
        For spatial="features" and minibatch CKA only: Gram blocks summed per task of the tree that adds them
        up, at least 2 (default 8). The Moments need none: each chain folds its chunks into one accumulator.
    memory_limit : int, float or str
        Budget for what a pass holds at once ("1.5GiB" by default, at most 2**60 bytes), checked before streaming;
        kept in bytes.
        Each chain of folds (one per core locally) holds its accumulated statistics, the chunk it folds
        and that chunk's temporaries, and on the local pool the chunks it reads ahead where it costs
        little; fewer chains read when the budget affords fewer, and a pass that cannot fit one is
        refused, naming the layers and sizes. It bounds the arrays a pass allocates (the tests trace
        them; 67 MiB traced at a limit of 100 MiB over two layers of 16 MiB LZ4 chunks); the process's resident
        memory adds the interpreter and its libraries (about 120 MiB with a store open) and what the allocator
        keeps of freed chunk buffers, up to a chunk or two for each thread that reads or folds (zarr's decode
        pool, Dask's threads; glibc gives each its own arena): that run peaked 232 MiB above the interpreter,
        139 MiB with ``MALLOC_ARENA_MAX=2`` in the environment; flat in datapoints, a smaller share of larger
        limits. The buffers of a chunk while it is read from a zarr store (its stored bytes and zarr's decoded
        copy: twice each store chunk a task reads at once) are counted for layers whose Dask graph reads one.
    scheduler
        The Dask scheduler: None (the active one: a current ``distributed.Client``, else the local
        threads), "threads", "synchronous", "processes", a ``distributed.Client`` or an address.
    progress : bool
        Show a progress bar (on stderr).
    dims
        Names of the axes of array inputs, e.g. ``("datapoint", "channel", "height", "width")``
        for channels-first data (every array given; wrap arrays of other layouts in
        ``xarray.DataArray(array, dims=...)`` one by one), or a mapping from DataArrays' dim names to chunkcca's
        (a tuple for a DataArray is an error).
    checkpoint, checkpoint_every
        A local path (in an existing folder) where the running Moments are saved (atomically) after every
        ``checkpoint_every`` datapoint chunks of the largest layer (default 16; given without
        ``checkpoint``, a TypeError); a
        later run with the same path, layers and options resumes after the chunks done. Not
        for spatial="features", whose Gram pass keeps no Moments.
    connect_timeout : float
        Seconds (> 0) to wait for a Dask scheduler given by address (default 10) before an error naming it;
        given with any other ``scheduler``, a TypeError (it would be read by nothing).
    groupby : str
        A coordinate on ``datapoint`` (a class label, a dataset split): one Moments per value, in the same
        pass, and every measure per group, along a dim named after the coordinate.
    folds : int or str
        K >= 2: contiguous blocks of the datapoints in their order, sized as ``numpy.array_split(range(n),
        K)``; or a coordinate on ``datapoint`` naming each datapoint's fold. One Moments per fold, in the same
        pass: jackknife errors and intervals, held-out CCA and predictivity (compare, similarity).
    """

    spatial: Spatial = "flatten"
    stride: int = 1
    precision: Precision = "auto"
    method: Method = "linear"
    grid: Grid = "coords"
    nan_policy: NanPolicy = "raise"
    split_every: int = SPLIT_EVERY
    memory_limit: int | float | str = MEMORY_LIMIT
    scheduler: Any = None
    progress: bool = False
    dims: Any = None
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = CHECKPOINT_EVERY
    connect_timeout: float = CONNECT_TIMEOUT
    groupby: str | None = None
    folds: int | str | None = None
    minibatch: int | None = None  # last: the fields before keep their places for positional construction

    def __post_init__(self) -> None:
        check_choice("spatial", self.spatial, SPATIAL)
        object.__setattr__(self, "stride", check_int("stride", self.stride))
        check_choice("precision", self.precision, (*PRECISIONS, "auto"))
        check_choice("method", self.method, METHODS)
        check_choice("grid", self.grid, GRIDS)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        object.__setattr__(self, "split_every", check_int("split_every", self.split_every, 2))
        object.__setattr__(self, "memory_limit", memory_bytes(self.memory_limit))
        object.__setattr__(self, "scheduler", check_scheduler(self.scheduler))
        object.__setattr__(self, "progress", check_flag("progress", self.progress))
        object.__setattr__(self, "connect_timeout", check_number("connect_timeout", self.connect_timeout, 0.0,
                                                                 low_open=True))
        named_axes = isinstance(self.dims, (tuple, list, np.ndarray)) and all(isinstance(dim, str) for dim in self.dims)
        if self.dims is not None and not (named_axes or isinstance(self.dims, Mapping)):  # dims=5 was ignored
            raise TypeError(f"dims must be a tuple of the arrays' axis names, e.g. ('datapoint', 'channel', 'height', "
                            f"'width'), or a mapping from DataArrays' dim names to chunkcca's, got {self.dims!r}")
        if self.groupby is not None and not isinstance(self.groupby, str):
            raise ValueError(f"groupby must name a coordinate on datapoint, got {self.groupby!r}")
        if self.folds is not None and not isinstance(self.folds, str):
            is_int = not isinstance(self.folds, bool) and isinstance(self.folds, (int, np.integer))
            if not is_int or self.folds < 2:
                raise ValueError(f"folds must be an integer >= 2 or a coordinate on datapoint, got {self.folds!r}")
            object.__setattr__(self, "folds", int(self.folds))
        if self.groupby is not None and self.folds is not None:
            raise ValueError("pass groupby or folds (--groupby or --folds), not both")
        if self.checkpoint is not None and (self.groupby is not None or self.folds is not None):
            raise ValueError("a checkpoint holds one Moments: run groupby or folds without checkpoint")
        object.__setattr__(self, "checkpoint_every", check_int("checkpoint_every", self.checkpoint_every))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", expanded(self.checkpoint))
            check_checkpoint_place(self.checkpoint, "checkpoint")
        if self.spatial == "features":
            self._check_features()
        if self.minibatch is not None:
            self._check_minibatch()

    def _check_features(self) -> None:
        """spatial="features" sums Gram matrices of each datapoint's whole map over all rows in one pass: no
        groups, folds or checkpoint, and no rows left out (the Gram matrices would shift)."""
        if self.groupby is not None or self.folds is not None:
            raise ValueError("spatial='features' (--spatial features) takes no groupby or folds (--groupby, --folds)")
        if self.checkpoint is not None:
            raise ValueError("spatial='features' takes no checkpoint: its Gram pass keeps no Moments to save; a larger "
                             "memory_limit (fewer bands of chunks to read) is what shortens it")
        if self.nan_policy == "omit":
            raise ValueError("spatial='features' cannot omit rows (the Gram matrices would shift); use "
                             "nan_policy='raise' (--nan-policy raise, the default)")

    def _check_minibatch(self) -> None:
        """Minibatch CKA cuts the rows into minibatches of a fixed size (>= 4: the unbiased HSIC needs 4 rows) in
        their order: none may be left out, and one set of rows (not one per frequency)."""
        try:
            object.__setattr__(self, "minibatch", check_int("minibatch", self.minibatch, 4))
        except ValueError:
            raise ValueError(f"minibatch must be an integer >= 4 (the unbiased HSIC needs 4 rows), got "
                             f"{self.minibatch!r}") from None
        if self.nan_policy == "omit":
            raise ValueError("minibatch CKA cannot omit rows (minibatches would shift); use nan_policy='raise' "
                             "(--nan-policy raise, the default)")
        if self.spatial in PER_FREQUENCY:
            raise ValueError("minibatch CKA does not work per spatial frequency (spatial='dft'); use "
                             "spatial='flatten', 'avgpool', 'interp', 'first', 'last' or 'features'")

    @classmethod
    def from_kwargs(cls, where: str, options: Mapping[str, Any]) -> StreamOptions:
        """The options of a public function's ``**options``; an unknown name is a TypeError naming ``where``, and
        so is an option given without the mode that reads it (``MODAL``; ``split_every`` is read by minibatch CKA
        too), ``minibatch`` given to a function that has no minibatch CKA (``MINIBATCH_FUNCTIONS``) and, with it,
        an option it has no use for (``NOT_MINIBATCH``)."""
        takes = NAMES if where in MINIBATCH_FUNCTIONS else tuple(name for name in NAMES if name != "minibatch")
        unknown = sorted(set(options) - set(takes))
        if unknown:
            also = ("; minibatch CKA is cka(a, b, minibatch=N) or similarity(..., measures=['cka'], minibatch=N)"
                    if "minibatch" in unknown else "")
            raise TypeError(f"{where}() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}; its streaming options are {', '.join(takes)}{also}")
        unused = [name for name in NOT_MINIBATCH if name in options] if options.get("minibatch") is not None else []
        if unused:
            raise TypeError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to minibatch CKA "
                            f"(float64 Gram matrices of minibatch x minibatch values, summed in one pass over all "
                            f"rows; no Moments to checkpoint or to group)")
        made = cls(**options)
        if "connect_timeout" in options and not is_address(made.scheduler):  # read by nothing else
            given = made.scheduler if made.scheduler is None or isinstance(made.scheduler, str) else type(
                made.scheduler).__name__
            raise TypeError(f"connect_timeout is the wait for a scheduler given by address (scheduler='tcp://host:port'"
                            f"); with scheduler={given!r} there is none to wait for: give an address or leave it out")
        reads = ("split_every",) if made.minibatch is not None else ()
        misplaced: dict[str, list[str]] = {}
        for name, (mode, values) in MODAL.items():
            setting = getattr(made, mode)
            if name in options and name not in reads and (setting is None if values is None else setting not in values):
                misplaced.setdefault(mode, []).append(name)
        for mode, names in misplaced.items():
            listed, values = " and ".join(names), MODAL[names[0]][1]
            verb, pronoun = ("applies", "it") if len(names) == 1 else ("apply", "them")
            if values is None:
                raise TypeError(f"{listed} {verb} only with {mode}=, which is not given; pass {mode}= too or leave "
                                f"{pronoun} out")
            wanted = " or ".join(f"{mode}={value!r}" for value in values)
            also = (" (or to minibatch CKA, cka(..., minibatch=N))" if "split_every" in names
                    and where in MINIBATCH_FUNCTIONS else "")
            raise TypeError(f"{listed} {verb} only to {wanted}{also}, not {mode}={getattr(made, mode)!r}; pass "
                            f"{wanted} or leave {pronoun} out")
        return made


#: The names of the streaming options.
NAMES: tuple[str, ...] = tuple(field.name for field in fields(StreamOptions))


@dataclass(frozen=True)
class SolveOptions:
    """The parameters of the final solves.

    Attributes
    ----------
    epsilon : float
        Ridge added to the diagonal of each side's covariance (CCA, SVCCA, PWCCA); >= 0.
    keep : float
        SVCCA: each side keeps the fewest principal directions holding this share, in (0, 1]; with
        ``keep_by="directions"``, this many (an integer >= 1; fewer where a side's rank is lower).
    keep_by : {"variance", "singular_values", "directions"}
        SVCCA: ``keep`` counts variance (eigenvalues of the covariance) or singular values of the
        centred data (their square roots, as google/svcca's SVD step), or is a number of directions (the
        tutorials' "top 50").
    alpha : float
        Shape metric: partial whitening, 0 (CCA-like) to 1 (Procrustes-like).
    ridge : float or sequence of float
        Predictivity: the ridge λ of ``B = (C_aa + λ · v̄ · I)⁻¹ C_ab``, >= 0, relative to v̄, the mean
        variance of a's channels that vary (dead units left out). Default 0.01: enough to make C_aa invertible
        when a's channels are collinear or outnumber the training rows, while a direction holding more than
        about 1% of the mean variance is shrunk by at most half. Several values give a ``ridge`` dim.
    confidence : float
        With folds: the level of the jackknife intervals ``<measure>_ci``, in (0, 1).
    """

    epsilon: float = 0.0
    keep: float = 0.99
    keep_by: KeepBy = "variance"
    alpha: float = 1.0
    ridge: float | tuple[float, ...] = RIDGE
    confidence: float = 0.95

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        check_choice("keep_by", self.keep_by, KEEP_BY)
        if self.keep_by == "directions":  # a count: 50.0 from the command line is 50
            count = self.keep
            if not (isinstance(count, (int, float, np.integer, np.floating)) and not isinstance(count, bool)
                    and 1 <= count <= 2**31 - 1 and count == int(count)):
                raise ValueError(f"keep with keep_by='directions' is a number of directions, an integer >= 1 (e.g. "
                                 f"keep=50, --keep 50), got {self.keep!r}")
            object.__setattr__(self, "keep", int(count))
        else:
            try:
                object.__setattr__(self, "keep", check_number("keep", self.keep, 0.0, 1.0, low_open=True))
            except ValueError as error:
                if isinstance(self.keep, (int, float, np.integer, np.floating)) and self.keep > 1:
                    raise ValueError(f"{error}: a share of the {self.keep_by}; to keep a number of directions, pass "
                                     f"keep_by='directions' (--keep-by directions)") from None
                raise
        object.__setattr__(self, "alpha", check_number("alpha", self.alpha, 0.0, 1.0))
        ridges = self.ridge if isinstance(self.ridge, (list, tuple, np.ndarray)) else (self.ridge,)
        if not len(ridges):
            raise ValueError("ridge needs at least one value")
        values = tuple(check_number("ridge", value, 0.0) for value in ridges)
        object.__setattr__(self, "ridge", values if isinstance(self.ridge, (list, tuple, np.ndarray)) else values[0])
        object.__setattr__(self, "confidence", check_number("confidence", self.confidence, 0.0, 1.0,
                                                            low_open=True, high_open=True))

    @property
    def ridges(self) -> tuple[float, ...]:
        """``ridge`` as a tuple."""
        return self.ridge if isinstance(self.ridge, tuple) else (self.ridge,)


SOLVE_NAMES: tuple[str, ...] = tuple(field.name for field in fields(SolveOptions))
