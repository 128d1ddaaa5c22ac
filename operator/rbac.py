"""The operator's Kubernetes permissions: the one maintained list.

The kustomize base (``manifests/base/rbac.yaml``) and the Helm chart
(``charts/mulambda/templates/rbac.yaml``) must grant exactly these rules; a
unit test renders both and compares. Least privilege on purpose:

- no wildcards, no ``update`` (kopf and the builders only patch);
- Secrets: ``create`` only, for each executor's heartbeat signing key
  (mulambda.store.heartbeats); never read: companions get S3 and store
  credentials through ``env.valueFrom`` and keys through volumes, so only
  the kubelet reads them;
- no Pods: executor readiness comes from the Deployment status and the
  companions' heartbeats in the metadata store;
- ``namespaces`` (list, watch) only when the operator watches a list of
  namespaces (``--namespace``): kopf then observes namespaces to follow
  them. Without the grant a real API server answers 403 and kopf retries
  with ERROR lines on every start before it falls back to the given list
  (seen on the test control plane; the emulator used before never said no).
  Cluster-wide, nothing lists namespaces and nothing grants it;
- no ``kopfpeerings``: the operator runs kopf standalone with one replica.

Adding an API call to the operator means adding its rule here first. An
integration test runs every operator path on the emulated API server and
checks both ways: no call outside these rules, and no rule never used.
"""

from __future__ import annotations

from typing import Final

Rule = dict[str, list[str]]

# (apiGroup, resource) pairs that are cluster-scoped: granted through a
# ClusterRoleBinding even when the operator watches only some namespaces.
CLUSTER_SCOPED: Final = frozenset({("apiextensions.k8s.io", "customresourcedefinitions"),
                                   ("", "namespaces")})

REQUIRED_RULES: Final[list[Rule]] = [
    # kopf: notice CRDs being installed or removed while it runs.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
    # The resources the operator reconciles; kopf patches finalizers and
    # its progress annotations on the main object.
    {
        "apiGroups": ["mulambda.io"],
        "resources": ["modelexecutors", "clients"],
        "verbs": ["list", "watch", "patch"],
    },
    {
        "apiGroups": ["mulambda.io"],
        "resources": ["modelexecutors/status", "clients/status"],
        "verbs": ["patch"],
    },
    # Children: executor and client-workload Deployments and their Services,
    # read by name for get-or-create and compare-then-patch; executor
    # Deployments are also listed and watched (label-selected) into the
    # autoscaler's cache. delete: a Client's workload goes when spec.workload
    # is dropped.
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    {
        "apiGroups": [""],
        "resources": ["services"],
        # list/watch: a watch on the executors' Services finds drift without GETs.
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    # Each executor's heartbeat key (mulambda.store.heartbeats), created once beside its
    # Deployment; never read back.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    # kopf and the operator's fleet-wide loops post Events through the core API.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


# Only with ``--namespace`` (the chart's ``watch.clusterwide: false``): kopf's
# namespace observer.
NAMESPACE_OBSERVER_RULE: Final[Rule] = {
    "apiGroups": [""],
    "resources": ["namespaces"],
    "verbs": ["list", "watch"],
}


def rules_for(clusterwide: bool) -> list[Rule]:
    """Every rule the operator needs in one watch mode."""
    return list(REQUIRED_RULES) if clusterwide else [*REQUIRED_RULES, NAMESPACE_OBSERVER_RULE]


def _is_cluster_scoped(rule: Rule) -> bool:
    pairs = {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    scoped = pairs & CLUSTER_SCOPED
    if scoped and scoped != pairs:
        raise ValueError(f"rule mixes cluster-scoped and namespaced resources: {rule}")
    return bool(scoped)


def cluster_scoped_rules(clusterwide: bool = True) -> list[Rule]:
    """Rules that must be bound cluster-wide in a watch mode."""
    return [r for r in rules_for(clusterwide) if _is_cluster_scoped(r)]


def namespaced_rules() -> list[Rule]:
    """Rules bound per watched namespace (or cluster-wide without --namespace)."""
    return [r for r in REQUIRED_RULES if not _is_cluster_scoped(r)]
