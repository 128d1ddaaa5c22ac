"""Request bodies the SDK sends (mulambda.bodies.json_body): model inputs as numpy holds
them, and a clear error for what JSON cannot hold."""

from __future__ import annotations

import datetime
import json
import math

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


def test_the_body_is_as_compact_as_httpx_writes_it():
    # httpx's json= (what predict() sent before): no spaces, UTF-8 as it is.
    assert json_body({"instances": [[1, 2]], "text": "héllo"}) == (
        '{"instances":[[1,2]],"text":"héllo"}'.encode())


@pytest.mark.parametrize("bad", [math.nan, math.inf, np.array([np.nan])])
def test_nan_and_infinities_are_refused_as_before(bad):
    with pytest.raises(ValueError, match="not JSON compliant"):
        json_body({"instances": [bad]})


def test_a_tolist_that_does_not_give_plain_values_is_refused():
    class Endless:
        def tolist(self) -> Endless:
            return Endless()

    with pytest.raises(TypeError, match="'Endless' cannot be sent as JSON"):
        json_body({"instances": [Endless()]})
