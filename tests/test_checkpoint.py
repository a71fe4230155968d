"""Checkpointed runs: resume without re-reading, refuse another run's checkpoint and say why."""

from __future__ import annotations

import contextlib
import os
import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import chunkcca
from chunkcca import Moments
from chunkcca.checkpoint import CheckpointError
from chunkcca.rows import Adapter


def test_checkpoint_refuses_other_method_or_other_data(tmp_path):
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((40, 8, 8, 2)), rng.standard_normal((40, 4, 4, 2))
    chunkcca.compute_moments(a, b, spatial="interp", method="nearest", precision="float64",
                             checkpoint=tmp_path / "ckpt")
    with pytest.raises(ValueError, match="belongs to another run"):
        chunkcca.compute_moments(a, b, spatial="interp", method="cubic", precision="float64",
                                 checkpoint=tmp_path / "ckpt")
    with pytest.raises(ValueError, match="belongs to another run"):
        chunkcca.compute_moments(a + 1, b, spatial="interp", method="nearest", precision="float64",
                                 checkpoint=tmp_path / "ckpt")


def test_checkpointed_run_resumes_without_rereading_finished_chunks(tmp_path):
    """An interrupted run leaves its Moments so far; the next call streams only the rest, and the result
    equals one uninterrupted pass."""
    import dask

    import chunkcca

    reads: list[int] = []
    fail_at = {"chunk": 5}

    def block(i):
        if i == fail_at["chunk"]:
            fail_at["chunk"] = None
            raise KeyboardInterrupt("interrupted")
        reads.append(i)
        rng = np.random.default_rng(i)
        return rng.standard_normal((10, 2, 2, 3)) + i

    def lazy():
        return da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(10, 2, 2, 3), dtype=float)
                               for i in range(8)])

    layer = lazy()
    other = layer[..., :2] * 2 + 1
    with pytest.raises(KeyboardInterrupt):
        chunkcca.compute_moments(layer, other, precision="float64", stride=3, checkpoint=tmp_path / "ckpt",
                                 checkpoint_every=2, scheduler="synchronous")
    # loaded as Moments, an unfinished run's checkpoint says so (it held 35000 of 60000 rows, silently)
    with pytest.warns(UserWarning, match=r"ckpt is the checkpoint of a run that stopped after 40 of its 80 "
                                         r"datapoints: these Moments hold those datapoints only"):
        assert Moments.load(tmp_path / "ckpt").n == len(range(0, 40 * 4, 3))
    reads.clear()
    resumed = chunkcca.compute_moments(layer, other, precision="float64", stride=3, checkpoint=tmp_path / "ckpt",
                                       checkpoint_every=2, scheduler="synchronous")
    assert sorted(set(reads)) == [4, 5, 6, 7], "chunks 0-3 were done and are not read again"
    whole = chunkcca.compute_moments(layer, other, precision="float64", stride=3)
    assert resumed.n == whole.n
    np.testing.assert_allclose(resumed.scatter, whole.scatter, rtol=1e-12)
    again = chunkcca.compute_moments(layer, other, precision="float64", stride=3, checkpoint=tmp_path / "ckpt",
                                     checkpoint_every=2)
    assert again.n == whole.n
    with pytest.raises(ValueError, match="belongs to another run"):
        chunkcca.compute_moments(layer, other, precision="float32", checkpoint=tmp_path / "ckpt")


def test_checkpoint_fingerprint_covers_every_adapter_field():
    """A dft run keeping other frequencies (same layers and options) must not resume the checkpoint."""
    import dataclasses

    from chunkcca.checkpoint import _fingerprint
    from chunkcca.rows import shared_frequencies

    layer = xr.DataArray(da.zeros((4, 8, 8, 2)), dims=("datapoint", "height", "width", "channel"), name="a")
    kept = shared_frequencies(8, 8)[0]
    adapter = Adapter("dft", (8, 8), frequencies=(kept, kept))

    def fingerprint(adapter):
        return _fingerprint((layer, layer.rename("b")), (adapter, adapter), {"spatial": "dft"})

    assert fingerprint(adapter) == fingerprint(dataclasses.replace(adapter, frequencies=(kept.copy(), kept.copy())))
    assert fingerprint(adapter) != fingerprint(dataclasses.replace(adapter, frequencies=(kept, kept[:-1])))


@pytest.mark.parametrize("as_url", [False, True])
def test_a_checkpoint_of_a_store_edited_or_rewritten_since_does_not_resume(tmp_path, monkeypatch, as_url):
    """The fingerprint hashes the layer's files (names, sizes, modification times), not only its Dask name,
    which stays the same when a store given by URL is rewritten, or when chunks are edited in place."""
    import zarr

    import chunkcca

    rng = np.random.default_rng(0)
    path = tmp_path / "s.zarr"
    location = path.as_uri() if as_url else str(path)
    chunkcca.write_activations(path, {"a": rng.standard_normal((40, 3)), "b": rng.standard_normal((40, 2))}, chunks=10)
    tree = chunkcca.open_activations(location)
    chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=tmp_path / "ckpt",
                             checkpoint_every=2)
    for file in (path / "a").rglob("*"):  # permissions are not content
        file.chmod(file.stat().st_mode | 0o020)
    again = chunkcca.open_activations(location)
    assert chunkcca.compute_moments(again["a"], again["b"], precision="float64", checkpoint=tmp_path / "ckpt").n == 40
    if as_url:
        chunkcca.write_activations(path, {"a": rng.standard_normal((40, 3)), "b": rng.standard_normal((40, 2))},
                                   chunks=10, overwrite=True)
    else:
        zarr.open_array(path / "a" / "activations", mode="r+")[:10] = 100.0
    edited = chunkcca.open_activations(location)
    assert edited["a"]["activations"].data.name == tree["a"]["activations"].data.name or not as_url
    with pytest.raises(ValueError, match=r"belongs to another run: the files of layer 'a' changed since \(its store "
                                         r"was rewritten or edited, or is a copy: their modification times count;"):
        chunkcca.compute_moments(edited["a"], edited["b"], precision="float64", checkpoint=tmp_path / "ckpt")


def test_checkpoints_are_told_apart_from_saved_moments_and_any_path_spelling_resumes(tmp_path, monkeypatch):
    import chunkcca

    rng = np.random.default_rng(1)
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((30, 3)),
                                                     "b": rng.standard_normal((30, 2))}, chunks=10)
    tree = chunkcca.open_activations(tmp_path / "s.zarr")
    moments = chunkcca.compute_moments(tree["a"], tree["b"], precision="float64")
    moments.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="is not a chunkcca checkpoint"):
        chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=tmp_path / "plain")
    chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    relative = chunkcca.open_activations("./s.zarr")
    resumed = chunkcca.compute_moments(relative["a"], relative["b"], precision="float64", checkpoint="ckpt")
    np.testing.assert_allclose(resumed.scatter, moments.scatter, rtol=1e-12)


