"""What chunkcca sets up on a ``distributed`` cluster; imported only when a Client runs the work."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from distributed.diagnostics.plugin import WorkerPlugin
from distributed.diagnostics.progressbar import TextProgressBar

from . import progress
from ._stack import user_frame, user_stacklevel
from .blas import pin_blas


class PinBlas(WorkerPlugin):
    """Limit BLAS to one thread on every worker, present and future, as distributed's nanny does by default.

    Set in the worker's own event-loop thread: OpenBLAS ignores a limit set from a task's thread
    once its thread pool runs.
    """

    name = "chunkcca-pin-blas"
    idempotent = True  # registered once per cluster: later registrations change nothing

    def setup(self, worker: Any) -> None:
        pin_blas()


class ClusterProgress(TextProgressBar):
    """distributed's progress bar for a cluster's futures, drawn and ended as the local ``progress.Progress``:
    ``label on tcp://host:8786: [####    ]  50% | 1.2s`` redrawn in a terminal, one line when done where ``out``
    (default stderr) is no terminal, and nothing left when the computation failed (its error is then the one line).
    Blocks until the futures finish or fail."""

    def __init__(self, futures: list[Any], client: Any, label: str, out: TextIO | None = None) -> None:
        self.out = sys.stderr if out is None else out
        self.label = f"{label} on {client.scheduler.address}"
        self.terminal = progress.is_terminal(self.out)
        self.ended = False
        super().__init__(futures, scheduler=client.scheduler.address, start=False)
        try:
            self._loop_runner.run_sync(self.listen)
        finally:
            if not self.ended:  # the scheduler's connection closed first: the run's error says why
                self._draw_stop(status="error")

    def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:  # distributed calls it by these names
        if self.terminal:
            progress.draw(self.out, self.label, (1 - remaining / all) if all else 1.0, self.elapsed, self.width)

    def _draw_stop(self, status: str = "error", **kwargs: Any) -> None:
        self.ended = True
        progress.end(self.out, self.label, self.elapsed, terminal=self.terminal, failed=status != "finished",
                     width=self.width)


def prepare_workers(client: Any) -> None:
    """Register ``PinBlas`` on ``client``'s cluster once; a failure only warns (it is an optimisation), and a
    connection lost meanwhile not even that: the run then fails saying so."""
    from distributed.comm.core import CommClosedError

    try:
        client.register_plugin(PinBlas(), name=PinBlas.name)
    except CommClosedError:
        return
    except Exception as error:  # a worker refusing the plugin must not fail the comparison
        if getattr(client, "status", "running") != "running":  # its scheduler lost meanwhile (a plain OSError
            return  # "Timed out trying to connect"): the run says so
        warnings.warn(f"could not limit BLAS to one thread on the workers ({type(error).__name__}: {error}); "
                      f"start them with a nanny, or set OPENBLAS_NUM_THREADS=1 for them", RuntimeWarning,
                      stacklevel=user_stacklevel())


def cluster_threads(client: Any) -> int:
    """Threads of ``client``'s workers, at least 1. With none yet, a warning that the run waits for a worker to
    join: it is planned for one thread and is not refused, since an adaptive cluster starts its workers only once
    the run's tasks reach it (waiting for one before submitting them would wait for ever)."""
    threads = sum(client.nthreads().values())
    if threads == 0:
        warnings.warn(f"the Dask cluster at {_address(client)} has no workers: the run waits until one joins (and is "
                      f"planned for one thread)", RuntimeWarning, stacklevel=user_stacklevel())
    return max(1, threads)


#: Seconds between two looks, while a run's futures are awaited, at whether its cluster still has workers.
WORKERS_LOOK_SECONDS = 2.0


