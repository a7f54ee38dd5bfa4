"""``tidings top``: a live terminal view of a running server, over its server API.

A client command: it imports no FastAPI, uvicorn or server module, only httpx and rich. Every
``--interval`` seconds it asks the server

- ``POST /api/info``: every node (the one that answers and those that announced themselves
  through the broker, see :mod:`tidings.nodes`) with its connections, users, channels,
  subscriptions and counters (``metrics.items``: publications, deliveries, slow clients);
- ``POST /api/channels``: the channels with subscribers on the node that answers, with their
  subscriber count and ``num_pubs`` (a tidings extension), top ones shown by subscribers and by
  publications per second;
- ``GET /health``: whether that node reaches its broker;

and shows rates (per second) as the difference between two consecutive answers divided by the
time between them, so the first frame has none and ``--once`` takes two samples an interval
apart before it prints its one frame. Another node's figures are those it last announced (every
``node_info_interval`` seconds), so its rates are over the time between its own announcements
and hold between them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import httpx
    from rich.console import RenderableType

DEFAULT_URL = "http://127.0.0.1:8000"
#: counters of a node's ``metrics.items`` shown as rates
PUBLICATIONS = "tidings_publications"
DELIVERIES = "tidings_deliveries"
SLOW = "tidings_slow_clients"
RATES = (PUBLICATIONS, DELIVERIES, SLOW)
#: when the node took its figures (seconds since it started)
UPTIME = "tidings_uptime_seconds"


class TopError(Exception):
    """The server cannot be asked (unreachable, refuses the key, answers nonsense); the
    message says which and what to do."""


@dataclass
class Sample:
    """One round of answers, taken at ``at`` (monotonic seconds)."""

    at: float
    nodes: list[dict[str, Any]]
    channels: dict[str, dict[str, Any]]
    #: ``GET /health`` of the answering node: its JSON body, and whether it said 200
    health: dict[str, Any] = field(default_factory=dict)
    healthy: bool = False


def _api(client: httpx.Client, method: str, params: dict[str, Any]) -> Any:
    import httpx

    try:
        response = client.post(f"/api/{method}", json=params)
    except httpx.HTTPError as exc:
        raise TopError(f"cannot reach {client.base_url}: {exc}") from None
    if response.status_code == 401:
        raise TopError(
            "the server refused the API key: pass --api-key or set TIDINGS_API_KEY "
            "(the server's key)"
        )
    try:
        body = response.json()
    except ValueError:
        raise TopError(f"{method}: HTTP {response.status_code}, not a JSON answer") from None
    if not isinstance(body, dict) or "result" not in body:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise TopError(
            f"{method}: {error.get('message', 'no result')} (HTTP {response.status_code})"
        )
    return body["result"]


def sample(client: httpx.Client) -> Sample:
    """Ask the server for everything one frame shows; TopError if it cannot be asked."""
    import httpx

    nodes = _api(client, "info", {}).get("nodes", [])
    channels = _api(client, "channels", {}).get("channels", {})
    health: dict[str, Any] = {}
    healthy = False
    try:
        response = client.get("/health")
        healthy = response.status_code == 200
        health = response.json()
    except (httpx.HTTPError, ValueError):
        pass
    return Sample(time.monotonic(), nodes, channels, health, healthy)


def _items(node: dict[str, Any]) -> dict[str, float]:
    metrics = node.get("metrics") or {}
    items = metrics.get("items") if isinstance(metrics, dict) else None
    return items if isinstance(items, dict) else {}


def _rate(now: float | None, before: float | None, seconds: float) -> float | None:
    """Per second between two readings of a counter; a counter that went back (the node or
    the channel started over) counts from zero."""
    if now is None or before is None or seconds <= 0:
        return None
    return (now - before if now >= before else now) / seconds


@dataclass
class NodeRow:
    info: dict[str, Any]
    publications: float | None
    deliveries: float | None
    slow: float | None


@dataclass
class ChannelRow:
    name: str
    subscribers: int
    publications: int | None
    rate: float | None


@dataclass
class Frame:
    """What one screen shows: figures of ``current``, rates against ``previous``."""

    url: str
    current: Sample
    nodes: list[NodeRow]
    channels: list[ChannelRow]
    seconds: float | None  # between the two samples (None: first frame, no rates yet)

    def total(self, key: str) -> int:
        return sum(int(n.info.get(key, 0)) for n in self.nodes)

    def total_rate(self, attr: str) -> float | None:
        rates = [getattr(n, attr) for n in self.nodes]
        known = [r for r in rates if r is not None]
        return sum(known) if known else None


def frame(url: str, current: Sample, previous: Sample | None, shown: Frame | None = None) -> Frame:
    """The figures of ``current`` with rates since ``previous`` (same node uid, same channel).

    A node's rates are over the time between its two readings (``tidings_uptime_seconds``,
    taken when the node reported them; the time between the samples for a server without
    it). Another node reports only every ``node_info_interval`` seconds: while its figures
    are the same reading as in ``previous``, its rates are those ``shown`` last."""
    seconds = current.at - previous.at if previous is not None else None
    before_nodes = {n.get("uid"): _items(n) for n in previous.nodes} if previous else {}
    last_rows = {r.info.get("uid"): r for r in shown.nodes} if shown is not None else {}
    nodes = []
    for node in current.nodes:
        now, before = _items(node), before_nodes.get(node.get("uid"))
        rates: list[float | None] = [None, None, None]
        if before is not None:
            span = seconds or 0.0
            if UPTIME in now and UPTIME in before:
                span = now[UPTIME] - before[UPTIME]
            if span > 0:
                rates = [_rate(now.get(k), before.get(k), span) for k in RATES]
            elif (last := last_rows.get(node.get("uid"))) is not None:
                rates = [last.publications, last.deliveries, last.slow]
        nodes.append(NodeRow(node, *rates))
    before_channels = previous.channels if previous else {}
    channels = []
    for name, figures in current.channels.items():
        pubs = figures.get("num_pubs")
        old = before_channels.get(name, {}).get("num_pubs") if previous else None
        if previous is not None and name not in before_channels:
            old = 0  # it got its first subscriber since: its count started at zero
        channels.append(
            ChannelRow(
                name,
                int(figures.get("num_clients", 0)),
                pubs,
                _rate(pubs, old, seconds or 0) if seconds else None,
            )
        )
    return Frame(url, current, nodes, channels, seconds)


def _num(value: float | None) -> str:
    """A rate with one decimal, or "-" when there is none yet."""
    return "-" if value is None else f"{value:,.1f}"


def _uptime(seconds: int) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def render(view: Frame, limit: int = 10) -> RenderableType:
    """The screen for ``view``: a summary, the nodes, and the top ``limit`` channels by
    subscribers and by publications per second. Names from the server are shown as text."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    current = view.current
    broker = current.health.get("broker", {}) if isinstance(current.health, dict) else {}
    if current.healthy:
        broker_text = Text(f"ok ({broker.get('engine', '?')})", style="green")
    else:
        reason = (broker.get("error") if isinstance(broker, dict) else None) or "unreachable"
        broker_text = Text(f"DOWN: {reason}", style="bold red")
    answering = current.nodes[0].get("name", "?") if current.nodes else "?"
    head = Text.assemble(
        ("tidings top ", "bold"),
        (view.url, "cyan"),
        f"  every {view.seconds:.1f} s" if view.seconds else "  (rates from the next frame)",
        "  broker ",
        broker_text,
    )

    def total(counter: str) -> int:
        return int(sum(_items(n.info).get(counter, 0.0) for n in view.nodes))

    summary = Table.grid(padding=(0, 3))
    for _ in range(4):
        summary.add_column()
    summary.add_row(
        f"nodes {len(view.nodes)}",
        f"connections {view.total('num_clients'):,}",
        f"users {view.total('num_users'):,}",
        f"subscriptions {view.total('num_subs'):,}",
    )
    summary.add_row(
        f"channels {view.total('num_channels'):,}",
        f"publications {total(PUBLICATIONS):,} ({_num(view.total_rate('publications'))}/s)",
        f"deliveries {total(DELIVERIES):,} ({_num(view.total_rate('deliveries'))}/s)",
        f"slow-client drops {total(SLOW):,} ({_num(view.total_rate('slow'))}/s)",
    )

    nodes = Table(title="Nodes", title_justify="left", expand=False)
    nodes.add_column("node")
    nodes.add_column("uptime", justify="right")
    for name in ("clients", "users", "channels", "subs", "pub/s", "deliv/s", "slow"):
        nodes.add_column(name, justify="right")
    for row in view.nodes:
        info = row.info
        nodes.add_row(
            Text(str(info.get("name", info.get("uid", "?")))),
            _uptime(int(info.get("uptime", 0))),
            f"{int(info.get('num_clients', 0)):,}",
            f"{int(info.get('num_users', 0)):,}",
            f"{int(info.get('num_channels', 0)):,}",
            f"{int(info.get('num_subs', 0)):,}",
            _num(row.publications),
            _num(row.deliveries),
            f"{int(_items(info).get(SLOW, 0)):,}",
        )

    def channel_table(title: str, rows: list[ChannelRow]) -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column("channel", overflow="fold")
        table.add_column("subscribers", justify="right")
        table.add_column("pub/s", justify="right")
        table.add_column("publications", justify="right")
        for r in rows:
            table.add_row(
                Text(r.name),
                f"{r.subscribers:,}",
                _num(r.rate),
                "-" if r.publications is None else f"{r.publications:,}",
            )
        return table

    by_subs = sorted(view.channels, key=lambda r: (-r.subscribers, r.name))[:limit]
    by_rate = sorted(view.channels, key=lambda r: (-(r.rate or 0.0), r.name))[:limit]
    where = Text(
        f"channels: those with subscribers on {answering} (the node that answers; "
        "the channels method is per node)",
        style="dim",
    )
    return Group(
        head,
        summary,
        nodes,
        channel_table(f"Top channels by subscribers ({len(view.channels)} in all)", by_subs),
        channel_table("Top channels by publications/s", by_rate),
        where,
    )


