"""A Client's A/B experiment as pure decisions: which executor a request goes to (a
sticky draw by weight, :func:`mulambda.policy.rollout.sticky_draw`), the request's
assignment key, and what ``status.experiment`` shows from the arms' outcomes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mulambda.store.records import ClientRecord

from .ranking import Ranking
from .rollout import ArmStats

KEY_HEADER = "X-Mulambda-Key"  # the gateway's sticky assignment key without an experiment


@dataclass(frozen=True)
class Experiment:
    """A Client's A/B experiment (``ClientRecord.experiment``): executor ids with weights,
    and where the sticky assignment key comes from."""

    id: str
    arms: tuple[tuple[str, float], ...]
    header: str | None = None
    field: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "arms": [[e, w] for e, w in self.arms],
                "header": self.header, "field": self.field}

    @classmethod
    def of(cls, raw: Mapping[str, Any] | None) -> Experiment | None:
        if not raw:
            return None
        try:
            arms = tuple((str(e), float(w)) for e, w in raw["arms"] if float(w) > 0)
            return cls(str(raw["id"]), arms, raw.get("header") or None,
                       raw.get("field") or None) if arms else None
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def subject(self) -> str:
        return f"experiment/{self.id}"


def experiment_arm(experiment: Experiment, eligible: Iterable[str], available: Iterable[str],
                   draw: float) -> str | None:
    """The executor a request goes to: by weight over the ``eligible`` arms (those that
    meet the client's hard criteria), so a key keeps its arm while that arm can serve;
    when it is not ``available`` (serving now), by weight over the arms that are (the
    same draw); None when none is."""
    def pick(arms: list[tuple[str, float]]) -> str | None:
        total = sum(w for _, w in arms)
        if total <= 0:
            return None
        point, acc = draw * total, 0.0
        for executor, weight in arms:
            acc += weight
            if point < acc:
                return executor
        return arms[-1][0]

    can, ok = set(available), set(eligible)
    first = pick([(e, w) for e, w in experiment.arms if e in ok])
    if first in can:
        return first
    return pick([(e, w) for e, w in experiment.arms if e in can])


def experiment_ranking(ranking: Ranking, record: ClientRecord | None,
                       draw: Callable[[str], float]) -> tuple[Ranking, Experiment | None]:
    """``ranking`` (every candidate meets the client's hard criteria) with the arm of the
    registered client's experiment first (``draw(experiment id)``), and the experiment;
    unchanged when there is none or none of its arms is a warm candidate."""
    experiment = Experiment.of(record.experiment if record is not None else None)
    if experiment is None or not ranking:
        return ranking, experiment
    chosen = experiment_arm(experiment, [c.executor_id for c in ranking],
                            [c.executor_id for c in ranking if c.warm], draw(experiment.id))
    if chosen is None:
        return ranking, experiment
    ordered = ([c for c in ranking if c.executor_id == chosen]
               + [c for c in ranking if c.executor_id != chosen])
    return Ranking(ordered, ranking.rejected, ranking.wake, ranking.criteria), experiment


def assignment_key(headers: Mapping[str, str], body_key: str | None,
                   experiment: Experiment | None) -> str | None:
    """A gateway request's sticky key: the experiment's top-level body field (its value,
    ``body_key``: :func:`mulambda.bodies.summary`) or header, else the ``X-Mulambda-Key``
    header; None (a fresh draw) when it has none."""
    if experiment is not None and experiment.field and body_key is not None:
        return body_key
    if experiment is not None and experiment.header and headers.get(experiment.header):
        return headers[experiment.header]
    return headers.get(KEY_HEADER) or None


def experiment_status(experiment: Experiment, eligible: Iterable[str],
                      rejected: Mapping[str, str],
                      outcomes: Mapping[str, ArmStats]) -> dict[str, Any]:
    """What a Client's ``status.experiment`` shows: per arm its weight, whether it can get
    traffic (meets the criteria) or why not, and its counted outcomes."""
    ok = set(eligible)
    arms = []
    for executor, weight in experiment.arms:
        arm: dict[str, Any] = {"executor": executor, "weight": weight,
                               "eligible": executor in ok}
        if executor not in ok:
            arm["reason"] = rejected.get(executor, "no such executor is registered")
        arm.update(outcomes.get(executor, ArmStats()).summary())
        arms.append(arm)
    return {"id": experiment.id, "arms": arms}
