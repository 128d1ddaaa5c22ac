"""What every ``mulambda`` entry point does with MULAMBDA_LOG_LEVEL and with a bad setting."""

from __future__ import annotations

import logging

import pytest

from mulambda import cli
from mulambda.settings import Settings, SettingsError, log_level


@pytest.mark.parametrize(("value", "want"), [
    (None, "INFO"),
    ("", "INFO"),
    ("debug", "DEBUG"),
    (" Warning ", "WARNING"),
    ("CRITICAL", "CRITICAL"),
])
def test_the_log_level_is_read_case_blind(value, want):
    assert log_level({} if value is None else {"MULAMBDA_LOG_LEVEL": value}) == want


@pytest.mark.parametrize("value", ["abc", "10", "WARN", "info level"])
def test_a_bad_log_level_names_the_variable_and_the_choices(value):
    with pytest.raises(SettingsError, match=r"MULAMBDA_LOG_LEVEL must be one of DEBUG"):
        log_level({"MULAMBDA_LOG_LEVEL": value})
    with pytest.raises(SettingsError, match="MULAMBDA_LOG_LEVEL"):
        Settings.from_env({"MULAMBDA_LOG_LEVEL": value})


@pytest.mark.parametrize(("env", "says"), [
    ({"MULAMBDA_LOG_LEVEL": "loud"}, "MULAMBDA_LOG_LEVEL must be one of"),
    ({"MULAMBDA_HEARTBEAT_TTL_SECONDS": "abc"}, "MULAMBDA_HEARTBEAT_TTL_SECONDS must be a number"),
    ({"MULAMBDA_REDIS_URL": "redis://u:secret@store:6379/0"}, "MULAMBDA_REDIS_PASSWORD"),
])
def test_a_bad_setting_is_one_line_and_exit_2_not_a_traceback(monkeypatch, capsys, env, says):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["top", "--once", "--no-kube"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and "secret@" not in err
    assert err.count("\n") == 1


def test_the_cli_logs_at_the_level_asked_for(monkeypatch):
    monkeypatch.setenv("MULAMBDA_LOG_LEVEL", "DEBUG")
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    root.handlers.clear()  # basicConfig configures only a root without handlers
    try:
        monkeypatch.setenv("MULAMBDA_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing there
        cli.main(["top", "--once", "--no-kube"])
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
