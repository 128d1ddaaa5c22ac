"""The mulambda SDK: pick the best model for a client and call it directly.

Import everything from here (``from mulambda.sdk import MulambdaClient``);
the modules behind it are :mod:`.client` (selection, failover, counting),
:mod:`.transport` (REST and gRPC calls), :mod:`.sync` and :mod:`.errors`.

Typical use (async first; :class:`MulambdaClientSync` wraps it for sync code)::

    async with MulambdaClient("redis://store:6379/0", "shop/recommender") as mu:
        result = await mu.predict([[1.0, 2.0]])
        print(result.executor, result.predictions)

How it stays cheap on the request path:

* The store snapshot (executors, live replicas, in-flight counts, this
  client's latency samples) is read in one pipelined round trip and cached
  for ``cache_ttl`` seconds. With ``background_refresh`` (the default) a
  stale snapshot is still used while one refresh runs in the background, so
  ``select()`` waits for the store only on the very first call or when the
  snapshot is older than ``max_stale``.
* Ranking runs locally on every ``select()`` with this instance's own
  in-flight requests added to the cached counts of everybody else, so a
  burst from one process spreads over models before the next refresh shows
  the load.
* Each call counts itself in flight and as demand locally, without waiting
  for the store: a background writer publishes this instance's counts as
  leases that expire unless refreshed (see
  :class:`mulambda.store.leases.InflightLeases`), so a cancelled call, a lost
  reply or a store outage cannot leave a count up for good, and a slow store
  adds nothing to a prediction's latency. Demand signals for cold executors
  are sent in the background too (except when the client waits for one).

Failover: a connection error, timeout or 5xx moves on to the next candidate
(at most ``max_attempts``) and keeps the failed executor out of this
process's rankings for ``suspect_seconds``. A 4xx is the caller's problem
and is raised at once as :class:`PredictionRejected`.

gRPC needs the optional extra ``mulambda[grpc]`` (tensorflow-serving-api,
which pulls in TensorFlow); it is imported only when ``predict_grpc`` is
called.
"""

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

__all__ = [
    "AllCandidatesFailed",
    "MissingExtra",
    "MulambdaClient",
    "MulambdaClientSync",
    "MulambdaError",
    "NoMatchingModel",
    "Prediction",
    "PredictionRejected",
]
