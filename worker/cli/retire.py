"""`vllm-worker fleet --retire ID`: remove a worker that will not come back from every view.

Its retained status is emptied (fleet views, the console and takeover forget it), and so is every
retained Home Assistant discovery config it published (Home Assistant removes its sensors).
"""

from __future__ import annotations

import uuid

from worker.cli.listen import listen
from worker.cli.terminal import say
from worker.config import BrokerConfig
from worker.fleet.homeassistant import config_filter
from worker.transport.bus import Bus

LISTEN_S = 1.5
"""How long retained discovery configs are collected (the broker sends them right after SUBACK)."""


async def retire(broker: BrokerConfig, worker_id: str, *, topic_prefix: str, ha_prefix: str) -> int:
    """Empty the worker's retained status and discovery configs; 0."""
    found: set[str] = set()

    def note(topic: str, payload: bytes) -> None:
        if payload:
            found.add(topic)

    async with Bus(broker, f"retire-{uuid.uuid4().hex[:8]}") as bus:
        await listen(bus, [config_filter(ha_prefix, worker_id)], note, LISTEN_S)
        for topic in [f"{topic_prefix}vllm-worker/{worker_id}/status", *sorted(found)]:
            await bus.publish(topic, b"", qos=1, retain=True)
    say(f"retired {worker_id}: its status and {len(found)} Home Assistant config(s) removed")
    return 0
