"""Opening a store of many chunk files: ``open_activations`` and ``describe_store`` (``chunkcca info``) with
chunkcca's listing of a local disk (``integrity.file_sizes``: ``os.scandir``) against the same calls listing through
fsspec's ``find`` and ``du`` (chunkcca's listing before 2026-12-04), measured in one run; ratio and peak memory.

A conv layer of 50,000 images in chunks of a few datapoints is tens of thousands of chunk files; opening the store
lists them all (each array's chunk files are checked before any read).

Run: python tests/benchmarks/bench_open.py [--layers 40] [--chunks 200] [--repeat 3]
(40 layers of 200 chunk files each, tiny ones: 8,000 files; the store is written once under /tmp/chunkcca-bench.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_DIR, Timer, machine, peak_mib, report, run_case

from chunkcca.report import format_table


def store_path(layers: int, chunks: int) -> Path:
    return BENCH_DIR / f"open_{layers}x{chunks}.zarr"


def write_store(layers: int, chunks: int) -> Path:
    import numpy as np

    import chunkcca

    path = store_path(layers, chunks)
    if not path.exists():
        values = np.random.default_rng(0).standard_normal((chunks * 4, 2, 2, 8)).astype(np.float32)
        chunkcca.write_activations(path, {f"net/layer{i:02d}": values for i in range(layers)}, chunks=4)
    return path


def case(kind: str, layers: int, chunks: int) -> None:
    import chunkcca
    import chunkcca.integrity as integrity
    import chunkcca.store as store

    path = store_path(layers, chunks)
    if kind == "fsspec":  # list as fsspec lists: find for every listing, du for each layer's bytes on disk
        def fsspec_sizes(fs: object, folder: str) -> dict[str, int]:
            return {name.removeprefix(folder).lstrip("/"): int(info["size"])
                    for name, info in fs.find(folder, detail=True).items()}  # type: ignore[attr-defined]
        integrity.file_sizes = fsspec_sizes
        store.file_sizes = fsspec_sizes
    chunkcca.describe_store(path)  # warm-up: imports, the page cache
    with Timer() as opened:
        chunkcca.open_activations(path)
    with Timer() as described:
        chunkcca.describe_store(path)
    report({"kind": kind, "open": opened.seconds, "describe": described.seconds, "peak_mib": peak_mib()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case")
    args = parser.parse_args()
    if args.case:
        return case(args.case, args.layers, args.chunks)
    write_store(args.layers, args.chunks)
    best: dict[str, dict] = {}
    for _ in range(args.repeat):  # the two interleaved, each case's best of the repeats
        for kind in ("fsspec", "chunkcca"):
            result = run_case(__file__, kind, "--layers", str(args.layers), "--chunks", str(args.chunks))
            if kind not in best or result["open"] + result["describe"] < best[kind]["open"] + best[kind]["describe"]:
                best[kind] = result
    print(f"{machine()}; a store of {args.layers} layers x {args.chunks} chunk files (and their metadata), warm "
          f"page cache; best of {args.repeat}")
    rows = [("listing", "open_activations s", "describe_store s", "peak MiB")]
    for kind, label in (("fsspec", "fsspec find and du"), ("chunkcca", "chunkcca (os.scandir)")):
        rows.append((label, f"{best[kind]['open']:.2f}", f"{best[kind]['describe']:.2f}",
                     f"{best[kind]['peak_mib']:.0f}"))
    print(format_table(rows))
    print(f"chunkcca / fsspec: open {best['chunkcca']['open'] / best['fsspec']['open']:.2f}, describe "
          f"{best['chunkcca']['describe'] / best['fsspec']['describe']:.2f}")


if __name__ == "__main__":
    main()
