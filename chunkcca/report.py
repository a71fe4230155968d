"""Showing results to a person: aligned text tables, figures saved off-screen, peak memory of a block.

Used by the command line, the demo and the benchmarks alike.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def format_table(rows: list[tuple[str, ...]], *, left: tuple[int, ...] = (0,)) -> str:
    """Rows of cells as aligned text: the columns numbered in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) if i in left else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows)


def save_figure(make_figure: Callable[[], Any], path: str | os.PathLike, *, dpi: int = 110) -> None:
    """Draw a figure (``make_figure()``) off-screen, save it to ``path`` and close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = make_figure()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    print(f"plot: {path}")


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
