"""Ingestion of .npy/.npz files and google/svcca pickles: numpy arrays only, streamed, atomic."""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest
import xarray as xr
from conftest import SHARED_DATA

import chunkcca
from chunkcca.cli import main
from chunkcca.ingest import load_pickled_array


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_admit_numpy_arrays_only(tmp_path, capsys):
    path = tmp_path / "evil.p"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load posix\.system"):
        load_pickled_array(path)
    assert main(["ingest", str(tmp_path / "s.zarr"), f"x={path}"]) == 2
    assert "refusing to load posix.system" in capsys.readouterr().err
    path.write_bytes(pickle.dumps({"not": "an array"}))
    with pytest.raises(ValueError, match="holds a dict, not a numpy array"):
        load_pickled_array(path)


@pytest.mark.skipif(not (SHARED_DATA / "svcca" / "SVHN").is_dir(),
                    reason="real SVHN activations absent (../shared/data or CHUNKCCA_TEST_DATA)")
def test_ingest_real_svcca_pickles(tmp_path):
    store = tmp_path / "svhn.zarr"
    assert main(["ingest", str(store), f"model0/fc={SHARED_DATA / 'svcca/SVHN/model_0_lay06.p'}",
                 f"model1/fc={SHARED_DATA / 'svcca/SVHN/model_1_lay06.p'}"]) == 0
    tree = chunkcca.open_activations(store)
    assert tree["model0/fc"]["activations"].shape == (1000, 200)
    mnist = load_pickled_array(SHARED_DATA / "svcca/MNIST/model_0_lay04.p")  # a plain, uncompressed pickle
    assert mnist.shape == (10, 10000)


def test_npy_is_ingested_chunk_by_chunk(tmp_path):
    """A memory-mapped .npy is read one chunk at a time, never copied whole (Dask's from_array would copy it)."""
    import tracemalloc

    from chunkcca.ingest import ingest

    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype="float32", shape=(8000, 8, 8, 16))
    big[:] = np.arange(16, dtype="float32")
    big.flush()
    nbytes = big.nbytes
    del big
    tracemalloc.start()
    tree = ingest(tmp_path / "s.zarr", {"l": tmp_path / "big.npy"}, chunks=250)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < nbytes / 4, f"peak {peak / 2**20:.0f} MiB for a {nbytes / 2**20:.0f} MiB file"
    assert float(tree["l"]["activations"][..., 7].mean()) == 7.0


