"""A blocking face of :class:`~.client.MulambdaClient`, for code without an event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from mulambda.policy.selection import Candidate, Ranking

from .client import MulambdaClient
from .errors import Prediction
from .tasks import Task, TaskStatus

T = TypeVar("T")


class MulambdaClientSync:
    """Blocking wrapper: runs a :class:`MulambdaClient` on a private event-loop thread.

    Do not call it from inside a running event loop; use the async client there.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="mulambda-sdk")
        self._thread.start()

        async def make() -> MulambdaClient:
            return MulambdaClient(*args, **kwargs)  # asyncio.Lock binds to this loop

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def select(self) -> Candidate:
        return self._run(self._client.select())

    def ranking(self) -> Ranking:
        return self._run(self._client.ranking())

    def predict(self, instances: list[Any], **kwargs: Any) -> Prediction:
        return self._run(self._client.predict(instances, **kwargs))

    def predict_grpc(self, inputs: dict[str, Any], **kwargs: Any) -> Prediction:
        return self._run(self._client.predict_grpc(inputs, **kwargs))

    def submit(self, instances: list[Any], **kwargs: Any) -> Task:
        return self._run(self._client.submit(instances, **kwargs))

    def result(self, task_id: str, wait: float = 0.0) -> TaskStatus:
        return self._run(self._client.result(task_id, wait))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> MulambdaClientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
