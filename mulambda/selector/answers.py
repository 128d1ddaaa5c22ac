"""The text of a ``/select`` answer, from parts kept per candidate (:class:`AnswerText`),
and request bodies decoded once per distinct bytes (:class:`RequestBodies`).

A ``/select`` answer names the chosen executor and the first five
candidates, each with its reason. Between two answers nearly all of them
are the same, but formatting a reason and encoding the answer cost more
than ranking it (about a tenth of the selector's CPU per request, measured
with bench/selector_load.py). So the JSON text of each candidate's parts is
kept, keyed by every value it is made of: a candidate whose score, load,
replica or record changed has another key, so a kept text is never stale.
The answer is the very text ``json.dumps(answer_body(...), allow_nan=False)``
gives (a unit test compares them); a non-finite number raises ValueError as
that does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mulambda.policy.criteria import Criteria
from mulambda.policy.ranking import Candidate
from mulambda.store.records import ClientRecord

# What json.dumps(..., allow_nan=False) does, without building an encoder per call.
_encode = json.JSONEncoder(allow_nan=False).encode
CANDIDATES_SHOWN = 5  # candidates an answer lists


def answer_body(best: Candidate, candidates: list[Candidate]) -> dict[str, Any]:
    """The ``/select`` answer for ``best`` and the ``candidates`` shown, as a dict."""
    rec = best.record
    return {
        "endpoint": rec.rest,
        "grpc": rec.grpc,
        "model": model_part(best),
        "candidates": [candidate_part(c) for c in candidates],
    }


def model_part(best: Candidate) -> dict[str, Any]:
    """The answer's ``model``: the chosen executor, its model and why."""
    rec = best.record
    return {
        "executor": best.executor_id, "name": rec.model, "version": rec.version,
        "type": rec.type, "input": rec.input, "output": rec.output,
        "accuracy": rec.accuracy, "score": best.score,
        "expected_latency_ms": round(best.expected_latency_ms, 3),
        "warm": best.warm, "reason": best.reason,
    }


def candidate_part(c: Candidate) -> dict[str, Any]:
    """One entry of the answer's ``candidates``."""
    return {"executor": c.executor_id, "endpoint": c.record.rest, "score": c.score,
            "warm": c.warm, "reason": c.reason}


def text_key(c: Candidate) -> tuple[Any, ...]:
    """Every value :func:`model_part` and :func:`candidate_part` (its ``reason``
    included) read of ``c``, and the record fields the answer names."""
    rec = c.record
    return (c.executor_id, c.score, c.expected_latency_ms, c.network_ms, c.service_ms,
            c.load_ms, c.cold_start_ms, c.assumed_accuracy, c.inflight, c.measured, c.warm,
            c.over_ceiling, c.replica.pod if c.replica is not None else None, c.notes,
            rec.rest, rec.grpc, rec.model, rec.version, rec.type, rec.input, rec.output,
            rec.accuracy)


class _Parts:
    """The encoded parts of one candidate."""

    __slots__ = ("entry", "head")

    def __init__(self, entry: str) -> None:
        self.entry = entry  # its entry of ``candidates``
        self.head: str | None = None  # the answer up to ``candidates``, once it was chosen


class AnswerText:
    """``/select`` answers as JSON text, each candidate's parts encoded once per
    :func:`text_key` (at most ``max_entries`` kept; the oldest go first)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._parts: dict[tuple[Any, ...], _Parts] = {}

    def __len__(self) -> int:
        return len(self._parts)

    def answer(self, best: Candidate, candidates: list[Candidate]) -> str:
        """``json.dumps(answer_body(best, candidates), allow_nan=False)``; ValueError
        for a non-finite number."""
        parts = self._get(best)
        head = parts.head
        if head is None:
            rec = best.record
            head = parts.head = (f'{{"endpoint": {_encode(rec.rest)}, '
                                 f'"grpc": {_encode(rec.grpc)}, '
                                 f'"model": {_encode(model_part(best))}, "candidates": [')
        return head + ", ".join([self._get(c).entry for c in candidates]) + "]}"

    def _get(self, c: Candidate) -> _Parts:
        key = text_key(c)
        parts = self._parts.get(key)
        if parts is None:
            parts = _Parts(_encode(candidate_part(c)))
            if len(self._parts) >= self.max_entries:
                del self._parts[next(iter(self._parts))]
            self._parts[key] = parts
        return parts


class ParsedBody:
    """A decoded ``/select`` body, with the criteria last derived from it and the
    registered client record they were derived with."""

    __slots__ = ("_criteria", "_record", "body")

    def __init__(self, body: Any) -> None:
        self.body = body  # shared by every request with these bytes: read, never changed
        self._record: ClientRecord | None = None
        self._criteria: Criteria | None = None

    def criteria(self, record: ClientRecord | None,
                 derive: Callable[[Any, ClientRecord | None], Criteria]) -> Criteria:
        """``derive(body, record)``, derived again only for another record object
        (records are frozen; a client read again is a new object). Raises what
        ``derive`` raises."""
        if self._criteria is None or self._record is not record:
            criteria = derive(self.body, record)
            self._record, self._criteria = record, criteria
            return criteria
        return self._criteria


class RequestBodies:
    """``/select`` bodies decoded once per distinct bytes (a router's clients send the
    same few bodies again and again): ``decode(raw)`` must be a pure function of
    the bytes. Only bodies up to ``max_body`` bytes that decode are kept, at most
    ``max_entries`` (the oldest go first)."""

    def __init__(self, max_entries: int = 1024, max_body: int = 1024) -> None:
        self.max_entries = max_entries
        self.max_body = max_body
        self._kept: dict[bytes, ParsedBody] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def parse(self, raw: bytes, decode: Callable[[bytes], Any]) -> ParsedBody:
        """``raw`` decoded (raises what ``decode`` raises)."""
        hit = self._kept.get(raw)
        if hit is not None:
            return hit
        parsed = ParsedBody(decode(raw))
        if len(raw) <= self.max_body:
            if len(self._kept) >= self.max_entries:
                del self._kept[next(iter(self._kept))]
            self._kept[raw] = parsed
        return parsed
