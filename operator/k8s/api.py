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
import datetime
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds
# Worker threads for the synchronous client: its own pool, not asyncio's
# default one (min(32, cores + 4) threads, shared with everything else that
# uses to_thread). 16 keeps a backlog of creates moving on 2 cores without
# the lockstep of a 6-thread pool; more threads only add GIL contention.
API_THREADS = 16


class Forbidden(Exception):
    """The API server refused the operator a call (403): its RBAC lacks a permission."""


def api_message(exc: ApiException) -> str:
    """The API server's own sentence for a refused call (its Status message)."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


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
        # One connection per worker thread, or threads queue for urllib3's pool.
        rest = getattr(self.api_client, "rest_client", None)
        if rest is not None and hasattr(rest, "pool_manager"):
            rest.pool_manager.connection_pool_kw["maxsize"] = API_THREADS
        self._pool = ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api")
        apps = client.AppsV1Api(self.api_client)
        core = client.CoreV1Api(self.api_client)
        self._core = core
        self._custom = client.CustomObjectsApi(self.api_client)
        self._calls = {
            "Deployment": _Calls(apps.read_namespaced_deployment,
                                 apps.create_namespaced_deployment,
                                 apps.patch_namespaced_deployment,
                                 apps.delete_namespaced_deployment),
            "Service": _Calls(core.read_namespaced_service, core.create_namespaced_service,
                              core.patch_namespaced_service, core.delete_namespaced_service),
            # Created only (heartbeat keys): the operator may not read Secrets back.
            "Secret": _Calls(core.read_namespaced_secret, core.create_namespaced_secret,
                             core.patch_namespaced_secret, core.delete_namespaced_secret),
        }

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn``'s answer as plain JSON (None when empty), parsed in the worker thread.

        The client's typed models are skipped (``_preload_content=False``):
        turning a Deployment into them and back into a dict cost more CPU than
        the request itself, most of it on the event loop, and made a backlog of
        creates CPU-bound. Non-2xx answers still raise ApiException.
        """
        # The client has no default timeout: a stalled connection would hold a
        # worker thread and this object's handlers forever.
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)

        def call() -> Any:
            data = fn(*args, _preload_content=False, **kwargs).data
            return json.loads(data) if data else None

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, call)
        except ApiException as exc:
            if exc.status == 403:
                # Not retried blindly: the status says which permission is missing.
                raise Forbidden(api_message(exc)) from None
            raise

    async def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object, or None when there is none of that name."""
        try:
            return await self._call(self._calls[kind].read, name, namespace)  # type: ignore[no-any-return]
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        calls = self._calls[body["kind"]]
        return await self._call(calls.create, body["metadata"]["namespace"], body)  # type: ignore[no-any-return]

    async def patch(
        self, kind: str, name: str, namespace: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Apply the JSON patch ``ops``; returns the object as patched."""
        return await self._call(  # type: ignore[no-any-return]
            self._calls[kind].patch, name, namespace, ops, _content_type=JSON_PATCH)

    async def delete(self, kind: str, name: str, namespace: str) -> None:
        try:
            await self._call(self._calls[kind].delete, name, namespace,
                             propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise

    async def get_custom(self, group: str, version: str, plural: str, name: str,
                         namespace: str) -> dict[str, Any] | None:
        """A custom object, or None when there is none of that name. Read by a list with a
        field selector: the operator's RBAC grants list and watch on its kinds, not get."""
        found = await self._call(self._custom.list_namespaced_custom_object, group, version,
                                 namespace, plural, field_selector=f"metadata.name={name}")
        items = found.get("items") or []
        return dict(items[0]) if items else None

    async def patch_status(
        self, group: str, version: str, plural: str, name: str, namespace: str,
        status: dict[str, Any],
    ) -> None:
        """Merge-patch a custom object's status subresource (a key set to None is deleted)."""
        await self._call(self._custom.patch_namespaced_custom_object_status, group, version,
                         namespace, plural, name, {"status": status},
                         _content_type=MERGE_PATCH)

    async def post_event(
        self, involved: dict[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event about ``involved`` (apiVersion, kind, name, namespace, uid), as
        kopf posts them, for the loops that run outside kopf's handlers."""
        now = datetime.datetime.now(datetime.UTC).isoformat()
        body = {
            "metadata": {"generateName": "mulambda-", "namespace": involved["namespace"]},
            "involvedObject": involved,
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "mulambda-operator"},
            "firstTimestamp": now, "lastTimestamp": now, "eventTime": None,
            "reportingComponent": "mulambda-operator", "reportingInstance": "mulambda-operator",
            "count": 1,
        }
        await self._call(self._core.create_namespaced_event, involved["namespace"], body)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.api_client.close)
        self._pool.shutdown(wait=False)


# The informers' LIST and WATCH calls (``informer.py``), by kind: (in one namespace, in all).
_LISTS = {
    "Deployment": (lambda c: client.AppsV1Api(c).list_namespaced_deployment,
                   lambda c: client.AppsV1Api(c).list_deployment_for_all_namespaces),
    "Service": (lambda c: client.CoreV1Api(c).list_namespaced_service,
                lambda c: client.CoreV1Api(c).list_service_for_all_namespaces),
}


def list_call(api_client: client.ApiClient, kind: str, namespace: str | None) -> Any:
    """The synchronous list (and, with ``watch=True``, watch) call of ``kind`` in
    ``namespace`` (None: every namespace), keyword arguments only."""
    in_one, in_all = _LISTS[kind]
    if namespace is None:
        return in_all(api_client)
    call = in_one(api_client)
    return lambda **kwargs: call(namespace, **kwargs)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409
