"""The ``tidings`` command: serve a hub, publish to it, subscribe to it, make tokens.

Kept thin and lazy: importing this module imports typer and nothing of the server, so the
client commands (``publish``, ``subscribe``, ``token``, in :mod:`tidings.client`) start fast;
``serve`` imports the server side when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer
import typer.core

if TYPE_CHECKING:
    from pydantic import ValidationError

    from .config import Settings


class Command(typer.core.TyperCommand):
    """Usage lines name arguments plainly (``CHANNEL DATA``), as ``--help`` describes them."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [
            p[1:-1] if p.startswith("{") and p.endswith("}") else p
            for p in super().collect_usage_pieces(ctx)
        ]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        sys.stdout.write(f"tidings {version('tidings')}\n")
        raise typer.Exit()


# rich_markup_mode=None: plain help, where text in [brackets] is text and flags show as flags;
# no pretty exceptions: their local variables would print secrets.
app = typer.Typer(
    help="tidings: real-time channels for Python.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """tidings: real-time channels for Python."""


DEFAULT_URL = "http://127.0.0.1:8000"
UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="TIDINGS_URL",
        metavar="URL",
        show_envvar=True,
        help="Base URL of the tidings server.",
    ),
]
ChannelArgument = Annotated[
    str, typer.Argument(metavar="CHANNEL", help="Channel name, e.g. news or chat:lobby.")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` (one plain line, markup in it shown as typed) and exit."""
    from .client import say

    say("[bold red]error:[/] {}", message)
    return typer.Exit(code)


@app.command(cls=Command)
def serve(
    host: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_HOST",
            metavar="HOST",
            show_envvar=True,
            show_default="127.0.0.1",
            help="Address to bind (::1 or 0.0.0.0 work too).",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            envvar="TIDINGS_PORT",
            metavar="PORT",
            show_envvar=True,
            show_default="8000",
            help="Port to bind.",
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            metavar="URL",
            envvar="TIDINGS_BROKER_URL",
            show_envvar=True,
            show_default="memory://",
            help="Broker URL: memory:// or redis://HOST:6379/0.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", metavar="FILE", help="TOML file with settings and namespaces."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            envvar="TIDINGS_INSECURE",
            show_envvar=True,
            help="Allow dev mode (no secrets) on a non-loopback address.",
        ),
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_LOG_LEVEL",
            metavar="LEVEL",
            show_envvar=True,
            show_default="info",
            help="debug, info, warning or error.",
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_LOG_FORMAT",
            metavar="FORMAT",
            show_envvar=True,
            show_default="text",
            help="text, or json: one JSON object per line.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            envvar="TIDINGS_WORKERS",
            metavar="N",
            show_envvar=True,
            show_default="1",
            help="Worker processes sharing the port, each a node joined through the broker "
            "(more than 1 needs a broker other than memory://).",
        ),
    ] = None,
) -> None:
    """Run a tidings hub: WebSocket subscriptions, the HTTP API and the demo page at /."""
    from pydantic import ValidationError

    from .config import ConfigError, Settings

    try:
        settings = Settings.load(
            config,
            host=host,
            port=port,
            broker_url=broker,
            insecure=insecure or None,
            log_level=log_level,
            log_format=log_format,
            workers=workers,
        )
    except ValidationError as exc:
        raise _fail(f"bad configuration{_source(config)}:\n{_problems(exc)}") from None
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise _fail(f"bad configuration: {exc}") from None
    if settings.dev_mode and not settings.loopback_only and not settings.insecure:
        raise _fail(
            f"refusing to serve {settings.host} in dev mode (no TIDINGS_API_KEY or "
            "TIDINGS_TOKEN_HMAC_SECRET set): anyone could publish. Set a secret, bind "
            "127.0.0.1, or pass --insecure."
        )
    if settings.workers > 1:
        _serve_workers(settings)
    from .serve.server import run

    run(settings)


