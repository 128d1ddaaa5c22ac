"""A loopback TCP proxy that can silently drop traffic: a store that stops answering.

``forward_requests`` / ``forward_replies`` switch each direction off: bytes
are read and thrown away, the connection stays open, so the client sees a
timeout, not a refused or reset connection (a blackholed network path).
With only replies dropped the server still applies every command: a lost reply.
"""

from __future__ import annotations

import asyncio
import contextlib


class DroppingProxy:
    """``await DroppingProxy(port).start()``; ``url``; ``await stop()``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.forward_requests = True
        self.forward_replies = True
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def blackhole(self) -> None:
        self.forward_requests = self.forward_replies = False

    def mute(self) -> None:
        """Requests reach the server, replies are lost."""
        self.forward_requests, self.forward_replies = True, False

    def heal(self) -> None:
        self.forward_requests = self.forward_replies = True

    async def start(self) -> DroppingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, lambda: self.forward_requests)),
            asyncio.create_task(self._pump(up_reader, writer, lambda: self.forward_replies)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
            self._tasks.discard(task)
        for w in (writer, up_writer):
            w.close()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, on) -> None:  # type: ignore[no-untyped-def]
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await src.read(65536):
                if on():
                    dst.write(data)
                    await dst.drain()
