"""What a store's writer recorded, checked before it is read: one listing of the store (``Listing``), every chunk
file present (``check_chunks``), each array's metadata and decoding attributes as written (``check_metadata``), and
each chunk file's CRC32C in its place (``check_places``): a lost, moved, cut or edited chunk file is an error naming
the layer and datapoints, never a fill value or another chunk's numbers.

Files and metadata only: no activations are read here.
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any

import google_crc32c
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ._fs import ORDER_ATTR, chunk_keys, chunk_place, json_digest
from ._stack import user_stacklevel
from .options import MASK, POSITIONS_ATTR, VARIABLE, layer_name

#: Root attribute: per layer, a digest of each of its arrays' metadata (all but their attributes) as written, by
#: which an edit since (another dtype, shape, dim order or codec list, read silently as other numbers) is refused.
METADATA_ATTR = "chunkcca_metadata"

#: Root attribute: per layer, per chunked array it is read through (activations, mask), each chunk file's CRC32C
#: (its last 4 bytes, which zarr's crc32c codec appends), in chunk order (base64 of little-endian uint32). A chunk
#: file moved to another chunk's place passes its own checksum and would be read as other datapoints' values:
#: ``check_complete`` finds it before reading (an error), and warns of a chunk holding other bytes (an edit in place
#: with zarr is the user's; a chunk copied from another store is damage).
CHUNKS_ATTR = "chunkcca_chunks"

#: Attributes by which xarray decodes an array's values (CF conventions): one edited reads other numbers (an int16
#: layer given ``_Unsigned``: mean ρ 0.641 for 0.970). ``units`` and ``calendar`` count only for times (a ``units``
#: of "<unit> since <date>"); other attributes may change.
DECODED_BY = ("_FillValue", "missing_value", "scale_factor", "add_offset", "_Unsigned", "dtype", "_Encoding")
TIME_DECODED_BY = ("units", "calendar")
#: Root attribute: per layer, each of its arrays' ``DECODED_BY`` attributes as written (``decoded_by``), checked
#: at open beside ``METADATA_ATTR`` (apart from it, so that a store written now opens as before in older versions).
DECODING_ATTR = "chunkcca_decoding"

#: Root attribute, while an append moves its layers in: their paths (``layers``), the groups it makes for them
#: (``groups``) and its process (``owner``, ``_fs.owner_record``). Set before the first move and dropped with the
#: list's update. Readers leave those layers out (in flight, or left by an append killed midway); the next append
#: removes what a killed one left (its process gone), an append that fails removes its own at once.
APPENDING_ATTR = "chunkcca_appending"

#: Root attribute: per layer, what its ``datapoint`` coordinate holds as written: "positions" (written without
#: labels, ``POSITIONS_ATTR``: it pairs with other layers by position) or "labels". The attribute that says so is
#: an array attribute no other record covers: deleted, a layer of positions paired by them with a labelled one.
DATAPOINTS_ATTR = "chunkcca_datapoints"

#: Codecs whose settings do not change the numbers read (how hard a compressor worked): only their names count.
COMPRESSORS = ("blosc", "zstd", "gzip", "numcodecs.blosc", "numcodecs.zstd", "numcodecs.gzip", "numcodecs.lz4")

#: Chunk files holding other bytes than written whose own CRC32C is checked before reading (a file cut short or
#: overwritten fails it, an edit with zarr passes): damage is then one error before any work, not a warning of an
#: edit and then zarr's error mid-run. Past these, zarr's check on reading still finds the rest.
CHECKED_EDITS = 4

#: What a lost chunk file means, and what to do.
LOST_CHUNKS = ("the store is damaged (a chunk deleted), or its writer left out chunks equal to the fill value "
               "(zarr's default; chunkcca.record's labels and last chunks before 2026-12-02); chunkcca never reads "
               "a missing chunk as a fill value: write the layer again (with zarr or xarray, "
               "write_empty_chunks=True)")


def _first_and_more(layers: Sequence[str]) -> str:
    """The first of ``layers`` and how many more: "'b'", "'b' and 2 more"."""
    return f"{layers[0]!r}" + (f" and {len(layers) - 1} more" if len(layers) > 1 else "")


def chunk_records(attributes: Mapping[str, Any], location: str) -> Mapping[str, Mapping[str, str]]:
    """The ``CHUNKS_ATTR`` of a store's root ``attributes``: per layer, its arrays' chunk checksums as written. A
    layer whose arrays' metadata the root records (``METADATA_ATTR``) but not their chunks (the writer records
    both) is an OSError naming it: the record is lost, and chunk files moved or swapped would pass unseen (ρ̄ 0.34
    for 0.71, silently)."""
    places = attributes.get(CHUNKS_ATTR, {})
    lost = [layer for layer in attributes.get(METADATA_ATTR, {}) if layer not in places]
    if lost:
        raise OSError(f"{location}: its root metadata (zarr.json) lacks the record of the chunk files of layer "
                      f"{_first_and_more(lost)} ({CHUNKS_ATTR}), by which chunk files moved or swapped are found: it "
                      f"was edited or damaged (or written by chunkcca before 2026-12-03, which did not record them); "
                      f"write the store again")
    return places



def parsed_metadata(text: str | bytes, name: str) -> dict[str, Any]:
    """A zarr metadata file's text ``name`` as the object it holds; a ValueError saying it is damaged (not JSON, or
    JSON of another kind) where it is not one (xarray said "Expecting value: line 1 column 1", naming no file)."""
    try:
        metadata = json.loads(text)
    except ValueError as error:
        raise ValueError(f"its metadata file {name} is damaged (not JSON: {error})") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"its metadata file {name} is damaged (a JSON {type(metadata).__name__}, not an object)")
    return metadata

@dataclass(frozen=True)
class Listing:
    """One listing of a store: every file (relative to its root) and the metadata of each array, by folder,
    from one ``find`` and one batched read of the ``zarr.json`` files (a round trip each for a URL)."""

    files: dict[str, int]  # each file, relative to the root, and its size
    arrays: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, fs: Any, root: str) -> Listing:
        files = file_sizes(fs, root)
        paths = sorted(name for name in files if name == "zarr.json" or name.endswith("/zarr.json"))
        texts = fs.cat([f"{root}/{name}" for name in paths]) if paths else {}
        arrays = {}
        for name in paths:
            metadata = parsed_metadata(texts[f"{root}/{name}"], name)
            if metadata.get("node_type") == "array":
                arrays[str(PurePosixPath(name).parent)] = metadata
        return cls(files, arrays)

    @cached_property
    def _names(self) -> list[str]:
        """The files' names, sorted: those under a folder are one run of them."""
        return sorted(self.files)

    def sizes(self, folder: str) -> dict[str, int]:
        """Every file under ``folder`` (relative to the root), by its name there, and its size."""
        names = self._names  # "0" follows "/": the names from "folder/" up to "folder0" are those under it
        return {name.removeprefix(f"{folder}/"): self.files[name]
                for name in names[bisect_left(names, f"{folder}/") : bisect_left(names, f"{folder}0")]}


