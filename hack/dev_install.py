"""Developer install: the mulambda package as symlinks into this checkout.

``pip install -e`` cannot serve this layout well: operator/ and companion/
are installed as ``mulambda.operator`` / ``mulambda.companion`` (operator/
must never be importable as the top-level ``operator``), which the lenient
editable finder does not resolve for namespace portions, and the strict mode
links files once, so an edited file that an editor replaces goes stale.
Here site-packages/mulambda is a real folder whose entries are symlinks to
the checkout's mulambda/*, plus ``operator`` and ``companion``: every edit is
live and mypy sees an installed package. Run after ``pip install '.[test]'``
(which brings the dependencies); run again after adding a top-level module
under mulambda/.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    target = Path(sysconfig.get_paths()["purelib"]) / "mulambda"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for entry in (ROOT / "mulambda").iterdir():
        if entry.name != "__pycache__":
            (target / entry.name).symlink_to(entry)
    (target / "operator").symlink_to(ROOT / "operator")
    (target / "companion").symlink_to(ROOT / "companion")
    print(f"mulambda -> {ROOT} (symlinks in {target})")


if __name__ == "__main__":
    main()
