"""Thin async wrapper over the Kubernetes client for the objects the operator owns.

The official client is synchronous; every call runs in a worker thread so
handlers never block kopf's event loop. Only merge and JSON patches are used
(no strategic merge, no server-side apply), which keeps the operator
compatible with every API server and with the KMock emulator in tests.
Every API call the operator makes goes through here, so ``operator/rbac.py``
can be checked against this module.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

MERGE = "application/merge-patch+json"
REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds
JSON_PATCH = "application/json-patch+json"


class KubeApi:
    """Typed calls for Deployments and Services; returns plain dicts."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.apps = client.AppsV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def _dict(self, obj: Any) -> dict[str, Any]:
        return self.api_client.sanitize_for_serialization(obj)  # type: ignore[no-any-return]

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # The client has no default timeout: a stalled connection would hold a
        # worker thread and this object's handlers forever.
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _get(self, fn: Any, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            return self._dict(await self._call(fn, name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # -- Deployments ---------------------------------------------------------
    async def get_deployment(self, name: str, namespace: str) -> dict[str, Any] | None:
        return await self._get(self.apps.read_namespaced_deployment, name, namespace)

    async def create_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        ns = body["metadata"]["namespace"]
        return self._dict(await self._call(self.apps.create_namespaced_deployment, ns, body))

    async def patch_deployment(
        self, name: str, namespace: str, patch: Any, content_type: str = MERGE
    ) -> dict[str, Any]:
        return self._dict(
            await self._call(
                self.apps.patch_namespaced_deployment, name, namespace, patch,
                _content_type=content_type,
            )
        )

    async def delete_deployment(self, name: str, namespace: str) -> None:
        await self._delete(self.apps.delete_namespaced_deployment, name, namespace)

    async def _delete(self, fn: Any, name: str, namespace: str) -> None:
        try:
            await self._call(fn, name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise

    # -- Services -------------------------------------------------------------
    async def get_service(self, name: str, namespace: str) -> dict[str, Any] | None:
        return await self._get(self.core.read_namespaced_service, name, namespace)

    async def create_service(self, body: dict[str, Any]) -> dict[str, Any]:
        ns = body["metadata"]["namespace"]
        return self._dict(await self._call(self.core.create_namespaced_service, ns, body))

    async def patch_service(
        self, name: str, namespace: str, patch: Any, content_type: str = MERGE
    ) -> dict[str, Any]:
        return self._dict(
            await self._call(
                self.core.patch_namespaced_service, name, namespace, patch,
                _content_type=content_type,
            )
        )

    async def delete_service(self, name: str, namespace: str) -> None:
        await self._delete(self.core.delete_namespaced_service, name, namespace)

    async def close(self) -> None:
        await asyncio.to_thread(self.api_client.close)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409