def test_every_measure_takes_a_checkpoint(tmp_path):
    import chunkcca

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((60, 2, 2, 4)), rng.standard_normal((60, 2, 2, 3))
    options = dict(precision="float64", checkpoint=tmp_path / "ckpt", checkpoint_every=2)
    reads: list[int] = []

    def counted(block: np.ndarray) -> np.ndarray:
        reads.append(block.shape[0])
        return block

    a_layer, b_layer = (da.from_array(x, chunks=(10, 2, 2, -1)) for x in (a, b))
    a_layer = a_layer.map_blocks(counted)
    plain = chunkcca.cca(a_layer, b_layer, precision="float64")
    np.testing.assert_allclose(chunkcca.cca(a_layer, b_layer, **options)["rho"], plain["rho"], rtol=1e-12)
    assert reads.count(10) == 12  # 6 chunks, streamed twice: plainly and into the checkpoint
    # the finished checkpoint of the same layers and options serves the other CCA-family measures
    reads.clear()
    svcca = chunkcca.svcca(a_layer, b_layer, **options)
    assert 10 not in reads, "a finished checkpoint is solved without reading the layers again"
    assert float(svcca["rho_mean"]) == pytest.approx(float(chunkcca.svcca(a_layer, b_layer, precision="float64")
                                                           ["rho_mean"]), rel=1e-12)
    with pytest.raises(ValueError, match="belongs to another run: it holds no row-norm sums, which cka_debiased "
                                         "needs: give it a checkpoint of its own"):  # said "row_norms False then"
        chunkcca.cka(a_layer, b_layer, debiased=True, **options)


def test_a_checkpoint_with_row_norm_sums_serves_the_measures_that_do_not_need_them(tmp_path):
    """A debiased CKA's checkpoint was refused by cca and plain cka as "another run: row_norms True then, False
    now", an option they do not take (found by audit). A finished one now serves them; an unfinished one is
    carried on with the sums, so that it still serves debiased CKA."""
    import dask

    rng = np.random.default_rng(8)
    a = rng.standard_normal((60, 2, 2, 4))
    b = a[..., :3] + rng.standard_normal((60, 2, 2, 3))
    fail_at = {"chunk": 3}

    def block(i):
        if i == fail_at["chunk"]:
            fail_at["chunk"] = None
            raise KeyboardInterrupt("interrupted")
        return a[10 * i : 10 * i + 10]

    layer = da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(10, 2, 2, 4), dtype=float)
                            for i in range(6)])
    other = da.from_array(b, chunks=(10, 2, 2, -1))
    options = dict(precision="float64", checkpoint_every=1, scheduler="synchronous")
    finished = tmp_path / "finished"
    debiased = chunkcca.cka(a, b, debiased=True, checkpoint=finished, precision="float64")
    for measure in (chunkcca.cca, chunkcca.cka, chunkcca.pwcca):
        plain = measure(a, b, precision="float64")
        served = measure(a, b, checkpoint=finished, precision="float64")
        for name in plain.data_vars:
            if plain[name].dtype.kind in "fiu":
                np.testing.assert_allclose(served[name], plain[name], rtol=1e-12, atol=1e-14)
            else:
                np.testing.assert_array_equal(served[name], plain[name])
    unfinished = tmp_path / "unfinished"
    with pytest.raises(KeyboardInterrupt):
        chunkcca.cka(layer, other, debiased=True, checkpoint=unfinished, **options)
    resumed = chunkcca.cca(layer, other, checkpoint=unfinished, **options)
    np.testing.assert_allclose(resumed["rho"], chunkcca.cca(a, b, precision="float64")["rho"], rtol=1e-12)
    again = chunkcca.cka(layer, other, debiased=True, checkpoint=unfinished, **options)
    assert float(again["cka"]) == pytest.approx(float(debiased["cka"]), rel=1e-12)


def test_namesake_layers_resume_from_a_renamed_store_and_swapped_sides_are_named(tmp_path):
    """Layers of one path in two stores are told apart by their stores' folders ("conv2 (m0.zarr)"): the
    fingerprint held that name, so a store renamed since did not resume, though a moved one does (found by audit).
    It holds the path in the store now; the files tell the stores apart, and swapped sides are said to be."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((120, 4))
    y = x[:, :3] + rng.standard_normal((120, 3))
    for name, values in (("m0.zarr", x), ("m1.zarr", y), ("m2.zarr", y[:, ::-1] + 1), ("m3.zarr", y + 5)):
        chunkcca.write_activations(tmp_path / name, {"conv2": values}, chunks=40)
    checkpoint = tmp_path / "run.ckpt"
    first = chunkcca.cca(chunkcca.open_activations(tmp_path / "m0.zarr")["conv2"],
                         chunkcca.open_activations(tmp_path / "m1.zarr")["conv2"], precision="float64",
                         checkpoint=checkpoint)
    assert first.attrs["layer_a"] == "conv2 (m0.zarr)"
    (tmp_path / "m0.zarr").rename(tmp_path / "model0.zarr")
    a = chunkcca.open_activations(tmp_path / "model0.zarr")["conv2"]
    b = chunkcca.open_activations(tmp_path / "m1.zarr")["conv2"]
    resumed = chunkcca.cca(a, b, precision="float64", checkpoint=checkpoint)
    np.testing.assert_array_equal(resumed["rho"], first["rho"])
    assert resumed.attrs["layer_a"] == "conv2 (model0.zarr)"
    swapped = tmp_path / "swapped.ckpt"
    other = chunkcca.open_activations(tmp_path / "m2.zarr")["conv2"]
    chunkcca.cca(b, other, precision="float64", checkpoint=swapped)
    with pytest.raises(CheckpointError, match="it took the same layers in another order"):
        chunkcca.cca(other, b, precision="float64", checkpoint=swapped)
    with pytest.raises(CheckpointError, match=r"the files of layer 'conv2' changed since .*or it is another store's"):
        chunkcca.cca(b, chunkcca.open_activations(tmp_path / "m3.zarr")["conv2"], precision="float64",
                     checkpoint=swapped)


def test_checkpoint_groups_cut_a_chunk_only_where_its_ends_fall_between(tmp_path):
    """Layers chunked differently (5 and 20 datapoints): checkpoint groups of 4 chunks of the largest layer cut
    where the other's chunks end too, so each chunk of the wide-chunked layer is read once."""
    import dask

    import chunkcca

    reads: list[int] = []

    def block(i):
        reads.append(i)
        return np.random.default_rng(i).standard_normal((20, 3))

    wide = da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(20, 3), dtype=float) for i in range(3)])
    narrow = da.from_array(np.random.default_rng(9).standard_normal((60, 6)), chunks=5)  # the larger
    got = chunkcca.compute_moments(narrow, wide, precision="float64", checkpoint=tmp_path / "ckpt",
                                   checkpoint_every=4)  # the narrow-chunked layer first
    assert sorted(reads) == [0, 1, 2]
    want = chunkcca.compute_moments(narrow, wide, precision="float64")
    np.testing.assert_allclose(got.scatter, want.scatter, rtol=1e-12)


