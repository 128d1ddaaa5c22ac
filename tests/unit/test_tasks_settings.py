"""Task and worker settings: defaults from the documented tables, bad values named."""

from __future__ import annotations

import pytest

from mulambda.settings import CompanionSettings, SelectorSettings, SettingsError
from mulambda.tasks.records import TaskOptions

COMPANION = {"MULAMBDA_EXECUTOR": "ml/hp2", "MULAMBDA_MODEL_URI": "s3://models/hp2"}


def test_defaults_are_the_documented_ones():
    assert SelectorSettings.from_env({}).tasks == TaskOptions(
        max_payload_bytes=1048576, ttl_seconds=86400, result_ttl_seconds=3600, max_attempts=3)
    c = CompanionSettings.from_env(COMPANION)
    assert (c.worker_concurrency, c.task_visibility, c.task_drain,
            c.task_predict_timeout) == (4, 30.0, 20.0, 300.0)


def test_values_are_read():
    s = SelectorSettings.from_env({"MULAMBDA_TASK_MAX_PAYLOAD_BYTES": "10",
                                   "MULAMBDA_TASK_MAX_ATTEMPTS": "5",
                                   "MULAMBDA_TASK_RESULT_TTL_SECONDS": "60"})
    assert (s.tasks.max_payload_bytes, s.tasks.max_attempts,
            s.tasks.result_ttl_seconds) == (10, 5, 60.0)
    c = CompanionSettings.from_env({**COMPANION, "MULAMBDA_WORKER_CONCURRENCY": "0",
                                    "MULAMBDA_TASK_VISIBILITY_SECONDS": "2.5"})
    assert (c.worker_concurrency, c.task_visibility) == (0, 2.5)


@pytest.mark.parametrize(("section", "variable", "value"), [
    ("selector", "TASK_MAX_PAYLOAD_BYTES", "0"),
    ("selector", "TASK_MAX_ATTEMPTS", "0"),
    ("selector", "TASK_TTL_SECONDS", "soon"),
    ("companion", "WORKER_CONCURRENCY", "-1"),
    ("companion", "TASK_VISIBILITY_SECONDS", "0"),
    ("companion", "TASK_PREDICT_TIMEOUT_SECONDS", "0"),
])
def test_bad_values_name_the_variable(section, variable, value):
    environ = {f"MULAMBDA_{variable}": value}
    with pytest.raises(SettingsError, match=f"MULAMBDA_{variable}"):
        if section == "selector":
            SelectorSettings.from_env(environ)
        else:
            CompanionSettings.from_env({**COMPANION, **environ})
