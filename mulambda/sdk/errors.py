"""What the SDK raises, and what a successful call returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mulambda.errors import MulambdaError
from mulambda.policy.selection import Candidate


class NoMatchingModel(MulambdaError, LookupError):
    """No executor can serve this client; ``reason`` says why."""

    def __init__(self, client: str, reason: str) -> None:
        super().__init__(f"no model for client {client!r}: {reason}")
        self.client = client
        self.reason = reason


class AllCandidatesFailed(MulambdaError):
    """Every candidate tried failed; ``attempts`` lists (executor id, error)."""

    def __init__(self, client: str, attempts: list[tuple[str, str]]) -> None:
        tried = "; ".join(f"{e}: {err}" for e, err in attempts)
        super().__init__(f"all {len(attempts)} candidate(s) failed for {client!r}: {tried}")
        self.client = client
        self.attempts = attempts


class PredictionRejected(MulambdaError):
    """The model rejected the request (4xx / invalid argument): retrying elsewhere won't help."""

    def __init__(self, executor: str, status: int | str, body: str) -> None:
        super().__init__(f"{executor} rejected the request ({status}): {body[:500]}")
        self.executor = executor
        self.status = status
        self.body = body


class MissingExtra(MulambdaError, ImportError):
    """An optional dependency is not installed."""


@dataclass(frozen=True)
class Prediction:
    """A model's answer and who gave it."""

    predictions: Any
    executor: str
    candidate: Candidate
    elapsed_ms: float
    attempts: int


class Retryable(Exception):
    """Internal to the SDK: this candidate failed in a way another one may not."""
