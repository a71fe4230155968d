"""Numerical guards and errors that name their cause (issue: nothing silently wrong, items 9-17)."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import pickle
import warnings
import zipfile

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.array import PerformanceWarning
from reference import avgpool_rows, canonical_correlations, cka_reference, flatten_rows

import chunkcca
from chunkcca import cca, shape_metric
from chunkcca.cli import main
from chunkcca.compat import compute_pwcca, get_cca_similarity
from chunkcca.ingest import load_pickled_array


def _ill_conditioned_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Y = X·W + tiny noise with cond(W) ≈ 3e3: b has 10 genuine directions, one of them small."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3000, 10))
    u, _, vt = np.linalg.svd(rng.standard_normal((10, 10)))
    w = u @ np.diag(np.logspace(0, -np.log10(3e3), 10)) @ vt
    return x.astype("float32"), (x @ w + 1e-6 * rng.standard_normal((3000, 10))).astype("float32")


def test_the_default_precision_keeps_a_direction_float32_would_drop():
    """float32 products lose the smallest direction here (rank_b 9, mean rho 0.90, shape 0.32 rad: 6 of 200 seeds
    at cond(W) 1e3, every seed at 3e3); the default ('auto') takes float64 for such layers and reports the ranks
    it used in every whitening measure."""
    lost = 0
    for seed in range(8):
        x, y = _ill_conditioned_pair(seed)
        chunked = da.from_array(x, chunks=1000), da.from_array(y, chunks=1000)
        default = cca(*chunked)
        assert int(default["rank_b"]) == 10 and float(default["rho_mean"]) == pytest.approx(1.0, abs=1e-6)
        assert default.attrs["precision"] == "float64"
        shape = shape_metric(*chunked, alpha=0.0)
        # cos θ within 1e-6 of 1 (the noise): θ up to ~1.5e-3 rad; float32 products gave 0.32
        assert float(shape["shape_distance"]) < 2e-3 and int(shape["rank_b"]) == 10
        with pytest.warns(RuntimeWarning, match="ill-conditioned or rank-deficient layers"):
            lost += int(cca(*chunked, precision="float32")["rank_b"]) < 10
    assert lost == 8, "float32 really loses the direction here"


def _float32_layernorm_pair() -> tuple[np.ndarray, np.ndarray]:
    """A float32 layer and a float32 LayerNorm (with affine) of a map of it, as torch computes it: its channels
    sum to a constant, so it has one direction fewer than channels, which float32 rounding leaves at 3.5e-8 of
    the largest singular value (1.2e-15 of the largest eigenvalue)."""
    rng = np.random.default_rng(9)
    a = rng.standard_normal((30, 6, 8)).astype("float32")
    z = (a @ rng.standard_normal((8, 8)) + rng.standard_normal((30, 6, 8))).astype("float32")
    gain, bias = rng.uniform(0.5, 1.5, 8).astype("float32"), rng.uniform(-1, 1, 8).astype("float32")
    return a, (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True) * gain + bias


def test_the_rounding_of_float32_values_is_not_taken_for_a_direction(tmp_path):
    """float64 products of a float32 LayerNorm output counted its rounding-made direction in some chunkings and
    not in others (rank_b 8 or 7, rho_mean 0.6787-0.6793 or 0.6697): Moments now record their values' rounding
    (float32's eps) and the rank leaves out what it can make (eps² (1 + mean²/variance), here 1.4e-14). The
    value is that of the layer's 7 directions, computed here from the float64 rows cut to rank 7 (to 1e-8: the
    rows are float32). A genuine direction at 1e-5 (eigenvalue 1e-10) is kept."""
    a, b = _float32_layernorm_pair()
    rows_a, rows_b = a.reshape(-1, 8).astype(float), b.reshape(-1, 8).astype(float)
    u, _, _ = np.linalg.svd(rows_b - rows_b.mean(axis=0), full_matrices=False)
    want = canonical_correlations(rows_a, u[:, :7]).sum() / 8
    for chunks in (1, 3, 7, 30):
        for precision in ("float64", "auto"):
            result = cca(da.from_array(a, chunks=(chunks, -1, -1)), b, precision=precision)
            assert int(result["rank_b"]) == 7 and int(result["rank_a"]) == 8, (chunks, precision)
            assert float(result["rho_mean"]) == pytest.approx(want, abs=1e-8), (chunks, precision)
    moments = chunkcca.compute_moments(a, b, precision="float64")
    assert moments.value_rounding == (float(np.finfo(np.float32).eps),) * 2
    assert (moments + moments).value_rounding == moments.value_rounding
    moments.save(tmp_path / "m")
    assert chunkcca.Moments.load(tmp_path / "m").value_rounding == moments.value_rounding
    assert int(chunkcca.cca_from_moments(moments)["rank_b"]) == 7
    assert chunkcca.compute_moments(rows_a, rows_b).value_rounding == (0.0, 0.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 10))
    left, _, right = np.linalg.svd(rng.standard_normal((10, 10)))
    weak = (x @ left @ np.diag(np.logspace(0, -5, 10)) @ right).astype("float32")  # down to 1e-5 of the strongest
    with pytest.warns(RuntimeWarning, match="layer 'b' has a correlation matrix of condition number about 1e10"):
        assert int(cca(x.astype("float32"), weak, precision="float64")["rank_b"]) == 10  # kept, and said imprecise


def test_a_channel_known_to_few_digits_does_not_cut_the_directions_of_the_others():
    """The values' rounding was taken at its worst channel for every direction: one float32 channel of mean 100
    and spread 0.01 (a BatchNorm unit whose gain decayed), rounding at 1.4e-6 in correlation units, cut genuine
    directions of the other channels at 1e-7 and 8e-7 (ρ̄ 0.803 against 1.0). Each direction now counts the
    rounding of the channels it is made of (Σ |v|² c): the others keep their 10 directions, as float64 values do."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 10))
    left, _, right = np.linalg.svd(rng.standard_normal((10, 10)))
    weak = x @ left @ np.diag(np.logspace(0, -3.5, 10)) @ right  # eigenvalues down to 1e-7 of the strongest
    unit = 100 + 0.01 * rng.standard_normal((3000, 1))
    y = np.hstack([weak, unit])
    for values in (y.astype("float32"), y):
        result = cca(x.astype(values.dtype), values, precision="float64")
        assert int(result["rank_b"]) == 11
        assert float(result["rho_mean"]) == pytest.approx(1.0, abs=1e-6)  # b holds x: 10 correlations of 1


