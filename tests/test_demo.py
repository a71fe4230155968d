"""The chunkcca command and its demo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import chunkcca
from chunkcca.cli import main
from chunkcca.datasets import demo_layers
from chunkcca.demo import run_demo


@pytest.mark.slow
def test_demo_writes_store_table_and_plot(tmp_path, capsys):
    assert main(["demo", "--datapoints", "48", "--chunk", "10", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "conv2 vs conv2  flatten       2" in out and "peak MiB" in out
    assert "(avgpool comparison skipped: 48 datapoints give too few rows for the pair's 128 channels)" in out
    png = tmp_path / "cca_coefficients.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tree = chunkcca.open_activations(tmp_path / "demo.zarr")
    assert sorted(chunkcca.layer_paths(tree)) == ["model0/conv2", "model0/pool2", "model1/conv2", "model1/pool2"]
    conv2 = tree["model0/conv2"]["activations"]
    assert conv2.shape == (48, 16, 16, 64) and conv2.data.numblocks[0] == 5
    assert tree["model1/pool2"]["activations"].shape == (48, 8, 8, 64)


@pytest.mark.slow
def test_demo_results_match_in_memory_and_rerun_overwrites(tmp_path):
    results = run_demo(tmp_path, datapoints=24, chunk=7, progress=False, precision="float64")
    run_demo(tmp_path, datapoints=24, chunk=7, progress=False)
    layers = {k: v.compute() for k, v in demo_layers(24, chunk=7).items()}
    a = layers["model0/pool2"].reshape(-1, 64).astype(np.float64)
    b = layers["model1/pool2"].reshape(-1, 64).astype(np.float64)
    from reference import canonical_correlations

    # 1536 rows for 128 channels: the covariance route squares a condition number of ~1e3-1e4,
    # so float64 agreement is ~1e-8 here (5e-9 seen).
    np.testing.assert_allclose(results["pool2 vs pool2, flatten, stride 1"]["rho"], canonical_correlations(a, b),
                               atol=1e-7)
    assert np.all(a >= 0), "post-ReLU activations"


def test_demo_replaces_only_a_store_it_wrote(tmp_path, capsys):
    """demo --out DIR replaced any activation store at DIR/demo.zarr, the user's own data included, unasked."""
    import hashlib

    store = tmp_path / "demo.zarr"
    chunkcca.write_activations(store, {"mydata/fc": np.random.default_rng(0).standard_normal((10, 3))})
    before = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(store.rglob("*")) if path.is_file()))
    assert main(["demo", "--datapoints", "12", "--chunk", "6", "--out", str(tmp_path), "--no-progress"]) == 2
    shown = capsys.readouterr()  # and before it says it writes one ("writing 12 datapoints … to …/demo.zarr")
    assert f"{store} exists and is not a store the demo wrote (its layers are not model0/conv2, " in shown.err
    assert shown.out == ""
    after = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(store.rglob("*")) if path.is_file()))
    assert after.hexdigest() == before.hexdigest() and not (tmp_path / "cca_coefficients.png").exists()
    (tmp_path / "results.nc").write_text("mine")  # a file as --out said "[Errno 17] File exists: 'results.nc'"
    assert main(["demo", "--datapoints", "12", "--out", str(tmp_path / "results.nc"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"chunkcca demo: error: {tmp_path / 'results.nc'} exists and is not a folder: "
                                       f"the demo writes its store and plot into a folder; choose another --out\n")
    assert (tmp_path / "results.nc").read_text() == "mine"
    mine = tmp_path / "mine"  # a plot of the user's where the demo draws its own: refused after all the work,
    mine.mkdir()  # naming overwrite=True, which the command has not
    (mine / "cca_coefficients.png").write_bytes(b"my plot")
    assert main(["demo", "--datapoints", "12", "--out", str(mine), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"chunkcca demo: error: {mine / 'cca_coefficients.png'} exists and is not a "
                                       f"plot the demo drew: the demo replaces only its own; choose another --out\n")
    assert not (mine / "demo.zarr").exists() and (mine / "cca_coefficients.png").read_bytes() == b"my plot"


def test_a_demo_larger_than_the_free_space_is_refused_before_writing(tmp_path, capsys):
    """--datapoints 10000000000 ran until the task list of its chunks filled memory and the kernel killed the
    process (status 137, not a word); a store larger than the disk filled it."""
    out = tmp_path / "demo"
    assert main(["demo", "--datapoints", "10000000000", "--out", str(out), "--no-progress"]) == 2
    shown = capsys.readouterr()
    assert shown.out == "" and not out.exists()
    assert shown.err.startswith("chunkcca demo: error: 10000000000 datapoints make a demo store of up to 1.46 PiB "
                                "(about 160 kiB a datapoint), more than the ") and shown.err.count("\n") == 1
    assert f"free under {tmp_path}: choose fewer --datapoints or another --out" in shown.err


def test_a_demo_under_a_folder_that_cannot_be_written_is_refused_as_such(tmp_path, capsys, monkeypatch):
    """On a full read-only mount the demo said its store would take "more than the 0 B free": the folder is
    checked first, and named (os.access stands in for the mount: as root, permissions alone do not refuse)."""
    import os

    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: False)
    out = tmp_path / "demo"
    assert main(["demo", "--datapoints", "10000000000", "--out", str(out), "--no-progress"]) == 2
    shown = capsys.readouterr()
    assert shown.err == (f"chunkcca demo: error: --out {out}: the folder {tmp_path} cannot be written to (a read-only "
                         f"file system, or no permission)\n")
    assert not out.exists()


def test_a_demo_out_in_a_folder_that_does_not_exist_is_refused(tmp_path, capsys):
    """demo --out /nonexistent/dir made the whole chain of folders and wrote there: a typo in a folder is no new
    folder, as for the other commands' outputs. The demo makes its --out folder only, in one that exists."""
    out = tmp_path / "typo" / "demo"
    assert main(["demo", "--datapoints", "12", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"chunkcca demo: error: --out {out}: no folder {tmp_path / 'typo'} to make it in\n"
    assert not (tmp_path / "typo").exists()


def test_demo_layers_do_not_depend_on_chunking():
    small = demo_layers(20, chunk=20)["model1/conv2"].compute()
    np.testing.assert_array_equal(small[:7], demo_layers(7, chunk=20)["model1/conv2"].compute())


def test_bad_arguments_exit_nonzero_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--datapoints", "0"])
    assert exit_info.value.code == 2
    assert "must be >= 1, got 0" in capsys.readouterr().err



@pytest.mark.parametrize(("option", "message"), [
    ({"precision": "float16"}, r"precision must be one of"),
    ({"scheduler": "no-such-scheduler"}, r"scheduler must be .threads., .synchronous., .processes. or a Dask "),
    ({"datapoints": 0}, r"datapoints must be an integer >= 1, got 0"),
    ({"chunk": 2.5}, r"chunk must be an integer >= 1, got 2.5"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
    ({"progress": "no"}, r"progress must be True or False"),
])
def test_run_demo_refuses_a_bad_option_before_it_writes(tmp_path, option, message):
    """``run_demo(precision="float16")`` wrote the 100 MB store, then failed in the first comparison (found by
    audit); ``datapoints=0`` failed in Dask's concatenate. Each option is checked first, as the command does."""
    with pytest.raises((ValueError, TypeError), match=message):
        run_demo(tmp_path / "demo", **option)
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "chunkcca.cli", "demo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--datapoints" in out and "--out" in out


@pytest.mark.slow
def test_demo_takes_the_precision_and_scheduler_forms_of_the_other_commands(tmp_path, capsys):
    assert main(["demo", "--datapoints", "160", "--chunk", "80", "--out", str(tmp_path), "--precision", "auto",
                 "--scheduler", "synchronous", "--no-progress"]) == 0
    shown = capsys.readouterr()
    # its avgpool pair has 64 + 64 channels: with 100 datapoints (one row each) it was shown after the warning of a
    # singular covariance, its mean rho meaningless
    assert "conv2 vs pool2  avgpool" in shown.out and "warning" not in shown.err
