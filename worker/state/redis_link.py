"""`RedisLink`: the connection to Redis and its health, apart from what the keys mean (`redis_backend`).

Calls fail fast while Redis is down (no connect per request) and mark it down on a connection failure;
`monitor` renews this worker's leases every lease_s/3 (the renewal doubles as the health probe) and,
while down, probes with backoff until it answers. Each probe also measures the server's clock against
ours, so deadlines can be written on the server's clock (`server_ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.errors import StateUnavailableError
from worker.state import scripts
from worker.state.base import StateHealth
from worker.state.codec import redact

log = structlog.get_logger(__name__)
T = TypeVar("T")
_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
PROBE_MAX_S = 1.0
"""While Redis is down it is probed at least this often: the fleet is back within about a second of it."""
RECORD_ATTEMPTS = 4
"""An idempotent write is retried for this many op timeouts (a stall shorter than that ends written)."""


class RedisLink:
    """See the module docstring. `leases` maps a key to the value it must hold while this worker lives."""

    def __init__(self, url: str, *, lease_s: float, op_timeout_s: float) -> None:
        self._url = url
        self.lease_ms = max(1, round(lease_s * 1000))
        self._renew_every_s = max(0.05, lease_s / 3)
        self.op_timeout_s = op_timeout_s
        self.leases: dict[str, str] = {}
        self.healthy = False
        self.latency_ms: float | None = None
        self._went_down = asyncio.Event()
        self._offset_ms = 0.0
        self.offset_err_s = op_timeout_s
        """The error of the measured clock offset (half a probe's round trip; op_timeout_s until measured)."""
        self._r: aioredis.Redis | None = None

    @property
    def r(self) -> aioredis.Redis:
        """The client (only between `open` and `close`)."""
        assert self._r is not None  # noqa: S101 - only inside the state's context
        return self._r

    async def open(self) -> bool:
        """Create the client and probe once; False: Redis did not answer (the worker starts degraded)."""
        self._r = aioredis.Redis.from_url(
            self._url,
            socket_timeout=self.op_timeout_s,
            socket_connect_timeout=self.op_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._renew = self._r.register_script(scripts.RENEW)
        self.healthy = True
        return await self.probe()

    async def close(self) -> None:
        """Close the client; a Redis that is down cannot delay the worker's exit."""
        if self._r is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._r.aclose()

    async def call(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis step; fail fast while down; a connection failure marks the backend down."""
        if not self.healthy or self._r is None:
            raise StateUnavailableError(retry_after_ms=1000)
        try:
            return await step()
        except _DOWN as err:
            self._mark_down(err)
            raise StateUnavailableError(retry_after_ms=1000) from err
        except RedisError as err:  # refused by the server (OOM, READONLY, ...): this call only
            log.warning("state.refused", error=type(err).__name__, detail=str(err)[:200])
            raise StateUnavailableError(retry_after_ms=1000) from err

    async def retried(self, step: Callable[[], Awaitable[T]]) -> T | None:
        """An idempotent step, retried through a short outage (`RECORD_ATTEMPTS` op timeouts); None: gave up.

        Caching a final reply or giving a claim back must survive a Redis stall of a few seconds: else the
        claim lapses uncached and a retry of the requestId is generated again, with another answer.
        """
        give_up = time.monotonic() + RECORD_ATTEMPTS * self.op_timeout_s
        while True:
            try:
                return await self.call(step)
            except StateUnavailableError:
                if time.monotonic() >= give_up:
                    return None
                await self.pause()

    async def pause(self) -> None:
        """Between retries: calls fail fast while Redis is down, and `monitor` probes meanwhile."""
        await asyncio.sleep(min(0.25, self.op_timeout_s / 4))

    def _mark_down(self, err: BaseException) -> None:
        if self.healthy:
            log.error("state.unavailable", url=redact(self._url), error=type(err).__name__, action="degraded")
        self.healthy = False
        self._went_down.set()

    def server_ms(self, local_time: float) -> int:
        """A local wall-clock instant on the server's clock (as last measured by `probe`)."""
        return round(local_time * 1000 + self._offset_ms)

    def _track_clock(self, server_ms: float, sent_wall: float) -> None:
        """Server clock minus ours, from one round trip (its error: half the round trip)."""
        now = time.time()
        self._offset_ms = server_ms - (sent_wall + now) * 500
        self.offset_err_s = (now - sent_wall) / 2

    def health(self, backend: str) -> StateHealth:
        """Up or degraded, with the last probe's round trip."""
        return StateHealth(backend, self.healthy, self.latency_ms, degraded=not self.healthy)

    async def monitor(self) -> None:
        """Renew leases every lease_s/3 (this doubles as the health probe); probe with backoff while down."""
        backoff = 0.5
        while True:
            if self.healthy:
                with contextlib.suppress(TimeoutError):  # a call that finds Redis down ends the wait at once
                    async with asyncio.timeout(self._renew_every_s):
                        await self._went_down.wait()
                self._went_down.clear()
                await self.probe()
            else:
                await asyncio.sleep(backoff)
                backoff = 0.5 if await self.probe() else min(backoff * 2, PROBE_MAX_S)

    async def probe(self) -> bool:
        """One round trip: renew our leases (or TIME); records latency and the clock, flips health both ways."""
        leases = dict(self.leases)
        started, started_wall = time.monotonic(), time.time()
        try:
            if leases:
                lost, seconds, micros = await self._renew(keys=list(leases), args=[self.lease_ms, *leases.values()])
                if int(lost):
                    log.warning("state.leases_lost", count=int(lost))
            else:
                seconds, micros = await self.r.time()
        except _DOWN as err:
            self._mark_down(err)
            return False
        except RedisError as err:
            log.warning("state.probe_refused", error=type(err).__name__, detail=str(err)[:200])
            return False
        self.latency_ms = round((time.monotonic() - started) * 1000, 2)
        self._track_clock(int(seconds) * 1000 + int(micros) / 1000, started_wall)
        if not self.healthy:
            log.info("state.recovered", url=redact(self._url), latency_ms=self.latency_ms)
        self.healthy = True
        return True
