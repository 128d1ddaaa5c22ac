"""mulambda top's frame: a pure function of a fixed fleet view."""

from __future__ import annotations

import pytest

from mulambda.policy.rollout import BUCKETS, ArmStats, bucket_of
from mulambda.store.records import ExecutorRecord, ReplicaRecord, ServiceStats
from mulambda.tools.top import FleetView, build_rows, frame_text, percentile, state_of

NOW = 1_700_000_000.0  # 22:13:20 UTC


def executor(name: str, *, namespace: str = "ml", type: str = "vision", state: str = "Ready",
             service: float | None = 10.0) -> ExecutorRecord:
    return ExecutorRecord(namespace=namespace, name=name, model=name, version=1, type=type,
                          input="image", output="label", accuracy=0.9,
                          rest=f"http://{name}:8501", grpc="", state=state,
                          service_time_ms=service)


def replica(eid: str, pod: str, state: str = "Available", reason: str = "") -> ReplicaRecord:
    return ReplicaRecord(executor=eid, pod=pod, state=state, reason=reason,
                         expires_at=NOW + 30)


def ready(status: str, reason: str) -> dict[str, object]:
    return {"conditions": [{"type": "Ready", "status": status, "reason": reason}]}


# Twenty measured requests at one request ahead that took 30 ms each, on a 10 ms prior.
MEASURED = ServiceStats(w=20, k=20, i=20, t=600, kk=20, ii=20, ki=20, kt=600, it=600, count=20)

VIEW = FleetView(
    taken_at=NOW,
    executors={e.id: e for e in (
        executor("resnet"), executor("bert", namespace="nlp", type="text"),
        executor("sleepy", state="ScaledToZero"), executor("broken", state="Failed"),
        executor("booting", state="Pending"))},
    replicas={"ml/resnet": [replica("ml/resnet", "resnet-0"), replica("ml/resnet", "resnet-1")],
              "nlp/bert": [replica("nlp/bert", "bert-0")],
              "ml/broken": [replica("ml/broken", "broken-0", "Failed", "ModelNotFound")],
              "ml/booting": [replica("ml/booting", "booting-0", "Loading")]},
    load={"ml/resnet": (4, 12.5), "nlp/bert": (1, 0.5)},
    service={"ml/resnet": MEASURED},
    rtt={"ml/resnet": [1.0, 2.0, 3.0, 4.0, 10.0], "nlp/bert": [7.0]},
    queue={"ml/resnet": (3, 1.5)},
    # Two minutes of routers' counts: 1,400 answers near 20 ms, 100 near 80 ms, 3 failed.
    served={"ml/resnet": ArmStats(1500, 3, {bucket_of(20): 1400, bucket_of(80): 100})},
    served_seconds=120.0,
    resources={"ml/resnet": {"desiredReplicas": 3, "readyReplicas": 2, **ready("True",
                                                                              "ModelServing")},
               "nlp/bert": {"desiredReplicas": 1, "readyReplicas": 1},
               "ml/sleepy": {"desiredReplicas": 0, "readyReplicas": 0,
                             **ready("False", "ScaledToZero")},
               "ml/broken": {"desiredReplicas": 1, "readyReplicas": 0},
               "ml/booting": {"desiredReplicas": 1, "readyReplicas": 0,
                              **ready("False", "WaitingForReplicas")}},
)


def test_a_fixed_view_renders_to_this_frame() -> None:
    text = frame_text(VIEW, width=140)
    lines = [line.rstrip() for line in text.splitlines()]
    assert lines[0] == ("mulambda top  22:13:20 UTC  executors 5  serving 2  warming 1  "
                        "cold 1  failing 1  sorted by name")
    rows = {line.split()[0]: line.split() for line in lines[2:7]}
    assert lines[1].split() == ["executor", "type", "state", "ready/desired", "in", "flight",
                                "req/s", "p50", "ms", "p95", "ms", "service", "ms", "rtt",
                                "p50", "rtt", "p95", "queue"]
    [resnet] = [r for r in build_rows(VIEW) if r.executor == "ml/resnet"]
    # 1,500 requests in 120 s; the percentiles inside the buckets that hold them.
    assert rows["ml/resnet"] == ["ml/resnet", "vision", "serving", "2/3", "4", "12.50",
                                 f"{resnet.p50:.1f}", f"{resnet.p95:.1f}", "48.9", "3.0",
                                 "10.0", "3"]
    assert BUCKETS[bucket_of(20) - 1] < resnet.p50 <= BUCKETS[bucket_of(20)]
    assert BUCKETS[bucket_of(80) - 1] < resnet.p95 <= BUCKETS[bucket_of(80)]
    assert rows["nlp/bert"][6:8] == ["-", "-"]  # nothing served lately: no percentiles
    assert rows["ml/broken"][2:5] == ["failing", "(ModelNotFound)", "0/1"]
    assert rows["ml/sleepy"][2:4] == ["cold", "0/0"]
    assert rows["ml/booting"][2:4] == ["warming", "0/1"]
    # Nothing measured: the declared time, marked.
    assert rows["ml/sleepy"][8] == "10.0*"
    assert "service ms: the measured model's mean" in text


