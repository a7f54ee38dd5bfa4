"""``tidings serve --workers N``: N processes on one port, each a node of one deployment.

The supervisor (the process the user started) starts N worker processes and watches them:

* each worker binds the port itself with ``SO_REUSEPORT``, so the kernel spreads incoming
  connections over the workers' own accept queues (evenly, by connection 4-tuple hash); where
  ``SO_REUSEPORT`` does not exist the supervisor binds one socket and hands it to every worker;
* each worker is a whole tidings node served as ``tidings serve`` serves one (the fast protocols
  of ``server_options()``, the front door), joined to the others through the configured broker,
  which therefore must be a networked one: ``memory://`` with N > 1 is refused before anything
  starts (:func:`check`);
* a worker that dies is started again (after 0.1 s, doubling up to 10 s while replacements keep
  dying within 30 s of starting); a worker that fails before it ever served stops everything,
  since the next one would fail the same way (a bad broker URL, a port in use);
* SIGTERM or SIGINT to the supervisor stops every worker gracefully (SIGTERM, which uvicorn turns
  into a drained shutdown: :class:`~.launch.Draining`), then kills those still running after
  ``STOP_TIMEOUT`` seconds, or :func:`~.launch.stop_timeout` if the drain may take longer.
  On Linux a worker also receives SIGTERM if the supervisor itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess
from typing import Any
from urllib.parse import urlsplit

from ..config import Settings

log = logging.getLogger("tidings.workers")

#: seconds workers get to drain after SIGTERM before they are killed, at least
STOP_TIMEOUT = 15.0
RESTART_MIN, RESTART_MAX = 0.1, 10.0  # seconds before a dead worker is replaced
STABLE_AFTER = 30.0  # a worker that lived this long resets the restart backoff
#: schemes whose brokers keep everything inside one process
PROCESS_LOCAL = ("memory",)


class WorkersError(Exception):
    """The workers cannot be started (the message is one line, for the command line)."""


def check(settings: Settings, workers: int) -> None:
    """Raise :class:`WorkersError` if ``workers`` processes cannot serve ``settings``:
    fewer than 1, or more than 1 on port 0 or on a broker that keeps everything in one
    process."""
    if workers < 1:
        raise WorkersError(f"--workers must be at least 1, not {workers}")
    if workers > 1 and settings.port == 0:
        raise WorkersError("--workers needs a fixed --port: with 0 each worker would pick its own")
    scheme = urlsplit(settings.broker_url).scheme.lower()
    if workers > 1 and scheme in PROCESS_LOCAL:
        raise WorkersError(
            f"--workers {workers} needs a broker that joins processes, and {scheme}:// keeps "
            "everything inside one process: use --broker redis://HOST:6379 (or postgresql://, "
            "nats://, kafka://), or --workers 1"
        )


def reuse_port_available() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6); OSError if it cannot bind."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _probe(host: str, port: int) -> None:
    """Fail now if the port is taken. With SO_REUSEPORT a worker would otherwise join any other
    server of this user that listens there with SO_REUSEPORT (another `tidings serve
    --workers`), and both would get half the connections."""
    try:
        bind(host, port, reuse_port=False).close()
    except OSError as exc:
        raise WorkersError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# -- the worker process ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _worker(
    settings: Settings, index: int, sock: socket.socket | None, ready: Connection
) -> None:  # runs in the worker process
    _die_with_parent()
    import gc

    import uvicorn

    from .. import logs
    from ..app import create_app
    from .front import Front
    from .launch import Draining
    from .server import server_options

    logs.configure(settings.log_level, settings.log_format)
    if sock is None:
        sock = bind(settings.host, settings.port, reuse_port=True)
    application = Front(create_app(settings))
    gc.collect()  # as cli.run: what lives as long as the process is not scanned again
    gc.freeze()

    class Worker(Draining):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                with contextlib.suppress(OSError):
                    ready.send(os.getpid())

    level = settings.log_level.lower()
    config = uvicorn.Config(
        application, log_config=None, log_level=level, **server_options(settings)
    )
    Worker(config, application.state.tidings).run(sockets=[sock])


# -- the supervisor ----------------------------------------------------------------------------


class _Slot:
    """One worker position: the current process, and how its predecessors fared."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        self.ready: Connection | None = None
        self.started_at = 0.0
        self.served = False  # the current process reported it serves
        self.ever_served = False
        self.delay = RESTART_MIN
        self.restart_at: float | None = None


