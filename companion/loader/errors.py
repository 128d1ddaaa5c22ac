"""What a failed load says, and how store calls that fail transiently are retried."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from mulambda.storage.s3 import classify_error

from ..backoff import Backoff

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelLoadError(Exception):
    """A load failed. ``reason`` is CamelCase for conditions; ``permanent`` means
    retrying without someone changing something (storage, credentials, spec) will not help.
    """

    def __init__(self, reason: str, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.permanent = permanent

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def as_load_error(exc: BaseException, what: str) -> ModelLoadError:
    """``exc`` as a :class:`ModelLoadError` whose message says what was being done."""
    if isinstance(exc, ModelLoadError):
        return exc
    info = classify_error(exc)
    return ModelLoadError(info.reason, f"{what}: {info.message}", permanent=info.permanent)


@dataclass(frozen=True)
class RetryPolicy:
    """How many times, and how patiently, transient store errors are retried."""

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0

    def call(self, fn: Callable[[], T], what: str, *,
             stop: threading.Event | None = None) -> T:
        """Call ``fn``; retry transient store errors up to ``retries`` times.

        A set ``stop`` ends the retries (the error is raised) and cuts a wait
        short, so one worker's failure stops the others promptly.
        """
        delays = Backoff(self.backoff, self.max_backoff, jitter=True)
        while True:
            try:
                return fn()
            except Exception as exc:
                err = as_load_error(exc, what)
                stopped = stop is not None and stop.is_set()
                if err.permanent or delays.attempts >= self.retries or stopped:
                    raise err from exc
                delay = delays.next_delay()
                log.warning("transient storage error, retrying what=%r attempt=%d delay=%.2fs "
                            "error=%r", what, delays.attempts, delay, err.message)
                if stop is None:
                    time.sleep(delay)
                else:
                    stop.wait(delay)
