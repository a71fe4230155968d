"""Wide layers (transformer widths): the per-chunk products of cca and cka at 1024 and 4096 channels per side
against the machine's float32 SYRK rate on the same rows in memory, measured in one run; the final solve's
time (O(p³)) apart, and peak RSS.

Run: python tests/benchmarks/bench_wide.py [--channels 1024 4096] [--rows 16384] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, machine, peak_mib, report, run_case

from chunkcca.report import format_table


def case(kind: str, channels: int, rows: int, chunk: int) -> None:
    import dask.array as da
    import numpy as np
    from threadpoolctl import threadpool_limits

    import chunkcca

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((rows, 64), dtype=np.float32)
    a = latent @ rng.standard_normal((64, channels), dtype=np.float32) + rng.standard_normal((rows, channels),
                                                                                             dtype=np.float32)
    b = latent @ rng.standard_normal((64, channels), dtype=np.float32) + rng.standard_normal((rows, channels),
                                                                                             dtype=np.float32)
    if kind == "syrk":  # the floor: Z^T Z of the same rows, float32, BLAS on every core, one call per chunk
        z = np.hstack([a, b])
        with threadpool_limits(None), Timer() as timer:
            for start in range(0, rows, chunk):
                block = z[start : start + chunk]
                block.T @ block
        report({"kind": kind, "seconds": timer.seconds, "peak_mib": peak_mib()})
        return
    x, y = da.from_array(a, chunks=chunk), da.from_array(b, chunks=chunk)
    with Timer() as products:
        moments = chunkcca.compute_moments(x, y, precision="float32", memory_limit="8GiB")
    with Timer() as solve:
        if kind == "cca":
            chunkcca.cca_from_moments(moments)
        else:
            chunkcca.cka_from_moments(moments)
    report({"kind": kind, "seconds": products.seconds, "solve": solve.seconds, "peak_mib": peak_mib()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--case")
    args, _ = parser.parse_known_args()
    if args.case:
        return case(args.case, args.channels[0], args.rows, args.chunk)
    table = [("channels per side", "case", "products s", "vs SYRK", "solve s", "peak MiB")]
    for channels in args.channels:
        options = ("--channels", str(channels), "--rows", str(args.rows), "--chunk", str(args.chunk))
        floor = run_case(__file__, "syrk", *options)
        table.append((str(channels), "float32 SYRK in memory", f"{floor['seconds']:.2f}", "1.00", "",
                      f"{floor['peak_mib']:.0f}"))
        for kind in ("cca", "cka"):
            result = run_case(__file__, kind, *options)
            table.append((str(channels), f"chunkcca {kind}", f"{result['seconds']:.2f}",
                          f"{floor['seconds'] / result['seconds']:.2f}", f"{result['solve']:.2f}",
                          f"{result['peak_mib']:.0f}"))
    print(f"{machine()}; {args.rows} rows, chunks of {args.chunk}; 'vs SYRK' is the SYRK time over chunkcca's "
          f"products time (1.00 = the machine's rate)")
    print(format_table(table))


if __name__ == "__main__":
    main()
