"""An emulated Kubernetes API server for integration tests (KMock, with its gaps filled).

KMock's ``KubernetesEmulator`` (kmock 0.8) stores objects as plain JSON and
little more. Kopf and the kubernetes client rely on server behaviour it does
not have, so :class:`KubeEmulator` replaces its write path and watch stream:

* create sets ``metadata.uid``, ``resourceVersion`` (one monotonic counter
  for the whole server), ``creationTimestamp``, ``generation`` (for kinds that
  track it), ``namespace`` from the URL; it rejects a set ``resourceVersion``,
  names and labels the API server would reject, and existing names (409);
* PATCH understands JSON patch (a failed ``test`` is 422, as kopf expects),
  JSON merge patch and strategic merge patch (built-in kinds only; custom
  resources answer 415 like the real server); PUT replaces; a no-op write
  changes nothing (no new resourceVersion, no event); a stale
  ``resourceVersion`` in the body is 409;
* the ``status`` subresource: writes to the main resource keep the old status,
  writes to ``/status`` change only status; ``generation`` is bumped only
  when something outside ``metadata``/``status`` changes;
* DELETE honours finalizers: it sets ``deletionTimestamp`` and keeps the
  object; no new finalizers may be added afterwards; removing the last one
  deletes the object. Real deletion garbage-collects dependents whose
  ``ownerReferences`` name the deleted uid (Background/Foreground delete them,
  honouring their finalizers; Orphan strips the reference; a dependent with
  another live owner only loses the dangling reference);
* list returns the current resourceVersion; watch honours ``resourceVersion``
  (only later events; KMock replays everything), ``timeoutSeconds``,
  ``sendInitialEvents``, label and field selectors;
* posting a CRD declares its resource (and deleting it removes the resource
  and its objects);
* discovery answers ``groupVersion: v1`` for the core group (KMock says
  ``/v1``) and lists carry ``kind``/``apiVersion``;
* every request is recorded in :attr:`KubeEmulator.request_log` with its RBAC
  verb, so tests can check an operator only uses what its Role grants.

* writes are admitted as upstream admits them: custom resources are pruned,
  defaulted and validated against their CRD's schema (:mod:`support.kube_schema`);
  built-in kinds get the API server's defaults (Deployment replicas and
  strategy, container pull policy, Service ClusterIP, ...), semantic checks
  (selector matches template labels, mounts name volumes, ...) and immutable
  fields (:mod:`support.kube_defaults`);
* Deployments and ReplicaSets serve ``/scale``; namespaces are served
  (KMock's URL parser cannot address them) and deleting one deletes its
  contents; ``require_namespaces=True`` makes creating into a missing
  namespace a 404 as on a cluster.

Known gaps (not emulated): server-side apply (415), ``deletecollection``,
admission webhooks, CEL rules in CRDs, controllers (no pods behind
Deployments, no Endpoints; :meth:`Kube.simulate_rollout` writes a
Deployment's status), watch events that move an object out of a label
selector, periodic bookmarks, authentication/authorization (every request
is allowed; RBAC is checked afterwards from the request log).

:class:`EmulatorServer` runs the emulator on a loopback port in its own
thread, so sync tests can block while it serves; :class:`Kube` is the
object the ``kube`` fixture yields (URL, kubeconfig, CRUD helpers).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import builtins
import contextlib
import copy
import dataclasses
import datetime
import random
import re
import string
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import httpx
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import apps, k8s, parsing, rendering  # kmock is pinned (==0.8)

from support.kube_defaults import (
    apply_builtin_defaults,
    builtin_errors,
    carry_over_and_check_immutable,
)
from support.kube_schema import apply_defaults, prune, validation_errors
from support.kube_semantics import (
    DNS1123_LABEL,
    json_merge_patch,
    match_field_selector,
    match_label_selector,
    metadata_errors,
    name_errors,
    rbac_allows,
    rbac_verb,
    strategic_merge_patch,
)

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO_ROOT / "crds"

# Requests carrying this header come from the test itself (the Kube helpers),
# not from the operator: they are excluded from RBAC checks.
HARNESS_HEADER = "X-Mulambda-Test-Harness"

CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")

# Built-in kinds an operator of this project touches. ``generation``: whether the
# real API server keeps metadata.generation for the kind.
BUILTIN_RESOURCES: dict[str, dict[str, Any]] = {
    # kopf's namespace observer waits for this resource to exist, even clusterwide.
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "subresources": {"status"}},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": {"status"}},
    "v1/services": {"kind": "Service", "namespaced": True, "subresources": {"status"}},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/serviceaccounts": {"kind": "ServiceAccount", "namespaced": True},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/endpoints": {"kind": "Endpoints", "namespaced": True},
    "events.k8s.io/v1/events": {"kind": "Event", "namespaced": True},
    "apps/v1/deployments": {
        "kind": "Deployment", "namespaced": True, "subresources": {"status", "scale"},
        "generation": True,
    },
    "apps/v1/replicasets": {
        "kind": "ReplicaSet", "namespaced": True, "subresources": {"status", "scale"},
        "generation": True,
    },
    "batch/v1/jobs": {
        "kind": "Job", "namespaced": True, "subresources": {"status"}, "generation": True,
    },
    "coordination.k8s.io/v1/leases": {"kind": "Lease", "namespaced": True},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition", "namespaced": False, "subresources": {"status"},
        "generation": True,
    },
}
SCALABLE = frozenset({("apps", "deployments"), ("apps", "replicasets")})
ALL_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}


_NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?$")


def _parse_path_with_namespaces(path: str) -> parsing.ParsedPath:
    # KMock's parser reads /api/v1/namespaces[/NAME] as a namespace prefix with no
    # resource after it (and fails on the bare list URL): give it the namespaces resource.
    m = _NAMESPACE_PATH.match(path)
    if m:
        return parsing.ParsedPath(group="", version="v1", plural="namespaces",
                                  namespace=None, name=m.group(1), subresource=m.group(2))
    return _kmock_parse_path(path)


if not getattr(parsing.parse_path, "_serves_namespaces", False):
    _kmock_parse_path = parsing.parse_path
    _parse_path_with_namespaces._serves_namespaces = True  # type: ignore[attr-defined]
    parsing.parse_path = _parse_path_with_namespaces
else:  # this module was imported twice (importlib mode): keep the first wrapper's original
    _kmock_parse_path = parsing.parse_path.__globals__["_kmock_parse_path"]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_version_of(resource: kmock.resource) -> str:
    """``v1`` for the core group, ``group/version`` otherwise."""
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _api_error(code: int, reason: str, message: str, **details: Any) -> k8s.KubernetesError:
    # The body a real API server sends (metav1.Status); clients key off code/reason.
    return k8s.KubernetesError(status=code, reason=reason, message=message, details=details)


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator received, with its Kubernetes meaning."""

    method: str
    path: str
    query: Mapping[str, str]
    group: str | None
    version: str | None
    plural: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    verb: str | None  # RBAC verb; None for discovery and non-resource URLs
    user_agent: str
    from_harness: bool

    @property
    def rbac_resource(self) -> str | None:
        """``plural`` or ``plural/subresource``, as written in a Role's ``resources``."""
        if self.plural is None:
            return None
        return f"{self.plural}/{self.subresource}" if self.subresource else self.plural

    @classmethod
    def of(cls, request: rendering.Request) -> RecordedRequest:
        res = request.resource
        plural = res.plural if res is not None else None
        params = dict(request.params)
        return cls(
            method=request.method.value,
            path=request.url.path,
            query=params,
            group=res.group if res is not None else None,
            version=res.version if res is not None else None,
            plural=plural,
            subresource=request.subresource,
            namespace=request.namespace,
            name=request.name,
            verb=(rbac_verb(request.method.value, has_name=request.name is not None,
                            watch=params.get("watch") in ("true", "1"))
                  if plural else None),
            user_agent=request.headers.get("User-Agent", ""),
            from_harness=HARNESS_HEADER in request.headers
            or HARNESS_HEADER.lower() in {k.lower() for k in request.headers},
        )


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """KMock's emulator with the API-server semantics kopf and the client rely on."""

    request_log: list[RecordedRequest] = attrs.field(factory=list, init=False)
    custom_resources: set[kmock.resource] = attrs.field(factory=set, init=False)
    generation_resources: set[kmock.resource] = attrs.field(factory=set, init=False)
    schemas: dict[kmock.resource, Any] = attrs.field(factory=dict, init=False)
    resource_version: int = attrs.field(default=0, init=False)
    # Reject objects in namespaces that were never created (as a real cluster does).
    require_namespaces: bool = False
    _cluster_ips: int = attrs.field(default=0, init=False)
    # (resourceVersion, resource, event) in order; watches replay from here.
    _events: list[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(
        factory=list, init=False)
    _event_rvs: list[int] = attrs.field(factory=list, init=False)
    # One condition guards all state and wakes watchers on every event.
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # KMock maps no action to PUT; without this a replace answers 404.
        self.fallback[kmock.method.PUT] << self._serve_replace
        for key, spec in BUILTIN_RESOURCES.items():
            self.declare(key, **spec)

    # --- declarations ----------------------------------------------------------------------------

    def declare(
        self,
        key: str | kmock.resource,
        *,
        kind: str,
        namespaced: bool,
        subresources: Iterable[str] = (),
        shortnames: Iterable[str] = (),
        categories: Iterable[str] = (),
        singular: str | None = None,
        generation: bool = False,
        custom: bool = False,
        schema: Any = None,
    ) -> kmock.resource:
        """Serve a resource (discovery, CRUD, watch). Returns its parsed key."""
        resource = kmock.resource(key) if isinstance(key, str) else key
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, singular=singular or kind.lower(),
            verbs=ALL_VERBS, subresources=set(subresources), shortnames=set(shortnames),
            categories=set(categories),
        )
        (self.generation_resources.add if generation else self.generation_resources.discard)(
            resource)
        (self.custom_resources.add if custom else self.custom_resources.discard)(resource)
        if schema is not None:
            self.schemas[resource] = schema
        return resource

    def declare_crd(self, crd: Mapping[str, Any]) -> list[kmock.resource]:
        """Serve every served version of a CustomResourceDefinition."""
        spec = crd["spec"]
        names = spec["names"]
        declared = []
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            declared.append(self.declare(
                kmock.resource(spec["group"], version["name"], names["plural"]),
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                subresources=set((version.get("subresources") or {}).keys()),
                shortnames=names.get("shortNames") or (),
                categories=names.get("categories") or (),
                singular=names.get("singular"),
                generation=True,
                custom=True,
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            ))
        return declared

    def _undeclare_crd(self, crd: Mapping[str, Any]) -> list[kmock.resource]:
        spec = crd["spec"]
        gone = []
        for version in spec["versions"]:
            resource = kmock.resource(spec["group"], version["name"], spec["names"]["plural"])
            if resource in self.resources:
                del self.resources[resource]
                gone.append(resource)
            self.custom_resources.discard(resource)
            self.generation_resources.discard(resource)
            self.schemas.pop(resource, None)
        return gone

    def kind_to_resource(self, api_version: str, kind: str) -> kmock.resource:
        """The declared resource serving ``kind`` in ``api_version`` (KeyError if none)."""
        group, _, version = api_version.rpartition("/")
        for resource in self.resources:
            if (resource.group, resource.version) == (group, version) and \
                    self.resources[resource].kind == kind:
                return resource
        raise KeyError(f"no resource serves kind {kind!r} in {api_version!r}")

    # --- request log -----------------------------------------------------------------------------

    def rbac_triples(self, *, include_harness: bool = False) -> set[tuple[str, str, str]]:
        """Every (apiGroup, resource[/subresource], verb) requested by non-harness clients."""
        return {
            (r.group or "", r.rbac_resource or "", r.verb)
            for r in list(self.request_log)
            if r.verb is not None and (include_harness or not r.from_harness)
        }

    def rbac_violations(self, rules: Sequence[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
        """The requested triples that none of the Role/ClusterRole ``rules`` grant."""
        return {t for t in self.rbac_triples() if not rbac_allows(rules, *t)}

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self.request_log.append(RecordedRequest.of(request))
        # Skip KubernetesEmulator._handle: its write path (no uid, no resourceVersion,
        # merge-only patches) is replaced by the _serve_* fallbacks below. Going
        # through the reactions first also lets a test inject errors
        # (``emulator['patch', resource] << 500``) that then change nothing.
        return await apps.RawHandler._handle(self, request)

    # --- state helpers (call with self._changed held) --------------------------------------------

    def _info(self, request: rendering.Request) -> kmock.ResourceInfo:
        resource = request.resource
        if resource is None or resource.plural is None or resource not in self.resources:
            raise k8s.KubernetesResourceNotFoundError()
        info = self.resources[resource]
        if not info.namespaced and request.namespace is not None:
            raise _api_error(404, "NotFound", f"{resource.plural} is cluster-scoped")
        return info

    def _live(self, resource: kmock.resource, namespace: str | None, name: str
              ) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else obj.last.raw

    def _not_found(self, resource: kmock.resource, name: str) -> k8s.KubernetesError:
        what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
        return _api_error(404, "NotFound", f'{what} "{name}" not found',
                          name=name, group=resource.group, kind=resource.plural)

    def _store(self, resource: kmock.resource, namespace: str | None, name: str,
               obj: dict[str, Any]) -> None:
        key = (resource, namespace, name)
        if key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj

    def _emit(self, resource: kmock.resource, event_type: str, obj: Mapping[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        self._events.append((rv, resource, {"type": event_type, "object": copy.deepcopy(obj)}))
        self._event_rvs.append(rv)
        self._changed.notify_all()

    def _next_rv(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def _tracks_generation(self, resource: kmock.resource) -> bool:
        return resource in self.generation_resources

    def _live_items(self, resource: kmock.resource, namespace: str | None
                    ) -> list[tuple[str | None, str, dict[str, Any]]]:
        items = []
        for (res, ns, name), obj in self.objects.items():
            if res == resource and not obj.deleted and (namespace is None or ns == namespace):
                items.append((ns, name, obj.last.raw))
        return sorted(items, key=lambda i: (i[0] or "", i[1]))

    @staticmethod
    def _convert_string_data(resource: kmock.resource, obj: dict[str, Any]) -> None:
        # Secrets: the API server folds write-only stringData into base64 data.
        if (resource.group, resource.plural) == ("", "secrets") and "stringData" in obj:
            data = obj.setdefault("data", {}) or {}
            for key, value in (obj.pop("stringData") or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data

    def _invalid(self, info: kmock.ResourceInfo, name: str, errors: list[str]
                 ) -> k8s.KubernetesError:
        return _api_error(422, "Invalid", f'{info.kind} "{name}" is invalid: ' + "; ".join(errors),
                          name=name, kind=info.kind,
                          causes=[{"message": e} for e in errors])

    def _allocate_cluster_ip(self) -> str:
        self._cluster_ips += 1
        return f"10.96.{self._cluster_ips // 250}.{self._cluster_ips % 250 + 1}"

    def _admit(self, resource: kmock.resource, info: kmock.ResourceInfo, name: str,
               obj: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaulting, pruning and validation, as the API server runs them on every write."""
        group, plural = resource.group or "", resource.plural or ""
        errors: list[str] = []
        schema = self.schemas.get(resource)
        if resource in self.custom_resources:
            if schema is not None:
                obj = apply_defaults(prune(obj, schema, root=True), schema)
                errors += validation_errors(obj, schema)
        else:
            if old is not None:
                errors += carry_over_and_check_immutable(group, plural, old, obj)
            apply_builtin_defaults(group, plural, obj, self._allocate_cluster_ip)
            errors += builtin_errors(group, plural, obj)
        if errors:
            raise self._invalid(info, name, errors)
        return obj

    # --- create ----------------------------------------------------------------------------------

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        if request.subresource is not None:
            raise _api_error(405, "MethodNotAllowed",
                             f"creating {request.subresource} is not emulated")
        if not isinstance(request.data, dict):
            raise _api_error(400, "BadRequest", "the request body must be a JSON object")
        dry_run = "dryRun" in request.params
        async with self._changed:
            obj = self._create(request, info, copy.deepcopy(request.data), dry_run=dry_run)
        return rendering.Response(status=201, payload=obj)

    def _create(self, request: rendering.Request, info: kmock.ResourceInfo, obj: dict[str, Any],
                *, dry_run: bool) -> dict[str, Any]:
        resource = request.resource
        assert resource is not None
        meta = obj.setdefault("metadata", {})
        namespace = request.namespace
        if info.namespaced:
            if namespace is None:
                raise _api_error(404, "NotFound",
                                 f"{resource.plural} is namespaced: POST to .../namespaces/NS/...")
            if meta.get("namespace") not in (None, "", namespace):
                raise _api_error(400, "BadRequest",
                                 "the namespace of the provided object does not match the "
                                 "namespace sent on the request")
            if not DNS1123_LABEL.match(namespace):
                raise self._invalid(info, meta.get("name", ""),
                                    [f'metadata.namespace: Invalid value: "{namespace}"'])
            if self.require_namespaces and \
                    self._live(kmock.resource("", "v1", "namespaces"), None, namespace) is None:
                raise _api_error(404, "NotFound", f'namespaces "{namespace}" not found')
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        expected_api_version = api_version_of(resource)
        if obj.get("apiVersion") not in (None, expected_api_version) or \
                obj.get("kind") not in (None, info.kind):
            raise _api_error(400, "BadRequest",
                             f"the object is {obj.get('apiVersion')}/{obj.get('kind')}, "
                             f"the URL serves {expected_api_version}/{info.kind}")
        obj["apiVersion"], obj["kind"] = expected_api_version, info.kind
        if meta.get("resourceVersion"):
            raise _api_error(400, "BadRequest",
                             "resourceVersion should not be set on objects to be created")
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            alphabet = string.ascii_lowercase + string.digits
            while True:
                name = meta["generateName"] + "".join(random.choices(alphabet, k=5))
                if self._live(resource, namespace, name) is None:
                    break
        if not name:
            raise self._invalid(info, "", ["metadata.name: Required value: name or "
                                           "generateName is required"])
        errors = name_errors(resource.group or "", resource.plural or "", name)
        errors += metadata_errors(meta)
        if errors:
            raise self._invalid(info, name, errors)
        if self._live(resource, namespace, name) is not None:
            what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
            raise _api_error(409, "AlreadyExists", f'{what} "{name}" already exists',
                             name=name, group=resource.group, kind=resource.plural)
        if "status" in info.subresources:
            obj.pop("status", None)  # status is written only through /status
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(field, None)
        meta["name"] = name
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if self._tracks_generation(resource):
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        self._convert_string_data(resource, obj)
        obj = self._admit(resource, info, name, obj)
        meta = obj["metadata"]
        if dry_run:
            return obj
        meta["resourceVersion"] = self._next_rv()
        self._store(resource, namespace, name, obj)
        self._emit(resource, "ADDED", obj)
        if resource == CRD_RESOURCE:
            self.declare_crd(obj)
        return obj

    # --- update (PATCH and PUT) ------------------------------------------------------------------

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        resource = request.resource
        assert resource is not None and request.name is not None
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        data = request.data

        def compute(old: dict[str, Any]) -> dict[str, Any]:
            if content_type == "application/json-patch+json":
                if not isinstance(data, list):
                    raise _api_error(400, "BadRequest", "a JSON patch must be a list")
                try:
                    return jsonpatch.apply_patch(old, data)
                except jsonpatch.JsonPatchTestFailed as exc:
                    raise _api_error(422, "Invalid", f"the JSON patch test failed: {exc}") \
                        from exc
                except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                    raise _api_error(422, "Invalid", f"the JSON patch cannot apply: {exc}") \
                        from exc
            if not isinstance(data, dict):
                raise _api_error(400, "BadRequest", "a merge patch must be a JSON object")
            if content_type == "application/merge-patch+json":
                return json_merge_patch(old, data)
            if content_type == "application/strategic-merge-patch+json":
                if resource in self.custom_resources:
                    # As upstream: custom resources have no patch-merge-keys to merge by.
                    raise _api_error(415, "UnsupportedMediaType",
                                     "strategic merge patch is not supported for custom "
                                     "resources; use application/merge-patch+json")
                return strategic_merge_patch(old, data)
            raise _api_error(415, "UnsupportedMediaType",
                             f"the emulator does not support PATCH with {content_type!r} "
                             "(server-side apply is not emulated)")

        async with self._changed:
            return self._update(request, info, compute, replace=False)

    async def _serve_replace(self, request: rendering.Request) -> rendering.Payload:
        if request.resource is None or request.name is None:
            raise k8s.KubernetesEndpointNotFoundError()
        info = self._info(request)
        if not isinstance(request.data, dict):
            raise _api_error(400, "BadRequest", "the request body must be a JSON object")
        body = copy.deepcopy(request.data)
        async with self._changed:
            return self._update(request, info, lambda old: body, replace=True)

    def _update(self, request: rendering.Request, info: kmock.ResourceInfo,
                compute: Callable[[dict[str, Any]], dict[str, Any]], *, replace: bool
                ) -> dict[str, Any]:
        resource, namespace, name = request.resource, request.namespace, request.name
        assert resource is not None and name is not None
        current = self._live(resource, namespace, name)
        if current is None:
            raise self._not_found(resource, name)
        old = copy.deepcopy(current)
        old_meta = old["metadata"]
        scale = request.subresource == "scale"
        if scale and (resource.group, resource.plural) not in SCALABLE:
            raise self._not_found(resource, name)
        candidate = compute(_scale_of(old) if scale else copy.deepcopy(old))
        if not isinstance(candidate, dict):
            raise _api_error(422, "Invalid", "the patched object is not a JSON object")
        cand_meta = candidate.get("metadata") or {}
        cand_rv = cand_meta.get("resourceVersion")
        if replace and not cand_rv and resource in self.custom_resources:
            raise self._invalid(info, name, ["metadata.resourceVersion: Invalid value: 0x0: "
                                             "must be specified for an update"])
        if cand_rv and cand_rv != old_meta["resourceVersion"]:
            what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
            raise _api_error(409, "Conflict",
                             f'Operation cannot be fulfilled on {what} "{name}": the object has '
                             "been modified; please apply your changes to the latest version "
                             "and try again", name=name, kind=resource.plural)
        if cand_meta.get("name", name) != name or (
                info.namespaced and cand_meta.get("namespace", namespace) != namespace):
            raise _api_error(400, "BadRequest",
                             "the name/namespace of the object does not match the URL")

        if request.subresource == "status":
            if "status" not in info.subresources:
                raise self._not_found(resource, name)
            # As the CRD status strategy: only .status comes from the request.
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
        elif scale:
            new = copy.deepcopy(old)
            new.setdefault("spec", {})["replicas"] = (candidate.get("spec") or {}).get("replicas")
        elif request.subresource is not None:
            raise _api_error(404, "NotFound",
                             f"subresource {request.subresource!r} is not emulated")
        else:
            new = candidate
            if "status" in info.subresources:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)

        new_meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generation", "resourceVersion",
                      "namespace", "name"):
            if field in old_meta:
                new_meta[field] = old_meta[field]
            else:
                new_meta.pop(field, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if old_meta.get("deletionTimestamp"):
            added = [f for f in new_meta.get("finalizers") or []
                     if f not in (old_meta.get("finalizers") or [])]
            if added:
                raise self._invalid(info, name, [
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the "
                    f"object is being deleted, found new finalizers {added}"])
        errors = metadata_errors(new_meta)
        if errors:
            raise self._invalid(info, name, errors)
        self._convert_string_data(resource, new)
        new = self._admit(resource, info, name, new, old)
        new_meta = new["metadata"]
        if new == old:
            # As upstream: a no-op write is neither stored nor announced.
            return _scale_of(old) if scale else old
        if self._tracks_generation(resource) and _spec_of(new) != _spec_of(old):
            new_meta["generation"] = int(old_meta.get("generation", 0)) + 1
        if "dryRun" in request.params:
            return new
        if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
            # The last finalizer is gone: the update becomes the deletion.
            new_meta.pop("finalizers", None)
            self._finalize(resource, namespace, name, new, propagation="Background")
            return new
        new_meta["resourceVersion"] = self._next_rv()
        self._store(resource, namespace, name, new)
        self._emit(resource, "MODIFIED", new)
        return _scale_of(new) if scale else new

    # --- delete ----------------------------------------------------------------------------------

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        resource, namespace, name = request.resource, request.namespace, request.name
        assert resource is not None and name is not None
        if request.subresource is not None:
            raise _api_error(405, "MethodNotAllowed", "cannot delete a subresource")
        options = request.data if isinstance(request.data, dict) else {}
        propagation = (options.get("propagationPolicy")
                       or request.params.get("propagationPolicy") or "Background")
        preconditions = options.get("preconditions") or {}
        async with self._changed:
            current = self._live(resource, namespace, name)
            if current is None:
                raise self._not_found(resource, name)
            meta = current["metadata"]
            for field in ("uid", "resourceVersion"):
                if preconditions.get(field) and preconditions[field] != meta.get(field):
                    raise _api_error(409, "Conflict",
                                     f"Precondition failed: {field} in precondition: "
                                     f"{preconditions[field]}, {field} in object meta: "
                                     f"{meta.get(field)}")
            if "dryRun" in request.params:
                return copy.deepcopy(current)
            return self._delete(resource, info, namespace, name, propagation)

    def _delete(self, resource: kmock.resource, info: kmock.ResourceInfo, namespace: str | None,
                name: str, propagation: str) -> dict[str, Any]:
        current = self._live(resource, namespace, name)
        assert current is not None
        obj = copy.deepcopy(current)
        meta = obj["metadata"]
        if propagation == "Foreground":
            # Upstream waits on a foregroundDeletion finalizer until the dependents are
            # gone; deleting them first gives the same end state and order.
            self._collect_garbage(meta["uid"], "Background")
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return obj  # already being deleted: nothing changes
            meta["deletionTimestamp"] = _now()
            meta["deletionGracePeriodSeconds"] = 0
            if self._tracks_generation(resource):
                meta["generation"] = int(meta.get("generation", 0)) + 1
            meta["resourceVersion"] = self._next_rv()
            self._store(resource, namespace, name, obj)
            self._emit(resource, "MODIFIED", obj)
            return obj
        self._finalize(resource, namespace, name, obj, propagation=propagation)
        return obj

    def _finalize(self, resource: kmock.resource, namespace: str | None, name: str,
                  obj: dict[str, Any], *, propagation: str) -> None:
        """Really remove the object, announce it, and collect its dependents."""
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._store(resource, namespace, name, obj)
        self.objects[resource, namespace, name].delete()
        self._emit(resource, "DELETED", obj)
        if resource == CRD_RESOURCE:
            # Deleting a CRD deletes its custom resources and stops serving them.
            for gone in self._undeclare_crd(obj):
                for ns, item_name, item in self._live_items(gone, None):
                    final = copy.deepcopy(item)
                    final["metadata"]["resourceVersion"] = self._next_rv()
                    self._store(gone, ns, item_name, final)
                    self.objects[gone, ns, item_name].delete()
                    self._emit(gone, "DELETED", final)
        if (resource.group, resource.plural) == ("", "namespaces"):
            # The namespace controller's job: everything in the namespace goes too.
            for (res, ns, item_name), stored in list(self.objects.items()):
                if ns == name and not stored.deleted and res in self.resources:
                    self._delete(res, self.resources[res], ns, item_name, "Background")
        self._collect_garbage(obj["metadata"]["uid"], propagation)

    def _uid_alive(self, uid: str) -> bool:
        return any(not o.deleted and o.last.raw.get("metadata", {}).get("uid") == uid
                   for o in self.objects.values())

    def _collect_garbage(self, owner_uid: str, propagation: str) -> None:
        """What the garbage collector does after an owner is gone (synchronously here)."""
        for (res, ns, name), stored in list(self.objects.items()):
            if stored.deleted or res not in self.resources:
                continue
            obj = stored.last.raw
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            if not any(r.get("uid") == owner_uid for r in refs):
                continue
            remaining = [r for r in refs if r.get("uid") != owner_uid]
            if propagation == "Orphan" or any(self._uid_alive(r.get("uid", "")) for r in remaining):
                new = copy.deepcopy(obj)
                if remaining:
                    new["metadata"]["ownerReferences"] = remaining
                else:
                    new["metadata"].pop("ownerReferences", None)
                new["metadata"]["resourceVersion"] = self._next_rv()
                self._store(res, ns, name, new)
                self._emit(res, "MODIFIED", new)
            else:
                self._delete(res, self.resources[res], ns, name, "Background")

    # --- reads -----------------------------------------------------------------------------------

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        resource, name = request.resource, request.name
        assert resource is not None and name is not None
        if request.subresource not in (None, "status", "scale") or (
                request.subresource is not None
                and request.subresource not in info.subresources):
            raise self._not_found(resource, name)
        async with self._changed:
            obj = self._live(resource, request.namespace, name)
            if obj is None:
                raise self._not_found(resource, name)
            return _scale_of(obj) if request.subresource == "scale" else copy.deepcopy(obj)

    def _selection(self, request: rendering.Request) -> Callable[[Mapping[str, Any]], bool]:
        labels = request.params.get("labelSelector")
        fields = request.params.get("fieldSelector")
        name = request.name
        try:
            match_label_selector({}, labels)
        except ValueError as exc:
            raise _api_error(400, "BadRequest", f"invalid labelSelector: {exc}") from exc

        def selected(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            return ((name is None or meta.get("name") == name)
                    and (request.namespace is None or meta.get("namespace") == request.namespace)
                    and match_label_selector(meta.get("labels"), labels)
                    and match_field_selector(obj, fields))

        return selected

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        resource = request.resource
        assert resource is not None
        selected = self._selection(request)
        async with self._changed:
            live = self._live_items(resource, request.namespace)
            items = [copy.deepcopy(obj) for _, _, obj in live if selected(obj)]
            rv = str(self.resource_version)
        return {"apiVersion": api_version_of(resource), "kind": f"{info.kind}List",
                "metadata": {"resourceVersion": rv}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> Any:
        info = self._info(request)
        resource = request.resource
        assert resource is not None
        selected = self._selection(request)
        params = request.params
        since = params.get("resourceVersion")
        initial_events = params.get("sendInitialEvents") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        initial: list[dict[str, Any]] = []
        cursor: int | None
        async with self._changed:
            if since in (None, "", "0") or initial_events:
                # "Most recent": synthetic ADDED events for what exists, then changes.
                initial = [{"type": "ADDED", "object": copy.deepcopy(obj)}
                           for _, _, obj in self._live_items(resource, request.namespace)
                           if selected(obj)]
                cursor = len(self._events)
            else:
                try:
                    cursor = bisect.bisect_right(self._event_rvs, int(since))
                except ValueError:
                    cursor = None
                    initial = [{"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                        "reason": "Expired", "message": f"too old resource version: {since}"}}]
            bookmark_rv = str(self.resource_version)
        yield b""  # send the headers now: a quiet watch is still an open watch
        for event in initial:
            yield event
        if cursor is None:
            return
        if initial_events:
            yield {"type": "BOOKMARK", "object": {
                "kind": info.kind, "apiVersion": api_version_of(resource),
                "metadata": {"resourceVersion": bookmark_rv,
                             "annotations": {"k8s.io/initial-events-end": "true"}}}}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        while True:
            async with self._changed:
                while cursor >= len(self._events):
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        return
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        return
                batch = self._events[cursor:]
                cursor = len(self._events)
            for _, res, event in batch:
                if res == resource and selected(event["object"]):
                    yield event

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_version(request)
        assert request.resource is not None and isinstance(result, dict)
        if request.resource.group == "":
            result["groupVersion"] = request.resource.version  # KMock says "/v1"
        return result

    def _get_resources(self) -> list[kmock.resource]:
        # KMock also counts resources of stored (even deleted) objects as served; a CRD's
        # resources must vanish from discovery when the CRD is deleted.
        return k8s.KubernetesScaffold._get_resources(self)

    # --- thread-safe inspection (run on the emulator's loop via EmulatorServer.call) -------------

    async def snapshot(self, resource: kmock.resource, namespace: str | None = None,
                       name: str | None = None) -> list[dict[str, Any]]:
        """Deep copies of the live objects of a resource (optionally one namespace/name)."""
        async with self._changed:
            return [copy.deepcopy(obj) for ns, n, obj in self._live_items(resource, namespace)
                    if name is None or n == name]


def _scale_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The autoscaling/v1 Scale view of a Deployment or ReplicaSet (the /scale subresource)."""
    meta = obj["metadata"]
    selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return {
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                          "creationTimestamp") if k in meta},
        "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
        "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                   "selector": ",".join(f"{k}={v}" for k, v in selector.items())},
    }


def _spec_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    # What bumps metadata.generation: everything but metadata and status.
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left (connections still closing), then close the loop without warnings."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


class EmulatorServer:
    """Runs a :class:`KubeEmulator` on a loopback port in its own thread and event loop.

    A thread of its own keeps the server answering while a sync test blocks
    (``time.sleep``, a sync client) and while kopf runs in yet another thread.
    """

    def __init__(self, emulator: KubeEmulator | None = None) -> None:
        self.emulator = emulator or KubeEmulator()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def target() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
                ready.set()
            finally:
                close_loop(loop)

        self._thread = threading.Thread(target=target, name="kube-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the Kubernetes emulator did not start")
        if failure:
            raise failure[0]

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        async with self.emulator:
            # handler_cancellation: a watch whose client went away must end now,
            # not at the next event it fails to write.
            server = aiohttp.web.Server(self.emulator, handler_cancellation=True)
            runner = aiohttp.web.ServerRunner(server, shutdown_timeout=0.5)
            await runner.setup()
            try:
                site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = runner.addresses[0][1]
                self.url = f"http://127.0.0.1:{port}"
                ready.set()
                await self._stopping.wait()
            finally:
                await runner.cleanup()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float = 10.0) -> T:
        """Run ``await fn(*args)`` on the emulator's loop and return the result."""
        assert self._loop is not None
        coro: Any = fn(*args)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout)


class KubeAPIError(Exception):
    """A non-2xx answer of the API to a harness helper."""

    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


def _path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
          subresource: str | None = None) -> str:
    parts = ["/api/v1" if api_version == "v1" else f"/apis/{api_version}"]
    if namespace is not None:
        parts += ["namespaces", namespace]
    parts.append(plural)
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


_PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


@dataclasses.dataclass
class Kube:
    """What the ``kube`` fixture yields: the emulated API and helpers to use it from tests.

    Sync helpers (``create``, ``get``, ``list``, ``patch``, ``delete``,
    ``wait_for``) work in sync and async tests alike, because the emulator
    runs in its own thread; async twins (``acreate``, ... ``await_for``) exist
    for async tests that must not block their loop (e.g. an operator running
    on that same loop). Helper requests are marked and excluded from
    :meth:`rbac_triples`.
    """

    server: EmulatorServer
    kubeconfig: Path
    _client: httpx.Client | None = dataclasses.field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def emulator(self) -> KubeEmulator:
        return self.server.emulator

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far (a copy), oldest first."""
        return list(self.emulator.request_log)

    def rbac_triples(self, *, include_harness: bool = False) -> set[tuple[str, str, str]]:
        """(apiGroup, resource[/subresource], verb) of every non-harness request."""
        return self.emulator.rbac_triples(include_harness=include_harness)

    def rbac_violations(self, rules: Sequence[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
        """Requested triples that the given Role/ClusterRole ``rules`` do not grant."""
        return self.emulator.rbac_violations(rules)

    # --- plumbing --------------------------------------------------------------------------------

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {HARNESS_HEADER: "1", "User-Agent": "mulambda-test-harness"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _plural_of(self, obj: Mapping[str, Any]) -> str:
        resource = self.emulator.kind_to_resource(obj["apiVersion"], obj["kind"])
        assert resource.plural is not None
        return resource.plural

    def _create_request(self, obj: Mapping[str, Any], namespace: str | None
                        ) -> tuple[str, dict[str, Any]]:
        plural = self._plural_of(obj)
        resource = self.emulator.kind_to_resource(obj["apiVersion"], obj["kind"])
        ns = None
        if self.emulator.resources[resource].namespaced:
            ns = namespace or obj.get("metadata", {}).get("namespace") or "default"
        return _path(obj["apiVersion"], plural, ns), dict(obj)

    @staticmethod
    def _result(response: httpx.Response, *, none_on_404: bool = False) -> Any:
        if none_on_404 and response.status_code == 404:
            return None
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise KubeAPIError(response.status_code, body)
        return body

    def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, str] | None = None,
                content_type: str | None = None) -> httpx.Response:
        """A raw request to the emulator (marked as the harness's)."""
        if self._client is None:
            # Plain HTTP: verify=False only skips loading CA certificates (~40 ms a client).
            self._client = httpx.Client(base_url=self.url, timeout=10, verify=False)
        return self._client.request(method, path, json=json, params=params,
                                    headers=self._headers(content_type))

    def close(self) -> None:
        """Close the helper's HTTP connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def arequest(self, method: str, path: str, *, json: Any = None,
                       params: Mapping[str, str] | None = None,
                       content_type: str | None = None) -> httpx.Response:
        """Async twin of :meth:`request`."""
        # One client per call: a test's event loop may not outlive the fixture.
        async with httpx.AsyncClient(base_url=self.url, timeout=10, verify=False) as client:
            return await client.request(method, path, json=json, params=params,
                                        headers=self._headers(content_type))

    # --- sync helpers ----------------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any], *, namespace: str | None = None) -> dict[str, Any]:
        """Create ``obj``: apiVersion/kind pick the resource, the namespace defaults to default."""
        path, body = self._create_request(obj, namespace)
        return self._result(self.request("POST", path, json=body))

    def get(self, api_version: str, plural: str, namespace: str | None, name: str, *,
            subresource: str | None = None) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        return self._result(self.request("GET", _path(api_version, plural, namespace, name,
                                                      subresource)), none_on_404=True)

    # builtins.list below: inside this class body, plain "list" now names this method.
    def list(self, api_version: str, plural: str, namespace: str | None = None, *,
             label_selector: str | None = None) -> builtins.list[dict[str, Any]]:
        """The objects of a resource (all namespaces unless one is given)."""
        params = {"labelSelector": label_selector} if label_selector else None
        return self._result(self.request("GET", _path(api_version, plural, namespace),
                                         params=params))["items"]

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str,
              patch: Any, *, subresource: str | None = None,
              patch_type: str = "merge") -> dict[str, Any]:
        """Patch an object; ``patch_type`` is 'merge', 'json' or 'strategic'."""
        return self._result(self.request(
            "PATCH", _path(api_version, plural, namespace, name, subresource), json=patch,
            content_type=_PATCH_TYPES[patch_type]))

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str, *,
               propagation_policy: str | None = None) -> dict[str, Any] | None:
        """Delete an object (None if it did not exist); finalizers may keep it a while."""
        body = {"propagationPolicy": propagation_policy} if propagation_policy else None
        return self._result(self.request("DELETE", _path(api_version, plural, namespace, name),
                                         json=body), none_on_404=True)

    def stored(self, api_version: str, plural: str, namespace: str | None = None,
               name: str | None = None) -> builtins.list[dict[str, Any]]:
        """Live objects straight from the emulator's memory: no request, nothing logged."""
        resource = kmock.resource(f"{api_version}/{plural}")
        return self.server.call(self.emulator.snapshot, resource, namespace, name)

    def wait_for(self, predicate: Callable[[], T | None], timeout: float = 10.0,
                 interval: float = 0.05, what: str | None = None) -> T:
        """Poll ``predicate`` until it returns something truthy; return that, or TimeoutError."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = predicate()
            except KubeAPIError as exc:  # e.g. not created yet
                last = exc
            else:
                if last:
                    return last
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what or predicate!r} not true after {timeout}s "
                                   f"(last: {last!r})")
            time.sleep(interval)

    def simulate_rollout(self, namespace: str, name: str, *, ready: int | None = None
                         ) -> dict[str, Any]:
        """Write the status the Deployment controller would once ``ready`` pods are ready.

        There are no controllers behind the emulator; this stands in for them.
        ``ready`` defaults to ``spec.replicas`` (a finished rollout).
        """
        deployment = self.get("apps/v1", "deployments", namespace, name)
        if deployment is None:
            raise KubeAPIError(404, f"deployment {namespace}/{name} not found")
        replicas = int(deployment["spec"].get("replicas", 1))
        ready = replicas if ready is None else ready
        available = "True" if ready >= replicas else "False"
        status: dict[str, Any] = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready or None,  # upstream omits zero counts
            "availableReplicas": ready or None,
            "unavailableReplicas": (replicas - ready) or None,
            "conditions": [
                {"type": "Available", "status": available,
                 "reason": "MinimumReplicasAvailable" if available == "True"
                 else "MinimumReplicasUnavailable",
                 "lastUpdateTime": _now(), "lastTransitionTime": _now()},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                 "lastUpdateTime": _now(), "lastTransitionTime": _now()},
            ],
        }
        return self.patch("apps/v1", "deployments", namespace, name, {"status": status},
                          subresource="status")

    # --- async helpers ---------------------------------------------------------------------------

    async def acreate(self, obj: Mapping[str, Any], *, namespace: str | None = None
                      ) -> dict[str, Any]:
        """Async twin of :meth:`create`."""
        path, body = self._create_request(obj, namespace)
        return self._result(await self.arequest("POST", path, json=body))

    async def aget(self, api_version: str, plural: str, namespace: str | None, name: str, *,
                   subresource: str | None = None) -> dict[str, Any] | None:
        """Async twin of :meth:`get`."""
        return self._result(await self.arequest(
            "GET", _path(api_version, plural, namespace, name, subresource)), none_on_404=True)

    async def alist(self, api_version: str, plural: str, namespace: str | None = None, *,
                    label_selector: str | None = None) -> builtins.list[dict[str, Any]]:
        """Async twin of :meth:`list`."""
        params = {"labelSelector": label_selector} if label_selector else None
        return self._result(await self.arequest("GET", _path(api_version, plural, namespace),
                                                params=params))["items"]

    async def apatch(self, api_version: str, plural: str, namespace: str | None, name: str,
                     patch: Any, *, subresource: str | None = None,
                     patch_type: str = "merge") -> dict[str, Any]:
        """Async twin of :meth:`patch`."""
        return self._result(await self.arequest(
            "PATCH", _path(api_version, plural, namespace, name, subresource), json=patch,
            content_type=_PATCH_TYPES[patch_type]))

    async def adelete(self, api_version: str, plural: str, namespace: str | None, name: str, *,
                      propagation_policy: str | None = None) -> dict[str, Any] | None:
        """Async twin of :meth:`delete`."""
        body = {"propagationPolicy": propagation_policy} if propagation_policy else None
        return self._result(await self.arequest(
            "DELETE", _path(api_version, plural, namespace, name), json=body), none_on_404=True)

    # Same signature as the sync twin on purpose, hence the timeout parameter.
    async def await_for(self, predicate: Callable[[], Any], timeout: float = 10.0,  # noqa: ASYNC109
                        interval: float = 0.05, what: str | None = None) -> Any:
        """Async twin of :meth:`wait_for`; ``predicate`` may be sync or return an awaitable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while True:
            try:
                last = predicate()
                if isinstance(last, Awaitable):
                    last = await last
            except KubeAPIError as exc:
                last = exc
            else:
                if last:
                    return last
            if loop.time() >= deadline:
                raise TimeoutError(f"{what or predicate!r} not true after {timeout}s "
                                   f"(last: {last!r})")
            await asyncio.sleep(interval)


def repo_crds() -> list[dict[str, Any]]:
    """The canonical CRDs of the project (crds/*.yaml)."""
    crds: list[dict[str, Any]] = []
    for path in sorted(CRDS_DIR.glob("*.mulambda.io.yaml")):
        crds.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return crds


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig with one context pointing at ``url`` (token auth, namespace 'default')."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {
            "cluster": "emulator", "user": "emulator", "namespace": "default"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def running_kube(directory: Path, *, install_crds: bool = True) -> Iterator[Kube]:
    """Start an emulator, install the project's CRDs, point kubeconfig lookups at it.

    Sets ``KUBECONFIG``, the kubernetes client's ``KUBE_CONFIG_DEFAULT_LOCATION``
    (read once at import, so the variable alone is not enough) and the client's
    default Configuration; restores all three afterwards.
    """
    import os

    import kubernetes.client
    import kubernetes.config
    import kubernetes.config.kube_config as kube_config

    server = EmulatorServer()
    server.start()
    kube = Kube(server=server, kubeconfig=write_kubeconfig(directory / "kubeconfig", server.url))
    saved_env = os.environ.get("KUBECONFIG")
    saved_location = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    saved_config = kubernetes.client.Configuration.get_default_copy()
    try:
        os.environ["KUBECONFIG"] = str(kube.kubeconfig)
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kube.kubeconfig)
        kubernetes.config.KUBE_CONFIG_DEFAULT_LOCATION = str(kube.kubeconfig)
        kubernetes.config.load_kube_config(config_file=str(kube.kubeconfig))
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        if install_crds:
            for crd in repo_crds():
                kube.create(crd)
        yield kube
    finally:
        if saved_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved_env
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_location
        kubernetes.config.KUBE_CONFIG_DEFAULT_LOCATION = saved_location
        kubernetes.client.Configuration.set_default(saved_config)
        kube.close()
        server.stop()