def _store_files(root) -> dict[str, bytes]:
    """Every file of a store, the root metadata without the store's generation (new at every write)."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    root_metadata = json.loads(files["zarr.json"])
    del root_metadata["attributes"]["chunkcca_generation"]
    return {**files, "zarr.json": json.dumps(root_metadata, sort_keys=True).encode()}


def test_ingest_writes_what_write_activations_writes(tmp_path):
    """Layer by layer, ingest writes byte for byte the store write_activations writes from all arrays at once
    (pixel centres in units of the largest map of all layers, here the .npz's 6 × 6)."""
    from chunkcca.ingest import ingest

    rng = np.random.default_rng(1)
    big, small, fc = (rng.standard_normal(shape).astype("float32") for shape in [(30, 6, 6, 3), (30, 2, 2, 4),
                                                                                  (30, 5)])
    np.savez_compressed(tmp_path / "a.npz", conv=big, fc=big.mean(axis=(1, 2)))
    np.save(tmp_path / "small.npy", small)
    with gzip.open(tmp_path / "fc.p", "wb") as f:
        pickle.dump(fc, f)
    with open(tmp_path / "small.p", "wb") as f:
        pickle.dump(small, f)
    tree = ingest(tmp_path / "s.zarr", {"m0": tmp_path / "a.npz", "m1/conv": tmp_path / "small.npy",
                                        "m2": tmp_path / "small.p", "m1/fc": tmp_path / "fc.p"}, chunks=7)
    chunkcca.write_activations(tmp_path / "w.zarr", {"m0/conv": big, "m0/fc": big.mean(axis=(1, 2)),
                                                     "m1/conv": small, "m2": small, "m1/fc": fc}, chunks=7)
    assert _store_files(tmp_path / "s.zarr") == _store_files(tmp_path / "w.zarr")
    assert chunkcca.layer_paths(tree) == ["m0/conv", "m0/fc", "m1/conv", "m2", "m1/fc"]  # in the order given
    np.testing.assert_allclose(tree["m1/conv"]["height"], [1.5, 4.5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "fc.p", "s.zarr", "small.npy", "small.p",
                                                         "w.zarr"], "no temporary folder is left"
    with pytest.raises(ValueError, match="layer 'm0/conv' is given twice"):
        ingest(tmp_path / "t.zarr", {"m0": tmp_path / "a.npz", "m0/conv": tmp_path / "small.npy"})


def test_ingest_places_the_pixels_of_volumes_and_stores_of_fc_layers_first(tmp_path):
    """Volumes (datapoint, depth, height, width, channel) kept the centres of their own map in an ingested store
    (a 4 x 4 one at 0.5 … 3.5 beside an 8 x 8 one: interp refused the pair), where write_activations placed them
    in the largest map's units (1, 3, 5, 7); and a store begun with fully connected layers recorded an image of
    1 x 1, so conv layers appended later got centres of 1/32. Both write what write_activations writes."""
    from chunkcca.ingest import ingest

    rng = np.random.default_rng(2)
    big, small = rng.standard_normal((20, 2, 8, 8, 3)), rng.standard_normal((20, 2, 4, 4, 3))
    np.save(tmp_path / "big.npy", big)
    np.save(tmp_path / "small.npy", small)
    tree = ingest(tmp_path / "v.zarr", {"v8": tmp_path / "big.npy", "v4": tmp_path / "small.npy"})
    np.testing.assert_allclose(tree["v4"]["height"], [1, 3, 5, 7])
    written = chunkcca.write_activations(tmp_path / "w.zarr", {"v8": big, "v4": small})
    np.testing.assert_allclose(written["v4"]["width"], [1, 3, 5, 7])
    np.save(tmp_path / "fc.npy", rng.standard_normal((20, 4)))
    np.save(tmp_path / "conv.npy", rng.standard_normal((20, 16, 16, 4)))
    ingest(tmp_path / "f.zarr", {"fc": tmp_path / "fc.npy"})
    appended = ingest(tmp_path / "f.zarr", {"conv": tmp_path / "conv.npy"}, mode="a")
    np.testing.assert_allclose(appended["conv"]["height"][:3], [0.5, 1.5, 2.5])
    assert appended.attrs["chunkcca_image_size"] == [16, 16]
    chunkcca.write_activations(tmp_path / "g.zarr", {"fc": rng.standard_normal((20, 4))})
    added = chunkcca.write_activations(tmp_path / "g.zarr", {"conv": rng.standard_normal((20, 16, 16, 4))}, mode="a")
    np.testing.assert_allclose(added["conv"]["width"][:3], [0.5, 1.5, 2.5])


def test_ingest_failing_midway_leaves_nothing(tmp_path):
    from chunkcca.ingest import ingest

    np.save(tmp_path / "a.npy", np.ones((4, 3), dtype="float32"))
    (tmp_path / "evil.p").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        ingest(tmp_path / "s.zarr", {"a": tmp_path / "a.npy", "b": tmp_path / "evil.p"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "evil.p"]



def _header_only_npz(path, shape, dtype="float32"):
    """An .npz whose one member ``x`` has the header of a ``shape`` array and none of its values."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue())


@pytest.mark.parametrize("fault", ["layout", "count", "dtype", "rank", "mask", "npz member", "npz header",
                                   "chunk size"])
def test_every_npy_and_npz_layer_is_checked_before_any_is_written(tmp_path, monkeypatch, fault):
    """A fault in the last of the files given was found only once the layers before it were written (hours, for
    large files): each .npy and .npz layer is checked from its header first, its values not read."""
    import chunkcca.ingest as ingest_module

    written = []
    write = ingest_module.write_activations
    monkeypatch.setattr(ingest_module, "write_activations", lambda *args, **kwargs: written.append(args[1]) or
                        write(*args, **kwargs))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "first.npy", rng.standard_normal((40, 5)).astype("float32"))
    last, options, message = tmp_path / "last.npy", {}, None
    if fault == "layout":
        np.save(last, rng.standard_normal((40, 8, 3, 3)))
        message = r"last.npy: shape \(40, 8, 3, 3\) may be channels-first"
    elif fault == "count":
        np.save(last, rng.standard_normal((39, 5)))
        options, message = {"datapoints": np.arange(40)}, r"datapoints gives 40 labels, and layer 'b' has 39"
    elif fault == "dtype":
        np.save(last, rng.standard_normal((40, 5)) > 0)
        message = r"layer 'b' has dtype bool"
    elif fault == "rank":
        np.save(last, rng.standard_normal(40))
        message = r"layer 'b' has 1 dims"
    elif fault == "mask":
        np.save(last, rng.standard_normal((40, 6, 5)))
        np.save(tmp_path / "mask.npy", np.ones((40, 7), bool))
        options, message = {"masks": {"b": tmp_path / "mask.npy"}}, r"has shape \(40, 7\); its layer needs"
    elif fault == "npz member":
        last = tmp_path / "last.npz"
        np.savez_compressed(last, fine=rng.standard_normal((40, 5)), nchw=rng.standard_normal((40, 8, 3, 3)))
        message = r"last.npz \(nchw\): shape \(40, 8, 3, 3\) may be channels-first"
    elif fault == "npz header":  # a shape no array has: named as the file's fault
        last = tmp_path / "last.npz"
        _header_only_npz(last, (-1, 5))
        message = r"cannot read .*last\.npz as a \.npz file: ValueError: "
    else:  # 4 GiB a chunk, more than Blosc takes: its values are never read (the file holds none)
        last = tmp_path / "last.npz"
        _header_only_npz(last, (8, 2**28))
        options = {"chunks": 4, "layout": "datapoints"}
        message = r"layer 'b/x': chunks of 4 datapoints would be 4\.00 GiB each"
    with pytest.raises((ValueError, TypeError), match=message):
        ingest_module.ingest(tmp_path / "s.zarr", {"a": tmp_path / "first.npy", "b": last}, **options)
    assert written == []
    assert not (tmp_path / "s.zarr").exists()


def test_a_mask_on_a_layer_without_positions_is_refused_as_such(tmp_path, capsys):
    """A mask of one False for a fully connected layer was refused as "False at every position of datapoint 3 …
    leave such datapoints out", for a fault that is the mask itself (found by audit)."""
    np.save(tmp_path / "fc.npy", np.random.default_rng(0).standard_normal((30, 2)).astype("float32"))
    for real in (np.ones(30, bool), np.arange(30) != 3):
        np.save(tmp_path / "mask.npy", real)
        assert main(["ingest", str(tmp_path / "s.zarr"), f"fc={tmp_path / 'fc.npy'}", "--mask",
                     f"fc={tmp_path / 'mask.npy'}", "--no-progress"]) == 2
        assert capsys.readouterr().err == ("chunkcca ingest: error: layer 'fc' has no positions (dims ('datapoint', "
                                           "'channel')), so nothing to pad: a mask marks the real positions of each "
                                           "datapoint; leave its mask out\n")

@pytest.mark.slow
def test_ingest_holds_one_pickle_at_a_time(tmp_path):
    """Pickles are loaded whole but one at a time, each written before the next is loaded, and not copied.

    Before, every file was loaded before any was written, and Dask copied each: four 8 MiB pickles peaked at
    8.2 files' worth (at least 4 by construction: all were held at once). Now the peak is one file plus the
    chunks being compressed, at most 4 threads × 256 KiB (with its compressed copy) ≈ 0.25 file: 1.1 files
    measured. A peak under 2 files tells the two apart whatever the machine.
    """
    import tracemalloc

    import dask

    from chunkcca.ingest import ingest

    rng = np.random.default_rng(2)
    sources, arrays = {}, {}
    for i in range(4):
        arrays[f"m{i}/fc"] = rng.standard_normal((1024, 2048)).astype("float32")  # 8 MiB that barely compress
        with open(tmp_path / f"{i}.p", "wb") as f:
            pickle.dump(arrays[f"m{i}/fc"], f)
        sources[f"m{i}/fc"] = tmp_path / f"{i}.p"
    nbytes = arrays["m0/fc"].nbytes
    with open(tmp_path / "warm.p", "wb") as f:
        pickle.dump(np.ones((64, 8), dtype="float32"), f)
    ingest(tmp_path / "warm.zarr", {"w": tmp_path / "warm.p"}, chunks=8)  # first-use imports and caches
    tracemalloc.start()
    with dask.config.set(num_workers=4):  # chunks in flight at once: at most one per thread
        tree = ingest(tmp_path / "s.zarr", sources, chunks=32, layout="datapoints")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * nbytes, f"peak {peak / nbytes:.2f} files' worth"
    for layer, values in arrays.items():
        np.testing.assert_array_equal(tree[layer]["activations"].values, values)


def test_ingest_reads_channels_first_files(tmp_path, capsys):
    nchw = np.random.default_rng(0).standard_normal((12, 5, 4, 3)).astype(np.float32)  # (datapoint, C, H, W)
    np.save(tmp_path / "conv.npy", nchw)
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(store), f"m0/conv={tmp_path / 'conv.npy'}", "--layout", "channels_first"]) == 0
    layer = chunkcca.open_activations(store)["m0/conv"]["activations"]
    assert layer.sizes == {"datapoint": 12, "height": 4, "width": 3, "channel": 5}
    np.testing.assert_array_equal(layer.values, np.moveaxis(nchw, 1, -1))
    assert main(["ingest", str(tmp_path / "t.zarr"), f"fc={tmp_path / 'conv.npy'}", "--layout", "neurons"]) == 2
    assert "needs a 2-d (neurons, datapoints) array" in capsys.readouterr().err


def test_unreadable_files_are_named_and_store_layers_keep_their_paths(tmp_path, capsys):
    (tmp_path / "text.npy").write_text("not an array")
    assert main(["ingest", str(tmp_path / "s.zarr"), f"m0={tmp_path / 'text.npy'}"]) == 2
    assert f"{tmp_path / 'text.npy'} is not a .npy file: it does not begin as one" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    tree = chunkcca.write_activations(tmp_path / "t.zarr", {"m0/fc": rng.standard_normal((30, 3)),
                                                             "m1/fc": rng.standard_normal((30, 2))})
    result = chunkcca.cca(tree["m0/fc"]["activations"], tree["m1/fc"]["activations"])
    assert (result.attrs["layer_a"], result.attrs["layer_b"]) == ("m0/fc", "m1/fc")
    assert main(["info", str(tmp_path / "t.zarr")]) == 0
    assert "2 layers" in capsys.readouterr().out
    # a layer path may hold '=' (lr=0.1): LAYER=FILE split at the first '=' ("no such file: lr=0.1/fc=…"); it ends
    # at the first '=' after which a file exists, and a file whose path holds '=' is read as before
    np.save(tmp_path / "fc.npy", rng.standard_normal((30, 3)))
    (tmp_path / "run=2").mkdir()
    np.save(tmp_path / "run=2" / "fc.npy", rng.standard_normal((30, 3)))
    assert main(["ingest", str(tmp_path / "eq.zarr"), f"lr=0.1/fc={tmp_path / 'fc.npy'}",
                 f"fc={tmp_path / 'run=2' / 'fc.npy'}", "--no-progress"]) == 0
    assert chunkcca.layer_paths(chunkcca.open_activations(tmp_path / "eq.zarr")) == ["lr=0.1/fc", "fc"]
    assert main(["ingest", str(tmp_path / "no.zarr"), "lr=0.1/fc=missing.npy", "--no-progress"]) == 2
    assert capsys.readouterr().err == ("chunkcca ingest: error: no such file after any '=' of 'lr=0.1/fc=missing.npy' "
                                       "(LAYER=FILE)\n")


def test_ingest_appends_to_a_store(tmp_path, capsys):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "a.npy", rng.standard_normal((30, 4)).astype("float32"))
    np.save(tmp_path / "b.npy", rng.standard_normal((30, 3)).astype("float32"))
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", store, f"model0/fc={tmp_path / 'a.npy'}", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["ingest", store, f"model1/fc={tmp_path / 'b.npy'}", "--append", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"wrote {store}:\n  model1/fc  (datapoint 30, channel 3)\n", "the layers added"
    assert chunkcca.layer_paths(chunkcca.open_activations(store)) == ["model0/fc", "model1/fc"]
    assert main(["ingest", store, f"model1/fc={tmp_path / 'b.npy'}", "--append"]) == 2
    assert "already holds layer model1/fc" in capsys.readouterr().err
    assert main(["ingest", store, f"model2/fc={tmp_path / 'b.npy'}"]) == 2
    assert "pass --overwrite to replace it, or --append to add layers to it" in capsys.readouterr().err


