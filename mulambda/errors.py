"""The base of every error mulambda raises to its callers, so that code embedding the SDK
catches one class: a store outage (:class:`mulambda.store.records.StoreUnavailable`) as
well as the SDK's own (:mod:`mulambda.sdk.errors`)."""

from __future__ import annotations


class MulambdaError(Exception):
    """Base class of the errors mulambda raises to its callers."""
