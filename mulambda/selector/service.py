"""The selector's state per process (:class:`Selector`): caches, in-flight accounting,
measured service times, the gateway's HTTP session; its request bounds."""


from __future__ import annotations

import functools
import heapq
import json
import logging
import random
import time
import uuid
from dataclasses import replace

import aiohttp
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
)

from mulambda.bodies import JSON_HEADERS, MAX_ANSWER_BYTES
from mulambda.httpd import BodyTooLarge, read_at_most
from mulambda.policy.experiment import Experiment, experiment_ranking
from mulambda.policy.inflight import OwnRequests
from mulambda.policy.latency import ServiceTracker
from mulambda.policy.ranker import Ranker
from mulambda.policy.rollout import ArmChoice, route_view, sticky_draw
from mulambda.policy.selection import (
    Candidate,
    Criteria,
    Policy,
    Ranking,
    explained,
    overlay,
)
from mulambda.sdk.counting import InflightCounter
from mulambda.sdk.shadow import ShadowCopies, count_outcome
from mulambda.sdk.suspects import Suspects
from mulambda.sdk.waking import ColdStarts
from mulambda.store.leases import InflightLeases, InflightReader
from mulambda.store.metadata import (
    MetadataStore,
)
from mulambda.store.outcomes import OutcomeRecorder
from mulambda.store.reader import SharedSnapshot
from mulambda.store.records import Snapshot

from .answers import AnswerText, RequestBodies
from .caches import NO_SAMPLES, ClientViews, DemandQueue, MatchingViews
from .decisions import REJECTION_REASONS, Children, decision_reason, rejections
from .handshakes import Handshakes, Probe
from .inspector import BodyInspector

log = logging.getLogger("mulambda.selector")

STORE_KEY = web.AppKey("store", MetadataStore)
dumps_strict = functools.partial(json.dumps, allow_nan=False)

# An answered selection counts as in flight for its expected latency, at most this long.
VIRTUAL_INFLIGHT_MAX_SECONDS = 10.0
# Request bounds (mulambda.httpd): a /select body is a few hundred bytes; a gateway body
# is a TF Serving request (images: megabytes).
SELECT_MAX_BODY_BYTES = 64 << 10
GATEWAY_MAX_BODY_BYTES = 16 << 20
# An executor's answer is read whole before it is passed on: bounded (mulambda.bodies).
GATEWAY_MAX_ANSWER_BYTES = MAX_ANSWER_BYTES
HEADER_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT_SECONDS = 15.0
# Outcomes the handlers count (plus the gateway's http_4xx/http_5xx pass-through).
SELECT_OUTCOMES = ("selected", "no_match", "bad_request", "too_large", "body_timeout",
                   "store_unavailable", "error")
GATEWAY_OUTCOMES = ("ok", "no_match", "unknown_client", "bad_request", "too_large",
                    "body_timeout", "store_unavailable", "cold_start_timeout", "timeout",
                    "upstream_error", "answer_too_large", "all_failed", "error")
# Expected and measured latencies: from a warm sub-millisecond answer to a cold start.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)



class AnswerTooLarge(Exception):
    """An executor's answer is longer than ``max_answer_bytes``: the gateway's 502."""


