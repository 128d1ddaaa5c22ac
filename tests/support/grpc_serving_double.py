"""A TEST DOUBLE of TensorFlow Serving's gRPC PredictionService (not TF Serving itself).

TF Serving cannot run on these machines; this double speaks the real wire
protocol instead: it is a ``grpc.aio`` server on a free loopback port
implementing ``tensorflow.serving.PredictionService/Predict`` with the
generated stubs of ``tensorflow-serving-api`` (``predict_pb2``,
``prediction_service_pb2_grpc``) and decoding/encoding tensors with
TensorFlow's ``make_ndarray``/``make_tensor_proto``, so the SDK's gRPC path
is exercised end to end, protobufs included.

What it mimics, for one model name:

* ``Predict`` with input ``x`` answers output ``y = 0.5 * x + 2`` as float32
  (TF Serving's half_plus_two example model).
* Another model name is ``NOT_FOUND`` ("Servable not found ..."), a missing
  ``x`` is ``INVALID_ARGUMENT``, as TF Serving answers.
* ``fail=grpc.StatusCode.X`` makes every call fail with that status (e.g.
  ``UNAVAILABLE``, ``INVALID_ARGUMENT``) after recording it.
* ``on_request`` is awaited inside the handler, e.g. to look at the store
  while the call is in flight, or to sleep past a deadline.

Needs the optional extra ``mulambda[grpc]``; import it only after
``pytest.importorskip("tensorflow_serving.apis")``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from tensorflow import make_ndarray, make_tensor_proto
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, double: TFServingGRPCDouble) -> None:
        self.double = double

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        d = self.double
        inputs = {k: make_ndarray(v) for k, v in request.inputs.items()}
        d.requests.append({
            "model": request.model_spec.name,
            "signature": request.model_spec.signature_name,
            "inputs": inputs,
        })
        if d.on_request is not None:
            await d.on_request()
        if d.fail is not None:
            await context.abort(d.fail, f"{d.name} told to fail with {d.fail.name}")
        if request.model_spec.name != d.model:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({request.model_spec.name})",
            )
        if "x" not in inputs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"input tensor alias not found in signature: {sorted(inputs)}")
        y = 0.5 * inputs["x"].astype(np.float32) + np.float32(2.0)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = d.model
        response.model_spec.signature_name = request.model_spec.signature_name
        response.outputs["y"].CopyFrom(make_tensor_proto(y.astype(np.float32)))
        return response


class TFServingGRPCDouble:
    """Loopback stand-in for one executor's TF Serving gRPC endpoint (``target``).

    ``model``: the model name it serves (default ``model-{name}``).
    ``fail``: a ``grpc.StatusCode`` every call fails with (None answers).
    ``requests``: what it was asked, as dicts of model, signature and the
    inputs decoded to numpy arrays.
    """

    def __init__(self, name: str, *, model: str | None = None,
                 fail: grpc.StatusCode | None = None,
                 on_request: Callable[[], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.model = model or f"model-{name}"
        self.fail = fail
        self.on_request = on_request
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        """``host:port`` as an executor's gRPC endpoint is published."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> TFServingGRPCDouble:
        server = grpc.aio.server()
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionService(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")  # the kernel picks a free port
        if not self.port:
            raise RuntimeError("could not bind a loopback port for the gRPC double")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
