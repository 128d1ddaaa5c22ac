"""The baselines of bench/operator_scale.py: kopf operators for ModelExecutors,
standalone and cluster-wide, logging at WARNING, on the same control plane.

* ``python bench/noop_operator.py``: one empty create handler. What kopf itself
  costs per object.
* ``python bench/noop_operator.py --children``: what any operator that runs an
  executor has to ask of the API server, and nothing else: the create handler
  creates the executor's heartbeat key Secret, Deployment and Service (mulambda's
  own builders, through mulambda's API client and its thread pool), posts one Event
  and patches ``status.observedGeneration``; an empty delete handler gives each
  object kopf's finalizer, as mulambda's store cleanup needs. No store, no caches,
  no fleet loops, no status logic: the gap between this and ``mulambda operator``
  is mulambda's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

import kopf
import kubernetes

from mulambda.api.modelexecutor import ModelExecutorSpec
from mulambda.operator.k8s.api import KubeApi
from mulambda.operator.modelexecutor.build import (
    build_deployment,
    build_heartbeat_secret,
    build_service,
)
from mulambda.settings import Settings

GROUP, VERSION, PLURAL = "mulambda.io", "v1alpha1", "modelexecutors"


def registry_of(children: bool) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    if not children:
        @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
        def created(**_: Any) -> None:
            """Nothing: the baseline is kopf's own work per object."""

        return registry

    @kopf.on.startup(registry=registry)
    async def startup(memo: kopf.Memo, **_: Any) -> None:
        await asyncio.to_thread(kubernetes.config.load_kube_config)
        memo.kube = KubeApi()
        memo.settings = Settings()

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    async def create_children(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        """The executor's children, one Event and its status."""
        api: KubeApi = memo.kube
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        spec = ModelExecutorSpec.model_validate(dict(body["spec"]))
        secret = build_heartbeat_secret(name, namespace, os.urandom(32))
        deployment = build_deployment(name, namespace, spec, memo.settings,
                                      heartbeat_secret=secret["metadata"]["name"])
        for child in (secret, deployment, build_service(name, namespace, spec)):
            kopf.adopt(child, owner=body)
            await api.create(child)
        await api.post_event(
            {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": name,
             "namespace": namespace, "uid": body["metadata"]["uid"]},
            "Normal", "CreatedChildren", "Created Deployment, Service")
        await api.patch_status(GROUP, VERSION, PLURAL, name, namespace,
                               {"observedGeneration": body["metadata"]["generation"]})

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def deleted(**_: Any) -> None:
        """Nothing: registered for kopf's finalizer, which mulambda has too."""

    return registry


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", action="store_true",
                        help="create each executor's children, an Event and its status")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(kopf.operator(registry=registry_of(args.children), standalone=True,
                              clusterwide=True))