@pytest.mark.parametrize("scale", [1e-25, 1e-22, 1e22, 1e25])
def test_float32_data_far_from_one_keeps_every_digit(scale):
    """At 1e-25 float32 squares underflow (rho_mean was 0, every channel pruned); such chunks go float64."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 5))
    y = x[:, :3] @ rng.standard_normal((3, 4)) + 0.8 * rng.standard_normal((2000, 4))
    want = canonical_correlations(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cca((x * scale).astype("float32"), (y * scale).astype("float32"), precision="float32")
    np.testing.assert_allclose(got["rho"], want, atol=3e-6)


@pytest.mark.parametrize("chunks", [100, 37])
def test_a_tiny_channel_beside_ordinary_ones_keeps_its_variance_in_float32(chunks):
    """A channel at 1e-25 beside O(1) ones: its float32 squares underflow to 0. A chunk shorter than the shift's
    rows is shifted by its own mean, so its column sums can be exactly 0 too; that chunk's channel once counted
    as dead (no variance) while its cross-products stayed, and rho_1 came out 1.0 against 0.9975."""
    rng = np.random.default_rng(18)
    x = rng.standard_normal((1000, 4))
    y = x @ rng.standard_normal((4, 3)) + 0.3 * rng.standard_normal((1000, 3))
    want = canonical_correlations(x, y)  # CCA does not change when a channel is scaled
    x[:, 0] *= 1e-25
    for precision in ("float32", "auto"):
        got = cca(da.from_array(x, chunks=chunks), y, precision=precision)
        np.testing.assert_allclose(got["rho"], want, atol=3e-6)  # float32 products of well-conditioned data


@pytest.mark.parametrize("spatial", ["flatten", "dft"])
def test_float64_values_below_float32s_range_are_not_flushed_to_zero(spatial):
    """A float64 channel at 1e-50 is 0 once cast to float32 (its smallest value is 1.4e-45), which the products
    cannot tell from a dead channel: under "auto" the float64 pilot kept the channel and the float32 chunks
    after it lost it, ρ̄ 0.527 against 0.678, silently. A sub-block whose cast made a varying column all 0 is
    now taken in float64."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 2, 2, 5))
    y = x[..., :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((400, 2, 2, 4))
    x[..., 0] *= 1e-50
    want = cca(x, y, spatial=spatial, precision="float64")["rho"]
    if spatial == "flatten":  # CCA does not change when a channel is scaled
        np.testing.assert_allclose(want, canonical_correlations(flatten_rows(x * [1e50, 1, 1, 1, 1]),
                                                                flatten_rows(y)), atol=1e-10)
    for precision in ("float32", "auto"):
        got = cca(da.from_array(x, chunks=(50, -1, -1, -1)), y, spatial=spatial, precision=precision)
        np.testing.assert_allclose(got["rho"], want, atol=3e-6)  # float32 products of well-conditioned data


def test_auto_precision_with_a_layer_constant_in_its_first_chunk():
    """cond on an empty matrix once raised LinAlgError and ended a whole sweep."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 3))
    x[:100] = 2.0
    y = x + rng.standard_normal((400, 3))
    result = cca(da.from_array(x, chunks=100), y)
    assert result.attrs["precision"] == "float64" and "is inf" in result.attrs["precision_auto"]
    np.testing.assert_allclose(result["rho"], canonical_correlations(x, y), atol=1e-9)
    sweep = chunkcca.similarity({"x": da.from_array(x, chunks=100)}, {"y": y}, measures=["cka"])
    assert np.isfinite(sweep["cka"].item())


def test_compat_never_returns_a_correlation_above_one():
    """The reference's pinv square root gave rho = 2066.9 at epsilon=1e-10 on collinear neurons."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 300))
    acts1 = np.vstack([base, base + 1e-9 * rng.standard_normal((3, 300))])
    acts2 = rng.standard_normal((4, 300)) + base[:1]
    for epsilon in (1e-10, 1e-12):
        with pytest.raises(ValueError, match=rf"canonical correlation .* > 1 at epsilon={epsilon:g}"):
            get_cca_similarity(acts1, acts2, epsilon=epsilon, verbose=False)


def test_compat_pwcca_of_duplicate_neurons_gives_values_and_says_why():
    """A bare LinAlgError before; the reference (else-branch fixed) returns values, its dependent directions'
    weights being QR rounding noise: here they weigh 0, with a warning, and the rest follows the reference."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 300))
    acts1 = np.vstack([base, base])
    acts2 = rng.standard_normal((6, 300))
    acts2[:3] += base
    with pytest.warns(RuntimeWarning, match="2 of the 6 directions of acts1 depend on earlier ones"):
        value, weights, coefs = compute_pwcca(acts1, acts2)
    assert np.isfinite(value) and weights.sum() == pytest.approx(1.0) and (weights[-2:] == 0).all()
    assert 0 < value <= coefs.max()


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
    array = np.arange(12.0, dtype="float32").reshape(3, 4)
    with gzip.open(tmp_path / "a.p", "wb") as file:
        pickle.dump(array, file, protocol=protocol)
    np.testing.assert_array_equal(load_pickled_array(tmp_path / "a.p"), array)


def test_a_pickle_bomb_is_refused_before_it_expands(tmp_path, monkeypatch, capsys):
    """A 1.9 MB compressed pickle once expanded to 4 GB: the size it declares is checked against the memory
    available before anything is allocated."""
    import chunkcca.ingest as ingest_module

    array = np.zeros((2000, 2000))  # 32 MB of zeros, a few kB compressed
    with gzip.open(tmp_path / "bomb.p", "wb") as file:
        pickle.dump(array, file, protocol=4)
    monkeypatch.setattr(ingest_module, "_available_memory", lambda: 16 * 2**20)
    with pytest.raises(MemoryError, match="declares more data than the memory available"):
        load_pickled_array(tmp_path / "bomb.p")
    assert main(["ingest", str(tmp_path / "s.zarr"), f"x={tmp_path / 'bomb.p'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chunkcca ingest: error: out of memory") and len(err.strip().splitlines()) == 1


def test_an_npz_with_other_members_is_named(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((5, 2)))
        archive.writestr("fc.npy", buffer.getvalue())
        archive.writestr("notes.txt", "hello")
    assert main(["ingest", str(tmp_path / "s.zarr"), f"m={tmp_path / 'a.npz'}"]) == 2
    assert "holds 'notes.txt', which is not a .npy array" in capsys.readouterr().err
    np.savez(tmp_path / "empty.npz")  # it said "ingest needs at least one layer", naming no file
    assert main(["ingest", str(tmp_path / "s.zarr"), f"m={tmp_path / 'empty.npz'}"]) == 2
    assert f"{tmp_path / 'empty.npz'} holds no arrays" in capsys.readouterr().err


@pytest.mark.parametrize("scheduler", [None, "threads", "synchronous"])
def test_connect_timeout_without_an_address_to_wait_for_is_refused(scheduler):
    """It was taken and read by nothing (the run went on in this process, as if the timeout applied)."""
    x = np.random.default_rng(0).standard_normal((50, 3))
    with pytest.raises(TypeError, match=rf"connect_timeout is the wait for a scheduler given by address \(scheduler="
                                        rf"'tcp://host:port'\); with scheduler={scheduler!r} there is none"):
        cca(x, x[:, :2], scheduler=scheduler, connect_timeout=5)
    assert float(cca(x, x[:, :2], scheduler=scheduler)["rho_mean"]) == pytest.approx(1.0)


def test_an_unreachable_scheduler_fails_fast_and_says_so(capsys):
    pytest.importorskip("distributed")
    x = np.random.default_rng(0).standard_normal((50, 3))
    with pytest.raises(OSError, match=r"no Dask scheduler answered at tcp://127.0.0.1:9 within 1 s"):
        cca(x, x[:, :2], scheduler="tcp://127.0.0.1:9", connect_timeout=1)
    import socket
    import threading

    with socket.socket() as silent:  # listens and never answers, as a dashboard's port does: the Client hung
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address, failed = f"tcp://127.0.0.1:{silent.getsockname()[1]}", []

        def connect() -> None:
            try:
                cca(x, x[:, :2], scheduler=address, connect_timeout=1)
            except OSError as error:
                failed.append(error)

        run = threading.Thread(target=connect, daemon=True)
        run.start()
        run.join(30)  # not a timing: a bound on a hang
        assert failed and "no Dask scheduler answered" in str(failed[0]), "the handshake has no limit"


def test_a_scheduler_host_name_that_does_not_resolve_is_said_so_at_once(monkeypatch):
    """A host name that does not resolve was retried until the connect timeout, then said to be "no answer"
    (found by audit). The name is looked up first (here a lookup that fails, as for a name no DNS knows)."""
    pytest.importorskip("distributed")
    import socket

    def unknown(host, *args, **kwargs):
        if host == "nosuchhost.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    x = np.random.default_rng(0).standard_normal((50, 3))
    with pytest.raises(OSError, match=r"^no Dask scheduler at tcp://nosuchhost.invalid:8786: its host name "
                                      r"'nosuchhost.invalid' does not resolve \(Name or service not known\)$"):
        cca(x, x[:, :2], scheduler="tcp://nosuchhost.invalid:8786", connect_timeout=60)
    # an empty label fails in the name's encoding: it printed the lookup thread's traceback (found by review)
    with pytest.raises(OSError, match=r"its host name 'a\.\.b' does not resolve \(encoding with 'idna' codec failed"):
        cca(x, x[:, :2], scheduler="tcp://a..b:8786", connect_timeout=60)


def test_errors_that_are_not_reading_errors_are_not_called_so(tmp_path):
    """A checkpoint that cannot be written is a checkpoint error, not 'reading layers … failed'."""
    from chunkcca.checkpoint import CheckpointError

    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"a": np.random.default_rng(0).standard_normal((40, 3))})
    (tmp_path / "blocked").write_text("a file where the checkpoint would go")
    with pytest.raises(CheckpointError, match=r"is not a chunkcca checkpoint \(a file\)") as raised:
        cca(tree["a"], tree["a"], checkpoint=tmp_path / "blocked")
    assert "reading layers" not in str(raised.value)


def test_many_tiny_chunks_are_named(tmp_path):
    """In every pass (the Gram pass of spatial="features" said nothing), naming the user's line."""
    x = np.random.default_rng(0).standard_normal((300, 3))
    tiny = da.from_array(x, chunks=1)
    for call in (lambda: cca(tiny, x[:, :2] + 1), lambda: chunkcca.cka(tiny, x[:, :2] + 1, spatial="features"),
                 lambda: chunkcca.cka(tiny, x[:, :2] + 1, minibatch=50)):
        with pytest.warns(da.PerformanceWarning, match=r"layer 'a' is read in 300 chunks of 24.0 B") as caught:
            call()
        assert {record.filename for record in caught if "300 chunks" in str(record.message)} == {__file__}


def test_a_dask_array_with_chunks_of_unknown_size_is_named():
    """x[x[:, 0] > 0] has chunks of unknown size: the error was "layer 'a' has nan datapoints but layer 'b' has
    nan"."""
    x = da.from_array(np.random.default_rng(0).standard_normal((100, 3)), chunks=30)
    kept = x[:, 0] > -99
    with pytest.raises(ValueError, match=r"layer 'a' has chunks of unknown size .* call its \.compute_chunk_sizes"):
        cca(x[kept], x[kept][:, :2])


def _conv_pair(tmp_path):
    """Two conv layers of one spatial size in a store, and the store's two models (for a sweep)."""
    rng = np.random.default_rng(0)
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"m0/conv": rng.standard_normal((40, 4, 4, 3)),
                                                            "m1/conv": rng.standard_normal((40, 4, 4, 2))})
    return tree["m0/conv"], tree["m1/conv"], tree["m0"], tree["m1"]