def client(url: str, api_key: str | None, timeout: float) -> httpx.Client:
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)


def top(
    url: Annotated[
        str,
        typer.Option(
            "--url",
            envvar="TIDINGS_URL",
            show_envvar=True,
            metavar="URL",
            help="Base URL of the tidings server.",
        ),
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TIDINGS_API_KEY",
            show_envvar=True,
            show_default=False,
            metavar="KEY",
            help="API key, if the server has one.",
        ),
    ] = None,
    interval: Annotated[
        float,
        typer.Option(
            min=0.1,
            metavar="SECONDS",
            help="Seconds between refreshes (and between the samples of a rate).",
        ),
    ] = 2.0,
    limit: Annotated[
        int, typer.Option(min=1, metavar="N", help="Channels shown in each top list.")
    ] = 10,
    once: Annotated[
        bool,
        typer.Option(
            "--once", help="Print one frame (two samples INTERVAL apart) and exit; no live view."
        ),
    ] = False,
) -> None:
    """Live view of a running server: nodes, connections, channels, rates, broker status."""
    from rich.console import Console

    console = Console(highlight=False)
    with client(url, api_key, timeout=max(5.0, interval)) as http:
        try:
            if once:
                first = sample(http)
                time.sleep(interval)
                console.print(render(frame(url, sample(http), first), limit))
                return
            _live(console, http, url, interval, limit)
        except TopError as exc:
            Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {_escape(exc)}")
            raise typer.Exit(2) from None


def _escape(value: object) -> str:
    from rich.markup import escape

    return escape(str(value))


def _live(console: Any, http: httpx.Client, url: str, interval: float, limit: int) -> None:
    """Redraw every ``interval`` seconds until Ctrl-C; a server that stops answering is shown
    on screen (and retried), not a reason to exit, except a refused key."""
    from rich.live import Live
    from rich.text import Text

    previous: Sample | None = None
    shown: Frame | None = None
    with (
        contextlib.suppress(KeyboardInterrupt),
        Live(
            Text("connecting to " + url), console=console, auto_refresh=False, screen=False
        ) as live,
    ):
        while True:
            try:
                current = sample(http)
            except TopError as exc:
                if "API key" in str(exc):
                    raise
                live.update(Text(f"{exc} (retrying every {interval:g} s)", style="red"))
                previous = shown = None
            else:
                shown = frame(url, current, previous, shown)
                live.update(render(shown, limit))
                previous = current
            live.refresh()
            time.sleep(interval)
