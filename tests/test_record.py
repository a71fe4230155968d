"""Recording from a PyTorch model (the optional torch extra): hooks, NCHW → channels-last, batch by batch."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

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
    import zarr

    for coordinate in ("net/conv/datapoint", "net/conv/height", "net/fc/channel"):  # labels are checksummed too
        assert "crc32c" in str(zarr.open_array(tmp_path / "r.zarr" / coordinate).metadata.codecs).lower()
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
    with pytest.raises(ValueError, match="datapoints has 8 labels for 6 recorded datapoints"):
        record(net, ["0"], [torch.randn(6, 1, 8, 8)], tmp_path / "u.zarr", datapoints=list("abcdefgh"))
    ran = []

    def batches():  # labels run out at the first batch: the others are not run (they were, all of them)
        for _ in range(5):
            ran.append(1)
            yield torch.randn(6, 1, 8, 8)

    for labels in ({"datapoints": ["a", "b", "c"]}, {"coords": {"label": np.arange(4)}}):
        said = ("datapoints has 3 labels for 6 recorded datapoints so far" if "datapoints" in labels else
                r"coords\['label'\] has 4 labels and layer '0' 6 datapoints so far")
        with pytest.raises(ValueError, match=rf"^{said}: give one label per datapoint, in order$"):
            record(net, ["0"], batches(), tmp_path / "u.zarr", **labels)
    assert len(ran) == 2


def test_layers_named_twice_and_bad_chunks_are_refused_before_the_model_runs(tmp_path):
    """["4", "4"] recorded one layer, unsaid; chunks=0 was refused after the first batch ran (found by audit)."""
    net = _net()

    def batches():
        pytest.fail("the model ran")
        yield torch.randn(2, 1, 8, 8)

    with pytest.raises(ValueError, match=r"^layer path '4' is given twice \('4' and '4'\)$"):
        record(net, ["0", "4", "4"], batches(), tmp_path / "r.zarr")
    with pytest.raises(ValueError, match=r"^chunks must be a positive number of datapoints or 'auto', got 0$"):
        record(net, ["0"], batches(), tmp_path / "r.zarr", chunks=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_chunks_beyond_the_recording_cost_nothing_and_one_its_codec_cannot_take_is_refused(tmp_path, monkeypatch):
    """chunks= far beyond the datapoints failed after the first batch in numpy's or zarr's words ("Unable to
    allocate 14.6 TiB", "Maximum allowed dimension exceeded") or, compressed, left a chunk of 1e8 datapoints that no
    run could read within its memory (found by review and audit): the array is made at the first whole chunk, or at
    the end in one chunk of the datapoints recorded. A chunk larger than its codec takes is refused naming the
    layer as the batches reach that size, before it is written."""
    import chunkcca.layers

    net, inputs = _net(), torch.randn(10, 1, 8, 8)
    with torch.no_grad():
        want = net[0](inputs).permute(0, 2, 3, 1).numpy()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=4)
    for chunks, compression, batches in ((10**12, None, [inputs[:5], inputs[5:]]), (2**64, "lz4", [inputs]),
                                         (10**8, "lz4", [inputs[:3], inputs[3:]]), (2 * 10**9, "lz4", loader)):
        tree = record(net, ["0"], batches, tmp_path / "r.zarr", chunks=chunks, compression=compression,
                      overwrite=True)
        assert tree["0"]["activations"].encoding["chunks"][0] == 10
        np.testing.assert_array_equal(tree["0"]["activations"].values, want)
    monkeypatch.setattr(chunkcca.layers, "BLOSC_BUFFER_BYTES", 6 * want[0].nbytes)  # six datapoints of layer 0
    with pytest.raises(ValueError, match=r"^layer '0': chunks of 10 datapoints would be 10.00 kiB each, more than "
                                         r"Blosc compresses in one buffer \(6.00 kiB\): give at most 6 datapoints"):
        record(net, ["0"], [inputs[:5], inputs[5:]], tmp_path / "big.zarr", chunks=100)
    assert not (tmp_path / "big.zarr").exists()
    tree = record(net, ["0"], [inputs[:5], inputs[5:]], tmp_path / "six.zarr", chunks=6)
    assert tree["0"]["activations"].encoding["chunks"][0] == 6
    # batches of no datapoints: no chunk filled, no array made (a first form failed in zarr's words, KeyError '0')
    with pytest.raises(ValueError, match=r"^record got batches of no datapoints: layer '0' would be empty$"):
        record(net, ["0"], [inputs[:0]], tmp_path / "empty.zarr", chunks=2)


def test_appends_whole_chunks_only_and_writes_each_chunk_once(tmp_path, monkeypatch):
    """Batches smaller and larger than a chunk are buffered into whole chunks: every activations chunk is written
    once and never read back (appending each batch made zarr read, decode and rewrite the partial last chunk), and
    the chunks' bytes are those of the same arrays written in one go."""
    import zarr
    from zarr.storage import LocalStore

    from chunkcca.store import codecs_for

    sets: list[str] = []
    gets: list[str] = []
    set_, get_ = LocalStore.set, LocalStore.get

    async def counting_set(self, key, value):
        sets.append(key)
        return await set_(self, key, value)

    async def counting_get(self, key, *args, **kwargs):
        gets.append(key)
        return await get_(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", counting_set)
    monkeypatch.setattr(LocalStore, "get", counting_get)
    net = _net()
    inputs = torch.randn(23, 1, 8, 8)
    sizes = [3, 1, 9, 2, 8]  # smaller than a chunk of 4, larger, and a whole chunk straight after a partial one
    edges = np.cumsum([0, *sizes])
    tree = record(net, {"conv": "1", "fc": "4"}, [inputs[a:b] for a, b in itertools.pairwise(edges)],
                  tmp_path / "r.zarr", chunks=4)
    monkeypatch.undo()
    chunk_sets = [key for key in sets if "/activations/c/" in key]
    assert len(chunk_sets) == 2 * 6 and len(set(chunk_sets)) == 2 * 6, "each of the 6 chunks per layer once"
    assert not [key for key in gets if "/activations/c/" in key], "no chunk is read back while recording"

    with torch.no_grad():  # batch by batch: a matmul's rounding may depend on the batch size
        parts = [inputs[a:b] for a, b in itertools.pairwise(edges)]
        want = {"conv": np.concatenate([net[1](net[0](x)).numpy().transpose(0, 2, 3, 1) for x in parts]),
                "fc": np.concatenate([net(x).numpy() for x in parts])}
    for layer, values in want.items():
        np.testing.assert_array_equal(tree[layer]["activations"].values, values)
        assert tree[layer]["activations"].data.chunks[0] == (4, 4, 4, 4, 4, 3)
        reference = zarr.create_array(tmp_path / f"{layer}.zarr", data=values, chunks=(4, *values.shape[1:]),
                                      compressors=codecs_for("lz4"), zarr_format=3)
        assert reference.nchunks_initialized == 6
        written = sorted((tmp_path / "r.zarr" / layer / "activations" / "c").rglob("*"))
        expected = sorted((tmp_path / f"{layer}.zarr" / "c").rglob("*"))
        assert [p.relative_to(tmp_path / "r.zarr" / layer / "activations") for p in written] == \
            [p.relative_to(tmp_path / f"{layer}.zarr") for p in expected]
        for mine, theirs in zip(written, expected):
            assert mine.is_dir() or mine.read_bytes() == theirs.read_bytes()


def test_batches_of_changing_shape_are_refused(tmp_path):
    net = torch.nn.Flatten()
    with pytest.raises(ValueError, match=r"gave outputs of shape \(2, 9\) after outputs of shape \(N, 4\): every "
                                         r"batch must give a layer one shape past its datapoints; pad sequences"):
        record(net, {"x": net}, [torch.randn(2, 1, 2, 2), torch.randn(2, 1, 3, 3)], tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def test_two_models_recorded_into_one_store_in_network_order(tmp_path):
    """The second model is added to the first one's store, after it, leaving it untouched; layers keep the order
    named (conv before fc, not alphabetical)."""
    inputs = torch.randn(12, 1, 8, 8)
    first, second = _net(), _net()
    with torch.no_grad():
        second[0].weight.mul_(-1)
    record(first, {"m0/conv": "0", "m0/fc": "4"}, [inputs[:6], inputs[6:]], tmp_path / "r.zarr")
    before = {p: p.read_bytes() for p in (tmp_path / "r.zarr" / "m0").rglob("*") if p.is_file()}
    tree = record(second, {"m1/conv": "0", "m1/fc": "4"}, [inputs[:6], inputs[6:]], tmp_path / "r.zarr", mode="a")
    assert chunkcca.layer_paths(tree) == ["m0/conv", "m0/fc", "m1/conv", "m1/fc"]
    assert {p: p.read_bytes() for p in (tmp_path / "r.zarr" / "m0").rglob("*") if p.is_file()} == before
    np.testing.assert_allclose(tree["m1/conv"]["height"], tree["m0/conv"]["height"])
    with pytest.raises(ValueError, match="already holds layer m1/fc"):
        record(second, {"m1/fc": "4"}, [inputs], tmp_path / "r.zarr", mode="a")
    result = chunkcca.similarity(tree["m0"], tree["m1"], measures=["cka"], spatial="avgpool")
    assert list(result["layer_a"].values) == ["m0/conv", "m0/fc"]
    # recorded without datapoints=, the labels are the batches' positions, marked so: such layers pair with
    # others by position only (a layer labelled in shuffled order beside them is refused, not reordered to them)
    assert tree["m1/fc"]["datapoint"].attrs == {"chunkcca_positions": True}
    shuffled = tree["m0/fc"]["activations"].assign_coords(datapoint=np.random.default_rng(0).permutation(12))
    with pytest.raises(ValueError, match=r"layer 'm0/fc' labels its datapoints .* and layer 'm1/fc' does not"):
        chunkcca.cca(shuffled, tree["m1/fc"])
    labelled = record(first, {"fc": "4"}, [inputs], tmp_path / "l.zarr", datapoints=np.arange(12))
    assert "chunkcca_positions" not in labelled["fc"]["datapoint"].attrs


class _Sequences(torch.nn.Module):
    """A small transformer encoder with a 1-d conv and a 3-d conv beside it, and a tuple-returning block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(3, 8)
        self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
        self.conv = torch.nn.Conv1d(8, 5, 3, padding=1)
        self.volume = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.gru = torch.nn.GRU(8, 6, batch_first=True)  # returns (output, hidden)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(x), src_key_padding_mask=~attention_mask)
        self.conv(hidden.transpose(1, 2))
        self.gru(hidden)
        self.volume(x[:, :1, :, None, None].expand(-1, 1, 3, 2, 2).contiguous())
        return hidden


def test_records_transformer_layers_with_their_attention_masks(tmp_path):
    """Tuple outputs give their first tensor; (N, C, L) conv1d and (N, C, D, H, W) conv3d outputs become channels-last;
    the batch's attention mask becomes the mask of every layer of its length."""
    net = _Sequences()
    x = torch.randn(30, 6, 3)
    lengths = torch.randint(1, 7, (30,))
    mask = torch.arange(6)[None] < lengths[:, None]
    batches = [{"x": x[i : i + 10], "attention_mask": mask[i : i + 10]} for i in range(0, 30, 10)]
    tree = record(net, {"enc/0": "encoder.layers.0", "enc/1": "encoder.layers.1", "conv": "conv", "gru": "gru",
                        "volume": "volume"}, batches, tmp_path / "r.zarr")
    assert tree["enc/0"]["activations"].dims == ("datapoint", "token", "channel")
    assert tree["conv"]["activations"].dims == ("datapoint", "time", "channel")
    assert tree["gru"]["activations"].shape == (30, 6, 6)
    assert tree["volume"]["activations"].dims == ("datapoint", "depth", "height", "width", "channel")
    np.testing.assert_array_equal(tree["enc/1"]["mask"].values, mask.numpy())
    net.eval()  # as record runs it: no dropout
    with torch.inference_mode():
        want = net.encoder.layers[0](net.embed(x), src_key_padding_mask=~mask).numpy()
        conv = net.conv(torch.from_numpy(tree["enc/1"]["activations"].values).transpose(1, 2)).numpy()
    real = mask.numpy()
    np.testing.assert_allclose(tree["enc/0"]["activations"].values[real], want[real], atol=1e-5)
    np.testing.assert_allclose(tree["conv"]["activations"].values, conv.transpose(0, 2, 1), atol=1e-5)
    result = chunkcca.cca(tree["enc/0"], tree["enc/1"], precision="float64")
    assert int(result["rows"]) == int(mask.sum())  # flatten keeps the real tokens only


class _Strided(torch.nn.Module):
    """Token embeddings (N, T, 4) and a strided Conv1d over them (N, 5, T / 2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(3, 4)
        self.conv = torch.nn.Conv1d(4, 5, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embedded = self.embed(x)
        return self.conv(embedded.transpose(1, 2))


def test_a_layer_of_another_length_than_the_mask_is_recorded_with_a_warning(tmp_path):
    """A strided Conv1d (3 steps) under a batch mask of 6 tokens was stored without a mask, silently, so that
    avgpool, last and flatten read its padded steps as real; the layers of the mask's length keep it."""
    x = torch.randn(8, 6, 3)
    mask = torch.arange(6)[None] < torch.tensor([6, 5, 4, 3, 6, 2, 6, 1])[:, None]
    with pytest.warns(RuntimeWarning, match=r"layer 'conv' has 3 positions and the batch's mask 6: it is recorded "
                                            r"without a mask, so its padded positions count as real ones"):
        tree = record(_Strided(), {"embed": "embed", "conv": "conv"}, [{"x": x, "attention_mask": mask}],
                      tmp_path / "r.zarr")
    assert "mask" in tree["embed"]["activations"].coords and "mask" not in tree["conv"]["activations"].coords


class _Cut(torch.nn.Module):
    """Token layers shorter than the batch's mask: the CLS token dropped (5 of 6), every second token (3 of 6)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.body, self.pool = torch.nn.Linear(3, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embedded = self.embed(x)
        self.pool(embedded[:, ::2])
        return self.body(embedded[:, 1:])


def test_a_channels_last_token_layer_shorter_than_the_mask_is_not_padded_to_it(tmp_path):
    """Such layers were padded with zeros to the mask's 6 tokens and given the batch's mask, silently: positions
    that do not exist counted as real, and every second token's mask was the first tokens'. Only a nested tensor
    (PyTorch's fast path, padded to its longest sequence) is padded to the batch's length."""
    x = torch.randn(3, 6, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with pytest.warns(RuntimeWarning, match="recorded without a mask") as caught:
        tree = record(_Cut(), ["body", "pool"], [{"x": x, "attention_mask": mask}], tmp_path / "r.zarr")
    assert len([w for w in caught if "recorded without a mask" in str(w.message)]) == 2
    net = _Cut().eval()
    with torch.inference_mode():
        embedded = net.embed(x)
        want = {"body": net.body(embedded[:, 1:]).numpy(), "pool": net.pool(embedded[:, ::2]).numpy()}
    for name, values in want.items():
        assert "mask" not in tree[name]["activations"].coords
        np.testing.assert_allclose(tree[name]["activations"].values, values, atol=1e-6)


class _Block(torch.nn.Module):
    """A block returning what its last submodule, a ReLU after a Conv1d, made."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(16, 16, 3, padding=1)
        self.relu = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def test_elementwise_modules_take_the_layout_of_their_input(tmp_path):
    """A ReLU, GELU, Dropout, BatchNorm1d or block after a Conv1d is (N, C, L), as the Conv1d is; after a Linear,
    (N, T, C). It used to store a ReLU after a Conv1d as (token=16 channels, channel=20 positions)."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv1d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm1d(16),
                               torch.nn.GELU(), torch.nn.Dropout(0.5), _Block())
    inputs = torch.randn(6, 3, 20)
    tree = record(conv, [str(i) for i in range(6)], [inputs[:4], inputs[4:]], tmp_path / "conv.zarr")
    conv.eval()
    with torch.inference_mode():
        x = inputs
        for i, module in enumerate(conv):
            x = module(x)
            assert tree[str(i)]["activations"].dims == ("datapoint", "time", "channel"), type(module).__name__
            np.testing.assert_allclose(tree[str(i)]["activations"].values, x.numpy().transpose(0, 2, 1), atol=1e-6)
    tokens = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.GELU())
    tree = record(tokens, ["1"], [torch.randn(6, 20, 3)], tmp_path / "tokens.zarr")
    assert tree["1"]["activations"].dims == ("datapoint", "token", "channel")
    assert tree["1"]["activations"].shape == (6, 20, 16)


def test_a_layout_it_cannot_tell_is_refused_unless_given(tmp_path):
    """A ReLU on the model's input could be (N, C, L) or (N, T, C): refused, naming the layer and how to say which;
    ``layouts=`` says which."""
    net = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv1d(3, 4, 1))
    inputs = torch.randn(5, 3, 20)
    with pytest.raises(ValueError, match=r"layer 'relu': where the channels of its \(5, 3, 20\) output are is "
                                         r"unknown: ReLU .* pass layouts=\{'relu': 'channels_first'\}"):
        record(net, {"relu": "0"}, [inputs], tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
    tree = record(net, {"relu": "0"}, [inputs], tmp_path / "r.zarr", layouts={"relu": "channels_first"})
    assert tree["relu"]["activations"].dims == ("datapoint", "time", "channel")
    np.testing.assert_array_equal(tree["relu"]["activations"].values, inputs.relu().numpy().transpose(0, 2, 1))
    tree = record(net, {"relu": "0"}, [inputs], tmp_path / "s.zarr", layouts={"relu": "channels_last"})
    assert tree["relu"]["activations"].dims == ("datapoint", "token", "channel")
    np.testing.assert_array_equal(tree["relu"]["activations"].values, inputs.relu().numpy())
    with pytest.raises(ValueError, match=r"layouts names 'conv', which is not a recorded layer \(relu\)"):
        record(net, {"relu": "0"}, [inputs], tmp_path / "t.zarr", layouts={"conv": "channels_first"})
    with pytest.raises(ValueError, match=r"layouts\['relu'\] is 'NCL'; choose from channels_first, channels_last"):
        record(net, {"relu": "0"}, [inputs], tmp_path / "t.zarr", layouts={"relu": "NCL"})
    assert not (tmp_path / "t.zarr").exists()


def test_labels_and_last_chunks_equal_to_the_fill_value_are_written(tmp_path):
    """The labels and the last partial chunks were written after zarr's every-chunk setting ended: a 1-unit layer's
    channel label [0] equals the fill value, so its chunk was left out and the store did not open ("damaged")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1), torch.nn.ReLU())
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the last layer is dead: every chunk of it is zeros
    tree = record(model, ["0", "3"], [torch.randn(16, 8) for _ in range(3)], tmp_path / "r.zarr", chunks=10)
    assert tree["3"]["activations"].shape == (48, 1) and float(abs(tree["3"]["activations"]).max()) == 0.0
    assert (tmp_path / "r.zarr" / "3" / "channel" / "c" / "0").exists()
    assert (tmp_path / "r.zarr" / "3" / "activations" / "c" / "4" / "0").exists()  # the last, partial chunk


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # still what models hold
def test_layouts_through_functions_and_torchscript_submodules(tmp_path):
    """The dropout after F.relu inside nn.TransformerEncoderLayer was refused (no module made its input); a block
    returning F.relu(conv1d(x)) was stored as (token=channels, channel=positions); a model holding a TorchScript
    submodule failed to record at all (ScriptModules take no hooks)."""
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.relu(self.conv(x))

    model = torch.nn.Sequential(Block(), torch.nn.Dropout(0.0))
    tree = record(model, ["0", "1"], [torch.randn(6, 4, 50) for _ in range(2)], tmp_path / "c.zarr")
    for layer in ("0", "1"):
        assert tree[layer]["activations"].dims == ("datapoint", "time", "channel")
        assert tree[layer]["activations"].shape == (12, 50, 8)
    encoder = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    tree = record(encoder, ["dropout"], [torch.randn(4, 10, 16) for _ in range(2)], tmp_path / "t.zarr")
    assert tree["dropout"]["activations"].dims == ("datapoint", "token", "channel")
    assert tree["dropout"]["activations"].shape == (8, 10, 32)
    scripted = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.jit.script(torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.ReLU())), torch.nn.Linear(16, 4))
    tree = record(scripted, ["0", "2"], [torch.randn(5, 8) for _ in range(2)], tmp_path / "s.zarr")
    assert tree["2"]["activations"].shape == (10, 4)


