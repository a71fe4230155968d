"""The examples run as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart(tmp_path):
    out = _run(str(EXAMPLES / "quickstart.py"), str(tmp_path / "out"), cwd=tmp_path)
    assert "flatten, stride 2: 19200 rows" in out
    merged = float(out.split("max |d rho| = ")[1].split()[0])
    assert merged < 1e-10
    assert (tmp_path / "out" / "quickstart.png").exists()


def test_svcca_compat(tmp_path):
    out = _run(str(EXAMPLES / "svcca_compat.py"), cwd=tmp_path)
    difference = float(out.split("numpy vs Dask input: ")[1].split()[0])
    assert difference < 1e-10
    assert "cca_dirns1 is lazy: Array (50, 20000)" in out


def test_conv_layers(tmp_path):
    out = _run(str(EXAMPLES / "conv_layers.py"), "--out", str(tmp_path), "--datapoints", "120", cwd=tmp_path)
    for step in ("flatten", "flatten_stride2", "avgpool", "interp_stride5", "dft"):
        assert step in out
        assert (tmp_path / f"conv_{step}.png").exists()
    assert "  30720  " in out  # flatten: 120 datapoints x 16 x 16 rows


def test_digits_cnn(tmp_path):
    pytest.importorskip("torch", reason="torch (the optional 'torch' extra) is not installed")
    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    out = _run(str(EXAMPLES / "digits_cnn.py"), "--out", str(tmp_path), "--epochs", "2", cwd=tmp_path)
    assert "model1: held-out accuracy" in out and "conv2 vs pool2, dft" in out
    for name in ("cka_heatmap", "svcca_heatmap", "conv_rho", "dft"):
        assert (tmp_path / f"digits_{name}.png").exists()


def test_svhn_fc(tmp_path):
    from conftest import SHARED_DATA

    svhn = SHARED_DATA / "svcca" / "SVHN"
    if not svhn.is_dir():
        pytest.skip("real SVHN activations absent (../shared/data, or the folder CHUNKCCA_TEST_DATA names)")
    out = _run(str(EXAMPLES / "svhn_fc.py"), str(svhn), "--out", str(tmp_path), cwd=tmp_path)
    assert "CCA: mean rho 0.5482" in out and "SVCCA (99% variance): mean rho 0.5500" in out
    assert "SVCCA (top 50 directions, as the tutorial): mean rho 0.6985" in out  # google/svcca's tutorial: 0.6985
    assert (tmp_path / "svhn_fc.png").exists()


def test_help_runs_no_example(tmp_path):
    for script in ("quickstart.py", "svcca_compat.py"):
        out = _run(str(EXAMPLES / script), "--help", cwd=tmp_path)
        assert out.startswith("usage:")
    assert not any(tmp_path.iterdir()), "--help wrote nothing"


def test_the_readme_quick_start_runs_twice(tmp_path):
    """The README's quick start, as printed, run twice in the same folder (it overwrites its own store)."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = readme.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "quick.py").write_text(code)
    for _ in range(2):
        out = _run(str(tmp_path / "quick.py"), cwd=tmp_path)
        assert out.split()[-1] == "16000"  # rows: 500 datapoints x 8 x 8 positions, every other one


def test_real_activations_are_found_where_chunkcca_test_data_points(tmp_path):
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", "import conftest; print(conftest.SHARED_DATA)"], cwd=tests,
                          capture_output=True, text=True, env={**os.environ, "CHUNKCCA_TEST_DATA": str(tmp_path)})
    assert done.stdout.strip() == str(tmp_path), done.stderr


def test_folds(tmp_path):
    out = _run(str(EXAMPLES / "folds.py"), "--out", str(tmp_path), "--rows", "400", cwd=tmp_path)
    assert "held-out mean CCA" in out and (tmp_path / "heldout_vs_insample.png").exists()


def test_transformer_layers(tmp_path):
    pytest.importorskip("torch", reason="torch (the optional 'torch' extra) is not installed")
    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    out = _run(str(EXAMPLES / "transformer_layers.py"), "--out", str(tmp_path), "--epochs", "2", cwd=tmp_path)
    assert "model1: held-out accuracy" in out and "last: CKA on the diagonal" in out
    assert "store: model0/embed, model0/layer0, model0/layer1, model0/layer2, model1/embed" in out
    assert (tmp_path / "transformer_layers.png").exists()
