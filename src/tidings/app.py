"""Wiring: settings -> broker -> hub -> routes. Mount it in your FastAPI app or serve it alone.

tidings = Tidings()                       # env TIDINGS_* and defaults
app = FastAPI(lifespan=your_lifespan)     # your app, as it is
tidings.install(app)                      # routes + lifespan chained around yours
                                          # (the demo page only with Tidings(demo=True))

@app.post("/orders")
async def order(hub: Annotated[Hub, Depends(tidings.hub_dependency)]) -> None:  # or hub: HubDep
    await hub.publish("orders", {"id": 1})
"""

from __future__ import annotations

import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import HTMLResponse
from starlette.requests import HTTPConnection, Request
from starlette.routing import NoMatchFound, Route, WebSocketRoute

from . import logs
from .admin import AdminAuth
from .admission import ConnectionRate
from .api import HttpApi
from .auth import TokenVerifier
from .brokers import create_broker
from .config import Settings
from .connection import CentrifugeEndpoint
from .endpoints import RawEndpoint
from .hub import Hub
from .metrics import exposition
from .router import GuardedApp, build_router
from .server_api import ServerApi
from .streaming import StreamingEndpoints

log = logging.getLogger("tidings")


class Tidings:
    """A tidings node: its settings, broker, hub and routes.

    ``Tidings(broker_url="redis://...")`` or ``Tidings(settings)``; keyword arguments override
    settings read from the environment (ConfigError/ValidationError for unknown or bad ones).

    ``router`` has the WebSocket endpoints, the HTTP API, ``/health`` and ``/metrics``; the demo
    page (``GET /``: a page anyone can publish from) is in it only with ``demo=True``, so
    mounting tidings never answers your app's ``/``. ``demo_router`` is the page alone, to
    include where you like (``app.include_router(tidings.demo_router, prefix="/demo")``): it
    finds the API wherever ``router`` was included."""

    def __init__(
        self, settings: Settings | None = None, *, demo: bool = False, **overrides: Any
    ) -> None:
        if settings is None:
            settings = Settings.load(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        # no token in any log line, whoever configures logging (see logs.install_redaction)
        logs.install_redaction()
        self.settings = settings
        self.broker = create_broker(settings.broker_url)
        if hasattr(self.broker, "max_streams"):  # engines with a cap (memory, Redis, Kafka)
            self.broker.max_streams = settings.history_max_streams
        self.hub = Hub(self.broker, settings)
        self.tokens = TokenVerifier(settings)
        #: connection_rate_per_ip's buckets (None: no limit); see tidings.admission
        self.admission = ConnectionRate.from_settings(settings)
        #: admin logins and tokens, when ``admin_password`` is set (ValueError if unsafe)
        self.admin = AdminAuth(settings) if settings.admin_enabled else None
        self.api = ServerApi(self.hub, settings)
        self.http = HttpApi(self.api)
        # one instance each: they register control-message handlers on the hub
        self.raw_endpoint = RawEndpoint(self)
        self.centrifuge_endpoint = CentrifugeEndpoint(self)
        #: http_stream, sse, /emulation and the unidirectional transports
        self.streaming = StreamingEndpoints(self)
        self.demo_router = demo_router()
        self.router = self._routes()
        if demo:
            self.router.include_router(self.demo_router)

    def _routes(self) -> APIRouter:
        router = build_router(self)
        if self.admin is not None:  # /admin and its login; its tokens open the HTTP API too
            from .admin_routes import admin_router

            self.http.bearer = self.admin.allows
            router.include_router(admin_router(self))
        # the plain ASGI endpoints, behind the header limits and body timeout the FastAPI routes
        # have (router.GuardedApp): under another server nothing else guards them
        settings = self.settings
        raw = GuardedApp(self.raw_endpoint, settings)
        router.routes.append(WebSocketRoute("/ws/{channel}", raw, name="raw"))
        centrifuge = GuardedApp(self.centrifuge_endpoint, settings)
        router.routes.append(WebSocketRoute("/connection/websocket", centrifuge, name="centrifuge"))
        streaming = self.streaming
        for path, endpoint in streaming.paths.items():  # the endpoints check methods themselves
            guarded = GuardedApp(endpoint, settings)
            router.routes.append(Route(path, guarded, name=path.rsplit("/", 1)[-1]))
        uni = GuardedApp(streaming.uni_websocket, settings)
        router.routes.append(WebSocketRoute("/connection/uni_websocket", uni, name="uni_websocket"))
        return router

    async def start(self) -> None:
        """Start the hub and connect its broker (BrokerUnavailable if it cannot be reached).
        Starting a started node does nothing (`tidings serve` starts it before the lifespan)."""
        logs.install_redaction()  # again: the server may have configured logging since
        if self.hub.started:
            return
        await self.hub.start()
        if self.settings.dev_mode:
            log.warning(
                "tidings is in DEV MODE: no api_key or token secret is set, so anyone who can "
                "reach it may subscribe and publish"
            )

    async def drain(self, period: float | None = None) -> None:
        """Close every connection, spread over ``period`` seconds (default: the
        ``shutdown_period`` setting), refusing new ones; see :meth:`Hub.drain`. `tidings serve`
        calls it on SIGTERM/SIGINT before anything else stops. Under another server, call it
        before that server closes its connections (stock uvicorn closes WebSockets 1012 before
        the lifespan's shutdown: Centrifugo SDKs reconnect on that too)."""
        await self.hub.drain(period)

    async def stop(self) -> None:
        """Drain what is still connected (:meth:`drain`), then close the broker."""
        if self.hub.sessions:
            await self.hub.drain()
        await self.hub.stop()

    async def __aenter__(self) -> Tidings:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Use as ``FastAPI(lifespan=tidings.lifespan)``, or inside your own lifespan."""
        async with self:
            yield

    def install(self, app: FastAPI, prefix: str = "") -> None:
        """Add tidings to an existing app: its routes under ``prefix``, and its start/stop
        around the app's own lifespan (tidings starts first, so your startup may publish)."""
        if getattr(app.state, "tidings", None) is not None:
            raise RuntimeError("this app already has a Tidings installed")
        app.include_router(self.router, prefix=prefix)
        app.state.tidings = self
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(application: Any) -> AsyncIterator[Any]:
            async with self, inner(application) as state:
                yield state

        app.router.lifespan_context = lifespan

    def hub_dependency(self) -> Hub:
        """``Depends(tidings.hub_dependency)``: this node's hub in a route handler."""
        return self.hub

    def metrics_exposition(self) -> tuple[bytes, str]:
        return exposition(self.hub)


def demo_router() -> APIRouter:
    """The demo page at ``/`` of wherever it is included. The page reaches the API through the
    ``<meta name="tidings-base">`` path filled in here: where the ``health`` route of the
    included ``Tidings.router`` is (prefix and ``root_path`` included), or, without one, the
    page's own directory."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo(request: Request) -> HTMLResponse:
        page = resources.files("tidings").joinpath("static/index.html").read_text()
        try:
            base = request.url_for("health").path.removesuffix("/health") + "/"
        except NoMatchFound:
            base = "./"
        return HTMLResponse(page.replace("{{BASE}}", html.escape(base, quote=True), 1))

    return router


def get_hub(connection: HTTPConnection) -> Hub:
    """``Depends(get_hub)``: the hub of the Tidings installed in this app (see ``install``)."""
    tidings: Tidings | None = getattr(connection.app.state, "tidings", None)
    if tidings is None:
        raise RuntimeError("no Tidings in this app: call tidings.install(app) first")
    return tidings.hub


def create_app(settings: Settings | None = None, **overrides: Any) -> FastAPI:
    """The standalone server's app (`tidings serve`): the tidings routes, and the demo page
    unless ``settings.demo`` is off (``TIDINGS_DEMO=false``, or ``create_app(demo=False)``)."""
    if "demo" in overrides:  # here a setting, not Tidings' own demo= (the page in its router)
        base = settings if settings is not None else Settings.load()
        settings = base.model_copy(update={"demo": bool(overrides.pop("demo"))})
    tidings = Tidings(settings, **overrides)
    app = FastAPI(title="tidings", lifespan=tidings.lifespan)
    app.include_router(tidings.router)
    if tidings.settings.demo:
        app.include_router(tidings.demo_router)
    app.state.tidings = tidings
    return app


#: ``async def route(hub: HubDep)``: the installed hub as an annotated dependency.
HubDep = Annotated[Hub, Depends(get_hub)]
