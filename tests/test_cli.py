"""The chunkcca command: ingest (with the array-only unpickler), info, compare, sweep; errors exit 2."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import pickle
import re
import shutil
import sys
import time
import warnings

import numpy as np
import pytest
import xarray as xr
from conftest import correlated_layers
from reference import canonical_correlations, flatten_rows

import chunkcca
from chunkcca.cli import main


@pytest.fixture
def files(tmp_path):
    a, b = correlated_layers(np.random.default_rng(0), 50, (4, 4, 6), (4, 4, 5))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "empty.npy", np.zeros((0, 5), "float32"))
    np.savez(tmp_path / "b.npz", conv=b, fc=b.mean(axis=(1, 2)))
    with gzip.open(tmp_path / "fc.p", "wb") as f:
        pickle.dump(np.ascontiguousarray(b.mean(axis=(1, 2)).T), f)  # svcca's layout: (neurons, datapoints)
    return tmp_path, a, b


def test_ingest_info_compare_sweep(files, capsys):
    folder, a, b = files
    store = str(folder / "s.zarr")
    assert main(["ingest", store, f"m0/conv={folder / 'a.npy'}", f"m1={folder / 'b.npz'}"]) == 0
    assert capsys.readouterr().out == (f"wrote {store}:\n  m0/conv  (datapoint 50, height 4, width 4, channel 6)\n"
                                       "  m1/conv  (datapoint 50, height 4, width 4, channel 5)\n"
                                       "  m1/fc  (datapoint 50, channel 5)\n")
    assert main(["ingest", str(folder / "t.zarr"), f"m1/fc={folder / 'fc.p'}", "--layout", "neurons"]) == 0
    assert capsys.readouterr().out.endswith(":\n  m1/fc  (datapoint 50, channel 5)\n"), "only the layers written"
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

    assert main(["compare", store, "/m0//conv/", "m1/conv", "--measure", "mean_cca", "cka", "--precision", "float64",
                 "--stride", "2", "--json", "--no-progress", "--plot", str(folder / "c.png")]) == 0
    shown = capsys.readouterr()
    report = json.loads(shown.out)  # one JSON document
    assert f"plot: {folder / 'c.png'}\n" in shown.err  # where the plot went, beside it (it said nothing)
    assert report["layer_a"] == "m0/conv"  # as stored, as sweep names it (it repeated "/m0//conv/" as typed)
    want = canonical_correlations(flatten_rows(a, 2), flatten_rows(b, 2))
    assert report["results"]["mean_cca"]["value"] == pytest.approx(want.mean(), abs=1e-9)
    assert report["rows"] == 400
    assert (folder / "c.png").exists()
    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "cca", "--precision", "float64",
                 "--stride", "2", "--no-progress"]) == 0
    shown = capsys.readouterr()
    # a line of the command's warnings (it was "chunkcca: --measure cca is deprecated …")
    assert "chunkcca compare: warning: --measure cca is deprecated; it stands for mean_cca r2_cca\n" in shown.err
    assert f"mean_cca  {want.mean():.4f}" in shown.out and f"r2_cca    {(want**2).mean():.4f}" in shown.out

    assert main(["sweep", store, "--a", "m0", "--b", "m1/conv", "m1/fc", "--measures", "cka", "mean_cca",
                 "--spatial", "avgpool", "--out", str(folder / "sweep.zarr"), "--plot", str(folder / "h.png"),
                 "--no-progress"]) == 0
    saved = xr.open_zarr(folder / "sweep.zarr", consolidated=False)
    assert saved["cka"].dims == ("layer_a", "layer_b") and saved["cka"].shape == (1, 2)
    assert (folder / "h.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "{store}", "m0/conv", "nope"], "no layer 'nope' in {store}; it has m0/conv"),
        (["compare", "{store}", "m0/conv/height", "m0/conv"],  # a variable of a layer, read as a layer
         "no layer 'm0/conv/height' in {store} ('m0/conv/height' is a variable of a layer, not a layer); it has "
         "m0/conv"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--measure", "heldout_cca"],
         "heldout_cca is measured on held-out folds: pass --folds K (K >= 2) or --folds COORDINATE"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--confidence", "0.9", "--out", "{folder}/c.nc"],
         "--confidence sets the level of the intervals --folds gives, which is not given"),
        (["info", "{folder}/missing.zarr"], "no activation store at"),
        (["ingest", "{folder}/x.zarr", "m0/conv"], "expected LAYER=FILE, got 'm0/conv'"),
        (["ingest", "{folder}/x.zarr", "m0=nothing.npy"], "no such file: nothing.npy"),
        # the API's words (coords:, overwrite=True, storage_options) where a flag was given (found by audit)
        (["ingest", "{folder}/x.zarr", "m0={folder}/a.npy", "--coord", "datapoint={folder}/a.npy"],
         "--coord: 'datapoint' names a dim or variable of a layer; call the coordinate otherwise"),
        (["ingest", "{folder}/b.npz", "m0={folder}/a.npy", "--overwrite"],
         "{folder}/b.npz exists and is not an activation store chunkcca wrote; --overwrite replaces only that"),
        (["info", "{store}", "--storage-options", '{{"anon": true}}'],
         "--storage-options apply to stores given by URL (fsspec) only, not to the local path {store}"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--storage-options", '{{"anon": true}}'],
         "--storage-options apply to stores given by URL (fsspec) only"),
        (["ingest", "{folder}/x.zarr", "m0={folder}"], "is a folder; name a .npy, .npz or pickle file"),
        # coordinates, labels and masks of other formats: numpy's advice to unpickle (allow_pickle=) was passed on
        *((["ingest", "{folder}/x.zarr", "m0={folder}/a.npy", *flag],
           "fc.p is not a .npy file: it does not begin as one (written by numpy.save); is it text or another format?")
          for flag in (["--coord", "lab={folder}/fc.p"], ["--datapoints", "{folder}/fc.p"],
                       ["--mask", "m0={folder}/fc.p"])),
        # it advised --layout neurons for a (0, 5) array
        (["ingest", "{folder}/x.zarr", "m0={folder}/empty.npy"], "empty.npy: holds an empty array of shape (0, 5): "
                                                                "no values to write"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--stride", "0"],
         "chunkcca compare: error: argument --stride: must be >= 1, got 0 (see chunkcca compare --help)"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--spatial", "nope"], "argument --spatial: invalid choice"),
        ([], "chunkcca: error: the following arguments are required: command (see chunkcca --help)"),
        # a stray argument is named by its command (it said "chunkcca: error", see chunkcca --help)
        (["compare", "{store}", "m0/conv", "m0/conv", "--foo"],
         "chunkcca compare: error: unrecognized arguments: --foo (see chunkcca compare --help)"),
        # the store after --b was taken by it: "store is required", though given
        (["sweep", "--a", "m0", "--b", "m0", "{store}"], "chunkcca sweep: error: the following arguments are "
         "required: store (--a, --b take every word after them: give the store and layers first)"),
        (["compare", "{store}", "m0/conv"], "required: layer_b (see chunkcca compare --help)"),
        (["compare", "{store}", "m0/conv", "--measure", "cka"], "required: layer_b (see chunkcca compare --help)"),
        (["ingest", "{folder}/x.zarr", "m0={folder}/a.npy", "--mask", "m0={folder}/a.npy", "--mask",
          "m0={folder}/b.npz"], "--mask: layer 'm0' is given twice"),
        (["ingest", "{folder}/x.zarr", "m0={folder}/a.npy", "m0={folder}/b.npz"], "layer 'm0' is given twice"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--measure", "cka", "--plot", "{folder}/p.png"],
         "--plot draws canonical correlation curves"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--plot", "{folder}/none/p.png"], "no folder"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--scheduler", "bogus"], "scheduler must be"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--scheduler", "distributed"],
         "argument --scheduler: 'distributed' runs on a distributed.Client made in Python, which a command has none "
         "of: give the scheduler's address, e.g. tcp://host:8786"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--scheduler", "dask.distributed", "--out", "{folder}/f.nc"],
         "argument --scheduler: 'dask.distributed' runs on a distributed.Client made in Python"),
        (["demo", "--out", "{folder}/demo", "--scheduler", "distributed"],
         "'distributed' runs on a distributed.Client"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--scheduler", "tcp://host:8786/status"],
         "'tcp://host:8786/status': a Dask scheduler's address is tcp://host:port, with a port from 1 to 65535"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--scheduler", "tcp://host"],
         "'tcp://host': a Dask scheduler's address is tcp://host:port"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--scheduler", "tcp://host:70000"],
         "with a port from 1 to 65535"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--scheduler", "inproc://x"],
         "'inproc://x': a Dask scheduler's address starts with tcp://, tls://, ws://, wss://, ucx:// (or is "
         "host:port), not inproc://"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--memory-limit", "lots"],
         "chunkcca compare: error: argument --memory-limit: must be a positive number of bytes or a size such as "
         "'4GiB', got 'lots' (see chunkcca compare --help)"),
        # the flags of measure and streaming options are named, not the API's keywords ("epsilon must be ...")
        (["sweep", "{store}", "--a", "", "--b", "m0", "--out", "{store}.nc"],  # the whole store (found by audit)
         "chunkcca sweep: error: argument --a: a layer or group name is empty (the whole store is '/')"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--memory-limit", " "],  # dask's 1 byte (found by audit)
         "argument --memory-limit: must be a positive number of bytes or a size such as '4GiB', got ' '"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--memory-limit=-5GiB"],
         "argument --memory-limit: must be a positive number of bytes or a size such as '4GiB', got '-5GiB'"),
        # argparse read the value as an option and said only "expected one argument"
        (["compare", "{store}", "m0/conv", "m0/conv", "--memory-limit", "-5GiB"],
         "argument --memory-limit: expected one argument (-5GiB reads as an option; a value that starts with '-' "
         "is given as --memory-limit=-5GiB)"),
        # an option's abbreviation is an option: the value was left out (it advised --stride=--no-prog)
        (["compare", "{store}", "m0/conv", "m0/conv", "--stride", "--no-prog"],
         "chunkcca compare: error: argument --stride: expected one argument (see chunkcca compare --help)"),
        # the spelling typed, the occurrence at fault
        (["compare", "{store}", "m0/conv", "m0/conv", "--measures", "-cka"],
         "(-cka reads as an option; a value that starts with '-' is given as --measures=-cka)"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--measure", "predictivity", "--folds", "2", "--ridge", "1",
          "--ridge", "-1e-3"], "(-1e-3 reads as an option; a value that starts with '-' is given as --ridge=-1e-3)"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--epsilon", "-1"],
         "argument --epsilon: must be a finite number >= 0, got -1.0"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--measure", "shape", "--alpha", "2"],
         "argument --alpha: must be in [0, 1], got 2.0"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--measure", "predictivity", "--folds", "2", "--ridge", "1",
          "-1"], "argument --ridge: must be a finite number >= 0, got -1.0"),
        # --keep, whose rule hangs on --keep-by: named too (it said "keep must be in (0, 1] ... pass keep_by=...")
        (["compare", "{store}", "m0/conv", "m0/conv", "--measure", "svcca", "--keep", "5"],
         "chunkcca compare: error: --keep 5: must be in (0, 1], got 5.0: a share of the variance; to keep a number of "
         "directions, pass keep_by='directions' (--keep-by directions)\n"),
        # numpy's seed error came after the demo began writing, naming no flag
        (["demo", "--out", "{folder}/demo", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        # taken and read by nothing
        (["compare", "{store}", "m0/conv", "m0/conv", "--connect-timeout", "3"],
         "--connect-timeout 3 is the wait for a scheduler given by address (--scheduler tcp://host:port); "
         "--scheduler is not given"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--scheduler", "threads", "--connect-timeout", "3", "--out",
          "{folder}/f.nc"], "--scheduler is threads, a local one with no address"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--measures", "cka", "--spatial", "features",
          "--memory-limit", "1kB", "--out", "{folder}/f.nc"], "over memory_limit=0.98 kiB; raise memory_limit"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--out", "{folder}/x.csv"], "name a local netCDF file (.nc)"),
        (["ingest", "{store}", "m0={folder}/a.npy"], "exists; pass --overwrite to replace it"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--out", "{folder}/none/x.nc"], "no folder"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--memory-limit", "1e30"],
         "argument --memory-limit: must be at most 2**60 bytes (1152921504606846976), got '1e30'"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--connect-timeout", "0"],
         "argument --connect-timeout: must be a finite number > 0, got 0.0"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--folds", "3", "--confidence", "2"],
         "argument --confidence: must be in (0, 1), got 2.0"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--folds", "3", "--confidence", "1"],
         "argument --confidence: must be in (0, 1), got 1.0"),
        (["compare", "{store}", "m0/conv", "m0/conv", "--folds", "-1"],
         "argument --folds: must be an integer >= 2 or a coordinate on datapoint, got -1"),
        (["sweep", "{store}", "--a", "m0", "--b", "m0", "--folds", "2.5", "--out", "{folder}/f.nc"],
         "argument --folds: must be an integer >= 2 or a coordinate on datapoint, got 2.5"),
    ],
)
def test_bad_input_exits_2_with_one_line(files, capsys, argv, message: str):
    folder, a, _ = files
    store = folder / "s.zarr"
    chunkcca.write_activations(store, {"m0/conv": a})
    argv = [part.format(store=store, folder=folder) for part in argv]
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's own errors (usage), one line too
        status = exit_info.code
    assert status == 2
    shown = capsys.readouterr()
    assert message.format(store=store, folder=folder) in shown.err and len(shown.err.strip().splitlines()) == 1
    assert shown.out == ""  # refused before computing anything


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "{store}", "m0/fc", "m1/fc", "--groupby", "digit", "--plot", "{folder}/g.png"],
         "--plot {folder}/g.png: draws one figure of all the datapoints, not one per group; run --groupby digit "
         "without --plot"),
        (["sweep", "{store}", "--a", "m0", "--b", "m1", "--groupby", "digit", "--plot", "{folder}/g.png"],
         "--plot {folder}/g.png: draws one figure of all the datapoints, not one per group"),
        (["compare", "{store}", "m0/fc", "m1/fc", "--plot", "{folder}/curves.txt"],
         "--plot {folder}/curves.txt: name an image file ending in one of .avif, .eps"),
        (["sweep", "{store}", "--a", "m0", "--b", "m1", "--plot", "{folder}/curves"],
         "--plot {folder}/curves: name an image file ending in one of"),
        (["compare", "{store}", "m0/fc", "m1/fc", "--plot", "{folder}"],
         "--plot {folder}: is a folder; name an image file, e.g. plot.png"),
        (["compare", "{store}", "m0/fc", "m1/fc", "--checkpoint", "{folder}/none/run.moments"],
         "--checkpoint {folder}/none/run.moments: no folder {folder}/none"),
        (["compare", "{store}", "m0/fc", "m1/fc", "--checkpoint", "{folder}/run.nc"],
         "--checkpoint {folder}/run.nc: saved Moments are a zarr store (a folder), not a netCDF file"),
        # the checkpoint was written at the plot's path, and the plot refused after the run
        (["compare", "{store}", "m0/fc", "m1/fc", "--checkpoint", "{folder}/o.png", "--plot", "{folder}/o.png"],
         "--plot and --checkpoint both name {folder}/o.png; give each output its own path"),
        (["sweep", "{store}", "--a", "m0", "--b", "m1", "--plot", "{folder}/s.nc"],
         "--out and --plot both name"),
    ],
)
def test_outputs_that_cannot_be_written_are_refused_before_computing(tmp_path, capsys, argv, message):
    rng = np.random.default_rng(0)
    digit = ("datapoint", np.repeat([0, 1, 2], 20))
    store = tmp_path / "s.zarr"
    chunkcca.write_activations(store, {name: xr.DataArray(rng.standard_normal((60, 3)), dims=("datapoint", "channel"),
                                                           coords={"digit": digit}) for name in ("m0/fc", "m1/fc")})
    argv = [part.format(store=store, folder=tmp_path) for part in argv]
    assert main([*argv, "--no-progress", *(["--out", str(tmp_path / "s.nc")] if argv[0] == "sweep" else [])]) == 2
    shown = capsys.readouterr()
    assert shown.err.startswith(f"chunkcca {argv[0]}: error: {message.format(folder=tmp_path)}")
    assert len(shown.err.strip().splitlines()) == 1
    assert shown.out == "" and sorted(path.name for path in tmp_path.iterdir()) == ["s.zarr"]  # nothing written


def test_a_coordinate_whose_labels_cannot_be_sorted_is_named(tmp_path, capsys, monkeypatch):
    """A label coordinate holding None (NaN once in an array) among strings cannot be sorted into groups."""
    labels = np.array(["a"] * 30 + [None] * 30, dtype=object)
    layer = xr.Dataset({"activations": (("datapoint", "channel"), np.random.default_rng(0).standard_normal((60, 3)))},
                       coords={"split": ("datapoint", labels)})
    tree = xr.DataTree.from_dict({"m0/fc": layer, "m1/fc": layer})
    monkeypatch.setattr(chunkcca, "open_activations", lambda *_, **__: tree)  # a store as read, in memory
    assert main(["compare", "s.zarr", "m0/fc", "m1/fc", "--groupby", "split", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chunkcca compare: error: groupby='split' (--groupby split): the coordinate 'split' of layer "
                          "'m0/fc' mixes values of types float, str (None or NaN among labels?)")
    assert err.count("\n") == 1
    assert main(["sweep", "s.zarr", "--a", "m0", "--b", "m1", "--folds", "split", "--out", str(tmp_path / "s.nc"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("chunkcca sweep: error: folds='split' (--folds split): the coordinate "
                                              "'split'")


@pytest.mark.slow
def test_ctrl_c_is_one_line_that_says_whether_a_checkpoint_resumes(files):
    """A real SIGINT while computing, in a fresh process (pytest would take it for its own): one line each, exit
    status 2, no traceback."""
    import subprocess
    import sys

    folder, a, b = files
    store, checkpoint = str(folder / "s.zarr"), str(folder / "run.moments")
    chunkcca.write_activations(store, {"m0/conv": a, "m1/conv": b})
    code = f"""
