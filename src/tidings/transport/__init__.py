"""Getting frames to and from sockets: plain ASGI, and the fast path of `tidings serve`."""