@app.command(cls=Command)
def run(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:APP",
            help="Your FastAPI app with tidings included, as uvicorn names it (main:app).",
        ),
    ],
    host: Annotated[
        str, typer.Option(metavar="HOST", help="Address to bind (::1 or 0.0.0.0 work too).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to bind.")] = 8000,
    uds: Annotated[
        str | None, typer.Option(metavar="PATH", help="Bind this Unix socket instead.")
    ] = None,
    factory: Annotated[
        bool, typer.Option("--factory", help="MODULE:APP is a function returning the app.")
    ] = False,
    app_dir: Annotated[
        str, typer.Option(metavar="DIR", help="Import MODULE from this directory first.")
    ] = ".",
    log_level: Annotated[
        str, typer.Option(metavar="LEVEL", help="debug, info, warning or error.")
    ] = "info",
    root_path: Annotated[
        str,
        typer.Option(metavar="PATH", help="The path prefix a proxy serves the app under."),
    ] = "",
    proxy_headers: Annotated[
        bool,
        typer.Option(
            help="Take the client's address from X-Forwarded-For and X-Forwarded-Proto "
            "sent by --forwarded-allow-ips."
        ),
    ] = True,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(
            metavar="IPS",
            envvar="FORWARDED_ALLOW_IPS",
            show_default="127.0.0.1",
            help="Comma-separated proxy addresses trusted for proxy headers ('*': all).",
        ),
    ] = None,
    ssl_keyfile: Annotated[
        str | None, typer.Option(metavar="FILE", help="TLS private key (PEM).")
    ] = None,
    ssl_certfile: Annotated[
        str | None, typer.Option(metavar="FILE", help="TLS certificate chain (PEM).")
    ] = None,
) -> None:
    """Serve your own FastAPI app on the server of `tidings serve`: tidings' routes on its
    fast path, the rest through your app. Options are uvicorn's; tidings' settings are those
    of the Tidings in your app."""
    from .serve.launch import StartupError
    from .serve.mounted import RunError
    from .serve.mounted import run as run_app

    try:
        run_app(
            target,
            host=host,
            port=port,
            uds=uds,
            factory=factory,
            app_dir=app_dir,
            log_level=log_level,
            root_path=root_path,
            proxy_headers=proxy_headers,
            forwarded_allow_ips=forwarded_allow_ips,
            ssl_keyfile=ssl_keyfile,
            ssl_certfile=ssl_certfile,
        )
    except RunError as exc:
        raise _fail(str(exc)) from None
    except StartupError as exc:
        raise _fail(str(exc), 1) from None


def _serve_workers(settings: Settings) -> None:
    """`tidings serve --workers N`, N > 1: the supervisor of :mod:`tidings.serve.workers`."""
    from .serve.workers import WorkersError, check, supervise

    try:
        check(settings, settings.workers)
        status = supervise(settings, settings.workers)
    except WorkersError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(status)


def _source(config: Path | None) -> str:
    """Where the settings came from, for an error message."""
    return (
        f" (options, TIDINGS_* variables or {config})"
        if config
        else (" (options or TIDINGS_* variables)")
    )


def _problems(exc: ValidationError) -> str:
    """One line per problem, naming the key: ``  namespaces.chat.presense: unknown key``."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@app.command(cls=Command)
def publish(
    channel: ChannelArgument,
    data: Annotated[
        str,
        typer.Argument(metavar="DATA", help="JSON value, or plain text (sent as a string)."),
    ],
    url: UrlOption = DEFAULT_URL,
    text: Annotated[
        bool, typer.Option("--text", help="Send DATA as a string, even if it is JSON.")
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_API_KEY",
            metavar="KEY",
            show_envvar=True,
            show_default=False,
            help="API key, if the server has one.",
        ),
    ] = None,
) -> None:
    """Publish DATA to CHANNEL through the server's HTTP API; prints the offset to stderr."""
    from .client import CommandError, parse_data, say
    from .client import publish as post

    try:
        result = post(url, channel, parse_data(data, text), api_key)
    except CommandError as exc:
        raise _fail(str(exc)) from None
    say("published to {}: offset {} epoch {}", channel, result["offset"], result["epoch"])


