"""Defaults and immutable fields of the built-in kinds, as the API server applies them on write.

Operators that compare desired and actual state ("patch only if changed")
see these defaulted fields on a real cluster; without them, a comparison
that happens to work against a plain store loops or patches forever on a
cluster (or the other way round). Covered: Deployments, ReplicaSets, Jobs,
Pods (and every pod template), Services (with ClusterIP allocation),
Secrets, Namespaces. The values are those of Kubernetes 1.30+; fields
that only matter to kubelet or scheduler internals are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from support.kube_semantics import DNS1123_LABEL


def _image_pull_policy(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if "@" in image:
        return "IfNotPresent"
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _default_probe(probe: dict[str, Any]) -> None:
    probe.setdefault("timeoutSeconds", 1)
    probe.setdefault("periodSeconds", 10)
    probe.setdefault("successThreshold", 1)
    probe.setdefault("failureThreshold", 3)
    if "httpGet" in probe:
        probe["httpGet"].setdefault("scheme", "HTTP")
        probe["httpGet"].setdefault("path", "/")


def _default_container(container: dict[str, Any]) -> None:
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    container.setdefault("imagePullPolicy", _image_pull_policy(container.get("image", "")))
    container.setdefault("resources", {})
    for port in container.get("ports") or []:
        port.setdefault("protocol", "TCP")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if isinstance(container.get(probe), dict):
            _default_probe(container[probe])
    for env in container.get("env") or []:
        field_ref = (env.get("valueFrom") or {}).get("fieldRef")
        if isinstance(field_ref, dict):
            field_ref.setdefault("apiVersion", "v1")


def default_pod_spec(spec: dict[str, Any], *, restart_policy: str | None = "Always") -> None:
    """Pod spec defaults (also used for the templates of workloads)."""
    if restart_policy is not None:
        spec.setdefault("restartPolicy", restart_policy)
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for key in ("containers", "initContainers"):
        for container in spec.get(key) or []:
            _default_container(container)
    for volume in spec.get("volumes") or []:
        for source in ("configMap", "secret"):
            if isinstance(volume.get(source), dict):
                volume[source].setdefault("defaultMode", 0o644)


def _default_template(spec: dict[str, Any], *, restart_policy: str | None = "Always") -> None:
    template = spec.get("template")
    if isinstance(template, dict) and isinstance(template.get("spec"), dict):
        default_pod_spec(template["spec"], restart_policy=restart_policy)


def apply_builtin_defaults(group: str, plural: str, obj: dict[str, Any],
                           allocate_cluster_ip: Callable[[], str]) -> None:
    """Default ``obj`` of the built-in ``group/plural`` in place."""
    spec = obj.get("spec")
    if (group, plural) == ("apps", "deployments") and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            rolling.setdefault("maxUnavailable", "25%")
            rolling.setdefault("maxSurge", "25%")
        _default_template(spec)
    elif (group, plural) == ("apps", "replicasets") and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        _default_template(spec)
    elif (group, plural) == ("batch", "jobs") and isinstance(spec, dict):
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        _default_template(spec, restart_policy=None)  # Jobs must choose Never/OnFailure
    elif (group, plural) == ("", "pods") and isinstance(spec, dict):
        default_pod_spec(spec)
        spec.setdefault("enableServiceLinks", True)
    elif (group, plural) == ("", "services"):
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        if spec["type"] != "ExternalName":
            if not spec.get("clusterIP"):
                spec["clusterIP"] = allocate_cluster_ip()
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        obj.setdefault("status", {"loadBalancer": {}})
    elif (group, plural) == ("", "secrets"):
        obj.setdefault("type", "Opaque")
    elif (group, plural) == ("", "namespaces"):
        obj.setdefault("status", {"phase": "Active"})


def carry_over_and_check_immutable(group: str, plural: str, old: Mapping[str, Any],
                                   new: dict[str, Any]) -> list[str]:
    """Keep server-assigned fields an update omitted; messages for changed immutable ones."""
    errors: list[str] = []
    old_spec, new_spec = old.get("spec") or {}, new.get("spec")
    if (group, plural) == ("", "services") and isinstance(new_spec, dict):
        for key in ("clusterIP", "clusterIPs"):
            if key in old_spec and not new_spec.get(key):
                new_spec[key] = old_spec[key]  # as upstream: an omitted IP keeps the old one
        if old_spec.get("clusterIP") != new_spec.get("clusterIP"):
            errors.append(f"spec.clusterIP: Invalid value: {new_spec.get('clusterIP')!r}: "
                          "field is immutable")
    if (group, plural) in (("apps", "deployments"), ("apps", "replicasets"), ("batch", "jobs")) \
            and isinstance(new_spec, dict) and "selector" in old_spec \
            and new_spec.get("selector") != old_spec["selector"]:
        errors.append(f"spec.selector: Invalid value: {new_spec.get('selector')!r}: "
                      "field is immutable")
    return errors


_IANA_SVC_NAME_MAX = 15


def _label_selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _pod_spec_errors(spec: Any, where: str) -> list[str]:
    if not isinstance(spec, Mapping):
        return [f"{where}: Required value"]
    errors: list[str] = []
    volumes = [v.get("name") for v in spec.get("volumes") or []]
    if len(set(volumes)) != len(volumes):
        errors.append(f"{where}.volumes: Duplicate value: volume names must be unique")
    containers = spec.get("containers") or []
    if not containers:
        errors.append(f"{where}.containers: Required value")
    names: list[str] = []
    for key in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(key) or []):
            at = f"{where}.{key}[{i}]"
            name = container.get("name") or ""
            if not DNS1123_LABEL.match(name) or len(name) > 63:
                errors.append(f'{at}.name: Invalid value: "{name}": must be a DNS-1123 label')
            if name in names:
                errors.append(f'{at}.name: Duplicate value: "{name}"')
            names.append(name)
            if not container.get("image"):
                errors.append(f"{at}.image: Required value")
            for j, port in enumerate(container.get("ports") or []):
                port_name = port.get("name")
                if port_name is not None and (len(port_name) > _IANA_SVC_NAME_MAX
                                              or not DNS1123_LABEL.match(port_name)):
                    errors.append(f'{at}.ports[{j}].name: Invalid value: "{port_name}": must '
                                  "be no more than 15 characters, lowercase alphanumerics "
                                  "and '-'")
            for j, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") not in volumes:
                    errors.append(f'{at}.volumeMounts[{j}].name: Not found: "{mount.get("name")}"')
            for j, env in enumerate(container.get("env") or []):
                if not env.get("name"):
                    errors.append(f"{at}.env[{j}].name: Required value")
    return errors


def builtin_errors(group: str, plural: str, obj: Mapping[str, Any]) -> list[str]:
    """Semantic validation a schema cannot express (the API server's own checks)."""
    spec = obj.get("spec") or {}
    errors: list[str] = []
    if (group, plural) in (("apps", "deployments"), ("apps", "replicasets")):
        selector = spec.get("selector")
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not selector:
            errors.append("spec.selector: Required value")
        elif not _label_selector_matches(selector, labels):
            errors.append(f"spec.template.metadata.labels: Invalid value: {labels!r}: "
                          "`selector` does not match template `labels`")
        errors += _pod_spec_errors((spec.get("template") or {}).get("spec"),
                                   "spec.template.spec")
    elif (group, plural) == ("batch", "jobs"):
        template_spec = (spec.get("template") or {}).get("spec") or {}
        if template_spec.get("restartPolicy") not in ("Never", "OnFailure"):
            errors.append("spec.template.spec.restartPolicy: Required value: valid values: "
                          '"OnFailure", "Never"')
        errors += _pod_spec_errors(template_spec, "spec.template.spec")
    elif (group, plural) == ("", "pods"):
        errors += _pod_spec_errors(spec, "spec")
    elif (group, plural) == ("", "services"):
        ports = spec.get("ports") or []
        if not ports and spec.get("type") != "ExternalName" and spec.get("clusterIP") != "None":
            errors.append("spec.ports: Required value")
        if len(ports) > 1:
            port_names = [p.get("name") for p in ports]
            for i, name in enumerate(port_names):
                if not name:
                    errors.append(f"spec.ports[{i}].name: Required value")
            if len(set(port_names)) != len(port_names):
                errors.append("spec.ports: Duplicate value: port names must be unique")
    return errors
