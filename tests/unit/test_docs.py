"""The README's configuration table documents every setting, with its real default."""

from __future__ import annotations

import re
from pathlib import Path

from mulambda.settings import SETTINGS_DOC

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_matches_settings():
    rows = dict(re.findall(r"^\| `MULAMBDA_([A-Z0-9_]+)` \| ([^|]+) \|", README.read_text(), re.M))
    assert set(rows) >= set(SETTINGS_DOC), f"undocumented: {set(SETTINGS_DOC) - set(rows)}"
    for name, (default, _help) in SETTINGS_DOC.items():
        shown = rows[name].strip()
        assert shown == (f"`{default}`" if default else "(empty)"), name
