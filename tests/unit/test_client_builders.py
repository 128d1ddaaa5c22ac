"""Client workload builders: user template kept, identity injected, probe sidecar added."""

from __future__ import annotations

from mulambda.operator.client.build import (
    PING_PORT,
    build_client_deployment,
    build_client_service,
    probe_url,
)
from mulambda.settings import Settings

from support.schemas import validate_k8s

SETTINGS = Settings(redis_url="redis://store:6379/0", companion_image="mulambda:test")
TEMPLATE = {
    "metadata": {"labels": {"team": "a"}},
    "spec": {"containers": [{
        "name": "app", "image": "example/app:1",
        "env": [{"name": "MULAMBDA_CLIENT", "value": "spoofed/identity"},
                {"name": "OWN", "value": "kept"}],
    }]},
}


def test_workload_deployment_and_service_validate_strictly():
    validate_k8s(build_client_deployment("shop", "apps", TEMPLATE, 2, SETTINGS))
    validate_k8s(build_client_service("shop", "apps"))


def test_workload_gets_identity_and_settings_and_cannot_spoof_them():
    dep = build_client_deployment("shop", "apps", TEMPLATE, 2, SETTINGS)
    app = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["MULAMBDA_CLIENT"] == "apps/shop"
    assert env["MULAMBDA_REDIS_URL"] == "redis://store:6379/0"
    assert env["OWN"] == "kept"
    assert [e["name"] for e in app["env"]].count("MULAMBDA_CLIENT") == 1
    assert TEMPLATE["spec"]["containers"][0]["env"][0]["value"] == "spoofed/identity"  # untouched


def test_ping_sidecar_is_what_the_service_and_probe_url_point_at():
    dep = build_client_deployment("shop", "apps", TEMPLATE, 1, SETTINGS)
    pod = dep["spec"]["template"]
    ping = pod["spec"]["containers"][-1]
    assert ping["args"][0] == "ping" and ping["securityContext"]["runAsNonRoot"] is True
    svc = build_client_service("shop", "apps")
    assert all(pod["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
    assert pod["metadata"]["labels"]["team"] == "a"
    url = probe_url("shop", "apps", SETTINGS)
    assert url == f"http://shop-workload.apps.svc.cluster.local:{PING_PORT}/ping"
    assert svc["spec"]["ports"][0]["port"] == PING_PORT
