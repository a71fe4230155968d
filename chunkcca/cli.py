"""The ``chunkcca`` command: demo, ingest, info, compare, sweep."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

#: compare's measures: name → (solve from Moments, extra keywords, the summary variables printed).
COMPARE_MEASURES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "cca": ("cca_from_moments", {}, ("rho_mean", "r2_cca")),
    "svcca": ("svcca_from_moments", {}, ("rho_mean", "dims_a", "dims_b")),
    "pwcca": ("pwcca_from_moments", {}, ("pwcca",)),
    "cka": ("cka_from_moments", {}, ("cka",)),
    "cka_debiased": ("cka_from_moments", {"debiased": True}, ("cka",)),
    "procrustes": ("procrustes_from_moments", {}, ("procrustes",)),
    "shape": ("shape_metric_from_moments", {}, ("shape_distance",)),
}
EPSILON_MEASURES = ("cca", "svcca", "pwcca")


STORE_HELP = "the store: a local path or an fsspec URL (file://, s3://, gs://, ...)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _storage_options(text: str) -> dict[str, Any]:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"anon\": true}}': {error}") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return options


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help=STORE_HELP)
    parser.add_argument("--storage-options", type=_storage_options, default=None,
                        help="for a store given by URL: its fsspec filesystem's options as JSON "
                             "(credentials, endpoint), e.g. '{\"anon\": true}'")


def _streaming_options(parser: argparse.ArgumentParser, spatial: tuple[str, ...] = ("flatten", "avgpool", "interp",
                                                                                   "dft")) -> None:
    parser.add_argument("--spatial", default=spatial[0], choices=spatial,
                        help=f"how spatial positions become rows (default {spatial[0]})")
    parser.add_argument("--stride", type=_positive_int, default=1, help="keep every n-th row (default 1)")
    parser.add_argument("--precision", default="float32", choices=("float32", "float64", "auto"),
                        help="dtype of the per-chunk products (default float32)")
    parser.add_argument("--scheduler", help="a Dask scheduler address (tcp://host:port) or 'threads'/'synchronous'")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .ingest import LAYOUTS
    from .sweep import MEASURES

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
    demo.add_argument("--scheduler", help="a Dask scheduler address (tcp://host:port)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    ingest = commands.add_parser("ingest", help="write .npy/.npz files or google/svcca pickles into a store",
                                 description="Write arrays from files into a zarr activation store. Pickles are "
                                             "read with an unpickler that admits numpy arrays only.")
    ingest.add_argument("store", help="the store to write (a folder)")
    ingest.add_argument("layers", nargs="+", metavar="LAYER=FILE",
                        help="layer path and file, e.g. model0/fc=model_0_lay06.p (a .npz gives LAYER/<name>)")
    ingest.add_argument("--layout", choices=LAYOUTS, default="datapoints",
                        help="datapoint first, channel last (default); 'neurons': 2-d (neurons, datapoints) as "
                             "svcca's; 'channels_first': (datapoint, channel, height, width) as PyTorch's")
    ingest.add_argument("--chunk", type=_positive_int, help="datapoints per chunk (default: about 16 MiB)")
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing store")

    info = commands.add_parser("info", help="layers, shapes, chunks, dtype and size of a store",
                               description="Describe the layers of a store.")
    _store_argument(info)
    info.add_argument("--json", action="store_true", help="print JSON")

    compare = commands.add_parser("compare", help="compare two layers of a store",
                                  description="Compare two layers with one or more measures, streamed.")
    _store_argument(compare)
    compare.add_argument("layer_a")
    compare.add_argument("layer_b")
    compare.add_argument("--measure", "--measures", dest="measure", nargs="+", default=["cca"],
                         choices=list(COMPARE_MEASURES), help="measures (default cca)")
    compare.add_argument("--epsilon", type=float, default=0.0, help="ridge for CCA-family measures (default 0)")
    compare.add_argument("--keep", type=float, default=0.99,
                         help="svcca: the share of each side's variance its kept directions hold (default 0.99)")
    compare.add_argument("--alpha", type=float, default=1.0,
                         help="shape: partial whitening, 0 (CCA-like) to 1 (Procrustes-like; default)")
    _streaming_options(compare)
    compare.add_argument("--checkpoint", help="save the running statistics to this path as the run goes; "
                         "running the same comparison again resumes from it (needs a fixed --precision)")
    compare.add_argument("--checkpoint-every", type=_positive_int, default=16,
                         help="datapoint chunks between checkpoints (default 16)")
    compare.add_argument("--json", action="store_true", help="print JSON instead of a table")
    compare.add_argument("--plot", help="save the canonical correlation curves (cca/svcca) to this PNG")

    sweep = commands.add_parser("sweep", help="every layer pair of two groups: a heatmap and a netCDF/zarr",
                                description="All pairs (layer_a, layer_b) in one pass over the store.")
    _store_argument(sweep)
    sweep.add_argument("--a", required=True, nargs="+", help="layers or groups (e.g. model0) on the first axis")
    sweep.add_argument("--b", required=True, nargs="+", help="layers or groups on the second axis")
    sweep.add_argument("--measures", "--measure", dest="measures", nargs="+", default=["mean_cca", "cka"],
                       choices=list(MEASURES), help="measures (default mean_cca cka)")
    sweep.add_argument("--epsilon", type=float, default=0.0, help="ridge for CCA-family measures (default 0)")
    sweep.add_argument("--keep", type=float, default=0.99, help="svcca: share of variance kept (default 0.99)")
    sweep.add_argument("--alpha", type=float, default=1.0, help="shape: partial whitening (default 1)")
    _streaming_options(sweep, spatial=("avgpool", "flatten"))  # flatten needs one spatial size for all layers
    sweep.add_argument("--out", default="sweep.nc", help="results file: .nc (netCDF) or .zarr (default sweep.nc)")
    sweep.add_argument("--plot", help="heatmap PNG of the first measure")
    return parser


def _layer(tree: Any, path: str) -> Any:
    from .store import layer_paths

    try:
        return tree[path.strip("/")]
    except KeyError:
        raise ValueError(f"no layer {path!r} in the store; it has {', '.join(layer_paths(tree))}") from None


def _run_ingest(args: argparse.Namespace) -> None:
    from .ingest import ingest
    from .store import layer_paths

    if os.path.exists(args.store) and not args.overwrite:
        raise ValueError(f"{args.store} exists; pass --overwrite to replace it")
    sources = {}
    for item in args.layers:
        layer, separator, file = item.partition("=")
        if not separator or not layer or not file:
            raise ValueError(f"expected LAYER=FILE, got {item!r}")
        if layer in sources:
            raise ValueError(f"layer {layer!r} is given twice ({sources[layer]} and {file})")
        sources[layer] = file
    tree = ingest(args.store, sources, layout=args.layout, chunks=args.chunk or "auto", overwrite=args.overwrite,
                  progress=True)
    print(f"wrote {args.store}: {', '.join(layer_paths(tree))}")


def _run_info(args: argparse.Namespace) -> None:
    from .store import VARIABLE, layer_paths, open_activations, store_filesystem

    tree = open_activations(args.store, storage_options=args.storage_options)
    filesystem, root = store_filesystem(args.store, args.storage_options)
    rows = []
    for path in layer_paths(tree):
        array = tree[path][VARIABLE]
        rows.append({"layer": path, "shape": list(array.shape), "dims": list(map(str, array.dims)),
                     "datapoints_per_chunk": int(array.data.chunks[0][0]), "chunks": int(array.data.numblocks[0]),
                     "dtype": str(array.dtype), "bytes": int(array.nbytes),
                     "bytes_on_disk": int(filesystem.du(f"{root}/{path}"))})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.store}: {len(rows)} layer{'' if len(rows) == 1 else 's'}")
    table = [("layer", "shape", "chunk", "chunks", "dtype", "MiB", "MiB on disk")]
    for row in rows:
        table.append((row["layer"], "x".join(map(str, row["shape"])), str(row["datapoints_per_chunk"]),
                      str(row["chunks"]), row["dtype"], f"{row['bytes'] / 2**20:.1f}",
                      f"{row['bytes_on_disk'] / 2**20:.1f}"))
    print(format_table(table))


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))) for row in rows)


def _run_compare(args: argparse.Namespace) -> None:
    """One streamed pass over the two layers, then every measure from the same Moments."""
    import chunkcca

    from .measures import check_alpha, check_svcca_options, label_result
    from .pairs import stream_pair
    from .store import open_activations

    tree = open_activations(args.store, storage_options=args.storage_options)
    a, b = _layer(tree, args.layer_a), _layer(tree, args.layer_b)
    if args.spatial == "dft" and set(args.measure) - {"cca"}:
        raise ValueError("with --spatial dft only the cca measure is offered")
    check_svcca_options(args.keep, "variance")
    check_alpha(args.alpha)
    if args.plot:
        if not set(args.measure) & {"cca", "svcca"} or args.spatial == "dft":
            raise ValueError("--plot draws canonical correlation curves: include cca or svcca in --measure, "
                             "and not with --spatial dft (a matrix of frequencies)")
        _check_folder(args.plot, "--plot")
    streamed = stream_pair(a, b, spatial=args.spatial, stride=args.stride, epsilon=args.epsilon,
                           precision=args.precision, scheduler=args.scheduler, progress=not args.no_progress,
                           row_norms="cka_debiased" in args.measure, checkpoint=args.checkpoint,
                           checkpoint_every=args.checkpoint_every)
    summary: dict[str, dict[str, Any]] = {}
    curves = {}
    for measure in args.measure:
        function, extra, keys = COMPARE_MEASURES[measure]
        if measure in EPSILON_MEASURES:
            extra = {**extra, "epsilon": args.epsilon}
        extra = {**extra, **{"svcca": {"keep": args.keep}, "shape": {"alpha": args.alpha}}.get(measure, {})}
        result = label_result(getattr(chunkcca, function)(streamed.moments, **extra), streamed,
                              spatial=args.spatial, stride=args.stride)
        summary[measure] = {key: result[key].item() for key in keys} | {"rows": int(streamed.moments.n)}
        if "rho" in result and result["rho"].ndim == 1:
            curves[measure] = result
    options = {"spatial": args.spatial, "stride": args.stride, "precision": streamed.precision,
               "epsilon": args.epsilon, "scheduler": args.scheduler}
    if args.json:
        results = {measure: {key: None if isinstance(value, float) and not math.isfinite(value) else value
                             for key, value in values.items()} for measure, values in summary.items()}
        print(json.dumps({"layer_a": args.layer_a, "layer_b": args.layer_b, "options": options,
                          "results": results}, indent=1))  # undefined values (NaN) as null
    else:
        table = [("measure", "value", "rows")]
        for measure, values in summary.items():
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in values.items() if k != "rows")
            table.append((measure, shown, str(values["rows"])))
        print(f"{args.layer_a} vs {args.layer_b} ({args.spatial}, stride {args.stride}, one pass)")
        print(format_table(table))
    if args.plot:
        save_figure(lambda: _plot_curves(curves, args), args.plot)


def _check_folder(path: str, option: str) -> None:
    """Refuse, before any work, an output whose folder does not exist."""
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: no folder {folder}")


def _plot_curves(curves: dict[str, Any], args: argparse.Namespace) -> Any:
    from .plot import plot_rho

    return plot_rho(curves, title=f"{args.layer_a} vs {args.layer_b}").figure


def save_figure(make_figure: Any, path: str | os.PathLike, *, dpi: int = 110) -> None:
    """Draw a figure (``make_figure()``) off-screen, save it to ``path`` and close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = make_figure()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    print(f"plot: {path}")


