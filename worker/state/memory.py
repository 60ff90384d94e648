"""`MemoryState`: the state layer in this process's memory (the default; single box, zero setup).

Sessions are LRU-capped (`max_sessions`) and forgotten after `idle_ttl_s`; answered requestIds are
remembered for `dedupe_window_s`, at most `dedupe_max_entries` of them holding at most `dedupe_max_bytes`
(a cached reply carries the client's correlation data, so a count alone would not bound memory); token
buckets are LRU-capped; usage counters keep `usage_max_clients` clients per project and day for
`usage_retention_days` days (`state/usage.py`). A request still running holds a claim that no bound
evicts (admission bounds how many run). Everything is lost when the process ends: a fleet or a
restart that must keep conversations uses `redis://` (see `state/redis_backend.py`). A holder cannot
die without this memory dying with it, so locks and claims need no lease here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from worker.errors import RateLimitedError
from worker.protocol import FinalReply
from worker.state.base import Budget, Claim, Claimed, DedupeKey, Fence, History, SessionKey, StateHealth, Turn
from worker.state.usage import Quota, Usage, UsageBook, UsageRow

MAX_BUCKETS = 10_000
MAX_TURNS = 1_000
"""Turns kept per session whatever their token count (zero-token turns cannot grow a session)."""


@dataclass(frozen=True, slots=True)
class MemoryLimits:
    """The memory bounds (from `SessionsConfig` and `WorkerSection`)."""

    max_sessions: int = 10_000
    idle_ttl_s: float = 3600.0
    dedupe_window_s: float = 600.0
    dedupe_max_entries: int = 10_000
    dedupe_max_bytes: int = 64 * 1024 * 1024
    usage_max_clients: int = 1_000
    usage_retention_days: int = 35


@dataclass(slots=True)
class _Session:
    history: History = field(default_factory=History)
    last_used: float = 0.0


@dataclass(frozen=True, slots=True)
class _Cached:
    """An answered requestId: when it was answered, its final reply, and the bytes that costs."""

    stamp: float
    final: FinalReply
    size: int


@dataclass(slots=True)
class _TurnLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class MemoryState:
    """See the module docstring."""

    backend = "memory"

    def __init__(
        self,
        limits: MemoryLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] | None = None,
    ) -> None:
        self._limits = limits = limits or MemoryLimits()
        self._clock = clock
        self.usage = UsageBook(limits.usage_max_clients, limits.usage_retention_days, wall)
        """Usage counters and quotas by the UTC day of `wall` (default `usage.wall_clock`)."""
        self._sessions: OrderedDict[SessionKey, _Session] = OrderedDict()
        self._locks: dict[SessionKey, _TurnLock] = {}
        self._running: set[DedupeKey] = set()  # claimed, not yet answered: never evicted
        self._done: OrderedDict[DedupeKey, _Cached] = OrderedDict()  # answered, oldest first
        self._done_bytes = 0
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    # ---- sessions --------------------------------------------------------------------------------------
    async def load(self, key: SessionKey) -> History:
        """See `State.load`."""
        self._expire(self._clock())
        session = self._sessions.get(key)
        return session.history if session is not None else History()

    async def append(
        self, key: SessionKey, turn: Turn, system_prompt: str | None, max_tokens: int, fence: Fence = None
    ) -> None:
        """See `State.append`; refreshes LRU order and evicts idle or least recent sessions.

        No fence to check here: a holder cannot outlive this process's lock.
        """
        del fence
        now = self._clock()
        self._expire(now)
        existing = self._sessions.get(key)
        if turn.request_id is not None and existing is not None and recorded_answer(existing.history, turn.request_id):
            return  # recorded already: at most once per requestId
        session = self._sessions.pop(key, None) or _Session()
        self._sessions[key] = session
        session.last_used = now
        old = session.history
        session.history = History(
            trim((*old.turns, turn), max_tokens),
            system_prompt if system_prompt is not None else old.system_prompt,
        )
        excess = len(self._sessions) - self._limits.max_sessions
        if excess > 0:  # least recent first, never a session mid-turn (the cap is soft by those only)
            idle = (k for k in self._sessions if k not in self._locks)
            for oldest in list(itertools.islice(idle, excess)):
                del self._sessions[oldest]

    async def reset(self, key: SessionKey) -> bool:
        """See `State.reset`."""
        return self._sessions.pop(key, None) is not None

    @contextlib.asynccontextmanager
    async def lock(self, key: SessionKey) -> AsyncIterator[Fence]:
        """See `State.lock`: an asyncio.Lock per session (FIFO), dropped when nobody holds or waits."""
        entry = self._locks.setdefault(key, _TurnLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield None
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[key]

    def sessions(self, project: str) -> int | None:
        """See `State.sessions`."""
        return sum(1 for key in self._sessions if key[0] == project)

    def _expire(self, now: float) -> None:
        cutoff = now - self._limits.idle_ttl_s
        expired = []
        for key, session in self._sessions.items():  # least recent first
            if session.last_used >= cutoff:
                break
            if key not in self._locks:  # a session mid-turn stays, and does not shelter newer ones
                expired.append(key)
        for key in expired:
            del self._sessions[key]

    # ---- dedupe ----------------------------------------------------------------------------------------
    async def claim(self, key: DedupeKey) -> Claimed:
        """See `State.claim`."""
        self._forget_old(self._clock())
        if key in self._running:
            return Claimed(Claim.IN_FLIGHT)
        cached = self._done.get(key)
        if cached is not None:
            return Claimed(Claim.DONE, cached.final)
        self._running.add(key)
        return Claimed(Claim.NEW)

    async def complete(self, key: DedupeKey, final: FinalReply) -> bool:
        """See `State.complete`: cached as the newest entry; the oldest go while a bound is exceeded.

        A reply larger than the whole byte bound is not cached (its retry is generated again). Always True:
        no other holder can exist in one process.
        """
        now = self._clock()
        self._running.discard(key)
        self._drop(key)
        cached = _Cached(now, final, cached_bytes(key, final))
        if cached.size > self._limits.dedupe_max_bytes:  # would push out every other entry, then itself
            return True
        self._done[key] = cached
        self._done_bytes += cached.size
        self._forget_old(now)
        return True

    async def abandon(self, key: DedupeKey) -> bool:
        """See `State.abandon` (always True, as `complete`)."""
        self._running.discard(key)
        return True

    def dedupe_usage(self) -> tuple[int, int]:
        """(entries, bytes) of cached final replies, recounted (for tests and telemetry; O(entries))."""
        return len(self._done), sum(c.size for c in self._done.values())

    def _forget_old(self, now: float) -> None:
        """Forget answered requestIds past the window, then the oldest while over a bound."""
        cutoff = now - self._limits.dedupe_window_s
        limits = self._limits
        while self._done:
            key, cached = next(iter(self._done.items()))
            within = len(self._done) <= limits.dedupe_max_entries and self._done_bytes <= limits.dedupe_max_bytes
            if cached.stamp >= cutoff and within:
                return
            self._drop(key)

    def _drop(self, key: DedupeKey) -> None:
        cached = self._done.pop(key, None)
        if cached is not None:
            self._done_bytes -= cached.size

    # ---- rate limits -----------------------------------------------------------------------------------
    async def take(self, budgets: Sequence[Budget], quotas: Sequence[Quota] = ()) -> None:
        """See `State.take`: quotas first, then every bucket is checked before any is spent."""
        self.usage.check(quotas)
        now = self._clock()
        levels = [self._level(b, now) for b in budgets]
        for budget, level in zip(budgets, levels, strict=True):
            if level < 1.0:
                raise RateLimitedError(retry_after_ms=math.ceil((1.0 - level) / budget.rate_per_s * 1000))
        for budget, level in zip(budgets, levels, strict=True):
            self._buckets.pop(budget.key, None)
            self._buckets[budget.key] = (level - 1.0, now)  # most recently used last
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)

    def _level(self, budget: Budget, now: float) -> float:
        bucket = self._buckets.get(budget.key)
        if bucket is None:
            return float(budget.burst)
        tokens, stamp = bucket
        return min(float(budget.burst), tokens + (now - stamp) * budget.rate_per_s)

    # ---- usage -----------------------------------------------------------------------------------------
    def record_usage(self, usage: Usage) -> None:
        """See `State.record_usage`: counted at once."""
        self.usage.add(usage)

    async def usage_rows(self, days: int, project: str | None = None, client: str | None = None) -> list[UsageRow]:
        """See `State.usage_rows`: this process' counters (since it started)."""
        return self.usage.rows(days, project, client)

    def own_usage(self) -> UsageBook:
        """See `State.own_usage`: the same counters."""
        return self.usage

    # ---- health ----------------------------------------------------------------------------------------
    def health(self) -> StateHealth:
        """See `State.health`: memory is always there."""
        return StateHealth(self.backend, healthy=True)

    async def monitor(self) -> None:
        """Nothing to probe or renew: waits forever (so it can be supervised like the Redis one)."""
        await asyncio.Event().wait()


