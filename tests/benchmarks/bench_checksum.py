"""What the CRC32C checksum of every chunk costs: Moments streamed from the same data in a store with checksums
(as chunkcca writes them) and in one without, measured in one run; ratio with / without and peak memory.

Run: python tests/benchmarks/bench_checksum.py [--datapoints 8192] [--chunk 256] [--compression lz4|none]
         [--cache warm|cold] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, evict_from_page_cache, machine, peak_mib, report, run_case, store_for

from chunkcca.report import format_table


def case(checksum: str, datapoints: int, chunk: int, compression: str | None, cache: str) -> None:
    import chunkcca

    path = store_for(datapoints, chunk=chunk, compression=compression, checksum=checksum == "on")
    tree = chunkcca.open_activations(path)
    a, b = tree["model0/conv2"], tree["model1/conv2"]

    def run() -> None:
        chunkcca.compute_moments(a, b, precision="float32")

    run()  # warm-up: imports, thread pools (and the page cache, for --cache warm)
    if cache == "cold":
        evict_from_page_cache(path)
    with Timer() as timer:
        run()
    report({"checksum": checksum, "seconds": timer.seconds, "peak_mib": peak_mib()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datapoints", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--compression", default="lz4", help="lz4, zstd or none")
    parser.add_argument("--cache", default="warm", choices=("cold", "warm"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case")
    args = parser.parse_args()
    compression = None if args.compression == "none" else args.compression
    if args.case:
        return case(args.case, args.datapoints, args.chunk, compression, args.cache)
    for checksum in (True, False):
        store_for(args.datapoints, chunk=args.chunk, compression=compression, checksum=checksum)
    options = ("--datapoints", str(args.datapoints), "--chunk", str(args.chunk), "--compression", args.compression,
               "--cache", args.cache)
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for checksum in ("on", "off"):
            result = run_case(__file__, checksum, *options)
            if checksum not in best or result["seconds"] < best[checksum]["seconds"]:
                best[checksum] = result
    print(f"{machine()}; {args.datapoints} datapoints x 2 layers (16x16x64 float32), chunk {args.chunk}, "
          f"compression {args.compression}, {args.cache} page cache; best of {args.repeat}")
    rows = [("store", "seconds", "peak MiB")]
    for checksum, label in (("on", "with CRC32C per chunk (chunkcca's)"), ("off", "without checksums")):
        rows.append((label, f"{best[checksum]['seconds']:.2f}", f"{best[checksum]['peak_mib']:.0f}"))
    print(format_table(rows))
    print(f"with / without = {best['on']['seconds'] / best['off']['seconds']:.2f}")


if __name__ == "__main__":
    main()
