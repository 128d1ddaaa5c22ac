"""The experiment of issue 11: placements x load levels x client kinds, and its goals."""


from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mulambda.policy.ranking import DEFAULT_POLICY

from .routers import simulate
from .world import SELECTORS, Figures

# -- the experiment of issue 11 --------------------------------------------------------

NODE_RTT_MS = {"n10": 10.0, "n30": 30.0, "n100": 100.0, "n300": 300.0}
PLACEMENTS = ("all-on-all", "one-node", "mixed")
LOAD_LEVELS = (0.05, 0.25, 0.5, 0.75)
CLIENT_KINDS = {"latency": (1.0, 0.0), "accuracy": (0.0, 1.0), "balanced": (0.5, 0.5)}
SUITE_SELECTORS = SELECTORS


def model_family(seed: int) -> dict[str, dict[str, Any]]:
    """Nine models, three speed tiers x three accuracy tiers, drawn from ``seed``.

    Base times: fast 8-15 ms, mid 40-80 ms, slow 120-200 ms. Each request
    running beside one costs ``per_concurrent_ms``: 5-12x the base time for
    fast models, 2-6x for mid, 0.5-2x for slow ones (what declared service
    times miss). Per item 0.2-1 % of the base time; additive jitter up to
    20-50 % of it. Two in three run every request at once (the published
    dummy models), one in three has 1-3 slots and a queue (a server with a
    thread pool). Accuracy: bad 0.50-0.62, ok 0.75-0.85, good 0.88-0.97.
    The declared ``serviceTimeMs`` is the base time.
    """
    rng = random.Random(seed)
    tiers = (("fast", (8, 15), (5, 12)), ("mid", (40, 80), (2, 6)), ("slow", (120, 200), (0.5, 2)))
    grades = (("bad", (0.5, 0.62)), ("ok", (0.75, 0.85)), ("good", (0.88, 0.97)))
    out: dict[str, dict[str, Any]] = {}
    for tier, base, ratio in tiers:
        for grade, acc in grades:
            d = rng.uniform(*base)
            parallel = rng.random() < 2 / 3
            out[f"{tier}-{grade}"] = {
                "service_ms": round(d, 2),
                "per_concurrent_ms": round(d * rng.uniform(*ratio), 2),
                "per_item_ms": round(d * rng.uniform(0.002, 0.01), 4),
                "jitter_ms": round(d * rng.uniform(0.2, 0.5), 2),
                "concurrency": 0 if parallel else rng.randint(1, 3),
                "accuracy": round(rng.uniform(*acc), 3),
            }
    return out


def _capacity(model: dict[str, Any]) -> float:
    """Requests per second one replica sustains (asymptotically)."""
    d = float(model["service_ms"])
    beta = float(model.get("per_concurrent_ms", 0))
    slots = int(model.get("concurrency", 1))
    if slots <= 0:
        return 1000 / beta if beta > 0 else 1000 / d * 10
    return slots * 1000 / (d + beta * (slots - 1))


def suite_scenario(placement: str, load: float, *, seed: int = 11,
                   requests: int = 3000, **overrides: Any) -> dict[str, Any]:
    """One cell of the suite: the model family placed on the four nodes, at ``load``
    times their capacity, one client of each kind (latency-only, accuracy-only,
    balanced) sharing the traffic, each with two SDK processes and 1-20 items per
    request. ``overrides`` replace scenario keys (``router_seed``,
    ``snapshot_ttl_ms``, ...)."""
    models = model_family(seed)
    names = sorted(models)
    nodes = list(NODE_RTT_MS)
    executors: list[dict[str, Any]] = []
    if placement == "all-on-all":
        executors = [{"name": f"{m}-{n}", "model": m, "nodes": [n]} for m in names for n in nodes]
    elif placement == "one-node":
        executors = [{"name": f"{m}-n10", "model": m, "nodes": ["n10"]} for m in names]
    elif placement == "mixed":
        # Each model on one or two nodes (drawn), one of them as a single executor
        # whose two replicas sit on different nodes (the Service spreads over both).
        rng = random.Random(seed + 1)
        for m in names:
            where = rng.sample(nodes, rng.choice((1, 2)))
            if len(where) == 2 and rng.random() < 0.3:
                executors.append({"name": f"{m}-spread", "model": m, "nodes": where})
            else:
                executors.extend({"name": f"{m}-{n}", "model": m, "nodes": [n]} for n in where)
    else:
        raise ValueError(f"unknown placement {placement!r}; one of {PLACEMENTS}")
    capacity = sum(_capacity(models[e["model"]]) for e in executors for _ in e["nodes"])
    clients = [{"name": kind, "node": "client", "latency": w[0], "accuracy": w[1],
                "share": 1.0, "items": 1, "items_max": 20, "instances": 2}
               for kind, w in CLIENT_KINDS.items()]
    network = {"client": {"client": 0.5, **NODE_RTT_MS}}
    return {
        "seed": seed, "requests": requests, "rate_per_s": round(load * capacity, 2),
        "jitter": 0.1, "nodes": ["client", *nodes], "network_ms": network,
        "models": models, "executors": executors, "clients": clients, **overrides,
    }


