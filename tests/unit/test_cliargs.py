"""Command-line arguments and inputs the tools refuse in one line (exit 2), not with a
traceback or a silently odd result."""

from __future__ import annotations

import argparse
import json

import pytest

from mulambda.cli import main
from mulambda.cliargs import port, positive_int, positive_seconds


@pytest.mark.parametrize(("parse", "text", "value"), [
    (port, "8080", 8080), (port, "1", 1), (port, "65535", 65535),
    (port, "0", None), (port, "99999", None), (port, "http", None),
    (positive_int, "3", 3), (positive_int, "0", None), (positive_int, "-1", None),
    (positive_seconds, "0.5", 0.5), (positive_seconds, "0", None),
    (positive_seconds, "nan", None), (positive_seconds, "inf", None),
    (positive_seconds, "soon", None),
])
def test_argument_types(parse, text: str, value) -> None:
    if value is None:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    else:
        assert parse(text) == value


@pytest.mark.parametrize("argv", [
    ["ping", "--port", "99999"],
    ["top", "--once", "--limit", "-1"],
    ["simulate", "--requests", "0"],
    ["selector", "--port", "0"],
])
def test_bad_numbers_are_usage_errors(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("tool", [["explain", "apps/shop"], ["top", "--once", "--no-kube"]])
def test_a_store_url_without_a_scheme_is_one_line(tool, capsys) -> None:
    assert main([*tool, "--redis-url", "localhost:6391"]) == 2
    err = capsys.readouterr().err
    assert "must start with redis://" in err and "Traceback" not in err


@pytest.mark.parametrize(("name", "text", "says"), [
    ("missing.yaml", None, "cannot read the scenario"),
    ("list.yaml", "- a\n- b\n", "must be a mapping of settings, not list"),
    ("broken.yaml", "a: [\n", "does not parse"),
    ("broken.json", "{", "does not parse"),
    ("short.json", json.dumps({"requests": 5}), "it has no 'rate_per_s'"),
])
def test_a_bad_scenario_file_is_one_line(tmp_path, caplog, name, text, says) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main(["simulate", "--scenario", str(path)]) == 2
    assert says in caplog.text