@contextlib.contextmanager
def watching_workers(client: Any) -> Iterator[None]:
    """While the body awaits a run's futures (a progress bar's wait, then ``gathered``), a thread looking every
    ``WORKERS_LOOK_SECONDS`` at whether ``client``'s cluster still has workers: one left without any during the
    run is warned of once, in the name of the user's line (the run waited without a word), and the run waits for
    one to join, as it does for a cluster without workers at its start (``cluster_threads``). A warning the
    warnings filter makes an error is raised here once the body is done."""
    done, raised = threading.Event(), []
    frame = user_frame()
    where = (frame.f_code.co_filename, frame.f_lineno, frame.f_globals) if frame is not None else ("", 0, {})

    def look() -> None:
        while not done.wait(WORKERS_LOOK_SECONDS):
            workers = True
            with contextlib.suppress(Exception):  # a scheduler lost meanwhile: the Client's status says so
                workers = bool(client.nthreads())
            if not workers and not done.is_set():
                try:
                    warnings.warn_explicit(f"the Dask cluster at {_address(client)} lost all its workers during the "
                                           f"run: it waits until one joins (Ctrl-C stops it)", RuntimeWarning,
                                           where[0], where[1],  # (its source found by file name: a module's
                                           # loader, given, failed on __main__ under ``python -m``, a traceback)
                                           registry=where[2].setdefault("__warningregistry__", {}))
                except Warning as error:  # made an error by the filter: raised in the caller's thread
                    raised.append(error)
                return

    watcher = threading.Thread(target=look, name="chunkcca-workers", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(WORKERS_LOOK_SECONDS)
    if raised:
        raise raised[0]


def gathered(client: Any, futures: list[Any]) -> list[Any]:
    """``client.gather(futures)``, except that a Client that lost its scheduler and closed raises a
    CommClosedError at once: its futures then never finish, and gather waited for them forever."""
    from distributed.comm.core import CommClosedError

    pause = 0.001
    while not all(future.done() for future in futures):
        if getattr(client, "status", "running") in ("closing", "closed"):
            raise CommClosedError(f"the Client lost its scheduler at {_address(client)} and closed")
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    return client.gather(futures)


def _address(client: Any) -> str:
    """The address of ``client``'s scheduler, as a message names it."""
    return str(getattr(getattr(client, "scheduler", None), "address", "its address"))


def connect(address: str, *, timeout: float) -> Any:
    """A ``distributed.Client`` connected to the scheduler at ``address``, not made the default.

    A scheduler that does not answer within ``timeout`` seconds is an OSError naming it; an address, protocol or
    security setting that distributed refuses is a ValueError naming it. A Client that fails to connect is closed
    here: distributed leaves it for the interpreter's exit, which waited 20 s on it and printed a traceback.
    """
    from distributed import Client
    from distributed.comm.addressing import parse_address
    from distributed.security import Security

    scheme = parse_address(address)[0] if "://" in address else "tcp"
    if scheme in ("tls", "wss") and Security().get_connection_args("client").get("ssl_context") is None:
        raise ValueError(f"{address}: a {scheme}:// scheduler needs the client's TLS settings in Dask's configuration "
                         f"(distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and .key, e.g. as "
                         f"DASK_DISTRIBUTED__COMM__TLS__CA_FILE); none are set")
    _handshake(address, timeout)
    client = Client.__new__(Client)  # made first, so that one whose __init__ fails can still be closed
    try:
        client.__init__(address, set_as_default=False, timeout=timeout)
    except BaseException as error:
        close_quietly(client)
        if isinstance(error, (OSError, TimeoutError)):
            raise OSError(f"no Dask scheduler answered at {address} within {timeout:g} s (connect_timeout): "
                          f"{type(error).__name__}: {_first_line(error)}") from error
        if isinstance(error, (ValueError, TypeError, KeyError)):
            raise ValueError(f"cannot connect to a Dask scheduler at {address}: {type(error).__name__}: "
                             f"{_first_line(error)}") from error
        raise
    return client


def _handshake(address: str, timeout: float) -> None:
    """Open one connection to ``address`` within ``timeout`` seconds, handshake included, which a Client waits for
    without a limit (a dashboard's port or any other server that does not answer as a scheduler: it hung), and
    ask the server what it is; else an OSError, or a ValueError for a malformed address, a server that answers
    otherwise, or a Dask worker or nanny (a Client failed on it with "Worker.identity() got an unexpected
    keyword argument")."""
    import asyncio
    import concurrent.futures

    from distributed.comm import connect as open_comm
    from distributed.security import Security

    _check_resolves(address, timeout)

    async def shake() -> Any:
        comm = await open_comm(address, timeout=timeout, **Security().get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            await comm.close()

    outcome: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:  # a loop of its own, also under a running one (Jupyter)
        try:
            outcome.set_result(asyncio.run(asyncio.wait_for(shake(), timeout)))
        except BaseException as error:  # handed to the caller
            outcome.set_exception(error)

    # a daemon thread: a Ctrl-C ends the wait at once, and the exit does not wait out the timeout for it (a pool's
    # thread held the command for the whole --connect-timeout)
    threading.Thread(target=run, name="chunkcca-handshake", daemon=True).start()
    try:
        identity = outcome.result()
    except (OSError, TimeoutError) as error:
        raise OSError(f"no Dask scheduler answered at {address} within {timeout:g} s (connect_timeout; a "
                      f"dashboard's port, 8787, is not the scheduler's): {_why_unanswered(error, address)}") from error
    except MemoryError as error:  # a server that sends first (HTTP's "400 Bad Request"), read as a length
        raise ValueError(f"{address} does not answer as a Dask scheduler: the server there speaks another protocol "
                         f"(its first bytes read as a message of exabytes: an HTTP server, a dashboard or a proxy?)"
                         ) from error
    except TypeError as error:  # distributed's UCX connector, abstract without its backend package
        if "abstract" not in str(error):
            raise
        raise ValueError(f"{address}: its protocol is not installed for distributed ({_first_line(error)}; "
                         f"ucx:// needs the distributed-ucxx package)") from error
    except Exception as error:  # a malformed address
        raise ValueError(f"cannot connect to a Dask scheduler at {address}: {type(error).__name__}: "
                         f"{_first_line(error)}") from error
    kind = identity.get("type") if isinstance(identity, dict) else None
    if kind in ("Worker", "Nanny"):  # a scheduler says "Scheduler" (or its subclass's name)
        scheduler = identity.get("scheduler")
        raise ValueError(f"{address} is a Dask {kind.lower()}'s address, not a scheduler's"
                         + (f": its scheduler is at {scheduler}; give that" if scheduler else
                            ": give the scheduler's (its workers' logs name it, \"Registered to: …\")"))


class _Unlogged(logging.Filter):
    """Drops distributed's log records that start with one of ``starts`` (the caller reports what they say)."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def lost_scheduler_unlogged() -> Iterator[None]:
    """Within the block, distributed logs no more than warnings, and not that a Client failed to reconnect to its
    scheduler: its info records on a lost connection carry tracebacks ("Batched Comm Closed", "Lost connection"),
    lines on stderr beside the caller's own one-line error saying the scheduler was lost."""
    unlogged = _Unlogged("Failed to reconnect to scheduler")
    client_logger, distributed_logger = logging.getLogger("distributed.client"), logging.getLogger("distributed")
    level = distributed_logger.level
    client_logger.addFilter(unlogged)
    distributed_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        distributed_logger.setLevel(level)
        client_logger.removeFilter(unlogged)


def close_quietly(client: Any, timeout: float = 5.0) -> None:
    """Close ``client``, whatever state it is in (never connected, connected, its scheduler gone), within about
    ``timeout`` seconds and without a word: no error, no log line, nothing left for the interpreter's exit."""
    quiet = logging.getLogger("distributed.client")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # "Failed to reconnect to scheduler ...": the caller says what happened
    try:
        with contextlib.suppress(Exception):
            client.close(timeout=timeout)
    finally:
        quiet.setLevel(level)


def _why_unanswered(error: BaseException, address: str) -> str:
    """What a connection to ``address`` that failed with ``error`` ran into, in one phrase: a refused connection
    (distributed retries one until the timeout, then says only that it timed out), a server that accepts but
    does not answer, or the error's own first line. A tcp:// address is tried once more, at once, to tell them."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "ConnectionRefusedError" in str(cause):
            return _REFUSED
        cause = cause.__cause__ or cause.__context__
    tried = _tried(address)
    if tried is not None:
        return tried
    return f"{type(error).__name__}: {_first_line(error)}" if str(error) else "no answer"


_REFUSED = "the connection was refused (nothing listens at that port)"


def _tried(address: str) -> str | None:
    """One plain TCP connection to a tcp:// ``address``: what it says of the server there, or None (another
    protocol, or no connection made either way within a second)."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address) if "://" in address else ("tcp", address)
    if scheme != "tcp":
        return None
    try:
        with socket.create_connection(parse_host_port(location), timeout=1.0):
            return "a server accepted the connection but did not answer as a Dask scheduler"
    except ConnectionRefusedError:
        return _REFUSED
    except OSError:
        return None


def _check_resolves(address: str, timeout: float) -> None:
    """An OSError at once for a tcp:// ``address`` whose host name does not resolve: distributed retried it until
    the connect timeout, then said only that nothing answered. A lookup still unanswered after ``timeout`` seconds
    is left to the connection (a daemon thread: the exit does not wait for it)."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address) if "://" in address else ("tcp", address)
        host, port = parse_host_port(location)
    except ValueError:  # malformed: the Client says how, as before
        return
    if scheme != "tcp":
        return
    failed: list[Exception] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:  # unknown, or no host name (an empty or overlong label)
            failed.append(error)
        except Exception:  # anything else: the connection tells
            pass

    lookup = threading.Thread(target=look_up, name="chunkcca-lookup", daemon=True)
    lookup.start()
    lookup.join(timeout)
    if failed:
        raise OSError(f"no Dask scheduler at {address}: its host name {host!r} does not resolve "
                      f"({getattr(failed[0], 'strerror', None) or failed[0]})") from failed[0]


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
