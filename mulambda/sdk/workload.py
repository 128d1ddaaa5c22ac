"""What the operator injects into a Client's workload, as the SDK reads it
(``operator/client/build.py`` writes it): the store and the Client, the key prefix, the
selector, and whether the store user may write."""

from __future__ import annotations

import os

from mulambda.errors import MulambdaError


def store_and_client() -> tuple[str, str]:
    """``MULAMBDA_REDIS_URL`` and ``MULAMBDA_CLIENT``; :class:`MulambdaError` when either is
    missing (a workload given no store access has no store URL: it uses the selector)."""
    url, client = os.environ.get("MULAMBDA_REDIS_URL"), os.environ.get("MULAMBDA_CLIENT")
    if not url or not client:
        raise MulambdaError(
            "MULAMBDA_REDIS_URL and MULAMBDA_CLIENT are not both set: outside a Client "
            "workload pass the store URL and the client id; a workload the operator gave "
            "no store access uses the selector (MULAMBDA_SELECTOR_URL)")
    return url, client


def key_prefix() -> str:
    """``MULAMBDA_KEY_PREFIX``, else ``mulambda`` (a platform with its own prefix: the
    default found no registered Client)."""
    return os.environ.get("MULAMBDA_KEY_PREFIX") or "mulambda"


def selector_url() -> str | None:
    """``MULAMBDA_SELECTOR_URL``; None when unset or empty (no selector)."""
    return os.environ.get("MULAMBDA_SELECTOR_URL") or None


def read_only() -> bool:
    """``MULAMBDA_SDK_READ_ONLY`` (set with the read-only store user): true, 1 or yes."""
    return os.environ.get("MULAMBDA_SDK_READ_ONLY", "").strip().lower() in ("true", "1", "yes")
