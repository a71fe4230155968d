"""The user's frame: the ``stacklevel`` that makes a warning given anywhere in chunkcca name the user's call."""

from __future__ import annotations

import sys
from types import FrameType

#: Modules whose frames are passed over on the way to the user's: chunkcca's own, and the standard library's
#: ``functools`` and ``contextlib``, whose cached properties, partials and context managers chunkcca calls through.
PASSED_OVER = ("chunkcca", "functools", "contextlib")


def _first_outside(depth: int) -> tuple[FrameType | None, int]:
    """The first frame not of ``PASSED_OVER`` from ``depth`` frames above the caller of this function's caller
    up, and how many frames above that caller it is (a ``stacklevel``)."""
    frame, level = sys._getframe(depth + 1), depth
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in PASSED_OVER:
        frame, level = frame.f_back, level + 1
    return frame, level


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning given by the caller name the first frame outside chunkcca (the
    user's call, whichever entry point it went through; ``PASSED_OVER`` frames are passed over too)."""
    return _first_outside(2)[1]


def user_frame() -> FrameType | None:
    """The first frame outside chunkcca (and ``PASSED_OVER``) above the caller, as ``user_stacklevel`` finds it,
    for a warning given from another thread in the user's name (``warnings.warn_explicit``)."""
    return _first_outside(1)[0]