@app.command(cls=Command)
def token(
    user: Annotated[
        str, typer.Option("--user", metavar="USER", help="User id: the token's `sub` claim.")
    ],
    channel: Annotated[
        str | None,
        typer.Option(
            metavar="CHANNEL", help="Make a subscription token for this channel (`channel` claim)."
        ),
    ] = None,
    ttl: Annotated[
        int,
        typer.Option(min=0, metavar="SECONDS", help="Seconds until the token expires (0: never)."),
    ] = 3600,
    secret: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_TOKEN_HMAC_SECRET",
            metavar="SECRET",
            show_envvar=True,
            show_default=False,
            help="HS256 secret (the server's TIDINGS_TOKEN_HMAC_SECRET).",
        ),
    ] = None,
    info: Annotated[
        str | None, typer.Option(metavar="JSON", help="Shown to others in presence (`info`).")
    ] = None,
) -> None:
    """Print an HS256 JWT for development: a connection token, or with --channel a
    subscription token. Only the token goes to stdout, so `$(tidings token --user alice)` works."""
    import orjson

    from .client import make_token, say

    if not secret:
        raise _fail("no secret: pass --secret or set TIDINGS_TOKEN_HMAC_SECRET")
    if not user:
        raise _fail("--user must not be empty")
    claims_info = None
    if info is not None:
        try:
            claims_info = orjson.loads(info)
        except orjson.JSONDecodeError as exc:
            raise _fail(f"--info is not JSON: {exc}") from None
    encoded, warning = make_token(secret, user, channel, ttl, claims_info)
    if warning:
        say("[yellow]warning:[/] {}", warning)
    sys.stdout.write(encoded + "\n")


@app.command(cls=Command)
def subscribe(
    channel: ChannelArgument,
    url: UrlOption = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_TOKEN",
            metavar="JWT",
            show_envvar=True,
            show_default=False,
            help="Connection JWT (never printed).",
        ),
    ] = None,
    sub_token: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_SUB_TOKEN",
            metavar="JWT",
            show_envvar=True,
            show_default=False,
            help="Subscription JWT, for channels that need one.",
        ),
    ] = None,
    since: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="OFFSET",
            help="First print what history holds after OFFSET (0: all of it), then go live.",
        ),
    ] = None,
    epoch: Annotated[
        str | None,
        typer.Option(
            metavar="EPOCH",
            help="Epoch of --since's offset: if the stream was reset since, you are told.",
        ),
    ] = None,
    show_offset: Annotated[
        bool,
        typer.Option("--show-offset", help="Print each message's offset first, tab-separated."),
    ] = False,
    count: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Exit after this many messages.")
    ] = None,
) -> None:
    """Print each message of CHANNEL as it arrives. On a reconnection (with backoff) it first
    prints what it missed; what history no longer holds is reported on stderr."""
    from .client import CommandError, Position, Refused, Subscriber

    if epoch is not None and since is None:
        raise _fail("--epoch needs --since")
    position = Position(since, epoch or "") if since is not None else None
    subscriber = Subscriber(
        url, channel, token, sub_token, position, count=count, show_offset=show_offset
    )
    try:
        subscriber.run()
    except KeyboardInterrupt:
        pass
    except (CommandError, Refused) as exc:
        raise _fail(f"refused: {exc}" if isinstance(exc, Refused) else str(exc)) from None


def main() -> None:
    app()


# `tidings top`: a client of the server API, in its own module like the other client commands
from .top import top  # noqa: E402

app.command(name="top")(top)


if __name__ == "__main__":
    main()
