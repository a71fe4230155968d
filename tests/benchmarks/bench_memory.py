"""Memory flat in size: peak RSS of a flatten CCA over stores of about 1, 4 and 16 GiB (written once, reused).

Target: peak RSS <= 1.5 GiB at 16 GiB and within 20% across the sizes. Not for CI (over 2 GB of data).
Run: python tests/benchmarks/bench_memory.py [--sizes 1 4 16] [--chunk 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, machine, peak_mib, report, run_case, store_for

from chunkcca.report import format_table

BYTES_PER_DATAPOINT = 16 * 16 * 64 * 4 * 2  # two float32 conv2 layers


def case(datapoints: int, chunk: int) -> None:
    import chunkcca

    tree = chunkcca.open_activations(store_for(datapoints, chunk=chunk))
    with Timer() as timer:
        result = chunkcca.cca(tree["model0/conv2"], tree["model1/conv2"])
    report({"datapoints": datapoints, "rows": int(result["rows"]), "seconds": timer.seconds, "peak_mib": peak_mib(),
            "rho_mean": float(result["rho_mean"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16], help="store sizes in GiB")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the median peak is reported")
    parser.add_argument("--case", type=int)
    args = parser.parse_args()
    if args.case:
        return case(args.case, args.chunk)
    results = []
    for gib in args.sizes:
        datapoints = int(gib * 2**30 // BYTES_PER_DATAPOINT)
        store_for(datapoints, chunk=args.chunk)
        runs = sorted((run_case(__file__, str(datapoints), "--chunk", str(args.chunk)) for _ in range(args.repeat)),
                      key=lambda run: run["peak_mib"])
        results.append((gib, {**runs[len(runs) // 2], "peaks": [round(run["peak_mib"]) for run in runs]}))
    smallest = results[0][1]["peak_mib"]
    print(f"{machine()}; flatten CCA of two conv2 layers (16x16x64 float32), chunk {args.chunk} datapoints; "
          f"median of {args.repeat} runs (peak RSS varies by tens of MiB from run to run)")
    rows = [("store GiB", "datapoints", "rows", "seconds", "GiB/s", "peak RSS MiB", "all runs", "vs smallest")]
    for gib, result in results:
        rows.append((f"{gib:g}", str(result["datapoints"]), str(result["rows"]), f"{result['seconds']:.1f}",
                     f"{gib / result['seconds']:.2f}", f"{result['peak_mib']:.0f}",
                     "/".join(map(str, result["peaks"])), f"{result['peak_mib'] / smallest:.2f}"))
    print(format_table(rows))


if __name__ == "__main__":
    main()
