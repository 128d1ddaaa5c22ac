"""The baseline of bench/operator_scale.py: a kopf operator that handles ModelExecutors
by doing nothing (one empty create handler), standalone and cluster-wide, logging
at WARNING. What kopf itself costs per object, on the same control plane."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

registry = kopf.OperatorRegistry()


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


@kopf.on.create("mulambda.io", "v1alpha1", "modelexecutors", registry=registry)
def created(**_: Any) -> None:
    """Nothing: the baseline is kopf's own work per object."""


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=True))
