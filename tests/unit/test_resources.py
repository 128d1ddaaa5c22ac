"""Spec parsing: what the CRD schema cannot catch is caught here with a usable message."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from mulambda.api.client import parse_client_spec
from mulambda.api.common import SpecError, parse_quantity
from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.storage.layout import parse_s3_uri

from support.schemas import validate_custom

GOOD = {
    "model": {"name": "m", "storageUri": "s3://bucket/models/m"},
    "traits": {"type": "sentiment", "input": "text/plain", "output": "label", "accuracy": 0.8},
}


def _with(path: str, value):
    spec = copy.deepcopy(GOOD)
    node = spec
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return spec


def test_good_spec_parses_with_defaults():
    parsed = parse_executor_spec(GOOD)
    assert parse_s3_uri(parsed.model.storage_uri) == ("bucket", "models/m")
    assert parsed.scaling.min_replicas == 1 and parsed.scaling.max_replicas == 3


@pytest.mark.parametrize(
    "path,value,needle",
    [
        ("scaling.minReplicas", 5, "must not exceed scaling.maxReplicas"),
        ("serving.resources", {"limits": {"cpu": "lots"}}, "spec.serving.resources.limits.cpu"),
        ("serving.resources", {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}},
         "exceeds limits.memory"),
        ("model.storageUri", "http://bucket/m", "must look like s3://BUCKET/PREFIX"),
        ("traits.accuracy", 1.5, "traits.accuracy"),
        # Times demand made it infinite, which stopped the autoscaler's tick.
        ("traits.serviceTimeMs", 1e308, "traits.serviceTimeMs"),
        # Its analysis waited forever for requests that never came.
        ("rollout", {"strategy": "Canary", "weight": 0}, "weight of at least 1"),
    ],
)
def test_bad_spec_gives_an_actionable_message(path, value, needle):
    with pytest.raises(SpecError) as err:
        parse_executor_spec(_with(path, value))
    assert needle in str(err.value)


def test_quantities_parse_like_kubernetes():
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("1Gi") == 2**30
    assert parse_quantity(2) == 2
    with pytest.raises(ValueError):
        parse_quantity("1 GB")
    for typo in ("512mi", "1ki", "2ni"):  # lower-case binary suffixes do not exist
        with pytest.raises(ValueError, match="not a Kubernetes quantity"):
            parse_quantity(typo)


@pytest.mark.parametrize("quantity", ["512mi", "1e9999999999", "1.2.3"])
def test_quantity_typo_in_a_spec_is_a_spec_error_not_a_crash(quantity):
    # "1e9999999999" overflowed Decimal: not a ValueError, it passed every check and
    # stopped the operator's autoscaler tick for the whole fleet.
    with pytest.raises(SpecError, match=r"spec\.serving\.resources\.limits\.memory"):
        parse_executor_spec(_with("serving.resources", {"limits": {"memory": quantity}}))


def test_client_spec_rejects_negative_weights():
    with pytest.raises(SpecError, match=r"preferences\.latency"):
        parse_client_spec({"criteria": {"type": "t"}, "preferences": {"latency": -1}})


@pytest.mark.parametrize(("preferences", "ok"), [
    ({"latency": 0, "accuracy": 0}, False),
    ({"latency": 0, "accuracy": 1}, True),
    ({"latency": 0.5}, True),  # accuracy defaults to 1
])
def test_client_spec_refuses_preferences_that_are_both_zero(preferences, ok):
    spec = {"criteria": {"type": "t"}, "preferences": preferences}
    if ok:
        assert parse_client_spec(spec).preferences.latency == preferences["latency"]
    else:
        with pytest.raises(SpecError, match="must not both be 0"):
            parse_client_spec(spec)


def _executor(spec):
    return {"apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
            "metadata": {"name": "x"}, "spec": spec}


def test_crd_schema_accepts_good_and_rejects_bad_executors():
    validate_custom(_executor(GOOD))
    for bad in (_with("traits.accuracy", 2), _with("scaling.maxReplicas", 0),
                _with("model.name", "Bad Name"), _with("model.storageUri", "s3://x"),
                _with("traits.colour", "blue")):
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(_executor(bad))


def test_crd_schema_rejects_negative_client_preferences():
    client = {"apiVersion": "mulambda.io/v1alpha1", "kind": "Client", "metadata": {"name": "c"},
              "spec": {"criteria": {"type": "t"}, "preferences": {"accuracy": -0.1}}}
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(client)
    client["spec"]["preferences"]["accuracy"] = 0
    validate_custom(client)


def test_crds_have_status_subresource_short_names_and_printer_columns():
    root = Path(__file__).resolve().parents[2] / "crds"
    for path in root.glob("*.mulambda.io.yaml"):  # not crds/kustomization.yaml
        crd = yaml.safe_load(path.read_text())
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert crd["spec"]["names"]["shortNames"]
        names = [c["name"] for c in version["additionalPrinterColumns"]]
        assert "Ready" in names and names[-1] == "Age"
