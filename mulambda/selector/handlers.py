"""The HTTP routes: ``POST /select/NAMESPACE/NAME``, the gateway's
``POST /v1/predict/NAMESPACE/NAME``, ``/healthz`` and ``/metrics``."""


from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)

from mulambda.bodies import loads_guarded
from mulambda.httpd import BodyTimeout, BodyTooLarge, read_body, refuse
from mulambda.policy.experiment import Experiment, assignment_key
from mulambda.policy.explain import explain
from mulambda.policy.rollout import CANDIDATE
from mulambda.policy.selection import (
    Candidate,
    Criteria,
)
from mulambda.sdk.suspects import pod_of
from mulambda.store.records import ClientRecord, StoreUnavailable

from .answers import CANDIDATES_SHOWN
from .service import (
    SELECT_MAX_BODY_BYTES,
    SELECTOR_KEY,
    STORE_KEY,
    AnswerTooLarge,
    Selector,
    dumps_strict,
)

log = logging.getLogger("mulambda.selector")

def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None
          ) -> web.Response:
    """A strict JSON answer: a non-finite number is a bug, answered as 500, never ``NaN``."""
    try:
        text = dumps_strict(data)
    except ValueError as exc:
        return _not_json(exc, headers)
    return web.Response(text=text, status=status, content_type="application/json",
                        headers=headers)


def _not_json(exc: ValueError, headers: Mapping[str, str] | None = None) -> web.Response:
    """The 500 for an answer that holds a non-finite number (a bug, never ``NaN``)."""
    log.error("answer not representable as JSON error=%s", exc)
    return web.Response(
        text=dumps_strict({"error": "internal error: non-finite number in answer"}),
        status=500, content_type="application/json", headers=headers)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status=status)


def _unavailable(message: str, **extra: Any) -> web.Response:
    """503 worth retrying at once: the store reconnects, an activation goes on (a retry
    to the gateway waits for it again), as the selector's own reviews say (authz.py)."""
    return _json({"error": message, **extra}, status=503, headers={"Retry-After": "1"})


def _bad_body(exc: Exception) -> tuple[str, web.Response]:
    """(outcome, answer) for a body that cannot be used: 413, 408 (both close the
    connection: the body was not read to its end) or 400; never a traceback."""
    if isinstance(exc, BodyTooLarge):
        return "too_large", refuse(413, str(exc))
    if isinstance(exc, BodyTimeout):
        return "body_timeout", refuse(408, str(exc))
    return "bad_request", _error(400, f"body is not valid JSON: {exc}")


