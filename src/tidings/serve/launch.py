"""Starting `tidings serve`: bind, connect the broker, then say where it listens, once.

Start-up failures end the process with one line naming the cause and the fix (exit code 1),
never a traceback: the port is taken or the address is not this machine's, or the broker cannot
be reached. tidings does *not* start without its broker and retry in the background: a node
that cannot publish or subscribe would accept WebSockets it cannot serve. Under a supervisor
(systemd ``Restart=on-failure``, Kubernetes, ...) the supervisor's restart backoff does the
retrying; once running, a lost broker is retried in place and ``/health`` answers 503 meanwhile
(see ``brokers/``).

The order is: bind the socket (so a taken port is reported before anything else starts), start
the hub and its broker, run the application's lifespan, serve; the "listening on" line comes
after all of that. ``launch.run`` is called by ``cli.run``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from ..app import Tidings
    from ..config import Settings

log = logging.getLogger("tidings.serve")


class StartupError(Exception):
    """`tidings serve` cannot start; the message is one line saying why and what to do."""


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: IPv6 addresses in brackets (RFC 3986, section 3.2.2)."""
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host``:``port`` (IPv6 when ``host`` has a colon).

    Raises StartupError naming the address and the option to change."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        where = f"{url_host(bare)}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} is already in use on {url_host(bare)} (another tidings serve?): "
                "stop that process or choose another port with --port or TIDINGS_PORT"
            ) from None
        if exc.errno == errno.EACCES:
            raise StartupError(
                f"not allowed to bind {where}: ports below 1024 need privileges; "
                "choose another port with --port or TIDINGS_PORT"
            ) from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(
                f"cannot bind {where}: {bare!r} is not an address of this machine; "
                "use --host or TIDINGS_HOST (127.0.0.1 for this machine only)"
            ) from None
        raise StartupError(f"cannot bind {where}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class Draining(uvicorn.Server):
    """uvicorn's server that drains the tidings it serves (``tidings``) before it stops:
    `tidings serve` and each worker of ``--workers N``."""

    def __init__(self, config: uvicorn.Config, tidings: Tidings) -> None:
        super().__init__(config)
        self.tidings = tidings

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """SIGTERM or SIGINT: drain, then uvicorn's own shutdown.

        1. Stop accepting: the listening sockets close, so new connections go to the other
           nodes (or workers on the port) at once; a connection that was already accepted
           is refused the way a draining node closes (:meth:`tidings.hub.Hub.drain`).
        2. Close every WebSocket session, spread over ``shutdown_period`` seconds: 3001
           "shutdown" for Centrifugo clients (they reconnect and recover elsewhere), 1012
           for raw ones; each gets what its outbox holds first. HTTP requests keep being
           answered meanwhile, and the broker stays connected.
        3. uvicorn's shutdown: idle keep-alive HTTP connections close, a request in flight is
           answered (with ``connection: close``), within ``close_timeout`` seconds; then the
           lifespan ends, which closes the broker. A second SIGINT skips what is left."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        hub = self.tidings.hub
        settings = self.tidings.settings
        if hub.sessions:
            log.info(
                "draining %d connections over %gs", len(hub.sessions), settings.shutdown_period
            )
        if not self.force_exit:
            drain = asyncio.ensure_future(hub.drain(settings.shutdown_period))
            while not drain.done() and not self.force_exit:
                await asyncio.wait([drain], timeout=0.1)
            if not drain.done():
                drain.cancel()
        # what is left (requests in flight, sessions that never answered) gets close_timeout
        self.config.timeout_graceful_shutdown = max(1, math.ceil(settings.close_timeout))
        # uvicorn's shutdown reaches every connection before its first await: once this line
        # is out, no new request will be started
        log.info("answering requests in flight, then stopping")
        # uvicorn waits for every response to finish before the lifespan ends the sessions:
        # streamed ones (http_stream, sse, uni_*) still open would never finish, so they end
        self.tidings.streaming.shutdown()
        await super().shutdown(sockets)


def stop_timeout(settings: Settings) -> float:
    """Seconds a draining node may take to stop (:meth:`Draining.shutdown`): the drain
    period, the close timeout of its last sessions and of what is left after it, and 5 s for
    the lifespan and the broker; a supervisor waits this long before it kills."""
    return settings.shutdown_period + 2 * (settings.close_timeout + 1.0) + 5.0


class Server(Draining):
    """`tidings serve`'s server: tidings' start, the hub and broker first (a broker failure
    is one line, see the module docstring), then the lifespan; the banner once it listens;
    and the drain on the way out (:class:`Draining`)."""

    def __init__(self, config: uvicorn.Config, tidings: Tidings, banner: str) -> None:
        super().__init__(config, tidings)
        self.banner = banner
        self.failure: StartupError | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        from ..brokers import BrokerUnavailable

        try:
            await self.tidings.start()
        except (BrokerUnavailable, OSError) as exc:
            from ..cli import redact

            broker = redact(self.tidings.settings.broker_url)
            self.failure = StartupError(
                f"cannot reach the broker {broker}: {str(exc).rstrip('. ')}. Start it, or point "
                "--broker or "
                "TIDINGS_BROKER_URL at one that runs"
            )
            self.should_exit = True
            return
        await super().startup(sockets)
        if self.started:
            log.info(self.banner)


def run(settings: Settings, application: Any, tidings: Tidings, options: dict[str, Any]) -> None:
    """Serve ``application`` (its Tidings is ``tidings``) with uvicorn ``options`` until a
    signal stops it; StartupError if it cannot start."""
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    url = f"http://{url_host(settings.host)}:{port}"
    from ..cli import redact

    demo = f", demo page {url}/" if settings.demo else ""
    banner = f"tidings listening on {url} (broker {redact(settings.broker_url)}{demo})"
    config = uvicorn.Config(application, host=settings.host, port=port, log_config=None, **options)
    server = Server(config, tidings, banner)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if server.failure is not None:
        raise server.failure
    if not server.started:
        # uvicorn has logged why (an exception in the application's own lifespan)
        raise StartupError("the application failed to start (see the messages above)")