def test_layers_chunked_apart_are_saved_at_the_largest_layers_chunk_ends(tmp_path, monkeypatch):
    """Layers in chunks of 64 and 100 datapoints end chunks together first at 1600, and a conv layer beside an fc
    layer of one chunk never: a checkpointed run was cut only where all do, so it was saved once, when done (a
    run stopped at 99% kept nothing). It is now cut at the chunk ends of the largest layer (in a store, chunked by
    bytes, the one with the most chunks); an interrupted run resumes from there, equal to a whole run (with a
    stride, whose rows continue across the cuts)."""
    import chunkcca.passes

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 2, 2, 4))
    narrow = da.from_array(x, chunks=(64, 2, 2, 4))
    wide = da.from_array(x[..., :3] * 2 + rng.standard_normal((600, 2, 2, 3)), chunks=(100, 2, 2, 3))
    saved: list[int] = []
    save = chunkcca.passes.save_progress

    def save_until_256(*args, **kwargs):
        save(*args, **kwargs)
        saved.append(args[2])
        if args[2] == 256:
            raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(chunkcca.passes, "save_progress", save_until_256)
    options = {"precision": "float64", "stride": 3, "checkpoint": tmp_path / "ckpt", "checkpoint_every": 2}
    with pytest.raises(KeyboardInterrupt):
        chunkcca.compute_moments(wide, narrow, **options)  # the largest layer second
    assert saved == [128, 256]
    saved.clear()
    resumed = chunkcca.compute_moments(wide, narrow, **options)
    assert saved == [384, 512, 600]
    whole = chunkcca.compute_moments(wide, narrow, precision="float64", stride=3)
    assert resumed.n == whole.n
    np.testing.assert_allclose(resumed.scatter, whole.scatter, rtol=1e-12)
    np.testing.assert_allclose(resumed.mean, whole.mean, rtol=1e-12)
    saved.clear()
    monkeypatch.setattr(chunkcca.passes, "save_progress", lambda *args, **kwargs: saved.append(args[2]))
    fc = da.from_array(x[:, 0, 0, :2], chunks=600)  # one chunk beside five
    chunkcca.compute_moments(narrow[:320], fc[:320], precision="float64", spatial="avgpool",
                             checkpoint=tmp_path / "fc", checkpoint_every=1)
    assert saved == [64, 128, 192, 256, 320]


def test_an_unreadable_or_older_checkpoint_is_named_as_such(tmp_path):
    import json

    from chunkcca import cca
    from chunkcca.checkpoint import CheckpointError, load_progress

    x = np.random.default_rng(0).standard_normal((40, 3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    # someone else's folder or file: named, and never "remove it" (as for a damaged checkpoint)
    with pytest.raises(CheckpointError, match=r"checkpoint .*empty is not a chunkcca checkpoint \(a folder without "
                                              r"zarr.json\); pass another checkpoint path$"):
        cca(x, x[:, :2], checkpoint=tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"notes.txt is not a chunkcca checkpoint \(a file\); pass another"):
        cca(x, x[:, :2], checkpoint=tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zarr.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"checkpoint .*broken cannot be read .*; remove it or pass another"):
        cca(x, x[:, :2], checkpoint=tmp_path / "broken")
    cca(x, x[:, :2], checkpoint=tmp_path / "run")
    moments, done, fingerprint = load_progress(tmp_path / "run")
    older = json.loads(fingerprint)
    del older["format"]  # as the checkpoints of chunkcca before the re-laid package
    moments.save(tmp_path / "old", attrs={"datapoints_done": done, "fingerprint": json.dumps(older)})
    with pytest.raises(CheckpointError, match="made by another version of chunkcca"):
        cca(x, x[:, :2], checkpoint=tmp_path / "old")


def test_a_checkpoint_saved_before_value_rounding_resumes_quietly_with_the_layers_rounding(tmp_path):
    """A checkpoint of the same format saved before Moments recorded value_rounding: the saved Moments' warning
    (compute again, or replace a field of Moments the user never held) does not apply, as the run takes the
    rounding from its layers; the resumed result equals a fresh run."""
    import json
    import warnings

    x = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    y = x[:, :2] + 1
    chunkcca.cca(x, y, checkpoint=tmp_path / "run")
    metadata = json.loads((tmp_path / "run" / "zarr.json").read_text())
    del metadata["attributes"]["value_rounding"]  # as saved then, without the digest of the attributes too
    for key in (chunkcca.moments.ATTRIBUTES_ATTR, chunkcca.moments.ARRAYS_ATTR, chunkcca.moments.SAVE_ATTR):
        del metadata["attributes"][key]
    (tmp_path / "run" / "zarr.json").write_text(json.dumps(metadata))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = chunkcca.cca(x, y, checkpoint=tmp_path / "run")
    fresh = chunkcca.cca(x, y)
    np.testing.assert_array_equal(resumed["rho"], fresh["rho"])


def test_a_checkpoint_of_one_slice_of_a_store_does_not_resume_another(tmp_path):
    """Two slices of one store have the same shape, dtype and files: their Dask graphs tell them apart. So do a
    layer rolled or given other data, which keep the store's encoding (they resumed the layer's checkpoint)."""
    import chunkcca

    rng = np.random.default_rng(2)
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((40, 3)),
                                                     "b": rng.standard_normal((40, 2))}, chunks=10)
    tree = chunkcca.open_activations(tmp_path / "s.zarr")
    first, second = ({name: tree[name].isel(datapoint=part) for name in "ab"}
                     for part in (slice(0, 20), slice(20, 40)))
    done = chunkcca.compute_moments(first["a"], first["b"], precision="float64", checkpoint=tmp_path / "ckpt")
    assert chunkcca.compute_moments(first["a"], first["b"], precision="float64",
                                    checkpoint=tmp_path / "ckpt").n == done.n == 20
    with pytest.raises(ValueError, match=r"layer 'a.* holds other data \(or is computed otherwise\) than then"):
        chunkcca.compute_moments(second["a"], second["b"], precision="float64", checkpoint=tmp_path / "ckpt")
    whole = chunkcca.cca(tree["a"], tree["b"], precision="float64", checkpoint=tmp_path / "whole")
    layer = tree["a"]["activations"]
    for other in (layer.roll(datapoint=1, roll_coords=False), layer.copy(data=layer.data[::-1])):
        assert other.encoding["layer"] == "a"
        with pytest.raises(ValueError, match=r"holds other data \(or is computed otherwise\) than then"):
            chunkcca.cca(other.rename("a"), tree["b"], precision="float64", checkpoint=tmp_path / "whole")
    again = chunkcca.cca(tree["a"], tree["b"], precision="float64", checkpoint=tmp_path / "whole")
    np.testing.assert_array_equal(again["rho"], whole["rho"])


