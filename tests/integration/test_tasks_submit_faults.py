"""A submission cut off half-way through its store write (a real redis-server behind a
TCP proxy that drops the connection mid-pipeline)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from mulambda.store.metadata import MetadataStore
from mulambda.store.records import StoreUnavailable
from mulambda.tasks.queue import TaskQueue
from mulambda.tasks.records import TaskOptions, new_task_id

from support.procs import RedisServer

pytestmark = pytest.mark.integration


class CuttingProxy:
    """Forwards to redis; once armed, the first client write that holds ``marker`` is
    forwarded only up to the command before it, and the connection is closed."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.port, self.marker = port, marker
        self.armed = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self.listen_port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)
        back = asyncio.create_task(self._pump(server_r, client_w))
        try:
            while data := await client_r.read(1 << 16):
                at = data.find(self.marker) if self.armed else -1
                if at >= 0:
                    # RESP: the command holding the marker starts at the "*" before it.
                    server_w.write(data[:data.rfind(b"*", 0, at)])
                    await server_w.drain()
                    self.armed = False
                    self.cuts += 1
                    await asyncio.sleep(0.05)
                    break
                server_w.write(data)
                await server_w.drain()
        finally:
            for w in (server_w, client_w):
                w.close()
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await back

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()


@pytest.fixture
async def proxy(redis_url: str, redis_server: RedisServer) -> AsyncIterator[CuttingProxy]:
    cutter = CuttingProxy(redis_server.port, b"XADD")
    await cutter.start()
    yield cutter
    await cutter.stop()


async def test_a_submission_cut_half_way_leaves_no_task_and_its_retry_is_queued(
        proxy: CuttingProxy, store: MetadataStore):
    through = MetadataStore.from_url(f"redis://127.0.0.1:{proxy.listen_port}/0",
                                     prefix="test")
    queue = TaskQueue(through)
    options = TaskOptions(ttl_seconds=600)
    try:
        proxy.armed = True
        first = new_task_id("shop/app")
        with pytest.raises(StoreUnavailable):
            await queue.submit(first, client="shop/app", executor="ml/x", model="m",
                               body="{}", options=options, idempotency_key="k")
        assert proxy.cuts == 1
        # The store holds nothing of it (the HSET before the cut was not applied alone).
        assert not await store.redis.exists(queue.task_key(first))
        # The SDK's retry with the same key gets a task that is queued, not a replay of
        # one that no worker would ever see.
        again = new_task_id("shop/app")
        assert await queue.submit(again, client="shop/app", executor="ml/x", model="m",
                                  body="{}", options=options, idempotency_key="k") == (
            again, True)
        entries = await store.redis.xrange(queue.queue_key("ml/x"))
        assert [fields["task"] for _, fields in entries] == [again]
        assert (await queue.backlog(["ml/x"]))["ml/x"][0] == 1  # (tasks, oldest age)
    finally:
        await through.close()
