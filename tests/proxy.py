"""A TCP proxy for tests that cut a client's link to a server while the server keeps running."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """A TCP proxy on 127.0.0.1 to a server, or to the first of several that accepts (as a load
    balancer that skips a node refusing connections). A side that closes its connection closes
    the other.

    A test can cut every link and refuse new ones (accepted, then reset at once: the server is
    gone) until :meth:`restore`; stop listening altogether (:meth:`stop`, new connections are
    refused by the OS) and listen again on the same port (:meth:`start`); or make links swallow
    every byte without closing (:meth:`swallow_existing`, :attr:`black_hole`): a peer gone
    without a FIN or RST, which only pings notice.

    Args:
        targets: the servers, as ports on 127.0.0.1 or (host, port); each new connection goes
            to the first that accepts it, and is reset when none does.
        port: the port to listen on; 0: a free one, chosen by the first :meth:`start` and kept
            after (a server that advertises the proxy's address needs it fixed).
    """

    def __init__(self, *targets: int | tuple[str, int], port: int = 0) -> None:
        self.targets = [("127.0.0.1", t) if isinstance(t, int) else t for t in targets]
        self.port = port
        #: the upstream port of each connection carried, in order
        self.chosen: list[int] = []
        self.refusing = False
        #: new links swallow every byte too
        self.black_hole = False
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._dead: set[asyncio.StreamWriter] = set()  # client sides of links that swallow
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen (again) and carry new connections; returns the port."""
        self.refusing = False
        self._server = await asyncio.start_server(
            self._link, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def cut(self) -> None:
        """Reset every link, and every new one until :meth:`restore`."""
        self.refusing = True
        for link in self._links:
            for writer in link:
                writer.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.refusing = False

    def swallow_existing(self) -> None:
        """The links open now go silent without closing, both ways."""
        self._dead.update(client for client, _ in self._links)

    async def stop(self) -> None:
        """Stop listening (connections are refused) and reset every link."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        for host, port in self.targets:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                continue
            break
        else:
            writer.transport.abort()
            return
        if self.refusing:  # cut while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.chosen.append(port)
        link = (writer, up_writer)
        self._links.append(link)
        if self.black_hole:
            self._dead.add(writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if writer not in self._dead:
                        dst.write(data)
                        await dst.drain()
            finally:
                # one side closed: close the other (a server draining its connections must be
                # seen to close them); its reader then ends the other pump
                dst.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        for w in link:
            w.transport.abort()
        with contextlib.suppress(ValueError):  # already gone if cut
            self._links.remove(link)
        self._dead.discard(writer)
