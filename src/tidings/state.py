"""Connection states, and the rule that checks each change of state.

A :class:`~tidings.session.Session` and the fast WebSocket protocol of ``tidings serve`` each
keep one :class:`State` instead of several booleans, and change it only through a method that
checks the change against their table of legal transitions (:func:`check`): an illegal one is a
bug and raises :class:`IllegalTransition` at once instead of leaving a half-closed connection.
The model is starlette's ``WebSocketState`` (``starlette/websockets.py``), which raises
``RuntimeError`` for a message the current state does not allow.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class State(enum.Enum):
    """Where a connection is in its life.

    * ``CONNECTING``: the handshake is not answered yet; frames queue, nothing is written.
    * ``OPEN``: frames are written as they come.
    * ``PAUSED``: open, but the socket's buffer is above its high-water mark; frames queue
      until it drains (only where the writer sees the socket: the fast protocol).
    * ``CLOSING``: a close frame is being sent or was sent; nothing new is queued.
    * ``CLOSED``: over; the connection's resources are let go.
    """

    CONNECTING = "connecting"
    OPEN = "open"
    PAUSED = "paused"
    CLOSING = "closing"
    CLOSED = "closed"


class IllegalTransition(RuntimeError):
    """A connection was asked to go from one state to another its table does not allow."""

    def __init__(self, owner: object, current: State, new: State) -> None:
        super().__init__(f"{owner!r}: illegal transition {current.name} -> {new.name}")
        self.current = current
        self.new = new


#: the transitions every connection allows (PAUSED only where a writer sees the socket)
Table = Mapping[State, frozenset[State]]


def check(owner: object, table: Table, current: State, new: State) -> None:
    """Raise :class:`IllegalTransition` unless ``table`` allows ``current`` -> ``new``."""
    if new not in table[current]:
        raise IllegalTransition(owner, current, new)


__all__ = ["IllegalTransition", "State", "Table", "check"]
