"""Whole-network sweeps in little memory: similarity(..., measures=["cka"], spatial="avgpool") over two
ResNet-18-shaped CNNs (random init, 32x32 inputs, recorded with chunkcca.record), at several input counts (flat in
inputs), against numpy on the same pooled rows in memory (measured in the same run).

Two jobs: the 10 layers of each model from the stem to the fc (bench_network.py's store), and all 20 conv layers of
each model (3x3 convs and 1x1 shortcuts, their outputs before batch norm). Targets (issue 16): <= 1 GB for the
first at 1000 inputs, <= 1.5 GB for the second.
Run: python tests/benchmarks/bench_sweep.py [--inputs 1000 2000] [--jobs blocks convs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_DIR, Timer, machine, peak_mib, report, run_case

from chunkcca.report import format_table

#: Store name → module of the 20 conv layers of a CIFAR ResNet-18 (bench_network.make_model).
CONVS = {"stem": "stem.0", **{f"layer{stage}_{block}_conv{k}": f"layer{stage}.{block}.conv{k}"
                              for stage in range(1, 5) for block in (0, 1) for k in (1, 2)},
         **{f"layer{stage}_0_shortcut": f"layer{stage}.0.shortcut.0" for stage in (2, 3, 4)}}


def conv_store(inputs: int) -> Path:
    """Both models' 20 conv layers over ``inputs`` images, written once."""
    path = BENCH_DIR / f"resnet18x2_convs_{inputs}x32x32.zarr"
    if not path.exists():
        import torch
        from bench_network import make_inputs, make_model

        from chunkcca.record import record

        torch.set_grad_enabled(False)
        images = make_inputs(inputs)
        for seed in (0, 1):
            record(make_model(seed), {f"model{seed}/{name}": module for name, module in CONVS.items()},
                   images.split(250), path, mode="w" if seed == 0 else "a", overwrite=seed == 0)
    return path


def layer_sets(job: str, inputs: int) -> list[dict[str, Any]]:
    import chunkcca

    if job == "blocks":
        from bench_network import layer_sets as block_sets

        return block_sets(inputs)
    tree = chunkcca.open_activations(conv_store(inputs))
    return [{name: tree[f"model{seed}/{name}"]["activations"] for name in CONVS} for seed in (0, 1)]


def case(kind: str, job: str, inputs: int) -> None:
    import numpy as np

    import chunkcca

    a, b = layer_sets(job, inputs)
    if kind == "numpy":  # in memory: each layer's pooled rows, then every pair's linear CKA
        with Timer() as timer:
            pooled = [[np.asarray(layer.data.mean(axis=tuple(range(1, layer.ndim - 1)), dtype=np.float64))
                       for layer in side.values()] for side in (a, b)]
            centred = [[x - x.mean(axis=0) for x in side] for side in pooled]
            values = np.array([[np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
                                for y in centred[1]] for x in centred[0]])
        report({"seconds": timer.seconds, "peak_mib": peak_mib(), "cka": values.tolist()})
        return
    with Timer() as timer:
        result = chunkcca.similarity(a, b, measures=["cka"], spatial="avgpool")
    channels = sum(layer.sizes["channel"] for side in (a, b) for layer in side.values())
    report({"seconds": timer.seconds, "peak_mib": peak_mib(), "cka": result["cka"].values.tolist(),
            "channels": channels, "precision": result.attrs.get("precision")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--jobs", nargs="+", default=["blocks", "convs"], choices=("blocks", "convs"))
    parser.add_argument("--case")
    parser.add_argument("--job")
    args = parser.parse_args()
    if args.case:
        return case(args.case, args.job, args.inputs[0])
    import numpy as np

    table = [("layers", "inputs", "channels", "case", "seconds", "vs numpy", "peak MiB", "max |Δ CKA|")]
    for job in args.jobs:
        for inputs in args.inputs:
            if job == "blocks":
                from bench_network import case_record, store_path

                if not store_path(inputs).exists():
                    case_record(inputs, 250)
            else:
                conv_store(inputs)
            common = ("--job", job, "--inputs", str(inputs))
            floor = run_case(__file__, "numpy", *common)
            ours = run_case(__file__, "chunkcca", *common)
            gap = float(np.abs(np.asarray(ours["cka"]) - np.asarray(floor["cka"])).max())
            label = "10 (stem … fc)" if job == "blocks" else "20 conv"
            table.append((label, str(inputs), str(ours["channels"]), "numpy in memory", f"{floor['seconds']:.1f}",
                          "1.00", f"{floor['peak_mib']:.0f}", ""))
            table.append((label, str(inputs), str(ours["channels"]), f"chunkcca similarity ({ours['precision']})",
                          f"{ours['seconds']:.1f}", f"{ours['seconds'] / floor['seconds']:.2f}",
                          f"{ours['peak_mib']:.0f}", f"{gap:.1e}"))
    print(f"{machine()}; two ResNet-18s per job, linear CKA of every pair, spatial='avgpool'; numpy reads the "
          f"same store and pools in memory")
    print(format_table(table))


if __name__ == "__main__":
    main()
