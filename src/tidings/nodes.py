"""Every node's figures on every node: each announces its own through the broker's control plane.

Centrifugo's server API ``info`` lists every node of the cluster; its nodes learn about each
other from node-info control messages each one publishes every few seconds (and forget a node
that stays silent). tidings does the same: :class:`NodeDirectory` publishes this node's
:class:`~tidings.control.NodeInfo` every ``node_info_interval`` seconds, keeps the last one
received from every other node, and forgets a node not heard from for three intervals (it
stopped, or cannot reach the broker). A node that has not announced yet (it started less than an
interval ago, or its broker is down) is missing from the list until it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from importlib import metadata
from typing import TYPE_CHECKING

from .control import NodeInfo, encode

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("tidings.nodes")

#: a node silent for this many announce intervals is dropped from the list
MISSED_ANNOUNCES = 3


def version() -> str:
    """The installed tidings version ("unknown" when running from an uninstalled tree)."""
    try:
        return metadata.version("tidings")
    except metadata.PackageNotFoundError:
        return "unknown"


class NodeDirectory:
    """This node's figures, and the last ones every other node announced.

    ``hub``: the node's hub (its sessions, users, channels and counters are read when
    :meth:`local` is called, never per message). ``interval``: seconds between announcements."""

    def __init__(self, hub: Hub, interval: float) -> None:
        self.hub = hub
        self.interval = interval
        self.started = time.monotonic()
        self.name = f"{socket.gethostname()}_{hub.node_id}"
        self.version = version()
        #: other nodes by uid: (monotonic time it was heard from, its last figures)
        self._others: dict[str, tuple[float, NodeInfo]] = {}
        self._task: asyncio.Task[None] | None = None

    def local(self) -> NodeInfo:
        """This node's figures now."""
        hub = self.hub
        channels = list(hub.channels)
        m = hub.metrics
        uptime = time.monotonic() - self.started
        return NodeInfo(
            uid=hub.node_id,
            name=self.name,
            version=self.version,
            num_clients=len(hub.sessions),
            num_users=len(hub.users),
            num_channels=len(channels),
            num_subs=sum(hub.subscribers(c) for c in channels),
            uptime=int(uptime),
            metrics={
                # when the figures were taken, to the microsecond: rates of another node's
                # counters are taken over the time between its announcements
                "tidings_uptime_seconds": round(uptime, 6),
                "tidings_publications": float(m.published),
                "tidings_deliveries": float(m.delivered),
                "tidings_slow_clients": float(m.slow_clients),
                "tidings_rejected_connections": float(m.rejected_connections),
                "tidings_connections_opened": float(m.connections_total),
                "tidings_gaps_healed": float(m.gaps_healed),
                "tidings_gaps_lost": float(m.gaps_lost),
            },
        )

    def nodes(self) -> list[NodeInfo]:
        """This node (fresh figures) first, then every other node heard from within
        ``MISSED_ANNOUNCES`` intervals, by name."""
        now = time.monotonic()
        horizon = self.interval * MISSED_ANNOUNCES
        for uid, (seen, _) in list(self._others.items()):
            if now - seen > horizon:
                del self._others[uid]
        others = sorted((info for _, info in self._others.values()), key=lambda n: n.name)
        return [self.local(), *others]

    def on_node(self, info: NodeInfo) -> None:
        """A node's announcement, from the broker (our own comes back too: ignored)."""
        if info.uid == self.hub.node_id:
            return
        self._others[info.uid] = (time.monotonic(), info)

    async def announce(self) -> None:
        """Publish this node's figures to every node now."""
        await self.hub.broker.publish_control(encode(self.local()))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.announce()
                failing = False
            except Exception as exc:  # the broker is down: /health says so; try again later
                if not failing:
                    log.warning("cannot announce this node to the others: %s", exc)
                failing = True
            await asyncio.sleep(self.interval)


def as_results(nodes: list[NodeInfo]) -> list[dict[str, object]]:
    """Nodes as the server API's ``info`` result lists them."""
    return [n.as_result() for n in nodes]
