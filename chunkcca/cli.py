"""The ``chunkcca`` command: demo, ingest, info, compare, sweep. It uses the public API only."""

from __future__ import annotations

import os
import sys


def _as_command() -> bool:
    """Whether this process is the ``chunkcca`` command (the installed script, or ``python -m chunkcca.cli``),
    which owns its process, rather than a program that imports this module."""
    from multiprocessing import current_process

    # not a worker process that --scheduler processes spawned, which imports the script again (as __mp_main__, its
    # name already set then, before it knows its parent)
    return (__name__ == "__main__" or os.path.basename(sys.argv[0]) == "chunkcca") and (
        current_process().name == "MainProcess")


def _spawned_by_the_command() -> bool:
    """Whether this process is a worker that the command's ``--scheduler processes`` spawned (importing the
    command's script again: as ``__mp_main__``, or the installed script's import of this module)."""
    from multiprocessing import current_process

    return (__name__ == "__mp_main__" or os.path.basename(sys.argv[0]) == "chunkcca") and (
        current_process().name != "MainProcess")


#: What stopped the command, when a signal other than Ctrl-C's did (``_terminate``).
_SIGNALLED: list[str] = []


def _interrupted_line(argv: list[str] | None) -> str:
    """The one line of a Ctrl-C or SIGTERM (``argv``: the command's arguments, None for the process's, which name
    it)."""
    arguments = sys.argv[1:] if argv is None else argv
    stopped = _SIGNALLED[-1] if _SIGNALLED else "interrupted"
    return f"chunkcca{''.join(f' {arg}' for arg in arguments[:1] if not arg.startswith('-'))}: error: {stopped}"


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a batch system's time limit) stops the command as a Ctrl-C does: what it was writing is
    removed and it says so in one line, status 2. It was killed without a word, leaving its temporary folders.
    Once: a second (``timeout`` signals the process and then its group) would cut that removal short."""
    if not _SIGNALLED:
        _SIGNALLED.append("terminated (SIGTERM)")
        raise KeyboardInterrupt


#: Whether a Ctrl-C came (``_interrupt``): an error after it is reported as the interruption it may be.
_CTRL_C: list[bool] = []


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C, as Python's own handler takes it (a KeyboardInterrupt), and noted: one that an extension module's
    initialisation turns into ``ImportError('initialization failed')`` (matplotlib's, loading for --plot) was
    reported as "a package is missing"; any error after it is now the command's "interrupted"."""
    _CTRL_C.append(True)
    raise KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    """A Ctrl-C that lands in a finaliser (``__del__``, as the libraries load) is swallowed there by Python, which
    printed its traceback while the command ran on to status 0: it is noted (``_CTRL_C``), and the command stops
    where it next looks. Other unraisable exceptions are Python's to report."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        _CTRL_C.append(True)
        return
    sys.__unraisablehook__(unraisable)


if _as_command():  # from the first moment: a SIGTERM or Ctrl-C while the libraries load is the same one line
    import signal

    for _stop, _handler in ((signal.SIGTERM, _terminate), (signal.SIGINT, _interrupt)):
        if signal.getsignal(_stop) is not signal.SIG_IGN:  # ignored as the parent said (a script's job run with
            signal.signal(_stop, _handler)  # &: Ctrl-C is the script's), it stays ignored
    sys.unraisablehook = _unraisable
elif _spawned_by_the_command():  # a Ctrl-C in a terminal signals the whole process group: the command says the one
    import signal  # line; a worker still loading the libraries printed a 40-line traceback (its own after, below)

    _INHERITED = signal.signal(signal.SIGINT, signal.SIG_IGN)

try:  # the libraries load in the command's first second or so: a Ctrl-C then is one line too (as in main)
    import argparse
    import asyncio
    import atexit
    import concurrent.futures
    import contextlib
    import json
    import logging
    import math
    import pickle
    import re
    import signal
    import warnings
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path
    from typing import Any, NoReturn

    import numpy as np
    import xarray as xr

    import chunkcca
    from chunkcca.demo import run_demo
    from chunkcca.ingest import LAYOUTS, ingest
    from chunkcca.options import (
        CONNECT_TIMEOUT,
        GRIDS,
        KEEP_BY,
        MEMORY_LIMIT,
        METHODS,
        MODAL,
        NAN_POLICIES,
        NETCDF_LARGEST_INT,
        NOT_MINIBATCH,
        PER_DATAPOINT,
        PER_FREQUENCY,
        PRECISIONS,
        READ_AHEAD,
        SCHEDULER_NAMES,
        SOLVE_NAMES,
        SPATIAL,
        SWEEP_SPATIAL,
        check_checkpoint_place,
        check_output_place,
        check_storage_options,
        expanded,
        holds_positions,
        is_url,
        layer_name,
        netcdf_int_error,
        scheduler_address,
    )
    from chunkcca.plot import plot_rho, plot_similarity
    from chunkcca.report import PLOT_MARK_KEYS, format_table, is_chunkcca_plot, plot_format, save_figure
except (KeyboardInterrupt, Exception) as stopped:
    # imported by a program of its own: its error as it is; a module missing, not interrupted: said as it is
    if not _as_command() or (isinstance(stopped, ImportError) and not (_CTRL_C or _SIGNALLED)):
        raise
    if isinstance(stopped, KeyboardInterrupt) or _CTRL_C or _SIGNALLED:
        print(_interrupted_line(None), file=sys.stderr)
    else:  # a library failing as it loads (a malformed Dask config file: a 30-line traceback, status 1)
        lines = [line.strip() for line in str(stopped).splitlines() if line.strip()]
        said = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])  # "…, original error message:"
        print(f"chunkcca: error: its libraries failed to load: {type(stopped).__name__}"
              f"{': ' + said if said else ''}", file=sys.stderr)
    raise SystemExit(2) from None
if _as_command() and _CTRL_C:  # a Ctrl-C a finaliser swallowed as the libraries loaded
    print(_interrupted_line(None), file=sys.stderr)
    raise SystemExit(2)
if _spawned_by_the_command():  # loaded: its Ctrl-C as it came (ignored for good, it outlived the command, which
    signal.signal(signal.SIGINT, _INHERITED)  # waited on it at its exit; a job's ignored one stays ignored)

MEASURES = tuple(chunkcca.MEASURES)
#: The command's notices (chunkcca's log at INFO, which ``_notices`` shows on stderr).
NOTICES = logging.getLogger("chunkcca")
#: Old spellings of measures, kept working with a deprecation message.
ALIASES: dict[str, tuple[str, ...]] = {"cca": ("mean_cca", "r2_cca")}

SCHEDULER_HELP = "a Dask scheduler address (tcp://host:port), or 'threads', 'synchronous' or 'processes'"
#: The local schedulers' names Dask knows (``distributed`` needs a Client, which only Python code can make).
LOCAL_SCHEDULERS = tuple(name for name in SCHEDULER_NAMES if "distributed" not in name)
STORE_HELP = "the store: a local path or an fsspec URL (file://, s3://, gs://, ...)"


def _positive_int(text: str, least: int = 1, why: str = "") -> int:
    """An integer of at least ``least`` (``why``: what needs it, said in the message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}{why}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}{why}, got {value}")
    return value


