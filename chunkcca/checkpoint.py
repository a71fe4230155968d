"""Checkpoints: running Moments saved with the run's progress and fingerprint, so a run can resume.

The checkpointed pass (``chunkcca.passes.stream_layers()``) streams the datapoints in groups of
chunks and, after each group, saves the running Moments and the number of datapoints done here.
A later run with the same checkpoint, layers and options loads it and streams only the datapoints
not done yet; a run of other data or options is refused with what differs. A finished checkpoint is
simply the full Moments.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.base
import xarray as xr

from ._fs import ORDER_ATTR, filesystem, path_under, zarr_attributes
from .integrity import parsed_metadata
from .layers import VARIABLE, as_opened, mask_as_opened, zarr_arrays
from .moments import MetadataEdited, Moments, check_only_moments, read_saved
from .options import MASK
from .rows import Adapter

#: The layout of a checkpoint's fingerprint; a checkpoint of another layout was made by another chunkcca.
FORMAT = 5


class CheckpointError(ValueError):
    """A checkpoint that this run cannot resume (another run's, or not a checkpoint)."""


def _fingerprint(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], options: dict[str, Any]) -> str:
    """What the saved statistics were computed from: each layer's name, shape, dtype, Dask token (which
    hashes in-memory data and names store-backed data by path), padding mask and, for layers that read stores,
    the hash of their (and their masks') files' names, sizes and modification times (so a rewritten or edited
    store is another run) and of their labels; the adapters (every field, by Dask token) and the options."""
    # A store's layer as opened is known by its files, not by its Dask name, which holds the store's path: a moved
    # store resumes its checkpoint. A layer computed from one (chunkcca's own reordering or transposing included)
    # is known by both: its Dask name says how it is computed, its files whether they changed.
    described = []
    for layer in layers:
        files = store_signature(layer)
        labels = _labels_hash(layer) if files else None
        # a store's mask as opened by its files, an in-memory one by its values, a computed one by its Dask name
        mask = (None if MASK not in layer.coords else "its store's" if mask_as_opened(layer)
                else dask.base.tokenize(layer.coords[MASK].data))
        # a store's layer as opened by its path in the store (its name may tell it from a namesake by the store's
        # folder, "conv2 (m0.zarr)", which a moved store renames) and its files; another by its name and Dask name
        name, dask_name = ((layer.encoding["layer"], None) if as_opened(layer)
                           else (str(layer.name), layer.data.name))
        described.append((name, list(layer.shape), str(layer.dtype), dask_name, mask, files, labels))
    tokens = [dask.base.tokenize(adapter) for adapter in adapters]
    return json.dumps({"format": FORMAT, "layers": described, "adapters": tokens, **dict(sorted(options.items()))},
                      default=str)


#: Labels made text at once by ``_labels_hash``: all of 4 million took 430 MiB (found by audit).
LABELS_AT_ONCE = 65536


def _labels_hash(layer: xr.DataArray) -> str:
    """A hash of every label of ``layer`` (datapoint, position and channel indexes), as text, ``LABELS_AT_ONCE``
    at a time (the same bytes as all at once, so earlier checkpoints resume)."""
    digest = hashlib.sha256()
    for dim, index in sorted(layer.indexes.items()):
        digest.update(f"{dim}:{len(index)}:".encode())
        for start in range(0, len(index), LABELS_AT_ONCE):
            text = "\x1f".join(map(str, index[start : start + LABELS_AT_ONCE].tolist()))
            digest.update((("\x1f" if start else "") + text).encode())
    return digest.hexdigest()


def _difference(saved: str, current: str) -> str:
    """What differs between a checkpoint's fingerprint and this run's, in words."""
    before, now = json.loads(saved), json.loads(current)
    if before.get("format") != now["format"]:
        return "it was made by another version of chunkcca, whose checkpoints this one does not resume"
    fields = ("name", "shape", "dtype", "Dask name", "mask", "files", "labels")
    old_layers = before.get("layers", [])
    if len(old_layers) != len(now["layers"]):
        return f"it has {len(old_layers)} layers, this run {len(now['layers'])}"
    if old_layers != now["layers"] and sorted(map(json.dumps, old_layers)) == sorted(map(json.dumps, now["layers"])):
        return "it took the same layers in another order (the sides are swapped)"
    if now.get("row_norms") and before.get("row_norms") is False:
        return ("it holds no row-norm sums, which cka_debiased needs: give it a checkpoint of its own, or make this "
                "one afresh by a run with cka_debiased among its measures (compute_moments: row_norms=True)")
    changed = [f"{key} {before.get(key)!r} then, {now[key]!r} now" for key in now
               if key not in ("format", "layers", "adapters") and before.get(key) != now[key]]
    if changed:
        return "; ".join(changed)
    for side, (old_layer, new_layer) in enumerate(zip(old_layers, now["layers"])):
        for field, was, is_now in zip(fields, old_layer, new_layer):
            if was != is_now and field == "name":  # the side, not the name that changed (nor "a (x)" of a pair)
                return f"the {'ab'[side] if len(now['layers']) == 2 else side + 1} side's layer was {was!r} then, " \
                       f"{is_now!r} now"
            if was != is_now:
                if field == "files":
                    return (f"the files of layer {new_layer[0]!r} changed since (its store was rewritten or edited, "
                            f"or is a copy: their modification times count; or it is another store's)")
                if field == "labels":
                    return f"layer {new_layer[0]!r} has other datapoint, position or channel labels than then"
                if field == "mask":
                    return f"layer {new_layer[0]!r} has another padding mask than then"
                if field == "Dask name":
                    return f"layer {new_layer[0]!r} holds other data (or is computed otherwise) than then"
                return f"layer {new_layer[0]!r} has another {field} ({was} then, {is_now} now)"
    if before.get("adapters") != now["adapters"]:
        return "the spatial adapters differ (spatial sizes, frequencies or interpolation)"
    return "its fingerprint differs"


