"""Package layout: operator/ never shadows the standard library's operator; the tools stay light."""

from __future__ import annotations

import ast
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


# What the console script `mulambda` runs (the project's entry point), started
# the way the script starts it: no runpy, unlike `python -m mulambda`.
MULAMBDA = "from mulambda.cli import main; raise SystemExit(main())"


def test_tools_import_neither_kopf_nor_kubernetes_nor_an_s3_client(tmp_path: Path):
    code = ("import sys, mulambda.tools.models, mulambda.tools.simulate; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    loaded = set(ast.literal_eval(out))
    assert "mulambda" in loaded
    assert not loaded & {"kopf", "kubernetes", "minio", "urllib3", "redis"}


# Start-up cost is what a command imports: counted, not timed (a timed test fails on
# a loaded machine and passes on a slow import that happens to run on an idle one).
HEAVY_STDLIB = {"asyncio", "ssl", "socket", "http", "email", "concurrent", "multiprocessing",
                "json", "logging", "urllib", "xml", "sqlite3", "decimal"}


def test_models_help_imports_argparse_and_little_else(tmp_path: Path):
    """`mulambda models --help` loads beyond `import argparse` only mulambda's CLI modules
    and light standard-library ones: no third-party package, nothing from HEAVY_STDLIB."""
    dump = ("import atexit, sys; "
            "atexit.register(lambda: print(sorted(sys.modules), file=sys.stderr)); ")

    def modules(code: str, *args: str) -> set[str]:
        done = subprocess.run([sys.executable, "-c", dump + code, *args], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return set(ast.literal_eval(done.stderr.strip().splitlines()[-1]))

    extra = modules(MULAMBDA, "models", "--help") - modules("import argparse")
    tops = {name.split(".")[0] for name in extra}
    assert "mulambda" in tops
    assert tops - {"mulambda"} <= set(sys.stdlib_module_names), tops
    assert not tops & HEAVY_STDLIB, sorted(tops & HEAVY_STDLIB)
    assert len(extra) <= 40, sorted(extra)  # 24 today: a budget, not a snapshot
