"""mulambda.authz without an API server: what a route names, token shapes, the bounded cache,
fail-closed routes, and the loud switch. The API server's answers: tests/integration/
test_selector_auth.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mulambda.authz import (
    ApiServer,
    Authorizer,
    _Lru,
    bearer_token,
    from_settings,
    install,
    target_of,
)
from mulambda.settings import Settings, SettingsError


@pytest.mark.parametrize(("match_info", "target"), [
    ({"namespace": "team-a", "client": "c1"}, ("team-a", "c1")),
    ({"client": "team-a/c1"}, ("team-a", "c1")),
    ({"client": "team-a%2Fc1"}, ("team-a", "c1")),
    ({"client": "team-a%2fweb.v2"}, ("team-a", "web.v2")),
    ({"client": "c1"}, None),  # no namespace: nothing to authorize against
    ({"client": "team-a/c1/x"}, None),
    ({"namespace": "Team", "client": "c1"}, None),
    ({"namespace": "a", "client": "../b"}, None),
    ({"namespace": "shop", "client": "app\n"}, None),  # "$" let a trailing newline in
    ({"namespace": "shop\n", "client": "app"}, None),
    ({"client": "shop%2Fapp%0A"}, None),
    ({"namespace": "a"}, None),
    ({}, None),
])
def test_a_route_names_its_client_by_namespace_and_name(
        match_info: dict[str, str], target: tuple[str, str] | None) -> None:
    assert target_of(match_info) == target


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer aaa.bbb.ccc", "aaa.bbb.ccc"),
    ("bearer  aaa.bbb.ccc ", "aaa.bbb.ccc"),
    (None, None),
    ("", None),
    ("Basic aaa.bbb.ccc", None),
    ("Bearer not-a-jwt", None),
    ("Bearer aaa.bbb.ccc.ddd", None),
    ("Bearer " + "a" * 20000 + ".b.c", None),
])
def test_only_bearer_tokens_shaped_like_jwts_are_sent_for_review(
        header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_the_cache_is_bounded_and_forgets_after_its_ttl() -> None:
    now = [0.0]
    cache: _Lru[str, int] = _Lru(max_entries=3, ttl=5.0, clock=lambda: now[0])
    for i in range(10):
        cache.put(f"k{i}", i)
    assert len(cache) == 3
    assert cache.get("k0") is None and cache.get("k9") == 9
    cache.get("k7")  # recently used: survives the next insert
    cache.put("k10", 10)
    assert cache.get("k7") == 7 and cache.get("k8") is None
    now[0] = 5.0
    assert cache.get("k7") is None and cache.get("k10") is None


async def handler(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def test_a_protected_route_that_names_no_client_is_refused_not_passed() -> None:
    app = web.Application()
    install(app, Authorizer(ApiServer(server="https://127.0.0.1:1", token="unused")))
    app.router.add_post("/select/{client:.+}", handler)
    app.router.add_post("/v1/other", handler)
    app.router.add_get("/healthz", handler)
    async with TestClient(TestServer(app)) as client:
        for path in ("/select/no-namespace", "/v1/other"):
            resp = await client.post(path, headers={"Authorization": "Bearer a.b.c"})
            assert resp.status == 400
            assert "NAMESPACE/NAME" in (await resp.json())["error"]
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/select/a/b")).status == 405  # routing errors pass through


def test_turning_authorization_off_is_loud(caplog: pytest.LogCaptureFixture) -> None:
    assert Settings.from_env({}).selector_auth is True
    assert Settings.from_env({"MULAMBDA_SELECTOR_AUTH": "false"}).selector_auth is False
    with caplog.at_level(logging.INFO, "mulambda.authz"):
        assert from_settings(False, {}) is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "CALLER AUTHORIZATION IS OFF" in record.getMessage()


def test_on_outside_a_pod_fails_at_start_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="MULAMBDA_SELECTOR_AUTH=false"):
        from_settings(True, {})
    (tmp_path / "token").write_text("t")
    api = ApiServer.in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                "KUBERNETES_SERVICE_PORT": "443"}, sa_dir=tmp_path)
    assert api == ApiServer(server="https://10.96.0.1:443", ca_file=str(tmp_path / "ca.crt"),
                            token_file=str(tmp_path / "token"))
    assert ApiServer.in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1"},
                                sa_dir=tmp_path).server == "https://[fd00::1]:443"