@pytest.mark.parametrize(("call", "options", "message"), [
    ("cca", {"method": "cubic"}, r"^method applies only to spatial='interp', not spatial='flatten'"),
    ("cca", {"method": "linear"}, r"^method applies only to spatial='interp'"),  # given, though the default value
    ("cca", {"method": "cubic", "grid": "svcca"}, r"^method and grid apply only to spatial='interp'"),
    ("cca", {"spatial": "avgpool", "grid": "svcca"}, r"^grid applies only to spatial='interp', not spatial='avgpool'"),
    ("cca", {"spatial": "dft", "method": "nearest"}, r"^method applies only to spatial='interp', not spatial='dft'"),
    ("cca", {"checkpoint_every": 4}, r"^checkpoint_every applies only with checkpoint=, which is not given"),
    ("compute_moments", {"checkpoint_every": 1}, r"^checkpoint_every applies only with checkpoint="),
    ("compare", {"split_every": 4}, r"^split_every applies only to spatial='features', not spatial='flatten'"),
    ("cka", {"spatial": "avgpool", "split_every": 4}, r"^split_every applies only to spatial='features'"),
    ("similarity", {"spatial": "avgpool", "method": "nearest"}, r"^method applies only to spatial='interp'"),
])
def test_an_option_without_the_mode_that_reads_it_is_refused_naming_both(tmp_path, call, options, message):
    """method=, grid= (spatial='interp'), split_every= (spatial='features') and checkpoint_every= (checkpoint=)
    were silently ignored without their mode: cca(a, b, method='cubic') ran flatten."""
    a, b, model0, model1 = _conv_pair(tmp_path)
    pair = (model0, model1) if call == "similarity" else (a, b)
    with pytest.raises(TypeError, match=message):
        getattr(chunkcca, call)(*pair, **options)


