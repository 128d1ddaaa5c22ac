"""A small client for TF Serving's REST model-status API.

TF Serving answers ``GET /v1/models/NAME`` with::

    {"model_version_status": [
        {"version": "2", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]}

``version`` is a string (proto int64 in JSON). States are START, LOADING,
AVAILABLE, UNLOADING, END; a version that failed to load ends in END with a
non-OK ``error_code``. While no version of the model has been found yet (the
file-system poller has not seen a folder) it answers 404.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

log = logging.getLogger("mulambda.companion.serving")

AVAILABLE = "AVAILABLE"
END = "END"


@dataclass(frozen=True)
class VersionStatus:
    """One version as TF Serving reports it."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""

    @property
    def failed(self) -> bool:
        return self.state == END and self.error_code not in ("OK", "")


class ServingUnavailable(RuntimeError):
    """TF Serving did not answer (not started yet, restarting, or unreachable)."""


class ServingLoadFailed(RuntimeError):
    """TF Serving tried the version and gave up (e.g. not a valid SavedModel)."""

    reason = "ServingLoadFailed"


class ServingClient:
    """Async client for one TF Serving instance (normally in the same pod)."""

    def __init__(self, base_url: str, timeout: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        # Short timeouts: TF Serving is on loopback, a slow answer means it is busy or stuck.
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def model_status(self, model: str) -> list[VersionStatus]:
        """Versions TF Serving knows of; empty when it has found none yet (404)."""
        try:
            resp = await self._http.get(f"/v1/models/{model}")
        except httpx.HTTPError as exc:
            raise ServingUnavailable(f"TF Serving at {self.base_url} unreachable: {exc}") from exc
        if resp.status_code == 404:
            return []
        if resp.status_code != 200:
            raise ServingUnavailable(
                f"TF Serving answered {resp.status_code} for model {model}: {resp.text[:200]}"
            )
        out = []
        for item in resp.json().get("model_version_status", []):
            status = item.get("status") or {}
            out.append(
                VersionStatus(
                    version=int(item["version"]),
                    state=str(item.get("state", "UNKNOWN")),
                    error_code=str(status.get("error_code", "OK")),
                    error_message=str(status.get("error_message", "")),
                )
            )
        return out

    async def version_state(self, model: str, version: int) -> VersionStatus | None:
        """Status of one version, or None if TF Serving has not seen it."""
        for status in await self.model_status(model):
            if status.version == version:
                return status
        return None

    async def wait_available(self, model: str, version: int, *, poll: float = 1.0) -> VersionStatus:
        """Poll until ``version`` is AVAILABLE; bound it with :func:`asyncio.timeout` if needed.

        Raises :class:`ServingLoadFailed` when TF Serving reports the version
        failed. There is no built-in deadline: TF Serving being slow to load a
        large model, unreachable, or restarting is not the companion's
        failure, and it usually starts after the companion anyway.
        """
        while True:
            try:
                status = await self.version_state(model, version)
            except ServingUnavailable as exc:
                status = None
                log.debug("waiting for TF Serving model=%s version=%s error=%s",
                          model, version, exc)
            if status is not None:
                if status.state == AVAILABLE:
                    return status
                if status.failed:
                    raise ServingLoadFailed(
                        f"TF Serving failed to load {model} version {version}: "
                        f"{status.error_code}: {status.error_message}"
                    )
            await asyncio.sleep(poll)
