"""Nothing silently wrong in a store: missing and corrupted chunks, overwrites of what is not a store, concurrent
readers and writers, unsafe layer paths, leftovers of killed writes (docs/reliability.md lists each guarantee)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import chunkcca
from chunkcca import cca, open_activations, write_activations
from chunkcca import store as chunkcca_store
from chunkcca._fs import leftovers, owner_record
from chunkcca.cli import main


def _store(tmp_path: Path, dtype: str = "int16", compression: str | None = "lz4") -> Path:
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((400, 3))
    layers = {"a": (latent @ rng.standard_normal((3, 4)) * 100).astype(dtype),
              "b": (latent @ rng.standard_normal((3, 3)) * 100 + rng.standard_normal((400, 3)) * 50).astype(dtype)}
    write_activations(tmp_path / "s.zarr", layers, chunks=50, compression=compression)
    return tmp_path / "s.zarr"


def _contents(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) and its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(file.relative_to(path.parent)): file.read_bytes() for file in files}


def test_a_missing_chunk_is_an_error_naming_the_layer_and_datapoints(tmp_path):
    """zarr reads a missing chunk as the fill value: rho_mean moved from 0.70 to 0.66 with no error before."""
    store = _store(tmp_path)
    tree = open_activations(store)
    os.remove(store / "b" / "activations" / "c" / "3" / "0")
    damaged = r"layer 'b' of .*s.zarr lacks 1 chunk file, of datapoints 150 to 199: the store is damaged"
    with pytest.raises(OSError, match=damaged):  # lost after it was opened
        cca(tree["a"], tree["b"])
    with pytest.raises(OSError, match=damaged):  # lost before: opening it says so
        open_activations(store)
    assert main(["compare", str(store), "a", "b", "--no-progress"]) == 2
    with pytest.raises(FileNotFoundError, match=r"chunk file b/activations/c/3/0 of .*s.zarr is missing where it was "
                                                r"read.*never reads it as a fill value"):
        tree["b"]["activations"].values  # read past chunkcca's checks, zarr gave NaN  # noqa: B018


def test_a_chunk_missing_from_its_shard_is_an_error_naming_the_layer_and_datapoints(tmp_path):
    """A sharded layer (zarr's sharding codec) whose shard file is there but holds no entry for some of its inner
    chunks (never written, or left out as equal to the fill value) was read with those datapoints as 0: ρ̄ 0.557 for
    0.616, silently (found by audit). A complete sharded layer, its last shard past the array's end, reads as
    written."""
    import zarr

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((430, 3))
    a = (latent @ rng.standard_normal((3, 8)) + rng.standard_normal((430, 8))).astype("float32")
    b = (latent @ rng.standard_normal((3, 6)) + rng.standard_normal((430, 6))).astype("float32")

    def sharded(path: Path, written: list[slice]) -> Path:
        root = zarr.open_group(path, mode="w", zarr_format=3)
        array = root.create_group("a").create_array("activations", shape=a.shape, dtype="float32", chunks=(50, 8),
                                                    shards=(200, 8), fill_value=0.0,
                                                    dimension_names=("datapoint", "channel"))
        for span in written:
            array[span] = a[span]
        root.create_group("b").create_array("activations", data=b, chunks=(100, 6),
                                            dimension_names=("datapoint", "channel"))
        return path

    whole = open_activations(sharded(tmp_path / "whole.zarr", [slice(None)]))
    np.testing.assert_array_equal(whole["a"]["activations"].values, a)
    assert float(cca(whole["a"], whole["b"], precision="float64")["rho_mean"]) == pytest.approx(
        float(cca(a, b, precision="float64")["rho_mean"]), abs=1e-12)
    partial = sharded(tmp_path / "partial.zarr", [slice(0, 100), slice(200, None)])
    with pytest.raises(OSError, match=r"^layer 'a' of .*partial\.zarr lacks 2 chunks in its shard 'c/0/0', of "
                                      r"datapoints from 100 to 199: the store is damaged"):
        open_activations(partial)
    assert main(["compare", str(partial), "a", "b", "--no-progress"]) == 2
    # a shard index in big-endian integers, with its checksum and at the shard's start: read as such
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    root = zarr.open_group(tmp_path / "big.zarr", mode="w", zarr_format=3)
    for index_location in ("start", "end"):
        array = root.create_group(index_location).create_array(
            "activations", shape=a.shape, dtype="float32", chunks=(200, 8), compressors=None, fill_value=0.0,
            serializer=ShardingCodec(chunk_shape=(50, 8), codecs=[BytesCodec()], index_location=index_location,
                                     index_codecs=[BytesCodec(endian="big"), Crc32cCodec()]),
            dimension_names=("datapoint", "channel"))
        array[:100] = a[:100]
        array[200:] = a[200:]
    with pytest.raises(OSError, match=r"^layer 'end' of .*big\.zarr lacks 2 chunks in its shard 'c/0/0', of "
                                      r"datapoints from 100 to 199"):
        open_activations(tmp_path / "big.zarr")
    shutil.rmtree(tmp_path / "big.zarr" / "end")
    with pytest.raises(OSError, match=r"^layer 'start' of .*big\.zarr lacks 2 chunks in its shard 'c/0/0'"):
        open_activations(tmp_path / "big.zarr")
    from fsspec.implementations.local import LocalFileSystem

    def failing(self, paths, starts, ends, **kwargs):  # fsspec puts a read's error in its place: it failed in numpy
        return [OSError(5, "I/O error") for _ in paths]  # as "a bytes-like object is required, not 'OSError'"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalFileSystem, "cat_ranges", failing)
        with pytest.raises(OSError, match=r"^layer 'a' of .*whole\.zarr: the index of its shard .*c/0/0 cannot be "
                                          r"read \(OSError\(5, 'I/O error'\)\); the store is damaged"):
            open_activations(tmp_path / "whole.zarr")
    shard = tmp_path / "whole.zarr" / "a" / "activations" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:40])  # shorter than its index of 4 chunks (68 bytes)
    with pytest.raises(OSError, match=r"^layer 'a' of .*whole\.zarr: its shard 'c/0/0' is 40 bytes, shorter than its "
                                      r"index \(68 bytes\): the store is damaged"):
        open_activations(tmp_path / "whole.zarr")


def test_info_names_the_layers_stored_without_checksums(tmp_path, capsys):
    """A store written by xarray or zarr with their defaults carries no checksums: a Blosc chunk cut short by 7
    bytes read as other values (ρ̄ 0.6123 for 0.6157) and info said nothing (found by audit). No reader can find
    that damage; info says which layers are exposed to it."""
    rng = np.random.default_rng(0)
    dims = ("datapoint", "channel")
    xr.Dataset({"activations": (dims, rng.standard_normal((40, 3)))}).to_zarr(
        tmp_path / "x.zarr", group="plain", zarr_format=3, consolidated=False)
    write_activations(tmp_path / "x.zarr", {"ours": rng.standard_normal((40, 2))}, mode="a")
    rows = {row["layer"]: row["checksummed"] for row in chunkcca.describe_store(tmp_path / "x.zarr")}
    assert rows == {"ours": True, "plain": False}
    # a store of one layer at its root, on fsspec's memory filesystem ("root.zarr///activations" was no path there)
    xr.Dataset({"activations": (dims, rng.standard_normal((40, 3)))}).to_zarr("memory://root.zarr", zarr_format=3,
                                                                             consolidated=False)
    try:
        assert [row["checksummed"] for row in chunkcca.describe_store("memory://root.zarr")] == [False]
    finally:
        import fsspec

        fsspec.filesystem("memory").rm("/root.zarr", recursive=True)
    assert main(["info", str(tmp_path / "x.zarr")]) == 0
    assert "stored without checksums (written by another tool: a chunk damaged on disk, cut short or a bit flipped, " \
           "may read as other values; write them with chunkcca to checksum them): plain\n" in capsys.readouterr().out


@pytest.mark.cluster
def test_a_worker_that_cannot_see_the_store_is_an_error_not_fill_values(tmp_path):
    """A store in the client's memory filesystem, which a worker process does not hold (as another machine's disk
    would be): the worker read every chunk as NaN, an error that advised nan_policy='omit', which then dropped
    them all; an int16 store's 0 gave a wrong number silently."""
    import fsspec
    from distributed import Client, LocalCluster

    store = _store(tmp_path, dtype="int16")
    memory = fsspec.filesystem("memory")
    for file in store.rglob("*"):
        if file.is_file():
            memory.pipe(f"/worker-blind/{file.relative_to(store)}", file.read_bytes())
    try:
        tree = open_activations("memory://worker-blind")
        local = float(cca(tree["a"], tree["b"], precision="float64")["rho_mean"])
        assert local == pytest.approx(float(cca(open_activations(store)["a"], open_activations(store)["b"],
                                                precision="float64")["rho_mean"]), abs=1e-12)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            with pytest.raises(OSError, match=r"chunk file [ab]/activations/c/\d+/0 of memory://worker-blind is "
                                              r"missing where it was read: by a Dask worker that cannot see the "
                                              r"store's files"):
                cca(tree["a"], tree["b"], precision="float64", scheduler=client)
    finally:  # the memory filesystem lives as long as the test process
        memory.rm("/worker-blind", recursive=True)