def _checked(name: str, convert: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """An argparse type for the option ``name``: the flag's text converted and checked where the library checks
    it (``StreamOptions`` or ``SolveOptions``), whose message, worded for the keyword ("epsilon must be
    …"), argparse says for the flag ("argument --epsilon: must be …"), before any work."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        try:
            (chunkcca.SolveOptions if name in SOLVE_NAMES else chunkcca.StreamOptions)(**{name: value})
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{name} ")) from None
        return value
    return parse


def _minibatch_size(text: str) -> int:
    """--minibatch: an integer >= 4 (the unbiased HSIC of a minibatch needs 4 rows)."""
    return _positive_int(text, 4, " (the unbiased HSIC of a minibatch needs 4 rows)")


def _scheduler(text: str) -> str:
    """--scheduler: a local scheduler's name, or a scheduler's address checked (and a trailing ``/`` dropped)
    before any work, as distributed fails on a malformed one only when connecting (with a traceback)."""
    name = text.strip()
    if name.lower() in LOCAL_SCHEDULERS:
        return name.lower()
    if name.lower() in ("distributed", "dask.distributed"):
        raise argparse.ArgumentTypeError(f"{text!r} runs on a distributed.Client made in Python, which a command has "
                                         f"none of: give the scheduler's address, e.g. tcp://host:8786")
    try:
        return scheduler_address(name, in_process=False)  # a command has no cluster of its own to reach
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _storage_options(text: str) -> dict[str, Any]:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"anon\": true}}': {error}") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return options


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=_path, help=STORE_HELP)
    parser.add_argument("--storage-options", type=_storage_options, default=None,
                        help="for a store given by URL: its fsspec filesystem's options as JSON "
                             "(credentials, endpoint), e.g. '{\"anon\": true}'")


def _streaming_options(parser: argparse.ArgumentParser, spatial: tuple[str, ...] = SPATIAL) -> None:
    parser.add_argument("--spatial", default=spatial[0], choices=spatial,
                        help=f"how spatial positions become rows (default {spatial[0]})")
    parser.add_argument("--stride", type=_positive_int, default=1, help="keep every n-th row (default 1)")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS),
                        help="dtype of the per-chunk products (default auto: float64 for the first datapoints, "
                             "4 rows per channel of the widest layer, and float32 for the rest unless they are "
                             "ill-conditioned; float64 throughout for runs with fewer rows)")
    parser.add_argument("--memory-limit", default=MEMORY_LIMIT, type=_checked("memory_limit", str),
                        help=f"budget for what a pass holds at once, e.g. 4GiB (default {MEMORY_LIMIT}); a run that "
                             f"cannot fit says so before reading")
    parser.add_argument("--nan-policy", default="raise", choices=NAN_POLICIES,
                        help="rows holding NaN or Inf: an error (raise, the default) or left out of every measure "
                             "(omit)")
    parser.add_argument("--scheduler", type=_scheduler, help=SCHEDULER_HELP)
    parser.add_argument("--connect-timeout", type=_checked("connect_timeout"),
                        help=f"with --scheduler ADDRESS: seconds (> 0) to wait for the scheduler to answer (default "
                             f"{CONNECT_TIMEOUT:g})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


class _Gathered(argparse.Action):
    """A list option given once or more (``--measure mean_cca --measure cka``: both), never added to its default:
    argparse kept the last only, silently (a sweep of ``--a x --a y`` swept y alone)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = getattr(namespace, self.dest, None)
        earlier = [] if given is None or given is self.default else list(given)
        setattr(namespace, self.dest, [*earlier, *values])


def _node(text: str) -> str:
    """A layer's or group's path in a store, not blank ("" was taken for the whole store, silently)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a layer or group name is empty (the whole store is '/')")
    return text


def _add_shared_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shared-datapoints", action="store_true",
                        help="compare the datapoints (by label) that every layer holds, saying how many each leaves "
                             "out (layers that hold different datapoints are otherwise an error)")


def _given_labels(layer: Any) -> Any:
    """The datapoint labels (a pandas Index) of a store's layer node, None where it has none: no datapoint
    coordinate, or the positions a store gave a layer written without labels (``holds_positions``)."""
    return None if "datapoint" not in layer.coords or holds_positions(layer) else layer.indexes["datapoint"]


def _shared_datapoints(layers: dict[str, Any], shared: bool) -> tuple[dict[str, Any], str]:
    """The layers (store nodes by name, each once) as compared, and what was left out (""): with
    --shared-datapoints, each selected to the datapoints (by label) all of them hold, in its own stored order
    (the library pairs them by label, and checks what a reordering holds); without it, layers that hold
    different datapoints are an error naming the flag, before any work (the library's names Python's
    selection, ``a.sel(datapoint=shared)``, which a command cannot make)."""
    labels = {name: _given_labels(layer) for name, layer in layers.items()}
    if any(index is None for index in labels.values()):  # unlabelled: paired by position, which the library checks
        if shared and len({layer.sizes["datapoint"] for layer in layers.values()}) > 1:
            plain = next(name for name, index in labels.items() if index is None)
            raise ValueError(f"--shared-datapoints takes the datapoints the layers share by label, and {plain} has "
                             f"none (written without them: `chunkcca ingest --datapoints FILE` gives them)")
        return layers, ""
    common = next(iter(labels.values()))
    for index in labels.values():
        common = common.intersection(index, sort=False)
    if all(len(index) == len(common) for index in labels.values()):
        return layers, ""
    said = ", ".join(f"{len(index) - len(common)} of the {len(index)} of {name}"
                     for name, index in labels.items() if len(index) > len(common))
    if not len(common):
        raise ValueError(f"the layers share no datapoint (by label): {said} are not in every layer")
    if not shared:
        raise ValueError(f"the layers hold different datapoints (by label): {said} are not in every layer; pass "
                         f"--shared-datapoints to compare the {len(common)} they share")
    chosen = {}
    for name, layer in layers.items():
        positions = np.sort(labels[name].get_indexer(common))
        run = positions[-1] - positions[0] + 1 == len(positions)  # a slice reads whole chunks
        chosen[name] = layer.isel(datapoint=slice(int(positions[0]), int(positions[-1]) + 1) if run else positions)
    return chosen, f"compared the {len(common)} datapoints every layer holds; left out: {said}"


def _add_group_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groupby", help="a coordinate on datapoint (e.g. a class label): every measure per group")
    parser.add_argument("--folds", type=_checked("folds", _folds),
                        help="K >= 2 contiguous folds of the datapoints, or a coordinate naming each one's fold: "
                             "jackknife errors and intervals, and the held-out measures heldout_cca and predictivity")
    parser.add_argument("--confidence", type=_checked("confidence"),
                        help="with --folds: the intervals' level, in (0, 1) (default 0.95)")
    parser.add_argument("--ridge", type=_checked("ridge"), nargs="+", action=_Gathered,
                        help="predictivity: the ridge, relative to the mean variance (default 0.01)")


def _folds(text: str) -> int | float | str:
    """--folds as given: a number (K, which StreamOptions checks) or a coordinate name."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _add_minibatch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minibatch", type=_minibatch_size, metavar="N",
                        help="with --measure cka alone: minibatch linear CKA, one ratio of the unbiased HSIC summed "
                             "over consecutive minibatches of N rows (N >= 4), as torch-cka and ckatorch compute it "
                             "(default: exact, from all rows)")


def _check_minibatch_flags(args: argparse.Namespace, measures: list[str]) -> None:
    """Before any work, in flag words: --minibatch takes cka alone and none of the options minibatch CKA does not
    read (it sums float64 Gram matrices in one pass: no products' precision, no Moments to group or save)."""
    if args.minibatch is None:
        return
    if measures != ["cka"]:
        raise ValueError(f"--minibatch {args.minibatch} gives minibatch linear CKA: pass --measure cka alone, not "
                         f"{' '.join(measures)}")
    given = [_flag(name) for name in NOT_MINIBATCH if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --minibatch "
                         f"(float64 Gram matrices of each minibatch, summed in one pass: no products' precision, no "
                         f"Moments to group, fold or checkpoint)")


def _add_solve_options(parser: argparse.ArgumentParser) -> None:
    """The measures' own options; only those given are passed on (one no chosen measure reads is an error)."""
    parser.add_argument("--epsilon", type=_checked("epsilon"), help="ridge for CCA-family measures (default 0)")
    parser.add_argument("--keep", type=float, help="svcca: the share of each side's variance its kept directions "
                                                   "hold (default 0.99); with --keep-by directions, their number")
    parser.add_argument("--keep-by", choices=KEEP_BY, help="svcca: count variance (default) or singular values, or "
                                                         "keep a number of directions")
    parser.add_argument("--alpha", type=_checked("alpha"),
                        help="shape: partial whitening, 0 (CCA-like) to 1 (Procrustes-like; default)")


def _check_measure_flags(args: argparse.Namespace, measures: list[str]) -> None:
    """Before any work (opening stores, connecting to a scheduler), in flag words: each measure option given is
    read by a chosen measure (the library's own check, in its words, comes later), and the held-out measures
    and ``--confidence`` need ``--folds``."""
    given = _given_solve_options(args)
    unread = [option for option in given.keys() - {"confidence"}
              if not any(option in chunkcca.MEASURES[name].options for name in measures)]
    if unread:  # before their values are checked together (--keep-by directions was refused for --keep 0.99,
        # the default, where svcca was not asked for: found by audit)
        flags = [f"{_flag(option)} (read by "
                 f"{', '.join(name for name, measure in chunkcca.MEASURES.items() if option in measure.options)})"
                 for option in sorted(unread)]
        raise ValueError(f"not read by {', '.join(measures)}: {'; '.join(flags)}; choose with --measure")
    try:  # --keep, whose rule hangs on --keep-by (the others were checked as they were read)
        chunkcca.SolveOptions(**given)
    except ValueError as error:
        named = next((name for name in given if str(error).startswith(f"{name} ")), None)
        if named is None:
            raise
        values = given[named] if isinstance(given[named], (list, tuple)) else [given[named]]
        shown = " ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)
        raise ValueError(f"{_flag(named)} {shown}: {str(error)[len(named) + 1:]}") from None
    if args.folds is not None:
        return
    held_out = [name for name in measures if chunkcca.MEASURES[name].per_fold is not None]
    if held_out:
        raise ValueError(f"{held_out[0]} is measured on held-out folds: pass --folds K (K >= 2) or --folds COORDINATE")
    if args.confidence is not None:
        raise ValueError("--confidence sets the level of the intervals --folds gives, which is not given")


