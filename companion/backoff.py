"""Exponential back-off, shared by the loader's store retries and the companion's load loop."""

from __future__ import annotations

import random
from dataclasses import dataclass

# 2 ** 64 x any sane base is far past any cap; stop counting there, so an
# endless outage never overflows the float.
_MAX_EXPONENT = 64


@dataclass
class Backoff:
    """Delays ``base``, ``2 x base``, ``4 x base``, ... capped at ``cap``.

    With ``jitter`` each delay is scaled by a random factor in [0.5, 1), so
    parallel workers that failed together do not retry in lock-step.
    """

    base: float
    cap: float
    jitter: bool = False
    attempts: int = 0  # delays handed out so far

    def next_delay(self) -> float:
        """The delay before the next attempt."""
        delay = min(self.cap, self.base * 2 ** min(self.attempts, _MAX_EXPONENT))
        self.attempts += 1
        return delay * (0.5 + random.random() / 2) if self.jitter else delay
