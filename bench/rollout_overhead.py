"""What a rollout's traffic split adds to one selection, as a ratio to the same selection
without a rollout, measured in the same run.

Run:  python bench/rollout_overhead.py [--executors 100] [--rounds 7] [--json]

Builds one in-memory snapshot of ``--executors`` executors of one type (2
live replicas each, RTT samples for the client) and times, per decision, what
the SDK and the gateway do for every request:

* **baseline**: ``rank`` of the snapshot with replicas evaluated (no rollout);
* **canary on 1**: ``route_view`` (arm drawn for the one executor rolling
  out, its candidate's replicas swapped in when drawn) + ``rank``;
* **canary on all**: every executor rolling out at once (the worst case);
* **shadow on 1**: a Shadow route (the arm stays stable, the shadow target
  is named) + ``rank``;
* **sticky key + experiment**: ``route_view`` with a sticky draw (a hash
  of the key) + ``rank`` + ``experiment_ranking`` over two arms.

Scenarios are interleaved round by round (``--rounds``, each timing
``--decisions`` decisions per scenario, a few milliseconds) so machine noise
hits them alike. Prints the median per-decision time of each scenario and
the median over rounds of its ratio to the baseline of the same round.
Target: one executor rolling out adds at most 5 % to a selection (ratio <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from mulambda.policy.experiment import Experiment, experiment_ranking
from mulambda.policy.rollout import Route, candidate_id, route_view, sticky_draw
from mulambda.policy.selection import Criteria, rank
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    Snapshot,
)

CLIENT = "bench/app"


def snapshot(executors: int, rolling: int, strategy: str) -> Snapshot:
    """``executors`` Ready executors; the first ``rolling`` have a route and a live
    candidate with 2 replicas."""
    rng = random.Random(1)
    records, replicas, latency = {}, {}, {}
    for i in range(executors):
        eid = f"bench/ex{i:04d}"
        route = None
        if i < rolling:
            route = Route(f"v2-g{i}", strategy, 20, 2,  # type: ignore[arg-type]
                          f"http://ex{i}-candidate:8501", f"ex{i}-candidate:8500").to_record()
        rec = ExecutorRecord(namespace="bench", name=f"ex{i:04d}", model="m", version=1,
                             type="vision", input="image", output="label",
                             accuracy=rng.uniform(0.7, 0.99), rest=f"http://ex{i}:8501",
                             grpc=f"ex{i}:8500", state="Ready",
                             service_time_ms=rng.uniform(2, 40), rollout=route)
        records[eid] = rec
        for owner in [eid] + ([candidate_id(eid)] if i < rolling else []):
            pods = [f"{owner.split('/')[1]}-{k}" for k in range(2)]
            replicas[owner] = [ReplicaRecord(owner, p, ip=f"10.0.{i % 250}.{k + 1}",
                                             state="Available", version=1,
                                             expires_at=float("inf"))
                               for k, p in enumerate(pods)]
            latency[owner] = {p: LatencySample(rng.uniform(0.5, 20), 5, 0.0, float("inf"))
                              for p in pods}
    client = ClientRecord(namespace="bench", name="app", type="vision", experiment=Experiment(
        "bench/app@g1", (("bench/ex0000", 50.0), ("bench/ex0001", 50.0))).to_record())
    return Snapshot(records, replicas, latency, {}, time.time(), client_record=client)


def decide(snap: Snapshot, criteria: Criteria, rng: random.Random, *, routed: bool,
           key: str | None = None, experiment: bool = False) -> None:
    """One decision as the SDK makes it (without its store reads)."""
    view = snap
    if routed:
        def draw(salt: str) -> float:
            return sticky_draw(key, salt) if key is not None else rng.random()
        view, _ = route_view(snap, snap, draw)
    ranking = rank(criteria, view, client=CLIENT, rng=rng, replicas=True, now=time.time())
    if experiment:
        experiment_ranking(ranking, snap.client_record, lambda salt: sticky_draw("u1", salt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--executors", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--decisions", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    criteria = Criteria(type="vision", latency_weight=1, accuracy_weight=1)
    plain = snapshot(args.executors, 0, "Canary")
    plain = replace(plain, client_record=None)
    one = snapshot(args.executors, 1, "Canary")
    every = snapshot(args.executors, args.executors, "Canary")
    shadow = snapshot(args.executors, 1, "Shadow")
    rng = random.Random(7)
    scenarios: dict[str, Callable[[], None]] = {
        "baseline (no rollout)": lambda: decide(plain, criteria, rng, routed=False),
        "canary on 1 executor": lambda: decide(one, criteria, rng, routed=True),
        "canary on every executor": lambda: decide(every, criteria, rng, routed=True),
        "shadow on 1 executor": lambda: decide(shadow, criteria, rng, routed=True),
        "sticky key + experiment": lambda: decide(one, criteria, rng, routed=True, key="u1",
                                                  experiment=True),
    }
    for run in scenarios.values():  # warm up caches and the allocator
        for _ in range(50):
            run()
    samples: dict[str, list[float]] = {name: [] for name in scenarios}
    for _ in range(args.rounds):
        for name, run in scenarios.items():
            started = time.perf_counter()
            for _ in range(args.decisions):
                run()
            samples[name].append((time.perf_counter() - started) / args.decisions * 1e6)
    base = samples["baseline (no rollout)"]
    results = {name: {"median_us": round(statistics.median(v), 1),
                      "ratio": round(statistics.median(
                          [t / b for t, b in zip(v, base, strict=True)]), 3)}
               for name, v in samples.items()}
    if args.json:
        print(json.dumps({"executors": args.executors, "results": results}, indent=2))
        return
    print(f"one decision over {args.executors} executors, median of {args.rounds} rounds "
          f"x {args.decisions} decisions")
    print(f"{'scenario':<28} {'us/decision':>12} {'x baseline':>11}")
    for name, r in results.items():
        print(f"{name:<28} {r['median_us']:>12.1f} {r['ratio']:>11.3f}")
    ok = results["canary on 1 executor"]["ratio"] <= 1.05
    print(f"target: canary on 1 executor <= 1.05x baseline: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
