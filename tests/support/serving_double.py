"""A test double of TensorFlow Serving's REST predict API (not TF Serving itself).

TF Serving cannot run on these machines; this double answers
``POST /v1/models/{model}:predict`` like it does, on a loopback port, and
can be told to fail so tests can exercise failover.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web


class TFServingRESTDouble:
    """Loopback stand-in for one executor's TF Serving REST endpoint.

    ``status``: HTTP status to answer with (200 answers predictions).
    ``on_request``: awaited inside the handler, e.g. to observe the store
    while the request is in flight.
    """

    def __init__(self, name: str, status: int = 200,
                 on_request: Callable[[], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.status = status
        self.on_request = on_request
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _predict(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = await request.json()
        self.requests.append({"model": model, "body": body})
        if self.on_request is not None:
            await self.on_request()
        if self.status != 200:
            return web.json_response({"error": f"{self.name} told to fail"}, status=self.status)
        instances = body.get("instances", [])
        return web.Response(
            text=json.dumps({"predictions": [[self.name] for _ in instances]}),
            content_type="application/json",
        )

    async def start(self) -> TFServingRESTDouble:
        app = web.Application()
        app.router.add_post("/v1/models/{model}:predict", self._predict)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
