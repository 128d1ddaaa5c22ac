"""How close the routers' learned cost per request ahead comes to the simulator's truth.

Run:  python bench/service_fit.py [--seeds 11,5,23,7,13] [--placements all-on-all,one-node,mixed]
                                  [--loads 0.5,0.75] [--json]

For every seed, placement and load given, of issue 11's suite (``mulambda simulate
--suite``), both mulambda paths (SDK processes, the gateway) route the same
request stream; then the statistics of all of a path's routers are added up
per executor, as the store adds them, and fitted
(:func:`mulambda.policy.latency.fit`). Printed per path: the fitted
``per_inflight`` of every fast model that runs its requests at once (the
models where a request ahead costs 5-12x the base time, and where the
linear model is the truth) measured on at least 100 answers, as a ratio to
the simulator's true ``per_concurrent_ms``: median, 10th and 90th
percentile. 1.0 is the truth; below it, routers send requests to replicas
that are still busy. The truth is the baseline, from the same run; nothing
here is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from mulambda.policy.latency import ServiceModel, add_stats, fit
from mulambda.policy.selection import Policy
from mulambda.store.records import ServiceStats
from mulambda.tools.simulate import experiment, routers, world

PATHS = ("mulambda-sdk", "mulambda-gateway")


def ratios(seed: int, placement: str, load: float) -> dict[str, list[float]]:
    """Fitted / true cost per request ahead of each fast parallel model, per path."""
    raw = experiment.suite_scenario(placement, load, seed=seed)
    sc = world.Scenario(raw)
    stream = world.stream_of(sc)
    recs = world.records_of(sc)
    policy = Policy()
    out: dict[str, list[float]] = {}
    for path in PATHS:
        router = routers._routers(sc, recs, world.World(sc), policy)[path]()
        routers._run_one(sc, path, router, stream)
        summed: dict[str, ServiceStats] = {}
        for inst in router.instances:  # type: ignore[attr-defined]
            for eid, st in inst.tracker.stats.items():
                merged = add_stats(summed.get(eid), st)
                assert merged is not None
                summed[eid] = merged
        found = out.setdefault(path, [])
        for eid, st in summed.items():
            rec = recs[eid]
            model = raw["models"][rec.model]
            if not rec.model.startswith("fast") or model["concurrency"] != 0 or st.count < 100:
                continue
            declared = rec.service_time_ms or 0.0
            fitted = fit(st, ServiceModel(declared, declared), policy.fit)
            found.append(fitted.per_inflight_ms / model["per_concurrent_ms"])
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="11,5,23,7,13")
    ap.add_argument("--placements", default=",".join(experiment.PLACEMENTS))
    ap.add_argument("--loads", default="0.5,0.75")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    found: dict[str, list[float]] = {p: [] for p in PATHS}
    for seed in (int(s) for s in args.seeds.split(",")):
        for placement in args.placements.split(","):
            for load in (float(x) for x in args.loads.split(",")):
                for path, values in ratios(seed, placement, load).items():
                    found[path].extend(values)
    report: dict[str, Any] = {
        path: {"models": len(v), "median": round(statistics.median(v), 3),
               "p10": round(_quantile(v, 0.1), 3), "p90": round(_quantile(v, 0.9), 3)}
        for path, v in found.items() if v}
    if args.json:
        print(json.dumps(report))
        return
    print("fitted / true cost per request ahead, fast models that run requests at once")
    for path, r in report.items():
        print(f"{path:18} models {r['models']:4}  median {r['median']:.2f}  "
              f"p10 {r['p10']:.2f}  p90 {r['p90']:.2f}")


if __name__ == "__main__":
    main()