def test_damaged_saved_moments_and_checkpoints_are_errors_not_other_numbers(tmp_path):
    """Without checksums 25 of 40 single-bit flips in a checkpoint's scatter changed rho_mean silently (0.5704 to
    0.5919), and a deleted chunk file read as zeros ("every row holds NaN or Inf")."""
    import os

    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 3))
    y = x[:, :2] + rng.standard_normal((300, 2))
    moments = chunkcca.compute_moments(x, y, precision="float64")
    chunk = tmp_path / "m.moments" / "scatter" / "c" / "0" / "0"
    for position in range(0, 64, 7):  # bits across the 4 × 5 float64 scatter's chunk
        moments.save(tmp_path / "m.moments", overwrite=True)
        damaged = bytearray(chunk.read_bytes())
        damaged[position] ^= 1 << (position % 8)
        chunk.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match=r"saved Moments at .*m.moments are damaged: a file fails its checksum"):
            Moments.load(tmp_path / "m.moments")
    moments.save(tmp_path / "m.moments", overwrite=True)
    os.remove(tmp_path / "m.moments" / "n" / "c")
    with pytest.raises(ValueError, match=r"are damaged: 'n' lacks 1 of its 1 chunk files"):
        Moments.load(tmp_path / "m.moments")
    # another array's chunk file, which passes its own checksum: zarr's bare "cannot reshape" (found by audit)
    moments.save(tmp_path / "m.moments", overwrite=True)
    saved = tmp_path / "m.moments"
    (saved / "sizes" / "c" / "0").write_bytes((saved / "mean" / "c" / "0").read_bytes())
    with pytest.raises(ValueError, match=r"^saved Moments at .*m.moments are damaged: an array cannot be read as "
                                         r"saved \(cannot reshape"):
        Moments.load(tmp_path / "m.moments")
    chunkcca.cca(da.from_array(x, chunks=100), y, precision="float64", checkpoint=tmp_path / "run")
    os.remove(tmp_path / "run" / "mean" / "c" / "0")
    with pytest.raises(CheckpointError, match=r"checkpoint .*run cannot be read \(ValueError: saved Moments "
                                                       r"at .*run are damaged: 'mean' lacks 1 of its 1 chunk files"):
        chunkcca.cca(da.from_array(x, chunks=100), y, precision="float64", checkpoint=tmp_path / "run")


@pytest.mark.parametrize("change", ["transposed", "reordered"])
def test_a_layer_chunkcca_transposes_or_reorders_does_not_resume_after_its_store_is_edited(tmp_path, change):
    """Reordered by label or transposed to its partner's positions, a layer is no longer as opened; its checkpoint
    was then keyed by its Dask name alone, which an edited chunk file leaves as it is: the stale statistics
    resumed (0.99999 against 0.7578)."""
    import zarr

    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 2, 2, 3))
    y = np.einsum("nhwc,cd->nhwd", x, rng.standard_normal((3, 2))) + rng.standard_normal((40, 2, 2, 2))
    dims = ("datapoint", "height", "width", "channel")
    b = xr.DataArray(y, dims=dims)
    if change == "transposed":
        b = b.transpose("datapoint", "width", "height", "channel")
    else:
        b = b.isel(datapoint=slice(None, None, -1)).assign_coords(datapoint=np.arange(40)[::-1])
    a = xr.DataArray(x, dims=dims, coords={"datapoint": np.arange(40)})  # labelled, so that b pairs by label
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"a": a, "b": b}, chunks=10)
    run = {"precision": "float64", "checkpoint": tmp_path / "run"}
    with pytest.warns() if change == "reordered" else contextlib.nullcontext():
        chunkcca.cca(tree["a"], tree["b"], **run)
    stored = zarr.open_array(tmp_path / "s.zarr" / "b" / "activations", mode="r+")
    stored[:10] = stored[:10] * 2 + 1  # one chunk edited in place (one moved from elsewhere is refused as damage)
    tree = chunkcca.open_activations(tmp_path / "s.zarr")
    with pytest.raises(CheckpointError, match=r"the files of layer 'b' changed since"), \
            (pytest.warns() if change == "reordered" else contextlib.nullcontext()):
        chunkcca.cca(tree["a"], tree["b"], **run)


def test_a_checkpoint_in_a_missing_folder_is_refused_before_any_work(tmp_path):
    """The API made the missing folder while the command line refused it: one rule, as for every output."""
    x = np.random.default_rng(0).standard_normal((40, 3))
    with pytest.raises(ValueError, match=r"checkpoint .*none/run.moments: no folder .*none$"):
        chunkcca.cca(x, x[:, :2], checkpoint=tmp_path / "none" / "run.moments")
    assert not (tmp_path / "none").exists()