import os, signal, time
import chunkcca
from chunkcca.cli import main

def interrupted(*_, **__):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while computing
    time.sleep(30)

signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the test runner ignores SIGINT
chunkcca.compare = chunkcca.similarity = interrupted
compare = ["compare", {store!r}, "m0/conv", "m1/conv", "--no-progress", "--checkpoint", {checkpoint!r}]
print(main(compare))
os.mkdir({checkpoint!r})  # as a run interrupted after its first save leaves it
print(main(compare))
print(main(["sweep", {store!r}, "--a", "m0", "--b", "m1", "--out", {str(folder / "s.nc")!r}, "--no-progress"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.splitlines() == [
        f"chunkcca compare: error: interrupted; no checkpoint was saved to {checkpoint} yet, so the same command "
        f"starts again",
        f"chunkcca compare: error: interrupted; run the same command again to resume from the checkpoint {checkpoint}",
        "chunkcca sweep: error: interrupted"]
    assert done.stdout.split() == ["2", "2", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["a finaliser as the libraries load", "a finaliser as the run starts",
                                   "an extension module's initialisation"])
def test_ctrl_c_that_a_finaliser_or_an_extension_module_swallows_is_one_line(tmp_path, where):
    """A Ctrl-C landing in a finaliser (``__del__``: importlib-metadata's ZipFiles as dask and xarray load) was
    swallowed by Python, which printed its traceback, and the command ran on to status 0; one landing while an
    extension module initialised (matplotlib's for --plot; pybind11 makes it ``ImportError('initialization
    failed')``) was "a package is missing". Each is the one line of an interruption, status 2 (found by audit)."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((60, 3)),
                                                     "b": rng.standard_normal((60, 2))}, chunks=30)
    ctrl_c = "os.kill(os.getpid(), signal.SIGINT); sum(range(10000))"
    patch = {
        "a finaliser as the libraries load": f"""
class Dropped:
    def __del__(self):
        {ctrl_c}
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, *_):
        if name == "xarray":
            Dropped()
        return None
sys.meta_path.insert(0, Finder())
from chunkcca.cli import main
""",
        "a finaliser as the run starts": f"""
class Dropped:
    def __del__(self):
        {ctrl_c}
import chunkcca.cli
from chunkcca.cli import main
loaded = chunkcca.cli.size_decode_pool
chunkcca.cli.size_decode_pool = lambda: (Dropped(), loaded())[1]
""",
        "an extension module's initialisation": f"""
import chunkcca.cli
from chunkcca.cli import main
def plot_rho(*args, **kwargs):
    try:
        {ctrl_c}
    except KeyboardInterrupt:
        raise ImportError("initialization failed")
chunkcca.cli.plot_rho = plot_rho
"""}[where]
    code = f"""
import importlib.abc, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the test runner ignores SIGINT
sys.argv = ["chunkcca", "compare", "s.zarr", "a", "b", "--no-progress", "--plot", "p.png"]
{patch}
sys.exit(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (2, "chunkcca compare: error: interrupted\n"), done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("loading", ["xarray", "dask.array", "chunkcca.api"])
def test_ctrl_c_while_the_libraries_load_is_one_line(loading):
    """Ctrl-C during the command's first second or so, while Dask, xarray and chunkcca load (the package loads its
    names on first use, the command's module catches it while it imports them): one line, exit status 2, no
    traceback."""
    import subprocess
    import sys

    code = f"""
import importlib.abc, os, signal, sys

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, *_):
        if name == {loading!r}:
            os.kill(os.getpid(), signal.SIGINT)
        return None

signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the test runner ignores SIGINT
sys.meta_path.insert(0, CtrlC())
sys.argv = ["chunkcca", "compare", "s.zarr", "a", "b"]
from chunkcca.cli import main  # as the installed script does
sys.exit(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "chunkcca compare: error: interrupted\n")
    # a program of the user's that imports the command's module gets its Ctrl-C as a KeyboardInterrupt
    program = code.replace('sys.argv = ["chunkcca", "compare", "s.zarr", "a", "b"]', 'sys.argv = ["mine.py", "run"]')
    program = program.replace("from chunkcca.cli import main  # as the installed script does\nsys.exit(main())",
                              "try:\n    from chunkcca.cli import main\nexcept KeyboardInterrupt:\n"
                              "    print('my handler')")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "my handler\n", "")
    # SIGTERM then too (it killed the command without a word); a program's own is left to its own handling
    terminated = code.replace("os.kill(os.getpid(), signal.SIGINT)", "os.kill(os.getpid(), signal.SIGTERM)")
    done = subprocess.run([sys.executable, "-c", terminated], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "chunkcca compare: error: terminated (SIGTERM)\n")
    done = subprocess.run([sys.executable, "-c", terminated.replace('"chunkcca", "compare"', '"mine.py", "compare"')],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -15 and done.stderr == ""  # killed by it, as Python leaves SIGTERM


@pytest.mark.slow
def test_ctrl_c_leaves_no_asyncio_tracebacks_under_its_line():
    """A Ctrl-C while zarr read a store's metadata left its tasks pending on zarr's event loop: at exit asyncio
    printed 20 lines ("Task was destroyed but it is pending!", "Exception ignored in ... Event loop is closed")
    under the command's one line."""
    import subprocess
    import sys

    code = """
import asyncio, gc, signal, sys
import chunkcca
from chunkcca.cli import main

def interrupted(*_, **__):
    global pending
    loop = asyncio.new_event_loop()
    pending = loop.create_task(asyncio.sleep(3600))  # cut short, as zarr's reads are
    loop.run_until_complete(asyncio.sleep(0))  # the task started, and waits
    loop.close()
    raise KeyboardInterrupt

class Unraisable:
    def __del__(self):
        raise RuntimeError("Event loop is closed")

async def cut_short():
    pass

chunkcca.describe_store = interrupted
sys.argv = ["chunkcca", "info", "s.zarr"]  # the command, which owns its process
code = main(["info", "s.zarr"])
del pending
Unraisable()
cut_short()  # a coroutine made and never awaited, as zarr's sync() leaves one
gc.collect()
sys.exit(code)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "chunkcca info: error: interrupted\n")


@pytest.mark.slow
def test_ctrl_c_after_the_command_said_all_changes_nothing(tmp_path):
    """Ctrl-C in the third of a second between a command's last output and its exit killed it by the signal (exit
    status 130), with nothing said; the command has finished, so its status stands."""
    import subprocess
    import sys

    chunkcca.write_activations(tmp_path / "s.zarr", {"m0/fc": np.random.default_rng(0).standard_normal((20, 3))})
    code = f"""
import os, signal, sys
from chunkcca.cli import main
signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the test runner ignores SIGINT
sys.argv = ["chunkcca", "info", {str(tmp_path / "s.zarr")!r}]
status = main(sys.argv[1:])
os.kill(os.getpid(), signal.SIGINT)  # while the process tears down
sys.exit(status)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "") and "m0/fc" in done.stdout


@pytest.mark.slow
def test_ctrl_c_while_connecting_to_a_silent_scheduler_ends_the_command_at_once(tmp_path):
    """A Ctrl-C while the command waited for an address that accepts but never answers (a dashboard's port) ended
    it only when --connect-timeout ran out (the handshake's pool thread was waited for)."""
    import signal
    import socket
    import subprocess
    import sys

    chunkcca.write_activations(tmp_path / "s.zarr", {"a": np.zeros((10, 2)), "b": np.ones((10, 2))})
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        argv = ["chunkcca", "compare", str(tmp_path / "s.zarr"), "a", "b", "--scheduler",
                f"tcp://127.0.0.1:{silent.getsockname()[1]}", "--connect-timeout", "60", "--no-progress"]
        code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                f"sys.argv = {argv!r}\nfrom chunkcca.cli import main\nprint('started', flush=True)\n"
                "sys.exit(main(sys.argv[1:]))\n")
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        assert process.stdout.readline() == "started\n"
        time.sleep(2)  # connecting by now
        process.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = process.communicate(timeout=50)
    assert time.monotonic() - start < 10
    assert (process.returncode, err) == (2, "chunkcca compare: error: interrupted\n")


def test_an_os_error_is_said_as_the_os_words_it_on_the_file_it_names(tmp_path, monkeypatch, capsys):
    """It printed Python's form: "[Errno 13] Permission denied: 'x.npy'"."""
    import chunkcca.cli

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "x.npy")

    monkeypatch.setattr(chunkcca.cli, "ingest", refused)
    assert main(["ingest", str(tmp_path / "s.zarr"), "a=x.npy", "--no-progress"]) == 2
    assert capsys.readouterr().err == "chunkcca ingest: error: x.npy: Permission denied\n"