def load_progress(path: str | os.PathLike) -> tuple[Moments, int, str]:
    """The Moments saved in a checkpoint, the datapoints they cover and the run's fingerprint."""
    if not (Path(path) / "zarr.json").is_file():  # resume says what it is
        raise FileNotFoundError(f"{path} holds no zarr.json")
    # damaged (not a JSON object): resume says it cannot be read
    attributes = parsed_metadata((Path(path) / "zarr.json").read_text(), "zarr.json").get("attributes")
    attributes = attributes if isinstance(attributes, dict) else {}
    if "datapoints_done" not in attributes or "fingerprint" not in attributes:
        what = ("saved Moments without a run's progress" if attributes.get("chunkcca") == "Moments" else
                "an activation store" if ORDER_ATTR in attributes else "another zarr store")
        raise CheckpointError(f"{path} is not a chunkcca checkpoint ({what}); pass another checkpoint path")
    try:
        moments, saved = read_saved(path)  # older checkpoints lack value_rounding: the run adds it
    except MetadataEdited as error:
        raise CheckpointError(f"checkpoint {path} cannot be resumed from: its metadata (the attributes in "
                              f"zarr.json: the datapoints done, the run's fingerprint, layers, rounding; an array's "
                              f"type or attributes) was changed or damaged since it was written; remove it to start "
                              f"again") from error
    return moments, int(saved["datapoints_done"]), str(saved["fingerprint"])  # as the Moments read


def holds_row_norms(path: str | os.PathLike) -> bool:
    """Whether the checkpoint at ``path`` was made with row-norm sums (for debiased CKA): a run that does not need
    them keeps them, so that the checkpoint serves it and still serves debiased CKA. False where there is none (or
    it is not a checkpoint: ``resume`` says so)."""
    try:
        return json.loads(str(zarr_attributes(Path(path)).get("fingerprint"))).get("row_norms") is True
    except (ValueError, AttributeError):
        return False


def resume(path: str | os.PathLike, layers: Sequence[xr.DataArray], adapters: Sequence[Adapter],
           options: dict[str, Any], boundaries: Sequence[int]) -> tuple[Moments | None, int, str]:
    """What a checkpointed run starts from: (saved Moments or None, datapoints done, this run's fingerprint).

    A checkpoint of another run, or one that stopped where this run is not cut (``boundaries``,
    ``engine.checkpoint_boundaries``), is a ``CheckpointError`` saying why.
    """
    path = Path(path)
    fingerprint = _fingerprint(layers, adapters, options)
    if not path.exists():
        return None, 0, fingerprint
    recorded = zarr_attributes(path)  # a run left to do saves over it: before the run (and zarr's warnings of
    if recorded.get("datapoints_done") != recorded.get("datapoints_total"):  # what is not its own), not at a save
        check_only_moments(path, "saving the run's progress")
    try:
        saved, done, saved_fingerprint = load_progress(path)
    except CheckpointError:
        raise
    except Exception as error:  # not a zarr store, a file, unreadable: say so, not "reading layers … failed"
        if not (path / "zarr.json").is_file():  # someone else's file or folder: never advise removing it
            what = ("a folder without zarr.json" if path.is_dir() else "a file" if path.is_file()
                    else "not a regular file")
            raise CheckpointError(f"checkpoint {path} is not a chunkcca checkpoint ({what}); pass another checkpoint "
                                  f"path") from error
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); remove it or "
                              f"pass another path") from error
    if saved_fingerprint != fingerprint:
        raise CheckpointError(f"checkpoint {path} belongs to another run: "
                              f"{_difference(saved_fingerprint, fingerprint)}. Remove it or pass another path")
    if done not in boundaries:
        raise CheckpointError(f"checkpoint {path} stopped after datapoint {done}, which is not a chunk end of the "
                              f"largest layer now, where a run is cut; stream with the chunking it was made with")
    return saved, done, fingerprint


