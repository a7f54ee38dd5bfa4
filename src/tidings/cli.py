"""The ``tidings`` command: serve a hub, publish to it, subscribe to it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.panel import Panel

from .config import Settings

app = typer.Typer(
    help="tidings: real-time channels for Python.", no_args_is_help=True, add_completion=False
)
err = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8000"
UrlOption = Annotated[
    str, typer.Option("--url", envvar="TIDINGS_URL", help="Base URL of the tidings server.")
]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env TIDINGS_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env TIDINGS_PORT].")] = None,
    broker: Annotated[
        str | None, typer.Option("--broker", help="Broker URL [env TIDINGS_BROKER_URL].")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with settings and namespaces.")
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option("--insecure", help="Allow dev mode (no secrets) on a non-loopback address."),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="Log level [env TIDINGS_LOG_LEVEL].")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Worker processes sharing the port, each a node joined through the broker "
            "(> 1 needs redis://, postgresql://, nats:// or kafka://) [env TIDINGS_WORKERS]."
        ),
    ] = None,
) -> None:
    """Run a tidings hub (default: in-memory broker on http://127.0.0.1:8000)."""
    try:
        settings = Settings.load(
            config,
            host=host,
            port=port,
            broker_url=broker,
            insecure=insecure,
            log_level=log_level,
            workers=workers,
        )
    except ValidationError as exc:
        raise _fail(f"bad configuration{_source(config)}:\n{_problems(exc)}") from None
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(f"bad configuration: {exc}") from None
    if settings.dev_mode and not settings.loopback_only and not settings.insecure:
        raise _fail(
            f"refusing to serve {settings.host} in dev mode (no TIDINGS_API_KEY or "
            "TIDINGS_TOKEN_HMAC_SECRET set): anyone could publish. Set a secret, bind "
            "127.0.0.1, or pass --insecure."
        )
    if settings.workers > 1:
        _serve_workers(settings)
    run(settings)


def _serve_workers(settings: Settings) -> None:
    """`tidings serve --workers N`, N > 1: the supervisor of tidings.workers."""
    from .workers import WorkersError, check, supervise

    try:
        check(settings, settings.workers)
        banner(settings)
        status = supervise(settings, settings.workers)
    except WorkersError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(status)


def _source(config: Path | None) -> str:
    return f" in {config} or TIDINGS_* variables" if config else " in TIDINGS_* variables"


def _problems(exc: ValidationError) -> str:
    """One line per problem, naming the key: ``  namespaces.chat.presense: unknown key``."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn settings of `tidings serve`: the fast WebSocket path, uvloop and httptools
    (FastHttp: the publishing routes without an ASGI cycle, one write per response) when
    installed, and the WebSocket limits and heartbeats from ``settings``. permessage-deflate
    is declined (see transport/fast.py)."""
    from .transport.fast import FastWebSocket

    http: Any = "h11"
    if _installed("httptools"):
        from .transport.http import FastHttp

        http = FastHttp
    return {
        "ws": FastWebSocket,
        "loop": "uvloop" if _installed("uvloop") else "asyncio",
        "http": http,
        "ws_max_size": settings.max_message_size,
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.pong_timeout,
        "ws_per_message_deflate": False,
        # a line per publish request costs more than the publish itself: only when debugging
        "access_log": settings.log_level.lower() in ("debug", "trace"),
        # tidings never reads the client address; the middleware would stay suspended in every
        # idle WebSocket (~0.3 KiB each) and run on every publish
        "proxy_headers": False,
        # Front.__call__ is a plain function returning an awaitable (see front.py)
        "interface": "asgi3",
        "lifespan": "on",
    }


def run(settings: Settings) -> None:
    import uvicorn

    from .app import create_app
    from .front import Front

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        application = Front(create_app(settings))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    # Everything made so far (the app, FastAPI's and pydantic's objects: ~75,000 tracked by the
    # garbage collector) lives as long as the process; frozen, full collections stop scanning
    # it. They run while connections pour in, and each one is a pause every delivery waits out.
    gc.collect()
    gc.freeze()
    banner(settings)
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        **server_options(settings),
    )


def banner(settings: Settings) -> None:
    """The start-up lines of `tidings serve`: dev mode warning, address, broker, workers."""
    url = f"http://{settings.host}:{settings.port}"
    if settings.dev_mode:
        err.print(
            Panel.fit(
                "[bold yellow]DEV MODE[/]: no secrets configured. Anyone who can reach this "
                "server may subscribe and publish.\nSet TIDINGS_API_KEY and "
                "TIDINGS_TOKEN_HMAC_SECRET before exposing it.",
                border_style="yellow",
            )
        )
    broker = redact(settings.broker_url)
    workers = f"  workers [bold]{settings.workers}[/]" if settings.workers > 1 else ""
    err.print(f"tidings on [bold]{url}[/]  broker [bold]{broker}[/]{workers}  demo {url}/")


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _data(value: str, as_text: bool) -> Any:
    if as_text:
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