@pytest.mark.parametrize(("shape", "layout", "message"), [
    ((10, 300), None, "has fewer rows than columns, as google/svcca's (neurons, datapoints) layout has: pass "
                      "--layout neurons"),
    ((12, 5, 4, 4), None, "may be channels-first (datapoint, channel, height, width), PyTorch's (equal last two "
                          "axes): pass --layout channels_first"),
    ((12, 5, 4, 3), None, "may be channels-first (datapoint, channel, height, width), PyTorch's (either layout "
                          "fits): pass --layout channels_first"),  # a map that is not square: it was taken as NHWC
    ((12, 6, 4, 4, 4), None, "may be channels-first (datapoint, channel, depth, height, width), PyTorch's (equal last "
                             "two axes): pass --layout channels_first"),  # (N, C, D, H, W): read as NDHWC, silently
])
def test_ingest_refuses_an_orientation_it_would_guess(tmp_path, capsys, shape, layout, message):
    """MNIST's logits (10, 10000) must not become 10 datapoints of 10000 channels; the advice names the option."""
    np.save(tmp_path / "x.npy", np.zeros(shape, dtype="float32"))
    assert main(["ingest", str(tmp_path / "s.zarr"), f"x={tmp_path / 'x.npy'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert main(["ingest", str(tmp_path / "s.zarr"), f"x={tmp_path / 'x.npy'}", "--layout", "datapoints",
                 "--no-progress"]) == 0  # said so: taken as it is
    assert chunkcca.open_activations(tmp_path / "s.zarr")["x"]["activations"].shape == shape


