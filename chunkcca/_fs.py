"""Files: atomic writes, temporary folders that say whose they are, URLs and fsspec filesystems (no statistics)."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: The file in each temporary folder that names the process writing it.
OWNER = "owner.json"
#: The attribute of an activation store's root group that lists its layers (in network order): it marks a store.
ORDER_ATTR = "chunkcca_layers"


def is_url(location: str) -> bool:
    """Whether ``location`` is an fsspec URL (``protocol://…``, or ``protocol:/…`` as pathlib squashes it)
    rather than a local path (a Windows drive letter is one character)."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.\-]+:/", location) is not None


def expanded(path: str | os.PathLike) -> str:
    """``path`` as a str, a leading ``~`` or ``~user`` expanded to the home folder, as xarray opens and writes
    stores (Python's ``open`` and ``pathlib`` take it as a folder named ``~``; a URL, which starts with its
    protocol, is as given; an empty one is a ValueError). A local path ending in ``.`` or ``..`` (``"."``,
    ``"x/a/.."``) is resolved (``..`` through links, as the OS takes it): it names a folder by no name of its
    own, so what is written beside it (a temporary copy) went inside it."""
    location = os.fspath(path)
    if not isinstance(location, str):
        raise TypeError(f"a path is a str or os.PathLike of str, got {type(location).__name__} ({location!r})")
    if not location:  # read as the current folder by some, as a file by others
        raise ValueError("a path is empty: name a file or folder ('.' for the current folder)")
    location = os.path.expanduser(location)
    if not is_url(location) and os.path.basename(location.rstrip("/")) in (".", ".."):  # "x/a/..", not "x/../a"
        return os.path.realpath(location)  # ".." through links, as the OS takes it
    return location


def filesystem(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and root path of a local path or a URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(location), **dict(storage_options or {}))


def zarr_attributes(path: Path) -> dict[str, Any]:
    """The attributes in the ``zarr.json`` of the zarr group or array at ``path``; {} where there is none or it is
    not JSON. Reads one small file."""
    try:
        metadata = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    attributes = metadata.get("attributes", {}) if isinstance(metadata, dict) else {}
    return attributes if isinstance(attributes, dict) else {}


def every_chunk_written() -> Any:
    """A context in which zarr writes every chunk, also one equal to the fill value (so that a chunk file that
    is missing is always damage, never a chunk of zeros left out)."""
    import zarr

    return zarr.config.set({"array.write_empty_chunks": True})


def json_digest(value: Any) -> str:
    """A digest of ``value`` as canonical JSON (keys sorted): the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def store_holding(path: str | os.PathLike) -> Path | None:
    """The activation store whose folder holds ``path`` (the nearest ancestor whose zarr metadata lists layers),
    or None: a group or layer of it, or anything put inside it, in a folder of its own or not."""
    for folder in Path(path).resolve().parents:
        if ORDER_ATTR in zarr_attributes(folder):
            return folder
    return None


def check_outside_stores(path: str | os.PathLike, what: str) -> None:
    """Refuse an output ``path`` (``what``: its option or kind, for the message) inside an activation store: a file
    or group put there changes an input, and the store then warns of it or no longer opens."""
    store = store_holding(path)
    if store is not None:
        raise ValueError(f"{what} {path}: is inside the activation store {store}; chunkcca never writes into a "
                         f"store (it would no longer open as one): choose a path outside it")


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """New files can be made in the existing ``folder``, else a PermissionError naming ``what`` is to be written
    there: a read-only file system or a folder without permission is named before any work, not by the temporary
    file of the last step."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: the folder {folder} cannot be written to (a read-only file system, or no "
                              f"permission)")
    try:  # what the permissions do not say (/sys, /proc, some network mounts): a file made and removed at once
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise PermissionError(f"{what}: no file can be made in the folder {folder} ({error.strerror or error})"
                              ) from error


