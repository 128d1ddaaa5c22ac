"""The task backlog as an autoscaler signal (operator/modelexecutor/autoscale.plan):
a queued task wakes an executor at zero, the backlog sizes the replicas, and
status.scaling and /metrics show depth and oldest age."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.operator.k8s.objects import ObjectRef
from mulambda.operator.modelexecutor.autoscale import Windows, plan

NOW = 1_000_000.0


def _spec(min_replicas: int = 0, max_replicas: int = 10, target: float = 4):
    return parse_executor_spec({
        "model": {"name": "m", "storageUri": "s3://models/m"},
        "traits": {"type": "vision", "input": "image", "output": "label",
                   "serviceTimeMs": 1000},
        "scaling": {"minReplicas": min_replicas, "maxReplicas": max_replicas,
                    "targetConcurrency": target}})


def _ref(name: str) -> ObjectRef:
    return ObjectRef("mulambda.io/v1alpha1", "ModelExecutor", "ml", name, f"uid-{name}")


def _deployment(name: str, replicas: int, ready: int) -> dict:
    return {"metadata": {"ownerReferences": [{"uid": f"uid-{name}"}]},
            "spec": {"replicas": replicas}, "status": {"readyReplicas": ready}}


# (replicas, ready, backlog depth, oldest age) -> (replicas to patch to or None, reason)
TABLE = [
    (0, 0, 1, 0.5, 1, "Activate"),  # one queued task wakes an executor at zero
    (0, 0, 0, 0.0, None, None),  # nothing queued: stays at zero
    (1, 1, 8, 3.0, 2, None),  # 8 tasks at target 4 per replica: two replicas
    (1, 1, 80, 30.0, 10, "Bounded"),  # a deep backlog is held at maxReplicas
    (2, 2, 8, 1.0, None, None),  # already sized
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


def test_metrics_show_depth_and_oldest_age_and_go_with_the_executor():
    memory = Windows()
    plan(memory, _ref("gauges"), _spec(), {}, _deployment("gauges", 1, 1), (0, 0.0), NOW,
         (5, 12.5))
    labels = {"executor": "ml/gauges"}
    assert REGISTRY.get_sample_value("mulambda_task_queue_depth", labels) == 5
    assert REGISTRY.get_sample_value("mulambda_task_oldest_age_seconds", labels) == 12.5
    memory.forget("ml/gauges")
    assert REGISTRY.get_sample_value("mulambda_task_queue_depth", labels) is None