def file_sizes(fs: Any, folder: str) -> dict[str, int]:
    """Every file under ``folder``, by its name there, and its size: one listing. On a local disk through
    ``os.scandir`` (fsspec's ``find`` costs about 0.15 ms a file there, seconds for a store of 50,000 chunk
    files), with fsspec's rules: anything but a folder is a file, a link has the size of what it points to (0 if
    nothing), and a link to a folder is not followed."""
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(folder) or os.path.islink(folder):
        return {name.removeprefix(folder).lstrip("/"): int(info["size"])
                for name, info in fs.find(folder, detail=True).items()}
    sizes: dict[str, int] = {}
    waiting = [("", folder)]
    while waiting:
        prefix, place = waiting.pop()
        try:
            entries = list(os.scandir(place))
        except (FileNotFoundError, NotADirectoryError):  # gone meanwhile
            continue
        except OSError as error:  # fsspec left such a folder out: its chunk files went unchecked, or "lacked"
            raise OSError(f"cannot list the folder {place} ({error.strerror}): chunkcca lists every file of a store "
                          f"to check its chunk files; make it readable, or move it out of the store") from error
        for entry in entries:
            name = f"{prefix}{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    waiting.append((f"{name}/", entry.path))
                elif entry.is_symlink():
                    sizes[name] = _link_size(entry)
                else:
                    sizes[name] = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # removed while listed
                continue
    return sizes