def test_options_with_their_mode_are_kept_and_left_out_take_their_defaults(tmp_path):
    from_kwargs = chunkcca.options.StreamOptions.from_kwargs
    with pytest.raises(TypeError, match=r"^method and grid apply only to spatial='interp'"):
        from_kwargs("cca", {"method": "nearest", "grid": "svcca"})
    given = from_kwargs("cca", {"spatial": "interp", "method": "nearest", "grid": "svcca"})
    assert (given.method, given.grid, given.split_every, given.checkpoint_every) == ("nearest", "svcca", 8, 16)
    default = from_kwargs("cca", {})
    assert (default.method, default.grid, default.split_every, default.checkpoint_every) == ("linear", "coords", 8, 16)
    assert from_kwargs("cka", {"spatial": "features", "split_every": 3}).split_every == 3
    assert from_kwargs("cka", {"split_every": 3, "minibatch": 8}).split_every == 3  # minibatch CKA reads it
    with pytest.raises(TypeError, match=r"^split_every applies only to spatial='features' \(or to minibatch CKA, "
                                        r"cka\(\.\.\., minibatch=N\)\), not spatial='flatten'"):
        from_kwargs("cka", {"split_every": 3, "minibatch": None})  # the message left minibatch out
    with pytest.raises(TypeError, match=r"^split_every applies only to spatial='features', not"):
        from_kwargs("cca", {"split_every": 3})  # cca() has no minibatch
    run = from_kwargs("cca", {"checkpoint": tmp_path / "run.ckpt", "checkpoint_every": 3})
    assert run.checkpoint_every == 3
    assert dataclasses.replace(default, stride=2).stride == 2, "options are plain dataclasses"
    a, b, _, _ = _conv_pair(tmp_path)
    assert chunkcca.cka(a, b, minibatch=10, spatial="avgpool", split_every=4)["cka"].size == 1


@pytest.mark.parametrize("call", ["cca", "compare", "compute_moments", "svcca", "pwcca", "procrustes",
                                  "shape_metric"])
def test_minibatch_is_refused_where_there_is_no_minibatch_cka(tmp_path, call):
    """minibatch is a streaming option (StreamOptions.minibatch) that only cka() and similarity() read: the other
    functions refuse it by name (it must never reach one that would give the full-data measure in its place), and
    say where minibatch CKA is; their list of streaming options does not offer it."""
    a, b, _, _ = _conv_pair(tmp_path)
    with pytest.raises(TypeError, match=rf"^{call}\(\) got unexpected keyword argument 'minibatch'; its streaming "
                                        r"options are .*; minibatch CKA is cka\(a, b, minibatch=N\)"):
        getattr(chunkcca, call)(a, b, minibatch=16)
    with pytest.raises(TypeError) as unknown:  # and its list of streaming options does not offer it
        getattr(chunkcca, call)(a, b, bogus=1)
    assert "minibatch" not in str(unknown.value)


def test_minibatch_is_checked_once_with_the_streaming_options():
    """minibatch is validated where every streaming option is (StreamOptions), before any layer is read: its size,
    and the row rules it needs (no rows omitted, one set of rows rather than one per frequency)."""
    options = chunkcca.options.StreamOptions
    assert options(minibatch=np.int64(16)).minibatch == 16 and type(options(minibatch=16).minibatch) is int
    assert options("flatten", 1, "auto", "linear", "coords", "raise", 6).split_every == 6, "fields keep their places"
    assert options("flatten", 1, "auto", "linear", "coords", "raise", 6).minibatch is None
    for bad in (3, 0, 4.0, True, "8"):
        with pytest.raises(ValueError, match=r"^minibatch must be an integer >= 4 \(the unbiased HSIC needs 4 rows\)"):
            options(minibatch=bad)
    with pytest.raises(ValueError, match=r"^minibatch CKA cannot omit rows"):
        options(minibatch=8, nan_policy="omit")
    with pytest.raises(ValueError, match=r"^minibatch CKA does not work per spatial frequency"):
        options(minibatch=8, spatial="dft")
    with pytest.raises(TypeError, match=r"^folds, precision do not apply to minibatch CKA"):
        options.from_kwargs("similarity", {"minibatch": 8, "precision": "float64", "folds": 2})