def test_a_checkpoint_does_not_resume_with_another_padding_mask(tmp_path):
    """The fingerprint held the activations' files, not the mask's: a run interrupted and resumed with the mask
    given anew (``assign_coords``), rewritten in the store or left out merged the statistics of two row sets
    (n 4046 against 4800 in the audit's case)."""
    import zarr

    rng = np.random.default_rng(2)
    x = rng.standard_normal((80, 6, 3))
    mask = np.arange(6) < rng.integers(2, 7, 80)[:, None]
    path, checkpoint = tmp_path / "s.zarr", tmp_path / "ckpt"
    tree = chunkcca.write_activations(path, {"a": x, "b": x[..., :2] + 1}, masks={"a": mask, "b": mask}, chunks=10)
    chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=checkpoint, checkpoint_every=2)
    moved = chunkcca.open_activations(path)
    assert chunkcca.compute_moments(moved["a"], moved["b"], precision="float64", checkpoint=checkpoint).n == \
        mask.sum(), "the same store and mask resume"
    full = np.ones_like(mask)
    given = [tree[side]["activations"].assign_coords(mask=(("datapoint", "token"), full)) for side in "ab"]
    dropped = [tree[side]["activations"].drop_vars("mask") for side in "ab"]
    for sides in (given, dropped):
        with pytest.raises(CheckpointError, match="belongs to another run: layer 'a' has another padding mask"):
            chunkcca.compute_moments(*sides, precision="float64", checkpoint=checkpoint)
    in_memory = [xr.DataArray(da.from_array(values, chunks=10), dims=("datapoint", "token", "channel"),
                              coords={"mask": (("datapoint", "token"), mask)}) for values in (x, x[..., :2] + 1)]
    for _ in range(2):  # a numpy mask beside Dask activations (it raised KeyError 'store'), then resumed
        assert chunkcca.compute_moments(*in_memory, precision="float64", checkpoint=tmp_path / "mem",
                                        checkpoint_every=2).n == mask.sum()
    zarr.open_group(path, mode="r+")["a/mask"][:40] = full[:40]
    rewritten = chunkcca.open_activations(path)
    with pytest.raises(CheckpointError, match="belongs to another run: the files of layer 'a' changed since"):
        chunkcca.compute_moments(rewritten["a"], rewritten["b"], precision="float64", checkpoint=checkpoint)


def test_a_store_on_a_filesystem_without_modification_times_edited_in_place_does_not_resume(tmp_path):
    """fsspec's memory filesystem gives a file's size and when it was made, none of the modification times or
    tags the fingerprint read: a chunk rewritten at its size resumed, merging old and new statistics."""
    import fsspec
    import zarr

    rng = np.random.default_rng(16)
    source = tmp_path / "s.zarr"
    chunkcca.write_activations(source, {"a": rng.standard_normal((40, 3)), "b": rng.standard_normal((40, 2))},
                               chunks=10, compression=None)
    memory = fsspec.filesystem("memory")
    for file in source.rglob("*"):
        if file.is_file():
            memory.pipe(f"/edited-in-place/{file.relative_to(source)}", file.read_bytes())
    try:
        tree = chunkcca.open_activations("memory://edited-in-place")
        checkpoint = tmp_path / "ckpt"
        chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=checkpoint, checkpoint_every=2)
        again = chunkcca.open_activations("memory://edited-in-place")
        assert chunkcca.compute_moments(again["a"], again["b"], precision="float64", checkpoint=checkpoint).n == 40
        zarr.open_group("memory://edited-in-place", mode="r+")["a/activations"][:10] = -1.0  # same size, uncompressed
        edited = chunkcca.open_activations("memory://edited-in-place")
        with pytest.raises(CheckpointError, match="the files of layer 'a' changed since"):
            chunkcca.compute_moments(edited["a"], edited["b"], precision="float64", checkpoint=checkpoint)
    finally:
        memory.rm("/edited-in-place", recursive=True)