def leftovers(path: str | os.PathLike) -> list[tuple[Path, bool]]:
    """The temporary folders beside ``path`` that writes of it left (``.<name>.*.tmp``), each with whether it is
    stale: its writer, a process of this machine, is gone (a folder with no owner, from an older chunkcca, is
    not called stale)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = []
    pattern = f".{glob.escape(path.name)}.*.tmp"  # a name may hold [ ] * ?; mkdtemp's own part holds no "."
    for folder in sorted(candidate for candidate in path.parent.glob(pattern)
                         if "." not in candidate.name[len(path.name) + 2 : -len(".tmp")]):
        try:
            owner = json.loads((folder / OWNER).read_text())
        except (OSError, ValueError):
            found.append((folder, False))
            continue
        found.append((folder, is_stale(owner)))
    return found


def owner_record() -> dict[str, Any]:
    """Who is writing (this process, on this machine) and since when: what ``is_stale`` reads."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def is_stale(owner: Mapping[str, Any]) -> bool:
    """Whether the writer ``owner`` (an ``owner_record()``) is gone: a process of this machine no longer running
    (one of another machine cannot be told gone, and is not)."""
    return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", 0)))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` against every other process and thread that asks for it, and
    remove the file afterwards. POSIX ``flock``; a lock taken on a file another holder has removed meanwhile
    is dropped and taken again on the file now there. On a system without ``flock``, no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    while True:
        descriptor = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            current = os.stat(lock_file)
        except FileNotFoundError:
            current = None
        held = os.fstat(descriptor)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(descriptor)  # the file was removed by the holder before us: lock the one there now
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_file)
        os.close(descriptor)  # unlinked while held: the next holder makes a new file


def fails_checksum(error: BaseException) -> bool:
    """Whether ``error`` is zarr's for a chunk whose CRC32C does not match its bytes (a damaged file)."""
    return "Stored and computed checksum do not match" in str(error)