def _given_solve_options(args: argparse.Namespace) -> dict[str, Any]:
    ridge = args.ridge[0] if args.ridge is not None and len(args.ridge) == 1 else args.ridge
    return {key: value for key, value in (("epsilon", args.epsilon), ("keep", args.keep),
                                          ("keep_by", args.keep_by), ("alpha", args.alpha), ("ridge", ridge),
                                          ("confidence", args.confidence)) if value is not None}


def _measure_names(names: list[str], option: str) -> list[str]:
    """The measures named on the command line, old spellings replaced (with a deprecation message)."""
    chosen: list[str] = []
    for name in names:
        if name in ALIASES:
            # a line of the command's warnings (a UserWarning: Python hides DeprecationWarnings from users)
            warnings.warn(f"{option} {name} is deprecated; it stands for {' '.join(ALIASES[name])}", UserWarning,
                          stacklevel=2)
        for measure in ALIASES.get(name, (name,)):
            if measure not in chosen:
                chosen.append(measure)
    return chosen


class _Once(argparse._StoreAction):
    """An option of one value, refused when given twice (``--stride 2 --stride 4``): argparse kept the last,
    silently."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = namespace.__dict__.setdefault("_given_once", {})
        if self.option_strings and self.dest in given:
            raise argparse.ArgumentError(self, f"given twice ({given[self.dest]!r}, then {values!r}): give it once")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error answered in one line like every other failure (``--help`` shows the usage),
    and an option of one value given twice refused (``_Once``)."""

    #: The command line's words (set by ``_run``): a positional missing where the command's words begin with
    #: options, one of which takes several values, was taken by it.
    words: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)
        self.register("action", "store", _Once)

    def error(self, message: str) -> NoReturn:
        command = self.prog.rsplit(" ", 1)[-1]
        after = self.words[self.words.index(command) + 1 :] if command in self.words else self.words
        taking_several = [action.option_strings[0] for action in self._actions
                          if action.nargs == "+" and set(action.option_strings) & set(after)]
        if message.startswith("the following arguments are required") and taking_several and after[0].startswith("-"):
            message += (f" ({', '.join(taking_several)} take{'s' if len(taking_several) == 1 else ''} every word "
                        f"after {'it' if len(taking_several) == 1 else 'them'}: give the store and layers first)")
        wanting = re.fullmatch(r"argument (\S+): expected (?:one|at least one) argument", message)
        spellings = wanting[1].split("/") if wanting else []
        given = [i for i, word in enumerate(after[:-1]) if after[i + 1].startswith("-") and (
            word in spellings or (word.startswith("--") and any(flag.startswith(word) for flag in spellings)))]
        if given and self._no_option(after[given[-1] + 1]):  # "--memory-limit -5GiB": its value read as an option,
            flag, value = after[given[-1]], after[given[-1] + 1]  # which none is (--no-prog is --no-progress)
            message += f" ({value} reads as an option; a value that starts with '-' is given as {flag}={value})"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _no_option(self, word: str) -> bool:
        """Whether ``word``, which argparse reads as an option (it starts with '-'), names none of this parser's,
        nor abbreviates one. argparse's ``_parse_optional`` gives a tuple (action, …) up to Python 3.12, a list
        of them since."""
        parsed: Any = self._parse_optional(word)
        if parsed is None:  # a negative number, which argparse reads as a value
            return False
        return all(option[0] is None for option in parsed) if isinstance(parsed, list) else parsed[0] is None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chunkcca", description="Streamed CCA-family similarity of network layers.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="write a demo store, compare its layers, print a table and save a plot",
                               description="Write a synthetic two-model store and run streamed CCAs over it.")
    demo.add_argument("--datapoints", type=_positive_int, default=2000, help="datapoints per layer (default 2000)")
    demo.add_argument("--chunk", type=_positive_int, default=250, help="datapoints per chunk (default 250)")
    demo.add_argument("--out", type=_path, default="chunkcca-demo", help="output folder (default ./chunkcca-demo)")
    demo.add_argument("--seed", type=lambda text: _positive_int(text, 0), default=0,
                      help="random seed, an integer >= 0 (default 0)")
    demo.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                      help="dtype of the per-chunk products (default auto)")
    demo.add_argument("--scheduler", type=_scheduler, help=SCHEDULER_HELP)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    ingest = commands.add_parser("ingest", help="write .npy/.npz files or google/svcca pickles into a store",
                                 description="Write arrays from files into a zarr activation store. Pickles are "
                                             "read with an unpickler that admits numpy arrays only.")
    ingest.add_argument("store", type=_path, help="the store to write (a folder)")
    ingest.add_argument("layers", nargs="+", metavar="LAYER=FILE",
                        help="layer path and file, e.g. model0/fc=model_0_lay06.p (a .npz gives LAYER/<name>)")
    ingest.add_argument("--layout", choices=LAYOUTS,
                        help="'datapoints': datapoint first, channel last (the default, for arrays that do not "
                             "look like the others; a 3-d array is (datapoint, token, channel)); "
                             "'neurons': 2-d (neurons, datapoints) as svcca's; "
                             "'channels_first': (datapoint, channel, *positions) as PyTorch's, e.g. (N, C, H, W) "
                             "(a 2-d array as it is)")
    ingest.add_argument("--mask", action="append", default=[], metavar="LAYER=FILE",
                        help="a layer's padding mask (datapoint, *positions) from a .npy file, True at real "
                             "positions (e.g. an attention mask); repeat for more layers")
    ingest.add_argument("--coord", action="append", default=[], metavar="NAME=FILE",
                        help="a coordinate on datapoint for every layer written, one number or string per "
                             "datapoint from a .npy file (e.g. label=labels.npy, for --groupby label); repeat for more")
    ingest.add_argument("--datapoints", type=_path, metavar="FILE",
                        help="the datapoint labels of every layer written, one number or string per datapoint from "
                             "a .npy file (e.g. each input's index in its dataset), so that they pair by label with "
                             "recorded layers; without it the layers pair by position only")
    ingest.add_argument("--chunk", type=_positive_int, help="datapoints per chunk (default: about 16 MiB)")
    written = ingest.add_mutually_exclusive_group()
    written.add_argument("--overwrite", action="store_true", help="replace an existing store")
    written.add_argument("--append", action="store_true",
                         help="add the layers to an existing store, after its own, leaving those as they are")
    ingest.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    info = commands.add_parser("info", help="layers, shapes, chunks, dtype and size of a store",
                               description="Describe the layers of a store.")
    _store_argument(info)
    info.add_argument("--json", action="store_true", help="print JSON")

    compare = commands.add_parser("compare", help="compare two layers of a store",
                                  description="Compare two layers with one or more measures, streamed.")
    _store_argument(compare)
    compare.add_argument("layer_a")
    compare.add_argument("layer_b", help="a layer of the store, or of --b-store")
    compare.add_argument("--b-store", type=_path,
                         help="take layer_b from this store (e.g. another model's recording)")
    _add_shared_option(compare)
    compare.add_argument("--measure", "--measures", dest="measure", nargs="+", action=_Gathered, default=["mean_cca"],
                         choices=[*MEASURES, *ALIASES], metavar="MEASURE",
                         help=f"measures, from {', '.join(MEASURES)} (default mean_cca)")
    _add_solve_options(compare)
    _add_group_options(compare)
    _streaming_options(compare)
    compare.add_argument("--method", choices=METHODS, help="with --spatial interp: how the coarser map is resampled "
                                                           "(default linear)")
    compare.add_argument("--grid", choices=GRIDS, help="with --spatial interp: where its samples sit, the layers' "
                                                       "height/width coordinates (coords, the default) or google/"
                                                       "svcca's tutorial grid (svcca)")
    _add_minibatch_option(compare)
    compare.add_argument("--checkpoint", type=_path,
                         help="save the running statistics to this path as the run goes; "
                         "running the same comparison again resumes from it (with --precision auto, in float64)")
    compare.add_argument("--checkpoint-every", type=_positive_int,
                         help="datapoint chunks between checkpoints (default 16)")
    compare.add_argument("--json", action="store_true", help="print JSON instead of a table")
    compare.add_argument("--plot", type=_path,
                         help="save the canonical correlation curves (CCA-family measures) to this image "
                         "(.png, .svg, .pdf …: by its extension)")
    compare.add_argument("--overwrite", action="store_true",
                         help="replace an existing --plot that chunkcca drew (never another file)")

    sweep = commands.add_parser("sweep", help="every layer pair of two groups: a heatmap and a netCDF/zarr",
                                description="All pairs (layer_a, layer_b) in one pass over the store.")
    _store_argument(sweep)
    sweep.add_argument("--a", required=True, nargs="+", action=_Gathered, type=_node,
                       help="layers or groups (e.g. model0) on the first axis")
    sweep.add_argument("--b", required=True, nargs="+", action=_Gathered, type=_node,
                       help="layers or groups on the second axis")
    sweep.add_argument("--b-store", type=_path,
                       help="take the --b layers from this store (e.g. another model's recording)")
    _add_shared_option(sweep)
    sweep.add_argument("--measures", "--measure", dest="measures", nargs="+", action=_Gathered,
                       default=["mean_cca", "cka"],
                       choices=[*MEASURES, *ALIASES], metavar="MEASURE",
                       help=f"measures, from {', '.join(MEASURES)} (default mean_cca cka)")
    _add_solve_options(sweep)
    _add_group_options(sweep)
    _streaming_options(sweep, spatial=SWEEP_SPATIAL)  # flatten needs one spatial size for all layers
    _add_minibatch_option(sweep)
    sweep.add_argument("--out", type=_path, default="sweep.nc",
                       help="results file: .nc (netCDF) or .zarr (default sweep.nc)")
    sweep.add_argument("--plot", type=_path,
                       help="heatmap of one measure (--plot-measure, default the first of --measures) "
                       "as an image (.png, .svg, .pdf …: by its extension)")
    sweep.add_argument("--plot-measure", metavar="MEASURE", help="the measure --plot draws, one of --measures")
    sweep.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out (a sweep result) and --plot that chunkcca wrote (never "
                            "another file)")
    for command_parser in commands.choices.values():  # a stray argument is named by its command's parser
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def _layer(tree: Any, path: str, store: str) -> Any:
    """The layer (or group) at ``path`` of ``tree``, the store opened from ``store``: a node, not one of its
    variables (``m0/fc/label`` was measured as a layer named 'label')."""
    try:
        found = tree[path.strip("/")]
    except KeyError:
        found = None
    if not isinstance(found, xr.DataTree):
        held = f" ({path!r} is a variable of a layer, not a layer)" if found is not None else ""
        raise ValueError(f"no layer {path!r} in {store}{held}; it has {', '.join(chunkcca.layer_paths(tree))}")
    return found


