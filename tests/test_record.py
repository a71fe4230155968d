"""Recording from a PyTorch model (the optional torch extra): hooks, NCHW → channels-last, batch by batch."""

from __future__ import annotations

import numpy as np
import pytest

import chunkcca

torch = pytest.importorskip("torch", reason="torch (the optional 'torch' extra) is not installed")
from chunkcca.record import record  # noqa: E402


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5))


def test_records_every_layer_batch_by_batch(tmp_path):
    net = _net()
    inputs = torch.randn(23, 1, 8, 8)
    seen = []

    def batches():
        for start in range(0, 23, 5):
            seen.append(start)
            yield inputs[start : start + 5], torch.zeros(5)

    tree = record(net, {"net/conv": "1", "net/pool": "2", "net/fc": "4"}, batches(), tmp_path / "r.zarr", chunks=4,
                  datapoints=[f"img{i}" for i in range(23)])
    assert seen == [0, 5, 10, 15, 20]
    with torch.no_grad():
        conv = net[1](net[0](inputs)).numpy().transpose(0, 2, 3, 1)
        pool = net[2](net[1](net[0](inputs))).numpy().transpose(0, 2, 3, 1)
        fc = net(inputs).numpy()
    np.testing.assert_array_equal(tree["net/conv"]["activations"].values, conv)
    np.testing.assert_array_equal(tree["net/pool"]["activations"].values, pool)
    np.testing.assert_array_equal(tree["net/fc"]["activations"].values, fc)
    assert tree["net/pool"]["activations"].data.chunks[0] == (4, 4, 4, 4, 4, 3)
    np.testing.assert_allclose(tree["net/pool"]["height"], [1, 3, 5, 7])  # 2x2-pooled centres in input pixels
    assert list(tree["net/fc"]["datapoint"].values[:2]) == ["img0", "img1"]
    assert not any(module._forward_hooks for module in net.modules()), "hooks are removed"
    assert net.training, "the model's mode is restored"
    result = chunkcca.cca(tree["net/conv"], tree["net/pool"], spatial="interp", precision="float64")
    assert int(result["rows"]) == 23 * 64


def test_module_names_and_errors(tmp_path):
    net = _net()
    tree = record(net, ["0", "4"], [torch.randn(6, 1, 8, 8)], tmp_path / "r.zarr")
    assert chunkcca.layer_paths(tree) == ["0", "4"]
    with pytest.raises(ValueError, match="the model has no module 'conv9'"):
        record(net, {"x": "conv9"}, [torch.randn(2, 1, 8, 8)], tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="record got no batches"):
        record(net, ["0"], [], tmp_path / "t.zarr")
    assert not (tmp_path / "t.zarr").exists()
    with pytest.raises(ValueError, match="datapoints has 3 labels for 6 recorded datapoints"):
        record(net, ["0"], [torch.randn(6, 1, 8, 8)], tmp_path / "u.zarr", datapoints=["a", "b", "c"])
