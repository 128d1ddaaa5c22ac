"""``mulambda simulate``: replay one request stream through several routers.

A discrete-event simulation (milliseconds, seeded, no I/O) of:

* **nodes** and the round-trip network delay between them (``network_ms``,
  symmetric; a missing pair falls back to ``default_network_ms``);
* **models** with a true service time, per request::

      ((service_ms + per_item_ms * items + per_concurrent_ms * busy)
       * (1 + slowdown * busy) * lognormal(jitter)) + uniform(0, jitter_ms)

  where ``busy`` is the number of requests already running on the replica
  when it starts. ``concurrency`` is the number of slots per replica
  (requests beyond them queue FIFO); 0 runs every request at once. What the
  operator publishes as ``serviceTimeMs`` is ``declared_ms`` (default
  ``service_ms``): the routers that use it get only the base time;
* **executors**: a model on one or more nodes (one replica per entry);
* **clients** on nodes with preferences (``latency``/``accuracy`` weights,
  optional ``max_latency_ms``), a share of the traffic, a request size
  (``items``, or uniform in ``[items, items_max]``) and a number of SDK
  processes (``instances``);
* a **request stream**: Poisson arrivals at ``rate_per_s``, the client of
  each request drawn by share, the jitter draws and the size, all from
  ``seed``. Every router sees exactly the same stream.

Routers:

* ``mulambda-sdk`` -- each client's ``instances`` SDK processes run
  :func:`mulambda.policy.selection.rank` (``replicas=True``) on their own
  view: their own requests in flight and measurements exact, everybody
  else's read fresh from the store for each decision (a decision while a
  read is on its way joins it; ``load_ttl_ms`` > 0 shares a read for that
  long, as the gateway's 2 ms ``gateway_load_ttl_ms``; each read delays its
  request by ``store_rtt_ms``, 0.5 ms; ``load_ttl_ms`` < 0: from a store
  snapshot refreshed every ``snapshot_ttl_ms``, the SDK's cache, 1 s),
  service times learned only from answered requests
  (:class:`mulambda.policy.latency.ServiceTracker`), starting from the
  declared times. Requests go straight from the client to the replica.
* ``mulambda-gateway`` -- the same ranking in ``gateways`` selector
  processes on ``gateway_node`` (default: the first client's node) with a
  ``gateway_cache_ms`` (0.5 s) snapshot (the other gateways' requests in
  flight read fresh, their measurements from the snapshot, as the selector
  does): requests go client -> gateway ->
  replica and back, plus ``gateway_overhead_ms`` each way.
* ``oracle`` -- knows every model's true parameters and every replica's
  true state (running, queued, on the way to it) and scores the true
  expected latency with mulambda's scoring (same utilities, same ceiling):
  the best a router with this objective can do request by request.
* ``noisy-oracle`` -- the oracle with every expected latency off by a
  lognormal error of ``Policy.latency_noise`` (10 %), drawn per candidate and
  decision from the router seed: nothing to learn, only an error of the size
  mulambda takes its own to be. What it misses of the goals against the
  oracle is what chance alone misses (the suite prints it beside each
  mulambda path).
* ``least-outstanding`` -- the replica with the fewest requests in flight
  (join-shortest-queue over all replicas of the type; ties: lower RTT).
* ``prototype`` -- the MuLambda prototype's scorer: latency = RTT +
  declared service time normalised into buckets (30, 60, 90, 150, 240,
  390, 630, 1020, 1650 ms -> 1 - bucket/9), accuracy / best accuracy,
  weighted sum; no load.
* ``round-robin``, ``random`` (seeded) and ``lowest-network`` (the executor
  with the smallest mean RTT to the client) over matching executors.

Routers other than mulambda's send to the executor's Service, which spreads
over its replicas round-robin. The first ``warmup`` fraction of the stream
(default 10 %) is left out of every router's figures: mulambda starts from
the declared times and learns, the figures are about the steady state.

Output per router: median, p95 and mean latency (client -> model -> client,
including queueing) and mean accuracy of the models used, overall and per
client. ``--suite`` runs the experiment of issue 11 instead: see
:func:`suite`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mulambda.cliargs import positive_int, positive_seconds

from ..plots import PlotsUnavailable, SelectorPoint, plot_selectors
from .experiment import (
    LOAD_LEVELS,
    PLACEMENTS,
    Cell,
    format_goals,
    format_suite,
    goals,
    grouped,
    suite,
)
from .routers import simulate
from .world import DEFAULT_SCENARIO, SELECTORS, Figures, SelectorResult, finite

log = logging.getLogger("mulambda.simulate")


def format_table(results: dict[str, SelectorResult]) -> str:
    lines = [f"{'selector':<18}{'client':<12}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}"
             f"{'accuracy':>10}  used"]
    for r in results.values():
        used = ", ".join(f"{k}={v}" for k, v in sorted(r.used.items()))
        lines.append(f"{r.selector:<18}{'(all)':<12}{r.p50:>9.1f}{r.p95:>9.1f}{r.mean:>9.1f}"
                     f"{r.mean_accuracy:>10.3f}  {used}")
        if len(r.by_client) > 1:
            for name, f in sorted(r.by_client.items()):
                lines.append(f"{'':<18}{name:<12}{f.p50:>9.1f}{f.p95:>9.1f}{f.mean:>9.1f}"
                             f"{f.mean_accuracy:>10.3f}")
    return "\n".join(lines)


def _point(f: Figures) -> SelectorPoint:
    return SelectorPoint(f.p50, f.p95, f.mean_accuracy)


def plot_suite(cells: list[Cell], folder: Path) -> Path:
    """The suite's picture: per client kind, each router's latency and accuracy over the
    placement x load scenarios."""
    groups: dict[str, dict[str, dict[str, SelectorPoint]]] = {}
    for c in cells:
        scenario = f"{c.placement} @ {c.load:g}"
        groups.setdefault(f"{c.client} clients", {})[scenario] = {
            router: _point(f) for router, f in c.figures.items()}
    return plot_selectors(groups, folder / "simulate-suite.png",
                          title="Routers per client kind over placements @ load "
                                "(fraction of capacity)")


def plot_scenario(results: dict[str, SelectorResult], name: str, folder: Path) -> Path:
    """One scenario's picture: each router's latency and accuracy, overall and per client."""
    clients = sorted({c for r in results.values() for c in r.by_client})
    scenarios: dict[str, dict[str, SelectorPoint]] = {
        "(all)": {r.selector: _point(r) for r in results.values()}}
    for client in clients:
        scenarios[client] = {r.selector: _point(r.by_client[client])
                             for r in results.values() if client in r.by_client}
    return plot_selectors({f"scenario {name}": scenarios}, folder / "simulate.png",
                          title="Routers compared, overall and per client", connect=False)


def load_scenario(path: str) -> dict[str, Any]:
    """Read a YAML or JSON scenario file; ValueError (one line, exit 2) when it cannot be
    read, does not parse, or is not a mapping."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the scenario {path}: {exc}") from None
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml  # only needed for YAML scenarios

            raw = yaml.safe_load(text)
    except Exception as exc:
        raise ValueError(f"the scenario {path} does not parse: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"the scenario {path} must be a mapping of settings, "
                         f"not {type(raw).__name__}")
    return raw


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mulambda simulate``."""
    parser.add_argument("--scenario", help="YAML or JSON scenario file (default: built in)")
    parser.add_argument("--suite", action="store_true",
                        help="run the issue-11 experiment: placements x loads x client kinds")
    parser.add_argument("--seed", type=int, help="override the scenario's (or suite's) seed")
    parser.add_argument("--router-seed", type=int,
                        help="seed of the routers' own draws (default: --seed); the stream "
                             "and the world stay those of --seed, so what moves with it is "
                             "chance")
    parser.add_argument("--requests", type=positive_int, help="override the number of requests")
    parser.add_argument("--rate", type=positive_seconds, metavar="RATE",
                        help="override requests per second")
    parser.add_argument("--selectors", help=f"comma-separated subset of {','.join(SELECTORS)}")
    parser.add_argument("--placements", help=f"suite: comma-separated subset of "
                        f"{','.join(PLACEMENTS)}")
    parser.add_argument("--loads", help="suite: comma-separated loads (fractions of capacity)")
    parser.add_argument("--feedback-interval-ms", "--snapshot-ttl-ms", dest="snapshot_ttl_ms",
                        type=float, help="override the SDK snapshot's refresh interval")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="DIR", type=Path,
                        help="also draw latency and accuracy per router and scenario into "
                             "DIR/simulate.png (DIR/simulate-suite.png with --suite; needs "
                             "matplotlib, extra plots)")
    parser.add_argument("--print-default", action="store_true",
                        help="print the built-in scenario as JSON and exit")


def run(args: argparse.Namespace) -> int:
    """Simulate and write the comparison to stdout (the command's output, not a log)."""
    if args.print_default:
        sys.stdout.write(json.dumps(DEFAULT_SCENARIO, indent=2) + "\n")
        return 0
    selectors = tuple(args.selectors.split(",")) if args.selectors else SELECTORS
    try:
        overrides = {key: value for key, value in (
            ("router_seed", args.router_seed), ("snapshot_ttl_ms", args.snapshot_ttl_ms))
            if value is not None}
        if args.suite:
            cells = suite(seed=args.seed if args.seed is not None else 11,
                          requests=args.requests or 3000, selectors=selectors,
                          placements=(tuple(args.placements.split(",")) if args.placements
                                      else PLACEMENTS),
                          loads=(tuple(float(x) for x in args.loads.split(",")) if args.loads
                                 else LOAD_LEVELS), **overrides)
        else:
            raw = load_scenario(args.scenario) if args.scenario else dict(DEFAULT_SCENARIO)
            for key, value in (("seed", args.seed), ("requests", args.requests),
                               ("rate_per_s", args.rate), *overrides.items()):
                if value is not None:
                    raw[key] = value
            results = simulate(raw, selectors)
    except ValueError as exc:
        log.error("scenario rejected error=%s", exc)
        return 2
    if args.plot is not None:
        try:
            picture = (plot_suite(cells, args.plot) if args.suite
                       else plot_scenario(results, args.scenario or "built-in", args.plot))
        except PlotsUnavailable as exc:
            log.error("%s", exc)
            return 2
        log.info("wrote %s", picture)
    if args.suite:
        found = goals(cells)
        if args.json:
            rows = [{"placement": c.placement, "load": c.load, "rate_per_s": c.rate,
                     "client": c.client, "router": n,
                     "p50_ms": finite(f.p50, 2), "p95_ms": finite(f.p95, 2),
                     "mean_accuracy": finite(f.mean_accuracy, 4),
                     "mean_utility": finite(f.mean_utility, 4)}
                    for c in cells for n, f in c.figures.items()]
            issue, plain, oracle, chance = grouped(found)
            sys.stdout.write(json.dumps({
                "cells": rows, "goals_met": sum(g.met for g in issue), "goals": len(issue),
                "plain_goals_met": sum(g.met for g in plain), "plain_goals": len(plain),
                "oracle_plain_met": sum(g.met for g in oracle),
                "noisy_oracle_goals_met": sum(g.met for g in chance),
                "noisy_oracle_goals": len(chance)}, indent=2) + "\n")
        else:
            sys.stdout.write(format_suite(cells) + "\n" + format_goals(found) + "\n")
        return 0
    if args.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in results.values()], indent=2) + "\n")
    else:
        sys.stdout.write(
            f"scenario: {args.scenario or 'built-in'}, seed {raw.get('seed')}, "
            f"{raw['requests']} requests at {raw['rate_per_s']}/s\n"
        )
        sys.stdout.write(format_table(results) + "\n")
    return 0
