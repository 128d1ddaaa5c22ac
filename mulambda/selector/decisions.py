"""Why a selection went the way it did, as bounded label values for the selector's metrics.

A ranking's own ``reason`` strings carry numbers (scores, milliseconds), so
they cannot be Prometheus labels; these pure functions reduce a decision to
one of a few fixed words that a dashboard can group by.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Generic, TypeVar

from prometheus_client.metrics import MetricWrapperBase

from mulambda.policy.ranking import Candidate, Ranking
from mulambda.policy.selection import Criteria, mismatch
from mulambda.store.records import ExecutorRecord

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A labelled metric's children by label values (in the metric's label order),
    each looked up in prometheus_client once: ``labels()`` validates, formats and
    locks, several microseconds a call at every request. At most ``max_entries``
    are kept (beyond, looked up each time). The selector never removes a child, so a
    kept one is the metric's own."""

    def __init__(self, metric: M, max_entries: int = 4096) -> None:
        self.metric = metric
        self.max_entries = max_entries
        self._kept: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._kept.get(values)
        if child is None:
            child = self.metric.labels(*values)
            if len(self._kept) < self.max_entries:
                self._kept[values] = child
        return child

    def __len__(self) -> int:
        return len(self._kept)


# Why the chosen executor was chosen (``mulambda_selector_decisions_total{reason}``).
DECISION_REASONS = (
    "only_match",  # it was the one executor that met the hard criteria
    "best_score",  # it had the highest score
    "near_equal",  # spread among candidates within the noise band of the best score
    "warm_instead_of_cold",  # a better executor is cold and the client uses a warm one
    "cold_start",  # it is cold: the request waits for (or triggers) its activation
    "over_ceiling",  # every candidate is over the latency ceiling; the best of them
    "failover",  # the gateway moved on after an earlier executor failed
)

# Why executors were left out (``mulambda_selector_rejections_total{reason}``): the
# prefix of the ranking's rejection reason, "wrong type: has 'vision'" -> wrong_type.
REJECTION_REASONS = (
    "wrong_type", "wrong_input", "wrong_output", "invalid_record", "not_serving",
    "below_min_accuracy", "over_max_latency", "invalid_measurement", "other",
)


def decision_reason(ranking: Ranking, chosen: Candidate, *, failover: bool = False) -> str:
    """The one word of :data:`DECISION_REASONS` that says why ``chosen`` won ``ranking``."""
    if failover:
        return "failover"
    if not chosen.warm:
        return "cold_start"
    if len(ranking) == 1:
        return "only_match"
    if chosen.over_ceiling:
        return "over_ceiling"
    if ranking and not ranking[0].warm and ranking[0] is not chosen:
        return "warm_instead_of_cold"
    # Over-ceiling candidates rank last whatever their score: not rivals of one within it.
    # (One loop that tests the score first: this runs for every decision, over every
    # candidate, and nearly all of them score lower.)
    best = chosen.score
    for c in ranking:
        if c.score > best and c.warm and not c.over_ceiling:
            return "near_equal"
    return "best_score"


def rejection_kind(reason: str) -> str:
    """The word of :data:`REJECTION_REASONS` for one of the ranking's rejection reasons."""
    kind = reason.split(":", 1)[0].strip().replace(" ", "_")
    return kind if kind in REJECTION_REASONS else "other"


def rejections(ranking: Ranking) -> Counter[str]:
    """How many executors ``ranking`` left out, per :func:`rejection_kind`."""
    return Counter(rejection_kind(r) for r in ranking.rejected.values())


def hard_rejections(criteria: Criteria, executors: Mapping[str, ExecutorRecord]
                    ) -> Counter[str]:
    """How many of ``executors`` the hard criteria leave out, per :func:`rejection_kind`
    (what :func:`rejections` counts for them when the whole snapshot is ranked)."""
    counts: Counter[str] = Counter()
    for record in executors.values():
        why = mismatch(criteria, record)
        if why is not None:
            counts[rejection_kind(why)] += 1
    return counts
