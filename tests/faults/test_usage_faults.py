"""Usage counters under random fault schedules (issue 31): every count lands in Redis exactly once.

Three workers' state layers (each its own `RedisState`, as three processes would hold) count requests
while a seeded schedule stops Redis, restarts it and pauses it (SIGSTOP: calls time out while the
script may still run when Redis resumes, the case where a retry would count twice). Whatever the
schedule, once Redis answers again the fleet's counters equal the sum of what was recorded, per client
and for the project, and nothing is left queued.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from worker.config import WorkerConfig
from worker.state import Counts, Usage, open_state
from worker.state.usage import PROJECT_WIDE, TOTAL

CLIENTS = ["a", "b", "c", "d"]


def state_config(url: str) -> WorkerConfig:
    return WorkerConfig.model_validate({"state": {"url": url, "op_timeout_s": 0.2, "lease_s": 1.0}})


class Faults:
    """A seeded schedule of what happens to Redis between bursts of counted requests."""

    def __init__(self, redis_server, seed: int) -> None:
        self.redis = redis_server
        self.rng = random.Random(seed)  # noqa: S311 - a reproducible schedule, not a secret
        self.paused = False

    async def step(self) -> str:
        """One step: a pause may end first (so the steps after a pause may count while Redis is paused)."""
        if self.paused and self.rng.random() < 0.5:
            self.resume()
        step = self.rng.choice(["count", "count", "stop", "pause"])
        if step == "stop" and not self.paused:
            self.redis.stop(keep=True)
            await asyncio.sleep(self.rng.uniform(0.1, 0.6))
            self.redis.start()
        elif step == "pause" and not self.paused:
            os.kill(self.redis.proc.pid, signal.SIGSTOP)  # calls time out; their scripts run on SIGCONT
            self.paused = True
        return step

    def resume(self) -> None:
        if self.paused:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
            self.paused = False


async def count_burst(faults: Faults, states: list, expected: dict[str, Counts]) -> None:
    rng = faults.rng
    for _ in range(rng.randint(1, 40)):
        client = rng.choice(CLIENTS)
        counts = Counts(requests=1, prompt_tokens=rng.randint(0, 500), completion_tokens=rng.randint(0, 64))
        expected[client] = expected.get(client, Counts()) + counts
        recording = rng.choice(states).record_usage(Usage("general", client, counts))
        if recording is not None:
            await asyncio.wait_for(recording, 2.0)  # never waits longer than an op timeout


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_counts_land_exactly_once_whatever_the_fault_schedule(redis_server, seed):
    faults = Faults(redis_server, seed)
    expected: dict[str, Counts] = {}
    cfg = state_config(redis_server.url)
    states = [open_state(cfg) for _ in range(3)]
    for s in states:
        await s.__aenter__()
    monitors = [asyncio.create_task(s.monitor()) for s in states]  # supervised: checked below
    try:
        for _ in range(20):
            if await faults.step() == "count":
                await count_burst(faults, states, expected)
        faults.resume()
        deadline = time.monotonic() + 30
        while any(s.usage.pending for s in states):
            assert time.monotonic() < deadline, [s.usage.pending for s in states]
            assert not any(m.done() for m in monitors), [m.exception() for m in monitors if m.done()]
            await asyncio.sleep(0.1)
        rows = await states[0].usage_rows(1, "general")
    finally:
        for m in monitors:
            m.cancel()
        for s in states:
            await s.__aexit__(None, None, None)
    got = {r.client: r.counts for r in rows if r.day != TOTAL}
    assert got == {**expected, PROJECT_WIDE: sum(expected.values(), Counts())}
    assert all(s.usage.dropped == 0 for s in states)