def test_measured_service_time_replaces_the_declared_one() -> None:
    [row] = build_rows(VIEW, namespace="ml", type_="vision", sort="rps")[:1]
    assert row.executor == "ml/resnet" and row.measured == 20
    # Measured 30 ms at one request ahead; 4 in flight over 2 ready replicas is 2 ahead.
    assert row.service_ms > 30.0
    assert (row.rtt_p50, row.rtt_p95, row.queue) == (3.0, 10.0, 3)


@pytest.mark.parametrize(("options", "order"), [
    ({"sort": "name"}, ["ml/booting", "ml/broken", "ml/resnet", "ml/sleepy", "nlp/bert"]),
    ({"sort": "state"}, ["ml/resnet", "nlp/bert", "ml/booting", "ml/sleepy", "ml/broken"]),
    ({"sort": "rps"}, ["ml/resnet", "nlp/bert", "ml/booting", "ml/broken", "ml/sleepy"]),
    ({"sort": "rtt"}, ["ml/resnet", "nlp/bert", "ml/booting", "ml/broken", "ml/sleepy"]),
    ({"namespace": "nlp"}, ["nlp/bert"]),
    ({"type_": "vision", "sort": "inflight"}, ["ml/resnet", "ml/booting", "ml/broken",
                                               "ml/sleepy"]),
    ({"namespace": "none"}, []),
])
def test_rows_are_filtered_and_sorted(options: dict, order: list[str]) -> None:
    assert [r.executor for r in build_rows(VIEW, **options)] == order


@pytest.mark.parametrize(("record_state", "live", "desired", "condition", "expected"), [
    ("Ready", ["Available"], 1, ready("True", "ModelServing"), ("serving", "")),
    ("Ready", ["Available", "Failed"], 2, None, ("serving", "")),
    ("Pending", ["Failed"], 1, None, ("failing", "ModelNotFound")),
    ("Failed", [], 1, None, ("failing", "Failed")),
    ("Pending", [], 1, ready("False", "Forbidden"), ("failing", "Forbidden")),
    ("Pending", [], 1, ready("False", "WaitingForReplicas"), ("warming", "")),
    ("Pending", ["Loading"], 1, None, ("warming", "")),
    ("ScaledToZero", [], 0, ready("False", "ScaledToZero"), ("cold", "")),
    ("ScaledToZero", [], None, None, ("cold", "")),  # API server not read: the record says
    ("ScaledToZero", ["Loading"], 1, None, ("warming", "")),  # activated, loading
])
def test_state_of_an_executor(record_state: str, live: list[str], desired: int | None,
                              condition: dict | None, expected: tuple[str, str]) -> None:
    rec = executor("x", state=record_state)
    replicas = [replica(rec.id, f"x-{i}", s, "ModelNotFound" if s == "Failed" else "")
                for i, s in enumerate(live)]
    cond = None if condition is None else condition["conditions"][0]  # type: ignore[index]
    assert state_of(rec, replicas, desired, cond) == expected


def test_without_the_api_server_or_a_task_queue_the_frame_says_so() -> None:
    view = FleetView(taken_at=NOW, executors={"ml/a": executor("a")},
                     replicas={"ml/a": [replica("ml/a", "a-0")]},
                     notes=("API server not read (no kubeconfig): desired replicas unknown",))
    text = frame_text(view)
    assert "queue" not in text.splitlines()[1]
    assert "1/?" in text
    assert "API server not read (no kubeconfig)" in text


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 50, None), ([5.0], 95, 5.0), ([3.0, 1.0, 2.0], 50, 2.0),
    ([float(i) for i in range(1, 101)], 95, 95.0), ([1.0, 2.0], 50, 1.0),
])
def test_percentile_is_nearest_rank(values: list[float], q: float,
                                    expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_a_limit_shows_the_first_rows_and_says_how_many_more() -> None:
    text = frame_text(VIEW, sort="rps", limit=2)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["ml/resnet", "nlp/bert"]
    assert lines[4] == ("... 3 more executors (sorted by rps; narrow with -n, --type or "
                        "--limit)")
    assert "executors 5" in lines[0]  # the header counts every executor
    assert "more executors" not in frame_text(VIEW, limit=5)


@pytest.mark.parametrize("reason", ["[/oops] closing nothing", "[bold red]BIG[/bold red]",
                                    "\x1b[2J\x1b[31mred", "bell\x07 and\x9b csi"])
def test_store_text_is_shown_not_obeyed(reason: str) -> None:
    # A companion writes its heartbeat's reason: as rich markup, "[/oops]" raised (top
    # ended in a traceback) and "[bold]" restyled; an ESC reached the terminal.
    view = FleetView(taken_at=NOW, executors={"ml/x": executor("x", state="Failed")},
                     replicas={"ml/x": [replica("ml/x", "x-0", "Failed", reason)]})
    text = frame_text(view, width=200)
    row = next(line for line in text.splitlines() if line.startswith("ml/x"))
    shown = reason.translate({c: "\ufffd" for c in (7, 0x1b, 0x9b)})
    assert f"({shown})" in row
    assert not any(ch in text for ch in "\x1b\x07\x9b")
