"""The children's informers (operator/k8s/informer.py) on the real control plane, as the
operator's ServiceAccount: what they list, follow and leave out, when they say they are
complete, and that they stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import kubernetes

from mulambda.operator.modelexecutor.children import CHILD_LABELS, Children

from support.cluster import Cluster
from support.identity import Identity


def deployment(ns: str, name: str, labels: dict[str, str], replicas: int = 0) -> dict[str, Any]:
    pod = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"replicas": replicas, "selector": {"matchLabels": pod},
                     "template": {"metadata": {"labels": pod}, "spec": {"containers": [
                         {"name": "c", "image": "registry.k8s.io/pause:3.9"}]}}}}


def service(ns: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"selector": {"app": name}, "ports": [{"port": 8501}]}}


async def until(check: Callable[[], Any], what: str, seconds: float = 30.0) -> None:
    """Let the loop run (the streams post their changes to it) until ``check`` holds."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_informers_list_follow_and_stop(cluster: Cluster, operator_identity: Identity,
                                        ns: str) -> None:
    kubernetes.config.load_kube_config(config_file=str(operator_identity.kubeconfig))
    cluster.create(deployment(ns, "before", CHILD_LABELS))
    cluster.create(deployment(ns, "not-ours", {"app.kubernetes.io/name": "other"}))
    cluster.create(service(ns, "before", CHILD_LABELS))

    async def scenario() -> None:
        children = Children([ns])
        assert not children.of((ns, "before"))["indexed"]
        children.informers.start()
        try:
            await asyncio.wait_for(children.informers.synced.wait(), 30)
            # Complete once listed: what existed is there, what is not ours is not.
            seen = children.of((ns, "before"))
            assert seen["indexed"]
            assert seen["deployment"]["spec"] == {"replicas": 0}
            assert seen["service"]["spec"]["ports"][0]["port"] == 8501
            assert (ns, "not-ours") not in children.deployments

            cluster.create(deployment(ns, "after", CHILD_LABELS))
            await until(lambda: (ns, "after") in children.deployments, "a new Deployment")
            cluster.patch("apps/v1", "deployments", ns, "before", {"spec": {"replicas": 2}})
            await until(lambda: children.of((ns, "before"))["deployment"]["spec"]
                        == {"replicas": 2}, "a changed Deployment")
            cluster.delete("apps/v1", "deployments", ns, "before")
            cluster.delete("v1", "services", ns, "before")
            await until(lambda: children.of((ns, "before")) == {
                "deployment": None, "service": None, "indexed": True}, "deleted children")
        finally:
            await children.informers.stop()
        assert not any(s._thread.is_alive() for s in children.informers.streams)

    asyncio.run(scenario())


def test_a_namespace_pattern_watches_cluster_wide_and_keeps_only_its_matches(
    cluster: Cluster, operator_identity: Identity, ns: str
) -> None:
    kubernetes.config.load_kube_config(config_file=str(operator_identity.kubeconfig))
    cluster.create(deployment(ns, "kept", CHILD_LABELS))

    async def listed(patterns: list[str]) -> set[tuple[str, str]]:
        children = Children(patterns)
        children.informers.start()
        try:
            await asyncio.wait_for(children.informers.synced.wait(), 30)
            assert len(children.informers.streams) == 2  # one per kind, cluster-wide
            return set(children.deployments)
        finally:
            await children.informers.stop()

    assert (ns, "kept") in asyncio.run(listed([f"{ns[:3]}*"]))
    assert (ns, "kept") not in asyncio.run(listed([f"!{ns}"]))
