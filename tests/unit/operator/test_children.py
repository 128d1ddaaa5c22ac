"""Create-or-adopt, compare-then-patch of children, against an in-memory API."""

from __future__ import annotations

import copy
import json
from typing import Any

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from mulambda.operator.k8s.children import (
    NameConflict,
    Rejected,
    ensure_deployment,
    ensure_service,
    remove_owned,
)
from mulambda.operator.k8s.objects import LAST_VALID_SPEC, TEMPLATE_HASH, ObjectRef

OWNER = ObjectRef(api_version="mulambda.io/v1alpha1", kind="ModelExecutor", namespace="ml",
                  name="hp2", uid="uid-1", labels={"team": "a", "app.kubernetes.io/name": "x"})


class MemoryApi:
    """The KubeApi calls children.py makes, on dicts; ``fail_create`` raises once."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.patches: list[list[dict[str, Any]]] = []
        self.fail_create: ApiException | None = None
        self.steal_on_conflict: dict[str, Any] | None = None

    async def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail_create is not None:
            exc, self.fail_create = self.fail_create, None
            raise exc
        key = (body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])
        self.objects[key] = copy.deepcopy(body)
        return copy.deepcopy(body)

    async def patch(self, kind: str, name: str, namespace: str,
                    ops: list[dict[str, Any]]) -> dict[str, Any]:
        self.patches.append(ops)
        obj = self.objects[(kind, namespace, name)]
        for op in ops:  # "add" and "replace" as RFC 6902 applies them (JSON pointer escapes)
            *parents, leaf = (part.replace("~1", "/").replace("~0", "~")
                              for part in op["path"].strip("/").split("/"))
            target = obj
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = copy.deepcopy(op["value"])
        return copy.deepcopy(obj)

    async def delete(self, kind: str, name: str, namespace: str) -> None:
        self.objects.pop((kind, namespace, name), None)

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = copy.deepcopy(obj)


def deployment(template_hash: str = "h1", replicas: int = 2) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "hp2", "namespace": "ml",
                         "labels": {"app.kubernetes.io/name": "modelexecutor"},
                         "annotations": {TEMPLATE_HASH: template_hash}},
            "spec": {"replicas": replicas, "template": {"metadata": {"hash": template_hash}}}}


def service(port: int = 8501) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "hp2", "namespace": "ml",
                         "labels": {"app.kubernetes.io/name": "modelexecutor"}},
            "spec": {"selector": {"app": "hp2"},
                     "ports": [{"name": "http", "port": port, "targetPort": "http"}]}}


def bounded(current: int | None) -> int:
    return 1 if current is None else max(1, min(3, current))


def api_error(status: int, message: str = "") -> ApiException:
    exc = ApiException(status=status, reason="x")
    exc.body = json.dumps({"message": message})
    return exc


async def test_a_new_child_is_created_owned_with_the_owners_labels_under_ours():
    api = MemoryApi()
    dep, changes = await ensure_deployment(api, OWNER, deployment(), bounded)
    assert changes == ["created"]
    assert dep["spec"]["replicas"] == 1  # replicas(None): the policy's start value
    [ref] = dep["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
                   "name": "hp2", "uid": "uid-1", "controller": True,
                   "blockOwnerDeletion": True}
    assert dep["metadata"]["labels"] == {"app.kubernetes.io/name": "modelexecutor",
                                         "team": "a"}


async def test_an_unchanged_child_is_not_patched():
    api = MemoryApi()
    await ensure_deployment(api, OWNER, deployment(), bounded)
    await ensure_service(api, OWNER, service())
    assert await ensure_deployment(api, OWNER, deployment(), bounded) == (
        api.objects[("Deployment", "ml", "hp2")], [])
    assert (await ensure_service(api, OWNER, service()))[1] == []
    assert api.patches == []


@pytest.mark.parametrize(("desired", "existing_replicas", "changes"), [
    (deployment("h2"), 1, ["pod template"]),
    (deployment(), 5, ["replicas 5 -> 3"]),
    (deployment("h2"), 0, ["pod template", "replicas 0 -> 1"]),
])
async def test_a_drifted_deployment_is_patched_with_what_changed(desired, existing_replicas,
                                                                 changes):
    api = MemoryApi()
    await ensure_deployment(api, OWNER, deployment(), bounded)
    api.objects[("Deployment", "ml", "hp2")]["spec"]["replicas"] = existing_replicas
    dep, got = await ensure_deployment(api, OWNER, desired, bounded)
    assert got == changes
    assert dep["metadata"]["annotations"][TEMPLATE_HASH] == desired["metadata"]["annotations"][
        TEMPLATE_HASH]


def _with_spec(text: str, template_hash: str = "h1") -> dict[str, Any]:
    d = deployment(template_hash)
    d["metadata"]["annotations"][LAST_VALID_SPEC] = text
    return d


async def test_a_new_last_valid_spec_is_recorded_without_an_event_or_a_rollout():
    api = MemoryApi()
    await ensure_deployment(api, OWNER, _with_spec('{"scaling":{"maxReplicas":2}}'), bounded)
    dep, changes = await ensure_deployment(
        api, OWNER, _with_spec('{"scaling":{"maxReplicas":9}}'), bounded)
    assert changes == []  # nothing the pods or the user see changed
    assert dep["metadata"]["annotations"][LAST_VALID_SPEC] == '{"scaling":{"maxReplicas":9}}'
    assert api.patches[-1] == [{"op": "add",
                                "path": "/metadata/annotations/mulambda.io~1last-valid-spec",
                                "value": '{"scaling":{"maxReplicas":9}}'}]


@pytest.mark.parametrize("template_hash", ["h1", "h2"])
async def test_annotations_others_keep_are_not_touched_when_ours_change(template_hash):
    # The watch cache keeps only our annotations; the object also has the Deployment
    # controller's and other tools'. Patched key by key, those stay.
    api = MemoryApi()
    await ensure_deployment(api, OWNER, _with_spec("{}"), bounded)
    live = api.objects[("Deployment", "ml", "hp2")]
    cached = copy.deepcopy(live)
    live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "4"
    dep, _ = await ensure_deployment(api, OWNER, _with_spec('{"a":1}', template_hash),
                                     bounded, cached)
    assert dep["metadata"]["annotations"] == {
        TEMPLATE_HASH: template_hash, LAST_VALID_SPEC: '{"a":1}',
        "deployment.kubernetes.io/revision": "4"}


async def test_without_any_of_ours_the_annotations_are_set_whole():
    api = MemoryApi()
    await ensure_deployment(api, OWNER, _with_spec("{}"), bounded)
    del api.objects[("Deployment", "ml", "hp2")]["metadata"]["annotations"]
    dep, _ = await ensure_deployment(api, OWNER, _with_spec("{}"), bounded)
    assert dep["metadata"]["annotations"] == {TEMPLATE_HASH: "h1", LAST_VALID_SPEC: "{}"}


async def test_labels_others_added_are_kept_and_ours_restored():
    api = MemoryApi()
    await ensure_service(api, OWNER, service())
    labels = api.objects[("Service", "ml", "hp2")]["metadata"]["labels"]
    labels.update({"cost-center": "42", "app.kubernetes.io/name": "changed"})
    svc, changes = await ensure_service(api, OWNER, service(8502))
    assert changes == ["ports", "labels"]
    assert svc["metadata"]["labels"] == {"app.kubernetes.io/name": "modelexecutor",
                                         "team": "a", "cost-center": "42"}


async def test_a_child_someone_else_owns_is_never_touched():
    api = MemoryApi()
    api.put(service())  # no ownerReferences
    with pytest.raises(NameConflict, match="Service ml/hp2 already exists and is not owned "
                                           "by ModelExecutor hp2"):
        await ensure_service(api, OWNER, service(9000))
    assert api.patches == []


async def test_a_child_created_concurrently_is_converged_on():
    api = MemoryApi()
    earlier = deployment("h0", replicas=7)  # an earlier run of this reconcile made it
    earlier["metadata"]["ownerReferences"] = [{"uid": "uid-1"}]

    async def create_after_race(body: dict[str, Any]) -> dict[str, Any]:
        api.put(earlier)
        raise api_error(409)

    api.create = create_after_race  # type: ignore[method-assign]
    _dep, changes = await ensure_deployment(api, OWNER, deployment(), bounded)
    assert changes == ["pod template", "labels", "replicas 7 -> 3"]


async def test_a_child_that_vanishes_after_a_conflict_is_retried_soon():
    api = MemoryApi()
    api.fail_create = api_error(409)
    with pytest.raises(kopf.TemporaryError, match="vanished"):
        await ensure_service(api, OWNER, service())


async def test_a_child_the_api_server_refuses_is_rejected_with_its_message():
    api = MemoryApi()
    api.fail_create = api_error(422, 'Unsupported value: "Sometimes"')
    with pytest.raises(Rejected, match='rejected Deployment hp2: Unsupported value: "Sometimes"'):
        await ensure_deployment(api, OWNER, deployment(), bounded)


async def test_only_owned_children_are_removed():
    api = MemoryApi()
    await ensure_deployment(api, OWNER, deployment(), bounded)
    api.put(service())  # someone else's
    assert await remove_owned(api, OWNER, "hp2", "ml") == ["Deployment ml/hp2"]
    assert list(api.objects) == [("Service", "ml", "hp2")]