class Supervisor:
    """Start ``workers`` processes serving ``settings`` and keep them running; see the module
    docstring. :meth:`run` returns the exit status for the command line."""

    def __init__(self, settings: Settings, workers: int) -> None:
        check(settings, workers)
        self.settings = settings
        self.slots = [_Slot(i) for i in range(workers)]
        self._context = multiprocessing.get_context("spawn")
        self._shared: socket.socket | None = None
        self._stop = threading.Event()
        self._signalled: int | None = None
        self._announced = False

    def _announce(self) -> None:
        """The "listening" line of `tidings serve`, once every worker serves (as
        :mod:`.launch` says it once a single process does)."""
        from ..cli import redact
        from .launch import url_host

        settings = self.settings
        url = f"http://{url_host(settings.host)}:{settings.port}"
        log.info(
            "tidings listening on %s (broker %s, %d workers)",
            url, redact(settings.broker_url), len(self.slots),
        )  # fmt: skip
        self._announced = True

    def _start(self, slot: _Slot) -> None:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker,
            args=(self.settings, slot.index, self._shared, send),
            name=f"tidings-worker-{slot.index}",
        )
        process.start()
        send.close()
        slot.process, slot.ready = process, receive
        slot.started_at, slot.served, slot.restart_at = time.monotonic(), False, None
        log.info("worker %d started (pid %d)", slot.index, process.pid)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = signum
        self._stop.set()

    def run(self) -> int:
        settings = self.settings
        if reuse_port_available():
            _probe(settings.host, settings.port)
        else:
            try:
                self._shared = bind(settings.host, settings.port, reuse_port=False)
            except OSError as exc:
                raise WorkersError(
                    f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
                ) from None
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for slot in self.slots:
                self._start(slot)
            return self._watch()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._shared is not None:
                self._shared.close()

    def _watch(self) -> int:
        while not self._stop.is_set():
            waitables: list[Any] = []
            for slot in self.slots:
                if slot.process is not None:
                    waitables.append(slot.process.sentinel)
                    if not slot.served and slot.ready is not None:
                        waitables.append(slot.ready)
            wait_any(waitables, timeout=0.5)
            now = time.monotonic()
            for slot in self.slots:
                status = self._check(slot, now)
                if status is not None:
                    return status
        log.info("stopping %d workers (signal %s)", len(self.slots), self._signalled)
        return 0

    def _check(self, slot: _Slot, now: float) -> int | None:
        process = slot.process
        if process is None:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)
            return None
        if not slot.served and slot.ready is not None and slot.ready.poll():
            with contextlib.suppress(EOFError, OSError):
                slot.ready.recv()
                slot.served = slot.ever_served = True
                log.info("worker %d (pid %d) serves", slot.index, process.pid)
                if not self._announced and all(s.served for s in self.slots):
                    self._announce()
        if process.is_alive():
            return None
        process.join()
        code = process.exitcode
        if slot.ready is not None:
            slot.ready.close()
        slot.process, slot.ready = None, None
        if self._stop.is_set():
            return None
        if not slot.served and not slot.ever_served:
            log.error(
                "worker %d (pid %d) exited with code %s before serving; stopping",
                slot.index, process.pid, code,
            )  # fmt: skip
            return 1
        lived = now - slot.started_at
        slot.delay = RESTART_MIN if lived >= STABLE_AFTER else min(slot.delay * 2, RESTART_MAX)
        slot.restart_at = now + slot.delay
        log.error(
            "worker %d (pid %d) exited with code %s; starting another in %.1fs",
            slot.index, process.pid, code, slot.delay,
        )  # fmt: skip
        return None

    def _stop_all(self) -> None:
        running = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for process in running:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        from .launch import stop_timeout

        timeout = max(STOP_TIMEOUT, stop_timeout(self.settings))
        deadline = time.monotonic() + timeout
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker pid %d did not stop in %.0fs", process.pid, timeout)
                process.kill()
                process.join()
        for slot in self.slots:
            slot.process = None


def supervise(settings: Settings, workers: int) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; the exit status.
    :class:`WorkersError` if they cannot start (see :func:`check`)."""
    from .. import logs

    logs.configure(settings.log_level, settings.log_format)
    return Supervisor(settings, workers).run()
