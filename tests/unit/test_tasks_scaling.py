"""The task backlog as an autoscaler signal (operator/modelexecutor/autoscale.plan):
a queued task wakes an executor at zero, the backlog sizes the replicas, and
status.scaling and /metrics show depth and oldest age."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.operator.k8s.objects import ObjectRef
from mulambda.operator.modelexecutor.autoscale import Windows, plan
from mulambda.policy.scaling import (
    Sample,
    effective_concurrency,
)

from support.burst import run_burst

NOW = 1_000_000.0


def _spec(min_replicas: int = 0, max_replicas: int = 10, target: float = 4,
          burst_capacity: float | None = None):
    spare = {} if burst_capacity is None else {"burstCapacity": burst_capacity}
    return parse_executor_spec({
        "model": {"name": "m", "storageUri": "s3://models/m"},
        "traits": {"type": "vision", "input": "image", "output": "label",
                   "serviceTimeMs": 1000},
        "scaling": {"minReplicas": min_replicas, "maxReplicas": max_replicas,
                    "targetConcurrency": target, **spare}})


def _ref(name: str) -> ObjectRef:
    return ObjectRef("mulambda.io/v1alpha1", "ModelExecutor", "ml", name, f"uid-{name}")


def _deployment(name: str, replicas: int, ready: int) -> dict:
    return {"metadata": {"ownerReferences": [{"uid": f"uid-{name}"}]},
            "spec": {"replicas": replicas}, "status": {"readyReplicas": ready}}


# (replicas, ready, backlog depth, oldest age) -> (replicas to patch to or None, reason);
# a 1 s model at 4 per replica, no arrivals: the backlog is sized to drain in 35 s.
TABLE = [
    (0, 0, 1, 0.5, 1, "Activate"),  # one queued task wakes an executor at zero
    (0, 0, 0, 0.0, None, None),  # nothing queued: stays at zero
    (1, 1, 100, 3.0, None, None),  # one replica drains 100 tasks in 25 s: enough
    (1, 1, 400, 3.0, 3, "Panic"),  # 400 / 35 s = 11.4 at a time: three replicas
    (1, 1, 4000, 30.0, 10, "Bounded"),  # a deep backlog is held at maxReplicas
]


@pytest.mark.parametrize(("replicas", "ready", "depth", "age", "target", "reason"), TABLE)
def test_backlog_drives_the_replicas(replicas, ready, depth, age, target, reason):
    name = f"q-{replicas}-{ready}-{depth}"
    memory = Windows()
    update, got = plan(memory, _ref(name), _spec(), {}, _deployment(name, replicas, ready),
                       (0, 0.0), NOW, (depth, age))
    assert got == target
    scaling = update.fields["scaling"]
    assert scaling["queueDepth"] == depth
    assert scaling["oldestTaskAgeSeconds"] == round(age)
    if reason is not None:
        assert scaling["reason"] == reason
        assert [e.reason for e in update.events] == [reason]
    memory.forget(f"ml/{name}")


def test_an_absurd_arrival_rate_is_the_most_demand_not_an_error():
    # A serviceTimeMs of 1e308 (no bound then) times 1,800 arrivals/s was infinite: the
    # sample raised, and the autoscaler's whole tick with it. Bounded now both ways.
    name, rate = "absurd", 1e306
    spec = parse_executor_spec({
        "model": {"name": "m", "storageUri": "s3://models/m"},
        "traits": {"type": "vision", "input": "image", "output": "label",
                   "serviceTimeMs": 3_600_000},
        "scaling": {"minReplicas": 0, "maxReplicas": 10, "targetConcurrency": 4}})
    memory = Windows()
    update, got = plan(memory, _ref(name), spec, {}, _deployment(name, 1, 1), (0, rate),
                       NOW, (0, 0.0))
    assert got == 10
    assert update.fields["scaling"]["reason"] == "Bounded"
    memory.forget(f"ml/{name}")


def test_metrics_show_depth_and_oldest_age_and_go_with_the_executor():
    memory = Windows()
    plan(memory, _ref("gauges"), _spec(), {}, _deployment("gauges", 1, 1), (0, 0.0), NOW,
         (5, 12.5))
    labels = {"executor": "ml/gauges"}
    assert REGISTRY.get_sample_value("mulambda_task_queue_depth", labels) == 5
    assert REGISTRY.get_sample_value("mulambda_task_oldest_age_seconds", labels) == 12.5
    memory.forget("ml/gauges")
    assert REGISTRY.get_sample_value("mulambda_task_queue_depth", labels) is None


# -- the backlog sized to drain, not head for head (mulambda.policy.scaling) ------------

# (concurrency, rate, queued, service_s, drain) -> effective concurrency
EFFECTIVE = [
    (50.0, 40.0, 0.0, 1.0, 30.0, 50.0),  # no backlog: as reported
    (500.0, 40.0, 450.0, None, 30.0, 500.0),  # no service time: head for head, as before
    (500.0, 40.0, 450.0, 1.0, 30.0, 40.0 + 15.0),  # offered 40 + 450 drained over 30 s
    (500.0, 40.0, 450.0, 0.5, 10.0, 20.0 + 22.5),
    # replicas busy draining do not count as demand: only what arrives does
    (1800.0, 450.0, 600.0, 1.0, 30.0, 450.0 + 20.0),
]


@pytest.mark.parametrize(("concurrency", "rate", "queued", "service", "drain", "expected"),
                         EFFECTIVE)
def test_effective_concurrency(concurrency, rate, queued, service, drain, expected):
    sample = Sample(0.0, concurrency, rate, queued, service)
    assert effective_concurrency(sample, drain) == pytest.approx(expected)


def _burst(service_s: float | None) -> tuple[int, list[int]]:
    """Peak replicas over a burst from 100 to 450 requests/s of a 1 s model, 30 s cold
    start, every request waiting in a FIFO queue in front of 10 slots per replica; and the
    seconds at which it scaled up."""
    # Rule 8 alone: a spare capacity (rule 9) would change the replicas before the burst.
    policy = _spec(min_replicas=1, max_replicas=200, target=7, burst_capacity=0).scaling
    steps = run_burst(policy, lambda second: 100.0 if second < 10 else 450.0, range(120),
                      service_s=service_s)
    decided = [s for s in steps if s.desired is not None]
    peak = max([15, *(s.desired for s in decided if s.desired is not None)])
    return peak, [s.second for s in decided if s.desired is not None and s.desired > s.current]


def _burst_peak(service_s: float | None) -> int:
    return _burst(service_s)[0]


def test_a_burst_behind_a_cold_start_no_longer_overshoots():
    # 450 req/s of a 1 s model at 7 per replica need 65 replicas; counted head for
    # head, the queue that grows during the cold start asks for the maximum.
    assert _burst_peak(service_s=None) == 200
    # Sized to drain: 65 for the arrivals plus what drains, within QUEUE_DRAIN_SECONDS
    # (35 s), the ~10,650 requests queued when the new pods are ready (what 15 replicas
    # at 7 cannot serve during one 30 s cold start): 44 more, not tick by tick.
    assert 65 < _burst_peak(service_s=1.0) <= 65 + 44


def test_a_burst_starts_its_pods_at_its_first_decisions():
    # The burst begins at second 10: the decision then sees one second of it (its
    # rate since the previous decision is half the burst's), the next the whole rate.
    # After that the pods already starting are counted: none is added while the
    # queue they will drain keeps growing, each of which would be ready too late.
    _, ups = _burst(service_s=1.0)
    assert ups == [10, 12]