def test_the_dash_value_hint_reads_argparse_of_either_python(monkeypatch):
    """argparse's _parse_optional gives a list of tuples in newer Pythons (a tuple in 3.11): the hint that a value
    starting with '-' was read as an option never showed there."""
    from chunkcca.cli import build_parser

    compare = build_parser()._subparsers._group_actions[0].choices["compare"]
    for form in ("tuple", "list"):
        original = compare._parse_optional
        if form == "list":
            monkeypatch.setattr(compare, "_parse_optional", lambda word, read=original: (
                None if (parsed := read(word)) is None else [(parsed[0], parsed[1], None, parsed[2])]))
        assert compare._no_option("-5GiB") and compare._no_option("--nothing")
        assert not compare._no_option("--no-prog") and not compare._no_option("--memory-limit")
        assert not compare._no_option("-3")  # a negative number: a value


@pytest.mark.slow
def test_the_worker_processes_of_the_command_are_not_the_command(tmp_path):
    """--scheduler processes spawns workers that run the script again (as __mp_main__, the same argv): they took
    themselves for the command and a SIGTERM to the group printed its line once per worker, with a traceback."""
    import subprocess
    import sys

    script = tmp_path / "chunkcca"  # the installed script's name, as the workers see it too, which import it again
    script.write_text("import multiprocessing\nimport signal\n\nimport chunkcca.cli\n\n\n"
                      "def taken():\n    handler = signal.getsignal(signal.SIGTERM)\n"
                      "    return chunkcca.cli._as_command(), handler is chunkcca.cli._terminate\n"
                      "\n\ndef child(queue):\n    queue.put(taken())\n\n\n"
                      "if __name__ == '__main__':\n"
                      "    context = multiprocessing.get_context('spawn')\n    queue = context.Queue()\n"
                      "    worker = context.Process(target=child, args=(queue,))\n    worker.start()\n"
                      "    print(taken(), queue.get())\n    worker.join()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (done.stdout, done.stderr) == ("(True, True) (False, False)\n", "")


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True])
def test_sigterm_while_writing_removes_what_was_being_written_and_says_so(tmp_path, group):
    """SIGTERM (kill, a batch system's time limit) killed the command without a word, leaving its temporary folder
    (.demo.zarr.XXXX.tmp) beside the store. ``timeout`` signals the process and then its group: the second signal
    cut the removal short."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "demo"
    process = subprocess.Popen([sys.executable, "-m", "chunkcca.cli", "demo", "--out", str(out), "--datapoints",
                                "20000", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".demo.zarr.*.tmp")) and time.monotonic() < deadline:  # writing by now
        time.sleep(0.05)
    assert list(out.glob(".demo.zarr.*.tmp")), "the demo did not start writing"
    process.send_signal(signal.SIGTERM)
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (2, "chunkcca demo: error: terminated (SIGTERM)\n")
    assert not out.exists()  # nor the folder --out named, which the write made


def test_ctrl_c_while_the_command_reads_its_arguments_is_one_line(monkeypatch, capsys):
    import chunkcca.cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(chunkcca.cli, "size_decode_pool", interrupted)
    assert main(["info", "s.zarr"]) == 2
    assert capsys.readouterr().err == "chunkcca info: error: interrupted\n"


def test_compare_checkpoints_and_resumes(files, capsys):
    folder, a, b = files
    store = str(folder / "s.zarr")
    chunkcca.write_activations(store, {"m0/conv": a, "m1/conv": b}, chunks=10)
    argv = ["compare", store, "m0/conv", "m1/conv", "--measure", "cca", "--precision", "float64", "--json",
            "--no-progress", "--checkpoint", str(folder / "run.ckpt"), "--checkpoint-every", "2"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "resuming" not in first.err
    saved = chunkcca.Moments.load(folder / "run.ckpt")
    assert saved.n == 50 * 16
    root = logging.getLogger()
    shown_by_the_program = logging.StreamHandler(sys.stderr)  # a program whose own logging shows INFO
    root.addHandler(shown_by_the_program)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        assert main(argv) == 0  # a finished checkpoint: solved again without streaming, saying so (it did only
    finally:  # with the progress lines, which --no-progress hides), once
        root.removeHandler(shown_by_the_program)
        root.setLevel(level)
    again = capsys.readouterr()
    assert again.err.count("resuming from the checkpoint") == 1
    assert again.out == first.out
    assert again.err.splitlines()[-1] == (f"resuming from the checkpoint {folder / 'run.ckpt'}: 50 of 50 "
                                          f"datapoints done, nothing left to read")
    other_precision = [word if word != "float64" else "float32" for word in argv[:-4]]
    assert main([*other_precision, "--checkpoint", str(folder / "run.ckpt")]) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert main([*argv[:-4], "--checkpoint", "s3://bucket/run.ckpt"]) == 2
    assert "checkpoints are written to local paths only" in capsys.readouterr().err
    assert main(["sweep", store, "--a", "m0", "--b", "m1", "--out", "s3://bucket/sweep.zarr", "--no-progress"]) == 2
    assert "name a local netCDF file (.nc) or zarr store (.zarr)" in capsys.readouterr().err


def test_minibatch_cka_and_interpolation_options_from_the_command_line(tmp_path, capsys):
    """The command had no --minibatch (its own error advised "minibatch=") and no --method/--grid for interp (the
    google/svcca tutorial's grid could not be run from it): each now gives the library's value."""
    rng = np.random.default_rng(0)
    dims = ("datapoint", "height", "width", "channel")
    a = rng.standard_normal((100, 8, 8, 5))
    b = a[..., :3] + rng.standard_normal((100, 8, 8, 3))
    store = str(tmp_path / "s.zarr")
    tree = chunkcca.write_activations(store, {"m0/c": xr.DataArray(a, dims=dims), "m1/c": xr.DataArray(b, dims=dims),
                                              "m1/p": xr.DataArray(b[:, ::2, ::2], dims=dims)})
    layer = {name: tree[name] for name in ("m0/c", "m1/c", "m1/p")}

    def compared(*flags):
        assert main(["compare", store, *flags, "--no-progress", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    shown = compared("m0/c", "m1/c", "--measure", "cka", "--minibatch", "25", "--spatial", "avgpool")
    want = chunkcca.cka(layer["m0/c"], layer["m1/c"], minibatch=25, spatial="avgpool")
    assert shown["results"]["cka"] == {"value": float(want["cka"]), "minibatches": 4, "rows_left_out": 0}
    assert shown["rows"] == 100 and shown["options"]["minibatch"] == 25
    shown = compared("m0/c", "m1/p", "--spatial", "interp", "--method", "nearest", "--grid", "svcca")
    want = chunkcca.compare(layer["m0/c"], layer["m1/p"], spatial="interp", method="nearest", grid="svcca")
    assert shown["results"]["mean_cca"]["value"] == pytest.approx(float(want["mean_cca"]), abs=1e-12)
    assert (shown["options"]["method"], shown["options"]["grid"]) == ("nearest", "svcca")
    assert shown["results"]["mean_cca"]["value"] != pytest.approx(float(chunkcca.compare(
        layer["m0/c"], layer["m1/p"], spatial="interp")["mean_cca"]), abs=1e-6)  # the flags are read
    # with --minibatch too (they were dropped, silently: linear on coords)
    shown = compared("m0/c", "m1/p", "--spatial", "interp", "--method", "nearest", "--grid", "svcca", "--measure",
                     "cka", "--minibatch", "25")
    want = chunkcca.cka(layer["m0/c"], layer["m1/p"], spatial="interp", method="nearest", grid="svcca", minibatch=25)
    assert shown["results"]["cka"]["value"] == pytest.approx(float(want["cka"]), abs=1e-12)
    assert main(["compare", store, "m0/c", "m1/p", "--spatial", "interp", "--method", "cubic", "--no-progress"]) == 0
    assert "m0/c vs m1/p (interp cubic on the coords grid, stride 1, 6400 rows" in capsys.readouterr().out
    assert main(["sweep", store, "--a", "m0", "--b", "m1", "--measures", "cka", "--minibatch", "20", "--spatial",
                 "avgpool", "--out", str(tmp_path / "sw.nc"), "--no-progress"]) == 0
    want = chunkcca.similarity({"m0/c": layer["m0/c"]}, {"m1/c": layer["m1/c"], "m1/p": layer["m1/p"]},
                               measures=["cka"], minibatch=20, spatial="avgpool")
    with xr.open_dataset(tmp_path / "sw.nc") as saved:
        np.testing.assert_allclose(saved["cka"], want["cka"], rtol=1e-12)
    capsys.readouterr()
    for flags, message in [
            (["--measure", "cka", "mean_cca", "--minibatch", "25"],
             "--minibatch 25 gives minibatch linear CKA: pass --measure cka alone, not cka mean_cca"),
            (["--measure", "cka", "--minibatch", "25", "--precision", "float64", "--folds", "2"],
             "--folds, --precision do not apply to --minibatch"),
            (["--measure", "cka", "--minibatch", "25", "--precision", "auto"],  # given, though the default value
             "--precision does not apply to --minibatch"),
            (["--method", "cubic"], "--method applies to --spatial interp, not --spatial flatten"),
            (["--measure", "cka", "--minibatch", "3"], "argument --minibatch: must be >= 4 (the unbiased HSIC of a "
                                                       "minibatch needs 4 rows), got 3"),
            (["--measure", "cka", "--minibatch", "0"], "argument --minibatch: must be >= 4 (the unbiased HSIC of a "
                                                       "minibatch needs 4 rows), got 0")]:  # (it said >= 1)
        try:
            status = main(["compare", store, "m0/c", "m1/c", "--no-progress", *flags])
        except SystemExit as exit_info:  # argparse's own errors (usage), one line too
            status = exit_info.code
        assert status == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_compare_json_writes_undefined_values_as_null(tmp_path, capsys):
    rng = np.random.default_rng(0)
    store = tmp_path / "s.zarr"
    chunkcca.write_activations(store, {"a": rng.standard_normal((30, 3)), "flat": np.ones((30, 2))})
    assert main(["compare", str(store), "a", "flat", "--measure", "svcca", "--json", "--no-progress"]) == 2
    assert "SVCCA is undefined: layer 'flat' has no variance" in capsys.readouterr().err
    from chunkcca.cli import _json_value

    assert json.dumps({"x": _json_value(float("nan"))}) == '{"x": null}'  # strict JSON: never a bare NaN


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
    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "cka", "--alpha", "0.5"]) == 2
    assert capsys.readouterr().err == ("chunkcca compare: error: not read by cka: --alpha (read by shape); choose "
                                       "with --measure\n")  # in flag words: it said "compare(): alpha is not ..."
    assert main(["sweep", store, "--a", "m0/conv", "--b", "m1/conv", "--measure", "cka", "mean_cca", "--keep-by",
                 "singular_values", "--alpha", "1", "--out", str(folder / "s.nc")]) == 2
    assert capsys.readouterr().err == ("chunkcca sweep: error: not read by cka, mean_cca: --alpha (read by shape); "
                                       "--keep-by (read by svcca); choose with --measure\n")  # every flag at once
    # before any work: not after connecting to a scheduler that does not answer
    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "cka", "--keep", "0.5", "--scheduler",
                 "tcp://10.255.255.1:8786", "--connect-timeout", "30"]) == 2
    assert "not read by cka: --keep (read by svcca)" in capsys.readouterr().err
    # --keep-by directions without svcca was refused for the default --keep 0.99 (found by audit)
    assert main(["compare", store, "m0/conv", "m1/conv", "--keep-by", "directions"]) == 2
    assert capsys.readouterr().err == ("chunkcca compare: error: not read by mean_cca: --keep-by (read by svcca); "
                                       "choose with --measure\n")
    for precision in ("auto", "float64"):  # "one pass", also after auto's pilot and second pass
        assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "cka", "--precision", precision]) == 0
        chosen = "float32" if precision == "auto" else precision  # auto: well conditioned, 800 rows of 11 channels
        assert capsys.readouterr().out.splitlines()[0] == (f"m0/conv vs m1/conv (flatten, stride 1, {50 * 16} rows, "
                                                           f"{chosen} products)")


def test_compare_says_when_dead_units_leave_canonical_correlations_of_0(tmp_path, capsys):
    """mean_cca counts the components beyond the smaller rank as 0 (documented); the command said nothing of a
    constant channel, so its mean_cca read as lower similarity. JSON gives the ranks."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    x[:, 2] = 1.0
    store = str(tmp_path / "s.zarr")
    chunkcca.write_activations(store, {"m0/fc": x, "m1/fc": x + rng.standard_normal((200, 4))})
    assert main(["compare", store, "m0/fc", "m1/fc", "--measure", "mean_cca", "cka", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == ("rank of a 3 of 4 channels, of b 4 of 4: 1 of the 4 canonical correlations is 0 "
                                    "(constant or dependent channels, or fewer rows than channels) and counts in "
                                    "mean_cca and r2_cca")
    assert main(["compare", store, "m0/fc", "m1/fc", "--measure", "mean_cca", "--json", "--no-progress"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["rank_a"], shown["rank_b"]) == (3, 4)
    result = chunkcca.compare(x, x + 1.0, measures=["mean_cca"])
    assert (int(result["rank_a"]), int(result["rank_b"])) == (3, 3)
    assert main(["compare", store, "m0/fc", "m0/fc", "--measure", "cka", "mean_cca", "--no-progress"]) == 0
    assert "rank of a" in capsys.readouterr().out  # itself: rank 3 of 4 on both sides
    assert main(["compare", store, "m1/fc", "m1/fc", "--measure", "mean_cca", "--no-progress"]) == 0
    assert "rank" not in capsys.readouterr().out  # full rank: no note
    # dft: frequencies where a layer has nothing are NaN, in no mean: no note of zeros that "count" (it said so)
    z = rng.standard_normal((300, 4, 4, 3))
    upsampled = np.repeat(np.repeat(z, 2, 1), 2, 2)
    chunkcca.write_activations(str(tmp_path / "d.zarr"), {"a": upsampled + 0.3 * rng.standard_normal(
        (300, 8, 8, 3)), "b": upsampled @ rng.standard_normal((3, 2))})
    assert main(["compare", str(tmp_path / "d.zarr"), "a", "b", "--spatial", "dft", "--precision", "float64",
                 "--no-progress"]) == 0
    shown = capsys.readouterr()
    assert "CCA is undefined at" in shown.err and "rank of a" not in shown.out
    # JSON's per-frequency ranks came as nested lists with no frequencies to read them by (found by audit)
    assert main(["compare", str(tmp_path / "d.zarr"), "a", "b", "--spatial", "dft", "--precision", "float64",
                 "--json", "--no-progress"]) == 0
    shown = json.loads(capsys.readouterr().out)
    result = chunkcca.compare(*(chunkcca.open_activations(str(tmp_path / "d.zarr"))[name] for name in "ab"),
                              measures=["mean_cca"], spatial="dft", precision="float64")
    assert shown["options"]["freq_h"] == shown["options"]["freq_w"] == [0, 1, 2, 3, -4, -3, -2, -1]
    for key in ("rank_a", "rank_b"):
        for h, row in zip(shown["options"]["freq_h"], shown[key]):
            assert row == [int(result[key].sel(freq_h=h, freq_w=w)) for w in shown["options"]["freq_w"]]


def test_an_unforeseen_failure_is_one_line_and_status_2(files, capsys, monkeypatch):
    """Any exception no check foresaw (a RuntimeError here) escaped as a traceback with exit status 1."""
    folder, a, b = files
    store = str(folder / "s.zarr")
    chunkcca.write_activations(store, {"m0/conv": a, "m1/conv": b})

    def broken(*args, **kwargs):
        raise RuntimeError("a task failed\nwith more lines")

    monkeypatch.setattr(chunkcca, "compare", broken)
    assert main(["compare", store, "m0/conv", "m1/conv", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("chunkcca compare: error: RuntimeError: a task failed (if the input does not explain it, "
                            "please report it with the command)\n") and captured.out == ""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_output_to_a_full_device_says_it_was_standard_output(tmp_path):
    """> /dev/full gave "[Errno 28] No space left on device", as if a file of the command could not be written
    (the store was); with stderr full too, the status was 1 (the error line itself failed)."""
    import subprocess

    np.save(tmp_path / "a.npy", np.ones((10, 3)))
    command = [sys.executable, "-c", "import sys; from chunkcca.cli import main; sys.exit(main())", "ingest",
               str(tmp_path / "s.zarr"), f"x={tmp_path / 'a.npy'}", "--no-progress"]
    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # as in a shell
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env=buffered)
        assert (done.returncode, done.stderr) == (2, "chunkcca ingest: error: writing to standard output failed: "
                                                     "No space left on device\n")
        assert chunkcca.layer_paths(chunkcca.open_activations(tmp_path / "s.zarr")) == ["x"]
        command[-3] = str(tmp_path / "t.zarr")
        assert subprocess.run(command, stdout=full, stderr=full, timeout=120, env=buffered).returncode == 2
    # no stdout at all (>&-, pythonw): ingest's report is dropped and the store written; compare's results would
    # be lost, which exited 0 saying nothing: refused in one line before any work
    command[-3] = str(tmp_path / "u.zarr")
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=120, env=buffered,
                          preexec_fn=lambda: os.close(1))
    assert (done.returncode, done.stderr) == (0, "")
    compare = [*command[:3], "compare", str(tmp_path / "u.zarr"), "x", "x", "--no-progress"]
    done = subprocess.run(compare, stderr=subprocess.PIPE, text=True, timeout=120, env=buffered,
                          preexec_fn=lambda: os.close(1))
    assert (done.returncode, done.stderr) == (2, "chunkcca compare: error: standard output is closed, so the results "
                                                 "compare prints would be lost and the status would say all went well; "
                                                 "redirect it to a file\n")


def test_storage_options_reach_the_filesystem_of_a_url_store(tmp_path, capsys):
    chunkcca.write_activations(tmp_path / "s.zarr", {"fc": np.random.default_rng(0).standard_normal((20, 3))})
    url = (tmp_path / "s.zarr").as_uri()
    assert main(["info", url, "--storage-options", '{"auto_mkdir": false}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["layer"] == "fc"
    assert main(["info", str(tmp_path / "s.zarr"), "--storage-options", '{"anon": true}']) == 2
    assert "--storage-options apply to stores given by URL (fsspec) only" in capsys.readouterr().err
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
                               precision="float64")  # spatial="flatten", the command's default as everywhere
    for measure in ("svcca", "mean_cca", "shape"):
        assert saved[measure].item() == pytest.approx(want[measure].item(), rel=1e-12)
    assert saved.attrs["keep"] == 0.5 and saved.attrs["alpha"] == 0.3


def test_sweep_says_which_pairs_dead_units_leave_zero_canonical_correlations_in(tmp_path, capsys):
    """compare said when dead units leave canonical correlations of 0 that mean_cca counts; sweep did not (a
    heatmap of ReLU layers read as dissimilar). It now counts the pairs and names the layers, per side."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 6))
    half_dead = x.copy()
    half_dead[:, :2] = 0.0
    layers = {"m0/l1": half_dead, "m0/l2": x, "m1/l1": x[:, :4] + 0.1 * rng.standard_normal((120, 4)),
              "m1/l2": x + rng.standard_normal((120, 6))}
    store = str(tmp_path / "s.zarr")
    chunkcca.write_activations(store, layers)
    sweep = ["sweep", store, "--a", "m0", "--b", "m1", "--out", str(tmp_path / "s.nc"), "--no-progress"]
    assert main([*sweep, "--measures", "mean_cca", "cka"]) == 0
    out = capsys.readouterr().out
    # m0/l1 (rank 4 of 6) against m1/l1 (4 channels) has 4 components, all live; against m1/l2, 6 with 2 at 0
    assert ("1 of 4 pairs have canonical correlations of 0 that mean_cca and r2_cca count: the rank is below the "
            "channels (constant or dependent channels, or fewer rows than channels) of a m0/l1 4 of 6\n") in out
    assert xr.open_dataset(tmp_path / "s.nc")["rank_a"].values.tolist() == [[4, 4], [6, 6]]
    assert main([*sweep, "--measures", "cka", "--overwrite"]) == 0
    assert "pairs have canonical correlations of 0" not in capsys.readouterr().out


def test_two_recorded_models_compared_across_stores(tmp_path, capsys):
    """Each model in its own store, layers of the same names: compare and sweep take b's from --b-store, in
    network order."""
    rng = np.random.default_rng(5)
    latent = rng.standard_normal((60, 3))
    layers = [{name: latent @ rng.standard_normal((3, width)) + 0.3 * rng.standard_normal((60, width))
               for name, width in (("conv2", 4), ("conv10", 5), ("fc", 3))} for _ in range(2)]
    for model, store in enumerate(("m0.zarr", "m1.zarr")):
        chunkcca.write_activations(tmp_path / store, layers[model])
    stores = [str(tmp_path / "m0.zarr"), "--b-store", str(tmp_path / "m1.zarr")]
    assert main(["compare", stores[0], "fc", "conv10", *stores[1:], "--measure", "cka", "--json",
                 "--precision", "float64", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    want = chunkcca.cka(layers[0]["fc"], layers[1]["conv10"], precision="float64")
    assert report["results"]["cka"]["value"] == pytest.approx(float(want["cka"]), rel=1e-12)
    # which store each layer came from (the names alike, "fc vs fc" said nothing of it)
    assert (report["store_a"], report["store_b"]) == (stores[0], stores[2])
    assert main(["compare", stores[0], "fc", "fc", *stores[1:], "--measure", "cka", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"{stores[0]}: fc vs {stores[2]}: fc (flatten, stride 1, 60 rows")
    titles = []  # and the plot's title ("fc vs fc" said nothing of it; found by audit)
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(chunkcca.cli, "plot_rho", lambda result, title: titles.append(title) or chunkcca.plot.plot_rho(
            result, title=title))
        assert main(["compare", stores[0], "fc", "fc", *stores[1:], "--no-progress", "--plot",
                     str(tmp_path / "fc.png")]) == 0
    assert titles == [f"fc ({stores[0]}) vs fc ({stores[2]})"]
    assert main(["sweep", stores[0], "--a", "/", "--b", "/", *stores[1:], "--measures", "cka", "--precision",
                 "float64", "--out", str(tmp_path / "s.nc"), "--no-progress"]) == 0
    saved = xr.open_dataset(tmp_path / "s.nc")
    assert list(saved["layer_a"].values) == list(saved["layer_b"].values) == ["conv2", "conv10", "fc"]
    assert (saved.attrs["store_a"], saved.attrs["store_b"]) == (stores[0], stores[2])
    want = chunkcca.cka(layers[0]["conv2"], layers[1]["fc"], precision="float64")
    assert float(saved["cka"].sel(layer_a="conv2", layer_b="fc")) == pytest.approx(float(want["cka"]), rel=1e-12)
    saved.close()
    with pytest.MonkeyPatch.context() as patched:  # typed relative, recorded absolute: read from elsewhere, the
        patched.chdir(tmp_path)                    # relative path named another store or none (found by audit)
        assert main(["sweep", "m0.zarr", "--a", "/", "--b", "/", "--b-store", "m1.zarr", "--measures", "cka",
                     "--out", "r.nc", "--no-progress"]) == 0
        capsys.readouterr()
        assert main(["compare", "m0.zarr", "fc", "fc", "--b-store", "m1.zarr", "--json", "--no-progress"]) == 0
    with xr.open_dataset(tmp_path / "r.nc") as relative:
        assert (relative.attrs["store_a"], relative.attrs["store_b"]) == (stores[0], stores[2])
    report = json.loads(capsys.readouterr().out)
    assert (report["store_a"], report["store_b"]) == (stores[0], stores[2])
    assert main(["compare", f"file:{stores[0]}", "fc", "fc", *stores[1:], "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["store_a"] == f"file:{stores[0]}"  # a URL as given


def test_a_stride_that_leaves_too_few_rows_is_refused_or_warned_of_before_streaming(files, capsys):
    folder, a, _ = files
    store = folder / "s.zarr"
    chunkcca.write_activations(store, {"m0/conv": a})
    assert main(["compare", str(store), "m0/conv", "m0/conv", "--stride", "300000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chunkcca compare: error: stride 300000 leaves 1 of the 800 rows of layers")
    assert "every measure needs at least 2" in err and "Completed" not in err and "done in" not in err
    # a stride leaving no more rows than channels: a warning naming a stride that gives more (CCA), nothing for CKA
    assert main(["compare", str(store), "m0/conv", "m0/conv", "--stride", "150", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stride 150 leaves 6 of their 800 rows: a stride of at most 66 gives more" in err
    assert main(["compare", str(store), "m0/conv", "m0/conv", "--stride", "150", "--measure", "cka",
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_rows_holding_nan_are_an_error_or_left_out_with_nan_policy(tmp_path, capsys):
    """The error told a command's user to pass nan_policy='omit', which the command did not take."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((60, 3)), rng.standard_normal((60, 2))
    a[7, 1] = np.nan
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": a, "b": b})
    argv = ["compare", str(tmp_path / "s.zarr"), "a", "b", "--measure", "cka", "--precision", "float64", "--json",
            "--no-progress"]
    assert main(argv) == 2
    assert "pass nan_policy='omit' (--nan-policy omit) to leave such rows out" in capsys.readouterr().err
    assert main([*argv, "--nan-policy", "omit"]) == 0
    want = chunkcca.cka(np.delete(a, 7, axis=0), np.delete(b, 7, axis=0), precision="float64")
    shown = json.loads(capsys.readouterr().out)
    assert shown["results"]["cka"]["value"] == pytest.approx(float(want["cka"]), rel=1e-12)
    # how many rows were left out (the table and JSON gave the rows used alone)
    assert (shown["rows"], shown["options"]["rows_omitted"]) == (59, 1)
    assert main([*argv[:-2], "--no-progress", "--nan-policy", "omit"]) == 0
    assert "59 rows (1 left out: NaN, Inf or padding)" in capsys.readouterr().out
    # a sweep said nothing of it (the rows left out of every pair were in its --out's attrs only)
    assert main(["sweep", str(tmp_path / "s.zarr"), "--a", "a", "--b", "b", "--out", str(tmp_path / "s.nc"),
                 "--nan-policy", "omit", "--no-progress"]) == 0
    assert "1 row left out of every pair (NaN, Inf or padding in any layer of the sweep); 59 used" in \
        capsys.readouterr().out


def test_warnings_are_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((6, 8)),
                                                     "b": rng.standard_normal((6, 3))})
    assert main(["compare", str(tmp_path / "s.zarr"), "a", "b", "--measure", "mean_cca", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("chunkcca compare: warning: only 6 rows for 11 channels of a pair") and err.count("\n") == 1
    # matplotlib's own warnings (logged, not warned) came without the prefix
    store = tmp_path / "t.zarr"
    chunkcca.write_activations(store, {"a": rng.standard_normal((60, 3)), "b": rng.standard_normal((60, 2))})
    assert main(["compare", str(store), "a", "b", "--plot", str(tmp_path / "p.eps"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err == ("chunkcca compare: warning: The PostScript backend does not support transparency; partially "
                   "transparent artists will be rendered opaque.\n")
    import logging

    from chunkcca.cli import _notices

    with _notices("compare"):  # an error logged over lines: one line, said to be an error
        logging.getLogger("matplotlib.backends").error("the backend failed\nTraceback (most recent call last)")
    assert capsys.readouterr().err == "chunkcca compare: error: the backend failed\n"
    with _notices("compare"):  # an empty message is still one line
        logging.getLogger("matplotlib").warning("")
    assert capsys.readouterr().err == "chunkcca compare: warning: \n"


def test_a_url_whose_filesystem_package_is_missing_is_one_line(capsys):
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    assert main(["info", "s3://bucket/acts.zarr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chunkcca info: error: ") and "s3fs" in err and len(err.strip().splitlines()) == 1


def test_compare_and_sweep_with_folds_and_groups(tmp_path, capsys):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 5))
    y = x[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((300, 4))
    labels = np.repeat(["a", "b", "c"], 100)
    layers = {name: xr.DataArray(value, dims=("datapoint", "channel"), coords={"split": ("datapoint", labels)})
              for name, value in (("m0/fc", x), ("m1/fc", y))}
    store = str(tmp_path / "s.zarr")
    chunkcca.write_activations(store, layers)
    assert main(["compare", store, "m0/fc", "m1/fc", "--measure", "cka", "heldout_cca", "--folds", "5",
                 "--confidence", "0.9", "--precision", "float64", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {key: report["options"][key] for key in ("folds", "confidence")} == {"folds": 5, "confidence": 0.9}
    want = chunkcca.compare(x, y, measures=["cka", "heldout_cca"], folds=5, confidence=0.9, precision="float64")
    assert report["results"]["cka"]["se"] == pytest.approx(float(want["cka_se"]), rel=1e-12)
    assert report["results"]["heldout_cca"]["ci"] == pytest.approx(want["heldout_cca_ci"].values.tolist(), rel=1e-12)
    assert main(["compare", store, "m0/fc", "m1/fc", "--measure", "cka", "--groupby", "split", "--no-progress"]) == 0
    assert "per split: a, b, c" in capsys.readouterr().out
    assert main(["compare", store, "m0/fc", "m1/fc", "--measure", "cka", "--folds", "split", "--json",
                 "--no-progress"]) == 0
    options = json.loads(capsys.readouterr().out)["options"]  # K, as the result records it, and its coordinate
    assert (options["folds"], options["folds_by"], options["confidence"]) == (3, "split", 0.95)
    assert main(["sweep", store, "--a", "m0", "--b", "m1", "--measures", "predictivity", "--folds", "split",
                 "--ridge", "0.1", "--out", str(tmp_path / "s.nc"), "--no-progress"]) == 0
    saved = xr.open_dataset(tmp_path / "s.nc")
    assert saved["predictivity_ci"].dims == ("layer_a", "layer_b", "bound") and saved.attrs["ridge"] == 0.1
    assert (saved.attrs["folds"], saved.attrs["folds_by"]) == (3, "split")  # K, and what made the folds
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["predictivity", "predictivity_se"]
    se = f"{float(saved['predictivity_se'].sel(layer_a='m0/fc', layer_b='m1/fc')):.4f}"
    assert printed[2].split()[-1] == se and "standard error over 3 folds; 0.95 intervals" in printed[3]
    assert main(["compare", store, "m0/fc", "m1/fc", "--measure", "predictivity"]) == 2
    assert ("predictivity is measured on held-out folds: pass --folds K (K >= 2) or --folds COORDINATE"
            in capsys.readouterr().err)


@pytest.mark.slow
def test_the_command_gives_zarr_one_decode_thread_per_chunk_read_ahead():
    """The command sizes zarr's decode pool (made once per process) to READ_AHEAD threads per core, and keeps a
    size the user configured; in a fresh process, as the pool is the process's."""
    import subprocess
    import sys

    code = ("import os, zarr\n"
            "from chunkcca.cli import size_decode_pool\n"
            "from chunkcca.options import READ_AHEAD\n"
            "size_decode_pool()\n"
            "print(zarr.config.get('threading.max_workers') == os.cpu_count() * READ_AHEAD)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True"]
    configured = code.replace("size_decode_pool()\n", "zarr.config.set({'threading.max_workers': 3})\n"
                              "size_decode_pool()\n").replace("os.cpu_count() * READ_AHEAD", "3")
    done = subprocess.run([sys.executable, "-c", configured], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True"]


def test_compare_shows_details_per_group_ridges_by_value_and_plots_only_the_curves_asked_for(tmp_path, capsys,
                                                                                            monkeypatch):
    """With --groupby, svcca's dims_a and dims_b went missing from the table and JSON; --ridge 0.1 1 printed a
    bare list; --measure svcca --plot also drew a "cca" curve."""
    import chunkcca.cli

    rng = np.random.default_rng(0)
    digit = ("datapoint", np.repeat([0, 1, 2], 100))
    store = tmp_path / "s.zarr"
    chunkcca.write_activations(store, {name: xr.DataArray(rng.standard_normal((300, 3)), dims=("datapoint", "channel"),
                                                           coords={"digit": digit}) for name in ("m0/fc", "m1/fc")})
    base = ["compare", str(store), "m0/fc", "m1/fc", "--no-progress"]
    assert main([*base, "--measure", "svcca", "--groupby", "digit"]) == 0
    shown = capsys.readouterr().out
    assert "per digit: 0, 1, 2" in shown and "dims_a [3, 3, 3], dims_b [3, 3, 3]" in shown
    # a label holding ", " read as two groups, the values then under other names (found by audit): quoted
    animal = ("datapoint", np.repeat(["bird", "cat, dog", "fish"], 100))
    chunkcca.write_activations(tmp_path / "g.zarr", {name: xr.DataArray(
        rng.standard_normal((300, 3)), dims=("datapoint", "channel"), coords={"animal": animal})
        for name in ("m0/fc", "m1/fc")})
    assert main(["compare", str(tmp_path / "g.zarr"), "m0/fc", "m1/fc", "--groupby", "animal", "--no-progress"]) == 0
    assert "per animal: 'bird', 'cat, dog', 'fish'\n" in capsys.readouterr().out
    assert main([*base, "--measure", "svcca", "--groupby", "digit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["svcca"]["dims_a"] == [3, 3, 3]
    assert main([*base, "--measure", "predictivity", "--folds", "3", "--ridge", "0.1", "1"]) == 0
    shown = capsys.readouterr().out
    assert "per ridge: 0.1, 1.0" in shown and "se [" in shown and "0.95 interval [[" in shown  # errors per ridge
    drawn = []

    def plot_rho(result, **options):
        ax = chunkcca.plot.plot_rho(result, **options)
        drawn.append([text.get_text().split(" (mean")[0] for text in ax.get_legend().get_texts()])
        return ax

    monkeypatch.setattr(chunkcca.cli, "plot_rho", plot_rho)
    svcca = "SVCCA, kept directions"  # the legend said "cca" and "svcca", as if they were the measures' names
    for measures, curves in ((["svcca"], [svcca]), (["pwcca"], ["CCA"]), (["svcca", "mean_cca"], ["CCA", svcca])):
        assert main([*base, "--measure", *measures, "--plot", str(tmp_path / "p.png"), "--overwrite"]) == 0
        assert drawn.pop() == [f"m0/fc vs m1/fc: {curve}" for curve in curves]


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path, capsys, monkeypatch):
    """`chunkcca compare ... --json | head` ended with "error: [Errno 32] Broken pipe"."""
    import io
    import sys

    rng = np.random.default_rng(0)
    layers = {"a": rng.standard_normal((60, 3)), "b": rng.standard_normal((60, 2))}
    chunkcca.write_activations(tmp_path / "s.zarr", layers)

    class LeftEarly:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:  # as io.StringIO: no file behind it
            raise io.UnsupportedOperation("fileno")

    monkeypatch.setattr(sys, "stdout", LeftEarly())
    assert main(["compare", str(tmp_path / "s.zarr"), "a", "b", "--json", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""



@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_a_reader_that_leaves_early_does_not_cost_the_files_asked_for(tmp_path, capsys, monkeypatch, command):
    """``compare ... --plot p.png | true`` and ``sweep ... --plot | head -1`` ended at the first print the reader
    did not take, with status 0 and no plot (found by audit): what the reader leaves is dropped, and the command
    goes on to write every file it was asked for."""
    import io
    import sys

    store, _ = _sweep_layers(tmp_path)

    class LeftEarly:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise io.UnsupportedOperation("fileno")

    monkeypatch.setattr(sys, "stdout", LeftEarly())
    plot = tmp_path / "p.png"
    argv = (["compare", str(store), "m0/fc", "m1/fc"] if command == "compare" else
            ["sweep", str(store), "--a", "m0", "--b", "m1", "--out", str(tmp_path / "s.nc")])
    assert main([*argv, "--plot", str(plot), "--no-progress"]) == 0
    assert plot.stat().st_size > 0 and capsys.readouterr().err == ""


def test_scheduler_addresses_are_checked_and_normalised():
    """A trailing slash ended in distributed's int('8786/') and a Client that hung the exit for 20 s."""
    from chunkcca.cli import _scheduler

    assert _scheduler("tcp://10.0.0.5:8786/") == "tcp://10.0.0.5:8786"
    assert _scheduler(" TLS://host.example:8786// ") == "tls://host.example:8786"
    assert _scheduler("host:8786") == "host:8786" and _scheduler("[::1]:8786") == "[::1]:8786"
    assert _scheduler("tcp://[::1]:8786/") == "tcp://[::1]:8786"
    assert _scheduler("Threads") == "threads" and _scheduler("synchronous") == "synchronous"


def _sweep_layers(tmp_path):
    rng = np.random.default_rng(0)
    store = tmp_path / "s.zarr"
    tree = chunkcca.write_activations(store, {"m0/fc": rng.standard_normal((40, 3)),
                                              "m1/fc": rng.standard_normal((40, 2))})
    return store, tree


def _others(tmp_path, tree):
    """Files and folders that chunkcca sweep did not write: a user's netCDF file and zarr dataset, saved
    Moments, an activation store, a user's text file named .nc, a folder named .nc."""
    xr.Dataset({"mine": ("x", np.arange(5))}).to_netcdf(tmp_path / "mine.nc")
    xr.Dataset({"mine": ("x", np.arange(5))}).to_zarr(tmp_path / "mine.zarr", mode="w", zarr_format=3,
                                                       consolidated=False)
    chunkcca.compute_moments(tree["m0/fc"], tree["m1/fc"]).save(tmp_path / "moments.zarr")
    chunkcca.write_activations(tmp_path / "acts.zarr", {"x": np.ones((4, 2))})
    (tmp_path / "notes.nc").write_text("my notes")
    (tmp_path / "folder.nc").mkdir()
    return ["mine.nc", "mine.zarr", "moments.zarr", "acts.zarr", "notes.nc", "folder.nc"]


def _contents(path):
    return sorted((str(p.relative_to(path)), p.read_bytes()) for p in [path, *path.rglob("*")] if p.is_file()) \
        if path.is_dir() else path.read_bytes()


def test_no_output_is_written_inside_an_activation_store(tmp_path, capsys):
    """A plot, a sweep's --out, a checkpoint or a new store named inside an input store were written there: the
    store then warned of a foreign object on every read, or no longer opened ("not aligned with its parents").
    Each is refused before any work, naming the store, which is left as it was."""
    import hashlib

    rng = np.random.default_rng(0)
    store = tmp_path / "s.zarr"
    chunkcca.write_activations(store, {"m0/fc": rng.standard_normal((40, 3)), "m1/fc": rng.standard_normal((40, 4))})
    np.save(tmp_path / "x.npy", rng.standard_normal((40, 2)))

    def digest() -> str:
        return hashlib.sha256(b"".join(path.relative_to(store).as_posix().encode() + path.read_bytes()
                                       for path in sorted(store.rglob("*")) if path.is_file())).hexdigest()

    (store / "plots").mkdir()  # a plain folder inside the store (it warns of it, as of any foreign object)
    before = digest()
    for argv in (["compare", str(store), "m0/fc", "m1/fc", "--plot", str(store / "p.png")],
                 ["compare", str(store), "m0/fc", "m1/fc", "--plot", str(store / "plots" / "p.png")],
                 ["ingest", str(store / "m0"), f"new={tmp_path / 'x.npy'}", "--append"],
                 ["sweep", str(store), "--a", "m0", "--b", "m1", "--out", str(store / "m0" / "s.nc")],
                 ["compare", str(store), "m0/fc", "m1/fc", "--checkpoint", str(store / "m0" / "fc" / "ck.moments")],
                 ["ingest", str(store / "m0" / "new.zarr"), f"m/x={tmp_path / 'x.npy'}"]):
        assert main([*argv, *(["--no-progress"] if argv[0] != "ingest" else [])]) == 2, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]  # (and the plain folder's warning)
        assert len(errors) == 1 and f"is inside the activation store {store}; chunkcca never writes" in errors[0], err
    result = chunkcca.compare(*(chunkcca.open_activations(store)[name] for name in ("m0/fc", "m1/fc")))
    with pytest.raises(ValueError, match="is inside the activation store"):
        chunkcca.save_result(result, store / "m0" / "r.nc")
    with pytest.raises(ValueError, match="is inside the activation store"):
        chunkcca.write_activations(store / "plots" / "new.zarr", {"x": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="is inside the activation store"):
        chunkcca.compute_moments(rng.standard_normal((40, 3)), rng.standard_normal((40, 2))).save(store / "m.moments")
    assert digest() == before and not any((store / "plots").iterdir())
    with warnings.catch_warnings():  # a user's own folder in the store is not the store's: opened without a word
        warnings.simplefilter("error")
        assert sorted(chunkcca.layer_paths(chunkcca.open_activations(store))) == ["m0/fc", "m1/fc"]


def test_sweep_refuses_an_existing_out_before_computing_unless_overwrite(tmp_path, capsys, monkeypatch):
    """sweep --out replaced any netCDF file and any zarr store but an activation store (a user's dataset, saved
    Moments), with no --overwrite flag; without --overwrite now any existing --out is refused, before any work."""
    store, tree = _sweep_layers(tmp_path)
    others = _others(tmp_path, tree)
    xr.Dataset().to_netcdf(tmp_path / "s.nc")  # an empty result of the user's
    before = {name: _contents(tmp_path / name) for name in [*others, "s.nc"]}
    monkeypatch.setattr(chunkcca, "similarity", lambda *_, **__: pytest.fail("computed before refusing"))
    for name in [*others, "s.nc"]:
        assert main(["sweep", str(store), "--a", "m0", "--b", "m1", "--out", str(tmp_path / name),
                     "--no-progress"]) == 2
        shown = capsys.readouterr()
        assert shown.err == f"chunkcca sweep: error: --out {tmp_path / name} exists; pass --overwrite to replace it\n"
        assert shown.out == ""
    assert {name: _contents(tmp_path / name) for name in before} == before


def test_sweep_refuses_a_netcdf_out_its_rows_overflow_before_computing_and_shows_a_result_it_cannot_save(
        tmp_path, capsys, monkeypatch):
    """A flatten sweep of more than 2**31 rows ran every pair, then save_result refused the netCDF3 file's 32-bit
    integers, and nothing came out (the table was printed after saving). Now the row count is checked first, and
    a result that fails to save (a full disk) is shown before the error."""
    import chunkcca.cli

    rng = np.random.default_rng(0)
    store = tmp_path / "s.zarr"
    dims = ("datapoint", "height", "width", "channel")
    chunkcca.write_activations(store, {"m0/conv": xr.DataArray(rng.standard_normal((40, 2, 3, 4)), dims=dims),
                                       "m1/conv": xr.DataArray(rng.standard_normal((40, 2, 3, 5)), dims=dims)})
    monkeypatch.setattr(chunkcca.cli, "NETCDF_LARGEST_INT", 239)  # 40 datapoints x 6 positions = 240 rows
    with monkeypatch.context() as patched:
        patched.setattr(chunkcca, "similarity", lambda *_, **__: pytest.fail("computed before refusing"))
        args = ["sweep", str(store), "--a", "m0", "--b", "m1", "--no-progress", "--out"]
        assert main([*args, str(tmp_path / "r.nc")]) == 2
        assert capsys.readouterr().err == (f"chunkcca sweep: error: --out {tmp_path / 'r.nc'}: netCDF files as xarray "
                                           f"writes them here (netCDF3) hold 32-bit integers, and this sweep counts up "
                                           f"to 240 rows; save to a zarr store (.zarr), which can\n")
    assert main([*args, str(tmp_path / "r.nc"), "--stride", "2"]) == 0  # 120 rows
    assert main([*args, str(tmp_path / "p.nc"), "--spatial", "avgpool"]) == 0  # 40 rows
    capsys.readouterr()

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(chunkcca, "save_result", full_disk)
    assert main([*args, str(tmp_path / "r.zarr")]) == 2
    shown = capsys.readouterr()
    assert "m0/conv" in shown.out and "mean_cca" in shown.out and "results:" not in shown.out
    assert "No space left on device" in shown.err and shown.err.count("\n") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.nc", "r.nc", "s.zarr"]


def test_sweep_overwrite_replaces_only_a_sweep_result(tmp_path, capsys):
    """With --overwrite, a sweep result (.nc or .zarr) is replaced; anything else is refused and left as it was,
    and a result of another kind (save_result's mark says only that chunkcca wrote it) is refused too."""
    store, tree = _sweep_layers(tmp_path)
    others = _others(tmp_path, tree)
    before = {name: _contents(tmp_path / name) for name in others}
    sweep = ["sweep", str(store), "--a", "m0", "--b", "m1", "--measures", "cka", "--no-progress", "--overwrite"]
    for name in others:
        assert main([*sweep, "--out", str(tmp_path / name)]) == 2
        shown = capsys.readouterr()
        assert shown.err == (f"chunkcca sweep: error: --out {tmp_path / name} exists and is not a sweep result "
                             f"chunkcca wrote; --overwrite replaces only that, never another file or folder: choose "
                             f"another path\n") and shown.out == ""
    assert {name: _contents(tmp_path / name) for name in before} == before
    for name in ("out.nc", "out.zarr"):
        out = str(tmp_path / name)
        assert main([*sweep[:-1], "--out", out]) == 0  # new: no --overwrite needed
        assert main([*sweep[:-1], "--out", out]) == 2
        assert capsys.readouterr().err.endswith(f"--out {out} exists; pass --overwrite to replace it\n")
        second = [*sweep[:-1], "--out", out, "--overwrite"]
        second[second.index("cka")] = "mean_cca"
        assert main(second) == 0
        opened = xr.open_zarr(out, consolidated=False) if name.endswith(".zarr") else xr.open_dataset(out)
        with opened as saved:
            assert sorted(saved.data_vars) == ["mean_cca", "rank_a", "rank_b", "rows"]  # the second sweep's
    capsys.readouterr()
    link = tmp_path / "link.nc"  # to a sweep result: named as a link (it was "not a sweep result chunkcca wrote")
    link.symlink_to(tmp_path / "out.nc")
    assert main([*sweep, "--out", str(link)]) == 2
    assert capsys.readouterr().err == (f"chunkcca sweep: error: --out {link} exists and is a symbolic link; "
                                       f"--overwrite never replaces one (nor what it points to): choose another path\n")
    assert link.is_symlink()


def test_sweep_overwrite_leaves_what_a_user_put_inside_a_zarr_result(tmp_path, capsys):
    """A zarr sweep result holding a user's notes or plots was replaced whole by --overwrite, deleting them (zarr
    warned of each file, twice). ``save_result(overwrite=True)`` and the command (before the sweep, through
    ``check_result_path``) refuse what is put at its top or inside one of its arrays, and leave it as it was."""
    store, _ = _sweep_layers(tmp_path)
    out = tmp_path / "out.zarr"
    sweep = ["sweep", str(store), "--a", "m0", "--b", "m1", "--measures", "cka", "--no-progress", "--out", str(out)]
    assert main(sweep) == 0
    (out / "NOTES.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    capsys.readouterr()
    assert main([*sweep, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err == (f"chunkcca sweep: error: --out {out} holds what chunkcca did not write (NOTES.txt, plots); an "
                   f"overwrite replaces only a result that chunkcca saved: move them out of it, or choose another "
                   f"path\n")
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "plots" / "a.png").is_file()
    (out / "NOTES.txt").unlink()
    shutil.rmtree(out / "plots")
    (out / "cka" / "stray.bin").write_bytes(b"x")
    with xr.open_zarr(out) as saved:
        result = saved.load()
    with pytest.raises(FileExistsError, match=r"out.zarr holds what chunkcca did not write \(cka/stray.bin\); "
                                              r"an overwrite replaces only a result that chunkcca saved"):
        chunkcca.save_result(result, out, overwrite=True)
    assert (out / "cka" / "stray.bin").is_file()
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patched:  # the command refuses it before the sweep too
        patched.setattr(chunkcca, "similarity", lambda *_, **__: pytest.fail("computed before refusing"))
        assert main([*sweep, "--overwrite"]) == 2
    assert "holds what chunkcca did not write (cka/stray.bin)" in capsys.readouterr().err
    (out / "cka" / "stray.bin").unlink()
    chunkcca.save_result(result, out, overwrite=True)  # a result as it was written is replaced
    (out / ".DS_Store").write_bytes(b"")  # Finder's, which both leave aside
    assert main([*sweep, "--overwrite"]) == 0


def test_plots_replace_only_a_plot_the_command_drew(tmp_path, capsys):
    """--plot wrote over any file (a user's photo.png) without asking; now an existing plot is refused unless
    --overwrite, which replaces only a plot the command drew (it marks them), and the plot is written atomically."""
    store, _ = _sweep_layers(tmp_path)
    compare = ["compare", str(store), "m0/fc", "m1/fc", "--no-progress"]
    mine = tmp_path / "photo.png"
    import matplotlib.pyplot as plt

    figure = plt.figure()
    figure.savefig(mine)  # matplotlib's own mark, not the command's
    plt.close(figure)
    photo = mine.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main([*compare, "--plot", str(mine), *extra]) == 2
        shown = capsys.readouterr()
        assert shown.err == (f"chunkcca compare: error: --plot {mine} exists; pass --overwrite to replace it\n"
                             if not extra else
                             f"chunkcca compare: error: --plot {mine} exists and is not a plot chunkcca wrote; "
                             f"--overwrite replaces only that, never another file or folder: choose another path\n")
        assert shown.out == ""
    assert mine.read_bytes() == photo
    for kind in ("png", "pdf", "svg", "svgz", "eps"):
        plot = tmp_path / f"curves.{kind}"
        assert main([*compare, "--plot", str(plot)]) == 0
        drawn = plot.read_bytes()
        assert main([*compare, "--plot", str(plot)]) == 2
        assert capsys.readouterr().err.endswith(f"--plot {plot} exists; pass --overwrite to replace it\n")
        assert main(["compare", str(store), "m1/fc", "m0/fc", "--no-progress", "--plot", str(plot), "--overwrite"]) == 0
        assert plot.read_bytes() != drawn  # replaced (by m1/fc vs m0/fc): the command drew it
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 a user's photo")
    assert main(["sweep", str(store), "--a", "m0", "--b", "m1", "--out", str(tmp_path / "h.nc"), "--plot",
                 str(tmp_path / "photo.jpg"), "--overwrite", "--no-progress"]) == 2
    jpg = tmp_path / "photo.jpg"
    assert (f"--plot {jpg} exists, and --overwrite replaces only a plot chunkcca drew, which it can tell only in "
            f".png, .pdf") in capsys.readouterr().err
    assert (tmp_path / "photo.jpg").read_bytes() == b"\xff\xd8\xff\xe0 a user's photo"
    assert not (tmp_path / "h.nc").exists()  # refused before the sweep
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


@pytest.mark.parametrize(("command", "checkpoint", "then"), [
    ("compare", None, "nothing of the run was kept, so the same command starts again (--checkpoint keeps a run's "
                      "progress)"),
    ("compare", "saved", "run the same command again to resume from the checkpoint {checkpoint}"),
    ("compare", "unsaved", "no checkpoint was saved to {checkpoint} yet, so the same command starts again"),
    ("sweep", None, "nothing of the run was kept, so the same command starts again"),
])
def test_a_lost_cluster_is_one_line_that_says_whether_a_checkpoint_resumes(tmp_path, capsys, monkeypatch, command,
                                                                          checkpoint, then):
    """The scheduler gone mid-run ended in a 41-line traceback and exit status 1 (distributed's
    FutureCancelledError is no error main() caught)."""
    distributed = pytest.importorskip("distributed")
    import chunkcca.cluster

    store, _ = _sweep_layers(tmp_path)
    closed = []
    monkeypatch.setattr(chunkcca.cluster, "connect", lambda address, timeout: f"client of {address}")
    monkeypatch.setattr(chunkcca.cluster, "close_quietly", closed.append)

    def lost(*_, **options):
        assert options["scheduler"] == "client of tcp://127.0.0.1:8786"  # the command's own Client
        raise distributed.client.FutureCancelledError("chunkcca-moments-merge-1", reason="scheduler-connection-lost",
                                                      msg="Client lost the connection to the scheduler.")

    monkeypatch.setattr(chunkcca, "compare", lost)
    monkeypatch.setattr(chunkcca, "similarity", lost)
    path = tmp_path / "run.moments"
    if checkpoint == "saved":
        path.mkdir()
    argv = (["compare", str(store), "m0/fc", "m1/fc"] if command == "compare" else
            ["sweep", str(store), "--a", "m0", "--b", "m1", "--out", str(tmp_path / "s.nc")])
    argv += ["--scheduler", "tcp://127.0.0.1:8786/", "--no-progress",
             *(["--checkpoint", str(path)] if checkpoint else [])]
    assert main(argv) == 2
    shown = capsys.readouterr()
    assert shown.err == (f"chunkcca {command}: error: lost the Dask cluster at tcp://127.0.0.1:8786 during the run "
                         f"(FutureCancelledError: scheduler-connection-lost); {then.format(checkpoint=path)}\n")
    assert closed == ["client of tcp://127.0.0.1:8786"] and shown.out == ""


@pytest.mark.slow
def test_an_address_that_cannot_be_used_is_one_line_at_once_and_the_exit_does_not_wait(tmp_path):
    """A trailing slash or tls:// printed the error, then a Client.__del__ traceback after a 20 s wait at exit."""
    import subprocess
    import sys
    import time

    pytest.importorskip("distributed")
    store, _ = _sweep_layers(tmp_path)
    for address, message in (("tls://127.0.0.1:9", "tls://127.0.0.1:9: a tls:// scheduler needs the client's TLS "
                                                    "settings in Dask's configuration"),
                             ("tcp://127.0.0.1:9/", "no Dask scheduler answered at tcp://127.0.0.1:9 within 1 s "
                                                    "(connect_timeout; a dashboard's port, 8787, is not the "
                                                    "scheduler's): the connection was refused (nothing listens at "
                                                    "that port)\n")):
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "chunkcca.cli", "compare", str(store), "m0/fc", "m1/fc",
                               "--scheduler", address, "--connect-timeout", "1", "--no-progress"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": ""})
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith(f"chunkcca compare: error: {message}") and done.stderr.count("\n") == 1
        assert time.monotonic() - start < 15  # the 20 s wait on a Client that never connected is gone


def test_a_server_that_accepts_but_never_answers_is_said_to_leave_the_handshake_unfinished(tmp_path, capsys):
    """It said "... within 1 s (...): TimeoutError: TimeoutError" (asyncio's timeout, which has no message); the
    wait is the timeout."""
    import socket

    pytest.importorskip("distributed")
    store, _ = _sweep_layers(tmp_path)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        status = main(["compare", str(store), "m0/fc", "m1/fc", "--scheduler", address, "--connect-timeout", "2",
                       "--no-progress"])
        assert time.monotonic() - start < 2.9  # the timeout and a plain connection's moment (it waited 3 s)
    err = capsys.readouterr().err
    assert status == 2
    assert err == (f"chunkcca compare: error: no Dask scheduler answered at {address} within 2 s (connect_timeout; "
                   f"a dashboard's port, 8787, is not the scheduler's): a server accepted the connection but did not "
                   f"answer as a Dask scheduler\n"), err


@pytest.mark.slow
def test_a_client_that_fails_to_connect_is_closed_quietly():
    """chunkcca.cluster.connect closes a Client whose __init__ failed (distributed left it for the exit)."""
    import subprocess
    import sys

    pytest.importorskip("distributed")
    code = ("from chunkcca.cluster import connect\n"
            "try:\n"
            "    connect('tcp://127.0.0.1:9/', timeout=1)\n"  # distributed: int('9/') fails inside Client
            "except ValueError as error:\n"
            "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout == ("cannot connect to a Dask scheduler at tcp://127.0.0.1:9/: ValueError: invalid literal "
                           "for int() with base 10: '9/'\n")
    assert done.stderr == "" and done.returncode == 0


def test_a_client_that_lost_its_scheduler_neither_hangs_nor_warns_of_blas():
    """A scheduler lost between the steps of one part of a run: registering the BLAS plugin failed with a plain
    OSError, which printed a warning line above the command's one-line error, and a Client that gave up
    reconnecting before its futures finished left gather waiting forever (the command hung). Both now give way
    to the error saying the cluster was lost."""
    import types
    import warnings

    pytest.importorskip("distributed")
    from distributed.comm.core import CommClosedError

    from chunkcca.cluster import gathered, prepare_workers

    def refused(*_, **__):
        raise OSError("Timed out trying to connect to tcp://127.0.0.1:8786 after 2 s")

    closed = types.SimpleNamespace(status="closed", register_plugin=refused,
                                   scheduler=types.SimpleNamespace(address="tcp://127.0.0.1:8786"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_workers(closed)
    with pytest.warns(RuntimeWarning, match="could not limit BLAS to one thread on the workers"):
        prepare_workers(types.SimpleNamespace(status="running", register_plugin=refused))
    never = types.SimpleNamespace(done=lambda: False)
    started = time.monotonic()
    with pytest.raises(CommClosedError, match=r"the Client lost its scheduler at tcp://127\.0\.0\.1:8786 and closed"):
        gathered(closed, [never])
    assert time.monotonic() - started < 1
    finished = types.SimpleNamespace(done=lambda: True)
    running = types.SimpleNamespace(status="running", gather=lambda futures: ["value"] * len(futures))
    assert gathered(running, [finished]) == ["value"]


def test_a_failure_to_reconnect_to_a_lost_scheduler_is_named_as_the_cluster_lost(tmp_path, capfd, monkeypatch):
    """Between two parts of a run, the lost scheduler shows as distributed's plain OSError "Timed out trying to
    connect" (after log lines "Batched Comm Closed" with a traceback and "Failed to reconnect to scheduler", which
    the command leaves out): the Client's status says the cluster was lost; a plain OSError with the Client still
    connected is any other error."""
    import types

    pytest.importorskip("distributed")
    import chunkcca.cluster

    store, _ = _sweep_layers(tmp_path)
    client = types.SimpleNamespace(status="closing")
    monkeypatch.setattr(chunkcca.cluster, "connect", lambda address, timeout: client)
    monkeypatch.setattr(chunkcca.cluster, "close_quietly", lambda client: None)

    def reconnecting(*_, **__):
        try:
            raise ConnectionError("the scheduler's socket closed")
        except ConnectionError:  # distributed's info records on a lost connection carry its traceback
            logging.getLogger("distributed.batched").info("Batched Comm Closed %r", "<TCP (closed)>", exc_info=True)
        logging.getLogger("distributed.client").error("Failed to reconnect to scheduler after %.2f seconds, closing "
                                                      "client", 2.0)
        raise OSError("Timed out trying to connect to tcp://127.0.0.1:8786 after 2 s")

    monkeypatch.setattr(chunkcca, "compare", reconnecting)
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("distributed").addHandler(handler)  # beside distributed's own, on stderr
    argv = ["compare", str(store), "m0/fc", "m1/fc", "--scheduler", "127.0.0.1:8786", "--no-progress"]
    try:
        assert logging.getLogger("distributed.batched").isEnabledFor(logging.INFO)  # distributed's configuration
        assert main(argv) == 2
    finally:
        logging.getLogger("distributed").removeHandler(handler)
    assert logged == []
    assert capfd.readouterr().err == (
        "chunkcca compare: error: lost the Dask cluster at 127.0.0.1:8786 during the run (OSError: Timed out trying "
        "to connect to tcp://127.0.0.1:8786 after 2 s); nothing of the run was kept, so the same command starts "
        "again (--checkpoint keeps a run's progress)\n")
    client.status = "running"
    assert main(argv) == 2
    assert capfd.readouterr().err == ("chunkcca compare: error: Timed out trying to connect to tcp://127.0.0.1:8786 "
                                       "after 2 s\n")


def test_sweep_plots_the_measure_asked_for(tmp_path, capsys, monkeypatch):
    """--plot drew the first of --measures only; --plot-measure chooses, and is refused without --plot or for a
    measure not measured, before any work."""
    import chunkcca.cli

    store, _ = _sweep_layers(tmp_path)
    drawn = []
    plot = chunkcca.cli.plot_similarity
    monkeypatch.setattr(chunkcca.cli, "plot_similarity", lambda result, measure: drawn.append(measure)
                        or plot(result, measure))
    sweep = ["sweep", str(store), "--a", "m0", "--b", "m1", "--measures", "mean_cca", "cka", "--no-progress"]
    assert main([*sweep, "--out", str(tmp_path / "a.nc"), "--plot", str(tmp_path / "a.png"),
                 "--plot-measure", "cka"]) == 0
    assert main([*sweep, "--out", str(tmp_path / "b.nc"), "--plot", str(tmp_path / "b.png")]) == 0
    assert drawn == ["cka", "mean_cca"] and (tmp_path / "a.png").exists()
    capsys.readouterr()
    monkeypatch.setattr(chunkcca, "similarity", lambda *_, **__: pytest.fail("computed before refusing"))
    for flags, message in (([ "--plot-measure", "cka"], "--plot-measure cka names the measure --plot draws: pass "
                                                        "--plot too"),
                           (["--plot", str(tmp_path / "c.png"), "--plot-measure", "svcca"],
                            "--plot-measure svcca names the measure --plot draws: one of --measures mean_cca cka")):
        assert main([*sweep, "--out", str(tmp_path / "c.nc"), *flags]) == 2
        assert capsys.readouterr().err == f"chunkcca sweep: error: {message}\n"


def test_a_list_option_given_twice_keeps_both(files, capsys):
    """argparse kept only the last of ``--measure mean_cca --measure cka`` (cka alone) and of ``--a x --a y`` (a
    sweep of y alone), silently; they gather, and a default is never added to."""
    folder = files[0]
    store = str(folder / "s.zarr")
    assert main(["ingest", store, f"m0/conv={folder / 'a.npy'}", f"m1={folder / 'b.npz'}"]) == 0
    capsys.readouterr()
    assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "mean_cca", "--measure", "cka", "r2_cca",
                 "--json", "--no-progress"]) == 0
    assert list(json.loads(capsys.readouterr().out)["results"]) == ["mean_cca", "cka", "r2_cca"]
    assert main(["compare", store, "m0/conv", "m1/conv", "--json", "--no-progress"]) == 0
    assert list(json.loads(capsys.readouterr().out)["results"]) == ["mean_cca"], "the default as it was"
    out = folder / "sweep.nc"
    assert main(["sweep", store, "--a", "m0/conv", "--a", "m1/conv", "--b", "m1/fc", "--measure", "cka",
                 "--spatial", "avgpool", "--out", str(out), "--no-progress"]) == 0
    import xarray as xr

    with xr.open_dataset(out) as swept:
        assert list(swept["layer_a"].values) == ["m0/conv", "m1/conv"] and list(swept.data_vars) == ["cka", "rows"]


@pytest.mark.parametrize("words", [["compare", "s.zarr", "a", "b", "--stride", "2", "--stride", "4"],
                                   ["compare", "s.zarr", "a", "b", "--epsilon", "0.1", "--epsilon=0.1"],
                                   ["demo", "--seed", "1", "--seed", "2"],
                                   ["sweep", "s.zarr", "--a", "x", "--b", "y", "--out", "o.nc", "--out", "p.nc"]])
def test_an_option_of_one_value_given_twice_is_refused(words, capsys):
    """argparse kept the last of ``--stride 2 --stride 4`` (stride 4), silently: an option of one value given twice
    is a usage error, in one line, before anything is read."""
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors (usage)
        main(words)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    option = next(word for word in words[::-1] if word.startswith("--")).split("=")[0]
    assert error.count("\n") == 1 and f"argument {option}: given twice" in error, error


def test_an_output_folder_that_cannot_be_written_is_named_before_any_work(files, capsys, monkeypatch):
    """A read-only folder for --out, --plot, --checkpoint or a store failed after the whole run, naming only a
    temporary file (".s.nc.htjf89dn.tmp"); a .pgf plot (which runs LaTeX) failed after it too. (os.access is
    patched: as root, the tests' user in CI, permission bits do not refuse.)"""
    folder = files[0]
    store = str(folder / "s.zarr")
    assert main(["ingest", store, f"m0/conv={folder / 'a.npy'}", f"m1={folder / 'b.npz'}"]) == 0
    capsys.readouterr()
    locked = folder / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(locked) and real(path, mode))
    for words, option in ((["compare", store, "m0/conv", "m1/conv", "--plot", str(locked / "p.png")], "--plot"),
                          (["compare", store, "m0/conv", "m1/conv", "--checkpoint", str(locked / "c")], "checkpoint"),
                          (["sweep", store, "--a", "m0", "--b", "m1", "--out", str(locked / "s.nc")], "--out"),
                          (["ingest", str(locked / "i.zarr"), f"x={folder / 'a.npy'}"], "the store")):
        assert main([*words, "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"{option} {locked}" in error and (
            f"the folder {locked} cannot be written to" in error), error
    assert not any(locked.iterdir())
    assert main(["compare", store, "m0/conv", "m1/conv", "--plot", str(folder / "p.pgf"), "--no-progress"]) == 2
    assert "name an image file ending in one of" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_chunkcca_is_the_command(tmp_path):
    """``python -m chunkcca`` said "No module named chunkcca.__main__"; it is the command, a process of its own:
    a failure and a Ctrl-C while the libraries load are one line each, exit status 2."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "chunkcca", "info", str(tmp_path / "none.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"chunkcca info: error: no activation store at {tmp_path / 'none.zarr'}\n"
    code = """
import importlib.abc, os, runpy, signal, sys

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, *_):
        if name == "xarray":
            os.kill(os.getpid(), signal.SIGINT)
        return None

signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the test runner ignores SIGINT
sys.meta_path.insert(0, CtrlC())
sys.argv = ["-m", "compare", "s.zarr", "a", "b"]
runpy.run_module("chunkcca", run_name="__main__", alter_sys=True)  # as python -m chunkcca does
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "chunkcca compare: error: interrupted\n")



@pytest.mark.slow
def test_a_library_that_fails_as_it_loads_is_one_line(tmp_path):
    """A malformed Dask config file (``~/.config/dask/*.yaml``, ``DASK_CONFIG``) failed dask's import: every
    command, ``--help`` too, printed a 23 to 32 line traceback with status 1 (found by audit). It is one line
    naming the file, status 2."""
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("array:\n  chunk-size: [unclosed\n")
    for argv in (["--help"], ["info", str(tmp_path / "none.zarr")]):
        done = subprocess.run([sys.executable, "-m", "chunkcca", *argv], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "DASK_CONFIG": str(tmp_path / "bad.yaml")})
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr.startswith(f"chunkcca: error: its libraries failed to load: ValueError: A dask config "
                                      f"file at '{tmp_path / 'bad.yaml'}' is malformed") and \
            done.stderr.count("\n") == 1, done.stderr



@pytest.mark.slow
def test_a_ctrl_c_while_the_processes_schedulers_workers_start_is_one_line(tmp_path):
    """A Ctrl-C in a terminal signals the command's process group: with ``--scheduler processes``, a worker still
    loading the libraries printed a 40-line traceback beside the command's one line (found by audit), and one still
    starting after the command had gone another. Workers ignore it while they load; the command ends them."""
    import signal
    import subprocess
    import sys

    store, _ = _sweep_layers(tmp_path)
    for delay in (1.0, 1.5, 2.0, 2.5):
        command = subprocess.Popen([sys.executable, "-m", "chunkcca.cli", "compare", str(store), "m0/fc", "m1/fc",
                                    "--scheduler", "processes", "--no-progress"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        err = command.communicate(timeout=120)[1]
        # the command's one line; no worker's traceback through chunkcca's modules as they load (a worker signalled
        # in its interpreter's first moments, before any of chunkcca, may still say Python's startup error)
        assert (command.returncode, err.endswith("chunkcca compare: error: interrupted\n")) in ((2, True), (0, False))
        assert not re.search(r"/chunkcca/\w+\.py", err), (delay, err)
        deadline = time.monotonic() + 30  # no worker left behind (the exited wait a moment to be reaped)
        with pytest.raises(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(command.pid, 0)
                time.sleep(0.2)
    # a job whose Ctrl-C its parent ignores (a script's ``&``) ignores it in its workers too, once they have loaded
    # (they took Python's default then: the job was stopped, found by review)
    rng = np.random.default_rng(0)  # a run of a few seconds once the workers have loaded: 400 tasks
    chunkcca.write_activations(tmp_path / "many.zarr", {"m0/fc": rng.standard_normal((20000, 32)),
                                                        "m1/fc": rng.standard_normal((20000, 16))}, chunks=50)
    command = subprocess.Popen([sys.executable, "-m", "chunkcca.cli", "compare", str(tmp_path / "many.zarr"), "m0/fc",
                                "m1/fc", "--scheduler", "processes", "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    while command.poll() is None:  # while the workers load and after
        time.sleep(0.3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.pid, signal.SIGINT)
    out, err = command.communicate(timeout=120)
    assert command.returncode == 0 and "m0/fc" in out and "Traceback" not in err and "interrupted" not in err, err


@pytest.mark.slow
def test_a_ctrl_c_during_pythons_own_teardown_keeps_the_status(tmp_path):
    """A Ctrl-C after the command had said all, while Python tore the process down (its default handler put
    back), killed it: status 130 for a run that had finished (an .nc written, its table printed)."""
    import subprocess
    import sys

    chunkcca.write_activations(tmp_path / "s.zarr", {"a": np.ones((10, 2))})
    code = f"""
import os, signal, sys, time
sys.argv = ["chunkcca", "info", {str(tmp_path / 's.zarr')!r}]
from chunkcca.cli import main

class LateCtrlC:  # cleared with the module's globals, late in the teardown
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)

late = LateCtrlC()
sys.exit(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")


def test_an_output_folder_that_makes_no_files_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    """A folder whose permissions allow writing but that makes no files (/sys, /proc, some network mounts): the
    sweep ran whole, printed its table, then failed naming a temporary file."""
    import tempfile

    chunkcca.write_activations(tmp_path / "s.zarr", {"m0/a": np.ones((20, 2)).cumsum(0), "m1/b": np.ones((20, 2))})
    refusing = tmp_path / "refusing"
    refusing.mkdir()
    making = tempfile.TemporaryFile

    def made(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, refusing):
            raise PermissionError(1, "Operation not permitted")
        return making(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", made)
    assert main(["sweep", str(tmp_path / "s.zarr"), "--a", "m0", "--b", "m1", "--out", str(refusing / "x.nc"),
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing computed
    assert captured.err == (f"chunkcca sweep: error: --out {refusing / 'x.nc'}: no file can be made in the folder "
                            f"{refusing} (Operation not permitted)\n")


@pytest.mark.parametrize("kept", ["a run", "every other"])
def test_two_recordings_of_other_datapoints_are_compared_on_those_they_share_when_asked(tmp_path, capsys, kept):
    """Two stores holding different datapoints were refused with Python's remedy (``a.sel(datapoint=shared)``),
    which a command cannot take: --shared-datapoints compares the datapoints every layer holds (by label), saying
    what each leaves out; without it the error names the flag."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 4, 3)), rng.standard_normal((60, 4, 2))
    labels_b = np.arange(20, 80) if kept == "a run" else np.arange(0, 120, 2)[::-1]  # b's order differs too
    chunkcca.write_activations(tmp_path / "m0.zarr", {"conv": xr.DataArray(
        x, dims=("datapoint", "token", "channel"), coords={"datapoint": np.arange(60)})}, chunks=16)
    chunkcca.write_activations(tmp_path / "m1.zarr", {"conv": xr.DataArray(
        y, dims=("datapoint", "token", "channel"), coords={"datapoint": labels_b})}, chunks=16)
    shared = np.intersect1d(np.arange(60), labels_b)
    a_rows = flatten_rows(x[shared])
    b_rows = flatten_rows(y[np.argsort(labels_b)][np.searchsorted(np.sort(labels_b), shared)])
    want = np.linalg.norm(_centred(b_rows).T @ _centred(a_rows)) ** 2 / (
        np.linalg.norm(_centred(a_rows).T @ _centred(a_rows)) * np.linalg.norm(_centred(b_rows).T @ _centred(b_rows)))
    argv = ["compare", str(tmp_path / "m0.zarr"), "conv", "conv", "--b-store", str(tmp_path / "m1.zarr"),
            "--measure", "cka", "--precision", "float64", "--no-progress", "--json"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"chunkcca compare: error: the layers hold different datapoints (by label): {60 - len(shared)} of the 60 of "
        f"conv in {tmp_path / 'm0.zarr'}, {60 - len(shared)} of the 60 of conv in {tmp_path / 'm1.zarr'} are not "
        f"in every layer; pass --shared-datapoints to compare the {len(shared)} they share\n")
    assert main([*argv, "--shared-datapoints", "--memory-limit", "1kB"]) == 2  # a failure is its one line alone
    assert capsys.readouterr().err.count("\n") == 1
    assert main([*argv, "--shared-datapoints"]) == 0
    shown = capsys.readouterr()
    reordered = ("chunkcca compare: warning: layer 'conv (m1.zarr)' holds the datapoints of layer 'conv (m0.zarr)' "
                 "in another order; chunkcca reorders it lazily" if kept == "every other" else "")  # as without it
    assert shown.err.startswith(reordered) and shown.err.endswith(
        f"compared the {len(shared)} datapoints every layer holds; left out: {60 - len(shared)} of the 60 of conv in "
        f"{tmp_path / 'm0.zarr'}, {60 - len(shared)} of the 60 of conv in {tmp_path / 'm1.zarr'}\n")
    assert shown.err.count("\n") == 1 + bool(reordered)
    result = json.loads(shown.out)  # stdout holds the JSON alone
    assert result["rows"] == len(shared) * 4
    assert result["results"]["cka"]["value"] == pytest.approx(want, rel=1e-12)  # float64 products
    out = tmp_path / "s.nc"
    assert main(["sweep", str(tmp_path / "m0.zarr"), "--a", "conv", "--b", "conv", "--b-store",
                 str(tmp_path / "m1.zarr"), "--measures", "cka", "--precision", "float64", "--no-progress",
                 "--out", str(out), "--shared-datapoints"]) == 0
    with xr.open_dataset(out) as swept:
        assert float(swept["cka"].squeeze()) == pytest.approx(want, rel=1e-12)
    capsys.readouterr()
    chunkcca.write_activations(tmp_path / "pq.zarr", {"p": xr.DataArray(x, dims=("datapoint", "token", "channel"),
                                                                        coords={"datapoint": np.arange(60)}),
                                                      "q": xr.DataArray(y, dims=("datapoint", "token", "channel"),
                                                                        coords={"datapoint": labels_b})})
    assert main(["sweep", str(tmp_path / "pq.zarr"), "--a", "p", "q", "--b", "p", "q", "--measures", "cka",
                 "--no-progress", "--out", str(tmp_path / "pq.nc"), "--shared-datapoints"]) == 0
    assert capsys.readouterr().err.endswith(  # each layer once, though on both sides
        f"left out: {60 - len(shared)} of the 60 of p in {tmp_path / 'pq.zarr'}, {60 - len(shared)} of the 60 of q "
        f"in {tmp_path / 'pq.zarr'}\n")


def _centred(rows: np.ndarray) -> np.ndarray:
    return rows - rows.mean(axis=0)


def test_a_failed_check_is_one_line_without_the_warnings_before_it(tmp_path, capsys):
    """A layer of another store holding the datapoints in another order is warned of; a check failing after that
    warning (--folds more than the datapoints, a --groupby coordinate missing, a --stride leaving one row) printed
    the warning and then its error, two lines for one failure. Warnings are held until the run starts computing
    (or a notice, or the end), so a failed check is its one line, and a run says them as before (found by audit)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((60, 3)), rng.standard_normal((60, 2))
    def labelled(values: np.ndarray, labels: np.ndarray) -> xr.DataArray:
        return xr.DataArray(values, dims=("datapoint", "channel"), coords={"datapoint": labels})

    chunkcca.write_activations(tmp_path / "one.zarr", {"x": labelled(a, np.arange(60))}, chunks=30)
    chunkcca.write_activations(tmp_path / "two.zarr", {"x": labelled(b[::-1], np.arange(60)[::-1])}, chunks=30)
    argv = ["compare", str(tmp_path / "one.zarr"), "x", "x", "--b-store", str(tmp_path / "two.zarr"), "--no-progress"]
    for extra, said in ((["--folds", "1000"], "folds=1000 (--folds 1000) is more than the 60 datapoints"),
                        (["--groupby", "nosuch"], "has no coordinate 'nosuch'"),
                        (["--stride", "1000"], "stride 1000 leaves 1 of the 60 rows")):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and said in err, err
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith("chunkcca compare: warning: layer 'x (two.zarr)' holds the datapoints of layer "
                          "'x (one.zarr)' in another order"), err


def test_a_cluster_run_s_warnings_are_said_as_they_come(tmp_path, capsys, monkeypatch):
    """On a cluster, local Dask callbacks see none of the computing, and its warnings come before it (no workers:
    the run waits): they were held, said only after a run that succeeded and lost with one that failed or was
    stopped (found by review). With --scheduler ADDRESS they are said as they come; locally a failed check is
    one line."""
    import contextlib

    import chunkcca.cli

    rng = np.random.default_rng(0)
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((40, 3)),
                                                     "b": rng.standard_normal((40, 2))}, chunks=20)

    def warned_then_failed(*args, **kwargs):
        warnings.warn("the Dask cluster at tcp://127.0.0.1:1 has no workers: the run waits until one joins",
                      RuntimeWarning, stacklevel=2)
        raise ValueError("the run failed")

    monkeypatch.setattr(chunkcca, "compare", warned_then_failed)
    monkeypatch.setattr(chunkcca.cli, "_connected", contextlib.contextmanager(lambda args: (yield "a client")))
    argv = ["compare", str(tmp_path / "s.zarr"), "a", "b", "--no-progress"]
    assert main([*argv, "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "chunkcca compare: warning: the Dask cluster at tcp://127.0.0.1:1 has no workers: the run waits until one "
        "joins", "chunkcca compare: error: the run failed"]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == ["chunkcca compare: error: the run failed"]


@pytest.mark.slow
def test_a_ctrl_c_the_parent_ignores_is_ignored(tmp_path):
    """A command started with SIGINT ignored (a script's job run with ``&``: Ctrl-C is the script's) was
    interrupted by it once the command handled Ctrl-C itself (found by review): it runs on, as Python leaves it."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((60, 3)),
                                                     "b": rng.standard_normal((60, 2))}, chunks=30)
    code = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the shell starts a background job
sys.argv = ["chunkcca", "compare", "s.zarr", "a", "b", "--no-progress"]
import chunkcca.cli
from chunkcca.cli import main
loaded = chunkcca.cli.size_decode_pool
chunkcca.cli.size_decode_pool = lambda: (os.kill(os.getpid(), signal.SIGINT), loaded())[1]
sys.exit(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert "mean_cca" in done.stdout


def test_checkpoint_conflicts_are_said_in_flags(tmp_path, capsys):
    """--checkpoint with --groupby or --folds, or with --spatial features, was refused in the API's words
    ("run groupby or folds without checkpoint", "spatial='features' takes no checkpoint … memory_limit"); a
    checkpoint without row-norm sums for cka_debiased advised compute_moments(..., row_norms=True) (found by
    audit)."""
    rng = np.random.default_rng(0)
    layer = xr.DataArray(rng.standard_normal((40, 2, 2, 3)), dims=("datapoint", "height", "width", "channel"),
                         coords={"label": ("datapoint", np.arange(40) % 2)})
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": layer, "b": layer * 2 + 1}, chunks=20)
    argv = ["compare", str(tmp_path / "s.zarr"), "a", "b", "--no-progress", "--checkpoint", str(tmp_path / "run")]
    for extra, said in ((["--groupby", "label"], "--checkpoint keeps one Moments of the run: run --groupby without "
                                                  "--checkpoint"),
                        (["--folds", "2"], "run --folds without --checkpoint"),
                        (["--spatial", "features", "--measure", "cka"], "--spatial features takes no --checkpoint")):
        assert main([*argv, *extra]) == 2
        assert said in capsys.readouterr().err
    assert main([*argv, "--measure", "cka"]) == 0
    capsys.readouterr()
    assert main([*argv, "--measure", "cka_debiased"]) == 2
    err = capsys.readouterr().err
    assert "make this one afresh by a run with cka_debiased among its measures" in err and "row_norms=True," not in err