def test_the_cli_refuses_checkpoint_every_without_checkpoint(tmp_path, capsys):
    """chunkcca compare passes its --checkpoint-every default whether or not --checkpoint is given; another value
    without --checkpoint is an error, not ignored."""
    _conv_pair(tmp_path)
    store = str(tmp_path / "s.zarr")
    assert main(["compare", store, "m0/conv", "m1/conv", "--no-progress", "--checkpoint-every", "4"]) == 2
    assert "--checkpoint-every applies only with --checkpoint, which is not given" in capsys.readouterr().err
    assert main(["compare", store, "m0/conv", "m1/conv", "--no-progress"]) == 0


@pytest.mark.parametrize("call", [
    lambda store, x: chunkcca.cka(x, x, debiased="no"),
    lambda store, x: chunkcca.cka_from_moments(chunkcca.compute_moments(x, x), debiased="no"),
    lambda store, x: chunkcca.compute_moments(x, x, row_norms="no"),
    lambda store, x: chunkcca.cca(x, x, progress="no"),
    lambda store, x: chunkcca.write_activations(store, {"a": x}, overwrite="no"),
    lambda store, x: chunkcca.write_activations(store.with_name("new.zarr"), {"a": x}, progress="no"),
    lambda store, x: chunkcca.compute_moments(x, x).save(store.with_name("m.zarr"), overwrite="no"),
    lambda store, x: chunkcca.save_result(chunkcca.cka(x, x), store.with_name("r.nc"), overwrite=1),
])
def test_a_flag_that_is_not_a_bool_is_refused(tmp_path, call):
    """``debiased="no"`` computed the debiased CKA and ``overwrite="no"`` replaced a store: a flag is True or
    False (numpy's bools too), else a ValueError naming it, before any work."""
    x = np.random.default_rng(0).standard_normal((40, 3))
    store = tmp_path / "s.zarr"
    chunkcca.write_activations(store, {"a": x})
    before = sorted(path.stat().st_mtime_ns for path in store.rglob("*"))
    with pytest.raises(ValueError, match=r"must be True or False, got"):
        call(store, x)
    assert sorted(path.stat().st_mtime_ns for path in store.rglob("*")) == before
    assert not {"new.zarr", "m.zarr", "r.nc"} & {path.name for path in tmp_path.iterdir()}
    assert float(chunkcca.cka(x, x, debiased=np.True_)["cka"]) == pytest.approx(1.0)


