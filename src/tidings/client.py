"""What the client commands (`tidings publish`, `subscribe`, `token`) do, without a web framework.

These run in a user's shell, so each imports only what it uses: no FastAPI, no uvicorn, no
pydantic-settings, no httpx (``tests/test_cli_ux.py`` checks the imports,
``bench/cli_startup.py`` measures the start-up time). ``tidings subscribe`` speaks
Centrifugo's client protocol (JSON) on ``/connection/websocket``, so it learns each
publication's offset and can catch up after a reconnection: a gap it cannot fill is
reported on stderr, never skipped in silence.

Messages for the user go to stderr through :func:`say` (rich markup in *our* text only; every
value that came from the user or the server is escaped); stdout carries only the data (the
messages, or the token), so the commands compose in shell pipelines.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import orjson

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection


class CommandError(Exception):
    """A failure to report as one line on stderr (exit code 2); the message is plain text."""


def say(markup: str, *values: object) -> None:
    """Print ``markup`` to stderr, with each of ``values`` escaped and put in place of ``{}``.

    ``say("[green]subscribed[/] to {}", channel)``: rich markup is ours, the channel is shown as
    typed (a channel ``[x]`` would otherwise be read as a markup tag and vanish)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        markup.format(*(escape(str(v)) for v in values))
    )


def parse_data(value: str, as_text: bool) -> Any:
    """``value`` as JSON, or as a string if it is not JSON or ``as_text``."""
    if as_text:
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


# -- publish -----------------------------------------------------------------------------------


def publish(url: str, channel: str, data: Any, api_key: str | None) -> dict[str, Any]:
    """POST ``{"channel", "data"}`` to ``{url}/api/publish``; the result ``{offset, epoch}``.

    Uses the standard library's HTTP client (importing httpx would double the command's
    start-up time). Raises CommandError when the server cannot be reached, answers something
    that is not the API's JSON, or answers an error (code and message given)."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    body = orjson.dumps({"channel": channel, "data": data})
    request = urllib.request.Request(
        f"{url.rstrip('/')}/api/publish", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:  # 4xx/5xx still carry the API's error body
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(f"cannot reach {url}: {reason}") from None
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:200].decode(errors="replace")
        raise CommandError(f"HTTP {status} from {url}: {text}") from None
    if not isinstance(answer, dict):
        raise CommandError(f"HTTP {status} from {url}: unexpected answer {answer!r:.200}")
    error = answer.get("error")
    if error is not None:
        if status == 401:
            raise CommandError(
                f"{error.get('message')} (HTTP 401): pass --api-key or set TIDINGS_API_KEY"
            )
        raise CommandError(f"{error.get('message')} (code {error.get('code')})")
    result: dict[str, Any] = answer["result"]
    return result


# -- token -------------------------------------------------------------------------------------

#: RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output
MIN_HS256_KEY = 32


def make_token(
    secret: str, user: str, channel: str | None, ttl: int, info: Any | None
) -> tuple[str, str | None]:
    """An HS256 JWT and, if ``secret`` is too short, a warning to show (PyJWT's own would print
    a source line of PyJWT's to stderr)."""
    import warnings

    import jwt

    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now}
    if ttl:
        claims["exp"] = now + ttl
    if channel is not None:
        claims["channel"] = channel
    if info is not None:
        claims["info"] = info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        encoded = jwt.encode(claims, secret, algorithm="HS256")
    size = len(secret.encode())
    warning = None
    if size < MIN_HS256_KEY:
        warning = (
            f"the secret is {size} bytes; HS256 needs at least {MIN_HS256_KEY} "
            "(RFC 7518, section 3.2): use a longer TIDINGS_TOKEN_HMAC_SECRET outside development"
        )
    return encoded, warning


# -- subscribe ---------------------------------------------------------------------------------


def connection_url(base: str) -> str:
    """The Centrifugo-protocol WebSocket URL of the server at ``base`` (http(s) or ws(s))."""
    parts = urlsplit(base)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunsplit(
        (scheme, parts.netloc, parts.path.rstrip("/") + "/connection/websocket", "", "")
    )


