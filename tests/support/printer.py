"""What `kubectl get` would print for a custom resource, computed by real kubectl offline.

KMock cannot answer kubectl's server-side Table requests, so the CRD's
``additionalPrinterColumns`` JSONPaths are evaluated by kubectl's own
JSONPath engine (``kubectl annotate --local -o jsonpath``), on an object as
the operator left it. The column set and paths come from crds/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from support.schemas import crds


def printer_row(obj: dict[str, Any]) -> dict[str, str]:
    """Column name -> cell text for ``obj`` (``<none>`` for empty cells, as kubectl shows)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not installed")
    crd = crds()[obj["kind"]]
    columns = [c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
               if c["type"] != "date"]
    template = '{"\\x1f"}'.join("{" + c["jsonPath"] + "}" for c in columns)
    out = subprocess.run(
        [kubectl, "annotate", "--local", "-f", "-", "printer/check=1", "-o",
         f"jsonpath={template}"],
        input=json.dumps(obj), capture_output=True, text=True, check=True,
        env={**os.environ, "KUBECONFIG": os.devnull},
    ).stdout
    cells = out.split("\x1f")
    return {c["name"].upper(): (v or "<none>") for c, v in zip(columns, cells, strict=True)}
