"""The repository's operator/ folder must never shadow the standard library's operator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_repo_root_on_sys_path_does_not_shadow_stdlib_operator():
    # -S: no site, so nothing has imported `operator` before the repo root is
    # first on sys.path, the worst case (seen with TensorFlow's venv).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import operator; "
        "print(operator.__file__); operator.itemgetter(0)"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)],
                         capture_output=True, text=True, check=True).stdout
    assert not out.strip().startswith(str(ROOT))


def test_operator_package_is_importable_under_its_namespaced_name():
    import mulambda.operator.main as main

    assert Path(main.__file__).name == "main.py"
    assert main.FINALIZER == "mulambda.io/metadata"
