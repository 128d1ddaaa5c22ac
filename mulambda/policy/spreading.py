"""The first place of a ranking: which candidates may take it (the ceiling's parts) and
which share it (near-equal ones, spread in proportion to their headroom). See
"Ceiling" and "Spreading" in :mod:`mulambda.policy.selection`."""

from __future__ import annotations

import math
import random

from .criteria import Criteria
from .ranking import DEFAULT_POLICY, Candidate, Policy, Preferences


def ranked_latency(c: Candidate, wait: bool) -> float:
    """The latency ``c`` is scored and held to the ceiling by: without its cold start
    for a client that waits for one."""
    return c.expected_latency_ms - c.cold_start_ms if wait else c.expected_latency_ms


def beyond(cands: list[Candidate], prefs: Preferences, wait: bool) -> float:
    """The latency past which a candidate ranks after the others: when none is within
    the ceiling, the fastest one's plus the ceiling (infinite otherwise)."""
    if not cands or not cands[0].over_ceiling:
        return math.inf
    return min(ranked_latency(c, wait) for c in cands) + prefs.ceiling_ms


def near_equal(cands: list[Candidate], criteria: Criteria,
               policy: Policy = DEFAULT_POLICY) -> tuple[list[Candidate], float]:
    """The candidates sharing the first place of ``cands`` (ordered as
    :func:`~mulambda.policy.selection.rank` orders them without ``rng``), and the floor
    of the noise band they lie above."""
    prefs = Preferences.of(criteria, policy)
    return _near_equal(cands, prefs, policy, criteria.cold_start == "Wait")


def _near_equal(cands: list[Candidate], prefs: Preferences, policy: Policy,
                wait: bool) -> tuple[list[Candidate], float]:
    first = cands[0]
    floor = first.score - prefs.band(ranked_latency(first, wait), policy)
    limit = beyond(cands, prefs, wait)
    group = [first]
    for c in cands[1:]:
        if (c.score <= floor or c.over_ceiling != first.over_ceiling
                or ranked_latency(c, wait) > limit):
            break
        if c.warm == first.warm:
            group.append(c)
    return group, floor


def spread(cands: list[Candidate], prefs: Preferences, policy: Policy, rng: random.Random,
            wait: bool) -> None:
    """Put one near-equal candidate first, drawn in proportion to its headroom."""
    group, floor = _near_equal(cands, prefs, policy, wait)
    first = cands[0]
    if len(group) == 1:
        return
    pick = rng.choices(group, weights=[c.score - floor for c in group])[0]
    if pick is not first:
        cands.remove(pick)
        cands.insert(0, pick)
