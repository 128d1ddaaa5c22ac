"""How the SDK calls one model: TF Serving's REST and gRPC predict APIs.

Each call maps the outcome to what failover needs: :class:`~.errors.Retryable`
when another candidate may succeed (connection errors, timeouts, 5xx,
UNAVAILABLE...), :class:`~.errors.PredictionRejected` when the request
itself is wrong (4xx, INVALID_ARGUMENT...), else the model's answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from mulambda.bodies import JSON_HEADERS, MAX_ANSWER_BYTES, BodyTooLarge, collect
from mulambda.policy.selection import Candidate

from .counting import Wire
from .errors import MissingExtra, PredictionRejected, Retryable


def wire_trace(wire: Wire) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """httpx's ``trace`` extension filling ``wire`` (HTTP/1.1 and HTTP/2 alike)."""

    async def trace(event: str, _info: dict[str, Any]) -> None:
        if event.endswith("send_request_body.complete"):
            wire.sent = time.perf_counter()
        elif event.endswith("receive_response_headers.complete"):
            wire.back = time.perf_counter()

    return trace


async def rest_predict(http: httpx.AsyncClient, candidate: Candidate, body: bytes,
                       attempt_timeout: float, wire: Wire) -> Any:
    """POST ``body`` (JSON, :func:`mulambda.bodies.json_body`) to
    ``{url}/v1/models/{model}:predict``; the ``predictions``.

    ``url`` is the chosen replica's pod address or the executor's Service
    (:attr:`~mulambda.policy.selection.Candidate.url`). ``attempt_timeout``
    bounds the whole attempt: httpx's timeouts bound each read, and an answer
    trickling a byte at a time held an attempt for as long as it trickled.
    ``wire`` learns when it was on the wire.
    """
    record = candidate.record
    url = f"{candidate.url.rstrip('/')}/v1/models/{record.model}:predict"
    try:
        async with asyncio.timeout(attempt_timeout):
            async with http.stream("POST", url, content=body, headers=JSON_HEADERS,
                                   timeout=attempt_timeout,
                                   extensions={"trace": wire_trace(wire)}) as resp:
                answer = await collect(resp.aiter_bytes(), MAX_ANSWER_BYTES, "answer")
    except BodyTooLarge as exc:
        raise Retryable(str(exc)) from exc
    except TimeoutError as exc:
        raise Retryable(f"no whole answer within {attempt_timeout:g}s") from exc
    except httpx.TransportError as exc:  # connect / read errors and timeouts
        raise Retryable(f"{type(exc).__name__}: {exc}") from exc
    text = answer.decode("utf-8", "replace")
    if resp.status_code >= 500:
        raise Retryable(f"HTTP {resp.status_code}: {text[:200]}")
    if resp.status_code >= 400:
        raise PredictionRejected(candidate.executor_id, resp.status_code, text)
    try:
        return json.loads(answer)["predictions"]
    except (ValueError, KeyError, TypeError) as exc:  # TypeError: JSON but not an object
        raise Retryable(f"malformed answer: {text[:200]}") from exc



class GrpcTransport:
    """TF Serving's gRPC PredictionService, one channel per target.

    Needs the optional extra ``mulambda[grpc]`` (tensorflow-serving-api, which
    pulls in TensorFlow): imported when the first instance is made, and
    :class:`~.errors.MissingExtra` when it is not installed.
    """

    def __init__(self) -> None:
        try:
            import grpc
            import tensorflow as tf
            from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
        except ImportError as exc:
            raise MissingExtra(
                "gRPC predictions need the optional extra: pip install 'mulambda[grpc]' "
                f"(tensorflow-serving-api, grpcio); import failed: {exc}"
            ) from exc
        self._grpc, self._tf = grpc, tf
        self._predict_pb2, self._service = predict_pb2, prediction_service_pb2_grpc
        self._retry_codes = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                             grpc.StatusCode.RESOURCE_EXHAUSTED}
        self._channels: dict[str, Any] = {}

    async def predict(self, candidate: Candidate, inputs: dict[str, Any], signature_name: str,
                      attempt_timeout: float) -> dict[str, Any]:
        """Call ``Predict`` on the candidate; output tensor name -> numpy array."""
        grpc, tf = self._grpc, self._tf
        target = candidate.record.grpc
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.aio.insecure_channel(target)
        stub = self._service.PredictionServiceStub(channel)
        request = self._predict_pb2.PredictRequest()
        request.model_spec.name = candidate.record.model
        request.model_spec.signature_name = signature_name
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        try:
            response = await stub.Predict(request, timeout=attempt_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in self._retry_codes:
                raise Retryable(f"gRPC {exc.code().name}: {exc.details()}") from exc
            raise PredictionRejected(candidate.executor_id, exc.code().name,
                                     exc.details() or "") from exc
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
