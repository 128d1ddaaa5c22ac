"""A blocking face of :class:`~.client.MulambdaClient`, for code without an event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sized
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
        self._start(lambda: MulambdaClient(*args, **kwargs))

    @classmethod
    def from_env(cls, **options: Any) -> MulambdaClientSync:
        """:meth:`MulambdaClient.from_env`, blocking."""
        self = cls.__new__(cls)
        self._start(lambda: MulambdaClient.from_env(**options))
        return self

    def _start(self, make: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="mulambda-sdk")
        self._thread.start()

        async def made() -> MulambdaClient:
            return make()  # type: ignore[no-any-return]  # its asyncio.Lock binds here

        try:
            self._client = self._run(made())
        except BaseException:
            self._stop()  # a refused argument left the loop's thread running
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def select(self) -> Candidate:
        return self._run(self._client.select())

    def ranking(self, items: int = 1, **kwargs: Any) -> Ranking:
        return self._run(self._client.ranking(items, **kwargs))

    def predict(self, instances: Sized, **kwargs: Any) -> Prediction:
        return self._run(self._client.predict(instances, **kwargs))

    def predict_grpc(self, inputs: dict[str, Any], **kwargs: Any) -> Prediction:
        return self._run(self._client.predict_grpc(inputs, **kwargs))

    def submit(self, instances: Sized, **kwargs: Any) -> Task:
        return self._run(self._client.submit(instances, **kwargs))

    def result(self, task_id: str, wait: float = 0.0) -> TaskStatus:
        return self._run(self._client.result(task_id, wait))

    def status(self, task_id: str) -> TaskStatus:
        return self._run(self._client.tasks.status(task_id))

    def cancel(self, task_id: str) -> TaskStatus:
        return self._run(self._client.tasks.cancel(task_id))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> MulambdaClientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