@contextlib.contextmanager
def temporary_beside(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden folder beside ``path`` (so renames from it are atomic), naming its writer, removed afterwards.

    Stale folders that killed writes of ``path`` left are removed first. Missing folders on the way to ``path``
    are made (as xarray's ``to_zarr`` makes them), and removed again, if still empty, when the write fails.
    """
    path = Path(path)
    made, folder = [], path.parent  # the missing folders, innermost first
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{path} cannot be written: {folder} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for folder, stale in leftovers(path):
            if stale:
                shutil.rmtree(folder, ignore_errors=True)
        for attempt in range(3):
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
                break
            except FileNotFoundError:  # another writer's failed write removed a folder both found missing
                if attempt == 2:
                    raise
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            (tmp / OWNER).write_text(json.dumps(owner_record()))
            yield tmp
        except BaseException:
            _remove(tmp, settle=SETTLE_SECONDS)
            raise
        else:
            _remove(tmp)
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # one holding anything (another writer's temporary folder) stays
                folder.rmdir()
        raise


#: How long a write cut short (Ctrl-C, SIGTERM, an error) waits for its folder to stay removed: the threads of
#: Dask's pool finish the tasks they were given, writing chunk files (and their folders) after the removal.
SETTLE_SECONDS = 0.3


def _remove(tmp: Path, settle: float = 0.0) -> None:
    """Remove the folder ``tmp``, the owner file last (a removal cut short leaves a folder the next write knows is
    stale); with ``settle``, again until it stays gone that long (at most 10 s): an interrupted write's threads
    made it again (a SIGTERM left `.demo.zarr.XXXX.tmp` beside the store)."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):  # files that late threads make and remove meanwhile: the next round's
            for child in tmp.iterdir() if tmp.is_dir() else ():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                elif child.name != OWNER:
                    child.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if not settle or time.monotonic() > deadline:
            return
        time.sleep(settle)
        if not tmp.exists():
            return


def check_local(path: str | os.PathLike) -> None:
    """Refuse an fsspec URL as a place to write: chunkcca's writes are atomic renames of finished folders."""
    if is_url(str(path)):
        raise ValueError(f"{path}: chunkcca writes to local paths only (the write is made atomic by renaming a "
                         f"finished folder into place); write locally and copy, or to a mounted filesystem")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool,
                     replaceable: Callable[[Path], bool] | None = None, what: str = "a file",
                     lock: Path | None = None) -> None:
    """Call ``write(tmp_path)`` on a fresh temporary path beside ``path``, then move it into place.

    A write killed midway leaves only a hidden ``.tmp`` folder (removed by the next write of ``path``). Without
    ``overwrite`` an existing ``path`` is an error, also when another writer puts one there meanwhile: exactly
    one of two concurrent writers wins. With ``overwrite`` an existing ``path`` is replaced after the new one is
    complete, in one step where the OS can swap two folders (Linux), elsewhere by two renames (putting the old
    one back if the second fails), and only if ``replaceable(path)`` says it is ``what`` (e.g. an activation
    store), never whatever else stands there. ``lock`` (a lock file, ``exclusive()``) is held while it is put in
    place, so that a writer that changes ``path`` in place under that lock (an append) is not cut in two.
    """
    check_local(path)
    check_outside_stores(path, what)
    path = Path(path)
    check_replaceable(path, overwrite, replaceable, what)
    written = False
    try:
        with naming_target(path, what), temporary_beside(path) as tmp:  # a full disk: named from the first folder
            target = tmp / "data"
            write(target)
            with exclusive(lock) if lock is not None else contextlib.nullcontext():
                if not overwrite:
                    rename_no_replace(target, path)
                    written = True
                    return
                check_replaceable(path, overwrite, replaceable, what)
                if not path.exists():
                    rename_no_replace(target, path)
                elif not exchange_paths(target, path):  # swapped: the old one is at target now
                    try:
                        os.replace(path, tmp / "old")
                        os.replace(target, path)
                    except BaseException:
                        if not path.exists() and (tmp / "old").exists():
                            os.replace(tmp / "old", path)
                        raise
                written = True
    except KeyboardInterrupt:
        if written:  # while the temporary folder (the old copy) was removed
            raise InterruptedAfterWrite(f"{what} {path} was written whole before it (the removal of the temporary "
                                        f"folder beside it was cut short; the next write removes it)") from None
        raise


class InterruptedAfterWrite(KeyboardInterrupt):
    """A Ctrl-C that came once a write had put its result in place: the message says what was written."""


#: OS errors only a write gives: no space, over a quota, a read-only filesystem, a file too large.
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


@contextlib.contextmanager
def naming_target(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Name ``path`` (``what`` is written there) in an OS error of the block that only a write gives (a full
    disk, a quota, a read-only file system): it named no file ("[Errno 28] No space left on device") or one in the
    write's temporary folder, or a part written inside it (ingest's). Any other error (an input that could not
    be read, named or not, a full disk elsewhere, e.g. where Dask spills) passes as is."""
    try:
        yield
    except OSError as error:
        if error.errno not in WRITE_ERRORS or (not isinstance(error, NamedWriteError) and error.filename is not None
                                               and not _in_temporary(error.filename, path)):
            raise
        cause = error.__cause__ if isinstance(error, NamedWriteError) else error  # an inner write's: the OS's own
        failed = NamedWriteError(error.errno, f"writing {what} {path} failed: {cause.strerror or cause}")
        raise failed from cause


def _in_temporary(filename: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``filename`` lies in a temporary folder beside ``path`` (``temporary_beside``)."""
    try:
        relative = Path(os.path.abspath(filename)).relative_to(Path(os.path.abspath(path)).parent)
    except ValueError:
        return False
    first = relative.parts[0] if relative.parts else ""
    return first.startswith(f".{Path(path).name}.") and first.endswith(".tmp")


class NamedWriteError(OSError):
    """A write error (``WRITE_ERRORS``) naming what was being written, not a temporary path."""

    def __str__(self) -> str:
        return str(self.strerror)


def check_replaceable(path: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None, what: str) -> None:
    """``path`` may be written: it does not exist, or ``overwrite`` is set and ``replaceable(path)`` says it is a
    ``what`` chunkcca wrote; else a FileExistsError saying which."""
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if path.is_symlink():
        raise FileExistsError(f"{path} exists and is a symbolic link; overwrite=True never replaces one (nor what it "
                              f"points to): choose another path")
    if replaceable is not None and not replaceable(path):
        raise FileExistsError(f"{path} exists and is not {what} chunkcca wrote; overwrite=True replaces only "
                              f"that, never anything else: choose another path")
    check_folder_replaceable(path)


def check_folder_replaceable(path: str | os.PathLike) -> None:
    """A folder at ``path`` that cannot be moved aside (not writable itself: moving a folder rewrites its own
    entry '..') is a PermissionError saying so."""
    if os.path.isdir(path) and not os.access(path, os.W_OK):
        raise PermissionError(f"{path} cannot be replaced: the folder itself cannot be written to (made read-only "
                              f"to keep it, or no permission); make it writable (chmod u+w) to replace it, or choose "
                              f"another path")


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, failing with FileExistsError if ``target`` exists (also when it appears
    meanwhile): Linux ``renameat2`` with ``RENAME_NOREPLACE``; elsewhere a hard link for files, a rename for
    folders (which fails onto a folder that is not empty)."""
    if _renameat2(source, target, flags=1):
        return
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if source.is_dir():
        os.rename(source, target)
    else:
        os.link(source, target)
        os.unlink(source)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    Returns False, changing nothing, where the OS, C library or filesystem cannot.
    """
    return _renameat2(a, b, flags=2)


def _renameat2(source: Path, target: Path, *, flags: int) -> bool:
    """Linux ``renameat2``: True if done; False where unavailable; FileExistsError for RENAME_NOREPLACE onto an
    existing ``target``."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, or another C library
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), flags) == 0:
        return True
    errno = ctypes.get_errno()
    if errno == 17:  # EEXIST
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    return False


#: What macOS's Finder leaves in every folder it shows (its view settings, AppleDouble files): not a user's.
FINDER_FILES = (".DS_Store", "._")


def group_foreign_files(path: Path, ours: Callable[[str], bool], most: int = 3) -> list[str]:
    """Up to ``most`` things in the flat zarr group at ``path`` (a saved result, saved Moments) that chunkcca did
    not write, as paths within it: anything but its metadata and the arrays that ``ours`` names, each holding
    its metadata and the chunk files its grid names (a user's notes or plots put inside it)."""
    found: list[str] = []
    for name in sorted(os.listdir(path)):
        if name == "zarr.json" or name.startswith(FINDER_FILES):
            continue
        if not ours(name) or not (path / name).is_dir() or array_foreign(path / name, path, found):
            found.append(name)
    return found[:most]


def array_foreign(folder: Path, store: Path, found: list[str]) -> bool:
    """Whether ``folder``, inside a layer of ``store``, is not an array; what an array holds besides its metadata
    and the chunk files its grid names goes to ``found``, as paths within ``store``. A folder whose metadata cannot
    be parsed is taken for a damaged array of chunkcca's, which an overwrite repairs."""
    try:
        metadata = json.loads((folder / "zarr.json").read_text())
    except OSError:
        return True
    except ValueError:
        return False
    if metadata.get("node_type") != "array":
        return True
    keys = set(chunk_keys(metadata).values())
    # the folders chunk files lie in: one left empty where its chunk file was lost is the array's, damaged (what
    # reading it says), not a user's
    places = {parent.as_posix() + "/" for key in keys for parent in Path(key).parents if parent != Path(".")}
    held = set()
    for root, dirs, names in os.walk(folder):
        within = Path(root).relative_to(folder)
        held |= {(within / name).as_posix() for name in names}
        held |= {(within / name).as_posix() + "/" for name in dirs if not os.listdir(Path(root, name))}  # empty
    found += [f"{folder.relative_to(store).as_posix()}/{name}" for name in sorted(held - keys - places - {"zarr.json"})
              if not Path(name).name.startswith(FINDER_FILES)]
    return False


def _chunk_grid(metadata: dict[str, Any]) -> tuple[list[int], str, str]:
    """A zarr v3 array's chunk grid (chunks along each dim), its chunk key encoding's name and its separator."""
    chunk_shape = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    encoding = metadata.get("chunk_key_encoding", {"name": "default"})
    separator = encoding.get("configuration", {}).get("separator", "/" if encoding["name"] == "default" else ".")
    return [-(-size // chunk) for size, chunk in zip(metadata["shape"], chunk_shape)], encoding["name"], separator


def path_under(root: str, *parts: str) -> str:
    """The path of ``parts`` (a layer, "/" for the store's root; its arrays, files) under a store's ``root``:
    "root///activations" was no path on fsspec's memory filesystem."""
    return "/".join([root, *(part.strip("/") for part in parts if part.strip("/"))])


def chunk_keys(metadata: dict[str, Any]) -> dict[tuple[int, ...], str]:
    """Every stored object's key (chunk, or shard) of a zarr v3 array, by its grid index, from its metadata."""
    grid, encoding, separator = _chunk_grid(metadata)
    keys = {}
    for index in itertools.product(*map(range, grid)):  # C order
        parts = separator.join(map(str, index))
        keys[index] = (f"c{separator}{parts}" if parts else "c") if encoding == "default" else (parts or "0")
    return keys


def chunk_place(metadata: dict[str, Any], key: str) -> int | None:
    """Where the stored object ``key`` of a zarr v3 array (its ``metadata``) comes in ``chunk_keys``' order (C
    order of the grid); None for a key that names none of its chunks. Parsed, not looked up: no key list is built
    (zarr 3.1.6's ``decode_chunk_key`` fails on the default encoding's keys: "c/3/0" read as "/3/0")."""
    grid, encoding, separator = _chunk_grid(metadata)
    if encoding == "default":
        if key != "c" and not key.startswith(f"c{separator}"):
            return None
        parts = key[2:].split(separator) if key != "c" else []
    else:
        parts = key.split(separator) if grid else ([] if key == "0" else ["not a chunk"])
    if len(parts) != len(grid) or not all(part.isdigit() for part in parts):
        return None
    place = 0
    for index, count in zip(map(int, parts), grid):
        if index >= count:
            return None
        place = place * count + index
    return place
