"""Showing results to a person: aligned text tables, figures saved off-screen, peak memory of a block.

Used by the command line, the demo and the benchmarks alike.
"""

from __future__ import annotations

import gzip
import os
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._fs import expanded, write_atomically


def format_table(rows: list[tuple[str, ...]], *, left: tuple[int, ...] = (0,)) -> str:
    """Rows of cells as aligned text: the columns numbered in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) if i in left else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows)


#: What marks a plot chunkcca drew: the metadata key, per file type, that holds ``PLOT_MARK``. Other types
#: carry no metadata, so chunkcca cannot tell its own from another file and never replaces one.
PLOT_MARK = "chunkcca plot"
PLOT_MARK_KEYS = {"png": "Software", "pdf": "Creator", "svg": "Creator", "svgz": "Creator", "eps": "Creator",
                  "ps": "Creator"}
#: How each type stores the mark (and begins).
PLOT_MARK_BYTES = {"png": (b"\x89PNG", b"tEXtSoftware\x00" + PLOT_MARK.encode()),
                   "pdf": (b"%PDF", b"/Creator (" + PLOT_MARK.encode() + b")"),
                   "svg": (b"", b"<dc:title>" + PLOT_MARK.encode() + b"</dc:title>"),
                   "eps": (b"%!PS", b"%%Creator: " + PLOT_MARK.encode()),
                   "ps": (b"%!PS", b"%%Creator: " + PLOT_MARK.encode())}


def plot_format(path: str | os.PathLike) -> str:
    """A figure file's type, from its suffix ("png")."""
    return Path(path).suffix.lower().lstrip(".")


def is_chunkcca_plot(path: Path) -> bool:
    """Whether ``path`` is a plot that chunkcca drew: a file of its type holding ``PLOT_MARK``."""
    kind = plot_format(path)
    if kind not in PLOT_MARK_KEYS or path.is_symlink() or not path.is_file() or path.stat().st_size > 2**28:
        return False
    try:
        data = path.read_bytes()
        if kind == "svgz":
            kind, data = "svg", gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    start, mark = PLOT_MARK_BYTES[kind]
    return data.startswith(start) and mark in data


def save_figure(make_figure: Callable[[], Any], path: str | os.PathLike, *, overwrite: bool = False,
                dpi: int = 110) -> None:
    """Draw a figure (``make_figure()``) off-screen and write it to ``path`` atomically, marked as chunkcca's
    (``PLOT_MARK`` in its metadata, where its file type has any); an existing ``path`` is replaced only with
    ``overwrite`` and only if it is a plot chunkcca drew (a FileExistsError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = expanded(path)
    kind = plot_format(path)
    metadata = {"metadata": {PLOT_MARK_KEYS[kind]: PLOT_MARK}} if kind in PLOT_MARK_KEYS else {}
    figure = make_figure()
    try:
        write_atomically(path, lambda tmp: figure.savefig(tmp, format=kind, dpi=dpi, **metadata),
                         overwrite=overwrite, replaceable=is_chunkcca_plot, what="a plot")
    finally:
        plt.close(figure)


@dataclass
class PeakMemory:
    """Peak resident memory (MiB) of this process within a ``with`` block (Linux: reset per block)."""

    mib: float = float("nan")

    @contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        status = Path("/proc/self/status")
        resettable = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            resettable = True
        except OSError:
            pass
        yield self
        if resettable and status.exists():
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
            self.mib = int(line.split()[1]) / 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024
