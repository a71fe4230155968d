"""Memory flat in size for token layers: peak RSS of a masked flatten CCA (the real tokens of both layers) and a
masked-average CCA over stores of two transformer-shaped layers (datapoint, 128 tokens, 256 channels, float32,
padded to random lengths), written once under /tmp/chunkcca-bench and reused.

Run: python tests/benchmarks/bench_tokens.py [--sizes 0.5 1 2 4] [--chunk 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_DIR, Timer, machine, peak_mib, report, run_case

from chunkcca.report import format_table

TOKENS, CHANNELS = 128, 256
BYTES_PER_DATAPOINT = TOKENS * CHANNELS * 4 * 2  # two float32 layers


def store_for(datapoints: int, chunk: int) -> Path:
    """Two token layers sharing a latent sequence, with the padding mask of lengths drawn per datapoint."""
    import dask.array as da
    import numpy as np

    import chunkcca

    path = BENCH_DIR / f"tokens_{datapoints}x{TOKENS}x{CHANNELS}_c{chunk}.zarr"
    if path.exists():
        return path
    state = da.random.RandomState(0)
    latent = state.standard_normal((datapoints, TOKENS, 32), chunks=(chunk, -1, -1)).astype("float32")
    mix = np.random.default_rng(1).standard_normal((2, 32, CHANNELS)).astype("float32")
    layers = {f"model{m}/layer": latent @ mix[m] + state.standard_normal((datapoints, TOKENS, CHANNELS),
                                                                         chunks=(chunk, -1, -1)).astype("float32")
              for m in (0, 1)}
    lengths = state.randint(8, TOKENS + 1, size=(datapoints, 1), chunks=(chunk, -1))
    mask = da.arange(TOKENS, chunks=-1)[None, :] < lengths
    chunkcca.write_activations(path, layers, masks={name: mask for name in layers}, chunks=chunk)
    return path


def case(datapoints: int, chunk: int, spatial: str) -> None:
    import chunkcca

    tree = chunkcca.open_activations(store_for(datapoints, chunk))
    with Timer() as timer:
        result = chunkcca.cca(tree["model0/layer"], tree["model1/layer"], spatial=spatial)
    report({"datapoints": datapoints, "spatial": spatial, "rows": int(result["rows"]), "seconds": timer.seconds,
            "peak_mib": peak_mib()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1, 2, 4], help="store sizes in GiB")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--case", type=int)
    parser.add_argument("--spatial", default="flatten")
    args = parser.parse_args()
    if args.case:
        return case(args.case, args.chunk, args.spatial)
    rows = [("store GiB", "datapoints", "spatial", "rows", "seconds", "peak RSS MiB", "vs smallest")]
    smallest: dict[str, float] = {}
    for gib in args.sizes:
        datapoints = int(gib * 2**30 // BYTES_PER_DATAPOINT)
        store_for(datapoints, args.chunk)
        for spatial in ("flatten", "avgpool"):
            result = run_case(__file__, str(datapoints), "--chunk", str(args.chunk), "--spatial", spatial)
            smallest.setdefault(spatial, result["peak_mib"])
            rows.append((f"{gib:g}", str(datapoints), spatial, str(result["rows"]), f"{result['seconds']:.1f}",
                         f"{result['peak_mib']:.0f}", f"{result['peak_mib'] / smallest[spatial]:.2f}"))
    print(f"{machine()}; CCA of two token layers ({TOKENS} tokens x {CHANNELS} channels float32, padded), chunk "
          f"{args.chunk} datapoints; the mask keeps the real tokens (flatten) or averages them (avgpool)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
