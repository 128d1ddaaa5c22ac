"""A TEST DOUBLE of TensorFlow Serving's REST API (model status + predict), not TF Serving.

TF Serving cannot run on these machines, so the companion's tests and the
SDK's tests talk to this stand-in: an aiohttp server on a free loopback
port, in the test's event loop (``await double.start()`` or ``async with``).
It mimics what mulambda depends on, in one of two set-ups:

* ``models_dir`` given: TF Serving in an executor pod, started with
  ``--model_base_path=MODELS_DIR/NAME``. A poller scans that folder for
  numeric version folders (the file-system poller, default policy
  "latest": only the highest version is aspired). A new highest version is
  LOADING for ``load_delay`` seconds, then AVAILABLE; the previously served
  version stays AVAILABLE until then (availability-preserving switch) and
  is reported END afterwards. A folder without ``saved_model.pb``/``.pbtxt``
  ends in END with error_code UNKNOWN, as TF Serving reports a broken
  SavedModel. Only model ``name`` is served, and predict computes
  ``y = 0.5 * x + 2`` (the half_plus_two example model). ``hold=True``
  keeps new versions LOADING until :meth:`release` is called, so a test can
  look at the companion while TF Serving is still loading.
* no ``models_dir``: an executor's endpoint as the SDK sees it. Every model
  name has version 1 AVAILABLE, and predict answers ``[name]`` per
  instance, so a test sees which endpoint answered.

Either way:

* ``GET /v1/models/NAME[/versions/N]`` answers ``model_version_status`` in
  TF Serving's JSON shape (version as a string); 404 while no version has
  been seen.
* ``POST /v1/models/NAME[/versions/N]:predict`` answers ``{"predictions":
  [...]}`` for ``{"instances": [...]}`` and is recorded in
  :attr:`requests`. ``status`` other than 200 makes it fail with that
  status (after recording it); ``on_request`` is awaited inside the
  handler, e.g. to observe the store while the request is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


@dataclass
class _Version:
    seen_at: float
    state: str = "LOADING"
    error_code: str = "OK"
    error_message: str = ""


class TFServingDouble:
    """Loopback stand-in for one TF Serving REST endpoint (see the module docstring)."""

    def __init__(
        self,
        name: str = "half_plus_two",
        status: int = 200,
        on_request: Callable[[], Awaitable[None]] | None = None,
        *,
        models_dir: Path | None = None,
        load_delay: float = 0.2,
        poll_interval: float = 0.05,
        hold: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.name = name
        self.status = status
        self.on_request = on_request
        self.requests: list[dict[str, Any]] = []
        self.base = None if models_dir is None else Path(models_dir) / name
        self.load_delay = load_delay
        self.poll_interval = poll_interval
        self._hold = hold
        self._released: set[int] = set()
        # Without a models folder one version is always there and serving.
        self._versions: dict[int, _Version] = (
            {1: _Version(seen_at=0.0, state="AVAILABLE")} if self.base is None else {})
        self._runner: web.AppRunner | None = None
        self._poller: asyncio.Task[None] | None = None
        # Any loopback address (127.0.0.0/8) with a fixed port stands in for a pod IP with
        # TF Serving's port, where a router addresses the replica itself.
        self.host = host
        self._bind_port = port
        self.port = 0

    # -- control -------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.port, "not started"
        return f"http://{self.host}:{self.port}"

    def release(self, version: int) -> None:
        """Let a held version finish loading."""
        self._released.add(version)

    def states(self) -> dict[int, str]:
        """Version -> state, as the REST API would report it now."""
        return {v: s.state for v, s in self._versions.items()}

    async def start(self) -> TFServingDouble:
        app = web.Application()
        # Predict first: "/v1/models/{name}" would also match "NAME:predict".
        app.router.add_post("/v1/models/{name}:predict", self._predict)
        app.router.add_post(r"/v1/models/{name}/versions/{version:\d+}:predict", self._predict)
        app.router.add_get("/v1/models/{name}", self._status)
        app.router.add_get(r"/v1/models/{name}/versions/{version:\d+}", self._status)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self._bind_port).start()
        self.port = int(self._runner.addresses[0][1])
        if self.base is not None:
            self._poll()  # versions already on disk are seen before the first request
            self._poller = asyncio.create_task(self._poll_forever(), name="tfserving-poller")
        return self

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TFServingDouble:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the file-system poller ------------------------------------------------------
    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self._poll()

    def _poll(self) -> None:
        assert self.base is not None
        now = time.monotonic()
        on_disk = ({int(p.name): p for p in self.base.iterdir() if p.name.isdigit() and p.is_dir()}
                   if self.base.is_dir() else {})
        aspired = max(on_disk) if on_disk else None
        if aspired is not None:
            v = self._versions.setdefault(aspired, _Version(seen_at=now))
            if v.state in ("END", "UNLOADING") and v.error_code == "OK":
                # Re-added after removal: TF Serving loads it afresh.
                self._versions[aspired] = v = _Version(seen_at=now)
            if v.state == "LOADING" and self._loaded(aspired, v, now):
                folder = on_disk[aspired]
                if not any((folder / f).is_file() for f in SAVED_MODEL_FILES):
                    v.state, v.error_code = "END", "UNKNOWN"
                    v.error_message = (
                        "Could not find SavedModel .pb or .pbtxt at supplied export "
                        f"directory path: {folder}"
                    )
                else:
                    v.state = "AVAILABLE"
        aspired_ready = aspired is not None and self._versions[aspired].state == "AVAILABLE"
        for number, v in self._versions.items():
            if number == aspired or v.state != "AVAILABLE":
                continue
            # Old versions are unloaded once the new one serves, or when their folder goes.
            if aspired_ready or number not in on_disk:
                v.state = "END"

    def _loaded(self, number: int, v: _Version, now: float) -> bool:
        if self._hold:
            return number in self._released
        return now - v.seen_at >= self.load_delay

    # -- REST ----------------------------------------------------------------------------
    def _serves(self, model: str) -> bool:
        return self.base is None or model == self.name

    async def _status(self, request: web.Request) -> web.Response:
        model = request.match_info["name"]
        if not self._serves(model):
            return _not_found(request)
        version = request.match_info.get("version")
        items = sorted(self._versions.items(), reverse=True)
        if version is not None:
            items = [(n, v) for n, v in items if n == int(version)]
        if not items:
            what = "any version" if version is None else f"version {version}"
            return web.json_response({"error": f"Could not find {what} of model {model}"},
                                     status=404)
        return web.json_response({"model_version_status": [
            {"version": str(n), "state": v.state,
             "status": {"error_code": v.error_code, "error_message": v.error_message}}
            for n, v in items
        ]})

    async def _predict(self, request: web.Request) -> web.Response:
        model = request.match_info["name"]
        serving = [n for n, v in self._versions.items() if v.state == "AVAILABLE"]
        version = request.match_info.get("version")
        wanted = int(version) if version else max(serving, default=None)
        if not self._serves(model) or wanted not in serving:
            return _not_found(request)
        try:
            body = await request.json()
            instances = list(body["instances"])
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        self.requests.append({"model": model, "body": body})
        if self.on_request is not None:
            await self.on_request()
        if self.status != 200:
            return web.json_response({"error": f"{self.name} told to fail"}, status=self.status)
        if self.base is None:
            predictions = [[self.name] for _ in instances]
        else:
            try:
                predictions = [_half_plus_two(x) for x in instances]
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": f"bad request: {exc}"}, status=400)
        return web.json_response({"predictions": predictions})


def _half_plus_two(x: Any) -> Any:
    if isinstance(x, list):
        return [_half_plus_two(v) for v in x]
    return 0.5 * float(x) + 2.0


def _not_found(request: web.Request) -> web.Response:
    return web.json_response({"error": f"Servable not found for request: {request.path}"},
                             status=404)