def test_a_dask_block_of_another_shape_than_declared_is_an_error_naming_the_layer():
    """A loader's short batch behind ``da.from_delayed`` (90 rows declared as 100) was paired with the other
    layer's rows by position: CKA 0.593 for 0.587, silently (and 0.019 for map_blocks halving every block)."""
    import dask

    rng = np.random.default_rng(8)
    x = rng.standard_normal((300, 5))
    y = x[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((300, 4))
    load = dask.delayed(lambda i, rows, channels: x[i * 100 : i * 100 + rows, :channels])
    short = da.concatenate([da.from_delayed(load(i, 90 if i == 1 else 100, 5), shape=(100, 5), dtype=float)
                            for i in range(3)])
    narrow = da.concatenate([da.from_delayed(load(i, 100, 4), shape=(100, 5), dtype=float) for i in range(3)])
    halved = da.from_array(x, chunks=100).map_blocks(lambda block: block[::2], dtype=float)
    runs = [lambda a: cca(a, y), lambda a: chunkcca.cka(a, y, debiased=True),
            lambda a: chunkcca.cka(a, y, spatial="features"), lambda a: chunkcca.cka(a, y, minibatch=20),
            lambda a: chunkcca.compare(a, y, measures=["cka"], folds=3)]
    for run in runs:
        with pytest.raises(ValueError, match=r"layer 'a': the block of its Dask array for datapoints 100 to 199 has "
                                             r"shape \(90, 5\), where the array declares \(100, 5\)"):
            run(short)
    with pytest.raises(ValueError, match=r"layer 'b': the block of its Dask array for datapoints 0 to 99 has shape "
                                         r"\(100, 4\), where the array declares \(100, 5\)"):
        cca(y, narrow)
    with pytest.raises(ValueError, match=r"layer 'a': the block .* has shape \(50, 5\), where the array declares "
                                         r"\(100, 5\)"):
        chunkcca.cka(halved, y)
    # a padding mask's blocks, checked before the pass (it said "operands could not be broadcast together")
    short_mask = da.from_array(np.ones((300, 4), bool), chunks=100).map_blocks(lambda block: block[:-1], dtype=bool)
    tokens = xr.DataArray(x[:, None, :].repeat(4, axis=1), dims=("datapoint", "token", "channel"), name="a",
                          coords={"mask": (("datapoint", "token"), short_mask)})
    with pytest.raises(ValueError, match=r"layer 'a': the block of its padding mask for datapoints \d+ to \d+ has "
                                         r"shape \(\d+, 4\), where the array declares"):
        chunkcca.cka(tokens, y, spatial="avgpool")


def test_a_dask_block_of_another_kind_than_declared_is_an_error_naming_the_layer():
    """A complex block declared float64 (``map_blocks`` without ``dtype=``) lost its imaginary part under avgpool
    (CKA 0.0143, silently) and stopped in numpy's casting rules under flatten; a masked block's mask was ignored
    (0.00471, the unmasked value); string, list and matrix blocks stopped in numpy, naming no layer. Blocks whose
    values cast within their kind (float32 or ints declared float64), and masked ones with nothing masked (a
    netCDF4 variable's), are read as before."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((300, 2, 2, 5))
    y = x[..., :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((300, 2, 2, 4))
    blocks = da.from_array(x, chunks=100)
    wrong = {"has dtype complex128, where the array declares float64: its values would be cast \\(its imaginary":
             blocks.map_blocks(lambda block: block + 1j * block, dtype=float),
             "has dtype <U32, where the array declares float64": blocks.map_blocks(lambda block: block.astype(str),
                                                                                     dtype=float),
             "is a masked array, whose mask would be ignored": blocks.map_blocks(
                 lambda block: np.ma.masked_greater(block, 1.0), dtype=float, meta=np.empty((0, 0, 0, 0))),
             "is a builtins.list, where a numpy array is declared": blocks.map_blocks(
                 lambda block: block.tolist(), dtype=float, meta=np.empty((0, 0, 0, 0)))}
    runs = [lambda a: cca(a, y), lambda a: chunkcca.cka(a, y, spatial="avgpool"),
            lambda a: chunkcca.cka(a, y, spatial="features"), lambda a: chunkcca.cka(a, y, minibatch=20),
            lambda a: chunkcca.similarity({"a": a}, {"y": y}, measures=["cka"])]
    for message, layer in wrong.items():
        for run in runs:
            with pytest.raises(TypeError, match=r"layer 'a': the block of its Dask array for datapoints \d+ to \d+ "
                                                + message):
                run(layer)
    mask = xr.DataArray(np.ones((300, 2, 2), bool), dims=("datapoint", "height", "width")).chunk(100)
    ones = mask.copy(data=mask.data.map_blocks(lambda block: block.astype(np.int8), dtype=bool))
    padded = xr.DataArray(x, dims=("datapoint", "height", "width", "channel")).assign_coords(mask=ones)
    with pytest.raises(TypeError, match=r"layer 'a': the block of its padding mask for datapoints \d+ to \d+ has dtype "
                                        r"int8, where the array declares bool"):
        chunkcca.cka(padded, y)
    unmasked = blocks.map_blocks(np.ma.masked_array, dtype=float, meta=np.ma.masked_array(np.empty((0, 0, 0, 0))))
    assert float(chunkcca.cka(unmasked, y, spatial="avgpool")["cka"]) == float(
        chunkcca.cka(blocks, y, spatial="avgpool")["cka"])  # nothing masked: read as the plain blocks
    counts = blocks.map_blocks(lambda block: np.rint(block * 100).astype(np.int64), dtype=float)
    rounded = blocks.map_blocks(lambda block: np.rint(block * 100), dtype=float)
    assert float(chunkcca.cka(counts, y, spatial="avgpool")["cka"]) == float(
        chunkcca.cka(rounded, y, spatial="avgpool")["cka"])  # integers: the same values, exact


def test_a_dask_block_coarser_than_its_declared_float_dtype_is_an_error_naming_the_layer():
    """float16 blocks declared float32 (``da.from_delayed`` of a half-precision loader) were solved at float32's
    rounding floor: a float16 LayerNorm output's exact null direction, rounded, counted as a real direction (rank 16
    for 15, coefficients on noise). Blocks coarser than declared are refused naming the layer, the datapoints and
    both dtypes; blocks cast to the declared dtype are measured as exact, as ``.astype`` says."""
    rng = np.random.default_rng(9)
    z = rng.standard_normal((400, 16))
    z = (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True) + rng.normal(0, 30, 16)  # a LayerNorm's, offset
    y = z[:, :6] @ rng.standard_normal((6, 5)) + rng.standard_normal((400, 5))
    blocks = da.from_array(z.astype(np.float16), chunks=100)
    for coarse, declared in ((np.float16, np.float32), (np.float16, float), (np.float32, float)):
        lying = blocks.map_blocks(lambda block, kind=coarse: block.astype(kind), dtype=declared)
        coarse, declared = np.dtype(coarse), np.dtype(declared)
        for run in (lambda a: cca(a, y), lambda a: chunkcca.cka(a, y), lambda a: chunkcca.cka(a, y, minibatch=50),
                    lambda a: chunkcca.similarity({"a": a}, {"y": y}, measures=["mean_cca"])):
            message = (rf"layer 'a': the block of its Dask array for datapoints \d+ to \d+ has dtype {coarse}, where "
                       rf"the array declares {declared}: its values carry {coarse}'s rounding")
            with pytest.raises(TypeError, match=message):
                run(lying)
    with pytest.raises(TypeError, match="has dtype complex64, where the array declares complex128"):  # complex too
        chunkcca.engine.as_declared(np.zeros((2, 3), np.complex64), (2, 3), np.dtype(np.complex128), "a", 0)
    half = cca(blocks, y)  # declared float16: cut at float16's rounding, the null direction with it
    assert int(half["rank_a"]) == 15
    exact = cca(blocks.map_blocks(lambda block: block.astype(float), dtype=float), y)  # cast: taken as exact
    assert int(exact["rank_a"]) == 16


def test_empty_dask_chunks_are_no_rows():
    """``x[keep].compute_chunk_sizes()``, the remedy chunkcca gives for unknown chunks, leaves empty chunks where
    ``keep`` kept nothing: avgpool, first, last and features stopped inside a task ("cannot reshape array of
    size 0"), naming no layer."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((400, 2, 2, 5))
    y = x[..., :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((400, 2, 2, 4))
    keep = np.ones(400, bool)
    keep[100:200] = False
    kept = da.from_array(keep, chunks=100)
    a, b = (da.from_array(side, chunks=(100, 2, 2, side.shape[-1]))[kept].compute_chunk_sizes() for side in (x, y))
    assert a.chunks[0] == (100, 0, 100, 100)
    x, y = x[keep], y[keep]
    tolerance = 1e-12  # float64 products of 300 rows: summation order only
    got = chunkcca.cka(a, b, spatial="avgpool", precision="float64")
    assert float(got["cka"]) == pytest.approx(cka_reference(avgpool_rows(x), avgpool_rows(y), False), abs=tolerance)
    got = chunkcca.cka(a, b, spatial="features", precision="float64")
    want = cka_reference(x.reshape(300, -1), y.reshape(300, -1), False)
    assert float(got["cka"]) == pytest.approx(want, abs=tolerance)
    got = cca(a, b, spatial="last", precision="float64")  # the last position, (1, 1)
    np.testing.assert_allclose(got["rho"], canonical_correlations(x[:, 1, 1], y[:, 1, 1]), atol=tolerance)
    assert int(got["rows"]) == 300


def test_datapoint_labels_without_an_index_are_the_labels():
    """A datapoint coordinate whose index was dropped (``drop_indexes``) stopped with a bare KeyError
    'datapoint', naming no layer; its labels now align the layers, and repeated ones are refused."""
    import xarray as xr

    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, 3))
    y = x @ rng.standard_normal((3, 3)) + 0.5 * rng.standard_normal((50, 3))
    labels = np.arange(50)
    a = xr.DataArray(x[::-1], dims=("datapoint", "channel"), coords={"datapoint": labels[::-1]})
    b = xr.DataArray(y, dims=("datapoint", "channel"), coords={"datapoint": labels})
    with pytest.warns(PerformanceWarning, match="layer 'b' holds the datapoints of layer 'a' in another order"):
        got = chunkcca.cka(a.drop_indexes("datapoint"), b, precision="float64")
    assert float(got["cka"]) == pytest.approx(cka_reference(x, y, False), abs=1e-12)
    repeated = a.assign_coords(datapoint=np.zeros(50)).drop_indexes("datapoint")
    with pytest.raises(ValueError, match=r"layer 'a' has repeated datapoint labels, e.g. \[0.0\]"):
        chunkcca.cka(repeated, b)


