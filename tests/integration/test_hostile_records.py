"""Store values written with a credential the ACLs allow (docs/security.md T3) hold JSON
integers too large for a float: each is refused when decoded, and nobody else's selection,
SDK, autoscaling or pruning breaks (an int of 401 digits passed validation and overflowed
the first float() of each of them)."""

from __future__ import annotations

import json
import logging
import time

import pytest

from mulambda.sdk.client import MulambdaClient
from mulambda.selector.app import create_app
from mulambda.store.records import ClientRecord, ExecutorRecord, ReplicaRecord

from support.acl_store import login, role_stores
from support.selector_http import selector_http

pytestmark = pytest.mark.integration
P = "hostile"
HUGE = 10 ** 400  # valid JSON: 401 digits


@pytest.fixture
def url(acl_redis):
    acl_redis.flush()
    return acl_redis.url


@pytest.fixture
async def stores(url, monkeypatch):
    out = role_stores(url, P, monkeypatch, roles=("operator", "selector", "client"))
    yield out
    for s in out.values():
        await s.close()


async def _fleet(op) -> None:
    for name in ("a", "b"):
        rec = ExecutorRecord(namespace="ml", name=name, model="m", version=1, type="vision",
                             input="image", output="label", accuracy=0.9,
                             rest=f"http://{name}.invalid:1", grpc="", state="Ready",
                             service_time_ms=5)
        await op.put_executor(rec)
        await op.put_replica(ReplicaRecord(executor=rec.id, pod=f"{name}-0", ip="127.0.0.1",
                                           state="Available"), ttl=600)
    await op.put_client(ClientRecord(namespace="other", name="victim", type="vision"))


SOON = "soon"  # replaced by a minute from the time of writing


def _write(url: str, role: str, key: str, field: str, value: dict) -> None:
    if value.get("expires_at") == SOON:
        value = {**value, "expires_at": time.time() + 60}
    writer = login(url, role)
    writer.hset(f"{P}:{key}", field, json.dumps(value))
    writer.xadd(f"{P}:{key}:changes", {"f": json.dumps([field])})
    writer.close()


LEASES = {
    "busy_until": {"n": 1, "expires_at": SOON, "requests": [["p", HUGE, 1, 0, 1, 1]]},
    "inflight": {"n": 1, "expires_at": SOON, "requests": [["p", 1, 1, HUGE, 1, 1]]},
    "n": {"n": HUGE, "expires_at": SOON, "requests": []},
    "expires_at": {"n": 1, "expires_at": HUGE, "requests": []},
}
OTHERS = {
    "service-w": ("sdk", "service", "ml/a|evil", {"w": HUGE, "count": 1, "expires_at": SOON}),
    "service-cold": ("sdk", "service", "ml/a|evil",
                     {"cold_ms": HUGE, "cold_count": 1, "expires_at": SOON}),
    "latency-ms": ("companion", "latency:other/victim", "ml/a|a-0",
                   {"ms": HUGE, "samples": 1, "expires_at": SOON}),
    "replica-expires": ("companion", "replicas", "ml/a|evil",
                        {"executor": "ml/a", "pod": "evil", "ip": "10.9.9.9",
                         "state": "Available", "expires_at": HUGE}),
}
CASES = {**{f"lease-{k}": ("sdk", "inflight", "ml/a|evil", v) for k, v in LEASES.items()},
         **OTHERS}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_huge_integer_is_refused_and_selection_goes_on(url, stores, case, caplog):
    role, key, field, value = CASES[case]
    caplog.set_level(logging.WARNING, logger="mulambda.store")
    await _fleet(stores["operator"])
    async with selector_http(create_app(stores["selector"], cache_ttl=0)) as api:
        assert (await api.post("/select/other/victim", json={})).status_code == 200
        _write(url, role, key, field, value)
        for _ in range(2):
            answer = await api.post("/select/other/victim", json={})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"]["executor"] in ("ml/a", "ml/b")
    # The reader refused the value and said why, without repeating it.
    refused = [r.getMessage() for r in caplog.records if field in r.getMessage()]
    assert refused and not any("1" * 40 in m for m in refused), caplog.text


async def test_a_tenants_read_only_sdk_still_selects(url, stores):
    await _fleet(stores["operator"])
    _write(url, "sdk", "inflight", "ml/a|evil", LEASES["busy_until"])
    async with MulambdaClient(stores["client"], "other/victim", prefix=P,
                              read_only=True) as sdk:
        assert (await sdk.select()).executor_id in ("ml/a", "ml/b")


async def test_autoscaling_and_pruning_go_on(url, stores):
    op = stores["operator"]
    await _fleet(op)
    _write(url, "sdk", "inflight", "ml/a|evil", LEASES["n"])
    _write(url, "sdk", "inflight", "ml/b|honest", {"n": 3, "expires_at": time.time() + 30})
    _write(url, "sdk", "inflight", "ml/b|dead", {"n": 2, "expires_at": time.time() - 5})
    load = await op.fleet_load({"ml/a": 60, "ml/b": 60})
    assert load["ml/a"][0] == 0 and load["ml/b"][0] == 3
    for family, role in (("service", "sdk"), ("replicas", "companion")):
        _write(url, role, family, "ml/a|evil", {"expires_at": HUGE})
    assert await op.prune_expired() == 1  # the dead lease; the poisoned ones are logged
    assert set(login(url, "operator").hkeys(f"{P}:inflight")) == {"ml/a|evil", "ml/b|honest"}


@pytest.mark.parametrize(("key", "value"), [
    ("inflight", {"n": 500, "requests": []}),
    ("service", {"w": 1000, "t": 1e9, "count": 1000}),
], ids=["lease", "service-times"])
async def test_a_value_expiring_later_than_any_writer_sets_is_refused_and_pruned(
        url, stores, key, value):
    """T3: a forged lease counts until it expires, and no writer sets a lease further
    ahead than MAX_LEASE_SECONDS (service times: their 1 h)."""
    from mulambda.store.leases import InflightReader

    op = stores["operator"]
    await _fleet(op)
    _write(url, "sdk", key, "ml/a|evil", {**value, "expires_at": time.time() + 10 ** 8})
    _write(url, "sdk", key, "ml/b|honest", {**value, "expires_at": time.time() + 20})
    # A generous bound: the default 50 ms gives up (None) on a machine busy with other
    # tests, which is the reader's job, not what this test is about.
    reader = InflightReader(stores["selector"], "selector-x", service=True, timeout=5.0)
    try:
        load = await reader.read()
    finally:
        reader.close()
    if key == "inflight":
        assert load.counts == {"ml/b": 500}
    else:
        assert set(load.service) == {"ml/b"}
    assert await op.prune_expired() == 1
    assert login(url, "operator").hkeys(f"{P}:{key}") == ["ml/b|honest"]


async def test_a_router_cannot_lease_for_longer_than_readers_accept(stores):
    from mulambda.store.leases import InflightLeases
    from mulambda.store.records import MAX_LEASE_SECONDS

    with pytest.raises(ValueError, match="ttl must be within"):
        InflightLeases(stores["selector"], ttl=MAX_LEASE_SECONDS + 1)
    with pytest.raises(ValueError, match="ttl must be at most"):
        await stores["selector"].publish_inflight("x", {"ml/a": 1}, ttl=MAX_LEASE_SECONDS + 1)
