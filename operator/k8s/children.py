"""Create-or-adopt, compare-then-patch for the children the operator owns.

Shared by ModelExecutors (serving Deployment + Service) and Clients (workload
Deployment + Service). A child whose ``ownerReferences`` do not name the
parent is never touched: it belongs to someone else, and overwriting it
would lose their work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import kopf
from kubernetes.client.exceptions import ApiException

from .api import KubeApi, api_message, is_conflict
from .objects import TEMPLATE_HASH, ObjectRef

T = TypeVar("T")
Patch = list[dict[str, Any]]
# What a child kind compares: (JSON patch operations, what they change in words).
Changes = Callable[[dict[str, Any]], tuple[Patch, list[str]]]


class NameConflict(kopf.PermanentError):
    """A child's name is taken by an object this parent does not own."""


class Rejected(Exception):
    """The API server refused a child as invalid (400/422): retrying cannot help."""


def _rejected(exc: Exception, kind: str, name: str) -> Rejected | None:
    if isinstance(exc, ApiException) and exc.status in (400, 422):
        return Rejected(f"the API server rejected {kind} {name}: {api_message(exc)}")
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


def annotation_ops(current: dict[str, Any], wanted: dict[str, str]) -> Patch:
    """JSON patch setting the ``wanted`` annotations that differ from ``current``, key by
    key: the watch caches keep only ours, and the object has others (the Deployment
    controller's revision, other tools'), which a patch of the whole map would delete.
    The whole map only when none of ours is there (the map may be missing)."""
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    if not changed:
        return []
    if not any(k in current for k in wanted):
        return [{"op": "add", "path": "/metadata/annotations", "value": {**current, **wanted}}]
    return [{"op": "add", "path": "/metadata/annotations/"
             + k.replace("~", "~0").replace("/", "~1"), "value": v}
            for k, v in changed.items()]


def owned_by(obj: dict[str, Any], owner: ObjectRef) -> bool:
    return any(ref.get("uid") == owner.uid
               for ref in obj["metadata"].get("ownerReferences") or [])


def _adopt(child: dict[str, Any], owner: ObjectRef) -> None:
    """Owner reference (garbage collection, ownership check) and the owner's labels under
    ours, as ``kopf.adopt`` does."""
    meta = child["metadata"]
    refs = meta.setdefault("ownerReferences", [])
    if not any(ref.get("uid") == owner.uid for ref in refs):
        refs.append({"controller": True, "blockOwnerDeletion": True,
                     "apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name,
                     "uid": owner.uid})
    labels = meta.setdefault("labels", {})
    for key, value in owner.labels.items():
        labels.setdefault(key, value)


