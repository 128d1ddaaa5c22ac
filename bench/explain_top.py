"""What explaining a ranking and drawing a top frame cost, beside the work they show.

Run:  python bench/explain_top.py [--executors 1000]

Builds an in-process fleet of ``--executors`` executors (three of four of
the client's type, one live replica and an RTT sample each) and measures in
one run, best of several repetitions:

* ``rank()`` (the baseline: what every selection already pays);
* ``explain()`` and ``explain().to_dict()`` (``mulambda explain``, the
  selector's ``GET /v1/explain``), as multiples of ``rank()``;
* ``mulambda top``'s rows (``build_rows``, the baseline of drawing) and the
  frame drawn by rich for 40 rows (what a terminal shows) and for every row
  (``--once`` without ``--limit``), as multiples of the rows.

No store or network: both tools add one store read to this (see
bench/selection.py for what a snapshot costs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from mulambda.policy.explain import explain
from mulambda.policy.selection import Criteria, rank
from mulambda.store.records import ExecutorRecord, LatencySample, ReplicaRecord, Snapshot
from mulambda.tools.top import FleetView, build_rows, frame_text

NOW = 1_700_000_000.0


def fleet(n: int) -> Snapshot:
    executors, replicas, latency = {}, {}, {}
    for i in range(n):
        rec = ExecutorRecord(namespace="ml", name=f"e{i}", model=f"e{i}", version=1,
                             type="nlp" if i % 4 == 0 else "vision", input="image",
                             output="label", accuracy=0.5 + (i % 50) / 100,
                             rest=f"http://e{i}:8501", grpc="", state="Ready",
                             service_time_ms=5.0 + i % 50)
        executors[rec.id] = rec
        replicas[rec.id] = [ReplicaRecord(executor=rec.id, pod=f"e{i}-0", state="Available",
                                          expires_at=NOW + 30)]
        latency[rec.id] = {f"e{i}-0": LatencySample(ms=1.0 + i % 7, samples=3)}
    return Snapshot(executors, replicas, latency, {}, NOW)


def best(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` runs, in seconds (load on a shared machine only adds)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    snap = fleet(args.executors)
    criteria = Criteria(type="vision")
    ranked = best(lambda: rank(criteria, snap), args.repeat)
    explained = best(lambda: explain(criteria, snap), args.repeat)
    as_json = best(lambda: explain(criteria, snap).to_dict(), args.repeat)
    view = FleetView(taken_at=NOW, executors=snap.executors, replicas=snap.replicas)
    rows = best(lambda: build_rows(view), args.repeat)
    frame40 = best(lambda: frame_text(view, width=140, limit=40), args.repeat)
    frame_all = best(lambda: frame_text(view, width=140), max(1, args.repeat // 2))
    print(f"{args.executors} executors")
    print(f"  rank                 {ranked * 1e3:8.1f} ms   1.00x (baseline)")
    print(f"  explain              {explained * 1e3:8.1f} ms   {explained / ranked:.2f}x rank")
    print(f"  explain + JSON dict  {as_json * 1e3:8.1f} ms   {as_json / ranked:.2f}x rank")
    print(f"  top rows             {rows * 1e3:8.1f} ms   1.00x (baseline)")
    print(f"  top frame, 40 rows   {frame40 * 1e3:8.1f} ms   {frame40 / rows:.1f}x rows")
    print(f"  top frame, all rows  {frame_all * 1e3:8.1f} ms   {frame_all / rows:.1f}x rows")


if __name__ == "__main__":
    main()