@dataclass
class Cell:
    """One placement x load x client kind of the suite, with every router's figures."""

    placement: str
    load: float
    rate: float
    client: str
    figures: dict[str, Figures]


def suite(*, seed: int = 11, requests: int = 3000,
          selectors: tuple[str, ...] = SUITE_SELECTORS,
          placements: tuple[str, ...] = PLACEMENTS,
          loads: tuple[float, ...] = LOAD_LEVELS, **overrides: Any) -> list[Cell]:
    """Run every placement at every load; one cell per client kind (``overrides``: see
    :func:`suite_scenario`)."""
    cells = []
    for placement in placements:
        for load in loads:
            raw = suite_scenario(placement, load, seed=seed, requests=requests, **overrides)
            results = simulate(raw, selectors)
            for kind in CLIENT_KINDS:
                cells.append(Cell(placement, load, float(raw["rate_per_s"]), kind,
                                  {n: r.by_client.get(kind, Figures())
                                   for n, r in results.items()}))
    return cells


PATHS = ("mulambda-sdk", "mulambda-gateway")
NOISY = "noisy-oracle"


@dataclass
class Goal:
    """One goal in one cell, met or not: one of issue 11 (``plain`` False), or one against
    least-outstanding (``plain`` True; the oracle's are a reference, not a goal). The noisy
    oracle's, the same as each mulambda path's against the oracle, are what chance costs."""

    cell: Cell
    what: str
    value: float
    limit: float
    plain: bool = False

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    @property
    def reference(self) -> bool:
        return self.what.startswith("oracle ")

    @property
    def chance(self) -> bool:
        return self.what.startswith(f"{NOISY} ")


def goals(cells: list[Cell]) -> list[Goal]:
    """Issue 11's: medians and p95 of both mulambda paths within 1.25x the oracle's;
    mean accuracy within 5 % of the oracle's for balanced and accuracy-only clients;
    the gateway within 1.25x the SDK.

    Against the plain load-aware router, in what each client asked for: a lower p95
    for latency-only clients, a higher mean accuracy for accuracy-only ones, a higher
    mean utility (its preferences' score of each answer's latency and accuracy) for
    balanced ones; the oracle's own, as a reference. Not a higher accuracy for
    balanced clients: they trade accuracy for latency, and the oracle's accuracy
    was below least-outstanding's in cells where least-outstanding's p95 was twice
    the oracle's.

    The noisy oracle gets each path's goals against the oracle, as a yardstick: how many
    of them an error of ``Policy.latency_noise`` in every expected latency misses by
    itself."""
    out = []
    for cell in cells:
        f = cell.figures
        oracle = f.get("oracle")
        plain = f.get("least-outstanding")
        for path in (*PATHS, "oracle", NOISY):
            ours = f.get(path)
            if ours is None:
                continue
            if plain is not None and path != NOISY:
                out.append(_against_plain(cell, path, ours, plain))
            if oracle is None or path == "oracle":
                continue
            out.append(Goal(cell, f"{path} p50/oracle", ours.p50 / oracle.p50, 1.25))
            out.append(Goal(cell, f"{path} p95/oracle", ours.p95 / oracle.p95, 1.25))
            if cell.client != "latency":
                out.append(Goal(cell, f"{path} accuracy shortfall",
                                1 - ours.mean_accuracy / oracle.mean_accuracy, 0.05))
        sdk, gw = f.get("mulambda-sdk"), f.get("mulambda-gateway")
        if sdk is not None and gw is not None:
            out.append(Goal(cell, "gateway p50/sdk", gw.p50 / sdk.p50, 1.25))
            out.append(Goal(cell, "gateway p95/sdk", gw.p95 / sdk.p95, 1.25))
    return out


