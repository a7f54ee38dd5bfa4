"""`tidings run module:app`: your own FastAPI app on the server `tidings serve` uses.

A tidings mounted in an app under plain uvicorn delivers through uvicorn's WebSocket protocol
and the ASGI ``send`` of every connection, and every publish request walks the app's
middleware and routing. ``tidings run`` serves the same app with the protocols of `tidings
serve` (:func:`~.server.server_options`: FastWebSocket's direct writes, FastHttp's one write per
response, uvloop) and puts a :class:`~.front.Front` before it, which answers tidings' own routes
(the WebSocket endpoints and ``POST .../api/{method}``, ``POST .../publish/{channel}``) under
the prefix the app included them at. Everything else goes to the app as usual.

The Front only stands before an app where skipping the app's routing changes nothing but the
speed: an app with middleware of its own (``app.add_middleware``) or with dependencies on
tidings' routes (``FastAPI(dependencies=...)``, ``include_router(..., dependencies=...)``)
keeps every request going through the app, on the same fast protocols. The start-up log line
says which it is.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.routing import Mount, WebSocketRoute

if TYPE_CHECKING:
    from ..app import Tidings

log = logging.getLogger("tidings.run")

RAW_ROUTE = "/ws/{channel}"


class RunError(Exception):
    """`tidings run` cannot serve this app; the message says why and what to do."""


@dataclass
class Found:
    """Where an app included a Tidings' router."""

    tidings: Tidings
    #: the path the router was included under: ``""`` at the root, or ``"/rt"``
    prefix: str
    #: why every request still goes through the app, or None when Front may take the hot routes
    through_app: str | None


def _routes(routes: list[Any], prefix: str = "", deps: bool = False) -> list[tuple[str, Any, bool]]:
    """Every route of an app: the path it answers, the route, whether dependencies of the app
    or of an ``include_router()`` apply to it. Follows ``app.mount()``, and the included
    routers FastAPI keeps unflattened since 0.165 (their ``original_router`` and
    ``include_context``); older FastAPI copies included routes into the app."""
    found: list[tuple[str, Any, bool]] = []
    for route in routes:
        if isinstance(route, Mount):
            found.extend(_routes(list(route.routes), prefix + route.path, deps))
            continue
        inner = getattr(route, "original_router", None)
        context = getattr(route, "include_context", None)
        if inner is not None and context is not None:
            more = deps or bool(getattr(context, "dependencies", None))
            found.extend(_routes(list(inner.routes), prefix + context.prefix, more))
            continue
        has = deps or bool(getattr(route, "dependencies", None))
        found.append((prefix + getattr(route, "path", ""), route, has))
    return found


def find(app: Any) -> Found:
    """The Tidings whose router ``app`` (a FastAPI app) includes, and where.

    Raises RunError if it includes none, or more than one."""
    from ..endpoints import RawEndpoint
    from ..router import GuardedApp

    app_deps = bool(getattr(getattr(app, "router", None), "dependencies", None))
    routes = _routes(list(getattr(app, "routes", [])), deps=app_deps)
    found = []
    for path, route, _ in routes:
        if not isinstance(route, WebSocketRoute) or not path.endswith(RAW_ROUTE):
            continue
        endpoint = route.endpoint
        if isinstance(endpoint, GuardedApp):  # Tidings.router's (the mounted path's guards)
            endpoint = endpoint.app
        if isinstance(endpoint, RawEndpoint):
            found.append((path[: -len(RAW_ROUTE)], endpoint.tidings))
    if not found:
        raise RunError(
            "the app includes no tidings routes: include them with "
            "app.include_router(tidings.router) or tidings.install(app, prefix=...)"
        )
    if len(found) > 1:
        where = ", ".join(prefix or "/" for prefix, _ in found)
        raise RunError(f"the app includes tidings routes more than once ({where}): keep one")
    prefix, tidings = found[0]
    through_app = None
    middleware = [m.cls.__name__ for m in getattr(app, "user_middleware", [])]
    if middleware:
        through_app = "the app has middleware (" + ", ".join(middleware) + ")"
    elif any(
        deps and path.startswith((prefix + "/api/", prefix + "/publish/", prefix + "/ws/"))
        for path, _, deps in routes
    ):
        through_app = "tidings' routes have dependencies in the app"
    elif getattr(app, "root_path", ""):
        # FastAPI(root_path=...) sets scope["root_path"] in its own __call__, after Front
        through_app = "the app sets root_path itself (use --root-path instead)"
    return Found(tidings, prefix, through_app)