def test_neurons_layout_of_more_neurons_than_datapoints_warns_in_one_line(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((1000, 200)).astype("float32"))
    assert main(["ingest", str(tmp_path / "s.zarr"), f"x={tmp_path / 'x.npy'}", "--layout", "neurons",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("chunkcca ingest: warning: ") and "as 1000 neurons of 200 datapoints" in err
    assert len(err.strip().splitlines()) == 1


def test_orientations_that_fit_either_reading_are_warned_of_in_one_line(tmp_path, capsys):
    """A google/svcca pickle of 512 neurons of 200 datapoints became 512 datapoints (CKA 0.06 for 0.93), and
    --layout channels_first turned an NHWC file of square maps beside NCHW ones, silently."""
    rng = np.random.default_rng(0)
    with gzip.open(tmp_path / "wide.p", "wb") as file:
        pickle.dump(rng.standard_normal((512, 200)).astype("float32"), file)
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", store, f"x={tmp_path / 'wide.p'}", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("chunkcca ingest: warning: ") and len(err.strip().splitlines()) == 1
    assert "reads shape (512, 200) as 512 datapoints of 200 neurons" in err and "--layout neurons" in err
    assert main(["ingest", store, f"x={tmp_path / 'wide.p'}", "--layout", "datapoints", "--overwrite",
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""  # said so: taken as it is
    assert chunkcca.open_activations(store)["x"]["activations"].shape == (512, 200)
    np.save(tmp_path / "tall.npy", rng.standard_normal((512, 200)).astype("float32"))  # not a pickle: as it is
    assert main(["ingest", store, f"x={tmp_path / 'tall.npy'}", "--overwrite", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    np.save(tmp_path / "nhwc.npy", rng.standard_normal((30, 6, 6, 8)).astype("float32"))
    np.save(tmp_path / "nchw.npy", rng.standard_normal((30, 8, 6, 6)).astype("float32"))
    assert main(["ingest", store, f"a={tmp_path / 'nchw.npy'}", f"b={tmp_path / 'nhwc.npy'}", "--layout",
                 "channels_first", "--overwrite", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nhwc.npy: layout 'channels_first' reads shape (30, 6, 6, 8) as 6 " \
        "channels of 6 x 8 positions, though it reads as channels-last" in err


def test_file_types_are_told_by_their_extension_in_any_case(tmp_path, capsys):
    """X.NPY and X.NPZ were read as pickles ("unpickling stack underflow")."""
    values = np.random.default_rng(1).standard_normal((30, 8)).astype("float32")
    np.save(tmp_path / "x.npy", values)
    np.savez(tmp_path / "y.npz", fc=values)
    (tmp_path / "x.npy").rename(tmp_path / "X.NPY")
    (tmp_path / "y.npz").rename(tmp_path / "Y.NPZ")
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(store), f"x={tmp_path / 'X.NPY'}", f"y={tmp_path / 'Y.NPZ'}", "--no-progress"]) == 0
    tree = chunkcca.open_activations(store)
    for path in ("x", "y/fc"):
        np.testing.assert_array_equal(tree[path]["activations"].values, values)


def test_a_store_in_a_folder_that_does_not_exist_is_refused(tmp_path, capsys):
    """A typo in the store's folder made that folder (and its parents) and wrote the store there, with status 0;
    --out, --plot and --checkpoint refuse a missing folder."""
    np.save(tmp_path / "a.npy", np.ones((10, 3)))
    store = tmp_path / "no" / "such" / "s.zarr"
    assert main(["ingest", str(store), f"a={tmp_path / 'a.npy'}", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"chunkcca ingest: error: {store}: no folder {tmp_path / 'no' / 'such'}\n"
    assert not (tmp_path / "no").exists()
    assert main(["ingest", "s3://bucket/s.zarr", f"a={tmp_path / 'a.npy'}", "--no-progress"]) == 2  # said as before
    assert "chunkcca writes to local paths only" in capsys.readouterr().err


def test_a_text_file_is_named(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("layer,value\n1,2\n")
    assert main(["ingest", str(tmp_path / "s.zarr"), f"x={tmp_path / 'notes.txt'}"]) == 2
    assert f"cannot read {tmp_path / 'notes.txt'} as a pickled array file" in capsys.readouterr().err
    for suffix, writer in ((".npy", "numpy.save"), (".npz", "numpy.savez")):  # numpy took them for pickles
        (tmp_path / f"notes{suffix}").write_text("layer,value\n1,2\n")
        assert main(["ingest", str(tmp_path / "s.zarr"), f"x={tmp_path / f'notes{suffix}'}"]) == 2
        assert capsys.readouterr().err == (f"chunkcca ingest: error: {tmp_path / f'notes{suffix}'} is not a {suffix} "
                                           f"file: it does not begin as one (written by {writer}); is it text or "
                                           f"another format?\n")
    # a file beginning "PK" but no zip archive: numpy took it for a pickle too ("This file contains pickled
    # (object) data. If you trust the file you can load it unsafely …"), naming no file
    (tmp_path / "bad.npz").write_bytes(b"PK not a zip")
    assert main(["ingest", str(tmp_path / "s.zarr"), f"x={tmp_path / 'bad.npz'}"]) == 2
    assert capsys.readouterr().err.startswith(f"chunkcca ingest: error: {tmp_path / 'bad.npz'} is not a .npz file: ")
    np.savez(tmp_path / "empty.npz")  # a zip archive with nothing in it begins otherwise; refused for that
    assert main(["ingest", str(tmp_path / "s.zarr"), f"x={tmp_path / 'empty.npz'}"]) == 2
    assert "holds no arrays" in capsys.readouterr().err


def test_ingest_takes_sequences_and_their_masks(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((20, 6, 4)).astype("float32")  # (N, T, C)
    lengths = rng.integers(1, 7, 20)
    np.save(tmp_path / "enc.npy", tokens)
    np.save(tmp_path / "mask.npy", np.arange(6)[None] < lengths[:, None])
    np.save(tmp_path / "conv.npy", np.moveaxis(tokens, 2, 1))  # a 1-d conv's (N, C, L)
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", store, f"enc={tmp_path / 'enc.npy'}", "--mask", f"enc={tmp_path / 'mask.npy'}",
                 "--no-progress"]) == 0
    tree = chunkcca.open_activations(store)
    assert tree["enc"]["activations"].dims == ("datapoint", "token", "channel")
    np.testing.assert_array_equal(tree["enc"]["mask"].values, np.arange(6)[None] < lengths[:, None])
    assert main(["ingest", store, f"conv={tmp_path / 'conv.npy'}", "--layout", "channels_first", "--append",
                 "--no-progress"]) == 0
    tree = chunkcca.open_activations(store)
    assert tree["conv"]["activations"].dims == ("datapoint", "time", "channel")
    np.testing.assert_array_equal(tree["conv"]["activations"].values, tokens)
    # info says which layers have a mask (it said nothing of masks, which change every result)
    assert [row["mask"] for row in chunkcca.describe_store(store)] == [True, False]
    capsys.readouterr()
    assert main(["info", store]) == 0
    assert "padding masks (padded positions left out of every measure): enc\n" in capsys.readouterr().out
    assert main(["ingest", str(tmp_path / "t.zarr"), f"enc={tmp_path / 'enc.npy'}", "--mask",
                 f"enc={tmp_path / 'conv.npy'}"]) == 2
    assert "its layer needs (datapoint, *positions) (20, 6)" in capsys.readouterr().err


def test_mask_files_are_read_in_blocks_and_checked_before_writing(tmp_path, capsys, monkeypatch):
    """A 0/1 integer mask file is taken block by block from its memory map; a bad value in a later block is
    named before any store is written."""
    import chunkcca.ingest

    monkeypatch.setattr(chunkcca.ingest, "_MASK_BLOCK", 7)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "enc.npy", rng.standard_normal((20, 6, 4)).astype("float32"))
    mask = (np.arange(6)[None] < rng.integers(1, 7, 20)[:, None]).astype("int8")
    np.save(tmp_path / "mask.npy", mask)
    assert main(["ingest", str(tmp_path / "s.zarr"), f"enc={tmp_path / 'enc.npy'}", "--mask",
                 f"enc={tmp_path / 'mask.npy'}", "--no-progress"]) == 0
    np.testing.assert_array_equal(chunkcca.open_activations(tmp_path / "s.zarr")["enc"]["mask"].values, mask == 1)
    mask[15, 0] = 2
    np.save(tmp_path / "bad.npy", mask)
    assert main(["ingest", str(tmp_path / "t.zarr"), f"enc={tmp_path / 'enc.npy'}", "--mask",
                 f"enc={tmp_path / 'bad.npy'}", "--no-progress"]) == 2
    assert "datapoints from 14, holds values other than 0/1 or True/False" in capsys.readouterr().err
    assert not (tmp_path / "t.zarr").exists()
    mask[15] = 0  # a datapoint with no real position: refused by compare, after the store was written
    np.save(tmp_path / "empty.npy", mask)
    assert main(["ingest", str(tmp_path / "t.zarr"), f"enc={tmp_path / 'enc.npy'}", "--mask",
                 f"enc={tmp_path / 'empty.npy'}", "--no-progress"]) == 2
    assert "is False at every position of datapoint 15: it has no real position" in capsys.readouterr().err
    assert not (tmp_path / "t.zarr").exists()


def test_damaged_or_ambiguous_input_files_are_refused_naming_them(tmp_path, capsys):
    """Found by audit: a bit flipped in a gzip-compressed pickle loaded other values (1e33), silently (the
    unpickler stops at its last opcode, before gzip's CRC-32); a second pickle after the first was left out; a
    mask file of strings or complex values was taken as all real ('False' is True as a bool); a damaged .npz's
    zip and zlib errors named no file and asked for a bug report; ``--coord`` of the wrong length spoke of
    ``coords['cls']``."""
    values = np.random.default_rng(0).standard_normal((40, 6))
    packed = bytearray(gzip.compress(pickle.dumps(values)))
    packed[len(packed) // 2] ^= 0x10
    (tmp_path / "flipped.p").write_bytes(bytes(packed))
    with pytest.raises(ValueError, match=r"cannot read .*flipped.p as a pickled array file: "):
        load_pickled_array(tmp_path / "flipped.p")
    for name, data in (("two.p", pickle.dumps(values) + pickle.dumps(values)),
                       ("two.pgz", gzip.compress(pickle.dumps(values) + pickle.dumps(values)))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name} holds more after its pickled array"):
            load_pickled_array(tmp_path / name)
    (tmp_path / "one.pgz").write_bytes(gzip.compress(pickle.dumps(values)))
    np.testing.assert_array_equal(load_pickled_array(tmp_path / "one.pgz"), values)
    np.save(tmp_path / "acts.npy", np.random.default_rng(1).standard_normal((20, 6, 4)).astype("float32"))
    for mask in (np.where(np.arange(6) < 3, "True", "False")[None].repeat(20, 0), np.ones((20, 6), complex)):
        np.save(tmp_path / "mask.npy", mask)
        assert main(["ingest", str(tmp_path / "m.zarr"), f"a={tmp_path / 'acts.npy'}", "--mask",
                     f"a={tmp_path / 'mask.npy'}", "--no-progress"]) == 2
        assert f"the mask {tmp_path / 'mask.npy'} holds {mask.dtype} values; a padding mask is boolean or 0/1" \
            in capsys.readouterr().err
    np.savez_compressed(tmp_path / "packed.npz", x=values)
    damaged = bytearray((tmp_path / "packed.npz").read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    (tmp_path / "packed.npz").write_bytes(bytes(damaged))
    assert main(["ingest", str(tmp_path / "z.zarr"), f"m={tmp_path / 'packed.npz'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'packed.npz'} as a .npz file: " in err and "please report" not in err
    np.save(tmp_path / "labels.npy", np.arange(19))
    assert main(["ingest", str(tmp_path / "c.zarr"), f"a={tmp_path / 'acts.npy'}", "--coord",
                 f"cls={tmp_path / 'labels.npy'}", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"chunkcca ingest: error: --coord cls={tmp_path / 'labels.npy'} has 19 labels "
                                       f"and layer 'a' 20 datapoints: give one label per datapoint, in order\n")


def test_a_pytorch_npz_of_conv_and_fc_layers_is_ingested_with_channels_first(tmp_path, capsys):
    """An .npz of a PyTorch CNN's conv (N, C, H, W) and fc (N, C) outputs could not be ingested: without --layout
    the conv array was refused, with --layout channels_first the fc one ("got shape (20, 10)"), and the error
    named the file, not the array. channels_first now reads a 2-d array as it is; errors name the array."""
    rng = np.random.default_rng(3)
    conv, fc = rng.standard_normal((20, 3, 4, 4)), rng.standard_normal((20, 10))
    np.savez(tmp_path / "cnn.npz", conv=conv, fc=fc)
    assert main(["ingest", str(tmp_path / "a.zarr"), f"net={tmp_path / 'cnn.npz'}"]) == 2
    assert f"{tmp_path / 'cnn.npz'} (conv): shape (20, 3, 4, 4) may be channels-first" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "b.zarr"), f"net={tmp_path / 'cnn.npz'}", "--layout", "channels_first"]) == 0
    tree = chunkcca.open_activations(tmp_path / "b.zarr")
    np.testing.assert_array_equal(tree["net/conv"]["activations"].values, conv.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(tree["net/fc"]["activations"].values, fc)
    np.save(tmp_path / "wide.npy", fc.T)  # (neurons, datapoints)? refused without a layout, taken unsaid with this
    assert main(["ingest", str(tmp_path / "c.zarr"), f"fc={tmp_path / 'wide.npy'}", "--layout", "channels_first"]) == 0
    err = capsys.readouterr().err  # one (found by audit); a probe set's fc beside its conv is ingested in one command
    assert "wide.npy: layout 'channels_first' reads shape (10, 20) as it is, 10 datapoints of 20 channels" in err
    assert "--layout neurons" in err and err.count("warning:") == 1


def test_ingest_writes_datapoint_coordinates_that_compare_groups_by(tmp_path, capsys):
    """The command could write no class label, so `--groupby` had nothing to take in a store it ingested:
    `--coord NAME=FILE` puts one on every layer, `info` lists it, and compare groups by it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype("float32")
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", x[:, :4] + rng.standard_normal((40, 4)).astype("float32"))
    np.save(tmp_path / "label.npy", np.arange(40) % 2)
    np.save(tmp_path / "split.npy", np.array(["train"] * 30 + ["test"] * 10))
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", store, f"a={tmp_path / 'a.npy'}", f"b={tmp_path / 'b.npy'}", "--coord",
                 f"label={tmp_path / 'label.npy'}", "--coord", f"split={tmp_path / 'split.npy'}",
                 "--no-progress"]) == 0
    tree = chunkcca.open_activations(store)
    np.testing.assert_array_equal(tree["b"]["activations"]["label"], np.arange(40) % 2)
    capsys.readouterr()
    assert main(["info", store]) == 0
    assert "coordinates on datapoint (for --groupby, --folds): label, split (every layer)" in capsys.readouterr().out
    assert main(["compare", store, "a", "b", "--groupby", "split", "--measure", "cka", "--json",
                 "--no-progress"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["options"]["groups"] == ["test", "train"]
    assert shown["options"]["rows_per_group"] == [10, 30] and shown["rows"] == 40  # it gave the total alone
    want = [float(chunkcca.cka(x[30:], np.load(tmp_path / "b.npy")[30:], precision="float64")["cka"]),
            float(chunkcca.cka(x[:30], np.load(tmp_path / "b.npy")[:30], precision="float64")["cka"])]
    np.testing.assert_allclose(shown["results"]["cka"]["value"], want, atol=1e-6)  # float32 activations, auto
    for flag, message in ((f"label={tmp_path / 'none.npy'}", "cannot read coordinate 'label' from"),
                          ("label", "--coord: expected NAME=FILE, got 'label'"),
                          (f"label={tmp_path / 'a.npy'}", f"--coord label={tmp_path / 'a.npy'} must be one number "
                                                          f"or string per datapoint (1-d), got 2-d float32 values\n"),
                          (f"my label={tmp_path / 'none.npy'}", "without '/' or spaces, got 'my label'\n")):
        assert main(["ingest", str(tmp_path / "t.zarr"), f"a={tmp_path / 'a.npy'}", "--coord", flag,
                     "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t.zarr").exists()
    np.save(tmp_path / "other.npy", np.arange(40) % 3)
    assert main(["ingest", store, f"c={tmp_path / 'a.npy'}", "--coord", f"label={tmp_path / 'other.npy'}",
                 "--append", "--no-progress"]) == 2
    assert f"coords['label']: layer 'a' of {store} holds 'label' with other labels" in capsys.readouterr().err
    assert chunkcca.layer_paths(chunkcca.open_activations(store)) == ["a", "b"]


def test_a_nan_coordinate_label_is_warned_of_when_written(tmp_path, capsys):
    """A NaN label passed ingest and write_activations without a word, and every groupby or folds by it was
    refused later, after the store was written."""
    np.save(tmp_path / "fc.npy", np.random.default_rng(0).standard_normal((30, 4)).astype("float32"))
    np.save(tmp_path / "label.npy", np.r_[np.zeros(29), np.nan])
    assert main(["ingest", str(tmp_path / "s.zarr"), f"fc={tmp_path / 'fc.npy'}", f"fc2={tmp_path / 'fc.npy'}",
                 f"fc3={tmp_path / 'fc.npy'}", "--coord", f"label={tmp_path / 'label.npy'}", "--no-progress"]) == 0
    err = capsys.readouterr().err  # once, not once more per layer written (it was said three times for two)
    assert err.startswith("chunkcca ingest: warning: coords['label'] is NaN for 1 datapoint: groupby='label' and "
                          "folds='label'") and len(err.strip().splitlines()) == 1
    with pytest.warns(RuntimeWarning, match=r"coords\['label'\] is NaN for 2 datapoints"):
        chunkcca.write_activations(tmp_path / "t.zarr", {"fc": np.ones((3, 2))}, coords={"label": [np.nan, 1, np.nan]})


def test_ingested_layers_pair_by_the_labels_datapoints_gives_and_by_position_without(tmp_path, capsys):
    """A store chunkcca wrote without labels held its positions as labels: compared with a recorded layer labelled
    in shuffled order (a DataLoader's dataset indices), its rows were reordered to them (mean ρ 0.21 for 0.73 here,
    silently; `--shared-datapoints` took the first rows of two such stores of different lengths).
    They pair by position only, a labelled layer beside them is refused, naming the flag that labels them, and
    `ingest --datapoints FILE` gives the labels."""
    rng = np.random.default_rng(7)
    latent, order = rng.standard_normal((60, 4)), rng.permutation(60)
    a = (latent @ rng.standard_normal((4, 5))).astype("float32")
    b = (latent @ rng.standard_normal((4, 4)) + 0.5 * rng.standard_normal((60, 4))).astype("float32")
    want = float(chunkcca.cca(a.astype(np.float64), b.astype(np.float64), precision="float64")["rho_mean"])
    recorded = str(tmp_path / "recorded.zarr")  # rows in the loader's order, labelled by dataset index
    chunkcca.write_activations(recorded, {"fc": xr.DataArray(a, dims=("datapoint", "channel"),
                                                             coords={"datapoint": order})}, chunks=20)
    np.save(tmp_path / "b.npy", b)  # the same rows, from another tool
    np.save(tmp_path / "ids.npy", order)
    plain, labelled = str(tmp_path / "plain.zarr"), str(tmp_path / "labelled.zarr")
    assert main(["ingest", plain, f"fc={tmp_path / 'b.npy'}", "--no-progress"]) == 0
    assert main(["ingest", labelled, f"fc={tmp_path / 'b.npy'}", "--datapoints", str(tmp_path / "ids.npy"),
                 "--no-progress"]) == 0
    assert chunkcca.open_activations(plain)["fc"]["activations"]["datapoint"].attrs == {"chunkcca_positions": True}
    np.testing.assert_array_equal(chunkcca.open_activations(labelled)["fc"]["activations"]["datapoint"], order)
    assert [row["labelled"] for row in chunkcca.describe_store(plain) + chunkcca.describe_store(labelled)] == [
        False, True]
    capsys.readouterr()
    assert main(["info", plain]) == 0 and main(["info", labelled]) == 0  # info says which layers have no labels
    assert capsys.readouterr().out.count("stored without datapoint labels (paired with other layers by position "
                                         "only; `ingest --datapoints FILE` gives them): every layer\n") == 1
    assert main(["compare", recorded, "fc", "fc", "--b-store", plain, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "labels its datapoints" in err and "`chunkcca ingest --datapoints FILE` for files" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["compare", recorded, "fc", "fc", "--b-store", labelled, "--measure", "mean_cca", "--json",
                 "--no-progress"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["results"]["mean_cca"]["value"] == pytest.approx(want, abs=1e-6)  # float32 activations, auto
    np.save(tmp_path / "short.npy", b[:50])  # two unlabelled stores of different lengths share no label
    assert main(["ingest", str(tmp_path / "short.zarr"), f"fc={tmp_path / 'short.npy'}", "--no-progress"]) == 0
    assert main(["compare", plain, "fc", "fc", "--b-store", str(tmp_path / "short.zarr"), "--shared-datapoints",
                 "--no-progress"]) == 2
    assert "--shared-datapoints takes the datapoints the layers share by label, and fc in" in capsys.readouterr().err
    assert main(["compare", plain, "fc", "fc", "--b-store", str(tmp_path / "short.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err  # positions are no labels to share: it said "datapoint labels differ", with advice
    assert "has 60 datapoints but layer 'fc (short.zarr)' has 50; both must hold the same datapoints" in err
    for ids, message in ((np.arange(59), "datapoints gives 59 labels, and layer 'fc' has 60 datapoints"),
                         (np.zeros((60, 2)), "datapoints must be one finite number or string per datapoint (1-d) "
                                             f"(from the file {tmp_path / 'bad.npy'})"),
                         (np.r_[np.arange(59), 0], "layer 'fc' has repeated datapoint labels, e.g. [0]")):
        np.save(tmp_path / "bad.npy", ids)
        assert main(["ingest", str(tmp_path / "t.zarr"), f"fc={tmp_path / 'b.npy'}", "--datapoints",
                     str(tmp_path / "bad.npy"), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t.zarr").exists()


def test_layers_ingested_in_another_order_have_their_coords_checked_by_label(tmp_path):
    """Layers added to a store with ``datapoints`` in another order and ``coords`` in theirs were checked against
    the store's coords by position: the right classes refused, those in the store's order taken (found by audit
    of ``record``, which shares the check)."""
    from chunkcca.ingest import ingest

    rng = np.random.default_rng(0)
    classes, order = np.arange(30) % 3, rng.permutation(30)
    values = rng.standard_normal((30, 4))
    np.save(tmp_path / "a.npy", values)
    np.save(tmp_path / "b.npy", values[order])
    for store in ("right.zarr", "wrong.zarr"):
        ingest(tmp_path / store, {"a": tmp_path / "a.npy"}, datapoints=np.arange(30), coords={"cls": classes})
    tree = ingest(tmp_path / "right.zarr", {"b": tmp_path / "b.npy"}, datapoints=order, coords={"cls": classes[order]},
                  mode="a")
    stored = tree["b"]["activations"]
    np.testing.assert_array_equal(stored["cls"].values, stored["datapoint"].values % 3)
    with pytest.raises(ValueError, match=r"coords\['cls'\]: layer 'a' of .* holds 'cls' with other labels"):
        ingest(tmp_path / "wrong.zarr", {"b": tmp_path / "b.npy"}, datapoints=order, coords={"cls": classes},
               mode="a")


def test_a_pickled_array_from_a_pipe_is_read_once(tmp_path):
    """A gzip-compressed pickle given through a pipe (``<(cat model.p)``) was opened twice, the first two bytes
    taken by the first look, and refused as "Not a gzipped file"; read with one look that a pipe's first write of
    one byte fooled, as not compressed (found by audit and review)."""
    import threading
    import time

    values = np.random.default_rng(0).standard_normal((30, 5))
    packed = gzip.compress(pickle.dumps(values))
    read_end, write_end = os.pipe()

    def write() -> None:
        with os.fdopen(write_end, "wb", buffering=0) as pipe:
            pipe.write(packed[:1])
            time.sleep(0.3)  # the first write one byte
            pipe.write(packed[1:])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        np.testing.assert_array_equal(load_pickled_array(f"/dev/fd/{read_end}"), values)
    finally:
        writer.join()
        os.close(read_end)



def test_a_stream_that_is_no_pickle_is_refused_without_reading_it_whole(tmp_path):
    """A pipe or device was read whole into memory before its first byte was looked at: ``ingest o.zarr
    x=/dev/zero`` grew to 23 GB until the kernel killed it, 1 GB of zeros through ``<(…)`` took 1.1 GB (found by
    audit). A stream is read as a file is: its pickle's first opcode refuses it, and what it declares is read
    through the memory budget."""
    import contextlib
    import threading
    import tracemalloc

    read_end, write_end = os.pipe()

    def write() -> None:  # 64 MiB of zeros, as much as the reader takes
        with contextlib.suppress(BrokenPipeError), os.fdopen(write_end, "wb", buffering=0) as pipe:
            for _ in range(64):
                pipe.write(bytes(2**20))

    writer = threading.Thread(target=write)
    writer.start()
    tracemalloc.start()
    try:
        with pytest.raises(pickle.UnpicklingError, match="invalid load key"):
            load_pickled_array(f"/dev/fd/{read_end}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        os.close(read_end)
        writer.join()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB held"