def test_a_server_of_another_protocol_or_a_protocol_not_installed_is_named_as_such():
    """An HTTP server's port (a dashboard, a proxy) said "MemoryError: Unable to allocate 3.07 EiB", and ucx://
    "TypeError: Can't instantiate abstract class UCXConnector"."""
    pytest.importorskip("distributed")
    import socket
    import threading

    x = np.random.default_rng(0).standard_normal((50, 3))
    with socket.socket() as http:
        http.bind(("127.0.0.1", 0))
        http.listen()

        def answer() -> None:
            with contextlib.suppress(OSError):
                while True:
                    connection, _ = http.accept()
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(ValueError, match=r"does not answer as a Dask scheduler: the server there speaks another "
                                             r"protocol .*an HTTP server"):
            cca(x, x[:, :2], scheduler=f"tcp://127.0.0.1:{http.getsockname()[1]}", connect_timeout=5)
    try:
        import distributed_ucxx  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"ucx://127.0.0.1:1: its protocol is not installed for distributed"):
            cca(x, x[:, :2], scheduler="ucx://127.0.0.1:1", connect_timeout=5)


def test_torch_tensors_are_read_as_the_arrays_they_share_or_refused_with_the_copy_to_make():
    """A tensor requiring grad failed in torch's words ("Can't call numpy() on Tensor that requires grad"), a
    bfloat16 one in numpy's ("Got unsupported ScalarType BFloat16"), naming no layer (found by audit)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)).astype("float32")
    y = (x @ rng.standard_normal((6, 4))).astype("float32")
    tracked = torch.from_numpy(x).requires_grad_(True) * 1
    assert float(chunkcca.cka(tracked, y)["cka"]) == pytest.approx(cka_reference(x, y, False), abs=1e-6)
    with pytest.raises(TypeError, match=r"layer 'a' is a bfloat16 tensor, a type numpy lacks: pass tensor.float\(\)"):
        chunkcca.cka(torch.from_numpy(x).bfloat16(), y)


def test_an_axis_name_given_twice_is_refused_naming_the_layer():
    """dims=('datapoint', 'height', 'height', 'channel') measured a square map (with xarray's warning) and failed
    in xarray's words on another ("conflicting sizes for dimension 'height'") (found by audit)."""
    x = np.ones((20, 2, 3, 4))
    for layer in (x, x[:, :, :2]):
        with pytest.raises(ValueError, match=r"layer 'a': its dims \('datapoint', 'height', 'height', 'channel'\) "
                                             r"name 'height' twice; give each axis its own name"):
            cca(layer, np.ones((20, 3)), dims=("datapoint", "height", "height", "channel"))


def test_statistics_that_overflow_name_the_layer():
    """Values whose squares overflow float64 (1e200) were refused without naming the layer (found by audit)."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((100, 3)), rng.standard_normal((100, 2))
    with pytest.raises(ValueError, match=r"^layer 'big': the statistics hold NaN or Inf"):
        cca(xr.DataArray(x * 1e200, dims=("datapoint", "channel"), name="big"), y, precision="float64")
    with pytest.raises(ValueError, match=r"^side b: the statistics hold NaN or Inf"):
        chunkcca.cca_from_moments(chunkcca.compute_moments(x, y * 1e200, precision="float64"))


def test_labels_of_mixed_kinds_are_refused_before_writing_naming_the_layer(tmp_path):
    """Datapoint labels mixing numbers and text (which cca takes) failed to write in xarray's words ("unable to
    infer dtype on variable None") (found by audit)."""
    labels = np.array([i if i % 2 else f"s{i}" for i in range(20)], dtype=object)
    layer = xr.DataArray(np.ones((20, 3)), dims=("datapoint", "channel"), coords={"datapoint": labels})
    with pytest.raises(TypeError, match=r"layer 'fc': its 'datapoint' labels mix numbers and text, which a store "
                                        r"cannot hold in one array; make them one kind"):
        chunkcca.write_activations(tmp_path / "s.zarr", {"fc": layer})
    assert not (tmp_path / "s.zarr").exists()
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"fc": layer.assign_coords(datapoint=labels.astype(str))})
    assert list(tree["fc"]["datapoint"].values) == [str(label) for label in labels]