def save_progress(moments: Moments, path: str | os.PathLike, done: int, total: int, fingerprint: str) -> None:
    """Save the running Moments, atomically, with the datapoints they cover (the first ``done`` of the run's
    ``total``; ``Moments.load`` warns of an unfinished run's) and the run's fingerprint."""
    try:
        moments.save(path, overwrite=True, attrs={"datapoints_done": done, "datapoints_total": total,
                                                  "fingerprint": fingerprint})
    except (OSError, ValueError) as error:  # its folder gone meanwhile: a ValueError naming it
        raise CheckpointError(f"checkpoint {path} cannot be written ({type(error).__name__}: {error})") from error


#: File details that change when a file is rewritten: local size and mtime, object stores' ETags and versions.
SIGNATURE_FIELDS = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "updated", "generation",
                    "md5Hash", "version_id")


def _file_signature(info: dict[str, Any]) -> list[Any]:
    """The ``SIGNATURE_FIELDS`` of a file's fsspec details; where a filesystem keeps no modification time or tag
    (fsspec's memory one), when the file was made, which a rewrite changes."""
    fields = [info.get(key) for key in SIGNATURE_FIELDS]
    return fields if any(field is not None for field in fields[1:]) else [*fields, info.get("created")]


def store_signature(array: xr.DataArray) -> str | None:
    """A hash of the names, sizes and modification times (or ETags; on local disks, their last 4 bytes too) of the
    files that hold ``array`` and its
    padding mask: of its layer's folder (and its mask's) for a store's layer as opened by ``open_activations()``,
    else of the folders of every zarr array their Dask graphs read; None for arrays that read none. It changes
    when the store is rewritten or edited, not when it is read or has its permissions changed, nor (for a layer
    as opened, named by its path within the store) when the store is moved or mounted elsewhere. Reads one
    listing of each folder and, locally, 4 bytes per file."""
    options = array.encoding.get("storage_options")
    mask = array.coords[MASK].data if MASK in array.coords else None
    folders = []
    for data, variable, opened in ((array.data, VARIABLE, as_opened(array)),
                                   (mask, MASK, mask is not None and mask_as_opened(array))):
        if opened:
            folders.append((path_under(array.encoding["store"], array.encoding["layer"], variable), variable))
        elif hasattr(data, "__dask_graph__"):
            folders += [(_array_files(source, str(array.name)), str(source.store_path))
                        for source in zarr_arrays(data)]
    if not folders:
        return None
    listing = []
    for location, label in folders:
        fs, folder = filesystem(location, options) if isinstance(location, str) else location
        folder = folder.rstrip("/")
        files = fs.find(folder, detail=True)
        if not files:  # listed elsewhere than read: a fingerprint of nothing resumed the run after any rewrite
            raise CheckpointError(f"layer {str(array.name)!r} reads the zarr array {label}, whose files are not "
                                  f"found at {folder}, so a checkpoint cannot tell a rewrite of them; open it by "
                                  f"its path (zarr.open_array, xarray.open_zarr) or run without a checkpoint")
        tails = _local_tails(fs, files)
        listing += sorted((label + name.removeprefix(folder), [*_file_signature(info), tails.get(name)])
                          for name, info in files.items())
    return hashlib.sha1(json.dumps(listing, default=str).encode()).hexdigest()


def _array_files(source: Any, layer: str) -> str | tuple[Any, str]:
    """Where the files of the zarr array ``source`` that a layer computed from it reads are: a local path, or an
    fsspec store's filesystem (synchronous, with the store's own options) and folder; a CheckpointError for a store
    without files to list (in memory). A wrapper (``store.WholeStore``) lists the store it wraps."""
    from zarr.storage import FsspecStore, LocalStore, WrapperStore

    store = source.store_path.store
    while isinstance(store, WrapperStore):
        store = store._store
    if isinstance(store, LocalStore):
        return f"{store.root}/{source.store_path.path}"
    if isinstance(store, FsspecStore):  # ``dask.array.from_zarr(path)``'s: named "<FsspecStore(…)>", no path
        fs = getattr(store.fs, "sync_fs", store.fs)  # fsspec's AsyncFileSystemWrapper holds the sync one
        if getattr(fs, "asynchronous", False):
            fs = type(fs)(**{**fs.storage_options, "asynchronous": False})
        return fs, f"{store.path}/{source.store_path.path}"
    raise CheckpointError(f"layer {layer!r} reads the zarr array {source.store_path} from a "
                          f"{type(store).__name__}, whose files a checkpoint cannot list to tell a rewrite: write "
                          f"it to a store (chunkcca.write_activations) or run without a checkpoint")


def _local_tails(fs: Any, files: dict[str, dict[str, Any]]) -> dict[str, str]:
    """On a local filesystem, the last 4 bytes of each file (a chunkcca chunk's CRC32C of its bytes), by name: a
    chunk rewritten to the same size with its modification time set back (``cp -p``, ``rsync -t``, ``tar x``)
    changes them. Object stores' ETags and versions change on every rewrite: nothing is read there."""
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return {}
    names = [name for name, info in files.items() if int(info.get("size") or 0) >= 4]
    ends = [int(files[name]["size"]) for name in names]
    return dict(zip(names, (tail.hex() for tail in fs.cat_ranges(names, [end - 4 for end in ends], ends)))) \
        if names else {}