def test_a_checkpoint_loaded_as_moments_names_its_layers_rows_and_rounding(tmp_path):
    """A checkpoint loaded with Moments.load had no layers, rows_from, channel labels or rounding (it was saved
    before the run marked its Moments): merging it with Moments of other rows (avgpool) gave n = 4800 + 300,
    silently, and value_rounding 0 claimed exact values."""
    rng = np.random.default_rng(0)
    a = xr.DataArray(rng.standard_normal((30, 4, 4, 3)).astype("float32"), dims=("datapoint", "height", "width",
                     "channel"), coords={"channel": ["x", "y", "z"]}, name="net/a").chunk({"datapoint": 10})
    b = xr.DataArray(rng.standard_normal((30, 4, 4, 2)), dims=a.dims, name="net/b").chunk({"datapoint": 10})
    path = tmp_path / "run.moments"
    run = chunkcca.compute_moments(a, b, checkpoint=path, stride=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finished run's: nothing to say
        saved = Moments.load(path)
    assert saved.layers == run.layers == ("net/a", "net/b") and saved.rows_from == run.rows_from
    assert saved.rows_from == "spatial='flatten', stride=2"
    assert saved.value_rounding == run.value_rounding == (chunkcca.moments.value_eps(np.float32), 0.0)
    assert saved.channel_labels[0].tolist() == ["x", "y", "z"]
    with pytest.raises(ValueError, match="cannot merge Moments whose rows were made differently"):
        saved + chunkcca.compute_moments(a, b, spatial="avgpool")
    np.testing.assert_allclose(chunkcca.cca_from_moments(saved)["rho"], chunkcca.cca(a, b, stride=2)["rho"],
                               atol=1e-6)


def test_a_resumed_run_says_so_with_its_progress(tmp_path, capsys, caplog):
    """A resumed or finished checkpoint gave no sign of it: a finished one printed its result at once, silently.
    With the progress lines it says so on stderr; without them, in chunkcca's log (INFO), which the command
    shows."""
    rng = np.random.default_rng(0)
    a = xr.DataArray(rng.standard_normal((40, 3)), dims=("datapoint", "channel"), name="a").chunk({"datapoint": 10})
    b = a[:, :2] + rng.standard_normal((40, 2))
    path = tmp_path / "run.moments"
    first = chunkcca.cca(a, b, checkpoint=path, progress=True)
    assert "resuming" not in capsys.readouterr().err
    again = chunkcca.cca(a, b, checkpoint=path, progress=True)
    assert capsys.readouterr().err == (f"resuming from the checkpoint {path}: 40 of 40 datapoints done, nothing left "
                                       f"to read\n")
    np.testing.assert_array_equal(again["rho"], first["rho"])
    with caplog.at_level("INFO", logger="chunkcca"):
        chunkcca.cca(a, b, checkpoint=path, progress=False)
    assert capsys.readouterr().err == ""  # no progress asked: nothing printed
    assert [(record.name, record.levelname, record.getMessage()) for record in caplog.records] == [
        ("chunkcca", "INFO", f"resuming from the checkpoint {path}: 40 of 40 datapoints done, nothing left to read")]


@pytest.mark.parametrize("labels", [
    pd.MultiIndex.from_arrays([[0, 0, 1], ["u", "v", "u"]], names=("group", "unit")),
    pd.Index([1, "x", 2.0], dtype=object),
    np.array([b"u", b"v", b"w"]),  # read back as one label b"uvw" (found by audit)
])
def test_channel_labels_a_save_cannot_hold_are_refused_before_any_read(tmp_path, labels):
    """A MultiIndex's tuples, or labels of mixed types, streamed the first group of chunks and then failed in
    zarr ("setting an array element with a sequence"; "unable to infer dtype"); now named before any read, and
    Moments.save names them too. Measures without a checkpoint take them as they are."""
    rng = np.random.default_rng(1)
    a = xr.DataArray(rng.standard_normal((40, 3)), dims=("datapoint", "channel"), name="a")
    a = a.assign_coords(xr.Coordinates.from_pandas_multiindex(labels, "channel") if isinstance(labels, pd.MultiIndex)
                        else {"channel": labels})
    b = xr.DataArray(rng.standard_normal((40, 2)), dims=("datapoint", "channel"), name="b")
    reads: list[int] = []
    counted = da.from_array(a.values, chunks=10).map_blocks(lambda block: reads.append(1) or block,
                                                            meta=np.array((), dtype=float))
    with pytest.raises(ValueError, match=r"the channel labels of layer 'a' are .* which saved Moments and "
                                         r"checkpoints (cannot hold|read back as one label)"):
        chunkcca.cca(a.copy(data=counted), b, checkpoint=tmp_path / "run.ckpt")
    assert reads == [] and not (tmp_path / "run.ckpt").exists()
    moments = chunkcca.compute_moments(a, b, precision="float64")
    with pytest.raises(ValueError, match=r"the channel labels of layer 'a'"):
        moments.save(tmp_path / "m.moments")
    assert not (tmp_path / "m.moments").exists()
    result = chunkcca.cca(a, b, precision="float64")
    assert result["channel_a"].size == 3
    if isinstance(labels, pd.MultiIndex):  # its tuples: numpy's "setting an array element with a sequence"
        for name in ("r.nc", "r.zarr"):
            with pytest.raises(ValueError, match=r"'channel_a' holds tuples \(\[\(0, 'u'\), \(0, 'v'\)\]…\), which "
                                                 r"netCDF and zarr cannot hold.*reset_index\('channel'\)"):
                chunkcca.save_result(result, tmp_path / name)
            assert not (tmp_path / name).exists()
    plain = a.reset_index("channel") if isinstance(labels, pd.MultiIndex) else \
        a.assign_coords(channel=a["channel"].astype(str))
    chunkcca.cca(plain, b, checkpoint=tmp_path / "plain.ckpt")
    chunkcca.save_result(chunkcca.cca(plain, b), tmp_path / "plain.nc")


def test_a_chunk_rewritten_with_its_size_and_modification_time_kept_does_not_resume(tmp_path):
    """A chunk file replaced by another of the same size (no compression), its modification time set back as
    ``cp -p`` or ``rsync -t`` do, resumed a finished checkpoint with the old Moments (mean ρ 0.76, 0.66 fresh)."""
    import chunkcca

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((40, 3)), rng.standard_normal((40, 2))
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": a, "b": b}, chunks=10, compression=None)
    chunkcca.write_activations(tmp_path / "t.zarr", {"a": a + rng.standard_normal((40, 3)), "b": b}, chunks=10,
                               compression=None)
    tree = chunkcca.open_activations(tmp_path / "s.zarr")
    chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=tmp_path / "ckpt")
    chunk = sorted(
        path for path in (tmp_path / "s.zarr" / "a" / "activations" / "c").rglob("*") if path.is_file())[0]
    other = tmp_path / "t.zarr" / chunk.relative_to(tmp_path / "s.zarr")
    assert chunk.stat().st_size == other.stat().st_size and chunk.read_bytes() != other.read_bytes()
    kept = chunk.stat()
    chunk.write_bytes(other.read_bytes())
    os.utime(chunk, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    edited = chunkcca.open_activations(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="belongs to another run: the files of layer 'a' changed since"):
        chunkcca.compute_moments(edited["a"], edited["b"], precision="float64", checkpoint=tmp_path / "ckpt")



def test_a_zarr_array_read_by_path_or_through_any_store_is_known_by_its_files(tmp_path):
    """``dask.array.from_zarr(path)`` reads through zarr's FsspecStore, whose name is no path
    ("<FsspecStore(AsyncFileSystemWrapper, …)>"): the fingerprint listed no file, and after the array was
    rewritten the finished checkpoint gave the old CKA, 0.432 for 0.332, silently (found by audit). Each zarr
    array a graph reads is listed through its own store's filesystem; one whose files cannot be listed (an
    in-memory store) is refused, not fingerprinted by nothing."""
    import zarr

    rng = np.random.default_rng(28)
    x = rng.standard_normal((400, 5))
    y = x[:, :4] + rng.standard_normal((400, 4))
    path = str(tmp_path / "z.zarr")
    zarr.open_array(path, mode="w", shape=x.shape, chunks=(50, 5), dtype="f8")[:] = x
    for read in (lambda: da.from_zarr(path), lambda: da.from_zarr(zarr.open_array(path, mode="r"))):
        checkpoint = tmp_path / f"ckpt{len(list(tmp_path.glob('ckpt*')))}"
        first = float(chunkcca.cka(read(), y, precision="float64", checkpoint=checkpoint)["cka"])
        assert first == pytest.approx(float(chunkcca.cka(x, y, precision="float64")["cka"]), abs=1e-12)
        assert float(chunkcca.cka(read(), y, precision="float64", checkpoint=checkpoint)["cka"]) == first  # resumed
        zarr.open_array(path, mode="r+")[:50] = -3 * x[:50]  # rewritten: another run
        with pytest.raises(CheckpointError, match=r"belongs to another run: the files of layer 'a' changed since"):
            chunkcca.cka(read(), y, precision="float64", checkpoint=checkpoint)
        zarr.open_array(path, mode="r+")[:50] = x[:50]
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=x.shape, chunks=(50, 5), dtype="f8")
    in_memory[:] = x
    with pytest.raises(CheckpointError, match=r"layer 'a' reads the zarr array .* from a MemoryStore, whose files a "
                                              r"checkpoint cannot list"):
        chunkcca.cka(da.from_zarr(in_memory), y, checkpoint=tmp_path / "ckpt")


def test_a_finished_checkpoint_in_a_folder_that_cannot_be_written_is_read(tmp_path, monkeypatch):
    """The check that a checkpoint's folder can be written refused a finished one on a read-only share, which is
    only read; a run left to do is refused before it streams. (os.access is patched: as root, bits do not refuse.)"""
    import chunkcca

    rng = np.random.default_rng(0)
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((40, 3)),
                                                            "b": rng.standard_normal((40, 2))}, chunks=10)
    shared = tmp_path / "shared"
    shared.mkdir()
    done = chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=shared / "done")
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(shared) and real(path, mode))
    again = chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=shared / "done")
    np.testing.assert_array_equal(again.scatter, done.scatter)
    with pytest.raises(PermissionError, match=r"checkpoint .*shared/new: the folder .*shared cannot be written to"):
        chunkcca.compute_moments(tree["a"], tree["b"], precision="float64", checkpoint=shared / "new")


