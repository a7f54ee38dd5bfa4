"""`tidings serve`: uvicorn with tidings' own protocols, serving the app behind the front door.

:func:`server_options` is what makes `tidings serve` faster than a mounted tidings under plain
uvicorn (bench/RESULTS.md): :class:`~.websocket.FastWebSocket`, :class:`~.http.FastHttp` when
httptools is installed, uvloop, and the limits and heartbeats from the settings.
"""

from __future__ import annotations

import gc
from typing import Any

import typer

from ..config import Settings
from ..protocol import deflate


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn settings of `tidings serve`: the fast WebSocket path, uvloop and httptools
    (FastHttp: the publishing routes without an ASGI cycle, one write per response) when
    installed, and the WebSocket limits and heartbeats from ``settings``. permessage-deflate
    is negotiated only if the settings compress some namespace (see serve/websocket.py)."""
    from .websocket import FastWebSocket

    http: Any = "h11"
    limits: dict[str, Any] = {}
    if _installed("httptools"):
        from .guard import guarded

        http = guarded(settings)  # FastHttp with header/body timeouts and header limits
    else:  # h11 bounds a head still arriving (uvicorn's own limit); no timeouts
        limits["h11_max_incomplete_event_size"] = settings.max_header_size
    return {
        **limits,
        "ws": FastWebSocket,
        "loop": "uvloop" if _installed("uvloop") else "asyncio",
        "http": http,
        "ws_max_size": settings.max_message_size,
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.pong_timeout,
        "ws_per_message_deflate": deflate.offered(settings),
        # a line per publish request costs more than the publish itself: only when debugging
        # (logs.Redact cuts query strings, and the tokens in them, from these lines)
        "access_log": settings.log_level.lower() in ("debug", "trace"),
        # tidings never reads the client address; the middleware would stay suspended in every
        # idle WebSocket and run on every publish
        "proxy_headers": False,
        # Front.__call__ is a plain function returning an awaitable (see front.py)
        "interface": "asgi3",
        "lifespan": "on",
    }


def run(settings: Settings) -> None:
    """Serve ``settings`` as `tidings serve` does, until interrupted (blocks).

    A start-up failure is one line on stderr (a JSON log line with ``log_format = "json"``)
    and :class:`typer.Exit`: status 1 (cannot start: see :mod:`tidings.serve.launch`), 2 (the
    settings cannot make an app)."""
    from .. import logs
    from ..app import create_app
    from ..cli import _fail
    from . import launch
    from .front import Front

    logs.configure(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
        application = Front(app)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    # Everything made so far (the app, FastAPI's and pydantic's objects, tens of thousands
    # tracked by the garbage collector) lives as long as the process; frozen, full collections
    # stop scanning it. They run while connections pour in, and each one is a pause every
    # delivery waits out.
    gc.collect()
    gc.freeze()
    try:
        launch.run(settings, application, app.state.tidings, server_options(settings))
    except launch.StartupError as exc:
        if settings.log_format == "json":  # a log collector reads stderr as JSON lines
            launch.log.error(str(exc), extra={"event": "startup_failed"})
            raise typer.Exit(1) from None
        raise _fail(str(exc), 1) from None


__all__ = ["run", "server_options"]
