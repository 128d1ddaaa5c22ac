"""Pure pieces of Kubernetes API-server behaviour used by the emulator in :mod:`support.kube`.

Kept free of I/O so each rule can be read (and unit-tested) on its own:
patch flavours (JSON merge patch, strategic merge patch), label and field
selectors, object-name and label validation, and the RBAC verb a request
maps to. Each function follows the real API server closely enough that an
operator which works here does not break on a cluster for the same reason;
where the emulation is simplified, the docstring says how.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

# --- patches -------------------------------------------------------------------------------------


def json_merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch (``application/merge-patch+json``).

    ``None`` deletes a key, dicts merge recursively, everything else (lists
    included) replaces the old value. Neither argument is mutated.
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# patchMergeKey of the list fields of built-in kinds that an operator is likely to
# patch (from the Kubernetes OpenAPI x-kubernetes-patch-merge-key extensions).
# Lists not named here are replaced as a whole, as atomic lists are upstream.
SMP_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
    "schedulingGates": "name",
}
# Lists of scalars that strategic merge treats as sets (merged, not replaced).
SMP_SET_LISTS = frozenset({"finalizers"})


def _ports_merge_key(items: list[Any]) -> str | None:
    # Container ports merge on containerPort, Service ports on port: same field name.
    if all(isinstance(i, Mapping) and "containerPort" in i for i in items):
        return "containerPort"
    if all(isinstance(i, Mapping) and "port" in i for i in items):
        return "port"
    return None


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Apply a strategic merge patch to a built-in object (simplified).

    Dicts merge like a JSON merge patch; lists named in :data:`SMP_MERGE_KEYS`
    (and ``ports``) merge item-by-item on their key, items may carry
    ``$patch: delete``; ``finalizers`` merge as a set;
    ``$deleteFromPrimitiveList/<field>`` removes scalars; ``$patch: replace``
    on a dict replaces it. Other ``$`` directives (``$setElementOrder``,
    ``$retainKeys``) are accepted and ignored.
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [x for x in result.get(field) or [] if x not in value]
            continue
        if key.startswith("$"):
            continue
        old = result.get(key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            merged = strategic_merge_patch(old, value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list) and isinstance(old, list):
            merge_key = SMP_MERGE_KEYS.get(key) or (
                _ports_merge_key(old + value) if key == "ports" else None
            )
            if merge_key is not None:
                result[key] = _merge_list_by_key(old, value, merge_key)
            elif key in SMP_SET_LISTS:
                result[key] = list(old) + [x for x in value if x not in old]
            else:
                result[key] = copy.deepcopy(value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list_by_key(old: list[Any], patch: list[Any], key: str) -> list[Any]:
    result = [copy.deepcopy(item) for item in old]
    for item in patch:
        if not isinstance(item, Mapping) or key not in item:
            result.append(copy.deepcopy(item))
            continue
        index = next(
            (i for i, o in enumerate(result) if isinstance(o, Mapping) and o.get(key) == item[key]),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


# --- selectors -----------------------------------------------------------------------------------

_SET_REQUIREMENT = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_top_level(selector: str) -> list[str]:
    # Commas inside "in (a,b)" do not separate requirements.
    parts, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def match_label_selector(labels: Mapping[str, str] | None, selector: str | None) -> bool:
    """True if ``labels`` satisfy a ``labelSelector`` query string.

    Supports ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)`` and
    ``k notin (a,b)``. Raises ValueError on syntax the API server would reject.
    """
    labels = labels or {}
    for req in _split_top_level(selector or ""):
        m = _SET_REQUIREMENT.match(req)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            present = key in labels and labels[key] in values
            if (op == "in") != present:
                return False
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif req.startswith("!"):
            if req[1:].strip() in labels:
                return False
        elif re.fullmatch(r"[A-Za-z0-9_./-]+", req):
            if req not in labels:
                return False
        else:
            raise ValueError(f"unable to parse requirement: {req!r}")
    return True


def match_field_selector(obj: Mapping[str, Any], selector: str | None) -> bool:
    """True if ``obj`` satisfies a ``fieldSelector`` (``a.b=v``, ``a.b==v``, ``a.b!=v``).

    The real server supports only a few fields per kind; this accepts any
    dotted path, which is a superset.
    """
    for req in _split_top_level(selector or ""):
        negate = "!=" in req
        path, value = (s.strip() for s in req.replace("!=", "=").replace("==", "=").split("=", 1))
        current: Any = obj
        for part in path.split("."):
            current = current.get(part) if isinstance(current, Mapping) else None
        actual = "" if current is None else str(current)
        if (actual == value) == negate:
            return False
    return True


# --- validation ----------------------------------------------------------------------------------

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

# Kinds whose object names must be DNS-1035 labels rather than DNS-1123 subdomains.
DNS1035_NAMED = frozenset({("", "services")})
# Kinds whose names must be DNS-1123 labels (they become hostnames or label values).
DNS1123_LABEL_NAMED = frozenset({("", "namespaces")})


def name_errors(group: str, plural: str, name: str) -> list[str]:
    """Messages for an invalid ``metadata.name`` (empty if valid), as the API server words them."""
    if (group, plural) in DNS1035_NAMED:
        if len(name) > 63 or not DNS1035_LABEL.match(name):
            return [
                f'metadata.name: Invalid value: "{name}": a DNS-1035 label must consist of lower '
                "case alphanumeric characters or '-', start with an alphabetic character, end "
                "with an alphanumeric character, and be at most 63 characters"
            ]
        return []
    if (group, plural) in DNS1123_LABEL_NAMED:
        if len(name) > 63 or not DNS1123_LABEL.match(name):
            return [f'metadata.name: Invalid value: "{name}": must be a DNS-1123 label']
        return []
    if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        return [
            f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
            "consist of lower case alphanumeric characters, '-' or '.', and must start and "
            "end with an alphanumeric character (at most 253 characters)"
        ]
    return []


def _qualified_key_errors(field: str, key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    errors = []
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        errors.append(f'{field}: Invalid value: "{key}": prefix part must be a DNS-1123 subdomain')
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        errors.append(
            f'{field}: Invalid value: "{key}": name part must consist of alphanumeric '
            "characters, '-', '_' or '.', start and end with an alphanumeric character, "
            "and be at most 63 characters"
        )
    return errors


def metadata_errors(meta: Mapping[str, Any]) -> list[str]:
    """Messages for invalid labels, annotation keys and owner references."""
    errors: list[str] = []
    for key, value in (meta.get("labels") or {}).items():
        errors += _qualified_key_errors("metadata.labels", key)
        if not isinstance(value, str):
            errors.append(f'metadata.labels: Invalid value: {value!r}: must be a string')
        elif value and (len(value) > 63 or not _QUALIFIED_NAME.match(value)):
            errors.append(
                f'metadata.labels: Invalid value: "{value}": a valid label must be an empty '
                "string or consist of alphanumeric characters, '-', '_' or '.', and must "
                "start and end with an alphanumeric character (at most 63 characters)"
            )
    for key, value in (meta.get("annotations") or {}).items():
        errors += _qualified_key_errors("metadata.annotations", key)
        if not isinstance(value, str):
            errors.append(f'metadata.annotations: Invalid value: {value!r}: must be a string')
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                errors.append(f"metadata.ownerReferences[{i}].{field}: Required value")
    controllers = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    if len(controllers) > 1:
        errors.append("metadata.ownerReferences: Invalid value: only one reference can have "
                      "Controller set to true")
    return errors


# --- RBAC ----------------------------------------------------------------------------------------


def rbac_verb(method: str, *, has_name: bool, watch: bool) -> str | None:
    """The RBAC verb the API server authorizes for an HTTP method on a resource URL."""
    method = method.upper()
    if method == "GET":
        return "watch" if watch else ("get" if has_name else "list")
    if method == "POST":
        return "create"
    if method == "PUT":
        return "update"
    if method == "PATCH":
        return "patch"
    if method == "DELETE":
        return "delete" if has_name else "deletecollection"
    return None


def rbac_allows(rules: Sequence[Mapping[str, Any]], group: str, resource: str, verb: str) -> bool:
    """True if any PolicyRule in ``rules`` (Role/ClusterRole ``rules``) grants the triple."""
    for rule in rules:
        groups = rule.get("apiGroups") or []
        resources = rule.get("resources") or []
        verbs = rule.get("verbs") or []
        if (
            ("*" in groups or group in groups)
            and ("*" in resources or resource in resources
                 or ("/" in resource and f"*/{resource.split('/', 1)[1]}" in resources))
            and ("*" in verbs or verb in verbs)
        ):
            return True
    return False
