"""kopf handlers for Client: the shared ones (``handling.py``), its timer reselecting."""

from __future__ import annotations

import kopf

from mulambda.api.client import parse_client_spec
from mulambda.settings import Settings

from .. import handling
from .reconcile import forget, reconcile
from .status import failure

CLIENT = handling.Kind(
    plural="clients", noun="client", parse=parse_client_spec, reconcile=reconcile,
    failure=failure, forget=forget,
    # Latencies and executors change without the Client changing.
    timer="reselect_client", interval=lambda settings: settings.probe_interval_seconds,
)


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the Client handlers to ``registry``."""
    handling.register(registry, CLIENT, settings)
