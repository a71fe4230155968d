"""Regression tests for defects found in review: each failed before its fix."""

from __future__ import annotations

import tracemalloc

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from reference import canonical_correlations

import chunkcca
from chunkcca import Moments, cca, cka, similarity, svcca_from_moments
from chunkcca.compat import compute_pwcca, get_cca_similarity
from chunkcca.layers import as_activations


def test_interp_without_coordinates_uses_the_shared_extent():
    """An 8x8 map and its 4x4 downsampling (no coordinates) line up: nearest interpolation recovers it exactly."""
    rng = np.random.default_rng(0)
    small = rng.standard_normal((30, 4, 4, 3))
    fine = small.repeat(2, axis=1).repeat(2, axis=2) @ rng.standard_normal((3, 3))
    result = cca(fine, small, spatial="interp", method="nearest", precision="float64")
    np.testing.assert_allclose(result["rho"], 1.0, atol=1e-9)


@pytest.mark.parametrize("scale", [1e-6, 1e-9, 1e6])
def test_channel_units_do_not_matter(scale):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 4))
    y = x[:, :3] @ rng.standard_normal((3, 3)) + rng.standard_normal((500, 3))
    scaled = x * np.array([scale, 1, 1, 1])
    result = cca(scaled, y, precision="float64")
    assert not result["pruned_a"].any()
    np.testing.assert_allclose(result["rho"], canonical_correlations(x, y), atol=1e-9)


def test_constant_channels_at_an_offset_are_pruned():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 3)).astype(np.float32)
    x[:, 1] = 50.0
    result = cca(x, rng.standard_normal((300, 2)).astype(np.float32))
    assert result["pruned_a"].values.tolist() == [False, True, False]


def test_similarity_refuses_one_name_for_two_layers():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    with pytest.raises(ValueError, match="layer name 'fc1' stands for different layers"):
        similarity({"fc1": a}, {"fc1": b}, measures=["cka"])


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


def test_lazy_backend_arrays_are_not_read_to_be_chunked(tmp_path):
    layer = np.random.default_rng(5).standard_normal((2000, 8, 8, 16)).astype(np.float32)  # 8 MiB
    chunkcca.write_activations(tmp_path / "s.zarr", {"conv": layer}, chunks=100)
    lazy = xr.open_datatree(tmp_path / "s.zarr", engine="zarr", consolidated=False)["conv"]["activations"]
    assert lazy.chunks is None
    tracemalloc.start()
    array = as_activations(lazy, "conv")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < layer.nbytes / 4, f"as_activations allocated {peak} bytes"
    assert isinstance(array.data, da.Array) and array.data.chunks[0][0] == 100


def test_minibatch_memory_is_per_minibatch():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4000, 16))
    y = x[:, :8] + rng.standard_normal((4000, 8))
    tracemalloc.start()
    result = cka(da.from_array(x, chunks=4000), y, minibatch=500, scheduler="synchronous")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert int(result["minibatches"]) == 8
    assert peak < 6 * 500 * 500 * 8 + 2 * x.nbytes, f"peak {peak / 2**20:.0f} MiB"  # a few 500 x 500 Grams


def test_minibatch_takes_dims_and_refuses_options_it_ignores():
    rng = np.random.default_rng(7)
    nchw = rng.standard_normal((40, 3, 4, 4))
    result = cka(nchw, nchw[:, :2], minibatch=16, dims=("datapoint", "channel", "height", "width"))
    assert int(result["minibatches"]) == 40 * 16 // 16
    with pytest.raises(TypeError, match="precision do not apply to minibatch CKA"):
        cka(nchw, nchw, minibatch=16, precision="float64", dims=("datapoint", "channel", "height", "width"))


def test_compat_checks_acts1_only_and_pwcca_refuses_complex():
    rng = np.random.default_rng(8)
    acts1, acts2 = rng.standard_normal((3, 20)), rng.standard_normal((25, 20))
    assert get_cca_similarity(acts1, acts2, epsilon=1e-6, verbose=False)["cca_coef1"].shape == (3,)
    with pytest.raises(TypeError, match="compute_pwcca takes real activations"):
        compute_pwcca(acts1 + 1j, acts1)


def test_svcca_from_moments_checks_epsilon():
    moments = chunkcca.compute_moments(np.random.default_rng(9).standard_normal((5, 2)),
                                       np.random.default_rng(10).standard_normal((5, 2)), precision="float64")
    assert isinstance(moments, Moments)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        svcca_from_moments(moments, epsilon=-1.0)
