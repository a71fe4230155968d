"""The ``chunkcca`` command."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkcca", description="Streamed CCA-family similarity of network layers.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="write a demo store, compare its layers, print a table and save a plot",
                               description="Write a synthetic two-model store and run streamed CCAs over it.")
    demo.add_argument("--datapoints", type=_positive_int, default=2000, help="datapoints per layer (default 2000)")
    demo.add_argument("--chunk", type=_positive_int, default=250, help="datapoints per chunk (default 250)")
    demo.add_argument("--out", default="chunkcca-demo", help="output folder (default ./chunkcca-demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--precision", choices=("float32", "float64"), default="float32",
                      help="dtype of the per-chunk products (default float32)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, datapoints=args.datapoints, chunk=args.chunk, seed=args.seed,
                     precision=args.precision, progress=not args.no_progress)
    except (ValueError, TypeError, OSError) as error:
        print(f"chunkcca {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
