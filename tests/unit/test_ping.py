"""The ping responder answers probes over real TCP."""

from __future__ import annotations

import asyncio

import httpx

from mulambda.companion import ping

from support.procs import free_port


async def test_ping_answers_204_and_404_elsewhere_on_one_connection():
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(ping.serve("127.0.0.1", port, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(20):
                try:
                    r = await http.get("/ping")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
            assert r.status_code == 204
            assert (await http.get("/healthz")).status_code == 204
            assert (await http.get("/nope")).status_code == 404
    finally:
        stop.set()
        await task
