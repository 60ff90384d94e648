"""No per-request memory growth in the worker's own code (issue 21: the soak grew ~1.1 MiB/min, 8 B an answer).

Every bounded structure (dedupe, sessions, buckets) is made small so the first batch fills it; then two
more equal batches run under tracemalloc, and no allocation site in worker/ may grow by 8 KiB (4 B a request)
between them (which object of a bounded structure survives shifts a few KiB between sites). The
leak that was found (FakeEngine kept every request's priority) grew 16 KiB per batch at one site.
"""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from pathlib import Path

import pytest
from support import running_worker, until

import worker
from worker.config import BrokerConfig
from worker.transport.bus import Bus

pytestmark = pytest.mark.faults

BATCH = 2000
CONCURRENCY = 50
WORKER_DIR = str(Path(worker.__file__).parent)


class Counting:
    """A subscriber that counts answers and keeps none (a Peer keeps every message: that would be growth)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.count = 0
        self.changed = asyncio.Event()

    async def read(self) -> None:
        while True:
            msg = await self.bus.messages()
            self.bus.ack(msg)
            self.count += 1
            self.changed.set()

    async def until(self, n: int) -> None:
        async with asyncio.timeout(30):
            while self.count < n:
                self.changed.clear()
                await self.changed.wait()


async def run_batch(sub: Counting, start: int) -> None:
    for i in range(start, start + BATCH):
        body = {"v": 2, "message": f"q{i}", "clientId": f"c{i % 300}", "sessionId": f"s{i % 700}", "requestId": f"r{i}"}
        await sub.bus.publish("general/user_input", json.dumps(body).encode(), wait=False)
        if (i + 1) % CONCURRENCY == 0:  # keep the load bounded: wait for this slice's answers
            await sub.until(i + 1)
    await sub.until(start + BATCH)


def worker_sites(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    return snapshot.filter_traces([tracemalloc.Filter(inclusive=True, filename_pattern=f"{WORKER_DIR}/*")])


@pytest.mark.timeout(300)
async def test_no_allocation_site_in_the_worker_grows_with_requests():
    small = {"dedupe_max_entries": 200, "max_inflight": 10_000}
    async with (
        running_worker(projects=["general"], worker=small, sessions={"max_sessions": 200}) as w,
        Bus(BrokerConfig(url=f"mqtt://127.0.0.1:{w.port}"), "leak-load", protocol="3.1.1") as bus,
    ):
        sub = Counting(bus)
        reader = asyncio.create_task(sub.read())
        await bus.subscribe(["general/response/+"])
        await run_batch(sub, 0)  # warm-up: fills every bounded structure
        jobs = w.service._jobs
        assert jobs is not None
        tracemalloc.start(8)
        try:
            await run_batch(sub, BATCH)
            await until(lambda: len(jobs) == 0)  # quiescent: a job whose answer was read may still be settling
            gc.collect()
            first = worker_sites(tracemalloc.take_snapshot())
            await run_batch(sub, 2 * BATCH)
            await until(lambda: len(jobs) == 0)
            gc.collect()
            second = worker_sites(tracemalloc.take_snapshot())
        finally:
            tracemalloc.stop()
            reader.cancel()
        assert w.service.counters[("general", "requests")] == 3 * BATCH
    growing = [s for s in second.compare_to(first, "traceback") if s.size_diff > 8192]  # >= 4 B a request
    assert not growing, "\n".join(f"{s}\n  " + "\n  ".join(s.traceback.format()) for s in growing)
