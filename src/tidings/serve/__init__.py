"""What only `tidings serve` uses: uvicorn protocols built on its internals, and the front door.

* :mod:`.server`: the uvicorn options of `tidings serve` and :func:`~.server.run`;
* :mod:`.front`: the ASGI app in front of the FastAPI app, the hot routes without it;
* :mod:`.websocket`: the WebSocket protocol (a :class:`~tidings.delivery.DirectTransport`);
* :mod:`.http`: the HTTP protocol that answers publishing routes without an ASGI cycle;
* :mod:`._internals`: every private attribute of uvicorn and websockets the above touch.

This package may import anything; nothing in the library imports it (an import-linter contract
in pyproject.toml, run by CI, says so).
"""
