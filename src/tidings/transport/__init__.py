"""Getting frames to and from sockets: plain ASGI, and the fast path of `tidings serve`."""

from .fast import open_transport

__all__ = ["open_transport"]
