"""A burst of load against the scaling policy, second by second (a test harness).

Requests wait in a FIFO queue in front of ``slots`` per ready replica; the
policy decides every other second from a 60 s window of samples, and the
replicas it adds are ready ``cold_start`` seconds later. Tests read from the
steps what they are about (replicas ready when the burst begins, the
longest queue, the peak, when it scaled up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mulambda.api.modelexecutor import Scaling
from mulambda.policy.scaling import DemandWindow, Sample, ScalingState, decide, record_sample


@dataclass(frozen=True)
class Step:
    second: int
    ready: int  # replicas ready at this second
    queued: float  # requests waiting
    desired: int | None  # what the policy asked for (None: no decision this second)
    current: int  # replicas ready or starting when it decided


def run_burst(policy: Scaling, rate: Callable[[int], float], seconds: Iterable[int], *,
              ready: int = 15, slots: float = 10.0, cold_start: int = 30,
              service_s: float | None = 1.0) -> list[Step]:
    """Each second of ``seconds`` at ``rate(second)`` requests/s. ``service_s`` None:
    the samples carry neither the queue nor the service time (a synchronous signal)."""
    window, state = DemandWindow(), ScalingState()
    starting: list[int] = []
    queued = 0.0
    steps = []
    for second in seconds:
        ready += sum(1 for at in starting if at == second)
        starting = [at for at in starting if at > second]
        arriving = rate(second)
        queued = max(0.0, queued + arriving - ready * slots)
        busy = min(ready * slots, arriving + queued)
        sample = Sample(float(second), busy + queued, arriving,
                        queued if service_s else 0.0, service_s)
        window = record_sample(window, sample, horizon_seconds=60)
        current, desired = ready + len(starting), None
        if second % 2 == 0:
            d = decide(policy, window, current_replicas=current, ready_replicas=ready,
                       state=state, now=float(second), cold_start_seconds=float(cold_start))
            state, desired = d.state, d.desired_replicas
            if desired > current:
                starting += [second + cold_start] * (desired - current)
        steps.append(Step(second, ready, queued, desired, current))
    return steps