def _select(tree: Any, names: list[str], role: str) -> dict[str, Any]:
    """The layers under each of ``names`` (layers or groups), by path."""
    from .sweep import as_layer_set

    return dict(sorted(item for name in names for item in as_layer_set(_layer(tree, name), role).items()))


def _run_sweep(args: argparse.Namespace) -> None:
    import chunkcca

    from .moments import is_url, write_atomically
    from .store import open_activations

    if is_url(args.out):
        raise ValueError(f"--out {args.out}: results are written to local paths only")
    if Path(args.out).suffix not in (".nc", ".zarr"):
        raise ValueError(f"--out {args.out}: name a netCDF file (.nc) or a zarr store (.zarr)")
    _check_folder(args.out, "--out")
    if args.plot:
        _check_folder(args.plot, "--plot")
    tree = open_activations(args.store, storage_options=args.storage_options)
    result = chunkcca.similarity(_select(tree, args.a, "--a"), _select(tree, args.b, "--b"), measures=args.measures,
                                 epsilon=args.epsilon, keep=args.keep, alpha=args.alpha,
                                 spatial=args.spatial, stride=args.stride, precision=args.precision,
                                 scheduler=args.scheduler, progress=not args.no_progress)
    out = Path(args.out)
    if out.suffix == ".zarr":
        write_atomically(out, lambda tmp: result.to_zarr(tmp, zarr_format=3, consolidated=False), overwrite=True)
    else:
        write_atomically(out, lambda tmp: result.to_netcdf(tmp), overwrite=True)
    print(result[args.measures].to_dataframe().to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"results: {out}")
    if args.plot:
        from .plot import plot_similarity

        save_figure(lambda: plot_similarity(result, args.measures[0]).figure, args.plot)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, datapoints=args.datapoints, chunk=args.chunk, seed=args.seed,
                     precision=args.precision, progress=not args.no_progress, scheduler=args.scheduler)
        else:
            {"ingest": _run_ingest, "info": _run_info, "compare": _run_compare, "sweep": _run_sweep}[args.command](args)
    except (ValueError, TypeError, OSError, KeyError, __import__("pickle").UnpicklingError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"chunkcca {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
