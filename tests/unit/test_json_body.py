"""Request bodies the SDK sends (mulambda.bodies.json_body): model inputs as numpy holds
them, and a clear error for what JSON cannot hold."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest

from mulambda.bodies import json_body


@pytest.mark.parametrize(("value", "sent"), [
    pytest.param({"instances": [[1, 2]]}, {"instances": [[1, 2]]}, id="plain-lists"),
    pytest.param({"instances": np.array([[1.5, 2.0], [3.0, 4.0]], dtype=np.float32)},
                 {"instances": [[1.5, 2.0], [3.0, 4.0]]}, id="numpy-array"),
    pytest.param({"instances": [np.int64(3), np.float32(0.5), np.bool_(True)]},
                 {"instances": [3, 0.5, True]}, id="numpy-scalars"),
    pytest.param({"instances": [{"image": np.zeros((1, 2), dtype=np.uint8), "k": "v"}]},
                 {"instances": [{"image": [[0, 0]], "k": "v"}]}, id="arrays-in-named-inputs"),
])
def test_arrays_are_sent_as_the_lists_they_hold(value, sent):
    assert json.loads(json_body(value)) == sent


@pytest.mark.parametrize("bad", [object(), {1, 2}, datetime.date(2026, 1, 1)])
def test_what_json_cannot_hold_is_named(bad):
    with pytest.raises(TypeError, match=f"'{type(bad).__name__}' cannot be sent as JSON"):
        json_body({"instances": [bad]})
