"""The docs say what the code does: settings tables, condition reasons, benchmarks, cited tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mulambda.policy.scaling import Reason
from mulambda.settings import COMPANION_SETTINGS_DOC, SETTINGS_DOC

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DESIGN = REPO / "docs" / "design.md"
BENCH_README = REPO / "bench" / "README.md"

_ROW = re.compile(r"^\| `MULAMBDA_([A-Z0-9_]+)` \| ([^|]+) \|", re.M)


def test_readme_configuration_table_matches_settings():
    rows = dict(_ROW.findall(README.read_text()))
    assert set(rows) >= set(SETTINGS_DOC), f"undocumented: {set(SETTINGS_DOC) - set(rows)}"
    for name, (default, _help) in SETTINGS_DOC.items():
        shown = rows[name].strip()
        assert shown == (f"`{default}`" if default else "(empty)"), name


def _section(text: str, heading: str) -> str:
    """The body of the Markdown section ``heading`` up to the next heading of any level."""
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(r"^#{1,6} ", text[start:], re.M)
    return text[start:start + following.start()] if following else text[start:]


def test_readme_companion_table_lists_every_companion_setting_with_its_default():
    rows = {k: v.strip() for k, v in _ROW.findall(_section(README.read_text(), "### Companion"))}
    missing = set(COMPANION_SETTINGS_DOC) - set(rows)
    assert not missing, f"companion settings missing from the README: {sorted(missing)}"
    for name, (default, _help) in COMPANION_SETTINGS_DOC.items():
        # A literal value is shown in backticks; a described one ("TTL / 3") may be plain.
        allowed = {f"`{default}`", default} if default else {"(empty)"}
        assert rows[name] in allowed, f"MULAMBDA_{name}: README shows {rows[name]!r}"
    # Credentials are not settings, but the companion needs them from its Secret.
    assert {"S3_ACCESS_KEY", "S3_SECRET_KEY"} <= set(rows)


def _calls(source: str, name: str) -> list[str]:
    """Argument text of every call ``name(...)`` in ``source`` (balanced parentheses)."""
    out = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(name)}\(", source):
        depth, i = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append(source[match.end():i - 1])
    return out


def operator_reasons() -> tuple[set[str], set[str]]:
    """(literal reasons, f-string reason templates) the operator can set or emit."""
    literal: set[str] = set()
    templates: set[str] = set()
    sources = sorted((REPO / "operator").rglob("*.py"))
    for path in sources:
        src = path.read_text()
        for args in _calls(src, "condition"):
            m = re.match(r'\s*"[A-Za-z]+",\s*(?:TRUE|FALSE|UNKNOWN),\s*"([A-Za-z]+)"', args)
            if m:
                literal.add(m[1])
        for args in _calls(src, "_fail"):
            m = re.search(r'"([A-Z][A-Za-z]+)"', args)
            if m:
                literal.add(m[1])
        # Events (kopf.info/warn, or Event values the handlers emit) and failure statuses.
        for call in ("kopf.info", "kopf.warn", "Event.normal", "Event.warning", "kind.failure"):
            for args in _calls(src, call):
                m = re.search(r'\breason=(f?)"([^"]+)"(?:\s+if\s.+?\selse\s+"([^"]+)")?', args,
                              re.S)
                if m is None:
                    continue
                (templates if m[1] else literal).add(m[2])
                if m[3]:
                    literal.add(m[3])
    # The autoscaler emits the decision's reason as the Event reason.
    autoscaler = (REPO / "operator" / "modelexecutor" / "autoscale.py").read_text()
    assert "reason=str(decision.reason)" in autoscaler
    literal |= {str(r) for r in Reason}
    return literal, templates


def test_reason_extraction_finds_the_known_reasons():
    literal, templates = operator_reasons()
    assert {"InvalidSpec", "StoreUnavailable", "ModelServing", "NameConflict", "Selected",
            "NoMatchingExecutor", "ColdStart", "SelectionChanged", "RolloutComplete",
            "NoHeartbeat", "CreatedWorkload", "UpdatedWorkload", "Activate"} <= literal
    assert {"Created{kind}", "Updated{kind}"} <= templates


def test_design_doc_names_every_reason_the_operator_can_set():
    design = DESIGN.read_text()
    literal, templates = operator_reasons()
    missing = sorted(r for r in literal if f"`{r}`" not in design)
    assert not missing, f"reasons missing from docs/design.md: {missing}"
    for template in templates:
        # Created{kind} -> `Created` + a CamelCase word, e.g. `CreatedDeployment`.
        pattern = "`" + re.sub(r"\\\{[^}]*\\\}", "[A-Z][A-Za-z]+", re.escape(template)) + "`"
        assert re.search(pattern, design), f"no instance of {template!r} in docs/design.md"


def test_bench_readme_describes_every_benchmark():
    text = BENCH_README.read_text()
    scripts = sorted(p.name for p in (REPO / "bench").glob("*.py"))
    assert scripts, "no benchmarks found"
    for name in scripts:
        heading = re.search(rf"^## .*bench/{re.escape(name)}.*$", text, re.M)
        assert heading, f"bench/README.md has no section for {name}"
        body = _section(text, heading[0])
        assert f"python bench/{name}" in body, f"{name}: no command"
        assert "Target" in body, f"{name}: no target"
        assert "Duration" in body, f"{name}: no duration"


def _defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_cited_in_the_docs_exists():
    cited = set()
    for doc in (DESIGN, REPO / "docs" / "operations.md", BENCH_README):
        cited |= set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", doc.read_text()))
    assert len(cited) >= 20, "the failure table cites the tests that show each behaviour"
    missing = []
    for rel, name in sorted(cited):
        path = REPO / rel
        if not path.is_file() or name not in _defined_functions(path):
            missing.append(f"{rel}::{name}")
    assert not missing, f"cited tests that do not exist: {missing}"


def test_install_doc_shows_the_acl_each_role_gets_now():
    """The role table and the printed ACL SETUSER commands in docs/install.md are the
    ones mulambda/store/acl.py gives (a changed role that the doc still shows the old
    way would have operators set up a store that refuses the new commands)."""
    from mulambda.store.acl import ROLES, key_rules, setuser_command

    text = (REPO / "docs" / "install.md").read_text()
    for role in ROLES.values():
        row = next(line for line in text.splitlines()
                   if line.startswith("| ") and f"| `{role.username}` |" in line)
        assert f"`{' '.join(key_rules(role, 'P'))}`" in row, role.name
        assert f"`{' '.join(c.upper() for c in role.commands)}`" in row, role.name
        assert f"    {setuser_command(role, 'mulambda')}\n" in text, role.name