def _check_storage_options(args: argparse.Namespace) -> None:
    """--storage-options apply to stores given by URL: with a local store, refused in the flag's words."""
    for store in (args.store, getattr(args, "b_store", None)):
        if store is not None:
            check_storage_options(store, args.storage_options, "--storage-options")


def _stores(args: argparse.Namespace) -> tuple[Any, Any]:
    """The store of the a layers and that of the b layers (--b-store, or the same one)."""
    _check_storage_options(args)
    tree = chunkcca.open_activations(args.store, storage_options=args.storage_options)
    if args.b_store is None:
        return tree, tree
    return tree, chunkcca.open_activations(args.b_store, storage_options=args.storage_options)


def _run_ingest(args: argparse.Namespace) -> None:
    folder = os.path.dirname(os.path.abspath(args.store))
    if "://" not in args.store and not os.path.isdir(folder):  # a typo is no new folder (as for --out, --plot);
        raise ValueError(f"{args.store}: no folder {folder}")  # a URL is refused by ingest, saying why
    if os.path.lexists(args.store) and not (args.overwrite or args.append):
        raise ValueError(f"{args.store} exists; pass --overwrite to replace it, or --append to add layers to it")
    sources = _named_files(args.layers, "", "LAYER", "layer")
    masks = _named_files(args.mask, "--mask: ", "LAYER", "layer")
    coords = _named_files(args.coord, "--coord: ", "NAME", "coordinate")
    try:
        tree = ingest(args.store, sources, layout=args.layout, masks=masks, mode="a" if args.append else "w",
                      chunks=args.chunk or "auto", coords=coords, datapoints=args.datapoints, overwrite=args.overwrite,
                      progress=not args.no_progress)
    except FileExistsError as error:  # its check of the store's place, before any work, in the API's words
        raise FileExistsError(str(error).replace("overwrite=True", "--overwrite")) from None
    except ValueError as error:  # its checks of the coordinates, in the API's words: the flag's and file's here
        said = str(error)
        if said.startswith("coords: "):
            raise ValueError(f"--coord: {said.removeprefix('coords: ')}") from None
        for name, file in coords.items():
            if said.startswith(f"coords[{name!r}] "):  # (the file named once)
                said = said.removeprefix(f"coords[{name!r}]").removesuffix(f" (from the file {expanded(file)})")
                raise ValueError(f"--coord {name}={file}{said}") from None
        raise
    written = [path for path in chunkcca.layer_paths(tree)
               if any(path == layer.strip("/") or path.startswith(layer.strip("/") + "/") for layer in sources)]
    print(f"wrote {args.store}:")
    for path in written:  # the dims each file was read as (a 3-d file is tokens unless --layout says otherwise)
        activations = tree[path]["activations"]
        print(f"  {path}  ({', '.join(f'{dim} {size}' for dim, size in activations.sizes.items())})")


def _named_files(items: Sequence[str], flag: str, key: str, what: str) -> dict[str, str]:
    """``KEY=FILE`` arguments as a mapping, in order; a ValueError (prefixed by ``flag``) for a malformed one or a
    key given twice. A key holding '=' (layer paths may) ends at the first '=' after which a file exists."""
    files: dict[str, str] = {}
    for item in items:
        name, separator, file = item.partition("=")
        if separator and not os.path.exists(file) and "=" in file:  # "x=y=a.npy": no y=a.npy, so x=y of a.npy
            splits = [(item[:at], item[at + 1 :]) for at in range(len(name) + 1, len(item)) if item[at] == "="]
            name, file = next(((key, path) for key, path in splits if os.path.exists(path)), (name, file))
            if not os.path.exists(file):
                raise ValueError(f"{flag}no such file after any '=' of {item!r} ({key}=FILE)")
        if not separator or not name or not file:
            raise ValueError(f"{flag}expected {key}=FILE, got {item!r}")
        if name in files:
            raise ValueError(f"{flag}{what} {name!r} is given twice ({files[name]} and {file})")
        files[name] = file
    return files


def _run_info(args: argparse.Namespace) -> None:
    _check_storage_options(args)
    rows = chunkcca.describe_store(args.store, storage_options=args.storage_options)
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
    labelled: dict[tuple[str, ...], list[str]] = {}  # coordinate names → the layers that have them
    for row in rows:
        labelled.setdefault(tuple(row["coords"]), []).append(row["layer"])
    for names, layers in labelled.items():
        if names:
            where = "every layer" if len(layers) == len(rows) else ", ".join(layers)
            print(f"coordinates on datapoint (for --groupby, --folds): {', '.join(names)} ({where})")
    masked = [row["layer"] for row in rows if row["mask"]]
    if masked:
        print(f"padding masks (padded positions left out of every measure): "
              f"{'every layer' if len(masked) == len(rows) else ', '.join(masked)}")
    unlabelled = [row["layer"] for row in rows if not row["labelled"]]
    if unlabelled:
        print(f"stored without datapoint labels (paired with other layers by position only; `ingest --datapoints "
              f"FILE` gives them): {'every layer' if len(unlabelled) == len(rows) else ', '.join(unlabelled)}")
    unchecked = [row["layer"] for row in rows if not row["checksummed"]]
    if unchecked:
        print(f"stored without checksums (written by another tool: a chunk damaged on disk, cut short or a bit "
              f"flipped, may read as other values; write them with chunkcca to checksum them): "
              f"{'every layer' if len(unchecked) == len(rows) else ', '.join(unchecked)}")
    left = chunkcca.leftover_writes(args.store)
    if left:
        stale = sum(folder["stale"] for folder in left)
        print(f"{len(left)} temporary folder{'s' if len(left) > 1 else ''} beside it left by a killed write "
              f"({sum(folder['bytes'] for folder in left) / 2**20:.1f} MiB): {', '.join(f['path'] for f in left)}; "
              f"{stale} of them stale (their writer is gone), which the next write of the store removes")


def _streaming(args: argparse.Namespace, scheduler: Any) -> dict[str, Any]:
    """The streaming options of compare and sweep, on ``scheduler`` (``--scheduler``, connected by ``_connected``)."""
    options = {"spatial": args.spatial, "stride": args.stride, "memory_limit": args.memory_limit,
               "scheduler": scheduler, "progress": not args.no_progress,
               "nan_policy": args.nan_policy}
    options |= {key: value for key in ("method", "grid") if (value := getattr(args, key, None)) is not None}
    if args.minibatch is not None:  # the options it reads (_check_minibatch_flags refused the others)
        return {**options, "minibatch": args.minibatch}
    return {**options, "groupby": args.groupby, "folds": args.folds,
            **({} if args.precision is None else {"precision": args.precision})}


def _scalar(value: xr.DataArray) -> Any:
    """A measure's value: a number, or a list where it has a dim (per group, per ridge)."""
    return value.item() if value.ndim == 0 else value.values.tolist()


