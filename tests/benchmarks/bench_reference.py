"""Against the in-memory reference: chunkcca streaming a zarr store vs a plain in-memory numpy computation of
the same statistics (flattened rows, centred, XᵀX; as google/svcca's np.cov does), at equal rows: np.cov in
float64 (google/svcca's route), a float32 GEMM on arrays already in memory, and the same GEMM counting the load of
the arrays from the store (where chunkcca starts too).

Shapes: the conv tutorial's (1000 x 16 x 16 x 64 per model) and a larger case (4000 x 16 x 16 x 256).
Target: not slower than the in-memory path, with a fraction of its memory.
Run: python tests/benchmarks/bench_reference.py [--cases tutorial large] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, machine, peak_mib, report, run_case, store_for

from chunkcca.report import format_table

CASES = {"tutorial": (1000, 64), "large": (4000, 256)}


def case(kind: str, name: str, chunk: int) -> None:
    import numpy as np

    import chunkcca

    datapoints, channels = CASES[name]
    path = store_for(datapoints, channels=channels, chunk=chunk)
    if kind == "chunkcca":
        tree = chunkcca.open_activations(path)
        with Timer() as timer:
            moments = chunkcca.compute_moments(tree["model0/conv2"], tree["model1/conv2"])
        rows = moments.n
    else:
        tree = chunkcca.open_activations(path)
        with Timer() as loading:
            a, b = (tree[f"model{m}/conv2"]["activations"].values for m in (0, 1))  # the in-memory starting point
        with Timer() as timer:
            rows_ab = np.concatenate([a.reshape(-1, channels), b.reshape(-1, channels)], axis=1)
            if kind == "numpy-cov":
                np.cov(rows_ab.T)  # google/svcca's route: float64
            else:
                centred = rows_ab - rows_ab.mean(axis=0)
                centred.T @ centred  # float32 GEMM
        rows = rows_ab.shape[0]
        if kind == "numpy-float32-loaded":
            timer.seconds += loading.seconds
    report({"kind": kind, "rows": int(rows), "seconds": timer.seconds, "peak_mib": peak_mib()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case")
    parser.add_argument("--name")
    args = parser.parse_args()
    if args.case:
        return case(args.case, args.name, args.chunk)
    print(f"{machine()}; chunk {args.chunk} datapoints; the numpy paths start from arrays already in memory, "
          f"but numpy-float32-loaded counts loading them from the store too, as chunkcca does; best of {args.repeat}")
    rows = [("case", "path", "rows", "seconds", "peak RSS MiB", "time vs numpy-cov", "memory vs numpy-cov")]
    for name in args.cases:
        store_for(CASES[name][0], channels=CASES[name][1], chunk=args.chunk)
        results: dict = {}
        for _ in range(args.repeat):  # interleaved, best time of each (shared machines drift)
            for kind in ("numpy-cov", "numpy-float32", "numpy-float32-loaded", "chunkcca"):
                result = run_case(__file__, kind, "--name", name, "--chunk", str(args.chunk))
                if kind not in results or result["seconds"] < results[kind]["seconds"]:
                    results[kind] = result
        base = results["numpy-cov"]
        for kind, result in results.items():
            rows.append((f"{name} {CASES[name][0]}x16x16x{CASES[name][1]}", kind, str(result["rows"]),
                         f"{result['seconds']:.2f}", f"{result['peak_mib']:.0f}",
                         f"{result['seconds'] / base['seconds']:.2f}", f"{result['peak_mib'] / base['peak_mib']:.2f}"))
    print(format_table(rows))


if __name__ == "__main__":
    main()
