"""Streaming vs the floor: Moments over a zarr store against (a) only reading and decoding the same chunks
and (b) only the per-chunk products on chunks already in memory. Floor = max(a, b); issue #16's target is
chunkcca within 1.15 x max(floor, CPU bound) with a cold cache. (c) runs the same reads and folds with nothing
held back, as a measured ceiling of overlap (below).

Run: python tests/benchmarks/bench_streaming.py [--datapoints 8192] [--chunk 256] [--precision float32]
         [--compression lz4|zstd|none] [--cache cold|warm] [--repeat 3]
The table takes each case's best of the repeats; the last line also gives each repeat's own ratio (its four
cases run one after the other) and their median, since the machine's speed drifts between repeats.
(8192 datapoints = two 0.5 GiB layers; the store is written once under /tmp/chunkcca-bench.) Each case runs in a
fresh process, once to warm up and once timed. (a) runs on cores + 1 Dask threads; (b) and chunkcca on the pool
chunkcca sizes (one thread per chain and per chunk it reads ahead); zarr's decode pool has cores x READ_AHEAD
threads in every case, as the chunkcca command gives it.

``--cache cold`` (the default) drops the store from the page cache before the timed run, so chunks come from
disk, as they always do for a store larger than memory. ``--cache warm`` reads them from the page cache: then
reading is CPU work too (system calls, copies, decoding) and competes with the products for the same cores, so
the table adds the CPU bound: (CPU seconds of a + CPU seconds of b) / cores.

(c) "free-running" reads the same chunks with zarr (no Dask) in cores x READ_AHEAD threads that put them on an
unbounded queue, drained by one thread per core folding into its own accumulator (``moments.fold_rows``, as
chunkcca's chains do). Nothing waits but a fold for its chunk, so it shows how much of the CPU bound reading
through zarr-python and folding in Python threads can reach on this machine; its memory grows with the
chunks read ahead of the folds. It is a yardstick, not a design.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, evict_from_page_cache, machine, peak_mib, report, run_case, store_for

from chunkcca.options import READ_AHEAD
from chunkcca.report import format_table


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_running(path: Path, precision: str) -> None:
    """Fold the chunks of both layers in the store at ``path`` with reads free-running (see (c) above)."""
    import queue
    import threading

    import numpy as np
    import zarr
    from threadpoolctl import threadpool_limits

    from chunkcca.moments import fold_rows

    arrays = [zarr.open_array(str(path / f"model{m}/conv2/activations"), mode="r") for m in (0, 1)]
    step = arrays[0].chunks[0]
    starts = iter(range(0, arrays[0].shape[0], step))
    lock = threading.Lock()
    chunks: queue.Queue = queue.Queue()
    cores = os.cpu_count() or 1

    def read() -> None:
        while True:
            with lock:
                start = next(starts, None)
            if start is None:
                return
            chunks.put([array[start : start + step].reshape(-1, array.shape[-1]) for array in arrays])

    channels = sum(array.shape[-1] for array in arrays)
    accumulators = [np.zeros((1, channels + 2, channels)) for _ in range(cores)]

    def fold(accumulator: np.ndarray) -> None:
        while (sides := chunks.get()) is not None:
            fold_rows(accumulator, sides, precision)

    readers = [threading.Thread(target=read) for _ in range(cores * max(1, READ_AHEAD))]
    folders = [threading.Thread(target=fold, args=(accumulator,)) for accumulator in accumulators]
    with threadpool_limits(1, "blas"):
        for thread in readers + folders:
            thread.start()
        for thread in readers:
            thread.join()
        for _ in folders:
            chunks.put(None)
        for thread in folders:
            thread.join()


def case(kind: str, datapoints: int, chunk: int, precision: str, compression: str | None, cache: str) -> None:
    import dask.array as da
    import numpy as np
    from threadpoolctl import threadpool_limits

    import chunkcca

    path = store_for(datapoints, chunk=chunk, compression=compression)
    tree = chunkcca.open_activations(path)
    a, b = (tree[f"model{m}/conv2"]["activations"].data for m in (0, 1))

    def stream_moments(sides: list) -> None:  # as a user streams them: the layers' checks, budget and chains
        chunkcca.compute_moments(*sides, precision=precision)
    if kind == "read":
        # one value per pair of aligned chunks; keeping every axis spares Dask's join (a copy) of the blocks
        trivial = da.map_blocks(lambda x, y: np.zeros((1, 1, 1, 1)), a, b,
                                chunks=((1,) * a.numblocks[0], (1,), (1,), (1,)), dtype=float)

        def run() -> None:
            with threadpool_limits(1, "blas"):
                trivial.sum().compute(num_workers=(os.cpu_count() or 1) + 1)
    elif kind == "free":

        def run() -> None:
            free_running(path, precision)
    elif kind == "products":
        a_mem, b_mem = (da.from_array(x.compute(), chunks=x.chunks) for x in (a, b))

        def run() -> None:
            stream_moments([a_mem, b_mem])
    else:

        def run() -> None:
            stream_moments([a, b])
    run()  # warm-up: imports, thread pools (and the page cache, for --cache warm)
    if cache == "cold" and kind != "products":
        evict_from_page_cache(path)
    cpu = cpu_seconds()
    with Timer() as timer:
        run()
    report({"kind": kind, "seconds": timer.seconds, "cpu_seconds": cpu_seconds() - cpu, "peak_mib": peak_mib()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datapoints", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--compression", default="lz4", help="lz4, zstd or none")
    parser.add_argument("--cache", default="cold", choices=("cold", "warm"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case")
    args = parser.parse_args()
    compression = None if args.compression == "none" else args.compression
    if args.case:
        return case(args.case, args.datapoints, args.chunk, args.precision, compression, args.cache)
    store_for(args.datapoints, chunk=args.chunk, compression=compression)
    options = ("--datapoints", str(args.datapoints), "--chunk", str(args.chunk), "--precision", args.precision,
               "--compression", args.compression, "--cache", args.cache)
    best: dict[str, dict] = {}
    rounds = []  # each repeat's four cases, run one after the other
    for _ in range(args.repeat):
        rounds.append({})
        for kind in ("read", "products", "free", "chunkcca"):
            result = rounds[-1][kind] = run_case(__file__, kind, *options)
            if kind not in best or result["seconds"] < best[kind]["seconds"]:
                best[kind] = result
    cores = os.cpu_count() or 1

    def bounds(cases: dict) -> tuple[float, float]:
        """max(a, b) and the CPU bound (CPU a + CPU b) / cores of one set of cases."""
        return (max(cases["read"]["seconds"], cases["products"]["seconds"]),
                (cases["read"]["cpu_seconds"] + cases["products"]["cpu_seconds"]) / cores)

    floor, cpu_bound = bounds(best)
    gib = args.datapoints * 16 * 16 * 64 * 4 * 2 / 2**30
    print(f"{machine()}; {args.datapoints} datapoints x 2 layers (16x16x64 float32, {gib:.2f} GiB), chunk "
          f"{args.chunk}, precision {args.precision}, compression {args.compression}, {args.cache} page cache; "
          f"best of {args.repeat}")
    rows = [("case", "seconds", "CPU s", "GiB/s", "peak MiB", "vs floor")]
    for kind, label in (("read", "(a) read + decode only"), ("products", "(b) products on in-memory chunks"),
                        ("free", "(c) free-running reads and folds"),
                        ("chunkcca", "chunkcca Moments from the store")):
        seconds = best[kind]["seconds"]
        rows.append((label, f"{seconds:.2f}", f"{best[kind]['cpu_seconds']:.2f}", f"{gib / seconds:.2f}",
                     f"{best[kind]['peak_mib']:.0f}", f"{seconds / floor:.2f}"))
    print(format_table(rows))
    print(f"floor max(a, b) = {floor:.2f} s; CPU bound (CPU a + CPU b) / {cores} cores = {cpu_bound:.2f} s; "
          f"chunkcca / max(floor, CPU bound) = {best['chunkcca']['seconds'] / max(floor, cpu_bound):.2f}; "
          f"(c) / max(floor, CPU bound) = {best['free']['seconds'] / max(floor, cpu_bound):.2f}; "
          f"chunkcca / (c) = {best['chunkcca']['seconds'] / best['free']['seconds']:.2f}")
    each = sorted(cases["chunkcca"]["seconds"] / max(bounds(cases)) for cases in rounds)
    print(f"each repeat's own chunkcca / max(floor, CPU bound): {', '.join(f'{ratio:.2f}' for ratio in each)} "
          f"(median {statistics.median(each):.2f})")


if __name__ == "__main__":
    main()
