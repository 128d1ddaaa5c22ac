"""Logging of the companion process: quiet while nothing changes, one line per repeated warning.

Two sources made the companion's log noisy:

* httpx logs every request at INFO (``HTTP Request: GET ...``). The
  companion polls TF Serving's model status every second while it waits and
  probes every client each round, so that was a line per second. Its
  loggers are set to WARNING (unless the level is DEBUG); the companion
  logs what the answers mean.
* A failure that lasts (store down, S3 unreachable) repeats the same
  warning from every loop on every attempt. :class:`RepeatFilter` lets the
  first one through at once and counts the identical ones that follow
  within its window; the first one after the window carries the count
  (``[12 more like this in 60s]``), so a 15 s store outage gives one or two
  lines instead of dozens, and nothing is hidden for longer than the window.

"Identical" means same logger, level and message template (the format
string before ``%`` arguments): ``heartbeat not written pod=%s error=%s`` is
one warning whatever the error text says this time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Seconds during which an identical warning is counted instead of logged.
REPEAT_WINDOW_SECONDS = 60.0
# Loggers that log one INFO line per HTTP request.
CHATTY_LOGGERS = ("httpx", "httpcore")
_MAX_KEYS = 1024  # distinct warnings remembered; more and the oldest are forgotten


@dataclass
class _Seen:
    since: float
    suppressed: int = 0


class RepeatFilter(logging.Filter):
    """Lets a warning through once per ``window`` seconds and counts the repeats in between.

    Records below ``level`` always pass. Install it on handlers (a filter on
    a logger does not see records propagated from its children).
    """

    def __init__(self, window: float = REPEAT_WINDOW_SECONDS, *, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.level = level
        self.clock = clock
        self._seen: dict[tuple[str, int, str], _Seen] = {}
        self._lock = threading.Lock()  # the loader logs from worker threads

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen.since < self.window:
                seen.suppressed += 1
                return False
            if seen is not None and seen.suppressed:
                # Digits only: the appended text needs no %-escaping whatever the template.
                record.msg = (f"{record.msg} [{seen.suppressed} more like this in "
                              f"{now - seen.since:.0f}s]")
            if len(self._seen) >= _MAX_KEYS and key not in self._seen:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = _Seen(now)
        return True


def configure_logging(level: str | int, window: float = REPEAT_WINDOW_SECONDS) -> None:
    """Set the process's level, silence per-request INFO lines, rate-limit repeated warnings."""
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if root.level > logging.DEBUG:  # at DEBUG every request is wanted
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    for handler in root.handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter(window))