def test_a_module_that_runs_twice_in_one_forward_pass_is_refused(tmp_path):
    """A shared Linear applied twice kept only its last call's output, silently."""

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(x)))

    with pytest.raises(ValueError, match=r"layer 'shared' ran more than once in one forward pass"):
        record(Twice(), ["shared"], [torch.randn(3, 4)], tmp_path / "t.zarr")
    assert not (tmp_path / "t.zarr").exists()


def test_volumes_get_pixel_centres_in_input_pixels(tmp_path):
    """A Conv3d then a MaxPool3d: height and width were each layer's own pixels (0.5 … 3.5 for the pooled one,
    not 1, 3, 5, 7), so interp refused the pair, blaming a store written without image_size=."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.MaxPool3d(2))
    tree = record(model, ["0", "1"], [torch.randn(5, 2, 4, 8, 8) for _ in range(2)], tmp_path / "v.zarr")
    np.testing.assert_allclose(tree["0"]["height"].values, np.arange(8) + 0.5)
    np.testing.assert_allclose(tree["1"]["width"].values, [1.0, 3.0, 5.0, 7.0])


def test_a_square_output_after_a_transpose_is_refused_not_guessed(tmp_path):
    """(N, 64, 64) made by a Conv1d, transposed, then a ReLU: the layout of the latest tensor of that shape was
    taken, and the ReLU stored with time and channel swapped."""

    class Square(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = torch.nn.Conv1d(8, 64, 1), torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x).transpose(1, 2))

    with pytest.raises(ValueError, match=r"layer 'act': where the channels of its \(4, 64, 64\) output are is "
                                         r"unknown"):
        record(Square(), ["act"], [torch.randn(4, 8, 64)], tmp_path / "s.zarr")


def test_a_block_returning_a_function_of_its_square_conv_output_is_refused_not_guessed(tmp_path):
    """A block returning ``F.relu(conv(x))`` of (N, C, L) with C = L, a module with parameters, took the default for
    those (channels last), and the block and a ReLU after it were stored with time and channels swapped (C = 8,
    L = 9 is read right)."""

    class Block(torch.nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(6, channels, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.relu(self.conv(x))

    class Net(torch.nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.block, self.act = Block(channels), torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.block(x))

    torch.manual_seed(0)
    oblong, inputs = Net(8), torch.randn(16, 6, 9)
    tree = record(oblong, ["block", "act"], [inputs[:8], inputs[8:]], tmp_path / "oblong.zarr")
    with torch.no_grad():
        want = oblong.block(inputs).transpose(1, 2).numpy()
    assert tree["block"]["activations"].dims == ("datapoint", "time", "channel")
    np.testing.assert_array_equal(tree["block"]["activations"].values, want)
    np.testing.assert_array_equal(tree["act"]["activations"].values, want)
    with pytest.raises(ValueError, match=r"layer 'block': where the channels of its \(8, 8, 8\) output are is unknown: "
                                         r"its shape is square"):
        record(Net(8), ["block", "act"], [inputs[:8, :, :8]], tmp_path / "square.zarr")
    assert not (tmp_path / "square.zarr").exists()
    tree = record(Net(8), ["block"], [inputs[:8, :, :8]], tmp_path / "told.zarr", layouts={"block": "channels_first"})
    assert tree["block"]["activations"].dims == ("datapoint", "time", "channel")


class _ConvNeXtBlock(torch.nn.Module):
    """A ConvNeXt-like block: a Conv2d, then LayerNorm, Linear, GELU, Linear on the (N, H, W, C) permutation of its
    output, permuted back, through a Dropout and added to the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm, self.up, self.act = torch.nn.LayerNorm(8), torch.nn.Linear(8, 32), torch.nn.GELU()
        self.down, self.drop = torch.nn.Linear(32, 8), torch.nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        y = self.down(self.act(self.up(self.norm(x.permute(0, 2, 3, 1)))))
        return x + self.drop(y.permute(0, 3, 1, 2))


def test_linear_and_layernorm_outputs_are_channels_last_at_any_rank(tmp_path):
    """A LayerNorm, Linear and the GELU after it on (N, H, W, C) were stored as channels first: (datapoint, height=W,
    width=C, channel=H). So were a Linear and ReLU on (N, D, H, W, C); a LayerNorm without parameters on (N, T, C)
    made by a function was refused."""
    net = _ConvNeXtBlock()
    inputs = torch.randn(6, 3, 5, 7)
    layers = {"conv": "conv", "norm": "norm", "up": "up", "act": "act", "down": "down", "drop": "drop", "block": net}
    tree = record(net, layers, [inputs[:4], inputs[4:]], tmp_path / "c.zarr")
    with torch.inference_mode():
        conv = net.conv(inputs)
        norm = net.norm(conv.permute(0, 2, 3, 1))
        up = net.up(norm)
        act = net.act(up)
        down = net.down(act)
        want = {"conv": conv.permute(0, 2, 3, 1), "norm": norm, "up": up, "act": act, "down": down,
                "drop": down, "block": (conv + down.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)}
    for layer, values in want.items():
        assert tree[layer]["activations"].dims == ("datapoint", "height", "width", "channel"), layer
        np.testing.assert_array_equal(tree[layer]["activations"].values, values.numpy(), err_msg=layer)

    torch.manual_seed(0)
    volume = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    inputs = torch.randn(5, 2, 6, 7, 3)
    tree = record(volume, ["0", "1"], [inputs], tmp_path / "v.zarr")
    with torch.inference_mode():
        want = volume(inputs).numpy()
    assert tree["1"]["activations"].dims == ("datapoint", "depth", "height", "width", "channel")
    np.testing.assert_array_equal(tree["1"]["activations"].values, want)
    tokens = torch.nn.Sequential(torch.nn.Identity(), torch.nn.LayerNorm(4, elementwise_affine=False))
    inputs = torch.randn(5, 7, 4)
    tree = record(tokens, ["1"], [inputs], tmp_path / "t.zarr")
    assert tree["1"]["activations"].dims == ("datapoint", "token", "channel")
    np.testing.assert_array_equal(tree["1"]["activations"].values, tokens(inputs).numpy())


