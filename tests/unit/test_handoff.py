"""Handoff: items put from another thread all reach the loop, in order, with one wake-up per batch."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from support import until

from worker.handoff import Handoff


class CountingLoop:
    """The running loop, counting the wake-ups asked of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.wakeups = 0

    def call_soon_threadsafe(self, callback: Any, *args: Any) -> None:
        self.wakeups += 1
        self.loop.call_soon_threadsafe(callback, *args)


async def test_a_batch_put_while_the_loop_is_busy_costs_one_wakeup_and_keeps_its_order():
    loop = CountingLoop(asyncio.get_running_loop())
    seen: list[int] = []
    handoff: Handoff[int] = Handoff(loop, seen.append)  # type: ignore[arg-type]
    producer = threading.Thread(target=lambda: [handoff.put(i) for i in range(1000)])
    producer.start()
    producer.join()  # the loop is blocked here: nothing can be drained yet
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == list(range(1000))
    assert loop.wakeups == 1


async def test_items_put_after_a_drain_schedule_the_next_one():
    loop = CountingLoop(asyncio.get_running_loop())
    seen: list[int] = []
    handoff: Handoff[int] = Handoff(loop, seen.append)  # type: ignore[arg-type]
    for batch in range(3):
        threading.Thread(target=handoff.put, args=(batch,)).start()
        await until(lambda b=batch: len(seen) > b)
    assert seen == [0, 1, 2]
    assert loop.wakeups == 3


async def test_racing_producers_lose_nothing():
    seen: list[int] = []
    handoff: Handoff[int] = Handoff(asyncio.get_running_loop(), seen.append)
    threads = [
        threading.Thread(target=lambda k=k: [handoff.put(k * 10_000 + i) for i in range(5_000)]) for k in range(4)
    ]
    for t in threads:
        t.start()
    await until(lambda: len(seen) == 20_000)
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(k * 10_000 + i for k in range(4) for i in range(5_000))
    for k in range(4):  # each producer's items stay in its order
        assert [x for x in seen if x // 10_000 == k] == [k * 10_000 + i for i in range(5_000)]
