"""`Handoff`: items from another thread reach the event loop in batches, one wake-up per batch.

`call_soon_threadsafe` per item costs a self-pipe write and a loop wake-up each; under load (a PUBACK per
stream chunk at concurrency 32) that was a visible share of the worker's CPU (issue 16's profile). The
producer appends, then schedules a drain only if none is pending; the drain clears the flag before it
empties the deque, so an item appended at any moment is either drained now or schedules the next drain.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """Thread-safe under the GIL: `put` from any thread, `handle` runs on `loop` for every item, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handle: Callable[[T], None]) -> None:
        self._loop = loop
        self._handle = handle
        self._items: collections.deque[T] = collections.deque()
        self._scheduled = False

    def put(self, item: T) -> None:
        """Queue `item` for the loop (from any thread; never blocks)."""
        self._items.append(item)  # before the flag test: a drain that already reset the flag still sees it
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._scheduled = False  # before draining: an item appended from here on schedules a new drain
        while self._items:
            self._handle(self._items.popleft())
