"""Files: atomic writes, URLs and fsspec filesystems (no statistics)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def is_url(location: str) -> bool:
    """Whether ``location`` is an fsspec URL (``protocol://…``, or ``protocol:/…`` as pathlib squashes it)
    rather than a local path (a Windows drive letter is one character)."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.\-]+:/", location) is not None


def filesystem(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and root path of a local path or a URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(location), **dict(storage_options or {}))


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool) -> None:
    """Call ``write(tmp_path)`` on a fresh temporary path beside ``path``, then move it into place.

    A write killed midway leaves only a hidden ``.tmp`` folder. An existing ``path`` is replaced
    (only with ``overwrite=True``) after the new one is complete, in one step where the OS can swap two
    folders (Linux); elsewhere by two renames, putting the old one back if the second fails or is
    interrupted.
    """
    if is_url(str(path)):
        raise ValueError(f"{path}: chunkcca writes to local paths only (the write is made atomic by renaming a "
                         f"finished folder into place); write locally and copy, or to a mounted filesystem")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        target = tmp / "data"
        write(target)
        if not path.exists():
            os.replace(target, path)
        elif not exchange_paths(target, path):  # swapped: the old one is at target now
            try:
                os.replace(path, tmp / "old")
                os.replace(target, path)
            except BaseException:
                if not path.exists() and (tmp / "old").exists():
                    os.replace(tmp / "old", path)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    Returns False, changing nothing, where the OS, C library or filesystem cannot.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, or another C library
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0
