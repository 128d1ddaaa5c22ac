"""Signed heartbeats: who may say where an executor's replicas are (docs/security.md T2)."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from mulambda.policy.selection import Criteria, rank
from mulambda.store.heartbeats import (
    CLAIM_SECONDS,
    Signer,
    claim_until,
    executor_seed,
    public_key,
    vouched,
)
from mulambda.store.records import ExecutorRecord, ReplicaRecord, Snapshot

NOW = 1_700_000_000.0
SEED = executor_seed(b"operator-secret-0123456789", "ml", "hp2", "uid-1")
KEY = public_key(SEED)


def record(key: str | None = public_key(SEED), name: str = "hp2") -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name=name, model="m", version=1, type="vision",
                          input="image", output="label", accuracy=0.9, rest=f"http://{name}:8501",
                          grpc=f"{name}:8500", state="Ready", service_time_ms=5.0,
                          heartbeat_key=key)


def heartbeat(ip: str = "10.0.0.7", pod: str = "hp2-0", state: str = "Available",
              executor: str = "ml/hp2") -> ReplicaRecord:
    return ReplicaRecord(executor=executor, pod=pod, ip=ip, state=state, version=1,
                         expires_at=NOW + 30)


def test_keys_are_per_executor_incarnation_and_repeatable():
    secret = b"operator-secret-0123456789"
    assert executor_seed(secret, "ml", "hp2", "uid-1") == SEED  # a restarted operator
    others = {executor_seed(secret, "ml", "hp2", "uid-2"),  # recreated executor
              executor_seed(secret, "ml", "hp3", "uid-1"),
              executor_seed(secret, "ml2", "hp2", "uid-1"),
              executor_seed(b"another-operator-secret", "ml", "hp2", "uid-1")}
    assert SEED not in others and len(others) == 4
    assert len(base64.b64decode(public_key(SEED))) == 32


def test_a_signed_heartbeat_is_vouched_for():
    signed = Signer(SEED).sign(heartbeat(), NOW)
    assert signed.sig and signed.claim_until == claim_until(NOW) > NOW
    assert vouched(KEY, signed, NOW)


@pytest.mark.parametrize("change", [
    {"ip": "203.0.113.9"},  # the redirect T2 is about
    {"pod": "hp2-9"},
    {"state": "Failed"},
    {"executor": "ml/other"},
    {"version": 2},
    {"claim_until": NOW + 10 * CLAIM_SECONDS},  # a claim stretched by whoever copies it
], ids=lambda c: next(iter(c)))
def test_a_signed_heartbeat_changed_by_anyone_else_is_not(change):
    signed = Signer(SEED).sign(heartbeat(), NOW)
    assert not vouched(KEY, replace(signed, **change), NOW)


def test_unsigned_or_foreign_signatures_are_not_vouched_for():
    assert not vouched(KEY, heartbeat(), NOW)  # unsigned
    other = executor_seed(b"operator-secret-0123456789", "ml", "evil", "uid-9")
    assert not vouched(KEY, Signer(other).sign(heartbeat(), NOW), NOW)
    assert not vouched(KEY, replace(heartbeat(), sig="not base64!", claim_until=NOW + 60),
                       NOW)
    assert not vouched("garbage", Signer(SEED).sign(heartbeat(), NOW), NOW)


def test_a_replayed_claim_runs_out():
    signed = Signer(SEED).sign(heartbeat(), NOW)
    assert vouched(KEY, signed, NOW + 60)
    assert not vouched(KEY, signed, NOW + CLAIM_SECONDS + 1)


def test_executors_without_a_key_take_heartbeats_as_they_come():
    """Records an operator without MULAMBDA_HEARTBEAT_SECRET writes (and tests, benches)."""
    assert vouched(None, heartbeat(), NOW)


def test_the_signer_signs_once_per_claim():
    signer = Signer(SEED)
    first = signer.sign(heartbeat(), NOW)
    again = signer.sign(heartbeat(), NOW + 1)
    assert again.sig == first.sig  # same minute, same claim: no new signature
    moved = signer.sign(heartbeat(state="Failed"), NOW + 1)
    assert moved.sig != first.sig and vouched(KEY, moved, NOW + 1)


def test_a_key_file_that_is_not_a_key_is_refused(tmp_path):
    bad = tmp_path / "key"
    bad.write_text("not base64 at all!")
    with pytest.raises(ValueError, match="not base64"):
        Signer.from_file(str(bad))
    bad.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="32 bytes"):
        Signer.from_file(str(bad))
    good = tmp_path / "good"
    good.write_text(base64.b64encode(SEED).decode() + "\n")
    assert vouched(KEY, Signer.from_file(str(good)).sign(heartbeat(), NOW), NOW)


def test_selection_never_routes_to_a_forged_heartbeat():
    """A companion credential writes a heartbeat for hp2 with its own IP: it is no live
    replica of hp2, so no request goes to it; hp2's signed one is used."""
    rec = record()
    real = Signer(SEED).sign(heartbeat(ip="10.0.0.7", pod="hp2-0"), NOW)
    forged = heartbeat(ip="203.0.113.9", pod="hp2-x")
    copied = replace(real, pod="hp2-y", ip="203.0.113.9")  # a real signature, moved
    snap = Snapshot(executors={rec.id: rec}, replicas={rec.id: [forged, copied, real]},
                    latency={}, inflight={}, taken_at=NOW)
    ranking = rank(Criteria(type="vision"), snap, replicas=True)
    assert [c.url for c in ranking] == ["http://10.0.0.7:8501"]
    # Forged heartbeats alone make no live replica at all.
    alone = replace(snap, replicas={rec.id: [forged, copied]})
    nothing = rank(Criteria(type="vision"), alone, replicas=True)
    assert not nothing
    assert nothing.rejected[rec.id] == ("not serving: 2 Available heartbeat(s), none signed "
                                        "with the executor's key (docs/security.md T2)")
