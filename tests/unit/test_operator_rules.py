"""Small operator rules that need no API server: rejections, sticky choices, settings."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes.client.exceptions import ApiException

from mulambda.operator.client.status import sticky_choice
from mulambda.operator.k8s import children
from mulambda.policy.selection import Criteria, rank
from mulambda.settings import Settings
from mulambda.store.records import ExecutorRecord, LatencySample, ReplicaRecord, Snapshot


def test_api_validation_errors_become_rejections_with_the_servers_message():
    exc = ApiException(status=422, reason="Unprocessable Entity")
    exc.body = json.dumps({"message": 'Deployment.apps "x" is invalid: spec.template.spec.'
                                     'tolerations[0].effect: Unsupported value: "Sometimes"'})
    rejected = children._rejected(exc, "Deployment", "x")
    assert rejected is not None and 'Unsupported value: "Sometimes"' in str(rejected)
    assert children._rejected(ApiException(status=500, reason="boom"), "Deployment", "x") is None
    assert children._rejected(ApiException(status=409, reason="exists"), "Service", "x") is None


def _snapshot(latencies: dict[str, float]) -> Snapshot:
    now = time.time()
    executors, replicas, latency = {}, {}, {}
    for name, ms in latencies.items():
        rec = ExecutorRecord(namespace="ml", name=name, model=name, version=1, type="t",
                             input="i", output="o", accuracy=0.9, rest=f"http://{name}",
                             grpc="", state="Ready", service_time_ms=5)
        executors[rec.id] = rec
        replicas[rec.id] = [ReplicaRecord(executor=rec.id, pod="p", state="Available",
                                          expires_at=now + 60)]
        latency[rec.id] = {"p": LatencySample(ms=ms, samples=3, expires_at=now + 60)}
    return Snapshot(executors, replicas, latency, {}, now)


def test_operator_keeps_its_choice_among_equals_but_moves_for_a_better_one():
    criteria = Criteria(type="t")
    tie = rank(criteria, _snapshot({"a": 2.0, "b": 2.0}), client="apps/c")
    other = next(c.executor_id for c in tie if c.executor_id != tie[0].executor_id)
    assert sticky_choice(tie, other).executor_id == other  # no flapping
    better = rank(criteria, _snapshot({"a": 1.0, "b": 40.0}), client="apps/c")
    assert sticky_choice(better, "ml/b").executor_id == "ml/a"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_intervals_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match="MULAMBDA_HEARTBEAT_TTL_SECONDS"):
        Settings.from_env({"MULAMBDA_HEARTBEAT_TTL_SECONDS": value})
    ok = Settings.from_env({"MULAMBDA_HEARTBEAT_TTL_SECONDS": "12.5"})
    assert ok.heartbeat_ttl_seconds == 12.5


@pytest.mark.parametrize("url", [
    "redis://:hunter2@redis:6379/0",
    "redis://user:hunter2@redis:6379/0",
    "redis://hunter2:@redis:6379/0",  # an empty password: the chart refuses it too
    # redis-py reads a password from the query as well.
    "redis://redis:6379/0?password=hunter2",
    "rediss://redis:6379/0?ssl_cert_reqs=none&Password=hunter2",
    "unix:///run/redis.sock?db=0&password=hunter2",
])
def test_a_password_in_the_store_url_is_refused_with_the_way_out(url):
    with pytest.raises(ValueError, match="MULAMBDA_REDIS_SECRET") as err:
        Settings.from_env({"MULAMBDA_REDIS_URL": url})
    assert "hunter2" not in str(err.value)


def test_a_store_url_without_a_password_is_kept():
    assert Settings.from_env({"MULAMBDA_REDIS_URL": "redis://redis:6379/1"}).redis_url.endswith("/1")