def recorded_answer(history: History, request_id: str) -> str | None:
    """The answer of the turn `request_id` produced, when the session holds it (newest first: retries are recent)."""
    return next((t.assistant for t in reversed(history.turns) if t.request_id == request_id), None)


def trim(turns: Sequence[Turn], max_tokens: int) -> tuple[Turn, ...]:
    """The newest turns whose tokens add up to at most `max_tokens` (oldest dropped first).

    A tool round is one unit: a turn that continues the previous one's calls (`tool_results`) is kept
    only with it, so history never holds half a call.
    """
    units = _units(turns[-MAX_TURNS:])
    kept: list[tuple[Turn, ...]] = []
    total = 0
    for unit in reversed(units):
        total += sum(t.tokens for t in unit)
        if total > max_tokens:
            break
        kept.append(unit)
    return tuple(t for unit in reversed(kept) for t in unit)


def _units(turns: Sequence[Turn]) -> list[tuple[Turn, ...]]:
    """Turns grouped into tool rounds; a leading continuation whose call was trimmed away is dropped."""
    units: list[list[Turn]] = []
    for turn in turns:
        if turn.tool_results and units and units[-1][-1].tool_calls:
            units[-1].append(turn)
        elif not turn.tool_results:
            units.append([turn])
    return [tuple(u) for u in units]


def cached_bytes(key: DedupeKey, final: FinalReply) -> int:
    """What `dedupe_max_bytes` counts for one cached reply: its key, topic, payload and correlation data."""
    key_bytes = sum(len(part.encode()) for part in key)
    return key_bytes + len(final.topic.encode()) + len(final.payload) + len(final.correlation_data or b"")
