"""``mulambda ping``: a tiny HTTP responder companions probe to measure latency.

Runs as a sidecar in a Client's workload pods. It answers ``GET /ping`` (and
``/healthz``) with ``204 No Content`` and nothing else: the probe measures
the network round trip, so the responder must add as little as possible.
Other paths get ``404``. Served by aiohttp (:mod:`.httpd`: bounded
requests, keep-alive).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from mulambda.cliargs import port

from .httpd import start_server

log = logging.getLogger(__name__)

PATHS = frozenset({"/ping", "/healthz"})


async def _answer(request: web.Request) -> web.Response:
    # Any method: the probe only needs an answer; no body either way.
    return web.Response(status=204 if request.path in PATHS else 404)


async def serve(host: str, port: int, stop: asyncio.Event) -> None:
    """Answer probes on ``host:port`` until ``stop`` is set."""
    runner, port = await start_server(_answer, host, port, shutdown_timeout=1.0)
    log.info("ping responder listening host=%s port=%d", host, port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=port, default=8079, help="port (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, stop)

    try:
        asyncio.run(main())
    except OSError as exc:  # the port is taken, or the address is not this host's
        print(f"mulambda ping: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0
