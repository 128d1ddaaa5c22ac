"""Thin async wrapper over the Kubernetes client for the objects the operator owns.

The official client is synchronous; every call runs in a worker thread so
handlers never block kopf's event loop. Children are patched with JSON
patches only (no strategic merge, no server-side apply), which keeps the
operator compatible with every API server and with the KMock emulator in
tests.
Every API call the operator makes goes through here, so ``operator/rbac.py``
can be checked against this module.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds


class Forbidden(Exception):
    """The API server refused the operator a call (403): its RBAC lacks a permission."""


def api_message(exc: ApiException) -> str:
    """The API server's own sentence for a refused call (its Status message)."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class _Calls:
    """The client methods for one kind of child."""

    read: Any
    create: Any
    patch: Any
    delete: Any


class KubeApi:
    """Get, create, patch and delete the operator's children by kind; returns plain dicts."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        apps = client.AppsV1Api(self.api_client)
        core = client.CoreV1Api(self.api_client)
        self._calls = {
            "Deployment": _Calls(apps.read_namespaced_deployment,
                                 apps.create_namespaced_deployment,
                                 apps.patch_namespaced_deployment,
                                 apps.delete_namespaced_deployment),
            "Service": _Calls(core.read_namespaced_service, core.create_namespaced_service,
                              core.patch_namespaced_service, core.delete_namespaced_service),
        }

    def _dict(self, obj: Any) -> dict[str, Any]:
        return self.api_client.sanitize_for_serialization(obj)  # type: ignore[no-any-return]

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # The client has no default timeout: a stalled connection would hold a
        # worker thread and this object's handlers forever.
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 403:
                # Not retried blindly: the status says which permission is missing.
                raise Forbidden(api_message(exc)) from None
            raise

    async def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object, or None when there is none of that name."""
        try:
            return self._dict(await self._call(self._calls[kind].read, name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        calls = self._calls[body["kind"]]
        return self._dict(await self._call(calls.create, body["metadata"]["namespace"], body))

    async def patch(
        self, kind: str, name: str, namespace: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Apply the JSON patch ``ops``; returns the object as patched."""
        return self._dict(await self._call(self._calls[kind].patch, name, namespace, ops,
                                           _content_type=JSON_PATCH))

    async def delete(self, kind: str, name: str, namespace: str) -> None:
        try:
            await self._call(self._calls[kind].delete, name, namespace,
                             propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise

    async def close(self) -> None:
        await asyncio.to_thread(self.api_client.close)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409
