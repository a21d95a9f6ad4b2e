"""Dynamic batching: concurrent requests are collected into one model call.

A batch closes when it holds `max_batch_size` requests or `max_wait_s` after its first request
arrived, whichever comes first; while a batch runs, the next one fills up. Batches run one at a
time on a single worker thread, so the model (one device) never sees two calls at once and the
event loop stays free to answer /health and /metrics during a long generation.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
log = logging.getLogger(__name__)


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int,
        max_wait_s: float,
        executor: Executor,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1 and max_wait_s >= 0, got {max_batch_size}, {max_wait_s}")
        self.run_batch, self.max_batch_size, self.max_wait_s = run_batch, max_batch_size, max_wait_s
        self.executor, self.on_batch = executor, on_batch
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Call from the running event loop (the app's startup)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, item: Item) -> Result:
        """The result of `run_batch` for this item, computed together with whatever else is waiting."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():  # requests that queued during the previous batch join at once
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [(item, future) for item, future in batch if not future.done()]  # drop cancelled requests
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [item for item, _ in batch])
            except Exception as e:  # a bug or an out-of-memory error: fail this batch, keep serving
                log.exception("a batch of %d requests failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
