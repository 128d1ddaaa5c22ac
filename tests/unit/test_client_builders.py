"""Client workload builders: user template kept, identity injected, probe sidecar added."""

from __future__ import annotations

import pytest

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


# -- store access of tenant code (issue 12) ---------------------------------------------------


def _env(settings: Settings) -> dict[str, dict[str, object]]:
    dep = build_client_deployment("shop", "apps", TEMPLATE, 1, settings)
    return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_workload_gets_no_store_access_by_default():
    settings = Settings(redis_url="redis://mulambda-companion@store:6379/0",
                        redis_secret="store-companion", selector_url="http://sel:8080")
    env = _env(settings)
    assert env["MULAMBDA_SELECTOR_URL"]["value"] == "http://sel:8080"
    # Neither the store's address nor any credential, least of all the companions'.
    assert not {"MULAMBDA_REDIS_URL", "MULAMBDA_REDIS_USERNAME",
                "MULAMBDA_REDIS_PASSWORD", "MULAMBDA_SDK_READ_ONLY"} & env.keys()
    assert "store-companion" not in str(env)


def test_workload_gets_only_the_read_only_user_when_its_secret_is_configured():
    settings = Settings(redis_url="redis://mulambda-companion@store:6379/0",
                        redis_secret="store-companion", redis_client_secret="store-client")
    env = _env(settings)
    assert env["MULAMBDA_REDIS_URL"]["value"] == "redis://store:6379/0"  # not the companion
    for name, key in (("MULAMBDA_REDIS_USERNAME", "username"),
                      ("MULAMBDA_REDIS_PASSWORD", "password")):
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "store-client", "key": key}}
    assert env["MULAMBDA_SDK_READ_ONLY"]["value"] == "true"  # the SDK writes nothing
    assert "store-companion" not in str(env)
    validate_k8s(build_client_deployment("shop", "apps", TEMPLATE, 1, settings))


@pytest.mark.parametrize(("namespaces", "gets_the_store"), [
    ("", True),  # unset: the Secret is everywhere
    ("mulambda,apps", True),
    (" mulambda , apps ", True),
    ("mulambda,other", False),
])
def test_workload_gets_the_store_user_only_where_its_secret_is(namespaces, gets_the_store):
    # The chart copies the Secret into redis.acl.clientNamespaces only; a workload
    # elsewhere that referred to it could not start (CreateContainerConfigError).
    settings = Settings(redis_url="redis://store:6379/0", redis_client_secret="store-client",
                        redis_client_namespaces=namespaces, selector_url="http://sel:8080")
    env = _env(settings)  # a workload in "apps"
    assert ("MULAMBDA_REDIS_PASSWORD" in env) is gets_the_store
    assert ("MULAMBDA_SDK_READ_ONLY" in env) is gets_the_store
    assert env["MULAMBDA_SELECTOR_URL"]["value"] == "http://sel:8080"


def test_without_a_selector_workloads_get_no_selector_url():
    # The chart with selector.enabled false sets MULAMBDA_SELECTOR_URL to "": the default
    # URL would send workloads' tokens to a selector that may be another release's.
    settings = Settings.from_env({"MULAMBDA_SELECTOR_URL": ""})
    assert settings.selector_url == ""
    assert "MULAMBDA_SELECTOR_URL" not in _env(settings)
    assert Settings.from_env({}).selector_url == "http://mulambda-selector.mulambda.svc:8080"


def test_workloads_pull_the_companion_image_with_the_platforms_secrets():
    # The ping sidecar is the companion image: from a private registry, a workload got no
    # Secret to pull it with. The user's own pull Secrets stay, none is listed twice.
    settings = Settings(image_pull_secrets="regcred, mirror")
    template = {**TEMPLATE, "spec": {**TEMPLATE["spec"],
                                     "imagePullSecrets": [{"name": "team"}, {"name": "mirror"}]}}
    dep = build_client_deployment("shop", "apps", template, 1, settings)
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "team"}, {"name": "mirror"}, {"name": "regcred"}]
    validate_k8s(dep)
    plain = build_client_deployment("shop", "apps", TEMPLATE, 1, Settings())
    assert "imagePullSecrets" not in plain["spec"]["template"]["spec"]
    # A null in the template (its fields are kept as written) is none, not a crash.
    null = {**TEMPLATE, "spec": {**TEMPLATE["spec"], "imagePullSecrets": None}}
    dep = build_client_deployment("shop", "apps", null, 1, settings)
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "regcred"}, {"name": "mirror"}]