def test_a_checkpoint_of_another_layer_names_the_side_that_changed(tmp_path):
    """``compare s x x`` then ``compare s x y`` said "layer 'x' has another name (a (x) then, x now)": the side
    whose layer changed is named, with the layers as given (a layer against itself keeps its name)."""
    import chunkcca

    rng = np.random.default_rng(0)
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {name: rng.standard_normal((40, 3)) for name in "xy"})
    chunkcca.compute_moments(tree["x"], tree["x"], checkpoint=tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"belongs to another run: the b side's layer was 'x' then, 'y' now"):
        chunkcca.compute_moments(tree["x"], tree["y"], checkpoint=tmp_path / "ckpt")


def _edit_attribute(path, key, value):
    """Set one root attribute in the ``zarr.json`` at ``path`` (the JSON stays valid)."""
    import json

    metadata = json.loads((path / "zarr.json").read_text())
    metadata["attributes"][key] = value
    (path / "zarr.json").write_text(json.dumps(metadata))


@pytest.mark.parametrize(("key", "value"), [("datapoints_done", 100), ("value_rounding", [0.0, 0.5]),
                                            ("layers", ["a", "c"])])
@pytest.mark.parametrize("digest", ["kept", "taken out"])
def test_a_checkpoint_whose_attributes_were_edited_is_refused_not_resumed(tmp_path, key, value, digest):
    """The root attributes of saved Moments carried no checksum: a finished checkpoint's datapoints_done edited from
    200 to 100 (one digit; the JSON stays valid) made the next run add datapoints 100-200 again, silently (rows 300
    of 200, rho_mean 0.68973 against 0.69010). A digest of them is recorded beside them and checked on load; taken
    out, the save was taken for one made before digests, and resumed (found by audit): a save holding what later
    saves record (the arrays' digest, the save's id) without it is refused."""
    import json

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    y = x @ rng.standard_normal((4, 3)) + rng.standard_normal((200, 3))
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"a": x, "b": y}, chunks=20)
    chunkcca.cca(tree["a"], tree["b"], checkpoint=tmp_path / "run")
    _edit_attribute(tmp_path / "run", key, value)
    if digest == "taken out":
        metadata = json.loads((tmp_path / "run" / "zarr.json").read_text())
        del metadata["attributes"][chunkcca.moments.ATTRIBUTES_ATTR]
        (tmp_path / "run" / "zarr.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"checkpoint .*run cannot be resumed from: its metadata \(the "
                                              r"attributes in zarr.json.*\) was changed or damaged since it was "
                                              r"written; remove it to start again$"):
        chunkcca.cca(tree["a"], tree["b"], checkpoint=tmp_path / "run")
    with pytest.raises(ValueError, match=r"saved Moments at .*run are damaged: their metadata \(the attributes in "
                                         r"zarr.json.*\) was changed or damaged since they were written"):
        Moments.load(tmp_path / "run")


def test_a_checkpoint_saved_before_the_attributes_digest_resumes_as_before(tmp_path):
    """Saves record a digest of their root attributes; one made before (without it) loads, and an unfinished
    run's checkpoint resumes to the uninterrupted result."""
    import json

    import dask

    fail_at = {"chunk": 5}

    def block(i):
        if i == fail_at["chunk"]:
            fail_at["chunk"] = None
            raise KeyboardInterrupt("interrupted")
        return np.random.default_rng(i).standard_normal((10, 3)) + i

    layer = da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(10, 3), dtype=float) for i in range(8)])
    other = layer[:, :2] * 2 + 1
    with pytest.raises(KeyboardInterrupt):
        chunkcca.cca(layer, other, precision="float64", checkpoint=tmp_path / "run", checkpoint_every=2,
                     scheduler="synchronous")
    metadata = json.loads((tmp_path / "run" / "zarr.json").read_text())
    for key in (chunkcca.moments.ATTRIBUTES_ATTR, chunkcca.moments.ARRAYS_ATTR, chunkcca.moments.SAVE_ATTR):
        del metadata["attributes"][key]  # as saved before they were recorded
    (tmp_path / "run" / "zarr.json").write_text(json.dumps(metadata))
    with pytest.warns(UserWarning, match="stopped after 40 of its 80 datapoints"):
        assert Moments.load(tmp_path / "run").n == 40
    resumed = chunkcca.cca(layer, other, precision="float64", checkpoint=tmp_path / "run", checkpoint_every=2,
                           scheduler="synchronous")
    whole = chunkcca.cca(layer, other, precision="float64")
    assert resumed.rows.item() == whole.rows.item() == 80
    np.testing.assert_allclose(resumed["rho"], whole["rho"], rtol=1e-12)


def test_saved_moments_named_as_a_netcdf_file_are_refused(tmp_path):
    """checkpoint="run.nc" wrote a zarr folder named as a netCDF file (xarray.open_dataset of it failed, and a
    script's os.remove of it; found by audit): saved Moments and checkpoints refuse the .nc name, saying why."""
    a = np.random.default_rng(0).standard_normal((50, 3))
    moments = chunkcca.compute_moments(a, a[:, :2])
    with pytest.raises(ValueError, match=r"Moments.save: .*m.nc: saved Moments are a zarr store \(a folder\), not a "
                                         r"netCDF file; name it otherwise, e.g. .*m.moments"):
        moments.save(tmp_path / "m.nc")
    with pytest.raises(ValueError, match=r"checkpoint .*run.NC: saved Moments are a zarr store"):
        chunkcca.cca(a, a[:, :2], checkpoint=tmp_path / "run.NC")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_holding_a_users_files_is_refused_before_the_run(tmp_path):
    """A run resumed from a checkpoint saves over it: a user's notes put inside an interrupted run's checkpoint
    went with the first save. Now refused before any chunk is read (and before zarr warns of the notes), naming
    them; a finished checkpoint, which nothing saves over, is read as before (review)."""
    import dask

    rng = np.random.default_rng(41)
    a, b = rng.standard_normal((80, 3)), da.from_array(rng.standard_normal((80, 2)), chunks=(10, 2))
    reads: list[int] = []
    stop = {"at": 5}

    def block(i: int) -> np.ndarray:
        if i == stop["at"]:
            stop["at"] = None
            raise KeyboardInterrupt("interrupted")
        reads.append(i)
        return a[10 * i : 10 * i + 10]

    layer_a = da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(10, 3), dtype=float) for i in range(8)])
    path = tmp_path / "run.moments"
    with pytest.raises(KeyboardInterrupt):
        chunkcca.compute_moments(layer_a, b, checkpoint=path, checkpoint_every=2, scheduler="synchronous",
                                 precision="float64")
    (path / "NOTES.txt").write_text("why this run stopped")
    reads.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refusal comes first, alone
        with pytest.raises(FileExistsError, match=r"run\.moments holds what chunkcca did not write \(NOTES\.txt\); "
                                                  r"saving the run's progress replaces only Moments that chunkcca "
                                                  r"saved"):
            chunkcca.compute_moments(layer_a, b, checkpoint=path, checkpoint_every=2, scheduler="synchronous",
                                 precision="float64")
    assert reads == [] and (path / "NOTES.txt").read_text() == "why this run stopped"
    (path / "NOTES.txt").unlink()
    resumed = chunkcca.compute_moments(layer_a, b, checkpoint=path, checkpoint_every=2, scheduler="synchronous",
                                 precision="float64")
    assert resumed.n == 80 and sorted(reads) == [4, 5, 6, 7]
    (path / "NOTES.txt").write_text("a finished run")
    again = chunkcca.compute_moments(layer_a, b, checkpoint=path, checkpoint_every=2,
                                     precision="float64")  # nothing saved over it
    np.testing.assert_array_equal(again.scatter, resumed.scatter)
    assert (path / "NOTES.txt").read_text() == "a finished run"