def test_norms_that_do_not_act_on_the_last_dim_keep_their_inputs_layout(tmp_path):
    """A LayerNorm over (H, W) and a LayerNorm subclass whose forward normalises the channels of (N, C, H, W) (as
    a LayerNorm2d) are not taken for channels-last modules; a LayerNorm over the last dim of a Conv1d's
    (N, C, L) keeps its input's layout (its last dim is positions). Each used to be right; guards the new rule,
    with a Linear on (N, H, W, C) that was not."""

    class ChannelNorm(torch.nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.spatial, self.chnorm = torch.nn.Conv2d(3, 8, 1), torch.nn.LayerNorm([5, 7]), ChannelNorm(8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.chnorm(self.spatial(self.conv(x)))
            return self.fc(x.permute(0, 2, 3, 1))

    net = Net()
    inputs = torch.randn(4, 3, 5, 7)
    tree = record(net, ["spatial", "chnorm", "fc"], [inputs], tmp_path / "n.zarr")
    with torch.inference_mode():
        spatial = net.spatial(net.conv(inputs))
        chnorm = net.chnorm(spatial)
    np.testing.assert_array_equal(tree["spatial"]["activations"].values, spatial.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(tree["chnorm"]["activations"].values, chnorm.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(tree["fc"]["activations"].values, net(inputs).detach().numpy())
    seq = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 1), torch.nn.LayerNorm(11))
    inputs = torch.randn(4, 3, 11)
    tree = record(seq, ["1"], [inputs], tmp_path / "s.zarr")
    assert tree["1"]["activations"].dims == ("datapoint", "time", "channel")
    np.testing.assert_array_equal(tree["1"]["activations"].values, seq(inputs).detach().numpy().transpose(0, 2, 1))


class _Recurrent(torch.nn.Module):
    """An LSTM over (N, T, C) inputs, given them as (T, N, C) when not batch first, then a Dropout and a Linear."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(3, 5, batch_first=batch_first)
        self.drop, self.head = torch.nn.Dropout(0.0), torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x if self.lstm.batch_first else x.transpose(0, 1))
        return self.head(self.drop(out))


@pytest.mark.parametrize("batch_first", [False, True])
def test_recurrent_outputs_are_datapoint_token_channel(tmp_path, batch_first):
    """An LSTM with batch_first=False gives (T, N, C): it was stored as if T were the datapoints (its datapoints as
    tokens), as were the Dropout and Linear after it."""
    net = _Recurrent(batch_first)
    inputs = torch.randn(8, 7, 3)
    tree = record(net, ["lstm", "drop", "head"], [inputs[:4], inputs[4:]], tmp_path / "r.zarr")
    with torch.inference_mode():  # batch by batch, in the model's own layout: rounding may depend on both
        parts = [net.lstm(x if batch_first else x.transpose(0, 1))[0] for x in (inputs[:4], inputs[4:])]
        heads = [net.head(out) for out in parts]
        if not batch_first:
            parts, heads = [out.transpose(0, 1) for out in parts], [out.transpose(0, 1) for out in heads]
        out = torch.cat(parts)
        want = {"lstm": out, "drop": out, "head": torch.cat(heads)}
    assert tree["lstm"]["activations"].dims == ("datapoint", "token", "channel")
    for layer, values in want.items():
        assert tree[layer]["activations"].shape == values.shape, layer
        np.testing.assert_array_equal(tree[layer]["activations"].values, values.numpy(), err_msg=layer)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind, state", [("GRU", 1), ("LSTM", (1, 0)), ("LSTM", (1, 1))])
def test_a_recurrent_module_s_final_states_are_datapoint_first(tmp_path, batch_first, kind, state):
    """h_n and c_n are (D · layers, N, H) whatever batch_first: a GRU's h_n of 2 layers over batches of 6 was
    stored as 4 datapoints of 6 tokens, silently (its layers read as datapoints, its datapoints as tokens)."""
    torch.manual_seed(0)
    rnn = getattr(torch.nn, kind)(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
    batches = [torch.randn(6, 7, 3) if batch_first else torch.randn(7, 6, 3) for _ in range(2)]

    def pick(out: Any) -> torch.Tensor:
        return out[1] if isinstance(state, int) else out[1][state[1]]

    tree = record(rnn, {"rnn": rnn}, batches, tmp_path / "s.zarr", output=pick)
    with torch.inference_mode():
        want = np.concatenate([pick(rnn(x)).numpy().transpose(1, 0, 2) for x in batches])
    assert want.shape == (12, 4, 5)
    assert tree["rnn"]["activations"].dims == ("datapoint", "token", "channel")
    np.testing.assert_array_equal(tree["rnn"]["activations"].values, want)


@pytest.mark.parametrize("tokens", [4, 5])
def test_a_recurrent_module_s_final_states_take_no_padding_mask(tmp_path, tokens):
    """An LSTM's h_n of 2 layers in 2 directions (4 states) from batches whose attention mask has 4 tokens took
    that mask, silently: a one-token sentence kept only its first state (avgpool CKA 0.489 for 0.506); with 5
    tokens it was warned of as a layer whose padded positions would count as real. Its states are never padding
    (found by audit)."""

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(30, 8)
            self.rnn = torch.nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return self.rnn(self.embed(input_ids))

    torch.manual_seed(0)
    model = Encoder().eval()
    ids = torch.randint(1, 30, (12, tokens))
    real = (torch.arange(tokens)[None] < torch.tensor([4, 2, 3, 1] * 3)[:, None]).long()
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": real[i:i + 4]} for i in range(0, 12, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = record(model, {"h_n": "rnn"}, batches, tmp_path / "s.zarr", output=lambda out: out[1][0])
    with torch.inference_mode():
        want = np.concatenate([model(**batch)[1][0].transpose(0, 1).numpy() for batch in batches])
    assert "mask" not in tree["h_n"]["activations"].coords
    np.testing.assert_array_equal(tree["h_n"]["activations"].values, want)


def test_a_module_and_one_inside_it_named_in_a_list_are_told_to_take_a_mapping(tmp_path):
    """["0", "0.0"] (ResNet's "layer1" and "layer1.0.conv1") was refused with "name them side by side (e.g. '0/out'
    and '0/0')", which a list cannot do (found by audit); a mapping records both."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"^layers names module '0' and module '0\.0' inside it, whose store paths "
                                         r"would hold one another .*: give a mapping of store path to module, e\.g\. "
                                         r"\{'0/out': '0', '0/0': '0\.0'\}$"):
        record(net, ["0", "0.0", "1"], [torch.randn(5, 3)], tmp_path / "r.zarr")
    with pytest.raises(ValueError, match=r"the model has no module '0/0'"):  # no mapping of a module it lacks
        record(net, ["0", "0/0"], [torch.randn(5, 3)], tmp_path / "r.zarr")
    tree = record(net, {"0/out": "0", "0/0": "0.0"}, [torch.randn(5, 3)], tmp_path / "r.zarr")
    assert tree["0/out"]["activations"].shape == tree["0/0"]["activations"].shape == (5, 4)


def test_sequence_first_attention_and_transformer_layers_are_made_batch_first(tmp_path):
    """A TransformerEncoderLayer with batch_first=False and its attention, norm, feed-forward Linear and the Dropout
    after its F.relu give (T, N, C): they were stored as if T were the datapoints."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).eval()
    inputs = torch.randn(9, 6, 8)  # (T, N, C)
    tree = record(layer, {"layer": layer, "self_attn": "self_attn", "norm1": "norm1", "linear1": "linear1",
                          "dropout": "dropout"}, [inputs], tmp_path / "t.zarr")
    with torch.inference_mode():
        attention = layer.self_attn(inputs, inputs, inputs, need_weights=False)[0]
        norm1 = layer.norm1(inputs + attention)
        linear1 = layer.linear1(norm1)
        want = {"layer": layer(inputs), "self_attn": attention, "norm1": norm1, "linear1": linear1,
                "dropout": linear1.relu()}
    for name, values in want.items():
        assert tree[name]["activations"].dims == ("datapoint", "token", "channel"), name
        np.testing.assert_array_equal(tree[name]["activations"].values, values.transpose(0, 1).numpy(), err_msg=name)


def test_a_packed_sequence_is_refused_unless_output_pads_it(tmp_path):
    """An LSTM given a PackedSequence returns one: its rows (the steps of all sequences packed together) were stored
    as datapoints. Refused, naming the layer; ``output=`` padding it records (N, T, C)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Packed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lstm = torch.nn.LSTM(3, 5, batch_first=True)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))[0]

    net = Packed()
    x, lengths = torch.randn(4, 6, 3), torch.tensor([6, 2, 4, 3])
    with pytest.raises(ValueError, match=r"layer 'lstm' gives a PackedSequence.*pass output="):
        record(net, ["lstm"], [{"x": x, "lengths": lengths}], tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()
    tree = record(net, ["lstm"], [{"x": x, "lengths": lengths}], tmp_path / "p.zarr",
                  output=lambda out: pad_packed_sequence(out[0], batch_first=True, total_length=6)[0])
    with torch.inference_mode():
        want = pad_packed_sequence(net(x, lengths), batch_first=True, total_length=6)[0]
    assert tree["lstm"]["activations"].dims == ("datapoint", "token", "channel")
    np.testing.assert_array_equal(tree["lstm"]["activations"].values, want.numpy())


def test_a_linear_is_channels_last_whatever_the_tensors_of_its_shape_before(tmp_path):
    """A Linear whose output has the shape of an earlier channels-first tensor took that tensor's layout (the
    latest-tensor-of-its-shape rule came first) and was stored transposed."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.head = torch.nn.Conv2d(3, 4, 1), torch.nn.Linear(5, 8)

        def forward(self, image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            return self.conv(image).sum() + self.head(grid)  # (N, 4, 6, 8) twice: channels first, then last

    net = Net()
    batch = {"image": torch.randn(2, 3, 6, 8), "grid": torch.randn(2, 4, 6, 5)}
    tree = record(net, ["conv", "head"], [batch], tmp_path / "s.zarr")
    with torch.inference_mode():
        want = net.head(batch["grid"]).numpy()
    assert tree["head"]["activations"].dims == ("datapoint", "height", "width", "channel")
    np.testing.assert_array_equal(tree["head"]["activations"].values, want)
    assert tree["conv"]["activations"].shape == (2, 6, 8, 4)


def test_a_bfloat16_layer_is_recorded_as_float32_exactly(tmp_path):
    """numpy has no bfloat16: record failed with "Got unsupported ScalarType BFloat16", naming no layer. float32
    holds every bfloat16 value exactly (the same exponent, 16 more bits of mantissa)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3)).bfloat16()
    inputs = torch.randn(8, 5).bfloat16()
    tree = record(model, ["0"], [inputs[:4], inputs[4:]], tmp_path / "bf.zarr")
    recorded = tree["0"]["activations"]
    assert recorded.dtype == np.float32
    np.testing.assert_array_equal(recorded.values, model(inputs).detach().float().numpy())


def test_a_bfloat16_layer_keeps_bfloat16s_rounding(tmp_path):
    """Stored as float32, a bfloat16 model's LayerNorm outputs had their rounding directions taken as real
    (ranks 16 and 16 where float32 and float16 recordings give 9 and 11 or 10; mean ρ 0.70 for 0.56), silently.
    record marks the layer with bfloat16's rounding, which the solves cut."""
    from chunkcca.options import VALUE_ROUNDING_ATTR

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.ln = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16)
            self.lin2, self.ln2 = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln2(self.lin2(self.ln(self.lin(x))))

    net, inputs = Net().eval(), torch.randn(400, 5, 8)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        tree = record(net.to(dtype), ["ln", "ln2"], [inputs[i : i + 100].to(dtype) for i in range(0, 400, 100)],
                      tmp_path / f"{dtype}.zarr")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", chunkcca.measures.IllConditionedWarning)
            results[dtype] = chunkcca.compare(tree["ln"], tree["ln2"], measures=["mean_cca"], precision="float64")
    assert tree["ln"]["activations"].attrs[VALUE_ROUNDING_ATTR] == 2.0**-7
    kept = results[torch.bfloat16]
    assert int(kept["rank_a"]) == int(results[torch.float32]["rank_a"]) == 9
    assert int(kept["rank_b"]) <= int(results[torch.float32]["rank_b"]) < 16
    assert abs(float(kept["mean_cca"]) - float(results[torch.float32]["mean_cca"])) < 1e-3


def test_records_datapoint_coordinates_for_groupby(tmp_path):
    """record could write no class label (a groupby needed it assigned to each layer by hand): ``coords`` puts one
    on every layer, as write_activations does; a bad name is refused before the model runs, a wrong count after."""
    net = _net()
    inputs, targets = torch.randn(23, 1, 8, 8), torch.arange(23) % 3
    batches = [(inputs[start : start + 5], targets[start : start + 5]) for start in range(0, 23, 5)]
    tree = record(net, {"net/conv": "1", "net/fc": "4"}, batches, tmp_path / "r.zarr", chunks=4,
                  coords={"label": targets.numpy(), "split": ["train"] * 20 + ["test"] * 3})
    for layer in ("net/conv", "net/fc"):
        np.testing.assert_array_equal(tree[layer]["activations"]["label"], targets.numpy())
    assert [row["coords"] for row in chunkcca.describe_store(tmp_path / "r.zarr")] == [["label", "split"]] * 2
    assert list(tree["net/fc"]["activations"]["split"].values[[19, 20]]) == ["train", "test"]
    grouped = chunkcca.cka(tree["net/conv"], tree["net/fc"], spatial="avgpool", groupby="label", precision="float64")
    with torch.no_grad():
        conv, fc = net[1](net[0](inputs)).numpy().mean(axis=(2, 3)), net(inputs).numpy()
    for group in range(3):
        alone = chunkcca.cka(conv[targets.numpy() == group], fc[targets.numpy() == group], precision="float64")
        assert float(grouped["cka"].sel(label=group)) == pytest.approx(float(alone["cka"]), abs=1e-6)  # float32 maps

    def never() -> Any:
        raise AssertionError("the model ran")
        yield

    with pytest.raises(ValueError, match="'channel' names a dim or variable of a layer"):
        record(net, ["4"], never(), tmp_path / "s.zarr", coords={"channel": np.arange(23)})
    with pytest.raises(ValueError, match=r"coords\['label'\] has 22 labels and layer '4' 23 datapoints"):
        record(net, ["4"], batches, tmp_path / "s.zarr", coords={"label": np.arange(22)})
    assert not (tmp_path / "s.zarr").exists()


def test_labels_of_the_wrong_count_for_a_data_loader_are_refused_before_the_model_runs(tmp_path):
    """A DataLoader says how many datapoints it holds: ``datapoints`` or ``coords`` of another count were refused
    only after every forward pass (hours, on a real model). Its sampler's length counts, less a dropped last part
    batch; an iterable dataset, which says nothing, is checked as its batches run past the labels, or after the
    run."""
    data = torch.utils.data
    dataset = data.TensorDataset(torch.randn(23, 1, 8, 8))

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = _net(), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.net(x)

    model = Counting()
    loader = data.DataLoader(dataset, batch_size=5)
    with pytest.raises(ValueError, match=r"datapoints has 22 labels for the 23 datapoints batches holds"):
        record(model, {"fc": "net.4"}, loader, tmp_path / "r.zarr", datapoints=np.arange(22))
    with pytest.raises(ValueError, match=r"coords\['label'\] has 22 labels and layer 'fc' 23 datapoints"):
        record(model, {"fc": "net.4"}, loader, tmp_path / "r.zarr", coords={"label": np.arange(22)})
    dropping = data.DataLoader(dataset, batch_size=5, drop_last=True)  # 20 datapoints recorded
    with pytest.raises(ValueError, match=r"for the 20 datapoints batches holds \(its sampler's length, less the last"):
        record(model, {"fc": "net.4"}, dropping, tmp_path / "r.zarr", datapoints=np.arange(23))
    with pytest.raises(ValueError, match=r"coords\['label'\] has 23 labels and layer 'fc' 20 datapoints"):
        record(model, {"fc": "net.4"}, dropping, tmp_path / "r.zarr", coords={"label": np.arange(23)})
    assert model.calls == 0 and not (tmp_path / "r.zarr").exists()
    tree = record(model, {"fc": "net.4"}, dropping, tmp_path / "r.zarr", coords={"label": np.arange(20) % 2})
    assert tree["fc"]["activations"].sizes["datapoint"] == 20 and model.calls == 4

    class FirstBatches(data.DataLoader):  # iterates otherwise than its sampler says: its count is not told
        def __iter__(self):
            return itertools.islice(super().__iter__(), 2)

    tree = record(model, {"fc": "net.4"}, FirstBatches(dataset, batch_size=5), tmp_path / "f.zarr",
                  datapoints=np.arange(10))
    assert tree["fc"]["activations"].sizes["datapoint"] == 10

    class Unsized(data.Sampler):
        def __iter__(self):
            return iter(range(23))

        def __len__(self):
            raise NotImplementedError

    tree = record(model, {"fc": "net.4"}, data.DataLoader(dataset, batch_size=5, sampler=Unsized()),
                  tmp_path / "u.zarr")
    assert tree["fc"]["activations"].sizes["datapoint"] == 23

    class Stream(data.IterableDataset):
        def __iter__(self):
            return iter(dataset.tensors[0][:, None].unbind(0))

    streamed = data.DataLoader(Stream(), batch_size=None)  # batches as they come: its count is known only after
    with pytest.raises(ValueError, match=r"datapoints has 22 labels for 23 recorded datapoints"):
        record(model, {"fc": "net.4"}, streamed, tmp_path / "s.zarr", datapoints=np.arange(22))


