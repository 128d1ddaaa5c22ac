"""The informers' decisions (operator/k8s/informer.py) and what the children's caches keep
(operator/modelexecutor/children.py). The streams themselves run against the real
control plane in tests/integration/test_informer.py."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from mulambda.operator.k8s.informer import (
    Change,
    Expired,
    compact,
    decide,
    is_pattern,
    watched,
)
from mulambda.operator.k8s.objects import LAST_VALID_SPEC, TEMPLATE_HASH
from mulambda.operator.modelexecutor import children as children_module
from mulambda.operator.modelexecutor.children import Children, trim_deployment, trim_service


def obj(ns: str = "ml", name: str = "hp2", version: str = "7") -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "resourceVersion": version},
            "spec": {"replicas": 2}}


def keep(o: dict[str, Any]) -> dict[str, Any]:
    return {"v": o["metadata"]["resourceVersion"]}


@pytest.mark.parametrize(("event", "admit", "version", "change"), [
    pytest.param({"type": "ADDED", "object": obj()}, True, "7",
                 Change(("ml", "hp2"), {"v": "7"}), id="added-kept-trimmed"),
    pytest.param({"type": "MODIFIED", "object": obj(version="9")}, True, "9",
                 Change(("ml", "hp2"), {"v": "9"}), id="modified-replaces"),
    pytest.param({"type": "DELETED", "object": obj(version="10")}, True, "10",
                 Change(("ml", "hp2"), None), id="deleted-forgets"),
    pytest.param({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
                 True, "12", None, id="bookmark-moves-the-version-only"),
    pytest.param({"type": "ADDED", "object": obj(ns="other")}, False, "7", None,
                 id="namespace-not-watched-ignored-version-kept"),
])
def test_a_watch_event_becomes_a_version_and_a_change(
    event: dict[str, Any], admit: bool, version: str, change: Change | None
) -> None:
    assert decide(event, keep, lambda ns: admit) == (version, change)


def test_what_the_caches_keep_shares_one_copy_of_each_string_across_events() -> None:
    # Two events decoded on their own, as the watch delivers them: equal strings are
    # distinct objects until compacted.
    body = {"metadata": {"namespace": "ml", "labels": {"app.kubernetes.io/name": "mx"},
                         "ownerReferences": [{"kind": "ModelExecutor", "controller": True}]},
            "spec": {"replicas": 2, "accuracy": 0.9, "paused": None}}
    first, second = (json.loads(json.dumps({"type": "ADDED", "object": body}))
                     for _ in range(2))
    assert first["object"]["metadata"]["namespace"] is not \
        second["object"]["metadata"]["namespace"]
    (_, a), (_, b) = (decide(e, lambda o: o, lambda ns: True) for e in (first, second))
    assert a is not None and b is not None
    assert a.obj == b.obj == body  # the same data
    meta_a, meta_b = a.obj["metadata"], b.obj["metadata"]
    assert meta_a["namespace"] is meta_b["namespace"]
    assert meta_a["labels"]["app.kubernetes.io/name"] is meta_b["labels"]["app.kubernetes.io/name"]
    key_a = next(iter(meta_a["labels"]))
    key_b = next(iter(meta_b["labels"]))
    assert key_a is key_b
    assert meta_a["ownerReferences"][0]["kind"] is meta_b["ownerReferences"][0]["kind"]


@pytest.mark.parametrize("value", [
    pytest.param({"a": [1, 2.5, None, True, {"b": "c"}]}, id="nested"),
    pytest.param([], id="empty-list"),
    pytest.param("text", id="string"),
    pytest.param(7, id="number"),
])
def test_compact_is_an_equal_copy_and_leaves_its_input_alone(value: Any) -> None:
    before = json.loads(json.dumps(value))
    assert compact(value) == value == before
    if isinstance(value, (dict, list)):
        assert compact(value) is not value


def test_a_free_form_field_nested_deeper_than_compact_goes_is_kept_as_decoded() -> None:
    # A tenant's spec may nest an unschema'd field hundreds of levels deep (the decoder
    # allows it); the executor cache must still keep that executor.
    depth = 900
    deep = json.loads('{"a":' * depth + '"leaf"' + "}" * depth)
    body = {"metadata": {"namespace": "ml"}, "spec": {"extra": deep}}
    kept = compact(body)
    assert kept == body
    assert kept["metadata"]["namespace"] is compact({"n": "ml"})["n"]


@pytest.mark.parametrize(("event", "error"), [
    pytest.param({"type": "ERROR", "object": {"code": 410, "message": "too old"}}, Expired,
                 id="gone-lists-again"),
    pytest.param({"type": "ERROR", "object": {"code": 500, "message": "boom"}}, RuntimeError,
                 id="other-error-retries"),
])
def test_an_error_event_ends_the_watch(event: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        decide(event, keep, lambda ns: True)


@pytest.mark.parametrize(("namespace", "patterns", "expected"), [
    # kopf's documented examples (kopf._cogs.structs.references.match_namespace).
    ("myapp-test", ["myapp-*, !*-pr-*, *pr-123"], True),
    ("myapp-pr-123", ["myapp-*, !*-pr-*, *pr-123"], True),
    ("myapp-pr-456", ["myapp-*, !*-pr-*, *pr-123"], False),
    ("otherapp-pr-123", ["myapp-*, !*-pr-*, *pr-123"], False),
    ("otherapp-pr-123", ["!*-pr-*, *pr-123"], True),
    ("myapp-pr-456", ["!*-pr-*, *pr-123"], False),
    ("anything", ["!*-pr-*"], True),
    ("ml", ["ml"], True),
    ("ml-2", ["ml"], False),
    ("ml-2", ["team-*", "ml-?"], True),
])
def test_namespace_patterns_match_as_kopf_matches_them(
    namespace: str, patterns: list[str], expected: bool
) -> None:
    assert watched(namespace, patterns) is expected


@pytest.mark.parametrize(("namespace", "expected"), [
    ("ml", False), ("team-a", False), ("team-*", True), ("ml-?", True), ("!kube-*", True),
    ("a,b", True), ("[ab]", True),
])
def test_a_pattern_is_told_from_a_name(namespace: str, expected: bool) -> None:
    assert is_pattern(namespace) is expected


def test_the_caches_keep_what_the_fleet_and_the_comparisons_read() -> None:
    meta = {"name": "hp2", "namespace": "ml", "uid": "u1", "resourceVersion": "5",
            "generation": 3, "labels": {"a": "b"}, "ownerReferences": [{"uid": "p"}],
            "annotations": {TEMPLATE_HASH: "h1", LAST_VALID_SPEC: "{}", "noise": "x" * 1000},
            "managedFields": [{"big": "x" * 1000}]}
    deployment = trim_deployment({
        "metadata": meta, "spec": {"replicas": 2, "template": {"big": "x" * 1000}},
        "status": {"replicas": 2, "readyReplicas": 1, "conditions": [{"big": 1}]}})
    assert deployment == {
        "kind": "Deployment",
        "metadata": {"name": "hp2", "namespace": "ml", "uid": "u1", "resourceVersion": "5",
                     "generation": 3, "labels": {"a": "b"}, "ownerReferences": [{"uid": "p"}],
                     "annotations": {TEMPLATE_HASH: "h1", LAST_VALID_SPEC: "{}"}},
        "spec": {"replicas": 2}, "status": {"replicas": 2, "readyReplicas": 1}}
    service = trim_service({"metadata": meta, "spec": {
        "ports": [{"port": 8501}], "selector": {"s": "t"}, "clusterIP": "10.0.0.1"}})
    assert service["spec"] == {"ports": [{"port": 8501}], "selector": {"s": "t"}}
    assert "annotations" not in service["metadata"]


def test_a_handler_reads_the_children_once_the_caches_are_complete(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Before the first LISTs are in, a handler waits (one Event, not kopf's per-object
    toggles); a server too slow to list holds it only SYNC_WAIT_SECONDS, after which it
    reads an incomplete cache and so GETs what is missing."""
    monkeypatch.setattr(children_module, "SYNC_WAIT_SECONDS", 0.05)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        children = Children(["ml"])
        children.deployments[("ml", "hp2")] = [{"kind": "Deployment"}]
        unsynced = await children.synced_of(("ml", "hp2"))
        await children.synced_of(("ml", "other"))
        asyncio.get_running_loop().call_later(0.02, children.informers.synced.set)
        monkeypatch.setattr(children_module, "SYNC_WAIT_SECONDS", 5.0)
        synced = await children.synced_of(("ml", "hp2"))
        return unsynced, synced

    unsynced, synced = asyncio.run(scenario())
    assert unsynced == {"deployment": {"kind": "Deployment"}, "service": None,
                        "indexed": False}
    assert synced["indexed"] is True
    said = [r for r in caplog.records if "not complete" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"  # once, not per handler


@pytest.mark.parametrize(("synced", "after", "complete"), [
    (True, 0.0, True),
    (False, 0.0, False),  # the fleet refresh waits: a child not listed yet is not missing
    (False, 29.0, False),
    (False, 30.0, True),  # a server too slow to list holds the refresh no longer
])
def test_the_fleet_refreshes_once_the_caches_are_complete_or_the_wait_is_over(
        synced: bool, after: float, complete: bool) -> None:
    children = Children(["ml"])
    if synced:
        children.informers.synced.set()
    assert children.complete(now=time.monotonic() + after) is complete