def _json_value(value: Any) -> Any:
    """A value for strict JSON: NaN and infinities (undefined values) as null."""
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_shown(item) for item in value) + "]"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _run_compare(args: argparse.Namespace) -> None:
    """One streamed pass over the two layers, every measure from the same Moments (chunkcca.compare)."""
    measures = _measure_names(args.measure, "--measure")
    _check_compare_flags(args, measures)
    tree_a, tree_b = _stores(args)
    a, b = _layer(tree_a, args.layer_a, args.store), _layer(tree_b, args.layer_b, args.b_store or args.store)
    args.layer_a, args.layer_b = layer_name(a.path), layer_name(b.path)  # as stored ("/m0//conv/": m0/conv), as sweep
    names = (f"{args.layer_a} in {args.store}", f"{args.layer_b} in {args.b_store or args.store}")
    chosen, left_out = _shared_datapoints(dict(zip(names, (a, b))), args.shared_datapoints)  # a layer once
    a, b = (chosen[name] for name in names)
    every = {} if args.checkpoint_every is None else {"checkpoint_every": args.checkpoint_every}  # only if given
    with _connected(args) as scheduler:
        if args.minibatch is not None:
            result = chunkcca.cka(a, b, **_streaming(args, scheduler))
        else:
            result = chunkcca.compare(a, b, measures=measures, checkpoint=args.checkpoint, **every,
                                      **_given_solve_options(args), **_streaming(args, scheduler))
    values = _compare_values(result, measures)
    if args.json:
        _print_compare_json(args, result, values)
    else:
        _print_compare_table(args, result, values)
        if {"mean_cca", "r2_cca"} & set(measures):
            _note_zero_components(result, a.sizes["channel"], b.sizes["channel"])
    if args.plot:  # after the values, which a plot that cannot be saved must not take with it
        apart = args.layer_a == args.layer_b and args.b_store not in (None, args.store)  # one path in two stores
        title = (f"{args.layer_a} ({args.store}) vs {args.layer_b} ({args.b_store})" if apart
                 else f"{args.layer_a} vs {args.layer_b}")
        _save_plot(lambda: plot_rho(result, title=title).figure, args.plot, overwrite=args.overwrite)
        if args.json:  # stdout holds one JSON document: where the plot went is said on stderr, as notices are
            NOTICES.info(f"plot: {args.plot}")
        else:
            print(f"plot: {args.plot}")
    if left_out:  # once all is done and written: a failure is its one line
        NOTICES.info(left_out)  # on stderr, which --json leaves to it


