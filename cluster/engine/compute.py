"""One compute thread: blocking model calls run there, never on the asyncio event loop.

Torch calls block; running them on an event loop would stall streaming and cancellation. A
single worker serialises the calls in submission order (FIFO), so no model is entered by two
threads at once and the order of calls is the order they were submitted in (the async engine
relies on it: a cancel submitted after a submit sees the job). Tagged calls (a job id) leave
their wall-clock interval in a bounded history, so tests and operators can see what ran when
(e.g. that the VAE decode of chunk k overlapped a DiT step of the same job). Plain Python.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

HISTORY = 1024  # tagged calls remembered


class ComputeThread:
    """Runs callables in one worker thread and awaits them from the event loop.

    Args:
        name: prefix of the worker thread's name.
    """

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._history: collections.deque[tuple[str, float, float]] = collections.deque(maxlen=HISTORY)

    def submit(self, fn: Callable[..., Any], *args: Any, tag: str | None = None) -> "asyncio.Future[Any]":
        """Schedule ``fn(*args)`` (after every call submitted before); returns an awaitable
        future on the running loop."""
        work = fn if tag is None else self._timed(fn, tag)
        return asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    async def call(self, fn: Callable[..., Any], *args: Any, tag: str | None = None) -> Any:
        """``await`` the result of ``fn(*args)`` run in the compute thread."""
        return await self.submit(fn, *args, tag=tag)

    def intervals(self, tag: str) -> list[tuple[float, float]]:
        """(start, end) ``time.time()`` seconds of the remembered calls tagged ``tag``, oldest first."""
        return [(start, end) for t, start, end in self._history if t == tag]

    def close(self) -> None:
        """Stop the worker once the calls already submitted have run."""
        self._pool.shutdown(wait=False)

    def _timed(self, fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            start = time.time()
            try:
                return fn(*args)
            finally:
                self._history.append((tag, start, time.time()))

        return run
