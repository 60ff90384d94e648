"""`MemoryState`: the state layer in this process's memory (the default; single box, zero setup).

Sessions are LRU-capped (`max_sessions`) and forgotten after `idle_ttl_s`; requestIds are remembered for
`dedupe_window_s` (at most `dedupe_max_entries`); token buckets are LRU-capped. Everything is lost when
the process ends: a fleet or a restart that must keep conversations uses `redis://` (see `state/redis.py`).
A holder cannot die without this memory dying with it, so locks and claims need no lease here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from worker.errors import RateLimitedError
from worker.protocol import FinalReply
from worker.state.base import Budget, Claim, Claimed, DedupeKey, History, SessionKey, StateHealth, Turn

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


@dataclass(slots=True)
class _Session:
    history: History = field(default_factory=History)
    last_used: float = 0.0


@dataclass(slots=True)
class _TurnLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class MemoryState:
    """See the module docstring."""

    backend = "memory"

    def __init__(self, limits: MemoryLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits or MemoryLimits()
        self._clock = clock
        self._sessions: OrderedDict[SessionKey, _Session] = OrderedDict()
        self._locks: dict[SessionKey, _TurnLock] = {}
        # requestId -> (time claimed or answered, final reply once sent); oldest first
        self._seen: OrderedDict[DedupeKey, tuple[float, FinalReply | None]] = OrderedDict()
        self._running: set[DedupeKey] = set()
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

    async def append(self, key: SessionKey, turn: Turn, system_prompt: str | None, max_tokens: int) -> None:
        """See `State.append`; refreshes LRU order and evicts idle or least recent sessions."""
        now = self._clock()
        self._expire(now)
        session = self._sessions.pop(key, None) or _Session()
        self._sessions[key] = session
        session.last_used = now
        old = session.history
        session.history = History(
            trim((*old.turns, turn), max_tokens),
            system_prompt if system_prompt is not None else old.system_prompt,
        )
        while len(self._sessions) > self._limits.max_sessions:
            oldest = next(iter(self._sessions))
            if oldest in self._locks:  # never evict a session mid-turn; the cap is soft then
                break
            del self._sessions[oldest]

    async def reset(self, key: SessionKey) -> bool:
        """See `State.reset`."""
        return self._sessions.pop(key, None) is not None

    @contextlib.asynccontextmanager
    async def lock(self, key: SessionKey) -> AsyncIterator[None]:
        """See `State.lock`: an asyncio.Lock per session (FIFO), dropped when nobody holds or waits."""
        entry = self._locks.setdefault(key, _TurnLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[key]

    def sessions(self, project: str) -> int | None:
        """See `State.sessions`."""
        return sum(1 for key in self._sessions if key[0] == project)

    def _expire(self, now: float) -> None:
        cutoff = now - self._limits.idle_ttl_s
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if session.last_used >= cutoff or key in self._locks:
                return
            del self._sessions[key]

    # ---- dedupe ----------------------------------------------------------------------------------------
    async def claim(self, key: DedupeKey) -> Claimed:
        """See `State.claim`."""
        now = self._clock()
        self._forget_old(now)
        if key in self._running:
            return Claimed(Claim.IN_FLIGHT)
        seen = self._seen.get(key)
        if seen is not None and seen[1] is not None:
            return Claimed(Claim.DONE, seen[1])
        self._running.add(key)
        self._seen[key] = (now, None)
        self._seen.move_to_end(key)
        return Claimed(Claim.NEW)

    async def complete(self, key: DedupeKey, final: FinalReply) -> None:
        """See `State.complete`."""
        self._running.discard(key)
        stamp = self._seen[key][0] if key in self._seen else self._clock()
        self._seen[key] = (stamp, final)  # in place: the window runs from the claim

    async def abandon(self, key: DedupeKey) -> None:
        """See `State.abandon`."""
        if key in self._running:
            self._running.discard(key)
            self._seen.pop(key, None)

    def _forget_old(self, now: float) -> None:
        cutoff = now - self._limits.dedupe_window_s
        while self._seen:
            key, (stamp, _) = next(iter(self._seen.items()))
            if stamp >= cutoff and len(self._seen) <= self._limits.dedupe_max_entries:
                return
            if key in self._running:  # never forget a running one (the cap is soft while it runs)
                self._seen.move_to_end(key)
                if len(self._seen) <= len(self._running):
                    return
                continue
            del self._seen[key]

    # ---- rate limits -----------------------------------------------------------------------------------
    async def take(self, budgets: Sequence[Budget]) -> None:
        """See `State.take`: every bucket is checked before any is spent."""
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

    # ---- health ----------------------------------------------------------------------------------------
    def health(self) -> StateHealth:
        """See `State.health`: memory is always there."""
        return StateHealth(self.backend, healthy=True)

    async def monitor(self) -> None:
        """Nothing to probe or renew: waits forever (so it can be supervised like the Redis one)."""
        await asyncio.Event().wait()


def trim(turns: Sequence[Turn], max_tokens: int) -> tuple[Turn, ...]:
    """The newest turns whose tokens add up to at most `max_tokens` (oldest dropped first)."""
    kept: list[Turn] = []
    total = 0
    for turn in reversed(turns[-MAX_TURNS:]):
        total += turn.tokens
        if total > max_tokens:
            break
        kept.append(turn)
    return tuple(reversed(kept))
