"""The chunkcca command: ingest (with the array-only unpickler), info, compare, sweep; errors exit 2."""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest
import xarray as xr
from conftest import SHARED_DATA, correlated_layers
from reference import canonical_correlations, flatten_rows

import chunkcca
from chunkcca.cli import main
from chunkcca.ingest import load_pickled_array


@pytest.fixture
def files(tmp_path):
    a, b = correlated_layers(np.random.default_rng(0), 50, (4, 4, 6), (4, 4, 5))
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", conv=b, fc=b.mean(axis=(1, 2)))
    with gzip.open(tmp_path / "fc.p", "wb") as f:
        pickle.dump(np.ascontiguousarray(b.mean(axis=(1, 2)).T), f)  # svcca's layout: (neurons, datapoints)
    return tmp_path, a, b


def test_ingest_info_compare_sweep(files, capsys):
    folder, a, b = files
    store = str(folder / "s.zarr")
    assert main(["ingest", store, f"m0/conv={folder / 'a.npy'}", f"m1={folder / 'b.npz'}"]) == 0
    assert main(["ingest", str(folder / "t.zarr"), f"m1/fc={folder / 'fc.p'}", "--layout", "neurons"]) == 0
    tree = chunkcca.open_activations(store)
    assert chunkcca.layer_paths(tree) == ["m0/conv", "m1/conv", "m1/fc"]
    np.testing.assert_array_equal(tree["m1/conv"]["activations"].values, b)
    fc = chunkcca.open_activations(folder / "t.zarr")["m1/fc"]["activations"]
    np.testing.assert_allclose(fc.values, b.mean(axis=(1, 2)), rtol=1e-6)
    capsys.readouterr()

    assert main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info[0] == {**info[0], "layer": "m0/conv", "shape": [50, 4, 4, 6], "dtype": "float32"}
    on_disk = sum(f.stat().st_size for f in (folder / "s.zarr" / "m0" / "conv").rglob("*") if f.is_file())
    assert info[0]["bytes_on_disk"] == on_disk > 0
    assert main(["info", (folder / "s.zarr").as_uri(), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == info

    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "mean_cca", "cka", "--precision", "float64",
                 "--stride", "2", "--json", "--no-progress", "--plot", str(folder / "c.png")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    want = canonical_correlations(flatten_rows(a, 2), flatten_rows(b, 2))
    assert report["results"]["mean_cca"]["value"] == pytest.approx(want.mean(), abs=1e-9)
    assert report["rows"] == 400
    assert (folder / "c.png").exists()
    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "cca", "--precision", "float64",
                 "--stride", "2", "--no-progress"]) == 0
    shown = capsys.readouterr()
    assert "--measure cca is deprecated; it stands for mean_cca r2_cca" in shown.err
    assert f"mean_cca  {want.mean():.4f}" in shown.out and f"r2_cca    {(want**2).mean():.4f}" in shown.out

    assert main(["sweep", store, "--a", "m0", "--b", "m1/conv", "m1/fc", "--measures", "cka", "mean_cca",
                 "--out", str(folder / "sweep.zarr"), "--plot", str(folder / "h.png"), "--no-progress"]) == 0
    saved = xr.open_zarr(folder / "sweep.zarr", consolidated=False)
    assert saved["cka"].dims == ("layer_a", "layer_b") and saved["cka"].shape == (1, 2)
    assert (folder / "h.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "{store}", "m0/conv", "nope"], "no layer 'nope' in the store; it has m0/conv"),
        (["info", "{folder}/missing.zarr"], "no activation store at"),
        (["ingest", "{folder}/x.zarr", "m0/conv"], "expected LAYER=FILE, got 'm0/conv'"),
        (["ingest", "{folder}/x.zarr", "m0=nothing.npy"], "no such file: nothing.npy"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--stride", "0"], None),
        (["ingest", "{folder}/x.zarr", "m0={folder}/a.npy", "m0={folder}/b.npz"], "layer 'm0' is given twice"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--measure", "cka", "--plot", "{folder}/p.png"],
         "--plot draws canonical correlation curves"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--plot", "{folder}/none/p.png"], "no folder"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--scheduler", "bogus"], "scheduler must be"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--out", "{folder}/x.csv"], "name a local netCDF file (.nc)"),
        (["ingest", "{store}", "m0={folder}/a.npy"], "exists; pass --overwrite to replace it"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--out", "{folder}/none/x.nc"], "no folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(files, capsys, argv, message):
    folder, a, _ = files
    store = folder / "s.zarr"
    chunkcca.write_activations(store, {"m0/conv": a})
    argv = [part.format(store=store, folder=folder) for part in argv]
    if message is None:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


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


@pytest.mark.skipif(not (SHARED_DATA / "svcca" / "SVHN").is_dir(), reason="../shared/data absent")
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
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ingest_writes_what_write_activations_writes(tmp_path):
    """Layer by layer, ingest writes byte for byte the store write_activations writes from all arrays at once
    (pixel centres in units of the largest map of all layers, here the .npz's 6 × 6)."""
    from chunkcca.ingest import ingest

    rng = np.random.default_rng(1)
    big, small, fc = (rng.standard_normal(shape).astype("float32") for shape in [(30, 6, 6, 3), (30, 2, 3, 4),
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
    assert chunkcca.layer_paths(tree) == ["m0/conv", "m0/fc", "m1/conv", "m1/fc", "m2"]
    np.testing.assert_allclose(tree["m1/conv"]["height"], [1.5, 4.5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "fc.p", "s.zarr", "small.npy", "small.p",
                                                         "w.zarr"], "no temporary folder is left"
    with pytest.raises(ValueError, match="layer 'm0/conv' is given twice"):
        ingest(tmp_path / "t.zarr", {"m0": tmp_path / "a.npz", "m0/conv": tmp_path / "small.npy"})


def test_ingest_failing_midway_leaves_nothing(tmp_path):
    from chunkcca.ingest import ingest

    np.save(tmp_path / "a.npy", np.ones((4, 3), dtype="float32"))
    (tmp_path / "evil.p").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        ingest(tmp_path / "s.zarr", {"a": tmp_path / "a.npy", "b": tmp_path / "evil.p"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "evil.p"]


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
        tree = ingest(tmp_path / "s.zarr", sources, chunks=32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * nbytes, f"peak {peak / nbytes:.2f} files' worth"
    for layer, values in arrays.items():
        np.testing.assert_array_equal(tree[layer]["activations"].values, values)


def test_compare_checkpoints_and_resumes(files, capsys):
    folder, a, b = files
    store = str(folder / "s.zarr")
    chunkcca.write_activations(store, {"m0/conv": a, "m1/conv": b}, chunks=10)
    argv = ["compare", store, "m0/conv", "m1/conv", "--measure", "cca", "--precision", "float64", "--json",
            "--no-progress", "--checkpoint", str(folder / "run.ckpt"), "--checkpoint-every", "2"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    saved = chunkcca.Moments.load(folder / "run.ckpt")
    assert saved.n == 50 * 16
    assert main(argv) == 0  # a finished checkpoint: solved again without streaming
    assert capsys.readouterr().out == first
    assert main([*argv[:-4], "--precision", "float32", "--checkpoint", str(folder / "run.ckpt")]) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert main([*argv[:-4], "--checkpoint", "s3://bucket/run.ckpt"]) == 2
    assert "checkpoints are written to local paths only" in capsys.readouterr().err
    assert main(["sweep", store, "--a", "m0", "--b", "m1", "--out", "s3://bucket/sweep.zarr", "--no-progress"]) == 2
    assert "name a local netCDF file (.nc) or zarr store (.zarr)" in capsys.readouterr().err


def test_compare_json_writes_undefined_values_as_null(tmp_path, capsys):
    rng = np.random.default_rng(0)
    store = tmp_path / "s.zarr"
    chunkcca.write_activations(store, {"a": rng.standard_normal((30, 3)), "flat": np.ones((30, 2))})
    assert main(["compare", str(store), "a", "flat", "--measure", "svcca", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)  # strict JSON: no bare NaN
    assert report["results"]["svcca"]["value"] is None


def test_compare_passes_keep_and_alpha(files, capsys):
    folder, a, b = files
    store = str(folder / "s.zarr")
    chunkcca.write_activations(store, {"m0/conv": a, "m1/conv": b}, chunks=10)
    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "svcca", "shape", "--keep", "0.5",
                 "--alpha", "0", "--precision", "float64", "--json", "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    tree = chunkcca.open_activations(store)
    svcca = chunkcca.svcca(tree["m0/conv"], tree["m1/conv"], keep=0.5, precision="float64")
    shape = chunkcca.shape_metric(tree["m0/conv"], tree["m1/conv"], alpha=0.0, precision="float64")
    assert results["svcca"]["dims_a"] == int(svcca["dims_a"]) < 6
    assert results["svcca"]["value"] == pytest.approx(float(svcca["rho_mean"]), rel=1e-12)
    assert results["shape"]["value"] == pytest.approx(float(shape["shape_distance"]), rel=1e-12)
    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "shape", "--alpha", "2"]) == 2
    assert "alpha must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "cka", "--alpha", "0.5"]) == 2
    assert "alpha is not read by cka" in capsys.readouterr().err


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
    assert f"cannot read {tmp_path / 'text.npy'} as a .npy array file" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    tree = chunkcca.write_activations(tmp_path / "t.zarr", {"m0/fc": rng.standard_normal((30, 3)),
                                                             "m1/fc": rng.standard_normal((30, 2))})
    result = chunkcca.cca(tree["m0/fc"]["activations"], tree["m1/fc"]["activations"])
    assert (result.attrs["layer_a"], result.attrs["layer_b"]) == ("m0/fc", "m1/fc")
    assert main(["info", str(tmp_path / "t.zarr")]) == 0
    assert "2 layers" in capsys.readouterr().out


def test_storage_options_reach_the_filesystem_of_a_url_store(tmp_path, capsys):
    chunkcca.write_activations(tmp_path / "s.zarr", {"fc": np.random.default_rng(0).standard_normal((20, 3))})
    url = (tmp_path / "s.zarr").as_uri()
    assert main(["info", url, "--storage-options", '{"auto_mkdir": false}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["layer"] == "fc"
    assert main(["info", str(tmp_path / "s.zarr"), "--storage-options", '{"anon": true}']) == 2
    assert "storage_options apply to fsspec URLs only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", url, "--storage-options", "anon"])
    assert "must be a JSON object" in capsys.readouterr().err


def test_a_non_integer_stride_gets_a_plain_message(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "s.zarr", "a", "b", "--stride", "1.5"])
    assert "argument --stride: must be an integer >= 1, got '1.5'" in capsys.readouterr().err


def test_sweep_passes_keep_epsilon_and_alpha(files, capsys):
    folder, a, b = files
    store = str(folder / "s.zarr")
    tree = chunkcca.write_activations(store, {"m0/conv": a, "m1/conv": b}, chunks=10)
    assert main(["sweep", store, "--a", "m0", "--b", "m1", "--measures", "svcca", "mean_cca", "shape",
                 "--keep", "0.5", "--epsilon", "0.1", "--alpha", "0.3", "--precision", "float64",
                 "--out", str(folder / "s.nc"), "--no-progress"]) == 0
    saved = xr.open_dataset(folder / "s.nc")
    want = chunkcca.similarity({"m0/conv": tree["m0/conv"]}, {"m1/conv": tree["m1/conv"]},
                               measures=["svcca", "mean_cca", "shape"], keep=0.5, epsilon=0.1, alpha=0.3,
                               precision="float64", spatial="avgpool")  # the command's default
    for measure in ("svcca", "mean_cca", "shape"):
        assert saved[measure].item() == pytest.approx(want[measure].item(), rel=1e-12)
    assert saved.attrs["keep"] == 0.5 and saved.attrs["alpha"] == 0.3