def _link_size(entry: os.DirEntry) -> int:
    """The size of what a link points to, 0 if nothing (fsspec's)."""
    try:
        return entry.stat(follow_symlinks=True).st_size
    except OSError:
        return 0


def metadata_digests(listing: Listing, layers: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per layer of ``layers``, each of its arrays (activations, mask, labels) → a digest of what its values are
    read by: shape, data type, chunks and their keys, dims, fill value and codecs (a compressor's by name)."""
    digests: dict[str, dict[str, str]] = {layer: {} for layer in layers}
    for folder, metadata in listing.arrays.items():
        layer, _, array = folder.rpartition("/")
        if layer not in digests:
            continue
        read_by = {key: metadata.get(key) for key in ("shape", "data_type", "chunk_grid", "chunk_key_encoding",
                                                        "dimension_names", "fill_value")}
        read_by["codecs"] = [codec.get("name") if codec.get("name") in COMPRESSORS else codec
                             for codec in metadata.get("codecs", [])]
        digests[layer][array] = json_digest(read_by)
    return digests


def decoded_by(listing: Listing, layers: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per layer of ``layers``, each of its arrays → the attributes xarray decodes its values by (``DECODED_BY``,
    and ``TIME_DECODED_BY`` for times), as they are."""
    found: dict[str, dict[str, dict[str, Any]]] = {layer: {} for layer in layers}
    for folder, metadata in listing.arrays.items():
        layer, _, array = folder.rpartition("/")
        if layer in found:
            attributes = metadata.get("attributes") or {}
            keys = DECODED_BY + (TIME_DECODED_BY if " since " in str(attributes.get("units", "")) else ())
            found[layer][array] = {key: attributes[key] for key in keys if key in attributes}
    return found


def datapoint_kinds(listing: Listing, layers: Sequence[str]) -> dict[str, str]:
    """Per layer of ``layers`` with a ``datapoint`` coordinate, what it holds (``DATAPOINTS_ATTR``)."""
    found = {layer: listing.arrays.get(f"{layer}/datapoint") for layer in layers}
    return {layer: "positions" if (metadata.get("attributes") or {}).get(POSITIONS_ATTR) else "labels"
            for layer, metadata in found.items() if metadata is not None}


def _check_datapoint_kinds(listing: Listing, attributes: Mapping[str, Any], location: str) -> None:
    """Refuse a layer whose datapoints are positions where labels were written, or labels where positions were
    (``DATAPOINTS_ATTR``), or whose record is lost beside other layers' (a store from before it has none)."""
    written = attributes.get(DATAPOINTS_ATTR)
    if written is None:
        return
    layers = list(attributes.get(METADATA_ATTR) or {})
    for layer, now in datapoint_kinds(listing, layers).items():
        if layer not in written:
            raise OSError(f"{location}: its root metadata (zarr.json) lacks the record of what the datapoint "
                          f"coordinate of layer {layer!r} holds ({DATAPOINTS_ATTR}), which other layers have: it "
                          f"was edited or damaged (or the layer appended by a chunkcca before 2026-12-05); write "
                          f"the store again")
        if written[layer] != now:
            raise OSError(f"{location}: the datapoint coordinate of layer {layer!r} was written as {written[layer]} "
                          f"and reads as {now}: its attribute {POSITIONS_ATTR} was edited (it decides whether the "
                          f"layer pairs with others by position or by label); if you did not edit it, the store "
                          f"is damaged: write it again")


def _check_layers_recorded(listing: Listing, attributes: Mapping[str, Any], location: str) -> None:
    """In a store that records its layers (``METADATA_ATTR``): refuse a layer it lists without a record, or holds
    (a folder of activations) without listing it, but for those an append is moving in (``APPENDING_ATTR``).
    Every write records each layer it lists (an append, those before it too): one edited out of the records, or
    out of the list too, was read unchecked (two chunk files swapped: ρ̄ 0.60 for 0.80, 0.47 for 0.64)."""
    recorded = attributes.get(METADATA_ATTR) or {}
    if not recorded:
        return
    listed = list(attributes.get(ORDER_ATTR) or ())
    unrecorded = [layer for layer in listed if layer not in recorded]
    if unrecorded:
        raise OSError(f"{location}: its root metadata (zarr.json) lists layer {_first_and_more(unrecorded)} and "
                      f"records nothing of it, where it records every other layer's arrays ({METADATA_ATTR}, "
                      f"{CHUNKS_ATTR}): it was edited or damaged; write the store again")
    moving_in = set((attributes.get(APPENDING_ATTR) or {}).get("layers", []))
    held = sorted({folder.rpartition("/")[0] for folder in listing.arrays if PurePosixPath(folder).name == VARIABLE})
    unlisted = [layer for layer in held if layer and layer not in listed and layer not in moving_in]
    if unlisted:
        raise OSError(f"{location} holds layer {_first_and_more(unlisted)}, which its root metadata (zarr.json) "
                      f"neither lists nor records, where it lists and records every other layer: its root was edited "
                      f"(its chunks would be read unchecked) or the layer written into the store by another program; "
                      f"write it with chunkcca.write_activations(mode='a'), or write the store again")


def check_metadata(listing: Listing, attributes: Mapping[str, Any], location: str) -> None:
    """Refuse a layer whose arrays' metadata is not what its writer recorded (``METADATA_ATTR``): edited, gone
    (a lost mask read every position as real) or added; or whose attributes that xarray decodes values by are
    not (``DECODING_ATTR``, where recorded); or whose record is gone where its chunks' or decoding's is not."""
    recorded, decoding = attributes.get(METADATA_ATTR) or {}, attributes.get(DECODING_ATTR) or {}
    # every writer that records a layer's chunks or decoding attributes records its metadata, which came first
    lost = [layer for layer in {**(attributes.get(CHUNKS_ATTR) or {}), **decoding} if layer not in recorded]
    if lost:
        raise OSError(f"{location}: its root metadata (zarr.json) lacks the record of the arrays' metadata of layer "
                      f"{_first_and_more(lost)} ({METADATA_ATTR}), by which an edited dtype, shape, dim order or codec "
                      f"is found: it was edited or damaged; write the store again")
    _check_layers_recorded(listing, attributes, location)
    found, decoded = metadata_digests(listing, list(recorded)), decoded_by(listing, list(decoding))
    for layer, digests in recorded.items():
        now = found[layer]
        if not now:
            continue  # the layer's folder is gone whole: check_store_files names the layer
        for array in sorted(set(digests) | set(now)):
            if array == VARIABLE and array not in now:
                continue  # a layer without its activations' metadata is named by check_store_files
            if digests.get(array) != now.get(array):
                how = ("is missing" if array not in now else "was added since" if array not in digests else
                       "is not what chunkcca wrote (its dtype, shape, dims, chunks or codecs were edited, or the "
                       "array replaced)")
                raise OSError(f"{location}: the metadata of array {array!r} of layer {layer!r} {how}: read as it "
                              f"is it would give other numbers; the store is damaged: write it again")
    for layer, written in decoding.items():
        for array in sorted(set(written) & set(decoded[layer])):
            if written[array] != decoded[layer][array]:
                edited = sorted(key for key in {*written[array], *decoded[layer][array]}
                                if written[array].get(key) != decoded[layer][array].get(key))
                raise OSError(f"{location}: the attribute{'s' if len(edited) > 1 else ''} {', '.join(edited)} of "
                              f"array {array!r} of layer {layer!r}, by which xarray decodes its values, "
                              f"{'are' if len(edited) > 1 else 'is'} not what chunkcca wrote: read as it is it "
                              f"would give other numbers; if you did not edit it, the store is damaged: write it "
                              f"again")
    _check_datapoint_kinds(listing, attributes, location)


def lost_chunks(metadata: dict[str, Any], present: set[str]) -> dict[tuple[int, ...], str]:
    """The chunk files of one zarr array (its ``metadata``) not among the files ``present``, by grid index."""
    return {index: key for index, key in chunk_keys(metadata).items() if key not in present}


def _datapoint_span(metadata: dict[str, Any], index: tuple[int, ...]) -> tuple[int, int]:
    """The first and last index along its first dim (datapoint, for a layer's arrays and most labels) of the chunk
    at grid ``index`` of a zarr array (its ``metadata``)."""
    per_chunk, total = metadata["chunk_grid"]["configuration"]["chunk_shape"][0], metadata["shape"][0]
    return index[0] * per_chunk, min((index[0] + 1) * per_chunk, total) - 1


def _chunk_datapoints(metadata: dict[str, Any], index: tuple[int, ...]) -> str:
    """The chunk at grid ``index`` of a zarr array (its ``metadata``) in words: the span of its first dim."""
    if not metadata["shape"]:
        return "its one chunk"
    first, last = _datapoint_span(metadata, index)
    dim = (metadata.get("dimension_names") or ["datapoint"])[0]
    return f"{dim}s {first} to {last}" if dim == "datapoint" else f"{dim} {first} to {last}"


def check_chunks(metadata: dict[str, Any], present: set[str], what: str, store: str) -> None:
    """Every chunk file of one zarr array (its ``metadata``; ``present`` the names of its files) is there, or an
    OSError naming ``what`` it holds and, along datapoint, which datapoints are lost."""
    missing = list(lost_chunks(metadata, present))
    if not missing:
        return
    many = "s" if len(missing) > 1 else ""
    if (metadata.get("dimension_names") or [None])[0] == "datapoint":
        spans = sorted({_datapoint_span(metadata, index) for index in missing})
        where = ", of datapoints " + ", ".join(f"{first} to {last}" for first, last in spans[:5])
        where += " …" if len(spans) > 5 else ""
    else:
        where = f" ({', '.join(map(str, missing[:5]))}{' …' if len(missing) > 5 else ''})"
    raise OSError(f"{what} of {store} lacks {len(missing)} chunk file{many}{where}: {LOST_CHUNKS}")


def check_store_files(location: str, listing: Listing, listed: Sequence[str], found: Sequence[str]) -> None:
    """At open: every layer the store lists (``listed``, its root's order) is among those ``found``, and every array
    in it (layers, masks, labels) has each of its chunk files (``listing``); else an OSError naming what is
    missing. No data is read."""
    lost = [layer for layer in listed if layer not in found]
    if lost:
        why = "; ".join(_why_lost(listing, layer) for layer in lost)
        raise OSError(f"{location} lists layer{'s' if len(lost) > 1 else ''} {', '.join(map(repr, lost))} but holds "
                      f"no readable {VARIABLE!r} for {'them' if len(lost) > 1 else 'it'} ({why}): "
                      f"the store is damaged; write {'them' if len(lost) > 1 else 'it'} again")
    arrays = listing.arrays
    present: dict[str, set[str]] = {folder: set() for folder in arrays}
    for file in listing.files:  # each file to the array holding it: the nearest folder up that is one
        folder = file
        while folder != ".":
            folder = folder.rpartition("/")[0] or "."  # PurePosixPath's parents, cheaper for 50,000 chunk files
            if folder in present:
                present[folder].add(file.removeprefix(f"{folder}/"))
                break
    for folder, metadata in arrays.items():
        node, _, variable = folder.rpartition("/")
        layer = layer_name(node)
        what = (f"layer {layer!r}" if variable == VARIABLE else f"layer {layer!r}'s {variable}" if variable == MASK
                else f"the labels {variable!r} of {node or 'the store'!r}")
        check_chunks(metadata, present[folder], what, location)


def checksummed(metadata: dict[str, Any]) -> bool:
    """Whether a zarr v3 array's chunks (its ``metadata``; a shard's inner chunks) carry a CRC32C checksum, as
    chunkcca writes them: without one a chunk damaged on disk (cut short, a bit flipped) may decode to other values,
    which no reader can tell."""
    codecs = metadata.get("codecs") or []
    if codecs and codecs[0].get("name") == "sharding_indexed":
        codecs = codecs[0].get("configuration", {}).get("codecs") or []
    return any(codec.get("name") == "crc32c" for codec in codecs)


#: A shard index entry (offset, size) of an inner chunk the shard does not hold (zarr's sharding codec, v3 spec).
EMPTY_INNER_CHUNK = 2**64 - 1


def check_shards(fs: Any, root: str, listing: Listing, location: str) -> None:
    """At open: every inner chunk of each shard of a sharded array (zarr's ``sharding_indexed`` codec) that holds
    part of the array is in its shard's index, or an OSError naming the array and datapoints (zarr reads an inner
    chunk its shard does not hold as the fill value, silently: a shard's file is there while a chunk of it is not).
    Reads each shard's index (16 bytes an inner chunk), no data: all in one batch (a round trip each took 21 s for
    2000 shards of a remote store)."""
    shards = []  # (what, metadata, inner chunk shape, inner chunks per shard, index dtype, grid index, key)
    paths, starts, ends = [], [], []  # of each shard's index, without its checksum
    for folder, metadata in listing.arrays.items():
        codecs = metadata.get("codecs") or [{}]
        if codecs[0].get("name") != "sharding_indexed":
            continue
        config = codecs[0].get("configuration", {})
        node, _, variable = folder.rpartition("/")
        what = f"layer {layer_name(node)!r}" if variable == VARIABLE else f"{variable!r} of {node or 'the store'!r}"
        names = [codec.get("name") for codec in config.get("index_codecs", [])]
        endian = config.get("index_codecs", [{}])[0].get("configuration", {}).get("endian", "little")
        if names not in (["bytes"], ["bytes", "crc32c"]):
            raise OSError(f"{what} of {location} is sharded with its shard index encoded by {names}, which chunkcca "
                          f"cannot read to check that no chunk is lost: write it again without shards or with "
                          f"zarr's default index")
        inner, outer = config["chunk_shape"], metadata["chunk_grid"]["configuration"]["chunk_shape"]
        per_shard = [size // chunk for size, chunk in zip(outer, inner)]
        entries = 2 * int(np.prod(per_shard, dtype=np.int64))
        index_bytes = 8 * entries + 4 * (names[-1] == "crc32c")
        sizes = listing.sizes(folder)
        for shard, key in chunk_keys(metadata).items():
            if key not in sizes:  # a whole shard lost: check_store_files said so
                continue
            if sizes[key] < index_bytes:
                raise OSError(f"{what} of {location}: its shard {key!r} is {sizes[key]} bytes, shorter than its "
                              f"index ({index_bytes} bytes): the store is damaged; write it again")
            start = 0 if config.get("index_location", "end") == "start" else sizes[key] - index_bytes
            shards.append((what, metadata, inner, per_shard, np.dtype("<u8" if endian == "little" else ">u8"), shard,
                           key))
            paths.append(f"{root}/{folder}/{key}")
            starts.append(start)
            ends.append(start + 8 * entries)
    indexes = fs.cat_ranges(paths, starts, ends) if paths else []
    for (what, metadata, inner, per_shard, dtype, shard, key), path, start, end, raw in zip(
            shards, paths, starts, ends, indexes, strict=True):
        if isinstance(raw, BaseException) or len(raw) != end - start:  # fsspec gives an error in its place
            why = repr(raw) if isinstance(raw, BaseException) else f"{len(raw)} of its {end - start} bytes read"
            raise OSError(f"{what} of {location}: the index of its shard {path} cannot be read ({why}); "
                          f"{LOST_CHUNKS}")
        entries = np.frombuffer(raw, dtype=dtype).reshape((*per_shard, 2))
        first = [count * at for count, at in zip(per_shard, shard)]  # the shard's first inner chunk, by dim
        held = [index for index in np.argwhere(entries[..., 0] == EMPTY_INNER_CHUNK)  # inner chunks of the array,
                if all((chunk + local) * length < total  # not of the shard's overhang past its end
                       for chunk, local, length, total in zip(first, index, inner, metadata["shape"]))]
        if held:
            span = [(first[0] + int(index[0])) * inner[0] for index in held]
            dim = (metadata.get("dimension_names") or ["datapoint"])[0]
            raise OSError(f"{what} of {location} lacks {len(held)} chunk{'s' if len(held) > 1 else ''} in its "
                          f"shard {key!r}, of {dim}s from {min(span)} to "
                          f"{min(max(span) + inner[0], metadata['shape'][0]) - 1}: {LOST_CHUNKS}")


def _why_lost(listing: Listing, layer: str) -> str:
    """What is gone of a layer the store lists but xarray finds no activations for: its folder, its activations'
    folder, or their metadata (``zarr.json``)."""
    for folder in (layer, f"{layer}/{VARIABLE}"):
        if not any(name.startswith(f"{folder}/") for name in listing.files):
            return f"the folder {folder!r} is gone"
    return f"the metadata of {layer}/{VARIABLE} is missing"


def chunk_checksums(fs: Any, folder: str, metadata: dict[str, Any], sizes: Mapping[str, int]) -> np.ndarray | None:
    """The CRC32C of each chunk file of the zarr array in ``folder`` (its ``metadata``; ``sizes``: each chunk
    file's size, by its name there), in chunk order, as ``CHUNKS_ATTR`` records them: one small read per chunk
    file. None when its chunks carry none (its last codec) to tell them apart by."""
    return arrays_chunk_checksums(fs, [(folder, metadata, sizes)])[0]


def arrays_chunk_checksums(fs: Any, arrays: Sequence[tuple[str, dict[str, Any], Mapping[str, int]]]
                           ) -> list[np.ndarray | None]:
    """``chunk_checksums`` of each of ``arrays`` (folder, metadata, sizes), from one batched read of them all."""
    files: list[list[str] | None] = []
    for folder, metadata, _ in arrays:
        carried = (metadata.get("codecs") or [{}])[-1].get("name") == "crc32c"
        files.append([f"{folder}/{key}" for key in chunk_keys(metadata).values()] if carried else None)
    paths = [path for each in files if each for path in each]
    ends = [sizes[path.removeprefix(f"{folder}/")] for (folder, _, sizes), each in zip(arrays, files) if each
            for path in each]
    read = fs.cat_ranges(paths, [max(end - 4, 0) for end in ends], ends) if paths else []
    for path, tail in zip(paths, read):  # fsspec gives an error in its place (a link to nothing among the chunk
        if isinstance(tail, BaseException):  # files), which failed in .rjust below
            raise OSError(f"chunk file {path} cannot be read ({tail!r}); {LOST_CHUNKS}")
    tails = iter(read)
    # a file cut to fewer than 4 bytes, padded, almost surely differs from what was recorded: it is then read and
    # fails its own checksum (``check_places``)
    return [None if each is None else np.frombuffer(b"".join(next(tails).rjust(4, b"\0") for _ in each),
                                                    dtype="<u4") for each in files]


def chunk_reader(fs: Any, folder: str, metadata: dict[str, Any]) -> Callable[[int], bytes]:
    """Reads the bytes of the chunk file of the zarr array in ``folder`` (its ``metadata``) at a place in chunk
    order (as ``chunk_checksums`` gives them)."""
    keys = list(chunk_keys(metadata).values())
    return lambda index: fs.cat(f"{folder}/{keys[index]}")


def _fails_own_checksum(data: bytes) -> bool:
    """Whether a chunk file's bytes fail the CRC32C that zarr's crc32c codec appends to them (their last 4 bytes)."""
    return len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little")


def check_places(checksums: np.ndarray, recorded: str, metadata: dict[str, Any], what: str, store: str,
                 read: Callable[[int], bytes]) -> None:
    """An OSError naming ``what`` and the chunks whose file now holds another chunk's checksum as written
    (``recorded``, ``CHUNKS_ATTR``): moved or swapped, read as other datapoints' values. Within one array: a chunk
    edited in place to equal bytes another chunk held is refused too; one copied in from another array passes.
    Of the other chunk files edited, the first ``CHECKED_EDITS`` are read (``read``: a chunk file's bytes, by its
    place in ``checksums``): one failing its own checksum is an OSError (damage), else the edits are warned of."""
    written = np.frombuffer(base64.b64decode(recorded), dtype="<u4")
    if written.shape != checksums.shape:
        return  # another grid: the metadata check names it
    edited = np.flatnonzero(checksums != written)
    if not edited.size:
        return
    moved = edited[np.isin(checksums[edited], written)]
    grid = list(chunk_keys(metadata))  # each chunk's grid index, in the order of the checksums

    def datapoints(index: int) -> str:
        return _chunk_datapoints(metadata, grid[index])

    if not moved.size:
        for index in edited[:CHECKED_EDITS].tolist():
            if _fails_own_checksum(read(index)):
                raise OSError(f"{what} of {store}: the chunk file of {datapoints(index)} fails its CRC32C checksum "
                              f"(its bytes changed since they were written: cut short or overwritten): the store is "
                              f"damaged; write it again")
        warnings.warn(f"{what} of {store}: {edited.size} chunk file{'s hold' if edited.size > 1 else ' holds'} other "
                      f"bytes than chunkcca wrote (the first, of {datapoints(int(edited[0]))}): edited since (with "
                      f"zarr, in place) or copied from another store; if you did not edit {what}, the store is "
                      f"damaged: write it again", RuntimeWarning, stacklevel=user_stacklevel())
        return

    origin = int(np.flatnonzero(written == checksums[moved[0]])[0])
    raise OSError(f"{what} of {store}: the chunk file of {datapoints(int(moved[0]))} holds the bytes written for "
                  f"{datapoints(origin)} ({moved.size} chunk file{'s' if moved.size > 1 else ''} moved to another "
                  f"chunk's place, each passing its own checksum, or edited to equal another): read, they would give "
                  f"other datapoints' values; the store is damaged: write it again")


@dataclass(frozen=True)
class ChunkPlaces:
    """Each chunk file's CRC32C as written (``CHUNKS_ATTR``) of one zarr array, by which a chunk file is checked as
    it is read: one copied over another after the checks before reading (a ``cp`` or ``rsync`` into a store in
    use) passes its own checksum and would be read as other datapoints' values."""

    metadata: dict[str, Any]  # the array's zarr.json: its grid and chunk key encoding
    written: bytes  # each chunk's CRC32C as written, little-endian uint32, in chunk order

    def check(self, key: str, tail: bytes, where: str) -> bool:
        """An OSError naming ``where`` (the file read) when the chunk file of ``key`` (within the array) ends in
        ``tail`` (its last 4 bytes, its CRC32C) of another chunk's bytes as written, not of its own. False where
        that checksum was written for no chunk of the array (an edit in place, which ``check_places`` warns of, or
        another array's chunk: ``written_for`` of the store's other arrays tells), else True."""
        place = chunk_place(self.metadata, key)
        if (place is None or len(tail) != 4 or 4 * place + 4 > len(self.written)  # cut short: zarr's check fails it
                or self.written[4 * place : 4 * place + 4] == tail):
            return True
        theirs = self.written_for(tail)
        if theirs is None:
            return False
        own = list(chunk_keys(self.metadata))[place]  # its grid index
        raise OSError(f"chunk file {where} holds the bytes written for {theirs}, not those of "
                      f"{_chunk_datapoints(self.metadata, own)} (copied or moved over it since the store was "
                      f"written): read, they would give other datapoints' values; the store is damaged: write it "
                      f"again")

    def written_for(self, tail: bytes) -> str | None:
        """The chunk of the array whose bytes as written end in ``tail`` (its CRC32C), in words (its datapoints),
        or None."""
        origin = np.flatnonzero(np.frombuffer(self.written, dtype="<u4") == int.from_bytes(tail, "little"))
        if not origin.size:
            return None
        return _chunk_datapoints(self.metadata, list(chunk_keys(self.metadata))[int(origin[0])])


def check_label_places(fs: Any, root: str, listing: Listing, recorded: Mapping[str, Mapping[str, str]],
                       location: str) -> None:
    """At open, before the store's labels are used: no label chunk file of a layer holds another's bytes as
    written (``recorded``: ``CHUNKS_ATTR``; activations and masks are checked before each read,
    ``check_complete``); a swapped datapoint label chunk would pair other datapoints' rows."""
    labels = [(layer, variable, written) for layer, variables in recorded.items()
              for variable, written in variables.items()
              if variable not in (VARIABLE, MASK) and f"{layer}/{variable}" in listing.arrays]
    found = arrays_chunk_checksums(fs, [(f"{root}/{layer}/{variable}", listing.arrays[f"{layer}/{variable}"],
                                         listing.sizes(f"{layer}/{variable}")) for layer, variable, _ in labels])
    for (layer, variable, written), checksums in zip(labels, found):
        if checksums is not None:
            folder, metadata = f"{root}/{layer}/{variable}", listing.arrays[f"{layer}/{variable}"]
            check_places(checksums, written, metadata, f"the labels {variable!r} of layer {layer!r}", location,
                         chunk_reader(fs, folder, metadata))