def shown(url: str) -> str:
    """``url`` without credentials or query string, for messages (tokens never go to the
    terminal: a shared screen or a recorded session would keep them)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe="/:@"), "", ""))


class Refused(Exception):
    """The server will not have this subscription: retrying cannot help."""


@dataclass
class Position:
    """Where the subscriber is in the channel's stream: the last offset printed, and its epoch
    ("" when the user gave ``--since`` without ``--epoch``: whatever the stream's epoch is)."""

    offset: int
    epoch: str = ""


@dataclass
class Subscriber:
    """`tidings subscribe`: print each publication of ``channel``, in order, reconnecting with
    backoff (0.5 s doubling to 10 s, jittered); after a reconnection (or from ``--since``) the
    missed publications are recovered from history first. What history no longer holds is
    reported on stderr as a gap. ``count``: exit after that many publications."""

    url: str
    channel: str
    token: str | None = None
    sub_token: str | None = None
    position: Position | None = None
    count: int | None = None
    show_offset: bool = False
    printed: int = 0
    subscriptions: int = 0  # subscribe replies received, over every connection
    _next_id: Iterator[int] = field(default_factory=lambda: iter(range(1, 1 << 62)))

    def run(self) -> None:
        asyncio.run(self.loop())

    async def loop(self) -> None:
        import websockets

        delay = 0.5
        endpoint = connection_url(self.url)
        while True:
            try:
                async with websockets.connect(endpoint, max_size=None, ping_interval=None) as ws:
                    delay = 0.5
                    if await self.session(ws):
                        return
                    # the server closed normally (1000/1001): no exception, same handling
                    self._disconnected(ws.close_code, ws.close_reason or "")
            except websockets.ConnectionClosed as exc:
                rcvd = exc.rcvd
                self._disconnected(rcvd.code if rcvd else None, rcvd.reason if rcvd else "")
            except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
                say(
                    "[yellow]cannot connect[/] to {}: {}",
                    shown(endpoint),
                    exc or type(exc).__name__,
                )
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)

    def _disconnected(self, code: int | None, reason: str) -> None:
        """Report a closed connection; CommandError for Centrifugo's terminal codes
        (3500-3999), after which reconnecting cannot help."""
        if code is not None and 3500 <= code <= 3999:
            raise CommandError(self._closed_message(code, reason))
        closed = f"{code} {reason}".strip() if code else "no close frame"
        say("[yellow]disconnected[/] ({})", closed)

    def _closed_message(self, code: int, reason: str) -> str:
        hint = ""
        if code == 3501 and not self.token:
            hint = (
                ": this server needs a connection token (--token or TIDINGS_TOKEN, made with "
                "`tidings token`), unless it sets allow_anonymous = true"
            )
        elif code == 3500:
            hint = ": the token was refused"
        return f"closed by the server: {code} {reason}{hint}"

    async def _call(self, ws: ClientConnection, method: str, params: dict[str, Any]) -> int:
        command_id = next(self._next_id)
        await ws.send(orjson.dumps({"id": command_id, method: params}).decode())
        return command_id

    async def _frames(self, ws: ClientConnection) -> Any:
        """Each JSON object the server sends (a frame may hold several, one per line); answers
        the server's pings (``{}``) on the way."""
        async for frame in ws:
            for line in (frame if isinstance(frame, bytes) else frame.encode()).splitlines():
                if not line.strip():
                    continue
                message = orjson.loads(line)
                if message == {}:
                    await ws.send("{}")
                    continue
                yield message

    async def session(self, ws: ClientConnection) -> bool:
        """One connection: connect, subscribe (recovering), then print. True when done."""
        connect: dict[str, Any] = {"name": "tidings-cli"}
        if self.token:
            connect["token"] = self.token
        await self._call(ws, "connect", connect)
        subscribe: dict[str, Any] = {"channel": self.channel, "recoverable": True}
        if self.sub_token:
            subscribe["token"] = self.sub_token
        if self.position is not None:
            subscribe.update(recover=True, offset=self.position.offset, epoch=self.position.epoch)
        sub_id = await self._call(ws, "subscribe", subscribe)
        history_id: int | None = None
        held: list[dict[str, Any]] = []  # live publications while history is being read
        frames = self._frames(ws)
        async for message in frames:
            if "error" in message:
                error = message["error"]
                if message.get("id") == history_id:
                    say(
                        "[yellow]cannot catch up[/] on {}: {} (code {})",
                        self.channel,
                        error.get("message"),
                        error.get("code"),
                    )
                    history_id = None
                    if self._emit_all(held):
                        return True
                    held.clear()
                    continue
                raise Refused(f"{error.get('message')} (code {error.get('code')})")
            if message.get("id") == sub_id:
                reply = message.get("subscribe", {})
                history_id = await self._subscribed(ws, reply)
                if history_id is None and self._emit_all(
                    [{"offset": p.get("offset"), **p} for p in reply.get("publications", [])]
                ):
                    return True
                if history_id is None and self.count is not None and self.printed >= self.count:
                    return True
                continue
            if history_id is not None and message.get("id") == history_id:
                result = message.get("history", {})
                self._report_gap(result)
                pubs = result.get("publications", [])
                history_id = None
                if self._emit_all(pubs) or self._emit_all(held):
                    return True
                held.clear()
                continue
            push = message.get("push")
            if push is None or push.get("channel") != self.channel:
                continue
            if "pub" in push:
                if history_id is not None:
                    held.append(push["pub"])
                elif self._emit(push["pub"]):
                    return True
            elif "unsubscribe" in push:
                gone = push["unsubscribe"]
                why = f"{gone.get('code')} {gone.get('reason', '')}".strip()
                raise Refused(f"unsubscribed by the server: {why}")
        return False

    async def _subscribed(self, ws: ClientConnection, reply: dict[str, Any]) -> int | None:
        """Announce the subscription (now the server has accepted it); when recovery failed,
        ask for what history still holds. Returns the id of that history command, if sent."""
        self.subscriptions += 1
        epoch, offset = reply.get("epoch"), reply.get("offset")
        where = f" (offset {offset or 0}, epoch {epoch})" if epoch is not None else ""
        say("[green]subscribed[/] to {}{}", self.channel, where)
        if self.position is None and epoch is None and self.subscriptions > 1:
            say(
                "[yellow]cannot catch up[/]: {} keeps no history, so what was published "
                "while disconnected is lost",
                self.channel,
            )
        if self.position is None or not reply.get("was_recovering"):
            if self.position is not None and epoch is None:
                say("[yellow]cannot catch up[/]: {} keeps no history", self.channel)
            if epoch is not None and self.position is None:
                self.position = Position(int(offset or 0), str(epoch))
            return None
        if reply.get("recovered"):
            if epoch is not None:
                self.position = Position(self.position.offset, str(epoch))
            return None
        # Not recovered: another epoch, or trimmed, or too much to recover in one reply. The
        # history command returns all that is kept; _report_gap says what is not.
        return await self._call(ws, "history", {"channel": self.channel, "limit": -1})

    def _report_gap(self, history: dict[str, Any]) -> None:
        assert self.position is not None
        epoch, top = str(history.get("epoch", "")), int(history.get("offset", 0))
        pubs = history.get("publications", [])
        since = self.position
        if since.epoch and since.epoch != epoch:
            say(
                "[bold red]stream reset[/]: {} has a new epoch ({} → {}); publications after "
                "offset {} of the old stream are lost",
                self.channel,
                since.epoch,
                epoch,
                since.offset,
            )
            self.position = Position(0, epoch)
            return
        first = int(pubs[0]["offset"]) if pubs else top + 1
        if first > since.offset + 1:
            say(
                "[bold red]missed[/] publications {}..{} of {}: history no longer holds them",
                since.offset + 1,
                first - 1,
                self.channel,
            )
        self.position = Position(since.offset, epoch)

    def _emit_all(self, pubs: list[dict[str, Any]]) -> bool:
        return any(self._emit(p) for p in pubs)

    def _emit(self, pub: dict[str, Any]) -> bool:
        """Print one publication unless already printed; True once ``count`` is reached."""
        offset = pub.get("offset")
        if offset is not None and self.position is not None:
            if offset <= self.position.offset:
                return False  # recovered from history and also received live
            self.position.offset = int(offset)
        data = pub.get("data")
        line = data if isinstance(data, str) else orjson.dumps(data).decode()
        if self.show_offset and offset is not None:
            line = f"{offset}\t{line}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        self.printed += 1
        return self.count is not None and self.printed >= self.count
