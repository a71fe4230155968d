"""Paths beginning with ``~``: every path chunkcca takes is the home folder's, as xarray opens and writes stores, and
never a folder named ``~`` in the working folder (Python's ``open`` and ``pathlib`` take ``~`` literally). An
empty path is refused."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import xarray as xr
from conftest import correlated_layers

import chunkcca
from chunkcca.cli import main
from chunkcca.ingest import ingest, load_pickled_array


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder of its own (``HOME``), and a working folder apart from it that must gain no ``~`` folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    yield home
    assert not os.path.lexists(work / "~"), "a folder named '~' was made in the working folder"


@pytest.fixture
def layers():
    a, b = correlated_layers(np.random.default_rng(3), 40, (3, 3, 4), (3, 3, 5))
    dims = ("datapoint", "height", "width", "channel")
    return xr.DataArray(a, dims=dims, name="a"), xr.DataArray(b, dims=dims, name="b")


def test_stores_results_moments_and_checkpoints(home, layers):
    a, b = layers
    tree = chunkcca.write_activations("~/acts.zarr", {"m0/conv": a, "m1/conv": b}, chunks=16)
    assert (home / "acts.zarr" / "zarr.json").is_file()
    assert chunkcca.layer_paths(chunkcca.open_activations("~/acts.zarr")) == chunkcca.layer_paths(tree)
    assert [row["layer"] for row in chunkcca.describe_store("~/acts.zarr")] == ["m0/conv", "m1/conv"]
    left = home / ".acts.zarr.x1.tmp"  # as an interrupted write leaves it, beside the store
    left.mkdir()
    assert [row["path"] for row in chunkcca.leftover_writes("~/acts.zarr")] == [str(left)]
    left.rmdir()
    chunkcca.write_activations("~/acts.zarr", {"m0/fc": a.mean(("height", "width"))}, mode="a")
    assert "m0/fc" in chunkcca.layer_paths(chunkcca.open_activations(home / "acts.zarr"))

    result = chunkcca.cka(tree["m0/conv"], tree["m1/conv"])
    chunkcca.check_result_path("~/cka.nc")
    chunkcca.save_result(result, "~/cka.nc")
    xr.testing.assert_identical(xr.open_dataset(home / "cka.nc").load().drop_attrs(), result.drop_attrs())
    with pytest.raises(FileExistsError, match=r"cka\.nc"):
        chunkcca.check_result_path("~/cka.nc")

    moments = chunkcca.compute_moments(a, b, checkpoint="~/run.moments")
    assert (home / "run.moments" / "zarr.json").is_file()
    moments.save("~/saved.moments")
    assert chunkcca.Moments.load("~/saved.moments").n == moments.n == 40 * 9
    assert chunkcca.StreamOptions(checkpoint="~/run.moments").checkpoint == str(home / "run.moments")
    # each written whole where named: fsspec put the temporary folders in the home folder, and the rename into
    # './~' failed, leaving them there
    assert sorted(path.name for path in home.iterdir()) == ["acts.zarr", "cka.nc", "run.moments", "saved.moments"]


def test_ingest_reads_and_writes_home_paths(home, layers):
    a, _ = layers
    np.save(home / "a.npy", a.values)
    np.save(home / "mask.npy", np.ones(a.shape[:3], bool))
    np.save(home / "labels.npy", np.arange(40) % 2)
    np.save(home / "ids.npy", np.arange(100, 140))
    with open(home / "fc.p", "wb") as file:
        pickle.dump(a.values[:, 0, 0], file)
    np.testing.assert_array_equal(load_pickled_array("~/fc.p"), a.values[:, 0, 0])
    tree = ingest("~/in.zarr", {"conv": "~/a.npy"}, masks={"conv": "~/mask.npy"},
                  coords={"label": "~/labels.npy"}, datapoints="~/ids.npy")
    layer = tree["conv"]["activations"]
    assert (home / "in.zarr" / "zarr.json").is_file()
    np.testing.assert_array_equal(layer["label"], np.arange(40) % 2)
    np.testing.assert_array_equal(layer["datapoint"], np.arange(100, 140))


def test_command_paths_after_an_equals_sign(home, layers, capsys):
    """The shell expands ``~`` at a word's start, not in ``--out=~/x``: the command does."""
    a, b = layers
    chunkcca.write_activations(home / "acts.zarr", {"m0/conv": a, "m1/conv": b})
    np.save(home / "a.npy", a.values)
    assert main(["ingest", "~/in.zarr", "conv=~/a.npy"]) == 0
    assert (home / "in.zarr" / "zarr.json").is_file()
    assert main(["compare", "~/acts.zarr", "m0/conv", "m1/conv", "--b-store=~/acts.zarr", "--plot=~/rho.png"]) == 0
    assert (home / "rho.png").is_file()
    assert main(["sweep", "~/acts.zarr", "--a", "m0", "--b", "m1", "--out=~/sweep.nc", "--plot=~/heat.png"]) == 0
    assert (home / "sweep.nc").is_file() and (home / "heat.png").is_file()
    assert str(home / "sweep.nc") in capsys.readouterr().out


def test_a_path_of_bytes_is_refused_naming_its_type():
    from chunkcca._fs import expanded

    with pytest.raises(TypeError, match=r"a path is a str or os\.PathLike of str, got bytes"):
        expanded(b"~/acts.zarr")


def test_an_empty_path_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch, capsys):
    """``demo --out ''`` wrote into the working folder, ``compare --plot ''`` drew nothing and exited 0, and
    ``ingest ''`` said " is where a.npy is read from" (found by audit)."""
    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(8).standard_normal((20, 3)).astype("float32")
    chunkcca.write_activations("s.zarr", {"a": x, "b": x[:, :2]})
    np.save("a.npy", x)
    for argv in (["demo", "--out", "", "--datapoints", "64"], ["ingest", "", "a=a.npy"],
                 ["compare", "s.zarr", "a", "b", "--plot", ""], ["sweep", "s.zarr", "--out", ""], ["info", ""]):
        with pytest.raises(SystemExit) as exit_info:  # argparse's errors (usage), one line too
            main(argv)
        assert exit_info.value.code == 2
        flag = "store" if argv[1] == "" else argv[argv.index("") - 1]
        assert capsys.readouterr().err.startswith(f"chunkcca {argv[0]}: error: argument {flag}: a path is empty")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.npy", "s.zarr"]
    for call in (lambda: chunkcca.open_activations(""), lambda: chunkcca.write_activations("", {"a": x}),
                 lambda: chunkcca.save_result(chunkcca.cka(x, x), ""), lambda: chunkcca.Moments.load("")):
        with pytest.raises(ValueError, match=r"^a path is empty: name a file or folder"):
            call()


def test_demo_and_record_write_under_home(home, capsys):
    assert main(["demo", "--datapoints", "24", "--chunk", "8", "--out=~/demo", "--no-progress"]) == 0
    assert (home / "demo" / "demo.zarr" / "zarr.json").is_file()
    torch = pytest.importorskip("torch", reason="torch (the optional 'torch' extra) is not installed")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    from chunkcca.record import record

    tree = record(model, ["0", "1"], [torch.randn(5, 3), torch.randn(5, 3)], "~/rec.zarr")
    assert (home / "rec.zarr" / "zarr.json").is_file()
    assert chunkcca.layer_paths(tree) == ["0", "1"]
