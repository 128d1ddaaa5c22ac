"""The companion's HTTP endpoints: ``/healthz``, ``/readyz``, ``/metrics``.

Served by aiohttp (:mod:`.httpd`: bounded requests, keep-alive) on the
companion's own event loop, so the handler reads the live state without
locks; :meth:`CompanionServer.route` decides every answer and is pure, so
tests can call it directly.

* ``/healthz`` answers 200 while the event loop turns (the kubelet restarts
  a wedged companion, never one whose model failed to load: restarting would
  not fix a missing model and would hide the reason).
* ``/readyz`` answers 200 only when TF Serving reported the loaded version
  AVAILABLE; otherwise 503 with ``{"ready": false, "state", "reason",
  "message"}`` so ``kubectl describe pod`` shows why.
* ``/metrics`` is the Prometheus text format of this companion's registry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .httpd import start_server

log = logging.getLogger("mulambda.companion.server")

# Probe RTTs inside a cluster are sub-millisecond to tens of milliseconds;
# the upper buckets catch cross-zone clients and near-timeout answers.
PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The companion's Prometheus metrics, in a registry of its own.

    A private registry (not the process-global default) so several
    companions can run in one test process without "duplicated timeseries".
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.load_duration = Gauge(
            "mulambda_companion_model_load_duration_seconds",
            "Wall time of the last successful model load (download, verify, rename).",
            ["model", "version"], registry=r,
        )
        self.load_bytes = Gauge(
            "mulambda_companion_model_load_bytes",
            "Size of the last successfully loaded model version.",
            ["model", "version"], registry=r,
        )
        self.load_errors = Counter(
            "mulambda_companion_model_load_errors",
            "Failed model load attempts, by CamelCase reason.",
            ["reason"], registry=r,
        )
        self.model_ready = Gauge(
            "mulambda_companion_model_ready",
            "1 when TF Serving reports the loaded version AVAILABLE, else 0.",
            registry=r,
        )
        self.loaded_version = Gauge(
            "mulambda_companion_model_loaded_version",
            "Version the companion last saw become AVAILABLE (-1 before the first).",
            registry=r,
        )
        self.loaded_version.set(-1)
        self.probe_latency = Histogram(
            "mulambda_companion_probe_latency_seconds",
            "Round-trip time of successful client probes.",
            buckets=PROBE_BUCKETS, registry=r,
        )
        self.probe_errors = Counter(
            "mulambda_companion_probe_errors",
            "Failed client probes, by reason (timeout, connect, error).",
            ["reason"], registry=r,
        )
        self.probe_rounds = Counter(
            "mulambda_companion_probe_rounds",
            "Completed probe rounds.",
            registry=r,
        )
        self.heartbeat_errors = Counter(
            "mulambda_companion_heartbeat_errors",
            "Heartbeats that could not be written to the metadata store.",
            registry=r,
        )
        self.store_errors = Counter(
            "mulambda_companion_store_errors",
            "Metadata store calls that failed, by component.",
            ["component"], registry=r,
        )
        self.store_errors.labels(component="prober")  # 0 until the first, not "no data"
        self.client_rtt = Gauge(
            "mulambda_companion_client_rtt_seconds",
            "Smoothed round-trip time from this replica to each registered client (what "
            "selection reads from the store).",
            ["executor", "client"], registry=r,
        )


@dataclass
class ModelState:
    """What the companion knows about its model; the single source for /readyz and heartbeat."""

    state: str = "Loading"  # Loading | Available | Failed, as in ReplicaRecord.state
    version: int | None = None  # version TF Serving serves (None before the first)
    reason: str = "Starting"
    message: str = "companion starting"
    ready: bool = False

    def set(
        self, state: str, reason: str, message: str, *, ready: bool, version: int | None = None
    ) -> None:
        """Change state; ``version`` None keeps the current one (a switch keeps serving)."""
        self.state, self.reason, self.message, self.ready = state, reason, message, ready
        if version is not None:
            self.version = version


class CompanionServer:
    """Serves health, readiness and metrics from a :class:`ModelState` and :class:`Metrics`."""

    def __init__(self, state: ModelState, metrics: Metrics, host: str, port: int) -> None:
        self.state = state
        self.metrics = metrics
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def listening(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        # Do not let a stuck scraper delay exit by more than 2 s.
        self._runner, self.port = await start_server(self._handle, self.host, self.port,
                                                     shutdown_timeout=2.0)
        # Port 0 picks a free port: self.port is the real one (tests rely on it).
        log.info("http server listening host=%s port=%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; pure, so tests can call it directly."""
        path = path.split("?", 1)[0]
        if path not in ("/healthz", "/readyz", "/metrics"):
            return 404, "application/json", b'{"error":"not found"}'
        if method not in ("GET", "HEAD"):
            return 405, "application/json", b'{"error":"method not allowed"}'
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}'
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        s = self.state
        body = json.dumps(
            {"ready": s.ready, "state": s.state, "version": s.version,
             "reason": s.reason, "message": s.message},
            separators=(",", ":"),
        ).encode()
        return (200 if s.ready else 503), "application/json", body

    async def _handle(self, request: web.Request) -> web.Response:
        status, ctype, body = self.route(request.method, request.path)
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})
