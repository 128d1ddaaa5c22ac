"""The mulambda SDK: pick the best model for a client and call it directly.

Import everything from here (``from mulambda.sdk import MulambdaClient``);
the modules behind it are :mod:`.client` (selection, failover, counting),
:mod:`.transport` (REST and gRPC calls), :mod:`.sync` and :mod:`.errors`.

Typical use (async first; :class:`MulambdaClientSync` wraps it for sync code)::

    async with MulambdaClient("redis://store:6379/0", "shop/recommender") as mu:
        result = await mu.predict([[1.0, 2.0]])
        print(result.executor, result.predictions)

How it routes, and what that costs on the request path:

* The store snapshot (executors, live replicas, measured service times,
  this client's latency samples) is read in one pipelined round trip and
  cached for ``cache_ttl`` seconds. With ``background_refresh`` (the
  default) a stale snapshot is still used while one refresh runs in the
  background, so ``select()`` waits for the full snapshot only on the very
  first call or when it is older than ``max_stale``.
* Everybody else's requests in flight are read fresh for each decision
  (one HGETALL of the in-flight leases; decisions made while one is on its
  way join it, and ``load_ttl`` > 0 shares one for that long; bounded by
  ``load_timeout``; after a failure the snapshot's counts are
  used for a second): a fast model serves a request in tens of
  milliseconds, and routers that see each other's load a second late pile
  onto the same idle replica. ``fresh_load=False`` turns it off.
* Ranking (:func:`mulambda.policy.selection.rank`) runs locally on every
  call with this instance's own requests that are still ahead at each
  replica and its own measurements added; REST requests go to the chosen
  replica's pod IP when its heartbeat has one (``direct``), else to the
  executor's Service.
* Each call counts itself in flight and as demand locally, without waiting
  for the store, and each answer's response time feeds the service-time
  model (:mod:`mulambda.policy.latency`): a background writer publishes
  this instance's counts as leases that expire unless refreshed (see
  :class:`mulambda.store.leases.InflightLeases`) and its measurements
  (``P:service``), so a cancelled call, a lost reply or a store outage
  cannot leave a count up for good, and a slow store adds at most one
  ``load_timeout`` to a prediction. Demand signals for cold executors are
  sent in the background too (except when the client waits for one), and
  their cold starts are measured when they come up.

Read-only mode (``read_only=True`` or ``MULAMBDA_SDK_READ_ONLY``, which the
operator sets in Client workloads it gives the read-only store user): none
of the writes above happen; counts and measurements stay in the process, and
demand for executors at zero goes through the selector's ``/select``.

Failover: a connection error, timeout or 5xx moves on (at most
``max_attempts``) and keeps what failed out of this process's rankings for
``suspect_seconds``: the replica it was sent to, whose executor's other
replicas are tried first, or the whole executor when it went through its
Service (or every replica of it failed). A 4xx is the caller's problem and
is raised at once as :class:`PredictionRejected`.

Asynchronous inference: ``submit()`` queues a prediction as a task through
the selector's task API and ``result(id, wait=...)`` fetches it (both also on
:class:`MulambdaClientSync`; :mod:`.tasks`, docs/async.md); an
``Idempotency-Key`` is sent by default, so a retried submission never runs the
model twice.

gRPC needs the optional extra ``mulambda[grpc]`` (tensorflow-serving-api,
which pulls in TensorFlow); it is imported only when ``predict_grpc`` is
called.
"""

from mulambda.store.records import StoreUnavailable

from .client import MulambdaClient
from .errors import (
    AllCandidatesFailed,
    MissingExtra,
    MulambdaError,
    NoMatchingModel,
    Prediction,
    PredictionRejected,
)
from .sync import MulambdaClientSync
from .tasks import Task, TaskClient, TaskError, TaskStatus

__all__ = [
    "AllCandidatesFailed",
    "MissingExtra",
    "MulambdaClient",
    "MulambdaClientSync",
    "MulambdaError",
    "NoMatchingModel",
    "Prediction",
    "PredictionRejected",
    "StoreUnavailable",
    "Task",
    "TaskClient",
    "TaskError",
    "TaskStatus",
]