def _criteria(body: Any, record: ClientRecord | None) -> Criteria:
    """Criteria from a request body and the registered client; ValueError when bad."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    required = body.get("required") or {}
    desired = body.get("desired") or {}
    if not isinstance(required, dict) or not isinstance(desired, dict):
        raise ValueError("required and desired must be JSON objects")
    length = body.get("data_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length < 0):
        raise ValueError("data_length must be a non-negative integer")
    base = record.criteria if record is not None else None
    if base is None and not required.get("type"):
        raise ValueError("required.type is missing and the client is not registered")
    return Criteria.from_request(required, desired, base)


_QUERY_NUMBERS = {"latency": "desired", "accuracy": "desired", "max_latency_ms": "required",
                  "min_accuracy": "required"}
_QUERY_TEXT = ("type", "input", "output", "cold_start")


def _query_criteria(query: Mapping[str, str], record: ClientRecord | None) -> Criteria:
    """Criteria of a gateway request: the registered client, overridden by the query."""
    required: dict[str, Any] = {k: query[k] for k in _QUERY_TEXT if query.get(k)}
    desired: dict[str, Any] = {}
    for name, where in _QUERY_NUMBERS.items():
        if query.get(name):
            try:
                value = float(query[name])
            except ValueError:
                raise ValueError(f"query parameter {name} must be a number") from None
            (required if where == "required" else desired)[name] = value
    base = record.criteria if record is not None else None
    return Criteria.from_request(required, desired, base)


def _decode(raw: bytes) -> Any:
    """A ``/select`` body decoded (empty: no fields); ValueError when it is not JSON."""
    return loads_guarded(raw) if raw.strip() else {}


async def select(request: web.Request) -> web.Response:
    sel = request.app[SELECTOR_KEY]
    started = time.perf_counter()
    client = unquote(request.match_info["client"])
    outcome = "error"
    try:
        try:
            raw = await read_body(request, min(SELECT_MAX_BODY_BYTES, sel.max_body_bytes),
                                  sel.body_timeout)
            body = sel.bodies.parse(raw, _decode)
        except (BodyTooLarge, BodyTimeout, ValueError) as exc:
            outcome, answer = _bad_body(exc)
            return answer
        try:
            snap = await sel.view(client)
        except StoreUnavailable as exc:
            outcome = "store_unavailable"
            log.warning("selection failed client=%s error=%s", client, exc)
            return _unavailable("metadata store unavailable")
        try:
            criteria = body.criteria(snap.client_record, _criteria)
        except ValueError as exc:
            outcome = "bad_request"
            return _error(400, str(exc))
        ranking = await sel.ranking(criteria, snap)
        if not ranking:
            outcome = "no_match"
            reason = ranking.explain()
            log.info("no match client=%s reason=%r", client, reason)
            return _error(404, "no matching model", reason=reason)
        best = ranking[0]
        sel.count_decision(ranking, best)
        if best.warm:
            sel.count_selection(best)
        sel.note_demand([best.executor_id, *ranking.wake], ranking.wake)
        outcome = "selected"
        # Every decision is counted in /metrics (decisions by executor and reason); a log
        # line per request would cost more than the selection at a thousand a second.
        log.debug("selected client=%s executor=%s score=%.3f warm=%s", client,
                  best.executor_id, best.score, best.warm)
        try:
            text = sel.answers.answer(best, ranking[:CANDIDATES_SHOWN])
        except ValueError as exc:
            outcome = "error"  # answered 500, not a selection
            return _not_json(exc)
        return web.Response(text=text, content_type="application/json")
    finally:
        sel.outcome_count(outcome).inc()
        sel.latency.observe(time.perf_counter() - started)


async def _warm_candidate(sel: Selector, criteria: Criteria, client: str, executor: str,
                          items: int) -> Candidate | None:
    """Wait for a cold executor to get a live replica (demand was signalled); None on
    timeout. The store may be away for part of the wait: StoreUnavailable only when it
    still was at the end."""
    deadline = time.monotonic() + sel.cold_start_timeout
    down: StoreUnavailable | None = None
    while time.monotonic() < deadline:
        try:
            snap = await sel.view(client, fresh=True)
            ranking = await sel.ranking(criteria, snap, items=items, replicas=True)
        except StoreUnavailable as exc:
            down = exc
        else:
            down = None
            for c in ranking:
                if c.executor_id == executor and c.warm:
                    return c
        await asyncio.sleep(0.5)
    if down is not None:
        raise down
    return None


async def predict(request: web.Request) -> web.StreamResponse:
    sel = request.app[SELECTOR_KEY]
    started = time.perf_counter()
    client = f"{request.match_info['namespace']}/{request.match_info['client']}"
    outcome = "error"
    # A label per registered client only: callers could invent names without end.
    client_label = "unregistered"
    try:
        try:
            body = await read_body(request, sel.max_body_bytes, sel.body_timeout)
        except (BodyTooLarge, BodyTimeout) as exc:
            outcome, answer = _bad_body(exc)
            return answer
        try:
            snap = await sel.view(client)
        except StoreUnavailable as exc:
            outcome = "store_unavailable"
            log.warning("prediction failed client=%s error=%s", client, exc)
            return _unavailable("metadata store unavailable")
        if snap.client_record is not None:
            client_label = client
        if snap.client_record is None and not request.query.get("type"):
            outcome = "unknown_client"
            return _error(404, "unknown client", reason=f"client {client!r} is not registered "
                          "and the query gives no type")
        try:
            criteria = _query_criteria(request.query, snap.client_record)
        except ValueError as exc:
            outcome = "bad_request"
            return _error(400, str(exc))
        configured = Experiment.of(
            snap.client_record.experiment if snap.client_record is not None else None)
        try:
            # After the client is known: no decoding for names nobody registered.
            items, body_key, _ = await sel.inspector.inspect(
                body, configured.field if configured is not None else None)
        except (BodyTooLarge, ValueError) as exc:
            outcome, answer = _bad_body(exc)
            return answer
        attempts: list[dict[str, str]] = []
        tried: set[tuple[str, str]] = set()  # (executor, pod): another replica may serve
        stable_only: set[str] = set()  # executors whose new version failed this request
        key = assignment_key(request.headers, body_key, configured)
        while len(attempts) < sel.max_attempts:
            ranking, arms, experiment = await sel.routed(
                criteria, snap, items=items, key=key, force_stable=frozenset(stable_only))
            if not ranking and not attempts:
                outcome = "no_match"
                return _error(404, "no matching model", reason=ranking.explain())
            left = [c for c in ranking if (c.executor_id, pod_of(c)) not in tried]
            healthy = [c for c in left if c not in sel.suspects] or left
            if not healthy:
                break
            warm = [c for c in healthy if c.warm]
            if ranking.wake:
                sel.note_demand(ranking.wake, ranking.wake)
            if warm and (criteria.cold_start == "UseWarm" or healthy[0].warm):
                candidate = warm[0]
                sel.count_decision(ranking, candidate, failover=bool(attempts))
            else:
                cold = healthy[0]
                sel.count_decision(ranking, cold, failover=bool(attempts))
                sel.note_demand([cold.executor_id], [cold.executor_id])
                try:
                    found = await _warm_candidate(sel, criteria, client, cold.executor_id,
                                                  items)
                except StoreUnavailable as exc:
                    outcome = "store_unavailable"
                    log.warning("prediction failed client=%s error=%s", client, exc)
                    return _unavailable("metadata store unavailable",
                                        executor=cold.executor_id)
                if found is None:
                    outcome = "cold_start_timeout"
                    return _unavailable("cold start not done", executor=cold.executor_id,
                                        waited_seconds=sel.cold_start_timeout)
                candidate = found
            arm = arms.get(candidate.executor_id)
            if arm is not None and arm.arm == CANDIDATE:
                stable_only.add(candidate.executor_id)  # a retry goes to the stable arm
            else:
                tried.add((candidate.executor_id, pod_of(candidate)))
            sent = time.perf_counter()
            try:
                status, payload, ctype = await sel.forward(candidate, body, items)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                sel.count_outcome(candidate, arms, experiment, None,
                                  (time.perf_counter() - sent) * 1000, body, b"")
                attempts.append({"executor": candidate.executor_id,
                                 "error": f"connect failed: {exc}"})
                sel.suspects.add(candidate)
                continue
            except TimeoutError:
                outcome = "timeout"
                return _error(504, "executor timed out", executor=candidate.executor_id,
                              timeout_seconds=sel.predict_timeout)
            except AnswerTooLarge as exc:
                outcome = "answer_too_large"
                return _error(502, "executor answer too large", executor=candidate.executor_id,
                              detail=str(exc))
            except aiohttp.ClientError as exc:
                outcome = "upstream_error"
                return _error(502, "executor connection failed", executor=candidate.executor_id,
                              detail=str(exc))
            sel.count_outcome(candidate, arms, experiment, status,
                              (time.perf_counter() - sent) * 1000, body, payload)
            if status == 503 or (status >= 500 and arm is not None and arm.arm == CANDIDATE):
                attempts.append({"executor": candidate.executor_id, "error": f"HTTP {status}"})
                sel.suspects.add(candidate)
                continue
            outcome = "ok" if status == 200 else f"http_{status // 100}xx"
            headers = {
                "X-Mulambda-Executor": candidate.executor_id,
                "X-Mulambda-Attempts": str(len(attempts) + 1),
            }
            if candidate.replica is not None:
                headers["X-Mulambda-Replica"] = candidate.replica.pod
            return web.Response(body=payload, status=status, headers=headers,
                                content_type=ctype.split(";")[0].strip() or None)
        outcome = "all_failed"
        log.warning("all candidates failed client=%s attempts=%s", client, attempts)
        return _error(502, "all candidates failed", attempts=attempts)
    finally:
        sel.predictions.labels(outcome=outcome).inc()
        elapsed = time.perf_counter() - started
        sel.gateway_latency.observe(elapsed)
        sel.client_latency.labels(client=client_label).observe(elapsed)


async def explain_client(request: web.Request) -> web.Response:
    """``GET /v1/explain/NAMESPACE/NAME``: the ranking as this process would route now
    (mulambda.policy.explain), without spreading near-equal candidates (it names them);
    the query overrides the registered criteria as the gateway's does. Reads only."""
    sel = request.app[SELECTOR_KEY]
    client = f"{request.match_info['namespace']}/{request.match_info['client']}"
    try:
        snap = await sel.view(client)
    except StoreUnavailable as exc:
        log.warning("explain failed client=%s error=%s", client, exc)
        return _unavailable("metadata store unavailable")
    if snap.client_record is None and not request.query.get("type"):
        return _error(404, "unknown client", reason=f"client {client!r} is not registered "
                      "and the query gives no type")
    try:
        criteria = _query_criteria(request.query, snap.client_record)
    except ValueError as exc:
        return _error(400, str(exc))
    found = explain(criteria, await sel.loaded(snap), client=client, policy=sel.policy,
                    now=time.time())
    return _json(found.to_dict())


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE_KEY].ping()
    except StoreUnavailable as exc:
        return _unavailable("metadata store unavailable", detail=str(exc))
    return _json({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    sel = request.app[SELECTOR_KEY]
    return web.Response(body=generate_latest(sel.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})