async def ensure_child(
    kube: KubeApi, owner: ObjectRef, desired: dict[str, Any], changes: Changes,
    cached: dict[str, Any] | None = None, absent: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Create ``desired`` owned by ``owner``, or patch the existing child by ``changes``.

    Returns the child as the API server has it and a list of what changed
    (``["created"]`` on creation, empty when nothing changed). ``cached`` is the
    child as a watch cache has it: when it is ours and needs no change, no API
    call is made; anything else is decided on a fresh GET. ``absent``: the
    watch cache has no such child, so it is created without a GET first (a
    new executor's GETs would all answer 404); a child the cache has not
    caught up with answers the create with a conflict, and the GET follows.
    """
    _adopt(desired, owner)
    kind, name, ns = desired["kind"], desired["metadata"]["name"], desired["metadata"]["namespace"]
    if cached is not None and owned_by(cached, owner) and not changes(cached)[0]:
        return cached, []
    current = None if absent and cached is None else await kube.get(kind, name, ns)
    if current is None:
        try:
            return await _guard(kube.create(desired), kind, name), ["created"]
        except Exception as exc:
            if not is_conflict(exc):
                raise
            # Created concurrently (or by an earlier run of this reconcile): converge on it.
            current = await kube.get(kind, name, ns)
            if current is None:
                raise kopf.TemporaryError(f"{kind} {name} vanished", delay=1) from exc
    if not owned_by(current, owner):
        raise NameConflict(
            f"{kind} {ns}/{name} already exists and is not owned by "
            f"{owner.kind} {owner.name}; rename or delete it"
        )
    ops, what = changes(current)
    if not ops:
        return current, []
    return await _guard(kube.patch(kind, name, ns, ops), kind, name), what


async def create_once(kube: KubeApi, owner: ObjectRef, desired: dict[str, Any]) -> bool:
    """Create ``desired`` owned by ``owner`` unless one of its name exists; True when it
    was created. For a child the operator may create but not read (a Secret of a key):
    an existing one is taken to be the one an earlier reconcile created (its name says
    which incarnation of the owner it belongs to)."""
    _adopt(desired, owner)
    kind, name = desired["kind"], desired["metadata"]["name"]
    try:
        await _guard(kube.create(desired), kind, name)
    except Exception as exc:
        if is_conflict(exc):
            return False
        raise
    return True


async def ensure_deployment(
    kube: KubeApi, owner: ObjectRef, desired: dict[str, Any],
    replicas: Callable[[int | None], int], cached: dict[str, Any] | None = None,
    absent: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Create or patch a Deployment; ``replicas(current)`` says what spec.replicas must be
    (``current`` is None on creation)."""
    desired["spec"]["replicas"] = replicas(None)

    def changes(current: dict[str, Any]) -> tuple[Patch, list[str]]:
        ops: Patch = []
        what: list[str] = []
        annotations = current["metadata"].get("annotations") or {}
        wanted = desired["metadata"]["annotations"]
        if wanted[TEMPLATE_HASH] != annotations.get(TEMPLATE_HASH):
            what.append("pod template")
            ops.append({"op": "replace", "path": "/spec/template",
                        "value": desired["spec"]["template"]})
        # The last valid spec changes with edits the pods do not see (scaling, traits):
        # recorded without an Event of its own.
        ops += annotation_ops(annotations, wanted)
        _add_label_changes(current, desired, ops, what)
        have_replicas = current.get("spec", {}).get("replicas")
        want_replicas = replicas(have_replicas)
        if want_replicas != have_replicas:
            what.append(f"replicas {have_replicas} -> {want_replicas}")
            ops.append({"op": "add", "path": "/spec/replicas", "value": want_replicas})
        return ops, what

    return await ensure_child(kube, owner, desired, changes, cached, absent)


async def ensure_service(
    kube: KubeApi, owner: ObjectRef, desired: dict[str, Any],
    cached: dict[str, Any] | None = None, absent: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Create or patch a Service (ports, selector, labels)."""

    def changes(current: dict[str, Any]) -> tuple[Patch, list[str]]:
        ops: Patch = []
        what: list[str] = []
        spec = current.get("spec", {})
        if _ports(spec.get("ports")) != _ports(desired["spec"]["ports"]):
            what.append("ports")
            ops.append({"op": "replace", "path": "/spec/ports",
                        "value": desired["spec"]["ports"]})
        if spec.get("selector") != desired["spec"]["selector"]:
            what.append("selector")
            ops.append({"op": "add", "path": "/spec/selector",
                        "value": desired["spec"]["selector"]})
        _add_label_changes(current, desired, ops, what)
        return ops, what

    return await ensure_child(kube, owner, desired, changes, cached, absent)


def _add_label_changes(
    current: dict[str, Any], desired: dict[str, Any], ops: Patch, what: list[str]
) -> None:
    """Enforce our labels and keep others': other controllers and policies (Kyverno, cost
    tools) add labels, and removing them every reconcile would fight them forever."""
    have = current["metadata"].get("labels") or {}
    want = desired["metadata"]["labels"]
    if not all(have.get(k) == v for k, v in want.items()):
        what.append("labels")
        ops.append({"op": "add", "path": "/metadata/labels", "value": {**have, **want}})


def _ports(ports: list[dict[str, Any]] | None) -> list[tuple[Any, ...]]:
    # The API server adds defaults (protocol, nodePort...): compare what we set.
    return sorted(
        (p.get("name"), p.get("port"), str(p.get("targetPort")), p.get("protocol", "TCP"))
        for p in ports or []
    )


async def remove_owned(kube: KubeApi, owner: ObjectRef, name: str, namespace: str) -> list[str]:
    """Delete the Deployment and Service ``name`` if (and only if) ``owner`` owns them."""
    removed = []
    for kind in ("Deployment", "Service"):
        child = await kube.get(kind, name, namespace)
        if child is not None and owned_by(child, owner):
            await kube.delete(kind, name, namespace)
            removed.append(f"{kind} {namespace}/{name}")
    return removed
