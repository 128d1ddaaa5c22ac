"""The API server itself refuses bad ModelExecutors and Clients: the CRDs' schemas and
CEL rules, evaluated by a real kube-apiserver before any operator sees the object."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from support.cluster import ApiError, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXECUTOR: dict[str, Any] = {
    "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
    "metadata": {"name": "bad"},
    "spec": {"model": {"name": "m", "storageUri": "s3://models/m"},
             "traits": {"type": "t", "input": "i", "output": "o"}},
}
CLIENT: dict[str, Any] = {
    "apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
    "metadata": {"name": "bad"},
    "spec": {"criteria": {"type": "t"}},
}


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(base)
    node = body
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return body


@pytest.mark.parametrize(("body", "says"), [
    pytest.param(with_(EXECUTOR, "spec.scaling", {"minReplicas": 4, "maxReplicas": 2}),
                 "scaling.minReplicas must not exceed scaling.maxReplicas", id="cel-min-max"),
    pytest.param(with_(CLIENT, "spec.preferences", {"latency": 0, "accuracy": 0}),
                 "preferences.latency and preferences.accuracy must not both be 0",
                 id="cel-preferences-zero"),
    pytest.param(with_(EXECUTOR, "spec.model.storageUri", "s3://models/" + "m" * 1100),
                 "spec.model.storageUri: Too long", id="storage-uri-length"),
    pytest.param(with_(EXECUTOR, "spec.model.storageUri", "http://models/m"),
                 "spec.model.storageUri in body should match", id="storage-uri-pattern"),
    pytest.param(with_(EXECUTOR, "spec.serving", {"image": "tf serving:2"}),
                 "spec.serving.image in body should match", id="image-pattern"),
    pytest.param(with_(EXECUTOR, "spec.serving", {"args": ["--x=" + "y" * 5000]}),
                 "spec.serving.args[0]: Too long", id="args-length"),
    pytest.param(with_(CLIENT, "spec.probeUrl", "ftp://host/ping"),
                 "spec.probeUrl in body should match", id="probe-url-pattern"),
    pytest.param(with_(CLIENT, "spec.probeUrl", "http://h/" + "p" * 2100),
                 "spec.probeUrl: Too long", id="probe-url-length"),
    pytest.param(with_(EXECUTOR, "metadata.annotations", {"note": "x" * (300 << 10)}),
                 "metadata.annotations: Too long", id="annotations-over-256KiB"),
    pytest.param(with_(EXECUTOR, "spec.rollout", {"strategy": "Canary", "steps": [50, 10]}),
                 "rollout.steps must increase", id="cel-steps-increase"),
    pytest.param(with_(EXECUTOR, "spec.rollout", {"strategy": "Canary", "steps": [10, 10]}),
                 "rollout.steps must increase", id="cel-steps-repeat"),
    pytest.param(with_(EXECUTOR, "spec.rollout", {"strategy": "Canary", "weight": 0}),
                 "a Canary needs a weight of at least 1", id="cel-canary-weight-zero"),
    # Names the operator could not build children for: they were accepted, and then the
    # Service (NAME, NAME-candidate, NAME-workload) was refused.
    pytest.param(with_(EXECUTOR, "metadata.name", "half.plus.two"),
                 "metadata.name in body should match", id="executor-name-with-dots"),
    pytest.param(with_(EXECUTOR, "metadata.name", "m" * 54),
                 "metadata.name: Too long", id="executor-name-too-long-for-its-candidate"),
    pytest.param(with_(EXECUTOR, "metadata.name", "shop-candidate"),
                 "reserved for the new version of a rollout", id="executor-name-candidate"),
    pytest.param(with_(CLIENT, "metadata.name", "c" * 55),
                 "metadata.name: Too long", id="client-name-too-long-for-its-workload"),
])
def test_the_api_server_refuses_it_with_the_reason(cluster: Cluster, ns: str,
                                                   body: dict[str, Any], says: str) -> None:
    body["metadata"]["namespace"] = ns
    with pytest.raises(ApiError) as refused:
        cluster.create(body)
    assert refused.value.status == 422, refused.value
    assert says in refused.value.message, refused.value.message
    plural = "modelexecutors" if body["kind"] == "ModelExecutor" else "clients"
    assert cluster.get("mulambda.io/v1alpha1", plural, ns, body["metadata"]["name"]) is None


def test_what_the_rules_allow_is_taken(cluster: Cluster, ns: str) -> None:
    steps = with_(EXECUTOR, "spec.rollout", {"strategy": "Canary", "steps": [1, 10, 50, 100]})
    for base, name in ((EXECUTOR, "m" * 53), (CLIENT, "c" * 54), (EXECUTOR, "9lives"),
                       (steps, "steps")):
        body = with_(with_(base, "metadata.name", name), "metadata.namespace", ns)
        assert cluster.create(body)["metadata"]["name"] == name