def _put_in_memory(files: dict[str, bytes], root: str) -> None:
    """Files (relative path → bytes) into this process's fsspec memory filesystem under ``root``."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for name, data in files.items():
        memory.pipe(f"{root}/{name}", data)


@pytest.mark.cluster
def test_a_worker_that_sees_another_copy_of_the_store_is_an_error_not_a_mix(tmp_path):
    """A worker seeing another copy of the store at the same location (a stale local copy, an NFS cache of a
    store rewritten since) read its chunks, which pass their own checksums: mean ρ 0.623 for 0.479, CKA 0.350
    for 0.470, silently. Each process reading through a store's wrapper checks first that it sees the store
    opened (its generation), so the run is an error naming the location; a worker seeing the same store reads."""
    import fsspec
    from distributed import Client, LocalCluster

    def files(store: Path) -> dict[str, bytes]:
        return {str(file.relative_to(store)): file.read_bytes() for file in store.rglob("*") if file.is_file()}

    opened = _store(tmp_path / "opened")
    rng = np.random.default_rng(5)
    write_activations(tmp_path / "other.zarr", {"a": rng.standard_normal((400, 4)).astype("int16"),
                                                "b": rng.standard_normal((400, 3)).astype("int16")}, chunks=50)
    _put_in_memory(files(opened), "/two-copies")
    try:
        tree = open_activations("memory://two-copies")
        want = float(cca(tree["a"], tree["b"], precision="float64")["rho_mean"])
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.run(_put_in_memory, files(opened), "/two-copies")  # the worker's copy: the same store
            assert float(cca(tree["a"], tree["b"], precision="float64", scheduler=client)["rho_mean"]) == \
                pytest.approx(want, abs=1e-12)
            client.restart()  # a fresh worker, whose copy is another store (written at another time)
            client.run(_put_in_memory, files(tmp_path / "other.zarr"), "/two-copies")
            with pytest.raises(OSError, match=r"memory://two-copies as this process reads it is another store than "
                                              r"the one opened .* a Dask worker sees another copy at this path"):
                cca(tree["a"], tree["b"], precision="float64", scheduler=client)
    finally:  # the memory filesystem lives as long as the test process
        fsspec.filesystem("memory").rm("/two-copies", recursive=True)


def test_chunk_files_that_workers_wrote_elsewhere_are_named_and_no_store_is_left(tmp_path, monkeypatch):
    """Dask workers that see another filesystem at the store's path write its chunks there: the write failed
    with a bare KeyError 'c/5/0'. It names the layer, a chunk and the cause; no store is left (here a chunk file
    is taken away before the root is recorded, as a worker's would never arrive)."""
    import chunkcca.store as store_module

    record = store_module._set_root_attrs

    def elsewhere(store: Path, *args, **kwargs) -> None:
        (store / "b" / "activations" / "c" / "5" / "0").unlink()
        record(store, *args, **kwargs)

    monkeypatch.setattr(store_module, "_set_root_attrs", elsewhere)
    with pytest.raises(OSError, match=r"layer 'b': 1 of its chunk files are not where they were written \(e.g. "
                                      r"c/5/0\): the Dask workers that wrote them see another filesystem"):
        _store(tmp_path)
    assert not (tmp_path / "s.zarr").exists() and not leftovers(tmp_path / "s.zarr")


def test_a_layer_computed_from_a_store_with_a_missing_chunk_is_an_error(tmp_path):
    """``astype``, arithmetic and ``.data`` drop the store from the encoding: an int16 layer missing a chunk gave
    rho_mean 0.64 against 0.68 (zarr's fill value, 0), and a float one suggested nan_policy='omit', which then
    dropped the lost rows."""
    store = _store(tmp_path)
    tree = open_activations(store)
    os.remove(store / "b" / "activations" / "c" / "3" / "0")
    layer = tree["b"]["activations"]
    import dask
    import dask.array as da
    import zarr

    from_zarr = da.from_zarr(zarr.open_array(store / "b" / "activations", mode="r"))  # read as fill values too
    # the array held inside each task, not under an "original-" name, was not found: read as fill values
    inline = da.from_zarr(zarr.open_array(store / "b" / "activations", mode="r"), inline_array=True)
    for derived in (layer.astype("float32"), layer * 2.0, layer.data, from_zarr, from_zarr.astype("float32"), inline,
                    dask.optimize(from_zarr * 1.0)[0]):
        with pytest.raises(OSError, match=r"layer '\w+' reads .*s.zarr/b/activations, which lacks 1 of its 8 "
                                          r"chunk files: the store is damaged"):
            cca(tree["a"], derived, nan_policy="omit")


@pytest.mark.filterwarnings("ignore:Object at activations is not recognized:UserWarning")  # zarr, of the lost file
def test_a_store_missing_labels_or_a_layers_metadata_does_not_open(tmp_path, capsys):
    """A lost label chunk read as zeros (every channel label 0; a groupby of one group), and a lost layer
    metadata file dropped the layer from ``info`` and sweeps though the store still listed it (and zarr's warning
    "Object at b is not recognized as a component of a Zarr hierarchy" came beside the error: a second line of
    the command's)."""
    store = _store(tmp_path)
    os.remove(store / "b" / "channel" / "c" / "0")
    with pytest.raises(OSError, match=r"the labels 'channel' of 'b' of .*s.zarr lacks 1 chunk file \(\(0,\)\): "
                                      r"the store is damaged"):
        open_activations(store)
    store = _store(tmp_path / "again")
    os.remove(store / "b" / "activations" / "zarr.json")
    with pytest.raises(OSError, match=r"lists layer 'b' but holds no readable 'activations' for it"):
        open_activations(store)
    assert main(["info", str(store)]) == 2
    store = _store(tmp_path / "group")
    os.remove(store / "b" / "zarr.json")  # the layer's group
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(OSError, match=r"lists layer 'b' but holds no readable 'activations' for it"):
            open_activations(store)
    assert [str(warning.message) for warning in said] == []
    capsys.readouterr()
    assert main(["info", str(store)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # a layer's folder or its activations' folder gone: named (it was "the metadata of array 'channel' of layer
    # 'a' is missing", or, in a one-layer store, "holds no layer (no node with a variable 'activations')")
    x = np.ones((20, 3))
    for layers, lost, gone in (({"a": x, "b": x}, "a", "a"), ({"a": x}, "a", "a"), ({"a": x}, "a/activations",
                                                                                   "a/activations")):
        store = tmp_path / f"{len(layers)}-{lost.replace('/', '-')}.zarr"
        write_activations(store, layers)
        shutil.rmtree(store / lost)
        with pytest.raises(OSError, match=rf"lists layer 'a' but holds no readable 'activations' for it \(the "
                                          rf"folder '{gone}' is gone\): the store is damaged; write it again$"):
            open_activations(store)
    with pytest.raises(OSError, match=r"\(the metadata of b/activations is missing\)"):
        open_activations(tmp_path / "again" / "s.zarr")


def test_every_chunk_is_written_even_one_of_zeros(tmp_path):
    """So that a missing file is always damage: zarr leaves out chunks equal to the fill value by default."""
    zeros = np.zeros((100, 3), dtype="int16")
    zeros[50:] = np.arange(150).reshape(50, 3)
    tree = write_activations(tmp_path / "s.zarr", {"a": zeros, "b": zeros + 1}, chunks=50)
    assert (tmp_path / "s.zarr" / "a" / "activations" / "c" / "0" / "0").exists()
    assert float(cca(tree["a"], tree["b"])["rho"][0]) == pytest.approx(1.0)


@pytest.mark.parametrize("compression", ["lz4", None])
def test_a_flipped_bit_is_an_error_not_a_number(tmp_path, compression):
    """Before checksums, 28 of 60 single-bit flips in an LZ4 chunk (and one overwritten value of an uncompressed
    store) changed the result silently."""
    store = _store(tmp_path, dtype="float32", compression=compression)
    tree = open_activations(store)
    want = float(cca(tree["a"], tree["b"])["rho_mean"])
    chunk = store / "b" / "activations" / "c" / "2" / "0"
    original = chunk.read_bytes()
    for position in np.random.default_rng(1).choice(len(original) - 4, 20, replace=False):
        damaged = bytearray(original)
        damaged[position] ^= 1 << int(position % 8)
        chunk.write_bytes(bytes(damaged))
        # the array and datapoints at fault are named (it named both layers alone)
        with pytest.raises(OSError, match=r"failed \(array 'b/activations', datapoints 100 to 149\): its chunk file "
                                          r"fails its CRC32C checksum \(its bytes changed since they were written\): "
                                          r"the store is damaged; write it again$"):
            cca(open_activations(store)["a"], open_activations(store)["b"])
    chunk.write_bytes(original)
    assert float(cca(tree["a"], tree["b"])["rho_mean"]) == want


@pytest.mark.parametrize("damage", ["cut short", "cut to 3 bytes", "emptied", "overwritten"])
def test_a_chunk_file_cut_short_or_overwritten_is_one_error_before_reading(tmp_path, damage, capsys):
    """A chunk file cut short (truncate) or overwritten with other bytes was warned of as an edit ("edited since
    (with zarr, in place)"), then zarr's checksum failed mid-run: two lines for one damage. The chunk files
    holding other bytes than written are checked against their own CRC32C before reading: damage is the one
    error, naming the datapoints (an edit with zarr, a valid chunk, is still only warned of:
    test_a_chunk_copied_from_another_store_is_warned_of). A file of fewer than 4 bytes turned the checks of its
    whole array off: two other chunk files swapped beside it were read as each other's datapoints."""
    store = _store(tmp_path, dtype="float32")
    chunk = store / "b" / "activations" / "c" / "2" / "0"
    original = chunk.read_bytes()
    cut = {"cut short": 20, "cut to 3 bytes": 3, "emptied": 0}
    chunk.write_bytes(original[: cut[damage]] if damage in cut else np.random.default_rng(0).bytes(len(original)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of an edit first
        with pytest.raises(OSError, match=r"layer 'b' of .*s\.zarr: the chunk file of datapoints 100 to 149 fails "
                                          r"its CRC32C checksum \(its bytes changed since they were written: cut "
                                          r"short or overwritten\): the store is damaged; write it again$"):
            cca(open_activations(store)["a"], open_activations(store)["b"])
    for command in ("compare", "info"):  # info said nothing of it, with status 0
        assert main([command, str(store), *(("a", "b") if command == "compare" else ())]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cut short or overwritten" in err, err
    first, second = (store / "b" / "activations" / "c" / str(index) / "0" for index in (0, 1))
    one, two = first.read_bytes(), second.read_bytes()
    first.write_bytes(two)
    second.write_bytes(one)  # read from datapoints 0 to 99 alone, the damaged chunk is never read
    with pytest.raises(OSError, match=r"holds the bytes written for datapoints 50 to 99"):
        tree = open_activations(store)
        cca(*(tree[name]["activations"].isel(datapoint=slice(0, 100)) for name in "ab"))


def test_a_chunk_file_moved_to_another_chunk_s_place_is_an_error_not_other_datapoints(tmp_path):
    """Two chunk files swapped (each with a valid CRC32C) were read as each other's datapoints: rho_mean 0.42
    against 0.56, silently. The store records each chunk's CRC32C by place (a mask's too), compared before
    reading; a chunk edited in place (a checksum written for no chunk) is left to the user; layers appended get
    theirs; stores written before it read as they did."""
    store = _store(tmp_path, dtype="float32")
    tree = open_activations(store)
    want = float(cca(tree["a"], tree["b"], precision="float64")["rho_mean"])
    chunks = store / "b" / "activations" / "c"
    first, second = (chunks / "1" / "0").read_bytes(), (chunks / "5" / "0").read_bytes()
    (chunks / "1" / "0").write_bytes(second)
    (chunks / "5" / "0").write_bytes(first)
    message = (r"layer 'b' of .*s\.zarr: the chunk file of datapoints 50 to 99 holds the bytes written for datapoints "
               r"250 to 299 \(2 chunk files moved to another chunk's place")
    with pytest.raises(OSError, match=message):
        cca(open_activations(store)["a"], open_activations(store)["b"])
    assert main(["compare", str(store), "a", "b", "--no-progress"]) == 2
    (chunks / "1" / "0").write_bytes(first)
    (chunks / "5" / "0").write_bytes(first)  # a copy over another: one moved
    with pytest.raises(OSError, match=r"datapoints 250 to 299 holds the bytes written for datapoints 50 to 99 \(1 "):
        chunkcca.compute_moments(open_activations(store)["b"], open_activations(store)["a"])
    (chunks / "5" / "0").write_bytes(second[:2])  # cut short: no checksum to place; its own fails, before reading
    with pytest.raises(OSError, match=r"layer 'b' of .*: the chunk file of datapoints 250 to 299 fails its CRC32C"):
        cca(open_activations(store)["a"], open_activations(store)["b"])
    (chunks / "5" / "0").write_bytes(second)
    assert float(cca(open_activations(store)["a"], open_activations(store)["b"],
                     precision="float64")["rho_mean"]) == want
    (chunks / "1" / "0").write_bytes(second)  # swapped again, and the record of layer b's checksums lost from the
    (chunks / "5" / "0").write_bytes(first)  # root (the other records there): refused, not read without the check
    root = json.loads((store / "zarr.json").read_text())
    del root["attributes"]["chunkcca_chunks"]["b"]
    (store / "zarr.json").write_text(json.dumps(root))
    lost = r"s\.zarr: its root metadata \(zarr.json\) lacks the record of the chunk files of layer 'b' \(chunkcca_"
    with pytest.raises(OSError, match=lost):
        open_activations(store)
    del root["attributes"]["chunkcca_chunks"]
    (store / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(OSError, match=r"layer 'a' and 1 more \(chunkcca_chunks\)"):
        open_activations(store)
    del root["attributes"]["chunkcca_metadata"]  # the arrays' metadata's record lost, the decoding attributes'
    (store / "zarr.json").write_text(json.dumps(root))  # kept: an edit (the dims swapped then read silently)
    with pytest.raises(OSError, match=r"s\.zarr: its root metadata \(zarr.json\) lacks the record of the arrays' "
                                      r"metadata of layer 'a' and 1 more \(chunkcca_metadata\)"):
        open_activations(store)  # (found by audit)
    del root["attributes"]["chunkcca_decoding"]  # a store written before any was recorded reads as it did
    (store / "zarr.json").write_text(json.dumps(root))
    swapped = float(cca(open_activations(store)["a"], open_activations(store)["b"], precision="float64")["rho_mean"])
    assert abs(swapped - want) > 0.1, "what the check prevents: other datapoints' values, read silently"
    tokens = np.random.default_rng(2).standard_normal((400, 5, 2)).astype("float32")
    lengths = np.random.default_rng(3).integers(1, 6, (400, 1))
    write_activations(store, {"t": tokens}, mode="a", chunks=50, masks={"t": np.arange(5) < lengths})
    # an append records every layer the store did not (as they are now: a and b too)
    assert set(json.loads((store / "zarr.json").read_text())["attributes"]["chunkcca_chunks"]) == {"a", "b", "t"}
    masks = store / "t" / "mask" / "c"
    first, second = (masks / "0" / "0").read_bytes(), (masks / "7" / "0").read_bytes()
    (masks / "0" / "0").write_bytes(second)
    (masks / "7" / "0").write_bytes(first)
    with pytest.raises(OSError, match=r"layer 't''s mask of .*: the chunk file of datapoints 0 to 49 holds the bytes "
                                      r"written for datapoints 350 to 399"):
        chunkcca.compute_moments(open_activations(store)["t"], open_activations(store)["t"], spatial="avgpool")


def test_a_chunk_file_copied_over_another_while_the_store_is_read_is_an_error_not_other_datapoints(tmp_path,
                                                                                                     monkeypatch):
    """A chunk file copied over another after the checks before reading (a ``cp`` or ``rsync`` into a store in
    use) passes its own checksum, and the store's generation is unchanged: its datapoints were read with the other
    chunk's values, silently (mean ρ 0.2639 for 0.2762 in a cluster audit). Each chunk file's checksum is compared,
    as it is read, with the one written for its place: another chunk's is an error naming both; one written for no
    chunk (an edit in place, as ``check_places`` leaves it) is read."""
    from dask.callbacks import Callback

    store = _store(tmp_path, dtype="float32")
    tree = open_activations(store)
    want = float(cca(tree["a"], tree["b"], precision="float64")["rho_mean"])
    chunks = store / "b" / "activations" / "c"
    second = (chunks / "5" / "0").read_bytes()

    class CopyAsTheRunStarts(Callback):  # after every check before reading, before the first chunk is read
        def __init__(self, source: Path) -> None:
            super().__init__()
            self.source = source

        def _start(self, dsk: object) -> None:
            shutil.copyfile(self.source, chunks / "5" / "0")

    with CopyAsTheRunStarts(chunks / "1" / "0"), \
            pytest.raises(OSError, match=r"reading layers 'a', 'b' from .*s\.zarr failed.*: chunk file "
                                         r"b/activations/c/5/0 of .*s\.zarr holds the bytes written for datapoints 50 "
                                         r"to 99, not those of datapoints 250 to 299"):
        cca(tree["a"], tree["b"], precision="float64")
    (chunks / "5" / "0").write_bytes(second)
    other = tmp_path / "other"  # the same layer written again with other values: its chunk is no chunk's here
    rng = np.random.default_rng(7)
    write_activations(other / "s.zarr", {"a": rng.standard_normal((400, 4)).astype("float32"),
                                         "b": rng.standard_normal((400, 3)).astype("float32")}, chunks=50)
    with CopyAsTheRunStarts(other / "s.zarr" / "b" / "activations" / "c" / "5" / "0"):
        edited = float(cca(tree["a"], tree["b"], precision="float64")["rho_mean"])
    assert abs(edited - want) > 1e-6  # read as it is: an edit, the user's
    (chunks / "5" / "0").write_bytes(second)
    assert float(cca(open_activations(store)["a"], open_activations(store)["b"],
                     precision="float64")["rho_mean"]) == want
    monkeypatch.setattr(chunkcca_store, "OPENINGS_KEPT", 1)  # another opening read since: its records read again
    float(cca(open_activations(store)["a"], open_activations(store)["b"])["rho_mean"])
    shutil.copyfile(chunks / "1" / "0", chunks / "5" / "0")  # before the run, under a layer derived from the store's
    with pytest.raises(OSError, match=r"chunk file b/activations/c/5/0 of .*s\.zarr holds the bytes written for "
                                      r"datapoints 50 to 99"):  # whose chunk files are only counted before reading
        cca(tree["a"], tree["b"]["activations"].astype("float64"), precision="float64")



def test_a_chunk_file_copied_in_from_another_layer_while_the_store_is_read_is_an_error(tmp_path):
    """A chunk file of another layer of the store, of the same shape, copied over one after the checks before
    reading passed zarr's checksum and the check by place (its checksum was written for no chunk of its own
    layer, as an edit's is) and was read as that layer's values, silently (found by review). Its checksum is
    looked for among the store's other arrays' where it is none of its own layer's."""
    from dask.callbacks import Callback

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((400, 3))
    layers = {name: (latent @ rng.standard_normal((3, 3)) + rng.standard_normal((400, 3))).astype("float32")
              for name in ("a", "b", "c")}
    store = tmp_path / "s.zarr"
    write_activations(store, layers, chunks=50)
    tree = open_activations(store)
    chunks = store / "b" / "activations" / "c"
    own = (chunks / "5" / "0").read_bytes()

    class CopyAsTheRunStarts(Callback):  # after every check before reading, before the first chunk is read
        def _start(self, dsk: object) -> None:
            shutil.copyfile(store / "c" / "activations" / "c" / "1" / "0", chunks / "5" / "0")

    with CopyAsTheRunStarts(), pytest.raises(OSError, match=r"chunk file b/activations/c/5/0 of .*s\.zarr holds the "
                                                           r"bytes written for datapoints 50 to 99 of c/activations "
                                                           r"\(copied over it"):
        cca(tree["a"], tree["b"], precision="float64")
    # from a layer appended after the store was opened, whose records the process had not read: read as an edit,
    # silently (0.398 for 0.523 in a cluster audit); the records are read again where a checksum is nobody's
    (chunks / "5" / "0").write_bytes(own)
    tree = open_activations(store)
    want = float(cca(tree["a"], tree["b"], precision="float64")["rho_mean"])
    write_activations(store, {"d": (latent @ rng.standard_normal((3, 3))).astype("float32")}, chunks=50, mode="a")
    assert float(cca(tree["a"], tree["b"], precision="float64")["rho_mean"]) == want  # the append changes nothing
    shutil.copyfile(store / "d" / "activations" / "c" / "2" / "0", chunks / "5" / "0")
    with pytest.raises(OSError, match=r"chunk file b/activations/c/5/0 of .*s\.zarr holds the bytes written for "
                                      r"datapoints 100 to 149 of d/activations"):
        cca(tree["a"], tree["b"], precision="float64")


def test_chunk_records_damaged_after_opening_leave_an_edit_read_as_one(tmp_path):
    """The root's chunk records read again where a chunk's checksum is nobody's (for layers appended since): an
    entry damaged since the store was opened (null) failed the read in Python's words ("'NoneType' object has no
    attribute 'items'"; found by review). Entries of another form are left out, as the checks before reading name
    them; the chunk edited in place is read as an edit."""
    import zarr

    from chunkcca.store import CHUNKS_ATTR

    store = _store(tmp_path, dtype="float32")
    tree = open_activations(store)
    edited = zarr.open_array(store / "b" / "activations", mode="r+")
    edited[0:50] = edited[0:50] * np.float32(1.5)
    want = float(cca(open_activations(store)["a"], open_activations(store)["b"], precision="float64")["rho_mean"])
    metadata = json.loads((store / "zarr.json").read_text())
    metadata["attributes"][CHUNKS_ATTR]["z"] = None
    (store / "zarr.json").write_text(json.dumps(metadata))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the edit, as before reading
        assert float(cca(tree["a"], tree["b"], precision="float64")["rho_mean"]) == want


@pytest.mark.cluster
def test_a_chunk_file_copied_over_another_is_found_as_a_worker_reads_it(tmp_path):
    """The records are read in each worker process (not carried in the tasks, where every layer's node held the
    whole store's: a 16-layer sweep's graph grew 18%, found by audit): a layer derived from a store's, whose chunk
    files are only counted before reading, is checked by place as a worker reads it."""
    from distributed import Client, LocalCluster

    from chunkcca.layers import zarr_arrays

    store = _store(tmp_path, dtype="float32")
    tree = open_activations(store)
    chunks = store / "b" / "activations" / "c"
    shutil.copyfile(chunks / "1" / "0", chunks / "5" / "0")
    derived = tree["b"]["activations"].astype("float64")
    wrapper = zarr_arrays(derived.data)[0].store_path.store
    assert len(pickle.dumps(wrapper)) < 1000  # no records in it, however many chunk files the store has
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(OSError, match=r"chunk file b/activations/c/5/0 of .*s\.zarr holds the bytes written for "
                                          r"datapoints 50 to 99, not those of datapoints 250 to 299"):
            cca(tree["a"], derived, precision="float64", scheduler=client)


def test_overwrite_replaces_only_an_activation_store(tmp_path, capsys):
    """--overwrite once removed a folder holding thesis.tex, and replaced the input .npy it was pointed at."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("years of work")
    x = np.random.default_rng(0).standard_normal((20, 3)).astype("float32")
    np.save(tmp_path / "a.npy", x)
    assert main(["ingest", str(project), f"x={tmp_path / 'a.npy'}", "--overwrite"]) == 2
    assert "is not an activation store chunkcca wrote" in capsys.readouterr().err
    assert (project / "thesis.tex").read_text() == "years of work"
    assert main(["ingest", str(tmp_path / "a.npy"), f"x={tmp_path / 'a.npy'}", "--overwrite"]) == 2
    assert "is where" in capsys.readouterr().err and np.load(tmp_path / "a.npy").shape == (20, 3)
    with pytest.raises(FileExistsError, match="is not an activation store chunkcca wrote"):
        write_activations(project, {"x": x}, overwrite=True)
    write_activations(tmp_path / "s.zarr", {"x": x})
    write_activations(tmp_path / "s.zarr", {"y": x}, overwrite=True)  # a store chunkcca wrote: replaced
    assert chunkcca.layer_paths(open_activations(tmp_path / "s.zarr")) == ["y"]
    result = cca(x, x[:, :2])
    with pytest.raises(FileExistsError, match=r"is not a zarr result chunkcca wrote"):
        chunkcca.save_result(result, tmp_path / "s.zarr", overwrite=True)  # a result never replaces the data
    assert chunkcca.layer_paths(open_activations(tmp_path / "s.zarr")) == ["y"]
    chunkcca.save_result(result, tmp_path / "r.zarr")
    chunkcca.save_result(result, tmp_path / "r.zarr", overwrite=True)  # a result chunkcca wrote: replaced
    result.to_netcdf(tmp_path / "mine.nc")  # a netCDF file chunkcca did not write (it replaced any)
    moments = chunkcca.compute_moments(x, x[:, :2])
    moments.save(tmp_path / "m.zarr")  # and saved Moments (it replaced any zarr store but an activation store)
    for name, kind in (("mine.nc", "netCDF"), ("m.zarr", "zarr")):
        before = _contents(tmp_path / name)
        with pytest.raises(FileExistsError, match=f"is not a {kind} result chunkcca wrote"):
            chunkcca.save_result(result, tmp_path / name, overwrite=True)
        assert _contents(tmp_path / name) == before
    chunkcca.save_result(result, tmp_path / "r.nc")
    chunkcca.save_result(result, tmp_path / "r.nc", overwrite=True)


def test_check_result_path_refuses_before_any_work_what_save_result_would(tmp_path):
    """A script saving a long computation's result learned only at the end that the place was refused (a missing
    folder, an existing file, a user's notes inside a zarr result). ``check_result_path`` refuses each beforehand,
    as ``save_result`` does when it writes, and passes a place ``save_result`` writes to."""
    x = np.random.default_rng(0).standard_normal((20, 3)).astype("float32")
    result = cca(x, x[:, :2])
    write_activations(tmp_path / "s.zarr", {"x": x})
    chunkcca.save_result(result, tmp_path / "r.zarr")
    (tmp_path / "r.zarr" / "rho" / "notes.txt").write_text("mine")
    (tmp_path / "mine.nc").write_bytes(b"mine")
    refused = [
        (tmp_path / "r.csv", False, ValueError, "name a netCDF file"),
        (tmp_path / "no" / "r.nc", False, ValueError, "no folder"),
        (tmp_path / "s.zarr" / "r.nc", False, ValueError, "inside the activation store"),
        (tmp_path / "mine.nc", False, FileExistsError, "exists; pass overwrite=True"),
        (tmp_path / "mine.nc", True, FileExistsError, "is not a netCDF result chunkcca wrote"),
        (tmp_path / "s.zarr", True, FileExistsError, "is not a zarr result chunkcca wrote"),
        (tmp_path / "r.zarr", True, FileExistsError, r"holds what chunkcca did not write \(rho/notes.txt\)"),
    ]
    for path, overwrite, error, message in refused:
        with pytest.raises(error, match=message):
            chunkcca.check_result_path(path, overwrite=overwrite)
        with pytest.raises(error, match=message):
            chunkcca.save_result(result, path, overwrite=overwrite)
    with pytest.raises(ValueError, match="overwrite must be True or False"):
        chunkcca.check_result_path(tmp_path / "new.nc", overwrite="no")
    (tmp_path / "r.zarr" / "rho" / "notes.txt").unlink()
    for path, overwrite in ((tmp_path / "new.nc", False), (tmp_path / "new.zarr", False), (tmp_path / "r.zarr", True)):
        chunkcca.check_result_path(path, overwrite=overwrite)
        chunkcca.save_result(result, path, overwrite=overwrite)


def test_a_failed_ingest_leaves_the_old_store_whole(tmp_path, capsys):
    """Nested layers (x and x/y) once made ingest --overwrite replace a good store with one that would not open."""
    x = np.random.default_rng(0).standard_normal((20, 3)).astype("float32")
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", x[:, :2])
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", store, f"old={tmp_path / 'a.npy'}", "--no-progress"]) == 0
    assert main(["ingest", store, f"x={tmp_path / 'a.npy'}", f"x/y={tmp_path / 'b.npy'}", "--overwrite"]) == 2
    assert "layer 'x' would hold layer 'x/y': a layer cannot hold another; name them side by side (e.g. 'x/out' and " \
           "'x/y')" in capsys.readouterr().err
    assert chunkcca.layer_paths(open_activations(store)) == ["old"]
    # appended beside a layer of the store: the advice renames the new layer (it said to rename both, and the
    # store's layer cannot be renamed by an append)
    assert main(["ingest", store, f"old/y={tmp_path / 'b.npy'}", "--append"]) == 2
    assert "name the new one beside it (e.g. 'old_y')" in capsys.readouterr().err


@pytest.mark.parametrize(("layers", "message"), [
    ({"fc": 0, "/fc": 1}, "layer path 'fc' is given twice"),
    ({".parts": 0}, "layer path '.parts'"),
    ({"a b": 0}, "layer path 'a b'"),
    ({"m//x": 0}, "layer path 'm//x'"),
    ({"__x": 0}, "layer path '__x'"),
    ({"m/zarr.json": 0}, "layer path 'm/zarr.json'"),
])
def test_layer_paths_are_normalised_and_unsafe_ones_refused(tmp_path, layers, message):
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match=message):
        write_activations(tmp_path / "s.zarr", {name: x + i for name, i in layers.items()})
    assert not (tmp_path / "s.zarr").exists()


def test_concurrent_writers_one_wins(tmp_path):
    """Two writers with overwrite=False: exactly one succeeds, the other is told the store exists."""
    x = np.random.default_rng(0).standard_normal((2000, 8)).astype("float32")
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def write(value: float) -> None:
        start.wait()
        try:
            write_activations(tmp_path / "s.zarr", {"x": x + value})
            outcomes.append("wrote")
        except FileExistsError:
            outcomes.append("refused")

    threads = [threading.Thread(target=write, args=(value,)) for value in (0.0, 1.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "wrote"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_a_read_overlapping_a_replacement_is_an_error_not_a_mix(tmp_path):
    """A reader gets the old data, the new data or an error: here the store is replaced after it was opened."""
    store = _store(tmp_path, dtype="float32")
    tree = open_activations(store)
    old = float(cca(tree["a"], tree["b"])["rho_mean"])
    rng = np.random.default_rng(9)
    write_activations(store, {"a": rng.standard_normal((400, 4)).astype("float32"),
                              "b": rng.standard_normal((400, 3)).astype("float32")}, chunks=50, overwrite=True)
    # as a chunk whose checksum is nobody's is read (the root read again names the replacement), or after reading
    with pytest.raises(OSError, match=r"was replaced while it was read|another store than the one opened .* or the "
                                      r"store was replaced"):
        cca(tree["a"], tree["b"])
    fresh = open_activations(store)
    assert float(cca(fresh["a"], fresh["b"])["rho_mean"]) != old


def test_a_cleanup_cut_short_leaves_a_folder_that_still_names_its_writer(tmp_path, monkeypatch):
    """Ctrl-C while a write's temporary folder was removed left, in 9 of 30 tries, a folder without its owner file
    (removed first), which no later write removed (a folder with no owner is not called stale). The owner file
    goes last now: what is left names its writer."""
    import shutil

    from chunkcca import _fs

    removed = []

    def cut_short(path, **_):  # a removal interrupted after it took the owner file, as rmtree may take it first
        removed.append(path)
        (Path(path) / _fs.OWNER).unlink(missing_ok=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with _fs.temporary_beside(tmp_path / "run.moments") as tmp:
            (tmp / "scatter").mkdir()
            (tmp / "scatter" / "0").write_bytes(b"x" * 100)
            monkeypatch.setattr(shutil, "rmtree", cut_short)
    monkeypatch.undo()
    assert removed and (tmp / _fs.OWNER).is_file()
    assert [folder for folder, _ in _fs.leftovers(tmp_path / "run.moments")] == [tmp]


@pytest.mark.slow
def test_killed_writers_leave_folders_that_info_reports_and_the_next_write_removes(tmp_path, capsys):
    store = _store(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".s.zarr.abc123.tmp"
    (stale / "data").mkdir(parents=True)
    (stale / "owner.json").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    (stale / "data" / "big").write_bytes(b"x" * 1000)
    assert leftovers(store) == [(stale, True)]
    assert main(["info", str(store)]) == 0
    assert "1 temporary folder beside it left by a killed write" in capsys.readouterr().out
    # a first write killed: no store, only its folder; "no activation store at …" did not say why
    never = tmp_path / "never.zarr"
    os.rename(stale, tmp_path / ".never.zarr.abc123.tmp")
    assert main(["info", str(never)]) == 2
    assert capsys.readouterr().err == (f"chunkcca info: error: no activation store at {never}: a write of it was "
                                       f"killed before it ended, leaving {tmp_path / '.never.zarr.abc123.tmp'}; "
                                       f"write the store again (which removes it)\n")
    owner = tmp_path / ".never.zarr.abc123.tmp" / "owner.json"
    dead_owner = owner.read_text()
    owner.write_text(json.dumps(owner_record()))  # its writer alive
    with pytest.raises(FileNotFoundError, match="a write of it has not ended \\(under way, or killed\\), leaving"):
        open_activations(never)
    owner.write_text(dead_owner)
    os.rename(tmp_path / ".never.zarr.abc123.tmp", stale)
    bracketed = tmp_path / "run[1].zarr"  # a name glob would read as a pattern: its folders were not found
    (tmp_path / ".run[1].zarr.abc123.tmp").mkdir()
    assert [folder.name for folder, _ in leftovers(bracketed)] == [".run[1].zarr.abc123.tmp"]
    (tmp_path / ".run[1].zarr.bak.abc123.tmp").mkdir()  # another store's (run[1].zarr.bak), not this one's
    assert [folder.name for folder, _ in leftovers(bracketed)] == [".run[1].zarr.abc123.tmp"]
    write_activations(store, {"c": np.zeros((10, 2))}, overwrite=True)
    assert not stale.exists()


def test_a_moved_store_resumes_its_checkpoint(tmp_path):
    store = _store(tmp_path, dtype="float32")
    tree = open_activations(store)
    want = cca(tree["a"], tree["b"], precision="float64", checkpoint=tmp_path / "run")
    moved = tmp_path / "elsewhere" / "moved.zarr"
    moved.parent.mkdir()
    os.rename(store, moved)
    tree = open_activations(moved)
    got = cca(tree["a"], tree["b"], precision="float64", checkpoint=tmp_path / "run")
    assert float(got["rho_mean"]) == float(want["rho_mean"])


def test_a_corrupted_label_chunk_is_an_error_too(tmp_path):
    """Coordinates (datapoint labels, channels, pixel centres) carry the CRC32C of the activations: a flipped
    bit in a label is an error when the store is opened, never a relabelled datapoint."""
    import xarray as xr

    labels = [f"image{i}" for i in range(20)]
    layer = xr.DataArray(np.random.default_rng(0).standard_normal((20, 2, 2, 3)),
                         dims=("datapoint", "height", "width", "channel"), coords={"datapoint": labels})
    write_activations(tmp_path / "s.zarr", {"a": layer})
    chunk = tmp_path / "s.zarr" / "a" / "datapoint" / "c" / "0"
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 4
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="checksum"):
        open_activations(tmp_path / "s.zarr")


def test_a_coordinate_chunk_that_fails_its_checksum_is_named_where_it_is_read(tmp_path):
    """A class label (a coordinate on datapoint, not an index) is read when groupby or folds use it, not at open:
    a flipped bit in it stopped those with zarr's "Stored and computed checksum do not match", naming no array,
    layer or store. Measures that do not read it are unaffected."""
    import chunkcca

    rng = np.random.default_rng(0)
    layers = {name: rng.standard_normal((40, 3)) for name in ("m0/fc", "m1/fc")}
    write_activations(tmp_path / "s.zarr", layers, coords={"label": np.arange(40) % 2})
    chunk = tmp_path / "s.zarr" / "m0" / "fc" / "label" / "c" / "0"
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 16
    chunk.write_bytes(bytes(damaged))
    tree = open_activations(tmp_path / "s.zarr")
    want = float(chunkcca.cka(layers["m0/fc"], layers["m1/fc"], precision="float64")["cka"])
    assert float(chunkcca.cka(tree["m0/fc"], tree["m1/fc"], precision="float64")["cka"]) == pytest.approx(want, 1e-12)
    for option in ({"groupby": "label"}, {"folds": "label"}):
        with pytest.raises(OSError, match=rf"the coordinate 'label' of layer 'm0/fc' of {tmp_path / 's.zarr'} cannot "
                                          rf"be read: its chunk file fails its CRC32C checksum"):
            chunkcca.compare(tree["m0/fc"], tree["m1/fc"], measures=["cka"], **option)


def test_concurrent_appends_keep_every_layer_in_the_order(tmp_path, monkeypatch):
    """Two appends to one store at once: each re-reads the list of layers under a lock before adding its own,
    so neither loses the other's (before, the second to finish wrote the list it had read first)."""
    import chunkcca.store

    x = np.random.default_rng(0).standard_normal((30, 3))
    write_activations(tmp_path / "s.zarr", {"first": x})
    both_built = threading.Barrier(2)
    original = chunkcca.store._set_root_attrs

    def after_both_built(target, *args, **kwargs):
        if Path(target).name == "data":  # each append's own temporary store, built: wait for the other's
            both_built.wait(timeout=60)
        return original(target, *args, **kwargs)

    monkeypatch.setattr(chunkcca.store, "_set_root_attrs", after_both_built)
    errors: list[BaseException] = []

    def append(name: str) -> None:
        try:
            write_activations(tmp_path / "s.zarr", {name: x}, mode="a")
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=append, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    listed = open_activations(tmp_path / "s.zarr").attrs["chunkcca_layers"]  # the order, not a sorted fallback
    assert listed[0] == "first" and sorted(listed) == ["a", "b", "first"]


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_results_with_text_save_and_read_back_whole(tmp_path, suffix):
    """pwcca's ``side`` and a sweep's layer names are text: zarr v3 warned that fixed-width unicode has no stable
    spec (its files may become unreadable); they are written as variable-length strings."""
    import warnings

    import xarray as xr

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    y = x[:, :2] + rng.standard_normal((200, 2))
    for name, result in (("pwcca", chunkcca.pwcca(x, y)),
                         ("sweep", chunkcca.similarity({"a": x}, {"b": y}, measures=["cka", "pwcca"]))):
        path = tmp_path / f"{name}{suffix}"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            chunkcca.save_result(result, path)
        with xr.open_dataset(path, engine="zarr" if suffix == ".zarr" else None,
                             **({"consolidated": False} if suffix == ".zarr" else {})) as back:
            for variable in result.variables:
                assert back[variable].values.tolist() == result[variable].values.tolist(), variable


def test_a_zarr_v2_store_a_damaged_metadata_file_or_a_store_given_as_checkpoint_is_named(tmp_path):
    """A zarr v2 store opened for info but failed to compare on a missing zarr.json; a truncated zarr.json gave
    "Expecting value: line 4 column 6" without saying which file; an activation store given as a checkpoint was
    called "saved Moments without a run's progress"."""
    import xarray as xr

    values = np.random.default_rng(0).standard_normal((10, 3))
    xr.Dataset({"activations": (("datapoint", "channel"), values)}).to_zarr(tmp_path / "v2.zarr", zarr_format=2,
                                                                           consolidated=False)
    with pytest.raises(ValueError, match=r"v2.zarr is a zarr v2 store; chunkcca reads zarr v3 activation stores"):
        open_activations(tmp_path / "v2.zarr")
    assert main(["info", str(tmp_path / "v2.zarr")]) == 2
    store = _store(tmp_path)
    metadata = store / "b" / "channel" / "zarr.json"
    original = metadata.read_text()
    metadata.write_text(original[:40])
    with pytest.raises(ValueError, match=r"its metadata file b/channel/zarr.json is damaged \(not JSON"):
        open_activations(store)
    # one inside an array's folder, which xarray does not read: it was a bare AssertionError (second review)
    metadata.write_text(original)
    metadata = store / "b" / "activations" / "c" / "zarr.json"
    for damaged, why in (("\0garbage", r"not JSON"), ("[1]", r"a JSON list, not an object")):
        metadata.write_text(damaged)
        with pytest.raises(ValueError, match=rf"its metadata file b/activations/c/zarr.json is damaged \({why}"):
            open_activations(store)
    good = _store(tmp_path / "good")
    tree = open_activations(good)
    with pytest.raises(chunkcca.checkpoint.CheckpointError, match=r"s.zarr is not a chunkcca checkpoint \(an "
                                                                  r"activation store\)"):
        cca(tree["a"], tree["b"], checkpoint=good)


@pytest.mark.cluster
def test_a_run_that_failed_on_a_client_runs_again_on_it(tmp_path):
    """A failed run kept its futures on the client, so the same call, once the cause was gone, raised the old error
    again (a resumed checkpoint too) until the client was restarted."""
    import dask.array as da
    import xarray as xr
    from distributed import Client, LocalCluster

    failing = tmp_path / "failing"
    failing.touch()

    def read(block, flag=str(failing)):  # a read failing while the file exists (a disk gone for a while)
        import os

        if os.path.exists(flag):
            raise RuntimeError("transient read failure")
        return block

    rng = np.random.default_rng(12)
    x = rng.standard_normal((200, 4))
    a, b = (xr.DataArray(da.from_array(values, chunks=(50, -1)).map_blocks(read, dtype=float),
                         dims=("datapoint", "channel"), name=name) for values, name in ((x, "a"), (x[:, :3] ** 2, "b")))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(RuntimeError, match="transient read failure"):
            chunkcca.compute_moments(a, b, precision="float64", scheduler=client)
        failing.unlink()
        moments = chunkcca.compute_moments(a, b, precision="float64", scheduler=client)
        assert moments.n == 200


def test_the_store_wrapper_reads_a_missing_chunk_as_an_error_by_every_method(tmp_path):
    """Whole or in ranges, a missing chunk file is a FileNotFoundError naming it; a metadata file zarr probes for
    and does not find is None, as zarr expects."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype

    from chunkcca.store import WholeStore

    store = WholeStore.at(str(_store(tmp_path)))
    prototype = default_buffer_prototype()
    assert asyncio.run(store.get("a/.zattrs", prototype)) is None
    for read in (store.get("a/activations/c/99/0", prototype),
                 store.get_partial_values(prototype, [("a/activations/c/0/0", None), ("a/activations/c/99/0", None)])):
        with pytest.raises(FileNotFoundError, match=r"a/activations/c/99/0"):
            asyncio.run(read)


def test_a_group_or_layer_inside_a_store_does_not_open_alone(tmp_path, capsys):
    """model1/ of a store whose model1/pool2 lost its metadata opened as a store of one layer (conv2): the lost
    layer dropped out of info and sweeps, as the whole store, which lists it, refuses. A part of a store is named
    as such and the store given to open."""
    rng = np.random.default_rng(0)
    write_activations(tmp_path / "s.zarr", {"model1/conv2": rng.standard_normal((20, 4)),
                                            "model1/pool2": rng.standard_normal((20, 3))})
    (tmp_path / "s.zarr" / "model1" / "pool2" / "zarr.json").unlink()
    for part in ("model1", "model1/conv2", "model1/conv2/activations"):
        with pytest.raises(ValueError, match=rf"{tmp_path / 's.zarr' / part} is inside the activation store "
                                             rf"{tmp_path / 's.zarr'}: open the store itself and take '{part}'"):
            open_activations(tmp_path / "s.zarr" / part)
    assert main(["info", str(tmp_path / "s.zarr" / "model1")]) == 2
    assert "is inside the activation store" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "s.zarr" / "blocks")]) == 2  # said "take 'blocks' from it", which is none
    assert f"s.zarr/blocks: the activation store {tmp_path / 's.zarr'} holds no 'blocks'" in capsys.readouterr().err
    with pytest.raises(OSError, match="lists layer 'model1/pool2' but holds no readable"):
        open_activations(tmp_path / "s.zarr")


def test_a_full_disk_names_the_path_and_a_symlink_is_named_as_such(tmp_path):
    """A full disk said "[Errno 28] No space left on device", naming nothing; a symbolic link to a store given
    with overwrite=True was said to be "not an activation store chunkcca wrote", which it points to."""
    import errno

    from chunkcca._fs import write_atomically

    def full(target: Path) -> None:
        target.mkdir()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=rf"writing an activation store {tmp_path / 'new.zarr'} failed: No space left "
                                      rf"on device") as raised:
        write_atomically(tmp_path / "new.zarr", full, overwrite=False, what="an activation store")
    assert raised.value.errno == errno.ENOSPC and not (tmp_path / "new.zarr").exists()
    assert not any(tmp_path.iterdir())  # nothing left behind

    def unreadable_input(target: Path) -> None:  # an input the build reads: its own name stays (review)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/images/img_0042.png")

    with pytest.raises(FileNotFoundError, match=r"No such file or directory: '/data/images/img_0042.png'"):
        write_atomically(tmp_path / "new.zarr", unreadable_input, overwrite=False, what="an activation store")
    store = _store(tmp_path)
    from chunkcca.store import write_store

    def full_append(target: Path, image: object) -> tuple[list[str], None]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=rf"writing layers into the activation store {store} failed: No space left"):
        write_store(store, full_append, mode="a")
    (tmp_path / "link.zarr").symlink_to(store)
    with pytest.raises(FileExistsError, match=r"link.zarr exists and is a symbolic link; overwrite=True never "
                                              r"replaces one"):
        write_activations(tmp_path / "link.zarr", {"a": np.zeros((10, 2))}, overwrite=True)
    assert open_activations(store)["a"]["activations"].shape == (400, 4)


def test_a_full_disk_names_the_path_written_not_a_temporary_one(tmp_path, monkeypatch):
    """A disk full before the temporary folder or its owner file was made said a bare "No space left on device";
    a write nested in another's temporary folder (ingest's parts) named the part there, a path already gone
    (found by audit). Both now name the path the user gave."""
    import errno
    import tempfile

    from chunkcca._fs import write_atomically

    def inner(target: Path) -> None:  # a part written inside the outer write's temporary folder, then the disk full
        def full(part: Path) -> None:
            part.mkdir()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(part / "c" / "0"))

        write_atomically(target.parent / ".parts", full, overwrite=False, what="an activation store")

    with pytest.raises(OSError, match=rf"^writing an activation store {re.escape(str(tmp_path / 's.zarr'))} failed: "
                                      rf"No space left on device$") as raised:
        write_atomically(tmp_path / "s.zarr", inner, overwrite=False, what="an activation store")
    assert raised.value.errno == errno.ENOSPC and not any(tmp_path.iterdir())

    def spilled(target: Path) -> None:  # a disk full elsewhere (where Dask spills): named as the OS names it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/scratch/dask-worker-space/spill/x")

    with pytest.raises(OSError, match=r"^\[Errno 28\] No space left on device: '/scratch/dask-worker-space/"):
        write_atomically(tmp_path / "s.zarr", spilled, overwrite=False, what="an activation store")

    def no_folder(*args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".r.nc.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkdtemp", no_folder)
    with pytest.raises(OSError, match=rf"^writing a netCDF result {re.escape(str(tmp_path / 'r.nc'))} failed: No "
                                      rf"space left on device$"):
        chunkcca.save_result(chunkcca.cca(np.eye(6, 2), np.eye(6, 3)[::-1]), tmp_path / "r.nc")


def test_a_label_chunk_that_fails_its_checksum_is_named(tmp_path):
    """An emptied chunk of a coordinate said only "Stored and computed checksum do not match", naming no array."""
    write_activations(tmp_path / "s.zarr", {"m/conv": np.zeros((10, 3, 3, 2), "float32")}, masks=None)
    (tmp_path / "s.zarr" / "m" / "conv" / "height" / "c" / "0").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot open .*s.zarr as a zarr activation store: its label array "
                                         r"m/conv/height cannot be read: its chunk file fails its CRC32C checksum"):
        open_activations(tmp_path / "s.zarr")


@pytest.mark.parametrize("edit", ["data_type", "dimension_names", "shape", "codecs", "label"])
def test_a_layers_edited_metadata_is_refused(tmp_path, edit):
    """Nothing recorded a layer's metadata: int32 read from float32 bytes gave ρ̄ 0.71 against 1.00, height and
    width swapped 0.27, a shorter shape read the data truncated, and a codec list without crc32c switched the
    checksums off, all silently. The writer now records a digest of each array's metadata and opening checks it."""
    rng = np.random.default_rng(0)
    write_activations(tmp_path / "s.zarr", {"m0/conv": rng.standard_normal((30, 4, 4, 3)).astype("float32"),
                                            "m1/conv": rng.standard_normal((30, 4, 4, 2)).astype("float32")})
    array = "datapoint" if edit == "label" else "activations"
    path = tmp_path / "s.zarr" / "m0" / "conv" / array / "zarr.json"
    metadata = json.loads(path.read_text())
    metadata["attributes"]["note"] = "attributes may change"  # not what the numbers are read by
    path.write_text(json.dumps(metadata))
    assert open_activations(tmp_path / "s.zarr")["m0/conv"]["activations"].shape == (30, 4, 4, 3)
    if edit == "data_type":
        metadata.update(data_type="int32", fill_value=0)
        metadata["attributes"].pop("_FillValue", None)
    elif edit == "dimension_names":
        metadata["dimension_names"] = ["datapoint", "width", "height", "channel"]
    elif edit in ("shape", "label"):
        metadata["shape"] = [25, *metadata["shape"][1:]]
    else:
        metadata["codecs"] = [codec for codec in metadata["codecs"] if codec["name"] != "crc32c"]
    path.write_text(json.dumps(metadata))
    with pytest.raises(OSError, match=rf"the metadata of array '{array}' of layer 'm0/conv' is not what chunkcca "
                                      r"wrote .* the store is damaged"):
        open_activations(tmp_path / "s.zarr")



def test_a_layers_datapoints_marked_as_positions_or_labels_unlike_as_written_is_refused(tmp_path):
    """Whether a layer's datapoint coordinate holds positions (written without labels, ``chunkcca_positions``)
    decides how it pairs; the attribute was in no record: deleted, a layer of positions paired by them with a
    labelled layer of the same inputs shuffled gave ρ̄ 0.0705 for 0.6352 (refused as written), silently; added
    to a labelled layer, the same (found by audit). The root records each layer's kind of datapoints, checked at
    opening; stores written before it read as they did."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((400, 3))
    a = (latent @ rng.standard_normal((3, 4))).astype("float32")
    b = (latent @ rng.standard_normal((3, 3)) + 0.3 * rng.standard_normal((400, 3))).astype("float32")
    write_activations(tmp_path / "x.zarr", {"a": a}, chunks=50)  # positions
    labelled = xr.DataArray(b, dims=("datapoint", "channel"), coords={"datapoint": rng.permutation(400)})
    write_activations(tmp_path / "y.zarr", {"b": labelled}, chunks=50)
    with pytest.raises(ValueError, match=r"layer 'b' labels its datapoints .* and layer 'a' does not"):
        cca(open_activations(tmp_path / "x.zarr")["a"], open_activations(tmp_path / "y.zarr")["b"])
    for store, layer in (("x.zarr", "a"), ("y.zarr", "b")):
        path = tmp_path / store / layer / "datapoint" / "zarr.json"
        written = path.read_text()
        metadata = json.loads(written)
        attributes = metadata["attributes"]
        if attributes.pop("chunkcca_positions", None) is None:
            attributes["chunkcca_positions"] = True
        path.write_text(json.dumps(metadata))
        kind = "positions" if layer == "a" else "labels"
        with pytest.raises(OSError, match=rf"{store}: the datapoint coordinate of layer '{layer}' was written as "
                                          rf"{kind}.*its attribute chunkcca_positions was edited"):
            open_activations(tmp_path / store)
        root = json.loads((tmp_path / store / "zarr.json").read_text())
        del root["attributes"]["chunkcca_datapoints"]  # a store written before the record: read as it is
        (tmp_path / store / "zarr.json").write_text(json.dumps(root))
        open_activations(tmp_path / store)
        path.write_text(written)
    write_activations(tmp_path / "x.zarr", {"a2": a}, mode="a", chunks=50)  # an append records every layer
    recorded = json.loads((tmp_path / "x.zarr" / "zarr.json").read_text())["attributes"]["chunkcca_datapoints"]
    assert recorded == {"a": "positions", "a2": "positions"}



def test_a_listed_layer_without_any_record_beside_recorded_ones_is_refused(tmp_path):
    """A layer's entries deleted from every root record, then two of its chunk files swapped: read as a store
    from before the records, ρ̄ 0.60 for 0.80, silently (found by audit). Every write records each listed layer
    (an append the ones before it too), so a listed layer without records beside layers with them is an edit."""
    store = _store(tmp_path, dtype="float32")
    chunks = store / "b" / "activations" / "c"
    first, second = (chunks / "1" / "0").read_bytes(), (chunks / "5" / "0").read_bytes()
    (chunks / "1" / "0").write_bytes(second)
    (chunks / "5" / "0").write_bytes(first)
    root = json.loads((store / "zarr.json").read_text())
    for record in ("chunkcca_metadata", "chunkcca_chunks", "chunkcca_decoding", "chunkcca_datapoints"):
        root["attributes"][record].pop("b", None)
    (store / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(OSError, match=r"s\.zarr: its root metadata \(zarr.json\) lists layer 'b' and records "
                                      r"nothing of it, where it records every other layer's arrays"):
        open_activations(store)
    root["attributes"]["chunkcca_layers"].remove("b")  # unlisted too: it was read as a layer xarray wrote, unchecked
    (store / "zarr.json").write_text(json.dumps(root))  # (ρ̄ 0.47 for 0.64; found by review)
    with pytest.raises(OSError, match=r"s\.zarr holds layer 'b', which its root metadata \(zarr.json\) neither "
                                      r"lists nor records, where it lists and records every other layer"):
        open_activations(store)


def test_appended_layers_keep_the_metadata_record_of_the_layers_there(tmp_path):
    rng = np.random.default_rng(0)
    write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((20, 3))})
    path = tmp_path / "s.zarr" / "a" / "activations" / "zarr.json"
    metadata = json.loads(path.read_text())
    edited = {**metadata, "data_type": "int64", "fill_value": 0}
    edited["attributes"] = {key: value for key, value in metadata["attributes"].items() if key != "_FillValue"}
    path.write_text(json.dumps(edited))
    with pytest.raises(OSError, match=r"array 'activations' of layer 'a' is not what chunkcca wrote"):
        write_activations(tmp_path / "s.zarr", {"b": rng.standard_normal((20, 2))}, mode="a")  # no blessing
    path.write_text(json.dumps(metadata))
    write_activations(tmp_path / "s.zarr", {"b": rng.standard_normal((20, 2))}, mode="a")
    assert chunkcca.layer_paths(open_activations(tmp_path / "s.zarr")) == ["a", "b"]
    path.write_text(json.dumps(edited))  # a's record is still the one written with it
    with pytest.raises(OSError, match=r"array 'activations' of layer 'a' is not what chunkcca wrote"):
        open_activations(tmp_path / "s.zarr")


def test_a_layers_lost_mask_or_label_metadata_is_refused(tmp_path):
    """A deleted mask/zarr.json opened without error and read every position as real (CKA 0.359 against 0.297);
    a deleted datapoint/zarr.json dropped the layer's labels. Both are named now."""
    rng = np.random.default_rng(0)
    real = np.arange(5)[None] < rng.integers(1, 6, 20)[:, None]
    for array in ("mask", "datapoint"):
        store = tmp_path / f"{array}.zarr"
        write_activations(store, {"t": rng.standard_normal((20, 5, 3)), "u": rng.standard_normal((20, 5, 2))},
                          masks={"t": real})
        (store / "t" / array / "zarr.json").unlink()
        with pytest.raises(OSError, match=rf"the metadata of array '{array}' of layer 't' is missing"):
            open_activations(store)


def test_overwrite_replaces_neither_a_store_chunkcca_did_not_write_nor_files_put_in_one(tmp_path):
    """overwrite=True replaced a store plain xarray wrote, and a chunkcca store with the user's files put inside it
    (notes, results), which went with it: it replaces only what chunkcca wrote."""
    import xarray as xr
    import zarr

    x = np.random.default_rng(0).standard_normal((20, 3))
    plain = tmp_path / "plain.zarr"
    xr.Dataset({"activations": (("datapoint", "channel"), x)}).to_zarr(plain, group="fc", zarr_format=3,
                                                                      consolidated=False)
    before = _contents(plain)
    with pytest.raises(FileExistsError, match="is not an activation store chunkcca wrote"):
        write_activations(plain, {"x": x}, overwrite=True)
    assert _contents(plain) == before
    store = tmp_path / "s.zarr"
    write_activations(store, {"x": x, "m/y": x}, chunks=10)
    (store / "notes.txt").write_text("mine")
    (store / "m" / "y" / "activations" / "analysis").mkdir()
    (store / "m" / "y" / "activations" / "analysis" / "res.csv").write_text("1,2")
    before = _contents(store)
    with pytest.raises(FileExistsError, match=r"s.zarr holds what chunkcca did not write or list \(notes.txt, "
                                              r"m/y/activations/analysis/res.csv: yours, or a layer"):
        write_activations(store, {"z": x}, overwrite=True)
    assert _contents(store) == before
    (store / "notes.txt").unlink()
    shutil.rmtree(store / "m" / "y" / "activations" / "analysis")
    for name, put in (("my_results", lambda: xr.Dataset({"r": ("k", np.arange(3.0))}).to_zarr(
                          store, group="my_results", zarr_format=3, consolidated=False)),
                      ("x/probe", lambda: zarr.open_array(store / "x" / "probe", mode="w", shape=(3,), dtype="f8",
                                                          zarr_format=3).__setitem__(slice(None), 1.0))):
        put()  # zarr nodes of the user's inside the store: they were taken for chunkcca's and went with it
        with pytest.raises(FileExistsError, match=rf"holds what chunkcca did not write or list \({name}:"):
            write_activations(store, {"z": x}, overwrite=True)
        shutil.rmtree(store / name)
    for left_by_finder in (".DS_Store", "m/._y"):  # macOS's: not a user's
        (store / left_by_finder).write_bytes(b"\0")
    (store / "._results").mkdir()  # a folder, though named like one of Finder's files: a user's
    (store / "._results" / "r.csv").write_text("1")
    with pytest.raises(FileExistsError, match=r"holds what chunkcca did not write or list \(\._results:"):
        write_activations(store, {"z": x}, overwrite=True)
    shutil.rmtree(store / "._results")
    write_activations(store, {"z": x, "c": x, "m/c": x}, overwrite=True)
    assert chunkcca.layer_paths(open_activations(store)) == ["z", "c", "m/c"]
    write_activations(store, {"z": x}, overwrite=True)  # a layer named c is not an array's chunks (it was)
    assert chunkcca.layer_paths(open_activations(store)) == ["z"]
    tokens = write_activations(tmp_path / "t.zarr", {"t": np.zeros((6, 5, 3))})["t"]["activations"]
    first = write_activations(tmp_path / "first.zarr", {"first": tokens.isel(token=0)})["first"]["activations"]
    assert first.coords["token"].ndim == 0  # a 0-d coordinate's one chunk is a file named c
    write_activations(tmp_path / "first.zarr", {"first": first.load()}, overwrite=True)


def test_a_chunk_copied_from_another_store_is_warned_of(tmp_path):
    """A chunk file of another store of the same shape (a botched merge of two runs) passed every check and gave
    another number without a word: a chunk holding other bytes than chunkcca wrote is warned of, naming its
    datapoints (an edit in place with zarr is the user's; a chunk moved to another's place is an error)."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    store = _store(tmp_path / "one", compression=None)
    write_activations(tmp_path / "two" / "s.zarr", {"a": np.ones((400, 4), "int16"), "b": np.ones((400, 3), "int16")},
                      chunks=50, compression=None)
    chunk = store / "a" / "activations" / "c" / "5" / "0"
    chunk.write_bytes((tmp_path / "two" / "s.zarr" / "a" / "activations" / "c" / "5" / "0").read_bytes())
    tree = open_activations(store)
    with pytest.warns(RuntimeWarning, match=r"layer 'a' of .*s.zarr: 1 chunk file holds other bytes than chunkcca "
                                            r"wrote \(the first, of datapoints 250 to 299\): edited since"):
        cca(tree["a"], tree["b"])


def test_an_append_into_a_group_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """Appending n/x and m/c with m read-only moved n/x in, then failed on m/c, leaving the store holding a layer it
    does not list. (os.access is patched: as root, permission bits do not refuse.)"""
    x = np.random.default_rng(0).standard_normal((20, 3))
    store = tmp_path / "s.zarr"
    write_activations(store, {"m/a": x, "b": x})
    before = _contents(store)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(store / "m") and real(path, mode))
    with pytest.raises(PermissionError, match=r"the store .*s.zarr: the folder .*s.zarr/m cannot be written to"):
        write_activations(store, {"n/x": x, "m/c": x}, mode="a")
    assert _contents(store) == before
    write_activations(store, {"n/x": x}, mode="a")  # a new group beside it: the store's own folder is written
    assert chunkcca.layer_paths(open_activations(store)) == ["m/a", "b", "n/x"]


@pytest.mark.slow
def test_an_append_killed_midway_is_never_read_and_the_next_append_clears_it(tmp_path):
    """An append killed between its layers' moves left a layer part-moved in (its activations, not its mask or
    labels) and unlisted: it opened and was measured with its padding taken as real (CKA 0.02765 for 0.02778),
    and appending it again was refused ("already holds layer g/c"). Layers moving in are left out by readers,
    whole or not; the next append removes what the killed one left."""
    store = _store(tmp_path)
    rng = np.random.default_rng(1)
    values, mask = rng.standard_normal((400, 5, 3)), np.arange(5) < rng.integers(1, 6, 400)[:, None]
    np.save(tmp_path / "c.npy", values)
    killed = f"""
import os, numpy as np, chunkcca, chunkcca.store
real = chunkcca.store.move_layer
def move_then_die(part, target, layer):
    real(part, target, layer)
    if target.name == "s.zarr":
        os._exit(9)  # killed after its first layer
chunkcca.store.move_layer = move_then_die
chunkcca.write_activations({str(store)!r}, {{"g/c": np.load({str(tmp_path / 'c.npy')!r}), "d": np.ones((400, 2))}},
                           mode="a")
"""
    done = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    assert (store / "g" / "c").is_dir()  # moved in, not listed
    tree = open_activations(store)
    assert chunkcca.layer_paths(tree) == ["a", "b"] and "c" not in tree["g"].children
    assert main(["info", str(store)]) == 0
    layers = {"g/c": values, "d": rng.standard_normal((400, 2))}
    write_activations(store, layers, masks={"g/c": mask}, mode="a")  # clears what the killed one left
    tree = open_activations(store)
    assert chunkcca.layer_paths(tree) == ["a", "b", "g/c", "d"]
    assert bool((tree["g/c"]["activations"].coords["mask"].values == mask).all())
    # an error (or a Ctrl-C) midway removes what it moved at once: the store as it was
    real = chunkcca_store.move_layer

    def move_then_fail(part, target, layer):
        real(part, target, layer)
        raise OSError("disk gone")

    before = _contents(store)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunkcca_store, "move_layer", move_then_fail)
        with pytest.raises(OSError, match="disk gone"):
            write_activations(store, {"e/f": values, "h": values}, mode="a")
    assert _contents(store) == before
    # a folder of the user's at a new layer's path is named, before any work
    (store / "k").mkdir()
    with pytest.raises(FileExistsError, match=r"lists no layer 'k' \(yours, or a layer another append is moving "
                                              r"in\): move it out"):
        write_activations(store, {"k": values}, mode="a")
    assert (store / "k").is_dir() and chunkcca.layer_paths(open_activations(store)) == ["a", "b", "g/c", "d"]


def test_readers_and_appends_go_on_while_an_append_moves_its_layers_in(tmp_path, monkeypatch):
    """While an append moves its layers in, a reader sees the store without them and another append waits for
    it; the live append's layers are not taken for a killed one's."""
    store = _store(tmp_path)
    values = np.random.default_rng(2).standard_normal((400, 2))
    moving, go_on = threading.Event(), threading.Event()
    real = chunkcca_store.move_layer

    def slow_move(part, target, layer):
        real(part, target, layer)
        if target == store:
            moving.set()
            assert go_on.wait(timeout=60)

    monkeypatch.setattr(chunkcca_store, "move_layer", slow_move)
    errors: list[BaseException] = []

    def append(layers: dict) -> None:
        try:
            write_activations(store, layers, mode="a")
        except BaseException as error:  # reported below
            errors.append(error)

    first = threading.Thread(target=append, args=({"x/one": values, "two": values},))
    first.start()
    assert moving.wait(timeout=60)
    assert chunkcca.layer_paths(open_activations(store)) == ["a", "b"]  # x/one is in, not yet listed
    float(cca(open_activations(store)["a"], open_activations(store)["b"])["rho_mean"])
    second = threading.Thread(target=append, args=({"three": values},))
    second.start()
    go_on.set()
    for thread in (first, second):
        thread.join(timeout=120)
    assert not errors, errors
    assert chunkcca.layer_paths(open_activations(store)) == ["a", "b", "x/one", "two", "three"]


def test_a_replacement_waits_for_an_append_moving_its_layers_in(tmp_path, monkeypatch):
    """``write_activations(overwrite=True)`` swapped the store while an append was moving its layers in: the
    append's next layer went into the new store and the list it wrote named layers the new store never had. The
    replacement now waits for the append's lock, and replaces the store once the append is done."""
    import chunkcca._fs

    store = _store(tmp_path)
    values = np.random.default_rng(2).standard_normal((400, 2))
    moving, go_on, asked = threading.Event(), threading.Event(), threading.Event()
    real_move, real_exclusive = chunkcca_store.move_layer, chunkcca._fs.exclusive

    def slow_move(part, target, layer):
        real_move(part, target, layer)
        if target == store:
            moving.set()
            assert go_on.wait(timeout=60)

    @contextlib.contextmanager
    def exclusive(lock_file):
        asked.set()  # the replacement asks for the append's lock
        with real_exclusive(lock_file):
            append.join(timeout=60)  # and swaps once the append has read back what it wrote
            yield

    monkeypatch.setattr(chunkcca_store, "move_layer", slow_move)
    monkeypatch.setattr(chunkcca._fs, "exclusive", exclusive)
    errors: list[BaseException] = []

    def run(layers: dict, **options) -> None:
        try:
            write_activations(store, layers, **options)
        except BaseException as error:  # reported below
            errors.append(error)

    append = threading.Thread(target=run, args=({"one": values, "two": values},), kwargs={"mode": "a"})
    append.start()
    assert moving.wait(timeout=60)
    replace = threading.Thread(target=run, args=({"z": values},), kwargs={"overwrite": True})
    replace.start()
    while not asked.is_set() and replace.is_alive():  # at its lock, or (as before) done under the append
        replace.join(timeout=0.05)
    go_on.set()
    for thread in (append, replace):
        thread.join(timeout=120)
    assert not errors, errors
    assert chunkcca.layer_paths(open_activations(store)) == ["z"]
    assert sorted(path.name for path in store.iterdir() if not path.name.startswith(".")) == ["z", "zarr.json"]


def test_an_append_to_a_store_replaced_while_it_was_built_is_refused(tmp_path, monkeypatch):
    """An append checks its layers against the store (labels, image size) before building them; a replacement
    that came before it took the lock let it move them into the new store, unchecked. The store's generation,
    read before the build, is compared under the lock."""
    store = _store(tmp_path)
    values = np.random.default_rng(2).standard_normal((400, 2))
    built, go_on = threading.Event(), threading.Event()
    real = chunkcca_store._set_root_attrs

    def paused(target, *args, **kwargs):
        real(target, *args, **kwargs)
        if Path(target).name == "data":  # the append's own temporary store, built
            built.set()
            assert go_on.wait(timeout=60)

    monkeypatch.setattr(chunkcca_store, "_set_root_attrs", paused)
    errors: list[BaseException] = []

    def append() -> None:
        try:
            write_activations(store, {"late": values}, mode="a")
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=append)
    thread.start()
    assert built.wait(timeout=60)
    monkeypatch.setattr(chunkcca_store, "_set_root_attrs", real)  # the replacement runs as it always does
    write_activations(store, {"z": values[:300]}, overwrite=True)
    go_on.set()
    thread.join(timeout=120)
    assert len(errors) == 1 and isinstance(errors[0], ValueError), errors
    assert "was replaced (written whole) while these layers were written for it" in str(errors[0])
    assert chunkcca.layer_paths(open_activations(store)) == ["z"]


def test_an_append_checks_its_labels_against_the_store_whose_generation_it_holds(tmp_path, monkeypatch):
    """An append checked its datapoint labels against the store, then read the store's generation: a store
    replaced between the two (other labels for the same datapoints) took the new layer under its own labels,
    unchecked, as the lock found the generation it had read. The generation is read first now, so the lock
    finds the replacement."""
    values = np.random.default_rng(2).standard_normal((400, 2))
    store = tmp_path / "s.zarr"
    write_activations(store, {"a": values}, coords={"digit": np.arange(400) % 10})
    real = chunkcca_store.check_store_coords

    def replaced_after(path, coords):
        real(path, coords)  # the labels agree with the store as it was
        write_activations(store, {"z": values}, coords={"digit": np.arange(400) % 7}, overwrite=True)

    monkeypatch.setattr(chunkcca_store, "check_store_coords", replaced_after)
    with pytest.raises(ValueError, match="was replaced \\(written whole\\) while these layers were written for it"):
        write_activations(store, {"late": values}, coords={"digit": np.arange(400) % 10}, mode="a")
    assert chunkcca.layer_paths(open_activations(store)) == ["z"]


def test_label_chunk_files_swapped_are_an_error_not_datapoints_relabelled(tmp_path):
    """Label arrays of 60,000 datapoints are stored in two chunks; swapped, each passed its own checksum and the
    layers were aligned by the wrong labels: mean ρ 0.0104 for 0.9465, no error. Their chunks' checksums are
    recorded as the activations' are, and checked at open."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60000, 4))
    y = x @ rng.standard_normal((4, 3)) + 0.5 * rng.standard_normal((60000, 3))
    write_activations(tmp_path / "s.zarr", {"a": x, "b": y}, chunks=10000)
    labels = tmp_path / "s.zarr" / "b" / "datapoint" / "c"
    assert sorted(os.listdir(labels)) == ["0", "1"]  # else the test swaps nothing
    os.replace(labels / "0", labels / "swap")
    os.replace(labels / "1", labels / "0")
    os.replace(labels / "swap", labels / "1")
    with pytest.raises(OSError, match=r"the labels 'datapoint' of layer 'b' of .*: the chunk file of datapoints 0 "
                                      r"to 29999 holds the bytes written for datapoints 30000 to 59999"):
        open_activations(tmp_path / "s.zarr")


def test_opening_reads_every_label_chunks_checksum_in_one_batched_read(tmp_path, monkeypatch):
    """One read per label array (240 for 60 layers) would be 240 round trips to a store behind a URL."""
    from fsspec.implementations.local import LocalFileSystem

    write_activations(tmp_path / "s.zarr", {f"l{i}": np.ones((50, 3)) * i for i in range(20)})
    calls = []
    batched = LocalFileSystem.cat_ranges
    monkeypatch.setattr(LocalFileSystem, "cat_ranges", lambda fs, paths, *args, **kwargs: calls.append(len(paths))
                        or batched(fs, paths, *args, **kwargs))
    open_activations(tmp_path / "s.zarr")
    assert len(calls) == 1 and calls[0] >= 40  # the datapoint and channel labels of 20 layers at least


@pytest.mark.parametrize(("edit", "named"), [({"_Unsigned": "true"}, "_Unsigned"),
                                              ({"scale_factor": 0.5}, "scale_factor"),
                                              ({"add_offset": 3.0}, "add_offset"), ({"_FillValue": 7}, "_FillValue")])
def test_an_edited_attribute_that_xarray_decodes_values_by_is_refused(tmp_path, edit, named):
    """The metadata digest left attributes out, but xarray decodes values by some of them: an int16 layer given
    ``_Unsigned`` read as uint16, mean ρ 0.641 for 0.970, silently. They are recorded (apart from the digest, which
    older versions check as before) and checked at open; other attributes (a ``units`` that is not a time's) may
    change, and a store written before records none and opens as it did."""
    from chunkcca.store import DECODING_ATTR

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((400, 4)) * 8000).astype("int16")
    write_activations(tmp_path / "s.zarr", {"a": x, "b": x[:, :3].astype("float32")})
    path = tmp_path / "s.zarr" / "a" / "activations" / "zarr.json"
    written = path.read_text()
    metadata = json.loads(written)
    metadata["attributes"].update(units="a.u.", note="mine")
    path.write_text(json.dumps(metadata))
    assert open_activations(tmp_path / "s.zarr")["a"]["activations"].dtype == np.int16
    metadata["attributes"].update(edit)
    path.write_text(json.dumps(metadata))
    with pytest.raises(OSError, match=rf"the attribute {named} of array 'activations' of layer 'a', by which xarray "
                                      r"decodes its values, is not what chunkcca wrote"):
        open_activations(tmp_path / "s.zarr")
    root = tmp_path / "s.zarr" / "zarr.json"  # a store written before: no record of them
    stored = json.loads(root.read_text())
    del stored["attributes"][DECODING_ATTR]
    root.write_text(json.dumps(stored))
    open_activations(tmp_path / "s.zarr")
    metadata["shape"] = [300, 4]  # what the digest covers is checked as before
    path.write_text(json.dumps(metadata))
    with pytest.raises(OSError, match=r"the metadata of array 'activations' of layer 'a' is not what chunkcca wrote"):
        open_activations(tmp_path / "s.zarr")


def test_a_ctrl_c_after_the_new_store_is_in_place_says_it_was_written(tmp_path, monkeypatch, capsys):
    """ingest --overwrite interrupted while it removed the old copy (after the swap) said only "interrupted": the
    user took the old store to be there still, the new one in its place."""
    import shutil

    from chunkcca import _fs

    x = np.random.default_rng(0).standard_normal((20, 3)).astype("float32")
    np.save(tmp_path / "a.npy", x)
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(store), f"old={tmp_path / 'a.npy'}", "--no-progress"]) == 0
    removing = shutil.rmtree

    def interrupted(path, **kwargs):  # the old copy's removal, after the swap, cut short by a Ctrl-C
        if (Path(path).parent / _fs.OWNER).exists() and Path(path).name == "data":
            raise KeyboardInterrupt
        return removing(path, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    assert main(["ingest", str(store), f"new={tmp_path / 'a.npy'}", "--overwrite", "--no-progress"]) == 2
    monkeypatch.undo()
    error = capsys.readouterr().err
    assert error == (f"chunkcca ingest: error: interrupted; an activation store {store} was written whole before it "
                     f"(the removal of the temporary folder beside it was cut short; the next write removes it)\n")
    assert chunkcca.layer_paths(open_activations(store)) == ["new"]


def test_a_write_cut_short_removes_what_its_threads_write_after_the_interrupt(tmp_path):
    """A SIGTERM while the demo wrote left `.demo.zarr.XXXX.tmp` beside the store (once in a full test run): Dask's
    threads finish the tasks they were given, writing chunk files (and their folders) after the folder was
    removed. The folder of a write cut short is removed again until it stays gone."""
    import time

    from chunkcca._fs import write_atomically

    def cut_short(target: Path) -> None:
        def late() -> None:  # a task of the write's pool, still running
            time.sleep(0.05)
            (target / "a" / "c").mkdir(parents=True)
            (target / "a" / "c" / "0").write_bytes(b"chunk")

        threading.Thread(target=late).start()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "new.zarr", cut_short, overwrite=False, what="an activation store")
    time.sleep(0.2)  # the late write long done
    assert list(tmp_path.iterdir()) == []


def test_a_local_listing_lists_as_fsspec_does(tmp_path):
    """A local store is listed with os.scandir (fsspec's find cost 0.15 ms a file, seconds for a store of tens of
    thousands of chunk files): the same files and sizes as fsspec lists, links and hidden files included."""
    import fsspec

    from chunkcca.integrity import file_sizes

    write_activations(tmp_path / "s.zarr", {"m/a": np.zeros((12, 2, 2, 3)), "m/b": np.zeros((12, 4))}, chunks=5)
    odd = tmp_path / "odd"
    (odd / "sub" / "deeper").mkdir(parents=True)
    (odd / "a").write_text("four")
    (odd / "sub" / ".hidden").write_text("x")
    (odd / "sub" / "deeper" / "c").write_bytes(b"123456")
    (odd / "empty").mkdir()
    (odd / "link").symlink_to(odd / "a")
    (odd / "broken").symlink_to(odd / "nothing")
    (odd / "folder_link").symlink_to(odd / "sub", target_is_directory=True)
    fs = fsspec.filesystem("file")
    for folder in (tmp_path / "s.zarr", tmp_path / "s.zarr" / "m" / "a", odd, odd / "a", odd / "folder_link",
                   odd / "missing"):
        path = str(folder)
        want = {name.removeprefix(path).lstrip("/"): int(info["size"])
                for name, info in fs.find(path, detail=True).items()}
        assert file_sizes(fs, path) == want, folder
    listed = file_sizes(fs, str(odd))  # a link to a folder is a file of the folder's size, not followed
    assert sorted(listed) == ["a", "broken", "folder_link", "link", "sub/.hidden", "sub/deeper/c"]
    assert (listed["a"], listed["link"], listed["broken"], listed["sub/deeper/c"]) == (4, 4, 0, 6)


def test_a_folder_that_cannot_be_listed_and_a_chunk_linked_to_nothing_are_named(tmp_path, monkeypatch):
    """fsspec's listing left out a folder it could not list (a layer's chunk files then went unchecked at open, or
    were said to be lost), and a chunk file that is a link to nothing failed in fsspec's words ("'FileNotFoundError'
    object has no attribute 'rjust'"; both found by review). Both are errors naming the folder or the file."""
    import chunkcca.integrity as integrity

    x = np.random.default_rng(0).standard_normal((10, 3)).astype("float32")
    store = tmp_path / "s.zarr"
    write_activations(store, {"m/a": x, "m/b": x}, chunks=3)
    scandir = os.scandir

    def refused(place):  # as a folder of mode 0311 is to a user other than root
        if str(place) == str(store / "m" / "b"):
            raise PermissionError(13, "Permission denied", str(place))
        return scandir(place)
    with monkeypatch.context() as patched:
        patched.setattr(integrity.os, "scandir", refused)
        with pytest.raises(OSError, match=r"cannot list the folder .*s.zarr/m/b \(Permission denied\): chunkcca lists "
                                          r"every file of a store to check its chunk files"):
            open_activations(store)
    chunk = store / "m" / "a" / "activations" / "c" / "1" / "0"
    chunk.unlink()
    chunk.symlink_to(tmp_path / "nothing")
    with pytest.raises(OSError, match=r"chunk file .*m/a/activations/c/1/0 cannot be read \(FileNotFoundError"):
        chunkcca.describe_store(store)
    tree = open_activations(store)
    with pytest.raises(OSError, match=r"chunk file .*c/1/0 cannot be read"):
        cca(tree["m/a"], tree["m/b"])


def test_an_append_through_a_symbolic_link_takes_the_stores_own_lock_and_builds_beside_it(tmp_path, monkeypatch):
    """An append through a link to a store took a lock beside the link, not the store's: two appends at once (one
    through the link) lost one's place in the store's list, and an append beside a replacement damaged the store;
    its layers were built beside the link, so a store on another file system failed to take them after all the
    work (found by audit). Both are now the store's own, however its path is spelled."""
    store = tmp_path / "s.zarr"
    write_activations(store, {"a": np.ones((6, 2))})
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "s.zarr").symlink_to(store)
    locks, built = [], []
    exclusive, beside = chunkcca_store.exclusive, chunkcca_store.temporary_beside
    monkeypatch.setattr(chunkcca_store, "exclusive", lambda lock: locks.append(lock) or exclusive(lock))
    monkeypatch.setattr(chunkcca_store, "temporary_beside", lambda path: built.append(path) or beside(path))
    tree = write_activations(tmp_path / "links" / "s.zarr", {"b": np.zeros((6, 3))}, mode="a")
    assert set(locks) == {tmp_path / ".s.zarr.append-lock"} and built == [store]
    assert chunkcca.layer_paths(tree) == ["a", "b"] and chunkcca.layer_paths(open_activations(store)) == ["a", "b"]


def test_a_root_metadata_write_that_fails_leaves_nothing_and_one_killed_does_not_block_an_overwrite(tmp_path,
                                                                                                 monkeypatch):
    """An append that ran out of space rewriting the store's root metadata left '.zarr.json.tmp' in it, which then
    made overwrite=True refuse the store as holding a user's file (found by audit). A failed write now removes it,
    and one a killed process left is the store's own."""
    store = tmp_path / "s.zarr"
    write_activations(store, {"a": np.ones((6, 2))})
    replace = os.replace

    def full(source, target):
        if Path(source).name == chunkcca_store.ROOT_METADATA_TMP:
            raise OSError(28, "No space left on device")
        return replace(source, target)

    monkeypatch.setattr(chunkcca_store.os, "replace", full)
    with pytest.raises(OSError, match="No space left on device"):
        write_activations(store, {"b": np.ones((6, 2))}, mode="a")
    monkeypatch.setattr(chunkcca_store.os, "replace", replace)
    assert not (store / chunkcca_store.ROOT_METADATA_TMP).exists()
    assert chunkcca.layer_paths(open_activations(store)) == ["a"]
    (store / chunkcca_store.ROOT_METADATA_TMP).write_text("{")  # as a killed process leaves it
    tree = write_activations(store, {"c": np.zeros((6, 2))}, overwrite=True)
    assert chunkcca.layer_paths(tree) == ["c"]


def test_a_store_replaced_while_it_is_opened_is_said_so_not_called_damaged(tmp_path, monkeypatch):
    """A reader opening a store while another process wrote it again was told the store was damaged ("a chunk
    deleted … write the layer again"; found by audit): the store's generation is read again and the error says it
    was replaced."""
    store = tmp_path / "s.zarr"
    write_activations(store, {"a": np.ones((6, 2))}, chunks=2)
    check = chunkcca_store.check_label_places

    def replaced_first(*args, **kwargs):
        monkeypatch.setattr(chunkcca_store, "check_label_places", check)
        write_activations(store, {"b": np.zeros((8, 3))}, chunks=4, overwrite=True)  # as another process would
        return check(*args, **kwargs)

    monkeypatch.setattr(chunkcca_store, "check_label_places", replaced_first)
    with pytest.raises(OSError, match=r"s\.zarr was replaced \(written again, by another process\) while it was "
                                      r"opened; open it again"):
        open_activations(store)
    assert chunkcca.layer_paths(open_activations(store)) == ["b"]


def test_a_root_metadata_file_of_another_json_kind_is_said_damaged(tmp_path):
    """Read before the other metadata (for the store's generation), a root zarr.json holding a JSON list failed
    with AttributeError ("'list' object has no attribute 'get'"; found by review): it is damaged, as before."""
    store = tmp_path / "s.zarr"
    write_activations(store, {"a": np.ones((4, 2))})
    for text, why in (("[1, 2]", r"a JSON list, not an object"), ("{", r"not JSON: ")):
        (store / "zarr.json").write_text(text)
        with pytest.raises(ValueError, match=rf"cannot open .*s\.zarr as a zarr activation store: its metadata file "
                                             rf"zarr\.json is damaged \({why}"):
            open_activations(store)