def test_a_shuffling_data_loader_is_warned_of(tmp_path):
    """A DataLoader with shuffle=True recorded its inputs in a random order, silently: labels in the dataset's order
    (coords=) then sat on other inputs, and a second model recorded with mode='a' paired other inputs (rho 0.5 for
    one model with itself)."""
    dataset = torch.utils.data.TensorDataset(torch.randn(12, 1, 8, 8), torch.zeros(12))
    shuffled = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    with pytest.warns(RuntimeWarning, match="batches is a DataLoader that shuffles.*use shuffle=False") as caught:
        record(_net(), {"conv": "0"}, shuffled, tmp_path / "r.zarr")
    assert {w.filename for w in caught if "shuffles" in str(w.message)} == {__file__}
    data = torch.utils.data
    for loader in (data.DataLoader(dataset, batch_size=4, sampler=data.SubsetRandomSampler(range(12))),
                   data.DataLoader(dataset, batch_sampler=data.BatchSampler(data.RandomSampler(dataset), 4, False))):
        with pytest.warns(RuntimeWarning, match="batches is a DataLoader that shuffles"):
            record(_net(), {"conv": "0"}, loader, tmp_path / "r.zarr", overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record(_net(), {"conv": "0"}, torch.utils.data.DataLoader(dataset, batch_size=4), tmp_path / "s.zarr")


class _TimeFirstHead(torch.nn.Module):
    """An LSTM with batch_first=False and a Linear head on F.relu of its (T, N, 8) output: no module made the head's
    input, so the rule reads the head's (T, N, 5) as (N, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.fc = torch.nn.LSTM(3, 8), torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(torch.nn.functional.relu(out))


def test_layouts_time_first_and_layers_that_disagree_on_the_datapoints(tmp_path):
    """Such a head was stored with T as its datapoints (21 of 12), silently when recorded alone, and beside the
    LSTM with xarray's "conflicting sizes for dimension 'datapoint'"; layouts= had no way to say (T, N, C)."""
    batches = [torch.randn(7, 4, 3) for _ in range(3)]  # T = 7, N = 4
    net = _TimeFirstHead().eval()
    with torch.inference_mode():
        own = np.concatenate([net.rnn(x)[0].numpy().transpose(1, 0, 2) for x in batches])
        want = np.concatenate([net(x).numpy().transpose(1, 0, 2) for x in batches])
    # the LSTM's documented (T, N, C) output tells the pass's N (4), which the head's (7, 4, C) has second
    for layers in (["rnn", "fc"], ["fc"]):
        tree = record(net, layers, batches, tmp_path / f"{len(layers)}.zarr")
        assert tree["fc"]["activations"].dims == ("datapoint", "token", "channel")
        np.testing.assert_allclose(tree["fc"]["activations"].values, want, atol=1e-6)
    tree = record(net, ["rnn", "fc"], batches, tmp_path / "r.zarr", layouts={"fc": "time_first",
                                                                              "rnn": "channels_last"})
    np.testing.assert_allclose(tree["rnn"]["activations"].values, own, atol=1e-6)  # found (T, N, C), then the layout
    np.testing.assert_allclose(tree["fc"]["activations"].values, want, atol=1e-6)
    with pytest.raises(ValueError, match=r"layouts\['rnn'\] is 'time_first', \(T, N, C\), but its output is of "
                                         r"shape \(4, 8\)"):
        record(net, ["rnn"], batches, tmp_path / "h.zarr", layouts={"rnn": "time_first"},
               output=lambda out: out[1][0][0])


class _Flattened(torch.nn.Module):
    """An LSTM with batch_first=False, then Linears on its (T · N, 8) steps."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.rows, self.fc = torch.nn.LSTM(3, 8), torch.nn.Linear(8, 5), torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rows(self.rnn(x)[0].reshape(-1, 8)))


class _TwoCounts(torch.nn.Module):
    """Linears on (N, T, C) and on its transpose (T, N, C), in a model with no module that puts time first."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).transpose(0, 1))


def test_layers_that_disagree_on_the_datapoints_are_named_against_what_tells_the_count(tmp_path):
    """The layers' most common count was taken for the batch's: with two layers misread beside one read right,
    the error told the right one to change, and its advice gave the same error again. Against the LSTM's
    documented count the misread layers are named; where nothing tells the count, every layer is."""
    batches = [torch.randn(7, 4, 3) for _ in range(2)]  # T = 7, N = 4
    with pytest.raises(ValueError, match=r"\('rnn' 4, 'rows' 28, 'fc' 28; the batch holds 4\); pass output= a "
                                         r"function giving 'rows' with its datapoints first; pass output="):
        record(_Flattened().eval(), ["rnn", "rows", "fc"], batches, tmp_path / "bad.zarr")
    with pytest.raises(ValueError, match=r"\('first' 4, 'second' 6\), and nothing tells which is right; pass "
                                         r"layouts=\{layer: 'time_first'\} for each layer that is \(T, N, C\)"):
        record(_TwoCounts(), ["first", "second"], [torch.randn(4, 6, 3)], tmp_path / "two.zarr")
    assert not {"bad.zarr", "two.zarr"} & {path.name for path in tmp_path.iterdir()}


class _Keywords(torch.nn.Module):
    """A model called with keywords, its labels first (as a dataset's dict may order them)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, labels: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def test_the_image_of_a_dict_batch_sets_the_pixel_centres(tmp_path):
    """The image size was read from a dict batch's first value only: with labels first, the pooled map's centres
    fell back to its own pixels (0.5, 1.5, ...) instead of the 8-pixel input's (1, 3, 5, 7)."""
    batches = [{"labels": torch.zeros(5), "pixel_values": torch.randn(5, 1, 8, 8)} for _ in range(2)]
    tree = record(_Keywords(), {"pool": "net.2"}, batches, tmp_path / "r.zarr")
    np.testing.assert_allclose(tree["pool"]["height"], [1, 3, 5, 7])


def test_a_nested_output_is_padded_to_the_batch_s_mask(tmp_path):
    """PyTorch's fast path gives a nested tensor padded to the batch's longest sequence (4 of 6 here): it is padded
    to the mask's 6 tokens and keeps the mask (as no other layer shorter than the mask is)."""
    torch.manual_seed(0)
    embed = torch.nn.Linear(3, 8)
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.encoder = embed, encoder

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.encoder(self.embed(x), src_key_padding_mask=~attention_mask)

    x = torch.randn(4, 6, 3)
    mask = torch.arange(6)[None] < torch.tensor([4, 3, 2, 4])[:, None]
    tree = record(Encoder().eval(), {"l0": "encoder.layers.0"}, [{"x": x, "attention_mask": mask}], tmp_path / "r.zarr")
    assert tree["l0"]["activations"].shape == (4, 6, 8)
    np.testing.assert_array_equal(tree["l0"]["mask"].values, mask.numpy())
    with torch.inference_mode():
        want = encoder.layers[0](embed(x), src_key_padding_mask=~mask).numpy()
    real = mask.numpy()
    np.testing.assert_allclose(tree["l0"]["activations"].values[real], want[real], atol=1e-5)
    with pytest.raises(ValueError, match=r"layouts\['l0'\] is 'time_first', \(T, N, C\), but its output is a nested "
                                         r"tensor, which PyTorch makes batch first"):
        record(Encoder().eval(), {"l0": "encoder.layers.0"}, [{"x": x, "attention_mask": mask}], tmp_path / "t.zarr",
               layouts={"l0": "time_first"})


class _SequenceFirstBlock(torch.nn.Module):
    """A CLIP-like residual block on (T, N, C): attention with batch_first=False, LayerNorms and an MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, 2)
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _SequenceFirst(torch.nn.Module):
    """CLIP's text and image transformers: batch-first embeddings permuted to (T, N, C) for the blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.ln_pre = torch.nn.Linear(3, 8), torch.nn.LayerNorm(8)
        self.blocks = torch.nn.Sequential(_SequenceFirstBlock(8), _SequenceFirstBlock(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.ln_pre(self.embed(x)).permute(1, 0, 2)).permute(1, 0, 2)

    def own(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Each block's output and the first block's ln_1, (N, T, C)."""
        with torch.inference_mode():
            first = self.ln_pre(self.embed(x)).permute(1, 0, 2)
            outputs = {"ln_1": self.blocks[0].ln_1(first), "block0": self.blocks[0](first)}
            outputs["block1"] = self.blocks[1](outputs["block0"])
        return {name: out.permute(1, 0, 2).numpy() for name, out in outputs.items()}


LAYERS = {"ln_1": "blocks.0.ln_1", "block0": "blocks.0", "block1": "blocks.1"}


@pytest.mark.parametrize("datapoints, batch, tokens", [(11, 4, 6), (9, 5, 4)])
def test_sequence_first_blocks_are_made_batch_first_by_the_batch_s_count(tmp_path, datapoints, batch, tokens):
    """A block of such a model (a sum, after a permute) was stored as 6 datapoints of 4 tokens, silently, when a
    batch of 4 had 6 tokens; its first LayerNorm, whose input no module made, in every batch; and a last batch
    of 4 datapoints of 4 tokens (9 in batches of 5) read the other way from the batches before it."""
    net = _SequenceFirst().eval()
    inputs = torch.randn(datapoints, tokens, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, torch.arange(datapoints)),
                                         batch_size=batch)
    tree = record(net, LAYERS, loader, tmp_path / "s.zarr")
    parts = [net.own(inputs[start : start + batch]) for start in range(0, datapoints, batch)]
    given = record(net, LAYERS, loader, tmp_path / "given.zarr", layouts={"ln_1": "channels_last"})
    for name in LAYERS:
        want = np.concatenate([part[name] for part in parts])
        assert tree[name]["activations"].shape == (datapoints, tokens, 8), name
        np.testing.assert_allclose(tree[name]["activations"].values, want, rtol=0, atol=1e-6, err_msg=name)
    # a layout given says where the channels are once the order is settled
    np.testing.assert_array_equal(given["ln_1"]["activations"].values, tree["ln_1"]["activations"].values)


def test_layers_whose_order_no_batch_tells_are_warned_of(tmp_path):
    """Every batch of as many datapoints as tokens (10 inputs of 5 tokens in batches of 5) in a model with
    time-first modules: the CLIP-like blocks were stored transposed, silently; they still are, with a warning
    naming them (the attention, whose order torch documents, is not named)."""
    net = _SequenceFirst().eval()
    inputs = torch.randn(10, 5, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=5)
    layers = {**LAYERS, "attn": "blocks.0.attn"}
    with pytest.warns(RuntimeWarning, match=r"^no batch told which of the first two dims of 'block0', 'block1', "
                                            r"'ln_1' holds the datapoints, in a model with modules that put time "
                                            r"first .* layouts=\{'block0': 'time_first', 'block1': 'time_first', "
                                            r"'ln_1': 'time_first'\}, or with batches of another size; "
                                            r"layouts=\{'block0': 'batch_first', .*\} confirms the reading$") as caught:
        record(net, layers, loader, tmp_path / "s.zarr")
    assert all("test_record.py" in warning.filename for warning in caught)
    tree = record(net, LAYERS, loader, tmp_path / "given.zarr", layouts=dict.fromkeys(LAYERS, "time_first"))
    want = [net.own(inputs[:5]), net.own(inputs[5:])]
    for name in LAYERS:
        np.testing.assert_allclose(tree[name]["activations"].values,
                                   np.concatenate([part[name] for part in want]), rtol=0, atol=1e-6, err_msg=name)


def test_square_batches_whose_count_does_not_show_are_warned_of(tmp_path):
    """A time-first encoder (torch's tutorial layout) fed by a collate_fn of its own, every batch of as many
    sequences as tokens: its inner LayerNorms were stored with tokens and datapoints swapped (CKA with the encoder's
    output 0.056 against 0.906), without a warning, since the batch's count did not show. Now they are named."""

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.embed = torch.nn.Embedding(50, 16)
            self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 1,
                                                 enable_nested_tensor=False)

        def forward(self, input_ids, attention_mask):
            return self.encoder(self.embed(input_ids).transpose(0, 1), src_key_padding_mask=~attention_mask.bool())

    def collate(items):
        ids = torch.stack(items)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    sequences = [torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    loader = torch.utils.data.DataLoader(sequences, batch_size=8, collate_fn=collate)
    net = Encoder().eval()
    with pytest.warns(RuntimeWarning, match=r"^no batch told which of the first two dims of 'norm1' holds the "
                                            r"datapoints.* layouts=\{'norm1': 'time_first'\}"):
        record(net, {"norm1": "encoder.layers.0.norm1"}, loader, tmp_path / "s.zarr")
    tree = record(net, {"norm1": "encoder.layers.0.norm1"}, loader, tmp_path / "given.zarr",
                  layouts={"norm1": "time_first"})
    outputs = []
    hook = net.encoder.layers[0].norm1.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.inference_mode():
        for batch in loader:
            net(**batch)
    hook.remove()
    want = np.concatenate([out.transpose(0, 1).numpy() for out in outputs])  # (T, N, C) → (N, T, C)
    np.testing.assert_allclose(tree["norm1"]["activations"].values, want, rtol=0, atol=1e-6)


def test_a_layer_read_in_a_batch_of_other_sizes_is_not_said_to_be_untold(tmp_path):
    """With a collate_fn of one's own (no count shown), batches of 16, 16 and 8 sequences of 8 tokens: the layers,
    read by the rule in the first batches, were warned of after the last square one ("every batch had as many
    datapoints as positions", false). Each is stored as the model gives it, without a warning."""

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.embed, self.pool = torch.nn.Embedding(50, 8), torch.nn.MultiheadAttention(8, 2)

        def forward(self, input_ids):
            hidden = self.embed(input_ids).transpose(0, 1)
            return self.pool(hidden[:1], hidden, hidden)[0]

    sequences = [torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i)) for i in range(40)]
    loader = torch.utils.data.DataLoader(sequences, batch_size=16, collate_fn=lambda items: torch.stack(items))
    net = Pooled().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tree = record(net, {"embed": "embed"}, loader, tmp_path / "s.zarr")
    want = np.concatenate([net.embed(batch).detach().numpy() for batch in loader])
    np.testing.assert_allclose(tree["embed"]["activations"].values, want, rtol=0, atol=1e-6)


def test_record_leaves_each_module_in_its_own_mode(tmp_path):
    """record runs the model in eval mode and restored the top module's mode to every module: a BatchNorm frozen
    in eval mode inside a model in training mode was switched to training (the next step updated its running
    statistics)."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    net.train()
    net[1].eval()
    record(net, ["2"], [torch.randn(6, 4)], tmp_path / "s.zarr")
    assert (net.training, net[0].training, net[1].training, net[2].training) == (True, True, False, True)


def test_a_batch_whose_count_cannot_tell_keeps_the_rule_s_layout(tmp_path):
    """Batch-first layers beside a default (time-first) attention pooling head, in a DataLoader's dict batches of
    as many datapoints as tokens, and a batch-first vision tower fed N images beside K captions of as many tokens
    as it has patches: each is stored as the model gives it (refused, and transposed, by a first version of the
    count); the Embedding, whose order no batch tells, with a warning."""

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.pool = torch.nn.Embedding(50, 8), torch.nn.MultiheadAttention(8, 2)
            self.patch = torch.nn.Conv2d(3, 8, 4, 4)  # 8 x 8 images: 4 patches
            self.vision = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)

        def forward(self, input_ids, attention_mask=None, pixel_values=None):
            if pixel_values is not None:
                return self.vision(self.patch(pixel_values).flatten(2).transpose(1, 2)), self.embed(input_ids)
            hidden = self.embed(input_ids).transpose(0, 1)
            return self.pool(hidden[:1], hidden, hidden)[0]

    net = Pooled().eval()
    ids = torch.randint(0, 50, (8, 4))
    texts = torch.utils.data.DataLoader([{"input_ids": row, "attention_mask": torch.ones(4)} for row in ids],
                                        batch_size=4)
    with pytest.warns(RuntimeWarning, match=r"^no batch told which of the first two dims of 'embed' holds"):
        tree = record(net, ["embed"], texts, tmp_path / "t.zarr")
    with torch.inference_mode():
        want = net.embed(ids).numpy()
    np.testing.assert_array_equal(tree["embed"]["activations"].values, want)
    pairs = [{"input_ids": torch.randint(0, 50, (4, 3)), "pixel_values": torch.randn(2, 3, 8, 8)} for _ in range(2)]
    tree = record(net, ["vision"], pairs, tmp_path / "v.zarr", mask=None)
    with torch.inference_mode():
        want = np.concatenate([net(**batch)[0].numpy() for batch in pairs])
    # float32 rounding apart: with hooks on its modules torch may leave the encoder layer's fused fast path
    # (2.4e-7 on one machine), where a transpose would differ by O(1)
    np.testing.assert_allclose(tree["vision"]["activations"].values, want, rtol=0, atol=1e-6)


def test_where_a_batch_shows_its_datapoints():
    from chunkcca.record import _batch_datapoints

    tokens, images = torch.zeros(7, 3, dtype=torch.long), torch.zeros(2, 3, 8, 8)
    assert _batch_datapoints((images, torch.zeros(2)), False) == 2
    assert _batch_datapoints({"labels": torch.zeros(2), "pixel_values": images}, False) == 2
    assert _batch_datapoints(images, False) == 2
    assert _batch_datapoints(tokens, True) == 7
    assert _batch_datapoints({"input_ids": tokens, "attention_mask": tokens}, True) == 7
    # a sequence model's inputs may be (T, N) or (T, N, C): unknown unless a DataLoader stacked them
    assert _batch_datapoints(tokens, False) is None
    assert _batch_datapoints({"input_ids": tokens, "attention_mask": tokens}, False) is None
    assert _batch_datapoints((torch.zeros(7, 3, 5), torch.zeros(3)), True) is None
    # K captions beside N images: which a layer follows cannot be told
    assert _batch_datapoints({"input_ids": tokens, "pixel_values": images}, False) is None
    assert _batch_datapoints(["some text"], True) is None
    assert _batch_datapoints(torch.zeros(7, 4, 3, 8, 8), False) is None  # a video may be (T, N, C, H, W)


def test_which_data_loaders_stack_their_samples():
    from chunkcca.record import _collates

    data = torch.utils.data.TensorDataset(torch.zeros(6, 2))
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), 4, False)
    assert _collates(torch.utils.data.DataLoader(data, batch_size=4))
    assert _collates(torch.utils.data.DataLoader(data, batch_sampler=sampler))
    assert not _collates(torch.utils.data.DataLoader(data, batch_size=None))  # samples are the batches
    assert not _collates(torch.utils.data.DataLoader(data, batch_size=4, collate_fn=list))
    assert not _collates([torch.zeros(4, 2)])


@pytest.mark.parametrize("length", [4, 6])
def test_sequence_first_attention_weights_are_stored_as_torch_gives_them(tmp_path, length):
    """nn.MultiheadAttention's averaged weights are (N, L, S) whatever batch_first; with L = N (batches of 4)
    they must neither be transposed nor refused."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(8, 2).eval()
    inputs = torch.randn(8, length, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=4)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.transpose(0, 1)
            return self.attention(x, x, x)[0]

    tree = record(Model(), ["attention"], loader, tmp_path / "w.zarr", output=lambda out: out[1])
    with torch.inference_mode():
        want = np.concatenate([attention(*[x.transpose(0, 1)] * 3)[1].numpy() for x in (inputs[:4], inputs[4:])])
    assert want.shape == (8, length, length)
    np.testing.assert_array_equal(tree["attention"]["activations"].values, want)


class _TransposingLM(torch.nn.Module):
    """A language model taking (N, T) token ids, as a DataLoader stacks them, into a time-first LSTM."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.rnn, self.head = torch.nn.Embedding(50, 8), torch.nn.LSTM(8, 6), torch.nn.Linear(6, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids.T))
        return self.head(torch.relu(out))


def test_a_batch_s_count_puts_a_transposing_model_s_layers_datapoints_first(tmp_path):
    """Token ids transposed to (T, N) in the model: its Embedding and the Linear on F.relu of the LSTM were
    refused (they disagreed with the LSTM on the datapoints); a DataLoader's batches show N."""
    net = _TransposingLM().eval()
    ids = torch.randint(0, 50, (13, 5))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    tree = record(net, ["embed", "rnn", "head"], loader, tmp_path / "l.zarr")
    with torch.inference_mode():
        parts = [ids[start : start + 4].T for start in range(0, 13, 4)]
        embedded = [net.embed(x) for x in parts]
        outs = [net.rnn(x)[0] for x in embedded]
        want = {"embed": embedded, "rnn": outs, "head": [net.head(torch.relu(out)) for out in outs]}
    for name, values in want.items():
        np.testing.assert_allclose(tree[name]["activations"].values,
                                   np.concatenate([value.transpose(0, 1).numpy() for value in values]),
                                   rtol=0, atol=1e-6, err_msg=name)
    # batches of 5 tokens by 5 datapoints: the rule read the Embedding and head batch first; the last, of 3, tells
    # otherwise
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=5)
    with pytest.raises(ValueError, match=r"^this batch shows the outputs of 'embed' \(time first\), 'head' \(time "
                                         r"first\), the other way round from how an earlier batch was read \(.*\); "
                                         r"pass layouts=\{'embed': 'time_first', 'head': 'time_first'\}, or record "
                                         r"batches of another size$"):
        record(net, ["embed", "rnn", "head"], loader, tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()
    tree = record(net, ["embed", "rnn", "head"], loader, tmp_path / "given.zarr",
                  layouts={"embed": "time_first", "head": "time_first"})
    np.testing.assert_array_equal(tree["embed"]["activations"].values,
                                  net.embed(ids).detach().numpy())


class _CharWords(torch.nn.Module):
    """A character CNN over words folded into the batch (N·T, C, W), then a time-first LSTM over the words."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.chars, self.conv, self.rnn = torch.nn.Embedding(30, 5), torch.nn.Conv1d(5, 8, 3), torch.nn.LSTM(8, 6)

    def forward(self, words: torch.Tensor) -> torch.Tensor:  # (N, T, W) characters
        n, t, w = words.shape
        conv = self.conv(self.chars(words.reshape(n * t, w)).transpose(1, 2))
        return self.rnn(conv.max(-1).values.view(n, t, -1).transpose(0, 1))[0]


class _SentencePairs(torch.nn.Module):
    """A sentence-pair encoder: (N, 2, T) token ids, both sentences of each pair folded into one time-first LSTM
    over (T, 2N), then a Linear per step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.rnn, self.proj = torch.nn.Embedding(50, 6), torch.nn.LSTM(6, 5), torch.nn.Linear(5, 4)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.proj(self.rnn(self.embed(torch.cat([pairs[:, 0], pairs[:, 1]]).T))[0])


def test_the_batch_s_count_does_not_override_what_the_model_tells(tmp_path):
    """Where the rule tells a 3-d output's order, the count does not: a Conv1d of 8 channels over words folded into
    the batch, in batches of 8, and a Linear on a time-first LSTM over 8-token sentence pairs folded into the
    batch, (8, 16, 4) in batches of 8, were stored transposed by a first version of the count."""
    words = torch.randint(0, 30, (16, 5, 9))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(words), batch_size=8)
    net = _CharWords().eval()
    tree = record(net, ["conv"], loader, tmp_path / "w.zarr")
    with torch.inference_mode():
        want = [net.conv(net.chars(batch.reshape(40, 9)).transpose(1, 2)) for batch in (words[:8], words[8:])]
    np.testing.assert_array_equal(tree["conv"]["activations"].values,
                                  np.concatenate([out.transpose(1, 2).numpy() for out in want]))
    pairs = torch.randint(0, 50, (16, 2, 8))  # 8 tokens, batches of 8 pairs: (T, 2N) = (8, 16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pairs), batch_size=8)
    net = _SentencePairs().eval()
    tree = record(net, ["proj"], loader, tmp_path / "p.zarr")
    with torch.inference_mode():
        want = np.concatenate([net(batch).transpose(0, 1).numpy() for batch in (pairs[:8], pairs[8:])])
    np.testing.assert_allclose(tree["proj"]["activations"].values, want, rtol=0, atol=1e-6)


def test_an_output_changed_in_place_later_in_the_pass_is_stored_as_the_layer_gave_it(tmp_path):
    """The hook kept a view of the output's memory until the pass ended, so ReLU(inplace=True) after a Linear (as
    in VGG's classifier) or after a (N, C, 1, 1) squeeze-excitation conv, and ``h += residual``, changed what was
    stored: the Linear's minimum read 0.0 (it is -1.93), CKA 0.799 against 0.631, silently."""
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: Any) -> Any:
            h = self.fc(x)
            h += self.g(h)
            return h

    torch.manual_seed(0)
    models = {"relu": nn.Sequential(nn.Linear(8, 6), nn.ReLU(inplace=True), nn.Linear(6, 4)),
              "squeeze": nn.Sequential(nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 3, 1),
                                       nn.ReLU(inplace=True)),
              "residual": Residual()}
    inputs = {"relu": torch.randn(60, 8), "squeeze": torch.randn(60, 8, 4, 4), "residual": torch.randn(60, 8)}
    layer = {"relu": "0", "squeeze": "2", "residual": "fc"}
    for kind, model in models.items():
        seen: list[np.ndarray] = []
        hook = dict(model.named_modules())[layer[kind]].register_forward_hook(
            lambda module, args, out, seen=seen: seen.append(out.detach().clone().numpy()))
        with torch.no_grad():
            model(inputs[kind])
        hook.remove()
        want = seen[0].reshape(60, -1)
        assert want.min() < 0, "the layer's own output has negative values"
        stored = record(model, [layer[kind]], inputs[kind].split(20), tmp_path / f"{kind}.zarr")
        np.testing.assert_array_equal(stored[layer[kind]]["activations"].values.reshape(60, -1), want)


