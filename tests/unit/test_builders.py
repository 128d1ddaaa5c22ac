"""Pure builders: deterministic, hardened, and valid against upstream Kubernetes schemas."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.operator.client.build import client_env
from mulambda.operator.k8s.objects import LAST_VALID_SPEC, TEMPLATE_HASH
from mulambda.operator.modelexecutor.build import (
    build_deployment,
    build_heartbeat_secret,
    build_service,
    endpoints,
)
from mulambda.settings import Settings

from support.schemas import validate_k8s

SPEC = {
    "model": {"name": "half-plus-two", "storageUri": "s3://models/half_plus_two", "version": 1},
    "traits": {"type": "regression", "input": "tensor/float32", "output": "tensor/float32",
               "accuracy": 0.9},
    "scaling": {"minReplicas": 1, "maxReplicas": 3},
    "serving": {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                              "limits": {"memory": "2Gi"}}},
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
SETTINGS = Settings(serving_image="tensorflow/serving:2.18.0", companion_image="mulambda:test")


def _deployment(spec=SPEC, **kw):
    return build_deployment("hp2", "ml", parse_executor_spec(spec), SETTINGS, **kw)


def test_deployment_and_service_validate_strictly_against_upstream_schemas():
    validate_k8s(_deployment())
    validate_k8s(build_service("hp2", "ml", parse_executor_spec(SPEC)))


def test_minimal_spec_also_builds_valid_objects():
    minimal = {"model": {"name": "m", "storageUri": "s3://bkt/m"},
               "traits": {"type": "t", "input": "i", "output": "o"}}
    validate_k8s(_deployment(minimal))


def test_pod_pairs_serving_and_companion_on_a_shared_model_volume():
    pod = _deployment()["spec"]["template"]["spec"]
    serving, companion = pod["containers"]
    assert serving["name"] == "serving" and companion["name"] == "companion"
    assert {p["containerPort"] for p in serving["ports"]} == {8500, 8501}
    assert "--model_base_path=/models/half-plus-two" in serving["args"]
    assert companion["args"] == ["companion"] and companion["image"] == "mulambda:test"
    assert companion["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]} for c in (serving, companion)}
    assert mounts["serving"]["models"]["readOnly"] is True
    assert "readOnly" not in mounts["companion"]["models"]
    assert pod["nodeSelector"] == SPEC["nodeSelector"]
    assert pod["tolerations"] == SPEC["tolerations"]
    assert serving["resources"] == SPEC["serving"]["resources"]


def test_containers_are_hardened_and_non_root():
    pod = _deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}


def test_s3_credentials_come_only_from_a_secret():
    env = _deployment()["spec"]["template"]["spec"]["containers"][1]["env"]
    by_name = {e["name"]: e for e in env}
    for key in ("MULAMBDA_S3_ACCESS_KEY", "MULAMBDA_S3_SECRET_KEY"):
        assert "value" not in by_name[key]
        assert by_name[key]["valueFrom"]["secretKeyRef"]["name"] == SETTINGS.s3_secret
    custom = copy.deepcopy(SPEC)
    custom["model"]["credentialsSecret"] = "team-a-s3"
    env = _deployment(custom)["spec"]["template"]["spec"]["containers"][1]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env
            if "secretKeyRef" in e.get("valueFrom", {})} == {"team-a-s3"}


def test_builders_are_deterministic_and_hash_tracks_template_changes():
    a, b = _deployment(), _deployment()
    assert a == b
    newer = copy.deepcopy(SPEC)
    newer["model"]["version"] = 2
    c = _deployment(newer)
    key = TEMPLATE_HASH
    assert a["metadata"]["annotations"][key] != c["metadata"]["annotations"][key]
    # Scaling bounds are not part of the pod template: no rollout for them.
    rescaled = copy.deepcopy(SPEC)
    rescaled["scaling"]["maxReplicas"] = 9
    same = _deployment(rescaled)["metadata"]["annotations"][key]
    assert same == a["metadata"]["annotations"][key]


def test_the_deployment_records_the_spec_it_was_built_from():
    # What the autoscaler scales an executor by after an operator restart, when its
    # current spec is invalid (operator/modelexecutor/fleet.py): it must read back as the
    # very spec, and change with edits the pod template does not see.
    rescaled = copy.deepcopy(SPEC)
    rescaled["scaling"]["maxReplicas"] = 9
    for raw in (SPEC, rescaled):
        text = _deployment(raw)["metadata"]["annotations"][LAST_VALID_SPEC]
        assert parse_executor_spec(json.loads(text)) == parse_executor_spec(raw)
    assert (_deployment(rescaled)["metadata"]["annotations"][LAST_VALID_SPEC]
            != _deployment()["metadata"]["annotations"][LAST_VALID_SPEC])
    # Only what differs from the defaults, as the resource spells it (camelCase): small.
    assert '"maxReplicas":9' in _deployment(rescaled)["metadata"]["annotations"][LAST_VALID_SPEC]
    assert len(_deployment()["metadata"]["annotations"][LAST_VALID_SPEC]) < 1000


def test_service_selects_exactly_the_deployment_pods():
    dep = _deployment()
    svc = build_service("hp2", "ml", parse_executor_spec(SPEC))
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())


@pytest.mark.parametrize("min_replicas,expected", [(0, 0), (2, 2)])
def test_initial_replicas_follow_min_replicas(min_replicas, expected):
    spec = copy.deepcopy(SPEC)
    spec["scaling"]["minReplicas"] = min_replicas
    assert _deployment(spec)["spec"]["replicas"] == expected


def test_endpoints_use_the_service_dns_name():
    assert endpoints("hp2", "ml", SETTINGS) == {
        "rest": "http://hp2.ml.svc.cluster.local:8501",
        "grpc": "hp2.ml.svc.cluster.local:8500",
    }


def test_store_password_reaches_pods_only_through_a_secret_reference():
    with_secret = Settings(redis_secret="store-auth", companion_image="mulambda:test")
    dep = build_deployment("hp2", "ml", parse_executor_spec(SPEC), with_secret)
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][1]["env"]}
    ref = env["MULAMBDA_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "store-auth", "key": "password"}
    workload = client_env("c", "apps", with_secret)
    # Client workloads run tenant code: never the companions' credential (issue 12;
    # tests/unit/test_client_builders.py covers what they get instead).
    assert "store-auth" not in str(workload)
    # Without a Secret configured nothing is added.
    plain = _deployment()["spec"]["template"]["spec"]["containers"][1]["env"]
    assert "MULAMBDA_REDIS_PASSWORD" not in {e["name"] for e in plain}


def test_executor_pods_pull_with_the_platforms_secrets():
    # A private companion (or serving) image: the chart's imagePullSecrets reached only
    # its own pods, and executor pods could not pull.
    pulled = Settings(image_pull_secrets="regcred", companion_image="mulambda:test")
    pod = build_deployment("hp2", "ml", parse_executor_spec(SPEC), pulled)["spec"]["template"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert "imagePullSecrets" not in _deployment()["spec"]["template"]["spec"]


@pytest.mark.parametrize(("target", "expected"), [(4, "4"), (2.5, "3"), (0.5, "1"), (16, "16")])
def test_task_workers_take_as_many_tasks_as_the_target_concurrency(target, expected):
    spec = {**SPEC, "scaling": {**SPEC["scaling"], "targetConcurrency": target}}
    companion = _deployment(spec)["spec"]["template"]["spec"]["containers"][1]
    env = {e["name"]: e.get("value") for e in companion["env"]}
    assert env["MULAMBDA_WORKER_CONCURRENCY"] == expected


def test_only_the_companion_mounts_the_heartbeat_key():
    """The serving container runs a user-chosen image: it never sees the key."""
    dep = build_deployment("iris", "ml", parse_executor_spec(SPEC), SETTINGS,
                           heartbeat_secret="iris-heartbeat-0123abcd")
    validate_k8s(dep)
    pod = dep["spec"]["template"]["spec"]
    serving, companion = pod["containers"]
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "iris-heartbeat-0123abcd"
    mounts = {m["name"]: m for m in companion["volumeMounts"]}
    assert mounts[volume["name"]]["readOnly"] is True
    assert volume["name"] not in {m["name"] for m in serving["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in companion["env"]}
    assert env["MULAMBDA_HEARTBEAT_KEY_FILE"].startswith(mounts[volume["name"]]["mountPath"])
    # Without a key (no MULAMBDA_HEARTBEAT_SECRET), nothing of it.
    plain = _deployment()["spec"]["template"]["spec"]
    assert not [v for v in plain["volumes"] if "secret" in v]
    assert "MULAMBDA_HEARTBEAT_KEY_FILE" not in {e["name"] for e in plain["containers"][1]["env"]}


def test_the_heartbeat_key_secret_is_named_after_its_key_and_holds_the_seed():
    seed = bytes(range(32))
    first = build_heartbeat_secret("iris", "ml", seed)
    validate_k8s(first)
    assert first["metadata"]["name"].startswith("iris-heartbeat-")
    assert base64.b64decode(first["stringData"]["key"]) == seed
    assert build_heartbeat_secret("iris", "ml", seed) == first  # the same key: the same
    # Another key (a recreated executor, a new operator secret): another Secret.
    again = build_heartbeat_secret("iris", "ml", bytes(range(1, 33)))
    assert again["metadata"]["name"] != first["metadata"]["name"]
    assert seed.hex() not in str(first["metadata"])