def load(target: str, *, factory: bool = False, app_dir: str = ".") -> Any:
    """Import ``"module:attribute"`` (``attribute`` may be dotted) from ``app_dir`` first, as
    uvicorn does; with ``factory``, call it for the app. RunError if that fails."""
    from uvicorn.importer import ImportFromStringError, import_from_string

    sys.path.insert(0, os.path.abspath(app_dir))
    try:
        app = import_from_string(target)
    except ImportFromStringError as exc:
        raise RunError(str(exc)) from None
    if factory:
        app = app()
    return app


def bind_unix(path: str) -> socket.socket:
    """A Unix socket at ``path`` (a stale socket file there is replaced), readable and
    writable by anyone, as uvicorn's ``--uds`` makes it. RunError if it cannot be made."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            os.unlink(path)
        sock.bind(path)
        os.chmod(path, 0o666)
    except OSError as exc:
        sock.close()
        raise RunError(f"cannot bind the Unix socket {path}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def prepare(app: Any, found: Found | None = None) -> tuple[Any, dict[str, Any]]:
    """What `tidings run` serves, for those who start uvicorn themselves: the ASGI app (a
    :class:`~.front.Front` before ``app``, or ``app`` itself, see the module docstring) and
    the uvicorn options (the protocol classes, loop and WebSocket limits of `tidings serve`)::

        application, options = prepare(app)
        uvicorn.run(application, host="0.0.0.0", port=8000, **options)

    ``found`` is :func:`find`'s answer (RunError as there). uvicorn's defaults for access
    logs and proxy headers are kept: they are your app's choice."""
    from .front import Front
    from .server import server_options

    if found is None:
        found = find(app)
    options = server_options(found.tidings.settings)
    for key in ("access_log", "proxy_headers", "lifespan"):
        del options[key]
    if found.through_app is None:
        return Front(app, found.tidings, found.prefix), options
    options["interface"] = "auto"
    return app, options


def run(
    target: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    uds: str | None = None,
    factory: bool = False,
    app_dir: str = ".",
    log_level: str = "info",
    root_path: str = "",
    proxy_headers: bool = True,
    forwarded_allow_ips: str | None = None,
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
) -> None:
    """Serve the app ``target`` (``"module:app"``) until a signal stops it (blocks).

    The options are uvicorn's of the same names. Raises RunError (the app cannot be loaded,
    includes no tidings routes) or :class:`~.launch.StartupError` (cannot bind, cannot reach
    the broker, the app's lifespan failed)."""
    import uvicorn

    from .. import logs
    from . import launch

    logs.configure(log_level, "text")
    app = load(target, factory=factory, app_dir=app_dir)
    found = find(app)
    application, options = prepare(app, found)
    options["access_log"] = log_level.lower() in ("debug", "trace")
    options["proxy_headers"] = proxy_headers
    options["lifespan"] = "on"  # the app's lifespan runs tidings': a failure must stop it
    if forwarded_allow_ips is not None:
        options["forwarded_allow_ips"] = forwarded_allow_ips
    # as in `tidings serve`: what was made so far lives as long as the process (server.py)
    gc.collect()
    gc.freeze()
    if uds:
        sock = bind_unix(uds)
        url = f"unix:{uds}"
    else:
        sock = launch.bind(host, port)
        scheme = "https" if ssl_certfile else "http"
        url = f"{scheme}://{launch.url_host(host)}:{sock.getsockname()[1]}"
    at = found.prefix
    routes = f"{at}/ws/{{channel}}, {at}/connection/websocket"
    if found.through_app is None:
        how = f"{routes} and POST {at}/api/..., {at}/publish/... on the fast path"
    else:
        how = f"{routes} through the app ({found.through_app})"
    banner = f"tidings run: {target} listening on {url}; tidings routes {how}"
    config = uvicorn.Config(
        application,
        log_config=None,
        root_path=root_path,
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
        **options,
    )
    server = launch.Server(config, found.tidings, banner)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if uds:
            with contextlib.suppress(OSError):
                os.unlink(uds)
    if server.failure is not None:
        raise server.failure
    if not server.started:
        raise launch.StartupError("the application failed to start (see the messages above)")


__all__ = ["Found", "RunError", "find", "load", "prepare", "run"]