@app.command()
def publish(
    channel: str,
    data: Annotated[str, typer.Argument(help="JSON value, or plain text (sent as a string).")],
    url: UrlOption = DEFAULT_URL,
    text: Annotated[
        bool, typer.Option("--text", help="Send DATA as a string, even if JSON.")
    ] = False,
    api_key: Annotated[
        str | None, typer.Option(envvar="TIDINGS_API_KEY", help="API key, if the server has one.")
    ] = None,
) -> None:
    """Publish DATA to CHANNEL through the server's HTTP API."""
    headers = {"X-API-Key": api_key} if api_key else {}
    body = {"channel": channel, "data": _data(data, text)}
    try:
        response = httpx.post(f"{url.rstrip('/')}/api/publish", json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {exc}") from None
    try:
        answer = response.json()
    except ValueError:
        raise _fail(f"HTTP {response.status_code}: {response.text[:200]}") from None
    if "error" in answer:
        raise _fail(f"{answer['error'].get('message')} (code {answer['error'].get('code')})")
    result = answer["result"]
    err.print(f"published to {channel}: offset {result['offset']} epoch {result['epoch']}")


@app.command()
def token(
    user: Annotated[str, typer.Option("--user", help="User id: the token's `sub` claim.")],
    channel: Annotated[
        str | None,
        typer.Option(help="Make a subscription token for this channel (`channel` claim)."),
    ] = None,
    ttl: Annotated[
        int, typer.Option(min=0, help="Seconds until the token expires (0: never).")
    ] = 3600,
    secret: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_TOKEN_HMAC_SECRET",
            help="HS256 secret (the server's TIDINGS_TOKEN_HMAC_SECRET).",
            show_default=False,
        ),
    ] = None,
    info: Annotated[
        str | None, typer.Option(help="JSON shown to others in presence (`info` claim).")
    ] = None,
) -> None:
    """Print an HS256 JWT for development: a connection token, or with --channel a
    subscription token. Only the token goes to stdout, so `$(tidings token --user alice)` works."""
    import time

    import jwt

    if not secret:
        raise _fail("no secret: pass --secret or set TIDINGS_TOKEN_HMAC_SECRET")
    if not user:
        raise _fail("--user must not be empty")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now}
    if ttl:
        claims["exp"] = now + ttl
    if channel is not None:
        claims["channel"] = channel
    if info is not None:
        try:
            claims["info"] = orjson.loads(info)
        except orjson.JSONDecodeError as exc:
            raise _fail(f"--info is not JSON: {exc}") from None
    sys.stdout.write(jwt.encode(claims, secret, algorithm="HS256") + "\n")


def ws_url(base: str, channel: str, token: str | None) -> str:
    parts = urlsplit(base)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + "/ws/" + quote(channel, safe="")
    query = f"token={quote(token)}" if token else ""
    return urlunsplit((scheme, parts.netloc, path, query, ""))


@app.command()
def subscribe(
    channel: str,
    url: UrlOption = DEFAULT_URL,
    token: Annotated[
        str | None, typer.Option(envvar="TIDINGS_TOKEN", help="Connection JWT.")
    ] = None,
    count: Annotated[int | None, typer.Option(help="Exit after this many messages.")] = None,
) -> None:
    """Print each message of CHANNEL as it arrives; reconnect with backoff when dropped."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_subscribe(ws_url(url, channel, token), count))


async def _subscribe(url: str, count: int | None) -> None:
    import websockets

    delay, seen = 0.5, 0
    while True:
        try:
            async with websockets.connect(url, max_size=None) as ws:
                err.print(f"[green]subscribed[/] {url}")
                delay = 0.5
                async for message in ws:
                    line = message if isinstance(message, str) else message.decode(errors="replace")
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                    seen += 1
                    if count is not None and seen >= count:
                        return
        except websockets.ConnectionClosed as exc:
            rcvd = exc.rcvd
            if rcvd is not None and rcvd.code == 1008:
                raise _fail(f"refused: {rcvd.reason}") from None
            err.print(f"[yellow]disconnected[/] ({rcvd.code if rcvd else 'no close frame'})")
        except (OSError, websockets.InvalidHandshake) as exc:
            err.print(f"[yellow]cannot connect[/]: {exc}")
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 10.0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
