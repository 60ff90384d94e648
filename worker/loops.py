"""`Loops`: the worker's long-running background tasks (intake, telemetry, health), supervised.

A background loop that dies quietly leaves a worker "ready but deaf": status says `ready` while nothing
is answered. So a loop may end in exactly one way, by `stop()`; an exception (logged with its
traceback) or a loop that returns on its own calls `on_fatal`, which drains, publishes `offline` and
makes the process exit non-zero so systemd, compose or the supervisor restarts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Loops:
    """See the module docstring."""

    def __init__(self, on_fatal: Callable[[str], None]) -> None:
        self._on_fatal = on_fatal
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[str] = set()

    def start(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as the loop `name`; it must run until `stop(name)`."""
        task = asyncio.create_task(coro, name=name)  # supervised: _ended reports its end
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._ended(name, t))

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(name, None)
        if name in self._stopping:
            self._stopping.discard(name)
            return
        if task.cancelled():
            log.error("loop.cancelled", loop=name)
        elif (exc := task.exception()) is not None:
            log.error("loop.failed", loop=name, exc_info=exc)
        else:
            log.error("loop.ended", loop=name, reason="returned while the worker was serving")
        self._on_fatal(name)

    async def stop(self, *names: str) -> None:
        """Cancel these loops (all when none named) and wait until they have ended."""
        tasks = []
        for name in names or tuple(self._tasks):
            task = self._tasks.get(name)
            if task is not None:
                self._stopping.add(name)
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks)
