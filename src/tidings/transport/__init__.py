"""Getting frames to and from sockets: plain ASGI, or the server's own transport.

The library side of the transports: :class:`~.asgi.AsgiTransport` works under any ASGI server.
A server that offers a faster transport (``tidings serve``'s :mod:`tidings.serve.websocket`)
puts it in the connection scope's extensions under :data:`EXTENSION`; the endpoints then use it
instead. Nothing here imports the server.
"""

from __future__ import annotations

from typing import Protocol

from starlette.types import Receive, Scope, Send

from ..delivery import Transport
from .asgi import AsgiTransport

#: the ASGI scope extension under which a server offers its own transport:
#: ``scope["extensions"][EXTENSION] == {"transport": <ServerTransport>}``
EXTENSION = "tidings.fast"


class EndpointTransport(Transport, Protocol):
    """A transport as the endpoints use it: accepted (or refused) by them."""

    async def accept(self, subprotocol: str | None = None) -> None:
        """Answer the handshake (with ``subprotocol``, if any)."""


class ServerTransport(EndpointTransport, Protocol):
    """A transport a server offers in the scope (:data:`EXTENSION`)."""

    #: seconds a closing connection may take (close handshake, buffered data) before the
    #: server aborts it, whatever closed it: the endpoint, a protocol error, a missed pong
    close_timeout: float

    def limit_incoming(self, max_size: int) -> None:
        """Close 1009 on an incoming message over ``max_size`` bytes."""


def negotiated_deflate(transport: EndpointTransport) -> bool:
    """Whether the client and the server's own transport agreed on permessage-deflate (RFC 7692)
    with ``server_no_context_takeover``: the transport then takes compressed frames built once
    per publication. A server that offers a transport says so in its ``deflate`` attribute;
    plain ASGI has no such thing (the server compresses, or not, on its own)."""
    return bool(getattr(transport, "deflate", False))


def open_transport(
    scope: Scope, receive: Receive, send: Send, max_size: int, close_timeout: float | None = None
) -> EndpointTransport:
    """The server's own transport if it offers one (``tidings serve``), else plain ASGI.

    ``max_size``: bytes; a larger incoming message closes the connection 1009.
    ``close_timeout``: seconds the server's transport gives any close before aborting the
    connection (the ASGI path's deadline is kept by :class:`~tidings.delivery.QueuedWriter`)."""
    offered = scope.get("extensions", {}).get(EXTENSION)
    if offered is not None:
        transport: ServerTransport = offered["transport"]
        transport.limit_incoming(max_size)
        if close_timeout is not None:
            transport.close_timeout = close_timeout
        return transport
    return AsgiTransport(receive, send, max_size)


__all__ = [
    "EXTENSION",
    "EndpointTransport",
    "ServerTransport",
    "negotiated_deflate",
    "open_transport",
]