def test_a_padding_mask_of_other_values_than_0_and_1_is_refused(tmp_path):
    """record cast the batch's mask to booleans, so a mask holding 2 (or -1, 0.5) became True, silently, where
    write_activations and ingest refuse it: one rule for the three."""
    embed = torch.nn.Sequential(torch.nn.Linear(3, 4))
    x = torch.randn(10, 6, 3)
    mask = (torch.arange(6)[None] < torch.randint(1, 7, (10,))[:, None]).long()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = embed

        def forward(self, x: Any, attention_mask: Any) -> Any:
            return self.embed(x)

    tree = record(Wrapped(), ["embed"], [{"x": x, "attention_mask": mask}], tmp_path / "ok.zarr")
    np.testing.assert_array_equal(tree["embed"]["mask"].values, mask.numpy() == 1)
    with pytest.raises(ValueError, match=r"the padding mask of a batch \(mask=\) holds values other than 0/1 or "
                                         r"True/False \(e.g. \[2"):
        record(Wrapped(), ["embed"], [{"x": x, "attention_mask": mask * 2}], tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()


class _PreNormBlock(torch.nn.Module):
    """A pre-LayerNorm block: x + fc(ln(x)), its output a function of tensors channels last."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln, self.fc = torch.nn.LayerNorm(width), torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(self.ln(x))


def test_a_square_output_of_channels_last_tensors_is_recorded(tmp_path):
    """The refusal of square shapes a module made (a Conv1d's (N, C, C)) refused pre-norm transformer blocks whose
    sequence length equals their width, whose earlier tensors of that shape are channels last."""
    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.position = torch.nn.Linear(3, 16), torch.nn.Parameter(torch.randn(16, 16))
            self.first, self.second = _PreNormBlock(16), _PreNormBlock(16)

        def forward(self, x):
            return self.second(self.first(self.embed(x) + self.position))

    torch.manual_seed(0)
    model, inputs = Encoder().eval(), torch.randn(30, 16, 3)
    tree = record(model, ["first", "second"], [inputs[:15], inputs[15:]], tmp_path / "s.zarr")
    with torch.no_grad():
        want = model(inputs).numpy()
    assert tree["second"]["activations"].dims == ("datapoint", "token", "channel")
    np.testing.assert_allclose(tree["second"]["activations"].values, want, atol=1e-6)


class _PooledConv(torch.nn.Module):
    """A conv block that changes its length with a function: (N, C, L) → (N, C', L / 2)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(inputs, outputs, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.max_pool1d(torch.nn.functional.relu(self.conv(x)), 2)


class _CausalConv(torch.nn.Module):
    """A causal conv: its padding chomped off the end, (N, C, L + 2) → (N, C, L)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(inputs, outputs, 3, padding=2)

    def forward(self, x):
        return self.conv(x)[:, :, :-2]


class _Transpose(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_conv_blocks_that_change_their_length_with_a_function_are_stored_channels_last(tmp_path):
    """A conv block pooling with ``F.max_pool1d``, or a causal conv chomping its padding, returned (N, C, L') that no
    module made, and took the default for modules with parameters, (N, T, C): time and channels swapped, silently
    (avgpool CKA 0.532 against 0.821). The latest tensor their submodules made, a Conv1d's (N, C, L), tells it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_PooledConv(3, 16), _PooledConv(16, 32), _CausalConv(32, 12)).eval()
    inputs = torch.randn(40, 3, 64)
    tree = record(model, {"b1": "0", "b2": "1", "causal": "2"}, [inputs[:20], inputs[20:]], tmp_path / "s.zarr")
    with torch.no_grad():
        first = model[0](inputs)
        second = model[1](first)
        wants = {"b1": first, "b2": second, "causal": model[2](second)}
    for layer, want in wants.items():
        stored = tree[layer]["activations"]
        assert stored.dims == ("datapoint", "time", "channel"), layer
        np.testing.assert_array_equal(stored.values, want.transpose(1, 2).numpy(), err_msg=layer)


def test_a_transpose_module_after_a_conv_frontend_swaps_the_layout(tmp_path):
    """A parameter-free Transpose module after a frontend whose channels double as its length halves gave a
    (N, 32, 64) of the shape of the first conv's output, and took its layout (channels first): it, the Dropout and
    the LayerNorm(64) after it were stored with their 64 channels as positions. A parameter-free module that swaps
    two dims of a tensor a module made swaps its layout."""
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 32, 5, padding=2), torch.nn.GELU(),
                                torch.nn.Conv1d(32, 64, 3, stride=2, padding=1), torch.nn.GELU(),
                                _Transpose(), torch.nn.Dropout(0.1), torch.nn.LayerNorm(64)).eval()
    inputs = torch.randn(20, 1, 64)
    tree = record(model, {"transposed": "4", "dropout": "5", "norm": "6"}, [inputs[:10], inputs[10:]],
                  tmp_path / "s.zarr")
    with torch.no_grad():
        frontend = model[:5](inputs)
        wants = {"transposed": frontend, "dropout": frontend, "norm": model[6](frontend)}
    for layer, want in wants.items():
        stored = tree[layer]["activations"]
        assert stored.shape == (20, 32, 64), layer
        np.testing.assert_array_equal(stored.values, want.numpy(), err_msg=layer)



def test_a_conv_output_transposed_in_a_forward_is_stored_channels_last(tmp_path):
    """A conv encoder whose channels double as its length halves, transposed in the forward to feed a
    transformer (``h.transpose(1, 2)`` of a Conv1d's output, no Transpose module): the (N, T=32, C=64) view has the
    shape of the first conv's (N, C=32, L=64) output and took its layout, channels first; a block returning it, a
    Dropout and a GELU after it were stored with their 64 channels as positions, silently (avgpool CKA 0.31 for
    0.96; found by audit). A view that is a contiguous (N, C, L) with its last two dims swapped is channels last."""

    class Frontend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv1d(1, 32, 3, padding=1)
            self.conv2 = torch.nn.Conv1d(32, 64, 3, stride=2, padding=1)

        def forward(self, x):
            return torch.relu(self.conv2(torch.relu(self.conv1(x)))).transpose(1, 2)  # a function's output, viewed

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.front, self.conv = Frontend(), torch.nn.Conv1d(32, 64, 3, stride=2, padding=1)
            self.drop, self.act, self.fc = torch.nn.Dropout(0.1), torch.nn.GELU(), torch.nn.Linear(64, 16)

        def forward(self, x):
            front = self.front(x)  # (N, 32, 64): time, then channels
            h = self.act(self.drop(self.conv(torch.relu(self.front.conv1(x))).transpose(1, 2)))  # a module's, viewed
            return self.fc(h + front)

    torch.manual_seed(0)
    model = Net().eval()
    inputs = torch.randn(40, 1, 64)
    tree = record(model, ["front", "drop", "act", "fc"], [inputs[:20], inputs[20:]], tmp_path / "s.zarr")
    with torch.no_grad():
        front = model.front(inputs)
        dropped = model.conv(torch.relu(model.front.conv1(inputs))).transpose(1, 2)
        wants = {"front": front, "drop": dropped, "act": model.act(dropped), "fc": model(inputs)}
    for layer, want in wants.items():
        stored = tree[layer]["activations"]
        assert stored.dims[-1] == "channel" and stored.shape == tuple(want.shape), layer
        np.testing.assert_array_equal(stored.values, want.numpy(), err_msg=layer)


class _Tokens(torch.nn.Module):
    """A conv block turning its (N, 64, 32) conv output into (N, T=32, C=64) tokens, ``how`` (as a patch embedding
    does): its input, a conv's (N, 32, 64), has the output's shape."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv, self.how = torch.nn.Conv1d(32, 64, 3, stride=2, padding=1), how
        self.pos = torch.nn.Parameter(torch.randn(32, 64))

    def forward(self, x):
        h = self.conv(x)
        turned = {"view": h.transpose(1, 2), "relu_view": torch.relu(h).transpose(1, 2),
                  "plus_pos": h.transpose(1, 2) + self.pos}
        return turned[self.how]


class _Down(torch.nn.Module):
    """A conv stage normalising its channels with ``F.layer_norm`` through a transpose and back: its output is
    channels first, lying in memory as a transposed (N, 32, 64), the shape of an older conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(32, 64, 3, stride=2, padding=1)
        self.g, self.b = torch.nn.Parameter(torch.ones(64)), torch.nn.Parameter(torch.zeros(64))

    def forward(self, x):
        h = torch.nn.functional.layer_norm(self.conv(x).transpose(1, 2), (64,), self.g, self.b).transpose(1, 2)
        return torch.nn.functional.gelu(h)


class _SubPixelUp(torch.nn.Module):
    """A 1-d U-Net decoder's sub-pixel upsampling (AudioUNet): its conv's (N, 64, 32) reshaped to a channels-first
    (N, 32, 64), the transposed shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(32, 64, 3, padding=1)

    def forward(self, x):
        h = self.conv(x[:, :, ::2])  # (N, 64, 32)
        count, channels, length = h.shape
        return h.view(count, channels // 2, 2, length).permute(0, 1, 3, 2).reshape(count, channels // 2, length * 2)


class _ResidualDownUp(torch.nn.Module):
    """A channels-first residual block whose inner conv is (N, 64, 32): x + F.conv1d(F.interpolate(down(x)))."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv1d(32, 64, 3, stride=2, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(32, 64, 1) * 0.1)

    def forward(self, x):
        return x + torch.nn.functional.conv1d(torch.nn.functional.interpolate(self.down(x), scale_factor=2),
                                              self.weight)


class _ResidualOnATransposedView(torch.nn.Module):
    """A text CNN's residual block, channels first, x + sub-pixel(relu(down(x))), whose input is a transposed
    embedding (it lies in memory transposed, and so does the sum, unless f(x) + x) and whose down conv makes the
    transposed shape."""

    def __init__(self, sum_first: bool = True) -> None:
        super().__init__()
        self.down, self.sum_first = torch.nn.Conv1d(32, 64, 3, stride=2, padding=1), sum_first

    def forward(self, x):
        h = torch.relu(self.down(x))  # (N, 64, 32)
        count = h.shape[0]
        up = h.view(count, 32, 2, 32).permute(0, 1, 3, 2).reshape(count, 32, 64)
        return x + up if self.sum_first else up + x


@pytest.mark.parametrize("block", ["view", "relu_view", "plus_pos", "down", "subpixel", "residual"])
def test_a_conv_blocks_tokens_are_channels_last_and_its_round_trip_channels_first(tmp_path, block):
    """A block returning its conv's (N, 64, 32) as (N, T=32, C=64) tokens (a view, of F.relu of it too, plus a
    position embedding) took its input's layout, a conv's (N, 32, 64) of the same shape: stored with its 64
    channels as positions (avgpool CKA 0.34 for 1.0; found by review). Such a view, or a block's output lying in
    memory as its last conv's (N, C, L) transposed, is channels last; blocks of the transposed shape made otherwise
    stay channels first: a stage transposing to normalise and back, a sub-pixel upsampler's reshape, a residual
    block (a first fix took the first for channels last by its strides, a second the other two by their shape;
    found by reviews)."""
    torch.manual_seed(0)
    blocks = {"down": _Down, "subpixel": _SubPixelUp, "residual": _ResidualDownUp}
    model = torch.nn.Sequential(torch.nn.Conv1d(8, 32, 3, padding=1),
                                blocks[block]() if block in blocks else _Tokens(block))
    inputs = torch.randn(40, 8, 64)
    tree = record(model, {"block": "1"}, [inputs[:20], inputs[20:]], tmp_path / "s.zarr")
    with torch.no_grad():
        want = model(inputs).numpy()
    if block in blocks:  # channels first: (N, channels, positions)
        want = np.moveaxis(want, 1, 2)
    stored = tree["block"]["activations"]
    assert stored.dims[-1] == "channel" and stored.shape == want.shape
    np.testing.assert_array_equal(stored.values, want)



def test_modules_after_a_conv_output_transposed_by_functions_are_channels_last_and_a_residual_on_a_view_first(
        tmp_path):
    """A Dropout and a GELU given ``F.gelu(conv(h)).transpose(1, 2) + pos`` in the model's forward took the layout of
    an older conv's (N, 32, 64) of their shape (channels first), and the LayerNorm after them theirs: stored with
    their channels as positions (found by review; a first fix had them right, a second undid it). The latest
    module tensor of their shape with its last two dims swapped, a channels-first (N, 64, 32), is what they lie in
    memory as, transposed: channels last. A residual block whose input lies in memory transposed (a transposed
    embedding through a Dropout1d) keeps its input's strides in its sum: channels first, as its input."""

    class Front(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv1d(3, 32, 3, padding=1)
            self.conv2 = torch.nn.Conv1d(32, 64, 3, stride=2, padding=1)
            self.pos = torch.nn.Parameter(torch.randn(1, 32, 64))
            self.drop, self.gelu, self.norm = torch.nn.Dropout(0.1), torch.nn.GELU(), torch.nn.LayerNorm(64)

        def forward(self, x):
            h = self.conv2(torch.relu(self.conv1(x)))
            return self.norm(self.gelu(self.drop(torch.nn.functional.gelu(h).transpose(1, 2) + self.pos)))

    class TextCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.sdrop = torch.nn.Linear(5, 32), torch.nn.Dropout1d(0.1)
            self.block, self.act = _ResidualOnATransposedView(), torch.nn.ReLU()

        def forward(self, x):  # (N, 64 tokens, 5)
            return self.act(self.block(self.sdrop(self.emb(x).transpose(1, 2))))

    torch.manual_seed(0)
    for model, inputs, channels_last in ((Front().eval(), torch.randn(40, 3, 64), ("drop", "gelu", "norm")),
                                         (TextCNN().eval(), torch.randn(40, 64, 5), ())):
        names = [name for name in ("drop", "gelu", "norm", "sdrop", "block", "act") if hasattr(model, name)]
        wants = {}
        hooks = [getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name, wants=wants: wants.__setitem__(name, out.detach().clone()))
            for name in names]
        with torch.no_grad():
            model(inputs)
        for hook in hooks:
            hook.remove()
        tree = record(model, names, [inputs[:20], inputs[20:]], tmp_path / f"{type(model).__name__}.zarr")
        for name in names:
            want = wants[name].numpy() if name in channels_last else np.moveaxis(wants[name].numpy(), 1, 2)
            stored = tree[name]["activations"]
            assert stored.dims[-1] == "channel" and stored.shape == want.shape, name
            np.testing.assert_allclose(stored.values, want, rtol=1e-6, atol=1e-6, err_msg=name)


class _EmbeddingThenResidual(torch.nn.Module):
    """A text CNN: a Linear embedding (N, 64 tokens, 32) transposed to (N, 32, 64) with no module between, into a
    residual block whose down conv makes the transposed shape, then a ReLU."""

    def __init__(self, sum_first: bool) -> None:
        super().__init__()
        self.emb, self.block = torch.nn.Linear(5, 32), _ResidualOnATransposedView(sum_first)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(self.block(self.emb(x).transpose(1, 2)))


@pytest.mark.parametrize("sum_first", [True, False])
def test_a_residual_block_on_a_transposed_embedding_is_channels_first(tmp_path, sum_first):
    """A residual block given a Linear's output transposed in the forward (no module between to tell its layout)
    took the default of modules with parameters, (N, T, C): it and the ReLU after it were stored with their 32
    channels as positions, silently (found by review). A tensor a Conv1d takes is channels first, as it reads it;
    the block's sum of its shape and the ReLU keep that."""
    torch.manual_seed(0)
    model, inputs = _EmbeddingThenResidual(sum_first).eval(), torch.randn(40, 64, 5)
    with torch.no_grad():
        block = model.block(model.emb(inputs).transpose(1, 2))
    tree = record(model, ["block", "act"], [inputs[:20], inputs[20:]], tmp_path / "s.zarr")
    for name, want in (("block", block), ("act", torch.relu(block))):
        stored = tree[name]["activations"]
        assert stored.dims == ("datapoint", "time", "channel"), name
        np.testing.assert_allclose(stored.values, want.transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


class _SensorModel1d(torch.nn.Module):
    """A model of one's own named as torch's channels-first modules are, given (N, T, C) sensor readings that its
    LayerNorm, Linear and Dropout take channels last; beside it, a mixer whose Conv1d(P, P, 1) takes a function's
    (N, P, C) with its patches as channels, and whose Linear and LayerNorm take the same tensor channels last."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mix, self.drop = torch.nn.LayerNorm(6), torch.nn.Linear(6, 6), torch.nn.Dropout(0.1)
        self.patches, self.tokens = torch.nn.Linear(6, 16), torch.nn.Conv1d(20, 20, 1)
        self.channels, self.mixed_norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)

    def forward(self, x):  # (N, T=20, C=6)
        h = self.patches(self.norm(x) + self.mix(self.drop(x))) * 2.0
        return self.tokens(h) + self.channels(h) + self.mixed_norm(h)


def test_tensors_a_conv_takes_leave_modules_acting_on_channels_last_alone(tmp_path):
    """Noting every tensor a module named ``*1d`` took as channels first (for a residual block on a transposed
    embedding) stored the LayerNorm, Linear and Dropout a model of one's own named ``*1d`` gives its (N, T, C)
    input, and a mixer's Linear and LayerNorm on a tensor its token-mixing Conv1d also takes, with time and
    channels swapped, silently (found by review of that change). Only torch's own modules note it, and a module
    acting on the last dim, or one of a shape a module made, is read as before."""
    torch.manual_seed(0)
    model, inputs = _SensorModel1d().eval(), torch.randn(8, 20, 6)
    names = ["norm", "mix", "drop", "channels", "mixed_norm"]
    wants = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda module, args, out, name=name: wants.__setitem__(name, out.detach().clone())) for name in names]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    tree = record(model, names, [inputs[:4], inputs[4:]], tmp_path / "s.zarr")
    for name in names:
        stored = tree[name]["activations"]
        assert stored.dims == ("datapoint", "token", "channel"), name
        np.testing.assert_allclose(stored.values, wants[name].numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_conv_block_pooled_to_a_square_output_is_refused_unless_told(tmp_path):
    """A conv block pooling its (N, 8, 16) to a square (N, 8, 8) with ``F.max_pool1d``, and the ReLU after it, took
    the default of modules with parameters, (N, T, C): stored with channels and positions swapped, silently (found
    by review). Square, it may as well be a copy of its transpose: refused, naming the layer and ``layouts=``;
    told, recorded as told."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_PooledConv(3, 16), _PooledConv(16, 8), torch.nn.ReLU()).eval()
    inputs = torch.randn(20, 3, 32)
    for layers in (["square"], ["relu"]):
        modules = {"square": "1", "relu": "2"}
        with pytest.raises(ValueError, match=rf"layer '{layers[0]}': where the channels of its \(10, 8, 8\) output "
                                             r"are is unknown: .*square.*layouts="):
            record(model, {layer: modules[layer] for layer in layers}, [inputs[:10], inputs[10:]],
                   tmp_path / f"{layers[0]}.zarr")
        assert not (tmp_path / f"{layers[0]}.zarr").exists()
    tree = record(model, {"square": "1", "relu": "2"}, [inputs[:10], inputs[10:]], tmp_path / "told.zarr",
                  layouts={"square": "channels_first", "relu": "channels_first"})
    with torch.no_grad():
        square = model[:2](inputs)
    for name, want in (("square", square), ("relu", torch.relu(square))):
        np.testing.assert_array_equal(tree[name]["activations"].values, want.transpose(1, 2).numpy(), err_msg=name)


class _ConvThenSequence(torch.nn.Module):
    """A conv encoder whose channels double as its length halves, its (N, 64, 32) copied to (N, 32, 64) tokens
    (the first conv's shape) for a batch-first attention, GRU or transformer layer."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv1d(3, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv1d(32, 64, 3, stride=2, padding=1)
        self.sequence = {"attention": lambda: torch.nn.MultiheadAttention(64, 4, batch_first=True),
                         "gru": lambda: torch.nn.GRU(64, 64, batch_first=True),
                         "transformer": lambda: torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)}[kind]()

    def forward(self, x):
        tokens = self.conv2(torch.relu(self.conv1(x))).transpose(1, 2).contiguous()
        out = self.sequence(tokens, tokens, tokens) if isinstance(self.sequence, torch.nn.MultiheadAttention) \
            else self.sequence(tokens)
        return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ["attention", "gru", "transformer"])
def test_batch_first_sequence_modules_are_stored_as_torch_documents_them(tmp_path, kind):
    """A batch-first MultiheadAttention or GRU given a conv's output copied to tokens of the first conv's (N, 32,
    64) shape took that older tensor's layout, channels first: stored with its 64 channels as positions, silently
    (found by review). torch documents their output as (N, T, C)."""
    torch.manual_seed(0)
    model, inputs = _ConvThenSequence(kind).eval(), torch.randn(20, 3, 64)
    outputs = []
    hook = model.sequence.register_forward_hook(
        lambda module, args, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    with torch.no_grad():
        model(inputs)
    hook.remove()
    tree = record(model, ["sequence"], [inputs[:10], inputs[10:]], tmp_path / "s.zarr")
    stored = tree["sequence"]["activations"]
    assert stored.dims == ("datapoint", "token", "channel")
    np.testing.assert_allclose(stored.values, outputs[0].numpy(), rtol=1e-6, atol=1e-6)


def test_a_model_recorded_on_fewer_inputs_adds_its_labels_to_the_store_s_by_datapoint(tmp_path):
    """A second model recorded on the first 20 of the store's 30 inputs, with their classes, was refused as giving 20
    labels for the store's 30 datapoints (found by audit). Plain labels are the datapoints' of a recording without
    ``datapoints=``, its positions: checked against the store's on the datapoints both hold."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU()).eval()
    inputs, classes = torch.randn(30, 5), np.arange(30) % 3
    record(model, {"a": "0"}, [inputs[:15], inputs[15:]], tmp_path / "s.zarr", coords={"cls": classes})
    tree = record(model, {"b": "1"}, [inputs[:10], inputs[10:20]], tmp_path / "s.zarr", coords={"cls": classes[:20]},
                  mode="a")
    np.testing.assert_array_equal(tree["b"]["activations"]["cls"], classes[:20])
    with pytest.raises(ValueError, match=r"coords\['cls'\]: layer 'a' of .* holds 'cls' with other labels for "
                                         r"datapoints \[0, 1, 2, 3, 4\]"):
        record(model, {"c": "1"}, [inputs[:20]], tmp_path / "s.zarr", coords={"cls": (classes[:20] + 1) % 3}, mode="a")


def test_a_time_first_block_of_ones_own_is_told_by_the_batch_count(tmp_path):
    """A fairseq-style block of one's own on (T, B, C), in a model with no torch time-first module, was stored with
    its 12 time steps as datapoints, (60, 10, 32) for 50 inputs of 12 tokens, though the DataLoader's batches
    showed N = 10: the batch's count tells a 3-d output's time order in any model."""
    from torch.utils.data import DataLoader, TensorDataset

    class TimeFirstBlock(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.ff, self.norm = torch.nn.Linear(width, width), torch.nn.LayerNorm(width)

        def forward(self, x):
            return self.norm(x + torch.relu(self.ff(x)))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.block = torch.nn.Embedding(100, 32), TimeFirstBlock(32)

        def forward(self, ids):
            return self.block(self.embed(ids).transpose(0, 1))

    torch.manual_seed(0)
    net, ids = Net().eval(), torch.randint(0, 100, (50, 12))
    tree = record(net, ["block"], DataLoader(TensorDataset(ids, torch.zeros(50)), batch_size=10), tmp_path / "s.zarr")
    with torch.no_grad():
        want = net(ids).transpose(0, 1).numpy()
    assert tree["block"]["activations"].shape == (50, 12, 32)
    np.testing.assert_allclose(tree["block"]["activations"].values, want, rtol=1e-6, atol=1e-6)  # batched float32


def test_a_layer_read_before_a_time_first_module_showed_the_batch_s_count_is_not_stored_turned(tmp_path):
    """PyTorch's word language model: (T, N) token ids, an Embedding, then a time-first LSTM. The Embedding
    recorded alone was stored (28, 5, 8) for 4 batches of 5 sequences of 7 tokens, its time steps as datapoints,
    silently: it runs before the LSTM shows N. Its (T, N, C) output against that N is now an error naming the
    layout to give, and with it the layer is stored datapoints first (found by audit)."""

    class WordModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.rnn = torch.nn.Embedding(30, 8), torch.nn.LSTM(8, 6)
            self.decoder = torch.nn.Linear(6, 30)

        def forward(self, ids):  # ids (T, N)
            return self.decoder(self.rnn(self.encoder(ids))[0])

    torch.manual_seed(0)
    net, data = WordModel().eval(), torch.randint(0, 30, (7, 20))
    batches = [data[:, start : start + 5] for start in range(0, 20, 5)]
    with pytest.raises(ValueError, match=r"^layer 'encoder' gives 7 datapoints for one batch \(the batch holds 5\); "
                                         r"if 'encoder' is \(T, N, C\) read as \(N, T, C\), pass "
                                         r"layouts=\{'encoder': 'time_first'\}"):
        record(net, ["encoder"], batches, tmp_path / "s.zarr")
    tree = record(net, ["encoder"], batches, tmp_path / "s.zarr", layouts={"encoder": "time_first"}, overwrite=True)
    with torch.no_grad():
        want = np.concatenate([net.encoder(batch).transpose(0, 1).numpy() for batch in batches])
    np.testing.assert_array_equal(tree["encoder"]["activations"].values, want)

    class Views(torch.nn.Module):  # (N, V, T, C) folded into the batch, (N·V, T, C): stored as the model gives it
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(x.reshape(-1, *x.shape[2:]))

    class Pairs(torch.nn.Module):  # sentence pairs folded, (2N, T, C) with T = N, before a time-first LSTM
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lstm = torch.nn.Embedding(20, 4), torch.nn.LSTM(8, 5)

        def forward(self, ids):  # (N, 2, T)
            n, _, t = ids.shape
            folded = self.emb(ids.reshape(2 * n, t))
            return self.lstm(folded.reshape(n, 2, t, 4).permute(2, 0, 1, 3).reshape(t, n, 8))[0]

    pairs, ids = Pairs().eval(), torch.randint(0, 20, (16, 2, 8))
    tree = record(pairs, ["emb"], [ids[:8], ids[8:]], tmp_path / "p.zarr")  # refused by a second version
    with torch.no_grad():
        np.testing.assert_array_equal(tree["emb"]["activations"].values, pairs.emb(ids.reshape(32, 8)).numpy())
    views, clips = Views().eval(), torch.randn(40, 3, 8, 6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(clips), batch_size=8)  # T = N = 8
    tree = record(views, ["lin"], loader, tmp_path / "v.zarr")  # refused by a first version of the check
    with torch.no_grad():
        np.testing.assert_array_equal(tree["lin"]["activations"].values, views(clips).numpy())


def test_padded_sequences_without_a_mask_meta_tensors_and_scripted_layers_are_refused(tmp_path):
    """PyTorch's fast path gave nested tensors for a batch padded under ``src_key_padding_mask``: record padded
    them with zeros and stored no mask, so flatten and avgpool counted the padding as tokens, silently. A meta
    device's outputs (no values) stopped in torch's "Cannot copy out of meta tensor", and a TorchScript layer in
    "register_forward_hook is not supported on ScriptModules", naming no layer."""

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(30, 32)
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

        def forward(self, src, src_key_padding_mask):
            return self.encoder(self.embed(src), src_key_padding_mask=src_key_padding_mask)

    torch.manual_seed(0)
    ids, lengths = torch.randint(1, 30, (16, 12)), torch.randint(3, 13, (16,))
    lengths[::8] = 12
    padding = torch.arange(12)[None] >= lengths[:, None]
    batches = [{"src": ids[i : i + 8], "src_key_padding_mask": padding[i : i + 8]} for i in (0, 8)]
    with pytest.raises(ValueError, match=r"layer 'l0' comes from PyTorch's fast path as a nested tensor: the batch's "
                                         r"sequences are padded, but no padding mask was read"):
        record(Encoder().eval(), {"l0": "encoder.layers.0"}, batches, tmp_path / "nested.zarr")
    tree = record(Encoder().eval(), {"l0": "encoder.layers.0"}, batches, tmp_path / "masked.zarr",
                  mask=lambda batch: ~batch["src_key_padding_mask"])
    np.testing.assert_array_equal(tree["l0"]["mask"].values, ~padding.numpy())
    with torch.device("meta"):
        empty = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"layer '0' gives a tensor on PyTorch's meta device"):
        record(empty, ["0"], [torch.randn(5, 4, device="meta")], tmp_path / "meta.zarr")
    scripted = torch.nn.Sequential(torch.jit.script(torch.nn.Conv1d(1, 4, 3, padding=1)), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"layer 'conv' is a TorchScript module, whose outputs PyTorch gives no hook"):
        record(scripted, {"conv": "0"}, [torch.randn(5, 1, 8)], tmp_path / "scripted.zarr")


def test_the_new_layout_rules_leave_alone_what_the_old_ones_got_right(tmp_path):
    """The rules for Transpose modules, conv blocks and the batch count, first written too wide, stored an
    MLP-Mixer's token mixing (a LayerNorm, a swap, a FeedForward on the swapped tokens, a swap back) with its
    channels as positions, a block joining a Linear branch and a conv branch of as many channels as tokens as
    (N, C, L), and a (1, T, C) position table of T = the batch's N as T datapoints. A swap follows a layout the
    rules told (not a default), a conv block's rule takes blocks of channels-first tensors only, and the batch
    count flips no (1, T, C)."""
    from torch.utils.data import DataLoader, TensorDataset

    class Mixing(torch.nn.Module):  # tokens mixed: (N, P, D) → (N, D, P) → Linear over P → back
        def __init__(self, patches: int, width: int) -> None:
            super().__init__()
            self.norm, self.swap, self.back = torch.nn.LayerNorm(width), _Transpose(), _Transpose()
            self.mix = torch.nn.Sequential(torch.nn.Linear(patches, 32), torch.nn.GELU(), torch.nn.Linear(32, patches))

        def forward(self, x):
            return x + self.back(self.mix(self.swap(self.norm(x))))

    class Hybrid(torch.nn.Module):  # a Linear branch and a conv branch of 16 channels, 16 tokens kept
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.conv = torch.nn.Linear(8, 24), torch.nn.Conv1d(8, 16, 3, padding=1)

        def forward(self, x):
            return torch.cat([self.linear(x), self.conv(x.transpose(1, 2)).transpose(1, 2)], -1)[:, 1:]

    class Positions(torch.nn.Module):  # token embeddings and the position table they add
        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.table = torch.nn.Embedding(50, 16), torch.nn.Embedding(8, 16)

        def forward(self, ids):
            return self.tokens(ids) + self.table(torch.arange(ids.shape[1])[None])

    torch.manual_seed(0)
    mixer = torch.nn.Sequential(torch.nn.Linear(12, 24), Mixing(16, 24)).eval()
    patches = torch.randn(20, 16, 12)
    tree = record(mixer, {"mixing": "1", "back": "1.back"}, [patches[:10], patches[10:]], tmp_path / "mixer.zarr")
    with torch.no_grad():
        normed = mixer[1].norm(mixer[0](patches))
        wants = {"mixing": mixer(patches), "back": mixer[1].mix(normed.transpose(1, 2)).transpose(1, 2)}
    for layer, want in wants.items():  # each (N, 16 tokens, 24 channels)
        np.testing.assert_array_equal(tree[layer]["activations"].values, want.numpy(), err_msg=layer)
    hybrid, tokens = torch.nn.Sequential(Hybrid(), torch.nn.Linear(40, 5)).eval(), torch.randn(20, 17, 8)
    tree = record(hybrid, {"block": "0"}, [tokens[:10], tokens[10:]], tmp_path / "hybrid.zarr")
    with torch.no_grad():
        np.testing.assert_array_equal(tree["block"]["activations"].values, hybrid[0](tokens).numpy())
    class OwnWeights(torch.nn.Module):  # the Linear branch a function of its own weight
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.conv = torch.nn.Parameter(torch.randn(24, 8) / 3), torch.nn.Conv1d(8, 16, 3, padding=1)

        def forward(self, x):
            joined = [torch.nn.functional.linear(x, self.weight), self.conv(x.transpose(1, 2)).transpose(1, 2)]
            return torch.cat(joined, -1)[:, 1:]

    class Pooled(torch.nn.Module):  # the mixer, then attention pooling with torch's default (T, N, C)
        def __init__(self) -> None:
            super().__init__()
            self.mixer = torch.nn.Sequential(torch.nn.Linear(12, 24), Mixing(16, 24))
            self.pool = torch.nn.MultiheadAttention(24, 4)

        def forward(self, x):
            mixed = self.mixer(x).transpose(0, 1)
            return self.pool(mixed[:1], mixed, mixed)[0]

    own = torch.nn.Sequential(OwnWeights(), torch.nn.Linear(40, 5)).eval()
    tree = record(own, {"block": "0"}, [tokens[:10], tokens[10:]], tmp_path / "own.zarr")
    with torch.no_grad():
        np.testing.assert_array_equal(tree["block"]["activations"].values, own[0](tokens).numpy())
    pooled = Pooled().eval()
    batches = DataLoader(TensorDataset(patches), batch_size=10)  # its count shown, in a model with time first
    tree = record(pooled, {"back": "mixer.1.back", "mixing": "mixer.1"}, batches, tmp_path / "pooled.zarr")
    with torch.no_grad():
        normed = pooled.mixer[1].norm(pooled.mixer[0](patches))
        back = pooled.mixer[1].mix(normed.transpose(1, 2)).transpose(1, 2)
        np.testing.assert_array_equal(tree["back"]["activations"].values, back.numpy())
        np.testing.assert_array_equal(tree["mixing"]["activations"].values, pooled.mixer(patches).numpy())
    ids = torch.randint(0, 50, (24, 8))
    with pytest.raises(ValueError, match=r"the layers give different numbers of datapoints for one batch \('table' 1, "
                                         r"'tokens' 8; the batch holds 8\)"):
        record(Positions(), ["table", "tokens"], DataLoader(TensorDataset(ids, torch.zeros(24)), batch_size=8),
               tmp_path / "positions.zarr")


def test_layers_that_are_not_the_models_modules_are_refused_before_any_hook(tmp_path):
    """``layers=[0]`` (an int) or a module of another model failed while hooks were being put on the model,
    leaving six on it for good; ``{"a": "0", "a/": "2"}`` recorded one layer of the two, unsaid (found by
    audit). Each is refused before the model runs, and no hook stays."""
    net = _net()
    calls = []
    net.register_forward_pre_hook(lambda module, args: calls.append(1))

    def hooks() -> int:
        return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in net.modules())

    before = hooks()
    for layers, message in (([0], r"layer '0': 0 is neither the name of one of the model's modules \(a str, e\.g\. "
                                  r"'0'\) nor one of its modules"),
                            ({"x": torch.nn.Linear(4, 3)}, r"layer 'x': a module that is not the model's is neither"),
                            ({"x": 3}, r"layer 'x': 3 is neither"),
                            ({"a": "0", "a/": "4"}, r"layer path 'a' is given twice \('a' and 'a/'\)")):
        with pytest.raises(ValueError, match=message):
            record(net, layers, [torch.randn(2, 1, 8, 8)], tmp_path / "r.zarr")
    assert (calls, hooks(), list(tmp_path.iterdir())) == ([], before, [])

    def fails(module: Any, args: Any) -> None:  # a hook of the user's that raises: every one of ours removed
        raise RuntimeError("the user's hook")

    net[4].register_forward_pre_hook(fails)
    with pytest.raises(RuntimeError, match="the user's hook"):
        record(net, ["1", "4"], [torch.randn(2, 1, 8, 8)], tmp_path / "r.zarr")
    assert hooks() == before + 1 and list(tmp_path.iterdir()) == []


def test_an_attention_mask_after_batches_without_one_is_refused(tmp_path):
    """A batch with an attention mask after batches without one: the layer was stored without a mask, the later
    batches' padding counted as real tokens (found by audit); the other way round was refused already."""
    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.fc(self.embed(input_ids))

    ids = torch.randint(0, 10, (8, 5))
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[:, 3:] = 0
    for batches, message in (([{"input_ids": ids[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}],
                              r"layer 'fc': a batch with an attention mask of its 5 tokens, after batches without one"),
                             ([{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:]}],
                              r"layer 'fc': a batch without an attention mask of its 5 tokens, after batches with")):
        with pytest.raises(ValueError, match=message):
            record(Tokens(), ["fc"], batches, tmp_path / "r.zarr")
    assert list(tmp_path.iterdir()) == []


def test_a_lazy_module_recorded_first_can_still_be_trained(tmp_path):
    """Under inference mode the parameters a lazy module makes on its first call stayed inference tensors: the
    model could not be trained after record (found by audit)."""
    net = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    inputs = torch.randn(5, 4)
    tree = record(net, ["0"], [inputs], tmp_path / "r.zarr")
    assert not net[0].weight.is_inference()
    net(torch.randn(5, 4)).sum().backward()
    assert net[0].weight.grad is not None
    with torch.no_grad():
        np.testing.assert_array_equal(tree["0"]["activations"].values, net[0](inputs).numpy())


def test_an_appended_models_coords_are_checked_by_label_and_its_labels_before_it_runs(tmp_path):
    """A second model recorded over the same inputs in another order (``datapoints=`` its labels) with ``coords=``
    in its batches' order was checked against the store's coords by position: the right classes were refused
    ("holds 'cls' with other labels") and classes in the store's order taken, at odds with its layers for 28 of
    40 datapoints. Repeated or 2-d ``datapoints`` were refused after the last batch, or in words of counts that
    agreed (found by audit)."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(6, 10), torch.nn.Linear(6, 9)
    inputs, classes = torch.randn(40, 6), np.arange(40) % 3
    order = np.random.default_rng(0).permutation(40)
    shuffled = inputs[order]

    def batches(x):
        return [x[start : start + 8] for start in range(0, 40, 8)]

    for store in ("right.zarr", "wrong.zarr"):
        record(first, {"A": first}, batches(inputs), tmp_path / store, datapoints=np.arange(40),
               coords={"cls": classes})
    tree = record(second, {"B": second}, batches(shuffled), tmp_path / "right.zarr", mode="a", datapoints=order,
                  coords={"cls": classes[order]})
    stored = tree["B"]["activations"]
    np.testing.assert_array_equal(stored["cls"].values, stored["datapoint"].values % 3)
    with pytest.raises(ValueError, match=r"coords\['cls'\]: layer 'A' of .* holds 'cls' with other labels"):
        record(second, {"B": second}, batches(shuffled), tmp_path / "wrong.zarr", mode="a", datapoints=order,
               coords={"cls": classes})
    ran: list[int] = []
    second.register_forward_hook(lambda *_: ran.append(1))
    for labels, message in ((np.r_[np.arange(20), np.arange(20)], r"datapoints repeats labels, e\.g\. \[0, 1, 2"),
                            (np.arange(40)[:, None], r"datapoints must be one label per datapoint \(1-d\), got "
                                                     r"shape \(40, 1\)")):
        with pytest.raises(ValueError, match=message):
            record(second, {"B": second}, batches(inputs), tmp_path / "new.zarr", datapoints=labels)
    assert ran == []


class _FoldedViews(torch.nn.Module):
    """Two views of each input folded into the batch, (2N, T, C), in a model with a time-first LSTM."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.views, self.rnn = torch.nn.Linear(5, 6), torch.nn.LSTM(6, 4)

    def forward(self, x):  # x (N, 2, T, 5)
        n, v, t, c = x.shape
        folded = self.views(x.reshape(n * v, t, c))
        return self.rnn(folded.mean(0, keepdim=True).transpose(0, 1))[0]


def test_a_layer_read_before_a_time_first_module_of_its_t_and_n_is_not_stored_turned(tmp_path):
    """PyTorch's word language model fed plain (bptt, N) batches with bptt = 2N: the Embedding, read before the
    LSTM shows N, was stored (T, N, C) as T datapoints, silently, as its first dim is a multiple of N (which a
    fold into the batch could make); the LSTM's output of that very T and N, which torch documents, tells it: an
    error naming the layout to give, also beside the decoder (whose advice was output=). Found by review."""

    class WordModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.encoder, self.rnn = torch.nn.Embedding(30, 8), torch.nn.LSTM(8, 6)
            self.decoder = torch.nn.Linear(6, 30)

        def forward(self, ids):  # ids (T, N)
            return self.decoder(self.rnn(self.encoder(ids))[0])

    net, data = WordModel().eval(), torch.randint(0, 30, (10, 15))
    batches = [data[:, start : start + 5] for start in range(0, 15, 5)]
    for layers in (["encoder"], ["encoder", "decoder"]):
        with pytest.raises(ValueError, match=r"datapoints for one batch \(('encoder' 10, 'decoder' 5; )?the batch "
                                             r"holds 5\); if 'encoder' is \(T, N, C\) read as \(N, T, C\), pass "
                                             r"layouts=\{'encoder': 'time_first'\}$"):
            record(net, layers, batches, tmp_path / "s.zarr", overwrite=True)
    tree = record(net, ["encoder"], batches, tmp_path / "s.zarr", layouts={"encoder": "time_first"}, overwrite=True)
    with torch.no_grad():
        want = np.concatenate([net.encoder(batch).transpose(0, 1).numpy() for batch in batches])
    np.testing.assert_array_equal(tree["encoder"]["activations"].values, want)


class _FoldedViews(torch.nn.Module):
    """Two views of each input folded into the batch, (2N, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.views = torch.nn.Linear(5, 6)

    def forward(self, input_ids, attention_mask):  # input_ids (N, 2, T, 5)
        n, v, t, c = input_ids.shape
        return self.views(input_ids.reshape(n * v, t, c))


def test_a_mask_unfit_for_a_layer_s_rows_is_said_to_be(tmp_path):
    """A layer of 2N rows a batch of N masked sequences (views folded into the batch, kept as made) is recorded
    without the mask, with a warning: it said the layer's positions and the mask's were 4 and 4."""
    batches = [{"input_ids": torch.randn(4, 2, 4, 5), "attention_mask": torch.ones(4, 4)} for _ in range(2)]
    with pytest.warns(RuntimeWarning, match=r"^layer 'views' has 8 rows and the batch's mask 4: it is recorded "
                                            r"without a mask"):
        tree = record(_FoldedViews(), ["views"], batches, tmp_path / "v.zarr", layouts={"views": "batch_first"})
    assert tree["views"]["activations"].shape == (16, 4, 6)


def test_a_time_first_layer_shown_by_the_batch_s_count_with_t_a_multiple_of_n_is_made_batch_first(tmp_path):
    """A language model that transposes its DataLoader's (N, T) ids for a time-first LSTM, T = 2N: its Embedding
    (T, N, C), read by the batch's count, and a Linear on ``F.relu`` of the LSTM's output are stored datapoints
    first, with no warning."""

    class WordModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.encoder, self.rnn, self.decoder = torch.nn.Embedding(30, 8), torch.nn.LSTM(8, 6), torch.nn.Linear(6, 3)

        def forward(self, ids):  # ids (N, T)
            return self.decoder(torch.nn.functional.relu(self.rnn(self.encoder(ids.t()))[0]))

    net, ids = WordModel().eval(), torch.randint(0, 30, (8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = record(net, ["encoder", "decoder"], torch.utils.data.DataLoader(ids, batch_size=4), tmp_path / "s.zarr")
    with torch.no_grad():
        np.testing.assert_array_equal(tree["encoder"]["activations"].values, net.encoder(ids).numpy())
    assert tree["decoder"]["activations"].shape == (8, 8, 3)


def test_layouts_batch_first_keeps_a_3d_output_as_made(tmp_path):
    """'batch_first' settles a 3-d layer's order as (N, T, C), where no batch tells it (every batch of as many
    datapoints as tokens): no warning; a layer of another rank given it is an error naming it."""
    net = _SequenceFirst().eval()
    inputs = torch.randn(10, 5, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = record(net, LAYERS, loader, tmp_path / "b.zarr", layouts=dict.fromkeys(LAYERS, "batch_first"))
    with pytest.warns(RuntimeWarning, match="no batch told"):
        read = record(net, LAYERS, loader, tmp_path / "r.zarr")
    for name in LAYERS:
        np.testing.assert_array_equal(tree[name]["activations"].values, read[name]["activations"].values)
    with pytest.raises(ValueError, match=r"^layouts\['conv'\] is 'batch_first', \(N, T, C\), but its output is of "
                                         r"shape \(5, 4, 8, 8\)"):
        record(_net(), {"conv": "0"}, [torch.randn(5, 1, 8, 8)], tmp_path / "c.zarr", layouts={"conv": "batch_first"})
