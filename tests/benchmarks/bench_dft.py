"""DFT memory: peak RSS and time of cca(spatial="dft") on conv layers of (datapoints, 16, 16, 64) per side, at
several sizes (flat in datapoints), against the in-memory floor on the same data measured in the same run (the
whole spectrum and the per-frequency products of one call per frequency, numpy, every core).

Target (issue 16): peak RSS <= 600 MiB at 2000 datapoints with the default memory_limit, flat in datapoints.
Run: python tests/benchmarks/bench_dft.py [--sizes 2000 4000] [--chunk 256] [--memory-limit 1GiB]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, machine, peak_mib, report, run_case, store_for

from chunkcca.report import format_table


def case(kind: str, datapoints: int, chunk: int, memory_limit: str | None) -> None:
    import numpy as np

    import chunkcca

    tree = chunkcca.open_activations(store_for(datapoints, chunk=chunk))
    a, b = tree["model0/conv2"], tree["model1/conv2"]
    if kind == "floor":  # in memory: read both layers whole, FFT, products per frequency (float64 spectrum)
        with Timer() as timer:
            x, y = (np.fft.fftn(np.asarray(layer["activations"].data, dtype=np.float64), axes=(1, 2))
                    for layer in (a, b))
            z = np.concatenate([x, y], axis=-1).reshape(datapoints, -1, x.shape[-1] + y.shape[-1])
            z = np.moveaxis(z, 1, 0)  # (frequency, datapoint, channel)
            z -= z.mean(axis=1, keepdims=True)
            np.swapaxes(z, -1, -2) @ z.conj()
        report({"seconds": timer.seconds, "peak_mib": peak_mib()})
        return
    options = {} if memory_limit is None else {"memory_limit": memory_limit}
    with Timer() as timer:
        result = chunkcca.cca(a, b, spatial="dft", **options)
    report({"seconds": timer.seconds, "peak_mib": peak_mib(), "rho_mean": float(result["rho_mean"].mean()),
            "precision": str(result.attrs.get("precision", ""))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--memory-limit", default=None, help="memory_limit passed to cca (default: chunkcca's)")
    parser.add_argument("--case")
    parser.add_argument("--datapoints", type=int)
    args = parser.parse_args()
    if args.case:
        return case(args.case, args.datapoints, args.chunk, args.memory_limit)
    table = [("datapoints", "case", "seconds", "vs floor", "peak MiB")]
    limit = () if args.memory_limit is None else ("--memory-limit", args.memory_limit)
    for datapoints in args.sizes:
        store_for(datapoints, chunk=args.chunk)
        common = ("--datapoints", str(datapoints), "--chunk", str(args.chunk), *limit)
        floor = run_case(__file__, "floor", *common)
        ours = run_case(__file__, "chunkcca", *common)
        table.append((str(datapoints), "in-memory floor (numpy)", f"{floor['seconds']:.2f}", "1.00",
                      f"{floor['peak_mib']:.0f}"))
        table.append((str(datapoints), f"chunkcca cca dft ({ours['precision']})", f"{ours['seconds']:.2f}",
                      f"{ours['seconds'] / floor['seconds']:.2f}", f"{ours['peak_mib']:.0f}"))
    print(f"{machine()}; conv layers (datapoints, 16, 16, 64) per side, chunks of {args.chunk} datapoints, "
          f"memory_limit {args.memory_limit or 'default'}; 'vs floor' is chunkcca's time over the in-memory floor's")
    print(format_table(table))


if __name__ == "__main__":
    main()
