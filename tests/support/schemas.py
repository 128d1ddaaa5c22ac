"""Validation against upstream Kubernetes schemas and against our CRDs' schemas."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33"


def validate_k8s(obj: dict[str, Any]) -> None:
    """Strictly validate a built-in kind against the upstream schema (raises)."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@cache
def crds() -> dict[str, dict[str, Any]]:
    """kind -> CRD document, from crds/."""
    out = {}
    for path in sorted((ROOT / "crds").glob("*.mulambda.io.yaml")):
        doc = yaml.safe_load(path.read_text())
        out[doc["spec"]["names"]["kind"]] = doc
    return out


def _structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Make a CRD openAPIV3Schema behave like the API server under jsonschema:
    unknown fields are errors (strict field validation) unless preserved, and
    int-or-string accepts both."""
    s = copy.deepcopy(schema)
    if s.get("x-kubernetes-int-or-string"):
        return {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    if s.get("type") == "object" and "properties" in s and not s.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        s.setdefault("additionalProperties", False)
    for key, sub in list(s.get("properties", {}).items()):
        s["properties"][key] = _structural(sub)
    if isinstance(s.get("items"), dict):
        s["items"] = _structural(s["items"])
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _structural(s["additionalProperties"])
    # metadata is validated by the API server itself, not by the CRD schema.
    if "metadata" in s.get("properties", {}):
        s["properties"]["metadata"] = {"type": "object"}
    return s


def validate_custom(obj: dict[str, Any]) -> None:
    """Validate a ModelExecutor / Client against its CRD schema (raises ValidationError)."""
    crd = crds()[obj["kind"]]
    group = crd["spec"]["group"]
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    if obj.get("apiVersion") != f"{group}/{version['name']}":
        raise jsonschema.ValidationError(f"apiVersion must be {group}/{version['name']}")
    schema = _structural(version["schema"]["openAPIV3Schema"])
    # OpenAPI 3.0 (boolean exclusiveMinimum) is draft-4 semantics.
    jsonschema.Draft4Validator(schema).validate(obj)