def _path(text: str) -> str:
    """A path given to the command, ``~`` expanded (bash leaves ``--out=~/x`` as it is); an empty one refused in
    the flag's words."""
    try:
        return expanded(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _flag(option: str) -> str:
    """The command's flag for an option of the API: ``checkpoint_every`` → ``--checkpoint-every``."""
    return "--" + option.replace("_", "-")


def _check_modal_flags(args: argparse.Namespace) -> None:
    """The flags of options only one mode reads (``MODAL``: --method and --grid, --checkpoint-every) given without
    that mode: an error in flag words, before any work (the API says so in its own words)."""
    misplaced: dict[str, list[str]] = {}
    for name, (mode, values) in MODAL.items():
        setting = getattr(args, mode, None)
        if getattr(args, name, None) is not None and (setting is None if values is None else setting not in values):
            misplaced.setdefault(mode, []).append(name)
    for mode, names in misplaced.items():
        listed, values = " and ".join(map(_flag, names)), MODAL[names[0]][1]
        verb = "applies" if len(names) == 1 else "apply"
        if values is None:
            raise ValueError(f"{listed} {verb} only with {_flag(mode)}, which is not given")
        raise ValueError(f"{listed} {verb} to {_flag(mode)} {' or '.join(values)}, not {_flag(mode)} "
                         f"{getattr(args, mode)}")


def _check_compare_flags(args: argparse.Namespace, measures: list[str]) -> None:
    """compare's flags that need others (--plot a CCA-family measure; ``_check_modal_flags``), the measures' flags
    and --minibatch's: before any work, in flag words."""
    _check_scheduler_flags(args)
    _check_distinct_outputs(args)
    if args.checkpoint is not None:  # as the API checks it, in the flag's words
        check_checkpoint_place(args.checkpoint, "--checkpoint")
        if args.groupby or args.folds is not None:  # (the API's words named groupby, folds and checkpoint)
            flag = "--groupby" if args.groupby else "--folds"
            raise ValueError(f"--checkpoint keeps one Moments of the run: run {flag} without --checkpoint")
        if args.spatial == "features":
            raise ValueError("--spatial features takes no --checkpoint: its Gram pass keeps no Moments to save (a "
                             "larger --memory-limit reads the layers fewer times)")
    if args.plot:
        if not any(chunkcca.MEASURES[name].canonical for name in measures) or args.spatial in PER_FREQUENCY:
            raise ValueError("--plot draws canonical correlation curves: include a CCA-family measure (mean_cca, "
                             "r2_cca, svcca, pwcca) in --measure, and not with --spatial dft (a matrix of "
                             "frequencies)")
        _check_plot(args)
    _check_modal_flags(args)
    _check_measure_flags(args, measures)
    _check_minibatch_flags(args, measures)


def _check_scheduler_flags(args: argparse.Namespace) -> None:
    """--connect-timeout without a scheduler given by address, which it is the wait for: an error, before any work
    (it was taken and read by nothing)."""
    if args.connect_timeout is not None and (args.scheduler is None or args.scheduler in LOCAL_SCHEDULERS):
        given = "is not given" if args.scheduler is None else f"is {args.scheduler}, a local one with no address"
        raise ValueError(f"--connect-timeout {args.connect_timeout:g} is the wait for a scheduler given by address "
                         f"(--scheduler tcp://host:port); --scheduler {given}")


def _check_distinct_outputs(args: argparse.Namespace) -> None:
    """Refuse outputs that name one path (``--checkpoint`` and ``--plot``): the second written found the first
    there, after the run."""
    given: dict[str, str] = {}
    for flag in ("out", "plot", "checkpoint"):
        path = getattr(args, flag, None)
        if path is None:
            continue
        place = os.path.realpath(path)
        if place in given:
            raise ValueError(f"--{given[place]} and --{flag} both name {path}; give each output its own path")
        given[place] = flag


def _compare_values(result: xr.Dataset, measures: list[str]) -> dict[str, dict[str, Any]]:
    """Each measure's value (a number, or a list per group or ridge) and details: its jackknife ``se`` and ``ci``,
    its measure's details (e.g. ``dims_a``), and minibatch CKA's minibatches and rows left out."""
    values = {name: {"value": _scalar(result[name]),
                     **({"se": _scalar(result[f"{name}_se"]), "ci": result[f"{name}_ci"].values.tolist()}
                        if f"{name}_se" in result else {}),
                     **{detail: _scalar(result[key]) for detail in chunkcca.MEASURES[name].details  # one per value
                        if (key := chunkcca.MEASURES[name].detail_name(detail)) in result
                        and set(result[key].dims) <= set(result[name].dims)}}
              for name in measures}
    if "minibatch" in result.attrs:
        values["cka"] |= {key: int(result[key]) for key in ("minibatches", "rows_left_out")}
    return values


def _print_compare_json(args: argparse.Namespace, result: xr.Dataset, values: dict[str, dict[str, Any]]) -> None:
    options = {key: result.attrs[key] for key in ("spatial", "method", "grid", "stride", "precision", "minibatch",
                                                  *SOLVE_NAMES) if key in result.attrs} | {"scheduler": args.scheduler}
    results = {name: {key: _json_value(value) for key, value in shown.items()} for name, shown in values.items()}
    if args.groupby:  # each value is then a list, one per group
        options |= {"groupby": args.groupby, "groups": _json_value(result[args.groupby].values.tolist()),
                    "rows_per_group": result["rows"].values.tolist()}
    if result.attrs.get("rows_omitted"):  # --nan-policy omit left rows out
        options |= {"rows_omitted": result.attrs["rows_omitted"]}
    if args.folds is not None:
        options |= {key: result.attrs[key] for key in ("folds", "folds_by", "confidence") if key in result.attrs}
    ranks = {key: _json_value(result[key].values.tolist()) for key in ("rank_a", "rank_b") if key in result}
    options |= {dim: result[dim].values.tolist() for key in ranks for dim in result[key].dims  # --spatial dft's
                if dim != args.groupby}  # freq_h and freq_w: the rank lists' order
    print(json.dumps({"layer_a": args.layer_a, "layer_b": args.layer_b, "store_a": _recorded(args.store),
                      "store_b": _recorded(args.b_store or args.store), "rows": result.attrs["rows"], **ranks,
                      "options": options, "results": results}, indent=1))  # undefined values (NaN) as null


def _print_compare_table(args: argparse.Namespace, result: xr.Dataset, values: dict[str, dict[str, Any]]) -> None:
    table = [("measure", "value", "details")]
    for name, shown in values.items():
        value = _shown(shown["value"])
        if "ci" in shown and not isinstance(shown["value"], list):  # per ridge or group: the intervals list
            value += f" ± {(shown['ci'][1] - shown['ci'][0]) / 2:.4f}"
        details = ", ".join(f"{result.attrs.get('confidence', 0.95):g} interval {_shown(value)}" if key == "ci"
                            else f"{key} {_shown(value)}" for key, value in shown.items() if key != "value")
        table.append((name, value, details))
    how = (f"minibatches of {args.minibatch} rows" if args.minibatch is not None
           else f"{result.attrs.get('precision', 'float64')} products")
    pair = (f"{args.store}: {args.layer_a} vs {args.b_store}: {args.layer_b}" if args.b_store
            else f"{args.layer_a} vs {args.layer_b}")
    omitted = (f" ({result.attrs['rows_omitted']} left out: NaN, Inf or padding)" if result.attrs.get("rows_omitted")
               else "")
    spatial = " ".join(str(result.attrs[key]) for key in ("spatial", "method") if key in result.attrs) + (
        f" on the {result.attrs['grid']} grid" if "grid" in result.attrs else "")
    print(f"{pair} ({spatial}, stride {args.stride}, {result.attrs['rows']} rows{omitted}, {how})")
    for dim in (args.groupby, "ridge"):  # the dims of list values, in the order they nest
        if dim in result.dims:
            labels = list(map(str, result[dim].values.tolist()))
            if any(", " in label for label in labels):  # "cat, dog" read as two groups, the values under others
                labels = [repr(label) for label in result[dim].values.tolist()]
            print(f"per {dim}: {', '.join(labels)}")
    print(format_table(table, left=(0, 2)))


def _zero_components(rank_a: Any, rank_b: Any, channels_a: int, channels_b: int) -> int:
    """How many of a pair's canonical correlations its ranks (arrays: over groups or frequencies; -1 where not
    solved) leave at 0, at most: min(channels) − min(ranks)."""
    solved = [ranks[ranks >= 0] for ranks in (np.ravel(rank_a), np.ravel(rank_b))]
    if not all(ranks.size for ranks in solved):
        return 0
    return min(channels_a, channels_b) - min(int(solved[0].min()), int(solved[1].min()))


#: What ranks below the channels come from.
RANK_CAUSES = "constant or dependent channels, or fewer rows than channels"


def _note_zero_components(result: xr.Dataset, channels_a: int, channels_b: int) -> None:
    """Say when the layers' ranks leave canonical correlations of 0 that mean_cca and r2_cca count (constant or
    linearly dependent channels: dead units)."""
    ranks_a, ranks_b = result["rank_a"].values, result["rank_b"].values
    if "rho_freq_mean" in result:  # dft: frequencies where CCA is undefined are NaN, in no mean
        defined = ~np.isnan(result["rho_freq_mean"].values)
        ranks_a, ranks_b = ranks_a[defined], ranks_b[defined]
        if not ranks_a.size:
            return
    components = result.sizes["component"]
    zeros = _zero_components(ranks_a, ranks_b, channels_a, channels_b)
    if zeros > 0:
        def span(ranks: Any) -> str:
            return f"{ranks.min()}" if ranks.min() == ranks.max() else f"{ranks.min()} to {ranks.max()}"

        print(f"rank of a {span(ranks_a)} of {channels_a} channels, of b {span(ranks_b)} of {channels_b}: "
              f"{zeros} of the {components} canonical correlations {'is' if zeros == 1 else 'are'} 0 ({RANK_CAUSES}) "
              f"and count{'s' if zeros == 1 else ''} in mean_cca and r2_cca")


def _note_sweep_ranks(result: xr.Dataset, set_a: dict[str, Any], set_b: dict[str, Any]) -> None:
    """Say how many pairs of a sweep have canonical correlations of 0 that mean_cca and r2_cca count
    (``_zero_components``), and name the layers whose rank is below their channels, with their least rank."""
    sides = {"a": list(set_a.items()), "b": list(set_b.items())}
    ranks = {side: result[f"rank_{side}"].transpose("layer_a", "layer_b", ...).values for side in "ab"}
    short: dict[tuple[str, str], tuple[int, int]] = {}  # (side, layer) → (least rank, channels)
    pairs = 0
    for i, j in np.ndindex(len(set_a), len(set_b)):
        layers = {"a": sides["a"][i], "b": sides["b"][j]}
        channels = {side: layer["activations"].sizes["channel"] for side, (_, layer) in layers.items()}
        if _zero_components(ranks["a"][i, j], ranks["b"][i, j], channels["a"], channels["b"]) <= 0:
            continue
        pairs += 1
        for side, (name, _) in layers.items():
            solved = np.ravel(ranks[side][i, j])
            least = min(int(solved[solved >= 0].min()), short.get((side, name), (channels[side],))[0])
            if least < channels[side]:
                short[side, name] = (least, channels[side])
    if pairs:
        named = ", ".join(f"{side} {name} {rank} of {width}" for (side, name), (rank, width) in short.items())
        print(f"{pairs} of {len(set_a) * len(set_b)} pairs have canonical correlations of 0 that mean_cca and r2_cca "
              f"count: the rank is below the channels ({RANK_CAUSES}) of {named}")


def _check_output(path: str, option: str, overwrite: bool, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse, before any work (and again before writing), an output that exists, unless ``overwrite`` (the flag
    ``--overwrite``) is given and ``ours(path)`` says it is ``what`` chunkcca wrote: never another file or folder."""
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise ValueError(f"{option} {path} exists; pass --overwrite to replace it")
    if Path(path).is_symlink():  # what it points to may be anything, and is never written through it
        raise ValueError(f"{option} {path} exists and is a symbolic link; --overwrite never replaces one (nor what it "
                         f"points to): choose another path")
    if not ours(Path(path)):
        raise ValueError(f"{option} {path} exists and is not {what} chunkcca wrote; --overwrite replaces only that, "
                         f"never another file or folder: choose another path")


def _recorded(store: str) -> str:
    """A store as a result records it: a local path absolute (read from another folder, a relative one named
    another store or none), a URL as given."""
    return store if is_url(store) else os.path.abspath(store)


def _is_sweep_result(path: Path) -> bool:
    """Whether ``path`` holds a result that ``chunkcca sweep`` wrote: a netCDF file (.nc) or zarr store (.zarr)
    that ``chunkcca.save_result`` marked (``chunkcca="result"``), with dims ``layer_a`` and ``layer_b`` (not saved
    Moments, not an activation store, not another dataset or another command's result)."""
    try:
        if path.suffix.lower() == ".zarr":
            if not (path / "zarr.json").is_file():
                return False
            with warnings.catch_warnings():  # zarr warns of each file not its own, which the caller names
                warnings.simplefilter("ignore")
                opened = xr.open_zarr(path, consolidated=False, zarr_format=3, chunks=None)
        elif path.is_file():
            opened = xr.open_dataset(path, cache=False)
        else:
            return False
        with opened as dataset:
            return {"layer_a", "layer_b"} <= set(dataset.dims) and dataset.attrs.get("chunkcca") == "result"
    except Exception:  # not a dataset xarray can read: not ours
        return False


def _check_plot_output(args: argparse.Namespace) -> None:
    """An existing --plot is replaced only with --overwrite, and only if the command drew it."""
    if os.path.lexists(args.plot) and args.overwrite and plot_format(args.plot) not in PLOT_MARK_KEYS:
        raise ValueError(f"--plot {args.plot} exists, and --overwrite replaces only a plot chunkcca drew, which it "
                         f"can tell only in .{', .'.join(PLOT_MARK_KEYS)} files (they hold its mark): remove it or "
                         f"choose another path")
    _check_output(args.plot, "--plot", args.overwrite, is_chunkcca_plot, "a plot")


def _save_plot(make_figure: Callable[[], Any], path: str, *, overwrite: bool) -> None:
    """``report.save_figure`` to ``--plot``, checked again first (the run took a while), and a plot put there
    meanwhile named with the flag."""
    _check_output(path, "--plot", overwrite, is_chunkcca_plot, "a plot")
    try:
        save_figure(make_figure, path, overwrite=overwrite)
    except FileExistsError:
        _check_output(path, "--plot", overwrite, is_chunkcca_plot, "a plot")
        raise


class ClusterLost(OSError):
    """A run that failed on its Dask cluster: the scheduler lost, the run's tasks cancelled, workers killed."""


@contextlib.contextmanager
def _connected(args: argparse.Namespace) -> Iterator[Any]:
    """``--scheduler`` as given, or for an address a ``distributed.Client`` connected to it, closed at the end (also
    when the run fails or its scheduler is lost) without a traceback or a wait at exit. A failure of the cluster
    during the run is a ``ClusterLost`` saying whether a ``--checkpoint`` resumes the run."""
    if args.scheduler is None or args.scheduler in LOCAL_SCHEDULERS:
        yield args.scheduler
        return
    timeout = CONNECT_TIMEOUT if getattr(args, "connect_timeout", None) is None else args.connect_timeout
    from chunkcca.cluster import close_quietly, connect, lost_scheduler_unlogged

    client = connect(args.scheduler, timeout=timeout)
    with lost_scheduler_unlogged():  # also while the Client closes: its IO thread logs a lost connection then
        try:
            yield client
        except (Exception, asyncio.CancelledError) as error:
            message = _cluster_failure(error, args, lost=getattr(client, "status", "running") != "running")
            if message is None:
                raise
            raise ClusterLost(message) from error
        finally:
            close_quietly(client)


def _check_plot(args: argparse.Namespace) -> None:
    """Refuse, before any work, a --plot that could not be drawn or saved: with --groupby (one figure, not one per
    group), a folder, a file type matplotlib does not write or a missing folder."""
    from matplotlib.backend_bases import FigureCanvasBase

    if args.groupby:
        raise ValueError(f"--plot {args.plot}: draws one figure of all the datapoints, not one per group; run "
                         f"--groupby {args.groupby} without --plot")
    if Path(args.plot).is_dir():
        raise ValueError(f"--plot {args.plot}: is a folder; name an image file, e.g. plot.png")
    formats = sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})  # pgf runs LaTeX (xelatex)
    if Path(args.plot).suffix.lower().lstrip(".") not in formats:
        raise ValueError(f"--plot {args.plot}: name an image file ending in one of .{', .'.join(formats)}")
    check_output_place(args.plot, "--plot")
    _check_plot_output(args)


def _select(tree: Any, names: list[str], store: str) -> dict[str, Any]:
    """The layers under each of ``names`` (layers or groups), by path, in the order named and, within a group, in
    the store's (network) order."""
    return {path: tree[path] for name in names for path in chunkcca.layer_paths(_layer(tree, name, store))}


def _check_netcdf_rows(args: argparse.Namespace, nodes: Sequence[Any]) -> None:
    """Refuse, before the run, a netCDF ``--out`` that the sweep's row count would not fit: a flatten sweep counts
    a row per position (every ``--stride``-th), the others one per datapoint. (save_result refuses it too, after.)"""
    if Path(args.out).suffix.lower() != ".nc":
        return
    layers = [node["activations"] for node in nodes]
    rows = max(-(-layer.sizes["datapoint"] * (1 if args.spatial in PER_DATAPOINT else int(np.prod(layer.shape[1:-1])))
                 // args.stride) for layer in layers)
    if rows > NETCDF_LARGEST_INT:
        raise netcdf_int_error(f"--out {args.out}", f"this sweep counts up to {rows} rows")


def _run_sweep(args: argparse.Namespace) -> None:
    measures = _measure_names(args.measures, "--measures")
    _check_measure_flags(args, measures)
    _check_minibatch_flags(args, measures)
    _check_scheduler_flags(args)
    _check_distinct_outputs(args)
    out = Path(args.out)
    if "://" in args.out or Path(args.out).suffix.lower() not in (".nc", ".zarr"):
        raise ValueError(f"--out {args.out}: name a local netCDF file (.nc) or zarr store (.zarr)")
    check_output_place(args.out, "--out")
    _check_output(args.out, "--out", args.overwrite, _is_sweep_result, "a sweep result")
    try:  # and what a zarr result holds, also inside its arrays (a user's notes and plots), which would go with it
        chunkcca.check_result_path(out, overwrite=args.overwrite)
    except FileExistsError as error:
        raise ValueError(f"--out {error}") from None
    if args.plot:
        _check_plot(args)
    drawn = args.plot_measure or measures[0]
    if args.plot_measure is not None and (args.plot is None or args.plot_measure not in measures):
        raise ValueError(f"--plot-measure {args.plot_measure} names the measure --plot draws: "
                         + ("pass --plot too" if args.plot is None else f"one of --measures {' '.join(measures)}"))
    tree_a, tree_b = _stores(args)
    set_a, set_b = _select(tree_a, args.a, args.store), _select(tree_b, args.b, args.b_store or args.store)
    stores = (args.store, args.b_store or args.store)
    chosen, left_out = _shared_datapoints({f"{name} in {store}": layer for named, store in zip((set_a, set_b), stores)
                                           for name, layer in named.items()}, args.shared_datapoints)  # each once
    set_a, set_b = ({name: chosen[f"{name} in {store}"] for name in named} for named, store in zip((set_a, set_b),
                                                                                                 stores))
    _check_netcdf_rows(args, [*set_a.values(), *set_b.values()])
    with _connected(args) as scheduler:
        result = chunkcca.similarity(set_a, set_b, measures=measures, **_given_solve_options(args),
                                     **_streaming(args, scheduler))
    # the layers' names are paths in them
    result.attrs.update(store_a=_recorded(args.store), store_b=_recorded(args.b_store or args.store))
    try:
        # again before writing (the run took a while): save_result replaces any result it wrote, a sweep's only here
        _check_output(args.out, "--out", args.overwrite, _is_sweep_result, "a sweep result")
        try:
            chunkcca.save_result(result, out, overwrite=args.overwrite)
        except FileExistsError:  # put there while the sweep ran
            _check_output(args.out, "--out", args.overwrite, _is_sweep_result, "a sweep result")
            raise
    finally:  # saved first (a reader of the table that leaves cannot stop it); shown also if saving failed
        _show_sweep(result, measures, set_a, set_b)
    print(f"results: {out}")
    if args.plot:
        _save_plot(lambda: plot_similarity(result, drawn).figure, args.plot, overwrite=args.overwrite)
        print(f"plot: {args.plot}")
    if left_out:  # once all is done and written: a failure is its one line
        NOTICES.info(left_out)


def _show_sweep(result: xr.Dataset, measures: list[str], set_a: dict[str, Any], set_b: dict[str, Any]) -> None:
    """A sweep's table (each measure and its jackknife error per pair) and its notes."""
    shown = [variable for name in measures for variable in (name, f"{name}_se") if variable in result]
    print(result[shown].to_dataframe().to_string(float_format=lambda v: f"{v:.4f}"))
    if "folds" in result.attrs:
        print(f"_se: jackknife standard error over {result.attrs['folds']} folds; "
              f"{result.attrs['confidence']:g} intervals (_ci) in the results")
    if {"mean_cca", "r2_cca"} & set(measures) and "rank_a" in result:
        _note_sweep_ranks(result, set_a, set_b)
    if result.attrs.get("rows_omitted"):  # from every pair: a row holding NaN or Inf in any layer of the sweep
        omitted = int(result.attrs["rows_omitted"])
        print(f"{omitted} row{'s' if omitted > 1 else ''} left out of every pair (NaN, Inf or padding in any layer "
              f"of the sweep); {result.attrs['rows']} used")


def size_decode_pool() -> None:
    """Give zarr's decoding thread pool one thread per chunk a pass reads ahead (``READ_AHEAD`` per core) in
    this process, unless the user configured it.

    zarr's pool both waits on the disk and decodes. Fewer threads than reads in flight leave the disk idle
    while they decode (cold streaming of 1 GiB: median 1.57 s with two threads against 1.34 s with four); more
    oversubscribe CPU-bound Blosc decoding, and every extra thread grows glibc's malloc arenas (zarr's default
    is cores + 4; docs/performance.md). zarr makes the pool once per process, so the library leaves the choice
    to its users; the command owns its process.
    """
    import zarr

    if zarr.config.get("threading.max_workers", None) is None:
        zarr.config.set({"threading.max_workers": (os.cpu_count() or 2) * max(1, READ_AHEAD)})


@contextlib.contextmanager
def _notices(command: str, before: Callable[[], None] = lambda: None) -> Iterator[None]:
    """chunkcca's notices (its log at INFO: a run resumed from its checkpoint) on stderr while the command runs,
    also under --no-progress; matplotlib's warnings (an .eps plot's "does not support transparency") as the
    command's other warnings are: one line after ``chunkcca <command>: warning:``. ``before`` is called before
    each (the command's warnings held until then are said first)."""
    class OneLine(logging.Formatter):  # as the command's warnings and errors: one line, said what it is
        def format(self, record: logging.LogRecord) -> str:
            first = (record.getMessage().strip().splitlines() or [""])[0]
            return f"chunkcca {command}: {record.levelname.lower()}: {first}"

    logged = []
    for name, level, formatter in (("chunkcca", logging.INFO, logging.Formatter("%(message)s")),
                                   ("matplotlib", logging.WARNING, OneLine())):
        handler, logger = logging.StreamHandler(sys.stderr), logging.getLogger(name)
        handler.setFormatter(formatter)
        handler.addFilter(lambda record: (before(), True)[1])
        logged.append((logger, handler, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # said once, also in a program whose own logging shows INFO
    try:
        yield
    finally:
        for logger, handler, level, propagate in logged:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def _quiet_teardown() -> None:
    """After a Ctrl-C, let what it cut short (zarr's reads pending on its event loop) be torn down at exit without
    asyncio's "Task was destroyed but it is pending!", "coroutine … was never awaited" and "Exception ignored"
    tracebacks under the command's one line (20 lines of them when it came while zarr read a store's metadata).
    The command's process only: these are the process's settings."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    sys.unraisablehook = lambda _: None


def _resume_note(args: argparse.Namespace) -> str:
    """What an interrupted run's --checkpoint holds for the next one."""
    then = _checkpoint_note(args)
    return f"; {then}" if then else ""


def _checkpoint_note(args: argparse.Namespace) -> str:
    """What the next run of the same command does with the run's --checkpoint ("" without one)."""
    checkpoint = getattr(args, "checkpoint", None)
    if not checkpoint:
        return ""
    if os.path.exists(checkpoint):
        return f"run the same command again to resume from the checkpoint {checkpoint}"
    return f"no checkpoint was saved to {checkpoint} yet, so the same command starts again"


def _cluster_failure(error: BaseException, args: argparse.Namespace, *, lost: bool = False) -> str | None:
    """One line for a run that failed on its Dask cluster (the scheduler lost, its tasks cancelled, workers killed),
    saying whether a --checkpoint resumes it; None for any other error. ``error`` or one it was raised from (a
    failure to read layers wraps the one that stopped it) is distributed's or a cancellation, or ``lost`` says
    the Client lost its scheduler (then a failure to reconnect, an OSError, is the cluster's too)."""
    from distributed.comm.core import CommClosedError

    cause: BaseException | None = error
    while cause is not None and not (isinstance(cause, (CommClosedError, concurrent.futures.CancelledError,
                                                        asyncio.CancelledError))
                                     or type(cause).__module__.partition(".")[0] == "distributed"):
        cause = cause.__cause__
    if cause is None and lost and isinstance(error, (OSError, TimeoutError)):
        cause = error
    if cause is None:
        return None
    reason = getattr(cause, "reason", None) or (str(cause).splitlines()[0] if str(cause) else "")
    happened = (f"a task of the run killed workers of the Dask cluster at {args.scheduler}"
                if type(cause).__name__ == "KilledWorker" else
                f"lost the Dask cluster at {args.scheduler} during the run")
    then = _checkpoint_note(args) or "nothing of the run was kept, so the same command starts again" + (
        " (--checkpoint keeps a run's progress)" if args.command == "compare" else "")
    return f"{happened} ({type(cause).__name__}{': ' + reason if reason else ''}); {then}"


def _error_line(error: BaseException) -> str:
    """The first line of ``error``'s message; an OS error as the OS words it, after the file it names ("x.npy:
    Permission denied", not "[Errno 13] Permission denied: 'x.npy'")."""
    if isinstance(error, OSError) and error.strerror and str(error).startswith("[Errno"):
        named = [str(name) for name in (error.filename, error.filename2) if name is not None]
        return f"{' -> '.join(named)}: {error.strerror}" if named else error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command; every failure is one line on stderr and exit status 2, every warning one line."""
    try:
        status = _run(argv)
    except OSError:  # the line itself could not be written (stderr to a full device too): the status still says
        for stream in (sys.stdout, sys.stderr):  # what they hold would fail the exit's flush (status 120): dropped
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        status = 2
    if _as_command():  # all is said: a Ctrl-C while the process tears down (0.35 s) ends it at once, status kept
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, lambda *_: _exit_now(status))
            # and once Python's own teardown begins (which puts back the default handler: killed), ignored
            atexit.register(signal.signal, stop, signal.SIG_IGN)
    return status


class _StandardOutput:
    """``sys.stdout`` whose failures to take a write (> /dev/full) say so: "[Errno 28] No space left on device"
    read as if a file of the command could not be written. Once its reader left (a BrokenPipeError: ``| head``),
    what follows is dropped and the command goes on to write the files it was asked for (it stopped at the first
    print: a --plot after the table was lost, with status 0)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.left = stream, False

    def write(self, text: str) -> int:
        self._said(self.stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._said(self.stream.flush)

    def _said(self, call: Callable[..., Any], *args: Any) -> None:
        if self.left:
            return
        try:
            call(*args)
        except BrokenPipeError:
            self.left = True
            with contextlib.suppress(OSError, ValueError):  # the exit's flush of what it holds then fails quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except OSError as error:
            with contextlib.suppress(OSError, ValueError):  # what it could not take would fail the exit's flush
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())  # too (status 120): dropped
            failed = OSError(f"writing to standard output failed: {error.strerror or error}")
            failed.errno = error.errno
            raise failed from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _exit_now(status: int) -> None:
    """End the process with ``status`` at once, what it printed flushed (not waiting on threads at exit)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def _end_workers() -> None:
    """End the worker processes the run started (``--scheduler processes``), before the command exits on an
    interruption: one still starting once the command was gone printed a traceback (its semaphore gone)."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=5)


def _stopped(args: argparse.Namespace, done: str = "") -> int:
    """Say in one line that a Ctrl-C or SIGTERM stopped the command (``done``: what it wrote before), and what its
    --checkpoint then holds; status 2."""
    print(_interrupted_line([args.command]) + (f"; {done}" if done else "") + _resume_note(args), file=sys.stderr)
    if _as_command():
        _quiet_teardown()
    return 2


def _run(argv: list[str] | None) -> int:
    try:
        _Parser.words = tuple(sys.argv[1:] if argv is None else argv)
        args, stray = build_parser().parse_known_args(argv)
        if stray:
            args.command_parser.error(f"unrecognized arguments: {' '.join(stray)}")
        size_decode_pool()
        if _CTRL_C:  # a Ctrl-C that a finaliser swallowed (``_unraisable``)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print(_interrupted_line(argv), file=sys.stderr)
        return 2

    # warnings are held until the run starts computing (or ends): a check that fails before then is the one line
    # of its failure, not the second after a warning of something else (a layer reordered, then "--folds 1000 …")
    # (on a cluster as they come: local callbacks see none of its computing, and a cluster's warnings of workers
    # it waits for come before it)
    held: list[str] = []
    local = getattr(args, "scheduler", None) is None or args.scheduler in LOCAL_SCHEDULERS
    computing: list[bool] = [] if local else [True]

    def one_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        line = f"chunkcca {args.command}: warning: {str(message).splitlines()[0]}"
        if computing:
            print(line, file=sys.stderr)
        else:
            held.append(line)

    def say_held(*_: Any) -> None:
        computing.append(True)
        while held:
            print(held.pop(0), file=sys.stderr)

    try:
        if sys.stdout is None and args.command in ("compare", "info"):  # >&-; sweep and demo write files
            raise OSError(f"standard output is closed, so the results {args.command} prints would be lost and the "
                          f"status would say all went well; redirect it to a file")
        # stdout that says when it takes no writes; none where the process has none and its output is only a report
        output = contextlib.nullcontext() if sys.stdout is None else contextlib.redirect_stdout(
            _StandardOutput(sys.stdout))
        from dask.callbacks import Callback

        try:
            with warnings.catch_warnings(), output, _notices(args.command, say_held), Callback(start=say_held):
                warnings.showwarning = one_line
                if args.command == "demo":
                    with _connected(args) as scheduler:
                        run_demo(args.out, datapoints=args.datapoints, chunk=args.chunk, seed=args.seed,
                                 precision=args.precision, progress=not args.no_progress, scheduler=scheduler)
                else:
                    {"ingest": _run_ingest, "info": _run_info, "compare": _run_compare,
                     "sweep": _run_sweep}[args.command](args)
                say_held()
                if sys.stdout is not None:  # what is buffered fails here, said in one line, not at the exit
                    sys.stdout.flush()
        except Exception as error:  # after a Ctrl-C or SIGTERM, which may have caused it (an extension module's
            if _CTRL_C or _SIGNALLED:  # ImportError): the interruption
                raise KeyboardInterrupt from error
            raise
        if _CTRL_C:  # a Ctrl-C that a finaliser swallowed (``_unraisable``): the run was asked to stop
            raise KeyboardInterrupt
    except KeyboardInterrupt as interrupt:  # Ctrl-C (after a write: what it wrote)
        _end_workers()
        return _stopped(args, str(interrupt))
    except BrokenPipeError:  # the reader of our output left (| head): nothing more to say, nowhere to say it
        with contextlib.suppress(OSError, ValueError):  # the exit's flush of stdout then fails quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError as error:
        print(f"chunkcca {args.command}: error: out of memory{': ' + str(error).splitlines()[0] if str(error) else ''}",
              file=sys.stderr)
        return 2
    except ImportError as error:  # e.g. the fsspec package of a URL's protocol (s3fs for s3://) is missing
        missing = f"the package {error.name!r} is not installed" if error.name else "a package is missing"
        print(f"chunkcca {args.command}: error: {missing}: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, KeyError, pickle.UnpicklingError) as error:
        message = _error_line(error)
        print(f"chunkcca {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:  # a failure no check foresaw: still one line and status 2, never a traceback
        said = str(error).splitlines()[0] if str(error) else ""
        report = ("" if isinstance(error, Warning) else  # python -W error made a warning an error
                  " (if the input does not explain it, please report it with the command)")
        print(f"chunkcca {args.command}: error: {type(error).__name__}{': ' + said if said else ''}{report}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
