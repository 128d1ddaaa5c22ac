"""A loopback TCP proxy that can silently drop traffic: a store that stops answering.

``forward_requests`` / ``forward_replies`` switch each direction off: bytes
are read and thrown away, the connection stays open, so the client sees a
timeout, not a refused or reset connection (a blackholed network path).
With only replies dropped the server still applies every command: a lost reply.
``cut_before(marker)`` cuts one connection mid-pipeline instead: the next request
bytes holding ``marker`` are forwarded up to the Redis command that holds it, then
the connection is closed (a client whose connection broke while it sent).
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
        self._cut: bytes | None = None
        self.cuts = 0

    def cut_before(self, marker: bytes) -> None:
        self._cut = marker

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
            asyncio.create_task(self._pump(reader, up_writer, lambda: self.forward_requests,
                                           self._cutting)),
            asyncio.create_task(self._pump(up_reader, writer, lambda: self.forward_replies)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
            self._tasks.discard(task)
        for w in (writer, up_writer):
            w.close()

    def _cutting(self, data: bytes) -> int | None:
        """Where to cut ``data`` (the start of the command holding the marker), once."""
        at = data.find(self._cut) if self._cut is not None else -1
        if at < 0:
            return None
        self._cut = None
        self.cuts += 1
        return data.rfind(b"*", 0, at)  # RESP: a command starts with "*"

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, on,  # type: ignore[no-untyped-def]
                    cut=None) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await src.read(65536):
                end = cut(data) if cut is not None else None
                if end is not None:
                    dst.write(data[:end])
                    await dst.drain()
                    return  # the connection goes with the pump
                if on():
                    dst.write(data)
                    await dst.drain()
