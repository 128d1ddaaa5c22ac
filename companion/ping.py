"""``mulambda ping``: a tiny HTTP responder companions probe to measure latency.

Runs as a sidecar in a Client's workload pods. It answers ``GET /ping`` (and
``/healthz``) with ``204 No Content`` as fast as it can: the probe measures
the network round trip, so the responder must add as little as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

log = logging.getLogger(__name__)

_OK = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            request_line = await reader.readline()
            if not request_line:
                break
            # Skip headers; probes send no body.
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.split()
            path = parts[1].split(b"?")[0] if len(parts) > 1 else b""
            writer.write(_OK if path in (b"/ping", b"/healthz") else _NOT_FOUND)
            await writer.drain()
            if not line:
                break
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, stop: asyncio.Event) -> None:
    server = await asyncio.start_server(_handle, host, port)
    log.info("ping responder listening host=%s port=%d", host, port)
    async with server:
        await stop.wait()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8079, help="port (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, stop)

    asyncio.run(main())
    return 0
