"""Get-or-create, compare-then-patch for the children the operator owns.

Shared by ModelExecutors (serving Deployment + Service) and Clients (workload
Deployment + Service). A child whose ``ownerReferences`` do not name the
parent is never touched: it belongs to someone else, and overwriting it
would lose their work.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import kopf
from kubernetes.client.exceptions import ApiException

from ..k8s.objects import TEMPLATE_HASH
from .api import JSON_PATCH, KubeApi, is_conflict

T = TypeVar("T")


class NameConflict(kopf.PermanentError):
    """A child's name is taken by an object this parent does not own."""


class Rejected(Exception):
    """The API server refused a child as invalid (400/422): retrying cannot help."""


def _rejected(exc: Exception, kind: str, name: str) -> Rejected | None:
    if isinstance(exc, ApiException) and exc.status in (400, 422):
        try:
            detail = json.loads(exc.body or "{}").get("message") or exc.reason
        except (TypeError, ValueError):
            detail = exc.reason
        return Rejected(f"the API server rejected {kind} {name}: {detail}")
    return None


async def _guard(coro: Awaitable[T], kind: str, name: str) -> T:
    """Turn an API validation failure into :class:`Rejected`."""
    try:
        return await coro
    except ApiException as exc:
        rejected = _rejected(exc, kind, name)
        if rejected is not None:
            raise rejected from None
        raise


def owned_by(obj: dict[str, Any], owner: kopf.Body) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _check_owner(current: dict[str, Any], owner: kopf.Body, kind: str) -> None:
    if not owned_by(current, owner):
        meta = current["metadata"]
        raise NameConflict(
            f"{kind} {meta.get('namespace')}/{meta['name']} already exists and is not owned by "
            f"{owner['kind']} {owner['metadata']['name']}; rename or delete it"
        )


async def ensure_deployment(
    kube: KubeApi,
    owner: kopf.Body,
    desired: dict[str, Any],
    replicas: Callable[[int | None], int],
) -> tuple[dict[str, Any], list[str]]:
    """Create or patch a Deployment; ``replicas(current)`` says what spec.replicas must be.

    Returns the Deployment as the API server has it and a list of what changed
    (``["created"]`` on creation, empty when nothing changed).
    """
    kopf.adopt(desired, owner=owner)
    name, ns = desired["metadata"]["name"], desired["metadata"]["namespace"]
    current = await kube.get_deployment(name, ns)
    if current is None:
        desired["spec"]["replicas"] = replicas(None)
        try:
            return await _guard(kube.create_deployment(desired), "Deployment", name), [
                "created"]
        except Exception as exc:
            if not is_conflict(exc):
                raise
            # Created concurrently (or by an earlier run of this reconcile): converge on it.
            current = await kube.get_deployment(name, ns)
            if current is None:
                raise kopf.TemporaryError(f"Deployment {name} vanished", delay=1) from exc
    _check_owner(current, owner, "Deployment")
    ops: list[dict[str, Any]] = []
    what: list[str] = []
    key = TEMPLATE_HASH
    want = desired["metadata"]["annotations"][key]
    have = (current["metadata"].get("annotations") or {}).get(key)
    if want != have:
        what.append("pod template")
        ops += [
            {"op": "replace", "path": "/spec/template", "value": desired["spec"]["template"]},
            {"op": "add", "path": "/metadata/annotations",
             "value": {**(current["metadata"].get("annotations") or {}), key: want}},
        ]
    labels = _merged_labels(current, desired)
    if labels is not None:
        what.append("labels")
        ops.append({"op": "add", "path": "/metadata/labels", "value": labels})
    have_replicas = current.get("spec", {}).get("replicas")
    want_replicas = replicas(have_replicas)
    if want_replicas != have_replicas:
        what.append(f"replicas {have_replicas} -> {want_replicas}")
        ops.append({"op": "add", "path": "/spec/replicas", "value": want_replicas})
    if not ops:
        return current, []
    return await _guard(kube.patch_deployment(name, ns, ops, JSON_PATCH), "Deployment",
                        name), what


def _merged_labels(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, str] | None:
    """Labels with ours enforced and others' kept; None when ours are already right.

    Other controllers and policies (Kyverno, cost tools) add labels: removing
    them every reconcile would fight them forever.
    """
    have = current["metadata"].get("labels") or {}
    want = desired["metadata"]["labels"]
    if all(have.get(k) == v for k, v in want.items()):
        return None
    return {**have, **want}


def _ports(ports: list[dict[str, Any]] | None) -> list[tuple[Any, ...]]:
    # The API server adds defaults (protocol, nodePort...): compare what we set.
    return sorted(
        (p.get("name"), p.get("port"), str(p.get("targetPort")), p.get("protocol", "TCP"))
        for p in ports or []
    )


async def ensure_service(
    kube: KubeApi, owner: kopf.Body, desired: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Create or patch a Service (ports, selector, labels)."""
    kopf.adopt(desired, owner=owner)
    name, ns = desired["metadata"]["name"], desired["metadata"]["namespace"]
    current = await kube.get_service(name, ns)
    if current is None:
        try:
            return await _guard(kube.create_service(desired), "Service", name), ["created"]
        except Exception as exc:
            if not is_conflict(exc):
                raise
            current = await kube.get_service(name, ns)
            if current is None:
                raise kopf.TemporaryError(f"Service {name} vanished", delay=1) from exc
    _check_owner(current, owner, "Service")
    ops: list[dict[str, Any]] = []
    what: list[str] = []
    spec = current.get("spec", {})
    if _ports(spec.get("ports")) != _ports(desired["spec"]["ports"]):
        what.append("ports")
        ops.append({"op": "replace", "path": "/spec/ports", "value": desired["spec"]["ports"]})
    if spec.get("selector") != desired["spec"]["selector"]:
        what.append("selector")
        ops.append({"op": "add", "path": "/spec/selector", "value": desired["spec"]["selector"]})
    labels = _merged_labels(current, desired)
    if labels is not None:
        what.append("labels")
        ops.append({"op": "add", "path": "/metadata/labels", "value": labels})
    if not ops:
        return current, []
    return await _guard(kube.patch_service(name, ns, ops, JSON_PATCH), "Service", name), what


async def remove_owned(kube: KubeApi, owner: kopf.Body, name: str, namespace: str) -> list[str]:
    """Delete the Deployment and Service ``name`` if (and only if) ``owner`` owns them."""
    removed = []
    dep = await kube.get_deployment(name, namespace)
    if dep is not None and owned_by(dep, owner):
        await kube.delete_deployment(name, namespace)
        removed.append(f"Deployment {namespace}/{name}")
    svc = await kube.get_service(name, namespace)
    if svc is not None and owned_by(svc, owner):
        await kube.delete_service(name, namespace)
        removed.append(f"Service {namespace}/{name}")
    return removed
