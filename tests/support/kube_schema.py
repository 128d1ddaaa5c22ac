"""What the API server does with a custom resource's structural schema: prune, default, validate.

A real cluster silently drops fields the CRD schema does not declare (unless
``x-kubernetes-preserve-unknown-fields``), fills in ``default`` values, and
rejects what violates the schema with 422. An operator whose status fields
are missing from the CRD, or which relies on a default, behaves differently
on a cluster than on a plain store; the emulator applies these three steps
to custom resources so the difference shows up in integration tests.

Not emulated: CEL rules (``x-kubernetes-validations``), list-type
uniqueness (``x-kubernetes-list-type: set|map``), ``format`` checks,
validation ratcheting.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jsonschema

# Root fields kept whatever the schema says (metadata is validated separately).
_ROOT_KEPT = ("apiVersion", "kind", "metadata")


def prune(value: Any, schema: Mapping[str, Any] | None, *, root: bool = False) -> Any:
    """Drop fields the structural schema does not declare."""
    if schema is None:
        return value
    if isinstance(value, dict):
        props = schema.get("properties")
        additional = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get(
            "x-kubernetes-embedded-resource")
        result: dict[str, Any] = {}
        for key, item in value.items():
            if root and key in _ROOT_KEPT:
                result[key] = item
            elif props is not None and key in props:
                result[key] = prune(item, props[key])
            elif isinstance(additional, Mapping):
                result[key] = prune(item, additional)
            elif preserve or additional is True:
                result[key] = item
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(item, schema["items"]) for item in value]
    return value


def apply_defaults(value: Any, schema: Mapping[str, Any] | None) -> Any:
    """Fill in ``default`` for absent fields, recursing into defaulted values too."""
    if schema is None:
        return value
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
        additional = schema.get("additionalProperties")
        if isinstance(additional, Mapping):
            for key in value:
                value[key] = apply_defaults(value[key], additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _to_json_schema(schema: Any) -> Any:
    # OpenAPI v3 -> JSON Schema draft 4: nullable and int-or-string have no direct keyword.
    if isinstance(schema, list):
        return [_to_json_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _to_json_schema(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes-") and k not in ("format", "default")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    return out


def validation_errors(obj: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Messages for every schema violation, worded like the API server's (path: reason)."""
    json_schema = dict(_to_json_schema(schema))
    props = dict(json_schema.get("properties") or {})
    props["metadata"] = {"type": "object"}  # validated by the emulator's metadata rules
    json_schema["properties"] = props
    validator = jsonschema.Draft4Validator(json_schema)
    errors = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path) or "<root>"
        errors.append(f"{path}: Invalid value: {error.instance!r}: {error.message}")
    return errors
