"""Which spec the fleet's ticks scale an executor by (operator/modelexecutor/fleet.py
``Fleet._spec``): its own when valid; when not, the last valid one, after a restart the
one its own Deployment records (``LAST_VALID_SPEC``), and nothing forged."""

from __future__ import annotations

import json
from typing import Any

import kopf
import pytest

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.operator.k8s.objects import LAST_VALID_SPEC
from mulambda.operator.modelexecutor.build import spec_annotation
from mulambda.operator.modelexecutor.fleet import MAX_SPEC_ANNOTATION, Fleet

VALID = {"model": {"name": "m", "storageUri": "s3://models/m"},
         "traits": {"type": "vision", "input": "image", "output": "label", "accuracy": 0.9},
         "scaling": {"maxReplicas": 2}}
INVALID = {**VALID, "serving": {"resources": {"limits": {"cpu": "1e9999999999"}}}}
BUILT = {**VALID, "scaling": {"maxReplicas": 5}}


def executor(spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
            "metadata": {"name": "e", "namespace": "ml", "uid": "uid-e",
                         "generation": generation},
            "spec": spec}


def deployment(annotation: str | None, owner: str = "uid-e") -> dict[str, Any]:
    annotations = {} if annotation is None else {LAST_VALID_SPEC: annotation}
    return {"kind": "Deployment",
            "metadata": {"name": "e", "namespace": "ml", "annotations": annotations,
                         "ownerReferences": [{"uid": owner}]}}


def fleet(*deployments: dict[str, Any]) -> Fleet:
    return Fleet(None, kopf.Memo(), None, None, {},  # type: ignore[arg-type]
                 {("ml", "e"): list(deployments)}, {}, lambda: True)


def max_replicas(spec: Any) -> int | None:
    return None if spec is None else spec.scaling.max_replicas


RECORDED = spec_annotation(parse_executor_spec(BUILT))


@pytest.mark.parametrize(("spec", "child", "want"), [
    # A valid spec is the spec, whatever the Deployment says.
    pytest.param(VALID, deployment(RECORDED), 2, id="valid"),
    pytest.param(VALID, deployment("[" * 5000), 2, id="valid-beside-a-forged-record"),
    # Invalid, and nothing parsed before (a restart): what the Deployment was built from.
    pytest.param(INVALID, deployment(RECORDED), 5, id="invalid-after-a-restart"),
    pytest.param(INVALID, deployment(None), None, id="nothing-recorded"),
    # Someone else's Deployment of that name (the executor reports NameConflict).
    pytest.param(INVALID, deployment(RECORDED, owner="uid-other"), None, id="not-its-own"),
    pytest.param(INVALID, deployment("[" * 5000), None, id="forged-deep-nesting"),
    pytest.param(INVALID, deployment(json.dumps({**BUILT, "pad": "x" * MAX_SPEC_ANNOTATION})),
                 None, id="forged-too-long"),
    pytest.param(INVALID, deployment('{"model": 1}'), None, id="recorded-but-invalid"),
])
def test_the_spec_the_ticks_scale_by(spec, child, want):
    assert max_replicas(fleet(child)._spec(executor(spec))) == want


def test_an_invalid_edit_keeps_the_spec_this_process_parsed_last():
    f = fleet(deployment(RECORDED))
    assert max_replicas(f._spec(executor(VALID, generation=1))) == 2
    # The one in memory, not the Deployment's (which may lag behind it).
    assert max_replicas(f._spec(executor(INVALID, generation=2))) == 2
