"""Progress bars that say what they are reading, and write no carriage-return noise into logs.

``Progress`` is Dask's local progress bar (a scheduler callback) with a label: in a terminal it
redraws one line, ``reading 'model0/conv', 'model1/conv': [#####     ] 50% | 1.2s``; on a stream that is
not a terminal (a log file, CI, a pipe) it writes one line when the computation is done and nothing before.
A computation that fails leaves no bar or line: its error says what failed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from timeit import default_timer
from typing import Any, TextIO

from dask.diagnostics import ProgressBar
from dask.utils import format_time


class Progress(ProgressBar):
    """Dask's progress bar for the local schedulers, labelled; one final line where ``out`` is no terminal.

    Parameters
    ----------
    label
        What is being computed, e.g. "reading 'a', 'b'".
    out
        The stream (default ``sys.stderr``, so that standard output stays for results).
    """

    def __init__(self, label: str, out: TextIO | None = None) -> None:
        out = sys.stderr if out is None else out
        super().__init__(out=out)
        self.label = label
        self.terminal = is_terminal(out)

    def _draw_bar(self, frac: float, elapsed: float) -> None:
        if self.terminal:
            draw(self._file, self.label, frac, elapsed, self._width)

    def _start(self, dsk: Any) -> None:
        self._stopped = threading.Event()
        super()._start(dsk)

    def _timer_func(self) -> None:
        """Redraw every ``dt`` until told to stop; woken at once then (Dask's timer slept ``dt`` out, 0.1 s added to
        every computation, and counted in its time)."""
        while not self._stopped.is_set():
            self._update_bar(default_timer() - self._start_time)
            self._stopped.wait(self._dt)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        self.last_duration = elapsed = default_timer() - self._start_time
        self._running = False
        self._stopped.set()
        self._timer.join()
        end(self._file, self.label, elapsed, terminal=self.terminal, failed=errored, width=self._width)


def is_terminal(out: TextIO) -> bool:
    return bool(getattr(out, "isatty", lambda: False)())


def columns(out: TextIO) -> int:
    """The width of the terminal ``out`` is (80 where it cannot be told: a pseudo-terminal of no size says 0)."""
    try:
        return os.get_terminal_size(out.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def draw(out: TextIO, label: str, frac: float, elapsed: float, width: int = 40) -> None:
    """Redraw a terminal's bar line: ``label: [####    ]  50% | 1.2s``, the label cut to the terminal's width."""
    tail = f": [{'#' * int(width * frac):<{width}}] {int(100 * frac):3d}% | {format_time(elapsed)}"
    room = columns(out) - len(tail) - 1  # a line longer than the terminal wraps, and \r redraws its last row
    label = label if len(label) <= room else label[: max(room - 1, 0)] + "…"
    with contextlib.suppress(ValueError):
        out.write(f"\r{label}{tail}")
        out.flush()


def end(out: TextIO, label: str, elapsed: float, *, terminal: bool, failed: bool, width: int = 40) -> None:
    """End a bar: on a terminal, drawn whole and left, or wiped if the computation ``failed``; elsewhere (a log), the
    one line ``label: done in 1.2s``, or nothing if it failed. Either way a failure's error is its one line."""
    if terminal and not failed:
        draw(out, label, 1.0, elapsed, width)
    with contextlib.suppress(ValueError):
        out.write("\n" if terminal and not failed else f"\r{' ' * (columns(out) - 1)}\r" if terminal else
                  "" if failed else f"{label}: done in {format_time(elapsed)}\n")
        out.flush()
