"""A real Dask cluster: a scheduler and two workers as separate processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import correlated_layers

import chunkcca
from chunkcca import cca, compat
from chunkcca.cli import main

pytestmark = pytest.mark.cluster

pytest.importorskip("distributed")
#: The dask command of this Python's environment (a virtual environment's, not another one on the PATH).
DASK = str(Path(sys.executable).with_name("dask")) if Path(sys.executable).with_name("dask").exists() \
    else shutil.which("dask")


def _wait_for(predicate, timeout: float = 60.0, what: str = "the cluster did not come up") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _scheduler_address(scheduler_file: Path) -> str:
    """The address in a scheduler's file once it is written whole: distributed creates the file, then writes its
    JSON into it, so a file that exists may still be empty (read then, it failed with a JSONDecodeError)."""
    found: list[str] = []

    def written() -> bool:
        try:
            found.append(json.loads(scheduler_file.read_text())["address"])
        except (OSError, ValueError, KeyError):  # not there yet, or not written whole yet
            return False
        return True

    _wait_for(written)
    return found[-1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    scheduler_file = folder / "scheduler.json"
    # workers import this module to run _slow_block
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                                   ":0", "--scheduler-file", str(scheduler_file)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    address = _scheduler_address(scheduler_file)
    for _ in range(2):
        processes.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                           "--dashboard-address", ":0", "--no-nanny"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
    yield {"address": address, "workers": processes[1:]}
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def test_store_comparison_on_a_cluster_equals_local(cluster, tmp_path):
    a, b = correlated_layers(np.random.default_rng(0), 80, (6, 6, 5), (6, 6, 4))
    tree = chunkcca.write_activations(tmp_path / "s.zarr", {"m0/conv": a, "m1/conv": b}, chunks=10)
    local = chunkcca.cca(tree["m0/conv"], tree["m1/conv"], precision="float64", scheduler="threads")
    remote = chunkcca.cca(tree["m0/conv"], tree["m1/conv"], precision="float64", scheduler=cluster["address"])
    np.testing.assert_allclose(remote["rho"], local["rho"], rtol=1e-12)
    swept = chunkcca.similarity({"m0": tree["m0/conv"]}, {"m1": tree["m1/conv"]}, measures=["cka"],
                                precision="float64", scheduler=cluster["address"])
    assert float(swept["cka"].item()) == pytest.approx(float(chunkcca.cka(a, b, precision="float64")["cka"]),
                                                       rel=1e-12)


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """A store that the workers can read, its two layers and their arrays."""
    a, b = correlated_layers(np.random.default_rng(0), 80, (6, 6, 5), (6, 6, 4))
    store = tmp_path_factory.mktemp("store") / "s.zarr"
    tree = chunkcca.write_activations(store, {"m0/conv": a, "m1/conv": b}, chunks=10)
    return tree["m0/conv"], tree["m1/conv"], a, b, str(store)


def _numbers(result) -> list[np.ndarray]:
    """The numbers of any entry point's result: a Dataset's variables, Moments, a compat dict."""
    if isinstance(result, chunkcca.Moments):
        return [np.asarray(result.n), result.mean, result.scatter]
    if isinstance(result, dict):
        return [np.asarray(result[key]) for key in ("mean", "cca_coef1", "full_coef_x", "neuron_means1")]
    return [result[name].values for name in sorted(result.data_vars)]


ENTRY_POINTS = {
    "cca": lambda a, b, arrays, s: chunkcca.cca(a, b, precision="float64", scheduler=s),
    "cca dft": lambda a, b, arrays, s: chunkcca.cca(a, b, spatial="dft", precision="float64", scheduler=s),
    "cca avgpool": lambda a, b, arrays, s: chunkcca.cca(a, b, spatial="avgpool", precision="float64", scheduler=s),
    "svcca": lambda a, b, arrays, s: chunkcca.svcca(a, b, keep=0.9, precision="float64", scheduler=s),
    "pwcca": lambda a, b, arrays, s: chunkcca.pwcca(a, b, precision="float64", scheduler=s),
    "cka debiased": lambda a, b, arrays, s: chunkcca.cka(a, b, debiased=True, precision="float64", scheduler=s),
    "cka minibatch": lambda a, b, arrays, s: chunkcca.cka(a, b, minibatch=20, scheduler=s),
    "procrustes": lambda a, b, arrays, s: chunkcca.procrustes(a, b, precision="float64", scheduler=s),
    "shape_metric": lambda a, b, arrays, s: chunkcca.shape_metric(a, b, alpha=0.5, precision="float64", scheduler=s),
    "similarity": lambda a, b, arrays, s: chunkcca.similarity({"m0": a}, {"m1": b}, precision="float64",
                                                             scheduler=s),
    "compute_moments": lambda a, b, arrays, s: chunkcca.compute_moments(a, b, precision="float64", scheduler=s),
    "compat": lambda a, b, arrays, s: compat.get_cca_similarity(
        arrays[0].reshape(-1, 5).T, arrays[1].reshape(-1, 4).T, verbose=False, scheduler=s),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_runs_on_a_cluster_and_equals_local(cluster, layers, entry):
    a, b, *arrays, _ = layers
    local = _numbers(ENTRY_POINTS[entry](a, b, arrays, "threads"))
    remote = _numbers(ENTRY_POINTS[entry](a, b, arrays, cluster["address"]))
    for got, want in zip(remote, local, strict=True):
        if np.issubdtype(want.dtype, np.number):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got, want)


def test_an_auto_precision_pilot_stays_with_the_client_on_a_cluster(cluster, layers, monkeypatch):
    """precision="auto"'s pilot statistics, which the rest of a local run folds into, were put in the graph sent
    to the scheduler: a dft pilot's 64 MiB came with distributed's "Sending large graph" warning. On a cluster
    they stay with the client and are merged after; the result equals the local one."""
    from chunkcca import engine

    a, b, *_ = layers
    starts: list[object] = []
    build = engine.reduction_graph

    def recording(*args, **kwargs):
        starts.append(kwargs.get("start"))
        return build(*args, **kwargs)

    monkeypatch.setattr(engine, "reduction_graph", recording)
    for spatial in ("flatten", "dft"):
        local = chunkcca.cca(a, b, spatial=spatial, scheduler="threads")
        assert starts[-1] is not None  # locally the rest of the run folds into the pilot's statistics
        remote = chunkcca.cca(a, b, spatial=spatial, scheduler=cluster["address"])
        assert starts[-1] is None and remote.attrs["precision"] == local.attrs["precision"]
        np.testing.assert_allclose(remote["rho"], local["rho"], rtol=1e-12, atol=1e-12)


def test_workers_read_a_store_given_by_url(cluster, layers):
    *_, store = layers
    tree = chunkcca.open_activations(Path(store).as_uri())
    local = chunkcca.cka(layers[0], layers[1], precision="float64", scheduler="threads")
    remote = chunkcca.cka(tree["m0/conv"], tree["m1/conv"], precision="float64", scheduler=cluster["address"])
    assert float(remote["cka"]) == pytest.approx(float(local["cka"]), rel=1e-12)


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return sorted({library["num_threads"] for library in threadpool_info() if library["user_api"] == "blas"})


def _two_blas_threads() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=2, user_api="blas")  # not as a context: the limit stays


def test_blas_is_pinned_inside_tasks_on_workers_without_a_nanny(cluster, layers):
    """The test workers run without a nanny, which would have set OPENBLAS_NUM_THREADS=1 for them."""
    from distributed import Client

    a, b, *_ = layers
    with Client(cluster["address"], set_as_default=False) as client:
        if "chunkcca-pin-blas" in client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.worker_plugins):
            client.unregister_worker_plugin("chunkcca-pin-blas")  # registered by earlier tests' runs
        client.run(_two_blas_threads)
        assert set(map(tuple, client.run(_blas_threads).values())) == {(2,)}
        chunkcca.cca(a, b, scheduler=cluster["address"].removeprefix("tcp://"))  # host:port works too
        assert set(map(tuple, client.run(_blas_threads).values())) == {(1,)}


def test_saved_moments_and_checkpoints_load_in_the_calling_process(cluster, layers, tmp_path):
    """Checkpoints live beside the caller, which the workers may not see."""
    from distributed import Client, get_task_stream

    from chunkcca.checkpoint import load_progress

    a, b, *_ = layers
    chunkcca.compute_moments(a, b, precision="float64", checkpoint=tmp_path / "run.ckpt", scheduler="threads")
    with Client(cluster["address"]) as client, get_task_stream(client) as stream:
        loaded, done, _ = load_progress(tmp_path / "run.ckpt")
    assert stream.data == [] and done == 80 and loaded.n == 80 * 36


def test_a_checkpointed_run_on_a_cluster_equals_local(cluster, layers, tmp_path):
    a, b, *_ = layers
    local = chunkcca.compute_moments(a, b, precision="float64", scheduler="threads")
    remote = chunkcca.compute_moments(a, b, precision="float64", scheduler=cluster["address"],
                                      checkpoint=tmp_path / "run.ckpt", checkpoint_every=3)
    np.testing.assert_allclose(remote.scatter, local.scatter, rtol=1e-12)


def test_the_active_client_is_used_without_naming_it(cluster, layers):
    from distributed import Client, get_task_stream

    a, b, *_ = layers
    local = chunkcca.cca(a, b, precision="float64", scheduler="threads")
    with Client(cluster["address"]) as client:
        with get_task_stream(client) as stream:
            remote = chunkcca.cca(a, b, precision="float64")
        folds = [task for task in stream.data if "chunkcca-moments-chunk" in str(task["key"])]
        assert len(folds) == 8  # the workers read and folded each of the 8 datapoint chunks
        np.testing.assert_allclose(remote["rho"], local["rho"], rtol=1e-12)
        for name in ("synchronous", "threads"):  # Dask's settings name a local one: as dask.compute, run here
            with dask.config.set(scheduler=name), get_task_stream(client) as stream:
                here = chunkcca.cca(a, b, precision="float64")
            assert not [task for task in stream.data if "chunkcca" in str(task["key"])]
            np.testing.assert_allclose(here["rho"], local["rho"], rtol=1e-12)


def test_progress_bars_locally_and_on_a_cluster(cluster, layers, capsys):
    a, b, *_ = layers
    chunkcca.cca(a, b, progress=True)
    printed = capsys.readouterr()
    assert "(float32 products): done in" in printed.err and printed.out == ""  # stdout stays for results
    chunkcca.cca(a, b, scheduler=cluster["address"], progress=True)
    printed = capsys.readouterr()  # not a terminal: one line when done, as locally, no bar redrawn with \r
    lines = printed.err.splitlines()  # a float32 run's passes: its first datapoints in float64, then the rest
    assert f"(float32 products) on {cluster['address']}: done in " in lines[-1] and "\r" not in printed.err
    assert all(f" on {cluster['address']}: done in " in line for line in lines) and printed.out == ""
    chunkcca.cca(a, b, scheduler=cluster["address"])
    assert capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_cluster_bar_is_drawn_as_the_local_one_in_a_terminal_and_wiped_on_failure(cluster):
    from distributed import Client

    from chunkcca.cluster import ClusterProgress

    def broken(block: np.ndarray) -> np.ndarray:
        raise ValueError("a chunk failed")

    x = da.ones((40, 3), chunks=10)
    with Client(cluster["address"], set_as_default=False) as client:
        terminal = _Terminal()
        ClusterProgress(client.compute([x.sum()]), client, "reading 'x'", out=terminal)
        drawn = terminal.getvalue()
        assert drawn.startswith("\rreading 'x' on tcp") and drawn.endswith("\n")  # cut to 80 columns
        assert "] 100% | " in drawn.split("\r")[-1]
        terminal = _Terminal()
        futures = client.compute([x.map_blocks(broken, meta=np.empty((0, 0))).sum()])
        ClusterProgress(futures, client, "reading 'x'", out=terminal)
        assert terminal.getvalue().split("\r")[-1] == "", terminal.getvalue()  # the bar wiped
        with pytest.raises(ValueError, match="a chunk failed"):
            client.gather(futures)


def test_a_failed_run_on_a_cluster_leaves_its_error_the_one_line(cluster, tmp_path, capsys):
    a, b = correlated_layers(np.random.default_rng(0), 40, (4, 4, 3), (4, 4, 2))
    a[3, 1, 2, 0] = np.nan  # in the first pass (a float32 run reads its first datapoints in float64 first)
    store = tmp_path / "s.zarr"
    chunkcca.write_activations(store, {"m0/conv": a, "m1/conv": b}, chunks=10)
    assert main(["compare", str(store), "m0/conv", "m1/conv", "--scheduler", cluster["address"]]) == 2
    printed = capsys.readouterr()  # the bar said nothing: it was "reading … on tcp://…" and distributed's bar
    assert printed.err.count("\n") == 1 and "\r" not in printed.err and "NaN" in printed.err, printed.err
    assert "datapoint labelled 3;" in printed.err and printed.out == ""


def test_the_command_line_runs_on_a_cluster(cluster, layers, capsys):
    store = layers[-1]
    reports = []
    for scheduler in ("threads", cluster["address"]):
        assert main(["compare", store, "m0/conv", "m1/conv", "--measure", "mean_cca", "cka", "--precision",
                     "float64", "--json", "--scheduler", scheduler]) == 0  # with the progress bar, the default
        printed = capsys.readouterr()
        assert printed.err.count("\n") == 1 and "products)" in printed.err and "done in" in printed.err
        reports.append(json.loads(printed.out))  # the progress bar does not break the JSON
    for measure in ("mean_cca", "cka"):
        for key, value in reports[0]["results"][measure].items():
            assert reports[1]["results"][measure][key] == pytest.approx(value, rel=1e-12)


def _compare(x: np.ndarray) -> float:
    return float(chunkcca.cca(da.from_array(x, chunks=10), x[:, :3], precision="float64")["rho"][0])


def test_inside_a_worker_task_the_workers_client_computes(cluster):
    """A comparison run as a task on a worker computes on the cluster, not in a thread pool of its own."""
    from distributed import Client, get_task_stream

    x = np.random.default_rng(2).standard_normal((60, 4))
    with Client(cluster["address"], set_as_default=False) as client, get_task_stream(client) as stream:
        rho = client.submit(_compare, x).result(timeout=120)
    assert len(stream.data) > 6  # the submitted task and the comparison's (6 chunks and the merges)
    assert rho == pytest.approx(_compare(x), abs=1e-12)


def _slow_block(i: int) -> np.ndarray:
    time.sleep(0.3)
    return np.random.default_rng(i).standard_normal((20, 3))


def test_a_worker_killed_midway_still_gives_the_same_result(cluster):
    """Dask recomputes the lost worker's tasks on the other one."""
    blocks = [da.from_delayed(dask.delayed(_slow_block)(i), shape=(20, 3), dtype=float) for i in range(24)]
    a = da.concatenate(blocks)
    b = a[:, :2] * 2 + np.random.default_rng(1).standard_normal((480, 2))
    local = chunkcca.cca(a, b, precision="float64", scheduler="threads")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(chunkcca.cca, a, b, precision="float64", scheduler=cluster["address"])
        time.sleep(2.0)
        if running.done():
            running.result()  # re-raise whatever went wrong
        assert not running.done(), "the run finished before a worker could be killed"
        victim = cluster["workers"][0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        result = running.result(timeout=120)
    np.testing.assert_allclose(result["rho"], local["rho"], rtol=1e-12)


def test_local_runs_use_the_configured_scheduler_without_importing_distributed():
    """Dask's threaded scheduler by default (distributed is not imported for it); a configured one is kept."""
    code = ("import sys, numpy as np, chunkcca; x = np.random.default_rng(0).standard_normal((50, 3)); "
            "chunkcca.cca(x, x[:, :2] + x[:, 2:]); print('distributed' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

    import threading

    threads = set()

    def record_thread(block: np.ndarray) -> np.ndarray:
        threads.add(threading.get_ident())
        return block

    x = np.random.default_rng(1).standard_normal((60, 4))
    layer = da.from_array(x, chunks=10).map_blocks(record_thread)
    with dask.config.set(scheduler="synchronous"):
        chunkcca.cca(layer, x[:, :3])
    assert threads == {threading.get_ident()}
    threads.clear()
    chunkcca.cca(layer, x[:, :3])
    assert threading.get_ident() not in threads


@pytest.mark.parametrize("call", [lambda a, b: chunkcca.cca(a, b, scheduler="bogus"),
                                  lambda a, b: chunkcca.cka(a, b, minibatch=20, scheduler="bogus")])
def test_an_unknown_scheduler_is_named_before_reading(layers, call):
    a, b, *_ = layers
    with pytest.raises(ValueError, match=r"scheduler must be 'threads'.*got 'bogus'"):
        call(a, b)


def test_a_scheduler_address_is_read_as_the_command_reads_it_and_a_closed_client_is_named():
    """The API took "tcp://host:8786/" to distributed ("invalid literal for int() with base 10: '8786/'"), where
    the command drops the "/"; a closed Client gave "'NoneType' object has no attribute 'ncores'". One check
    serves both: the address is read alike, a malformed one refused before any work, a closed Client named."""
    from chunkcca.options import StreamOptions

    distributed = pytest.importorskip("distributed")
    assert StreamOptions(scheduler="tcp://127.0.0.1:8786/").scheduler == "tcp://127.0.0.1:8786"
    assert StreamOptions(scheduler="host:8786/").scheduler == "host:8786"
    with pytest.raises(ValueError, match=r"with a port from 1 to 65535"):
        StreamOptions(scheduler="tcp://host:99999")
    x = np.random.default_rng(0).standard_normal((60, 3))
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        client = distributed.Client(cluster)
        client.close()
        with pytest.raises(ValueError, match=r"the distributed.Client given as scheduler is closed"):
            cca(x, x[:, :2], scheduler=client)
        assert cluster.scheduler_address.startswith("inproc://")  # in-process: taken as it is
        np.testing.assert_allclose(cca(x, x[:, :2], scheduler=cluster.scheduler_address)["rho"], [1, 1], atol=1e-6)



def test_a_workers_address_given_as_the_scheduler_is_said_to_be_one_and_where_its_scheduler_is(tmp_path, capsys):
    """A worker's address (copied from its log line "Start worker at: tcp://…") answered the handshake, and the
    Client's first request failed in distributed's words: "cannot connect to a Dask scheduler at …: TypeError:
    Worker.identity() got an unexpected keyword argument 'n_workers'" (found by audit). The handshake asks the
    server what it is; a worker is named as one, with its scheduler's address."""
    distributed = pytest.importorskip("distributed")
    x = np.random.default_rng(0).standard_normal((60, 3))
    with distributed.LocalCluster(n_workers=1, processes=False, protocol="tcp://", host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        worker = next(iter(cluster.workers.values())).address
        said = (rf"{worker} is a Dask worker's address, not a scheduler's: its scheduler is at "
                rf"{cluster.scheduler_address}; give that")
        with pytest.raises(ValueError, match=said):
            cca(x, x[:, :2], scheduler=worker, connect_timeout=10)
        chunkcca.write_activations(tmp_path / "s.zarr", {"a": x, "b": x[:, :2]}, chunks=20)
        assert main(["compare", str(tmp_path / "s.zarr"), "a", "b", "--scheduler", worker, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"chunkcca compare: error: {worker} is a Dask worker's address") and err.count("\n") == 1
        np.testing.assert_allclose(cca(x, x[:, :2], scheduler=cluster.scheduler_address, connect_timeout=10)["rho"],
                                   [1, 1], atol=1e-6)  # the scheduler's own address connects as before


def test_same_result_on_a_distributed_client():
    distributed = pytest.importorskip("distributed")
    a, b = correlated_layers(np.random.default_rng(7), 60, (5, 6, 7), (5, 6, 5))
    local = cca(a, b, stride=2, precision="float64")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None):
        remote = cca(da.from_array(a, chunks=13), b, stride=2, precision="float64")
    np.testing.assert_allclose(remote["rho"], local["rho"], rtol=1e-12)


def test_a_scheduler_lost_mid_run_is_one_line_and_its_checkpoint_resumes(tmp_path):
    """The scheduler gone mid-run ended the command in a 41-line traceback (FutureCancelledError), exit status 1;
    now one line saying so and that the checkpoint resumes, exit status 2, once distributed has waited
    --connect-timeout for the scheduler to come back (between two parts of the run)."""
    from distributed import Client

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1200, 6))
    store = tmp_path / "s.zarr"
    chunkcca.write_activations(store, {"a": x, "b": x[:, :4] + rng.standard_normal((1200, 4))}, chunks=10)
    scheduler_file, checkpoint = tmp_path / "scheduler.json", tmp_path / "run.moments"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                                   ":0", "--scheduler-file", str(scheduler_file)], **quiet)]
    run = None
    try:
        address = _scheduler_address(scheduler_file)
        processes.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                           "--dashboard-address", ":0", "--no-nanny"], **quiet))
        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
        argv = ["compare", str(store), "a", "b", "--measure", "mean_cca", "cka", "--precision", "float64",
                "--checkpoint", str(checkpoint), "--checkpoint-every", "1", "--no-progress", "--json"]
        run = subprocess.Popen([sys.executable, "-m", "chunkcca.cli", *argv, "--scheduler", address,
                                "--connect-timeout", "2"],  # how long a lost scheduler is waited for
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(checkpoint.exists, what="the run saved no checkpoint")
        assert run.poll() is None, "the run finished before its scheduler could be killed"
        processes[0].kill()
        lost = time.monotonic()
        out, err = run.communicate(timeout=120)
        waited = time.monotonic() - lost
    finally:
        if run is not None and run.poll() is None:  # the command hung (communicate timed out): not left running
            run.kill()
            run.communicate(timeout=30)
        for process in processes:
            process.kill()
            process.wait(timeout=30)
    assert (run.returncode, out) == (2, "")
    assert err == (f"chunkcca compare: error: lost the Dask cluster at {address} during the run "
                   f"(FutureCancelledError: scheduler-connection-lost); run the same command again to resume from "
                   f"the checkpoint {checkpoint}\n") or (
        err.startswith(f"chunkcca compare: error: lost the Dask cluster at {address} during the run (")
        and err.endswith(f"); run the same command again to resume from the checkpoint {checkpoint}\n")
        and err.count("\n") == 1), err  # the connection may also be found closed (CommClosedError)
    assert waited < 8, "the command waited longer than --connect-timeout for the scheduler to come back"
    resumed = subprocess.run([sys.executable, "-m", "chunkcca.cli", *argv], capture_output=True, text=True,
                             timeout=120)  # locally
    tree = chunkcca.open_activations(store)
    want = chunkcca.compare(tree["a"], tree["b"], measures=["mean_cca", "cka"], precision="float64",
                            scheduler="threads")
    report = json.loads(resumed.stdout)
    for measure in ("mean_cca", "cka"):
        assert report["results"][measure]["value"] == pytest.approx(float(want[measure]), rel=1e-9)


def test_a_cluster_without_workers_is_warned_of_and_the_run_waits_for_one():
    """A scheduler with no workers made a run wait without a word (its connection answers, so the connect
    timeout does not fire); now a warning says so, and the run, planned for one thread, ends once a worker
    joins (as an adaptive cluster's do for the run's tasks), with the local result."""
    import threading

    from distributed import Client, LocalCluster

    a, b = correlated_layers(np.random.default_rng(3), 60, (4, 4, 5), (4, 4, 3))
    local = cca(a, b, precision="float64")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        joins = threading.Timer(1.0, cluster.scale, args=(1,))
        joins.start()
        try:
            with pytest.warns(RuntimeWarning, match=r"Dask cluster at .* has no workers: the run waits until one "
                                                     r"joins"):
                remote = cca(a, b, precision="float64", scheduler=client)
        finally:
            joins.join()
    np.testing.assert_allclose(remote["rho"], local["rho"], rtol=1e-12)


@contextlib.contextmanager
def _losing_its_worker():
    """A Client of a cluster of one worker that leaves after 0.6 s, another joining at 2.5 s."""
    import threading

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        leaves = threading.Timer(0.6, cluster.scale, args=(0,))
        joins = threading.Timer(2.5, cluster.scale, args=(1,))
        leaves.start()
        joins.start()
        try:
            yield client
        finally:
            leaves.join()
            joins.join()


def _slowly_read(layer: np.ndarray) -> da.Array:
    """``layer`` as a Dask array in chunks of 10 datapoints, each read in 0.3 s: a run long enough to lose its
    workers in."""
    import time

    def slowly(block: np.ndarray) -> np.ndarray:
        time.sleep(0.3)
        return block

    return da.from_array(layer, chunks=(10, *layer.shape[1:])).map_blocks(slowly, meta=np.empty((0,) * layer.ndim,
                                                                                                  layer.dtype))


@pytest.mark.parametrize("progress", [False, True])
def test_a_cluster_that_loses_all_its_workers_mid_run_is_warned_of_and_the_run_waits_for_one(monkeypatch, progress):
    """Every worker killed during a run left the run (and the command) waiting without a word (found by audit): a
    warning now says so, as for a cluster without workers at the start, and the run ends once one joins, with
    the local result; also under a progress bar, whose wait came first (found by review)."""


    from chunkcca import cluster as chunkcca_cluster

    monkeypatch.setattr(chunkcca_cluster, "WORKERS_LOOK_SECONDS", 0.1)
    a, b = correlated_layers(np.random.default_rng(4), 60, (4, 4, 5), (4, 4, 3))
    local = cca(a, b, precision="float64")

    with _losing_its_worker() as client, pytest.warns(RuntimeWarning, match=r"Dask cluster at .* lost all its "
                                                                            r"workers during the run: it waits until "
                                                                            r"one joins"):
        remote = cca(_slowly_read(a), b, precision="float64", scheduler=client, progress=progress)
    np.testing.assert_allclose(remote["rho"], local["rho"], rtol=1e-12)


def test_the_lost_workers_warning_names_the_users_line_and_an_error_filter_stops_the_run_after(monkeypatch):
    """Given from the watching thread, the warning named threading.py's line, and a filter making it an error
    raised it inside that thread (a traceback, the run going on in silence) (found by review): it names the user's
    line, and an error is raised in the caller's thread once the run is done."""
    import warnings

    from chunkcca import cluster as chunkcca_cluster

    monkeypatch.setattr(chunkcca_cluster, "WORKERS_LOOK_SECONDS", 0.1)
    a, b = correlated_layers(np.random.default_rng(5), 40, (4, 4, 5), (4, 4, 3))

    for error in (False, True):
        with _losing_its_worker() as client, warnings.catch_warnings(record=not error) as caught:
            warnings.simplefilter("error" if error else "always")
            if error:
                with pytest.raises(RuntimeWarning, match="lost all its workers during the run"):
                    cca(_slowly_read(a), b, precision="float64", scheduler=client)
            else:
                cca(_slowly_read(a), b, precision="float64", scheduler=client)
        if not error:
            lost = [w for w in caught if "lost all its workers" in str(w.message)]
            assert len(lost) == 1 and lost[0].filename == __file__


@pytest.mark.slow
def test_the_command_run_as_a_module_warns_of_a_cluster_without_workers_without_a_traceback(tmp_path):
    """``python -m chunkcca.cli`` against a cluster that has no workers printed a thread's traceback: the warning
    of its lost workers, given in the user's name, asked __main__'s loader for its source, which that loader
    cannot give (found by review). Both warnings are said, as they come, and the run ends once a worker joins."""
    rng = np.random.default_rng(0)
    chunkcca.write_activations(tmp_path / "s.zarr", {"a": rng.standard_normal((40, 3)),
                                                     "b": rng.standard_normal((40, 2))}, chunks=20)
    scheduler_file = tmp_path / "scheduler.json"
    processes = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                                   ":0", "--scheduler-file", str(scheduler_file)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        address = _scheduler_address(scheduler_file)
        run = subprocess.Popen([sys.executable, "-m", "chunkcca.cli", "compare", "s.zarr", "a", "b", "--no-progress",
                                "--scheduler", address], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        time.sleep(4)  # the run waits, and its look at the workers (every 2 s) finds none
        processes.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                           "--dashboard-address", ":0", "--no-nanny"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out, err = run.communicate(timeout=120)
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=15)
    assert run.returncode == 0 and "mean_cca" in out, err
    assert "Traceback" not in err, err
    assert f"chunkcca compare: warning: the Dask cluster at {address} has no workers" in err