def _against_plain(cell: Cell, path: str, ours: Figures, plain: Figures) -> Goal:
    if cell.client == "latency":
        return Goal(cell, f"{path} p95/least-outstanding", ours.p95 / plain.p95, 1.0, True)
    if cell.client == "accuracy":
        return Goal(cell, f"{path} accuracy/least-outstanding (inverse)",
                    plain.mean_accuracy / ours.mean_accuracy, 1.0, True)
    return Goal(cell, f"{path} utility/least-outstanding (inverse)",
                plain.mean_utility / ours.mean_utility, 1.0, True)


def format_suite(cells: list[Cell]) -> str:
    """One line per cell and router: p50, p95, accuracy and the ratios to the oracle."""
    lines = [f"{'placement':<11}{'load':>5}{'rate/s':>8} {'client':<9}{'router':<18}"
             f"{'p50 ms':>9}{'p95 ms':>9}{'acc':>7}{'util':>7}{'p50/or':>8}{'p95/or':>8}"
             f"{'acc/or':>8}"]
    for cell in cells:
        oracle = cell.figures.get("oracle")
        for name, f in cell.figures.items():
            ratios = ("", "", "")
            if oracle is not None:
                ratios = (f"{f.p50 / oracle.p50:.2f}", f"{f.p95 / oracle.p95:.2f}",
                          f"{f.mean_accuracy / oracle.mean_accuracy:.3f}")
            lines.append(f"{cell.placement:<11}{cell.load:>5.2f}{cell.rate:>8.1f} "
                         f"{cell.client:<9}{name:<18}{f.p50:>9.1f}{f.p95:>9.1f}"
                         f"{f.mean_accuracy:>7.3f}{f.mean_utility:>7.3f}{ratios[0]:>8}{ratios[1]:>8}{ratios[2]:>8}")
    return "\n".join(lines)


def grouped(found: list[Goal]) -> tuple[list[Goal], list[Goal], list[Goal], list[Goal]]:
    """Issue 11's goals, ours against least-outstanding, the oracle's reference there, and
    the noisy oracle's yardstick."""
    return ([g for g in found if not g.plain and not g.chance],
            [g for g in found if g.plain and not g.reference],
            [g for g in found if g.plain and g.reference],
            [g for g in found if g.chance])


def format_goals(found: list[Goal]) -> str:
    issue, plain, oracle, chance = grouped(found)
    lines = [f"goals of issue 11: {_met(issue)} of {len(issue)} met"]
    lines += _missed(issue)
    if chance:
        per_path = [(p, [g for g in issue if g.what.startswith(f"{p} ")]) for p in PATHS]
        lines.append("the same goals against the oracle, per router: "
                     + "".join(f"{p} {_met(mine)} of {len(mine)}, "
                               for p, mine in per_path if mine)
                     + f"{NOISY} {_met(chance)} of {len(chance)} (every expected latency off "
                     f"by {DEFAULT_POLICY.latency_noise:.0%}: what chance alone misses)")
        lines += _missed(chance)
    lines.append(f"against least-outstanding: {_met(plain)} of {len(plain)} met (the oracle's "
                 f"choices: {_met(oracle)} of {len(oracle)})")
    lines += _missed(plain + oracle)
    return "\n".join(lines)


def _met(found: list[Goal]) -> int:
    return sum(g.met for g in found)


def _missed(found: list[Goal]) -> list[str]:
    return [f"  missed: {g.cell.placement} load {g.cell.load:g} {g.cell.client}: {g.what} "
            f"{g.value:.3f} > {g.limit:g}" for g in found if not g.met]