class Selector:
    """State of one selector process: store, snapshot cache, own load and measurements."""

    def __init__(self, store: MetadataStore, cache_ttl: float, policy: Policy, *,
                 predict_timeout: float = 30.0, max_attempts: int = 3,
                 cold_start_timeout: float = 30.0, suspect_seconds: float = 5.0,
                 max_cached_clients: int = 1024, demand_interval: float = 0.5,
                 body_timeout: float = 15.0, max_body_bytes: int = GATEWAY_MAX_BODY_BYTES,
                 max_answer_bytes: int = GATEWAY_MAX_ANSWER_BYTES) -> None:
        self.store = store
        self.cache_ttl = cache_ttl
        self.policy = policy
        self.predict_timeout = predict_timeout
        self.max_attempts = max(1, max_attempts)
        self.cold_start_timeout = cold_start_timeout
        self.body_timeout = body_timeout
        self.max_body_bytes = max_body_bytes
        self.max_answer_bytes = max_answer_bytes
        self.inspector = BodyInspector()
        self.instance = f"selector-{uuid.uuid4().hex[:12]}"
        self.shared = SharedSnapshot(store, cache_ttl, self.instance, self._refreshed)
        self.clients = ClientViews(store, cache_ttl, max_clients=max_cached_clients)
        self.matching = MatchingViews()
        self.ranker = Ranker(policy)
        self.tracker = ServiceTracker(policy.fit)
        self.leases = InflightLeases(store, self.instance, service=self.tracker)
        # Executors asked to wake: their cold starts, measured when they come up.
        self.cold = ColdStarts(self.tracker, timeout=cold_start_timeout,
                               published=self.leases.kick, name=self.instance)
        # Everybody else's measured service times come with each fresh read, as the SDK's
        # do: fitted on the snapshot's (up to cache_ttl old) the stays were predicted
        # too long and requests counted ahead after they were served (docs/design.md).
        self.load = InflightReader(store, self.instance, service=True)
        # Own requests (forwarded ones, and /select answers while they last): when sent,
        # how long they should stay at the executor.
        self.own = OwnRequests()
        self.counter = InflightCounter(self.tracker, self.own, self.leases)
        self.suspects = Suspects(suspect_seconds)
        self.handshakes = Handshakes()
        self.rng = random.Random()
        self._virtual: list[tuple[float, int]] = []  # (monotonic expiry, own token) heap
        self.http: aiohttp.ClientSession | None = None
        # Rollouts and experiments: per-arm outcomes, shadow copies (mulambda.sdk.shadow).
        self.outcomes = OutcomeRecorder(store)
        self.shadows = ShadowCopies(self.outcomes, timeout=predict_timeout)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mulambda_selector_requests", "Selection requests by outcome",
            ["outcome"], registry=self.registry,
        )
        self.predictions = Counter(
            "mulambda_gateway_requests", "Gateway predictions by outcome",
            ["outcome"], registry=self.registry,
        )
        self.latency = Histogram(
            "mulambda_selector_selection_seconds", "Time to answer a selection request",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.gateway_latency = Histogram(
            "mulambda_gateway_seconds", "Time to answer a prediction through the gateway",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.demand = DemandQueue(store, self.registry, interval=demand_interval)
        self.refreshes = Counter(
            "mulambda_selector_snapshot_refreshes", "Shared snapshots read from the store",
            registry=self.registry)
        self.decisions = Counter(
            "mulambda_selector_decisions", "Selections (and gateway routings) by the chosen "
            "executor and why it won (mulambda.selector.decisions)", ["executor", "reason"],
            registry=self.registry)
        self.rejections = Counter(
            "mulambda_selector_rejections", "Executors left out of a selection, by why",
            ["reason"], registry=self.registry)
        self.scores = Histogram(
            "mulambda_selector_score", "Score of the chosen executor, in [0, 1]", ["executor"],
            buckets=tuple(i / 10 for i in range(1, 11)), registry=self.registry)
        self.expected = Histogram(
            "mulambda_selector_expected_latency_seconds", "Latency the selection expected "
            "of the chosen executor (network + service + load, + cold start when cold)",
            ["executor"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upstream = Histogram(
            "mulambda_gateway_upstream_seconds", "Response time of the executor to a "
            "forwarded prediction, by executor", ["executor"], buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self.client_latency = Histogram(
            "mulambda_gateway_client_seconds", "Time to answer a gateway prediction, by "
            "registered client (unregistered callers share one label value)", ["client"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        # Known label values start at zero, so a dashboard shows 0, not "no data", until
        # the first one happens (Prometheus' "avoid missing metrics").
        for outcome in SELECT_OUTCOMES:
            self.requests.labels(outcome=outcome)
        for outcome in GATEWAY_OUTCOMES:
            self.predictions.labels(outcome=outcome)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        # What every /select answer touches, kept: its metrics' children, the text of
        # its candidates, its decoded body and criteria (together more than ranking).
        self.outcome_count = Children(self.requests)
        self.decision_count = Children(self.decisions)
        self.score_seen = Children(self.scores)
        self.expected_seen = Children(self.expected)
        self.rejection_count = Children(self.rejections)
        self.answers = AnswerText()
        self.bodies = RequestBodies()

    def count_decision(self, ranking: Ranking, chosen: Candidate, *,
                       failover: bool = False) -> None:
        """Count a decision: the chosen executor and why, its score and expected latency,
        and why the others were left out."""
        executor = chosen.executor_id
        self.decision_count(executor, decision_reason(ranking, chosen, failover=failover)).inc()
        self.score_seen(executor).observe(chosen.score)
        self.expected_seen(executor).observe(chosen.expected_latency_ms / 1000)
        # Those the hard criteria left out (tallied once per snapshot), then the ranking's.
        for reason, n in self.matching.left_out(ranking.criteria).items():
            self.rejection_count(reason).inc(n)
        if ranking.rejected:
            for reason, n in rejections(ranking).items():
                self.rejection_count(reason).inc(n)

    # -- background store writes ---------------------------------------------------
    def note_demand(self, executors: list[str], cold: list[str] | None = None) -> None:
        """Record demand without making the caller wait for the store (queued, written
        in batches); ``cold`` ones (asked to wake) have their cold start measured when
        they come up."""
        self.cold.ask(cold or [])
        self.demand.add(executors)

    async def close(self) -> None:
        self.shared.close()
        self.clients.close()
        await self.demand.close()
        await self.leases.close()
        await self.shadows.close()
        await self.outcomes.close()
        self.load.close()
        if self.http is not None:
            await self.http.close()

    # -- snapshots -------------------------------------------------------------------
    async def view(self, client: str, fresh: bool = False) -> Snapshot:
        """Snapshot for ``client``: the shared part (one for all clients, at most
        ``cache_ttl`` old, refreshed single-flight) with the client's own part (its
        latency samples and registered record, cached in a bounded LRU). This
        process's leases and measurements are left out (:meth:`ranking` adds them).
        ``fresh``: both parts read after this call started (or joined a read in
        progress)."""
        max_age = 0.0 if fresh else None
        # One after the other: both are nearly always cached, and gathering them would
        # make two tasks per request for nothing (a miss costs one more round trip).
        shared = await self.shared.get(max_age)
        latency, record = await self.clients.get(client, max_age)
        return replace(shared, latency=latency, client_record=record)

    def _refreshed(self, snap: Snapshot) -> None:
        self.refreshes.inc()
        self.cold.note_woken(snap)

    async def ranking(self, criteria: Criteria, snap: Snapshot, *, items: int = 1,
                      replicas: bool = False) -> Ranking:
        """Rank :meth:`loaded` ``snap``, near-equal candidates spread."""
        view, _ = self.matching.get(criteria, snap)
        found = self.ranker.rank(criteria, await self.loaded(view), items=items, rng=self.rng,
                                 replicas=replicas, now=time.time(), key=_key(view))
        return found or explained(found, snap)

    async def routed(self, criteria: Criteria, snap: Snapshot, *, items: int = 1,
                     key: str | None = None, force_stable: frozenset[str] = frozenset(),
                     ) -> tuple[Ranking, dict[str, ArmChoice], Experiment | None]:
        """The gateway's ranking with rollout arms chosen (``force_stable``: executors
        whose new version just failed this request) and the client's experiment arm
        first; the arms chosen, and the experiment (mulambda.policy.rollout)."""
        def draw(salt: str) -> float:
            return sticky_draw(key, salt) if key is not None else self.rng.random()

        matching, _ = self.matching.get(criteria, snap)
        view, arms = route_view(self.suspects.view(await self.loaded(matching)), snap, draw,
                                force_stable)
        ranking = self.ranker.rank(criteria, view, items=items, rng=self.rng, replicas=True,
                                   now=time.time(), key=_key(matching))
        if not ranking:
            return explained(ranking, snap), arms, None
        ranking, experiment = experiment_ranking(ranking, snap.client_record, draw)
        return ranking, arms, experiment

    def count_outcome(self, candidate: Candidate, arms: dict[str, ArmChoice],
                      experiment: Experiment | None, status: int | None, ms: float,
                      body: bytes, payload: bytes) -> None:
        """Count a forwarded request for its rollout and experiment arms (``status`` None:
        no answer); copy an answered one to a Shadow rollout's candidate."""
        ok = status is not None and status < 500
        count_outcome(self.outcomes, candidate.executor_id, arms, experiment, ok=ok, ms=ms)
        choice = arms.get(candidate.executor_id)
        if status != 200 or choice is None or not choice.shadow:
            return
        try:
            baseline = json.loads(payload)["predictions"]
        except (ValueError, KeyError, TypeError):
            return
        self.shadows.send(choice, candidate.record.model, body, baseline, self.rng.random())

    async def loaded(self, snap: Snapshot) -> Snapshot:
        """``snap`` with this process's own requests in flight and measurements added, and
        everybody else's requests in flight and measurements read fresh: what a decision
        ranks."""
        now = time.monotonic()
        while self._virtual and self._virtual[0][0] <= now:
            self.own.remove(heapq.heappop(self._virtual)[1])
        others = await self.load.read()
        own, own_pods = self.own.ahead(now * 1000)
        return overlay(snap, own_inflight=own, replica_inflight=own_pods,
                       service=self.counter.measurements(), own_late=self.own.late(now * 1000),
                       inflight=others.counts if others is not None else None,
                       inflight_requests=others.timed if others is not None else None,
                       others_service=others.service if others is not None else None)

    def count_selection(self, candidate: Candidate) -> None:
        """A /select answer: one request of ours on its way, for its expected latency."""
        seconds = min(candidate.expected_latency_ms / 1000, VIRTUAL_INFLIGHT_MAX_SECONDS)
        now = time.monotonic()
        token = self.own.add(candidate.executor_id, None, now * 1000,
                             candidate.service_ms + candidate.load_ms, candidate.network_ms)
        heapq.heappush(self._virtual, (now + seconds, token))

    # -- forwarding ------------------------------------------------------------------
    async def forward(self, candidate: Candidate, body: bytes, items: int) -> tuple[
        int, bytes, str
    ]:
        """POST ``body`` to the candidate, counted in flight; (status, body, content type).

        Raises aiohttp errors, TimeoutError and :class:`AnswerTooLarge`; a 200 feeds the
        service-time model.
        """
        assert self.http is not None
        executor = candidate.executor_id
        url = f"{candidate.url.rstrip('/')}/v1/models/{candidate.record.model}:predict"
        # Counted as the SDK counts its requests (mulambda.sdk.counting).
        probe = Probe()
        with self.counter.count(candidate, items) as request:
            async with self.http.post(
                url, data=body, headers=JSON_HEADERS,
                timeout=aiohttp.ClientTimeout(total=self.predict_timeout,
                                              sock_connect=min(5.0, self.predict_timeout)),
                trace_request_ctx=probe,
            ) as resp:
                try:
                    payload = await read_at_most(resp.content, resp.content_length,
                                                 self.max_answer_bytes, "executor answer")
                except BodyTooLarge as exc:
                    raise AnswerTooLarge(str(exc)) from None
                status, ctype = resp.status, resp.headers.get("Content-Type",
                                                              "application/json")
            elapsed_ms = request.elapsed_ms()
            self.upstream.labels(executor=executor).observe(elapsed_ms / 1000)
            if status == 200:
                # On the wire, less the gateway's own round trip to the replica, not the
                # client's.
                request.answered(probe.wire.ms(), self.handshakes.network_ms(probe))
            return status, payload, ctype


def _key(view: Snapshot) -> str:
    """The Ranker's key for a client's view: its own for a client with latency samples
    (ClientViews keeps one dict of them per client; while the Ranker keeps an entry, it
    holds that dict, so its id cannot be another's), one shared by every client without."""
    return "" if view.latency is NO_SAMPLES else str(id(view.latency))


SELECTOR_KEY = web.AppKey("selector", Selector)
