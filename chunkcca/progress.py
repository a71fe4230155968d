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
        self.terminal = bool(getattr(out, "isatty", lambda: False)())

    def _draw_bar(self, frac: float, elapsed: float) -> None:
        if not self.terminal:
            return
        bar = "#" * int(self._width * frac)
        tail = f": [{bar:<{self._width}}] {int(100 * frac):3d}% | {format_time(elapsed)}"
        room = self._columns() - len(tail) - 1  # a line longer than the terminal wraps, and \r redraws its last row
        label = self.label if len(self.label) <= room else self.label[: max(room - 1, 0)] + "…"
        with contextlib.suppress(ValueError):
            self._file.write(f"\r{label}{tail}")
            self._file.flush()

    def _columns(self) -> int:
        """The width of the terminal ``out`` is (80 where it cannot be told)."""
        try:
            return os.get_terminal_size(self._file.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 80

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        """A finished bar (a terminal's) or line (a log's) when done; when the computation failed, nothing: its error
        is the one line the failure gets (the bar is wiped; a log's "failed after" line came before the error's)."""
        if self.terminal and not errored:
            super()._finish(dsk, state, errored)
            return
        self._running = False
        self._timer.join()
        self.last_duration = elapsed = default_timer() - self._start_time
        with contextlib.suppress(ValueError):
            self._file.write(f"\r{' ' * (self._columns() - 1)}\r" if self.terminal and errored else
                             "" if errored else f"{self.label}: done in {format_time(elapsed)}\n")
            self._file.flush()