def test_arguments_that_must_be_mappings_or_names_say_so(tmp_path):
    """Found by audit: an array, list or text where a mapping belongs failed deep in numpy or pandas ("The truth
    value of an array … is ambiguous"), quoting the whole array, or as "'list' object has no attribute 'items'";
    layer_paths of a path or a layer as "has no attribute 'data_vars'"; cca_from_moments' batch_dims named twice
    or as a result's own dim failed in xarray after every frequency was solved, and "hw" was taken as ("h", "w")."""
    from chunkcca.ingest import ingest

    values = np.random.default_rng(0).standard_normal((40, 4))
    np.save(tmp_path / "a.npy", values)
    for call, message in (
            (lambda: chunkcca.write_activations(tmp_path / "s.zarr", values), "layers must be a mapping of layer path "
                                                                            "to array (a dict), got a ndarray"),
            (lambda: chunkcca.write_activations(tmp_path / "s.zarr", {"x": values}, masks=[values > 0]),
             "masks must be a mapping of layer path to mask (a dict), got a list"),
            (lambda: chunkcca.write_activations(tmp_path / "s.zarr", {"x": values}, coords=np.arange(40)),
             "coords must be a mapping of coordinate name to one value per datapoint"),
            (lambda: ingest(tmp_path / "s.zarr", str(tmp_path / "a.npy")), "sources must be a mapping of layer path "
                                                                           "to file (a dict), got a str"),
            (lambda: ingest(tmp_path / "s.zarr", {"x": tmp_path / "a.npy"}, masks=[tmp_path / "a.npy"]),
             "masks must be a mapping of layer path to mask file (a dict), got a list"),
            (lambda: ingest(tmp_path / "s.zarr", {"x": tmp_path / "a.npy"}, coords=np.arange(40)),
             "coords must be a mapping of coordinate name to file or values (a dict), got a ndarray"),
            (lambda: chunkcca.layer_paths(str(tmp_path / "s.zarr")), "layer_paths lists the layers of an opened "
                                                                     "store .* got a str; open it first")):
        with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert not (tmp_path / "s.zarr").exists()
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((30, 4, 4, 3))
    moments = chunkcca.compute_moments(maps, maps @ rng.standard_normal((3, 2)), spatial="dft")
    for dims, error in ((("h", "h"), ValueError), (("component", "w"), ValueError), ("hw", TypeError)):
        with pytest.raises(error, match="batch_dims must"):
            chunkcca.cca_from_moments(moments, batch_dims=dims)
    assert chunkcca.cca_from_moments(moments, batch_dims=("h", "w"))["rho"].dims == ("h", "w", "component")
    torch = pytest.importorskip("torch", reason="torch (the optional 'torch' extra) is not installed")  # last
    from chunkcca.record import record

    for given, message in (({"coords": np.arange(40)}, "coords must be a mapping of coordinate name to one value"),
                           ({"layouts": ["channels_last"]}, "layouts must be a mapping of layer path to layout")):
        with pytest.raises(TypeError, match=message):
            record(torch.nn.Linear(4, 2), {"fc": ""}, [torch.ones(3, 4)], tmp_path / "r.zarr", **given)


def test_a_scheduler_or_worker_count_dask_cannot_use_in_its_settings_is_named(tmp_path, capsys):
    """``DASK_SCHEDULER=bogus`` failed in Dask's words ("Expected one of [distributed, …]") and
    ``DASK_NUM_WORKERS=abc`` as "invalid literal for int() with base 10: 'abc'", naming no setting (found by
    audit): each is refused before any work, naming the setting and where it comes from."""
    import dask

    x = np.random.default_rng(0).standard_normal((30, 3))
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": x, "b": x[:, :2]})
    for setting, said in (({"scheduler": "bogus"}, r"Dask's settings give scheduler='bogus' \(DASK_SCHEDULER or a "
                                                   r"Dask config file\), which is none of Dask's schedulers"),
                          ({"num_workers": "abc"}, r"Dask's settings give num_workers='abc' \(DASK_NUM_WORKERS or a "
                                                   r"Dask config file\), not a number of workers")):
        with dask.config.set(setting):
            with pytest.raises(ValueError, match=said):
                cca(x, x[:, :2])
            assert main(["compare", str(tmp_path / "s.zarr"), "a", "b", "--no-progress"]) == 2
            assert capsys.readouterr().err.count("\n") == 1
    with dask.config.set(num_workers=1):  # a usable setting is used as before
        assert float(cca(x, x[:, :2], precision="float64")["rho_mean"]) == pytest.approx(1.0, abs=1e-12)


def test_zarr_thread_or_concurrency_settings_zarr_cannot_use_are_named(tmp_path, capsys):
    """``ZARR_THREADING__MAX_WORKERS=0`` said a sound store's label array could not be read ("max_workers must be
    greater than 0") with a RuntimeWarning after it, and ``ZARR_ASYNC__CONCURRENCY=0`` hung every read (found by
    audit): both are refused before a store is opened or written, naming the setting."""
    import zarr

    chunkcca.write_activations(tmp_path / "s.zarr", {"a": np.ones((10, 2))})
    for key, value in (("threading.max_workers", 0), ("async.concurrency", 0), ("threading.max_workers", "abc")):
        with zarr.config.set({key: value}):
            with pytest.raises(ValueError, match=rf"zarr's settings give {key}={value!r} \(ZARR_"):
                chunkcca.open_activations(tmp_path / "s.zarr")
            with pytest.raises(ValueError, match=rf"zarr's settings give {key}="):
                chunkcca.write_activations(tmp_path / "t.zarr", {"a": np.ones((10, 2))})
            assert main(["info", str(tmp_path / "s.zarr")]) == 2
            assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "t.zarr").exists()
