"""Store text on a terminal: what a companion or a hostile record wrote is shown, never
obeyed (no rich markup, no control sequences)."""

from __future__ import annotations

import re

from rich.text import Text

# C0 and C1 controls but the newline: an ESC from a store record cleared the screen and
# recoloured the terminal of whoever ran `mulambda top`.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character but the newline replaced by U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def shown(value: object) -> Text:
    """``value`` as a rich cell: literal text (brackets are not markup), printable."""
    return Text(printable(str(value)))
