"""Listen to a broker for a few seconds: what a one-shot client tool reads before it answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from worker.transport.bus import Bus


async def listen(bus: Bus, filters: list[str], handle: Callable[[str, bytes], object], seconds: float) -> None:
    """Subscribe to `filters` and pass every message (acked) to `handle` for `seconds`.

    Retained messages come right after the subscription is granted, so a short wait collects them. The
    reader is supervised here: if it fails, its error is raised, never a silently empty result.
    """

    async def read() -> None:
        while True:
            msg = await bus.messages()
            bus.ack(msg)
            handle(msg.topic, msg.payload)

    reader = asyncio.create_task(read())  # supervised: awaited (and its failure raised) below
    try:
        await bus.subscribe(filters)
        await asyncio.wait({reader}, timeout=seconds)
        if reader.done():
            reader.result()  # it can only have ended by failing: say so
    finally:
        reader.cancel()
