"""The user's frame: the ``stacklevel`` that makes a warning given anywhere in chunkcca name the user's call."""

from __future__ import annotations

import sys
from types import FrameType


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning given by the caller name the first frame outside chunkcca (the
    user's call, whichever entry point it went through; the standard library's ``functools`` and ``contextlib``,
    whose cached properties, partials and context managers chunkcca calls through, are passed over too)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("chunkcca", "functools",
                                                                                          "contextlib"):
        frame, level = frame.f_back, level + 1
    return level


def user_frame() -> FrameType | None:
    """The first frame outside chunkcca (and ``functools``, ``contextlib``) above the caller, as
    ``user_stacklevel`` finds it, for a warning given from another thread in the user's name
    (``warnings.warn_explicit``)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("chunkcca", "functools",
                                                                                          "contextlib"):
        frame = frame.f_back
    return frame
