"""A TEST DOUBLE of TensorFlow Serving's REST API (model status + predict), not TF Serving.

TF Serving cannot run on these machines, so companion tests talk to this
stand-in. It mimics the parts the companion depends on, on a real HTTP
server bound to a free loopback port (in a background thread):

* Like TF Serving started with ``--model_base_path=MODELS_DIR/NAME``, a
  poller thread scans that folder for numeric version folders (the
  file-system poller, default policy "latest": only the highest version is
  aspired). A new highest version is LOADING for ``load_delay`` seconds,
  then AVAILABLE; the previously served version stays AVAILABLE until then
  (availability-preserving switch) and is reported END afterwards. A folder
  without ``saved_model.pb``/``.pbtxt`` ends in END with error_code UNKNOWN,
  as TF Serving reports a broken SavedModel.
* ``GET /v1/models/NAME[/versions/N]`` answers ``model_version_status`` in
  TF Serving's JSON shape (version as a string); 404 while no version has
  been seen.
* ``POST /v1/models/NAME[/versions/N]:predict`` computes ``y = 0.5 * x + 2``
  (the half_plus_two example model) for ``{"instances": [...]}``.

``hold=True`` keeps new versions LOADING until :meth:`release` is called,
so a test can look at the companion while TF Serving is still loading.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_STATUS = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?$")
_PREDICT = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?:predict$")


@dataclass
class _Version:
    seen_at: float
    state: str = "LOADING"
    error_code: str = "OK"
    error_message: str = ""
    available_at: float | None = None


class TFServingDouble:
    """Serves one model from ``models_dir/name`` like TF Serving's REST API would."""

    def __init__(
        self,
        models_dir: Path,
        name: str = "half_plus_two",
        *,
        load_delay: float = 0.2,
        poll_interval: float = 0.05,
        hold: bool = False,
    ) -> None:
        self.base = Path(models_dir) / name
        self.name = name
        self.load_delay = load_delay
        self.poll_interval = poll_interval
        self._hold = hold
        self._released: set[int] = set()
        self._versions: dict[int, _Version] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.status_requests = 0

    # -- control -------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def release(self, version: int) -> None:
        """Let a held version finish loading."""
        with self._lock:
            self._released.add(version)

    def states(self) -> dict[int, str]:
        """Version -> state, as the REST API would report it now."""
        with self._lock:
            return {v: s.state for v, s in self._versions.items()}

    def available_since(self, version: int) -> float | None:
        """``time.monotonic()`` at which ``version`` became AVAILABLE, if it did."""
        with self._lock:
            v = self._versions.get(version)
            return None if v is None else v.available_at

    def start(self) -> TFServingDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

            def do_GET(self) -> None:
                double._get(self)

            def do_POST(self) -> None:
                double._post(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._poll()  # versions already on disk are seen before the first request
        # A short poll interval makes stop() (shutdown) quick.
        serve = lambda: self._server.serve_forever(poll_interval=0.05)  # noqa: E731
        for target in (serve, self._poller):
            t = threading.Thread(target=target, daemon=True, name="tfserving-double")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> TFServingDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the file-system poller ------------------------------------------------------
    def _poller(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self._poll()

    def _on_disk(self) -> dict[int, Path]:
        if not self.base.is_dir():
            return {}
        return {int(p.name): p for p in self.base.iterdir() if p.name.isdigit() and p.is_dir()}

    def _poll(self) -> None:
        now = time.monotonic()
        on_disk = self._on_disk()
        aspired = max(on_disk) if on_disk else None
        with self._lock:
            if aspired is not None and aspired not in self._versions:
                self._versions[aspired] = _Version(seen_at=now)
            if aspired is not None:
                v = self._versions[aspired]
                if v.state in ("END", "UNLOADING") and v.error_code == "OK":
                    # Re-added after removal: TF Serving loads it afresh.
                    self._versions[aspired] = v = _Version(seen_at=now)
                if v.state == "LOADING" and self._loaded(aspired, v, now):
                    folder = on_disk[aspired]
                    if not any((folder / f).is_file()
                               for f in ("saved_model.pb", "saved_model.pbtxt")):
                        v.state, v.error_code = "END", "UNKNOWN"
                        v.error_message = (
                            "Could not find SavedModel .pb or .pbtxt at supplied export "
                            f"directory path: {folder}"
                        )
                    else:
                        v.state, v.available_at = "AVAILABLE", now
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
    def _status_body(self, version: int | None) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.status_requests += 1
            items = sorted(self._versions.items(), reverse=True)
            if version is not None:
                items = [(n, v) for n, v in items if n == version]
            if not items:
                what = "any version" if version is None else f"version {version}"
                return 404, {"error": f"Could not find {what} of model {self.name}"}
            return 200, {"model_version_status": [
                {"version": str(n), "state": v.state,
                 "status": {"error_code": v.error_code, "error_message": v.error_message}}
                for n, v in items
            ]}

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        m = _STATUS.match(handler.path)
        if not m or m["name"] != self.name:
            return _not_found(handler)
        version = int(m["version"]) if m["version"] else None
        _reply(handler, *self._status_body(version))

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        m = _PREDICT.match(handler.path)
        if not m or m["name"] != self.name:
            return _not_found(handler)
        with self._lock:
            serving = [n for n, v in self._versions.items() if v.state == "AVAILABLE"]
        wanted = int(m["version"]) if m["version"] else (max(serving) if serving else None)
        if wanted is None or wanted not in serving:
            return _not_found(handler)
        length = int(handler.headers.get("Content-Length") or 0)
        try:
            body = json.loads(handler.rfile.read(length) or b"{}")
            instances = body["instances"]
            predictions = [_half_plus_two(x) for x in instances]
        except (ValueError, KeyError, TypeError) as exc:
            return _reply(handler, 400, {"error": f"bad request: {exc}"})
        _reply(handler, 200, {"predictions": predictions})


def _half_plus_two(x: Any) -> Any:
    if isinstance(x, list):
        return [_half_plus_two(v) for v in x]
    return 0.5 * float(x) + 2.0


def _reply(handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _not_found(handler: BaseHTTPRequestHandler) -> None:
    _reply(handler, 404, {"error": f"Servable not found for request: {handler.path}"})