def test_the_labels_hash_holds_a_few_labels_as_text_at_a_time():
    """The fingerprint made every datapoint label text at once: 430 MiB for 4 million labels, more than the store
    itself, just for passing checkpoint= (found by audit). It takes them a slice at a time, hashing the same
    bytes, so checkpoints made before resume."""
    import hashlib
    import tracemalloc

    from chunkcca.checkpoint import LABELS_AT_ONCE, _labels_hash

    count = 1_000_000
    layer = xr.DataArray(np.zeros((count, 1), np.float32), dims=("datapoint", "channel"),
                         coords={"datapoint": np.arange(count) * 7})
    whole = hashlib.sha256()  # all at once, as before
    whole.update(b"channel:1:")
    whole.update(b"0")
    whole.update(f"datapoint:{count}:".encode())
    whole.update("\x1f".join(map(str, layer.indexes["datapoint"].tolist())).encode())
    tracemalloc.start()
    try:
        made = _labels_hash(layer.assign_coords(channel=[0]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert made == whole.hexdigest()
    assert peak < 2 * LABELS_AT_ONCE * 100, peak  # a slice of labels as Python ints and text (it was ~100 MiB)


def test_an_unfinished_checkpoint_that_lost_a_chunk_file_is_said_to_be_damaged(tmp_path):
    """An unfinished checkpoint whose scatter lost its chunk file was said to hold "what chunkcca did not write
    (scatter/c/0/)", the folder the file was in, and to be moved out of the way; then the same of scatter/c/ (found
    by audit). Where a chunk file lies is the array's: the checkpoint is damaged, as a finished one is said to be."""
    import os

    import dask

    def block(i):
        if i == 5:
            raise KeyboardInterrupt("interrupted")
        return np.random.default_rng(i).standard_normal((10, 3)) + i

    layer = da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(10, 3), dtype=float) for i in range(8)])
    with pytest.raises(KeyboardInterrupt):
        chunkcca.cca(layer, layer[:, :2] * 2 + 1, precision="float64", checkpoint=tmp_path / "run",
                     checkpoint_every=2, scheduler="synchronous")
    for chunk in (tmp_path / "run" / "scatter" / "c").rglob("*"):
        if chunk.is_file():
            os.remove(chunk)
    with pytest.raises(CheckpointError, match=r"checkpoint .*run cannot be read \(ValueError: saved Moments at .*run "
                                              r"are damaged: 'scatter' lacks 1 of its 1 chunk files"):
        chunkcca.cca(layer, layer[:, :2] * 2 + 1, precision="float64", checkpoint=tmp_path / "run",
                     checkpoint_every=2, scheduler="synchronous")


def test_an_unfinished_checkpoint_that_cannot_be_replaced_is_refused_before_reading(tmp_path, monkeypatch):
    """An unfinished checkpoint whose own folder cannot be written (a colleague's, in a shared folder) was found
    only at the run's first save, after a group of chunks had been read in vain (found by audit). (os.access is
    patched: as root, bits do not refuse.)"""
    import dask

    def block(i):
        if i == 5 and not done:
            raise KeyboardInterrupt("interrupted")
        read.append(i)
        return np.random.default_rng(i).standard_normal((10, 3)) + i

    done, read = [], []
    layer = da.concatenate([da.from_delayed(dask.delayed(block)(i), shape=(10, 3), dtype=float) for i in range(8)])
    with pytest.raises(KeyboardInterrupt):
        chunkcca.cca(layer, layer[:, :2] * 2 + 1, checkpoint=tmp_path / "run", checkpoint_every=2,
                     scheduler="synchronous")
    done.append(True)
    read.clear()
    real = os.access
    checkpoint = str(tmp_path / "run")
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != checkpoint and real(path, mode))
    with pytest.raises(PermissionError, match=r"run cannot be replaced: the folder itself cannot be written to"):
        chunkcca.cca(layer, layer[:, :2] * 2 + 1, checkpoint=tmp_path / "run", checkpoint_every=2,
                     scheduler="synchronous")
    assert read == []


def test_a_root_layer_on_fsspecs_memory_filesystem_is_checkpointed(tmp_path):
    """Its files were looked for at "/store.zarr///activations", no path on the memory filesystem: the run was
    refused as one whose files could not be listed (found by review)."""
    import fsspec

    x = np.random.default_rng(3).standard_normal((40, 3))
    xr.Dataset({"activations": (("datapoint", "channel"), x)}).chunk({"datapoint": 10}).to_zarr(
        "memory://root-layer.zarr", zarr_format=3, consolidated=False, mode="w")
    try:
        layer = chunkcca.open_activations("memory://root-layer.zarr")["/"]["activations"]
        checkpointed = chunkcca.cca(layer, layer.isel(channel=[0, 1]), checkpoint=tmp_path / "c.ckpt",
                                    precision="float64")
        assert float(checkpointed["rho_mean"]) == pytest.approx(
            float(chunkcca.cca(x, x[:, :2], precision="float64")["rho_mean"]), abs=1e-12)
    finally:
        fsspec.filesystem("memory").rm("/root-layer.zarr", recursive=True)
