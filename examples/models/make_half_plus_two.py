"""Generate the tiny ``half_plus_two`` SavedModel used by tests and examples.

Run with a Python that has TensorFlow (not a dependency of mulambda)::

    python examples/models/make_half_plus_two.py [OUT_DIR]

It writes ``OUT_DIR/half_plus_two/1/`` (default OUT_DIR: this folder): a
SavedModel computing ``y = 0.5 * x + 2`` with a ``serving_default``
signature taking ``x`` (float32, shape [None]) and returning ``y``. The
weights are variables, so the version folder has the usual
``saved_model.pb`` + ``variables/`` layout TF Serving loads.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import tensorflow as tf


class HalfPlusTwo(tf.Module):
    """y = a * x + b with a = 0.5, b = 2."""

    def __init__(self) -> None:
        super().__init__()
        self.a = tf.Variable(0.5, dtype=tf.float32, name="a")
        self.b = tf.Variable(2.0, dtype=tf.float32, name="b")

    @tf.function(input_signature=[tf.TensorSpec(shape=[None], dtype=tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": self.a * x + self.b}


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    target = out / "half_plus_two" / "1"
    if target.exists():
        shutil.rmtree(target)
    module = HalfPlusTwo()
    tf.saved_model.save(module, str(target), signatures={"serving_default": module.serve})
    # Check the round trip, so a broken fixture never gets committed.
    loaded = tf.saved_model.load(str(target))
    y = loaded.signatures["serving_default"](x=tf.constant([1.0, 2.0, 5.0]))["y"].numpy()
    assert list(y) == [2.5, 3.0, 4.5], y
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
